"""Multi-query associative recall: accuracy by number of key-value pairs and by sequence length.

Each cell (length L, P pairs) scores ``eval.mqar.samples`` seeded MQAR sequences
(``sparsezoo.data.synthetic``): P key-value pairs open the sequence, noise fills it, and the
last 2P tokens query every key; a query is right when the greedy prediction after the key is
its value. The pairs sit at the start and the queries at the end, so at lengths past a sparse
mechanism's window recall needs its long-range path. Metrics (relative to the suite's prefix):
``L<len>/KV<pairs>`` per cell (fraction of queries right), ``L<len>/acc`` per length,
``KV<pairs>/acc`` per pair count and ``acc`` overall; the figure is the pairs x length heatmap.
"""

from __future__ import annotations

from collections.abc import Sequence

from sparsezoo.config import eval_lengths
from sparsezoo.data.synthetic import MQARSpec, make_mqar, token_accuracy
from sparsezoo.eval.core import (
    CannotRun,
    EvalContext,
    SuiteOutput,
    TaskResult,
    heatmap,
    mean,
    prefixed,
)

NAME = "mqar"


def mqar_task(ctx: EvalContext, lengths: Sequence[int]) -> TaskResult:
    """Score the MQAR grid at ``lengths`` with the pair counts and samples of ``eval.mqar``."""
    settings, result = ctx.cfg.eval.mqar, TaskResult("acc")
    grid: dict[tuple[int, float], float] = {}
    for length in lengths:
        for pairs in settings.n_pairs:
            spec = MQARSpec(ctx.cfg.model.vocab_size, length, pairs)
            batch = make_mqar(spec, settings.samples, ctx.seed(NAME, length, pairs))
            # every row has its queries at the same positions, the last 2 * pairs tokens
            positions = batch.answer_mask[0].nonzero().flatten().tolist()
            try:
                pred_NK = ctx.predictions(batch.input_ids, positions)
            except CannotRun as exc:
                result.skipped[length] = str(exc)
                break
            grid[(length, pairs)] = float(token_accuracy(pred_NK, batch.answer_ids).mean())
            result.metrics[f"L{length}/KV{pairs}"] = grid[(length, pairs)]
        if length not in result.skipped:
            result.headline[length] = mean([grid[(length, p)] for p in settings.n_pairs])
            result.metrics[f"L{length}/acc"] = result.headline[length]
    for pairs in settings.n_pairs:
        scores = [grid[(n, pairs)] for n in lengths if (n, pairs) in grid]
        if scores:
            result.metrics[f"KV{pairs}/acc"] = mean(scores)
    if grid:
        result.metrics["acc"] = mean(list(grid.values()))
    result.figures["mqar_heatmap"] = heatmap(
        grid,
        settings.n_pairs,
        lengths,
        title=f"MQAR recall — {ctx.label}",
        row_label="key-value pairs",
        col_label="sequence length",
        value_label="fraction of queries right",
    )
    return result


def run(ctx: EvalContext) -> SuiteOutput:
    """The MQAR suite at ``eval.mqar.lengths`` (default: the training length)."""
    return prefixed(f"eval/{NAME}", mqar_task(ctx, eval_lengths(ctx.cfg, NAME)))
