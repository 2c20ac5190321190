"""NSA mechanism: validation, cost model and Table 4 decode reads, stats, K/V modes, learning."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_utils import train_tiny_and_check_it_learns

import sparsezoo
from sparsezoo.kernels.backend import triton_available
from sparsezoo.kernels.nsa.compression import num_compressed
from sparsezoo.mechanisms import MechanismConfigError
from sparsezoo.mechanisms import nsa as nsa_module
from sparsezoo.mechanisms.nsa import Compressor, NSACache
from sparsezoo.testing import check_mechanism

PAPER = {"block_size": 32, "stride": 16, "select_size": 64, "n_select": 16, "window": 512}


def _nsa(d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 1, **params: object):
    torch.manual_seed(0)
    return sparsezoo.build_attention(
        "nsa", d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, **params
    ).eval()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"block_size": 24, "stride": 16}, "block_size=24 must be a multiple of stride=16"),
        ({"select_size": 72}, "select_size=72 must be a multiple of stride=16"),
        ({"block_size": 64, "select_size": 32}, "block_size=64 must be <= select_size=32"),
        ({"n_select": 2}, "n_select=2 is below the minimum 3"),
        ({"window": 0}, "window=0 is below the minimum 1"),
        ({"kv_mode": "tied"}, "kv_mode='tied' is not allowed"),
        ({"compress_skip": "max"}, "compress_skip='max' is not allowed"),
    ],
)
def test_validation_names_the_knob(params: dict, message: str) -> None:
    with pytest.raises(MechanismConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        _nsa(**params)


def test_cost_model_is_table_4() -> None:
    attn = _nsa(**PAPER)
    # floor((s - l)/d) + 1 compressed + n*l' selected + w window keys at context s
    for s in (8192, 16384, 32768, 65536):
        expected = (s - 32) // 16 + 1 + 16 * 64 + 512
        assert attn.cost(s).keys == expected
    dense_over_nsa = [s / attn.cost(s).keys for s in (8192, 16384, 32768, 65536)]
    assert [round(r, 1) for r in dense_over_nsa] == [4.0, 6.4, 9.1, 11.6]
    assert attn.cost(1).keys == 2  # its own key in the selected block and in the window


@pytest.mark.parametrize("s", [2048, 4096, 8193, 8200, 16384 + 37])
def test_decode_reads_match_table_4_formula(s: int) -> None:
    """A decode step at context s reads floor((s - l)/d) + 1 compressed, n·l' selected (whole
    blocks, the query's own too) and w window rows, at multiples of l' and between them."""
    attn = _nsa(**PAPER)
    cache = attn.new_cache(1, s)
    assert isinstance(cache, NSACache)
    with torch.no_grad():
        attn.fill_cache(torch.randn(1, s - 1, 64), cache)
        attn(torch.randn(1, 1, 64), cache=cache)
    assert cache.length == s
    assert cache.n_cmp == (s - 32) // 16 + 1
    assert cache.rows_read == (s - 32) // 16 + 1 + 16 * 64 + 512


def test_decoding_compresses_each_block_once_rotated_at_its_last_position(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Token-by-token decoding emits compressed token i when token i·d + l - 1 arrives, from
    exactly its l raw rows (nothing is recompressed), and the cached key is phi of those rows
    rotated at position i·d + l - 1 (the documented RoPE rule: raw keys compressed unrotated)."""
    calls: list[tuple[int, int]] = []
    compress = nsa_module.NativeSparseAttention._compress

    def recording(self, raw_k_BTHD: torch.Tensor, raw_v_BTHD: torch.Tensor, first: int):
        calls.append((first, raw_k_BTHD.shape[1]))
        return compress(self, raw_k_BTHD, raw_v_BTHD, first)

    monkeypatch.setattr(nsa_module.NativeSparseAttention, "_compress", recording)
    size, d, T = 16, 8, 60
    attn = _nsa(n_kv_heads=2, block_size=size, stride=d, select_size=16, n_select=4, window=16)
    cache = attn.new_cache(1, T)
    arrivals = []
    with torch.no_grad():
        for t in range(T):
            before = len(calls)
            attn(torch.randn(1, 1, 64), cache=cache)
            arrivals += [t] * (len(calls) - before)
    n = (T - size) // d + 1
    assert calls == [(i, size) for i in range(n)]
    assert arrivals == [i * d + size - 1 for i in range(n)]
    with torch.no_grad():
        for i in range(n):
            raw = cache.raw_k_BSHD[:, i * d : i * d + size]
            phi_BNHD = attn.compress_k(raw, d, "naive")
            k_BHD = cache.kcmp_BHDN[..., i]
            unrotated = attn.rope_at(k_BHD[:, None], torch.tensor([-(i * d + size - 1)]))
            torch.testing.assert_close(unrotated[:, 0], phi_BNHD[:, 0], rtol=1e-5, atol=1e-5)


def test_stats_gates_forced_share_and_density() -> None:
    attn = _nsa(block_size=16, stride=8, select_size=16, n_select=4, window=16)
    with torch.no_grad():
        attn(torch.randn(2, 400, 64))
    st = attn.stats
    assert set(st) >= {"density", "cmp_density", "forced_frac", "gate_cmp", "gate_slc", "gate_win"}
    assert float(st["group_size"]) == 4  # 4 query heads on 1 KV head
    assert 0 < float(st["density"]) < 0.4
    # 3 of 4 slots are forced once a query has more than 3 legal blocks
    assert 0.74 < float(st["forced_frac"]) <= 1.0
    for branch in ("cmp", "slc", "win"):
        assert float(st[f"gate_{branch}"]) == pytest.approx(0.5, abs=0.01)  # gates start near 0.5


@pytest.mark.parametrize(
    ("params", "T", "prefix"),
    [
        ({"block_size": 16, "stride": 8, "select_size": 16, "n_select": 4, "window": 16}, 301, 0),
        ({"block_size": 16, "stride": 8, "select_size": 32, "n_select": 4, "window": 40}, 257, 0),
        ({"block_size": 16, "stride": 8, "select_size": 16, "n_select": 4, "window": 16}, 3, 290),
    ],
)
def test_density_counts_each_attended_key_once(
    monkeypatch: pytest.MonkeyPatch, params: dict, T: int, prefix: int
) -> None:
    """``density`` equals the share of causal (query, key) pairs in the union of the selected
    blocks and the window, built as an explicit mask (the own and previous blocks lie in the
    window and count once), averaged over batch and KV heads; ``cmp_density`` the visible
    compressed tokens over the causal pairs. Prefill and a decode step of 3 tokens."""
    seen: list[torch.Tensor] = []
    stats = nsa_module.NativeSparseAttention._selection_stats

    def recording(self, idx_BTHK: torch.Tensor, pos_T: torch.Tensor) -> dict:
        seen.append(idx_BTHK)
        return stats(self, idx_BTHK, pos_T)

    monkeypatch.setattr(nsa_module.NativeSparseAttention, "_selection_stats", recording)
    attn = _nsa(n_kv_heads=2, **params)
    x = torch.randn(2, prefix + T, 64)
    with torch.no_grad():
        if prefix:
            cache = attn.new_cache(2, prefix + T)
            attn.fill_cache(x[:, :prefix], cache)
            attn(x[:, prefix:], cache=cache)
        else:
            attn(x)
    measured = attn.stats  # a decode step's stats are computed when read
    (idx_BTHK,) = seen
    t_T1 = torch.arange(prefix, prefix + T)[:, None]
    s_1S = torch.arange(prefix + T)[None]
    causal_TS = s_1S <= t_T1
    window_TS = causal_TS & (s_1S > t_T1 - params["window"])
    block_S = s_1S[0] // params["select_size"]
    chosen_BTHS = (idx_BTHK[..., None] == block_S).any(3)
    attended = (chosen_BTHS | window_TS[None, :, None]) & causal_TS[None, :, None]
    expected = attended.sum(dim=(1, 3)).double().mean() / causal_TS.sum()
    assert float(measured["density"]) == pytest.approx(float(expected), rel=1e-6)
    n_cmp_T = (t_T1 - params["block_size"] + 1).div(params["stride"], rounding_mode="floor") + 1
    expected_cmp = n_cmp_T.clamp(min=0).sum() / causal_TS.sum()
    assert float(measured["cmp_density"]) == pytest.approx(float(expected_cmp), rel=1e-6)
    assert float(measured["group_size"]) == 2  # 4 query heads on 2 KV heads


def test_training_forward_keeps_no_branch_output() -> None:
    """The prefill's branches, gate and output projection run as one op (``gated_branches``)
    whose backward needs no branch output: of the tensors autograd keeps, only the queries
    have the attention output's size (the gated mix is held by the op until its backward
    reads it once). The three branch outputs and the mix used to be kept as well (five)."""
    preset = {"block_size": 16, "stride": 8, "select_size": 16, "n_select": 4, "window": 16}
    attn = _nsa(gate_hidden=32, **preset).train()
    x = torch.randn(1, 300, 64, requires_grad=True)
    q_size = 300 * 4 * 16  # as x's (d_model 64): x's own storage is not counted
    storages: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() == q_size and t.untyped_storage().data_ptr() != x.data_ptr():
            storages.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = attn(x)
    assert len(storages) == 1
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_training_forward_keeps_no_phi_or_gate_activations() -> None:
    """phi and the gate MLP are recomputed in the backward: autograd keeps neither phi's
    flattened blocks (N·H rows of l·D) nor the gate's hidden layer (T rows of gate_hidden),
    which otherwise live through the attention's backward, the training peak; x still gets
    its gradient and so do both MLPs' weights."""
    preset = {"block_size": 16, "stride": 8, "select_size": 16, "n_select": 4, "window": 16}
    attn = _nsa(gate_hidden=24, **preset).train()
    H = attn.shape.n_kv_heads
    x = torch.randn(1, 300, 64, requires_grad=True)
    blocks_size = num_compressed(300, 16, 8) * H * 16 * attn.shape.head_dim
    hidden_size = 300 * 24
    sizes: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = attn(x)
    assert sizes and blocks_size not in sizes and hidden_size not in sizes
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for module in (attn.compress_k, attn.compress_v, attn.gate):
        for name, weight in module.named_parameters():
            assert weight.grad is not None and weight.grad.abs().sum() > 0, name


def test_cache_keeps_selection_blocks_contiguous_and_padded() -> None:
    """The selection K/V are head-major and padded to whole selection blocks: a selected
    block of one KV head, the tail block included, is one contiguous run of l' rows."""
    attn = _nsa(n_heads=4, n_kv_heads=2, block_size=8, stride=4, select_size=16, window=12)
    cache = attn.new_cache(1, 40)
    assert cache.k_BSHD.shape == cache.v_BSHD.shape == (1, 40, 2, 16)
    assert cache.k_BHSD.shape == cache.v_BHSD.shape == (1, 2, 48, 16)
    for x_BHSD in (cache.k_BHSD, cache.v_BHSD):
        assert x_BHSD[0, 1, 32:48].is_contiguous()
    assert cache.k_BSHD.untyped_storage().data_ptr() == cache.k_BHSD.data_ptr()


@pytest.mark.parametrize("threads", [1, 3])
def test_decode_over_head_splits_equals_the_full_forward(threads: int) -> None:
    """Decoding splits the KV heads over the workers (here 4 heads over 1 or 3 workers, one
    worker taking two) and gathers whole selected blocks from the head-major cache: token by
    token and in chunks it equals the full forward, and its stats (deferred) are complete."""
    preset = {"block_size": 8, "stride": 4, "select_size": 16, "n_select": 4, "window": 12}
    attn = _nsa(d_model=64, n_heads=8, n_kv_heads=4, **preset)
    x = torch.randn(1, 150, 64, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            full = attn(x)
            for step in (1, 7):
                cache = attn.new_cache(1, 150)
                attn.fill_cache(x[:, :40], cache)
                outs = [attn(x[:, t : t + step], cache=cache) for t in range(40, 150, step)]
                torch.testing.assert_close(torch.cat(outs, 1), full[:, 40:], rtol=1e-4, atol=1e-5)
        assert set(attn.stats) >= {"density", "forced_frac", "gate_cmp", "gate_slc", "gate_win"}
        assert 0 < float(attn.stats["density"]) < 1
    finally:
        torch.set_num_threads(before)


def test_shared_kv_mode_conforms_and_has_fewer_parameters() -> None:
    preset = {"block_size": 16, "stride": 8, "select_size": 16, "n_select": 4, "window": 16}
    check_mechanism("nsa", {**preset, "kv_mode": "shared"}, T=301)
    n_shared = sum(p.numel() for p in _nsa(kv_mode="shared").parameters())
    n_indep = sum(p.numel() for p in _nsa(kv_mode="independent").parameters())
    assert n_indep - n_shared == 4 * 64 * 16  # two extra (K, V) pairs of one 16-dim KV head


def test_mean_skip_adds_each_blocks_mean_to_phi() -> None:
    """compress_skip="mean": compressed token i is phi(block i) plus the mean of the block's
    l rows [i*d, i*d + l), the same phi weights; fewer than l tokens give no token."""
    plain, skip = Compressor(8, 16, 32, False), Compressor(8, 16, 32, True)
    skip.load_state_dict(plain.state_dict())
    x_BTHD = torch.randn(2, 37, 3, 16, generator=torch.Generator().manual_seed(0))
    phi_BNHD, out_BNHD = plain(x_BTHD, 4, "torch"), skip(x_BTHD, 4, "torch")
    assert out_BNHD.shape == (2, (37 - 8) // 4 + 1, 3, 16)
    for i in range(out_BNHD.shape[1]):
        mean_BHD = x_BTHD[:, i * 4 : i * 4 + 8].mean(1)
        torch.testing.assert_close(out_BNHD[:, i], phi_BNHD[:, i] + mean_BHD)
    assert skip(x_BTHD[:, :7], 4, "torch").shape == (2, 0, 3, 16)


@pytest.mark.parametrize("kv_mode", ["independent", "shared"])
def test_mean_skip_conforms(kv_mode: str) -> None:
    preset = {"block_size": 16, "stride": 8, "select_size": 16, "n_select": 4, "window": 16}
    check_mechanism("nsa", {**preset, "kv_mode": kv_mode, "compress_skip": "mean"}, T=301)


@pytest.mark.slow
def test_tiny_nsa_learns_on_stdlib_and_logs_stats(tmp_path: Path, data_cache: Path) -> None:
    params = {"block_size": 16, "stride": 8, "select_size": 16, "n_select": 4, "window": 32}
    run = train_tiny_and_check_it_learns(tmp_path, data_cache, "nsa", params)
    for key in (
        "attn/nsa/gate_cmp",
        "attn/nsa/gate_slc",
        "attn/nsa/gate_win",
        "attn/nsa/forced_frac",
    ):
        assert math.isfinite(run[f"metrics.{key}"])
    assert run["metrics.attn/density"] < 0.8  # t/8 + 64 + 32 keys of t, averaged over T=256


_INTERPRETED_NSA = """
import json, torch, sparsezoo
torch.manual_seed(0)
module = sparsezoo.build_attention(
    "nsa", d_model=32, n_heads=4, n_kv_heads=2, block_size=16, stride=8, select_size=16,
    n_select=4, window=16,
)
x = torch.randn(1, 75, 32, generator=torch.Generator().manual_seed(1))
out = {}
for backend in ("naive", "triton"):
    module.params.backend = backend
    module.zero_grad()
    xb = x.clone().requires_grad_()
    y = module(xb)
    y.square().sum().backward()
    grads = [xb.grad] + [p.grad for p in module.parameters()]
    out[backend] = (y, grads)
(y0, g0), (y1, g1) = out["naive"], out["triton"]
err = [float((y1 - y0).detach().abs().max())] + [float((a - b).abs().max()) for a, b in zip(g1, g0)]
print(json.dumps({"err": err, "params": len(g0)}))
"""


@pytest.mark.skipif(not triton_available(), reason="triton is not installed")
def test_nsa_module_on_interpreted_triton_kernels_matches_naive() -> None:
    """The whole NSA module with backend=triton (phi, compression, selection, selected and window
    attention all on interpreted Triton kernels) gives the naive backend's output and every
    parameter and input gradient, at an odd length with GQA groups of 2."""
    done = subprocess.run(
        [sys.executable, "-c", _INTERPRETED_NSA],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["params"] > 10
    assert max(report["err"]) < 1e-4, report["err"]
