"""Length extrapolation: the same tasks at ``eval.extrapolation.factors`` x the training length.

Each task of ``eval.extrapolation.tasks`` (passkey, mqar, loss_by_position, with their own
settings) runs at every factor x ``data.seq_len``. The model is rebuilt with a larger
``max_seq_len`` around the trained weights (RoPE positions are computed, not tabled, so they
extend); a mechanism that cannot be built or run at a length is reported with the reason
instead of a score. Metrics: the task's own under ``eval/extrapolation/<task>/``, plus its main
number per factor, ``eval/extrapolation/<task>/x<factor>/<acc|loss>``; figures are the tasks'
own, prefixed ``extrapolation_``.
"""

from __future__ import annotations

from sparsezoo.config import extrapolation_lengths
from sparsezoo.eval.core import EvalContext, SuiteOutput, prefixed
from sparsezoo.eval.loss_by_position import loss_by_position_task
from sparsezoo.eval.mqar import mqar_task
from sparsezoo.eval.passkey import passkey_task

NAME = "extrapolation"
TASKS = {"passkey": passkey_task, "mqar": mqar_task, "loss_by_position": loss_by_position_task}


def run(ctx: EvalContext) -> SuiteOutput:
    """Every extrapolation task at every factor x the training length."""
    lengths = extrapolation_lengths(ctx.cfg)
    out = SuiteOutput()
    for task in ctx.cfg.eval.extrapolation.tasks:
        prefix = f"eval/{NAME}/{task}"
        result = TASKS[task](ctx, lengths)
        part = prefixed(prefix, result, figure_prefix=f"{NAME}_")
        for factor, length in zip(ctx.cfg.eval.extrapolation.factors, lengths, strict=True):
            if length in result.headline:
                part.metrics[f"{prefix}/x{factor}/{result.headline_name}"] = result.headline[length]
        out.metrics |= part.metrics
        out.figures |= part.figures
        out.skipped |= part.skipped
    return out
