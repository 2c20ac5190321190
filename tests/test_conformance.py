"""Conformance of every registered mechanism, and proof that the suite catches broken ones.

The parametrized test covers every mechanism in the registry (so new mechanisms are checked
automatically) at each of its conformance cases and checks. The deliberately broken mechanisms
below each violate one part of the contract; they are registered only inside the test that uses
them, so they never join the parametrized list.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from sparsezoo import registry
from sparsezoo.mechanisms.base import (
    AttentionMechanism,
    Cost,
    KVCache,
    MechanismConfigError,
    MechanismParams,
    causal_pairs,
    decode_mask,
    knob,
)
from sparsezoo.mechanisms.dense import DenseAttention
from sparsezoo.testing import (
    CHECKS,
    SHORT_T,
    SPARSE_T,
    ConformanceError,
    check_mechanism,
    conformance_cases,
    run_conformance,
)

# Collected at import, before any test registers a broken mechanism.
REAL_MECHANISMS = registry.list_mechanisms()


def _other_value(params: MechanismParams, knob_name: str) -> Any:
    """A valid value of the knob other than its current one: the first other choice, a float
    doubled, an int halved (or raised by one when halving would leave its range)."""
    value = getattr(params, knob_name)
    meta = next(f for f in dataclasses.fields(params) if f.name == knob_name).metadata
    if meta["choices"] is not None:
        return next(choice for choice in meta["choices"] if choice != value)
    if isinstance(value, float):
        return 2.0 * value
    low = meta["low"]
    return value // 2 if value // 2 >= (low or 0) and value // 2 != value else value + 1


@pytest.mark.parametrize(
    ("mechanism", "knob_name"),
    [
        (name, knob_name)
        for name in REAL_MECHANISMS
        for knob_name in registry.get_mechanism(name).Params.phase_knobs()
    ],
)
def test_phase_knobs_keep_the_parameters_and_apply_on_the_next_call(
    mechanism: str, knob_name: str
) -> None:
    """A knob a curriculum phase may set keeps every parameter's name and shape, and after
    ``set_phase_params`` the module computes (output, gradients, auxiliary losses) exactly
    what a module built with that value and the same weights does; ``{}`` restores it."""
    name = mechanism
    cls = registry.get_mechanism(name)
    kwargs = dict(d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=256)
    attn = registry.build_attention(name, **kwargs, **cls.test_preset).train()
    other = {knob_name: _other_value(attn.params, knob_name)}
    rebuilt = registry.build_attention(name, **kwargs, **{**cls.test_preset, **other}).train()
    shapes = {k: p.shape for k, p in attn.named_parameters()}
    assert {k: p.shape for k, p in rebuilt.named_parameters()} == shapes
    rebuilt.load_state_dict(attn.state_dict())
    x = torch.randn(2, 200, 64, generator=torch.Generator().manual_seed(0))

    def run(module: AttentionMechanism) -> list[torch.Tensor]:
        xg = x.clone().requires_grad_()
        y = module(xg)
        loss = sum(module.aux_losses.values(), (y * y).mean())
        return [y, *module.aux_losses.values(), *torch.autograd.grad(loss, xg)]

    configured = run(attn)
    attn.set_phase_params(other)
    assert getattr(attn.params, knob_name) == other[knob_name]
    for a, b in zip(run(attn), run(rebuilt), strict=True):
        torch.testing.assert_close(a, b)
    attn.set_phase_params({})
    for a, b in zip(run(attn), configured, strict=True):
        torch.testing.assert_close(a, b)
    bad, error = (
        ("nothing", "'nothing' is not allowed")
        if isinstance(other[knob_name], str)
        else (-1, "-1 is below the minimum")
    )
    with pytest.raises(MechanismConfigError, match=f"{knob_name}={error}"):
        attn.set_phase_params({knob_name: bad})
    assert attn.params == attn.configured_params


@pytest.mark.parametrize(
    ("mechanism", "params", "T", "check"),
    [
        pytest.param(case.mechanism, case.params, case.T, check, id=f"{case.id}-{check}")
        for name in REAL_MECHANISMS
        for case in conformance_cases(name)
        for check in CHECKS
    ],
)
def test_conformance(mechanism: str, params: dict[str, Any], T: int, check: str) -> None:
    """Every registered mechanism passes every check at every one of its conformance cases."""
    [result] = check_mechanism(mechanism, params, T=T, checks=[check])
    if not result.applicable:
        pytest.skip(result.note)


@contextlib.contextmanager
def registered(cls: type[AttentionMechanism]) -> Iterator[str]:
    """Register ``cls`` under a test-only name for the duration of the block."""
    name = f"test_{cls.__name__.strip('_').lower()}"
    registry.register_mechanism(name)(cls)
    try:
        yield name
    finally:
        registry._registered.pop(name, None)


@dataclass
class LocalParams(MechanismParams):
    """Knobs of the test-only local attention."""

    window: int = knob(64, help="keys per query, the query itself included", low=1)


class LocalAttention(DenseAttention):
    """A correct user mechanism: each query attends its last ``window`` keys (itself included)."""

    Params = LocalParams
    test_preset: ClassVar[dict[str, Any]] = {"window": 8}

    @classmethod
    def dense_limit(cls, seq_len: int) -> dict[str, Any]:
        """A window as long as the sequence is dense attention."""
        return {"window": seq_len}

    def attend(
        self, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor
    ) -> torch.Tensor:
        """Windowed causal SDPA with the exact density."""
        T, w = q_BTHD.shape[1], self.params.window
        visible = sum(min(t + 1, w) for t in range(T))
        self.stats = {"density": torch.tensor(visible / causal_pairs(T))}
        return self.sdpa(q_BTHD, k_BTHD, v_BTHD, mask=decode_mask(T, 0, T, window=w))

    def decode(self, q_BTHD: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """New queries read only the cached rows inside their windows."""
        T, w = q_BTHD.shape[1], self.params.window
        start = max(0, cache.length - T - w + 1)
        cache.rows_read = cache.length - start
        mask = decode_mask(T, start, cache.length, window=w)
        return self.sdpa(q_BTHD, cache.keys(start), cache.values(start), mask=mask)

    def cost(self, t: int) -> Cost:
        """A query at context t reads min(t, window) keys."""
        keys = float(min(t, self.params.window))
        return Cost(keys=keys, flops=self.attention_flops(keys))


class FutureLeak(DenseAttention):
    """Broken: prefill forgets the causal mask."""

    def attend(
        self, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor
    ) -> torch.Tensor:
        """Non-causal SDPA."""
        self.stats = {"density": torch.tensor(1.0)}
        return self.sdpa(q_BTHD, k_BTHD, v_BTHD)


class DecodeSkipsOldest(DenseAttention):
    """Broken: decode starts reading the cache one row late (an off-by-one)."""

    def decode(self, q_BTHD: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Attend the cache from row 1 whenever an older row exists."""
        T = q_BTHD.shape[1]
        start = 1 if cache.length > T else 0
        cache.rows_read = cache.length - start
        mask = decode_mask(T, start, cache.length)
        return self.sdpa(q_BTHD, cache.keys(start), cache.values(start), mask=mask)


class ChunkSeesAhead(DenseAttention):
    """Broken: decoding several tokens at once lets them see each other's future."""

    def decode(self, q_BTHD: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Every new query attends every cached key, the later new tokens included."""
        cache.rows_read = cache.length
        return self.sdpa(q_BTHD, cache.keys(), cache.values())


class RowsReadUnset(DenseAttention):
    """Broken: decode never sets ``cache.rows_read``."""

    def decode(self, q_BTHD: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Correct outputs, but no audit of the rows read."""
        mask = decode_mask(q_BTHD.shape[1], 0, cache.length)
        return self.sdpa(q_BTHD, cache.keys(), cache.values(), mask=mask)


class DecodeMissing(DenseAttention):
    """Broken: a user mechanism that has not implemented decoding yet."""

    def decode(self, q_BTHD: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Not implemented."""
        raise NotImplementedError("decode is not written yet")


class BatchMixing(DenseAttention):
    """Broken: outputs are centred over the batch, so samples influence each other."""

    def attend(
        self, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor
    ) -> torch.Tensor:
        """Dense attention minus half the batch mean."""
        o_BTHD = super().attend(q_BTHD, k_BTHD, v_BTHD)
        return o_BTHD - 0.5 * o_BTHD.mean(dim=0, keepdim=True)


class UnusedParameter(DenseAttention):
    """Broken: a per-head gate is declared but never used, so it gets no gradient."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = nn.Parameter(torch.ones(self.shape.n_heads))


class DeadGate(DenseAttention):
    """Broken: a ReLU gate initialised at zero is dead, so its gradient is all zero."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gate = nn.Parameter(torch.zeros(self.shape.n_heads))

    def attend(
        self, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor
    ) -> torch.Tensor:
        """Dense attention plus a gated residual of the queries."""
        o_BTHD = super().attend(q_BTHD, k_BTHD, v_BTHD)
        return o_BTHD + self.gate.relu()[:, None] * q_BTHD


class NanAtLengthOne(DenseAttention):
    """Broken: normalises by T - 1, which divides by zero for a single token."""

    def attend(
        self, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor
    ) -> torch.Tensor:
        """Dense attention scaled by (T - 1) / (T - 1)."""
        T = q_BTHD.shape[1]
        o_BTHD = super().attend(q_BTHD, k_BTHD, v_BTHD)
        return o_BTHD * (T - 1) / torch.tensor(float(T - 1))


class FakeSparse(LocalAttention):
    """Broken: declares a sparse test preset but reports density 1 anyway."""

    def attend(
        self, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor
    ) -> torch.Tensor:
        """Windowed attention, dense density."""
        o_BTHD = super().attend(q_BTHD, k_BTHD, v_BTHD)
        self.stats = {"density": torch.tensor(1.0)}
        return o_BTHD


class OffByOneDenseLimit(LocalAttention):
    """Broken: claims a window one short of the sequence is dense."""

    @classmethod
    def dense_limit(cls, seq_len: int) -> dict[str, Any]:
        """Off by one: the last query misses the first key."""
        return {"window": seq_len - 1}


class OverCountedCost(LocalAttention):
    """Broken: the cost model counts the query's own key twice."""

    def cost(self, t: int) -> Cost:
        """min(t, window) + 1 keys: more than the t keys a query can see."""
        keys = float(min(t, self.params.window) + 1)
        return Cost(keys=keys, flops=self.attention_flops(keys))


@pytest.mark.parametrize(
    ("cls", "T", "check", "expected"),
    [
        pytest.param(FutureLeak, SHORT_T, "causality", "changed outputs", id="future-leak"),
        pytest.param(
            DecodeSkipsOldest,
            SHORT_T,
            "decode_equals_prefill",
            "token-by-token decode vs",
            id="decode-skips-oldest",
        ),
        pytest.param(
            ChunkSeesAhead,
            SHORT_T,
            "decode_equals_prefill",
            "decode in chunks",
            id="chunk-sees-ahead",
        ),
        pytest.param(
            RowsReadUnset,
            SHORT_T,
            "decode_equals_prefill",
            "cache.rows_read=0",
            id="rows-read-unset",
        ),
        pytest.param(
            DecodeMissing,
            SHORT_T,
            "decode_equals_prefill",
            "raised NotImplementedError",
            id="decode-missing",
        ),
        pytest.param(
            BatchMixing,
            SHORT_T,
            "batch_independence",
            "in a batch of 3 vs alone",
            id="batch-mixing",
        ),
        pytest.param(UnusedParameter, SHORT_T, "gradients", "gate: no gradient", id="unused"),
        pytest.param(DeadGate, SHORT_T, "gradients", "gate: all-zero gradient", id="dead-gate"),
        pytest.param(NanAtLengthOne, SHORT_T, "finite", "T=1 gave non-finite", id="nan-at-T1"),
        pytest.param(FakeSparse, SPARSE_T, "stats", "genuinely sparse", id="fake-sparse"),
        pytest.param(
            OffByOneDenseLimit, SHORT_T, "dense_limit", "max abs error", id="off-by-one-limit"
        ),
        pytest.param(OverCountedCost, SHORT_T, "cost", "cost(1).keys=2.0", id="over-counted"),
    ],
)
def test_suite_catches_broken_mechanism(
    cls: type[AttentionMechanism], T: int, check: str, expected: str
) -> None:
    """Each broken mechanism fails its check with a message naming mechanism, params, T, check."""
    params = dict(cls.test_preset)
    with registered(cls) as name, pytest.raises(ConformanceError) as info:
        check_mechanism(name, params, T=T, checks=[check])
    message = str(info.value)
    assert f"mechanism {name!r}, params {params or 'defaults'}, T={T}: {check} failed" in message
    assert expected in message


def test_run_conformance_passes_a_correct_user_mechanism() -> None:
    """A user-registered correct mechanism passes every check at every case with one call."""
    with registered(LocalAttention) as name:
        results = run_conformance(name)
    assert [(r.params, r.T, r.check) for r in results] == [
        (params, T, check)
        for params in ({}, {"window": 8})
        for T in (SHORT_T, SPARSE_T)
        for check in CHECKS
    ]
    assert all(r.applicable for r in results)


def test_run_conformance_lists_every_failure() -> None:
    """run_conformance runs all checks and raises one error listing each failure."""
    with registered(FakeSparse) as name, pytest.raises(ConformanceError) as info:
        run_conformance(name)
    message = str(info.value)
    total = 4 * len(CHECKS)
    assert message.startswith(f"{name}: 1 of {total} conformance checks failed:\n- ")
    assert f"params {{'window': 8}}, T={SPARSE_T}: stats failed" in message


def test_conformance_cases_cover_defaults_and_preset() -> None:
    """Cases are the defaults and the preset (when declared), each at the short and sparse T."""
    with registered(LocalAttention) as name:
        ids = [case.id for case in conformance_cases(name)]
    assert ids == [
        f"{name}-defaults-T{SHORT_T}",
        f"{name}-defaults-T{SPARSE_T}",
        f"{name}-preset-T{SHORT_T}",
        f"{name}-preset-T{SPARSE_T}",
    ]
    assert [case.id for case in conformance_cases("dense")] == [
        f"dense-defaults-T{SHORT_T}",
        f"dense-defaults-T{SPARSE_T}",
    ]


def test_dense_limit_is_not_applicable_to_dense() -> None:
    """A mechanism without a dense limit reports that check as not applicable, not passed."""
    [result] = check_mechanism("dense", T=SHORT_T, checks=["dense_limit"])
    assert not result.applicable
    assert result.note == f"dense_limit({SHORT_T}) is None"


def test_unknown_check_is_rejected() -> None:
    """Asking for a check that does not exist names the valid ones."""
    with pytest.raises(ValueError, match="valid: \\['causality'"):
        check_mechanism("dense", T=SHORT_T, checks=["causal"])
