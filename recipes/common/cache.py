"""The file cache of what is built on first use (tiny models, the embedded data, cached vision features),
each built once, safely under concurrency."""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch


def cache_root() -> Path:
    """`$VLM_RECIPES_CACHE`, or `~/.cache/vlm-recipes`."""
    return Path(os.environ.get("VLM_RECIPES_CACHE") or Path.home() / ".cache" / "vlm-recipes")


def build_once(final: Path, build, marker: str = "tiny_model.json") -> Path:
    """`final`, built by `build(tmp_folder)` unless `final/marker` exists: under a file lock (one rank of a
    launch builds, the others wait), in a private folder renamed into place, never seen half-written."""
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / marker).exists():  # built by another process while this one waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            # The caller's random states are kept: a run that builds its base first trains exactly like
            # one that finds it built.
            python_state, numpy_state = random.getstate(), np.random.get_state()
            with torch.random.fork_rng(devices=[]):
                build(tmp)
            random.setstate(python_state)
            np.random.set_state(numpy_state)
            if not (final / marker).exists():  # else a process that took no lock won: keep its build
                if final.exists():  # a broken leftover (no marker)
                    shutil.rmtree(final)
                os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
