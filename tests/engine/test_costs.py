"""The t(q) calibration and the costs the budget policy learns online: one bad measurement (a busy
machine, a damaged cache file) must never keep speculation switched off."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest

from freespec.engine import costs
from freespec.engine.budget import BudgetPolicy
from freespec.engine.costs import SIZES, CostCurve, implausible, load_or_measure

BAD_CURVE = {1: 0.013, 2: 0.014, 3: 0.015, 4: 0.016, 6: 1.36, 8: 1.34, 12: 0.02, 16: 0.022, 24: 0.03, 32: 0.035,
             48: 0.05, 64: 0.06, 81: 0.07}
"""What the first ``freespec generate`` on a busy machine cached: 6 and 8 timed during a burst."""


def true_cost(q: int) -> float:
    """A plausible machine: 10 ms for one token, 0.5 ms more per extra token."""
    return 0.010 + 0.0005 * (q - 1)


def slow_cost(q: int) -> float:
    """A large model's passes: 250 ms for one token, 60 ms more per extra token (a 7B file here)."""
    return 0.25 + 0.06 * (q - 1)


class FakeRunner:
    """Times passes on a fake clock: ``cost(q)``, plus ``burst`` seconds for the forward calls
    whose index ``busy`` accepts (another program hogging the CPU)."""

    max_positions, vocab_size = 512, 16

    def __init__(self, busy: Callable[[int], bool] = lambda call: False, burst: float = 1.0,
                 cost: Callable[[int], float] = true_cost):
        self.clock, self.calls, self.busy, self.burst, self.cost = 0.0, 0, busy, burst, cost

    def reset(self, capacity: int) -> None:
        pass

    def prefill(self, tokens) -> None:
        self.clock += 0.1

    def forward(self, tokens, positions, mask):
        self.clock += self.cost(len(tokens)) + (self.burst if self.busy(self.calls) else 0.0)
        self.calls += 1
        return tokens

    def logits(self, hidden):
        return hidden


def installed(fake: FakeRunner, tmp_path, monkeypatch) -> FakeRunner:
    """``fake``, whose clock the calibration now reads, with a cache of the test's own."""
    monkeypatch.setenv("FREESPEC_CACHE", str(tmp_path))
    monkeypatch.setattr(costs, "calibration_key", lambda _: "fake")
    monkeypatch.setattr(costs, "time", SimpleNamespace(perf_counter=lambda: fake.clock))
    return fake


@pytest.fixture
def runner(tmp_path, monkeypatch) -> FakeRunner:
    """A fake runner whose clock the calibration reads, and a cache of the test's own."""
    return installed(FakeRunner(), tmp_path, monkeypatch)


def cache_file(tmp_path):
    return tmp_path / "calibration" / "fake.json"


def test_a_burst_of_load_does_not_reach_the_curve(runner):
    """Eight forward passes in a row take a second longer: before, they were all the repeats of
    sizes 8 and 12 (each timed three times in a row), which then looked 60x too expensive."""
    runner.busy = lambda call: 20 <= call < 28
    measured = load_or_measure(runner)
    assert implausible(measured) is None
    assert measured == pytest.approx({q: true_cost(q) for q in SIZES})


def test_a_curve_that_stays_implausible_is_smoothed(runner, caplog):
    passes = len(SIZES) * 4  # a warm-up and 3 rounds
    runner.busy = lambda call: 20 <= call % passes < 45  # two rounds of each attempt are mostly slow
    with caplog.at_level(logging.WARNING, logger="freespec"):
        measured = load_or_measure(runner)
    assert implausible(measured) is None
    assert runner.calls == costs.ATTEMPTS * passes  # measured again before giving up
    assert "too busy to measure verification costs cleanly" in caplog.text


def test_calibration_says_so_in_one_line_once(runner, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="freespec"):
        first = load_or_measure(runner)
        again = load_or_measure(runner)
    assert first == again and cache_file(tmp_path).is_file()
    [record] = caplog.records  # the second load reads the cache silently
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("calibrating verification cost on this machine (once, ~")


@pytest.mark.parametrize("content, reason", [
    (json.dumps({"seconds": {str(q): t for q, t in BAD_CURVE.items()}}), "implausible (t(6) is 105x t(1)"),
    ('{"cpu": "x", "seconds": {"1": 0.01, "2"', "damaged (JSONDecodeError"),  # cut short
    ("", "damaged (JSONDecodeError"),
    ("[1, 2]", "damaged (TypeError"),
    (json.dumps({"seconds": {"1": "fast"}}), "damaged (ValueError"),
    (json.dumps({"seconds": {str(q): 0.01 for q in SIZES}, "stale": "a step was faster"}), "stale (a step was faster)"),
])
def test_a_bad_cache_file_is_measured_again_with_one_line(runner, tmp_path, caplog, content, reason):
    path = cache_file(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="freespec"):
        measured = load_or_measure(runner)
    assert measured == pytest.approx({q: true_cost(q) for q in SIZES})
    warning, calibrating = caplog.records
    assert f"calibration cache {path} is {reason}" in warning.getMessage() and "\n" not in warning.getMessage()
    assert calibrating.getMessage().startswith("calibrating verification cost")
    assert json.loads(path.read_text())["seconds"] == {str(q): pytest.approx(true_cost(q)) for q in SIZES}


def test_a_failed_write_keeps_the_previous_cache(runner, tmp_path, monkeypatch, caplog):
    """Writing the cache can fail part way (a full disk, a killed process): the file keeps its old
    content, whole, and no temporary file is left behind."""
    path = cache_file(tmp_path)
    path.parent.mkdir(parents=True)
    previous = json.dumps({"seconds": {str(q): 2 * true_cost(q) for q in SIZES}})
    path.write_text(previous)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with caplog.at_level(logging.WARNING, logger="freespec"):
        measured = load_or_measure(runner, force=True)
    assert measured == pytest.approx({q: true_cost(q) for q in SIZES})
    assert path.read_text() == previous and os.listdir(path.parent) == ["fake.json"]
    assert "cannot write the calibration cache" in caplog.text


def test_an_unwritable_cache_folder_still_gives_costs(runner, tmp_path, caplog):
    (tmp_path / "calibration").write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="freespec"):
        assert load_or_measure(runner) == pytest.approx({q: true_cost(q) for q in SIZES})
    assert "cannot write the calibration cache" in caplog.text


# --- the policy corrects a bad curve from the steps it times ----------------------------------------


def test_a_shadow_drafting_policy_recovers_from_a_bad_curve():
    """A drafter whose drafts are always right (scored as such), with costs that say any tree costs
    100x one token: before, the policy never verified a node, so it never timed one."""
    policy = BudgetPolicy({1: 0.01, **{q: 1.0 for q in SIZES[1:]}}, candidates=[q - 1 for q in SIZES[1:]])
    sizes = []
    for _ in range(60):
        drafted = policy.shadow_size(limit=100)
        size = policy.size_for(np.array([1.0] + [0.95] * drafted), limit=100)
        path = list(range(size + 1))  # every verified node accepted
        policy.observe(size, path)
        policy.record_cost(size + 1, true_cost(size + 1))
        policy.observe_shadow(drafted, list(range(drafted + 1)), size)
        sizes.append(size)
    assert sizes[:2] == [0, 3] and sizes[-10:] == [80] * 10  # one step off, then it climbs
    for q in (1, 4, 81):
        assert policy.cost(q) == pytest.approx(true_cost(q))


def test_a_probing_policy_recovers_from_a_bad_curve_quickly():
    """Drafters without shadow drafts probe larger sizes now and then; before, each probe moved
    the cost 5% towards the truth, so 100x took about 90 probes (thousands of steps)."""
    policy = BudgetPolicy({1: 0.01, **{q: 1.0 for q in SIZES[1:]}}, candidates=[q - 1 for q in SIZES[1:]])
    sizes = []
    for _ in range(100):
        size = policy.choose(limit=100)
        policy.observe(size, list(range(min(size, 10) + 1)))  # 10 drafted tokens right, then wrong
        policy.record_cost(size + 1, true_cost(size + 1))
        sizes.append(size)
    assert min(sizes[-20:]) >= 7


def test_slow_steps_only_nudge_the_cost():
    """A pause of the process makes one step slow: the estimate moves a little, not to it."""
    policy = BudgetPolicy({1: 0.01, 9: 0.02}, candidates=[8])
    policy.record_cost(9, 5.0)
    assert policy.cost(9) == pytest.approx(0.02 + 0.05 * 0.01)


def test_a_step_faster_than_the_calibration_marks_the_cache_stale(tmp_path):
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"seconds": {"1": 0.02, "9": 0.08}}))
    policy = BudgetPolicy(CostCurve({1: 0.02, 9: 0.08}, path), candidates=[8])
    policy.record_cost(9, 0.05)  # faster, but not by half: could be a shorter context
    assert "stale" not in json.loads(path.read_text())
    policy.record_cost(1, 0.008)  # a whole step in less than half the calibrated pass
    assert json.loads(path.read_text())["stale"] == "a step over 1 tokens took 8.00 ms, the calibration says 20.00 ms"
    assert policy.cost(1) == 0.008


def test_a_fast_step_at_an_extrapolated_size_corrects_it_without_marking_the_cache_stale(tmp_path):
    """A size priced from a smaller one is a guess on the safe side: a step proves it too high, and
    the curve takes the step's time, but measuring again would guess the same."""
    path = tmp_path / "curve.json"
    path.write_text(json.dumps({"seconds": {"1": 0.4, "8": 0.42, "24": 1.26}, "timed": [1, 8]}))
    policy = BudgetPolicy(CostCurve({1: 0.4, 8: 0.42, 24: 1.26}, path, timed=[1, 8]), candidates=[7, 23])
    policy.record_cost(24, 0.45)  # memory-bound far beyond the sizes timed
    assert "stale" not in json.loads(path.read_text()) and policy.cost(24) == 0.45
    policy.record_cost(8, 0.2)
    assert "stale" in json.loads(path.read_text())


def test_a_short_context_gets_the_sizes_that_fit_and_caches_them(runner, tmp_path):
    """A model of 40 positions: passes of up to 38 tokens after at least one cached token (the
    context asked for would have been negative), and the cache of those sizes is read back."""
    runner.max_positions = 40
    contexts = []
    runner.prefill = lambda tokens: contexts.append(len(tokens))
    measured = load_or_measure(runner)
    assert sorted(measured) == [q for q in SIZES if q <= 38] and min(contexts) >= 1
    calls = runner.calls
    assert load_or_measure(runner) == measured and runner.calls == calls  # from the cache, not measured again


def test_a_slow_model_times_the_small_sizes_and_prices_the_rest_from_the_largest(tmp_path, monkeypatch):
    runner = installed(FakeRunner(cost=slow_cost), tmp_path, monkeypatch)
    measured = load_or_measure(runner)
    timed = measured.timed
    assert timed == [q for q in SIZES if q <= timed[-1]] and 4 <= timed[-1] < SIZES[-1]
    assert runner.calls == 4 * len(timed)  # a warm-up and three rounds of the timed sizes only
    assert sum(slow_cost(q) for q in timed) <= costs.WARM_UP_SECONDS
    last = timed[-1]
    for q in SIZES:
        truth = slow_cost(q)
        if q in timed:
            assert measured[q] == pytest.approx(truth)
        else:  # the largest timed size's cost per token: never cheaper than the truth
            assert measured[q] == pytest.approx(measured[last] * q / last) and measured[q] >= truth
    again = load_or_measure(runner)  # from the cache, which says which sizes were timed
    assert again == measured and again.timed == timed and runner.calls == 4 * len(timed)
    assert json.loads(cache_file(tmp_path).read_text())["timed"] == timed


def test_a_fast_model_times_every_size(runner):
    assert load_or_measure(runner).timed == list(SIZES)


class PrefillTimedRunner(FakeRunner):
    """A large model (:func:`slow_cost`) whose prompt tokens take ``per_token`` seconds each to
    prefill; records the positions its passes start at."""

    def __init__(self, per_token: float):
        super().__init__(cost=slow_cost)
        self.per_token, self.prefilled, self.starts = per_token, 0, set()

    def prefill(self, tokens) -> None:
        self.clock += self.per_token * len(tokens)
        self.prefilled += len(tokens)

    def forward(self, tokens, positions, mask):
        self.starts.add(int(positions[0]))
        return super().forward(tokens, positions, mask)


@pytest.mark.parametrize("per_token, context_seconds, context",
                         [(0.04, costs.CONTEXT_SECONDS, 64), (0.001, costs.CONTEXT_SECONDS, 256), (0.04, None, 256)])
def test_a_slow_prefill_times_the_sizes_after_a_shorter_context(monkeypatch, per_token, context_seconds, context):
    """Chunks of 32 tokens until 2 s have passed: at 40 ms a token 64 of the 256 context tokens
    (1.28 s a chunk), at 1 ms all of them; without a limit (the benchmarks' tables) all of them."""
    runner = PrefillTimedRunner(per_token)
    monkeypatch.setattr(costs, "time", SimpleNamespace(perf_counter=lambda: runner.clock))
    costs.measure(runner, context_seconds=context_seconds)
    assert runner.prefilled == context and runner.starts == {context}
