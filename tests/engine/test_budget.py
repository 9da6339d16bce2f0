"""The budget policy: tree sizes chosen from measured costs and the acceptance learned online."""

import numpy as np

from freespec.engine.budget import BudgetPolicy, accepted_within


def test_accepted_within_budget():
    assert accepted_within([0], 10) == 1
    assert accepted_within([0, 2, 5], 10) == 3
    assert accepted_within([0, 2, 5], 4) == 2
    assert accepted_within([0, 2, 5], 1) == 1


def test_policy_turns_speculation_off_when_it_does_not_pay():
    # verifying 8 nodes costs 4x one token: needs tau > 4 to pay
    policy = BudgetPolicy({1: 1.0, 9: 4.0}, candidates=[8], explore_every=1)
    assert policy.choose(limit=100) == 8  # unexplored: probe it
    policy.observe(8, [0, 1, 2])  # 3 tokens per pass < 4
    assert policy.best(limit=100) == 0
    cheap = BudgetPolicy({1: 1.0, 9: 1.2}, candidates=[8], explore_every=1)
    cheap.observe(8, [0, 1, 2])
    assert cheap.best(limit=100) == 8
    assert cheap.best(limit=5) == 0  # no room for 8 nodes


def test_policy_learns_costs_from_timed_steps():
    policy = BudgetPolicy({1: 1.0, 9: 4.0}, candidates=[8], smoothing=0.5)
    policy.observe(8, [0, 1, 2])  # tau(8) = 3, but 9 tokens cost 4x: off
    assert policy.best(limit=100) == 0
    for _ in range(10):
        policy.record_cost(9, 1.5)  # the machine turned out to verify 9 tokens cheaply
    assert policy.cost(9) < 1.6 and policy.best(limit=100) == 8
    policy.record_cost(5, 100.0)  # sizes outside the table are ignored
    assert policy.cost(5) < 1.6


def test_policy_probes_about_twice_the_best_size():
    policy = BudgetPolicy({1: 1.0, 81: 2.0}, candidates=[1, 3, 7, 15, 31, 80], explore_every=2)
    assert [policy.choose(limit=100) for _ in range(2)] == [0, 3]  # nothing known: probe min_probe
    policy.tau.update({3: 1.5, 7: 1.9})
    assert policy.best(limit=100) == 7
    assert [policy.choose(limit=100) for _ in range(2)] == [7, 15]
    assert [policy.choose(limit=10) for _ in range(2)] == [7, 7]  # no room above 7 within the limit


def test_probes_that_lose_back_off_and_a_winning_probe_restores_the_pace():
    # 4 draft nodes cost 2x one token: a probe pays only when it accepts more than 2 tokens
    policy = BudgetPolicy({1: 1.0, 5: 2.0}, candidates=[4], explore_every=2, max_interval=8)
    sizes = []
    for _ in range(40):
        size = policy.choose(limit=100)
        sizes.append(size)
        policy.observe(size, [0, 1] if size else [0])  # 2 tokens per probe: never worth it
    probes = [step for step, size in enumerate(sizes) if size]
    assert probes == [1, 5, 13, 21, 29, 37]  # waits 2, 4, 8, 8, ... steps
    assert policy.interval == 8
    policy.observe(4, [0])  # not a probe the policy asked for: the pace is unchanged
    assert policy.interval == 8
    while not policy.choose(limit=100):
        pass
    policy.observe(4, [0, 1, 2, 3, 4])  # 5 tokens for 2x the cost: probe again soon
    assert policy.interval == 2


def test_policy_learns_from_shadow_drafts_without_probing():
    policy = BudgetPolicy({1: 1.0, 2: 1.1, 4: 1.3, 8: 2.0}, candidates=[1, 3, 7], min_probe=3)
    assert policy.best(limit=100) == 0  # nothing known yet: verify no draft...
    assert policy.shadow_size(limit=100) == 3  # ...but draft min_probe nodes to learn from
    policy.observe_shadow(3, [0, 1, 2, 3], verified=0)  # the tokens that followed spelled nodes 1-3
    assert policy.tau == {0: 1.0, 1: 2, 3: 4}
    assert policy.best(limit=100) == 3 and policy.shadow_size(limit=100) == 7
    policy.observe(3, [0, 1])  # a verified step of 3 nodes
    policy.observe_shadow(7, [0, 1], verified=3)  # its shadow teaches only the sizes above 3
    assert policy.tau[7] == 2 and policy.tau[3] == 4 + policy.smoothing * (2 - 4)
    assert policy.shadow_size(limit=5) == 3  # no room for 7
    assert all(policy.size_for(None, limit=100) == policy.best(limit=100) for _ in range(20))  # never a probe


def test_policy_sizes_a_scored_draft_by_its_own_scores():
    policy = BudgetPolicy({1: 1.0, 2: 1.1, 4: 1.3, 8: 2.0}, candidates=[1, 3, 7])
    confident = np.array([1.0, 0.99, 0.98, 0.97, 0.2, 0.1])
    assert policy.size_for(confident, limit=100) == 3  # 3.94 tokens / t(4) = 1.3 beats 1.99 / 1.1 and 4.24 / 1.65
    assert policy.size_for(confident, limit=2) == 2
    assert policy.size_for(np.array([1.0, 0.05]), limit=100) == 0  # 1.05 / 1.1: plain decoding pays more


def test_a_shadow_draft_the_text_followed_whole_is_drafted_deeper_once():
    """A shadow size the averages hold at about twice the best size learns nothing of the sizes
    above it; once a shadow draft turns out all accepted (the text went on past it, as a stored
    answer repeated does), the next shadow is about twice that draft, once."""
    policy = BudgetPolicy({1: 1.0, 2: 1.1, 4: 1.3, 6: 1.5, 8: 2.0, 12: 2.8}, candidates=[1, 3, 5, 7, 11], min_probe=3)
    policy.observe_shadow(3, [0, 1, 2], verified=0)
    assert policy.best(limit=100) == 3 and policy.shadow_size(limit=100) == 5
    policy.observe_shadow(5, [0, 1, 2], verified=3)  # followed only partly: nothing changes
    assert policy.shadow_size(limit=100) == 5
    policy.observe_shadow(5, [0, 1, 2, 3, 4, 5], verified=3)  # every node followed
    assert policy.shadow_size(limit=100) == 11 and policy.shadow_size(limit=100) == 5
    policy.observe_shadow(5, [0, 1, 2, 3, 4, 5], verified=3)
    assert policy.shadow_size(limit=8) == 7  # within the room left
