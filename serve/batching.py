"""Dynamic batching: requests that arrive close together are generated as one batch.

One worker thread takes the oldest waiting job, then gathers up to `max_batch_size - 1` more jobs that
can share its `generate` call (the same run, or adapters that peft can mix on one base; the same prompt for
a captioner; the same sampling options), waiting at most `max_wait_ms` for them; jobs that cannot join
wait for a later batch in arrival order. Greedy answers do not depend on the batch: each job's tokens are
cut at its own `max_tokens`, at its first stop token (the eos, or an end-of-turn token the model's
generation config names) and before its first stop string (its row then ends). A sampled job with a
`seed` is generated in a batch of its own, with the random generator seeded for that call, so that its
answer depends on its seed and not on what it was batched with. A streaming job gets each of its tokens
as the batch makes it. A job whose client left (or whose request timed out) is not started, and a
batch ends as soon as all its jobs are.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer


@dataclass
class Job:
    """One chat completion waiting for generation."""

    run: object  # serve.runs.GenerativeRun
    item: dict  # {"key", "image", "conversations"}
    prompt: str | None
    max_tokens: int
    temperature: float | None
    top_p: float | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    stream: asyncio.Queue | None = None  # text deltas, then None
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)
    seed: int | None = None  # sampled jobs: seeds the random generator for the job's own generate call
    stop: tuple[str, ...] = ()  # OpenAI's `stop`: the answer ends before the first of these

    @property
    def seeded(self) -> bool:
        return self.seed is not None and bool(self.temperature)

    @property
    def key(self) -> tuple:
        alone = id(self) if self.seeded else None  # a seeded sample shares its generate call with no other
        return (self.run.batch_group(self.item.get("image") is not None), self.prompt, self.temperature,
                self.top_p, alone)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (eos) or "length" (max_tokens)
    prompt_tokens: int
    completion_tokens: int


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """`text` up to the first of the stop strings in it (which is left out, as OpenAI does), and whether
    there was one."""
    ends = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    return (text[:min(ends)], True) if ends else (text, False)


def _partial_stop(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that begins a stop string: held back from a stream until the
    next tokens tell whether the stop string follows."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class _RowStreamer(BaseStreamer):
    """Hands each row's new token to its job's stream, as text deltas decoded so far."""

    def __init__(self, jobs: list[Job], stop_ids: set[int]):
        self.jobs, self.stops = jobs, stop_ids
        self.tokens = [[] for _ in jobs]
        self.sent = ["" for _ in jobs]
        self.done = [job.stream is None for job in jobs]
        self.prompt_seen = False

    def put(self, value):
        if not self.prompt_seen:  # generate() first hands over the prompt
            self.prompt_seen = True
            return
        for row, token in enumerate(value.reshape(-1).tolist()):
            if self.done[row]:
                continue
            job = self.jobs[row]
            if token in self.stops:
                self.done[row] = True
                continue
            self.tokens[row].append(token)
            if len(self.tokens[row]) >= job.max_tokens:
                self.done[row] = True
            # held back: trailing whitespace (the final text is stripped), a half-decoded character and
            # what may be the start of a stop string
            text, stopped = cut_at_stop(job.run.answer_text(self.tokens[row]), job.stop)
            if stopped:
                self.done[row] = True
            text = text[:len(text) - _partial_stop(text, job.stop)].strip()
            if (text.startswith(self.sent[row]) and len(text) > len(self.sent[row])
                    and not text.endswith("\ufffd")):  # a character whose bytes are still coming
                delta, self.sent[row] = text[len(self.sent[row]):], text
                job.loop.call_soon_threadsafe(job.stream.put_nowait, delta)

    def end(self):
        pass


class _RowStops(StoppingCriteria):
    """Ends the rows whose answer reached its job's max_tokens or one of its stop strings, and those of jobs
    whose clients left or timed out; generate() returns once every row ended."""

    def __init__(self, jobs: list[Job], stop_ids: set[int]):
        self.jobs, self.stop_ids = jobs, stop_ids
        self.steps = 0  # one call per new token: the sequences may or may not hold the prompt (soft prompt)

    def _stopped(self, job: Job, tokens: list[int]) -> bool:
        # `tokens` are the row's new tokens: an answer is cut at max_tokens anyway (generate_batch), so the
        # row need not go on to the batch's longest
        if job.cancelled or len(tokens) >= job.max_tokens:
            return True
        if not job.stop:
            return False
        end = next((i for i, t in enumerate(tokens) if t in self.stop_ids), len(tokens))
        return cut_at_stop(job.run.answer_text(tokens[:end]), job.stop)[1]

    def __call__(self, input_ids, scores, **kwargs):
        self.steps += 1
        new = input_ids[:, -self.steps:].tolist()
        return torch.tensor([self._stopped(job, tokens) for job, tokens in zip(self.jobs, new)],
                            device=input_ids.device)


class Batcher:
    """The worker thread that runs jobs in batches (see the module docstring)."""

    def __init__(self, max_batch_size: int = 16, max_wait_ms: float = 10.0, metrics=None):
        self.max_batch_size, self.max_wait = max(1, max_batch_size), max_wait_ms / 1000
        self.metrics = metrics
        self.queue: queue.Queue = queue.Queue()
        self.waiting: deque[Job] = deque()  # taken from the queue, not batchable with the last batch
        self.thread = threading.Thread(target=self._loop, name="serve-batcher", daemon=True)
        self._stopping = False
        self.depth = 0  # jobs submitted and not yet in a batch
        self._depth_lock = threading.Lock()  # the event loop and the worker both change it

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Finish every queued job, then end the thread."""
        self.queue.put(None)
        self.thread.join()

    def submit(self, job: Job) -> None:
        self._count(1)
        self.queue.put(job)

    def _count(self, change: int) -> None:
        with self._depth_lock:
            self.depth += change
        if self.metrics is not None:
            self.metrics.queue_depth.inc(change)

    def _take(self, timeout: float) -> Job | None:
        """The next queued job within `timeout` seconds (<= 0: only one already there); None: none, or
        stop."""
        try:
            job = self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
        except queue.Empty:
            return None
        if job is None:
            self._stopping = True
        return job

    def _loop(self) -> None:
        while True:
            if self.waiting:
                first = self.waiting.popleft()
            elif self._stopping:  # finish what was queued before stop(), then end
                first = self._take(0)
                if first is None:
                    return
            else:
                first = self.queue.get()
                if first is None:
                    self._stopping = True
                    continue
            batch, skipped = [first], []
            earlier, self.waiting = self.waiting, deque()  # jobs passed over by an earlier batch go first
            for job in earlier:
                (batch if job.key == first.key and len(batch) < self.max_batch_size else skipped).append(job)
            deadline = time.monotonic() + self.max_wait
            while len(batch) < self.max_batch_size:
                job = self._take(0 if self._stopping else deadline - time.monotonic())
                if job is None:
                    break
                (batch if job.key == first.key else skipped).append(job)
            self.waiting.extend(skipped)
            self._count(-len(batch))
            try:
                answers = self._run([job for job in batch if not job.cancelled])
            finally:  # the jobs' image files, written by the request handlers: gone before any answer is
                for job in batch:
                    if job.item.get("image"):
                        Path(job.item["image"]).unlink(missing_ok=True)
            for job, result, error in answers:
                job.loop.call_soon_threadsafe(_set, job, result, error)

    def _run(self, jobs: list[Job]) -> list[tuple]:
        """(job, completion, None) for each job, or (job, None, error) for all when generation fails."""
        if not jobs:
            return []
        if self.metrics is not None:
            self.metrics.batch_size.observe(len(jobs))
        try:
            results = generate_batch(jobs)
        except Exception as e:  # noqa: BLE001 - handed to the waiting requests, which answer 500 and log it
            return [(job, None, e) for job in jobs]
        return [(job, result, None) for job, result in zip(jobs, results)]


def _set(job: Job, result, error) -> None:
    if job.stream is not None:
        job.stream.put_nowait(None)
    if job.future.done():  # the request timed out or its client left
        return
    if error is not None:
        job.future.set_exception(error)
    else:
        job.future.set_result(result)


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device):
    """The random generator of the CPU (and of `device`, a GPU) seeded with `seed` inside the block, and
    put back as it was after it; nothing when `seed` is None."""
    if seed is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def generate_batch(jobs: list[Job]) -> list[Completion]:
    """One `generate` call for jobs of one batch group and options; each answer cut at its own max_tokens
    and its first stop token."""
    run, first = jobs[0].run, jobs[0]
    batch = run.collate([job.item for job in jobs], first.prompt)
    batch.pop("keys")
    longest = max(job.max_tokens for job in jobs)
    kwargs = run.generate_kwargs(longest, first.temperature, first.top_p)
    stops = set(kwargs["eos_token_id"])
    autocast = torch.autocast(run.model.device.type, dtype=run.autocast, enabled=run.autocast is not None)
    with run.lock, seeded(first.seed if first.seeded else None, run.model.device), autocast:
        model = run.model
        if run.mixable:  # each request with its own run's adapter
            kwargs["adapter_names"] = [job.run.adapter for job in jobs]
        elif run.adapter is not None:
            model.set_adapter(run.adapter)
        batch = {k: v.to(model.device) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        if any(job.stream is not None for job in jobs):
            kwargs["streamer"] = _RowStreamer(jobs, stops)
        kwargs["stopping_criteria"] = StoppingCriteriaList([_RowStops(jobs, stops)])
        generated = model.generate(**batch, **kwargs)
    new_tokens = generated[:, batch["input_ids"].shape[1]:].tolist()
    prompt_tokens = batch["attention_mask"].sum(dim=1).tolist()
    out = []
    for job, tokens, n_prompt in zip(jobs, new_tokens, prompt_tokens):
        tokens = tokens[:job.max_tokens]
        finish = "length"
        end = next((i for i, t in enumerate(tokens) if t in stops), None)
        if end is not None:
            tokens, finish = tokens[:end + 1], "stop"
        text, stopped = cut_at_stop(job.run.answer_text(tokens), job.stop)
        if stopped:  # the answer's tokens: up to the one that completed the stop string
            finish = "stop"
            tokens = tokens[:next(k for k in range(1, len(tokens) + 1) if cut_at_stop(
                job.run.answer_text(tokens[:k]), job.stop)[1])]
        out.append(Completion(text.strip(), finish, int(n_prompt), len(tokens)))
    return out
