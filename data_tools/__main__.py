"""`python -m data_tools <command> ...`: validate, clean, dedup, split, check-leakage, convert, hash, \
synth."""

import importlib
import os
import signal
import sys

from .errors import DataError

# command -> (module, function); each function takes the remaining argv and returns an exit code.
COMMANDS = {
    "validate": ("data_tools.clean", "main_validate",
                 "exit non-zero on any invalid row, listing file:line, field, reason"),
    "clean": ("data_tools.clean", "main_clean", "keep valid rows, write every dropped row with its reason"),
    "dedup": ("data_tools.dedup", "main",
              "merge exact and near-duplicate images, keeping their captions together"),
    "split": ("data_tools.split", "main_split",
              "split by image (near duplicates together), deterministic for a seed"),
    "check-leakage": ("data_tools.split", "main_check_leakage",
                      "fail when an image (or near duplicate) is in two files"),
    "convert": ("data_tools.convert", "main",
                "convert COCO / VQA v2 / LLaVA / Karpathy / image-text JSON to our JSONL"),
    "hash": ("data_tools.hashes", "main",
             "hash a file's images (or one shard of them) into a file that dedup/split/check-leakage merge"),
    "synth": ("data_tools.synth", "main", "make the procedural shapes data set"),
}


def main(argv: list[str]) -> int:
    """Run one command with the remaining arguments; return its exit code."""
    if not argv or argv[0] not in COMMANDS:
        print("usage: python -m data_tools <command> [args]   (<command> --help for its options)\n",
              file=sys.stderr)
        for name, (_, _, help_) in COMMANDS.items():
            print(f"  {name:<14} {help_}", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module, function, _ = COMMANDS[argv[0]]
    main_pid, finished = os.getpid(), []

    def interrupt(signum, frame):
        # SIGTERM (kill, a SLURM time limit) ends the run as Ctrl-C does: unfinished outputs' temp files
        # (as big as the outputs) are removed. A hashing worker just ends; the main process cleans up.
        # Once the command has returned, its outputs are in place: the exit goes on.
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        if not finished:
            raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        code = getattr(importlib.import_module(module), function)(argv[1:])
        finished.append(True)
        return code
    except (DataError, OSError) as e:  # bad user input: one line, not a traceback (bugs still raise)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; outputs were not replaced", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
