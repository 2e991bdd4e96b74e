"""The hashing pool ends cleanly (its workers die on SIGTERM whatever handler the command installed, and a
finished pool is closed, not terminated), and the dedup/split options that would write or mean something
else than asked are refused."""

import subprocess
import sys

import pytest

from data_tools.__main__ import main as data_tools_main
from data_tools.jsonl import write_jsonl


# Run in a process of its own: a pytest worker may hold other threads, under which forking is unsafe.
POOL_CHECK = """
import multiprocessing.pool, os, signal
from data_tools import hashes

def worker_signals(job):
    return (signal.getsignal(signal.SIGTERM) is signal.SIG_DFL,
            signal.getsignal(signal.SIGINT) is signal.SIG_IGN)

terminated, terminate = [], multiprocessing.pool.Pool.terminate
multiprocessing.pool.Pool.terminate = lambda self: terminated.append(1) or terminate(self)
main = os.getpid()

def interrupt(signum, frame):  # as `python -m data_tools` installs it, and forked workers inherit it
    if os.getpid() != main:
        os._exit(128 + signum)
    raise KeyboardInterrupt

signal.signal(signal.SIGTERM, interrupt)
jobs = list(range(hashes.MIN_PARALLEL))
assert list(hashes._run(worker_signals, jobs, 2, False, "x")) == [(True, True)] * len(jobs)
assert terminated == [], "a finished pool is closed and joined, not terminated"
for _ in hashes._run(worker_signals, jobs, 2, False, "x"):
    break  # a caller that stops reading: the pool is terminated
assert terminated == [1]
print("ok")
"""


def test_pool_workers_die_on_sigterm_and_a_finished_pool_is_closed():
    r = subprocess.run([sys.executable, "-c", POOL_CHECK], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]


@pytest.mark.parametrize("argv, message", [
    (["dedup", "--task", "caption", "IN", "--out", "OUT", "--near-threshold", "-1"],
     "--near-threshold: expected a whole number of bits from 0 to 64, got '-1'"),
    (["split", "IN", "--out-dir", "D", "--seed", "0", "--near-threshold", "65"],
     "--near-threshold: expected a whole number of bits from 0 to 64, got '65'"),
    (["split", "IN", "--out-dir", "D", "--seed", "0", "--names", "a,../escape,c"],
     "--names: '../escape' is not a file name"),
    (["split", "IN", "--out-dir", "D", "--seed", "0", "--ratios", "1e308,1e308,1"],
     "ratios must be finite, non-negative, with a positive sum"),
])
def test_options_that_would_mean_something_else_are_refused(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "IN", [{"image": "a.png", "captions": ["x"]}])
    with pytest.raises(SystemExit) as e:
        data_tools_main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["IN"]
    assert not (tmp_path.parent / "escape.jsonl").exists()


def test_a_nul_character_in_a_text_is_a_bad_value():
    from data_tools.errors import DataError
    from data_tools.records import normalize_record

    with pytest.raises(DataError) as e:  # numpy's text arrays (saved captions) drop a trailing one
        normalize_record({"image": "a.png", "captions": ["a red circle", "a blue square\x00"]}, "retrieval")
    assert (e.value.reason, e.value.field) == ("bad_value", "captions[1]")
