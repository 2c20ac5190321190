"""The model family: hybrids from one line, GQA, tied embeddings, decoding, stats."""

from __future__ import annotations

import pytest
import torch

from sparsezoo import SparseLM, load_config
from sparsezoo.config import ConfigError
from sparsezoo.model import ShortConv, mlp_hidden_size
from sparsezoo.registry import get_mechanism

BASE = ["model.vocab_size=97", "model.d_model=32", "model.n_heads=4", "model.n_kv_heads=2"]

_NAMES = ["dense", "sliding_window", "nsa", "moba", "dsa"]
# one layer of each built-in mechanism at its sparse test preset
EVERY_MECHANISM = [
    f"model.n_layers={len(_NAMES)}",
    f"attention.layers={','.join(_NAMES)}",
    *(
        f"attention.params.{name}.{key}={value}"
        for name in _NAMES
        for key, value in get_mechanism(name).test_preset.items()
    ),
]


def _model(*overrides: str) -> SparseLM:
    torch.manual_seed(0)
    return SparseLM.from_config(load_config(None, [*BASE, *overrides])).eval()


def test_hybrid_layers_from_one_line() -> None:
    m = _model(
        "model.n_layers=4",
        "attention.layers=sliding_window*3,dense",
        "attention.params.sliding_window.window=4",
    )
    assert [a.name for a in m.mechanisms()] == ["sliding_window"] * 3 + ["dense"]
    assert all(a.params.window == 4 for a in m.mechanisms()[:3])
    logits = m(torch.randint(0, 97, (2, 40)))
    assert logits.shape == (2, 40, 97)
    stats = m.attention_stats()
    # three windowed layers at density sum(min(4, t+1))/sum(t+1) and one dense layer
    window_density = sum(min(4, t + 1) for t in range(40)) / sum(t + 1 for t in range(40))
    assert stats["attn/density"] == pytest.approx((3 * window_density + 1) / 4)
    assert m.aux_loss() is None


def test_tied_and_untied_embeddings() -> None:
    tied = _model()
    assert tied.lm_head.weight is tied.embed.weight
    untied = _model("model.tie_embeddings=false")
    assert untied.lm_head.weight is not untied.embed.weight


def test_model_decoding_equals_full_forward() -> None:
    m = _model(
        "model.n_layers=2",
        "attention.layers=sliding_window,dense",
        "attention.params.sliding_window.window=5",
    )
    ids = torch.randint(0, 97, (2, 23))
    with torch.no_grad():
        full = m(ids)
        caches = m.new_caches(2, 23)
        steps = [m(ids[:, t : t + 1], caches=caches) for t in range(23)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=2e-5, rtol=1e-4)
    assert [c.attn.rows_read for c in caches] == [5, 23]


@pytest.mark.parametrize("rope_dim", [0, 4])
def test_partial_rope_model_decodes_like_its_forward(rope_dim: int) -> None:
    """model.rope_dim reaches every mechanism (prefill, decode, NSA's compressed keys): a model
    with one layer of each built-in mechanism at its sparse test preset, rotating 4 of 8 dims
    (or none), decodes token by token exactly as its full forward; the rotation is really
    partial (another rope_dim changes the logits)."""
    m = _model(*EVERY_MECHANISM, f"model.rope_dim={rope_dim}")
    assert all(a.shape.rope_dim == rope_dim for a in m.mechanisms())
    ids = torch.randint(0, 97, (1, 70), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m(ids)
        caches = m.new_caches(1, 70)
        steps = [m(ids[:, t : t + 1], caches=caches) for t in range(70)]
        other = _model(*EVERY_MECHANISM, "model.rope_dim=2")(ids)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=5e-5, rtol=1e-4)
    # same seed, same weights: only the rotation differs (small logits at init_std 0.02)
    assert (other - full).abs().max() > 1e-5


def test_short_conv_is_causal_over_its_width_and_starts_as_the_identity() -> None:
    """A ShortConv of width 3 makes y_t from x_(t-2..t) only: a change at t0 moves y at t0,
    t0 + 1, t0 + 2 and nowhere else; with its zero init it is the identity (the model's
    _init_weights leaves it so)."""
    torch.manual_seed(0)
    conv = ShortConv(6, 3)
    x_BTC = torch.randn(2, 11, 6)
    assert torch.equal(conv(x_BTC)[0], x_BTC)
    model = _model("model.short_conv=3")
    assert all(not b.conv.weight.any() for b in model.blocks)
    torch.nn.init.normal_(conv.weight)
    bumped_BTC = x_BTC.clone()
    bumped_BTC[:, 4] += 1.0
    moved_T = (conv(bumped_BTC)[0] - conv(x_BTC)[0]).abs().amax(dim=(0, 2)) > 0
    assert moved_T.tolist() == [t in (4, 5, 6) for t in range(11)]


def test_short_conv_model_decodes_like_its_forward() -> None:
    """With model.short_conv every layer's convolution carries its last inputs across decode
    calls (LayerCache): a prefix of 9 tokens prefilled at once, then token by token, equals the
    full forward for one layer of each built-in mechanism; the convolution really acts (other
    weights change the logits)."""
    m = _model(*EVERY_MECHANISM, "model.short_conv=3")
    ids = torch.randint(0, 97, (2, 50), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for block in m.blocks:
            torch.nn.init.normal_(block.conv.weight, std=0.5)
        full = m(ids)
        caches = m.new_caches(2, 50)
        steps = [m(ids[:, :9], caches=caches)]
        steps += [m(ids[:, t : t + 1], caches=caches) for t in range(9, 50)]
        m.blocks[0].conv.weight.zero_()
        other = m(ids)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=5e-5, rtol=1e-4)
    assert (other - full).abs().max() > 1e-4


@pytest.mark.parametrize("width", [1, -1])
def test_bad_short_conv_names_the_key(width: int) -> None:
    """A convolution of one tap or a negative width is a ConfigError naming model.short_conv."""
    with pytest.raises(
        ConfigError, match=r"model\.short_conv=.*0 \(no convolution\) or a width >= 2"
    ):
        load_config(None, [*BASE, f"model.short_conv={width}"])


@pytest.mark.parametrize("rope_dim", [3, 10, -2])
def test_bad_rope_dim_names_the_key(rope_dim: int) -> None:
    """An odd rope_dim or one outside 0..head_dim (8 here) is a ConfigError naming the key."""
    with pytest.raises(
        ConfigError, match=r"model: rope_dim must be .*even integer in 0\.\.head_dim=8"
    ):
        load_config(None, [*BASE, f"model.rope_dim={rope_dim}"])


def test_mlp_width_rule() -> None:
    assert mlp_hidden_size(128, None) == 352  # 8/3 * 128 = 341.3 -> next multiple of 32
    assert mlp_hidden_size(128, 100) == 100


def test_vocab_size_must_be_known() -> None:
    with pytest.raises(ValueError, match=r"model\.vocab_size"):
        SparseLM.from_config(load_config(None, ["model.vocab_size=0"]))
