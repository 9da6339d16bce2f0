"""Continuous batching in the engine: several requests' steps in each pass, every answer the
tokens the same request gets alone (greedy and seeded sampling, every drafter, prefill chunks
between decoding steps), a fault failing only its request, and the draft budget shared by cost."""

from __future__ import annotations

import pytest

from freespec.api import Model
from freespec.drafters.recycling import TokenRecycling
from freespec.engine.batch import Batch, Running, share_budget
from freespec.engine.loop import Generation
from freespec.model.loading import from_transformers
from tests.helpers import fault_after_first_chunk, tiny_model, word_tokenizer

DRAFTERS = ["none", "recycling", "lookup", "suffix", "trie", "aded", "jacobi", "layerskip", "draft-model",
            "recycling+lookup"]
MODEL_DRAFTERS = ("layerskip", "draft-model")
SAMPLED = {"temperature": 0.9, "top_p": 0.95}


def _model(family: str, budget: int | None = None) -> Model:
    """A tiny target and a smaller draft model over the same vocabulary."""
    target, small = tiny_model(family, seed=0, scale=8.0), tiny_model(family, seed=9, scale=8.0, layers=1)
    return Model(from_transformers(target, word_tokenizer(), family), budget=budget,
                 draft_model=from_transformers(small, word_tokenizer(), f"{family}-draft"))


def _requests(count: int) -> list[dict]:
    """``count`` different requests: prompts of 3 to 300 tokens (the long ones are prefilled in
    several chunks between the others' steps), every drafter, greedy and seeded sampling."""
    requests = []
    for index in range(count):
        length = [3, 12, 40, 300][index % 4] + index
        prompt = [2, *[4 + (index * 31 + 7 * i) % 250 for i in range(length)], 3]
        drafter = DRAFTERS[index % len(DRAFTERS)]
        # a model drafter samples its drafts from the request's generator, so its sampled tokens
        # follow its draft sizes (which the policy's timings choose): sampled with a fixed budget below
        sampled = index % 2 and drafter not in MODEL_DRAFTERS
        sampling = {**SAMPLED, "seed": index} if sampled else {}
        requests.append(dict(prompt_ids=prompt, drafter=drafter, max_new_tokens=24 + index % 5, **sampling))
    return requests


def _alone(model: Model, request: dict) -> list[int]:
    return model.fork().generate(**request).token_ids


def _together(model: Model, requests: list[dict], batch: Batch) -> list[Running]:
    running = [Running(model.fork().stream(**request)) for request in requests]
    while not all(request.generation.done or request.error for request in running):
        batch.step(running)
    return running


@pytest.mark.parametrize("family", ["llama", "gemma2"])  # the one-call C decoder; the per-op path with windows
def test_every_request_of_a_batch_gets_its_answer_alone(family):
    model = _model(family)
    requests = _requests(16)
    alone = [_alone(model, request) for request in requests]
    for count in (3, 16):
        together = _together(model, requests[:count], Batch(prefill_rows=32))
        assert [request.error for request in together] == [None] * count
        assert [request.generation.token_ids for request in together] == alone[:count]


@pytest.mark.parametrize("parallel", [1, 3, 8])
def test_generate_many_gives_each_request_its_answer_alone_in_order(parallel):
    """Model.generate_many: the requests' results in order, each what generate() gives it alone
    (stop strings, log-probabilities, penalties and a shared prompt start included)."""
    model = _model("llama")
    shared = [2, *range(40, 90)]  # 51 tokens the first requests start with: prefilled once
    requests = [
        dict(prompt_ids=[*shared, 7, 3], drafter="lookup", max_new_tokens=20, stop=["w9", "w1"], logprobs=2),
        dict(prompt_ids=[*shared, 8, 3], drafter="suffix", max_new_tokens=20, frequency_penalty=1.0,
             logit_bias={5: -100.0}),
        dict(prompt_ids=[*shared, 9, 3], drafter="none", max_new_tokens=20, prompt_logprobs=1),
        *_requests(10),
    ]
    alone = [model.fork().generate(**request) for request in requests]
    many = list(model.generate_many(requests, parallel=parallel))
    assert [(r.text, r.token_ids, r.finish_reason, r.stats.new_tokens) for r in many] == [
        (r.text, r.token_ids, r.finish_reason, r.stats.new_tokens) for r in alone]
    for got, expected in zip(many[:3], alone[:3]):
        assert got.logprobs == expected.logprobs and got.prompt_logprobs == expected.prompt_logprobs
    if parallel > 1:  # started together, the second waited for the first's rows (the third scores its prompt)
        assert many[1].stats.cached_tokens == len(shared)


def test_generate_many_ends_at_a_refused_request_after_the_ones_before_it():
    model = _model("llama")
    good = dict(prompt_ids=[2, 5, 6, 3], drafter="none", max_new_tokens=6)
    requests = [good, dict(good, prompt_ids=[2, 7, 3]), dict(good, temperature=-1.0), good]
    results = model.generate_many(requests, parallel=4)
    assert [r.token_ids for r in (next(results), next(results))] == [model.fork().generate(**r).token_ids
                                                                     for r in requests[:2]]
    with pytest.raises(ValueError, match="temperature"):
        next(results)
    with pytest.raises(ValueError, match="parallel must be a positive integer, got 0"):
        list(model.generate_many(requests, parallel=0))


def test_model_drafters_sampling_with_a_fixed_budget_keep_their_answers():
    """A draft model's sampled drafts draw from the request's generator: with a fixed budget the
    batch leaves its draft size alone, so its tokens are still those it gets alone."""
    model = _model("llama", budget=4)
    requests = [dict(prompt_ids=[2, *range(10 + i, 30 + i), 3], drafter=drafter, max_new_tokens=20, **SAMPLED,
                     seed=i) for i, drafter in enumerate(["draft-model", "layerskip", "draft-model+recycling"] * 2)]
    alone = [_alone(model, request) for request in requests]
    together = _together(model, requests, Batch())
    assert [request.generation.token_ids for request in together] == alone


def test_a_fault_in_one_request_fails_it_alone():
    model = _model("llama")
    requests = _requests(6)
    alone = [_alone(model, request) for request in requests]
    running = [Running(model.fork().stream(**request)) for request in requests]
    fault_after_first_chunk(running[2].generation)
    batch = Batch()
    while not all(request.generation.done or request.error for request in running):
        batch.step(running)
    assert isinstance(running[2].error, RuntimeError)
    for index, request in enumerate(running):
        if index != 2:
            assert request.error is None and request.generation.token_ids == alone[index]


def test_a_failing_batched_pass_runs_each_request_alone(monkeypatch):
    """A pass that raises is run again request by request: the one whose step cannot run fails."""
    import freespec.engine.batch as batch_module

    model = _model("llama")
    requests = _requests(3)
    alone = [_alone(model, request) for request in requests]
    running = [Running(model.fork().stream(**request)) for request in requests]
    real = batch_module.forward_batch
    calls = []

    def once_failing(passes):
        calls.append(len(passes))
        if len(calls) == 3:
            raise MemoryError("simulated")
        return real(passes)

    monkeypatch.setattr(batch_module, "forward_batch", once_failing)
    batch = Batch()
    while not all(request.generation.done or request.error for request in running):
        batch.step(running)
    assert [request.error for request in running] == [None] * 3
    assert [request.generation.token_ids for request in running] == alone


def test_a_lone_request_keeps_its_own_draft_size():
    """One request: its policy's choice, as without a server (no cap)."""
    model = _model("llama")
    running = [Running(model.fork().stream(prompt_ids=[2, 5, 6, 7, 3], drafter="recycling", max_new_tokens=8))]
    batch = Batch()
    batch.step(running)  # the prefill
    running[0].generation.draft()
    assert batch._caps(running) == [None]


def test_share_budget_spends_only_where_the_pass_gains():
    flat = lambda q: 1.0  # noqa: E731  (a pass costs the same whatever its size: every node pays)
    assert share_budget([[0.9, 0.5], [0.8, 0.1]], rows=2, tokens=2.0, cost=flat) == [2, 2]
    linear = lambda q: float(q)  # noqa: E731  (each row costs as much as a whole token: none pays)
    assert share_budget([[0.9, 0.5], [0.8]], rows=2, tokens=2.0, cost=linear) == [0, 0]
    # a pass already full of requests' own tokens: nodes must beat the rate those give
    steep = lambda q: 1.0 + 0.1 * q  # noqa: E731
    assert share_budget([[0.95, 0.1], [0.9]], rows=1, tokens=1.0, cost=steep) == [1, 1]
    assert share_budget([[0.5], [0.4]], rows=1, tokens=1.0, cost=steep) == [1, 1]
    assert share_budget([[0.5], [0.4]], rows=8, tokens=8.0, cost=steep) == [1, 0]
    assert share_budget([[], []], rows=2, tokens=2.0, cost=flat) == [0, 0]


def test_the_batch_prices_drafts_by_its_own_timed_steps(monkeypatch):
    """Once the batch has timed its steps, their cost by rows decides the drafts: rows that cost
    as much as a token each leave every request plain, free rows let them draft. A request whose
    drafts found no room drafts nothing in the next pass (it rests), then drafts again."""
    model = _model("llama")
    # each request's own policy sees rows for free, so it always verifies its drafts and the
    # batch's pricing alone decides (a calibration taken on a busy machine could leave it plain)
    model._costs[:] = [{q: 1e-3 for q in (1, 2, 3, 4, 5, 6, 8)}]
    prompts = [[2, *[4 + (index * 13 + i) % 60 for i in range(30)], 3] for index in range(3)]
    running = [Running(model.fork().stream(prompt_ids=prompt, drafter="recycling", max_new_tokens=40))
               for prompt in prompts]
    batch = Batch()
    while not all(request.generation.done for request in running):
        batch.step(running)
    assert batch.step_cost.steps >= 13  # every decoding step of the three (the timings' fit is the doctest's)
    for line, drafted in (((0.0, 1.0), False), ((1.0, 1e-6), True)):
        batch.step_cost.line = line
        again = [Running(model.fork().stream(prompt_ids=prompt, drafter="recycling", max_new_tokens=24))
                 for prompt in prompts]
        while any(request.generation.prefilling for request in again):
            batch.step(again)
        for request in again:
            request.generation.draft()
        assert any(batch._caps(again)) == drafted
    batch.step_cost.line = (0.0, 1.0)
    # the check lets every step share (a step it keeps plain drafts nothing: the next test)
    for drafted, rate in ((False, 0.0), (True, 1e12)):
        batch.check.rates[3, drafted], batch.check.counts[3, drafted] = rate, batch.check.min_steps
    batch.check.explore = 10**9
    drafts = []
    real_draft = Generation.draft
    monkeypatch.setattr(Generation, "draft", lambda self: drafts.append(self) or real_draft(self))
    resting = [Running(model.fork().stream(prompt_ids=prompt, drafter="recycling", max_new_tokens=24))
               for prompt in prompts]
    while any(request.generation.prefilling for request in resting):
        batch.step(resting)
    drafts.clear()
    batch.step(resting)  # each drafts; none fits
    drafted = [request for request in resting if request.idle]
    assert drafted and all(request.resting == 1 for request in drafted)
    drafts.clear()
    batch.step(resting)  # they rest: no draft
    assert not {id(request.generation) for request in drafted} & {id(generation) for generation in drafts}
    assert all(request.generation.stats.draft_sizes[-1] == 0 for request in drafted)
    drafts.clear()
    batch.step(resting)  # and draft again
    assert {id(request.generation) for request in drafted} <= {id(generation) for generation in drafts}


def test_the_batch_stops_sharing_drafts_where_they_measured_slower(monkeypatch):
    """Where steps that verified shared drafts ran fewer tokens per second than steps that
    verified none, the batch's steps at that many requests verify none (but every 16th), and
    cost what plain batching's do: no request drafts, and Token Recycling (whose learning is a
    cache) learns nothing from them."""
    model = _model("llama")
    prompts = [[2, *[4 + (index * 13 + i) % 60 for i in range(30)], 3] for index in range(3)]
    for prompt in prompts:  # the forks' shared tables learn these answers: their drafts are sure
        model.fork().generate(prompt_ids=prompt, drafter="recycling", max_new_tokens=24)
    running = [Running(model.fork().stream(prompt_ids=prompt, drafter="recycling", max_new_tokens=24))
               for prompt in prompts]
    batch = Batch()
    batch.step_cost.line = (1.0, 1e-6)  # rows free: the sharing alone would verify drafts
    for drafted, rate in ((False, 100.0), (True, 50.0)):
        batch.check.rates[3, drafted], batch.check.counts[3, drafted] = rate, batch.check.min_steps
    while any(request.generation.prefilling for request in running):
        batch.step(running)
    calls = []
    for name in ("draft", "learn"):
        owner = Generation if name == "draft" else TokenRecycling
        real = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda self, *args, _real=real, _name=name: calls.append(_name) or _real(self, *args))
    for _ in range(batch.check.explore - 1):
        batch.step(running)
        assert all(request.generation.stats.draft_sizes[-1] == 0 for request in running)
    assert batch.check.counts[3, False] > batch.check.min_steps  # the steps were measured
    assert calls == []
    batch.step(running)  # the 16th: shared drafts again, and learning
    assert "draft" in calls and "learn" in calls


def test_a_pass_carrying_a_prompt_drafts_nothing_but_fixed_budgets(monkeypatch):
    """Beside a prompt chunk the decoding requests draft nothing, even where every node would pay:
    the prompt rows fill the pass, and draft rows would only delay the newcomer's first token. The
    pass is no sample of the sharing check. A request with a fixed budget drafts as it does alone
    (its sampled tokens must stay its own), and the others draft again once the prompt is in."""
    model = _model("llama")
    prompts = [[2, *[4 + (index * 13 + i) % 60 for i in range(30)], 3] for index in range(3)]
    for prompt in prompts:  # the forks' shared tables learn these answers: their drafts are sure
        model.fork().generate(prompt_ids=prompt, drafter="recycling", max_new_tokens=24)
    long_prompt = [2, *[4 + (7 * i) % 200 for i in range(200)], 3]
    batch = Batch(prefill_rows=32)
    batch.step_cost.line = (1.0, 1e-6)  # rows free: every node pays
    running = [Running(model.fork().stream(prompt_ids=prompt, drafter="recycling", max_new_tokens=40, budget=budget))
               for prompt, budget in zip(prompts, [None, None, 3])]
    while any(request.generation.prefilling for request in running):
        batch.step(running)
    batch.step(running)  # a first decoding step: each request has learned its context
    newcomer = Running(model.fork().stream(prompt_ids=long_prompt, drafter="none", max_new_tokens=4))
    drafts = []
    real_draft = Generation.draft
    monkeypatch.setattr(Generation, "draft", lambda self: drafts.append(self) or real_draft(self))
    counts = dict(batch.check.counts)
    batch.step([*running, newcomer])
    assert newcomer.generation.prefilling and batch.check.counts == counts  # a prompt chunk, no sample
    assert [request.generation.stats.draft_sizes[-1] > 0 for request in running] == [False, False, True]
    assert drafts == [running[2].generation]  # the others spent no time drafting
    while newcomer.generation.prefilling:
        batch.step([*running, newcomer])
    batch.step([*running, newcomer])
    assert all(request.generation.stats.draft_sizes[-1] > 0 for request in running)
