"""Training steps in phases of different row lengths (a length curriculum).

Retrieval circuits form in far fewer (and far cheaper) steps on short rows, where a needle is a
few dozen keys away instead of thousands: `PhasedBatches` serves whole training steps, phase
after phase, each phase with its own rows (text windows, passkey mix) and batch size. Item ``s``
is step ``start + s`` as one collated batch, so a DataLoader with ``batch_size=None`` yields
batches whose shape changes at phase boundaries, and a resumed run continues at its step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Dataset


@dataclass(frozen=True)
class Phase:
    """`steps` training steps, each of ``rows_per_step`` consecutive rows of `rows` from row
    ``first_row`` on (the rows of all processes of a step; a process takes its share)."""

    rows: Dataset
    steps: int
    rows_per_step: int
    first_row: int = 0


class PhasedBatches(Dataset):
    """Step ``start + s`` of the phases, as the batch of process `rank` of `world`.

    Within a step of R rows, process r takes rows r, r + world, r + 2 * world, ... (what a
    non-shuffling DistributedSampler deals out), so one process with the global batch sees the
    same rows per step as `world` processes together. Items are ``{"input_ids", "labels"}``
    LongTensors of shape [rows_per_step / world, seq_len of the phase].
    """

    def __init__(
        self, phases: Sequence[Phase], start: int = 0, rank: int = 0, world: int = 1
    ) -> None:
        """Serve the steps from `start` on (a resumed run's global step)."""
        if not phases:
            raise ValueError("phases must not be empty")
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world={world}), got {rank}")
        for i, phase in enumerate(phases):
            if phase.steps < 1:
                raise ValueError(f"phase {i}: steps must be >= 1, got {phase.steps}")
            if phase.rows_per_step < world or phase.rows_per_step % world:
                raise ValueError(
                    f"phase {i}: rows_per_step={phase.rows_per_step} must be a positive "
                    f"multiple of world={world}"
                )
            last = phase.first_row + phase.steps * phase.rows_per_step
            if phase.first_row < 0 or last > len(phase.rows):
                raise ValueError(
                    f"phase {i}: rows {phase.first_row}..{last} exceed its {len(phase.rows)} rows"
                )
        total = sum(phase.steps for phase in phases)
        if not 0 <= start < total:
            raise ValueError(f"start must be in [0, {total}) (the phases' steps), got {start}")
        self.phases = list(phases)
        self.start, self.rank, self.world = start, rank, world
        self.total_steps = total

    def __len__(self) -> int:
        """The steps left from `start`."""
        return self.total_steps - self.start

    def locate(self, step: int) -> tuple[int, int]:
        """(phase index, step within that phase) of global training step `step`."""
        for i, phase in enumerate(self.phases):
            if step < phase.steps:
                return i, step
            step -= phase.steps
        raise IndexError(f"step beyond the phases' {self.total_steps} steps")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """This process's rows of step ``start + index``, stacked."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} steps")
        i, step = self.locate(self.start + index)
        phase = self.phases[i]
        first = phase.first_row + step * phase.rows_per_step + self.rank
        items = [
            phase.rows[r] for r in range(first, first + phase.rows_per_step - self.rank, self.world)
        ]
        return {key: torch.stack([item[key] for item in items]) for key in items[0]}
