"""clip_retrieval hard negatives from a user's file: a neg_caption that is one of its own image's captions
(rows merged per image, or a plain mistake) is no negative of that image."""

import datasets
import pytest

from recipes.clip_retrieval.collator import PairDataset, caption_key, records_by_image
from tests.conftest import word_tokenizer

VOCAB = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "red", "circle", "blue", "square", "green"]
BOS, EOS = 2, 3


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(VOCAB)


def test_a_negative_equal_to_another_caption_of_its_image_is_dropped_and_counted(tokenizer):
    # A file with a row per caption: the first row's negative is the second row's caption (up to case and
    # spaces), so after merging it would push the image away from one of its own captions.
    rows = datasets.Dataset.from_list([
        {"image": "/x/a.png", "captions": ["a red circle"],
         "neg_captions": ["A blue  square", "a green circle"]},
        {"image": "/x/a.png", "captions": ["a blue square"], "neg_captions": None},
        {"image": "/x/b.png", "captions": ["a green square"], "neg_captions": ["a blue square"]},
    ])
    data = PairDataset(records_by_image(rows), tokenizer, max_length=16, hard_negatives=True)
    # Image a keeps only "a green circle"; image b keeps "a blue square", which is not its own caption.
    assert data.negatives == [[[BOS, 4, 9, 6, EOS]], [[BOS, 4, 7, 8, EOS]]]
    assert data.negative_keys == [[caption_key("a green circle")], [caption_key("a blue square")]]
    assert data.negatives_dropped == 1
    own = [set(k) for k in data.caption_keys]
    for epoch in range(20):
        sampler = data.epoch_sampler(seed=0)
        sampler.set_epoch(epoch)
        for item in sampler:
            x = data[item]
            assert x["neg_key"] is None or x["neg_key"] not in own[item[0]]

