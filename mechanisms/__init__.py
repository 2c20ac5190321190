"""Attention mechanisms (``sparsezoo.mechanisms``): one module per mechanism plus the contract.

Mechanisms import kernels and their own contract (:mod:`.base`), never the platform core; the
core finds them through its registry.
"""

from .base import (
    AttentionMechanism,
    AttentionShape,
    Cost,
    KnobInfo,
    KVCache,
    MechanismConfigError,
    MechanismParams,
    QKVAttention,
    knob,
)

__all__ = [
    "AttentionMechanism",
    "AttentionShape",
    "Cost",
    "KVCache",
    "KnobInfo",
    "MechanismConfigError",
    "MechanismParams",
    "QKVAttention",
    "knob",
]
