"""recipes.common.chat: prompts from the chat template, exact assistant-only labels, image-aware length
budget, collators, and the modality-grouped sampler (recipes.common.sampling)."""

import json

import datasets
import pytest
import torch
from PIL import Image
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from data_tools.records import normalize_record
from recipes.common.chat import (ChatCollator, ChatEncoder, ChatLengthReport, ChatPromptCollator,
                                 ChatTemplateError, fit_conversation, to_messages, tokenize_conversations)
from recipes.common.sampling import ModalityLengthGroupedSampler
from recipes.common.tiny.models import LLAVA_CHAT_TEMPLATE
from tests.conftest import word_llava_processor

VOCAB = ["<unk>", "<s>", "</s>", "<pad>", "<image>", "USER", ":", "ASSISTANT", "describe", "the",
         "image", ".", "a", "red", "circle", "where", "is", "it", "?", "top", "left", "be", "brief", "what",
         "color", "blue"]
V = {w: i for i, w in enumerate(VOCAB)}
BOS, EOS, PAD, IMG = V["<s>"], V["</s>"], V["<pad>"], V["<image>"]
M = -100
N_IMG = 4  # 16 px images, 8 px patches, CLS dropped

# LLaVA-1.5 style as the llava-hf checkpoints render it (our own wording of that format): the image first in
# its turn, " " after every message and no end-of-turn token.
NO_EOS_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] != 'system' -%}{{ m['role'].upper() + ': ' }}{%- endif -%}"
    "{%- for p in m['content'] if p['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for p in m['content'] if p['type'] == 'text' -%}{{ p['text'] + ' ' }}{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
)


def make_processor(template=LLAVA_CHAT_TEMPLATE):
    return word_llava_processor(V, template)


@pytest.fixture(scope="module")
def encoder():
    return ChatEncoder(make_processor())


CONVERSATION = [
    {"from": "system", "value": "be brief ."},
    {"from": "human", "value": "<image>\ndescribe the image ."},
    {"from": "gpt", "value": "a red circle ."},
    {"from": "human", "value": "where is it ?"},
    {"from": "gpt", "value": "top left ."},
]


RED = [Image.new("RGB", (16, 16), "red")]


def ids(text):
    return [V[w] for w in text.split()]


def test_exact_labels_on_a_multi_turn_conversation(encoder):
    enc = encoder.encode(to_messages(CONVERSATION, n_images=1), RED)
    system, user1 = ids("be brief ."), ids("USER :")
    expected = ([BOS] + system + user1 + [IMG] * N_IMG + ids("describe the image . ASSISTANT :")
                + ids("a red circle .") + [EOS]
                + ids("USER : where is it ? ASSISTANT :") + ids("top left .") + [EOS])
    assert enc.input_ids == expected
    n_prompt1 = 1 + 3 + 2 + N_IMG + 6
    n_prompt2 = 8
    assert enc.labels == ([M] * n_prompt1 + ids("a red circle .") + [EOS]
                          + [M] * n_prompt2 + ids("top left .") + [EOS])
    assert (enc.turn_ends == [n_prompt1 + 5, len(expected)] and enc.image_end == 6 + N_IMG
            and enc.eos_turns == ())


def test_tokens_equal_what_the_processor_itself_gives(encoder, tmp_path):
    # No tokenization mismatch: the same ids as processor(rendered text, image), image tokens expanded by it.
    messages = to_messages(CONVERSATION, n_images=1)
    reference = encoder.processor(text=encoder.render(messages),
                                  images=[Image.new("RGB", (20, 16), "red")])["input_ids"][0]
    assert encoder.encode(messages, RED).input_ids == list(reference)


def test_image_placeholder_anywhere_in_the_first_turn_and_openai_messages(encoder):
    last = [{"from": "human", "value": "describe the image .\n<image>"},
            {"from": "gpt", "value": "a red circle ."}]
    assert to_messages(last, True)[0]["content"] == [{"type": "text", "text": "describe the image ."},
                                                     {"type": "image"}]
    none = [{"from": "human", "value": "describe the image ."}, {"from": "gpt", "value": "a red circle ."}]
    assert to_messages(none, True)[0]["content"] == [{"type": "image"},
                                                     {"type": "text", "text": "describe the image ."}]
    openai = normalize_record({"image": "a.png", "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image ."}]},
        {"role": "assistant", "content": "a red circle ."}]}, "instruct")
    same = encoder.encode(to_messages(none, True), RED).input_ids
    assert encoder.encode(to_messages(openai["conversations"], True), RED).input_ids == same
    text_only = encoder.encode(to_messages(none, n_images=0))
    assert IMG not in text_only.input_ids and text_only.image_end == 0
    with pytest.raises(ValueError, match="only allowed in a user turn"):
        to_messages([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image> no"}], True)


def test_a_template_without_end_of_turn_gets_eos_after_each_answer():
    encoder = ChatEncoder(make_processor(NO_EOS_TEMPLATE))
    enc = encoder.encode(to_messages(CONVERSATION[1:], n_images=1), RED)
    prompt1 = [BOS] + ids("USER :") + [IMG] * N_IMG + ids("describe the image . ASSISTANT :")
    assert enc.input_ids == (prompt1 + ids("a red circle .") + [EOS] + ids("USER : where is it ? ASSISTANT :")
                             + ids("top left .") + [EOS])
    assert enc.labels == ([M] * len(prompt1) + ids("a red circle .") + [EOS]
                          + [M] * 8 + ids("top left .") + [EOS])
    assert enc.eos_turns == (0, 1)
    # The generation prompt is the training sequence up to the answer, token for token.
    prompt = encoder.encode_prompt(to_messages(CONVERSATION[1:4], n_images=1), RED)
    assert prompt == enc.input_ids[: len(prompt)] and prompt[-2:] == ids("ASSISTANT :")
    # The report counts the eos of the answers a sample keeps: a cut after the first answer keeps one.
    report = ChatLengthReport()
    fit_conversation(enc, len(enc.input_ids) - 1, report)
    fit_conversation(enc, 3, report)  # dropped: none kept
    assert (report.cut, report.dropped, report.eos_added) == (1, 1, 1)


def test_length_budget_cuts_at_a_turn_boundary_never_inside_the_image(encoder):
    enc = encoder.encode(to_messages(CONVERSATION[1:], n_images=1), RED)
    first_turn = enc.turn_ends[0]  # bos + USER : + image + question + ASSISTANT : + answer + eos
    report = ChatLengthReport()
    # (text, ids, labels, images kept: None = all)
    assert fit_conversation(enc, len(enc.input_ids), report)[1:] == (enc.input_ids, enc.labels, None)
    assert fit_conversation(enc, len(enc.input_ids) - 1, report)[1:] == (enc.input_ids[:first_turn],
                                                                         enc.labels[:first_turn], None)
    assert fit_conversation(enc, first_turn - 1, report) is None  # the first answer would be cut: dropped
    assert fit_conversation(enc, 3, report) is None  # inside the image tokens: dropped, never cut there
    assert (report.samples, report.cut, report.turns_cut, report.dropped) == (4, 1, 1, 2)
    assert report.tokens_cut == len(enc.input_ids) - first_turn
    # An image in a later turn: the cut before it leaves the image out with that turn, which gives the
    # text-only first exchange.
    late = [{"from": "human", "value": "what color ?"}, {"from": "gpt", "value": "red ."},
            {"from": "human", "value": "<image>\ndescribe the image ."},
            {"from": "gpt", "value": "a red circle ."}]
    enc = encoder.encode(to_messages(late, n_images=1), RED)
    first = encoder.encode(to_messages(late[:2]))
    report = ChatLengthReport()
    assert fit_conversation(enc, len(enc.input_ids) - 1, report) == (first.text, first.input_ids,
                                                                     first.labels, 0)
    assert first.input_ids == [BOS] + ids("USER : what color ? ASSISTANT : red .") + [EOS]
    assert (report.cut, report.turns_cut, report.dropped) == (1, 1, 0)
    assert report.tokens_cut == len(enc.input_ids) - len(first.input_ids)
    assert fit_conversation(enc, len(first.input_ids) - 1, report) is None and report.dropped == 1


def test_tokenize_conversations_reports_and_names_the_record(encoder, tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "r.png")
    records = datasets.Dataset.from_list([
        {"image": str(tmp_path / "r.png"), "conversations": CONVERSATION[1:]},
        {"image": None,
         "conversations": [{"from": "human", "value": "what color ?"}, {"from": "gpt", "value": "blue ."}]},
    ])
    ds, report = tokenize_conversations(records, encoder, max_length=22, source="train.jsonl")
    assert ds["has_image"] == [True, False] and ds["length"] == [len(x) for x in ds["input_ids"]]
    assert (report.samples, report.cut, report.dropped) == (2, 1, 0)
    turns = [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "a"}]
    bad = datasets.Dataset.from_list([{"image": None, "conversations": turns}])
    with pytest.raises(ValueError, match="train.jsonl: record 0"):
        tokenize_conversations(bad, encoder, None, source="train.jsonl")


def test_tokenize_conversations_in_two_processes_gives_the_same_samples_and_report(encoder, tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "r.png")
    text_only = [{"from": "human", "value": "what color ?"}, {"from": "gpt", "value": "blue ."}]
    long_question = [{"from": "human", "value": "<image>\n" + "describe the image . " * 6}, CONVERSATION[2]]
    rows = [{"image": str(tmp_path / "r.png"), "conversations": CONVERSATION[1:]},  # cut after one answer
            {"image": None, "conversations": text_only},
            {"image": str(tmp_path / "r.png"), "conversations": long_question}] * 3  # dropped
    records = datasets.Dataset.from_list(rows)
    one, one_report = tokenize_conversations(records, encoder, max_length=22)
    two, two_report = tokenize_conversations(records, encoder, max_length=22, num_proc=2)
    assert (one_report.samples, one_report.cut, one_report.dropped) == (9, 3, 3)
    assert vars(two_report) == vars(one_report)
    assert two.to_list() == one.to_list() and len(one) == 6
    bad_turns = [{"from": "human", "value": "<image> hi"}, {"from": "gpt", "value": "a"}]
    bad = datasets.Dataset.from_list([{**rows[0], "line": 3}, {**rows[1], "line": 5},
                                      {"image": None, "line": 7, "conversations": bad_turns}])
    with pytest.raises(ValueError, match=r"^train.jsonl:7: conversations: 1 '<image>' placeholders"):
        tokenize_conversations(bad, encoder, None, source="train.jsonl", num_proc=2)


def test_a_template_that_does_not_render_turn_by_turn_is_refused():
    # Renders the last message differently from the same message inside a longer conversation.
    odd = ("{%- for m in messages -%}{{ m['role'].upper() + ': ' }}"
           "{%- for p in m['content'] if p['type'] == 'text' -%}"
           "{{ p['text'] }}{%- endfor -%}{%- if not loop.last -%}{{ ' . ' }}{%- endif -%}{%- endfor -%}"
           "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}")
    with pytest.raises(ChatTemplateError, match="turn by turn"):
        ChatEncoder(make_processor(odd)).encode(to_messages(CONVERSATION[1:], n_images=1), RED)


def _tiny_llava():
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, image_size=16, patch_size=8)
    text = LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS)
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMG,
                         image_seq_length=N_IMG, vision_feature_select_strategy="default",
                         vision_feature_layer=-2)
    return LlavaForConditionalGeneration(config).eval()


def test_collators_mix_text_only_and_image_samples_and_left_pad_prompts(encoder, tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "r.png")
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "b.png")
    records = datasets.Dataset.from_list([
        {"image": None,
         "conversations": [{"from": "human", "value": "what color ?"}, {"from": "gpt", "value": "blue ."}]},
        {"image": str(tmp_path / "r.png"), "conversations": CONVERSATION[1:]},
        {"image": str(tmp_path / "b.png"), "conversations": CONVERSATION[1:3]},
    ])
    ds, _ = tokenize_conversations(records, encoder, None)
    batch = ChatCollator(encoder)([ds[i] for i in range(3)])
    width = max(ds["length"])
    # text-only: no image
    assert batch["input_ids"].shape == (3, width) and batch["pixel_values"].shape[0] == 2
    assert (batch["labels"][0, ds["length"][0]:].eq(M).all()
            and batch["attention_mask"].sum(1).tolist() == ds["length"])
    # the images in sample order: red, then blue
    assert batch["pixel_values"][0, 0, 0, 0] > batch["pixel_values"][1, 0, 0, 0]
    model = _tiny_llava()
    with torch.no_grad():
        # image features fill exactly the image tokens of the mixed batch
        assert torch.isfinite(model(**batch).loss)
        only_text = ChatCollator(encoder)([ds[0]])
        assert "pixel_values" not in only_text and torch.isfinite(model(**only_text).loss)

    items = [{"key": "t", "image": None, "conversations": records[0]["conversations"][:1]},
             {"key": "i", "image": str(tmp_path / "r.png"), "conversations": CONVERSATION[1:4]}]
    collate = ChatPromptCollator(encoder)
    batch = collate(items)
    assert batch["keys"] == ["t", "i"] and batch["input_ids"][0, 0] == PAD
    assert batch["input_ids"][:, -2:].tolist() == [ids("ASSISTANT :")] * 2
    with torch.no_grad():
        greedy = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
        together = model.generate(**{k: v for k, v in batch.items() if k != "keys"}, **greedy)
        for row, item in enumerate(items):
            alone = collate([item])
            single = model.generate(**{k: v for k, v in alone.items() if k != "keys"}, **greedy)
            assert together[row, -4:].tolist() == single[0, -4:].tolist()  # left padding changes no answer



def test_padding_free_batches_give_the_padded_batches_logits_loss_and_gradients(encoder, tmp_path):
    """--padding_free: one row, position_ids restarting per sample, no attention_mask; no sample sees
    another."""
    Image.new("RGB", (16, 16), "red").save(tmp_path / "r.png")
    Image.new("RGB", (16, 16), "blue").save(tmp_path / "b.png")
    records = datasets.Dataset.from_list([
        {"image": str(tmp_path / "r.png"), "conversations": CONVERSATION[1:]},
        {"image": None,
         "conversations": [{"from": "human", "value": "what color ?"}, {"from": "gpt", "value": "blue ."}]},
        {"image": str(tmp_path / "b.png"), "conversations": CONVERSATION[1:3]},
    ])
    ds, _ = tokenize_conversations(records, encoder, None)
    features = [ds[i] for i in range(3)]
    padded = ChatCollator(encoder)(features)
    packed = ChatCollator(encoder, padding_free=True)(features)
    lengths = ds["length"]
    assert (set(packed) == {"input_ids", "position_ids", "labels", "pixel_values", "use_cache"}
            and packed["input_ids"].shape == (1, sum(lengths)))
    assert packed["position_ids"][0].tolist() == [p for n in lengths for p in range(n)]
    assert packed["input_ids"][0].tolist() == [t for f in features for t in f["input_ids"]]
    starts = [sum(lengths[:k]) for k in range(3)]
    assert packed["labels"][0, starts].eq(M).all()
    # each sample's first label was -100 already
    assert packed["labels"].ne(M).sum() == padded["labels"].ne(M).sum()

    torch.manual_seed(0)
    model = _tiny_llava()
    params = [model.lm_head.weight, model.model.multi_modal_projector.linear_1.weight]
    out = {}
    for name, batch in (("padded", padded), ("packed", packed)):
        model.zero_grad()
        result = model(**batch)
        result.loss.backward()
        out[name] = result, [p.grad.clone() for p in params]
    rows = torch.cat([out["padded"][0].logits[k, :n] for k, n in enumerate(lengths)])
    torch.testing.assert_close(out["packed"][0].logits[0], rows, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["packed"][0].loss, out["padded"][0].loss, rtol=1e-6, atol=0)
    for a, b in zip(out["packed"][1], out["padded"][1]):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))

def test_sampler_batches_one_modality_of_similar_length_reproducibly():
    lengths = [100 + i for i in range(50)] + [10 + i for i in range(13)]
    has_image = [True] * 50 + [False] * 13
    sampler = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=3, mega_batch_mult=2)
    batches = sampler.batches()
    assert (sorted(i for b in batches for i in b) == list(range(63))
            and list(sampler) == [i for b in batches for i in b])
    assert all(len({has_image[i] for i in b}) == 1 for b in batches[:-1])  # only the last batch may mix
    # longest first
    assert all(len(b) == 4 for b in batches[:-1]) and max(lengths[i] for i in batches[0]) == 149
    # One mega-batch per modality: every full batch is 4 neighbours in length.
    whole = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=3,
                                         mega_batch_mult=50).batches()
    assert [max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in whole[:-1]] == [3] * 15
    again = ModalityLengthGroupedSampler(lengths, has_image, batch_size=4, seed=3, mega_batch_mult=2)
    assert again.batches() == batches
    again.set_epoch(1)
    assert again.batches() != batches


H, G, S = ({"from": who, "value": text} for who, text in (("human", "what color ?"), ("gpt", "red ."),
                                                          ("system", "be brief .")))
# Turn orders that validate accepts: the chat templates render them, each answer learned.
ACCEPTED = [[H, G, S, H, G], [S, S, H, G], [H, H, G], [H, G, G], [H, G, H], [H, S, G], [H, G, S]]


@pytest.mark.parametrize("template", [LLAVA_CHAT_TEMPLATE, NO_EOS_TEMPLATE])
def test_every_turn_order_validate_accepts_trains_and_one_opening_with_an_answer_is_skipped(tmp_path,
                                                                                           template):
    from data_tools.jsonl import read_jsonl, write_jsonl
    from recipes.common.data import load_records

    path = tmp_path / "train.jsonl"
    write_jsonl(path, [{"conversations": turns} for turns in [[G, H, G], *ACCEPTED, [S, G, H, G]]])
    records = load_records(path, "instruct", skip_bad_rows=True, rejects_path=tmp_path / "rejects.jsonl")
    rejects = read_jsonl(tmp_path / "rejects.jsonl")
    assert [(r["line"], r["reason"], r["field"]) for r in rejects] == [
        (1, "bad_value", "conversations"), (len(ACCEPTED) + 2, "bad_value", "conversations")]
    dataset, report = tokenize_conversations(records, ChatEncoder(make_processor(template)), None)
    assert report.samples == len(ACCEPTED)
    for turns, labels in zip(ACCEPTED, dataset["labels"], strict=True):
        answers = sum(t["from"] == "gpt" for t in turns)
        assert [t for t in labels if t != M] == (ids("red .") + [EOS]) * answers


def test_an_answer_before_any_user_turn_is_a_clear_error_not_an_index_error(encoder):
    with pytest.raises(ValueError, match="an assistant turn before any user turn"):
        encoder.encode(to_messages([G, H, G]))


def test_held_out_items_whose_prompt_leaves_no_room_within_the_budget_are_left_out(encoder, tmp_path, caplog):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "r.png")
    items = datasets.Dataset.from_list([
        {"key": "short", "image": None, "conversations": [{"from": "human", "value": "what color ?"}]},
        {"key": "first", "image": str(tmp_path / "r.png"), "conversations": CONVERSATION[1:2]},
        {"key": "later", "image": str(tmp_path / "r.png"), "conversations": CONVERSATION[1:4]},
    ])
    lengths = {it["key"]: len(encoder.encode_prompt(to_messages(it["conversations"], n_images=int(
        it["image"] is not None)), [RED[0]] if it["image"] else [])) for it in items}
    assert lengths["short"] < lengths["first"] < lengths["later"]
    def keys(max_length, limit=None):
        kept, left_out = encoder.fitting(items, max_length, limit)
        return kept["key"], left_out

    assert keys(None) == (["short", "first", "later"], 0)
    assert keys(None, limit=2) == (["short", "first"], 0)
    assert keys(lengths["later"] + 1) == (["short", "first", "later"], 0)
    assert keys(lengths["later"]) == (["short", "first"], 1)  # no room for an answer token
    assert "1 of 3 eval items left out: their prompt is --max_length" in caplog.text
    assert keys(lengths["first"]) == (["short"], 2)
    # --eval_max_samples counts the items that fit: those before the last one kept are the ones left out
    assert keys(lengths["first"], limit=1) == (["short"], 0)
    items = items.select([1, 0, 2])  # first, short, later
    assert keys(lengths["first"], limit=1) == (["short"], 1)
    assert keys(lengths["later"], limit=2) == (["first", "short"], 0)
    short = lengths["short"]
    with pytest.raises(ValueError, match=rf"no eval item's prompt leaves room for an answer within "
                                         rf"--max_length {short} \(the shortest is {short} tokens"):
        encoder.fitting(items, short)


def test_padding_free_is_refused_before_training_for_a_processor_whose_batches_cannot_be_packed(
        module_cache, tmp_path):
    from recipes.common.chat import chat_collator, chat_encoder
    from recipes.common.models import load_processor, resolve_model_path

    Image.new("RGB", (32, 32), "red").save(tmp_path / "r.png")
    gemma = chat_encoder(load_processor(resolve_model_path("tiny:gemma3"), "gemma3"))
    records = datasets.Dataset.from_list([{"image": str(tmp_path / "r.png"), "conversations": [
        {"from": "human", "value": "<image>\nwhat color ?"}, {"from": "gpt", "value": "red ."}]}])
    ds, _ = tokenize_conversations(records, gemma, None)
    assert chat_collator(gemma, ds, padding_free=False).padding_free is False
    llava = ChatEncoder(make_processor())  # its batches pack, with an image or without
    mixed, _ = tokenize_conversations(datasets.Dataset.from_list([
        {"image": None, "conversations": [{"from": "human", "value": "what color ?"},
                                          {"from": "gpt", "value": "red ."}]},
        {"image": str(tmp_path / "r.png"), "conversations": CONVERSATION[1:3]}]), llava, None)
    assert chat_collator(llava, mixed, padding_free=True).padding_free is True
    with pytest.raises(ValueError, match=r"--padding_free: this processor's batches also hold \['token_type"):
        chat_collator(gemma, ds, padding_free=True)


def metaspace_llava_processor(template):
    """A LLaVA processor with a Llama tokenizer (Metaspace BPE: "▁"-prefixed word pieces, as llava-hf's), its
    small vocabulary learnt here."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPImageProcessor, LlamaTokenizer, LlavaProcessor

    corpus = ["USER: what is it? ASSISTANT: a red square. USER: where is it? ASSISTANT: top left."] * 20
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=120, show_progress=False,
                                                        special_tokens=["<unk>", "<s>", "</s>"]))
    model = json.loads(bpe.to_str())["model"]
    tokenizer = LlamaTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]],
                               extra_special_tokens={"image_token": "<image>"})
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=template)


def test_a_cut_conversation_is_the_processors_tokens_of_its_text_with_a_llama_tokenizer(tmp_path):
    # The template writes " " after "</s>", which a Llama tokenizer joins to the next word ("▁USER:"): the cut
    # must drop that token and leave the space out of the text, else the collator's tokens differ.
    processor = metaspace_llava_processor(NO_EOS_TEMPLATE)
    encoder = ChatEncoder(processor)
    RED[0].save(tmp_path / "red.png")
    record = {"image": str(tmp_path / "red.png"), "conversations": [
        {"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a red square."},
        {"from": "human", "value": "where is it?"}, {"from": "gpt", "value": "top left."}]}
    whole, _ = tokenize_conversations([record], encoder, None)
    cut, report = tokenize_conversations([record], encoder, whole[0]["length"] - 1)
    assert report.cut == 1 and cut[0]["text"].endswith("ASSISTANT: a red square.</s>")
    assert cut[0]["input_ids"] == list(processor(text=[cut[0]["text"]], images=[RED])["input_ids"][0])
    tokens = processor.tokenizer.convert_ids_to_tokens(cut[0]["input_ids"])
    assert tokens[-3:] == ["▁square", ".", "</s>"] or tokens[-2:] == ["▁square.", "</s>"]
    batch = ChatCollator(encoder)([cut[0]])
    assert batch["input_ids"][0].tolist() == cut[0]["input_ids"]
