"""Which 512-bit vector instructions compete for the same execution units on this CPU.

The format kernels decode each weight with a few vector instructions beside its FMA; whether a
table lookup (vpermps), a widening (vpmovzxbd) or a broadcast from memory costs extra time depends
on which units the CPU runs them on. This times loops of independent instructions, alone and in
pairs, and prints cycles per instruction (clock measured by a chain of dependent scalar adds):
two instructions that share a unit take the sum of their times as a pair, two that do not take the
larger. On a Zen 4 core, for example, vpermps, vpmovzxbd and vbroadcastss into a 512-bit register
share one unit (a pair takes 2 cycles), while an FMA with an embedded-broadcast memory operand
({1to16}) does not touch it (see docs/kernels.md).

    python benchmarks/vector_ports.py          # needs gcc and an AVX-512 CPU
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

INSTRUCTIONS = {  # {r}: the destination register; sources are registers 27-31 and the buffer at rsi
    "fma": "vfmadd231ps %zmm30,%zmm31,%zmm{r}",
    "fma {1to16}": "vfmadd213ps 64(%rsi){{1to16}},%zmm30,%zmm{r}",
    "mul {1to16}": "vmulps 64(%rsi){{1to16}},%zmm30,%zmm{r}",
    "add": "vaddps %zmm30,%zmm31,%zmm{r}",
    "vpermps": "vpermps %zmm30,%zmm29,%zmm{r}",
    "vpmovzxbd": "vpmovzxbd (%rsi),%zmm{r}",
    "vbroadcastss zmm": "vbroadcastss 8(%rsi),%zmm{r}",
    "vbroadcastss ymm": "vbroadcastss 8(%rsi),%ymm{r}",
    "vcvtdq2ps": "vcvtdq2ps %zmm29,%zmm{r}",
    "vcvtph2ps (mem)": "vcvtph2ps (%rsi),%zmm{r}",
    "vpsrld": "vpsrld $4,%zmm29,%zmm{r}",
    "vpandd": "vpandd %zmm27,%zmm28,%zmm{r}",
    "vpternlogd": "vpternlogd $0xe4,%zmm27,%zmm28,%zmm{r}",
}
PAIRS = [("fma", "vpermps"), ("vpermps", "vpmovzxbd"), ("vpermps", "vbroadcastss zmm"),
         ("vpermps", "vbroadcastss ymm"), ("vpermps", "fma {1to16}"), ("vpermps", "mul {1to16}"),
         ("vpermps", "vcvtph2ps (mem)"), ("vpermps", "vpsrld"), ("vpermps", "vcvtdq2ps"),
         ("vcvtdq2ps", "add"), ("fma", "add"), ("fma", "vpternlogd")]
UNROLL = 8  # independent copies per loop iteration (registers 0-7 and 8-15)
ITERATIONS = 20_000_000


def _assembly(loops: list[list[str]]) -> str:
    lines = [".text", ".globl clock_loop", "clock_loop:", "1:"]
    lines += ["  add $1,%rax"] * UNROLL + ["  dec %rdi", "  jnz 1b", "  ret"]
    for index, body in enumerate(loops):
        lines += [f".globl loop{index}", f"loop{index}:", "1:"]
        for copy in range(UNROLL):
            lines += ["  " + template.format(r=copy + UNROLL * slot) for slot, template in enumerate(body)]
        lines += ["  dec %rdi", "  jnz 1b", "  ret"]
    return "\n".join(lines) + "\n"


def _driver(count: int) -> str:
    declarations = "".join(f"void loop{i}(long, void *);\n" for i in range(count))
    calls = "".join(f"    printf(\"%.3f\\n\", seconds(loop{i}) / cycle);\n" for i in range(count))
    return f"""#include <stdio.h>
#include <time.h>
void clock_loop(long, void *);
{declarations}
static float buffer[64] __attribute__((aligned(64)));
static double seconds(void (*loop)(long, void *)) {{
    double best = 1e9;
    for (int repeat = 0; repeat < 3; repeat++) {{
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        loop({ITERATIONS}, buffer);
        clock_gettime(CLOCK_MONOTONIC, &b);
        const double t = (b.tv_sec - a.tv_sec) + 1e-9 * (b.tv_nsec - a.tv_nsec);
        if (t < best) best = t;
    }}
    return best / ((double){ITERATIONS} * {UNROLL});
}}
int main(void) {{
    const double cycle = seconds(clock_loop); /* one dependent add: one cycle */
{calls}    return 0;
}}
"""


def main() -> None:
    from freespec.kernels.build import cpu_flags

    if "avx512f" not in cpu_flags():
        raise SystemExit("vector_ports.py: this CPU has no AVX-512; the probe times 512-bit instructions")
    singles = list(INSTRUCTIONS)
    loops = [[INSTRUCTIONS[name]] for name in singles] + [[INSTRUCTIONS[a], INSTRUCTIONS[b]] for a, b in PAIRS]
    with tempfile.TemporaryDirectory() as directory:
        work = Path(directory)
        (work / "loops.S").write_text(_assembly(loops))
        (work / "driver.c").write_text(_driver(len(loops)))
        subprocess.run(["gcc", "-O2", "-o", str(work / "probe"), str(work / "driver.c"), str(work / "loops.S"),
                        "-Wl,-z,noexecstack"], check=True)
        cycles = [float(line) for line in subprocess.run([str(work / "probe")], check=True, capture_output=True,
                                                           text=True).stdout.split()]
    print("| instruction (512-bit unless named) | cycles each, alone |\n|---|---|")
    for name, value in zip(singles, cycles):
        print(f"| {name} | {value:.2f} |")
    print("\n| pair | cycles per pair | alone, summed | shares a unit |\n|---|---|---|---|")
    alone = dict(zip(singles, cycles))
    for (a, b), value in zip(PAIRS, cycles[len(singles):]):
        summed = alone[a] + alone[b]
        print(f"| {a} + {b} | {value:.2f} | {summed:.2f} | {'yes' if value > 0.85 * summed else 'no'} |")


if __name__ == "__main__":
    main()
