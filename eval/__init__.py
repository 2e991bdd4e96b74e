"""Evaluation for vlm-recipes: caption metrics (pycocoevalcap), official VQA accuracy, Recall@K.

Library functions below; the command line is `python -m eval {caption,vqa,retrieval}`.
"""

from .caption import caption_metrics
from .retrieval import recall_at_k
from .vqa import vqa_accuracy

__all__ = ["caption_metrics", "recall_at_k", "vqa_accuracy"]
