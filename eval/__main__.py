"""Score predictions from the command line.

    python -m eval caption --predictions preds.jsonl --references refs.jsonl [--lang zh] [--json]
        [--image-root DIR]   # the references' image root, for a recipe run's own predictions file
    python -m eval caption --coco-annotations captions_val2014.json --coco-results results.json
    python -m eval vqa --predictions preds.jsonl --references refs.jsonl [--json]
    python -m eval vqa --vqa-annotations A.json --vqa-questions Q.json --vqa-results R.json
    python -m eval retrieval --scores sims.npy --text-image-index t2i.npy [--k 1 5 10] [--json]
    python -m eval report [RUN ...] [--outputs outputs]   # recipe runs: table, report.md, gallery.html

A --predictions or --references file is JSONL, or one JSON list of the same rows. With `--json`, stdout holds
exactly one JSON object; progress and notes go to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

from data_tools.errors import DataError
from data_tools.jsonl import load_json, open_input, write_jsonl

from . import inputs
from .caption import ALL_METRICS, LANGS, caption_metrics, normalize_lang
from .retrieval import recall_at_k
from .vqa import vqa_accuracy


def _pair(args, parser, jsonl_flags: tuple, official_flags: tuple):
    """Exactly one of the two input styles must be given in full."""
    jsonl = [getattr(args, f) for f in jsonl_flags]
    official = [getattr(args, f) for f in official_flags]
    if all(jsonl) and not any(official):
        return "jsonl"
    if all(official) and not any(jsonl):
        return "official"
    flags = lambda fs: " ".join("--" + f.replace("_", "-") for f in fs)  # noqa: E731
    parser.error(f"give either {flags(jsonl_flags)} or {flags(official_flags)}")


def run_caption(args, parser) -> dict:
    try:
        lang = normalize_lang(args.lang)
    except ValueError as e:
        raise ValueError(f"--lang: {e}") from None
    if args.per_sample:  # checked before scoring, which can take minutes
        inputs_given = [getattr(args, f)
                        for f in ("predictions", "references", "coco_annotations", "coco_results")]
        if os.path.isdir(args.per_sample):
            raise ValueError(f"--per-sample {args.per_sample} is a folder; give a file name")
        if any(f and os.path.realpath(f) == os.path.realpath(args.per_sample) for f in inputs_given):
            raise ValueError(f"--per-sample {args.per_sample} is one of the input files; it would be "
                             "overwritten")
    if _pair(args, parser, ("predictions", "references"), ("coco_annotations", "coco_results")) == "jsonl":
        if args.image_root and not os.path.isdir(args.image_root):
            raise ValueError(f"--image-root {args.image_root}: not a folder")
        root = args.image_root or os.path.dirname(os.path.abspath(args.references))
        predictions = inputs.read_predictions(args.predictions, inputs.CAPTION_PREDICTION_KEYS)
        references = inputs.read_caption_references(args.references)
        try:
            predictions = inputs.match_resolved_images(predictions, references, root)
        except DataError as e:
            raise e.at(path=args.predictions) from None
        names = (args.predictions, args.references)
    else:
        if args.image_root:
            parser.error("--image-root goes with --predictions and --references")
        predictions, references = inputs.read_coco_captions(args.coco_annotations, args.coco_results)
        names, root = (args.coco_results, args.coco_annotations), None
        if predictions and len(predictions) < len(references) and all(k in references for k in predictions):
            # pycocoevalcap scores the results' images: Karpathy's 5,000 test images of captions_val2014.json
            print(f"scoring the {len(predictions)} images of {args.coco_results}, of the {len(references)} "
                  f"annotated in {args.coco_annotations} (as pycocoevalcap does)", file=sys.stderr)
            references = {k: references[k] for k in predictions}
    try:
        inputs.check_same_keys(predictions, references, "image", *names)
    except ValueError as e:
        if root and any(isinstance(k, str) and os.path.isabs(k) for k in predictions if k not in references):
            raise ValueError(f"{e} Absolute image paths (a recipe run's keys) match the references' images "
                             f"resolved against --image-root, here {root}: give the run's image root "
                             "(its --image_root; by default its eval or test file's folder).") from None
        raise
    result = caption_metrics(predictions, references, lang=lang, metrics=args.metrics,
                             per_sample=bool(args.per_sample))
    if args.per_sample:
        per_sample = result.pop("per_sample")
        write_jsonl(args.per_sample,
                    ({"key": k, "prediction": predictions[k], "references": references[k], **scores}
                     for k, scores in per_sample.items()))
    return result


def run_vqa(args, parser) -> dict:
    if _pair(args, parser, ("predictions", "references"),
             ("vqa_annotations", "vqa_questions", "vqa_results")) == "jsonl":
        predictions = inputs.read_predictions(args.predictions, inputs.VQA_PREDICTION_KEYS, inputs.VQA_TEXTS)
        references = inputs.read_vqa_references(args.references)
        names = (args.predictions, args.references)
    else:
        predictions, references = inputs.read_vqa_official(args.vqa_annotations, args.vqa_questions,
                                                           args.vqa_results)
        names = (args.vqa_results, args.vqa_annotations)
    inputs.check_same_keys(predictions, references, "question_id", *names)
    result = vqa_accuracy(predictions, references)
    result["perQuestion"] = {str(k): v for k, v in result["perQuestion"].items()}
    return result


def _load_array(path: str, what: str) -> np.ndarray:
    if not path.endswith(".npy"):
        data = load_json(path)  # its errors name the file
        try:
            return np.asarray(data)
        except ValueError as e:
            raise DataError("bad_value", f"cannot read {what} ({e}); give a .npy file or a JSON list",
                            path=path) from e
    try:
        with open_input(path) as f:
            return np.load(f, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise DataError("bad_value", f"cannot read {what} ({e}); give a .npy file or a JSON list",
                        path=path) from e


def run_retrieval(args, parser) -> dict:
    scores = _load_array(args.scores, "the texts x images score matrix")
    index = _load_array(args.text_image_index, "the text -> image index list")
    try:
        return recall_at_k(scores, index, ks=args.k)
    except ValueError as e:
        raise ValueError(f"{args.scores} / {args.text_image_index}: {e}") from e


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True)

    cap = sub.add_parser("caption", help="BLEU, METEOR, ROUGE-L, CIDEr (, SPICE) via pycocoevalcap")
    cap.add_argument("--predictions", help="JSONL: {image|image_id|id|key, prediction|caption}; a recipe "
                     "run's predictions/*.jsonl as it is")
    cap.add_argument("--references", help="JSONL caption records: {image|image_id, captions: [...]}")
    cap.add_argument("--image-root", help="the folder the references' image paths are relative to, as the "
                     "recipes' --image_root (default: the references file's folder); predictions keyed by "
                     "absolute paths (a recipe run's) are matched to the images resolved against it")
    cap.add_argument("--coco-annotations", help="official COCO captions JSON ({'annotations': [...]})")
    cap.add_argument("--coco-results", help="official COCO results JSON ([{image_id, caption}])")
    cap.add_argument("--lang", default="en",
                     help=f"one of {', '.join(LANGS)} (case-insensitive; zh-CN, zh-Hans, ... are zh); "
                          "zh, ja, th, ... are scored on characters")
    cap.add_argument("--metrics", nargs="+", choices=ALL_METRICS, help="subset to compute (e.g. skip METEOR)")
    cap.add_argument("--per-sample", metavar="OUT.jsonl", help="write per-image scores (CIDEr, ...) here")

    vqa = sub.add_parser("vqa", help="official VQA v2 accuracy")
    vqa.add_argument("--predictions", help="JSONL: {question_id|key, answer|prediction}; a recipe run's "
                     "predictions/*.jsonl as it is")
    vqa.add_argument("--references",
                     help="JSONL VQA records: {question_id, answers: [...10], answer_type?, question_type?}")
    vqa.add_argument("--vqa-annotations", help="official VQA v2 annotations JSON")
    vqa.add_argument("--vqa-questions", help="official VQA v2 questions JSON")
    vqa.add_argument("--vqa-results", help="official VQA results JSON ([{question_id, answer}])")

    ret = sub.add_parser("retrieval", help="Recall@K and ranks, image->text and text->image")
    ret.add_argument("--scores", required=True, help="texts x images similarity matrix (.npy or JSON)")
    ret.add_argument("--text-image-index", required=True, help="image index of each text (.npy or JSON)")
    ret.add_argument("--k", nargs="+", type=int, default=[1, 5, 10])

    sub.add_parser("report",
                   help="score recipe runs: one table, report.md and gallery.html per run (see "
                        "eval/report.py)")

    for p in (cap, vqa, ret):
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
        p.set_defaults(subparser=p)  # so usage errors show the subcommand's usage
    return parser


def _print_human(result: dict) -> None:
    for name, value in result.items():
        if name == "perQuestion":
            continue  # one line per question is too much for a terminal; use --json
        if isinstance(value, dict):
            for sub_name, sub_value in sorted(value.items()):
                print(f"{name}/{sub_name}: {sub_value}")
        else:
            print(f"{name}: {value:.6g}" if isinstance(value, float) else f"{name}: {value}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:  # its own parser: it takes run folders, not prediction files
        from . import report

        try:
            return report.main(argv[1:])
        except (DataError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    parser = build_parser()
    args = parser.parse_args(argv)
    run = {"caption": run_caption, "vqa": run_vqa, "retrieval": run_retrieval}[args.task]
    try:
        result = run(args, args.subparser)
    except (DataError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, ensure_ascii=False, allow_nan=False))
    else:
        _print_human(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
