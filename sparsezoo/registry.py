"""The mechanism registry: attention mechanisms by name.

Built-ins are registered by import path and imported on first use, so listing names costs
nothing. Users register classes with :func:`register_mechanism`; third-party packages expose them
through the ``sparsezoo.mechanisms`` entry-point group (``name = "pkg.module:Class"``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, TypeVar

from sparsezoo.mechanisms.base import AttentionMechanism, AttentionShape

ENTRY_POINT_GROUP = "sparsezoo.mechanisms"

_BUILTINS: dict[str, str] = {
    "dense": "sparsezoo.mechanisms.dense:DenseAttention",
    "dsa": "sparsezoo.mechanisms.dsa:DeepSeekSparseAttention",
    "moba": "sparsezoo.mechanisms.moba:MixtureOfBlockAttention",
    "nsa": "sparsezoo.mechanisms.nsa:NativeSparseAttention",
    "sliding_window": "sparsezoo.mechanisms.sliding_window:SlidingWindowAttention",
}
_registered: dict[str, type[AttentionMechanism]] = {}

M = TypeVar("M", bound=type[AttentionMechanism])


class UnknownMechanismError(KeyError):
    """Raised for a mechanism name that is not registered; the message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0])


def _entry_point_targets() -> dict[str, str]:
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def register_mechanism(name: str) -> Callable[[M], M]:
    """Class decorator registering an :class:`AttentionMechanism` subclass under ``name``.

    Re-registering a name with a different class is an error so a plug-in cannot silently
    shadow a built-in.
    """

    def decorator(cls: M) -> M:
        if not (isinstance(cls, type) and issubclass(cls, AttentionMechanism)):
            raise TypeError(f"register_mechanism({name!r}) needs an AttentionMechanism subclass")
        known = _registered.get(name)
        if name in _BUILTINS or (known is not None and known is not cls):
            raise ValueError(f"mechanism name {name!r} is already registered")
        cls.name = name
        _registered[name] = cls
        return cls

    return decorator


def list_mechanisms() -> list[str]:
    """Names of all registered mechanisms (built-ins, decorated classes, entry points), sorted."""
    return sorted({*_BUILTINS, *_registered, *_entry_point_targets()})


def _load(target: str) -> type[AttentionMechanism]:
    module_name, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module_name), attr)
    if not (isinstance(cls, type) and issubclass(cls, AttentionMechanism)):
        raise TypeError(f"{target} is not an AttentionMechanism subclass")
    return cls


def get_mechanism(name: str) -> type[AttentionMechanism]:
    """Return the mechanism class registered as ``name``.

    Raises UnknownMechanismError listing the registered names when ``name`` is unknown.
    """
    if name in _registered:
        return _registered[name]
    target = _BUILTINS.get(name) or _entry_point_targets().get(name)
    if target is None:
        raise UnknownMechanismError(
            f"unknown attention mechanism {name!r}; registered: {', '.join(list_mechanisms())}"
        )
    cls = _load(target)
    cls.name = name
    _registered[name] = cls
    return cls


def build_attention(
    name: str,
    *,
    d_model: int,
    n_heads: int,
    n_kv_heads: int | None = None,
    head_dim: int | None = None,
    max_seq_len: int = 2048,
    rope_theta: float = 10000.0,
    rope_dim: int | None = None,
    **params: Any,
) -> AttentionMechanism:
    """Build the attention module registered as ``name`` for the given shape and knobs.

    ``n_kv_heads`` defaults to ``n_heads`` (multi-head) and ``head_dim`` to d_model // n_heads.
    Unknown knobs and values outside their ranges raise errors naming the knob. Calling the
    module on x of shape (B, T, d_model) returns (B, T, d_model), causal.
    """
    cls = get_mechanism(name)
    shape = AttentionShape(
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_heads if n_kv_heads is None else n_kv_heads,
        head_dim=head_dim if head_dim is not None else d_model // n_heads,
        max_seq_len=max_seq_len,
        rope_theta=rope_theta,
        rope_dim=rope_dim,
    )
    return cls(shape, cls.Params.from_dict(params))
