"""benchmarks/draft_misses.py's summaries of recorded passes: what the trees held (the oracle) and
the first tokens by what the previous pass accepted."""

from tests.helpers import load_benchmark

COSTS = {1: 1.0, 2: 1.25, 3: 1.5, 4: 1.75, 8: 2.75}  # t(q): a node costs a quarter of a step


def drafted(accepted: list[int], scores: list[float], parents: list[int] | None = None) -> dict:
    parents = parents or [-1, *range(len(scores) - 1)]  # a chain unless given
    return {"method": "m", "category": "c", "parents": parents, "depths": [0] * len(parents),
            "scores": scores, "sources": [["m"]] * len(parents), "accepted": accepted}


def test_the_oracle_verifies_only_the_branch_taken_and_the_cut_follows_the_scores():
    script = load_benchmark("draft_misses")
    steps = [
        drafted([0, 1, 2], [1.0, 0.9, 0.8, 0.1]),  # a chain of 3: the first two accepted
        drafted([0], [1.0, 0.1, 0.05]),  # a miss
        drafted([0, 2], [1.0, 0.6, 0.3], parents=[-1, 0, 0]),  # the second first token was the one
        {"method": "m", "category": "c", "tokens": 8, "passes": 4},  # and a pass that drafted nothing
    ]
    table = script.oracle_table(steps, COSTS).splitlines()
    cells = [cell.strip() for cell in table[2].split("|")[2:-1]]
    # oracle ≤ 1 node: 2 + 1 + 2 tokens (+1 undrafted) = 6 at 1.25 + 1 + 1.25 + 1 = 4.5
    assert cells[0] == f"τ 1.50, {6 / 4.5:.2f}x"
    # ≤ 2: 3 + 1 + 2 + 1 = 7 at 1.5 + 1 + 1.25 + 1
    assert cells[1] == f"τ 1.75, {7 / 4.75:.2f}x"
    # the first node every pass: 2 + 1 + 1 + 1 = 5 at 1.25 * 3 + 1
    assert cells[5] == f"τ 1.25, {5 / 4.75:.2f}x"
    # the cut by scores: 2 nodes (2.7 / 1.5 beats 1.9 / 1.25 and 2.8 / 1.75), none (1.1 / 1.25 < 1 / 1), 1 node
    assert [script.scores_cut(step["scores"], COSTS) for step in steps[:3]] == [2, 0, 1]
    assert cells[-1] == f"τ 1.50, {(3 + 1 + 1 + 1) / (1.5 + 1 + 1.25 + 1):.2f}x"


def test_first_tokens_are_counted_by_what_the_previous_pass_of_the_request_accepted():
    script = load_benchmark("draft_misses")
    steps = [
        drafted([0, 1, 2, 3, 4], [1.0, 0.9, 0.9, 0.9, 0.9]),  # the request's first pass: no previous
        drafted([0, 1], [1.0, 0.6]),  # after 4 accepted: scored 0.6, accepted
        drafted([0], [1.0, 0.7]),  # after 1 accepted: missed
        {"method": "m", "category": "c", "tokens": 9, "passes": 3},
        drafted([0, 1], [1.0, 0.65]),  # a new request: no previous again
    ]
    table = script.momentum_table(steps)
    row = next(line for line in table.splitlines() if "| 0.5-0.8 |" in line)
    assert row == "| m | 0.5-0.8 | — | 1, 0% (70%) | — | 1, 100% (60%) |"
