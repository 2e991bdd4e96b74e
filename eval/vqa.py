"""VQA accuracy, scored exactly as the official VQA v2 evaluation (GT-Vision-Lab/VQA, vqaEval.py).

The rules, as the official code applies them:

- An answer is cleaned of newlines, tabs and surrounding spaces. (One addition: it is NFC-normalised
  first, so that an accent typed as a combining mark matches the precomposed letter; text already in
  NFC, ASCII included, is unchanged.)
- Normalisation (punctuation, then lower case, number words to digits, articles dropped, common
  contractions restored) is applied to the ground-truth answers *and* the prediction only when the
  ground-truth answers of that question are not all identical. When all annotators agree, the
  prediction is compared with the raw answer: "Two" or "two" scores 0 against ten "2"s.
- Accuracy of a question is the mean, over each of its n human answers left out in turn, of
  min(1, (number of the other n-1 answers equal to the prediction) / 3). (The official code leaves
  out every answer record equal to the current one; VQA v2 records carry distinct `answer_id`s,
  so that is exactly one, as here.)
- Overall, per answer type and per question type accuracies are means of the unrounded per-question
  accuracies, reported in percent and rounded to 2 decimals the way the official (Python 2) code
  rounds: half away from zero. Per-question accuracies are rounded the same way.

One extension: a question with a single reference answer (not VQA v2 data) would always score 0
under the leave-one-out rule, so it is scored by exact match after normalising both sides.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import ROUND_HALF_UP, Decimal

from .inputs import check_same_keys

# Algorithm data, as in the official evaluation.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!"]

# ASCII digits only, as in the official code (Python 2, where \d without re.UNICODE is [0-9]): a full-width
# "２.５" loses its period there.
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)", re.ASCII)
# A period is dropped unless a digit follows it ("3.5" keeps its point, "dog." loses it).
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)", re.ASCII)
# The official code passes re.UNICODE (= 32) where re.sub takes `count`, so at most 32 periods go.
_MAX_PERIODS_REMOVED = 32


def _clean_whitespace(text: str) -> str:
    # NFC: "e" + U+0301 and "é" are one text (canonically equivalent) and must compare equal.
    return unicodedata.normalize("NFC", text).replace("\n", " ").replace("\t", " ").strip()


def _strip_punctuation(text: str) -> str:
    # A mark touching a space, or any mark at all in a text with a "1,000"-style number, is deleted;
    # otherwise it becomes a space ("black/white" -> "black white").
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        if delete_all or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=_MAX_PERIODS_REMOVED)


def _normalise_words(text: str) -> str:
    words = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word not in ARTICLES:
            words.append(CONTRACTIONS.get(word, word))
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """The official answer normalisation: punctuation, case, number words, articles, contractions."""
    return _normalise_words(_strip_punctuation(_clean_whitespace(text)))


def round_half_away(value: float, ndigits: int = 2) -> float:
    """Round like Python 2's `round` (half away from zero, on the exact binary value), as the official code
    ran."""
    return float(Decimal(value).quantize(Decimal(1).scaleb(-ndigits), rounding=ROUND_HALF_UP))


def question_accuracy(prediction: str, answers: list[str]) -> float:
    """Accuracy in [0, 1] of one prediction against the human answers of one question."""
    answers = [_clean_whitespace(a) for a in answers]
    prediction = _clean_whitespace(prediction)
    if len(answers) == 1:
        return float(normalize_answer(prediction) == normalize_answer(answers[0]))
    if len(set(answers)) > 1:
        answers = [normalize_answer(a) for a in answers]
        prediction = normalize_answer(prediction)
    matches = sum(a == prediction for a in answers)
    # Leave each answer out in turn; the prediction needs 3 matching others for full credit.
    per_left_out = [min(1.0, (matches - (a == prediction)) / 3) for a in answers]
    return sum(per_left_out) / len(per_left_out)


def _percent(values: list[float]) -> float:
    return round_half_away(100 * sum(values) / len(values))


def vqa_accuracy(predictions: dict, references: dict) -> dict:
    """Official VQA accuracy in percent: `overall`, `perAnswerType`, `perQuestionType`, `perQuestion`.

    `predictions` maps question id to the predicted answer; `references` maps question id to a dict
    with `answers` (list of strings) and optionally `answer_type` and `question_type`. Both must hold
    the same question ids.
    """
    check_same_keys(predictions, references, what="question_id")
    overall, per_answer_type, per_question_type, per_question = [], {}, {}, {}
    for qid, ref in references.items():
        acc = question_accuracy(predictions[qid], ref["answers"])
        overall.append(acc)
        per_question[qid] = round_half_away(100 * acc)
        if ref.get("answer_type") is not None:
            per_answer_type.setdefault(ref["answer_type"], []).append(acc)
        if ref.get("question_type") is not None:
            per_question_type.setdefault(ref["question_type"], []).append(acc)
    return {
        "overall": _percent(overall),
        "perAnswerType": {k: _percent(v) for k, v in per_answer_type.items()},
        "perQuestionType": {k: _percent(v) for k, v in per_question_type.items()},
        "perQuestion": per_question,
    }


def question_type_prior(records) -> dict:
    """The "per Q-type prior" baseline of Antol et al. (2015, "VQA: Visual Question Answering", section 6):
    the most popular human answer of each question type in `records` (the training set).

    `records` have `answers` and optionally `question_type`. Returns {question_type: answer}, plus the
    most popular answer over all records under the key None, for question types the training set lacks.
    Ties go to the answer seen first.
    """
    counts: dict = {None: {}}
    for record in records:
        for answer in record["answers"]:
            answer = _clean_whitespace(answer)
            for key in {None, record.get("question_type")}:
                counts.setdefault(key, {})
                counts[key][answer] = counts[key].get(answer, 0) + 1
    if not counts[None]:
        raise ValueError("no answers to compute a question-type prior from")
    # max() keeps the first of equal counts, and dicts keep insertion order: ties go to the answer seen first.
    return {key: max(by_answer, key=by_answer.get) for key, by_answer in counts.items()}
