"""Token Recycling (Luo et al., ACL 2025): recycle the model's own top-k candidates as drafts.

State is an adjacency matrix ``successors[vocab, k]``: row t holds the k tokens the model most
recently ranked highest right after token t. A draft is a static tree template whose nodes are
paths of ranks: the node (r1, r2) is ``successors[successors[root, r1], r2]``. After every
verification, each verified node's row is overwritten with its top-k, accepted or not.

freespec also keeps rows keyed by the last *two* tokens (:class:`PairRows`): the model's top-k
after each verified pair, and the token that followed each pair of the prompt. A node drafts from
its pair's row whenever the pair has been seen: the model's candidates after "... a b" predict
what follows b far better when the same pair recurs than its candidates after b in any earlier
context. ``pair_slots=0`` gives the paper's one-token rows alone.

Two tree shapes, both ordered best-first so that the first ``budget`` nodes form the best tree of
that size (which the budget policy relies on):

- ``dynamic`` (default): the matrix also keeps the probability the model gave each candidate, and
  every step grows its tree best-first by path probability (the product along the path), as
  DySpec and OPT-Tree do: deep where the model was confident, wide where it hesitated. Each
  recycled probability is first mapped to the acceptance rate verification showed for such
  probabilities (:class:`freespec.drafters.scoring.AcceptanceCalibration`): recycled confidence
  overstates.
- ``static``: the paper's template, its nodes ordered by per-rank hit rates learned online.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from freespec import kernels
from freespec.drafters.base import BaseDrafter
from freespec.drafters.scoring import AcceptanceCalibration
from freespec.drafters.state import StateCheck, read_state, write_state
from freespec.engine.tree import DraftTree
from freespec.model.runner import TopCandidates

# The paper's best template: 80 nodes of depth <= 6 (8/21/25/15/8/3 nodes per depth), as rank paths.
PAPER_TEMPLATE: tuple[tuple[int, ...], ...] = (
    *((r,) for r in range(8)),
    *((0, r) for r in range(8)), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0), (2, 1), (2, 2),
    (3, 0), (3, 1), (4, 0), (5, 0), (6, 0), (7, 0),
    *((0, 0, r) for r in range(8)), (0, 1, 0), (0, 1, 1), (0, 1, 2), (0, 2, 0), (0, 2, 1),
    (0, 3, 0), (0, 4, 0), (0, 5, 0), (0, 6, 0), (0, 7, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0),
    (2, 0, 0), (3, 0, 0), (4, 0, 0), (5, 0, 0),
    *((0, 0, 0, r) for r in range(5)), (0, 0, 1, 0), (0, 0, 1, 1), (0, 0, 2, 0), (0, 0, 3, 0),
    (0, 0, 4, 0), (0, 1, 0, 0), (0, 2, 0, 0), (1, 0, 0, 0), (2, 0, 0, 0), (3, 0, 0, 0),
    (0, 0, 0, 0, 0), (0, 0, 0, 0, 1), (0, 0, 0, 0, 2), (0, 0, 0, 1, 0), (0, 0, 0, 2, 0),
    (0, 0, 1, 0, 0), (0, 1, 0, 0, 0), (1, 0, 0, 0, 0),
    (0, 0, 0, 0, 0, 0), (0, 0, 0, 0, 0, 1), (0, 0, 0, 1, 0, 0),
)

def order_template(template, rank_hit_rate: np.ndarray) -> list[tuple[int, ...]]:
    """Sort rank paths by decreasing product of hit rates; parents always precede children.

    >>> order_template([(0,), (1,), (0, 0)], np.array([0.6, 0.3]))
    [(0,), (0, 0), (1,)]
    """
    paths = sorted(set(template), key=len)
    known = set()
    for path in paths:
        if path[:-1] and path[:-1] not in known:
            raise ValueError(f"template path {path} has no parent {path[:-1]} in the template")
        known.add(path)
    score = {p: float(np.prod(rank_hit_rate[list(p)])) for p in paths}
    return sorted(paths, key=lambda p: (-score[p], len(p), p))


def top_candidates(logits: torch.Tensor | TopCandidates, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most likely next tokens per row and their probabilities: ([n, k] ids, [n, k] probs),
    from the logits [n, vocab] or as the engine gave them (:attr:`TokenRecycling.reads_top_k`)."""
    candidates = logits if isinstance(logits, TopCandidates) else TopCandidates.of_logits(logits, k, kernels.select())
    return candidates.ids[:, :k], candidates.probs[:, :k]


Row = tuple[np.ndarray, np.ndarray, Callable[[float], float]]
"""A token's recycled candidates: ids [k], probabilities [k] (descending) and the calibration
that maps those probabilities to acceptance rates."""


def best_first_tree(root: int, before_root: int, rows: Callable[[int, int], Row], budget: int) -> DraftTree:
    """Grow a tree from ``root`` by decreasing path probability, at most ``budget`` nodes besides it.

    A node's children are its candidates ``rows(token before it, its token)`` (the root's
    predecessor is ``before_root``, -1 when unknown), each probability mapped through the row's
    calibration (non-decreasing); a path's probability is the product along it. Siblings are
    expanded lazily (the next rank only once the previous one is taken), so the heap stays small.

    >>> successors = np.array([[1, 2], [2, 0], [0, 1]])
    >>> probs = np.array([[0.6, 0.3], [0.9, 0.1], [0.5, 0.4]])
    >>> tree = best_first_tree(0, -1, lambda before, token: (successors[token], probs[token], float), budget=3)
    >>> tree.tokens.tolist(), tree.parents.tolist()  # 0→1 (0.6), 0→1→2 (0.54), 0→2 (0.3)
    ([0, 1, 2, 2], [-1, 0, 1, 0])
    """
    tokens, parents, scores = [root], [-1], [1.0]
    node_rows = [rows(before_root, root)]
    _, probs, calibrate = node_rows[0]
    # (-path probability, parent node, parent path probability, rank)
    frontier = [(-calibrate(probs[0]), 0, 1.0, 0)]
    pop, push = heapq.heappop, heapq.heappush
    while frontier and len(tokens) <= budget:
        negative, parent, parent_probability, rank = pop(frontier)
        probability = -negative
        if probability <= 0.0:
            break
        ids, probs, calibrate = node_rows[parent]
        token = ids.item(rank)
        tokens.append(token)
        parents.append(parent)
        scores.append(probability)
        if len(tokens) > budget:  # full: what this node would offer is never taken
            break
        if rank + 1 < len(ids):
            sibling = parent_probability * calibrate(probs[rank + 1])
            push(frontier, (-sibling, parent, parent_probability, rank + 1))
        row = rows(tokens[parent], token)
        node_rows.append(row)
        push(frontier, (-probability * row[2](row[1][0]), len(tokens) - 1, probability, 0))
    return DraftTree(np.array(tokens, dtype=np.int64), np.array(parents, dtype=np.int64),
                     np.array(scores, dtype=np.float64))


class PairRows:
    """Recycled candidate rows keyed by a pair of tokens (a, b): the model's top-k after "... a b".

    Generating 26 Spec-Bench answers (256 tokens, one draft node per step), a node drafted from the
    model's row for its pair was accepted 64% of the time; from the row of b alone, 23%. Pairs live
    in a direct-mapped table of fixed size (a pair takes its slot from whichever pair held it), so
    memory stays bounded however long a server runs.

    >>> table = PairRows(vocab_size=10, k=2, slots=8)
    >>> table.store([3, -1], [4, 5], np.array([[6, 7], [8, 9]]), np.ones((2, 2)))
    >>> table.find(3, 4) >= 0, table.find(4, 3), table.find(-1, 5)  # an unknown predecessor stores nothing
    (True, -1, -1)
    >>> table.successors[table.find(3, 4)].tolist()
    [6, 7]
    """

    _GOLDEN = 0x9E3779B97F4A7C15  # Fibonacci hashing: the key times 2^64 / golden ratio, top bits

    def __init__(self, vocab_size: int, k: int, slots: int):
        if slots < 1 or slots & (slots - 1):
            raise ValueError(f"pair slots must be a power of two, got {slots}")
        self.vocab_size = vocab_size
        self._shift = 64 - (slots.bit_length() - 1)
        self.keys = np.full(slots, -1, dtype=np.int64)  # [slots] a * vocab + b, -1 = empty
        self.successors = np.zeros((slots, k), dtype=np.int64)  # [slots, k]
        self.probs = np.zeros((slots, k), dtype=np.float32)  # [slots, k], rows descending
        self.calibration = AcceptanceCalibration()  # these rows' probabilities → observed acceptance

    def _slot(self, key: int) -> int:
        return ((key * self._GOLDEN) & 0xFFFFFFFFFFFFFFFF) >> self._shift

    def find(self, before: int, token: int) -> int:
        """The slot holding the pair (before, token), or -1."""
        if before < 0:
            return -1
        return self.find_key(before * self.vocab_size + token)

    def find_key(self, key: int) -> int:
        """The slot holding the pair whose key is ``key`` (before * vocab_size + token), or -1."""
        slot = self._slot(key)
        return slot if self.keys.item(slot) == key else -1

    def store(self, before: Sequence[int], tokens: Sequence[int], successors: np.ndarray, probs: np.ndarray) -> None:
        """Rows [n, k] for the pairs (before[i], tokens[i]); pairs with before < 0 are skipped.
        A loop: a step stores a handful of rows, where numpy's per-call overhead would dominate."""
        for row, (first, second) in enumerate(zip(before, tokens)):
            if first >= 0:
                key = first * self.vocab_size + second
                slot = self._slot(key)
                self.keys[slot] = key
                self.successors[slot], self.probs[slot] = successors[row], probs[row]


class RecyclingTables:
    """What Token Recycling learns, apart from any one request: the one-token rows, the pair
    tables, their calibrations and (static trees) the template's order by rank hit rates.

    One per model, shared by a server's forks (:class:`freespec.drafters.DrafterSettings.shared`):
    the rows are the model's own top-k after a token or pair, true whatever request saw them, so
    every slot drafts from everything the server has verified instead of starting cold. Drafts
    never change a greedy token, nor a sampled one (point-mass drafts: :func:`~freespec.engine.verify.sample_accept`).
    """

    def __init__(self, vocab_size: int, k: int, tree_shape: Literal["dynamic", "static"], template, pair_slots: int):
        self.vocab_size, self.k, self.tree_shape = vocab_size, k, tree_shape
        self.template, self.pair_slots = tuple(template), pair_slots
        self.reset()

    def matches(self, vocab_size: int, k: int, tree_shape: str, template, pair_slots: int) -> bool:
        return (self.vocab_size, self.k, self.tree_shape, self.template, self.pair_slots) == (
            vocab_size, k, tree_shape, tuple(template), pair_slots)

    def reset(self) -> None:
        """Forget everything learned (rows start as arbitrary distinct tokens of probability 0)."""
        self.successors = np.tile(np.arange(self.k, dtype=np.int64), (self.vocab_size, 1))  # [vocab, k]
        self.probs = np.zeros((self.vocab_size, self.k), dtype=np.float32)  # [vocab, k], rows descending
        self.calibration = AcceptanceCalibration()  # dynamic trees: token rows' probability → acceptance
        self.pairs = self.text_pairs = None
        if self.pair_slots:
            self.pairs = PairRows(self.vocab_size, self.k, self.pair_slots)  # the model's top-k per pair
            if self.tree_shape == "dynamic":  # the token that followed each pair in the prompt (one candidate)
                self.text_pairs = PairRows(self.vocab_size, self.k, max(self.pair_slots // 2, 1))
        self.rank_hits = np.ones(self.k)  # Laplace-smoothed counts of which rank was accepted
        self.rank_hits[0] = 4.0
        self.rank_tries = float(self.k + 8)
        self.reorder()

    def reorder(self) -> None:
        """Order the static template by the rank hit rates learned so far."""
        self.steps_since_reorder = 0
        if self.tree_shape != "static":
            return
        rates = self.rank_hits / self.rank_tries
        ordered = order_template(self.template, rates)
        self.node_score = np.array([np.prod(rates[list(p)]) for p in ordered])  # [nodes]
        index = {path: i + 1 for i, path in enumerate(ordered)}  # node 0 is the root
        self.node_parent = np.array([index.get(p[:-1], 0) for p in ordered], dtype=np.int64)  # [nodes]
        self.node_rank = np.array([p[-1] for p in ordered], dtype=np.int64)  # [nodes]

    def row(self, before: int, token: int) -> Row:
        """The candidates after ``token`` preceded by ``before`` (-1: unknown): the model's row for
        the pair if it has one, else the prompt's follower of the pair, else the token's row."""
        if before >= 0:
            key = before * self.vocab_size + token  # once for both tables: a dynamic tree reads a row per node
            for table in (self.pairs, self.text_pairs):
                slot = -1 if table is None else table.find_key(key)
                if slot >= 0:
                    return table.successors[slot], table.probs[slot], table.calibration
        return self.successors[token], self.probs[token], self.calibration

    def _tables(self) -> dict[str, PairRows]:
        tables = {"pairs": self.pairs, "text_pairs": self.text_pairs}
        return {name: table for name, table in tables.items() if table is not None}

    def arrays(self) -> dict[str, np.ndarray]:
        """The learned state as named arrays for a state file (:mod:`freespec.drafters.state`), copies."""
        tables = {}
        for name, table in self._tables().items():
            tables.update({f"{name}_keys": table.keys.copy(), f"{name}_successors": table.successors.copy(),
                           f"{name}_probs": table.probs.copy(), f"{name}_calibration_hits": table.calibration.hits.copy(),
                           f"{name}_calibration_tries": table.calibration.tries.copy()})
        return {"successors": self.successors.copy(), "probs": self.probs.copy(), "rank_hits": self.rank_hits.copy(),
                "rank_tries": np.array(self.rank_tries), "calibration_hits": self.calibration.hits.copy(),
                "calibration_tries": self.calibration.tries.copy(), **tables}

    def prepare(self, check: StateCheck) -> Callable[[], None] | None:
        """Check the tables a state file holds (:meth:`arrays`, for this vocabulary and ``k``);
        return what takes them over, None if it holds none.

        Raises :class:`DamagedStateError` for arrays missing or holding values no run writes,
        ValueError for tables saved for another vocabulary or ``k``.
        """
        state, path = check.state, check.path
        if "successors" not in state:
            return None
        shape = state["successors"].shape
        if len(shape) == 2 and shape != (self.vocab_size, self.k):
            raise ValueError(f"{path} was saved for a vocabulary of {shape[0]} tokens and k={shape[1]}, "
                             f"not {self.vocab_size} and k={self.k}: another model's state")
        matrix = (self.vocab_size, self.k)
        successors, probs = check.ids("successors", matrix), check.probs("probs", matrix)
        rank_hits, rank_tries = check.counts("rank_hits", (self.k,)), check.counts("rank_tries", ())
        calibration = check.calibration("calibration", self.calibration)
        tables = {}  # name → (keys, successors, probs, (calibration hits, tries))
        for name, table in self._tables().items():
            # a table saved with another size, or not saved (pair_slots=0, a static tree), starts
            # empty: it refills within a request
            if f"{name}_keys" in state and len(state[f"{name}_keys"]) == len(table.keys):
                rows = (len(table.keys), self.k)
                tables[name] = (check.keys(f"{name}_keys", rows[:1]), check.ids(f"{name}_successors", rows),
                                check.probs(f"{name}_probs", rows),
                                check.calibration(f"{name}_calibration", table.calibration))

        def apply() -> None:
            self.reset()
            self.successors, self.probs = successors.astype(np.int64), probs.astype(np.float32)
            self.rank_hits, self.rank_tries = rank_hits.astype(np.float64), float(rank_tries)
            self.calibration.hits, self.calibration.tries = calibration
            for name, (keys, ids, table_probs, table_calibration) in tables.items():
                table = self._tables()[name]
                table.keys, table.successors = keys.astype(np.int64), ids.astype(np.int64)
                table.probs = table_probs.astype(np.float32)
                table.calibration.hits, table.calibration.tries = table_calibration
            self.reorder()

        return apply

    def save(self, path: str | Path) -> None:
        """Write the learned state alone to exactly ``path`` (:func:`freespec.drafters.state.write_state`)."""
        write_state(Path(path), self.arrays())

    def load(self, path: str | Path) -> None:
        """Take over the state :meth:`save` wrote; raises as :func:`read_state` and :meth:`prepare` do,
        and changes nothing then."""
        path = Path(path)
        check = StateCheck(read_state(path), path, self.vocab_size)
        apply = self.prepare(check)
        if apply is None:
            raise check.damaged("it holds no successors")
        apply()




class TokenRecycling(BaseDrafter):
    """The Token Recycling drafter; its tables (:class:`RecyclingTables`) stay warm across requests
    until :meth:`reset`, and are shared with other drafters when given as ``tables``.

    ``pair_slots``: size of the table of the model's rows keyed by token pairs (:class:`PairRows`,
    a power of two; the prompt's followers get half as many; 0 keeps only the paper's one-token
    rows). Dynamic trees only draft the prompt's followers: the static template would fill a
    one-candidate row's other ranks with copies.
    """

    wants_prompt_logits = True
    shadow_drafts = True
    learning_optional = True  # the rows are a cache of the model's top-k: a skipped step leaves them staler

    def __init__(self, vocab_size: int, k: int = 8, tree_shape: Literal["dynamic", "static"] = "dynamic",
                 template=PAPER_TEMPLATE, pair_slots: int = 1 << 17, tables: RecyclingTables | None = None):
        if tree_shape not in ("dynamic", "static"):
            raise ValueError(f"the tree shape must be 'dynamic' or 'static', got {tree_shape!r}")
        if tree_shape == "static" and max(max(path) for path in template) >= k:
            raise ValueError(f"template uses ranks beyond k={k}")
        if tables is not None and not tables.matches(vocab_size, k, tree_shape, template, pair_slots):
            raise ValueError("shared recycling tables were made for another vocabulary, k, tree shape or pair table")
        self.vocab_size, self.k, self.tree_shape = vocab_size, k, tree_shape
        self.reads_top_k = k  # learn reads only each node's k best tokens: greedy steps take them from the greedy head
        self.tables = tables or RecyclingTables(vocab_size, k, tree_shape, template, pair_slots)
        self._prompt_unread = False  # a request began and its prompt's pairs are not filed yet
        self._proposed_root: tuple[int, int] | None = None  # (token before the root, root) of the last draft

    def reset(self) -> None:
        """Forget everything learned (the shared tables too)."""
        self.tables.reset()
        self._prompt_unread, self._proposed_root = False, None

    def save(self, path: str | Path) -> None:
        """Write the learned state to ``path``, atomically (:meth:`RecyclingTables.save`)."""
        self.tables.save(path)

    def load(self, path: str | Path) -> None:
        """Take over the state :meth:`save` wrote (:meth:`RecyclingTables.load`)."""
        self.tables.load(path)

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        """Warm start: the model's candidates after each of the last prompt tokens."""
        self._prompt_unread = True
        tables = self.tables
        if prompt_logits is not None and len(prompt_logits):
            recent = prompt[-len(prompt_logits) :]  # the tokens the logits follow
            ids, probs = top_candidates(prompt_logits, self.k)
            tables.successors[recent], tables.probs[recent] = ids, probs
            if tables.pairs is not None:
                tables.pairs.store([-1, *recent[:-1].tolist()], recent.tolist(), ids, probs)

    def _read_prompt(self, prompt: np.ndarray) -> None:
        """File each pair of the prompt with the token that followed it there, as a one-candidate
        row of probability 1 (its calibration learns how often the model copies). :meth:`begin`
        sees only the prompt's last tokens; the whole prompt is the first draft's context."""
        followers = np.repeat(prompt[2:, None], self.k, axis=1)  # [n - 2, k]
        probs = np.zeros(followers.shape, dtype=np.float32)
        probs[:, 0] = 1.0
        self.tables.text_pairs.store(prompt[:-2].tolist(), prompt[1:-1].tolist(), followers, probs)

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        root = int(context[-1])
        before_root = int(context[-2]) if len(context) > 1 else -1
        self._proposed_root = (before_root, root)
        tables = self.tables
        if self._prompt_unread and tables.text_pairs is not None:
            self._read_prompt(context)
        self._prompt_unread = False
        if self.tree_shape == "dynamic":
            return best_first_tree(root, before_root, tables.row, budget)
        size = min(budget, len(tables.node_rank))
        tokens = np.empty(size + 1, dtype=np.int64)
        tokens[0] = root
        rows = {0: tables.row(before_root, root)[0]}  # node → its candidates, for the nodes with children
        for i in range(size):
            parent = int(tables.node_parent[i])
            if parent not in rows:
                grandparent = int(tables.node_parent[parent - 1])
                rows[parent] = tables.row(int(tokens[grandparent]), int(tokens[parent]))[0]
            tokens[i + 1] = rows[parent][tables.node_rank[i]]
        parents = np.concatenate(([-1], tables.node_parent[:size]))
        return DraftTree(tokens, parents, np.concatenate(([1.0], tables.node_score[:size])))

    def learn(self, tree: DraftTree, logits: torch.Tensor, accepted: list[int]) -> None:
        tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
        proposed, self._proposed_root = self._proposed_root, None
        # the token before each node; the root's, if this tree is the last proposal
        before = [proposed[0] if proposed is not None and proposed[1] == tokens[0] else -1]
        before += [tokens[parent] for parent in parents[1:]]
        if self.tree_shape == "dynamic" and len(tree) > 1:
            self._calibrate(tokens, parents, before, accepted)
        ids, probs = top_candidates(logits, self.k)  # [n, k] each
        tables = self.tables
        tables.successors[tree.tokens] = ids  # a token drafted twice keeps its last row
        tables.probs[tree.tokens] = probs
        if tables.pairs is not None:
            tables.pairs.store(before, tokens, ids, probs)
        if self.tree_shape == "static":  # learn which ranks get accepted, to reorder the template
            tables.rank_tries += len(accepted)
            for node in accepted[1:]:
                tables.rank_hits[tables.node_rank[node - 1]] += 1
            tables.steps_since_reorder += 1
            if tables.steps_since_reorder >= 64:
                tables.reorder()

    def _calibrate(self, tokens: list[int], parents: list[int], before: list[int], accepted: list[int]) -> None:
        """Teach each calibration with the nodes whose parent was accepted, from the rows they were
        drafted from (read before the rows change)."""
        on_path, tables = set(accepted), self.tables
        rows: dict[int, tuple[list[int], np.ndarray, AcceptanceCalibration]] = {}  # parent → its row
        observed: dict[AcceptanceCalibration, tuple[list[float], list[bool]]] = {}
        for node in range(1, len(tokens)):
            parent = parents[node]
            if parent in on_path:
                if parent not in rows:
                    ids, probs, calibration = tables.row(before[parent], tokens[parent])
                    rows[parent] = (ids.tolist(), probs, calibration)
                ids, probs, calibration = rows[parent]
                if tokens[node] in ids:  # always, unless the tree came from elsewhere
                    predicted, hit = observed.setdefault(calibration, ([], []))
                    predicted.append(float(probs[ids.index(tokens[node])]))
                    hit.append(node in on_path)
        for calibration, (predicted, hit) in observed.items():
            calibration.learn(predicted, hit)
