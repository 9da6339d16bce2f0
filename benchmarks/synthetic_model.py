"""Random-weight Llama-architecture models of any size, in the formats people download.

No package ships a 0.5B-7B GGUF we may use here, and a forward pass costs the same whatever the
weights' values are, so engines can be measured honestly on random weights of a real model's
shape. The text such a model writes is noise: compare speeds and memory with it, never outputs.

For one shape this writes, under ``--out``:

- ``<shape>-f16.gguf``: llama architecture, SmolLM2-135M-Instruct's tokenizer metadata (so every
  engine tokenizes the same prompts), F16 matrices drawn from N(0, 0.02), F32 norms of ones;
- ``<shape>-q4_k_m.gguf``, ``-q4_0.gguf``, ``-q8_0.gguf`` (and ``q2_k``, ``q3_k_m``, ``q5_k_m``,
  ``q6_k``, ``iq3_m``, ``iq4_nl``, ``iq4_xs``, ``tq1_0``, ``tq2_0``): that file quantized by llama.cpp's own quantizer
  (llama-cpp-python's ``llama_model_quantize``), as users' downloads are made;
- ``<shape>-bf16/``: a transformers model directory (config.json, tokenizer, bf16 safetensors in
  Hugging Face's tensor names), the default form of a hub checkpoint.

Tensors are written one at a time, so a 7B shape needs about one matrix of memory, not the model.

    python benchmarks/synthetic_model.py --shape qwen2.5-0.5b --out ~/synthetic [--formats q4_k_m,bf16]
    python benchmarks/synthetic_model.py --list
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from tqdm import tqdm

from freespec.model.loading import embedded_gguf_path


@dataclass(frozen=True)
class Shape:
    """A decoder's dimensions, with SmolLM2's 49,152-token vocabulary, or ``vocab`` tokens: SmolLM2's
    and unused ones after them (a real model's head size: no prompt reaches the unused ones)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    tied: bool
    vocab: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def matrices(self, vocab: int) -> list[tuple[str, str, tuple[int, int]]]:
        """(GGUF name, Hugging Face name, [out, in]) of every matrix, in file order."""
        kv = self.kv_heads * self.head_dim
        out = [("token_embd.weight", "model.embed_tokens.weight", (vocab, self.hidden))]
        for i in range(self.layers):
            b, h = f"blk.{i}", f"model.layers.{i}"
            out += [
                (f"{b}.attn_q.weight", f"{h}.self_attn.q_proj.weight", (self.hidden, self.hidden)),
                (f"{b}.attn_k.weight", f"{h}.self_attn.k_proj.weight", (kv, self.hidden)),
                (f"{b}.attn_v.weight", f"{h}.self_attn.v_proj.weight", (kv, self.hidden)),
                (f"{b}.attn_output.weight", f"{h}.self_attn.o_proj.weight", (self.hidden, self.hidden)),
                (f"{b}.ffn_gate.weight", f"{h}.mlp.gate_proj.weight", (self.intermediate, self.hidden)),
                (f"{b}.ffn_up.weight", f"{h}.mlp.up_proj.weight", (self.intermediate, self.hidden)),
                (f"{b}.ffn_down.weight", f"{h}.mlp.down_proj.weight", (self.hidden, self.intermediate)),
            ]
        if not self.tied:
            out.append(("output.weight", "lm_head.weight", (vocab, self.hidden)))
        return out

    def norms(self) -> list[tuple[str, str]]:
        """(GGUF name, Hugging Face name) of every norm weight (width hidden)."""
        out = []
        for i in range(self.layers):
            out += [(f"blk.{i}.attn_norm.weight", f"model.layers.{i}.input_layernorm.weight"),
                    (f"blk.{i}.ffn_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight")]
        return out + [("output_norm.weight", "model.norm.weight")]

    def parameters(self, vocab: int) -> int:
        return sum(rows * cols for _, _, (rows, cols) in self.matrices(vocab)) + self.hidden * len(self.norms())


SHAPES = {  # real models' dimensions
    "smollm2-135m": Shape(576, 30, 1536, 9, 3, tied=True),
    "qwen2.5-0.5b": Shape(896, 24, 4864, 14, 2, tied=True),
    "qwen2.5-1.5b": Shape(1536, 28, 8960, 12, 2, tied=True),
    "llama-3.2-1b-vocab": Shape(2048, 16, 8192, 32, 8, tied=True, vocab=128256),  # Llama 3's head size too
    "llama-3.2-3b": Shape(3072, 28, 8192, 24, 8, tied=True),
    "mistral-7b": Shape(4096, 32, 14336, 32, 8, tied=False),
}
QUANTIZED = {"q4_k_m": 15, "q4_0": 2, "q8_0": 7, "q2_k": 10, "q3_k_m": 12, "q5_k_m": 17, "q6_k": 18,  # llama_ftype:
             "iq3_m": 27, "iq4_nl": 25, "iq4_xs": 30, "tq1_0": 36, "tq2_0": 37}  # LLAMA_FTYPE_MOSTLY_* (IQ1, IQ2 and IQ3_XXS need an imatrix)
FORMATS = ("f16", *QUANTIZED, "bf16")
CONTEXT = 8192
ROPE_BASE = 100000.0
EPS = 1e-5
STD = 0.02


def unused_tokens(first: int, vocab: int) -> list[str]:
    """Names of the unused tokens first .. vocab - 1 that pad a vocabulary to ``vocab``."""
    return [f"<|unused_{i}|>" for i in range(first, vocab)]


def _tokenizer_fields(reader: GGUFReader, vocab: int) -> list[tuple[str, object, GGUFValueType, GGUFValueType | None]]:
    """SmolLM2's tokenizer.* key/values (and chat template) as (key, value, type, array item type),
    its token list padded to ``vocab`` tokens with unused user-defined ones."""
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        sub = field.types[1] if kind == GGUFValueType.ARRAY else None
        value = field.contents()
        if key == "tokenizer.ggml.tokens":
            value = value + unused_tokens(len(value), vocab)
        elif key == "tokenizer.ggml.token_type":
            value = value + [4] * (vocab - len(value))  # llama.cpp's USER_DEFINED
        out.append((key, value, kind, sub))
    return out


def _random(rng: np.random.Generator, shape: tuple[int, int], dtype) -> np.ndarray:
    """N(0, STD) weights, drawn in row blocks (a 7B embedding is 200M values)."""
    out = np.empty(shape, dtype=dtype)
    step = max(1, (1 << 24) // shape[1])
    for start in range(0, shape[0], step):
        block = rng.standard_normal((min(step, shape[0] - start), shape[1]), dtype=np.float32)
        out[start:start + step] = block * np.float32(STD)
    return out


def write_f16_gguf(shape: Shape, path: Path, seed: int = 0) -> None:
    reader = GGUFReader(embedded_gguf_path())
    vocab = shape.vocab or len(reader.fields["tokenizer.ggml.tokens"].contents())
    tokenizer = _tokenizer_fields(reader, vocab)
    writer = GGUFWriter(path, "llama")
    writer.add_name(f"synthetic {path.stem}")
    writer.add_uint32("general.file_type", 1)  # mostly F16
    writer.add_block_count(shape.layers)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.intermediate)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_freq_base(ROPE_BASE)
    writer.add_layer_norm_rms_eps(EPS)
    writer.add_rope_dimension_count(shape.head_dim)
    writer.add_vocab_size(vocab)
    for key, value, kind, sub in tokenizer:
        writer.add_key_value(key, value, kind, sub_type=sub)
    matrices = shape.matrices(vocab)
    for name, _, (rows, cols) in matrices:  # ggml lists dimensions innermost first; the writer reverses
        writer.add_tensor_info(name, (rows, cols), np.dtype(np.float16), rows * cols * 2, GGMLQuantizationType.F16)
    for name, _ in shape.norms():
        writer.add_tensor_info(name, (shape.hidden,), np.dtype(np.float32), shape.hidden * 4, GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _, _, size in _progress(matrices, "f16 tensors"):
        writer.write_tensor_data(_random(rng, size, np.float16))
    for _ in shape.norms():
        writer.write_tensor_data(np.ones(shape.hidden, dtype=np.float32))
    writer.close()


def quantize(source: Path, target: Path, ftype: int) -> None:
    """llama.cpp's own quantizer (as `llama-quantize` runs it)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 0  # all cores
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source} (status {status})")


def write_bf16_directory(shape: Shape, directory: Path, seed: int = 0) -> None:
    """A Hugging Face Llama directory with bf16 safetensors, written tensor by tensor."""
    from transformers import AutoTokenizer, LlamaConfig

    gguf = embedded_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if shape.vocab:
        tokenizer.add_tokens(unused_tokens(len(tokenizer), shape.vocab))
    vocab = len(tokenizer)
    directory.mkdir(parents=True, exist_ok=True)
    LlamaConfig(vocab_size=vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                max_position_embeddings=CONTEXT, rms_norm_eps=EPS, rope_theta=ROPE_BASE,
                tie_word_embeddings=shape.tied, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, torch_dtype="bfloat16").save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    tensors = [(hf, (rows, cols)) for _, hf, (rows, cols) in shape.matrices(vocab)]
    tensors += [(hf, (shape.hidden,)) for _, hf in shape.norms()]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, size in tensors:
        nbytes = int(np.prod(size)) * 2
        header[name] = {"dtype": "BF16", "shape": list(size), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    rng = np.random.default_rng(seed)
    with open(directory / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(encoded)) + encoded)
        for name, size in _progress(tensors, "bf16 tensors"):
            if len(size) == 1:
                values = np.ones(size, dtype=np.float32)
            else:
                values = _random(rng, size, np.float32)
            # round to nearest even bf16: the upper 16 bits after adding the rounding bias
            bits = values.view(np.uint32)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            f.write(bits.astype(np.uint16).tobytes())


def _progress(items: list, what: str):
    return tqdm(items, desc=f"  {what}", unit="tensor", file=sys.stderr)


def build(name: str, out: Path, formats: list[str]) -> dict[str, Path]:
    """Write the files of shape ``name`` that are missing; return format -> path."""
    shape = SHAPES[name]
    out.mkdir(parents=True, exist_ok=True)
    paths = {fmt: out / (f"{name}-{fmt}" if fmt == "bf16" else f"{name}-{fmt}.gguf") for fmt in FORMATS}
    f16 = paths["f16"]
    if any(fmt in QUANTIZED or fmt == "f16" for fmt in formats) and not f16.exists():
        print(f"{name}: writing {f16}", file=sys.stderr)
        partial = f16.with_suffix(".partial")
        write_f16_gguf(shape, partial)
        partial.rename(f16)
    for fmt in formats:
        path = paths[fmt]
        if fmt in QUANTIZED and not path.exists():
            print(f"{name}: quantizing to {fmt}", file=sys.stderr)
            partial = path.with_suffix(".partial")
            quantize(f16, partial, QUANTIZED[fmt])
            partial.rename(path)
        elif fmt == "bf16" and not (path / "model.safetensors").exists():
            print(f"{name}: writing {path}", file=sys.stderr)
            write_bf16_directory(shape, path)
    return {fmt: paths[fmt] for fmt in formats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), action="append", help="repeatable")
    parser.add_argument("--formats", default="q4_k_m,q8_0,bf16", help=f"comma-separated of {', '.join(FORMATS)}")
    parser.add_argument("--out", type=Path, default=Path.home() / "synthetic-models")
    parser.add_argument("--list", action="store_true", help="print the shapes and their sizes")
    args = parser.parse_args()
    if args.list or not args.shape:
        for name, shape in SHAPES.items():
            print(f"{name:18s} {shape.parameters(shape.vocab or 49152) / 1e9:5.2f}B parameters  {shape}")
        return
    formats = [fmt.strip() for fmt in args.formats.split(",") if fmt.strip()]
    unknown = [fmt for fmt in formats if fmt not in FORMATS]
    if unknown:
        parser.error(f"unknown formats {unknown}; choose from {', '.join(FORMATS)}")
    for name in args.shape:
        for fmt, path in build(name, args.out, formats).items():
            print(f"{name} {fmt}: {path}")


if __name__ == "__main__":
    main()
