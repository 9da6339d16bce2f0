"""SuffixDecoding (Oliaro et al., NeurIPS 2025): draft what followed the context's suffix before:
in this request, in the tenant's earlier requests and, optionally, in a corpus.

Three sources, each a suffix structure matched against the end of the context and walked by
frequency, fused into one tree (:class:`freespec.drafters.fused.Fused`):

- ``request``: a suffix automaton of this request's prompt and output, grown as they grow;
- ``store``: a suffix automaton of the tenant's earlier requests (prompts and outputs), bounded
  in tokens, the oldest requests dropped first; one per tenant (the server's API key), so one
  client's text is never drafted into another's answer;
- ``corpus``: the suffix array of a datastore built by ``freespec datastore build`` (read-only,
  memory-mapped), walked as the suffix tree it spells.

A child's raw score is its share of its parent's occurrences (a count of one more than the
occurrences with a continuation, so that one earlier occurrence reads 1/2 and twenty that agree
20/21); :class:`freespec.drafters.scoring.DepthCalibration` maps it to the chance of acceptance
seen so far for that source, match length and depth. SuffixDecoding's stopping rule: no node whose
path probability (its expected acceptance) is below ``floor``, none deeper than
``factor * match + offset``, and the engine's budget policy verifies the prefix with the most
tokens per second by the same scores. SuffixDecoding also compares match lengths by their trees'
expected accepted tokens (the sum of their nodes' probabilities); ``candidates`` > 1 does that
among the longest match and the next shorter ones, which on Spec-Bench did not raise τ
(docs/drafters.md), so by default each source drafts from its longest match.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
import torch

from freespec.drafters.datastore import SEPARATOR, Datastore, longest_match
from freespec.drafters.fused import Fused
from freespec.drafters.grow import grow
from freespec.drafters.scoring import CalibratedDrafter, match_group
from freespec.drafters.state import StateCheck
from freespec.engine.tree import DraftTree

MAX_MATCH = 24  # the longest context suffix a source matches
MAX_DEPTH = 16  # the deepest draft node


class SuffixAutomaton:
    """The suffix automaton of a token stream, with the occurrence count of every substring of up
    to ``depth`` tokens, kept up to date as tokens are appended.

    Each state stands for a set of substrings that end at the same positions; ``counts[state]`` is
    how many positions that is (for states whose shortest string has at most ``depth`` tokens),
    so a state's children, reached by ``transitions[state]``, carry the counts of what followed it.
    Appending a token costs O(1) amortised plus at most ``depth`` count increments: the states of
    the stream's last ``depth`` suffixes, tracked in ``recent``.

    >>> automaton = SuffixAutomaton(depth=8)
    >>> automaton.extend([1, 2, 3, 1, 2, 4, 1, 2])
    >>> state = automaton.find([1, 2])
    >>> automaton.counts[state], {t: automaton.counts[s] for t, s in automaton.transitions[state].items()}
    (3, {3: 1, 4: 1})
    """

    def __init__(self, depth: int = MAX_MATCH + MAX_DEPTH):
        self.depth = depth
        self.lengths = [0]  # per state: its longest string's length
        self.links = [-1]  # per state: the state of its longest suffix that ends elsewhere too
        self.transitions: list[dict[int, int]] = [{}]
        self.counts = [0]
        self.last = 0  # the state of the whole stream
        self.recent = 0  # the state of the stream's last min(depth, size) tokens
        self.size = 0

    def extend(self, tokens: Sequence[int]) -> None:
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        lengths, links, transitions, counts = self.lengths, self.links, self.transitions, self.counts
        # the state of the suffix of min(depth - 1, size) tokens: with the token, the new recent one
        keep = min(self.depth - 1, self.size)
        before = self.recent
        if before and lengths[links[before]] >= keep:
            before = links[before]
        current = len(lengths)
        lengths.append(lengths[self.last] + 1)
        links.append(0)
        transitions.append({})
        counts.append(0)
        state = self.last
        while state >= 0 and token not in transitions[state]:
            transitions[state][token] = current
            state = links[state]
        if state >= 0:
            target = transitions[state][token]
            if lengths[state] + 1 == lengths[target]:
                links[current] = target
            else:  # split target: its strings of up to lengths[state] + 1 tokens become a clone
                clone = len(lengths)
                lengths.append(lengths[state] + 1)
                links.append(links[target])
                transitions.append(dict(transitions[target]))
                counts.append(counts[target])
                while state >= 0 and transitions[state].get(token) == target:
                    transitions[state][token] = clone
                    state = links[state]
                links[target] = links[current] = clone
                if before == target and keep <= lengths[clone]:
                    before = clone
        self.last = current
        self.size += 1
        self.recent = state = transitions[before][token]
        while state > 0:  # every suffix of up to `depth` tokens occurs once more
            counts[state] += 1
            state = links[state]

    def find(self, tokens: Sequence[int]) -> int:
        """The state of ``tokens`` (0 when absent or empty)."""
        state = 0
        for token in tokens:
            state = self.transitions[state].get(token, 0)
            if not state:
                return 0
        return state

    def advance(self, state: int, length: int, token: int, limit: int) -> tuple[int, int]:
        """(state, length) of the longest suffix of ``state``'s match + ``token`` that occurs,
        at most ``limit`` tokens long (``length``: how long the match is; (0, 0): none).

        >>> automaton = SuffixAutomaton()
        >>> automaton.extend([5, 6, 7, 8])
        >>> automaton.advance(automaton.find([5, 6]), 2, 7, limit=8)[1], automaton.advance(0, 0, 9, limit=8)
        (3, (0, 0))
        """
        lengths, links, transitions = self.lengths, self.links, self.transitions
        while state and token not in transitions[state]:
            state = links[state]
            length = lengths[state]
        state = transitions[state].get(token, 0)
        if not state:
            return 0, 0
        length = min(length + 1, limit)
        while lengths[links[state]] >= length:
            state = links[state]
        return state, length

    def children(self, state: int, extra: int) -> list[tuple[int, float, tuple[int, int]]]:
        """``state``'s continuations as (token, share, (child, 1)): each child's count over the
        state's plus ``extra`` (separators, negative, are counted but never drafted)."""
        counts = self.counts
        total = counts[state] + extra
        return [(token, counts[child] / total, (child, 1))
                for token, child in self.transitions[state].items() if token >= 0]


class SuffixSource(CalibratedDrafter):
    """One source: its match candidates, longest first, and the children of a node."""

    shadow_drafts = True
    reads_logits = False

    def __init__(self, candidates: int = 1, factor: float = 2.0, offset: float = 2.0, floor: float = 0.02):
        super().__init__()
        self.candidates, self.factor, self.offset, self.floor = candidates, factor, offset, floor

    def matches(self, context: np.ndarray) -> list[tuple[object, int]]:
        """(node handle, match length) for the context's longest matching suffix and shorter ones."""
        raise NotImplementedError

    def expand(self, handle) -> list[tuple[int, float, object]]:
        raise NotImplementedError

    def propose(self, context: np.ndarray, budget: int) -> DraftTree:
        """The tree with the most expected accepted tokens among the match candidates' trees."""
        root = int(context[-1])
        best, best_expected = None, 0.0
        candidates = self.matches(context)[: self.candidates]
        for handle, length in candidates:
            group = match_group(length)
            grown = grow(root, handle, self.expand, budget, partial(self.calibration, group), self.floor,
                         min(MAX_DEPTH, math.floor(self.factor * length + self.offset)))
            if len(grown.tree) == 1:  # nothing drafted: expects nothing
                continue
            # every drafted node scores above the floor (a probability, >= 0): a lone candidate's tree
            # wins without its sum
            expected = float(grown.tree.scores[1:].sum()) if len(candidates) > 1 else 1.0
            if expected > best_expected:
                best, best_expected = (grown, group), expected
        if best is None:
            return DraftTree.root_only(root)
        (tree, shares, depths), group = best
        self.remember(tree, [group] * len(tree), shares, depths)
        return tree


class RequestSource(SuffixSource):
    """This request's prompt and output: a suffix automaton extended at each proposal."""

    def __init__(self, **limits):
        super().__init__(**limits)
        self.automaton = SuffixAutomaton()

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        self.automaton = SuffixAutomaton()  # filled from the context at each proposal

    def matches(self, context: np.ndarray) -> list[tuple[object, int]]:
        automaton = self.automaton
        if len(context) < automaton.size:  # a context the automaton has not seen grow: start over
            automaton = self.automaton = SuffixAutomaton()
        automaton.extend(context[automaton.size :].tolist())
        lengths, links, counts = automaton.lengths, automaton.links, automaton.counts
        length = min(MAX_MATCH, automaton.size)
        state = automaton.recent
        while state and lengths[links[state]] >= length:  # the state of the last MAX_MATCH tokens
            state = links[state]
        found = []
        while state and len(found) < self.candidates:
            if counts[state] >= 2:  # it occurred before this end, so something followed it
                found.append(((state, 0), length))  # the count holds this end, with no continuation
            state = links[state]
            length = lengths[state]
        return found

    def expand(self, handle: tuple[int, int]) -> list[tuple[int, float, tuple[int, int]]]:
        return self.automaton.children(*handle)


class SuffixStore:
    """A tenant's earlier requests in one suffix automaton, at most ``capacity`` tokens.

    A request is stored without the part it shares with the previous one (a chat's earlier turns)
    but for ``overlap`` tokens before it, so matches still run into the new part. Past the capacity
    the oldest requests are dropped until a quarter is free, and the automaton is rebuilt from the
    rest (amortised: a quarter of the capacity is added between rebuilds).

    >>> store = SuffixStore(capacity=12, overlap=2)
    >>> store.add([1, 2, 3, 4, 5]); store.add([1, 2, 3, 4, 5, 6, 7])  # stores 4 5 6 7 the second time
    >>> store.tokens, store.version
    (9, 2)
    >>> store.add([8, 9, 10, 11]); store.tokens, store.version  # over 12: the first request goes
    (8, 3)
    """

    def __init__(self, capacity: int = 1 << 16, overlap: int = MAX_MATCH):
        if capacity < 1:
            raise ValueError(f"the store's capacity must be positive, got {capacity}")
        self.capacity, self.overlap = capacity, overlap
        self.pieces: deque[list[int]] = deque()  # what each request stored, oldest first
        self.tokens = 0
        self.version = 0  # changes with the automaton (a server's other forks add to it): matches are redone
        self.automaton = SuffixAutomaton()
        self.previous: list[int] = []  # the last request added, which the next is compared with

    def piece_of(self, tokens: list[int]) -> list[int]:
        """What :meth:`add` stores of ``tokens``: all but what they share with the previous request,
        ``overlap`` tokens before that kept, at most ``capacity``."""
        shared = 0
        for a, b in zip(self.previous, tokens):
            if a != b:
                break
            shared += 1
        return tokens[max(shared - self.overlap, 0) :][-self.capacity :]

    def add(self, tokens: list[int]) -> None:
        piece = self.piece_of(tokens)
        self.previous = tokens
        if not piece:
            return
        self.pieces.append(piece)
        self.tokens += len(piece)
        self.version += 1
        if self.tokens <= self.capacity:
            self.automaton.extend([SEPARATOR, *piece] if self.automaton.size else piece)
            return
        while self.tokens > self.capacity * 3 // 4 and len(self.pieces) > 1:
            self.tokens -= len(self.pieces.popleft())
        self._rebuild()

    def restore(self, pieces: list[list[int]], previous: list[int]) -> None:
        """Hold ``pieces`` (oldest first; the newest that fit the capacity) and compare the next
        request with ``previous``, as :meth:`add` left them (a state file's)."""
        kept, tokens = deque(), 0
        for piece in reversed(pieces):
            if tokens + len(piece) > self.capacity:
                break
            kept.appendleft(piece)
            tokens += len(piece)
        self.pieces, self.tokens, self.previous = kept, tokens, previous
        self.version += 1
        self._rebuild()

    def _rebuild(self) -> None:
        self.automaton = SuffixAutomaton()
        for piece in self.pieces:
            self.automaton.extend([SEPARATOR, *piece] if self.automaton.size else piece)


class TenantStores:
    """One :class:`SuffixStore` per tenant, at most ``tenants`` of them (the least recently used
    goes), so that no tenant's text is drafted into another's answers."""

    def __init__(self, capacity: int = 1 << 16, tenants: int = 8):
        self.capacity, self.tenants = capacity, tenants
        self.stores: OrderedDict[str | None, SuffixStore] = OrderedDict()  # least recently used first
        self.sources: weakref.WeakSet[StoreSource] = weakref.WeakSet()  # the drafters' sources reading them

    def __call__(self, tenant: str | None) -> SuffixStore:
        store = self.stores.get(tenant)
        if store is None:
            store = self.stores[tenant] = SuffixStore(self.capacity)
            while len(self.stores) > self.tenants:
                self.stores.popitem(last=False)
        self.stores.move_to_end(tenant)
        return store

    def arrays(self) -> dict[str, np.ndarray]:
        """Every tenant's stored requests as named arrays for a state file
        (:mod:`freespec.drafters.state`), with the requests its sources have not stored yet (over,
        or under way) as they would store them; the stores themselves are left as they are."""
        unstored: dict[str | None, list[list[int]]] = {}
        for source in list(self.sources):
            if (request := source.unstored()) is not None:
                unstored.setdefault(request[0], []).append(request[1])
        names, named, owners, lengths, tokens, previous_lengths, previous = [], [], [], [], [], [], []
        for index, (tenant, store) in enumerate(self.stores.items()):
            names.append(tenant or "")
            named.append(tenant is not None)
            for piece in [*store.pieces, *(store.piece_of(request) for request in unstored.get(tenant, []))]:
                if not piece:
                    continue
                owners.append(index)
                lengths.append(len(piece))
                tokens.extend(piece)
            previous_lengths.append(len(store.previous))
            previous.extend(store.previous)
        return {"suffix_tenants": np.array(names, dtype=str), "suffix_tenant_named": np.array(named, dtype=np.int8),
                "suffix_piece_tenants": np.array(owners, dtype=np.int32),
                "suffix_piece_lengths": np.array(lengths, dtype=np.int64),
                "suffix_tokens": np.array(tokens, dtype=np.int32),
                "suffix_previous_lengths": np.array(previous_lengths, dtype=np.int64),
                "suffix_previous": np.array(previous, dtype=np.int32)}

    def prepare(self, check: StateCheck) -> Callable[[], None] | None:
        """Check the stores a state file holds (:meth:`arrays`); return what takes them over (the
        most recently used tenants that fit), None if it holds none. Raises
        :class:`DamagedStateError` for arrays missing or holding values no run writes."""
        if "suffix_tokens" not in check.state:
            return None
        names = check.strings("suffix_tenants")
        count = len(names)
        named = check.array("suffix_tenant_named", (count,), True, 0, 1)
        owners = check.array("suffix_piece_tenants", (None,), True, 0, count - 1)
        lengths = check.array("suffix_piece_lengths", owners.shape, True, 1, math.inf)
        tokens = check.ids("suffix_tokens", (None,))
        previous_lengths = check.array("suffix_previous_lengths", (count,), True, 0, math.inf)
        previous = check.ids("suffix_previous", (None,))
        if lengths.sum() != len(tokens) or previous_lengths.sum() != len(previous):
            raise check.damaged("the suffix stores' lengths do not add up to their tokens")
        pieces: list[list[list[int]]] = [[] for _ in names]
        ends = np.cumsum(lengths).tolist()
        for owner, start, end in zip(owners.tolist(), [0, *ends[:-1]], ends):
            pieces[owner].append(tokens[start:end].tolist())
        previous_ends = np.cumsum(previous_lengths).tolist()
        stores: OrderedDict[str | None, SuffixStore] = OrderedDict()
        for index in range(max(count - self.tenants, 0), count):
            store = stores[names[index] if named[index] else None] = SuffixStore(self.capacity)
            end = previous_ends[index]
            store.restore(pieces[index], previous[end - int(previous_lengths[index]) : end].tolist())

        def apply() -> None:  # the sources' matches see new store objects, and are redone
            self.stores = stores

        return apply


class StoreSource(SuffixSource):
    """The tenant's earlier requests: each request is stored when the next one begins."""

    def __init__(self, stores: TenantStores | None = None, **limits):
        super().__init__(**limits)
        self.stores = stores or TenantStores()
        self.stores.sources.add(self)
        self.tenant: str | None = None
        self._next_tenant: str | None = None
        self._context: np.ndarray | None = None  # this request's context at its last proposal
        self._match = (None, 0, 0, 0)  # (store, its version, state, length) after the context's end
        self._matched = 0  # context tokens the match has read

    def set_tenant(self, tenant: str | None) -> None:
        self._next_tenant = tenant

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        if self._context is not None:  # the previous request is over: store it for its tenant
            self.stores(self.tenant).add(self._context.tolist())
        self.tenant, self._context, self._matched = self._next_tenant, None, 0

    def unstored(self) -> tuple[str | None, list[int]] | None:
        """(tenant, tokens) of the request this source has read and not stored yet, if any."""
        return None if self._context is None else (self.tenant, self._context.tolist())

    def matches(self, context: np.ndarray) -> list[tuple[object, int]]:
        store = self.stores(self.tenant)
        automaton = store.automaton
        matched, version, state, length = self._match
        if matched is not store or version != store.version or len(context) < self._matched:
            state, length, self._matched = 0, 0, max(len(context) - MAX_MATCH, 0)
        for token in context[self._matched :].tolist():
            state, length = automaton.advance(state, length, token, MAX_MATCH)
        self._match, self._matched, self._context = (store, store.version, state, length), len(context), context
        found = []
        lengths, links = automaton.lengths, automaton.links
        while state and len(found) < self.candidates:
            found.append(((state, 1), length))
            state = links[state]
            length = lengths[state]
        return found

    def expand(self, handle: tuple[int, int]) -> list[tuple[int, float, tuple[int, int]]]:
        return self._match[0].automaton.children(*handle)


class CorpusSource(SuffixSource):
    """A datastore's corpus: the suffixes starting with a context's suffix are one interval of its
    suffix array, and within it the next tokens are sorted, so each child is a run of equal tokens
    found by binary search (the suffix tree, read off the array)."""

    def __init__(self, datastore: Datastore, samples: int = 16, **limits):
        super().__init__(**limits)
        self.store, self.samples = datastore, samples
        self._match = (0, 0, 0)  # (length, low, high): the suffix array rows the context's suffix starts
        self._matched = 0

    def begin(self, prompt: np.ndarray, prompt_logits: torch.Tensor | None) -> None:
        self._match, self._matched = (0, 0, 0), 0

    def _token(self, row: int, offset: int) -> int:
        return int(self.store.tokens[int(self.store.suffixes[row]) + offset])

    def _run(self, low: int, high: int, offset: int, token: int, inside: int) -> tuple[int, int]:
        """[start, end): the rows of [low, high) whose token at ``offset`` is ``token``, one of
        them being ``inside`` (or any row, when -1: then the run may be empty)."""
        read = self._token
        lo, hi = low, high if inside < 0 else inside
        while lo < hi:  # first row whose token is >= token
            middle = (lo + hi) // 2
            if read(middle, offset) < token:
                lo = middle + 1
            else:
                hi = middle
        start = lo
        lo, hi = max(start, inside + 1), high
        while lo < hi:  # first row whose token is > token
            middle = (lo + hi) // 2
            if read(middle, offset) <= token:
                lo = middle + 1
            else:
                hi = middle
        return start, lo

    def matches(self, context: np.ndarray) -> list[tuple[object, int]]:
        length, low, high = self._match
        if len(context) < self._matched:  # not this request's context
            length = 0
        for token in context[self._matched :].tolist() if length else ():
            low, high = self._run(low, high, length, token, -1)  # the rows whose match goes on with it
            if low == high:
                length = 0
                break
            length += 1
        if not length:  # start again from the longest suffix that occurs (a few binary searches)
            length, low, high = longest_match(self.store.tokens, self.store.suffixes, context, MAX_MATCH)
        self._match, self._matched = (length, low, high), len(context)
        return [((length, low, high), length)] if length else []

    def expand(self, handle: tuple[int, int, int]) -> list[tuple[int, float, tuple[int, int, int]]]:
        offset, low, high = handle
        count = high - low
        rows = {low + (i * count) // self.samples for i in range(self.samples)} if count > self.samples \
            else set(range(low, high))
        seen, children = set(), []
        for row in sorted(rows):
            token = self._token(row, offset)
            if token == SEPARATOR or token in seen:
                continue
            seen.add(token)
            start, end = self._run(low, high, offset, token, row)
            children.append((token, (end - start) / (count + 1), (offset + 1, start, end)))
        return children


class Suffix(Fused):
    """The ``suffix`` drafter: this request, the tenant's earlier requests and an optional corpus,
    fused. ``stores`` keeps earlier requests' text (default: stores of its own); a
    :class:`freespec.api.Model` gives its drafters and its forks' one set, kept until
    :meth:`~freespec.api.Model.reset`."""

    def __init__(self, datastore: str | Path | Datastore | None = None, tokenizer=None, vocab_size: int | None = None,
                 stores: TenantStores | None = None):
        sources: list[SuffixSource] = [RequestSource(), StoreSource(stores or TenantStores())]
        if datastore is not None:
            if not isinstance(datastore, Datastore):
                datastore = Datastore(datastore, tokenizer, vocab_size)
            sources.append(CorpusSource(datastore))
        super().__init__(sources)
