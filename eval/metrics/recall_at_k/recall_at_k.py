"""`evaluate` wrapper of `eval.retrieval.recall_at_k` (image<->text Recall@K and ranks)."""

import importlib

import datasets
import evaluate
import numpy as np


try:  # by name: a plain `from eval import` would make evaluate ask for `pip install eval`, another package
    retrieval = importlib.import_module("eval.retrieval")
except ImportError as e:
    raise ImportError("this metric runs the vlm-recipes `eval` package: install the repository in this "
                      "environment (`make setup`, or `pip install -e <repository>`)") from e

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
