"""The chat recipes on every VLM family they support, through the same code: tiny models of the real classes
(`tiny:<model_type>`), loaded with AutoModelForImageTextToText + AutoProcessor (`models.load_processor`).

Per family: the labels are exactly each answer and its end-of-turn token (checked against the answers' own
text, not the masking code); a padded batch gives every sample the logits it gets alone (position ids,
M-RoPE and image inputs right under padding); over-fitting one batch lowers the loss; LoRA lands on the
language model's linear layers only, and a merged model generates what adapter + base generate; QLoRA
keeps the vision tower, projector and LM head unquantized; `chat.answer` gives the eval collator's answer.
"""

import copy
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText

from recipes.common.args import FreezeArguments, ModelArguments, PeftArguments
from recipes.common.chat import (ChatCollator, ChatPromptCollator, PrefixSuffixEncoder, chat_encoder,
                                 tokenize_conversations)
from recipes.common.data import load_records
from recipes.common.models import load_model_and_processor, load_processor, resolve_model_path
from recipes.common.peft_setup import (apply_lora_and_freezing, apply_peft, find_components,
                                       vision_layer_names)
from recipes.common.quantization import unquantized_modules
from recipes.common.tiny import families
from tests.conftest import lora_module_names

FAMILIES = ["llava", *families.available()]
# What each family's processor accepts beyond one image per sample.
TEXT_ONLY = {f for f in FAMILIES if f != "paligemma"}  # PaliGemma's processor needs an image per sample
MULTI_IMAGE = {f for f in FAMILIES if f != "paligemma"}

CONVERSATION = [
    {"from": "human", "value": "<image>\nwhat shape is it?"},
    {"from": "gpt", "value": "a red circle."},
    {"from": "human", "value": "where is it?"},
    {"from": "gpt", "value": "top left."},
]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = {}
    for name, size, colour in (("red", (64, 64), "red"), ("blue", (128, 96), "blue"),
                               ("green", (96, 64), "green")):
        paths[name] = str(folder / f"{name}.png")
        Image.new("RGB", size, colour).save(paths[name])
    return paths


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    name = request.param
    try:
        path = resolve_model_path(f"tiny:{name}")
        processor = load_processor(path, name)
    except (RuntimeError, ImportError) as e:  # a processor that needs torchvision, which this torch lacks
        if "torchvision" not in str(e).lower():
            raise
        pytest.skip(f"SKIPPED LOUDLY: tiny:{name} cannot be built or loaded here: {str(e).strip()[:200]}")
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    return name, path, model, processor, chat_encoder(processor)


def test_full_weights_saved_under_their_original_names_load_back_into_the_model(family, tmp_path):
    """What a full-weight checkpoint holds (save_pretrained renames the keys of most families) loads back
    into a model in training: its best checkpoint at the end, or a resume."""
    from recipes.common.trainer import load_full_weights

    _, path, model, _, _ = family
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)
    trained.save_pretrained(tmp_path)
    fresh = AutoModelForImageTextToText.from_pretrained(path)
    assert load_full_weights(fresh, tmp_path)
    want = trained.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in fresh.state_dict().items())


def _records(name, images, n=3):
    rows = [{"image": images["red"], "conversations": CONVERSATION},
            {"image": images["blue"], "conversations": CONVERSATION[:2]}]
    if name in TEXT_ONLY:
        rows.append({"image": None, "conversations": CONVERSATION[2:]})
    if name in MULTI_IMAGE:
        two = [{"from": "human", "value": "<image><image>\nsame colour?"}, {"from": "gpt", "value": "no."}]
        rows.append({"images": [images["red"], images["green"]], "conversations": two})
    return rows[:n] if n else rows


def _runs(ids, labels):
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_labels_are_each_answer_and_its_end_of_turn(family, images):
    name, _, _, processor, encoder = family
    tok = processor.tokenizer
    samples, _ = tokenize_conversations(_records(name, images, n=None), encoder, None)
    for sample, record in zip(samples, _records(name, images, n=None)):
        answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
        if isinstance(encoder, PrefixSuffixEncoder):
            answers = answers[-1:]  # the last answer is the suffix; earlier ones are context
        learned = [tok.decode(run) for run in _runs(sample["input_ids"], sample["labels"])]
        # Each learned span is the answer followed by exactly one end-of-turn token (special, not text).
        assert len(learned) == len(answers)
        for text, answer in zip(learned, answers):
            assert text.strip().startswith(answer)
            end = text.strip()[len(answer):]
            assert (end in encoder.specials if hasattr(encoder, "specials")
                    else end == tok.eos_token), (text, answer)
        image_tokens = [i for i, t in enumerate(sample["input_ids"]) if t in encoder.image_ids]
        assert all(sample["labels"][i] == -100 for i in image_tokens)
        assert bool(image_tokens) == bool(sample["images"]) or name == "mllama"


def test_padded_batch_gives_each_sample_its_own_logits(family, images):
    name, _, model, _, encoder = family
    samples, _ = tokenize_conversations(_records(name, images, n=None), encoder, None)
    features = list(samples)
    batch = ChatCollator(encoder)(features)
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        for row, feature in enumerate(features):
            alone = ChatCollator(encoder)([feature])
            logits = model(**{k: v for k, v in alone.items() if k != "labels"}).logits[0]
            n = len(feature["input_ids"])
            torch.testing.assert_close(together[row, :n], logits[:n], atol=2e-4, rtol=1e-4)


def test_overfitting_one_batch_lowers_the_loss(family, images):
    name, _, model, _, encoder = family
    samples, _ = tokenize_conversations(_records(name, images), encoder, None)
    batch = ChatCollator(encoder)(list(samples))
    model = copy.deepcopy(model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_a_trained_projector_and_vision_layer_train_through_their_saved_copies(family):
    """--freeze_bridge false --unfreeze_last_n_vision_layers 1 under LoRA: every weight of the bridge's
    modules (Qwen3-VL's deepstack mergers are a ModuleList: its items) and of the last used vision layer
    trains as a modules_to_save copy, which the adapter folder holds; nothing else of the base trains."""
    name, _, model, _, _ = family
    parts = find_components(model)
    peft_model = apply_lora_and_freezing(copy.deepcopy(model), PeftArguments(lora_r=4),
                                         FreezeArguments(freeze_bridge=False,
                                                         unfreeze_last_n_vision_layers=1))
    copies = {n.replace("base_model.model.", "").replace(".modules_to_save.default", "")
              for n, p in peft_model.named_parameters() if p.requires_grad and ".lora_" not in n}
    modules = dict(model.named_modules())
    last_layer = vision_layer_names(model)[-1]
    expected = {n for n, _ in model.named_parameters()
                if any(n.startswith(f"{p}.")
                       for p in (*[b for b in parts.bridge if b in modules], last_layer))}
    assert expected and copies == expected


def test_lora_on_the_language_model_and_merge_generates_the_same(family, images, tmp_path):
    from recipes.common.merge import load_run, merge_run

    name, _, model, processor, encoder = family
    parts = find_components(model)
    assert parts.vision and parts.bridge and parts.output and vision_layer_names(model)
    peft_model = apply_peft(copy.deepcopy(model), PeftArguments(lora_r=4, lora_alpha=8, lora_dropout=0.0))
    names = lora_module_names(peft_model)
    assert names and all(parts.of(n) == "language" and n != parts.output for n in names)
    torch.manual_seed(1)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.5)  # a trained-looking adapter: its effect is visible
    items = [{"key": i, **r, "conversations": r["conversations"][:1]}
             for i, r in enumerate(_records(name, images))]
    batch = ChatPromptCollator(encoder)(items)
    batch.pop("keys")
    greedy = {"max_new_tokens": 6, "do_sample": False, "min_new_tokens": 6}
    # A run folder as train.py leaves it (adapter + processor); merged by the recipes' merge, loaded back.
    peft_model.save_pretrained(tmp_path / "run")
    processor.save_pretrained(tmp_path / "run")
    merge_run(tmp_path / "run", tmp_path / "merged", AutoModelForImageTextToText)
    adapter_run, _ = load_run(tmp_path / "run", AutoModelForImageTextToText)
    merged_model = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        adapted = adapter_run.generate(**batch, **greedy)
        merged = merged_model.generate(**batch, **greedy)
        base = model.generate(**batch, **greedy)
    assert torch.equal(adapted, merged)
    assert not torch.equal(adapted, base)  # the adapter changed the answers


def test_chat_answer_is_the_eval_collators_greedy_answer(family, images):
    from recipes.common.trainer import stop_token_ids
    from recipes.llava_instruct.chat import answer

    name, _, model, processor, encoder = family
    item = {"key": 0, "image": images["blue"], "conversations": CONVERSATION[:3]}
    batch = ChatPromptCollator(encoder)([item])
    batch.pop("keys")
    tok = processor.tokenizer
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=stop_token_ids(model, tok))
    expected = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    got = answer(model, processor, encoder, CONVERSATION[:3], Image.open(images["blue"]).convert("RGB"),
                 max_new_tokens=5)
    assert got == expected


def test_qlora_keeps_vision_projector_and_head_unquantized(family):
    name, path, model, _, _ = family
    parts = find_components(model)
    args = ModelArguments(load_in_4bit=True)
    keep = unquantized_modules(AutoModelForImageTextToText, path, args)
    assert set(keep) == {*parts.vision, *parts.bridge, parts.output}
    quantized, _ = load_model_and_processor(AutoModelForImageTextToText, path, args, skip_quantization=keep)
    linears = {n: type(m).__name__ for n, m in quantized.named_modules() if isinstance(m, torch.nn.Linear)}
    four_bit = {n for n, kind in linears.items() if kind == "Linear4bit"}
    assert four_bit and all(parts.of(n) == "language" and n != parts.output for n in four_bit)
    assert all(n in four_bit for n in linears if parts.of(n) == "language" and n != parts.output)


def test_length_budget_cuts_after_a_whole_turn_never_inside_an_image(family, images):
    name, _, _, _, encoder = family
    if isinstance(encoder, PrefixSuffixEncoder):
        pytest.skip("one answer per sample: nothing to cut at a turn boundary")
    record = _records(name, images)[0]  # two exchanges, the image in the first
    whole, _ = tokenize_conversations([record], encoder, None)
    n = whole[0]["length"]
    cut, report = tokenize_conversations([record], encoder, n - 1)
    assert (report.cut, report.turns_cut, report.tokens_cut) == (1, 1, n - cut[0]["length"])
    assert cut[0]["input_ids"] == whole[0]["input_ids"][: cut[0]["length"]]
    assert len(_runs(cut[0]["input_ids"], cut[0]["labels"])) == 1  # the first answer, whole
    batch = ChatCollator(encoder)(list(cut))  # the cut text gives the processor exactly the cut tokens
    assert batch["input_ids"][0].tolist() == cut[0]["input_ids"]
    image_tokens = max(i for i, t in enumerate(whole[0]["input_ids"]) if t in encoder.image_ids)
    with pytest.raises(ValueError, match="no conversation fits"):
        tokenize_conversations([record], encoder, image_tokens)  # inside the image: dropped, never cut there


def test_a_question_after_the_last_answer_changes_nothing_learned(family, images):
    name, _, _, processor, encoder = family
    record = _records(name, images)[0]
    asked = {**record, "conversations": [*record["conversations"], {"from": "human", "value": "and now?"}]}
    (plain, _), (open_, _) = (tokenize_conversations([r], encoder, None) for r in (record, asked))
    learned = [_runs(s[0]["input_ids"], s[0]["labels"]) for s in (plain, open_)]
    assert learned[0] == learned[1]
    if isinstance(encoder, PrefixSuffixEncoder):  # the sample ends with its answer: the question is left out
        assert open_[0]["input_ids"] == plain[0]["input_ids"]


def test_a_conversation_the_processor_cannot_take_is_an_error_naming_its_line(images, tmp_path):
    encoder = chat_encoder(load_processor(resolve_model_path("tiny:paligemma"), "paligemma"))
    last_has_image = [*CONVERSATION, {"from": "human", "value": "<image>\nand this one?"}]
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(["", json.dumps({"image": "red.png", "conversations": CONVERSATION}),
                               json.dumps({"images": ["red.png", "blue.png"],
                                           "conversations": last_has_image})]))
    records = load_records(path, "instruct", image_root=Path(images["red"]).parent)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:3: a training sample needs an answer"):
        tokenize_conversations(records, encoder, None, source=str(path))


@pytest.mark.matrix  # with the family matrix (tests/test_family_matrix.py), in `make test-families` (CI)
@pytest.mark.parametrize("recipe, task, model", [("qlora_vqa", "vqa", "tiny:paligemma"),
                                                 ("llava_instruct", "instruct", "tiny:mllama")])
def test_the_recipes_train_and_evaluate_other_families(recipe_env, recipe, task, model):
    """train.py end to end: PaliGemma (prefix + suffix, 4-bit LM) through qlora_vqa, Mllama (cross-attention)
    through llava_instruct."""
    import json

    from tests.conftest import ROOT, run_script

    d, env = recipe_env(f"{recipe}-{model[5:]}", task, 24, 16)
    out = d / "run"
    r = run_script(ROOT / "recipes" / recipe / "train.py", [
        "--model_name_or_path", model, "--train_file", d / "synth" / "train.jsonl", "--eval_file",
        d / "synth" / "eval.jsonl", "--output_dir", out, "--max_steps", "2",
        "--per_device_train_batch_size", "4",
        "--eval_strategy", "no", "--save_strategy", "no", "--load_best_model_at_end", "false",
        "--max_new_tokens", "3", "--eval_max_samples", "4", "--report_to", "none"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"].endswith(model[5:] + "-v1") and metrics["global_step"] == 2
    assert "eval_VQA_accuracy" in metrics["after"]
    predictions = [json.loads(line)
                   for line in (out / "predictions" / "final.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and (out / "adapter_model.safetensors").exists()


# (family, options that shrink its image tokens, the image processor attribute they set)
SMALLER_IMAGES = [("smolvlm", {"do_image_splitting": False}, "do_image_splitting"),
                  ("qwen2_5_vl", {"size": {"shortest_edge": 1024, "longest_edge": 112 * 112}}, "size")]


@pytest.mark.parametrize("name,options,attribute", SMALLER_IMAGES)
def test_processor_options_reach_the_samples_and_are_saved_with_the_run(name, options, attribute, images,
                                                                        tmp_path):
    """--processor_kwargs: fewer image tokens for a 448 px image (SmolVLM without tiles, Qwen2.5-VL at most
    16 of its 28 px tokens); saved with the processor (what merge, serve and chat load); a misspelt name is
    refused."""
    try:  # a model built by an environment with torchvision may be in the cache: its processor still needs it
        path = resolve_model_path(f"tiny:{name}")
        load_processor(path, name)
    except (RuntimeError, ImportError) as e:
        pytest.skip(f"SKIPPED LOUDLY: tiny:{name} cannot be built or loaded here: {str(e).strip()[:200]}")
    big = tmp_path / "big.png"
    Image.new("RGB", (448, 448), "red").save(big)
    record = {"image": str(big), "conversations": CONVERSATION}
    lengths = []
    for kwargs in (None, options):
        _, processor = load_model_and_processor(AutoModelForImageTextToText, path,
                                                ModelArguments(processor_kwargs=kwargs))
        samples, _ = tokenize_conversations([record], chat_encoder(processor), None)
        lengths.append(len(samples[0]["input_ids"]))
    processor.save_pretrained(tmp_path / "run")
    saved = getattr(load_processor(tmp_path / "run", name).image_processor, attribute)
    assert saved == getattr(processor.image_processor, attribute) != getattr(
        load_processor(path, name).image_processor, attribute)
    assert lengths[1] < lengths[0], lengths
    typo = {f"{next(iter(options))}s": 1}
    with pytest.raises(ValueError, match=f"{next(iter(typo))!r}: not an option of .* Did you mean"):
        load_model_and_processor(AutoModelForImageTextToText, path, ModelArguments(processor_kwargs=typo))
