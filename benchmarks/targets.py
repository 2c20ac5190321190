"""CPU benchmark: the performance targets of the NSA, MoBA and DSA issues, measured and judged.

Each target is a mechanism, a mode of ``sparsezoo bench``, a length, a head layout and the
speedup over dense it must reach (some also ask for a peak memory no higher than dense's in that
mode). Targets sharing a layout and a mode run as one ``run_bench`` call (interleaved with dense,
after warm-up, medians), so dense is measured once for them; each call's table is printed, then
one verdict line per target with the measured speedup, the range of its paired rounds and the
cost model's ratio. The layouts are the issues': prefill 16 query heads on 1 KV head of 64
(d_model 1024); decode 64 query heads on 4 KV heads of 128 (the NSA paper's, which the DSA
issue shares) or, for MoBA, 16 on 16 of 128 (its own multi-head layout). NSA and DSA run with
their registered defaults (the papers' values), MoBA with the paper's 512-token blocks and
top-3. ``--scale N`` divides every length by N (a quick check of the harness, not of the
targets). Shared machines are noisy: compare the rounds, and run it more than once.

    .venv/bin/python benchmarks/targets.py                        # all targets (25-40 min, 2 cores)
    .venv/bin/python benchmarks/targets.py --mechanisms nsa,dsa --out bench_results/targets
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from sparsezoo.bench import (
    BenchConfig,
    BenchConfigError,
    BenchResult,
    render_table,
    run_bench,
    write_outputs,
)
from sparsezoo.console import console


@dataclass(frozen=True)
class Layout:
    """An attention head layout of the targets: query heads, KV heads, head dim."""

    name: str
    n_heads: int
    n_kv_heads: int
    head_dim: int


PREFILL = Layout("prefill", 16, 1, 64)
DECODE_GQA = Layout("decode-gqa", 64, 4, 128)
DECODE_MHA = Layout("decode-mha", 16, 16, 128)


@dataclass(frozen=True)
class Target:
    """One issue target: ``mechanism`` in ``mode`` at ``length`` tokens on ``layout`` must run
    at least ``speedup`` times faster than dense; with ``memory`` its peak memory in that mode
    must also be no higher than dense's."""

    mechanism: str
    mode: str
    length: int
    layout: Layout
    speedup: float
    memory: bool = False


TARGETS = (
    # issue 3, NSA
    Target("nsa", "fwd", 8192, PREFILL, 1.0),  # faster than dense from 8k on
    Target("nsa", "fwd", 32768, PREFILL, 4.5),
    Target("nsa", "fwdbwd", 32768, PREFILL, 3.0, memory=True),
    Target("nsa", "decode_attn", 65536, DECODE_GQA, 10.0),
    # issue 4, MoBA
    Target("moba", "fwd", 32768, PREFILL, 6.0, memory=True),
    Target("moba", "fwdbwd", 32768, PREFILL, 4.0, memory=True),
    Target("moba", "decode", 65536, DECODE_MHA, 10.0),
    Target("moba", "decode_attn", 65536, DECODE_MHA, 10.0),
    # issue 5, DSA (one top-k set shared by all heads: its registered default)
    Target("dsa", "fwd", 32768, PREFILL, 3.0),
    Target("dsa", "fwdbwd", 32768, PREFILL, 2.0),
    Target("dsa", "decode_attn", 65536, DECODE_GQA, 6.0),
)
PARAMS = {"moba": {"block_size": 512, "top_k": 3}}


def bench_groups(
    targets: tuple[Target, ...] | list[Target], repeats: int, warmup: int, scale: int = 1
) -> list[tuple[BenchConfig, list[Target]]]:
    """One bench config per (layout, mode) of ``targets``, with the targets it measures.

    Each config lists the group's mechanisms (in target order) and lengths (ascending, divided
    by ``scale``); decode modes warm up at least once, as a decoder's cache is warm.
    """
    groups: dict[tuple[Layout, str], list[Target]] = {}
    for target in targets:
        groups.setdefault((target.layout, target.mode), []).append(target)
    configs = []
    for (layout, mode), members in groups.items():
        mechanisms = list(dict.fromkeys(t.mechanism for t in members))
        cfg = BenchConfig(
            mechanisms=mechanisms,
            modes=[mode],
            lengths=sorted({t.length // scale for t in members}),
            n_heads=layout.n_heads,
            n_kv_heads=layout.n_kv_heads,
            head_dim=layout.head_dim,
            warmup=max(1, warmup) if mode.startswith("decode") else warmup,
            repeats=repeats,
            params={m: PARAMS[m] for m in mechanisms if m in PARAMS},
        )
        configs.append((cfg, members))
    return configs


def verdict(target: Target, result: BenchResult, scale: int = 1) -> tuple[bool, str]:
    """Whether ``target`` is met in ``result`` and the line that says so, with the numbers."""
    T = target.length // scale
    row = result.row(target.mode, T, target.mechanism)
    met = row.speedup >= target.speedup
    line = (
        f"{target.mechanism:<5} {target.mode:<11} T={T:<6} {target.layout.name:<10} "
        f"{row.speedup:5.2f}x (rounds {row.speedup_min:.2f}-{row.speedup_max:.2f}x, theory "
        f"{row.theoretical_speedup:.1f}x), required {target.speedup:g}x"
    )
    if target.memory:
        dense = result.row(target.mode, T, "dense")
        fits = row.peak_mem_mb <= dense.peak_mem_mb
        met = met and fits
        line += (
            f", peak {row.peak_mem_mb:.1f} MB {'<=' if fits else '>'} dense "
            f"{dense.peak_mem_mb:.1f} MB"
        )
    return met, f"{line}: {'met' if met else 'NOT met'}"


def select(names: str) -> list[Target]:
    """The targets of the comma-separated mechanisms ``names`` (ValueError naming a mechanism
    without targets, and the ones that have them)."""
    known = list(dict.fromkeys(t.mechanism for t in TARGETS))
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(
            f"--mechanisms: {', '.join(unknown) or repr(names)} has no targets here; "
            f"choose from {', '.join(known)}"
        )
    return [t for t in TARGETS if t.mechanism in wanted]


def main(argv: list[str] | None = None) -> int:
    """Run the selected targets' bench groups, print their tables, the verdict lines and how
    many targets were met."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mechanisms", default="nsa,moba,dsa")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--scale", type=int, default=1, help="divide every length by this")
    parser.add_argument("--out", type=Path, default=None, help="write each group's bench.json")
    args = parser.parse_args(argv)
    try:
        targets = select(args.mechanisms)
    except ValueError as exc:
        parser.error(str(exc))
    if args.scale < 1:
        parser.error(f"--scale: {args.scale} is not an integer >= 1")
    groups = bench_groups(targets, args.repeats, args.warmup, args.scale)
    try:
        # every group checked before the first one runs (a whole run takes tens of minutes)
        for cfg, _ in groups:
            cfg.validate()
    except BenchConfigError as exc:
        parser.error(str(exc))
    con = console()
    verdicts = []
    for cfg, members in groups:
        result = run_bench(cfg)
        con.print(render_table(result))
        if args.out is not None:
            write_outputs(result, args.out / f"{members[0].layout.name}-{cfg.modes[0]}")
        verdicts += [verdict(t, result, args.scale) for t in members]
    print("\n".join(line for _, line in verdicts))
    print(f"{sum(met for met, _ in verdicts)} of {len(verdicts)} targets met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
