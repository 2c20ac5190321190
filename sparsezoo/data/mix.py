"""Training data that mixes real text windows with synthetic passkey-retrieval rows.

A model learns long-range retrieval only if its training asks for it: `PasskeyMix` replaces a
fixed fraction of a text dataset's rows by passkey sequences (see `sparsezoo.data.synthetic`)
of the same length, whose labels are the passkey answer alone. Which rows are synthetic, and
what they contain, depends on (seed, index) only, so the mix is as deterministic and resumable
as the text windows it wraps.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from sparsezoo.data.dataset import TokenWindows
from sparsezoo.data.synthetic import PasskeySpec, make_passkey


class PasskeyMix(Dataset):
    """`windows` with every row ``i`` where ``floor((i + 1) * fraction) > floor(i * fraction)``
    replaced by a passkey row.

    That rule makes every prefix of the stream hold ``floor(n * fraction)`` synthetic rows,
    spread evenly, so each batch carries about the same share. A synthetic row has its needle at
    a depth drawn uniformly from [0, 1], except for a share `near` of them whose distance from
    the needle to the query is drawn log-uniformly from [1, filler length]: a needle a few
    tokens back gives a strong gradient to the retrieval path before it has formed, while a
    uniform depth mostly asks for the whole context. A share `edges` of them (drawn first) puts
    the needle at depth 0 or 1, half each: the first tokens of the row or right before the
    query, two positions a continuous depth almost never draws but a depth grid scores (0% and
    100%). Digits and filler are ids below
    `vocab_size`; everything is seeded with ``[seed, i]``. Items are ``{"input_ids", "labels"}``
    like the text windows, with `IGNORE_INDEX` labels everywhere but the answer.
    """

    def __init__(
        self,
        windows: TokenWindows,
        fraction: float,
        vocab_size: int,
        passkey_len: int,
        seed: int,
        near: float = 0.0,
        distinct: bool = False,
        edges: float = 0.0,
    ) -> None:
        """Wrap `windows`; the passkey rows have the windows' length and `passkey_len` digits
        (all different with `distinct`, see `PasskeySpec`)."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        if not 0.0 <= near <= 1.0:
            raise ValueError(f"near must be in [0, 1], got {near}")
        if not 0.0 <= edges <= 1.0:
            raise ValueError(f"edges must be in [0, 1], got {edges}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        # validates vocab_size, seq_len and passkey_len once, before any row is drawn
        PasskeySpec(vocab_size, windows.seq_len, 0.0, passkey_len, distinct)
        self.windows = windows
        self.fraction = fraction
        self.vocab_size = vocab_size
        self.passkey_len = passkey_len
        self.seed = seed
        self.near = near
        self.distinct = distinct
        self.edges = edges

    def __len__(self) -> int:
        """As many rows as the wrapped windows."""
        return len(self.windows)

    def is_passkey(self, index: int) -> bool:
        """Whether row `index` is a synthetic passkey row."""
        return math.floor((index + 1) * self.fraction) > math.floor(index * self.fraction)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """Row `index`: the text window, or a passkey sequence of the same length."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        if not self.is_passkey(index):
            return self.windows[index]
        rng = np.random.default_rng([self.seed, index])
        spec = PasskeySpec(
            self.vocab_size, self.windows.seq_len, 0.0, self.passkey_len, self.distinct
        )
        if self.edges > 0 and rng.uniform() < self.edges:
            spec.depth = float(rng.integers(2))
        elif rng.uniform() < self.near:
            distance = math.expm1(rng.uniform(0.0, math.log1p(spec.n_filler)))
            spec.depth = 1.0 - distance / max(1, spec.n_filler)
        else:
            spec.depth = float(rng.uniform())
        row = make_passkey(spec, 1, int(rng.integers(2**62)))
        return {"input_ids": row.input_ids[0], "labels": row.labels[0]}
