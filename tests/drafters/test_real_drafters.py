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


def test_a_state_file_warms_the_suffix_drafter_of_a_new_process(tmp_path):
    """The embedded model's answers stored by one model and loaded by a fresh one: the second
    asking drafts the stored answer (many fewer passes), with plain greedy's tokens, sampled
    ones with a seed too."""
    first = freespec.load()
    plain = first.generate(PROMPTS[1], drafter="none", max_new_tokens=48).token_ids
    assert first.generate(PROMPTS[1], drafter="suffix", max_new_tokens=48).token_ids == plain
    first.save_state(tmp_path / "drafters.state")
    cold, warm = freespec.load(), freespec.load()
    warm.load_state(tmp_path / "drafters.state")
    runs = [model.generate(PROMPTS[1], drafter="suffix", max_new_tokens=48) for model in (cold, warm)]
    assert [run.token_ids for run in runs] == [plain, plain]
    assert runs[1].stats.mean_accepted > max(2.5, 2 * runs[0].stats.mean_accepted)  # 3.7-4.4 seen, cold 1.1
    sampled = [model.generate(PROMPTS[1], drafter=drafter, max_new_tokens=24, temperature=0.8, seed=5).token_ids
               for model, drafter in ((cold, "none"), (warm, "suffix"))]
    assert sampled[0] == sampled[1]
