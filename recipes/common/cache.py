"""The project's file cache: where built things live, and building each once, safely under concurrency.

Tiny models, pre-trained tiny bases, the embedded data sets and cached vision features are built on first
use into `$VLM_RECIPES_CACHE` (default `~/.cache/vlm-recipes`) and reused by later runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch


def cache_root() -> Path:
    """`$VLM_RECIPES_CACHE`, or `~/.cache/vlm-recipes`."""
    return Path(os.environ.get("VLM_RECIPES_CACHE") or Path.home() / ".cache" / "vlm-recipes")


@contextlib.contextmanager
def _caller_rng_kept():
    """Restore torch's CPU, Python's and NumPy's random states on exit (pre-training seeds and draws from
    them)."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(python_state)
    np.random.set_state(numpy_state)


def build_once(final: Path, build, marker: str = "tiny_model.json") -> Path:
    """Run `build(tmp_folder)` unless `final/marker` exists, then move the folder to `final`; return `final`.

    Safe under concurrent callers (the ranks of a DDP launch): a file lock lets one process build while
    the others wait, and the build happens in a private folder that is renamed into place (atomic), so a
    reader never sees a half-written model, even after a crash.
    """
    import fcntl

    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / marker).exists():  # built by another process while this one waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        try:
            # a run that builds its base first trains exactly like one that finds it built
            with _caller_rng_kept():
                build(tmp)
            if not (final / marker).exists():  # else a process that took no lock won: keep its build
                if final.exists():  # a broken leftover (no marker)
                    shutil.rmtree(final)
                os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# What a distributed launcher tells its ranks; a child process that builds a cache entry must not see it.
_LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                     "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def build_outside_process_group(module: str, name: str, final: Path, marker: str, root: Path) -> None:
    """In a rank of a distributed launch, build cache entry `final` with `python -m <module> <name>` in a
    child process.

    Once a process group is up, transformers' `save_pretrained` writes the weights on global rank 0 only,
    while build_once lets whichever rank takes the lock first build (and on a node with a cache of its own, no
    rank is 0): a rank would save a model folder without its weights. The child has no process group, and its
    own build_once keeps the ranks' children from building twice. Outside a launch, or once built, nothing
    happens.
    """
    import subprocess

    import torch.distributed as dist

    if (final / marker).exists() or not (dist.is_available() and dist.is_initialized()):
        return
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES}
    repo = str(Path(__file__).resolve().parents[2])
    env.update(VLM_RECIPES_CACHE=str(root),
               PYTHONPATH=os.pathsep.join(filter(None, [repo, env.get("PYTHONPATH")])))
    subprocess.run([sys.executable, "-m", module, name], env=env, check=True)
