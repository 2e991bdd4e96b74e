"""qlora_vqa data: short-answer conversations with answer-only labels, generation items, VQA scores and the
per-question-type prior baseline (eval.vqa.question_type_prior)."""

import datasets
import pytest
from PIL import Image

from eval.vqa import question_type_prior
from recipes.common.chat import ChatEncoder, to_messages, tokenize_conversations
from recipes.common.tiny.models import LLAVA_CHAT_TEMPLATE
from recipes.qlora_vqa.collator import (metric_name, prior_predictions, training_answer, vqa_conversations,
                                        vqa_items, vqa_scores)
from tests.conftest import word_llava_processor

VOCAB = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER", ":", "ASSISTANT", "what", "color", "is", "the",
         "circle", "?", "answer", "briefly", ".", "red", "blue", "how", "many", "2", "two"]
V = {w: i for i, w in enumerate(VOCAB)}
BOS, EOS, IMG = V["<s>"], V["</s>"], V["<image>"]
M = -100
N_IMG = 4  # 16 px images, 8 px patches, CLS dropped


@pytest.fixture(scope="module")
def encoder():
    return ChatEncoder(word_llava_processor(V, LLAVA_CHAT_TEMPLATE))


def ids(text):
    return [V[w] for w in text.split()]


@pytest.fixture(autouse=True, scope="module")
def images_in_cwd(tmp_path_factory):
    """RECORDS name a.png and b.png relative to the working folder: the encoder opens each image."""
    import os

    folder, before = tmp_path_factory.mktemp("images"), os.getcwd()
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (16, 16), colour).save(folder / name)
    os.chdir(folder)
    yield
    os.chdir(before)


RECORDS = [
    {"image": "a.png", "question_id": 7, "question": "what color is the circle ?",
     "answers": ["blue", "red", "red", "blue", "red", "red", "red", "red", "red", "blue"],
     "answer_type": "other", "question_type": "what color is the"},
    {"image": "b.png", "question_id": 8, "question": "how many ?", "answers": ["two", "2", "2", "two"],
     "answer_type": "number", "question_type": "how many"},
]


def test_training_answer_is_the_most_frequent_first_on_ties():
    assert training_answer(RECORDS[0]["answers"]) == "red"
    assert training_answer(RECORDS[1]["answers"]) == "two"  # 2 against 2: the first seen
    assert training_answer([" blue "]) == "blue"


def test_training_answer_counts_answers_as_the_metric_normalises_them():
    from eval.vqa import question_accuracy

    answers = ["Red", "red", "Red.", "blue", "blue"]
    assert training_answer(answers) == "Red"  # three as the metric reads them; "Red" written most
    assert question_accuracy(training_answer(answers), answers) == max(
        question_accuracy(a, answers) for a in answers)
    assert training_answer(["two", "2", "2", "three", "three"]) == "2"


def test_labels_cover_the_answer_and_eos_only(encoder):
    ds = vqa_conversations(datasets.Dataset.from_list(RECORDS), prompt="answer briefly .")
    assert ds[0]["conversations"] == [
        {"from": "human", "value": "<image>\nwhat color is the circle ?\nanswer briefly ."},
        {"from": "gpt", "value": "red"}]
    samples, report = tokenize_conversations(ds, encoder, max_length=None)
    prompt = ([BOS] + ids("USER :") + [IMG] * N_IMG
              + ids("what color is the circle ? answer briefly . ASSISTANT :"))
    assert samples[0]["input_ids"] == prompt + [V["red"], EOS]
    assert samples[0]["labels"] == [M] * len(prompt) + [V["red"], EOS]
    assert (samples[1]["labels"][-2:] == [V["two"], EOS]
            and samples[1]["labels"].count(M) == len(samples[1]["labels"]) - 2)
    assert (report.samples, report.dropped, report.cut) == (2, 0, 0)


def test_the_answer_prompt_is_added_once_as_chat_and_serve_add_it():
    """A question that already ends with the prompt (LLaVA-1.5's VQA data writes it in) is not asked with it
    twice; spaces around the question go, in training and in chat.py and serve alike."""
    from recipes.common.chat import with_answer_prompt

    written = [{**RECORDS[0], "question": " what color is the circle ?\nanswer briefly . "},
               {**RECORDS[0], "question": "what color is the circle ?  "}]
    ds = vqa_conversations(datasets.Dataset.from_list(written), prompt="answer briefly .")
    asked = "<image>\nwhat color is the circle ?\nanswer briefly ."
    assert [c[0]["value"] for c in ds["conversations"]] == [asked] * 2
    assert f"<image>\n{with_answer_prompt(written[1]['question'], 'answer briefly .')}" == asked
    assert with_answer_prompt("why ?", None) == "why ?"


def test_a_sample_longer_than_the_budget_is_dropped_and_counted(encoder):
    ds = vqa_conversations(datasets.Dataset.from_list(RECORDS), prompt=None)
    # the color question, the longer one
    full = len(tokenize_conversations(ds, encoder, None)[0][0]["input_ids"])
    samples, report = tokenize_conversations(ds, encoder, max_length=full - 1)
    assert len(samples) == 1 and report.dropped == 1  # never cut inside the answer of a one-turn conversation


def test_generation_prompt_ends_where_the_answer_starts(encoder, tmp_path):
    items = vqa_items(datasets.Dataset.from_list(RECORDS), prompt="answer briefly .")
    assert items[0]["key"] == 7 and items[0]["conversations"] == [
        {"from": "human", "value": "<image>\nwhat color is the circle ?\nanswer briefly ."}]
    prompt = encoder.encode_prompt(to_messages(items[0]["conversations"], n_images=1), [Image.open("a.png")])
    train = tokenize_conversations(vqa_conversations(datasets.Dataset.from_list(RECORDS[:1]),
                                                     "answer briefly ."), encoder, None)[0]
    # answers are asked for exactly as they were trained
    assert train[0]["input_ids"][: len(prompt)] == prompt


def test_scores_are_official_accuracy_overall_and_per_answer_type():
    items = vqa_items(datasets.Dataset.from_list(RECORDS))
    # "red": 7 of 10 annotators -> 100; "2" vs ["two", "2", "2", "two"] (normalised: four "2") -> 100.
    assert vqa_scores({7: "red", 8: "2"}, items) == {"VQA_accuracy": 100.0, "VQA_accuracy_number": 100.0,
                                                      "VQA_accuracy_other": 100.0}
    # "blue": 3 of 10, leave-one-out mean: (7 * min(1, 3/3) + 3 * min(1, 2/3)) / 10 = 0.9.
    assert vqa_scores({7: "blue", 8: "three"}, items) == {"VQA_accuracy": 45.0, "VQA_accuracy_number": 0.0,
                                                          "VQA_accuracy_other": 90.0}
    # a subset: only its keys
    assert vqa_scores({8: "2"}, items) == {"VQA_accuracy": 100.0, "VQA_accuracy_number": 100.0}
    assert metric_name("yes/no") == "VQA_accuracy_yes_no"


def test_question_type_prior_is_the_most_popular_training_answer_per_type():
    train = [
        {"answers": ["yes", "yes", "no"], "question_type": "is the"},
        {"answers": ["no", "no", "no"], "question_type": "is the"},  # "no" 4 : "yes" 2
        {"answers": ["2", "3"], "question_type": "how many"},  # a tie: the first seen
        {"answers": ["red"] * 5},  # no question type: counts towards the overall answer only
    ]
    assert question_type_prior(train) == {None: "red", "is the": "no", "how many": "2"}
    items = [{"key": 1, "question_type": "is the"},
             {"key": 2, "question_type": "what shape is the"}, {"key": 3}]
    # unseen types: the overall answer
    assert prior_predictions(train, items) == {1: "no", 2: "red", 3: "red"}
    with pytest.raises(ValueError, match="no answers"):
        question_type_prior([])


def test_collated_images_match_the_samples(encoder, tmp_path):
    from recipes.common.chat import ChatCollator

    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (16, 16), colour).save(tmp_path / name)
    records = [{**r, "image": str(tmp_path / r["image"])} for r in RECORDS]
    samples, _ = tokenize_conversations(vqa_conversations(datasets.Dataset.from_list(records)), encoder, None)
    batch = ChatCollator(encoder)(list(samples))
    assert batch["pixel_values"].shape == (2, 3, 16, 16)
    assert (batch["input_ids"] == IMG).sum(dim=1).tolist() == [N_IMG, N_IMG]
