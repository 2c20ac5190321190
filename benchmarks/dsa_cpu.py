"""CPU benchmark: the parts of DSA's torch path against dense causal SDPA, per pair.

Times, in one process, interleaved, after a warm-up: dense causal SDPA (GQA), the indexer's
top-k selection (``indexer_topk``), the indexer's score matmul alone (its floor: one
[N, E] x [E, t] product per query, no ReLU, weighting or top-k) and ``sparse_attention`` over
the selected tokens, forward or forward + backward. Prints median times, the cost per causal
query-key pair (dense, indexer) or per selected pair (sparse attention), and the speedup these
parts allow: dense / (indexer + sparse attention), projections excluded, next to the FLOP
model's (t/2) / (k + f·t/2) with f = N·E / (2·HQ·D). Shared machines are noisy: trust ratios.
Legend: B batch, T time, HQ query heads, H KV heads, D head dim, N indexer heads, E indexer
head dim, K top-k.

    .venv/bin/python benchmarks/dsa_cpu.py --T 8192 16384 32768
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparsezoo.kernels.dsa import indexer_topk, sparse_attention


def dense_causal(q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor) -> torch.Tensor:
    """Dense causal attention through SDPA (the baseline), in the [B, T, H, D] layout."""
    return F.scaled_dot_product_attention(
        q_BTHD.transpose(1, 2),
        k_BTHD.transpose(1, 2),
        v_BTHD.transpose(1, 2),
        is_causal=True,
        enable_gqa=True,
    ).transpose(1, 2)


def index_matmul(q_BTNE: torch.Tensor, k_BTE: torch.Tensor, rows: int = 64) -> None:
    """The indexer's q_j · k products over each query's causal keys, by chunks of ``rows``."""
    T, E = q_BTNE.shape[1], q_BTNE.shape[3]
    for t0 in range(0, T, rows):
        t1 = min(t0 + rows, T)
        torch.mm(q_BTNE[0, t0:t1].reshape(-1, E), k_BTE[0, :t1].T)


def median_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median wall seconds of each function, called interleaved ``repeats`` times."""
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: statistics.median(r) for name, r in runs.items()}


def measure(
    T: int, HQ: int, H: int, D: int, N: int, E: int, K: int, backward: bool, repeats: int
) -> dict[str, float]:
    """Median seconds of dense, indexer top-k, its matmul floor and sparse attention."""
    gen = torch.Generator().manual_seed(0)
    q_BTHD = torch.randn(1, T, HQ, D, generator=gen, requires_grad=backward)
    k_BTHD = torch.randn(1, T, H, D, generator=gen, requires_grad=backward)
    v_BTHD = torch.randn(1, T, H, D, generator=gen, requires_grad=backward)
    q_BTNE = torch.randn(1, T, N, E, generator=gen)
    k_BTE = torch.randn(1, T, E, generator=gen)
    w_BTN = torch.randn(1, T, N, generator=gen)
    idx_BTK = indexer_topk(q_BTNE, k_BTE, w_BTN, K)
    grad_BTHD = torch.randn(1, T, HQ, D, generator=gen)

    def run(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def call() -> None:
            out = fn()
            if backward:
                out.backward(grad_BTHD)
                q_BTHD.grad = k_BTHD.grad = v_BTHD.grad = None

        return call

    fns: dict[str, Callable[[], object]] = {
        "dense": run(lambda: dense_causal(q_BTHD, k_BTHD, v_BTHD)),
        "topk": lambda: indexer_topk(q_BTNE, k_BTE, w_BTN, K),
        "matmul": lambda: index_matmul(q_BTNE, k_BTE),
        "sparse": run(lambda: sparse_attention(q_BTHD, k_BTHD, v_BTHD, idx_BTK)),
    }
    with torch.set_grad_enabled(backward), torch.inference_mode(not backward):
        return median_seconds(fns, repeats)


def main() -> None:
    """Parse the shapes, warm every part up on a small input, print one line per (T, mode)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--heads", default="16:1", help="HQ:H (query:KV heads)")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--indexer", default="4:64", help="N:E (indexer heads:width)")
    parser.add_argument("--topk", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"])
    args = parser.parse_args()
    HQ, H = (int(x) for x in args.heads.split(":"))
    N, E = (int(x) for x in args.indexer.split(":"))
    D, K = args.head_dim, args.topk
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B=1, HQ={HQ}, H={H}, "
        f"D={D}, indexer {N}x{E}, k={K}; median of {args.repeats}"
    )
    for backward in (False, True):
        measure(2 * K + 1, HQ, H, D, N, E, K, backward, 1)
    f = N * E / (2 * HQ * D)
    for T in args.T:
        causal = T * (T + 1) / 2
        selected = sum(min(t + 1, K) for t in range(T))
        model = causal / (selected + f * causal)
        for mode in args.modes:
            s = measure(T, HQ, H, D, N, E, K, mode == "fwd+bwd", args.repeats)
            allowed = s["dense"] / (s["topk"] + s["sparse"])
            per_pair = {name: s[name] * 1e9 / causal for name in ("dense", "topk", "matmul")}
            print(
                f"T={T:<6} {mode:<7} dense {s['dense'] * 1e3:8.0f} ms "
                f"({per_pair['dense']:5.1f} ns/pair)  indexer top-k {s['topk'] * 1e3:7.0f} ms "
                f"({per_pair['topk']:4.1f} ns/pair, matmul alone {per_pair['matmul']:4.1f})  "
                f"sparse {s['sparse'] * 1e3:7.0f} ms "
                f"({s['sparse'] * 1e9 / selected:5.1f} ns/selected pair)  "
                f"parts allow {allowed:4.2f}x of FLOP model {model:4.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
