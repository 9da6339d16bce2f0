"""TransformersRunner: any other causal LM through its own transformers forward, on any torch device.

The native :class:`~freespec.model.runner.ModelRunner` runs the families whose weights it knows on
batch-invariant C kernels. Every other decoder-only causal LM that transformers loads runs here,
at transformers' speed, with the same protocol (prefill, forward over a draft tree, commit the
accepted path, logits), so drafters, verification, sampling, the CLI and the server work on it:

- the model's own forward gets a 4-D additive attention mask (every new token sees the committed
  prefix and the tree mask's nodes; sliding-window layers only those within their
  window) and position ids from the tree depths;
- the cache is a DynamicCache of plain layers (never trimmed to a window, so it can roll back);
  committing keeps the rows of the accepted nodes in order on every layer;
- logits come from the model's own head (soft-capping, logit scales and all).

Its passes are not batch-invariant: a token's logits inside a tree can differ in the last bits
from its logits decoded alone, so a near-tie can flip a greedy choice, and cache rows are never
reused across requests. Each model is checked once when its runner is made: a small tree pass with
a reordering commit must reproduce the model's plain forward, else it is refused in one line
(e.g. ALiBi models, whose bias follows cache rows rather than positions).

:func:`make_runner` decides which runner a model gets.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from freespec.kernels import Kernels
from freespec.kernels import select as select_kernels
from freespec.model.kv_cache import SKIPPED, common_prefix
from freespec.model.runner import (
    PREFILL_CHUNK,
    ModelRunner,
    PassLogits,
    PrefillCancelled,
    check_pass,
    forward_logits,
)
from freespec.model.weights import (
    UnsupportedModelError,
    refuse_unsupported,
    supported,
)

if TYPE_CHECKING:
    from freespec.model.loading import LoadedModel

CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "max_seq_len", "seq_length",
                "n_ctx")


def make_runner(loaded: LoadedModel, kernels: Kernels, device: str | torch.device = "cpu") -> ModelRunner | TransformersRunner:
    """The runner for ``loaded``: the native one on the CPU for the families it supports (its
    weights were read: ``loaded.weights``), else transformers' own forward on ``device``. Models
    neither can run raise :class:`UnsupportedModelError` with a one-line reason."""
    refuse_unsupported(loaded.config)
    if torch_device(device).type == "cpu" and loaded.weights is not None:
        return ModelRunner(loaded.config, loaded.weights, kernels)
    return TransformersRunner(loaded.transformers_model(), device)


def fallback_notice(runner: ModelRunner | TransformersRunner) -> str | None:
    """What a user should hear once when a model runs through transformers (the CLI prints it)."""
    if not isinstance(runner, TransformersRunner):
        return None
    why = f"no fast path for {runner.family}" if runner.device.type == "cpu" else "the fast path is CPU-only"
    return (f"{why}: the model runs through transformers' own forward on {runner.device}, at transformers' speed; "
            "its passes are not batch-invariant, so prefix reuse is off and a near-tie in the logits may "
            "decode differently from plain decoding")


def torch_device(name: str | torch.device) -> torch.device:
    """``name`` as a torch device that exists here; ValueError in one line otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(name)!r}: expected cpu, cuda, cuda:N, mps, xpu or another "
                         "device type torch knows") from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    available = backend is not None and getattr(backend, "is_available", lambda: False)()
    if available and device.index is not None and hasattr(backend, "device_count"):
        available = device.index < backend.device_count()
    if not available:
        raise ValueError(f"device {str(name)!r} is not available here (torch {torch.__version__}); use --device cpu")
    return device


class _Passthrough(torch.nn.Module):
    """A decoder layer left out of a pass: its input is its output, it writes no cache rows."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


class _Given(torch.nn.Module):
    """Stands in for a causal LM's decoder so that its head runs on hidden states computed earlier.

    The decoder's submodules are this stand-in too (OPT's head calls ``model.decoder``).
    """

    def __init__(self, hidden: torch.Tensor, decoder: torch.nn.Module):
        super().__init__()
        self.hidden = hidden  # [1, n, hidden]
        self.submodules = frozenset(name for name, _ in decoder.named_children())

    def __getattr__(self, name: str):
        if name in self.__dict__.get("submodules", ()):
            return self
        return super().__getattr__(name)

    def forward(self, *args, **kwargs) -> BaseModelOutputWithPastAndCrossAttentions:
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=self.hidden)


class TransformersRunner:
    """Forward passes of any causal LM through transformers, with tree masks and cache compaction.

    Same protocol as :class:`~freespec.model.runner.ModelRunner`: ``forward(tokens, positions,
    tree_mask)`` runs the new tokens after the committed prefix and returns their final hidden
    states; ``commit(kept)`` keeps the rows of the nodes in ``kept`` (in that order), drops the rest.
    """

    def __init__(self, hf_model: torch.nn.Module, device: str | torch.device = "cpu"):
        refuse_unsupported(hf_model.config)
        self.device = torch_device(device)
        self.model = hf_model.to(self.device).eval()
        if self.model.config._attn_implementation not in ("eager", "sdpa"):
            self.model.set_attn_implementation("sdpa")  # flash and flex attention take no 4-D mask
        self.config = hf_model.config
        self.family = self.config.model_type
        self.decoder = hf_model.base_model
        if self.decoder is hf_model:
            raise UnsupportedModelError(f"{self.family} has no separate decoder to run; {supported()}")
        text = self.config.get_text_config(decoder=True)
        self.kernels = select_kernels("torch")  # what computes: torch, through transformers; not batch-invariant
        self.dtype = next(hf_model.parameters()).dtype
        self.weight_formats = [f"transformers {self.config._attn_implementation} {self.dtype} on "
                               f"{self._device_name()}"]  # in the calibration key: t(q) depends on them
        self.vocab_size = hf_model.get_output_embeddings().weight.shape[0]
        self.num_layers = text.num_hidden_layers
        self._layers = self._layer_list(self.num_layers)
        self._kinds = sorted(set(getattr(text, "layer_types", None) or ["full_attention"]))
        self._window = getattr(text, "sliding_window", None)
        self.max_positions = self._context_length(text)
        parameters = inspect.signature(self.decoder.forward).parameters
        self._cache_keyword = "cache" if "cache" in parameters else "past_key_values"  # renamed within 5.x
        self.cache = DynamicCache()
        self.length = 0  # committed rows
        self.capacity = 0  # positions a request may fill (the cache itself grows as needed)
        self.row_tokens: list[int] = []  # the token of each committed row; SKIPPED: not reusable
        self._pending: list[int] = []  # the last forward's tokens, as commit records them
        self.holder: object | None = None  # the request whose rows the cache holds (Generation.plan checks it)
        self.lock = threading.RLock()  # held for each step of a request: threads sharing a model take turns
        self._check_tree_forward()

    def _device_name(self) -> str:
        if self.device.type == "cuda":
            return torch.cuda.get_device_name(self.device)
        return self.device.type

    def _context_length(self, text) -> int:
        """The model's context. Without ``layer_types`` (whose windows the masks apply per layer), a
        window the config names caps it: within it, windowed attention equals full attention, also
        where a model masks its window by cache row (GPT-Neo's ``window_size``) rather than position."""
        length = next((int(value) for key in CONTEXT_KEYS if isinstance(value := getattr(text, key, None), int)
                       and value > 0), None)
        if length is None:
            raise UnsupportedModelError(f"{self.family}'s config gives no context length ({', '.join(CONTEXT_KEYS)})")
        if getattr(text, "layer_types", None) is None:
            windows = [getattr(text, key, None) for key in ("attention_chunk_size", "window_size")]
            if getattr(text, "use_sliding_window", True):
                windows.append(self._window)
            length = min([length, *(int(window) for window in windows if isinstance(window, int) and window > 0)])
        return length

    def _layer_list(self, count: int) -> torch.nn.ModuleList | None:
        """The decoder's list of layers (what a skipping pass leaves out), or None if not found:
        ``count`` modules of a class the model names as a layer (``_no_split_modules``)."""
        layer_classes = set(getattr(self.model, "_no_split_modules", None) or [])
        return next((module for module in self.decoder.modules()
                     if isinstance(module, torch.nn.ModuleList) and len(module) == count
                     and (not layer_classes or type(module[0]).__name__ in layer_classes)), None)

    # -- the cache --------------------------------------------------------------------------------

    def reset(self, capacity: int) -> None:
        """Empty the cache and make sure it holds ``capacity`` positions."""
        if capacity > self.max_positions:
            raise ValueError(f"{capacity} positions exceed the model's context of {self.max_positions}")
        self.cache = DynamicCache()
        self.length, self.capacity, self.row_tokens = 0, capacity, []
        self.holder = None

    def reserve(self, capacity: int) -> None:
        """Make sure the cache holds ``capacity`` positions, keeping the committed rows."""
        if capacity > self.max_positions:
            raise ValueError(f"{capacity} positions exceed the model's context of {self.max_positions}")
        self.capacity = max(self.capacity, capacity)

    def truncate(self, length: int) -> None:
        """Drop the committed rows from ``length`` on."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate the cache to {length} rows: it holds {self.length}")
        self._crop(length)
        self.length = length
        del self.row_tokens[length:]

    def keep_prefix(self, tokens: Sequence[int]) -> int:
        """Drop the committed rows after the longest prefix of ``tokens`` they hold; return how many are left."""
        kept = common_prefix(self.row_tokens, tokens)
        self.truncate(kept)
        return kept

    def reuse(self, tokens: Sequence[int], capacity: int) -> int:
        """Keep nothing (these passes are not batch-invariant: a kept row could differ in the last
        bits from a fresh prefill's), make sure the cache holds ``capacity`` positions; return 0."""
        self.reset(capacity)
        return 0

    def commit(self, kept: Sequence[int]) -> None:
        """Keep the cache rows of the last forward's nodes ``kept`` (ascending), drop the others."""
        start, count = self.length, len(kept)
        if list(kept) != list(range(count)):
            source = torch.as_tensor(list(kept), dtype=torch.long, device=self.device) + start
            with torch.inference_mode():
                for layer in self._written_layers(start + count):
                    layer.keys[:, :, start : start + count] = layer.keys[:, :, source]
                    layer.values[:, :, start : start + count] = layer.values[:, :, source]
        self._crop(start + count)
        self.length += count
        self.row_tokens += [self._pending[node] for node in kept]

    def _written_layers(self, rows: int) -> Iterator[DynamicLayer]:
        """The cache layers holding at least ``rows`` rows (layers a skipping pass left out hold fewer)."""
        return (layer for layer in self.cache.layers if layer.is_initialized and layer.keys.shape[-2] >= rows)

    def _crop(self, length: int) -> None:
        """Cut every layer's rows to at most ``length``."""
        for layer in self._written_layers(length + 1):
            layer.keys, layer.values = layer.keys[:, :, :length], layer.values[:, :, :length]

    # -- forward ----------------------------------------------------------------------------------

    def prefill(self, tokens: torch.Tensor, should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
        """Run and commit a prompt (causally, in chunks); return its final hidden states [n, hidden].

        ``should_stop`` is asked before each chunk; True raises :class:`PrefillCancelled`."""
        hidden, start = [], 0
        while start < tokens.shape[0]:
            if should_stop is not None and should_stop():
                raise PrefillCancelled(f"prefill stopped after {start} of {tokens.shape[0]} tokens")
            chunk = tokens[start : start + PREFILL_CHUNK]
            n = chunk.shape[0]
            causal = torch.ones(n, n, dtype=torch.bool).tril_()
            hidden.append(self.forward(chunk, torch.arange(self.length, self.length + n), causal))
            self.commit(range(n))
            start += n
        if not hidden:
            return torch.empty(0, self.config.get_text_config(decoder=True).hidden_size, dtype=self.dtype)
        return torch.cat(hidden)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, tree_mask: torch.Tensor,
                skip: frozenset[int] = frozenset()) -> torch.Tensor:
        """Final hidden states [q, hidden] for ``tokens`` [q] at ``positions`` [q] (on this runner's device).

        ``tree_mask`` [q, q] (True = attend) says which new tokens each new token sees; all of them
        see the committed prefix. ``skip``: decoder layers to leave out (a cheaper draft); their
        rows are not written, so :meth:`truncate` must drop such rows before a full pass.
        """
        check_pass(tokens, positions, tree_mask, skip, self.num_layers, self.max_positions)
        if skip and self._layers is None:
            raise ValueError(f"cannot skip layers of {self.family}: its decoder layers were not found")
        n, ids = tokens.shape[0], tokens.tolist()
        if self.length + n > self.capacity:
            raise ValueError(f"cache overflow: {self.length + n} rows needed, capacity {self.capacity}")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            bad_id = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise ValueError(f"token id {bad_id} is out of range: this model's ids are 0..{self.vocab_size - 1}")
        self._crop(self.length)  # rows of an uncommitted pass
        if not skip and any(layer.keys.shape[-2] < self.length for layer in self.cache.layers if layer.is_initialized):
            raise ValueError("rows written with skipped layers must be truncated before a full pass")
        self._pending = [SKIPPED] * n if skip else ids
        positions = positions.to(self.device, torch.long)
        arguments = {self._cache_keyword: self.cache}
        with torch.inference_mode(), self._skipping(skip):
            output = self.decoder(input_ids=tokens.to(self.device, torch.long)[None],
                                  attention_mask=self._mask(positions, tree_mask.to(self.device, torch.bool)),
                                  position_ids=positions[None], use_cache=True, **arguments)
        return output.last_hidden_state[0]

    def _mask(self, positions: torch.Tensor, tree_mask: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The additive 4-D mask [1, 1, q, committed + q] of each attention kind the layers use: a
        tensor if all layers attend fully, else {layer type: mask}, as transformers' hybrid models
        take it. A sliding layer sees the keys less than its window before the query's position."""
        n, past = positions.shape[0], self.length
        keys = torch.cat([torch.arange(past, device=self.device), positions])  # [past + q] key positions
        visible = torch.cat([torch.ones(n, past, dtype=torch.bool, device=self.device), tree_mask], dim=1)
        distance = positions[:, None] - keys[None, :]  # [q, past + q]
        masks = {}
        for kind in self._kinds:
            allowed = visible & (distance < self._window) if kind == "sliding_attention" else visible
            additive = torch.zeros(n, past + n, dtype=self.dtype, device=self.device)
            masks[kind] = additive.masked_fill_(~allowed, torch.finfo(self.dtype).min)[None, None]
        return masks if self._kinds != ["full_attention"] else masks["full_attention"]

    @contextlib.contextmanager
    def _skipping(self, skip: frozenset[int]) -> Iterator[None]:
        """Swap the layers in ``skip`` for pass-throughs for one pass."""
        originals = {index: self._layers[index] for index in skip}
        try:
            for index in skip:
                self._layers[index] = _Passthrough()
            yield
        finally:
            for index, layer in originals.items():
                self._layers[index] = layer

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[q, hidden] → [q, vocab] fp32 logits on the CPU, from the model's own head."""
        prefix = self.model.base_model_prefix
        with torch.inference_mode():
            setattr(self.model, prefix, _Given(hidden[None], self.decoder))
            try:
                dummy = torch.zeros(1, hidden.shape[0], dtype=torch.long, device=self.device)
                logits = self.model(input_ids=dummy, use_cache=False).logits[0]
            finally:
                setattr(self.model, prefix, self.decoder)
        return logits.float().cpu()

    def tree_logits(self, tokens: np.ndarray, depths: np.ndarray, tree_mask: np.ndarray) -> PassLogits:
        """A draft tree's logits: :meth:`forward`, then :meth:`logits`."""
        return forward_logits(self, tokens, depths, tree_mask)

    def embedding_probe(self) -> list[float]:
        """A few embedding values: tells models of the same shape apart in cache keys."""
        return self.model.get_input_embeddings().weight[:4, :8].float().flatten().tolist()

    # -- the load-time check ----------------------------------------------------------------------

    def _check_tree_forward(self) -> None:
        """Refuse a model whose forward does not follow a draft tree: prefill, a tree with a wrong
        branch, a commit that reorders rows and one more pass must reproduce its plain forward."""
        ids = torch.randint(self.vocab_size, (9,), generator=torch.Generator().manual_seed(0))
        # root ids[4]; first a wrong chain of three tokens, then the true ids[5], ids[6]: their cache
        # rows lie three past their positions
        wrong = (ids[5:8] + 1) % self.vocab_size
        tokens = torch.cat([ids[4:5], wrong, ids[5:7]])
        parents = [-1, 0, 1, 2, 0, 4]
        tree_mask = torch.eye(6, dtype=torch.bool)
        for node, parent in enumerate(parents):
            if parent >= 0:
                tree_mask[node] |= tree_mask[parent]
        try:
            with torch.inference_mode():
                reference = self.model(ids[None].to(self.device)).logits[0].float().cpu()  # [9, vocab]
            self.reset(len(ids) + 2)
            prefill = self.logits(self.prefill(ids[:4]))
            tree = self.logits(self.forward(tokens, torch.tensor([4, 5, 6, 7, 5, 6]), tree_mask))
            self.commit([0, 4, 5])
            causal = torch.ones(2, 2, dtype=torch.bool).tril()
            last = self.logits(self.forward(ids[7:], torch.tensor([7, 8]), causal))
            layer_kinds = {type(layer) for layer in self.cache.layers}
        except Exception as error:  # any failure of the model's own code: refused, said in one line
            message = str(error).splitlines()[0] if str(error) else ""
            raise UnsupportedModelError(f"{self.family}'s transformers forward fails on a draft tree's 4-D mask "
                                        f"and position ids ({type(error).__name__}: {message}); "
                                        f"{supported()}") from None
        finally:
            self.reset(0)
        got = torch.cat([prefill, tree[[0, 4, 5]], last])  # [9, vocab]
        error = float((got - reference).abs().max())
        tolerance = (1e-4 if self.dtype == torch.float32 else 5e-2) * max(1.0, float(reference.abs().max()))
        if not error <= tolerance:
            raise UnsupportedModelError(f"{self.family}'s transformers forward does not follow a draft tree (logits "
                                        f"differ by {error:.3g}; ALiBi and other row-based attention biases do not); "
                                        f"{supported()}")
        if layer_kinds != {DynamicLayer}:
            raise UnsupportedModelError(f"{self.family} keeps a cache freespec cannot roll back; {supported()}")


Runner = ModelRunner | TransformersRunner
"""What the engine and drafters drive: either runner, same protocol."""
