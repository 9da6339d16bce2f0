"""The server runs a model without a fast path (through transformers) end to end."""

from __future__ import annotations

from freespec import DEFAULT_DRAFTER
from freespec.api import Model
from freespec.model.hf_runner import TransformersRunner
from freespec.model.loading import from_transformers
from freespec.serve.app import BackgroundServer, create_app
from tests.helpers import fallback_model, post, word_tokenizer

CHAT = [{"role": "user", "content": "w1 w2 w3 w4 w1 w2"}]


def test_a_fallback_model_answers_plain_greedy_and_reuses_no_rows():
    model = Model(from_transformers(fallback_model("gpt_neox"), word_tokenizer(), "neox"))
    assert isinstance(model.runner, TransformersRunner)
    expected = model.generate(messages=CHAT, max_new_tokens=16, drafter="none")
    with BackgroundServer(create_app(model, served_name="neox", drafters=["none", "lookup"])) as url:
        for drafter in (DEFAULT_DRAFTER, "lookup"):  # the second request repeats the first one's prompt
            status, body, _ = post(url + "/v1/chat/completions",
                                   {"model": "neox", "messages": CHAT, "max_tokens": 16, "drafter": drafter})
            assert status == 200, body
            assert body["choices"][0]["message"]["content"] == expected.text
            assert body["usage"]["completion_tokens"] == len(expected.token_ids)
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
