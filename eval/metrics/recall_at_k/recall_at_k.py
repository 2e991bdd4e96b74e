"""`evaluate` wrapper of `eval.retrieval.recall_at_k` (image<->text Recall@K and ranks)."""

import importlib
import json
import sys
from pathlib import Path

import datasets
import evaluate
import numpy as np


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


retrieval = _library("retrieval")

_KWARGS_DESCRIPTION = """
Args:
    predictions: one row per text: its similarity to every image (texts x images matrix).
    references: for each text, the index of its image.
    ks: the K values (default 1, 5, 10).
Returns:
    dict with image_to_text_R@K, text_to_image_R@K (fractions) and mean / median ranks.
"""


class RecallAtK(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=retrieval.__doc__,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Value("int64"),
            }),
        )

    def _compute(self, predictions, references, ks=(1, 5, 10)):
        return retrieval.recall_at_k(np.asarray(predictions, dtype=np.float64), np.asarray(references), ks=ks)
