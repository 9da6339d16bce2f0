"""Log-probabilities over HTTP: chat's ``logprobs``/``top_logprobs`` and completions' ``logprobs``
carry the model's own values (the Python API's, bit for bit), whole or streamed, whatever the drafter."""

from __future__ import annotations

import json

import openai
import pytest

import freespec
from freespec.serve.app import BackgroundServer, create_app
from tests.helpers import open_stream

CHAT = [{"role": "user", "content": "w1 w2 w3 w4"}]
PROMPT = "w9 w8 w7"


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    app = create_app(freespec.load(str(tiny_model_dir)), served_name="tiny", max_tokens=16,
                     drafters=("none", "suffix", "recycling"))
    with BackgroundServer(app) as url:
        yield url


@pytest.mark.parametrize("drafter", ["none", "suffix", "recycling"])
def test_chat_logprobs_are_the_models(client, reference, drafter):
    expected = reference.generate(messages=CHAT, max_new_tokens=20, drafter="none", logprobs=3)
    reply = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, logprobs=True, top_logprobs=3,
                                           extra_body={"drafter": drafter})
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens == len(expected.token_ids)
    assert [entry.logprob for entry in content] == [entry.logprob for entry in expected.logprobs]
    pieces = reference.tokenizer.convert_ids_to_tokens(expected.token_ids)
    assert [entry.token for entry in content] == pieces
    for entry, record in zip(content, expected.logprobs):
        assert bytes(entry.bytes) == entry.token.encode()
        assert [(top.token, top.logprob) for top in entry.top_logprobs] == [
            (reference.tokenizer.convert_ids_to_tokens(token), logprob) for token, logprob in record.top]
    without = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20)
    assert without.choices[0].logprobs is None
    assert without.choices[0].message.content == reply.choices[0].message.content
    only_chosen = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=20, logprobs=True)
    assert [entry.top_logprobs for entry in only_chosen.choices[0].logprobs.content] == [[]] * len(content)


def test_completion_logprobs_have_the_legacy_shape(client, reference):
    expected = reference.generate(PROMPT, chat=False, max_new_tokens=12, drafter="none", logprobs=2)
    reply = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, logprobs=2)
    logprobs = reply.choices[0].logprobs
    pieces = [reference.tokenizer.convert_ids_to_tokens(token) for token in expected.token_ids]
    assert logprobs.tokens == pieces
    assert logprobs.token_logprobs == [entry.logprob for entry in expected.logprobs]
    assert logprobs.top_logprobs == [{reference.tokenizer.convert_ids_to_tokens(token): logprob
                                      for token, logprob in entry.top} for entry in expected.logprobs]
    assert logprobs.text_offset == [sum(map(len, pieces[:index])) for index in range(len(pieces))]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streamed_logprobs_are_the_whole_answers(server, path):
    chat = path == "/v1/chat/completions"
    body = ({"messages": CHAT, "logprobs": True, "top_logprobs": 2} if chat else {"prompt": PROMPT, "logprobs": 2})
    body = {**body, "max_tokens": 14, "model": "tiny", "drafter": "suffix"}
    connection, response = open_stream(server, body, path)
    chunks = []
    for line in response:
        line = line.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            chunks.append(json.loads(line[len("data: "):]))
    connection.close()
    streamed = [chunk["choices"][0]["logprobs"] for chunk in chunks if chunk["choices"][0]["logprobs"]]
    whole = json.loads(json.dumps(openai.OpenAI(base_url=server + "/v1", api_key="unused").post(
        path.removeprefix("/v1"), body=body, cast_to=object)))["choices"][0]["logprobs"]
    if chat:
        assert [entry for part in streamed for entry in part["content"]] == whole["content"]
    else:
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert [value for part in streamed for value in part[key]] == whole[key], key
    assert len(streamed) > 1  # they came with the text, not all at the end


def test_echo_scores_the_prompt_and_puts_it_before_the_answer(client, reference):
    ids = reference.encode(PROMPT, chat=False)
    scored = reference.generate(prompt_ids=ids, max_new_tokens=0, prompt_logprobs=2)
    alone = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=2)
    assert alone.choices[0].text == PROMPT and alone.usage.completion_tokens == 0
    logprobs = alone.choices[0].logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing predicts the first
    assert logprobs.token_logprobs[1:] == [entry.logprob for entry in scored.prompt_logprobs[1:]]
    assert logprobs.tokens == [reference.tokenizer.convert_ids_to_tokens(token) for token in ids]
    answer = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, logprobs=2)
    both = client.completions.create(model="tiny", prompt=ids, max_tokens=10, echo=True, logprobs=2,
                                     extra_body={"drafter": "suffix"})
    assert both.choices[0].text == reference.decode(ids) + answer.choices[0].text
    answered = answer.choices[0].logprobs.token_logprobs
    assert both.choices[0].logprobs.token_logprobs == logprobs.token_logprobs + answered
    plain = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, echo=True)
    assert plain.choices[0].text == PROMPT + answer.choices[0].text and plain.choices[0].logprobs is None


@pytest.mark.parametrize("max_tokens", [0, 6])
def test_a_streamed_echo_starts_with_the_prompt(server, max_tokens):
    body = {"prompt": PROMPT, "max_tokens": max_tokens, "echo": True, "logprobs": 1, "model": "tiny"}
    connection, response = open_stream(server, body, "/v1/completions")
    chunks = [json.loads(line[len("data: "):]) for line in (raw.decode().strip() for raw in response)
              if line.startswith("data: ") and line != "data: [DONE]"]
    connection.close()
    whole = openai.OpenAI(base_url=server + "/v1", api_key="unused").completions.create(**body)
    texts = [chunk["choices"][0]["text"] for chunk in chunks]
    assert texts[0].startswith(PROMPT) and "".join(texts) == whole.choices[0].text
    streamed = [value for chunk in chunks if chunk["choices"][0]["logprobs"]
                for value in chunk["choices"][0]["logprobs"]["token_logprobs"]]
    assert streamed == whole.choices[0].logprobs.token_logprobs


@pytest.mark.parametrize("drafter", ["suffix", "recycling"])
def test_a_stop_string_ends_the_tokens_where_one_token_at_a_time_ends(client, reference, drafter):
    """A speculative step may accept tokens past the one that completes a stop string: they are not
    the answer's. Its tokens, their log-probabilities and its usage are plain decoding's, for a stop
    at each word of the answer."""
    words = reference.generate(PROMPT, chat=False, max_new_tokens=16, drafter="none").text.split()
    several = 0
    for word in dict.fromkeys(words[1:]):
        request = dict(model="tiny", prompt=PROMPT, max_tokens=16, logprobs=1, stop=[word])
        plain = client.completions.create(**request, extra_body={"drafter": "none"})
        fast = client.completions.create(**request, extra_body={"drafter": drafter})
        assert fast.choices[0].text == plain.choices[0].text and fast.choices[0].finish_reason == "stop"
        assert fast.usage.completion_tokens == plain.usage.completion_tokens
        assert fast.choices[0].logprobs.tokens == plain.choices[0].logprobs.tokens
        assert fast.choices[0].logprobs.token_logprobs == plain.choices[0].logprobs.token_logprobs
        several += fast.usage.model_extra["speculative"]["forward_passes"] < fast.usage.completion_tokens
    assert several  # some answers took steps of several tokens
