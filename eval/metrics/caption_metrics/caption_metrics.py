"""`evaluate` wrapper of `eval.caption.caption_metrics` (pycocoevalcap BLEU, METEOR, ROUGE-L, CIDEr)."""

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


caption = _library("caption")

_DESCRIPTION = caption.__doc__
_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated captions, one per image.
    references: list of lists of reference captions, aligned with `predictions`.
    lang: "en" (PTB tokenizer) or an unsegmented language such as "zh" (scored on characters).
    metrics: subset of ("Bleu", "METEOR", "ROUGE_L", "CIDEr", "SPICE"); default all that apply.
    per_sample: also return `per_sample`, scores per image index.
Returns:
    dict with Bleu_1..Bleu_4, METEOR, ROUGE_L, CIDEr (pycocoevalcap names and values).
"""


class CaptionMetrics(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Value("string"),
                "references": datasets.Sequence(datasets.Value("string")),
            }),
        )

    def _compute(self, predictions, references, lang="en", metrics=None, per_sample=False):
        return caption.caption_metrics(dict(enumerate(predictions)), dict(enumerate(references)),
                                       lang=lang, metrics=metrics, per_sample=per_sample)
