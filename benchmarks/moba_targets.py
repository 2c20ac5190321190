"""CPU benchmark: MoBA against dense attention at the issue's performance targets.

Runs ``sparsezoo bench`` (``run_bench``: interleaved, after warm-up, medians) on the two shapes
of the targets and prints its tables plus one line per target, measured against required:
- prefill forward and forward+backward at T = 32k, fp32, B = 1, 16 query heads on 1 KV head,
  head dim 64, B = 512, k = 3: at least 6x and 4x faster than dense, peak memory no higher;
- decode at a 64k context with MoBA's own head layout, 16 query heads on 16 KV heads, head dim
  128: at least 10x faster (``decode``: the whole step; ``decode_attn``: the part that reads the
  cache, without the per-token projections shared with dense).
Shared machines are noisy: run it more than once and compare medians. The equivalent commands:

    sparsezoo bench --mechanisms moba --modes fwd,fwdbwd --lengths 32k --heads 16 \\
        --kv-heads 1 --head-dim 64 --param moba.block_size=512 --param moba.top_k=3
    sparsezoo bench --mechanisms moba --modes decode,decode_attn --lengths 64k --heads 16 \\
        --kv-heads 16 --head-dim 128 --param moba.block_size=512 --param moba.top_k=3

    .venv/bin/python benchmarks/moba_targets.py [--prefill-length 32768] [--repeats 3]
"""

from __future__ import annotations

import argparse

from rich.console import Console

from sparsezoo.bench import BenchConfig, BenchResult, render_table, run_bench

PAPER = {"block_size": 512, "top_k": 3}
# (mode, required speedup over dense)
PREFILL_TARGETS = (("fwd", 6.0), ("fwdbwd", 4.0))
DECODE_TARGETS = (("decode", 10.0), ("decode_attn", 10.0))


def target_lines(result: BenchResult, targets: tuple[tuple[str, float], ...]) -> list[str]:
    """One line per (mode, target): measured speedup, theoretical, required, peak MB vs dense."""
    lines = []
    for mode, required in targets:
        T = result.config.lengths[0]
        moba, dense = result.row(mode, T, "moba"), result.row(mode, T, "dense")
        verdict = "met" if moba.speedup >= required else "NOT met"
        memory = "<=" if moba.peak_mem_mb <= dense.peak_mem_mb else ">"
        lines.append(
            f"{mode:<11} T={T:<6} speedup {moba.speedup:5.2f}x "
            f"(theory {moba.theoretical_speedup:.1f}x, required {required:.0f}x: {verdict}); "
            f"peak {moba.peak_mem_mb:.0f} MB {memory} dense {dense.peak_mem_mb:.0f} MB"
        )
    return lines


def main() -> None:
    """Run both shapes, print the bench tables and the target lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill-length", type=int, default=32768)
    parser.add_argument("--decode-length", type=int, default=65536)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args()
    common = {"mechanisms": ["moba"], "params": {"moba": PAPER}, "repeats": args.repeats}
    prefill = BenchConfig(
        modes=[mode for mode, _ in PREFILL_TARGETS],
        lengths=[args.prefill_length],
        n_heads=16,
        n_kv_heads=1,
        head_dim=64,
        warmup=args.warmup,
        **common,
    )
    decode = BenchConfig(
        modes=[mode for mode, _ in DECODE_TARGETS],
        lengths=[args.decode_length],
        n_heads=16,
        n_kv_heads=16,
        head_dim=128,
        warmup=max(1, args.warmup),
        **common,
    )
    console = Console()
    lines = []
    for cfg, targets in ((prefill, PREFILL_TARGETS), (decode, DECODE_TARGETS)):
        result = run_bench(cfg)
        console.print(render_table(result))
        lines += target_lines(result, targets)
    console.print("\n".join(lines))


if __name__ == "__main__":
    main()
