"""The embedded SmolLM2-135M-Instruct with each training-free drafter: output equals plain greedy."""

import pytest

import freespec
from freespec.drafters import datastore

pytestmark = pytest.mark.real_model  # the real SmolLM2-135M GGUF: skip with -m 'not real_model'

# a prompt whose answer copies from it, and one whose answer does not
PROMPTS = [
    "Repeat this sentence exactly: The quick brown fox jumps over the lazy dog near the river bank.",
    "List three uses of copper.",
]
NAMES = ["lookup", "trie", "retrieval", "aded", "jacobi", "suffix", "recycling+lookup", "suffix+recycling"]


@pytest.fixture(scope="module")
def model():
    return freespec.load(budget=8)


@pytest.fixture(scope="module")
def plain(model, tmp_path_factory):
    """Plain replies; the retrieval drafter's corpus holds their text."""
    replies = [model.generate(prompt, drafter="none", max_new_tokens=24).token_ids for prompt in PROMPTS]
    model.datastore = tmp_path_factory.mktemp("real-store")
    datastore.build([model.decode(reply) for reply in replies], model.tokenizer, model.datastore)
    return replies


@pytest.mark.parametrize("name", NAMES)
def test_drafter_equals_plain_on_the_real_model(model, plain, name):
    results = [model.generate(prompt, drafter=name, max_new_tokens=24) for prompt in PROMPTS]
    assert [r.token_ids for r in results] == plain
    if name != "jacobi":  # the others draft the copied sentence from the prompt or the corpus
        assert results[0].stats.mean_accepted > 1.0
