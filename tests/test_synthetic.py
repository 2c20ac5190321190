"""Tests for sparsezoo.data.synthetic: MQAR and passkey layouts, determinism, and the scorers."""

from __future__ import annotations

import pytest
import torch

from sparsezoo.data.synthetic import (
    IGNORE_INDEX,
    N_DIGITS,
    N_RESERVED,
    NEEDLE_MARKER,
    QUERY_MARKER,
    MQARSpec,
    PasskeySpec,
    exact_match,
    make_mqar,
    make_passkey,
    token_accuracy,
)

MQAR = MQARSpec(vocab_size=64, seq_len=48, n_pairs=6, n_queries=4)
PASSKEY = PasskeySpec(vocab_size=100, seq_len=120, depth=0.5, passkey_len=5)


# --- MQAR ---------------------------------------------------------------------------------------


def test_mqar_shapes_and_dtypes():
    batch = make_mqar(MQAR, n=8, seed=0)
    assert batch.input_ids.shape == batch.labels.shape == batch.answer_mask.shape == (8, 48)
    assert batch.input_ids.dtype == batch.labels.dtype == torch.long
    assert batch.answer_mask.dtype == torch.bool
    assert torch.equal(batch.answer_mask.sum(dim=1), torch.full((8,), 4))
    assert batch.answer_ids.shape == (8, 4)


def test_mqar_n_queries_defaults_to_n_pairs():
    spec = MQARSpec(vocab_size=64, seq_len=40, n_pairs=5)
    assert spec.n_queries == 5
    assert make_mqar(spec, n=2, seed=0).answer_ids.shape == (2, 5)


def test_mqar_answers_match_the_key_value_pairs():
    batch = make_mqar(MQAR, n=16, seed=3)
    half = (MQAR.vocab_size - N_RESERVED) // 2
    for ids, labels in zip(batch.input_ids.tolist(), batch.labels.tolist(), strict=True):
        keys, values = ids[0:12:2], ids[1:12:2]
        assert len(set(keys)) == 6
        assert all(N_RESERVED <= k < N_RESERVED + half for k in keys)
        assert all(N_RESERVED + half <= v < MQAR.vocab_size for v in values)
        table = dict(zip(keys, values, strict=True))
        answer_positions = [t for t, label in enumerate(labels) if label != IGNORE_INDEX]
        assert answer_positions == [40, 42, 44, 46]
        for t in answer_positions:
            assert labels[t] == table[ids[t]]
            assert ids[t + 1] == labels[t]  # the answer is also the next input token
        # Keys occur only in their pair and their query, never in the noise.
        for key in keys:
            assert ids.count(key) == 1 + (key in [ids[t] for t in answer_positions])


def test_mqar_is_deterministic_and_seeded():
    a, b, c = make_mqar(MQAR, 4, seed=1), make_mqar(MQAR, 4, seed=1), make_mqar(MQAR, 4, seed=2)
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.input_ids, c.input_ids)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"seq_len": 19}, "seq_len"),
        ({"vocab_size": 15}, "vocab_size"),
        ({"n_queries": 7}, "n_queries"),
        ({"n_queries": 0}, "n_queries"),
        ({"n_pairs": 0}, "n_pairs"),
    ],
)
def test_mqar_spec_names_the_bad_field(kwargs, field):
    args = {"vocab_size": 64, "seq_len": 48, "n_pairs": 6, "n_queries": 4, **kwargs}
    with pytest.raises(ValueError, match=field):
        MQARSpec(**args)


def test_mqar_smallest_valid_spec_fits_exactly():
    batch = make_mqar(MQARSpec(vocab_size=16, seq_len=20, n_pairs=6, n_queries=4), 3, seed=0)
    assert batch.input_ids.min() >= N_RESERVED


# --- passkey ------------------------------------------------------------------------------------


def _needle_index(row: list[int]) -> int:
    hits = [t for t in range(len(row) - 1) if (row[t], row[t + 1]) == NEEDLE_MARKER]
    assert len(hits) == 1
    return hits[0]


def test_passkey_shapes_and_answer_layout():
    batch = make_passkey(PASSKEY, n=6, seed=0)
    k = PASSKEY.passkey_len
    assert batch.input_ids.shape == batch.labels.shape == (6, 120)
    assert batch.answer_ids.shape == (6, k)
    assert batch.answer_start == 120 - k
    assert torch.equal(batch.input_ids[:, -k:], batch.answer_ids)
    assert torch.all(batch.input_ids[:, batch.answer_start - 1] == QUERY_MARKER)
    assert torch.all((batch.answer_ids >= N_RESERVED) & (batch.answer_ids < N_RESERVED + N_DIGITS))
    # Labels predict exactly the answer tokens, from the position before each one.
    answer_labels = batch.labels[:, batch.answer_start - 1 : -1]
    assert torch.equal(answer_labels, batch.answer_ids)
    assert int((batch.labels != IGNORE_INDEX).sum()) == 6 * k


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.5, 0.77, 1.0])
def test_needle_sits_at_the_requested_depth(depth):
    spec = PasskeySpec(vocab_size=50, seq_len=1000, depth=depth, passkey_len=4)
    batch = make_passkey(spec, n=3, seed=1)
    for row, answer in zip(batch.input_ids.tolist(), batch.answer_ids.tolist(), strict=True):
        start = _needle_index(row)
        assert start == batch.needle_start
        assert abs(start - depth * spec.n_filler) <= 1
        assert row[start + 2 : start + 2 + 4] == answer
        filler = row[:start] + row[start + 6 : -5]
        assert len(filler) == spec.n_filler
        assert all(N_RESERVED + N_DIGITS <= t < 50 for t in filler)


def test_passkey_is_deterministic_and_seeded():
    a, b, c = make_passkey(PASSKEY, 4, 5), make_passkey(PASSKEY, 4, 5), make_passkey(PASSKEY, 4, 6)
    assert torch.equal(a.input_ids, b.input_ids)
    assert torch.equal(a.answer_ids, b.answer_ids)
    assert not torch.equal(a.answer_ids, c.answer_ids)
    assert len({tuple(r) for r in a.answer_ids.tolist()}) > 1


def test_distinct_passkeys_never_repeat_a_digit():
    spec = PasskeySpec(vocab_size=50, seq_len=120, depth=0.3, passkey_len=5, distinct=True)
    batch = make_passkey(spec, 200, 0)
    answers = batch.answer_ids.tolist()
    assert all(len(set(a)) == 5 for a in answers)
    assert all(N_RESERVED <= d < N_RESERVED + N_DIGITS for a in answers for d in a)
    assert len({tuple(a) for a in answers}) > 150  # still many different passkeys
    # the needle holds the same digits, and the generator stays seeded
    needle = batch.input_ids[:, batch.needle_start + 2 : batch.needle_start + 7]
    assert torch.equal(needle, batch.answer_ids)
    assert torch.equal(make_passkey(spec, 200, 0).input_ids, batch.input_ids)
    # without `distinct`, 5 uniform digits repeat one in about 70% of passkeys
    plain = make_passkey(PasskeySpec(50, 120, 0.3, 5), 200, 0).answer_ids.tolist()
    assert sum(len(set(a)) < 5 for a in plain) > 100
    every_digit = make_passkey(PasskeySpec(50, 120, 0.3, N_DIGITS, distinct=True), 3, 1)
    assert all(
        sorted(a) == list(range(N_RESERVED, N_RESERVED + N_DIGITS))
        for a in every_digit.answer_ids.tolist()
    )
    with pytest.raises(ValueError, match="passkey_len must be <= 10 with distinct digits"):
        PasskeySpec(50, 120, 0.3, N_DIGITS + 1, distinct=True)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"depth": 1.5}, "depth"),
        ({"depth": -0.1}, "depth"),
        ({"depth": float("nan")}, "depth"),
        ({"seq_len": 12}, "seq_len"),
        ({"vocab_size": 14}, "vocab_size"),
        ({"passkey_len": 0}, "passkey_len"),
    ],
)
def test_passkey_spec_names_the_bad_field(kwargs, field):
    args = {"vocab_size": 100, "seq_len": 120, "depth": 0.5, "passkey_len": 5, **kwargs}
    with pytest.raises(ValueError, match=field):
        PasskeySpec(**args)


@pytest.mark.parametrize(("n", "seed", "name"), [(0, 0, r"\bn must"), (2, -1, "seed")])
def test_generators_validate_n_and_seed(n, seed, name):
    for make, spec in ((make_mqar, MQAR), (make_passkey, PASSKEY)):
        with pytest.raises(ValueError, match=name):
            make(spec, n, seed)


# --- scorers ------------------------------------------------------------------------------------

ANSWERS = torch.tensor([[5, 6, 7, 8], [9, 9, 4, 4]])


def test_scorers_right_answer():
    assert exact_match(ANSWERS.clone(), ANSWERS).tolist() == [True, True]
    assert token_accuracy(ANSWERS.clone(), ANSWERS).tolist() == [1.0, 1.0]


def test_scorers_wrong_answer():
    wrong = torch.tensor([[1, 1, 1, 1], [2, 2, 2, 2]])
    assert exact_match(wrong, ANSWERS).tolist() == [False, False]
    assert token_accuracy(wrong, ANSWERS).tolist() == [0.0, 0.0]


def test_scorers_off_by_one_shift_is_wrong():
    shifted = torch.tensor([[6, 7, 8, 5], [9, 4, 4, 9]])  # every answer read one position late
    assert exact_match(shifted, ANSWERS).tolist() == [False, False]
    assert token_accuracy(shifted, ANSWERS).tolist() == [0.0, 0.5]


def test_scorers_partial_answer():
    partial = torch.tensor([[5, 6, 0, 8], [9, 9, 4, 4]])
    assert exact_match(partial, ANSWERS).tolist() == [False, True]
    assert token_accuracy(partial, ANSWERS).tolist() == [0.75, 1.0]


def test_scorers_on_generated_batches_with_perfect_and_misaligned_predictions():
    passkey = make_passkey(PASSKEY, 4, seed=0)
    start = passkey.answer_start
    perfect = passkey.labels[:, start - 1 : -1]  # what an oracle predicts at each label position
    misaligned = passkey.input_ids[:, start - 1 : -1]  # predicting the current token, not the next
    assert exact_match(perfect, passkey.answer_ids).all()
    assert not exact_match(misaligned, passkey.answer_ids).any()

    mqar = make_mqar(MQAR, 4, seed=0)
    oracle = mqar.input_ids[:, 1:][mqar.answer_mask[:, :-1]].view(4, -1)
    assert exact_match(oracle, mqar.answer_ids).all()


@pytest.mark.parametrize(
    ("pred", "answer"),
    [(torch.zeros(2, 3), torch.zeros(2, 4)), (torch.zeros(4), torch.zeros(4))],
)
def test_scorers_reject_mismatched_or_flat_shapes(pred, answer):
    with pytest.raises(ValueError, match="shape"):
        exact_match(pred, answer)
    with pytest.raises(ValueError, match="shape"):
        token_accuracy(pred, answer)
