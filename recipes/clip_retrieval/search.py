"""Search embeddings written by embed.py: the top-k images for a text query, or the top-k captions for an \
image.

    python recipes/clip_retrieval/search.py --index outputs/clip_index --query "a red circle on the left" \
--k 5
    python recipes/clip_retrieval/search.py --index outputs/clip_index --image photo.png --k 5 --json

The query is embedded with the model that made the index (recorded in index.json; --model overrides),
so query and index live in the same space, and cut at the index's text length as its captions were; a query
holding one of its tokenizer's special strings (but the run's --special_text) is refused. Scores
are cosine similarities. Images are shown by their paths on this machine, to open them: this is a local
tool (`python -m serve` names them to its clients by their paths under the image root).
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from data_tools.records import find_reserved
from recipes.clip_retrieval.embed import encode_texts, load
from recipes.clip_retrieval.trainer import embed_images
from recipes.common.models import text_reserved
from recipes.common.run import run_main


def top_k(query: np.ndarray, bank: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(row, cosine) of the `k` rows of `bank` most similar to `query`, best first (ties: lower row first)."""
    scores = bank @ query
    order = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return [(int(i), float(scores[i])) for i in order]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="the folder embed.py wrote")
    query = p.add_mutually_exclusive_group(required=True)
    query.add_argument("--query", help="text: find images")
    query.add_argument("--image", help="image file: find captions")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--model", default=None, help="embed the query with this model (default: the index's)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of a table")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error(f"--k {args.k}: give at least 1")
    index_dir = Path(args.index)
    if not (index_dir / "index.json").exists():
        p.error(f"--index {index_dir}: no index.json there; write one with embed.py")
    if args.query is not None and not args.query.strip():  # as training refuses an empty caption
        p.error("--query is empty: give a text to search for")
    index = json.loads((index_dir / "index.json").read_text(encoding="utf-8"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip, processor, collator = load(args.model or index["model"], device)
    reserved = text_reserved(processor.tokenizer, index.get("special_text"))
    if args.query is not None and (found := find_reserved(args.query, reserved)):
        p.error(f"--query holds {found!r}, which the tokenizer reads as its special token, not as text "
                "(the index's captions could not hold it); remove or rewrite it")
    with torch.inference_mode():
        if args.query is not None:
            q = encode_texts(clip, processor, collator, [args.query], device=device,
                             max_length=index.get("max_length"))[0]
            bank, names, what = np.load(index_dir / "images.npy"), index["images"], "image"
        else:
            q = embed_images(clip, collator, [args.image], 1, device)[0]
            bank, names, what = np.load(index_dir / "texts.npy"), index["texts"], "text"
    if bank.shape[1] != q.shape[0]:
        p.error(f"the index holds {bank.shape[1]}-d embeddings, the model makes {q.shape[0]}-d ones: not the "
                "model that made it")
    hits = [{"rank": r + 1, "score": round(s, 4), what: names[i]}
            for r, (i, s) in enumerate(top_k(q, bank, args.k))]
    if args.json:
        print(json.dumps(hits, ensure_ascii=False))
    else:
        for h in hits:
            print(f"{h['rank']:>3}  {h['score']:.4f}  {h[what]}")
    return 0


if __name__ == "__main__":
    run_main(main)  # a bad --index, --model or --image: its message, exit code 2
