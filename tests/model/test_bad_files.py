"""Bad model files (issue 19.6): cut short, corrupted, of a type freespec does not read, shaped
unlike their config, larger than the memory: one line naming the file (and the tensor), exit 2,
no traceback."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from freespec.cli import main
from freespec.model import loading
from tests.helpers import model_for, word_tokenizer, write_gguf


def one_line_error(capsys, path: Path) -> str:
    """``freespec generate`` on the model at ``path``: exit 2 and one line; the line."""
    assert main(["generate", "w1", "--model", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("freespec: error: ") and "\n" not in err and "Traceback" not in err
    assert str(path) in err
    return err


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    return write_gguf(tmp_path / "model.gguf", model_for("llama"), "Q8_0")


def tensor_info_offset(path: Path, name: str) -> int:
    """Where the record of tensor ``name`` starts (its name's length)."""
    data, key = path.read_bytes(), name.encode()
    return data.index(struct.pack("<Q", len(key)) + key)


@pytest.mark.parametrize("keep", [0.0002, 0.01, 0.03, 0.999])  # in the metadata, the tensor records, the data
def test_a_gguf_file_cut_short(gguf_file, capsys, keep):
    data = gguf_file.read_bytes()
    gguf_file.write_bytes(data[:int(len(data) * keep)])
    err = one_line_error(capsys, gguf_file)
    assert "it is cut short or damaged" in err
    if keep > 0.5:
        assert "tensor output.weight ends at byte" in err  # the last tensor's data is cut


def test_a_file_that_is_not_gguf(gguf_file, capsys):
    gguf_file.write_bytes(b"ggml" + gguf_file.read_bytes()[4:])
    assert "it is not a GGUF file" in one_line_error(capsys, gguf_file)


def test_a_corrupted_tensor_record(gguf_file, capsys):
    """A tensor offset far past the end of the file."""
    data = bytearray(gguf_file.read_bytes())
    name = b"blk.1.ffn_up.weight"
    offset_at = tensor_info_offset(gguf_file, name.decode()) + 8 + len(name) + 4 + 2 * 8 + 4
    data[offset_at:offset_at + 8] = struct.pack("<Q", 1 << 40)
    gguf_file.write_bytes(bytes(data))
    assert "tensor blk.1.ffn_up.weight ends at byte" in one_line_error(capsys, gguf_file)


def test_an_unknown_tensor_type(gguf_file, capsys):
    data = bytearray(gguf_file.read_bytes())
    name = b"blk.0.attn_v.weight"
    type_at = tensor_info_offset(gguf_file, name.decode()) + 8 + len(name) + 4 + 2 * 8
    data[type_at:type_at + 4] = struct.pack("<I", 200)
    gguf_file.write_bytes(bytes(data))
    assert "tensor blk.0.attn_v.weight has an unknown type (id 200)" in one_line_error(capsys, gguf_file)


def test_a_type_freespec_does_not_read(tmp_path, capsys):
    path = write_gguf(tmp_path / "model.gguf", model_for("llama", "Q4_K"), {"default": "Q4_K", "ffn_up": "MXFP4"})
    assert "tensor blk.0.ffn_up.weight is MXFP4, a type freespec does not read" in one_line_error(capsys, path)


def test_a_shape_that_disagrees_with_the_config(gguf_file, capsys):
    """The metadata says an FFN of 256; the tensors hold 128."""
    data = bytearray(gguf_file.read_bytes())
    key = b"llama.feed_forward_length"
    value_at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4
    assert struct.unpack_from("<I", data, value_at) == (128,)
    data[value_at:value_at + 4] = struct.pack("<I", 256)
    gguf_file.write_bytes(bytes(data))
    err = one_line_error(capsys, gguf_file)
    assert "tensor blk.0.ffn_gate.weight has shape [128, 64] where the model's config needs [256, 64]" in err


def test_a_file_larger_than_the_memory(gguf_file, capsys, monkeypatch):
    monkeypatch.setattr(loading, "available_memory", lambda: 30_000)
    assert "its weights take 0.1 MB, more than the 0.0 MB of memory available" in one_line_error(capsys, gguf_file)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    model_for("llama").to(torch.bfloat16).save_pretrained(tmp_path)
    word_tokenizer().save_pretrained(tmp_path)
    return tmp_path / "model.safetensors"


def test_a_safetensors_file_cut_short(checkpoint, capsys):
    checkpoint.write_bytes(checkpoint.read_bytes()[:-100])
    assert "it is cut short or damaged (tensor " in one_line_error(capsys, checkpoint.parent)


def test_a_config_that_fails_its_own_checks(checkpoint, capsys):
    """transformers' config validation raised a huggingface_hub error that no except named: a traceback."""
    path = checkpoint.parent / "config.json"
    config = json.loads(path.read_text())
    config["hidden_size"] = config["num_attention_heads"] * 8 + 1
    path.write_text(json.dumps(config))
    assert (f"cannot load {checkpoint.parent}: The hidden size ({config['hidden_size']}) is not a multiple of the number "
            f"of attention heads ({config['num_attention_heads']})") in one_line_error(capsys, checkpoint.parent)


def test_a_safetensors_header_that_is_not_json(checkpoint, capsys):
    data = bytearray(checkpoint.read_bytes())
    data[8:12] = b"\xff\xfe{["
    checkpoint.write_bytes(bytes(data))
    assert f"cannot load safetensors file {checkpoint}: it is cut short or damaged" in one_line_error(
        capsys, checkpoint.parent)


def test_a_safetensors_dtype_freespec_does_not_read(checkpoint, capsys):
    """An int8 matrix (a quantized checkpoint this reader does not know)."""
    data = checkpoint.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    entry = header["model.layers.0.mlp.down_proj.weight"]
    begin, end = entry["data_offsets"]
    entry.update(dtype="I8", shape=[entry["shape"][0], end - begin])  # the same bytes, as int8
    text = json.dumps(header).encode().ljust(length)
    checkpoint.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length:])
    err = one_line_error(capsys, checkpoint.parent)
    assert "tensor model.layers.0.mlp.down_proj.weight is I8; freespec reads BF16, F16, F32" in err
