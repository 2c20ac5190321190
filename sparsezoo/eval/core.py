"""What every eval suite shares: the model at a length, batched no-grad scoring, seeds, heatmaps.

An :class:`EvalContext` holds the trained model and its config. Tasks ask it for predictions or
token losses of a batch of sequences at some length; it runs the model in eval mode under
``no_grad`` in batches of ``eval.batch_size``. Past the trained length (``model.max_seq_len``,
default ``data.seq_len``) it builds the same model with a larger ``max_seq_len`` sharing the
trained weights, and a mechanism that cannot be built or run there raises :class:`CannotRun`
with the reason, which tasks record instead of a score. Every generator is seeded from
``eval.seed`` and the cell's coordinates, so an eval is deterministic and every mechanism sees
the same sequences.

Legend: N sequences, T time, K scored positions per sequence, V vocabulary.
"""

from __future__ import annotations

import copy
import math
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.figure import Figure

from sparsezoo.config import ConfigError, ExperimentConfig, attention_shape, validate_config
from sparsezoo.model import SparseLM
from sparsezoo.train import token_losses


class CannotRun(RuntimeError):
    """The model's mechanism cannot be built or run at a length beyond its training length."""


@dataclass
class TaskResult:
    """One task's scores at a list of lengths.

    ``metrics`` are named relative to the task's prefix (``L4096/D50``); ``headline`` is the
    task's main number per length, named ``headline_name`` (``acc``, ``loss``); ``skipped`` maps
    a length the model cannot run at to the reason; ``figures`` maps a file stem to a figure.
    """

    headline_name: str
    metrics: dict[str, float] = field(default_factory=dict)
    headline: dict[int, float] = field(default_factory=dict)
    skipped: dict[int, str] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)


@dataclass
class SuiteOutput:
    """A suite's metrics (full ``eval/...`` names), figures by file stem, and skipped lengths."""

    metrics: dict[str, float] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


class EvalContext:
    """The model under evaluation, its config, and the batched scoring every task uses.

    ``val_path`` returns the held-out token file (called only by tasks that need real text);
    ``label`` names the model in plot titles.
    """

    def __init__(
        self,
        model: SparseLM,
        cfg: ExperimentConfig,
        val_path: Callable[[], Path],
        label: str,
    ) -> None:
        """Score ``model`` (on its own device) under ``cfg``'s eval settings."""
        self.model = model
        self.cfg = cfg
        self.val_path = val_path
        self.label = label
        self.trained_len = attention_shape(cfg).max_seq_len
        self.device = next(model.parameters()).device
        self._models: dict[int, SparseLM] = {}

    def model_at(self, length: int) -> SparseLM:
        """The model for sequences of ``length``: the trained one, or one built for the length.

        Past the trained length the config is revalidated with ``model.max_seq_len = length``
        and a new model takes the trained tensors themselves (no copy); :class:`CannotRun`
        says why when the mechanism rejects the length.
        """
        if length <= self.trained_len:
            return self.model
        if length not in self._models:
            cfg = copy.deepcopy(self.cfg)
            cfg.model.max_seq_len = length
            try:
                validate_config(cfg)
                model = SparseLM.from_config(cfg)
            except (ConfigError, ValueError) as exc:
                raise CannotRun(self._why(length, exc)) from exc
            model.load_state_dict(self.model.state_dict(), assign=True)
            self._models[length] = model.to(self.device).eval()
        return self._models[length]

    def _why(self, length: int, exc: BaseException) -> str:
        return (
            f"{self.label} cannot run at length {length} (trained at {self.trained_len}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        )

    def _batched(
        self,
        input_ids_NT: torch.Tensor,
        score: Callable[[SparseLM, torch.Tensor, slice], torch.Tensor],
    ) -> torch.Tensor:
        """``score(model, h_BTC, rows)`` over batches of ``eval.batch_size``, concatenated;
        ``h_BTC`` are the model's final hidden states, which ``score`` turns into the logits it
        needs (``model.lm_head``: at a few positions for predictions, not [B, T, V]).

        Only the scores stay in memory, never all the logits. Past the trained length a failing
        forward (a mechanism's length limit, running out of memory) becomes CannotRun; at
        trained lengths errors propagate, since there they are bugs.
        """
        length = input_ids_NT.shape[1]
        model = self.model_at(length)
        was_training = model.training
        model.eval()
        out = []
        try:
            with torch.no_grad():
                for start in range(0, input_ids_NT.shape[0], self.cfg.eval.batch_size):
                    rows = slice(start, start + self.cfg.eval.batch_size)
                    ids_BT = input_ids_NT[rows].to(self.device)
                    out.append(score(model, model.hidden_states(ids_BT), rows).cpu())
        except (ValueError, RuntimeError, MemoryError) as exc:
            if length <= self.trained_len:
                raise
            raise CannotRun(self._why(length, exc)) from exc
        finally:
            model.train(was_training)
        return torch.cat(out)

    def predictions(self, input_ids_NT: torch.Tensor, positions_K: Sequence[int]) -> torch.Tensor:
        """Greedy next-token predictions at ``positions_K`` of every row, LongTensor[N, K]."""
        index = torch.as_tensor(list(positions_K), device=self.device)
        return self._batched(
            input_ids_NT, lambda model, h_BTC, _: model.lm_head(h_BTC[:, index]).argmax(-1)
        )

    def losses(self, input_ids_NT: torch.Tensor, labels_NT: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every position against ``labels_NT``, FloatTensor[N, T]."""
        return self._batched(
            input_ids_NT,
            lambda model, h_BTC, rows: token_losses(
                model.lm_head(h_BTC), labels_NT[rows].to(self.device)
            ),
        )

    def seed(self, *coords: object) -> int:
        """The generator seed of one grid cell: ``eval.seed`` mixed with the cell's coordinates.

        Coordinates are hashed as text with CRC-32 (stable across processes, unlike ``hash``).
        """
        key = zlib.crc32("/".join(str(c) for c in coords).encode())
        return int(np.random.SeedSequence([self.cfg.eval.seed, key]).generate_state(1)[0])


def mean(values: Sequence[float]) -> float:
    """Arithmetic mean of a non-empty list of floats."""
    return float(sum(values) / len(values))


def heatmap(
    grid: dict[tuple[int, float], float],
    rows: Sequence[float],
    cols: Sequence[int],
    *,
    title: str,
    row_label: str,
    col_label: str,
    value_label: str,
) -> Figure:
    """An annotated accuracy heatmap: ``grid[(col, row)]`` in [0, 1], missing cells grey.

    Rows run top to bottom in the given order (e.g. needle depth 0% at the top), columns are
    context lengths; red is 0 and green is 1, the usual needle-in-a-haystack picture.
    """
    values = np.array([[grid.get((c, r), math.nan) for c in cols] for r in rows], dtype=float)
    fig = Figure(figsize=(1.6 + 1.1 * len(cols), 1.2 + 0.42 * len(rows)))
    ax = fig.add_subplot()
    # grey marks the cells the model could not run
    cmap = colormaps["RdYlGn"].with_extremes(bad="lightgrey")
    image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = values[i, j]
            ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center", va="center")
    ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), [f"{r:g}" for r in rows])
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label=value_label)
    return fig


def prefixed(prefix: str, result: TaskResult, figure_prefix: str = "") -> SuiteOutput:
    """A task's result as suite output: metric names under ``prefix``, figure stems prefixed."""
    metrics = {f"{prefix}/{name}": value for name, value in result.metrics.items()}
    skipped = {f"{prefix}/L{length}": why for length, why in result.skipped.items()}
    figures = {f"{figure_prefix}{stem}": fig for stem, fig in result.figures.items()}
    return SuiteOutput(metrics, figures, skipped)
