"""Finding and loading models: what the user typed, GGUF files cut short, the GGUF metadata cache
(concurrent builds, incomplete folders, keyed by the file's header, bounded)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import shutil
import struct
import time
from pathlib import Path

import gguf
import numpy as np
import pytest

from freespec import paths
from freespec.model import loading
from freespec.model.loading import (
    ModelLoadError,
    gguf_metadata,
    load,
    resolve,
    return_freed_heap,
)
from tests.helpers import model_for, tiny_config, word_tokenizer, write_gguf


@pytest.mark.parametrize("text", ["models/x", "./x", "x/", "~/no-such-model-here", "a/b/c", "x.gguf", "../no-such-model", "no/../x"])
def test_what_looks_like_a_path_is_a_path(tmp_path, monkeypatch, text):
    """Before, ``models/x`` went to the hub (50 s of network retries) even beside a ``models`` folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelLoadError, match="not found"):
        resolve(text)


@pytest.mark.parametrize("text", ["HuggingFaceTB/SmolLM2-135M-Instruct", "owner/model.v2"])
def test_owner_slash_name_is_a_hub_id(tmp_path, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    assert resolve(text) == (text, text)


def test_an_existing_folder_without_a_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a model directory"):
        resolve(tmp_path)


@pytest.mark.parametrize("content", [
    b"GGUF\x03\x00\x00\x00",  # the magic, then nothing
    b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 50) + b"general.arch",  # a key cut short
])
def test_a_gguf_file_cut_short_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "cut.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=f"cannot load GGUF file {path}: it is cut short or damaged") as error:
        load(path)
    assert "\n" not in str(error.value)


def header_only_gguf(path: Path, name: str, tensor_bytes: bytes = b"") -> Path:
    """A GGUF file of one metadata string and one F32 tensor of ``tensor_bytes`` (4 zeros if empty)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    data = np.frombuffer(tensor_bytes or bytes(4), dtype=np.float32)
    writer.add_tensor("weights", data.copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch) -> Path:
    """A .gguf file whose metadata 'read by transformers' is the tiny test model's, in a cache of the test's own."""
    monkeypatch.setenv("FREESPEC_CACHE", str(tmp_path / "cache"))
    config, tokenizer = tiny_config("llama"), word_tokenizer()

    class Loader:
        def __init__(self, result):
            self.result = result

        def from_pretrained(self, *args, **kwargs):
            return self.result

    # by name: loading imports them from transformers when called
    monkeypatch.setattr("transformers.AutoConfig", Loader(config))
    monkeypatch.setattr("transformers.AutoTokenizer", Loader(tokenizer))
    return header_only_gguf(tmp_path / "tiny.gguf", "tiny")


def test_a_concurrent_metadata_build_that_finishes_first_is_used(fake_gguf, monkeypatch):
    """Two processes reading the same file's metadata both rename their result into place; the
    loser's rename fails (the folder exists, ENOTEMPTY) and it takes the winner's."""
    rename = os.replace

    def another_process_wins(source, target):
        if Path(source).name == "metadata" and not Path(target).exists():
            shutil.copytree(source, target)  # the other process lands just before ours
        rename(source, target)

    monkeypatch.setattr(os, "replace", another_process_wins)
    target = gguf_metadata(fake_gguf)
    assert (target / "config.json").is_file() and (target / "tokenizer.json").is_file()
    assert not list(target.glob("*.safetensors"))  # no weights
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # our copy was cleaned up
    assert gguf_metadata(fake_gguf) == target


def test_the_first_read_of_a_files_metadata_says_so_and_the_second_is_silent(fake_gguf, caplog):
    """It takes seconds (Gemma's tokenizer: most of a 38 s first load) that were a silent pause."""
    with caplog.at_level(logging.WARNING, logger="freespec"):
        gguf_metadata(fake_gguf)
        gguf_metadata(fake_gguf)
    notes = [record.getMessage() for record in caplog.records]
    assert len(notes) == 1 and notes[0].startswith(f"reading the config and tokenizer of {fake_gguf.name} (once; ")


def test_the_config_and_the_tokenizer_come_from_one_read_of_the_files_metadata(tmp_path, monkeypatch):
    """transformers parsed the file twice (13 s each for Gemma 3's vocabulary): once now, the same files."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    monkeypatch.setenv("FREESPEC_CACHE", str(tmp_path / "cache"))
    path = write_gguf(tmp_path / "model.gguf", model_for("llama"), "Q8_0")
    read, reads = gguf_utils.load_gguf_checkpoint, []

    def counted(path, return_tensors=False, **options):
        reads.append(return_tensors)
        return read(path, return_tensors=return_tensors, **options)

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", counted)
    target = gguf_metadata(path)
    assert reads == [False] and gguf_utils.load_gguf_checkpoint is counted  # put back after
    once = {name: (target / name).read_bytes() for name in ("config.json", "tokenizer.json")}
    shutil.rmtree(target)
    with monkeypatch.context() as patch:  # transformers' own two reads, for comparison
        patch.setattr(loading, "_gguf_metadata_read_once", contextlib.nullcontext)
        twice = gguf_metadata(path)
    assert reads == [False, False, False]
    assert {name: (twice / name).read_bytes() for name in once} == once


def test_the_cached_tokenizer_config_lists_the_added_tokens_and_loads_the_same_tokenizer(tmp_path, monkeypatch):
    """transformers looks for the added tokens in tokenizer_config.json first, else parses the whole
    tokenizer.json in Python at every load (1.1 s of Gemma 3's); the cache writes them there."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("FREESPEC_CACHE", str(tmp_path / "cache"))
    target = gguf_metadata(write_gguf(tmp_path / "model.gguf", model_for("llama"), "Q8_0"))
    config = json.loads((target / "tokenizer_config.json").read_text())
    added = json.loads((target / "tokenizer.json").read_text())["added_tokens"]
    assert added and sorted(config["added_tokens_decoder"]) == sorted(str(token["id"]) for token in added)
    plain = tmp_path / "plain"
    shutil.copytree(target, plain)
    del config["added_tokens_decoder"]
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    cached, parsed = AutoTokenizer.from_pretrained(target), AutoTokenizer.from_pretrained(plain)
    assert cached.added_tokens_decoder == parsed.added_tokens_decoder and cached.get_vocab() == parsed.get_vocab()
    for text in ["hello world", "<s> a </s> b", " two  spaces\n"]:
        assert cached(text).input_ids == parsed(text).input_ids


def test_an_incomplete_metadata_folder_is_replaced(fake_gguf):
    target = gguf_metadata(fake_gguf)
    shutil.rmtree(target)
    target.mkdir()
    (target / "tokenizer.json").write_bytes(b"half")  # a process was killed mid-copy
    assert gguf_metadata(fake_gguf) == target
    assert (target / "config.json").is_file()


def test_an_edited_header_gets_fresh_metadata(fake_gguf):
    first = gguf_metadata(fake_gguf)
    header_only_gguf(fake_gguf, "tiny, renamed")
    assert gguf_metadata(fake_gguf) != first
    assert gguf_metadata(fake_gguf).parent == first.parent


def test_a_copy_elsewhere_finds_the_metadata_of_its_header(fake_gguf, tmp_path, caplog):
    """Keyed by path, size and time, every copy or move of a file (and every test run's new
    temporary files) read the metadata again and kept one more folder: 33 MB for Gemma 3."""
    first = gguf_metadata(fake_gguf)
    (tmp_path / "elsewhere").mkdir()
    copy = shutil.copy2(fake_gguf, tmp_path / "elsewhere" / "renamed.gguf")
    os.utime(copy, (1, 1))
    other_weights = header_only_gguf(tmp_path / "other.gguf", "tiny", tensor_bytes=np.ones(1, np.float32).tobytes())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="freespec"):
        assert gguf_metadata(Path(copy)) == first
        assert gguf_metadata(other_weights) == first  # the same header: only tensor data differs
    assert not caplog.records


def test_the_least_recently_used_metadata_go_beyond_the_budget(fake_gguf, tmp_path, monkeypatch):
    names = ["first", "second", "third", "fourth"]
    targets = {name: gguf_metadata(header_only_gguf(tmp_path / f"{name}.gguf", name)) for name in names}
    size = sum(file.stat().st_size for file in targets["first"].iterdir())
    long_ago = time.time() - 2 * paths.RECENT_SECONDS
    for age, name in enumerate(names):  # first used longest ago, fourth most recently
        os.utime(targets[name], (long_ago + age, long_ago + age))
    gguf_metadata(tmp_path / "first.gguf")  # used again now: the most recent
    loading._evict_metadata(targets["first"].parent, budget=2 * size + size // 2)
    kept = sorted(path.name for path in targets["first"].parent.iterdir())
    assert kept == sorted(targets[name].name for name in ("first", "fourth"))


def test_metadata_used_in_the_last_minutes_is_never_evicted(fake_gguf, tmp_path):
    targets = [gguf_metadata(header_only_gguf(tmp_path / f"{index}.gguf", str(index))) for index in range(3)]
    loading._evict_metadata(targets[0].parent, budget=0)
    assert all((target / "config.json").is_file() for target in targets)


def _resident_bytes() -> int:
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) * 1024


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or not Path("/proc/self/status").exists(),
                    reason="malloc_trim and VmRSS are glibc's and Linux's")
def test_return_freed_heap_gives_freed_memory_back():
    # 80 MB of small allocations (malloc's heap, not mmap), freed behind one that stays: glibc
    # keeps those pages resident until they are trimmed
    blocks = [bytes(4000) + bytes([index % 256]) for index in range(20_000)]
    last = blocks[-1]
    del blocks
    before = _resident_bytes()
    return_freed_heap()
    assert before - _resident_bytes() > 40e6
    assert last[-1] == 19_999 % 256
