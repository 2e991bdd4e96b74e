"""Serve trained runs: an OpenAI-style HTTP API and a web page.

    python -m serve outputs/blip2_lora_caption [MORE_RUN_DIRS ...] --host 127.0.0.1 --port 8000

A RUN_DIR is a training output_dir (or a checkpoint-N in it), a merged/exported checkpoint, or a folder
written by recipes/clip_retrieval/embed.py (search). Each is served under its folder's name (GET /v1/models).
See serve/README.md for the API, the limits and the options.
"""

import argparse
import logging
import sys

from data_tools.images import MAX_PIXELS

from .app import ServeOptions


def parse_args(argv=None) -> argparse.Namespace:
    d = ServeOptions()
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch-size", type=int, default=d.max_batch_size,
                   help="most requests generated together; 1 turns dynamic batching off")
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms,
                   help="how long the first request of a batch waits for others to join it")
    p.add_argument("--timeout", type=float, default=d.timeout_s,
                   help="seconds a request may take (504 after)")
    p.add_argument("--max-tokens-limit", type=int, default=d.max_tokens_limit,
                   help="largest max_tokens a request may ask for (400 above)")
    p.add_argument("--default-max-tokens", type=int, default=d.default_max_tokens,
                   help="max_tokens of a request that names none")
    p.add_argument("--max-body-mb", type=float, default=d.max_body_bytes / 2**20,
                   help="largest request body, images included (413 above)")
    p.add_argument("--max-messages", type=int, default=d.max_messages,
                   help="most messages in one chat completion (400 above)")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels,
                   help=f"largest image, width x height, checked before decoding (413 above); at most "
                        f"{MAX_PIXELS:,}")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image URLs (refused by default: the server would fetch what "
                        "clients name)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p.parse_args(argv)


def option_error(args: argparse.Namespace) -> str | None:
    """What is wrong with the options' values, if anything: checked at start, not at the first request."""
    at_least_1 = {"--port": args.port, "--max-batch-size": args.max_batch_size,
                  "--max-tokens-limit": args.max_tokens_limit,
                  "--default-max-tokens": args.default_max_tokens,
                  "--max-image-pixels": args.max_image_pixels, "--max-messages": args.max_messages}
    for name, value in at_least_1.items():
        if value < 1:
            return f"{name} must be at least 1, not {value}"
    if args.max_image_pixels > MAX_PIXELS:  # the collators open each image again, with this limit
        return (f"--max-image-pixels must be at most {MAX_PIXELS:,} (the limit the recipes' collators open "
                f"images with), not {args.max_image_pixels:,}")
    if args.port > 65535:
        return f"--port must be at most 65535, not {args.port}"
    if args.default_max_tokens > args.max_tokens_limit:
        return (f"--default-max-tokens {args.default_max_tokens} is over --max-tokens-limit "
                f"{args.max_tokens_limit}: every request without max_tokens would be refused")
    for name, value in (("--timeout", args.timeout), ("--max-body-mb", args.max_body_mb)):
        if not value > 0 or value == float("inf"):
            return f"{name} must be a number of more than 0, not {value:g}"
    if not 0 <= args.max_wait_ms < float("inf"):
        return f"--max-wait-ms must be 0 or more, not {args.max_wait_ms:g}"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    error = option_error(args)
    if error is not None:
        print(f"python -m serve: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import uvicorn

    from .app import create_app
    from .runs import RunLoadError, load_runs

    options = ServeOptions(max_body_bytes=int(args.max_body_mb * 2**20),
                           max_image_pixels=args.max_image_pixels,
                           max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                           timeout_s=args.timeout, allow_remote_images=args.allow_remote_images,
                           max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                           max_messages=args.max_messages)
    try:
        runs = load_runs(args.runs)
    except (RunLoadError, FileNotFoundError, ValueError, OSError, ImportError) as e:
        print(f"python -m serve: {' '.join(str(e).split())}", file=sys.stderr)  # transformers' run over lines
        return 2
    for rid, run in runs.items():
        logging.getLogger("serve").info("serving %s (%s) from %s", rid, run.task, run.path)
    # On SIGINT/SIGTERM Uvicorn stops accepting, finishes the open requests, then the app's shutdown runs.
    uvicorn.run(create_app(runs, options), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=int(args.timeout) + 5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
