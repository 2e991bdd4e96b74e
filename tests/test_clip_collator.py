"""clip_retrieval data: eos-keeping truncation, per-epoch caption sampling, collated rows and keys, the
embedded data."""

import datasets
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from data_tools.errors import DataError
from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic
from recipes.clip_retrieval.collator import (
    ContrastiveCollator,
    EpochPairSampler,
    PairDataset,
    caption_key,
    drop_size_words,
    load_zero_shot,
    tokenize_texts,
)
from tests.conftest import word_tokenizer

VOCAB = ["<pad>", "<unk>", "<bos>", "<eos>", "a", "red", "circle", "blue", "square", "small", "large",
         "shape", "photo", "of"]
PAD, BOS, EOS = 0, 2, 3


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer(VOCAB)


def _records(tmp_path, rows):
    for r in rows:
        if not (tmp_path / r["image"]).exists():
            Image.new("RGB", (20, 10), "red").save(tmp_path / r["image"])
    return datasets.Dataset.from_list([{**r, "image": str(tmp_path / r["image"])} for r in rows])


def test_long_texts_lose_tokens_before_the_eos_and_are_counted(tokenizer):
    from recipes.clip_retrieval.collator import TextLengthReport

    report = TextLengthReport()
    ids = tokenize_texts(["a red circle", "a small red circle a blue square"], tokenizer, max_length=5,
                         report=report)
    assert ids == [[BOS, 4, 5, 6, EOS], [BOS, 4, 9, 5, EOS]]
    assert (report.texts, report.truncated, report.tokens_cut) == (2, 1, 4)
    assert "1 cut to max_length (4 tokens cut, eos kept)" in str(report)


def test_sampler_draws_every_image_once_per_epoch_from_seed_and_epoch_alone():
    n_captions, n_negatives = [5, 1, 3, 2, 5, 4], [3, 0, 3, 3, 0, 3]
    s = EpochPairSampler(n_captions, n_negatives, seed=7)
    epoch0 = list(s)
    assert sorted(i for i, _, _ in epoch0) == list(range(6))
    assert all(0 <= j < n_captions[i] and (k == -1 if n_negatives[i] == 0 else 0 <= k < n_negatives[i])
               for i, j, k in epoch0)
    again = EpochPairSampler(n_captions, n_negatives, seed=7)
    assert list(again) == epoch0  # a fresh sampler (a resumed run, another rank) draws the same pairs
    s.set_epoch(1)
    again.set_epoch(1)
    assert list(s) == list(again) != epoch0
    s.set_epoch(0)
    assert list(s) == epoch0 and list(EpochPairSampler(n_captions, n_negatives, seed=8)) != epoch0
    # Over many epochs every caption of an image is drawn.
    drawn = set()
    for epoch in range(40):
        s.set_epoch(epoch)
        drawn |= {(i, j) for i, j, _ in s}
    assert drawn == {(i, j) for i, n in enumerate(n_captions) for j in range(n)}


def test_collated_batch_holds_positives_then_negatives_with_their_keys(tokenizer, tmp_path):
    records = _records(tmp_path, [
        {"image": "a.png", "captions": ["a red circle", "a small red circle"],
         "neg_captions": ["a blue circle"]},
        {"image": "b.png", "captions": ["a blue square"], "neg_captions": None},
        {"image": "a.png", "captions": ["a  red circle"], "neg_captions": ["a red square"]},
    ])
    data = PairDataset(records, tokenizer, max_length=16, hard_negatives=True)
    assert data.image_keys == [0, 1, 0]  # the same file twice is one image
    collate = ContrastiveCollator(CLIPImageProcessor(size={"shortest_edge": 8},
                                                     crop_size={"height": 8, "width": 8}), PAD)
    batch = collate([data[(0, 1, 0)], data[(1, 0, -1)], data[(2, 0, 0)]])
    assert batch["pixel_values"].shape == (3, 3, 8, 8)
    assert batch["input_ids"].tolist() == [
        # positives, one per image
        [BOS, 4, 9, 5, 6, EOS], [BOS, 4, 7, 8, EOS, PAD], [BOS, 4, 5, 6, EOS, PAD],
        [BOS, 4, 7, 6, EOS, PAD], [BOS, 4, 5, 8, EOS, PAD],  # hard negatives of items 0 and 2
    ]
    assert batch["attention_mask"].sum(1).tolist() == [6, 5, 5, 5, 5]
    assert batch["image_keys"].tolist() == [0, 1, 0]
    keys = [caption_key(t) for t in ("a small red circle", "a blue square", "a red circle", "a blue circle",
                                     "a red square")]
    assert batch["text_keys"].tolist() == keys
    # every caption of each image, drawn or not, padded to the data set's widest image (2 captions)
    assert batch["caption_keys"].tolist() == [[keys[2], keys[0]], [keys[1], -1], [keys[2], -1]]
    assert caption_key("A  Red circle") == caption_key("a red circle") != caption_key("a red circles")
    # Without hard_negatives the records' negatives are not used, and an int index is the first caption.
    plain = PairDataset(records, tokenizer, max_length=16)
    assert plain[0]["input_ids"] == [BOS, 4, 5, 6, EOS] and plain[0]["neg_input_ids"] is None
    ids, images = plain.texts()
    assert (ids == [[BOS, 4, 5, 6, EOS], [BOS, 4, 9, 5, 6, EOS], [BOS, 4, 7, 8, EOS], [BOS, 4, 5, 6, EOS]]
            and images == [0, 0, 1, 2])


def test_size_words_are_dropped_and_articles_agree(tmp_path):
    for lang, sizes in (("en", ("small", "little", "large", "big")), ("zh", ("小的", "大的"))):
        rows = read_jsonl(make_synthetic("retrieval", 60, tmp_path / lang, lang=lang, seed=4, progress=False))
        captions = [c for r in rows for c in r["captions"]]
        assert any(s in c for c in captions for s in sizes)  # the originals name sizes
        for c in captions:
            dropped = drop_size_words(c, lang)
            assert not any(s in dropped.split() if lang == "en" else s in dropped for s in sizes), dropped
            assert drop_size_words(dropped, lang) == dropped
        assert lang == "zh" or not any(" a orange" in drop_size_words(c) or c.startswith("a orange")
                                       for c in captions)
    assert (drop_size_words("there are two shapes: a little orange cross at the top and a big blue circle")
            == "there are two shapes: an orange cross at the top and a blue circle")
    assert drop_size_words("左侧的一个小的红色圆形", "zh") == "左侧的一个红色圆形"


def test_zero_shot_file_errors_name_file_line_and_field(tokenizer, tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    good = tmp_path / "zs.jsonl"
    write_jsonl(good, [{"image": "x.png", "label": "small"}, {"image": "x.png", "label": "large"}])
    zs = load_zero_shot(good, ["a {label} shape", "{label}"], tokenizer, 16)
    assert zs.labels == ["large", "small"] and zs.targets == [1, 0]
    assert zs.prompt_ids[0] == [[BOS, 4, 10, 11, EOS], [BOS, 10, EOS]]
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"image": "x.png", "label": "small"}, {"image": "x.png"}])
    with pytest.raises(DataError, match=rf"{bad}:2: field 'label': is missing"):
        load_zero_shot(bad, ["{label}"], tokenizer, 16)
    with pytest.raises(DataError, match=rf"{good}:1: field 'label': label 'small' is not one of"):
        load_zero_shot(good, ["{label}"], tokenizer, 16, labels=["large", "medium"])
    with pytest.raises(ValueError, match="must each contain"):
        load_zero_shot(good, ["a photo"], tokenizer, 16)
    # A missing image when the file is read, not a traceback at the first evaluation; a template with a
    # field other than {label} likewise.
    write_jsonl(bad, [{"image": "x.png", "label": "small"}, {"image": "gone.png", "label": "large"}])
    with pytest.raises(DataError, match=rf"{bad}:2: field 'image': 'gone.png': image file does not "
                                        rf"exist.* relative to the file's own folder, {tmp_path}, not to "
                                        "--image_root"):
        load_zero_shot(bad, ["{label}"], tokenizer, 16)
    with pytest.raises(ValueError, match=r"template 'a \{label\} \{kind\}': \{label\} is its only field"):
        load_zero_shot(good, ["a {label} {kind}"], tokenizer, 16)


def test_embedded_data_has_no_size_words_and_zero_shot_images_hold_one_object(tmp_path, monkeypatch):
    from data_tools.synth import make_scene
    from recipes.clip_retrieval.collator import ZERO_SHOT_SEED, embedded_retrieval, embedded_zero_shot

    monkeypatch.setenv("VLM_RECIPES_CACHE", str(tmp_path))
    splits = embedded_retrieval(n=20)
    for name, path in splits.items():
        original, rows = read_jsonl(path.with_name(f"{name}.jsonl")), read_jsonl(path)
        assert [r["image"] for r in rows] == [r["image"] for r in original] and rows
        for row, orig in zip(rows, original):
            assert row["captions"] == list(dict.fromkeys(drop_size_words(c) for c in orig["captions"]))
            assert not any(w in c.split() for c in row["captions"]
                           for w in ("small", "little", "large", "big"))
    assert (embedded_retrieval(n=20) == splits
            and embedded_retrieval(n=20, without_size=False)["train"].name == "train.jsonl")

    path = embedded_zero_shot("size", n=6)
    rows = read_jsonl(path)
    assert len(rows) == 6 and all((path.parent / r["image"]).exists() for r in rows)
    for r in rows:
        objects = make_scene(ZERO_SHOT_SEED, int(r["image"][7:13]))
        assert len(objects) == 1 and r["label"] == objects[0]["size"]


def test_rows_of_one_image_merge_into_one_record_with_all_their_texts(tmp_path):
    from recipes.clip_retrieval.collator import records_by_image

    records = _records(tmp_path, [
        {"image": "a.png", "captions": ["a red circle"], "neg_captions": None},
        {"image": "b.png", "captions": ["a blue square"], "neg_captions": ["a red square"]},
        {"image": "a.png", "captions": ["a small red circle"], "neg_captions": ["a blue circle"]},
        {"image": "a.png", "captions": ["a large red circle"], "neg_captions": ["a red square"]},
    ])
    merged = records_by_image(records)
    assert [r["image"] for r in merged] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    assert merged["captions"] == [["a red circle", "a small red circle", "a large red circle"],
                                  ["a blue square"]]
    assert merged["neg_captions"] == [["a blue circle", "a red square"], ["a red square"]]
    unique = records.select([0, 1])
    assert records_by_image(unique) is unique  # one row per image: the records as they are


def test_an_empty_neg_captions_list_is_a_row_without_negatives(tmp_path, tokenizer):
    from recipes.common.data import load_records

    Image.new("RGB", (20, 10), "red").save(tmp_path / "a.png")
    Image.new("RGB", (20, 10), "blue").save(tmp_path / "b.png")
    write_jsonl(tmp_path / "r.jsonl", [{"image": "a.png", "captions": ["a red circle"], "neg_captions": []},
                                       {"image": "b.png", "captions": ["a blue square"],
                                        "neg_captions": ["a red square"]}])
    records = load_records(tmp_path / "r.jsonl", "retrieval")  # both rows kept, none rejected
    assert records["captions"] == [["a red circle"], ["a blue square"]]
    assert PairDataset(records, tokenizer, 16, hard_negatives=True).negatives == [[], [[BOS, 4, 5, 8, EOS]]]
