"""serve/: a request field of the wrong JSON type is refused naming the field (no coercion of "5", 5.0 or
"true"), on stand-in runs: the refusals come before any model is used."""

from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from serve.app import ServeOptions, create_app

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = tmp_path_factory.mktemp("runs")
    chat = SimpleNamespace(task="chat", path=path, needs_image=False, reserved=(), max_positions=None,
                           prompt_positions=lambda item, prompt: 0)
    index = SimpleNamespace(task="retrieval", reserved=(), path=path, images=[])
    options = ServeOptions(max_tokens_limit=8, default_max_tokens=4)
    with TestClient(create_app({"chat": chat, "index": index}, options)) as c:
        yield c


WRONG = [  # (field, value, its param, pydantic's message)
    ("max_tokens", "5", "max_tokens", "Input should be a valid integer"),
    ("max_tokens", 5.0, "max_tokens", "Input should be a valid integer"),
    ("max_completion_tokens", "5", "max_completion_tokens", "Input should be a valid integer"),
    ("temperature", "0.5", "temperature", "Input should be a valid number"),
    ("temperature", True, "temperature", "Input should be a valid number"),
    ("top_p", "0.9", "top_p", "Input should be a valid number"),
    ("seed", "5", "seed", "Input should be a valid integer"),
    ("seed", 5.0, "seed", "Input should be a valid integer"),
    ("n", "1", "n", "Input should be a valid integer"),
    ("stream", "true", "stream", "Input should be a valid boolean"),
    ("stream", 1, "stream", "Input should be a valid boolean"),
    ("stream_options", {"include_usage": "true"}, "stream_options.include_usage",
     "Input should be a valid boolean"),
    ("messages", [{"role": "user", "content": [{"type": "text", "text": 5}]}], "messages.0.content.0.text",
     "Input should be a valid string"),
]


@pytest.mark.parametrize("field,value,param,message", WRONG, ids=[f"{w[0]}={w[1]!r}" for w in WRONG])
def test_a_chat_field_of_the_wrong_type_is_an_invalid_value_naming_it(client, field, value, param, message):
    response = client.post("/v1/chat/completions", json={"model": "chat", "messages": HI, field: value})
    assert (response.status_code, response.json()) == (400, {"error": {
        "message": f"{param}: {message}", "type": "invalid_request_error", "param": param,
        "code": "invalid_value"}})


@pytest.mark.parametrize("value", ["2", 2.0, True])
def test_a_search_k_of_the_wrong_type_is_an_invalid_value(client, value):
    response = client.post("/v1/search", json={"model": "index", "query": "a dog", "k": value})
    assert (response.status_code, response.json()["error"]["param"],
            response.json()["error"]["code"]) == (400, "k", "invalid_value")


def test_ints_where_numbers_are_expected_and_json_booleans_are_taken(client):
    # the request passes validation: it is refused later, for its max_tokens over the server's limit of 8
    response = client.post("/v1/chat/completions", json={
        "model": "chat", "messages": HI, "temperature": 1, "top_p": 1, "seed": 3, "stream": False,
        "stream_options": {"include_usage": True}, "max_tokens": 9})
    assert (response.status_code, response.json()["error"]["code"]) == (400, "max_tokens_too_large")


def test_a_vqa_runs_answer_prompt_follows_the_question_as_it_trained(tmp_path):
    asked = []

    def prompt_positions(item, prompt):  # records the conversation the model would be asked, then stops
        asked.append(item["conversations"][-1]["value"])
        raise ValueError("recorded")

    vqa = SimpleNamespace(task="chat", path=tmp_path, needs_image=False, reserved=(), max_positions=None,
                          prompt_positions=prompt_positions, answer_prompt="Answer with one word.")
    with TestClient(create_app({"vqa": vqa}, ServeOptions())) as c:
        for text in ("What color is it?", "What color is it?\nAnswer with one word."):
            response = c.post("/v1/chat/completions", json={"model": "vqa", "messages": [
                {"role": "user", "content": text}]})
            assert response.status_code == 400 and "recorded" in response.json()["error"]["message"]
    assert asked == ["What color is it?\nAnswer with one word."] * 2  # added once, not twice


@pytest.mark.parametrize("query", ["", "   "])
def test_an_empty_or_blank_search_query_is_an_invalid_value(client, query):
    response = client.post("/v1/search", json={"model": "index", "query": query})
    assert (response.status_code, response.json()["error"]["param"],
            response.json()["error"]["code"]) == (400, "query", "invalid_value")
