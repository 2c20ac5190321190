"""Passkey retrieval (needle in a haystack): accuracy over context length x needle depth.

Each cell (length L, depth D percent of the filler) scores ``eval.passkey.samples`` seeded
passkey sequences (``sparsezoo.data.synthetic``; distinct digits with
``data.passkey_distinct``, as in training) by exact match: the model's greedy predictions
at the answer positions, given the true preceding tokens, must equal every passkey digit.
Metrics (relative to the suite's prefix): ``L<len>/D<depth>`` per cell, ``L<len>/acc`` per
length, ``acc`` over all cells and ``min_acc`` (the worst cell: "at every depth" targets);
``L<len>/digit_acc`` and ``digit_acc``, the share of answer digits predicted right: a needle
never found gets about none right, a copy that slips on some steps most of them, which exact
match alone does not tell apart. The figure is the depth x length heatmap.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparsezoo.config import eval_lengths
from sparsezoo.data.synthetic import PasskeySpec, exact_match, make_passkey, token_accuracy
from sparsezoo.eval.core import (
    CannotRun,
    EvalContext,
    SuiteOutput,
    TaskResult,
    heatmap,
    mean,
    prefixed,
)

NAME = "passkey"


def passkey_task(ctx: EvalContext, lengths: Sequence[int]) -> TaskResult:
    """Score the passkey grid at ``lengths`` with the depths and samples of ``eval.passkey``."""
    settings, result = ctx.cfg.eval.passkey, TaskResult("acc")
    vocab, digits = ctx.cfg.model.vocab_size, ctx.cfg.data.passkey_len
    distinct = ctx.cfg.data.passkey_distinct
    grid: dict[tuple[int, float], float] = {}
    digit_acc: dict[int, float] = {}
    for length in lengths:
        batches = [
            make_passkey(
                PasskeySpec(vocab, length, depth / 100, digits, distinct),
                settings.samples,
                ctx.seed(NAME, length, depth),
            )
            for depth in settings.depths
        ]
        first = batches[0].answer_start - 1  # the same answer positions at every depth
        try:
            pred_NK = ctx.predictions(
                torch.cat([b.input_ids for b in batches]), range(first, length - 1)
            )
        except CannotRun as exc:
            result.skipped[length] = str(exc)
            continue
        answers_NK = torch.cat([b.answer_ids for b in batches])
        hits_N = exact_match(pred_NK, answers_NK).float().view(len(batches), -1)
        digit_acc[length] = float(token_accuracy(pred_NK, answers_NK).mean())
        result.metrics[f"L{length}/digit_acc"] = digit_acc[length]
        for depth, hits in zip(settings.depths, hits_N, strict=True):
            grid[(length, depth)] = float(hits.mean())
            result.metrics[f"L{length}/D{depth:g}"] = grid[(length, depth)]
        result.headline[length] = mean([grid[(length, d)] for d in settings.depths])
        result.metrics[f"L{length}/acc"] = result.headline[length]
    if grid:
        result.metrics["acc"] = mean(list(grid.values()))
        result.metrics["min_acc"] = min(grid.values())
        # every length scores the same number of passkeys: the mean of the means is exact
        result.metrics["digit_acc"] = mean(list(digit_acc.values()))
    result.figures["passkey_heatmap"] = heatmap(
        grid,
        settings.depths,
        lengths,
        title=f"passkey exact match — {ctx.label}",
        row_label="needle depth (% of context)",
        col_label="context length",
        value_label="accuracy",
    )
    return result


def run(ctx: EvalContext) -> SuiteOutput:
    """The passkey suite at ``eval.passkey.lengths`` (default: the training length)."""
    return prefixed(f"eval/{NAME}", passkey_task(ctx, eval_lengths(ctx.cfg, NAME)))
