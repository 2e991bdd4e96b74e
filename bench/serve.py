"""Serving throughput and latency with dynamic batching on and off, and a bounded load test with bad requests.

    python -m bench.serve                                   # a tiny BLIP-2 run trained for it, on the CPU
    python -m bench.serve outputs/blip2_lora_caption --max-tokens 32

The same `python -m serve` build is started twice on 127.0.0.1, once with `--max-batch-size 1` (batching
off) and once with `--max-batch-size B --max-wait-ms W` (on); each gets the same chat completions (an image
to caption, greedy, `--max-tokens` tokens) at every concurrency of `--concurrency`, from that many client
threads, after a warm-up. Then the load test, against the batching server: `--load-requests` requests at
concurrency `--load-concurrency`, every tenth a bad one (not an image, a decompression bomb, an over-limit
body, an unknown model, malformed JSON, in turn); it counts the answers by status, checks that every good
request got its 200 and no request a 5xx, and samples the server's resident memory as it goes.
Without a RUN_DIR a tiny BLIP-2 captioner (tiny:blip2-opt, one training step) is trained into a temporary
folder first; every request then generates exactly `--max-tokens` tokens (its random weights never stop).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import platform
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.cli import positive, result_path_error
from data_tools.files import atomic_write_text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: bytes, timeout: float = 300) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        try:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused part way through the body: the answer is waiting
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _bomb_png(side: int = 20000) -> bytes:
    """A PNG whose header claims side x side pixels: the decompression-bomb guard refuses it unread."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


class Served:
    """`python -m serve` in a subprocess, stopped with SIGTERM (its graceful shutdown)."""

    def __init__(self, runs: list[str], *args: str):
        self.port = _free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "serve", *runs, "--port", str(self.port),
                                      "--log-level", "warning", *args])
        deadline = time.monotonic() + 300
        while True:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()  # one that outlasted the deadline is not left running
                raise RuntimeError(f"python -m serve {' '.join(runs)} did not start")
            time.sleep(0.5)
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        conn.request("GET", "/v1/models")
        self.models = [m["id"] for m in json.loads(conn.getresponse().read())["data"]]

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def _chat_body(model: str, image: bytes, max_tokens: int) -> bytes:
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    return json.dumps({"model": model, "max_tokens": max_tokens, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}).encode()


def measure(server: Served, bodies: list[bytes], concurrency: int, n: int) -> dict:
    """`n` requests from `concurrency` threads: requests/s and latency percentiles (ms)."""
    def one(i: int) -> float:
        start = time.perf_counter()
        status, text = _post(server.port, "/v1/chat/completions", bodies[i % len(bodies)])
        if status != 200:
            raise RuntimeError(f"status {status}: {text[:300]!r}")
        return time.perf_counter() - start

    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, range(concurrency)))  # warm-up: one round
        start = time.perf_counter()
        latencies = np.array(list(pool.map(one, range(n))))
        elapsed = time.perf_counter() - start
    return {"concurrency": concurrency, "requests": n, "req_per_s": n / elapsed,
            "p50_ms": float(np.percentile(latencies, 50) * 1000),
            "p99_ms": float(np.percentile(latencies, 99) * 1000)}


def load_test(server: Served, model: str, image: bytes, n: int, concurrency: int, max_tokens: int,
              body_limit_mb: float) -> dict:
    """`n` requests, every tenth bad; statuses counted, memory sampled every `concurrency` requests."""
    good = _chat_body(model, image, max_tokens)
    bad = {
        "not an image": _chat_body(model, b"%PDF-1.4 not pixels" * 10, max_tokens),
        "decompression bomb": _chat_body(model, _bomb_png(), max_tokens),
        "over-limit body": b'{"model": "' + b"x" * int((body_limit_mb + 1) * 2**20) + b'"}',
        "unknown model": _chat_body("no-such-run", image, max_tokens),
        "malformed JSON": good[: len(good) // 2],
    }
    kinds = list(bad)
    plan = [("good", good) if i % 10 else (kinds[(i // 10) % len(kinds)], bad[kinds[(i // 10) % len(kinds)]])
            for i in range(n)]
    memory = [_rss_mb(server.proc.pid)]

    def one(i: int) -> tuple[str, int]:
        kind, body = plan[i]
        status, _ = _post(server.port, "/v1/chat/completions", body)
        if i % concurrency == 0:
            memory.append(_rss_mb(server.proc.pid))
        return kind, status

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        answers = list(pool.map(one, range(n)))
    elapsed = time.perf_counter() - start
    memory.append(_rss_mb(server.proc.pid))
    by_kind: dict[str, dict[int, int]] = {}
    for kind, status in answers:
        by_kind.setdefault(kind, {}).setdefault(status, 0)
        by_kind[kind][status] += 1
    return {"requests": n, "concurrency": concurrency, "seconds": elapsed, "by_kind": by_kind,
            "server_errors": sum(s >= 500 for _, s in answers),
            "good_answered": by_kind["good"].get(200, 0), "good": sum(k == "good" for k, _ in answers),
            "rss_mb_start": memory[0], "rss_mb_after_first_tenth": memory[max(1, len(memory) // 10)],
            "rss_mb_max": max(memory), "rss_mb_end": memory[-1]}


def tiny_run(folder: Path) -> Path:
    """A tiny BLIP-2 captioner trained for one step on a few synthetic images (tiny:blip2-opt)."""
    from data_tools.jsonl import read_jsonl, write_jsonl
    from data_tools.synth import make_synthetic

    rows = read_jsonl(make_synthetic("caption", 16, folder / "data", seed=0, progress=False))
    write_jsonl(folder / "data" / "train.jsonl", rows)
    root = Path(__file__).resolve().parent.parent
    out = folder / "blip2_lora_caption"
    subprocess.run([sys.executable, str(root / "recipes" / "blip2_lora_caption" / "train.py"),
                    "--model_name_or_path", "tiny:blip2-opt",
                    "--train_file", str(folder / "data" / "train.jsonl"),
                    "--output_dir", str(out), "--max_steps", "1", "--per_device_train_batch_size", "4",
                    "--report_to", "none", "--eval_strategy", "no", "--save_strategy", "no",
                    "--load_best_model_at_end", "false"], check=True, capture_output=True)
    return out


def _images(folder: Path, n: int = 8) -> list[bytes]:
    from data_tools.synth import make_synthetic

    make_synthetic("caption", n, folder / "bench-images", seed=1, progress=False)
    return [p.read_bytes() for p in sorted((folder / "bench-images").rglob("*.png"))[:n]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="*", metavar="RUN_DIR",
                   help="a captioner run (default: a tiny one, trained first)")
    p.add_argument("--concurrency", type=positive(), nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=positive(), default=96, help="timed requests per concurrency level")
    p.add_argument("--max-tokens", type=positive(), default=16)
    p.add_argument("--max-batch-size", type=positive(), default=32)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--load-requests", type=int, default=1000, help="0: no load test")
    p.add_argument("--load-concurrency", type=positive(), default=32)
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    for run in args.runs:  # known now, not after training and starting a server
        if not Path(run).exists():
            p.error(f"RUN_DIR {run}: no such folder; give a trained captioner's run folder")
    if (error := result_path_error("--json", args.json)) is not None:
        p.error(error)
    try:
        return _bench(args)
    except RuntimeError as e:  # a server that did not start or answered an error: serve printed why above
        print(f"python -m bench.serve: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1


def _bench(args) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        tmp = Path(tmp)
        runs = args.runs or [str(tiny_run(tmp))]
        images = _images(tmp)
        body_limit_mb = 4.0
        results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                   "load_average_start": os.getloadavg(), "levels": {}}
        for mode, flags in (("off", ["--max-batch-size", "1"]),
                            ("on", ["--max-batch-size", str(args.max_batch_size), "--max-wait-ms",
                                    str(args.max_wait_ms)])):
            server = Served(runs, *flags, "--max-body-mb", str(body_limit_mb))
            try:
                model = server.models[0]
                bodies = [_chat_body(model, im, args.max_tokens) for im in images]
                results["levels"][mode] = [measure(server, bodies, c, max(args.requests, 2 * c))
                                           for c in args.concurrency]
                for row in results["levels"][mode]:
                    print(f"batching {mode:>3}  concurrency {row['concurrency']:>3}: "
                          f"{row['req_per_s']:7.2f} req/s  "
                          f"p50 {row['p50_ms']:8.1f} ms  p99 {row['p99_ms']:8.1f} ms", flush=True)
                if mode == "on" and args.load_requests:
                    results["load"] = load_test(server, model, images[0], args.load_requests,
                                                args.load_concurrency, args.max_tokens, body_limit_mb)
                    print(json.dumps(results["load"], indent=1), flush=True)
            finally:
                server.stop()
        results["load_average_end"] = os.getloadavg()
        off = {r["concurrency"]: r["req_per_s"] for r in results["levels"]["off"]}
        for r in results["levels"]["on"]:
            ratio = r["req_per_s"] / off[r["concurrency"]]
            print(f"concurrency {r['concurrency']}: batching gives {ratio:.2f}x "
                  "the requests/s")
        if args.json:
            atomic_write_text(args.json, json.dumps(results, indent=1))
        load = results.get("load")
        if load and (load["server_errors"] or load["good_answered"] != load["good"]):
            print("load test FAILED: a 5xx, or a good request without its answer", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
