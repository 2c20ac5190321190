"""Seeded long-context probe tasks (MQAR, passkey retrieval) and exact-match scorers.

Tasks work on token ids directly, so they need no tokenizer and run with any vocabulary size.
Ids below `N_RESERVED` are never keys, values, digits or filler: `PAD_ID` is left for callers that
pad batches, the others mark the passkey needle and query. Labels follow the usual next-token
convention: ``labels[t]`` is the target for the prediction made at position ``t`` and
`IGNORE_INDEX` everywhere that is not an answer, so ``cross_entropy(logits, labels)`` trains on
answers only.

Layouts (one row, T = seq_len):
    MQAR     k1 v1 k2 v2 ... kP vP | noise ... | kq1 vq1 ... kqQ vqQ     (label at kqi = vqi)
    passkey  filler ... | NEEDLE_MARKER d1..dK | filler ... | QUERY_MARKER d1..dK
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

IGNORE_INDEX = -100
PAD_ID = 0
NEEDLE_MARKER = (1, 2)
QUERY_MARKER = 3
N_RESERVED = 4
N_DIGITS = 10
_DIGIT_LO = N_RESERVED
_FILLER_LO = N_RESERVED + N_DIGITS


@dataclass
class MQARSpec:
    """Shape of a multi-query associative recall task (Arora et al., "Zoology").

    `n_pairs` key/value pairs open each sequence; the last ``2 * n_queries`` tokens repeat
    `n_queries` distinct keys, each followed by its value. Keys come from the lower half of the ids
    at or above `N_RESERVED` and are distinct within a sequence; values and noise come from the
    upper half, so a key only ever appears in its pair and its query. `n_queries` defaults to
    `n_pairs`. Validated on construction.
    """

    vocab_size: int
    seq_len: int
    n_pairs: int
    n_queries: int | None = None

    def __post_init__(self) -> None:
        """Resolve the `n_queries` default and validate the spec."""
        if self.n_queries is None:
            self.n_queries = self.n_pairs
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first field that makes the task impossible."""
        if self.n_pairs < 1:
            raise ValueError(f"n_pairs must be >= 1, got {self.n_pairs}")
        if not 1 <= self.n_queries <= self.n_pairs:
            raise ValueError(
                f"n_queries must be in [1, n_pairs={self.n_pairs}] (queries are distinct keys), "
                f"got {self.n_queries}"
            )
        needed = 2 * self.n_pairs + 2 * self.n_queries
        if self.seq_len < needed:
            raise ValueError(
                f"seq_len must be >= 2 * n_pairs + 2 * n_queries = {needed}, got {self.seq_len}"
            )
        min_vocab = N_RESERVED + 2 * self.n_pairs
        if self.vocab_size < min_vocab:
            raise ValueError(
                f"vocab_size must be >= {N_RESERVED} reserved + 2 * n_pairs = {min_vocab} so each "
                f"sequence has {self.n_pairs} distinct keys, got {self.vocab_size}"
            )


@dataclass(frozen=True)
class MQARBatch:
    """A batch of MQAR sequences.

    `input_ids` and `labels` are LongTensor[n, seq_len]; `labels` is `IGNORE_INDEX` except at the
    query-key positions, where it is the paired value; `answer_mask` is BoolTensor[n, seq_len],
    true exactly there.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    answer_mask: torch.Tensor

    @property
    def answer_ids(self) -> torch.Tensor:
        """Expected values as LongTensor[n, n_queries], in query order (for the scorers)."""
        return self.labels[self.answer_mask].view(self.labels.shape[0], -1)


def make_mqar(spec: MQARSpec, n: int, seed: int) -> MQARBatch:
    """Generate `n` MQAR sequences; the same (spec, n, seed) always gives identical tensors."""
    spec.validate()  # the spec is mutable, so it may have changed since construction
    _check_count_and_seed(n, seed)
    rng = np.random.default_rng(seed)
    vocab, seq_len, n_pairs, n_queries = spec.vocab_size, spec.seq_len, spec.n_pairs, spec.n_queries
    n_keys = (vocab - N_RESERVED) // 2
    value_lo = N_RESERVED + n_keys

    keys = np.stack([rng.choice(n_keys, size=n_pairs, replace=False) for _ in range(n)])
    keys += N_RESERVED
    values = rng.integers(value_lo, vocab, size=(n, n_pairs))
    queried = np.stack([rng.permutation(n_pairs)[:n_queries] for _ in range(n)])
    query_keys = np.take_along_axis(keys, queried, axis=1)
    query_values = np.take_along_axis(values, queried, axis=1)

    # Noise shares the value range, so it never contains a key and cannot create a false pair.
    ids = rng.integers(value_lo, vocab, size=(n, seq_len))
    ids[:, 0 : 2 * n_pairs : 2] = keys
    ids[:, 1 : 2 * n_pairs : 2] = values
    query_start = seq_len - 2 * n_queries
    ids[:, query_start::2] = query_keys
    ids[:, query_start + 1 :: 2] = query_values

    labels = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int64)
    labels[:, query_start::2] = query_values
    input_ids = torch.from_numpy(ids.astype(np.int64))
    labels_t = torch.from_numpy(labels)
    return MQARBatch(input_ids=input_ids, labels=labels_t, answer_mask=labels_t != IGNORE_INDEX)


@dataclass
class PasskeySpec:
    """Shape of a passkey-retrieval task.

    A needle (`NEEDLE_MARKER` then `passkey_len` digit tokens) sits at fraction `depth` of the
    filler (0 = first token, 1 = just before the query); the sequence ends with `QUERY_MARKER`
    and the passkey again, which the model must copy. Digits are `N_DIGITS` ids right after the
    reserved ones; filler is uniform over the remaining ids. With `distinct` the digits of a
    passkey are all different (``passkey_len <= N_DIGITS``): each answer digit then follows a
    unique needle digit, so copying needs no disambiguation of repeated digits, only the
    retrieval of the needle. Validated on construction.
    """

    vocab_size: int
    seq_len: int
    depth: float
    passkey_len: int = 5
    distinct: bool = False

    def __post_init__(self) -> None:
        """Validate the spec."""
        self.validate()

    @property
    def n_filler(self) -> int:
        """Number of filler tokens per sequence (everything but needle and query)."""
        return self.seq_len - (len(NEEDLE_MARKER) + 1 + 2 * self.passkey_len)

    def validate(self) -> None:
        """Raise ValueError naming the first field that makes the task impossible."""
        if self.passkey_len < 1:
            raise ValueError(f"passkey_len must be >= 1, got {self.passkey_len}")
        if self.distinct and self.passkey_len > N_DIGITS:
            raise ValueError(
                f"passkey_len must be <= {N_DIGITS} with distinct digits, got {self.passkey_len}"
            )
        if not (math.isfinite(self.depth) and 0.0 <= self.depth <= 1.0):
            raise ValueError(f"depth must be in [0, 1], got {self.depth}")
        if self.n_filler < 0:
            needed = self.seq_len - self.n_filler
            raise ValueError(
                f"seq_len must be >= {needed} (needle marker {len(NEEDLE_MARKER)} + query marker 1 "
                f"+ 2 * passkey_len {self.passkey_len}), got {self.seq_len}"
            )
        min_vocab = _FILLER_LO + 1
        if self.vocab_size < min_vocab:
            raise ValueError(
                f"vocab_size must be >= {min_vocab} ({N_RESERVED} reserved + {N_DIGITS} digits + "
                f"at least 1 filler id), got {self.vocab_size}"
            )


@dataclass(frozen=True)
class PasskeyBatch:
    """A batch of passkey sequences.

    `input_ids`/`labels` are LongTensor[n, seq_len]; the passkey occupies the last `passkey_len`
    positions starting at `answer_start`, and `labels` holds it at the positions that predict it
    (``answer_start - 1`` onwards), `IGNORE_INDEX` elsewhere. `answer_ids` is LongTensor[n,
    passkey_len]; `needle_start` is the index of the needle's first marker token.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    answer_start: int
    answer_ids: torch.Tensor
    needle_start: int


def make_passkey(spec: PasskeySpec, n: int, seed: int) -> PasskeyBatch:
    """Generate `n` passkey sequences; the same (spec, n, seed) always gives identical tensors."""
    spec.validate()  # the spec is mutable, so it may have changed since construction
    _check_count_and_seed(n, seed)
    rng = np.random.default_rng(seed)
    k = spec.passkey_len
    if spec.distinct:
        passkeys = _DIGIT_LO + rng.permuted(np.tile(np.arange(N_DIGITS), (n, 1)), axis=1)[:, :k]
    else:
        passkeys = rng.integers(_DIGIT_LO, _DIGIT_LO + N_DIGITS, size=(n, k))
    filler = rng.integers(_FILLER_LO, spec.vocab_size, size=(n, spec.n_filler))

    needle_start = round(spec.depth * spec.n_filler)
    markers = np.broadcast_to(np.asarray(NEEDLE_MARKER), (n, len(NEEDLE_MARKER)))
    query = np.full((n, 1), QUERY_MARKER)
    ids = np.concatenate(
        [filler[:, :needle_start], markers, passkeys, filler[:, needle_start:], query, passkeys],
        axis=1,
    ).astype(np.int64)

    answer_start = spec.seq_len - k
    labels = np.full_like(ids, IGNORE_INDEX)
    labels[:, answer_start - 1 : spec.seq_len - 1] = passkeys
    return PasskeyBatch(
        input_ids=torch.from_numpy(ids),
        labels=torch.from_numpy(labels),
        answer_start=answer_start,
        answer_ids=torch.from_numpy(passkeys.astype(np.int64)),
        needle_start=needle_start,
    )


def exact_match(pred_ids: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """BoolTensor[n]: true where every predicted answer token equals the expected one.

    Both arguments are integer tensors of shape [n, answer_len] (e.g. the argmax of the logits at
    the label positions, and a batch's `answer_ids`).
    """
    _check_answer_shapes(pred_ids, answer_ids)
    return (pred_ids == answer_ids).all(dim=1)


def token_accuracy(pred_ids: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    """FloatTensor[n]: fraction of answer tokens predicted exactly, per sample.

    Same inputs as `exact_match`; gives partial credit where `exact_match` gives none.
    """
    _check_answer_shapes(pred_ids, answer_ids)
    return (pred_ids == answer_ids).float().mean(dim=1)


def _check_answer_shapes(pred_ids: torch.Tensor, answer_ids: torch.Tensor) -> None:
    """Scorers compare position by position, so shapes must agree exactly."""
    if pred_ids.shape != answer_ids.shape:
        raise ValueError(
            f"pred_ids shape {tuple(pred_ids.shape)} must equal answer_ids shape "
            f"{tuple(answer_ids.shape)}"
        )
    if answer_ids.dim() != 2 or answer_ids.shape[1] == 0:
        raise ValueError(
            f"answer ids must have shape [n, answer_len] with answer_len >= 1, "
            f"got {tuple(answer_ids.shape)}"
        )


def _check_count_and_seed(n: int, seed: int) -> None:
    """Generators need a positive batch size and a seed numpy accepts."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
