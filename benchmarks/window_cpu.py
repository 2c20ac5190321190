"""CPU benchmark: the torch sliding-window path against dense causal SDPA, as time ratios.

Runs both in one process, interleaved, after a warm-up, and prints the median time ratio
dense / window next to the theoretical ratio 1 / window_density (causal pairs over attended
pairs) and the share of it reached. Shared machines are noisy: trust ratios, not absolute times.
Legend: B batch, T time, HQ query heads, H KV heads, D head dim.

    .venv/bin/python benchmarks/window_cpu.py --T 4096 8192 16384 --window 512
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from sparsezoo.kernels.window import sliding_window_attention, window_density


def dense_causal(q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor) -> torch.Tensor:
    """Dense causal attention through SDPA (the baseline), in the [B, T, H, D] layout."""
    return F.scaled_dot_product_attention(
        q_BTHD.transpose(1, 2),
        k_BTHD.transpose(1, 2),
        v_BTHD.transpose(1, 2),
        is_causal=True,
        enable_gqa=True,
    ).transpose(1, 2)


def timed(fn: Callable[[], torch.Tensor], backward: bool) -> float:
    """Seconds for one call of ``fn`` (plus the backward of its sum when ``backward``)."""
    start = time.perf_counter()
    out = fn()
    if backward:
        out.sum().backward()
    return time.perf_counter() - start


def compare(
    T: int, HQ: int, H: int, D: int, window: int, backward: bool, repeats: int
) -> tuple[float, float]:
    """Median dense and window times (seconds) for one shape, measured interleaved."""
    q_BTHD = torch.randn(1, T, HQ, D, requires_grad=backward)
    k_BTHD = torch.randn(1, T, H, D, requires_grad=backward)
    v_BTHD = torch.randn(1, T, H, D, requires_grad=backward)
    fns = {
        "dense": lambda: dense_causal(q_BTHD, k_BTHD, v_BTHD),
        "window": lambda: sliding_window_attention(q_BTHD, k_BTHD, v_BTHD, window, backend="torch"),
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    with torch.set_grad_enabled(backward):
        for fn in fns.values():
            timed(fn, backward)
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(timed(fn, backward))
    return statistics.median(times["dense"]), statistics.median(times["window"])


def main() -> None:
    """Parse the shapes to measure and print one line per (heads, T, mode)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument(
        "--heads", nargs="+", default=["16:1", "4:4"], help="HQ:H pairs (query:KV heads)"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B=1")
    for pair in args.heads:
        HQ, H = (int(x) for x in pair.split(":"))
        for T in args.T:
            theory = 1.0 / window_density(T, args.window)
            for backward in (False, True):
                dense_s, window_s = compare(
                    T, HQ, H, args.head_dim, args.window, backward, args.repeats
                )
                ratio = dense_s / window_s
                mode = "fwd+bwd" if backward else "fwd"
                print(
                    f"HQ={HQ:<2} H={H:<2} T={T:<6} w={args.window} {mode:<7} "
                    f"dense {dense_s * 1e3:8.1f} ms  window {window_s * 1e3:8.1f} ms  "
                    f"ratio {ratio:5.2f}x  theory {theory:5.2f}x  ({ratio / theory:4.0%})",
                    flush=True,
                )


if __name__ == "__main__":
    main()
