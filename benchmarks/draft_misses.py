"""Where drafted nodes fail: first-token misses, deep misses and nodes verified in vain, per
category, per source and per depth, with how well each source's scores predicted acceptance.

Two inputs:

- ``--results DIR/results.jsonl`` (what ``freespec bench`` writes): per method and category, from
  each pass's draft size and accepted length: passes that drafted, first-token misses (nothing
  accepted), and the draft nodes verified per pass;
- a run of its own (``--methods``): the first turns of Spec-Bench questions, every verified tree
  recorded through the drafter's ``learn``, each node with its depth, its score and the source(s)
  that drafted it (a fused drafter's members; ``suffix``'s request, store and corpus).

    python benchmarks/draft_misses.py --methods suffix,recycling,suffix+recycling --per-category 2
    python benchmarks/draft_misses.py --methods lookup,recycling,suffix,suffix+recycling --per-category 5 \
        --budget 4 --steps steps.jsonl.gz
    python benchmarks/draft_misses.py --results bench-out/results.jsonl

Prints τ per method and per category (a fused method next to the best of its members), the misses
per method and category, per source and depth, the first tokens by the sources that drafted
them, by how many were tried and by what the previous pass accepted, and what the trees held
against what verifying their first nodes took from them (:func:`oracle_table`, priced by this
machine's calibrated costs; run with a large ``--budget`` so that every tree is verified whole). ``--budget`` fixes the nodes verified per pass, so τ does not
depend on the machine's load (the budget policy's choice does); ``--steps`` keeps the records
(gzipped if the name ends in .gz) and summarises them again without a run.

A verified node *fails* when its parent was accepted and it was not (a *try* that missed); it is
*in vain* when its parent was not accepted (it never had a chance). A first-token miss is a pass
whose root's drafted children all failed; a deep miss, one that accepted some nodes, then failed.
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
from collections import defaultdict
from pathlib import Path

import freespec
from freespec.bench.run import DEFAULT_QUESTIONS, load_questions
from freespec.drafters import Fused
from freespec.engine.budget import accepted_within
from freespec.engine.costs import interpolate, load_or_measure

SOURCE_NAMES = {"RequestSource": "request", "StoreSource": "store", "CorpusSource": "corpus",
                "TokenRecycling": "recycling", "PromptLookup": "lookup", "TrieLookup": "trie"}


def source_name(drafter) -> str:
    return SOURCE_NAMES.get(type(drafter).__name__, type(drafter).__name__.lower())


def record_steps(drafter, steps: list[dict], labels: dict) -> None:
    """Wrap ``drafter.learn`` to append each verified tree with at least one draft node to ``steps``."""
    learn = drafter.learn

    def recording(tree, logits, accepted):
        if len(tree) > 1:
            if isinstance(drafter, Fused) and drafter._proposed is not None:
                where = drafter._proposed[0].where
                sources = [[source_name(d) for d, index in zip(drafter.drafters, where) if node in index]
                           for node in range(len(tree))]
            else:
                sources = [[source_name(drafter)]] * len(tree)
            steps.append({**labels, "parents": tree.parents.tolist(), "depths": tree.depths.tolist(),
                          "scores": None if tree.scores is None else tree.scores.round(4).tolist(),
                          "sources": sources, "accepted": list(accepted)})
        return learn(tree, logits, accepted)

    drafter.learn = recording


class SourcesOwnScores:
    """Stands in for a fused drafter's calibration: a merged node keeps the best of its sources'
    own calibrated chances, whoever drafted it (the twin ``--plain-fusion`` adds)."""

    def __call__(self, group: int, depth: int, share: float) -> float:
        return share

    def learn(self, group: int, depths, shares, hits) -> None:
        pass


PLAIN = " (plain fusion)"


def run(methods: list[str], per_category: int, max_new_tokens: int, limit: int | None,
        plain_fusion: bool = False, budget: int | None = None, threads: int = 1) -> list[dict]:
    """Record every method's verified drafts. ``plain_fusion``: each fused method also runs as a
    twin whose merged nodes keep their sources' own scores (:class:`SourcesOwnScores`),
    interleaved with it per question. ``budget``: draft nodes verified per pass (None: the budget
    policy chooses from measured costs, so τ then depends on the machine's load)."""
    model = freespec.load(budget=budget, threads=threads)
    steps: list[dict] = []
    # each method (and twin) learns from its own runs only: Token Recycling's tables and the suffix
    # stores are shared by a model's drafters, so a method run just before would hand its answer on
    models = {}
    for method in methods:
        models[method] = model.with_own_state()
        if plain_fusion and isinstance(models[method].drafter(method)[0], Fused):
            twin_model = models[method + PLAIN] = model.with_own_state()
            twin = twin_model._drafters[method + PLAIN] = twin_model.drafter(method)  # drafter and policy, unused
            twin[0].calibration = SourcesOwnScores()
    labels = {name: {"method": name} for name in models}
    for name, own in models.items():
        own.generate("Hello there.", drafter=name, max_new_tokens=16)
        record_steps(own.drafter(name)[0], steps, labels[name])
    for question in load_questions(DEFAULT_QUESTIONS, per_category=per_category, limit=limit):
        for name, own in models.items():
            labels[name]["category"] = question.category
            stats = own.generate(question.turns[0], drafter=name, max_new_tokens=max_new_tokens).stats
            steps.append({"method": name, "category": question.category, "tokens": stats.new_tokens,
                          "passes": stats.forward_passes, "seconds": stats.decode_seconds})
    return steps


def tau_table(steps: list[dict]) -> str:
    """Per method: τ over all passes, and the passes that verified a draft."""
    totals = defaultdict(lambda: [0, 0, 0, 0.0])
    for step in steps:
        total = totals[step["method"]]
        if "tokens" in step:
            total[0] += step["tokens"]
            total[1] += step["passes"]
            total[3] += step.get("seconds", 0.0)
        else:
            total[2] += 1
    lines = ["| method | τ | decode tok/s | passes | passes that verified a draft |", "|---|---|---|---|---|"]
    for method, (tokens, passes, drafted, seconds) in totals.items():
        speed = f"{tokens / seconds:.1f}" if seconds else "—"
        lines.append(f"| {method} | {tokens / passes:.2f} | {speed} | {passes} | {percent(drafted, passes)} |")
    return "\n".join(lines)


def category_tau_table(steps: list[dict]) -> str:
    """τ per category (columns) and method (rows); a fused method ``a+b`` also gets a row with
    its margin over the best of its members that ran, per category."""
    totals = defaultdict(lambda: [0, 0])  # (method, category) → tokens, passes
    for step in steps:
        if "tokens" in step:
            for category in (step["category"], "all"):
                total = totals[step["method"], category]
                total[0] += step["tokens"]
                total[1] += step["passes"]
    methods = list(dict.fromkeys(method for method, _ in totals))
    categories = ["all", *sorted({category for _, category in totals} - {"all"})]
    tau = {key: tokens / passes for key, (tokens, passes) in totals.items()}
    lines = ["| method | " + " | ".join(categories) + " |", "|---" * (len(categories) + 1) + "|"]
    for method in methods:
        lines.append(f"| {method} | " + " | ".join(f"{tau[method, c]:.2f}" for c in categories) + " |")
        members = [m for m in method.split("+") if m in methods] if "+" in method else []
        if members:
            margins = [tau[method, c] - max(tau[m, c] for m in members) for c in categories]
            lines.append(f"| {method} − best of {', '.join(members)} | "
                         + " | ".join(f"{margin:+.2f}" for margin in margins) + " |")
    return "\n".join(lines)


def is_pass(step: dict) -> bool:
    """A verified draft's record (the others hold a request's totals)."""
    return "parents" in step


def percent(part: float, whole: float) -> str:
    return f"{part / whole:.0%}" if whole else "—"


def misses_table(steps: list[dict]) -> str:
    """Per method and category: passes, first-token and deep misses, nodes tried and in vain."""
    rows = defaultdict(lambda: defaultdict(float))
    for step in filter(is_pass, steps):
        for key in ((step["method"], step["category"]), (step["method"], "**all**")):
            row = rows[key]
            accepted, parents = set(step["accepted"]), step["parents"]
            row["passes"] += 1
            row["accepted"] += len(step["accepted"]) - 1
            row["nodes"] += len(parents) - 1
            row["first"] += len(step["accepted"]) == 1
            last = step["accepted"][-1]
            row["deep"] += len(step["accepted"]) > 1 and any(p == last for p in parents[1:])
            tries = [n for n in range(1, len(parents)) if parents[n] in accepted]
            row["tries"] += len(tries)
            row["failed first"] += sum(1 for n in tries if parents[n] == 0 and n not in accepted)
            row["failed deep"] += sum(1 for n in tries if parents[n] != 0 and n not in accepted)
            row["in vain"] += len(parents) - 1 - len(tries)
    lines = [("| method | category | passes drafted | accepted / pass | nodes / pass | first-token misses "
              "| deep misses | failed first-token nodes | failed deep nodes | nodes in vain |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (method, category), row in sorted(rows.items()):
        passes, nodes = row["passes"], row["nodes"]
        lines.append(f"| {method} | {category} | {passes:.0f} | {row['accepted'] / passes:.2f} | "
                     f"{nodes / passes:.2f} | {percent(row['first'], passes)} | {percent(row['deep'], passes)} | "
                     f"{percent(row['failed first'], nodes)} | {percent(row['failed deep'], nodes)} | "
                     f"{percent(row['in vain'], nodes)} |")
    return "\n".join(lines)


def sources_table(steps: list[dict]) -> str:
    """Per method, source and depth: tries, acceptance, and the mean predicted chance (the node's
    score over its parent's) next to it."""
    rows = defaultdict(lambda: [0, 0, 0.0, 0])  # tries, hits, predicted sum, in vain
    for step in filter(is_pass, steps):
        accepted, parents, scores = set(step["accepted"]), step["parents"], step["scores"]
        for node in range(1, len(parents)):
            for source in step["sources"][node]:
                depth = min(step["depths"][node], 4)
                row = rows[step["method"], source, depth]
                if parents[node] not in accepted:
                    row[3] += 1
                    continue
                row[0] += 1
                row[1] += node in accepted
                if scores is not None and scores[parents[node]] > 0:
                    row[2] += scores[node] / scores[parents[node]]
    lines = ["| method | source | depth | tries | accepted | predicted | in vain |", "|---|---|---|---|---|---|---|"]
    for (method, source, depth), (tries, hits, predicted, vain) in sorted(rows.items()):
        lines.append(f"| {method} | {source} | {depth if depth < 4 else '4+'} | {tries} | {percent(hits, tries)} "
                     f"| {percent(predicted, tries)} | {vain} |")
    return "\n".join(lines)


def first_nodes_table(steps: list[dict]) -> str:
    """Per method: the root's drafted children by the set of sources that drafted each (tries,
    accepted, mean predicted chance), and the passes by how many first tokens they tried (how
    often one of them was accepted)."""
    by_sources = defaultdict(lambda: [0, 0, 0.0])  # (method, sources) → tries, hits, predicted sum
    by_width = defaultdict(lambda: [0, 0])  # (method, first tokens) → passes, passes with a hit
    for step in filter(is_pass, steps):
        accepted, parents, scores = set(step["accepted"]), step["parents"], step["scores"]
        first = [node for node in range(1, len(parents)) if parents[node] == 0]
        width = by_width[step["method"], len(first)]
        width[0] += 1
        width[1] += len(step["accepted"]) > 1
        for node in first:
            row = by_sources[step["method"], " and ".join(sorted(step["sources"][node]))]
            row[0] += 1
            row[1] += node in accepted
            row[2] += scores[node] if scores is not None else 0.0
    lines = ["| method | first token drafted by | tries | accepted | predicted |", "|---|---|---|---|---|"]
    for (method, sources), (tries, hits, predicted) in sorted(by_sources.items(), key=lambda item: (item[0][0], -item[1][0])):
        lines.append(f"| {method} | {sources} | {tries} | {percent(hits, tries)} | {percent(predicted, tries)} |")
    lines += ["", "| method | first tokens tried | passes | one of them accepted |", "|---|---|---|---|"]
    for (method, width), (passes, hits) in sorted(by_width.items()):
        lines.append(f"| {method} | {width} | {passes} | {percent(hits, passes)} |")
    return "\n".join(lines)


def momentum_table(steps: list[dict]) -> str:
    """Per method: each drafted pass's first first-token node (the best-scored child of the root)
    by its calibrated chance and by the drafted tokens the method's previous recorded pass
    accepted (passes that drafted nothing are not recorded, so "previous" skips them): tries,
    accepted, mean predicted."""
    bounds, edges = (0, 1, 3), (0.2, 0.5, 0.8, 0.95)
    labels = ("0", "1", "2-3", "4+")
    rows = defaultdict(lambda: [0, 0, 0.0])  # (method, score bin, previous) → tries, hits, predicted sum
    previous: dict[tuple[str, str], int | None] = {}
    for step in steps:
        key = (step["method"], step.get("category", ""))
        if not is_pass(step):  # a request's totals: the next pass starts a new request
            previous[key] = None
            continue
        before = previous.get(key)
        previous[key] = len(step["accepted"]) - 1
        if before is None or step["scores"] is None:
            continue
        first = next(node for node in range(1, len(step["parents"])) if step["parents"][node] == 0)
        score = step["scores"][first]
        row = rows[step["method"], bisect.bisect_right(edges, score), bisect.bisect_left(bounds, before)]
        row[0] += 1
        row[1] += first in step["accepted"]
        row[2] += score
    bins = ["< 0.2", "0.2-0.5", "0.5-0.8", "0.8-0.95", "≥ 0.95"]
    lines = ["| method | predicted | " + " | ".join(f"after {label} accepted" for label in labels) + " |",
             "|---" * (len(labels) + 2) + "|"]
    for method in dict.fromkeys(method for method, _, _ in rows):
        for index, name in enumerate(bins):
            cells = []
            for before in range(len(labels)):
                tries, hits, predicted = rows.get((method, index, before), (0, 0, 0.0))
                cells.append(f"{tries}, {percent(hits, tries)} ({percent(predicted, tries)})" if tries else "—")
            lines.append(f"| {method} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pass_cost(costs: dict[int, float], q: int) -> float:
    """t(q) / t(1) from the model's calibrated costs (:mod:`freespec.engine.costs`), linear between sizes."""
    return interpolate(sorted(costs), [costs[size] for size in sorted(costs)], q) / costs[1]


def oracle_table(steps: list[dict], costs: dict[int, float]) -> str:
    """What the drafted trees held against what verifying their first nodes took from them, as
    tokens per pass and speedup over plain decoding priced by the cost curve t(q) / t(1).

    - *oracle, path ≤ n*: a drafter that knew which branch the text would follow and verified only
      it, at most n nodes (the candidates' worth: no drafter can do better with these trees);
    - *first b*: the first b nodes of the best-first tree verified every pass;
    - *cut by scores*: each pass verifies the prefix with the most expected tokens per second by
      its nodes' scores, as the budget policy does (:meth:`BudgetPolicy.size_for`).

    Passes that drafted nothing emit one token at t(1) in every column. The trees were verified
    whole, so a drafter that learns from verified rows (Token Recycling) learned more than it
    would at the sizes of the columns: an estimate of where the loss lies, not a prediction of a run.
    """
    passes = defaultdict(int)
    drafted = defaultdict(list)
    for step in steps:
        if "tokens" in step:
            passes[step["method"]] += step["passes"]
        else:
            drafted[step["method"]].append(step)
    caps, sizes = (1, 2, 3, 4, 8), (1, 2, 4)
    lines = ["| method | " + " | ".join(f"oracle, path ≤ {cap}" for cap in caps) + " | "
             + " | ".join(f"first {size}" for size in sizes) + " | cut by scores |",
             "|---" * (len(caps) + len(sizes) + 2) + "|"]
    for method, trees in drafted.items():
        plain = passes[method] - len(trees)  # passes that drafted nothing

        def speed(emitted_and_q, plain: int = plain, passes: int = passes[method]) -> str:
            tokens = cost = plain
            for emitted, q in emitted_and_q:
                tokens, cost = tokens + emitted, cost + pass_cost(costs, q)
            return f"τ {tokens / passes:.2f}, {tokens / cost:.2f}x"

        cells = []
        for cap in caps:
            cells.append(speed((1 + min(len(s["accepted"]) - 1, cap), 1 + min(len(s["accepted"]) - 1, cap))
                               for s in trees))
        for size in sizes:
            cells.append(speed((accepted_within(s["accepted"], size), 1 + min(size, len(s["parents"]) - 1))
                               for s in trees))
        if all(s["scores"] is not None for s in trees):
            cells.append(speed((accepted_within(s["accepted"], b), b + 1)
                               for s in trees for b in [scores_cut(s["scores"], costs)]))
        else:
            cells.append("—")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scores_cut(scores: list[float], costs: dict[int, float], limit: int = 16) -> int:
    """The prefix of a best-first tree with the most expected tokens per second (1 + its nodes'
    scores, over t(b + 1)); 0: verify nothing."""
    best, best_rate, expected = 0, 1.0, 1.0
    for size, score in enumerate(scores[1 : limit + 1], start=1):
        expected += score
        if expected / pass_cost(costs, size + 1) > best_rate:
            best, best_rate = size, expected / pass_cost(costs, size + 1)
    return best


def bench_table(path: Path) -> str:
    """First-token misses from a bench run's per-pass records (no sources there)."""
    rows = defaultdict(lambda: defaultdict(float))
    for line in path.read_text().splitlines():
        record = json.loads(line)
        for key in ((record["method"], record["category"]), (record["method"], "**all**")):
            for size, length in zip(record.get("draft_sizes") or [], record["accepted_lengths"]):
                if size:
                    rows[key]["passes"] += 1
                    rows[key]["nodes"] += size
                    rows[key]["first"] += length == 1
                    rows[key]["accepted"] += length - 1
    lines = ["| method | category | passes drafted | first-token misses | nodes / pass | accepted / pass |",
             "|---|---|---|---|---|---|"]
    for (method, category), row in sorted(rows.items()):
        passes = row["passes"]
        lines.append(f"| {method} | {category} | {passes:.0f} | {percent(row['first'], passes)} | "
                     f"{row['nodes'] / passes:.2f} | {row['accepted'] / passes:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="suffix,recycling,suffix+recycling")
    parser.add_argument("--per-category", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--limit", type=int, help="at most this many questions")
    parser.add_argument("--plain-fusion", action="store_true",
                        help="also run each fused method as a twin whose merged nodes keep their sources' own "
                             "scores (no calibration per set of sources), interleaved with it")
    parser.add_argument("--budget", type=int,
                        help="draft nodes verified per pass (default: chosen from measured costs, load-dependent)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (τ does not depend on them)")
    parser.add_argument("--results", type=Path, help="a bench run's results.jsonl to summarise instead")
    parser.add_argument("--steps", type=Path, help="write (or, if it exists, read) the recorded steps here")
    args = parser.parse_args()
    if args.results:
        print(bench_table(args.results))
        return
    if args.steps and args.steps.exists():
        opener = gzip.open if args.steps.suffix == ".gz" else open
        with opener(args.steps, "rt", encoding="utf-8") as lines:
            steps = [json.loads(line) for line in lines]
    else:
        steps = run(args.methods.split(","), args.per_category, args.max_new_tokens, args.limit, args.plain_fusion,
                    args.budget, args.threads)
        if args.steps:
            opener = gzip.open if args.steps.suffix == ".gz" else open
            with opener(args.steps, "wt", encoding="utf-8") as out:
                out.writelines(json.dumps(step) + "\n" for step in steps)
    costs = dict(load_or_measure(freespec.load(threads=args.threads).runner))  # this machine's t(q), cached
    print(tau_table(steps), "", category_tau_table(steps), "", misses_table(steps), "", sources_table(steps),
          "", first_nodes_table(steps), "", momentum_table(steps), "", oracle_table(steps, costs), sep="\n")


if __name__ == "__main__":
    main()
