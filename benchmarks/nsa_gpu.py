"""GPU benchmark: the Triton NSA kernels against dense causal flash attention (SDPA), bf16.

Times ``selected_attention_triton`` (S selected blocks of ``block`` keys per query, NSA-like
indices) and ``compressed_attention_triton`` (compressed block 32, stride 16, the paper's) against
``F.scaled_dot_product_attention(is_causal=True)`` forced onto its flash backend, forward and
forward + backward, with ``triton.testing.do_bench`` (median ms after warm-up), and prints one
table row per (head layout, T) with the times and the speedups flash / kernel. The kernels are
called directly, so index validation and the dispatchers are not timed. K and V are expanded to
HQ heads for flash before timing (its GQA support varies by version); the work is the same.
Indices: block 0, the query's own block and the one before are forced, the other slots are
random distinct legal blocks, -1 where fewer exist (NSA's selection at random init).
Legend: B batch, T time, HQ query heads, H KV heads, D head dim, S selected blocks per query,
NB selection blocks, N compressed tokens.

    .venv/bin/python benchmarks/nsa_gpu.py                      # paper sizes, T = 8k .. 64k
    .venv/bin/python benchmarks/nsa_gpu.py --T 8192 --layouts 16:1:64
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

# queries per chunk when drawing indices: bounds the [chunk, H, NB] score tensor (64k tokens,
# 4 heads and 1024 blocks would otherwise need 1 GB)
_INDEX_CHUNK = 4096


def nsa_like_indices(
    B: int, T: int, H: int, S: int, block_size: int, device: torch.device
) -> torch.Tensor:
    """Random int64 idx_BTHS with NSA's forced blocks (0, own, own - 1), the rest random, -1 pad.

    Every legal block (starting at or before t) gets a random score and forced blocks a higher
    one; the top S are kept, illegal picks become -1 and the slots are shuffled. Drawn in query
    chunks of ``_INDEX_CHUNK`` positions.
    """
    NB = -(-T // block_size)
    gen = torch.Generator(device=device).manual_seed(0)
    j_N = torch.arange(NB, device=device)
    chunks = []
    for t0 in range(0, T, _INDEX_CHUNK):
        t1 = min(T, t0 + _INDEX_CHUNK)
        own_1C11 = (torch.arange(t0, t1, device=device) // block_size).view(1, -1, 1, 1)
        score_BCHN = torch.rand(B, t1 - t0, H, NB, device=device, generator=gen)
        score_BCHN.masked_fill_(j_N > own_1C11, float("-inf"))
        score_BCHN.masked_fill_((j_N == 0) | (j_N == own_1C11) | (j_N == own_1C11 - 1), 2.0)
        top_BCHS, idx_BCHS = score_BCHN.topk(min(S, NB), dim=-1)
        idx_BCHS = idx_BCHS.masked_fill(top_BCHS == float("-inf"), -1)
        idx_BCHS = F.pad(idx_BCHS, (0, S - idx_BCHS.shape[-1]), value=-1)
        order_BCHS = torch.rand(idx_BCHS.shape, device=device, generator=gen).argsort(dim=-1)
        chunks.append(idx_BCHS.gather(-1, order_BCHS))
    return torch.cat(chunks, dim=1)


def flash_causal(q_BHTD: torch.Tensor, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> torch.Tensor:
    """Dense causal attention on SDPA's flash backend, in SDPA's [B, H, T, D] layout."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q_BHTD, k_BHTD, v_BHTD, is_causal=True)


def bench_ms(fn: Callable[[], torch.Tensor], leaves: list[torch.Tensor], backward: bool) -> float:
    """Median milliseconds of ``fn`` (plus a backward of a fixed cotangent when ``backward``)."""
    from triton.testing import do_bench

    if not backward:
        with torch.no_grad():
            return do_bench(fn)
    cotangent = torch.randn_like(fn())

    def step() -> None:
        fn().backward(cotangent)

    return do_bench(step, grad_to_none=leaves)


def measure(
    T: int, HQ: int, H: int, D: int, S: int, block: int, backward: bool
) -> dict[str, float]:
    """Milliseconds of flash, selected and compressed attention for one shape and mode."""
    from sparsezoo.kernels.nsa.triton_compression import compressed_attention_triton
    from sparsezoo.kernels.nsa.triton_selection import selected_attention_triton

    device = torch.device("cuda")
    G = HQ // H
    scale = D**-0.5
    cmp_block, cmp_stride = 32, 16
    N = (T - cmp_block) // cmp_stride + 1

    def leaf(*shape: int) -> torch.Tensor:
        """A random bf16 CUDA tensor that requires grad when timing the backward."""
        x = torch.randn(*shape, device=device, dtype=torch.bfloat16)
        return x.requires_grad_(backward)

    q_BTHD, k_BTHD, v_BTHD = leaf(1, T, HQ, D), leaf(1, T, H, D), leaf(1, T, H, D)
    kcmp_BNHD, vcmp_BNHD = leaf(1, N, H, D), leaf(1, N, H, D)
    idx_BTHS = nsa_like_indices(1, T, H, S, block, device)
    # flash reads K/V per query head: expand once, outside the timed region
    qf_BHTD = leaf(1, HQ, T, D)
    kf_BHTD = k_BTHD.detach().transpose(1, 2).repeat_interleave(G, dim=1).requires_grad_(backward)
    vf_BHTD = v_BTHD.detach().transpose(1, 2).repeat_interleave(G, dim=1).requires_grad_(backward)
    return {
        "flash": bench_ms(
            lambda: flash_causal(qf_BHTD, kf_BHTD, vf_BHTD), [qf_BHTD, kf_BHTD, vf_BHTD], backward
        ),
        "selected": bench_ms(
            lambda: selected_attention_triton(q_BTHD, k_BTHD, v_BTHD, idx_BTHS, block, scale),
            [q_BTHD, k_BTHD, v_BTHD],
            backward,
        ),
        "compressed": bench_ms(
            lambda: compressed_attention_triton(
                q_BTHD, kcmp_BNHD, vcmp_BNHD, cmp_block, cmp_stride, scale
            )[0],
            [q_BTHD, kcmp_BNHD, vcmp_BNHD],
            backward,
        ),
    }


def main() -> None:
    """Parse the shapes, refuse to run without CUDA, print the table row by row."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["64:4:128", "16:1:64"],
        help="HQ:H:D triples (query heads : KV heads : head dim); 64:4:128 is the paper's",
    )
    parser.add_argument("--S", type=int, default=16, help="selected blocks per query")
    parser.add_argument("--block", type=int, default=64, help="selection block size")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("nsa_gpu.py needs a CUDA GPU (the Triton kernels compile for CUDA); none found.")
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16, B=1, "
        f"selection S={args.S} x {args.block} keys, compression l=32 d=16"
    )
    header = (
        f"{'HQ:H:D':<9} {'T':>6} {'mode':<7} {'flash ms':>9} {'sel ms':>8} {'cmp ms':>8} "
        f"{'sel x':>6} {'cmp x':>6}"
    )
    print(header)
    print("-" * len(header))
    for layout in args.layouts:
        HQ, H, D = (int(x) for x in layout.split(":"))
        for T in args.T:
            for backward in (False, True):
                ms = measure(T, HQ, H, D, args.S, args.block, backward)
                print(
                    f"{layout:<9} {T:>6} {'fwd+bwd' if backward else 'fwd':<7} "
                    f"{ms['flash']:9.2f} {ms['selected']:8.2f} {ms['compressed']:8.2f} "
                    f"{ms['flash'] / ms['selected']:5.1f}x {ms['flash'] / ms['compressed']:5.1f}x",
                    flush=True,
                )
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
