"""Triton NSA compressor phi: a fused gather-MLP forward and an atomic-free backward.

Legend: B batch, T time, N compressed tokens, H heads, D head dim, L block length l, I phi input
width l·D, F phi hidden width, X = B·N·H flattened rows, M raw-token rows of a dx tile (all of
one residue t mod stride), P padded head dim, Q hidden columns of a tile (BLOCK_F).

Compressed token i of head h is silu(flatten(x[i·stride : i·stride + l, h] + pos) @ w1 + b1) @ w2
+ b2 with the block flattened position-major (paper Eq. 7). The forward kernel never builds the
[X, I] matrix of flattened blocks: for block position s it loads the raw rows i·stride + s of
its compressed tokens straight from x, adds pos[s] and multiplies by the D rows of w1 that
position owns, so the first matmul is l dots of [rows, P] x [P, Q]; silu and the second matmul
follow in registers. It stores the fp32 pre-activation [X, F] for the backward when a gradient
is needed. Backward: dhid = (dout @ w2ᵀ) · silu' and the small weight gradients (dw2, db2, db1
and dpos, whose row s is db1 @ w1[s·D : (s + 1)·D]ᵀ) are plain torch matmuls and sums over the
saved activations, the clean choice for [X, F] x [X, D] products; dw1 needs the gathered blocks
again, so a kernel re-gathers them (one program per block position and hidden tile, looping
over all rows) instead of materialising them; dx is gathered per raw token from the l/d blocks
that contain it (one program per tile of tokens with the same residue r = t mod stride, so
every row of the tile reads the same l/d slices of w1). No two programs write the same
gradient, so no float atomics are needed. Dot operands are in x's dtype (as under autocast)
with fp32 accumulation. Offsets are int64 so B·T·H·D may exceed 2**31. TRITON_INTERPRET=1
must be set before this module is imported to run it on CPU (fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..triton_common import dot_precision, pad16, require_cuda, tile_ptrs
from .compression import num_compressed

# Rows (compressed tokens, or raw tokens for dx) and hidden columns of a tile; F = 64 (the
# mechanism's default) is then one hidden tile. Not autotuned (no GPU was at hand when written).
# Tests shrink them to make short sequences span many tiles.
BLOCK_N = 64
BLOCK_F = 64


@triton.jit
def _block_rows(
    x_ptr, pos_ptr, b, h, offs_n, s, offs_d, N, D, stride,
    sx_b, sx_t, sx_h, sx_d, sp_l, sp_d,
):  # fmt: skip
    """Rows [rows, P] of x[b, i·stride + s, h] + pos[s] for compressed tokens i = offs_n, in fp32.

    Rows past N and columns past D are 0, so they add nothing to any dot.
    """
    d_ok = offs_d < D
    ok = (offs_n < N)[:, None] & d_ok[None, :]
    x_NP = tl.load(
        tile_ptrs(x_ptr, b, h, offs_n * stride + s, offs_d, sx_b, sx_t, sx_h, sx_d),
        mask=ok,
        other=0.0,
    )
    pos_P = tl.load(pos_ptr + s * sp_l + offs_d * sp_d, mask=d_ok, other=0.0)
    return tl.where(ok, x_NP.to(tl.float32) + pos_P.to(tl.float32)[None, :], 0.0)


@triton.jit
def _w1_rows(w1_ptr, s, offs_d, offs_f, D, F, sw1_i, sw1_f):
    """The [P, Q] tile of w1 that block position s owns: rows s·D + offs_d, columns offs_f."""
    ok = (offs_d < D)[:, None] & (offs_f < F)[None, :]
    rows_P = (s * D + offs_d).to(tl.int64)
    return tl.load(w1_ptr + rows_P[:, None] * sw1_i + offs_f[None, :] * sw1_f, mask=ok, other=0.0)


@triton.jit
def _fwd_kernel(
    x_ptr, pos_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, out_ptr, hid_ptr,
    sx_b, sx_t, sx_h, sx_d,
    sp_l, sp_d, sw1_i, sw1_f, sw2_f, sw2_d,
    so_b, so_t, so_h, so_d,
    N, H, D, F, block_size, stride,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, SAVE_HIDDEN: tl.constexpr,
):  # fmt: skip
    """One program per (compressed-token tile, batch · head): gather, MLP, store out [and hid]."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < N
    dtype = x_ptr.dtype.element_ty
    # row of token (b, i, h) in the contiguous [B, N, H, F] pre-activation buffer
    row_N = (b * N + offs_n) * H + h
    out_NP = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for f0 in range(0, F, BLOCK_F):
        offs_f = f0 + tl.arange(0, BLOCK_F)
        f_ok = offs_f < F
        hid_NQ = tl.zeros([BLOCK_N, BLOCK_F], tl.float32)
        for s in range(0, block_size):
            a_NP = _block_rows(
                x_ptr, pos_ptr, b, h, offs_n, s, offs_d, N, D, stride,
                sx_b, sx_t, sx_h, sx_d, sp_l, sp_d,
            )  # fmt: skip
            w1_PQ = _w1_rows(w1_ptr, s, offs_d, offs_f, D, F, sw1_i, sw1_f)
            hid_NQ += tl.dot(a_NP.to(dtype), w1_PQ.to(dtype), input_precision=PRECISION)
        hid_NQ += tl.load(b1_ptr + offs_f, mask=f_ok, other=0.0).to(tl.float32)[None, :]
        if SAVE_HIDDEN:
            tl.store(
                hid_ptr + row_N[:, None] * F + offs_f[None, :],
                hid_NQ,
                mask=n_ok[:, None] & f_ok[None, :],
            )
        # columns past F hold silu(0) = 0 and meet zero rows of w2
        act_NQ = hid_NQ * tl.sigmoid(hid_NQ)
        w2_QP = tl.load(
            w2_ptr + offs_f[:, None] * sw2_f + offs_d[None, :] * sw2_d,
            mask=f_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        out_NP += tl.dot(act_NQ.to(dtype), w2_QP.to(dtype), input_precision=PRECISION)
    out_NP += tl.load(b2_ptr + offs_d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        tile_ptrs(out_ptr, b, h, offs_n, offs_d, so_b, so_t, so_h, so_d),
        out_NP.to(out_ptr.dtype.element_ty),
        mask=n_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def _dx_kernel(
    dhid_ptr, w1_ptr, dx_ptr,
    sw1_i, sw1_f,
    sdx_b, sdx_t, sdx_h, sdx_d,
    T, N, H, D, F, block_size, stride,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (tile of tokens t = m·stride + r, residue r, batch · head): dx rows.

    Token t sits at position s = r + k·stride of block i = m - k for k = 0 .. l/d - 1 (when
    0 <= i < N), so dx[t] = Σ_k dhid[i] @ w1[s·D : (s + 1)·D]ᵀ; with r fixed, s depends on k
    only and each k is one [M, Q] x [Q, P] dot per hidden tile. Tokens in no block get 0.
    """
    pid_m = tl.program_id(0)
    r = tl.program_id(1)
    pid_bh = tl.program_id(2).to(tl.int64)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    t_M = offs_m * stride + r
    dtype = dx_ptr.dtype.element_ty
    dx_MP = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for k in range(0, block_size // stride):
        i_M = offs_m - k
        i_ok = (i_M >= 0) & (i_M < N)
        row_M = (b * N + i_M) * H + h
        s = r + k * stride
        for f0 in range(0, F, BLOCK_F):
            offs_f = f0 + tl.arange(0, BLOCK_F)
            dhid_MQ = tl.load(
                dhid_ptr + row_M[:, None] * F + offs_f[None, :],
                mask=i_ok[:, None] & (offs_f < F)[None, :],
                other=0.0,
            )
            w1_PQ = _w1_rows(w1_ptr, s, offs_d, offs_f, D, F, sw1_i, sw1_f)
            dx_MP += tl.dot(dhid_MQ.to(dtype), tl.trans(w1_PQ.to(dtype)), input_precision=PRECISION)
    tl.store(
        tile_ptrs(dx_ptr, b, h, t_M, offs_d, sdx_b, sdx_t, sdx_h, sdx_d),
        dx_MP.to(dtype),
        mask=(t_M < T)[:, None] & (offs_d < D)[None, :],
    )


@triton.jit
def _dw1_kernel(
    x_ptr, pos_ptr, dhid_ptr, dw1_ptr,
    sx_b, sx_t, sx_h, sx_d,
    sp_l, sp_d,
    B, N, H, D, F, stride,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (block position s, hidden tile): dw1[s·D + e, f] = Σ_rows a[e] · dhid[f].

    a is the re-gathered x[b, i·stride + s, h] + pos[s] of every row (b, i, h); the program owns
    its [P, Q] slice of dw1 and stores it once into the contiguous fp32 [I, F] output.
    """
    s = tl.program_id(0)
    offs_f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    offs_d = tl.arange(0, BLOCK_D)
    f_ok = offs_f < F
    dtype = x_ptr.dtype.element_ty
    dw1_PQ = tl.zeros([BLOCK_D, BLOCK_F], tl.float32)
    for bh in range(0, B * H):
        b = (bh // H).to(tl.int64)
        h = bh % H
        for n0 in range(0, N, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            a_NP = _block_rows(
                x_ptr, pos_ptr, b, h, offs_n, s, offs_d, N, D, stride,
                sx_b, sx_t, sx_h, sx_d, sp_l, sp_d,
            )  # fmt: skip
            dhid_NQ = tl.load(
                dhid_ptr + ((b * N + offs_n) * H + h)[:, None] * F + offs_f[None, :],
                mask=(offs_n < N)[:, None] & f_ok[None, :],
                other=0.0,
            )
            dw1_PQ += tl.dot(tl.trans(a_NP.to(dtype)), dhid_NQ.to(dtype), input_precision=PRECISION)
    rows_P = (s * D + offs_d).to(tl.int64)
    tl.store(
        dw1_ptr + rows_P[:, None] * F + offs_f[None, :],
        dw1_PQ,
        mask=(offs_d < D)[:, None] & f_ok[None, :],
    )


class _CompressKVTriton(torch.autograd.Function):
    """Autograd wrapper: the fused forward kernel; backward runs the dx and dw1 kernels."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x_BTHD: torch.Tensor,
        pos_LD: torch.Tensor,
        w1_IF: torch.Tensor,
        b1_F: torch.Tensor,
        w2_FD: torch.Tensor,
        b2_D: torch.Tensor,
        block_size: int,
        stride: int,
    ) -> torch.Tensor:
        """Run the forward kernel; returns x_BNHD and saves the fp32 pre-activation if needed."""
        B, T, H, D = x_BTHD.shape
        N = num_compressed(T, block_size, stride)
        F = w1_IF.shape[1]
        save_hidden = any(ctx.needs_input_grad[:6])
        out_BNHD = x_BTHD.new_empty(B, N, H, D)
        # a 1-element placeholder when nothing is saved: the kernel never touches it then
        hid_BNHF = torch.empty(
            (B, N, H, F) if save_hidden else (1,), device=x_BTHD.device, dtype=torch.float32
        )
        if N:
            _fwd_kernel[(triton.cdiv(N, BLOCK_N), B * H)](
                x_BTHD, pos_LD, w1_IF, b1_F, w2_FD, b2_D, out_BNHD, hid_BNHF,
                *x_BTHD.stride(), *pos_LD.stride(), *w1_IF.stride(), *w2_FD.stride(),
                *out_BNHD.stride(),
                N, H, D, F, block_size, stride,
                BLOCK_N=BLOCK_N, BLOCK_F=BLOCK_F, BLOCK_D=pad16(D),
                PRECISION=dot_precision(x_BTHD.dtype), SAVE_HIDDEN=save_hidden,
            )  # fmt: skip
        ctx.save_for_backward(x_BTHD, pos_LD, w1_IF, w2_FD, hid_BNHF)
        ctx.bias_dtypes = (b1_F.dtype, b2_D.dtype)
        ctx.block_size = block_size
        ctx.stride = stride
        return out_BNHD

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, dout_BNHD: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        """Gradients of x (kernel), w1 (kernel) and pos, b1, w2, b2 (torch); none for the knobs.

        With hid the saved pre-activation and σ = sigmoid(hid): dhid = (dout @ w2ᵀ) · σ ·
        (1 + hid · (1 - σ)); db1 = Σ dhid, dw2 = silu(hid)ᵀ @ dout, db2 = Σ dout, and, since
        pos[s] is added to every block's position s, dpos[s] = db1 @ w1[s·D : (s + 1)·D]ᵀ.
        """
        x_BTHD, pos_LD, w1_IF, w2_FD, hid_BNHF = ctx.saved_tensors
        B, T, H, D = x_BTHD.shape
        N, F = hid_BNHF.shape[1], hid_BNHF.shape[3]
        L = ctx.block_size
        hid_XF = hid_BNHF.reshape(B * N * H, F)
        dout_XD = dout_BNHD.float().reshape(B * N * H, D)
        sig_XF = torch.sigmoid(hid_XF)
        dhid_XF = (dout_XD @ w2_FD.float().T) * sig_XF * (1 + hid_XF * (1 - sig_XF))
        dhid_XF = dhid_XF.contiguous()
        db1_F = dhid_XF.sum(0)
        dw2_FD = (hid_XF * sig_XF).T @ dout_XD
        db2_D = dout_XD.sum(0)
        dpos_LD = (w1_IF.float() @ db1_F).reshape(L, D)
        dx_BTHD = torch.empty_like(x_BTHD)
        dw1_IF = torch.empty(L * D, F, device=x_BTHD.device, dtype=torch.float32)
        tiles = {
            "BLOCK_F": BLOCK_F,
            "BLOCK_D": pad16(D),
            "PRECISION": dot_precision(x_BTHD.dtype),
        }
        _dx_kernel[(triton.cdiv(triton.cdiv(T, ctx.stride), BLOCK_N), ctx.stride, B * H)](
            dhid_XF, w1_IF, dx_BTHD,
            *w1_IF.stride(), *dx_BTHD.stride(),
            T, N, H, D, F, L, ctx.stride,
            BLOCK_M=BLOCK_N, **tiles,
        )  # fmt: skip
        _dw1_kernel[(L, triton.cdiv(F, BLOCK_F))](
            x_BTHD, pos_LD, dhid_XF, dw1_IF,
            *x_BTHD.stride(), *pos_LD.stride(),
            B, N, H, D, F, ctx.stride,
            BLOCK_N=BLOCK_N, **tiles,
        )  # fmt: skip
        return (
            dx_BTHD,
            dpos_LD.to(pos_LD.dtype),
            dw1_IF.to(w1_IF.dtype),
            db1_F.to(ctx.bias_dtypes[0]),
            dw2_FD.to(w2_FD.dtype),
            db2_D.to(ctx.bias_dtypes[1]),
            None,
            None,
        )


def compress_kv_triton(
    x_BTHD: torch.Tensor,
    pos_LD: torch.Tensor,
    w1_IF: torch.Tensor,
    b1_F: torch.Tensor,
    w2_FD: torch.Tensor,
    b2_D: torch.Tensor,
    block_size: int,
    stride: int,
) -> torch.Tensor:
    """NSA's compressor phi through the Triton kernels; differentiable in x and every weight.

    Returns x_BNHD [B, N, H, D] in x's dtype, N = floor((T - l) / d) + 1 (0 when T < l), with
    token i = silu(flatten(x[:, i·d : i·d + l] + pos_LD) @ w1_IF + b1_F) @ w2_FD + b2_D per head.
    Inputs are validated by the caller (the ``compress_kv`` dispatcher). Raises ValueError for
    CPU tensors unless the kernels were imported under TRITON_INTERPRET=1.
    """
    require_cuda("compress_kv", x_BTHD)
    # the kernel reads the biases at unit stride (a strided view would be read wrong)
    b1_F, b2_D = b1_F.contiguous(), b2_D.contiguous()
    return _CompressKVTriton.apply(x_BTHD, pos_LD, w1_IF, b1_F, w2_FD, b2_D, block_size, stride)
