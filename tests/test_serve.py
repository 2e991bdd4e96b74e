"""serve/ on tiny trained runs over a real Uvicorn server on 127.0.0.1: answers equal the recipes' own
generation (LLaVA, Gemma 3, PaliGemma 2), seeded sampling equals transformers' own, streaming, dynamic
batching, adapters sharing a base, search, limits and errors, /metrics, `transformers serve` on merged runs
against this server, and the web page in a real headless Chromium.

The runs are trained once for the module (one step each: the tests check the serving path, not what
training buys) on bases whose random weights are scaled up, so that an answer depends on the image and the
prompt and a mix-up of either shows.
"""

import base64
import concurrent.futures
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from data_tools.jsonl import read_jsonl, write_jsonl
from data_tools.synth import make_synthetic

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--report_to", "none", "--eval_strategy", "no", "--save_strategy", "no",
        "--load_best_model_at_end", "false", "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "4", "--max_steps", "1", "--max_new_tokens", "8"]


def _data(d: Path, task: str, n: int, n_train: int) -> tuple[Path, Path]:
    rows = read_jsonl(make_synthetic(task, n, d / task, seed=3, progress=False))
    write_jsonl(d / task / "train.jsonl", rows[:n_train])
    write_jsonl(d / task / "eval.jsonl", rows[n_train:])
    return d / task / "train.jsonl", d / task / "eval.jsonl"


def _scaled_base(name: str, out: Path, embeddings: bool = True) -> Path:
    """tiny:<name> with N(0, 0.3^2) added to every weight matrix: a random model whose answers vary with the
    input. `embeddings=False` leaves the token embeddings as they are: Gemma scales them by sqrt(hidden size),
    and noise there makes one token (a newline) win after any prompt."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from recipes.common.models import resolve_model_path

    path = resolve_model_path(name)
    model = AutoModelForImageTextToText.from_pretrained(path)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if p.dim() >= 2 and (embeddings or "embed_tokens" not in key):
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(path).save_pretrained(out)
    return out


def _second_adapter(run: Path, out: Path) -> Path:
    """A copy of LoRA run `run` with N(0, 0.1^2) added to its LoRA B matrices: another adapter on the same
    base, without training one."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(run, out)
    weights = load_file(out / "adapter_model.safetensors")
    g = torch.Generator().manual_seed(1)
    save_file({k: v + torch.randn(v.shape, generator=g) * 0.1 if "lora_B" in k else v
               for k, v in weights.items()},
              out / "adapter_model.safetensors")
    return out


def _pure_lora(base: Path, out: Path, seed: int, use_dora: bool = False) -> Path:
    """An untrained LoRA adapter (random B) on the language model of `base`, nothing else: one that peft can
    mix with others in a batch (not a DoRA one)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = get_peft_model(AutoModelForImageTextToText.from_pretrained(base),
                           LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj|up_proj)",
                                      use_dora=use_dora))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """{name: run folder}: blip2_lora_caption, soft_prompt_caption and llava_instruct trained for one step,
    llava_second (another adapter on llava_instruct's base), lora_a and lora_b (untrained LoRA-only adapters
    on that base, which peft can mix in one batch), clip_index (an embed.py index of tiny:clip),
    gemma3_instruct (llava_instruct on Gemma 3: chat template, <end_of_turn>), paligemma_vqa (qlora_vqa on
    PaliGemma 2: prefix + suffix, no chat template, 4-bit base), llava_bf16 (llava_instruct with --bf16) and
    llava_bf16_base (and a bf16 base, the GPU default: LoRA and projector trained in float32); and the data
    files."""
    d = tmp_path_factory.mktemp("serve")
    env = dict(os.environ, VLM_RECIPES_CACHE=str(d / "cache"), TOKENIZERS_PARALLELISM="false")
    files = {"caption": _data(d / "data", "caption", 8, 4), "instruct": _data(d / "data", "instruct", 6, 3),
             "retrieval": _data(d / "data", "retrieval", 6, 0), "vqa": _data(d / "data", "vqa", 4, 2)}
    runs = {name: d / "runs" / name for name in ("blip2_lora_caption", "soft_prompt_caption",
                                                 "llava_instruct", "llava_second", "clip_index",
                                                 "gemma3_instruct", "paligemma_vqa", "llava_bf16",
                                                 "llava_bf16_base")}
    with pytest.MonkeyPatch.context() as mp:  # tiny models built into the module's own cache
        mp.setenv("VLM_RECIPES_CACHE", env["VLM_RECIPES_CACHE"])
        bases = {"caption": _scaled_base("tiny:blip2-opt", d / "blip2-base"),
                 "instruct": _scaled_base("tiny:llava", d / "llava-base"),
                 "gemma3": _scaled_base("tiny:gemma3", d / "gemma3-base", embeddings=False),
                 "paligemma": _scaled_base("tiny:paligemma", d / "paligemma-base", embeddings=False)}

        def train(name, recipe, task, *args):
            train_file, eval_file = files[task]
            if "--model_name_or_path" not in args and "--vision_model" not in args:
                args = ("--model_name_or_path", str(bases[task]), *args)
            return subprocess.Popen(
                [sys.executable, str(ROOT / "recipes" / recipe / "train.py"), "--train_file", str(train_file),
                 "--eval_file", str(eval_file), "--output_dir", str(runs[name]), *FAST, *args],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        # a caption prompt: the server uses it for a request with no text, as the recipe's evaluation does
        procs = [train("blip2_lora_caption", "blip2_lora_caption", "caption", "--prompt", "a photo of"),
                 train("llava_instruct", "llava_instruct", "instruct"),
                 train("llava_bf16", "llava_instruct", "instruct", "--bf16", "true"),  # bf16 autocast
                 train("llava_bf16_base", "llava_instruct", "instruct", "--bf16", "true", "--dtype",
                       "bfloat16"),
                 train("soft_prompt_caption", "soft_prompt_caption", "caption", "--vision_model",
                       "tiny:clip-vision", "--language_model", "tiny:gpt2"),
                 train("gemma3_instruct", "llava_instruct", "instruct", "--model_name_or_path",
                       str(bases["gemma3"])),
                 # no answer prompt: the question alone, as a client asks it
                 train("paligemma_vqa", "qlora_vqa", "vqa", "--model_name_or_path", str(bases["paligemma"]),
                       "--answer_prompt", "")]
        from recipes.clip_retrieval.embed import main as embed

        embed(["--model", "tiny:clip", "--file", str(files["retrieval"][1]),
               "--out", str(runs["clip_index"])])
    for p in procs:
        out = p.communicate(timeout=600)[0]
        assert p.returncode == 0, f"{' '.join(p.args)}\n{out[-3000:]}"
    _second_adapter(runs["llava_instruct"], runs["llava_second"])
    other_base = shutil.copytree(bases["instruct"], d / "llava-base-2")  # not shared with llava_instruct's
    runs["lora_a"] = _pure_lora(other_base, d / "runs" / "lora_a", 1)
    runs["lora_b"] = _pure_lora(other_base, d / "runs" / "lora_b", 2)
    return runs, files


class Server:
    """A real Uvicorn server on 127.0.0.1 in a thread, and a small JSON client for it."""

    def __init__(self, app):
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def request(self, path: str, body=None, *, raw: bytes | None = None, headers=None) -> tuple[int, str]:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def send_huge(self, path: str, body: bytes) -> tuple[int, str]:
        """POST `body`, reading the answer even when the server answers and closes before it is all sent."""
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            try:
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server refused the body part way: its answer is waiting
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def json(self, path: str, body=None, **kw) -> tuple[int, dict]:
        status, text = self.request(path, body, **kw)
        return status, json.loads(text)

    def chat(self, model: str, image: Path | None, text: str | None, max_tokens: int = 8, **extra) -> str:
        status, body = self.json("/v1/chat/completions", {"model": model, "messages": [message(image, text)],
                                                           "max_tokens": max_tokens, **extra})
        assert status == 200, body
        return body["choices"][0]["message"]["content"]


def data_url(path: Path, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def message(image: Path | None, text: str | None) -> dict:
    content = ([{"type": "image_url", "image_url": {"url": data_url(image)}}] if image is not None else [])
    return {"role": "user", "content": content + ([{"type": "text", "text": text}] if text else [])}


@pytest.fixture(scope="module")
def loaded(trained):
    from serve.runs import load_runs

    runs, _ = trained
    return load_runs(list(runs.values()))


@pytest.fixture(scope="module")
def server(loaded):
    from serve.app import ServeOptions, create_app

    s = Server(create_app(loaded, ServeOptions(max_batch_size=8, max_wait_ms=50, max_body_bytes=2_000_000,
                                               max_image_pixels=1_000_000, max_tokens_limit=64)))
    yield s
    s.stop()


def _predictions(run: Path) -> dict:
    return {r["key"]: r["prediction"] for r in read_jsonl(run / "predictions" / "final.jsonl")}


def _eval_rows(files, task):
    return read_jsonl(files[task][1])


# --- the answers are the recipes' ---------------------------------------------------------------------------
def test_models_health_and_tasks(server):
    status, body = server.json("/v1/models")
    assert status == 200 and body["object"] == "list"
    assert {m["id"]: m["task"] for m in body["data"]} == {
        "blip2_lora_caption": "caption", "soft_prompt_caption": "caption", "llava_instruct": "chat",
        "llava_second": "chat", "clip_index": "retrieval", "lora_a": "chat", "lora_b": "chat",
        "gemma3_instruct": "chat", "paligemma_vqa": "chat", "llava_bf16": "chat", "llava_bf16_base": "chat"}
    assert server.json("/health") == (200, {"status": "ok", "models": 11, "queue_depth": 0})


def test_captions_equal_the_recipes_eval_predictions(server, trained):
    runs, files = trained
    predictions = _predictions(runs["blip2_lora_caption"])
    images = [Path(files["caption"][1]).parent / r["image"] for r in _eval_rows(files, "caption")]
    assert len(set(predictions.values())) > 1  # the answers depend on the image: a mix-up would show
    for image in images:
        assert (server.chat("blip2_lora_caption", image, None, max_tokens=8)
                == predictions[str(image.resolve())])


def test_soft_prompt_captions_equal_the_recipes_eval_predictions(server, trained):
    runs, files = trained
    predictions = _predictions(runs["soft_prompt_caption"])
    for row in _eval_rows(files, "caption"):
        image = Path(files["caption"][1]).parent / row["image"]
        assert (server.chat("soft_prompt_caption", image, None, max_tokens=8)
                == predictions[str(image.resolve())])


def _openai_messages(item: dict) -> list[dict]:
    """An eval item's LLaVA turns as OpenAI messages, its image as a data URL where `<image>` stands."""
    from data_tools.records import IMAGE_TOKEN

    roles = {"human": "user", "gpt": "assistant", "system": "system"}
    messages = []
    for turn in item["conversations"]:
        if IMAGE_TOKEN in turn["value"]:
            text = turn["value"].replace(IMAGE_TOKEN, "").strip()
            messages.append({"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(item["image"])}},
                {"type": "text", "text": text}]})
        else:
            messages.append({"role": roles[turn["from"]], "content": turn["value"]})
    return messages


# bf16: generated under its autocast; bf16 base: what trained in float32 (LoRA, projector) loaded in float32
@pytest.mark.parametrize("name", ["llava_instruct", "llava_bf16", "llava_bf16_base"])
def test_chat_answers_equal_the_eval_predictions_and_chat_py(server, trained, name):
    from data_tools.images import load_image
    from recipes.common.chat import ChatEncoder
    from recipes.common.data import load_records
    from recipes.common.merge import evaluated_precision
    from recipes.llava_instruct.chat import answer, load
    from recipes.llava_instruct.collator import generation_items

    runs, files = trained
    predictions = _predictions(runs[name])
    records = load_records(files["instruct"][1], "instruct")
    items = list(generation_items("instruct", records, 8, "en"))
    assert len({predictions[it["key"]] for it in items}) > 1
    model, processor = load(str(runs[name]))
    autocast = evaluated_precision(runs[name])[1]
    assert autocast == (None if name == "llava_instruct" else torch.bfloat16)
    encoder = ChatEncoder(processor)
    for it in items:
        messages = _openai_messages(it)
        status, body = server.json("/v1/chat/completions", {"model": name, "messages": messages,
                                                            "max_tokens": 8})
        assert status == 200, body
        served = body["choices"][0]["message"]["content"]
        assert served == predictions[it["key"]]
        image = load_image(it["image"])
        assert served == answer(model, processor, encoder, it["conversations"], image, 8, autocast)


def _family_items(name: str, files) -> list[dict]:
    """The eval items of gemma3_instruct (llava_instruct's) or paligemma_vqa (qlora_vqa's, no answer
    prompt)."""
    from recipes.common.data import load_records
    from recipes.llava_instruct.collator import generation_items
    from recipes.qlora_vqa.collator import vqa_items

    if name == "gemma3_instruct":
        return list(generation_items("instruct", load_records(files["instruct"][1], "instruct"), 8, "en"))
    return list(vqa_items(load_records(files["vqa"][1], "vqa"), None))[:6]


@pytest.mark.parametrize("name", ["gemma3_instruct", "paligemma_vqa"])
def test_other_families_answer_as_their_recipes_eval(server, loaded, trained, name):
    """Gemma 3 (chat template, <end_of_turn>) and PaliGemma (prefix + suffix, a 4-bit base) through the same
    code: each answer is the recipe's eval prediction, and its usage and finish_reason those of the run's
    model asked alone (generate stopping at the run's stop tokens itself)."""
    from recipes.common.trainer import stop_token_ids

    runs, files = trained
    run = loaded[name]
    predictions = _predictions(runs[name])
    items = _family_items(name, files)
    assert len({predictions[it["key"]] for it in items}) > 1  # the answers depend on the input
    stops = stop_token_ids(run.model, run.tokenizer)
    for it in items:
        status, body = server.json("/v1/chat/completions", {"model": name, "messages": _openai_messages(it),
                                                            "max_tokens": 8})
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == predictions[it["key"]]
        batch = run.collate([it])
        batch.pop("keys")
        with run.lock, torch.no_grad():
            out = run.model.generate(**batch, **run.generate_kwargs(8, None, None))
        new = out[0, batch["input_ids"].shape[1]:]
        assert body["usage"] == {"prompt_tokens": batch["input_ids"].shape[1], "completion_tokens": len(new),
                                 "total_tokens": batch["input_ids"].shape[1] + len(new)}
        assert body["choices"][0]["finish_reason"] == ("stop" if new[-1].item() in stops else "length")


def test_an_end_of_turn_token_of_the_generation_config_ends_the_answer(server, loaded, trained):
    """Gemma's generation_config names <end_of_turn> next to the eos: the answer ends at whichever comes
    first (finish_reason "stop", usage counting it), streamed or not. The tiny model says no end-of-turn
    token within 8 tokens, so one of the tokens it does say is named one for this test."""
    run = loaded["gemma3_instruct"]
    item = _family_items("gemma3_instruct", trained[1])[0]
    body = {"model": "gemma3_instruct", "messages": _openai_messages(item), "max_tokens": 8}
    batch = run.collate([item])
    batch.pop("keys")
    with run.lock, torch.no_grad():
        out = run.model.generate(**batch, **run.generate_kwargs(8, None, None))
    tokens = out[0, batch["input_ids"].shape[1]:].tolist()
    assert len(tokens) == 8
    k = next(k for k in range(2, 8) if tokens[k] not in tokens[:k])  # its first appearance
    config = run.model.generation_config
    before = config.eos_token_id
    config.eos_token_id = [*before, tokens[k]]
    try:
        status, answer = server.json("/v1/chat/completions", body)
        _, events = server.request("/v1/chat/completions", {**body, "stream": True})
    finally:
        config.eos_token_id = before
    assert status == 200
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"]["completion_tokens"] == k + 1
    expected = run.tokenizer.decode(tokens[:k + 1], skip_special_tokens=True).strip()
    assert answer["choices"][0]["message"]["content"] == expected
    chunks = [json.loads(e[6:]) for e in events.split("\n\n") if e and e != "data: [DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_paligemma_without_an_image_is_a_400(server):
    status, body = server.json("/v1/chat/completions", {"model": "paligemma_vqa",
                                                        "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and body["error"]["code"] == "image_required", body


# --- sampling -----------------------------------------------------------------------------------------------
def test_sampling_follows_temperature_top_p_and_seed(server, trained):
    """temperature 0 is greedy; a sampled request with a seed is the run's own `generate(do_sample=True)`
    after torch.manual_seed(seed), whatever it is sent with; different seeds give different answers; a top_p
    that keeps one token is greedy again; max_tokens holds."""
    from transformers import AutoModelForImageTextToText

    from recipes.common.chat import ChatPromptCollator, chat_encoder
    from recipes.common.merge import load_run
    from recipes.common.trainer import stop_token_ids

    runs, files = trained
    image = Path(files["instruct"][1]).parent / _eval_rows(files, "instruct")[0]["image"]
    question = "What is in the image?"

    def ask(**options) -> dict:
        status, body = server.json("/v1/chat/completions", {
            "model": "llava_instruct", "max_tokens": 8, "messages": [message(image, question)], **options})
        assert status == 200, body
        return body

    def text(body: dict) -> str:
        return body["choices"][0]["message"]["content"]

    greedy = text(ask())
    assert {text(ask(temperature=0)) for _ in range(2)} | {text(ask(temperature=0, seed=3))} == {greedy}
    seeds = [0, 1, 2, 3]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # sent at once, among greedy requests
        mixed = list(pool.map(lambda s: text(ask(temperature=1.5, seed=s)) if s >= 0 else text(ask()),
                              [0, -1, 1, -1, 2, -1, 3, -1]))
    sampled = {s: text(ask(temperature=1.5, seed=s)) for s in seeds}
    assert mixed == [sampled[0], greedy, sampled[1], greedy, sampled[2], greedy, sampled[3], greedy]
    assert len(set(sampled.values())) > 1

    # the reference: the run loaded alone, the recipes' prompt, transformers' sampling after manual_seed
    model, processor = load_run(runs["llava_instruct"], AutoModelForImageTextToText)
    tok = processor.tokenizer
    turn = {"from": "human", "value": f"<image>\n{question}"}
    batch = ChatPromptCollator(chat_encoder(processor))([{"key": 0, "image": str(image),
                                                          "conversations": [turn]}])
    batch.pop("keys")

    def reference(seed: int, max_new_tokens: int, **options) -> str:
        torch.manual_seed(seed)
        stops = stop_token_ids(model, tok)
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.5,
                             **options, pad_token_id=tok.pad_token_id, eos_token_id=stops)
        return tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    assert sampled == {seed: reference(seed, 8) for seed in seeds}
    short = ask(temperature=1.5, seed=0, max_tokens=3)
    assert short["usage"]["completion_tokens"] <= 3 and text(short) == reference(0, 3)
    top = ask(temperature=1.5, top_p=0.3, seed=1)
    assert text(top) == reference(1, 8, top_p=0.3)
    assert text(ask(temperature=1.5, top_p=1e-6, seed=0)) == greedy  # one token kept: greedy
    status, events = server.request("/v1/chat/completions", {
        "model": "llava_instruct", "max_tokens": 8, "messages": [message(image, question)], "stream": True,
        "temperature": 1.5, "seed": 2})
    assert status == 200
    chunks = [json.loads(e[6:]) for e in events.split("\n\n") if e and e != "data: [DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == sampled[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_transformers_serve_answers_merged_runs_as_this_server(trained, tmp_path):
    """`transformers serve` (transformers' own OpenAI-style server), offline on the CPU, on llava_instruct
    runs of LLaVA and Gemma 3 merged by merge.py: the same greedy answers to image chat requests as this
    server on the same folders, and the same seeded samples. A merged PaliGemma run it refuses: its
    processor has no chat template."""
    from transformers.utils.import_utils import is_serve_available

    from serve.app import create_app
    from serve.runs import load_runs

    if not is_serve_available():
        pytest.skip("SKIPPED LOUDLY: `transformers serve` needs the transformers[serving] extra (openai is "
                    "missing: pip install -r requirements.txt); its comparison with this server is untested")
    runs, files = trained
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    port = _free_port()
    log = tmp_path / "transformers-serve.log"
    with open(log, "w") as out:  # no model named: it loads the folder a request names
        proc = subprocess.Popen([sys.executable, "-m", "transformers.cli.transformers", "serve", "--device",
                                 "cpu", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    # merged by the recipes' merge.py, in this process while transformers serve starts
    from recipes.llava_instruct.merge import main as merge_llava
    from recipes.qlora_vqa.merge import main as merge_qlora

    for merge, run, name in ((merge_llava, "llava_instruct", "llava_merged"),
                             (merge_llava, "gemma3_instruct", "gemma3_merged"),
                             (merge_qlora, "paligemma_vqa", "paligemma_merged")):
        assert merge(["--run", str(runs[run]), "--out", str(tmp_path / name)]) == tmp_path / name
    ours = Server(create_app(load_runs([tmp_path / "llava_merged", tmp_path / "gemma3_merged"])))
    try:
        theirs = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(theirs + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)

        def ask(url: str, model: str, image: Path, **options) -> dict:
            body = {"model": model, "max_tokens": 8, "messages": [message(image, "What is in the image?")],
                    **options}
            request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = json.loads(response.read())
            return {"text": answer["choices"][0]["message"]["content"],
                    "finish_reason": answer["choices"][0]["finish_reason"], "usage": answer["usage"]}

        folder = Path(files["instruct"][1]).parent
        images = [folder / r["image"] for r in _eval_rows(files, "instruct")]
        # transformers serve samples only when the generation config says do_sample (a merged run's does
        # not, whatever the temperature): the request's `generation_config` says it; this server ignores it
        sampled = {"temperature": 1.5, "seed": 7, "generation_config": json.dumps({"do_sample": True})}
        for name in ("llava_merged", "gemma3_merged"):
            for options in ({"temperature": 0}, sampled):
                served = [ask(ours.url, name, image, **options) for image in images]
                assert len({a["text"] for a in served}) > 1  # the answers depend on the image
                assert [ask(theirs, str(tmp_path / name), image, **options) for image in images] == served, \
                    (name, options)
        with pytest.raises(urllib.error.HTTPError) as refused:
            ask(theirs, str(tmp_path / "paligemma_merged"), images[0], temperature=0)
        assert refused.value.code == 400 and "does not have a chat template" in refused.value.read().decode()
    finally:
        ours.stop()
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the model process it started
        proc.wait(timeout=30)


def test_adapters_share_one_base_and_each_answers_as_its_own_run(server, loaded, trained):
    from transformers import AutoModelForImageTextToText

    from recipes.common.merge import load_run

    # llava_bf16 too: the same base in the same dtype; it generates under its own autocast
    assert loaded["llava_instruct"].model is loaded["llava_second"].model is loaded["llava_bf16"].model
    assert set(loaded["llava_second"].model.peft_config) == {"default", loaded["llava_second"].adapter,
                                                             loaded["llava_bf16"].adapter}
    runs, files = trained
    image = Path(files["instruct"][1]).parent / _eval_rows(files, "instruct")[0]["image"]
    question = "What is in the image?"

    def alone(name: str) -> str:  # the reference: the run loaded by itself, asked through the same collator
        model, processor = load_run(runs[name], AutoModelForImageTextToText)
        run = loaded[name]
        batch = run.collate([{"key": 0, "image": str(image),
                              "conversations": [{"from": "human", "value": f"<image>\n{question}"}]}])
        batch.pop("keys")
        out = model.generate(**batch, **run.generate_kwargs(8, None, None))
        return processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:],
                                          skip_special_tokens=True).strip()

    references = {name: alone(name) for name in ("llava_instruct", "llava_second")}
    assert references["llava_instruct"] != references["llava_second"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:  # the two adapters asked at once, interleaved
        names = ["llava_second", "llava_instruct"] * 4
        answers = list(pool.map(lambda name: server.chat(name, image, question), names))
    assert answers == [references[name] for name in names]


def test_lora_only_adapters_share_a_batch_and_each_answers_as_alone(server, loaded, trained):
    import asyncio

    from serve.batching import Job, generate_batch

    a, b = loaded["lora_a"], loaded["lora_b"]
    assert a.model is b.model and a.mixable and b.mixable
    assert not loaded["llava_instruct"].mixable  # its adapter carries a trained projector: one run per batch
    assert a.batch_group(True) == b.batch_group(True) != a.batch_group(False)
    _, files = trained
    folder = Path(files["instruct"][1]).parent
    images = [folder / r["image"] for r in _eval_rows(files, "instruct")]
    loop = asyncio.new_event_loop()
    try:
        def job(run, image):
            item = {"key": 0, "image": str(image),
                    "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}
            return Job(run, item, None, 8, None, None, loop, loop.create_future())

        plan = [(run, image) for image in images for run in (a, b)]
        # one generate call
        mixed = [c.text for c in generate_batch([job(run, image) for run, image in plan])]
        alone = [generate_batch([job(run, image)])[0].text for run, image in plan]
    finally:
        loop.close()
    assert mixed == alone
    assert alone[0::2] != alone[1::2]  # the adapters answer differently: a mix-up would show
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda p: server.chat(p[0].id, p[1], "What?"), plan))
    assert served == alone


def test_dora_adapters_on_one_base_take_batches_of_their_own(trained, tmp_path):
    """peft refuses mixed-adapter batches when an adapter is DoRA: such runs are never batched together."""
    import asyncio

    from serve.batching import Job, generate_batch
    from serve.runs import load_runs

    runs, files = trained
    base = Path(runs["lora_a"]).parent.parent / "llava-base-2"
    loaded = load_runs([_pure_lora(base, tmp_path / name, seed, use_dora=True)
                        for name, seed in (("dora_a", 1), ("dora_b", 2))])
    a, b = loaded["dora_a"], loaded["dora_b"]
    assert a.model is b.model and not a.mixable and not b.mixable
    assert a.batch_group(True) != b.batch_group(True)
    image = Path(files["instruct"][1]).parent / _eval_rows(files, "instruct")[0]["image"]
    loop = asyncio.new_event_loop()
    try:
        item = {"key": 0, "image": str(image),
                "conversations": [{"from": "human", "value": "<image>\nWhat?"}]}
        answers = [generate_batch([Job(run, item, None, 8, None, None, loop, loop.create_future())])[0].text
                   for run in (a, b)]
    finally:
        loop.close()
    assert answers[0] != answers[1]  # each with its own adapter


def test_stream_sends_the_same_answer_as_server_sent_events(server, trained):
    _, files = trained
    image = Path(files["caption"][1]).parent / _eval_rows(files, "caption")[0]["image"]
    for model, text in (("blip2_lora_caption", None), ("llava_instruct", "What is in the image?")):
        whole = server.chat(model, image, text, max_tokens=12)
        status, events = server.request("/v1/chat/completions",
                                        {"model": model, "messages": [message(image, text)],
                                         "max_tokens": 12, "stream": True})
        assert status == 200
        lines = [e for e in events.split("\n\n") if e]
        assert all(e.startswith("data: ") for e in lines) and lines[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in lines[:-1]]
        assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert len(chunks) > 3  # token by token, not one piece
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole


def test_concurrent_requests_are_batched_and_answer_as_alone(server, trained):
    _, files = trained
    folder = Path(files["caption"][1]).parent
    images = [folder / r["image"] for r in _eval_rows(files, "caption")] * 4
    alone = {str(i): server.chat("blip2_lora_caption", i, None) for i in images[:4]}

    def batches() -> tuple[float, float]:
        text = server.request("/metrics")[1]
        count = float(text.split("serve_batch_size_count ")[1].split()[0])
        total = float(text.split("serve_batch_size_sum ")[1].split()[0])
        return count, total

    before = batches()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: server.chat("blip2_lora_caption", i, None), images))
    after = batches()
    assert answers == [alone[str(i)] for i in images]
    generate_calls, requests = after[0] - before[0], after[1] - before[1]
    assert requests == 16 and generate_calls < 16  # some requests shared a generate call


def test_search_ranks_the_index_as_search_py_does(server, trained):
    import numpy as np

    from recipes.clip_retrieval.embed import encode_texts, load

    runs, files = trained
    index = json.loads((runs["clip_index"] / "index.json").read_text())
    clip, processor, collator = load(index["model"])
    status, body = server.json("/v1/search", {"model": "clip_index", "query": "a red circle", "k": 3})
    assert status == 200
    q = encode_texts(clip, processor, collator, ["a red circle"])[0]
    scores = np.load(runs["clip_index"] / "images.npy") @ q
    order = np.argsort(-scores, kind="stable")[:3]
    assert [h["index"] for h in body["data"]] == order.tolist()
    np.testing.assert_allclose([h["score"] for h in body["data"]], scores[order], rtol=1e-5)
    image = Path(files["retrieval"][1]).parent / index["images"][body["data"][0]["index"]]
    with urllib.request.urlopen(server.url + body["data"][0]["url"]) as r:
        assert r.read() == image.read_bytes()
    status, body = server.json("/v1/search", {"model": "clip_index", "image": data_url(image), "k": 2})
    assert status == 200 and len(body["data"]) == 2 and body["data"][0]["score"] >= body["data"][1]["score"]


# --- limits and errors --------------------------------------------------------------------------------------
def _bomb_png() -> bytes:
    """A valid PNG header claiming 4000 x 4000 pixels (over the test server's 1,000,000): the guard's case."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 4000, 4000, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100)) + \
        chunk(b"IEND", b"")


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, format="PNG")
    return buffer.getvalue()


BAD = [  # (what, body or raw bytes, status, error code)
    ("malformed JSON", b"{not json", 400, "invalid_json"),
    ("unknown model", {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
     404, "model_not_found"),
    ("no messages", {"model": "llava_instruct", "messages": []}, 400, "invalid_value"),
    ("bad role", {"model": "llava_instruct", "messages": [{"role": "robot", "content": "hi"}]},
     400, "invalid_value"),
    ("not an image", {"model": "blip2_lora_caption", "messages": [{"role": "user", "content": [
        {"type": "image_url",
         "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"%PDF-1.4 hi").decode()}}
    ]}]}, 400, "unreadable_image"),
    ("decompression bomb", {"model": "blip2_lora_caption", "messages": [{"role": "user", "content": [
        {"type": "image_url",
         "image_url": {"url": "data:image/png;base64," + base64.b64encode(_bomb_png()).decode()}}
    ]}]}, 413, "image_too_large"),
    ("not base64", {"model": "blip2_lora_caption", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]},
     400, "invalid_image_url"),
    ("remote URL", {"model": "blip2_lora_caption", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/a.png"}}]}]},
     400, "remote_images_disabled"),
    ("captioner without image",
     {"model": "blip2_lora_caption", "messages": [{"role": "user", "content": "hi"}]},
     400, "image_required"),
    ("max_tokens over the limit", {"model": "llava_instruct", "max_tokens": 65,
                                   "messages": [{"role": "user", "content": "hi"}]},
     400, "max_tokens_too_large"),
    ("two images", {"model": "llava_instruct", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"
         + base64.b64encode(_tiny_png()).decode()}}] * 2}]}, 400, "too_many_images"),
    ("the only image in an assistant message", {"model": "llava_instruct", "messages": [
        {"role": "user", "content": "Draw a shape."},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
                                           + base64.b64encode(_tiny_png()).decode()}}]},
        {"role": "user", "content": "What is it?"}]}, 400, "image_not_in_user_message"),
    ("max_tokens as a string", {"model": "llava_instruct", "max_tokens": "8",
                                "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_value"),
    ("max_tokens as a float", {"model": "llava_instruct", "max_tokens": 8.0,
                               "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_value"),
    ("max_tokens as a bool", {"model": "llava_instruct", "max_tokens": True,
                              "messages": [{"role": "user", "content": "hi"}]}, 400, "invalid_value"),
    ("assistant last", {"model": "llava_instruct", "messages": [{"role": "assistant", "content": "hi"}]},
     400, "invalid_conversation"),
    ("a greeting before the user's first message", {"model": "llava_instruct", "messages": [
        {"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hello! Ask me."},
        {"role": "user", "content": "What is in the image?"}]}, 400, "invalid_conversation"),
    ("prompt over the context length", {"model": "llava_instruct", "max_tokens": 8, "messages": [
        {"role": "user", "content": "shape " * 600}]}, 400, "context_length_exceeded"),
    ("caption prompt over the context length", {"model": "blip2_lora_caption", "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,"
         + base64.b64encode(_tiny_png()).decode()}}, {"type": "text", "text": "shape " * 600}]}]},
     400, "context_length_exceeded"),
    ("search on a chat run", {"model": "llava_instruct", "query": "x"}, 400, "wrong_model_type"),
    ("deeply nested JSON", b"[" * 100_000, 400, "invalid_json"),  # json.loads: RecursionError
    ("huge body", b"{" + b" " * 3_000_000 + b"}", 413, "body_too_large"),
]


@pytest.mark.parametrize("what,body,status,code", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_in_openais_error_shape(server, what, body, status, code):
    path = "/v1/search" if what.startswith("search") else "/v1/chat/completions"
    if what == "huge body":
        got, text = server.send_huge(path, body)
    else:
        got, text = server.request(path, raw=body) if isinstance(body, bytes) else server.request(path, body)
    error = json.loads(text)["error"]
    assert got == status, text
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    assert "serve-images" not in error["message"]  # the server's own paths are not shown


def test_the_server_keeps_serving_and_metrics_are_prometheus_text(server, trained):
    from prometheus_client.parser import text_string_to_metric_families

    _, files = trained
    image = Path(files["caption"][1]).parent / _eval_rows(files, "caption")[0]["image"]
    assert server.chat("blip2_lora_caption", image, None)
    status, text = server.request("/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert ({"serve_requests", "serve_request_seconds", "serve_batch_size", "serve_queue_depth"}
            <= set(families))
    by_status = {}
    for sample in families["serve_requests"].samples:
        if sample.name == "serve_requests_total":
            key = (sample.labels["route"], sample.labels["status"])
            by_status[key] = by_status.get(key, 0) + sample.value
    assert by_status.get(("/v1/chat/completions", "200"), 0) > 0
    assert by_status.get(("/v1/chat/completions", "400"), 0) > 0
    assert not [k for k in by_status if k[1].startswith("5")]
    # no image left (in this server's folder: other servers of the test run may be answering now)
    assert not list(server.server.config.app.state.scratch.glob("*.img"))


def test_unknown_run_folder_is_one_line_and_exit_2(tmp_path, capsys):
    from serve.__main__ import main

    assert main([str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no such folder" in err


# --- the web page in a real browser -------------------------------------------------------------------------
ANSWER = "return document.getElementById('answer').textContent"  # as shown, whitespace and all


def _browser(tmp_path):
    try:
        from selenium import webdriver
        from selenium.common.exceptions import WebDriverException
    except ImportError:
        pytest.skip("SKIPPED LOUDLY: selenium is not installed (pip install selenium); "
                    "the web page is untested")
    driver_path = shutil.which("chromedriver")
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if driver_path is None or binary is None:
        pytest.skip("SKIPPED LOUDLY: no chromium + chromedriver on this machine (apt-get install chromium "
                    "chromium-driver; .ci/run does it); the web page is untested")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1200,900"):
        options.add_argument(flag)
    try:
        return webdriver.Chrome(service=Service(driver_path), options=options)
    except WebDriverException as e:
        pytest.fail(f"chromium is installed but did not start: {e.msg}")


def _open_page(browser, url: str, model: str):
    """The page at `url`, ready, with `model` chosen; returns a 60 s WebDriverWait on it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    browser.get(url + "/")
    wait = WebDriverWait(browser, 60)
    wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "ready"))
    Select(browser.find_element(By.ID, "model")).select_by_value(model)
    return wait


def test_web_page_in_headless_chromium_shows_the_apis_answers_and_refuses_a_non_image(server, trained,
                                                                                      tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select

    _, files = trained
    image = Path(files["caption"][1]).parent / _eval_rows(files, "caption")[1]["image"]
    browser = _browser(tmp_path)
    try:
        wait = _open_page(browser, server.url, "blip2_lora_caption")
        max_tokens = int(browser.find_element(By.ID, "max_tokens").get_attribute("value"))
        browser.find_element(By.ID, "file").send_keys(str(image))  # a captioner captions on upload
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "done"))
        shown = shown_caption = browser.execute_script(ANSWER)
        assert shown and shown == server.chat("blip2_lora_caption", image, None, max_tokens=max_tokens)
        browser.save_screenshot(str(tmp_path / "page-caption.png"))

        not_image = tmp_path / "notes.png"  # named like an image: the server reads the bytes
        not_image.write_text("these are notes, not pixels")
        browser.find_element(By.ID, "file").send_keys(str(not_image))
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "refused"))
        assert browser.find_element(By.ID, "error").text.startswith("not an image the server takes")
        assert browser.execute_script(ANSWER) == ""
        # Two files dropped at once, a large non-image then the image: the large one is read last, and the
        # page must still caption the file chosen last.
        browser.execute_script(
            "useFile(new File([new Uint8Array(5e6)], 'big.bin'));"
            "useFile(new File([Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0))], 'small.png',"
            " {type: 'image/png'}));", base64.b64encode(image.read_bytes()).decode())
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "done"))
        assert browser.execute_script(ANSWER) == shown_caption

        Select(browser.find_element(By.ID, "model")).select_by_value("llava_instruct")
        browser.find_element(By.ID, "file").send_keys(str(image))
        browser.find_element(By.ID, "prompt").send_keys("What is in the image?")
        browser.find_element(By.ID, "ask").click()  # the answer streams in
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "done"))
        shown = browser.execute_script(ANSWER)
        assert shown and shown == server.chat("llava_instruct", image, "What is in the image?",
                                              max_tokens=max_tokens)
        browser.save_screenshot(str(tmp_path / "page-chat.png"))
        # Two clicks: the second request cancels the first, whose answer would otherwise run into its own.
        ask = browser.find_element(By.ID, "ask")
        ask.click()
        ask.click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "done"))
        assert browser.execute_script(ANSWER) == shown

        Select(browser.find_element(By.ID, "model")).select_by_value("clip_index")
        browser.find_element(By.ID, "query").send_keys("a red circle")
        browser.find_element(By.ID, "search-button").click()
        browser.find_element(By.ID, "search-button").click()  # the second search replaces the first
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "done"))
        thumbs = browser.find_elements(By.CSS_SELECTOR, "#results img")
        assert len(thumbs) == 6
        wait.until(lambda b: b.execute_script("return [...document.querySelectorAll('#results img')]"
                                              ".every(i => i.complete && i.naturalWidth > 0)"))  # decoded
        browser.save_screenshot(str(tmp_path / "page-search.png"))
    finally:
        browser.quit()
    assert (tmp_path / "page-caption.png").stat().st_size > 1000
    print(f"screenshots: {tmp_path}")


def test_timeout_is_a_504_and_shutdown_finishes_the_requests_in_flight(loaded, trained):
    from serve.app import ServeOptions, create_app

    _, files = trained
    image = Path(files["caption"][1]).parent / _eval_rows(files, "caption")[0]["image"]
    quick = Server(create_app(loaded, ServeOptions(timeout_s=0.001)))
    try:
        status, body = quick.json("/v1/chat/completions", {"model": "blip2_lora_caption", "max_tokens": 8,
                                                           "messages": [message(image, None)]})
        assert status == 504 and body["error"]["code"] == "timeout"
    finally:
        quick.stop()

    server = Server(create_app(loaded, ServeOptions(max_wait_ms=300)))  # requests wait in the batcher a while
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        asks = [pool.submit(server.chat, "blip2_lora_caption", image, None, max_tokens=8) for _ in range(4)]
        time.sleep(0.2)
        server.server.should_exit = True  # what SIGTERM sets
        answers = [a.result() for a in asks]
    server.thread.join(timeout=30)
    assert not server.thread.is_alive()
    assert answers == [_predictions(trained[0]["blip2_lora_caption"])[str(image.resolve())]] * 4


def _text_chat(model: str, n_messages: int, **extra) -> dict:
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": "What shape?"}
             for i in range(n_messages)]
    return {"model": model, "max_tokens": 4, "messages": turns, **extra}


def test_messages_over_the_limit_are_a_400_and_the_timeout_covers_counting_the_prompt(loaded):
    from serve.app import ServeOptions, create_app

    server = Server(create_app(loaded, ServeOptions(max_messages=601, timeout_s=0.3)))
    try:
        status, body = server.json("/v1/chat/completions", _text_chat("llava_instruct", 603))
        assert status == 400 and body["error"]["code"] == "too_many_messages"
        start = time.monotonic()  # 601 messages: seconds of template rendering to count the prompt
        status, body = server.json("/v1/chat/completions", _text_chat("llava_instruct", 601))
        assert status == 504 and body["error"]["code"] == "timeout"
        assert time.monotonic() - start < 2.0
        assert server.json("/health")[0] == 200
    finally:
        server.stop()


def test_a_conversation_far_over_the_context_is_refused_before_it_is_rendered(loaded, monkeypatch):
    """Rendering a long conversation's template takes seconds (once per assistant message): a text that
    cannot fit is refused without it, so that a few such requests cannot hold the prompt threads."""
    from serve.app import ServeOptions, create_app
    from serve.runs import GenerativeRun

    run = loaded["llava_instruct"]
    tokenizer, limit = run.tokenizer, run.max_positions
    # The bound never passes the true count: independent texts, tokenized here.
    rng = random.Random(0)
    words = [w for w in tokenizer.get_vocab() if w.isalpha()]
    for n in (1, 10, 200):
        text = " ".join(rng.choice(words) for _ in range(n))
        assert run.least_positions([text]) <= len(tokenizer(text, add_special_tokens=False)["input_ids"])
    rendered = []
    monkeypatch.setattr(GenerativeRun, "prompt_positions", lambda *a: rendered.append(a) or 1)
    server = Server(create_app(loaded, ServeOptions(timeout_s=600)))
    try:
        body = _text_chat("llava_instruct", 5)
        body["messages"][0]["content"] = "word " * (limit * run.longest_token)
        status, answer = server.json("/v1/chat/completions", body)
        assert status == 400 and answer["error"]["code"] == "context_length_exceeded"
        assert "takes at least " in answer["error"]["message"] and rendered == []
        status, answer = server.json("/v1/chat/completions", _text_chat("llava_instruct", 5))
        assert len(rendered) == 1  # a short one is counted
    finally:
        server.stop()


def test_lone_surrogates_in_text_and_a_k_over_the_limit_are_invalid_values(server):
    status, body = server.json("/v1/chat/completions", _text_chat("llava_instruct", 1, messages=[
        {"role": "user", "content": [{"type": "text", "text": "a \ud800 b"}]}]))
    assert (status, body["error"]["code"], body["error"]["param"]) == (
        400, "invalid_value", "messages.0.content.0.text"), body
    assert "surrogate" in body["error"]["message"]
    status, body = server.json("/v1/search", {"model": "clip_index", "query": "x\udfff"})
    assert (status, body["error"]["param"]) == (400, "query")
    status, body = server.json("/v1/search", {"model": "clip_index", "query": "a red circle", "k": 101})
    assert (status, body["error"]["code"], body["error"]["param"]) == (400, "invalid_value", "k")
    assert server.json("/v1/search", {"model": "clip_index", "query": "a red circle", "k": 100})[0] == 200


def _stream_events(server: Server, body: dict) -> list:
    status, text = server.request("/v1/chat/completions", {**body, "stream": True})
    assert status == 200
    return [json.loads(e[6:]) if e != "data: [DONE]" else "[DONE]" for e in text.split("\n\n") if e]


def test_a_stream_ends_at_the_same_deadline_as_a_plain_request(loaded):
    from serve.app import ServeOptions, create_app

    # the batcher waits 5 s for a batch to fill: past the 1.5 s timeout
    server = Server(create_app(loaded, ServeOptions(timeout_s=1.5, max_wait_ms=5000)))
    try:
        for stream in (False, True):
            start = time.monotonic()
            if stream:
                events = _stream_events(server, _text_chat("llava_instruct", 1))
                assert events[-1]["error"]["code"] == "timeout"
            else:
                status, body = server.json("/v1/chat/completions", _text_chat("llava_instruct", 1))
                assert status == 504 and body["error"]["code"] == "timeout"
            assert 1.4 < time.monotonic() - start < 2.4
        assert _request_counts(server) == {"504": 2.0}  # the stream too, though its headers said 200
    finally:
        server.stop()


def _request_counts(server: Server, route: str = "/v1/chat/completions") -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.labels["status"]: s.value
            for f in text_string_to_metric_families(server.request("/metrics")[1]) for s in f.samples
            if s.name == "serve_requests_total" and s.labels["route"] == route}


def _leave_early(port: int, body: bytes, declared: int, wait: float) -> None:
    """Send the headers and `body` of a POST declaring `declared` bytes, wait, and close the connection."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {declared}\r\n\r\n".encode() + body)
        time.sleep(wait)


def _requests_by_status(server: Server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    counts = {}
    for family in text_string_to_metric_families(server.request("/metrics")[1]):
        for sample in family.samples:
            if sample.name == "serve_requests_total":
                counts[sample.labels["status"]] = counts.get(sample.labels["status"], 0) + sample.value
            if sample.name == "serve_batch_size_count":
                counts["batches"] = sample.value
    return counts


def test_a_client_that_leaves_is_no_server_error_and_its_request_is_not_generated(loaded):
    from serve.app import ServeOptions, create_app

    # a batch waits 2 s to fill: time for the clients to leave before it would be generated
    server = Server(create_app(loaded, ServeOptions(max_wait_ms=2000)))
    try:
        _leave_early(server.port, b'{"model": "llava', 1000, 0.2)  # part of the body, then gone
        for stream in (False, True):
            body = json.dumps(_text_chat("llava_instruct", 1, stream=stream)).encode()
            _leave_early(server.port, body, len(body), 0.5)
        deadline = time.monotonic() + 10
        while _requests_by_status(server).get("499", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(2.5)  # past the batch's wait
        counts = _requests_by_status(server)
        assert counts.get("499") == 2 and not [k for k in counts if k.startswith("5")], counts
        assert counts.get("batches", 0) == 0  # neither request was generated
    finally:
        server.stop()


@pytest.mark.parametrize("option,value,says", [
    ("--default-max-tokens", "1000", ("--default-max-tokens 1000 is over --max-tokens-limit 512: every "
                                      "request without max_tokens would be refused")),
    ("--max-batch-size", "0", "--max-batch-size must be at least 1, not 0"),
    ("--max-wait-ms", "-5", "--max-wait-ms must be 0 or more, not -5"),
    ("--timeout", "0", "--timeout must be a number of more than 0, not 0"),
    ("--timeout", "nan", "--timeout must be a number of more than 0, not nan"),
    ("--max-messages", "0", "--max-messages must be at least 1, not 0"),
    ("--max-image-pixels", "50000001", ("--max-image-pixels must be at most 50,000,000 (the limit the "
                                        "recipes' collators open images with), not 50,000,001")),
])
def test_an_option_out_of_range_is_one_line_and_exit_2_before_loading(tmp_path, capsys, option, value, says):
    from serve.__main__ import main

    assert main([str(tmp_path / "missing"), option, value]) == 2  # the runs are not loaded: no folder error
    err = capsys.readouterr().err.strip()
    assert err == f"python -m serve: {says}"


def test_stop_strings_end_the_answer_before_them_streamed_or_not(server, trained):
    _, files = trained
    image = Path(files["caption"][1]).parent / _eval_rows(files, "caption")[0]["image"]
    for model, text in (("llava_instruct", "What is in the image?"), ("blip2_lora_caption", None),
                        ("soft_prompt_caption", None)):  # its language model generates from embeddings alone
        ask = {"model": model, "messages": [message(image, text)], "max_tokens": 16}
        status, whole = server.json("/v1/chat/completions", ask)
        assert status == 200
        answer = whole["choices"][0]["message"]["content"]
        # a stop string first found as far into the answer as can be, of characters decoded whole
        at = max(i for i in range(1, len(answer) - 1) if answer.find(answer[i:i + 2]) == i
                 and not {answer[i], answer[i + 1]} & {"\ufffd", " ", "\n"})
        stop = answer[at:at + 2]
        expected = answer[:answer.find(stop)].strip()
        status, body = server.json("/v1/chat/completions", {**ask, "stop": [stop, "never in it"]})
        assert status == 200
        assert body["choices"][0]["message"]["content"] == expected
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] < whole["usage"]["completion_tokens"]
        events = _stream_events(server, {**ask, "stop": stop})
        deltas = [e["choices"][0]["delta"].get("content", "") for e in events[:-1]]
        assert "".join(deltas) == expected and events[-2]["choices"][0]["finish_reason"] == "stop"


def test_a_stream_with_include_usage_ends_with_the_usage(server):
    ask = _text_chat("llava_instruct", 1)
    status, whole = server.json("/v1/chat/completions", ask)
    assert status == 200
    events = _stream_events(server, {**ask, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"] == whole["usage"]
    assert all(e["usage"] is None for e in events[:-2])
    assert "usage" not in _stream_events(server, ask)[-2]  # only when asked, as OpenAI


@pytest.mark.parametrize("field,value", [
    ("logprobs", True), ("top_logprobs", 2), ("response_format", {"type": "json_object"}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"), ("presence_penalty", 0.5), ("logit_bias", {"5": 10}),
])
def test_an_option_that_would_change_the_answer_and_is_not_supported_is_a_400(server, field, value):
    status, body = server.json("/v1/chat/completions", _text_chat("llava_instruct", 1, **{field: value}))
    assert status == 400 and body["error"]["code"] == "unsupported_field" and body["error"]["param"] == field


def test_default_values_of_unsupported_options_are_accepted(server):
    ask = _text_chat("llava_instruct", 1)
    defaults = {"logprobs": False, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
                "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}}
    status, body = server.json("/v1/chat/completions", {**ask, **defaults})
    assert status == 200
    assert body["choices"] == server.json("/v1/chat/completions", ask)[1]["choices"]


def test_a_developer_message_is_a_system_message(server):
    def ask(role: str) -> tuple[int, dict]:
        return server.json("/v1/chat/completions", {"model": "llava_instruct", "max_tokens": 8, "messages": [
            {"role": role, "content": "Answer in one word."}, {"role": "user", "content": "What shape?"}]})

    status, body = ask("developer")
    assert status == 200 and body["choices"] == ask("system")[1]["choices"]


def test_a_model_is_retrieved_by_its_id(server):
    listed = {m["id"]: m for m in server.json("/v1/models")[1]["data"]}
    for rid in ("llava_instruct", "clip_index"):
        assert server.json(f"/v1/models/{rid}") == (200, listed[rid])
    status, body = server.json("/v1/models/nope")
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_gallery_urls_of_a_run_whose_name_needs_escaping_fetch_its_images(trained, tmp_path):
    from serve.app import create_app
    from serve.runs import load_runs

    runs, files = trained
    odd = shutil.copytree(runs["clip_index"], tmp_path / "clip idx+&#1")
    server = Server(create_app(load_runs([odd])))
    try:
        status, body = server.json("/v1/search", {"model": odd.name, "query": "a red circle", "k": 2})
        assert status == 200 and len(body["data"]) == 2
        index = json.loads((odd / "index.json").read_text())
        for hit in body["data"]:
            image = Path(files["retrieval"][1]).parent / index["images"][hit["index"]]
            with urllib.request.urlopen(server.url + hit["url"]) as r:
                assert r.read() == image.read_bytes()
    finally:
        server.stop()


def test_web_page_asks_a_chat_run_without_an_image_and_shows_bad_max_tokens_and_a_lost_server(loaded,
                                                                                              tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    from serve.app import create_app

    browser = _browser(tmp_path)
    server = Server(create_app(loaded))
    try:
        wait = _open_page(browser, server.url, "llava_instruct")
        browser.find_element(By.ID, "prompt").send_keys("What shape?")

        def ask(max_tokens: str, status: str) -> str:
            field = browser.find_element(By.ID, "max_tokens")
            field.clear()
            field.send_keys(max_tokens)
            browser.execute_script("document.getElementById('status').textContent = ''")
            browser.find_element(By.ID, "ask").click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), status))
            return browser.find_element(By.ID, "error").text

        assert ask("6", "done") == ""  # text alone: a chat model answers it
        shown = browser.execute_script(ANSWER)
        assert shown and shown == server.chat("llava_instruct", None, "What shape?", max_tokens=6)
        assert ask("abc", "refused") == "Max tokens must be a whole number (or empty: the server's default)."
        assert ask("0", "refused") == "max_tokens: Input should be greater than or equal to 1"  # the server's
        server.stop()
        assert ask("6", "failed").startswith("cannot reach the server: ")
    finally:
        browser.quit()
        server.stop()


def test_rows_of_abandoned_jobs_and_of_reached_stop_strings_end(loaded):
    from serve.batching import Job, _RowStops

    tok = loaded["llava_instruct"].tokenizer

    def job(**kw) -> Job:
        return Job(loaded["llava_instruct"], {}, None, 8, None, None, None, None, **kw)

    gone, stopping, going = job(), job(stop=("red",)), job(stop=("blue",))
    gone.cancelled = True
    stops = _RowStops([gone, stopping, going], {tok.eos_token_id})
    rows = [tok("a red circle", add_special_tokens=False)["input_ids"]] * 3
    n = len(rows[0])
    prompt = [[tok.eos_token_id] * 5] * 3  # the sequences hold the prompt before the new tokens
    for step in range(1, n + 1):
        ended = stops(torch.tensor([p + r[:step] for p, r in zip(prompt, rows)]), None).tolist()
        assert ended[0] and not ended[2]
        assert ended[1] == ("red" in tok.decode(rows[1][:step]))
    assert ended == [True, True, False]


def test_a_row_ends_at_its_own_max_tokens_and_the_answers_stay_as_alone(loaded, trained):
    """A row that reached its max_tokens ends (the batch is not held up by it), and each answer is still the
    one its request gets alone."""
    import asyncio

    from serve.batching import Job, _RowStops, generate_batch

    run = loaded["llava_instruct"]
    tok = run.tokenizer
    short, long = (Job(run, {}, None, n, None, None, None, None) for n in (2, 8))
    stops = _RowStops([short, long], {tok.eos_token_id})
    row = tok("a red circle on a blue square", add_special_tokens=False)["input_ids"][:4]
    prompt = [tok.eos_token_id] * 5
    assert [stops(torch.tensor([prompt + row[:step]] * 2), None).tolist() for step in range(1, 5)] == [
        [False, False], [True, False], [True, False], [True, False]]

    _, files = trained
    image = Path(files["instruct"][1]).parent / _eval_rows(files, "instruct")[0]["image"]
    item = {"key": 0, "image": str(image),
            "conversations": [{"from": "human", "value": "<image>\nWhat is in the image?"}]}
    loop = asyncio.new_event_loop()
    try:
        def job(max_tokens: int) -> Job:
            return Job(run, dict(item), None, max_tokens, None, None, loop, loop.create_future())

        together = generate_batch([job(1), job(8)])
        alone = [generate_batch([job(1)])[0], generate_batch([job(8)])[0]]
    finally:
        loop.close()
    assert together == alone and [c.completion_tokens for c in together] == [1, 8]


def test_a_tiny_temperature_decodes_greedily(server, trained):
    """A temperature so small that logits / temperature overflow (1e-45) is greedy, not a 500."""
    _, files = trained
    image = Path(files["instruct"][1]).parent / _eval_rows(files, "instruct")[0]["image"]
    greedy = server.chat("llava_instruct", image, "What is in the image?")
    for options in ({"temperature": 1e-45}, {"temperature": 1e-45, "seed": 1}, {"temperature": 1e-6}):
        assert server.chat("llava_instruct", image, "What is in the image?", **options) == greedy, options


def test_a_server_error_during_a_stream_ends_it_with_an_error_event_counted_as_a_500(loaded, monkeypatch,
                                                                                     caplog):
    from serve import batching
    from serve.app import create_app

    def broken(jobs):
        raise RuntimeError("generation broke")

    monkeypatch.setattr(batching, "generate_batch", broken)
    server = Server(create_app(loaded))
    try:
        events = _stream_events(server, _text_chat("llava_instruct", 1))
        counts = _request_counts(server)
    finally:
        server.stop()
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[-1] == {"error": {"message": "internal server error", "type": "server_error", "param": None,
                                    "code": None}}
    assert counts == {"500": 1.0}
    assert [r.exc_info[1].args for r in caplog.records if r.name == "serve" and r.exc_info] == [
        ("generation broke",)]


def test_runs_named_default_or_with_a_dot_keep_their_own_adapters(loaded, trained, tmp_path):
    """The run id is not the peft adapter's name: a second run whose folder is named `default` (the first
    adapter's name) or holds a dot (which peft refuses in a name) loads and answers with its own adapter."""
    import asyncio

    from serve.batching import Job, generate_batch
    from serve.runs import load_runs

    runs, files = trained
    named = [shutil.copytree(runs["llava_second"], tmp_path / name) for name in ("default", "v1.2")]
    mine = load_runs([runs["llava_instruct"], *named])
    assert mine["llava_instruct"].model is mine["default"].model is mine["v1.2"].model
    assert len({run.adapter for run in mine.values()}) == 3
    image = Path(files["instruct"][1]).parent / _eval_rows(files, "instruct")[0]["image"]
    item = {"key": 0, "image": str(image),
            "conversations": [{"from": "human", "value": "<image>\nWhat is in the image?"}]}
    loop = asyncio.new_event_loop()
    try:
        def answer(run) -> str:
            job = Job(run, dict(item), None, 8, None, None, loop, loop.create_future())
            return generate_batch([job])[0].text

        got = {rid: answer(run) for rid, run in mine.items()}
        first, second = answer(loaded["llava_instruct"]), answer(loaded["llava_second"])
    finally:
        loop.close()
    assert first != second
    assert got == {"llava_instruct": first, "default": second, "v1.2": second}


def test_a_clip_lora_run_folder_is_refused_with_the_embed_command(loaded, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    from serve.runs import RunLoadError, load_runs

    base = loaded["clip_index"].model.name_or_path
    get_peft_model(AutoModel.from_pretrained(base), LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
                   ).save_pretrained(tmp_path / "clip_lora")
    with pytest.raises(RunLoadError) as refused:
        load_runs([tmp_path / "clip_lora"])
    assert str(refused.value) == (
        f"{tmp_path / 'clip_lora'}: a retrieval run; serve an index of it instead: python "
        f"recipes/clip_retrieval/embed.py --model {tmp_path / 'clip_lora'} --file IMAGES.jsonl --out INDEX, "
        "then python -m serve INDEX")


def test_an_exported_soft_prompt_captioner_answers_as_its_run(loaded, trained, tmp_path):
    """An export.py folder (a full checkpoint of model_type soft-prompt-captioner) serves as the run does."""
    import asyncio

    from recipes.soft_prompt_caption.export import export
    from serve.batching import Job, generate_batch
    from serve.runs import load_runs

    runs, files = trained
    exported = load_runs([export(runs["soft_prompt_caption"], tmp_path / "exported")])["exported"]
    assert type(exported.model).__name__ == "SoftPromptCaptioner"
    loop = asyncio.new_event_loop()
    try:
        def caption(run, image) -> str:
            job = Job(run, {"key": 0, "image": str(image)}, None, 8, None, None, loop, loop.create_future())
            return generate_batch([job])[0].text

        for row in _eval_rows(files, "caption"):
            image = Path(files["caption"][1]).parent / row["image"]
            assert caption(exported, image) == caption(loaded["soft_prompt_caption"], image)
    finally:
        loop.close()


# --- refusals that need no trained run: stand-ins for the runs, the real app and server ------------------
def _stand_in_server(tmp_path, images=(), positions: int = 0, context: int | None = None) -> Server:
    """A server over stand-ins: `chat` (its prompt takes `positions` of a context of `context`) and the
    retrieval index `f30k_index` over `images`. Enough for the requests refused before any generation."""
    from types import SimpleNamespace

    from serve.app import create_app

    chat = SimpleNamespace(task="chat", path=tmp_path, needs_image=False, reserved=(), max_positions=context,
                           prompt_positions=lambda item, prompt: positions, answer_prompt=None,
                           least_positions=lambda texts: 0)
    index = SimpleNamespace(task="retrieval", reserved=(), path=tmp_path, images=[str(p) for p in images])
    return Server(create_app({"sp_lora": chat, "f30k_index": index}))


def test_a_gallery_image_gone_from_disk_or_no_longer_an_image_is_a_404_naming_no_path(tmp_path):
    from PIL import Image

    images = [tmp_path / f"{i}.png" for i in range(3)]
    for p in images:
        Image.new("RGB", (16, 16), "red").save(p)
    server = _stand_in_server(tmp_path, images)
    try:
        images[1].unlink()
        images[2].write_bytes(b"%PDF-1.4 no longer an image")
        with urllib.request.urlopen(server.url + "/v1/gallery?model=f30k_index&index=0") as r:
            assert r.read() == images[0].read_bytes()

        def error(index: int) -> tuple[int, dict]:
            status, body = server.json(f"/v1/gallery?model=f30k_index&index={index}")
            return status, body["error"]

        assert error(1) == (404, {"message": "image 1 of the gallery of 'f30k_index' is missing on the "
                                  "server; the index is out of date", "type": "invalid_request_error",
                                  "param": "index", "code": "gallery_image_missing"})
        assert error(2) == (404, {"message": "image 2 of the gallery of 'f30k_index' is no longer a readable "
                                  "image on the server; the index is out of date",
                                  "type": "invalid_request_error", "param": "index",
                                  "code": "gallery_image_missing"})
        assert error(7) == (404, {"message": "index 7 is not in the gallery of 'f30k_index' (3 images)",
                                  "type": "invalid_request_error", "param": "index", "code": "not_found"})
        assert server.json("/health")[0] == 200
    finally:
        server.stop()


TEXT = {"type": "text", "text": "What is it?"}
PNG_URL = "data:image/png;base64," + base64.b64encode(_tiny_png()).decode()
PARTS = [  # (what, content, param, message after "<param>: ")
    ("an unknown part type",
     [TEXT, {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}],
     "messages.0.content.1.type",
     "content part type 'input_audio' is not supported; this server takes 'text' and 'image_url'"),
    ("an image_url part without its url", [TEXT, {"type": "image_url", "image_url": {}}],
     "messages.0.content.1.image_url.url", "Field required"),
    ("an image_url part without image_url", [TEXT, {"type": "image_url"}],
     "messages.0.content.1.image_url", "an image_url part needs an 'image_url' object, {'url': ...}"),
    ("a text part without text", [{"type": "text"}], "messages.0.content.0.text",
     "a text part needs a 'text' string"),
    ("a part without a type", [{"text": "hi"}], "messages.0.content.0.type", "Field required"),
    ("content neither a string nor a list", 5, "messages.0.content",
     "must be a string or a list of content parts"),
]


@pytest.mark.parametrize("what,content,param,message", PARTS, ids=[p[0] for p in PARTS])
def test_a_bad_content_part_is_named_with_what_is_wrong(tmp_path, what, content, param, message):
    server = _stand_in_server(tmp_path)
    try:
        status, body = server.json("/v1/chat/completions",
                                   {"model": "sp_lora", "messages": [{"role": "user", "content": content}]})
    finally:
        server.stop()
    assert (status, body) == (400, {"error": {"message": f"{param}: {message}",
                                              "type": "invalid_request_error", "param": param,
                                              "code": "invalid_value"}})


def test_search_with_neither_or_both_of_query_and_image_is_an_invalid_value(tmp_path):
    server = _stand_in_server(tmp_path)
    try:
        for body in ({"model": "f30k_index"}, {"model": "f30k_index", "query": "a dog", "image": PNG_URL}):
            status, answer = server.json("/v1/search", body)
            error = answer["error"]
            assert (status, error["code"], error["param"]) == (400, "invalid_value", "query")
    finally:
        server.stop()


def test_context_length_message_quotes_the_run_once(tmp_path):
    server = _stand_in_server(tmp_path, positions=100, context=64)
    try:
        status, body = server.json("/v1/chat/completions", {"model": "sp_lora", "max_tokens": 8,
                                                            "messages": [{"role": "user", "content": "hi"}]})
    finally:
        server.stop()
    assert (status, body["error"]["code"]) == (400, "context_length_exceeded")
    assert body["error"]["message"] == ("the prompt takes 100 positions and max_tokens asks for 8 more: over "
                                        "the context length of 'sp_lora', 64")


# The reasons `data_tools.images.load_image` gives an uploaded image, which the server passes on as codes.
UPLOAD_REASONS = {"unreadable_image", "empty_image_file", "truncated_image", "image_too_small",
                  "image_too_large"}


def test_the_readmes_error_table_lists_every_code_the_server_returns(tmp_path):
    import io
    import re

    from PIL import Image

    source = "".join((ROOT / "serve" / name).read_text() for name in ("app.py", "images.py"))
    returned = set(re.findall(r'code="(\w+)"', source)) | set(re.findall(r'\d{3}: "(\w+)"', source))
    assert {"not_found", "method_not_allowed", "gallery_image_missing"} <= returned  # the search worked
    table = (ROOT / "serve" / "README.md").read_text().split("## Limits and errors")[1].split("\n\n")[2]
    listed = dict((code, int(status)) for status, code in re.findall(r"\| (\d{3}) `(\w+)` \|", table))
    assert set(listed) == returned | UPLOAD_REASONS
    # the codes users met that the table lacked, as the server returns them
    tiny = io.BytesIO()
    Image.new("RGB", (4, 4), "red").save(tiny, format="PNG")
    server = _stand_in_server(tmp_path)
    try:
        for url, code in (("data:image/png;base64," + base64.b64encode(tiny.getvalue()).decode(),
                           "image_too_small"), ("data:image/png;base64,", "empty_image_file")):
            status, body = server.json("/v1/chat/completions", {"model": "sp_lora", "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]})
            assert (status, body["error"]["code"]) == (listed[code], code)
        status, body = server.json("/v1/chat/completions")  # a GET
        assert (status, body["error"]["code"]) == (listed["method_not_allowed"], "method_not_allowed")
    finally:
        server.stop()


def test_web_page_shows_the_allowed_range_for_a_negative_max_tokens(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec

    browser = _browser(tmp_path)
    server = _stand_in_server(tmp_path)
    try:
        wait = _open_page(browser, server.url, "sp_lora")
        browser.find_element(By.ID, "prompt").send_keys("What shape?")
        shown = {}
        for value in ("-3", "2.5"):
            field = browser.find_element(By.ID, "max_tokens")
            field.clear()
            field.send_keys(value)
            browser.execute_script("document.getElementById('status').textContent = ''")
            browser.find_element(By.ID, "ask").click()
            wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "refused"))
            shown[value] = browser.find_element(By.ID, "error").text
    finally:
        browser.quit()
        server.stop()
    assert shown == {"-3": "max_tokens: Input should be greater than or equal to 1",  # the server's
                     "2.5": "Max tokens must be a whole number (or empty: the server's default)."}
