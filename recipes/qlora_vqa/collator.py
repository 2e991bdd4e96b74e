"""VQA records as short-answer conversations, the held-out items to generate for, and their scores.

A record ({"image", "question_id", "question", "answers": 10 or 1, "answer_type", "question_type"})
becomes one single-turn conversation: the image and the question with LLaVA-1.5's short-answer
prompt, answered by the record's training answer (`training_answer`). The chat
template, the assistant-only labels (only the answer tokens and the eos are learned), the
image-aware length budget and the collators are the shared ones of `recipes.common.chat`, so a real
checkpoint's template is used as is.
"""

from __future__ import annotations

import re

import datasets

from data_tools.records import IMAGE_TOKEN
from eval.vqa import normalize_answer, question_type_prior, vqa_accuracy
from recipes.common.chat import with_answer_prompt

# LLaVA-1.5's response-format prompt for VQAv2 and other short-answer data (Liu et al., 2023, "Improved
# Baselines with Visual Instruction Tuning", section 3.2): a chat model asked without it answers in sentences.
SHORT_ANSWER_PROMPT = "Answer the question using a single word or phrase."


def training_answer(answers: list[str]) -> str:
    """The answer to learn: the most frequent of the human answers once the VQA metric has normalised them
    (the answer that scores highest), in its most frequent written form; first on ties. "Red", "red" and
    "Red." count as one answer against two "blue"s."""
    answers = [a.strip() for a in answers]
    normalized = [normalize_answer(a) for a in answers]
    best = max(normalized, key=normalized.count)  # max() keeps the first of equal counts
    forms = [a for a, n in zip(answers, normalized) if n == best]
    return max(forms, key=forms.count)


def question_turn(question: str, prompt: str | None) -> dict:
    """The user turn: the image, the question and the answer-format prompt (LLaVA-1.5's layout)."""
    return {"from": "human", "value": f"{IMAGE_TOKEN}\n{with_answer_prompt(question.strip(), prompt)}"}


def vqa_conversations(records: datasets.Dataset,
                      prompt: str | None = SHORT_ANSWER_PROMPT) -> datasets.Dataset:
    """VQA records -> one conversation per question, answered with its training answer (and the record's
    line, for errors)."""
    return datasets.Dataset.from_list([
        {"image": r["image"], "line": r.get("line"),
         "conversations": [question_turn(r["question"], prompt),
                           {"from": "gpt", "value": training_answer(r["answers"])}]}
        for r in records
    ])  # fmt: skip


def vqa_items(records: datasets.Dataset, prompt: str | None = SHORT_ANSWER_PROMPT) -> datasets.Dataset:
    """Held-out VQA records -> generation items keyed by question_id, with what scoring needs."""
    return datasets.Dataset.from_list([
        {"key": r["question_id"], "image": r["image"],
         "conversations": [question_turn(r["question"], prompt)], "question": r["question"],
         "answers": r["answers"], "answer_type": r.get("answer_type"),
         "question_type": r.get("question_type")}
        for r in records
    ])  # fmt: skip


def metric_name(answer_type: str) -> str:
    """Logged name of an answer type's accuracy: "yes/no" -> "VQA_accuracy_yes_no" (a "/" nests TensorBoard
    tags)."""
    return "VQA_accuracy_" + re.sub(r"\W+", "_", answer_type).strip("_")


def vqa_scores(predictions: dict, items) -> dict:
    """`VQA_accuracy` overall and one `VQA_accuracy_<answer type>` each, in percent (the metrics logged in
    training).

    Scored by eval.vqa (official VQA v2 accuracy) on the items whose keys `predictions` has.
    """
    references = {it["key"]: {k: it.get(k) for k in ("answers", "answer_type", "question_type")}
                  for it in items if it["key"] in predictions}
    result = vqa_accuracy(predictions, references)
    return {"VQA_accuracy": result["overall"],
            **{metric_name(t): v for t, v in sorted(result["perAnswerType"].items())}}


def prior_predictions(train_records, items) -> dict:
    """The per-question-type prior baseline's answer to every item (eval.vqa.question_type_prior of the
    training set)."""
    prior = question_type_prior(train_records)
    return {it["key"]: prior.get(it.get("question_type"), prior[None]) for it in items}
