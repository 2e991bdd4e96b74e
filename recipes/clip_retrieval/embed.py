"""Embed the images and captions of a JSONL file with a CLIP or SigLIP model, for search.py or your own index.

    python recipes/clip_retrieval/embed.py --model outputs/clip_retrieval --file data/val.jsonl --out \
outputs/clip_index

--model: a run folder (full model or LoRA adapter), a wise_ft-* folder, a checkpoint, a Hub id or
tiny:<name>. --file: retrieval or caption records (`{"image": ..., "captions": [...]}`). Writes to --out:
images.npy and texts.npy (L2-normalised float32, one row per image / caption, so a dot product is the
cosine similarity) and index.json (the model, the text length, the run's --special_text, the image root and
the image paths, the captions and the image of each).

Captions are cut at the --max_length the run trained and was evaluated with (its run.json or metrics.json),
as training cut them; --max_length overrides it, and a model that is no run cuts at its text tower's length.
A caption that holds one of the tokenizer's special strings (`<|endoftext|>`) is refused as in training, or
skipped and counted with --skip_bad_rows; a run's --special_text (its run.json) is kept, as it trained.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from transformers import AutoProcessor

from data_tools.files import atomic_write, replaced_together
from recipes.clip_retrieval.collator import (TextLengthReport, collator_for, pools_at_eos, records_by_image,
                                             tokenize_texts)
from recipes.clip_retrieval.merge import load_dual_encoder
from recipes.clip_retrieval.trainer import embed_images, embed_texts
from recipes.common.data import load_records
from recipes.common.merge import check_final_model, run_record, trained_with
from recipes.common.models import resolve_model_path, text_reserved
from recipes.common.run import run_main


def load(model: str, device: str = "cpu"):
    """(dual encoder in eval mode on `device`, processor, collator) for a run folder, checkpoint, Hub id or
    tiny:<name>."""
    path = resolve_model_path(model)
    check_final_model(path)
    clip = load_dual_encoder(path).to(device).eval()
    processor = AutoProcessor.from_pretrained(path)
    return clip, processor, collator_for(clip, processor.tokenizer, processor.image_processor)


def text_max_length(model: str, clip, given: int | None = None) -> int:
    """Tokens a text is cut to: `given`, else the --max_length run folder `model` (or its checkpoint-N or
    wise_ft-* folder) trained with, from its run.json or metrics.json, else the text tower's length."""
    positions = clip.config.text_config.max_position_embeddings
    where = "--max_length"
    if given is None and Path(model).is_dir():  # a Hub id or tiny:<name> is no run
        records = [f for f in (run_record(model), Path(model) / "metrics.json")
                   if f is not None and f.is_file()]
        for record in records:
            given = json.loads(record.read_text(encoding="utf-8")).get("max_length")
            if given is not None:
                where = f"{record}: max_length"
                break
        else:
            if records:  # texts may then be cut otherwise than in training: said, not guessed
                print(f"warning: {records[0]} does not record the --max_length the run trained with; texts "
                      f"are cut at the text tower's {positions} tokens (pass --max_length to cut them as "
                      "training did)", file=sys.stderr)
    if given is None:
        return positions
    if not isinstance(given, int) or isinstance(given, bool) or given < 2:  # room for bos and eos
        raise ValueError(f"{where} {given!r}: expected a whole number of tokens, at least 2")
    if given > positions:
        raise ValueError(f"{where} {given}: the text tower has {positions} positions; give {positions} or "
                         "less")
    return given


def encode_texts(clip, processor, collator, texts: list[str], batch_size: int = 256, device: str = "cpu",
                 progress: bool = False, max_length: int | None = None):
    """L2-normalised embeddings of `texts`; texts longer than `max_length` (default: the text tower's) are
    cut before eos, with a warning."""
    report = TextLengthReport()
    ids = tokenize_texts(texts, processor.tokenizer,
                         max_length or clip.config.text_config.max_position_embeddings, report,
                         pooled_at_eos=pools_at_eos(clip))
    if report.truncated:
        print(f"warning: {report}", file=sys.stderr)
    return embed_texts(clip, collator, ids, batch_size, device, progress)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--file", required=True, help="JSONL of retrieval or caption records")
    p.add_argument("--out", required=True, help="folder for images.npy, texts.npy and index.json")
    p.add_argument("--batch_size", type=int, default=256)
    p.add_argument("--max_length", type=int, default=None,
                   help="text tokens, special tokens included (default: the run's, else the text tower's)")
    p.add_argument("--image_root", default=None,
                   help="folder the file's image paths are relative to (default: the file's own folder)")
    p.add_argument("--skip_bad_rows", action="store_true",
                   help="skip invalid rows and images (written to OUT/rejects.jsonl) instead of stopping")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clip, processor, collator = load(args.model, device)
    # No caption may hold a special string of the tokenizer but the run's --special_text, as in training
    # (the text pools at the first eos).
    special_text = trained_with(args.model, "special_text") if Path(args.model).is_dir() else None
    records = records_by_image(load_records(args.file, "retrieval", image_root=args.image_root,
                                            skip_bad_rows=args.skip_bad_rows,
                                            rejects_path=Path(args.out) / "rejects.jsonl",
                                            reserved=text_reserved(processor.tokenizer, special_text)))
    max_length = text_max_length(args.model, clip, args.max_length)
    texts = [t for caps in records["captions"] for t in caps]
    text_to_image = [i for i, caps in enumerate(records["captions"]) for _ in caps]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with torch.inference_mode():
        arrays = {"images.npy": embed_images(clip, collator, list(records["image"]), args.batch_size, device,
                                             progress=True),
                  "texts.npy": encode_texts(clip, processor, collator, texts, args.batch_size, device,
                                            progress=True, max_length=max_length)}
    # A model folder as an absolute path: search.py and serve read the index from any working folder.
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    # The image root: serve names a gallery image to its clients by its path under it.
    root = Path(args.image_root if args.image_root is not None else Path(args.file).parent).resolve()
    index = {"model": model, "max_length": max_length, "file": str(Path(args.file).resolve()),
             "image_root": str(root), "special_text": special_text, "images": list(records["image"]),
             "texts": texts, "text_to_image": text_to_image}
    # The three files of an index replace an earlier one's together: a stop never leaves a mix of two.
    with replaced_together() as together:
        for name, array in arrays.items():
            with atomic_write(out / name, "wb", together=together) as f:
                np.save(f, array)
        with atomic_write(out / "index.json", together=together) as f:
            f.write(json.dumps(index, ensure_ascii=False, indent=1))
    print(f"{len(records)} images and {len(texts)} captions embedded into {out}")
    return 0


if __name__ == "__main__":
    run_main(main)  # a bad file, path or option: its message, exit code 2
