"""sparsezoo: a comparative sparse-attention experimentation platform.

Public, stable API:

- :func:`list_mechanisms`, :func:`build_attention`, :func:`register_mechanism` — the registry;
- :class:`SparseLM` — the model family (``SparseLM.from_config(cfg)``);
- :func:`load_config` — experiment configs from YAML plus ``key=value`` overrides.

Kernels live under ``sparsezoo.kernels.<mechanism>``, mechanisms under ``sparsezoo.mechanisms``,
and the conformance suite under ``sparsezoo.testing``.
"""

from sparsezoo.config import ExperimentConfig, load_config
from sparsezoo.model import SparseLM
from sparsezoo.registry import build_attention, get_mechanism, list_mechanisms, register_mechanism

__all__ = [
    "ExperimentConfig",
    "SparseLM",
    "build_attention",
    "get_mechanism",
    "list_mechanisms",
    "load_config",
    "register_mechanism",
]
__version__ = "0.1.0"
