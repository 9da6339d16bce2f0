"""The training-free drafters: registry, and strict equality with plain greedy for every drafter.

Tiny random models with sharpened logits fall into loops and copy spans, which is what the
n-gram drafters feed on, so their drafts get accepted and the acceptance paths are exercised.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import torch

from freespec.cli import main
from freespec.drafters import (
    DRAFTERS,
    FACTORIES,
    BaseDrafter,
    DrafterSettings,
    DraftModel,
    Fused,
    LayerSkip,
    Retrieval,
    check_name,
    create,
    datastore,
)
from freespec.drafters.fused import SOURCE_REST_STEPS, SOURCE_WATCH_STEPS
from freespec.drafters.ngram_trie import NgramTrie
from freespec.engine.tree import DraftTree
from tests.helpers import PROMPTS, generate, make_model, word_tokenizer

LONG_PROMPT = [2, *np.random.default_rng(7).integers(4, 256, 300).tolist(), 3]  # with the reply: 400 of 512
NAMES = ["lookup", "trie", "retrieval", "aded", "jacobi", "suffix", "recycling+lookup", "lookup+trie+aded",
         "retrieval+recycling", "recycling+jacobi", "suffix+recycling"]
MODELS = [("llama", 0), ("llama", 1), ("qwen2", 2), ("gpt2", 0)]
PLAIN: dict = {}  # plain greedy replies, which no drafter or budget changes


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir) -> str:
    """A datastore of random text and of the test models' replies (so retrieval drafts get accepted)."""
    tokenizer = word_tokenizer()
    rng = np.random.default_rng(3)
    documents = [[int(t) for t in rng.integers(4, 256, 50)] for _ in range(20)]
    for family, seed in MODELS:
        model = make_model(family, seed)
        documents += [prompt + generate(model, prompt, "none", 24).token_ids for prompt in PROMPTS]
    for family in ("gpt2", "qwen2"):  # the copy workloads of the stop and limit tests
        model = make_model(family, 0)
        prompt, _ = copy_prompt(model)
        documents.append(prompt + generate(model, prompt, "none", 40).token_ids)
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(tokenizer.convert_ids_to_tokens(d))}) + "\n"
                            for d in documents))
    out = path.parent / "store"
    assert main(["datastore", "build", str(path), "-o", str(out), "--model", str(tiny_model_dir)]) == 0
    return str(out)


def drafter_model(family, seed, budget, store):
    model = make_model(family, seed, budget)
    model.datastore = store
    return model


def copy_prompt(model, length: int = 24) -> tuple[list[int], list[int]]:
    """A prompt that holds the model's own reply to its first part, then that part again."""
    first = [2, *range(100, 130), 3]
    reply = generate(model, first, "none", length).token_ids
    return first + reply + first, reply


def test_registry_names_and_errors():
    assert DRAFTERS[-1] == "none" and {"recycling", "lookup"} <= set(DRAFTERS)
    made = {type(create(name, DrafterSettings(16))) for name in FACTORIES if name not in ("retrieval", "layerskip",
                                                                                            "draft-model")}
    made |= {LayerSkip, DraftModel, Retrieval, Fused}  # these need a runner or a datastore
    assert len(made) == 10 and all(issubclass(cls, BaseDrafter) for cls in made)  # the engine's contract
    assert check_name("lookup+recycling") == "lookup+recycling"
    assert create("none", DrafterSettings(10)) is None
    assert isinstance(create("recycling+lookup", DrafterSettings(10)), Fused)
    for bad in ("magic", "lookup+lookup", "none+lookup", "lookup+", ""):
        with pytest.raises(ValueError, match="unknown drafter .*choose from recycling"):
            create(bad, DrafterSettings(10))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("family,seed", MODELS)
@pytest.mark.parametrize("budget", [3, 16, None])
def test_drafter_equals_plain_greedy(name, family, seed, budget, store):
    model = drafter_model(family, seed, budget, store)
    for prompt in [*PROMPTS, LONG_PROMPT]:
        key = (family, seed, tuple(prompt))
        plain = PLAIN[key] = PLAIN.get(key) or generate(model, prompt, "none", 40)
        fast = generate(model, prompt, name, 40)
        assert fast.token_ids == plain.token_ids, prompt[:4]
        assert fast.finish_reason == plain.finish_reason


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("max_new_tokens", [1, 2, 5, 13])
def test_token_limit_inside_a_draft(name, max_new_tokens, store):
    model = drafter_model("gpt2", 0, 16, store)
    prompt, _ = copy_prompt(model)
    generate(model, prompt, name, 40)  # warm the drafters that learn across requests
    plain = generate(model, prompt, "none", max_new_tokens)
    fast = generate(model, prompt, name, max_new_tokens)
    assert fast.token_ids == plain.token_ids and len(fast.token_ids) == max_new_tokens
    assert fast.finish_reason == "length"
    if max_new_tokens > 1:  # the limit fell inside an accepted draft
        assert fast.stats.forward_passes < max_new_tokens and fast.stats.accepted_lengths[-1] > 1


@pytest.mark.parametrize("name", NAMES)
def test_stop_token_inside_a_draft(name, store):
    model = drafter_model("qwen2", 0, 16, store)
    prompt, _ = copy_prompt(model)
    reference = generate(model, prompt, "none", 40).token_ids
    stop = next(t for i, t in enumerate(reference) if i > 3 and t not in reference[:i])
    model.stop_ids = {stop}
    plain = generate(model, prompt, "none", 40)
    fast = generate(model, prompt, name, 40)
    assert plain.token_ids[-1] == stop and plain.finish_reason == "stop"
    assert fast.token_ids == plain.token_ids and fast.finish_reason == "stop"
    # the stop token came in a drafted step, after drafts had been accepted
    assert fast.stats.draft_sizes[-1] > 0 and fast.stats.forward_passes < len(fast.token_ids)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_lookup_accepts_copied_spans(family):
    model = make_model(family, 0, budget=16)
    prompt, _ = copy_prompt(model)
    result = generate(model, prompt, "lookup", 24)
    assert result.stats.mean_accepted > 1.9  # the reply copies part of the prompt


def test_fused_merges_sources_and_keeps_best_first_order():
    model = make_model("llama", 0, budget=16)
    prompt, _ = copy_prompt(model)
    fused = generate(model, prompt, "recycling+lookup", 24)
    # the fused drafter at least matches its best source on a workload one of them suits
    assert fused.stats.mean_accepted >= generate(model, prompt, "lookup", 24).stats.mean_accepted - 0.5
    drafter, _ = model.drafter("recycling+lookup")
    tree = drafter.propose(np.array(prompt), 16)
    assert len(tree) == 17 and np.all(np.diff(tree.scores[1:]) <= 0)
    assert np.all(tree.scores[1:] <= tree.scores[tree.parents[1:]])


def test_fused_passes_the_root_alone_to_every_source():
    fused = create("recycling+lookup", DrafterSettings(16))
    fused.begin(np.array([1, 2, 3]), None)
    root = DraftTree.root_only(3)
    logits = torch.zeros(1, 16)
    logits[0, 5] = 4.0
    fused.learn(root, logits, [0])  # no propose came first: budget 0 this step
    assert fused.drafters[0].tables.successors[3, 0] == 5


class FixedDrafter(BaseDrafter):
    """Test-only source: always the same tree; records what each learn receives."""

    shadow_drafts = True

    def __init__(self, tokens: list[int], parents: list[int]):
        self.tree = DraftTree(np.array(tokens), np.array(parents))
        self.updates = []

    def propose(self, context, budget) -> DraftTree:
        return self.tree

    def learn(self, tree, logits, accepted) -> None:
        self.updates.append((tree.tokens.tolist(), logits[:, 0].tolist(), accepted))


def test_fused_sources_learn_from_a_verified_prefix_of_a_shadow_draft():
    a, b = FixedDrafter([9, 1, 2], [-1, 0, 1]), FixedDrafter([9, 3], [-1, 0])
    fused = Fused([a, b])
    assert fused.shadow_drafts
    tree = fused.propose(np.array([9]), 3)
    assert tree.tokens.tolist() == [9, 1, 3, 2] and tree.parents.tolist() == [-1, 0, 0, 1]
    logits = torch.tensor([[10.0], [11.0]])  # the engine verified the first two nodes only
    fused.learn(tree.prefix(2), logits, [0, 1])
    assert a.updates == [([9, 1], [10.0, 11.0], [0, 1])]  # its node 2 (merged 3) was not verified
    assert b.updates == [([9], [10.0], [0])]  # its node 1 (merged 2) neither


def test_fused_hands_each_source_its_own_rows_and_none_to_a_source_that_reads_no_logits():
    a, b = FixedDrafter([9, 3, 4], [-1, 0, 1]), FixedDrafter([9, 1, 2], [-1, 0, 1])
    b.reads_logits = False
    fused = Fused([a, b])
    assert fused.reads_logits
    tree = fused.propose(np.array([9]), 4)  # interleaved by score: a's 3, b's 1, a's 4, b's 2
    assert tree.tokens.tolist() == [9, 3, 1, 4, 2]
    fused.learn(tree, torch.arange(5.0).unsqueeze(1), [0, 1])
    assert a.updates == [([9, 3, 4], [0.0, 1.0, 3.0], [0, 1])]
    assert b.updates == [([9, 1, 2], [], [0])]


def test_fused_calibration_learns_that_agreeing_sources_are_right_more_often():
    a, b = FixedDrafter([9, 1, 5], [-1, 0, 0]), FixedDrafter([9, 1, 6], [-1, 0, 0])  # both draft 1, then 5 or 6
    fused = Fused([a, b])
    fused.calibration.refresh = 1
    for _ in range(30):  # 1 is always accepted, 5 and 6 never
        tree = fused.propose(np.array([9]), 3)
        fused.learn(tree, torch.zeros(len(tree), 1), [0, tree.child_holding(0, 1)])
    tree = fused.propose(np.array([9]), 3)
    score = dict(zip(tree.tokens.tolist(), tree.scores.tolist()))
    assert score[1] > 0.6 and score[5] < 0.05 and score[6] < 0.05  # untrained: 0.5, 0.25 and 0.25


def test_fused_calibration_tells_a_node_another_source_contradicts_from_one_it_left_alone():
    """A stored answer's chain past where Token Recycling's tree stops is right far more often than
    a node another source drafted another token against: the two are calibrated apart."""
    a, b = FixedDrafter([9, 1, 2], [-1, 0, 1]), FixedDrafter([9, 1], [-1, 0])
    a.tree = DraftTree(np.array([9, 1, 2]), np.array([-1, 0, 1]), np.array([1.0, 0.55, 0.55**2]))  # a bin's centre
    fused = Fused([a, b])
    fused.calibration.refresh = 1
    contradicting = DraftTree(np.array([9, 1, 7]), np.array([-1, 0, 1]))
    leaving = DraftTree(np.array([9, 1]), np.array([-1, 0]))

    def step(b_tree: DraftTree, truth: int | None = None) -> dict[int, float]:
        b.tree = b_tree
        tree = fused.propose(np.array([9]), 3)
        if truth is not None:
            path = [0, tree.child_holding(0, 1)]
            fused.learn(tree, torch.zeros(len(tree), 1), [*path, tree.child_holding(path[-1], truth)])
        return dict(zip(tree.tokens.tolist(), tree.scores.tolist()))

    for _ in range(30):  # after 9 → 1: b's 7 when b drafts it, else a's 2
        step(contradicting, 7)
        step(leaving, 2)
    alone, against = step(leaving), step(contradicting)
    assert alone[2] / alone[1] > 0.8 and against[2] / against[1] < 0.2  # untrained: 0.55 both


def test_a_fusion_of_many_sources_keeps_counts_only_for_the_groups_it_meets():
    """Ten sources name 4^10 groups (who drafted a node, who drafted another child of its parent):
    a table for each was 1.5 GB; only the groups met take memory."""
    import tracemalloc

    tracemalloc.start()
    try:
        fused = Fused([FixedDrafter([9, token], [-1, 0]) for token in range(1, 11)])
        fused.calibration.refresh = 1
        for _ in range(20):
            tree = fused.propose(np.array([9]), 4)
            fused.learn(tree, torch.zeros(len(tree), 1), [0, tree.child_holding(0, 3)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert fused.calibration.groups == 4**10 and peak < 8 << 20


class CacheDrafter(FixedDrafter):
    """Test-only source whose learning is a cache of the model's top candidates, as Token Recycling's."""

    learning_optional = True
    reads_top_k = 8
    wants_prompt_logits = True

    def __init__(self, tokens: list[int], parents: list[int]):
        super().__init__(tokens, parents)
        self.proposals = 0

    def propose(self, context, budget) -> DraftTree:
        self.proposals += 1
        return self.tree


def fused_steps(fused: Fused, count: int, truth: int, forward_seconds: float = 0.0) -> list[list[int]]:
    """``count`` steps of ``fused`` whose text goes on with ``truth``; the tokens of each draft."""
    drafts = []
    for _ in range(count):
        tree = fused.propose(np.array([9]), 3)
        time.sleep(forward_seconds)
        child = tree.child_holding(0, truth)
        fused.learn(tree, torch.zeros(len(tree), 1), [0] if child is None else [0, child])
        drafts.append(tree.tokens.tolist())
    return drafts


def test_a_fused_source_whose_drafts_do_not_pay_for_its_time_sits_out_then_is_watched_again():
    """A cache-learning source (Token Recycling) that brought no token the others had not drafted
    drafts nothing for 64 steps after 33 watched ones: it is not asked, learns nothing, and the
    fusion no longer asks the engine for top candidates; then it is watched again."""
    copy, cache = FixedDrafter([9, 1, 2], [-1, 0, 1]), CacheDrafter([9, 5], [-1, 0])
    copy.reads_logits = False
    fused = Fused([copy, cache])
    assert fused.reads_logits and fused.reads_top_k == 8 and fused.wants_prompt_logits
    drafts = fused_steps(fused, SOURCE_WATCH_STEPS + 1, truth=1)  # 5 is never the next token
    assert all(5 in draft for draft in drafts) and cache.proposals == SOURCE_WATCH_STEPS + 1
    assert fused.uses[0] is None and fused.uses[1].resting == SOURCE_REST_STEPS[0]
    assert not fused.reads_logits and fused.reads_top_k == 0  # the engine may skip its top candidates
    assert not fused.wants_prompt_logits  # and the prompt's logits at the next request's start
    learned = len(cache.updates)
    fused.learn(DraftTree.root_only(3), torch.zeros(0, 1), [0])  # a step the engine drafted nothing for
    assert len(cache.updates) == learned and copy.updates[-1][0] == [3]
    drafts = fused_steps(fused, SOURCE_REST_STEPS[0], truth=1)
    assert not any(5 in draft for draft in drafts) and cache.proposals == SOURCE_WATCH_STEPS + 1
    assert len(cache.updates) == learned and fused.uses[1].resting == 0
    assert 5 in fused_steps(fused, 1, truth=1)[0] and fused.reads_logits  # watched again


def test_a_fused_source_that_brings_tokens_worth_its_time_keeps_drafting():
    copy, cache = FixedDrafter([9, 1, 2], [-1, 0, 1]), CacheDrafter([9, 5], [-1, 0])
    fused = Fused([copy, cache])
    drafts = fused_steps(fused, 2 * SOURCE_WATCH_STEPS, truth=5, forward_seconds=0.001)  # only it drafts 5
    assert all(5 in draft for draft in drafts) and fused.uses[1].resting == 0


class ShadowLearningFixedDrafter(FixedDrafter):
    """Test-only source that also learns from shadow drafts; records what it is told."""

    def __init__(self, tokens: list[int], parents: list[int]):
        super().__init__(tokens, parents)
        self.shadows = []

    def learn_shadow(self, tree, path, verified) -> None:
        self.shadows.append((tree.tokens.tolist(), path, verified))


def test_fused_passes_a_resolved_shadow_to_its_sources_that_learn_from_shadows():
    a, b = ShadowLearningFixedDrafter([9, 1, 2], [-1, 0, 1]), FixedDrafter([9, 3], [-1, 0])
    fused = Fused([a, b])
    tree = fused.propose(np.array([9]), 3)  # merged [9, 1, 3, 2]: a's nodes are merged 0, 1, 3
    fused.learn_shadow(tree, [0, 1, 3], verified=1)  # the model went 9 → 1 → 2; node 1 was verified
    assert a.shadows == [([9, 1, 2], [0, 1, 2], 1)]
    fused.learn_shadow(DraftTree.root_only(9), [0], 0)  # not a draft it proposed: nothing to pass on
    assert len(a.shadows) == 1


def test_trie_drafts_a_repeated_request_from_the_first():
    model = make_model("llama", 1, budget=16)
    first = generate(model, PROMPTS[1], "trie", 40)
    again = generate(model, PROMPTS[1], "trie", 40)  # the trie is shared across requests
    assert again.token_ids == first.token_ids == generate(model, PROMPTS[1], "none", 40).token_ids
    assert again.stats.mean_accepted > max(2.0, first.stats.mean_accepted)


def test_trie_stays_within_its_capacity():
    trie = NgramTrie(window=4, capacity=40)
    trie.feed(np.random.default_rng(0).integers(0, 50, 500).tolist())
    assert 0 < trie.size <= 40
    assert trie.size == sum(1 for _ in _nodes(trie.root)) - 1


def _nodes(node):
    yield node
    for child in node.children.values():
        yield from _nodes(child)


def test_retrieval_drafts_replies_found_in_the_corpus(store):
    model = drafter_model("llama", 1, 16, store)
    result = generate(model, PROMPTS[1], "retrieval", 24)  # this reply is in the corpus
    assert result.token_ids == generate(model, PROMPTS[1], "none", 24).token_ids
    assert result.stats.mean_accepted > 3.0


def test_retrieval_needs_a_datastore_built_with_its_tokenizer(tmp_path, store):
    model = make_model("llama", 0)
    with pytest.raises(ValueError, match="needs a datastore: build one with `freespec datastore build"):
        generate(model, PROMPTS[0], "retrieval")
    model.datastore = tmp_path
    with pytest.raises(ValueError, match="is not a freespec datastore"):
        generate(model, PROMPTS[0], "retrieval")
    model.datastore = store
    model.tokenizer = word_tokenizer()
    model.tokenizer.add_tokens(["w999"])
    with pytest.raises(ValueError, match="built with another tokenizer"):
        generate(model, PROMPTS[0], "retrieval")


def test_a_datastore_holding_ids_outside_the_vocabulary_is_refused_when_opened(tmp_path):
    """Its ids are drafted straight into the model's embedding lookup: a bad one must never get there."""
    tokenizer = word_tokenizer()
    good = tmp_path / "good"
    datastore.build(["w1 w2 w3 w1 w2 w4", "w5 w6"], tokenizer, good)
    tokens = np.load(good / "tokens.npy")
    assert datastore.Datastore(good, tokenizer, vocab_size=256).tokens.tolist() == tokens.tolist()
    model = make_model("llama", 0)  # vocabulary 256
    for name, bad, found in [("big", 10**6, 10**6), ("negative", -3, -3), ("vocab", 256, 256)]:
        folder = tmp_path / name
        shutil.copytree(good, folder)
        changed = tokens.copy()
        changed[2] = bad
        np.save(folder / "tokens.npy", changed)
        message = f"{folder / 'tokens.npy'}: token ids must lie in \\[-1, 256\\), found {found}"
        with pytest.raises(ValueError, match=message):
            create("retrieval", DrafterSettings(256, datastore=folder, tokenizer=tokenizer))
        with pytest.raises(ValueError, match=message):
            create("aded", DrafterSettings(256, datastore=folder, tokenizer=tokenizer))
        model.datastore = folder
        model.reset()  # forget the drafters made with the previous datastore
        with pytest.raises(ValueError, match=message):  # a request, not a crash in the embedding lookup
            generate(model, PROMPTS[0], "retrieval")
    np.save(tmp_path / "vocab" / "tokens.npy", tokens.astype(np.float32))
    with pytest.raises(ValueError, match="tokens.npy: expected a 1-D integer array, got float32"):
        datastore.Datastore(tmp_path / "vocab", tokenizer)
    np.save(tmp_path / "vocab" / "tokens.npy", tokens)
    np.save(tmp_path / "vocab" / "suffixes.npy", np.full(len(tokens), len(tokens)))
    with pytest.raises(ValueError, match=rf"suffixes.npy: suffix positions must lie in \[0, {len(tokens)}\), found"):
        datastore.Datastore(tmp_path / "vocab", tokenizer)


@pytest.mark.parametrize("seed", range(5))
def test_suffix_array_and_find_agree_with_brute_force(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(-1, 4, 200)
    suffixes = datastore.suffix_array(tokens)
    assert [tokens[i:].tolist() for i in suffixes] == sorted(tokens[i:].tolist() for i in range(len(tokens)))
    for query in ([0], [1, 2], [3, 3, 0], rng.integers(0, 4, 4).tolist()):
        low, high = datastore.find(tokens, suffixes, query)
        expected = sorted(i for i in range(len(tokens)) if tokens[i : i + len(query)].tolist() == query)
        assert sorted(suffixes[low:high].tolist()) == expected


def test_datastore_build_reports_bad_corpora(tmp_path, tiny_model_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "w1 w2"}\n{"id": 3}\n')
    assert main(["datastore", "build", str(bad), "-o", str(tmp_path / "s"), "--model", str(tiny_model_dir)]) == 2
    assert "bad.jsonl line 2: no text in this record" in capsys.readouterr().err
    assert main(["datastore", "build", str(tmp_path / "missing.txt"), "-o", str(tmp_path / "s")]) == 2
    assert "corpus not found" in capsys.readouterr().err
    assert main(["datastore", "build", str(tmp_path), "-o", str(tmp_path / "s")]) == 2
    assert f"{tmp_path} is a folder; the corpus is one text or JSONL file" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")  # the tokenizer failed on the empty batch: a traceback
    assert main(["datastore", "build", str(empty), "-o", str(tmp_path / "s"), "--model", str(tiny_model_dir)]) == 2
    assert capsys.readouterr().err == "freespec: error: the corpus holds no text\n"


def test_aded_learns_a_loop_and_reads_a_corpus_prior(store):
    model = make_model("llama", 0, budget=16)  # its reply falls into a loop of 8 tokens
    first = generate(model, PROMPTS[0], "aded", 48)
    again = generate(model, PROMPTS[0], "aded", 48)  # the table is shared across requests
    assert again.token_ids == first.token_ids
    assert again.stats.mean_accepted > max(2.0, first.stats.mean_accepted)
    cold = make_model("llama", 1, budget=16)
    with_prior = drafter_model("llama", 1, 16, store)  # the corpus holds this reply
    assert (generate(with_prior, PROMPTS[1], "aded", 24).stats.mean_accepted
            > generate(cold, PROMPTS[1], "aded", 24).stats.mean_accepted)


def test_cli_takes_drafter_names_fusions_and_a_datastore(tiny_model_dir, store, capsys):
    from freespec.api import load

    prompt = "w1 w2 w3 w4 w5 w6"
    expected = load(str(tiny_model_dir)).generate(prompt, max_new_tokens=12, drafter="none").text
    for name in ("lookup+trie", "retrieval"):
        assert main(["generate", prompt, "--model", str(tiny_model_dir), "--drafter", name,
                     "--datastore", store, "--max-new-tokens", "12"]) == 0
        out, err = capsys.readouterr()
        assert out == expected + "\n" and f"drafter {name})" in err
    assert main(["generate", prompt, "--model", str(tiny_model_dir), "--drafter", "magic"]) == 2
    assert "freespec: error: argument --drafter: unknown drafter 'magic'; choose from recycling, lookup" in \
        capsys.readouterr().err
    assert main(["generate", prompt, "--model", str(tiny_model_dir), "--drafter", "retrieval"]) == 2
    assert "freespec: error: the retrieval drafter needs a datastore" in capsys.readouterr().err


def test_jacobi_window_converges_on_a_loop():
    model = make_model("qwen2", 2, budget=16)
    first = generate(model, PROMPTS[0], "jacobi", 48)
    again = generate(model, PROMPTS[0], "jacobi", 48)  # the n-gram pool is kept across requests
    assert first.token_ids == again.token_ids == generate(model, PROMPTS[0], "none", 48).token_ids
    assert first.stats.mean_accepted > 1.5 and again.stats.mean_accepted > 2.5


def test_lookup_index_grows_incrementally():
    from freespec.drafters.lookup import NgramIndex, PromptLookup

    context = np.random.default_rng(1).integers(0, 20, 3000)
    drafter = PromptLookup()
    drafter.begin(context[:100], None)
    for end in (100, 101, 137, 3000):  # each proposal indexes only the tokens it has not seen
        tree = drafter.propose(context[:end], 8)
        assert len(drafter.index) == end and tree.tokens[0] == context[end - 1]
    scratch = NgramIndex(drafter.key)
    scratch.extend(context.tolist())
    assert scratch.positions == drafter.index.positions


def _random_tree(rng, root, size, vocab=4):
    tokens, parents, scores = [root], [-1], [1.0]
    for i in range(1, size):
        parent = int(rng.integers(0, i))
        tokens.append(int(rng.integers(0, vocab)))
        parents.append(parent)
        scores.append(scores[parent] * float(rng.uniform(0.2, 1.0)))
    return DraftTree(np.array(tokens), np.array(parents), np.array(scores))


def _paths(tree):
    paths = [()]
    for i in range(1, len(tree)):
        paths.append(paths[tree.parents[i]] + (int(tree.tokens[i]),))
    return paths


@pytest.mark.parametrize("seed", range(5))
def test_merged_trees_keep_paths_and_best_first_order(seed):
    from freespec.drafters.fused import merge_trees

    rng = np.random.default_rng(seed)
    sources = [_random_tree(rng, 9, int(rng.integers(1, 30))) for _ in range(3)]
    budget = int(rng.integers(0, 40))
    merged, where, *_ = merge_trees(sources, budget)
    merged_paths = _paths(merged)
    assert len(merged) - 1 == min(budget, len({p for s in sources for p in _paths(s)[1:]}))
    assert len(set(merged_paths)) == len(merged_paths)  # common prefixes merged
    assert np.all(np.diff(merged.scores[1:]) <= 0)  # best-first
    for source, index in zip(sources, where):
        for node, path in enumerate(_paths(source)):
            if index[node] >= 0:
                assert merged_paths[index[node]] == path
            else:  # cut: every kept node scores at least as much
                assert path in merged_paths or len(merged) - 1 == budget


@pytest.mark.parametrize("name", NAMES)
def test_context_limit_inside_a_draft(name, store):
    model = drafter_model("llama", 0, 16, store)
    prompt = [2, *([7] * 500), 3]  # the context is 512: drafts must shrink to the room left
    plain = generate(model, prompt, "none", 100)
    fast = generate(model, prompt, name, 100)
    assert fast.token_ids == plain.token_ids and len(fast.token_ids) == 512 - len(prompt)
