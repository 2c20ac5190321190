"""Registry: built-ins, the decorator, entry points, errors, and the public build API."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import sparsezoo
from sparsezoo import registry
from sparsezoo.mechanisms import MechanismConfigError, MechanismParams, knob
from sparsezoo.mechanisms.dense import DenseAttention


def test_builtins_listed_and_built() -> None:
    assert {"dense", "sliding_window"} <= set(sparsezoo.list_mechanisms())
    attn = sparsezoo.build_attention(
        "sliding_window", d_model=64, n_heads=4, n_kv_heads=2, window=8
    )
    y = attn(torch.randn(2, 37, 64))
    assert y.shape == (2, 37, 64)
    assert attn.shape.head_dim == 16 and attn.shape.group_size == 2


def test_unknown_name_lists_registered() -> None:
    with pytest.raises(registry.UnknownMechanismError) as info:
        registry.get_mechanism("nssa")
    msg = str(info.value)
    assert "'nssa'" in msg and "dense" in msg and "sliding_window" in msg


def test_unknown_and_out_of_range_knobs_are_named() -> None:
    with pytest.raises(MechanismConfigError, match=r"\['windw'\].*valid: \['window', 'backend'\]"):
        sparsezoo.build_attention("sliding_window", d_model=64, n_heads=4, windw=8)
    with pytest.raises(MechanismConfigError, match="window=0 is below the minimum 1"):
        sparsezoo.build_attention("sliding_window", d_model=64, n_heads=4, window=0)
    with pytest.raises(MechanismConfigError, match="window must be an integer"):
        sparsezoo.build_attention("sliding_window", d_model=64, n_heads=4, window=2.5)
    with pytest.raises(MechanismConfigError, match="backend='cuda' is not allowed"):
        sparsezoo.build_attention("sliding_window", d_model=64, n_heads=4, backend="cuda")
    with pytest.raises(MechanismConfigError, match="multiple of n_kv_heads"):
        sparsezoo.build_attention("dense", d_model=64, n_heads=4, n_kv_heads=3)


def test_float_knobs_reject_bool_and_nan() -> None:
    @dataclass
    class P(MechanismParams):
        frac: float = knob(0.5, help="a fraction", low=0.0, high=1.0)

    shape = sparsezoo.mechanisms.AttentionShape(64, 4, 4, 16)
    for bad in (True, float("nan"), "x"):
        with pytest.raises(MechanismConfigError, match="frac must be a finite number"):
            P(frac=bad).validate(shape)
    with pytest.raises(MechanismConfigError, match="above the maximum"):
        P(frac=1.5).validate(shape)
    P(frac=1).validate(shape)


def test_register_decorator_and_duplicates() -> None:
    @registry.register_mechanism("dense_copy_for_test")
    class DenseCopy(DenseAttention):
        """A renamed dense attention."""

    try:
        assert "dense_copy_for_test" in sparsezoo.list_mechanisms()
        attn = sparsezoo.build_attention("dense_copy_for_test", d_model=32, n_heads=2)
        assert isinstance(attn, DenseCopy) and attn.name == "dense_copy_for_test"
        with pytest.raises(ValueError, match="already registered"):
            registry.register_mechanism("dense_copy_for_test")(type("Other", (DenseAttention,), {}))
        with pytest.raises(ValueError, match="already registered"):
            registry.register_mechanism("dense")(DenseCopy)
        with pytest.raises(TypeError, match="AttentionMechanism subclass"):
            registry.register_mechanism("not_a_module")(int)
    finally:
        registry._registered.pop("dense_copy_for_test", None)


def test_entry_point_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A real installed-distribution layout on sys.path: importlib.metadata discovers its
    # entry_points.txt exactly as it would for a pip-installed plug-in.
    pkg = tmp_path / "zoo_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "from sparsezoo.mechanisms.dense import DenseAttention\n"
        "class PluginAttention(DenseAttention):\n    '''Plug-in dense attention.'''\n"
    )
    dist = tmp_path / "zoo_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: zoo-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[sparsezoo.mechanisms]\nplugin_dense = zoo_plugin:PluginAttention\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert "plugin_dense" in sparsezoo.list_mechanisms()
        attn = sparsezoo.build_attention("plugin_dense", d_model=32, n_heads=2)
        assert type(attn).__name__ == "PluginAttention"
        assert attn(torch.randn(1, 5, 32)).shape == (1, 5, 32)
    finally:
        registry._registered.pop("plugin_dense", None)
        sys.modules.pop("zoo_plugin", None)
