"""Ask a trained LLaVA run about an image: once with --prompt, or interactively (one message per line) \
without it.

    python recipes/llava_instruct/chat.py --model outputs/llava_instruct --image photo.png --prompt \
"Describe the image."
    python recipes/llava_instruct/chat.py --model outputs/llava_instruct --image photo.png     # empty line \
or Ctrl-D ends

--model is a run folder (LoRA adapter + base, or a full checkpoint), a merged checkpoint, a Hub id or
tiny:<name>. The prompt is built exactly as in training (recipes/common/chat.py: the processor's chat
template, and a qlora_vqa run's --answer_prompt after each question); in the interactive mode earlier
questions and answers stay in the conversation. A message holding
a string the tokenizer reads as a special token (`</s>`, `<|im_start|>`, `<end_of_turn>`, ...) is not asked,
as training refuses such a row: the interactive mode says so and asks again.
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText

from data_tools.images import load_image
from data_tools.records import IMAGE_TOKEN
from recipes.common.chat import ChatEncoder, chat_encoder, reserved_in, to_messages, with_answer_prompt
from recipes.common.merge import check_final_model, evaluated_precision, load_trained_run, trained_with
from recipes.common.models import answer_text, load_processor, loading, resolve_model_path
from recipes.common.run import run_main
from recipes.common.trainer import stop_token_ids


def load(model: str, dtype: str | None = None):
    """(model, processor) of a run folder or checkpoint (in the dtype its evaluation ran in, unless `dtype`),
    or of a Hub id / tiny:<name> (float32 unless `dtype`)."""
    path = resolve_model_path(model)
    check_final_model(path)
    if Path(path).is_dir():  # a QLoRA run's base quantized as in training, so that it answers as it scored
        return load_trained_run(path, AutoModelForImageTextToText, dtype or evaluated_precision(path)[0])
    with loading(path):
        model = AutoModelForImageTextToText.from_pretrained(path, dtype=getattr(torch, dtype or "float32"))
        model.eval()
        return model, load_processor(path, model.config.model_type)


def check_message(encoder: ChatEncoder, turns: list[dict], n_images: int) -> None:
    """ValueError when the last turn of `turns` cannot be asked as written: an `<image>` with no image left
    for it, or text holding a special string of the tokenizer (it would be the control token, not text)."""
    hit = reserved_in(to_messages(turns, n_images=n_images)[-1:], encoder.reserved)
    if hit is not None:
        raise ValueError(f"the message holds {hit[1]!r}, which the tokenizer reads as its special token, not "
                         "as text; remove or rewrite it")


@torch.no_grad()
def answer(model, processor, encoder: ChatEncoder, turns: list[dict], image, max_new_tokens: int = 128,
           autocast: torch.dtype | None = None) -> str:
    """Greedy answer to the last human turn of `turns` (LLaVA conversation format) about `image` (or None),
    under `autocast` (a --bf16 / --fp16 run's evaluation ran under it: `evaluated_precision`)."""
    images = [] if image is None else [image]
    prompt = encoder.prompt_text(to_messages(turns, n_images=len(images)))
    inputs = encoder.process([prompt], [images], padding_side="left").to(model.device)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    tok = processor.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    with torch.autocast(model.device.type, dtype=autocast, enabled=autocast is not None):
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             eos_token_id=stop_token_ids(model, tok))
    return answer_text(tok, out[0, inputs["input_ids"].shape[1]:], encoder.special_text).strip()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="run folder, checkpoint, merged checkpoint, Hub id or tiny:<name>")
    p.add_argument("--image", help="image file (omit for a text-only conversation)")
    p.add_argument("--prompt",
                   help="one message; without it, read messages from standard input until an empty line")
    p.add_argument("--max_new_tokens", type=int, default=128)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: a run's own (its run.json), else float32")
    args = p.parse_args(argv)
    image = load_image(args.image) if args.image else None  # a bad image: an error before the model loads
    if image is None and IMAGE_TOKEN in (args.prompt or ""):
        raise ValueError(f"--prompt holds {IMAGE_TOKEN} but no --image is given.")

    model, processor = load(args.model, args.dtype)
    if torch.cuda.is_available():
        model.to("cuda")
    path = resolve_model_path(args.model)
    answer_prompt = trained_with(path, "answer_prompt") if Path(path).is_dir() else None

    def first_turn(message: str) -> str:  # the image leads the first message unless it places it itself
        message = with_answer_prompt(message, answer_prompt)
        return message if image is None or IMAGE_TOKEN in message else f"{IMAGE_TOKEN}\n{message}"

    encoder = chat_encoder(processor, trained_with(path, "special_text"))
    autocast = evaluated_precision(path)[1] if Path(path).is_dir() else None
    n_images = 0 if image is None else 1
    if args.prompt is not None:
        turns = [{"from": "human", "value": first_turn(args.prompt)}]
        check_message(encoder, turns, n_images)
        print(answer(model, processor, encoder, turns, image, args.max_new_tokens, autocast))
        return 0
    turns = []
    while True:
        try:
            message = input("you> ").strip()
        except EOFError:
            break
        if not message:
            break
        value = with_answer_prompt(message, answer_prompt) if turns else first_turn(message)
        turn = {"from": "human", "value": value}
        try:
            check_message(encoder, turns + [turn], n_images)
        except ValueError as e:  # the conversation so far stays: the user rewrites the message
            print(f"not asked: {e}", file=sys.stderr, flush=True)
            continue
        turns.append(turn)
        reply = answer(model, processor, encoder, turns, image, args.max_new_tokens, autocast)
        if reply:
            turns.append({"from": "gpt", "value": reply})
        else:  # an empty answer cannot be a turn of the conversation: forget the question
            turns.pop()
        print(f"model> {reply or '(empty answer)'}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)  # a bad --model or --image: its message, exit code 2
