"""The FastAPI app: OpenAI-style chat completions, models and search over trained runs, /health, /metrics
and the web page at /.

Every refusal is a 4xx with OpenAI's error body ({"error": {"message", "type", "param", "code"}}); a 5xx
means the server failed (it is logged with its traceback), never that a request was bad.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import shutil
import tempfile
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from data_tools.errors import MISSING_IMAGE, DataError
from data_tools.images import check_image
from data_tools.records import IMAGE_TOKEN, find_reserved
from recipes.common.chat import with_answer_prompt

from .batching import Batcher, Job
from .images import ClientError, image_bytes, save_checked_image

logger = logging.getLogger("serve")
STATIC = Path(__file__).resolve().parent / "static"
SERVER_ERROR = {"error": {"message": "internal server error", "type": "server_error", "param": None,
                          "code": None}}
# Below this a temperature samples what greedy decoding picks, or overflows logits / temperature into nan
# probabilities (1e-45): such a request is decoded greedily, as vLLM does below the same threshold.
GREEDY_BELOW = 1e-5


@dataclass
class ServeOptions:
    """Limits and batching; the command line's options (python -m serve --help)."""

    max_body_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 25_000_000
    max_tokens_limit: int = 512
    default_max_tokens: int = 64
    timeout_s: float = 120.0
    allow_remote_images: bool = False
    max_batch_size: int = 16
    max_wait_ms: float = 10.0
    max_search_k: int = 100
    max_messages: int = 256


class Metrics:
    """The Prometheus series /metrics shows, in a registry of the app's own."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("serve_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("serve_request_seconds", "Time to the response's headers, by route",
                                 ["route"],
                                 registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = Histogram("serve_batch_size", "Requests per generate call", registry=self.registry,
                                    buckets=(1, 2, 4, 8, 16, 32, 64))
        self.queue_depth = Gauge("serve_queue_depth", "Chat completions waiting for generation",
                                 registry=self.registry)


# --- request bodies (extra fields of OpenAI clients are accepted and ignored) ------------------------------
# Strict: a value of the wrong JSON type ("5", 5.0 or "true" for 5 or true) is refused naming the field, not
# converted; an int is still a number (temperature 1).
class ImageURL(BaseModel):
    model_config = ConfigDict(strict=True)
    url: str


PART_TYPES = ("text", "image_url")


class ContentPart(BaseModel):
    """A part of a message's content. One model for every type, not a union of a model per type: pydantic
    puts a union's branch into the path of an error inside it (`messages.0.content.1.image_url.image_url`),
    and that path is the `param` a client is shown."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str
    text: str | None = None  # required by a text part: checked where the parts are read, naming the part
    image_url: ImageURL | None = None

    @field_validator("type")
    @classmethod
    def _supported(cls, value: str) -> str:
        if value not in PART_TYPES:
            raise PydanticCustomError("unsupported_part", "content part type '{type}' is not supported; "
                                      "this server takes " + " and ".join(f"'{t}'" for t in PART_TYPES),
                                      {"type": value})
        return value

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_url(cls, value):
        return {"url": value} if isinstance(value, str) else value  # some clients send the URL alone


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: list[ContentPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_is_a_part(cls, value):
        # A string is one text part. Not a `str | list` union: a bad part would then also be reported as
        # "not a valid string", and that error, the union's first, is the one a client is shown.
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        if value is not None and not isinstance(value, list):
            raise PydanticCustomError("invalid_content", "must be a string or a list of content parts")
        return value


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None

    @field_validator("temperature")
    @classmethod
    def _tiny_is_greedy(cls, value: float | None) -> float | None:
        return 0.0 if value is not None and value < GREEDY_BELOW else value


# OpenAI fields this server cannot honour, each with the test of a value that leaves the answer unchanged
# (clients often send the defaults); any other value is refused rather than silently ignored.
UNSUPPORTED = {
    "logprobs": lambda v: not v,
    "top_logprobs": lambda v: not v,
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
    "functions": lambda v: not v,
    "function_call": lambda v: v in (None, "none"),
    "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
    "logit_bias": lambda v: not v,
    "presence_penalty": lambda v: not v,
    "frequency_penalty": lambda v: not v,
    "audio": lambda v: v is None,
    "modalities": lambda v: v is None or v == ["text"],
}


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    query: str | None = Field(default=None, min_length=1)
    image: str | None = None  # a data: URL
    k: int = Field(default=5, ge=1)


def _validation_error(e: ValidationError) -> ClientError:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return ClientError(400, f"{where}: {first['msg']}" if where else first["msg"], param=where or None,
                       code="invalid_value")


# `developer` is what newer OpenAI clients call the system message
ROLES = {"user": "human", "assistant": "gpt", "system": "system", "developer": "system"}


def refuse_special_strings(text: str, run, model: str, param: str, in_message: bool = True) -> None:
    """Refuse `text` holding a string the tokenizer of `run` reads as a special token: in a prompt it would
    be the control token (a turn injected, the text ended), not text; training refuses such a row too. In a
    message, `<image>` too: the conversation places an image part with it."""
    if in_message and IMAGE_TOKEN in text and IMAGE_TOKEN not in run.reserved:
        raise ClientError(400, f"{param}: holds {IMAGE_TOKEN!r}, which stands for an image here, not for "
                          "text; send the image as an image_url part", param=param,
                          code="special_token_in_text")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's \ud800 escape: no character; the tokenizer cannot take it
        raise ClientError(400, f"{param}: holds a lone UTF-16 surrogate ({text[e.start]!r}) at character "
                          f"{e.start}, not text", param=param, code="invalid_value") from None
    found = find_reserved(text, run.reserved)
    if found is not None:
        raise ClientError(400, f"{param}: holds {found!r}, which the tokenizer of {model!r} reads as its "
                          "special token, not as text; remove or rewrite it", param=param,
                          code="special_token_in_text")


def create_app(runs: dict, options: ServeOptions | None = None) -> FastAPI:
    """The app serving `runs` ({id: run} from serve.runs.load_runs)."""
    options = options or ServeOptions()
    metrics = Metrics()
    batcher = Batcher(options.max_batch_size, options.max_wait_ms, metrics)
    scratch = Path(tempfile.mkdtemp(prefix="serve-images-"))
    # Counting a prompt renders the chat template: threads of its own, so that slow renders never hold up
    # image decoding, search or the shutdown, which use asyncio's default threads.
    prompt_pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="serve-prompt")
    # Remote image fetches wait on other servers: a few threads of their own, so that slow ones hold up
    # nothing else.
    fetch_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="serve-fetch")

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        # Uvicorn stops taking connections and waits for the open requests before this runs.
        await asyncio.to_thread(batcher.stop)
        prompt_pool.shutdown(wait=False, cancel_futures=True)
        fetch_pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(scratch, ignore_errors=True)

    app = FastAPI(title="vlm-recipes serve", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.runs, app.state.options, app.state.metrics = runs, options, metrics
    app.state.scratch = scratch  # the requests' image files, each deleted once answered
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def count(request: Request, call_next):
        start = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:  # a server fault: logged with its traceback, answered in the same error shape
            logger.exception("error serving %s %s", request.method, request.url.path)
            response = JSONResponse(SERVER_ERROR, status_code=500)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        metrics.latency.labels(name).observe(time.perf_counter() - start)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            # counted when it ends: a server error during a stream is a 500, though its headers said 200
            response.body_iterator = counted(response.body_iterator, request, name, response.status_code)
        else:
            metrics.requests.labels(name, str(response.status_code)).inc()
        return response

    async def counted(body, request: Request, route: str, status: int):
        try:
            async for chunk in body:
                yield chunk
        finally:
            # an error that ended the stream (a timeout, a server fault) is counted with its own status
            metrics.requests.labels(route, str(getattr(request.state, "stream_status", status))).inc()

    @app.exception_handler(ClientError)
    async def client_error(request, e: ClientError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(ClientError(e.status_code, str(e.detail), code=code).body(),
                            status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def query_error(request, e: RequestValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return JSONResponse(ClientError(400, f"{where}: {first['msg']}", param=where,
                                        code="invalid_value").body(), status_code=400)

    async def read_json(request: Request, schema):
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > options.max_body_bytes):
            raise ClientError(413, f"request body over the limit of {options.max_body_bytes:,} bytes",
                              code="body_too_large")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > options.max_body_bytes:
                    raise ClientError(413, f"request body over the limit of {options.max_body_bytes:,} bytes",
                                      code="body_too_large")
        except ClientDisconnect:  # nobody to answer; counted as 499 (nginx's "client closed request")
            raise client_gone() from None
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError) as e:
            raise ClientError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
        except RecursionError:  # json.loads on "[" * 100000
            raise ClientError(400, "the body is not valid JSON: nested too deeply",
                              code="invalid_json") from None
        try:
            return schema.model_validate(data)
        except ValidationError as e:
            raise _validation_error(e) from None

    def client_gone() -> ClientError:
        return ClientError(499, "the client closed the connection", code="client_closed_request")

    async def disconnected(request: Request) -> None:
        """Returns when the client of `request`, whose body has been read, closes the connection."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    def timed_out() -> ClientError:
        return ClientError(504, f"no answer within the server's timeout of {options.timeout_s:g} s",
                           type_="timeout", code="timeout")

    def find_run(model: str, task: str | None = None):
        run = runs.get(model)
        if run is None:
            raise ClientError(404, f"the model {model!r} does not exist; GET /v1/models lists them",
                              param="model", code="model_not_found")
        if task == "search" and run.task != "retrieval":
            raise ClientError(400, f"{model!r} is a {run.task} run; /v1/search takes a retrieval run",
                              param="model", code="wrong_model_type")
        if task == "chat" and run.task == "retrieval":
            raise ClientError(400, f"{model!r} is a retrieval run; use POST /v1/search", param="model",
                              code="wrong_model_type")
        return run

    async def checked_image(url: str, param: str, deadline: float) -> str:
        left = max(0.0, deadline - time.monotonic())
        remote = isinstance(url, str) and url.startswith(("http://", "https://"))
        fetch = functools.partial(image_bytes, url, allow_remote=options.allow_remote_images,
                                  max_bytes=options.max_body_bytes, timeout=left, param=param)
        try:
            data = await asyncio.wait_for(
                asyncio.get_running_loop().run_in_executor(fetch_pool if remote else None, fetch), left)
        except TimeoutError:
            raise timed_out() from None
        return await asyncio.to_thread(save_checked_image, data, scratch, max_pixels=options.max_image_pixels,
                                       param=param)

    async def conversation(req: ChatRequest, run, saved: list[str],
                           deadline: float) -> tuple[list[dict], str | None]:
        """OpenAI messages -> LLaVA turns (the image part as `<image>` where it stands) and the image file,
        which is also put in `saved` as soon as it is written (for the caller to remove if the request
        fails)."""
        turns = []
        image = None
        for i, message in enumerate(req.messages):
            texts = []
            for j, part in enumerate(message.content or ()):
                param = f"messages.{i}.content.{j}"
                if part.type == "text":
                    if part.text is None:
                        raise ClientError(400, f"{param}.text: a text part needs a 'text' string",
                                          param=f"{param}.text", code="invalid_value")
                    refuse_special_strings(part.text, run, req.model, f"{param}.text")
                    texts.append(part.text)
                    continue
                if part.image_url is None:
                    raise ClientError(400, f"{param}.image_url: an image_url part needs an 'image_url' "
                                      "object, {'url': ...}", param=f"{param}.image_url",
                                      code="invalid_value")
                if image is not None:
                    raise ClientError(400, f"{param}: one image per conversation, in a user message",
                                      param=param, code="too_many_images")
                if message.role != "user":
                    raise ClientError(400, f"{param}: an image goes in a user message, not in one of role "
                                      f"{message.role!r}", param=param, code="image_not_in_user_message")
                image = await checked_image(part.image_url.url, f"{param}.image_url", deadline)
                saved.append(image)
                texts.append(IMAGE_TOKEN)
            text = "\n".join(texts)
            turns.append({"from": ROLES[message.role], "value": text})
        return turns, image

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": len(runs), "queue_depth": batcher.depth}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_object(rid: str) -> dict:
        run = runs[rid]
        return {"id": rid, "object": "model", "created": int(os.path.getmtime(run.path)),
                "owned_by": "vlm-recipes", "task": run.task}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_object(rid) for rid in runs]}

    @app.get("/v1/models/{model:path}")  # a checkpoint's id has a slash: <run>/checkpoint-N
    async def model(model: str):
        find_run(model)
        return model_object(model)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    def over_context(positions: int, max_tokens: int, limit: int, model: str, least: str = "") -> ClientError:
        return ClientError(400, f"the prompt takes {least}{positions} positions and max_tokens asks for "
                           f"{max_tokens} more: over the context length of {model!r}, {limit}",
                           param="messages", code="context_length_exceeded")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req = await read_json(request, ChatRequest)
        deadline = time.monotonic() + options.timeout_s  # for all the request's work, before generation too
        run = find_run(req.model, "chat")
        if len(req.messages) > options.max_messages:
            raise ClientError(400, f"{len(req.messages)} messages: over this server's limit of "
                              f"{options.max_messages} per request", param="messages",
                              code="too_many_messages")
        for name, value in (req.model_extra or {}).items():
            if name in UNSUPPORTED and not UNSUPPORTED[name](value):
                raise ClientError(400, f"{name}: not supported by this server (see GET /docs and "
                                  "serve/README.md for the fields it takes)", param=name,
                                  code="unsupported_field")
        stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
        if len(stops) > 4 or not all(stops):
            raise ClientError(400, "stop: up to 4 strings, none empty", param="stop", code="invalid_value")
        max_tokens = req.max_completion_tokens or req.max_tokens or options.default_max_tokens
        if max_tokens > options.max_tokens_limit:
            name = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
            raise ClientError(400, f"{name} {max_tokens} is over this server's limit of "
                              f"{options.max_tokens_limit}", param=name, code="max_tokens_too_large")
        saved = []
        try:
            turns, image = await conversation(req, run, saved, deadline)
            if turns[-1]["from"] != "human":
                raise ClientError(400, "the last message must be the user's, to be answered",
                                  param="messages", code="invalid_conversation")
            first = next(i for i, turn in enumerate(turns) if turn["from"] != "system")
            if turns[first]["from"] != "human":  # an answer to no question: templates cannot place it
                raise ClientError(400, f"messages.{first}: the first message after the system messages must "
                                  "be the user's (drop a greeting sent before the user's first message)",
                                  param=f"messages.{first}", code="invalid_conversation")
            prompt = None
            if image is None and run.needs_image:
                what = "a captioner" if run.task == "caption" else "a model that takes no text-only input"
                raise ClientError(400, f"{req.model!r} is {what}: send an image_url part", param="messages",
                                  code="image_required")
            if run.task == "caption":
                # the caption's prompt: the text of the last user message, else the one the run trained with
                prompt = turns[-1]["value"].replace(IMAGE_TOKEN, "").strip() or run.trained_prompt
                item = {"key": 0, "image": image}
            else:
                turns[-1] = {**turns[-1], "value": with_answer_prompt(turns[-1]["value"], run.answer_prompt)}
                item = {"key": 0, "image": image, "conversations": turns}
            loop = asyncio.get_running_loop()
            limit = run.max_positions
            texts = [turn["value"] for turn in item.get("conversations", ())] or [prompt or ""]
            if limit is not None and (least := run.least_positions(texts)) + max_tokens > limit:
                raise over_context(least, max_tokens, limit, req.model, "at least ")
            try:
                positions = await asyncio.wait_for(
                    loop.run_in_executor(prompt_pool, run.prompt_positions, item, prompt),
                    max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise timed_out() from None
            except (ValueError, IndexError, TypeError) as e:  # what the template or tokenizer cannot take
                raise ClientError(400, f"messages: the model cannot render this conversation: {e}",
                                  param="messages", code="invalid_conversation") from None
            if limit is not None and positions + max_tokens > limit:
                raise over_context(positions, max_tokens, limit, req.model)
            job = Job(run, item, prompt, max_tokens, req.temperature, req.top_p, loop, loop.create_future(),
                      asyncio.Queue() if req.stream else None, seed=req.seed, stop=stops)
        except BaseException:
            for path in saved:
                os.unlink(path)
            raise
        batcher.submit(job)  # from here the batcher owns the image file
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

        async def result(watch: bool):
            """The job's completion; 504 at the deadline; with `watch`, 499 when the client leaves first (a
            stream's response watches the connection itself). The batcher drops a job it no longer needs."""
            left = asyncio.ensure_future(disconnected(request)) if watch else None
            try:
                await asyncio.wait([job.future] + ([left] if watch else []),
                                   timeout=max(0.0, deadline - time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                if left is not None:
                    left.cancel()
                if not job.future.done():
                    job.cancelled = True
            if job.future.done():
                return job.future.result()
            raise client_gone() if left is not None and left.done() and not left.cancelled() else timed_out()

        def usage(done) -> dict:
            return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
                    "total_tokens": done.prompt_tokens + done.completion_tokens}

        if not req.stream:
            done = await result(watch=True)
            return {"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                                 "finish_reason": done.finish_reason}],
                    "usage": usage(done)}
        with_usage = req.stream_options is not None and req.stream_options.include_usage

        def chunk(delta: dict | None, finish: str | None = None, done=None) -> str:
            body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [] if delta is None else [{"index": 0, "delta": delta,
                                                          "finish_reason": finish}]}
            if with_usage:  # as OpenAI: null in every chunk but the last, which has no choice
                body["usage"] = None if done is None else usage(done)
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                sent = ""
                while True:
                    try:
                        delta = await asyncio.wait_for(job.stream.get(),
                                                       max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        break
                    if delta is None:
                        break
                    sent += delta
                    yield chunk({"content": delta})
                try:
                    done = await result(watch=False)
                except ClientError as e:
                    request.state.stream_status = e.status  # for /metrics (see counted)
                    yield f"data: {json.dumps(e.body())}\n\n"
                    return
                except Exception:  # a server fault (in generation): logged, and told to the client
                    logger.exception("error generating the stream of %s", cid)
                    request.state.stream_status = 500  # for /metrics (see counted)
                    yield f"data: {json.dumps(SERVER_ERROR)}\n\n"
                    return
            finally:  # also when the client leaves: the response cancels this generator
                if not job.future.done():
                    job.cancelled = True
            if done.text.startswith(sent) and len(done.text) > len(sent):
                yield chunk({"content": done.text[len(sent):]})
            yield chunk({}, done.finish_reason)
            if with_usage:
                yield chunk(None, done=done)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/search")
    async def search(request: Request):
        req = await read_json(request, SearchRequest)
        deadline = time.monotonic() + options.timeout_s
        run = find_run(req.model, "search")
        if (req.query is None) == (req.image is None):
            raise ClientError(400, "give one of 'query' (a text: finds images) or 'image' (a data: URL: "
                              "finds captions)", param="query", code="invalid_value")
        if req.query is not None and not req.query.strip():  # as training refuses an empty caption
            raise ClientError(400, "query: a text to search for, not only spaces", param="query",
                              code="invalid_value")
        if req.query is not None:
            refuse_special_strings(req.query, run, req.model, "query", in_message=False)
        if req.k > options.max_search_k:
            raise ClientError(400, f"k {req.k} is over this server's limit of {options.max_search_k}",
                              param="k", code="invalid_value")
        k = req.k
        if req.query is not None:
            hits = await asyncio.to_thread(run.search_text, req.query, k)
            for hit in hits:
                query = urllib.parse.urlencode({"model": req.model, "index": hit["index"]})
                hit["url"] = f"/v1/gallery?{query}"
        else:
            path = await checked_image(req.image, "image", deadline)
            try:
                hits = await asyncio.to_thread(run.search_image, path, k)
            finally:
                os.unlink(path)
        return {"object": "list", "model": req.model, "data": hits}

    @app.get("/v1/gallery")
    async def gallery(model: str, index: int):
        run = find_run(model, "search")
        if not 0 <= index < len(run.images):
            raise ClientError(404, f"index {index} is not in the gallery of {model!r} ({len(run.images)} "
                              "images)", param="index", code="not_found")
        path = run.images[index]
        try:  # the header only: the index's images were checked whole when embed.py read them
            await asyncio.to_thread(check_image, path, min_side=1)
        except DataError as e:  # moved, deleted or overwritten since the index was built: for the operator
            logger.warning("gallery image %d of %r cannot be served: %s", index, model, e)
            what = "is missing" if e.reason == MISSING_IMAGE else "is no longer a readable image"
            raise ClientError(404, f"image {index} of the gallery of {model!r} {what} on the server; the "
                              "index is out of date", param="index", code="gallery_image_missing") from None
        return FileResponse(path)

    return app
