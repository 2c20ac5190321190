"""MoBA mechanism: validation, cost model, sparse decoding reads, stats, per-head routing and
learning."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from train_utils import train_tiny_and_check_it_learns

import sparsezoo
from sparsezoo.kernels.moba import block_means, route_blocks
from sparsezoo.mechanisms import MechanismConfigError
from sparsezoo.mechanisms.moba import DISTANCE_BINS, MoBACache

PAPER = {"block_size": 512, "top_k": 3}


def _moba(d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 1, **params: object):
    torch.manual_seed(0)
    return sparsezoo.build_attention(
        "moba", d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, **params
    ).eval()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"block_size": 0}, "block_size=0 is below the minimum 1"),
        ({"top_k": 0}, "top_k=0 is below the minimum 1"),
        ({"block_size": 2.5}, "block_size must be an integer, got 2.5"),
        ({"top_k": True}, "top_k must be an integer, got True"),
        ({"backend": "flash"}, "backend='flash' is not allowed"),
    ],
)
def test_validation_names_the_knob(params: dict, message: str) -> None:
    with pytest.raises(MechanismConfigError, match=message):
        _moba(**params)


def test_cost_model() -> None:
    """Own block keys + min(i, k - 1) routed blocks + i gate means at context t; the prefill
    ratio to dense lands near performance.md's figures (3.2x .. 25x at 8k .. 64k)."""
    attn = _moba(**PAPER)
    assert attn.cost(1).keys == 1  # its own key, no past block to score
    assert attn.cost(512).keys == 512
    assert attn.cost(513).keys == 1 + 512 + 1
    assert attn.cost(4096).keys == 512 + 2 * 512 + 7
    assert attn.cost(4096).flops == pytest.approx(4 * 16 * 1536 + 2 * 16 * 7)
    for T, paper in ((8192, 3.2), (16384, 6.4), (32768, 12.6), (65536, 25.0)):
        moba_keys = sum(attn.cost(t).keys for t in range(1, T + 1))
        assert T * (T + 1) / 2 / moba_keys == pytest.approx(paper, rel=0.1)


@pytest.mark.parametrize("s", [2048, 2600])
def test_decode_reads_only_means_own_and_routed_rows(s: int) -> None:
    """A decode step reads the past blocks' means, its own block up to itself and k - 1 routed
    blocks; the cache holds exactly the complete blocks' means, equal to prefill's."""
    attn = _moba(**PAPER)
    cache = attn.new_cache(1, s)
    assert isinstance(cache, MoBACache)
    with torch.no_grad():
        attn.fill_cache(torch.randn(1, s - 1, 64), cache)
        attn(torch.randn(1, 1, 64), cache=cache)
    assert cache.length == s and cache.n_means == s // 512
    torch.testing.assert_close(cache.kmean_BNHD[:, : s // 512], block_means(cache.keys(), 512))
    i = (s - 1) // 512
    # MQA (one KV head): the union over the 4 query heads of their 2 routed blocks each
    routed_rows = cache.rows_read - i - (s - i * 512)
    assert routed_rows % 512 == 0 and 2 * 512 <= routed_rows <= 4 * 2 * 512
    mha = _moba(n_kv_heads=4, **PAPER)
    mha_cache = mha.new_cache(1, s)
    with torch.no_grad():
        mha.fill_cache(torch.randn(1, s - 1, 64), mha_cache)
        mha(torch.randn(1, 1, 64), cache=mha_cache)
    assert mha_cache.rows_read == i + (s - i * 512) + 2 * 512 == mha.cost(s).keys


def test_cache_keeps_each_kv_heads_rows_contiguous() -> None:
    """The cache's K/V are head-major: a routed block of one KV head is one contiguous run."""
    attn = _moba(n_heads=4, n_kv_heads=2, block_size=4, top_k=2)
    cache = attn.new_cache(2, 11)
    for x_BSHD in (cache.k_BSHD, cache.v_BSHD):
        assert x_BSHD.shape == (2, 11, 2, 16)
        assert x_BSHD[1, 4:8, 1].is_contiguous()


def test_partial_block_never_gets_a_mean() -> None:
    """Feeding the cache token by token, a block's mean appears exactly when it completes."""
    attn = _moba(block_size=4, top_k=2)
    cache = attn.new_cache(2, 11)
    with torch.no_grad():
        for t in range(11):
            attn(torch.randn(2, 1, 64), cache=cache)
            assert cache.n_means == (t + 1) // 4
    assert not cache.kmean_BNHD[:, 2:].any()


def test_stats_density_margin_and_distances() -> None:
    """density counts own + routed keys; gate_margin is the scaled mean finite margin; the
    distance shares are the histogram of own block - routed block over all routed picks."""
    attn = _moba(block_size=16, top_k=3)
    x = torch.randn(2, 400, 64)
    with torch.no_grad():
        attn(x)
        q_BTHD, k_BTHD, _ = attn.project(x, 0)
    idx_BTHR, margin_BTH = route_blocks(q_BTHD, block_means(k_BTHD, 16), 16, 3)
    st = attn.stats
    names = [f"dist_{label}" for _, label in DISTANCE_BINS]
    assert set(st) == {"density", "gate_margin", *names}
    T = 400
    attended = sum(t % 16 + 1 + min(t // 16, 2) * 16 for t in range(T))
    assert float(st["density"]) == pytest.approx(attended / (T * (T + 1) / 2), rel=1e-6)
    finite = margin_BTH[margin_BTH.isfinite()]
    assert float(st["gate_margin"]) == pytest.approx(float(finite.mean()) * 16**-0.5, rel=1e-5)
    distances = ((torch.arange(T) // 16).view(1, T, 1, 1) - idx_BTHR)[idx_BTHR >= 0].tolist()
    counts = dict.fromkeys(names, 0)
    for d in distances:
        label = (
            "1" if d == 1 else "2_3" if d < 4 else "4_7" if d < 8 else "8_15" if d < 16 else "16_up"
        )
        counts[f"dist_{label}"] += 1
    for name in names:
        assert float(st[name]) == pytest.approx(counts[name] / len(distances), rel=1e-6)


def test_stats_and_rows_read_are_computed_when_read_and_only_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A forward or decode step defers the routing diagnostics: nothing runs until stats or
    rows_read is read, then once, and a new forward replaces what the last one deferred."""
    attn = _moba(n_heads=4, n_kv_heads=2, block_size=16, top_k=3)
    calls = {"stats": 0, "rows": 0}
    for name, key in (("_routing_stats", "stats"), ("_routed_rows", "rows")):
        original = getattr(attn, name)

        def counted(*args: object, _f=original, _k=key) -> object:
            calls[_k] += 1
            return _f(*args)

        monkeypatch.setattr(attn, name, counted)
    x = torch.randn(1, 120, 64)
    with torch.no_grad():
        attn(x)
        attn(x)
        assert calls == {"stats": 0, "rows": 0}
        first = dict(attn.stats)
        assert calls["stats"] == 1 and attn.stats == first and calls["stats"] == 1
        cache = attn.new_cache(1, 121)
        attn.fill_cache(x, cache)
        attn(torch.randn(1, 1, 64), cache=cache)
    assert calls == {"stats": 1, "rows": 0}
    rows = cache.rows_read
    assert rows == cache.rows_read and calls["rows"] == 1
    assert set(attn.stats) == set(first) and calls["stats"] == 2
    cache.rows_read = 5
    assert cache.rows_read == 5 and calls["rows"] == 1


def test_routing_is_per_query_head() -> None:
    """Heads of one GQA group route independently: their picks differ, and the decode step reads
    the union of the group's blocks."""
    attn = _moba(n_heads=4, n_kv_heads=1, block_size=8, top_k=2)
    x = torch.randn(1, 200, 64)
    with torch.no_grad():
        q_BTHD, k_BTHD, _ = attn.project(x, 0)
        idx_BTHR, _ = route_blocks(q_BTHD, block_means(k_BTHD, 8), 8, 2)
        assert (idx_BTHR[0, 100:, 0] != idx_BTHR[0, 100:, 1]).any()
        cache = attn.new_cache(1, 200)
        attn.fill_cache(x[:, :199], cache)
        attn(x[:, 199:], cache=cache)
    distinct = idx_BTHR[0, 199].unique().numel()
    assert cache.rows_read == 24 + 8 + distinct * 8


@pytest.mark.slow
def test_tiny_moba_learns_on_stdlib_and_logs_stats(tmp_path: Path, data_cache: Path) -> None:
    params = {"block_size": 32, "top_k": 3}
    run = train_tiny_and_check_it_learns(tmp_path, data_cache, "moba", params)
    for _, label in DISTANCE_BINS:
        assert math.isfinite(run[f"metrics.attn/moba/dist_{label}"])
    assert run["metrics.attn/moba/gate_margin"] > 0
    # 16 own + 64 routed keys of t, averaged over T = 256: 0.53
    assert run["metrics.attn/density"] == pytest.approx(0.533, abs=0.01)
