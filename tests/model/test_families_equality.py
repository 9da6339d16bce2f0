"""Lossless on every family of tests.helpers.FAMILIES: each drafter's output equals plain greedy,
token for token, with drafts that straddle the sliding windows; a reused prefix changes no token;
a seed fixes sampled text whatever drafts."""

import pytest

from freespec.api import Model
from freespec.drafters import datastore
from freespec.model.loading import from_transformers
from tests.helpers import FAMILIES, PROMPTS, generate, tiny_model, word_tokenizer

NAMES = ["recycling", "lookup", "trie", "retrieval", "aded", "jacobi", "layerskip", "draft-model", "recycling+lookup"]
COPY_PROMPT = [2, *range(100, 124), 3, *range(100, 124), 3]  # its reply copies spans of it: lookup drafts get accepted


def family_model(family: str, budget: int | None = 12, tree: str = "dynamic", layers: int = 3) -> Model:
    """A 3-layer tiny target whose draft model is itself (draft-model drafts are then accepted)."""
    target = tiny_model(family, seed=0, scale=8.0, layers=layers)
    return Model(from_transformers(target, word_tokenizer(), family), budget=budget, tree_shape=tree,
                 draft_model=from_transformers(target, word_tokenizer(), "itself"))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_drafter_equals_plain_greedy(family, tmp_path):
    model = family_model(family)
    prompts = [PROMPTS[1], COPY_PROMPT]
    plain = [generate(model, prompt, "none", 24) for prompt in prompts]
    model.datastore = tmp_path / "store"  # retrieval finds the replies in its corpus
    datastore.build([model.decode(p + r.token_ids) for p, r in zip(prompts, plain)], model.tokenizer, model.datastore)
    for name in NAMES:
        results = [generate(model, prompt, name, 24) for prompt in prompts]
        assert [r.token_ids for r in results] == [p.token_ids for p in plain], name
        if name in ("lookup", "retrieval", "draft-model"):  # their drafts of copied or known text are accepted
            assert sum(r.stats.new_tokens for r in results) > sum(r.stats.forward_passes for r in results), name


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("budget, tree", [(48, "static"), (None, "dynamic")])
def test_large_and_cost_chosen_trees_equal_plain_greedy(family, budget, tree):
    """48-node static trees reach four windows deep; the cost-chosen budget may switch drafting off."""
    model = family_model(family, budget, tree)
    for prompt in (PROMPTS[0], COPY_PROMPT):
        plain = generate(model, prompt, "none", 32)
        fast = generate(model, prompt, "recycling", 32)
        assert fast.token_ids == plain.token_ids and fast.finish_reason == plain.finish_reason


@pytest.mark.parametrize("family", FAMILIES)
def test_a_reused_prefix_changes_no_token(family):
    """A second turn keeps the first turn's rows, windows and all: the tokens a fresh prefill gives."""
    model = family_model(family)
    first = generate(model, PROMPTS[1], "recycling", 24)
    second_prompt = PROMPTS[1] + first.token_ids + [2, 7, 8, 9, 3]
    for drafter in ("recycling", "none"):
        generate(model, PROMPTS[1], drafter, 24)  # leave the first turn cached
        warm = generate(model, second_prompt, drafter, 24)
        cold = family_model(family).generate(prompt_ids=second_prompt, drafter=drafter, max_new_tokens=24,
                                             reuse_prefix=False)
        assert warm.token_ids == cold.token_ids, drafter
        assert warm.stats.cached_tokens >= len(PROMPTS[1]) and cold.stats.cached_tokens == 0


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "phi3"])
def test_a_seed_fixes_sampled_text_whatever_drafts(family):
    model = family_model(family)
    options = dict(max_new_tokens=32, temperature=0.8, top_p=0.95, seed=3)
    plain = model.generate(prompt_ids=COPY_PROMPT, drafter="none", **options)
    for drafter in ("recycling", "lookup"):
        assert model.generate(prompt_ids=COPY_PROMPT, drafter=drafter, **options).token_ids == plain.token_ids
    assert model.generate(prompt_ids=COPY_PROMPT, drafter="none", **{**options, "seed": 4}).token_ids \
        != plain.token_ids
