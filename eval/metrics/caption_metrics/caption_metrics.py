"""`evaluate` wrapper of `eval.caption.caption_metrics` (pycocoevalcap BLEU, METEOR, ROUGE-L, CIDEr)."""

import importlib

import datasets
import evaluate


try:  # by name: a plain `from eval import` would make evaluate ask for `pip install eval`, another package
    caption = importlib.import_module("eval.caption")
except ImportError as e:
    raise ImportError("this metric runs the vlm-recipes `eval` package: install the repository in this "
                      "environment (`make setup`, or `pip install -e <repository>`)") from e

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
