"""`evaluate` wrapper of `eval.vqa.vqa_accuracy` (official VQA v2 accuracy, in percent)."""

import importlib

import datasets
import evaluate


try:  # by name: a plain `from eval import` would make evaluate ask for `pip install eval`, another package
    vqa = importlib.import_module("eval.vqa")
except ImportError as e:
    raise ImportError("this metric runs the vlm-recipes `eval` package: install the repository in this "
                      "environment (`make setup`, or `pip install -e <repository>`)") from e

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted answers.
    references: list of lists of human answers (10 for VQA v2), aligned with `predictions`.
    answer_types, question_types: optional lists aligned with `predictions`, for the breakdowns.
Returns:
    dict with overall, perAnswerType, perQuestionType (percent, 2 decimals) and perQuestion (by index).
"""


class VqaAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=vqa.__doc__,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
        )

    def _compute(self, predictions, references, answer_types=None, question_types=None):
        n = len(predictions)
        answer_types = answer_types or [None] * n
        question_types = question_types or [None] * n
        for name, values in (("answer_types", answer_types), ("question_types", question_types)):
            if len(values) != n:
                raise ValueError(f"{name}: {len(values)} values for {n} predictions; give one per prediction")
        refs = {i: {"answers": list(a), "answer_type": at, "question_type": qt}
                for i, (a, at, qt) in enumerate(zip(references, answer_types, question_types))}
        return vqa.vqa_accuracy(dict(enumerate(predictions)), refs)
