"""Loss by position: does quality hold far into the context?

``eval.loss_by_position.samples`` seeded windows of held-out text (the run's validation split)
per length; the mean next-token loss of each of ``buckets`` equal position ranges. Metrics
(relative to the suite's prefix): ``L<len>/P<start>`` per bucket (positions start ..
start + len/buckets), ``L<len>/loss`` per length and ``loss`` over all lengths; the figure plots
loss against position, one line per length, with the training length marked.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from matplotlib.figure import Figure

from sparsezoo.config import eval_lengths
from sparsezoo.data.dataset import TokenWindows
from sparsezoo.eval.core import CannotRun, EvalContext, SuiteOutput, TaskResult, mean, prefixed

NAME = "loss_by_position"


def loss_by_position_task(ctx: EvalContext, lengths: Sequence[int]) -> TaskResult:
    """Mean token loss per position bucket at ``lengths`` with ``eval.loss_by_position``."""
    settings, result = ctx.cfg.eval.loss_by_position, TaskResult("loss")
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for length in lengths:
        windows = TokenWindows(ctx.val_path(), length, settings.samples, ctx.seed(NAME, length))
        rows = [windows[i] for i in range(len(windows))]
        input_ids_NT = _stack(rows, "input_ids")
        try:
            losses_NT = ctx.losses(input_ids_NT, _stack(rows, "labels"))
        except CannotRun as exc:
            result.skipped[length] = str(exc)
            continue
        edges = [length * b // settings.buckets for b in range(settings.buckets + 1)]
        bucket_losses = [float(losses_NT[:, lo:hi].mean()) for lo, hi in itertools.pairwise(edges)]
        for lo, value in zip(edges, bucket_losses, strict=False):
            result.metrics[f"L{length}/P{lo}"] = value
        result.headline[length] = float(losses_NT.mean())
        result.metrics[f"L{length}/loss"] = result.headline[length]
        centers = [(lo + hi) / 2 for lo, hi in itertools.pairwise(edges)]
        ax.plot(centers, bucket_losses, marker="o", label=f"length {length}")
    if result.headline:
        result.metrics["loss"] = mean(list(result.headline.values()))
    ax.axvline(ctx.trained_len, color="grey", linestyle="--", label="trained length")
    ax.set_xlabel("position in the context")
    ax.set_ylabel("mean next-token loss (held-out text)")
    ax.set_title(f"loss by position — {ctx.label}")
    ax.legend()
    result.figures["loss_by_position"] = fig
    return result


def _stack(rows: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    """One field of the dataset items as a batch, LongTensor[N, T]."""
    return torch.stack([row[key] for row in rows])


def run(ctx: EvalContext) -> SuiteOutput:
    """The loss-by-position suite at ``eval.loss_by_position.lengths`` (default: training)."""
    return prefixed(f"eval/{NAME}", loss_by_position_task(ctx, eval_lengths(ctx.cfg, NAME)))
