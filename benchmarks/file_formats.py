"""Plain decoding on model files of several sizes and formats: freespec against llama.cpp.

For each file (see benchmarks/synthetic_model.py for files of sizes no package ships), one
interleaved run: rounds alternate freespec and llama.cpp, each in a fresh process, so neither
inherits the other's caches or memory. Per engine and file it reports

- decode tokens/s: greedy, one token a pass, end-of-text ignored so every engine decodes the same
  number of tokens; timed from the first generated token to the last (prefill excluded);
- the ratio to the bandwidth floor: (bytes of weights one token streams / measured read
  bandwidth) over the measured time per token; 100% would be the machine's limit;
- resident memory after loading and at the end (VmRSS, and the peak), and the load time;
- freespec's t(q): one pass of q = 1, 2, 4, 8 tokens after 256 cached ones (the cost model the
  speculation budget uses).

llama.cpp reads only GGUF files; a bf16 safetensors directory gets freespec's row only.

    python benchmarks/file_formats.py FILE_OR_DIR... [--tokens 128] [--rounds 2] [--out results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPTS = [  # raw-text prompts (random weights: the text is noise; only its length matters)
    "Write a Python function that checks whether a number is prime, and explain how it works.",
    "Summarize the main causes of the French Revolution in a few sentences.",
    "Translate into German: The weather is nice today and we are going for a walk in the park.",
]


def _rss_mb() -> tuple[float, float]:
    """(resident MB now, peak resident MB) of this process. The peak is VmHWM, which starts anew
    in an exec'd worker (getrusage's ru_maxrss would carry the parent's bandwidth probe over)."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            fields[name] = value
    # kB (KiB) to MB (10^6 bytes), the unit of the file sizes
    return int(fields["VmRSS"].split()[0]) * 1024 / 1e6, int(fields["VmHWM"].split()[0]) * 1024 / 1e6


def _decode_rate(stamps: list[float]) -> float:
    """Tokens/s between the first and the last generated token."""
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


def _worker_freespec(path: str, tokens: int, threads: int) -> dict:
    import torch

    import freespec
    from freespec.engine.costs import measure

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = freespec.load(path)
    load_seconds = time.perf_counter() - start
    loaded_mb, _ = _rss_mb()
    model.stop_ids = set()  # decode exactly `tokens` tokens
    rates = []
    for prompt in PROMPTS:
        ids = model.tokenizer(prompt)["input_ids"]
        stamps = []
        for _ in model.stream(prompt_ids=ids, max_new_tokens=tokens, drafter="none", reuse_prefix=False):
            stamps.append(time.perf_counter())
        rates.append(_decode_rate(stamps))
    costs = measure(model.runner, sizes=(1, 2, 4, 8), context_seconds=None)  # after 256 cached tokens, as ever
    end_mb, peak_mb = _rss_mb()
    return {"load_s": load_seconds, "loaded_mb": loaded_mb, "end_mb": end_mb, "peak_mb": peak_mb,
            "tokens_per_s": statistics.median(rates), "t_q_ms": {q: 1000 * s for q, s in costs.items()}}


def _worker_llamacpp(path: str, tokens: int, threads: int) -> dict:
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads, verbose=False)
    load_seconds = time.perf_counter() - start
    loaded_mb, _ = _rss_mb()
    rates = []
    for prompt in PROMPTS:
        llm.reset()
        ids = llm.tokenize(prompt.encode(), add_bos=False)
        stamps = []
        for _ in llm.generate(ids, temp=0.0, repeat_penalty=1.0):
            stamps.append(time.perf_counter())
            if len(stamps) >= tokens:
                break
        rates.append(_decode_rate(stamps))
    end_mb, peak_mb = _rss_mb()
    return {"load_s": load_seconds, "loaded_mb": loaded_mb, "end_mb": end_mb, "peak_mb": peak_mb,
            "tokens_per_s": statistics.median(rates)}


WORKERS = {"freespec": _worker_freespec, "llamacpp": _worker_llamacpp}


def streamed_bytes(path: Path) -> int:
    """Bytes of the matrices one token's pass reads: every weight matrix but the embedding table
    (only its rows are gathered), which the output projection reads in full when tied."""
    if path.is_dir():
        from safetensors import safe_open

        sizes = {}
        for file in path.glob("*.safetensors"):
            with safe_open(file, "np") as tensors:
                for name in tensors.keys():
                    sizes[name] = tensors.get_slice(name).get_shape()
        matrix = {name: shape for name, shape in sizes.items() if len(shape) == 2}
        total = sum(rows * cols * 2 for name, (rows, cols) in matrix.items() if "embed_tokens" not in name)
        if "lm_head.weight" not in matrix:
            rows, cols = next(shape for name, shape in matrix.items() if "embed_tokens" in name)
            total += rows * cols * 2
        return total
    from gguf import GGUFReader

    tensors = {tensor.name: int(tensor.n_bytes) for tensor in GGUFReader(path).tensors}
    total = sum(size for name, size in tensors.items() if name != "token_embd.weight" and not name.endswith("norm.weight"))
    return total if "output.weight" in tensors else total + tensors["token_embd.weight"]


def read_bandwidth() -> float:
    """Bytes/s this machine reads with all threads (benchmarks/roofline.py's probe)."""
    sys.path.insert(0, str(Path(__file__).parent))
    import ctypes

    import numpy as np
    from roofline import build_probe

    probe = build_probe()
    array = np.ones(1 << 28, dtype=np.float32)  # 1 GiB
    return probe.read_bandwidth(ctypes.c_void_p(array.ctypes.data), array.size, 5)


def run_worker(engine: str, path: Path, tokens: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--worker", engine, "--tokens", str(tokens), "--threads", str(threads),
               str(path)]
    environment = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    result = subprocess.run(command, capture_output=True, text=True, env=environment)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "failed"}
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--engines", default="freespec,llamacpp")
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](str(args.paths[0]), args.tokens, args.threads)))
        return
    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s, {args.threads} threads, {args.tokens} tokens, "
          f"{args.rounds} interleaved rounds", file=sys.stderr)
    rows = []
    for path in args.paths:
        engines = [e for e in args.engines.split(",") if e != "llamacpp" or path.suffix == ".gguf"]
        floor = streamed_bytes(path) / bandwidth  # seconds per token at the bandwidth limit
        runs: dict[str, list[dict]] = {engine: [] for engine in engines}
        for _ in range(args.rounds):
            for engine in engines:
                runs[engine].append(run_worker(engine, path, args.tokens, args.threads))
        for engine, results in runs.items():
            good = [r for r in results if "error" not in r]
            if not good:
                row = {"file": path.name, "engine": engine, "error": results[0]["error"]}
            else:
                rate = statistics.median(r["tokens_per_s"] for r in good)
                row = {"file": path.name, "engine": engine, "tokens_per_s": round(rate, 1),
                       "floor_pct": round(100 * floor * rate, 1),
                       "load_s": round(min(r["load_s"] for r in good), 2),
                       "loaded_mb": round(max(r["loaded_mb"] for r in good)),
                       "peak_mb": round(max(r["peak_mb"] for r in good))}
                if "t_q_ms" in good[0]:
                    row["t_q_ms"] = {q: round(statistics.median(r["t_q_ms"][q] for r in good), 2)
                                     for q in good[0]["t_q_ms"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print("\n| file | engine | tokens/s | % of bandwidth floor | load s | resident MB (loaded / peak) | t(q) ms, q=1/2/4/8 |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            print(f"| {row['file']} | {row['engine']} | failed: {row['error']} | | | | |")
            continue
        costs = "/".join(str(v) for v in row.get("t_q_ms", {}).values()) or "-"
        print(f"| {row['file']} | {row['engine']} | {row['tokens_per_s']} | {row['floor_pct']}% | {row['load_s']} | "
              f"{row['loaded_mb']} / {row['peak_mb']} | {costs} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
