"""CPU benchmark: the torch path of NSA's selected attention against dense causal SDPA.

Times ``selected_attention(backend="torch")`` and dense causal SDPA (GQA) in one process,
interleaved, after a warm-up, and prints median times, the ratio dense / selected, the
theoretical ratio (causal query-key pairs over selected ones) and the share of it reached, plus
the peak RSS growth of each (``sparsezoo.perf.PeakMemory``, the largest over the repeats).
Indices look like NSA's at random init: block 0, the query's own block and the one before are
forced, the other slots are random distinct legal blocks, -1 where fewer blocks exist.
Shared machines are noisy: trust ratios, not absolute times.
Legend: B batch, T time, HQ query heads, H KV heads, D head dim, S selected blocks per query,
N selection blocks.

    .venv/bin/python benchmarks/nsa_selection_cpu.py --T 8192 16384 32768
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparsezoo.kernels.nsa.selection import selected_attention
from sparsezoo.perf import PeakMemory


def nsa_like_indices(B: int, T: int, H: int, S: int, block_size: int) -> torch.Tensor:
    """Random int64 block_indices_BTHS with NSA's forced blocks (0, own, own - 1), -1 padded.

    Every legal block (starting at or before t) gets a random score, forced blocks a higher
    one; the top S are kept, illegal picks become -1, and the slots are shuffled.
    """
    N = -(-T // block_size)
    own_1T11 = (torch.arange(T) // block_size).view(1, T, 1, 1)
    j_111N = torch.arange(N).view(1, 1, 1, N)
    score_BTHN = torch.rand(B, T, H, N).masked_fill(j_111N > own_1T11, float("-inf"))
    forced_1T1N = (j_111N == 0) | (j_111N == own_1T11) | (j_111N == own_1T11 - 1)
    score_BTHN = score_BTHN.masked_fill(forced_1T1N, 2.0)
    top_BTHS, idx_BTHS = score_BTHN.topk(min(S, N), dim=-1)
    idx_BTHS = idx_BTHS.masked_fill(top_BTHS == float("-inf"), -1)
    idx_BTHS = F.pad(idx_BTHS, (0, S - idx_BTHS.shape[-1]), value=-1)
    return idx_BTHS.gather(-1, torch.rand(B, T, H, S).argsort(dim=-1))


def selected_pairs(idx_BTHS: torch.Tensor, block_size: int) -> int:
    """Query-key pairs (per KV head row) the selection attends: a full past block, ≤ t in own."""
    t_1T11 = torch.arange(idx_BTHS.shape[1]).view(1, -1, 1, 1)
    keys_BTHS = (t_1T11 - idx_BTHS * block_size + 1).clamp(0, block_size) * (idx_BTHS >= 0)
    return int(keys_BTHS.sum())


def dense_causal(q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor) -> torch.Tensor:
    """Dense causal attention through SDPA (the baseline), in the [B, T, H, D] layout."""
    return F.scaled_dot_product_attention(
        q_BTHD.transpose(1, 2),
        k_BTHD.transpose(1, 2),
        v_BTHD.transpose(1, 2),
        is_causal=True,
        enable_gqa=True,
    ).transpose(1, 2)


def timed(fn: Callable[[], torch.Tensor], grad_BTHD: torch.Tensor | None) -> tuple[float, float]:
    """Seconds and peak RSS growth (MB) of one call of ``fn``, plus its backward from the
    output gradient ``grad_BTHD`` when given (a real tensor, as in training)."""
    with PeakMemory() as mem:
        start = time.perf_counter()
        out = fn()
        if grad_BTHD is not None:
            out.backward(grad_BTHD)
        seconds = time.perf_counter() - start
        del out
    return seconds, mem.peak_mb


def compare(
    T: int, HQ: int, H: int, D: int, S: int, block_size: int, backward: bool, repeats: int
) -> dict[str, tuple[float, float]]:
    """Median seconds and largest peak MB of dense and selected attention, measured interleaved."""
    q_BTHD = torch.randn(1, T, HQ, D, requires_grad=backward)
    k_BTHD = torch.randn(1, T, H, D, requires_grad=backward)
    v_BTHD = torch.randn(1, T, H, D, requires_grad=backward)
    idx_BTHS = nsa_like_indices(1, T, H, S, block_size)
    grad_BTHD = torch.randn(1, T, HQ, D) if backward else None
    fns = {
        "dense": lambda: dense_causal(q_BTHD, k_BTHD, v_BTHD),
        "selected": lambda: selected_attention(
            q_BTHD, k_BTHD, v_BTHD, idx_BTHS, block_size, backend="torch"
        ),
    }
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    with torch.set_grad_enabled(backward):
        for _ in range(repeats):
            for name, fn in fns.items():
                runs[name].append(timed(fn, grad_BTHD))
                q_BTHD.grad = k_BTHD.grad = v_BTHD.grad = None
    return {
        name: (statistics.median(s for s, _ in r), max(mb for _, mb in r))
        for name, r in runs.items()
    }


def main() -> None:
    """Parse the shapes, warm both paths up on a small input, print one line per (T, mode)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--heads", default="16:1", help="HQ:H (query:KV heads)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--S", type=int, default=16, help="selected blocks per query")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    args = parser.parse_args()
    HQ, H = (int(x) for x in args.heads.split(":"))
    shape = (HQ, H, args.head_dim, args.S, args.block_size)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B=1, HQ={HQ}, H={H}, "
        f"D={args.head_dim}, block={args.block_size}, S={args.S}; median of {args.repeats}"
    )
    for backward in (False, True):
        compare(1024, *shape, backward, 1)
    for T in args.T:
        idx_BTHS = nsa_like_indices(1, T, H, args.S, args.block_size)
        theory = T * (T + 1) / 2 * H / selected_pairs(idx_BTHS, args.block_size)
        for mode in args.modes:
            r = compare(T, *shape, mode == "fwd+bwd", args.repeats)
            (dense_s, dense_mb), (sel_s, sel_mb) = r["dense"], r["selected"]
            ratio = dense_s / sel_s
            print(
                f"T={T:<6} {mode:<7} dense {dense_s * 1e3:8.0f} ms {dense_mb:6.0f} MB  "
                f"selected {sel_s * 1e3:7.0f} ms {sel_mb:6.0f} MB  ratio {ratio:5.2f}x  "
                f"theory {theory:5.2f}x ({ratio / theory:4.0%})",
                flush=True,
            )


if __name__ == "__main__":
    main()
