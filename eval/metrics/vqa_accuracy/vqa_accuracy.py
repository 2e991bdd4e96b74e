"""`evaluate` wrapper of `eval.vqa.vqa_accuracy` (official VQA v2 accuracy, in percent)."""

import importlib
import json
import sys
from pathlib import Path

import datasets
import evaluate


def _library(name):
    """Import `eval.<name>` from this repository, also when `evaluate` runs a cached copy of this file."""
    try:
        return importlib.import_module(f"eval.{name}")
    except ImportError:
        pass
    # evaluate records the original location of the file it copied in a JSON next to the copy.
    note = Path(__file__).with_suffix(".json")
    origin = json.loads(note.read_text())["original file path"] if note.exists() else __file__
    root = Path(origin).resolve().parents[3]
    if not (root / "eval" / f"{name}.py").exists():
        raise ImportError(f"cannot find the vlm-recipes `eval` package (looked in {root}); "
                          "run from the repository root or add it to PYTHONPATH")
    sys.path.insert(0, str(root))
    return importlib.import_module(f"eval.{name}")


vqa = _library("vqa")

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
        refs = {i: {"answers": list(a), "answer_type": at, "question_type": qt}
                for i, (a, at, qt) in enumerate(zip(references, answer_types, question_types))}
        return vqa.vqa_accuracy(dict(enumerate(predictions)), refs)
