"""Multi-process training: which process owns the run, and the Lightning strategy to use.

Lightning's ``ddp`` strategy starts the extra processes of a node by re-running the command
line (its subprocess launcher), and on other nodes the user starts the same command. Every one
of those processes calls :func:`sparsezoo.train.train`, but only the launcher process (global
rank 0) may create the MLflow run, write the run record and mark the run's final status: the
others train, take part in gradient all-reduce and log nothing. They find the run's name (and
so its directory) in ``SPARSEZOO_RUN_NAME``, which the launcher sets before starting them; on
other nodes give ``run_name=...`` explicitly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from sparsezoo.config import ConfigError, ExperimentConfig, parse_layer_spec
from sparsezoo.mechanisms.base import AttentionMechanism
from sparsezoo.registry import get_mechanism

RUN_NAME_ENV = "SPARSEZOO_RUN_NAME"
# what launchers set in every process they start: torchrun / Lightning (RANK, LOCAL_RANK),
# multi-node Lightning (NODE_RANK), SLURM (SLURM_PROCID)
_RANK_VARS = ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")


def is_launcher_process() -> bool:
    """True in the process that owns the run: not distributed, or global rank 0."""
    return all(int(os.environ.get(var, "0") or 0) == 0 for var in _RANK_VARS)


def world_size(cfg: ExperimentConfig) -> int:
    """Processes one training run uses: devices per node times nodes."""
    return cfg.train.devices * cfg.train.num_nodes


def resolve_strategy(cfg: ExperimentConfig) -> str:
    """The Lightning strategy name for a run.

    ``ddp`` becomes ``ddp_find_unused_parameters_true`` when a layer's mechanism has training
    phases that freeze parameters (DSA's indexer warm-up): DDP must then expect parameters
    without gradients in some steps. ``fsdp`` with ``accelerator=auto`` on a machine without
    CUDA is a ConfigError here rather than a Lightning error after the run was created.
    """
    strategy = cfg.train.strategy
    if strategy == "fsdp" and cfg.train.accelerator == "auto" and not torch.cuda.is_available():
        raise ConfigError(
            "train.strategy=fsdp needs CUDA devices and none is available here; "
            "use train.strategy=ddp on CPU"
        )
    if strategy != "ddp":
        return strategy
    names = parse_layer_spec(cfg.attention.layers, cfg.attention.mechanism, cfg.model.n_layers)
    phased = any(
        get_mechanism(name).phase_trainable_parameters
        is not AttentionMechanism.phase_trainable_parameters
        for name in set(names)
    )
    return "ddp_find_unused_parameters_true" if phased else strategy


@contextmanager
def shared_run_name(cfg: ExperimentConfig) -> Iterator[None]:
    """Publish the run name to the processes the launcher starts while the block runs."""
    if world_size(cfg) == 1:
        yield
        return
    previous = os.environ.get(RUN_NAME_ENV)
    os.environ[RUN_NAME_ENV] = str(cfg.run_name)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(RUN_NAME_ENV, None)
        else:
            os.environ[RUN_NAME_ENV] = previous
