"""serve/: remote images from servers that misbehave (a malformed response, bytes trickling in) are 4xx or
504 at the request's deadline, never a 500 or a request held past --timeout; a stream goes on after a
character the tokenizer cannot decode; a limit met through max_completion_tokens names that field."""

import base64
import io
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from serve.app import ServeOptions, create_app
from serve.batching import _RowStreamer

LLAVA_TEMPLATE = ("{%- for m in messages -%}{{ m['role'].upper() + ': ' }}"
                  "{%- for p in m['content'] if p['type'] == 'text' -%}{{ p['text'] + ' ' }}{%- endfor -%}"
                  "{%- endfor -%}{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}")


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(buffer, format="PNG")
    return buffer.getvalue()


class RawServer:
    """A TCP server on 127.0.0.1 that answers every connection with `reply` (bytes), `chunk` bytes every
    `pause` seconds, then closes it."""

    def __init__(self, reply: bytes, chunk: int | None = None, pause: float = 0.0):
        self.reply, self.chunk, self.pause = reply, chunk or len(reply), pause
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/image.png"
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.answer, args=(conn,), daemon=True).start()

    def answer(self, conn):
        with conn:
            try:
                conn.recv(65536)
                for i in range(0, len(self.reply), self.chunk):
                    conn.sendall(self.reply[i:i + self.chunk])
                    time.sleep(self.pause)
            except OSError:  # the client gave up
                pass


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs")
    chat = SimpleNamespace(task="chat", path=path, needs_image=False, reserved=(), max_positions=None,
                           prompt_positions=lambda item, prompt: 0)
    options = ServeOptions(max_tokens_limit=8, default_max_tokens=4, allow_remote_images=True, timeout_s=1.0)
    with TestClient(create_app({"chat": chat}, options)) as c:
        yield c


def _ask(client, url):
    content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "what is it?"}]
    return client.post("/v1/chat/completions",
                       json={"model": "chat", "messages": [{"role": "user", "content": content}]})


@pytest.mark.parametrize("reply", [
    b"hello there\r\n\r\n",  # no status line: http.client.BadStatusLine
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n10\r\nabc",  # cut short: IncompleteRead
    b"HTTP/1.1 200 OK\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n",  # a header line over 64 KiB: LineTooLong
], ids=["bad status line", "incomplete chunked body", "header too long"])
def test_a_malformed_response_of_the_image_server_is_a_400_not_a_500(client, reply):
    response = _ask(client, RawServer(reply).url)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "image_fetch_failed"


def test_an_image_that_trickles_in_is_a_504_at_the_deadline_and_holds_up_no_other_request(client):
    png = _png()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {len(png)}\r\n\r\n".encode()
    slow = RawServer(head + png, chunk=16, pause=0.2)  # ~10 s for the image; each read well within 1 s
    answers = [None] * 6

    def ask(i):
        start = time.monotonic()
        response = _ask(client, slow.url)
        answers[i] = response.status_code, response.json()["error"]["code"], time.monotonic() - start

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(answers))]
    for t in threads:
        t.start()
    time.sleep(0.3)
    # Meanwhile a request with its image in the body is checked (then refused for its max_tokens) at once: a
    # request waiting for a thread the slow fetches hold would reach its deadline, a 504.
    data_url = "data:image/png;base64," + base64.b64encode(png).decode()
    response = client.post("/v1/chat/completions", json={"model": "chat", "max_tokens": 9, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}}]}]})
    assert response.json()["error"]["code"] == "max_tokens_too_large"
    for t in threads:
        t.join()
    for status, code, seconds in answers:
        assert (status, code) == (504, "timeout") and seconds < 3  # --timeout 1; the image takes ~10 s


def test_the_limit_met_through_max_completion_tokens_names_that_field(client):
    response = client.post("/v1/chat/completions", json={
        "model": "chat", "max_completion_tokens": 100, "messages": [{"role": "user", "content": "hi"}]})
    error = response.json()["error"]
    assert (response.status_code, error["param"], error["code"]) == (400, "max_completion_tokens",
                                                                     "max_tokens_too_large")
    assert error["message"].startswith("max_completion_tokens 100 ")


def test_a_stream_goes_on_after_a_byte_the_tokenizer_cannot_decode():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from recipes.common.models import answer_text

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator(["hello world how are you"] * 10, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe)
    lone = tokenizer.convert_tokens_to_ids("æ")  # the byte 0xE6 alone: the start of a 3-byte character
    words = tokenizer(" hello world how are you", add_special_tokens=False)["input_ids"]
    sent = []
    loop = SimpleNamespace(call_soon_threadsafe=lambda put, delta: sent.append(delta))
    run = SimpleNamespace(answer_text=lambda ids: answer_text(tokenizer, ids))
    job = SimpleNamespace(max_tokens=50, stop=(), stream=SimpleNamespace(put_nowait=None), loop=loop, run=run)
    streamer = _RowStreamer([job], set())
    streamer.put(torch.tensor([[1, 2]]))  # the prompt
    streamer.put(torch.tensor([lone]))
    assert sent == []  # "\ufffd" at the end: the character's other bytes may still come
    for token in words:
        streamer.put(torch.tensor([token]))
    assert sent == ["\ufffd hello", " world", " how", " are", " you"]  # a delta per word, as they come


def test_batches_are_left_padded_while_other_threads_count_prompts_on_the_same_tokenizer():
    # The tokenizer holds its padding side as state: counting a prompt sets it to the right.
    from recipes.common.chat import ChatEncoder
    from serve.runs import GenerativeRun
    from tests.conftest import word_llava_processor

    words = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER", ":", "ASSISTANT", "a", "red", "circle", "?"]
    processor = word_llava_processor({w: i for i, w in enumerate(words)}, LLAVA_TEMPLATE)
    run = GenerativeRun("chat", Path("."), "chat", None, processor.tokenizer, processor.image_processor,
                        encoder=ChatEncoder(processor))
    short = {"key": 0, "image": None, "conversations": [{"from": "human", "value": "a red circle ?"}]}
    long = {"key": 1, "image": None, "conversations": [{"from": "human", "value": "a red circle ? " * 300}]}
    stop = threading.Event()

    def count():
        while not stop.is_set():
            run.prompt_positions(long)

    counters = [threading.Thread(target=count) for _ in range(2)]
    for t in counters:
        t.start()
    try:
        for _ in range(300):
            mask = run.collate([short, long])["attention_mask"][0].tolist()
            assert mask[0] == 0 and mask[-1] == 1  # the short prompt padded on the left, as generate needs
    finally:
        stop.set()
        for t in counters:
            t.join()
