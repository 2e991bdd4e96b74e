"""`python -m eval report`: score recipe runs, print one table, write report.md and gallery.html per run.

    python -m eval report                          # the latest run of every recipe under outputs/
    python -m eval report outputs/blip2_lora_caption outputs/other_run
    make eval [RUN=outputs/blip2_lora_caption]

A run folder is what a recipe's `train.py` writes to `--output_dir`:
- `metrics.json` with at least `recipe`, `task` and `eval_file` (the references, JSONL) and `lang`;
- `predictions/final.jsonl` (after fine-tuning) and `predictions/before.jsonl` (before), rows
  `{"key": <image path or question id>, "prediction": <text>}`; `predictions/step-N.jsonl` are the
  evaluations during training, and the newest is used when there is no `final.jsonl`.
- retrieval runs write `predictions/<name>.npz` instead: the eval embeddings (`image_embeds`,
  `text_embeds`), `image_keys` (image paths), `texts` and `text_to_image`. Each text is checked to be
  a caption of its image in the eval file, and Recall@K is computed again from the embeddings.
The predictions are scored again here from the files, with every metric (METEOR included), so the
numbers do not depend on what the training run chose to log.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import re
import sys
from pathlib import Path

import numpy as np

from data_tools.clean import check_rows
from data_tools.errors import DataError
from data_tools.files import atomic_write_text
from data_tools.images import load_image
from data_tools.jsonl import load_json

from .caption import CHARACTER_LANGS, ENGLISH_ONLY, caption_metrics, normalize_lang
from .inputs import read_predictions
from .instruct import ROW, SHORT_ANSWER_WORDS, eval_items, instruct_scores
from .retrieval import recall_at_k, similarity, text_to_image_ranks
from .vqa import vqa_accuracy

CAPTION_METRICS = ["Bleu", "METEOR", "ROUGE_L", "CIDEr"]
# The columns of the printed table and of report.md, per task: (label, key in the scores).
COLUMNS = {
    "caption": [("CIDEr", "CIDEr"), ("BLEU-4", "Bleu_4"), ("METEOR", "METEOR"), ("ROUGE-L", "ROUGE_L")],
    "vqa": [("VQA acc", "overall")],
    "retrieval": [("T2I R@1", "text_to_image_R@1"), ("T2I R@5", "text_to_image_R@5"),
                  ("I2T R@1", "image_to_text_R@1"), ("I2T R@5", "image_to_text_R@5")],
    "instruct": [("VQA acc", "VQA_accuracy"), ("CIDEr", "CIDEr")],  # short answers; descriptions
}
MAIN_METRIC = {"caption": "CIDEr", "vqa": "overall", "retrieval": "text_to_image_R@1",
               "instruct": "VQA_accuracy"}


# --- finding runs -------------------------------------------------------------------------------------
def read_run_info(run: Path) -> dict:
    path = run / "metrics.json"
    try:
        info = load_json(path)
    except DataError as e:
        # a recipe writes run.json when it starts (merge and export copy it, without checkpoints)
        if not path.exists() and (run / "run.json").is_file() and any(run.glob("checkpoint-*")):
            raise DataError(e.reason, "the run has not finished: no metrics.json yet (a stopped or "
                            "killed run goes on with --resume_from_checkpoint last)", path=path) from None
        raise DataError(e.reason, f"not a recipe run folder: cannot read metrics.json ({e.message})",
                        path=path, line=e.line) from None
    if not isinstance(info, dict):
        raise DataError("wrong_type", "not a recipe run folder: metrics.json is not a JSON object", path=path)
    try:
        info["lang"] = normalize_lang(info.get("lang") or "en")
    except ValueError as e:
        raise DataError("bad_value", str(e), path=path, field="lang") from None
    if "eval_file" in info and info["eval_file"] is None and info.get("global_step") is not None:
        raise DataError("missing_field", "the run had no held-out data (trained without --eval_file): "
                        "there is nothing to score", path=path, field="eval_file")
    for field in ("recipe", "task", "eval_file"):
        if not info.get(field):
            raise DataError("missing_field",
                            "missing; written by the recipe's train.py (was the run finished?)",
                            path=path, field=field)
    return info


def _record(record: Path) -> dict:
    try:
        info = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _recipe(record: Path) -> str | None:
    """The recipe a run's metrics.json or run.json names; None for a file that is not a recipe's (another
    tool's metrics.json under outputs/)."""
    recipe = _record(record).get("recipe")
    return recipe if isinstance(recipe, str) else None


def latest_runs(outputs: Path, unscored: list[Path] | None = None) -> list[Path]:
    """The newest run folder (by its metrics.json) of each recipe under `outputs`, sorted by recipe; runs
    trained without held-out data (nothing to score) are left out, and put in `unscored`."""
    newest: dict[str, tuple[float, Path]] = {}
    for metrics in outputs.rglob("metrics.json"):
        if "predictions" in metrics.parts or metrics.parent.name.startswith("checkpoint-"):
            continue
        recipe = _recipe(metrics)
        if recipe and _record(metrics).get("eval_file", "") is None:
            if unscored is not None:
                unscored.append(metrics.parent)
        elif recipe and (recipe not in newest or metrics.stat().st_mtime > newest[recipe][0]):
            newest[recipe] = (metrics.stat().st_mtime, metrics.parent)
    return [newest[r][1] for r in sorted(newest)]


def newer_unfinished(outputs: Path, runs: list[Path]) -> list[tuple[Path, Path | None]]:
    """(run folder, the run of its recipe scored instead, or None if none is) for runs that have checkpoints
    but no metrics.json yet (still training, or stopped before the end) and started after the scored one."""
    scored = {_recipe(run / "metrics.json"): run for run in runs}
    found = []
    for record in outputs.rglob("run.json"):
        folder = record.parent
        if (folder / "metrics.json").exists() or not any(folder.glob("checkpoint-*")):
            continue  # finished, or a merged folder (it holds its run's run.json)
        recipe = _recipe(record)
        if recipe is None:
            continue
        instead = scored.get(recipe)
        if instead is None or record.stat().st_mtime > (instead / "metrics.json").stat().st_mtime:
            found.append((folder, instead))
    return sorted(found, key=lambda pair: pair[0])


def scored_step(info: dict) -> int | str | None:
    """The training step of the weights "after" scores: "8 of 12" when the run loaded its best checkpoint."""
    step, trained = info.get("after_step", info.get("global_step")), info.get("global_step")
    return step if step == trained else f"{step} of {trained}"


def file_step(path: Path, info: dict) -> int | str | None:
    """The training step of the weights `path` holds predictions of: N for `step-N`, else `scored_step`."""
    match = re.fullmatch(r"step-(\d+)", path.stem)
    return int(match.group(1)) if match else scored_step(info)


def predictions_file(run: Path, name: str = "final", suffix: str = ".jsonl") -> Path | None:
    """`predictions/<name><suffix>`; for "final", the newest `step-N<suffix>` when there is no final file."""
    path = run / "predictions" / f"{name}{suffix}"
    if path.exists() or name != "final":
        return path if path.exists() else None
    steps = sorted(run.glob(f"predictions/step-*{suffix}"), key=lambda p: int(re.findall(r"\d+", p.stem)[-1]))
    return steps[-1] if steps else None


def read_references(path: str, task: str, *, short_answer_words: int = SHORT_ANSWER_WORDS,
                    lang: str = "en", image_root: str | None = None) -> dict:
    """Eval records keyed as the recipes key their predictions: absolute image path, or question id;
    for instruct, the items of `eval.instruct` (one per assistant turn, "<row>:<turn>"). `image_root`:
    the folder the records' image paths are relative to (default: the file's folder). Invalid rows are
    left out, as the run (--skip_bad_rows) left them: a prediction for one is then an unknown key."""
    records, rows, invalid = {}, [], []
    for index, (_, row, _) in enumerate(check_rows(path, task, image_root=image_root, check_images=False,
                                                   progress=False)):
        if isinstance(row, DataError):
            invalid.append(row)
            continue
        if task == "instruct":
            rows.append({**row, ROW: index})
            continue
        key = row["question_id"] if task == "vqa" else row["image"]
        # one row per caption: all of them are the image's references (retrieval: its texts)
        if task in ("caption", "retrieval") and key in records:
            records[key]["captions"] = records[key]["captions"] + row["captions"]
            continue
        records[str(key) if task == "vqa" else key] = row
    if invalid:
        print(f"{path}: {len(invalid)} invalid row(s) left out of the references, as a run with "
              f"--skip_bad_rows leaves them out; the first: {invalid[0]}", file=sys.stderr)
    if task == "instruct":
        return {it["key"]: it for it in eval_items(rows, short_answer_words, lang)}
    return records


# --- scoring --------------------------------------------------------------------------------------------
def score(task: str, predictions: dict, records: dict, lang: str) -> tuple[dict, dict]:
    """(overall scores, per-sample main score) of `predictions` against the records with the same keys."""
    unknown = [k for k in predictions if k not in records]
    if unknown:
        raise DataError("bad_value",
                        f"{len(unknown)} prediction key(s) are not in the eval file, e.g. {unknown[0]!r}",
                        field="key")
    if task == "caption":
        refs = {k: records[k]["captions"] for k in predictions}
        # METEOR needs English resources: Chinese, Japanese, ... runs are scored without it (a "-" in the
        # table).
        metrics = [m for m in CAPTION_METRICS if not (lang in CHARACTER_LANGS and m in ENGLISH_ONLY)]
        scores = caption_metrics(predictions, refs, lang=lang, metrics=metrics, per_sample=True)
        per_sample = {k: s["CIDEr"] for k, s in scores.pop("per_sample").items()}
        return scores, per_sample
    if task == "vqa":
        refs = {k: {"answers": records[k]["answers"], "answer_type": records[k].get("answer_type"),
                    "question_type": records[k].get("question_type")} for k in predictions}
        scores = vqa_accuracy(predictions, refs)
        return scores, {k: v / 100 for k, v in scores.pop("perQuestion").items()}
    if task == "instruct":
        # The metrics computed during training (no METEOR: its Java start-up is slow, and descriptions are not
        # captions).
        scores = instruct_scores(predictions, [records[k] for k in predictions], lang=lang, per_sample=True)
        return scores, scores.pop("per_sample")
    raise DataError("bad_value", f"no report for task {task!r} yet (caption, vqa, retrieval, instruct)",
                    field="task")


def score_retrieval(path: Path, records: dict) -> tuple[dict, dict, dict]:
    """(Recall@K and ranks, {text index: rank}, the arrays) of a run's eval embeddings, checked against the
    eval file."""
    with np.load(path) as f:
        data = {k: f[k] for k in ("image_embeds", "text_embeds", "image_keys", "texts", "text_to_image")}
    keys, texts = [str(k) for k in data["image_keys"]], [str(t) for t in data["texts"]]
    unknown = [k for k in keys if k not in records]
    if unknown:
        raise DataError("bad_value", f"{len(unknown)} image(s) are not in the eval file, e.g. {unknown[0]!r}",
                        path=path, field="image_keys")
    for t, (text, i) in enumerate(zip(texts, data["text_to_image"])):
        if text not in records[keys[i]]["captions"]:
            raise DataError("bad_value", f"text {t} {text!r} is not a caption of {keys[i]} in the eval file",
                            path=path, field="texts")
    scores = similarity(data["text_embeds"], data["image_embeds"])
    ranks = text_to_image_ranks(scores, data["text_to_image"])
    return (recall_at_k(scores, data["text_to_image"]), dict(enumerate(ranks.tolist())),
            {**data, "scores": scores})


def report_retrieval_run(run: Path, info: dict, records: dict, gallery_size: int) -> dict:
    """`report_run` for retrieval runs: Recall@K from the saved embeddings, a gallery of the worst text
    queries."""
    row = {"recipe": info["recipe"], "run": str(run), "task": "retrieval", "step": scored_step(info)}
    for name in ("before", "final"):
        path = predictions_file(run, name, ".npz")
        if path is None:
            continue
        row[name], ranks, data = score_retrieval(path, records)
        row[f"{name}_file"], row["n"], row["n_eval"] = str(path), len(data["image_keys"]), len(records)
    if "final" not in row:
        raise DataError("missing_field",
                        "no predictions/final.npz or predictions/step-N.npz: nothing to score", path=run)
    row["step"] = file_step(Path(row["final_file"]), info)
    atomic_write_text(run / "report.md", render_markdown(row))
    atomic_write_text(run / "gallery.html", render_retrieval_gallery(row, data, ranks, gallery_size))
    return row


def report_run(run: Path, gallery_size: int = 100) -> dict:
    """Score one run; write report.md and gallery.html into it; return the table row."""
    info = read_run_info(run)
    task, lang = info["task"], info.get("lang", "en")
    # The split the before/final predictions are on: the test file when the run had one, else eval_file.
    references = info.get("heldout_file") or info["eval_file"]
    if not Path(references).is_file():
        raise DataError("unreadable_file", f"the references file {references!r} does not exist (a relative "
                        "path is read from the current folder)", path=run / "metrics.json",
                        field="heldout_file" if info.get("heldout_file") else "eval_file")
    records = read_references(references, task,
                              short_answer_words=info.get("short_answer_words", SHORT_ANSWER_WORDS),
                              lang=lang, image_root=info.get("image_root"))
    if task == "retrieval":
        return report_retrieval_run(run, info, records, gallery_size)
    row = {"recipe": info["recipe"], "run": str(run), "task": task, "step": scored_step(info)}
    per_sample, final_predictions = {}, {}
    for name in ("before", "final"):
        path = predictions_file(run, name)
        if path is None:
            continue
        predictions = read_predictions(path, keys=("key",), texts=("prediction",))
        if task == "vqa":
            predictions = {str(k): v for k, v in predictions.items()}
        try:
            row[name], samples = score(task, predictions, records, lang)
        except DataError as e:
            raise e.at(path=path) from None
        except ValueError as e:  # a scorer's own error (METEOR's Java process stopped, ...)
            raise DataError("bad_value", str(e), path=path) from None
        row[f"{name}_file"], row["n"], row["n_eval"] = str(path), len(predictions), len(records)
        if name == "final":
            per_sample, final_predictions = samples, predictions
    if "final" not in row:
        raise DataError("missing_field",
                        "no predictions/final.jsonl or predictions/step-N.jsonl: nothing to score", path=run)
    row["step"] = file_step(Path(row["final_file"]), info)
    atomic_write_text(run / "report.md", render_markdown(row))
    atomic_write_text(run / "gallery.html",
                      render_gallery(row, final_predictions, per_sample, records, gallery_size))
    return row


# --- output -------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("-" if value is None else str(value))


def table_lines(rows: list[dict]) -> list[str]:
    """One Markdown table: a line per run, the task's metrics after fine-tuning, and the main one before."""
    labels = []
    for r in rows:
        labels += [label for label, _ in COLUMNS[r["task"]] if label not in labels]
    head = ["recipe", "step", "samples", *labels, "before (main)", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        keys = dict(COLUMNS[r["task"]])
        main = MAIN_METRIC[r["task"]]
        before = r.get("before", {}).get(main)
        main_label = next(label for label, key in COLUMNS[r["task"]] if key == main)  # as its column says
        cells = [r["recipe"], _fmt(r["step"]), f"{r['n']}/{r['n_eval']}",
                 *(_fmt(r["final"].get(keys[label])) if label in keys else "" for label in labels),
                 f"{main_label} {_fmt(before)}", r["run"]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(row: dict) -> str:
    main = MAIN_METRIC[row["task"]]
    lines = [f"# {row['recipe']}: evaluation report", "",
             f"Run `{row['run']}`, step {_fmt(row['step'])}, task {row['task']}; "
             f"{row['n']} of {row['n_eval']} eval samples scored.", "", "| metric | before | after |",
             "|---|---|---|"]
    for name, value in row["final"].items():
        if isinstance(value, (int, float)):
            lines.append(f"| {name} | {_fmt(row.get('before', {}).get(name))} | {_fmt(value)} |")
        elif isinstance(value, dict):  # VQA accuracy per answer type and per question type
            before = row.get("before", {}).get(name) or {}
            lines += [f"| {name}: {key} | {_fmt(before.get(key))} | {_fmt(v)} |" for key, v in value.items()
                      if isinstance(v, (int, float))]
    per_sample = "VQA accuracy" if row["task"] == "vqa" else main
    shown = ("text query, its image and the top 3 retrieved, worst rank first" if row["task"] == "retrieval"
             else f"image, prediction, references, per-sample {per_sample}")
    lines += ["",
              f"Predictions: `{row['final_file']}`"
              + (f", before: `{row['before_file']}`" if "before_file" in row else ""),
              f"Gallery ({shown}): `gallery.html`", ""]
    return "\n".join(lines)


def _thumbnail(path: str, side: int = 192) -> str:
    """The image as an inline JPEG data URI (the gallery stays one self-contained file), or "" if
    unreadable."""
    try:
        image = load_image(path)
    except DataError:
        return ""
    image.thumbnail((side, side))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def render_gallery(row: dict, predictions: dict, per_sample: dict, records: dict, limit: int) -> str:
    main = {"caption": "CIDEr", "vqa": "accuracy"}.get(row["task"], "score (accuracy or CIDEr)")
    keys = sorted(predictions, key=lambda k: (per_sample.get(k, 0.0), str(k)))[:limit]
    cells = []
    for k in keys:
        rec = records[k]
        refs = rec.get("captions") or rec.get("answers") or rec.get("references") or []
        question = f"<p><b>Q:</b> {html.escape(rec['question'])}</p>" if rec.get("question") else ""
        paths = rec.get("images") or ([rec["image"]] if rec.get("image") else [])  # instruct: several
        img = "".join(f'<img src="{src}" alt="{html.escape(str(p))}">' if (src := _thumbnail(p))
                      else "<p>(image unreadable)</p>" for p in paths) or "<p>(text only)</p>"
        cells.append(
            f"<tr><td>{img}</td><td>{question}<p><b>{html.escape(predictions[k])}</b></p>"
            f"<p class=s>{main} {per_sample.get(k, 0.0):.3f}</p></td>"
            f"<td><ul>{''.join(f'<li>{html.escape(r)}</li>' for r in refs)}</ul></td></tr>"
        )
    title = html.escape(f"{row['recipe']}: {row['run']}")
    return (
        f"<!doctype html><meta charset=utf-8><title>{title}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td{vertical-align:top;padding:6px;border-bottom:1px "
        "solid #ddd}img{image-rendering:pixelated;width:128px}.s{color:#666}</style>"
        f"<h1>{title}</h1><p>{len(keys)} of {len(predictions)} samples, lowest {main} first. "
        f"Overall {MAIN_METRIC[row['task']]}: {_fmt(row['final'].get(MAIN_METRIC[row['task']]))}.</p>"
        f"<table><tr><th>image</th><th>prediction</th><th>references</th></tr>{''.join(cells)}</table>"
    )


def render_retrieval_gallery(row: dict, data: dict, ranks: dict, limit: int) -> str:
    """Text queries with the highest (worst) rank of their image first: the query, its image, the top 3
    retrieved."""
    keys = [str(k) for k in data["image_keys"]]

    def cell(i: int, score: float) -> str:
        src = _thumbnail(keys[i])
        img = f'<img src="{src}" alt="{html.escape(keys[i])}">' if src else "<p>(image unreadable)</p>"
        return f"<td>{img}<p class=s>{score:.3f}</p></td>"

    worst = sorted(ranks, key=lambda t: (-ranks[t], t))[:limit]
    rows = []
    for t in worst:
        own = int(data["text_to_image"][t])
        top = np.argsort(-data["scores"][t], kind="stable")[:3]
        rows.append(f"<tr><td><b>{html.escape(str(data['texts'][t]))}</b><p class=s>rank {ranks[t]}</p></td>"
                    f"{cell(own, data['scores'][t][own])}"
                    f"{''.join(cell(int(i), data['scores'][t][i]) for i in top)}</tr>")
    title = html.escape(f"{row['recipe']}: {row['run']}")
    return (
        f"<!doctype html><meta charset=utf-8><title>{title}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td{vertical-align:top;padding:6px;border-bottom:1px "
        "solid #ddd}img{image-rendering:pixelated;width:96px}.s{color:#666}</style>"
        f"<h1>{title}</h1><p>{len(worst)} of {len(ranks)} text queries, worst rank of their image first. "
        f"Overall text-to-image R@1: {_fmt(row['final'].get('text_to_image_R@1'))}.</p>"
        "<table><tr><th>query</th><th>its image</th><th colspan=3>top 3 retrieved "
        f"(cosine)</th></tr>{''.join(rows)}</table>"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval report", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="*",
                   help="run folders (default: the latest run of each recipe under --outputs)")
    p.add_argument("--outputs", default="outputs", help="where recipe runs are (default: outputs)")
    p.add_argument("--gallery-size", type=int, default=100, help="samples in gallery.html (default 100)")
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list instead of the table")
    args = p.parse_args(argv)
    unscored = []
    runs = [Path(r) for r in args.runs] or latest_runs(Path(args.outputs), unscored)
    for folder in sorted(unscored):
        print(f"note: {folder} trained without held-out data (no --eval_file): nothing to score",
              file=sys.stderr)
    for folder, instead in [] if args.runs else newer_unfinished(Path(args.outputs), runs):
        if instead is None:
            print(f"note: {folder} has not finished (no metrics.json): not scored; resume it to score it",
                  file=sys.stderr)
        else:
            print(f"note: {folder} started after {instead} but has not finished (no metrics.json): {instead} "
                  "is scored; resume the newer run to score it", file=sys.stderr)
    if not runs:
        print(f"no recipe runs under {args.outputs}/ (folders with a metrics.json from a recipe's train.py); "
              "run one, e.g. `make demo`, or give RUN=path", file=sys.stderr)
        return 1
    rows = [report_run(run, args.gallery_size) for run in runs]
    if args.json:
        print(json.dumps(rows, indent=2, allow_nan=False))
        return 0
    print("\n".join(table_lines(rows)))
    for r in rows:
        print(f"{r['run']}/report.md, {r['run']}/gallery.html")
    return 0
