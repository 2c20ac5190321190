"""The conformance suite: contract checks every attention mechanism must pass.

Users check their own mechanism with one call, ``run_conformance("my_mech")``: it runs every
check in :data:`CHECKS` at each of the mechanism's :func:`conformance_cases` (its defaults and its
``test_preset``, each at a short and at a sparse length) and raises :class:`ConformanceError`
listing every failure, or returns one :class:`CheckResult` per check. :func:`check_mechanism`
runs chosen checks at one (params, T) and raises on the first failure. Every check runs on CPU
in fp32 with fixed seeds on the small GQA shape :data:`SHAPE`, so the whole suite takes seconds.

Rules the checks enforce beyond the mechanism contract's wording:

- Gradients must reach every trainable parameter through the output *or* the auxiliary losses,
  as in training (an indexer behind a non-differentiable top-k learns only from its aux loss).
- A mechanism declaring a non-empty ``test_preset`` promises it is genuinely sparse with it:
  ``density < 1`` at T >= :data:`SPARSE_T`. Mechanisms without a preset make no sparsity claim.
- A mechanism whose ``dense_limit`` returns knobs must, with those knobs applied on top of the
  checked params, compute exactly dense attention from its ``wq``/``wk``/``wv``/``wo`` weights:
  those four are copied into a ``dense`` module and the outputs compared, so any other parameter
  must not influence the output in that limit.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparsezoo.mechanisms.base import AttentionMechanism, AttentionShape, Cost, KVCache
from sparsezoo.registry import get_mechanism

__all__ = [
    "CHECKS",
    "SHAPE",
    "SHORT_T",
    "SPARSE_T",
    "CheckResult",
    "ConformanceCase",
    "ConformanceError",
    "check_mechanism",
    "conformance_cases",
    "run_conformance",
]

SHAPE = AttentionShape(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16)
"""The attention shape every check builds mechanisms with: small, with GQA (2 query heads/KV)."""

SHORT_T = 13
"""The short conformance length (odd, so block and window boundaries fall mid-sequence)."""

SPARSE_T = 301
"""The sparse conformance length: long enough that every ``test_preset`` is genuinely sparse."""

# Comparison tolerances. fp32 paths that compute the same attention in a different order
# (decode vs prefill, batch vs single) agree to ~1e-7 relative; real bugs differ by O(1e-3) or more.
_FP32_TOL = 2e-5
# Masked keys contribute exactly zero, so changing the future must leave the past (near) bit-equal.
_CAUSAL_TOL = 1e-6
# bf16 keeps ~3 significant digits; this bounds the relative error of the whole output's norm.
_BF16_TOL = 5e-2
# Densities are ratios computed in floating point, so exactly-dense may round a hair above 1.
_DENSITY_SLACK = 1e-6
# Chunk sizes cycled when feeding the cache several tokens at once: an empty-cache prefill chunk,
# single tokens, and a chunk longer than the typical test window so masking inside a chunk matters.
_CHUNKS = (7, 1, 40, 3)
_PREFIX = 5
_PROJECTIONS = ("wq", "wk", "wv", "wo")


class ConformanceError(AssertionError):
    """A mechanism failed a conformance check; the message names the mechanism, params, T,
    the check and the measured numbers (max abs error and the tolerance it exceeded)."""


@dataclass(frozen=True)
class ConformanceCase:
    """One (params, T) combination a mechanism is checked at.

    ``label`` is ``"defaults"`` or ``"preset"`` (the mechanism's ``test_preset``); :attr:`id`
    names the case for test ids and reports, e.g. ``sliding_window-preset-T301``.
    """

    mechanism: str
    label: str
    params: dict[str, Any]
    T: int

    @property
    def id(self) -> str:
        """Readable case name ``<mechanism>-<label>-T<T>``."""
        return f"{self.mechanism}-{self.label}-T{self.T}"


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one check that did not fail: passed, or not applicable (``note`` says why)."""

    mechanism: str
    params: dict[str, Any]
    T: int
    check: str
    applicable: bool
    note: str = ""

    def __str__(self) -> str:
        status = "passed" if self.applicable else f"not applicable ({self.note})"
        return f"{_describe(self.mechanism, self.params, self.T)}: {self.check} {status}"


class _CheckFailed(AssertionError):
    """Raised inside a check with the measured numbers; wrapped into ConformanceError."""


class _NotApplicable(Exception):
    """Raised by a check that has nothing to verify for this mechanism, params and length."""


def _describe(name: str, params: Mapping[str, Any], T: int) -> str:
    return f"mechanism {name!r}, params {dict(params) or 'defaults'}, T={T}"


@dataclass(frozen=True)
class _Subject:
    """The mechanism class, params, length and seed one run of the checks is about."""

    cls: type[AttentionMechanism]
    params: dict[str, Any]
    T: int
    seed: int

    def build(self, overrides: Mapping[str, Any] | None = None) -> AttentionMechanism:
        """Build the mechanism on SHAPE with seeded weights, leaving the global RNG untouched."""
        params = self.cls.Params.from_dict({**self.params, **(overrides or {})})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.cls(SHAPE, params)

    def generator(self) -> torch.Generator:
        """A fresh generator, so each check draws the same inputs whatever ran before it."""
        return torch.Generator().manual_seed(self.seed)

    def is_sparse_case(self) -> bool:
        """True where the declared test preset promises density < 1."""
        preset = dict(self.cls.test_preset)
        return bool(preset) and self.params == preset and self.T >= SPARSE_T


def _randn(gen: torch.Generator, B: int, T: int) -> torch.Tensor:
    return torch.randn(B, T, SHAPE.d_model, generator=gen)


def _assert_close(
    what: str,
    actual: torch.Tensor,
    expected: torch.Tensor,
    *,
    first_position: int = 0,
) -> None:
    """Fail unless ``actual`` [B, T, C] matches ``expected`` within the fp32 tolerance scaled by
    the expected magnitude; ``first_position`` offsets the reported position."""
    if actual.shape != expected.shape:
        raise _CheckFailed(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    if not torch.isfinite(actual).all():
        raise _CheckFailed(f"{what}: non-finite values")
    err = (actual.float() - expected.float()).abs()
    bound = _FP32_TOL * max(1.0, expected.abs().max().item())
    worst = err.max().item()
    if not worst <= bound:
        b, t, _ = (int(i) for i in torch.unravel_index(err.argmax(), err.shape))
        raise _CheckFailed(
            f"{what}: max abs error {worst:.3g} > tolerance {bound:.3g} "
            f"(batch {b}, position {first_position + t})"
        )


def _modes(attn: AttentionMechanism) -> Iterator[tuple[str, AttentionMechanism]]:
    """Yield the module in train then eval mode: training is where a leak or mixing does harm."""
    for mode in ("train", "eval"):
        yield mode, attn.train(mode == "train")


def _check_causality(s: _Subject) -> None:
    """Replacing x at positions >= p changes no output before p (p near the start and mid)."""
    if s.T < 2:
        raise _NotApplicable("needs T >= 2 to have a future to perturb")
    gen = s.generator()
    attn = s.build()
    x = _randn(gen, 2, s.T)
    cuts = sorted({1, s.T // 2})
    for mode, module in _modes(attn):
        with torch.no_grad():
            y = module(x)
            for p in cuts:
                x_future = x.clone()
                x_future[:, p:] = _randn(gen, 2, s.T - p)
                change = (module(x_future)[:, :p] - y[:, :p]).abs().max().item()
                if not change <= _CAUSAL_TOL:
                    raise _CheckFailed(
                        f"changing x at positions >= {p} changed outputs at positions < {p} "
                        f"({mode} mode): max abs change {change:.3g} > {_CAUSAL_TOL:g}"
                    )


def _feed(
    attn: AttentionMechanism,
    x: torch.Tensor,
    reference: torch.Tensor,
    what: str,
    *,
    prefix: int,
    chunks: Sequence[int],
) -> None:
    """Feed ``x`` through a fresh cache (``prefix`` tokens via fill_cache, then ``chunks`` sizes
    cycled) and compare the decoded outputs with the full forward's ``reference``."""
    B, T, _ = x.shape
    cache: KVCache = attn.new_cache(B, T)
    if prefix:
        attn.fill_cache(x[:, :prefix], cache)
        if cache.length != prefix:
            raise _CheckFailed(f"{what}: cache.length={cache.length} after fill_cache of {prefix}")
    outputs = []
    pos, step = prefix, 0
    while pos < T:
        n = min(chunks[step % len(chunks)], T - pos)
        outputs.append(attn(x[:, pos : pos + n], cache=cache))
        pos, step = pos + n, step + 1
        if cache.length != pos:
            raise _CheckFailed(f"{what}: cache.length={cache.length} after feeding {pos} tokens")
        rows = cache.rows_read
        # rows may exceed cache.length: a mechanism with several K/V sets (NSA's independent
        # branches) reads rows of each set
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise _CheckFailed(
                f"{what}: cache.rows_read={rows!r} after feeding tokens [{pos - n}, {pos}) "
                "is not a positive int"
            )
    _assert_close(
        f"{what} vs full forward",
        torch.cat(outputs, dim=1),
        reference[:, prefix:],
        first_position=prefix,
    )


def _check_decode_equals_prefill(s: _Subject) -> None:
    """Token-by-token, prefix-then-tokens and chunked cache feeding all equal the full forward."""
    gen = s.generator()
    attn = s.build().eval()
    x = _randn(gen, 2, s.T)
    with torch.no_grad():
        reference = attn(x)
        _feed(attn, x, reference, "token-by-token decode", prefix=0, chunks=(1,))
        prefix = min(_PREFIX, s.T - 1)
        if prefix:
            _feed(
                attn, x, reference, f"fill_cache({prefix}) then tokens", prefix=prefix, chunks=(1,)
            )
        _feed(attn, x, reference, f"decode in chunks of {list(_CHUNKS)}", prefix=0, chunks=_CHUNKS)


def _check_batch_independence(s: _Subject) -> None:
    """Each sample's output in a batch of 3 equals its output computed alone."""
    gen = s.generator()
    attn = s.build()
    x = _randn(gen, 3, s.T)
    for mode, module in _modes(attn):
        with torch.no_grad():
            y = module(x)
            for b in range(3):
                _assert_close(
                    f"sample {b} in a batch of 3 vs alone ({mode} mode)",
                    y[b : b + 1],
                    module(x[b : b + 1]),
                )


def _check_gradients(s: _Subject) -> None:
    """A random projection of the output plus the aux losses gives finite, non-zero gradients
    on every trainable parameter and on the input, at T = max(T, SPARSE_T).

    Short sequences may legitimately leave block-level parameters unused (NSA's compressor sees
    no complete block below l tokens), so gradients are checked at a length where every
    mechanism component is active.
    """
    if s.T < 2:
        raise _NotApplicable("needs T >= 2: with one key the attention weights get no gradient")
    gen = s.generator()
    attn = s.build().train()
    x = _randn(gen, 2, max(s.T, SPARSE_T)).requires_grad_()
    y = attn(x)
    probe = torch.randn(y.shape, generator=gen)
    # aux losses are part of the training loss and may be the only path to some parameters
    loss = (y * probe).sum() + sum(attn.aux_losses.values(), torch.zeros(()))
    loss.backward()
    problems = []
    named = [("input x", x), *((n, p) for n, p in attn.named_parameters() if p.requires_grad)]
    for name, tensor in named:
        grad = tensor.grad
        if grad is None:
            problems.append(f"{name}: no gradient")
        elif not torch.isfinite(grad).all():
            problems.append(f"{name}: non-finite gradient")
        elif not grad.any():
            problems.append(f"{name}: all-zero gradient")
    if problems:
        raise _CheckFailed("; ".join(problems))


def _check_finite(s: _Subject) -> None:
    """fp32 outputs are finite at T = 1, 2 and T; the bf16 forward is finite and near fp32."""
    gen = s.generator()
    attn = s.build().eval()
    with torch.no_grad():
        for t in sorted({1, 2, s.T}):
            x = _randn(gen, 2, t)
            y = attn(x)
            if y.shape != x.shape:
                raise _CheckFailed(f"fp32 forward at T={t} returned shape {tuple(y.shape)}")
            if not torch.isfinite(y).all():
                raise _CheckFailed(f"fp32 forward at T={t} gave non-finite outputs")
        x = _randn(gen, 2, s.T)
        y = attn(x)
        y_half = copy.deepcopy(attn).to(torch.bfloat16)(x.to(torch.bfloat16))
    if y_half.dtype != torch.bfloat16:
        raise _CheckFailed(f"bf16 forward returned dtype {y_half.dtype}")
    if not torch.isfinite(y_half).all():
        raise _CheckFailed(f"bf16 forward at T={s.T} gave non-finite outputs")
    rel = ((y_half.float() - y).norm() / y.norm()).item()
    if not rel <= _BF16_TOL:
        raise _CheckFailed(
            f"bf16 forward vs fp32: relative error of the norm {rel:.3g} > {_BF16_TOL:g}"
        )


def _check_dense_limit(s: _Subject) -> None:
    """With ``dense_limit(T)`` knobs the mechanism equals dense with the same projections."""
    knobs = s.cls.dense_limit(s.T)
    if knobs is None:
        raise _NotApplicable(f"dense_limit({s.T}) is None")
    attn = s.build(knobs).eval()
    dense_cls = get_mechanism("dense")
    dense = dense_cls(SHAPE, dense_cls.Params()).eval()
    weights = {}
    for proj in _PROJECTIONS:
        theirs, ours = getattr(attn, proj, None), getattr(dense, proj)
        if not isinstance(theirs, nn.Linear) or theirs.weight.shape != ours.weight.shape:
            raise _CheckFailed(
                f"declares dense_limit({s.T})={knobs} but has no {proj} projection shaped like "
                f"dense's {tuple(ours.weight.shape)}, so it cannot be compared with dense"
            )
        weights[f"{proj}.weight"] = theirs.weight
    dense.load_state_dict(weights)
    x = _randn(s.generator(), 2, s.T)
    with torch.no_grad():
        _assert_close(f"with dense_limit({s.T})={knobs} vs dense", attn(x), dense(x))


def _is_float_scalar(value: object) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()


def _check_stats(s: _Subject) -> None:
    """After a training forward, stats hold detached float scalars including a density in
    (0, 1] (below 1 for a declared test preset at the sparse length) and aux_losses is a dict
    of finite float scalars."""
    attn = s.build().train()
    attn(_randn(s.generator(), 2, s.T))  # grad enabled, so undetached stats are caught
    stats = attn.stats
    if not isinstance(stats, dict) or "density" not in stats:
        raise _CheckFailed(f"stats must be a dict with 'density', got {stats!r}")
    for key, value in stats.items():
        if not _is_float_scalar(value):
            raise _CheckFailed(f"stats[{key!r}] must be a float scalar tensor, got {value!r}")
        if value.requires_grad:
            raise _CheckFailed(f"stats[{key!r}] must be detached")
    density = stats["density"].item()
    if not 0 < density <= 1 + _DENSITY_SLACK:
        raise _CheckFailed(f"density {density:.6g} is outside (0, 1]")
    if s.is_sparse_case() and not density < 1:
        raise _CheckFailed(
            f"density {density:.6g} with test_preset {dict(s.cls.test_preset)} at T={s.T}: "
            f"the preset must make the mechanism genuinely sparse (density < 1) at "
            f"T >= {SPARSE_T}"
        )
    aux = attn.aux_losses
    if not isinstance(aux, dict):
        raise _CheckFailed(f"aux_losses must be a dict, got {aux!r}")
    for key, value in aux.items():
        if not _is_float_scalar(value) or not torch.isfinite(value):
            raise _CheckFailed(
                f"aux_losses[{key!r}] must be a finite float scalar tensor, got {value!r}"
            )


def _check_cost(s: _Subject) -> None:
    """``cost(t)`` is a Cost with 0 < keys <= branches * t and finite flops > 0 for t in
    {1, 17, T}; ``branches`` is the mechanism's count of branches that each read keys."""
    attn = s.build()
    for t in sorted({1, 17, s.T}):
        cost = attn.cost(t)
        if not isinstance(cost, Cost):
            raise _CheckFailed(f"cost({t}) returned {cost!r}, not a Cost")
        bound = attn.branches * t
        if not 0 < cost.keys <= bound:
            raise _CheckFailed(f"cost({t}).keys={cost.keys!r} is outside (0, {bound}]")
        if not (cost.flops > 0 and math.isfinite(cost.flops)):
            raise _CheckFailed(f"cost({t}).flops={cost.flops!r} is not a finite positive number")


_CHECK_FUNCTIONS: dict[str, Callable[[_Subject], None]] = {
    "causality": _check_causality,
    "decode_equals_prefill": _check_decode_equals_prefill,
    "batch_independence": _check_batch_independence,
    "gradients": _check_gradients,
    "finite": _check_finite,
    "dense_limit": _check_dense_limit,
    "stats": _check_stats,
    "cost": _check_cost,
}

CHECKS: tuple[str, ...] = tuple(_CHECK_FUNCTIONS)
"""Names of the conformance checks, in the order they run."""


def conformance_cases(name: str) -> list[ConformanceCase]:
    """The cases mechanism ``name`` is checked at: its defaults and its ``test_preset`` (omitted
    when empty), each at :data:`SHORT_T` and :data:`SPARSE_T` tokens."""
    cls = get_mechanism(name)
    settings = [("defaults", {})]
    if cls.test_preset:
        settings.append(("preset", dict(cls.test_preset)))
    return [
        ConformanceCase(name, label, dict(params), T)
        for label, params in settings
        for T in (SHORT_T, SPARSE_T)
    ]


@contextlib.contextmanager
def _single_threaded() -> Iterator[None]:
    """Run torch single-threaded inside the block, restoring the caller's thread count after.

    The checks' tensors are tiny, so intra-op threads cost more in synchronisation than they
    save: on a loaded 2-core machine the suite runs 5-50x faster on one thread.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def check_mechanism(
    name: str,
    params: Mapping[str, Any] | None = None,
    *,
    T: int = SPARSE_T,
    checks: Sequence[str] | None = None,
    seed: int = 0,
) -> list[CheckResult]:
    """Run ``checks`` (default: all of :data:`CHECKS`) on mechanism ``name`` built with
    ``params`` at sequence length ``T``, stopping at the first failure.

    Raises :class:`ConformanceError` naming the mechanism, params, T and the failing check with
    its numbers (an exception raised by the mechanism during a check also counts as a failure
    and is chained). Returns one :class:`CheckResult` per check, passed or not applicable.
    """
    selected = CHECKS if checks is None else tuple(checks)
    unknown = [c for c in selected if c not in _CHECK_FUNCTIONS]
    if unknown:
        raise ValueError(f"unknown conformance check(s) {unknown}; valid: {list(CHECKS)}")
    if T < 1:
        raise ValueError(f"T must be >= 1, got {T}")
    params = dict(params or {})
    subject = _Subject(get_mechanism(name), params, T, seed)
    where = _describe(name, params, T)
    results = []
    for check in selected:
        try:
            with _single_threaded():
                _CHECK_FUNCTIONS[check](subject)
        except _NotApplicable as exc:
            results.append(CheckResult(name, params, T, check, applicable=False, note=str(exc)))
            continue
        except _CheckFailed as exc:
            raise ConformanceError(f"{where}: {check} failed: {exc}") from None
        except Exception as exc:
            raise ConformanceError(
                f"{where}: {check} failed: the mechanism raised {type(exc).__name__}: {exc}"
            ) from exc
        results.append(CheckResult(name, params, T, check, applicable=True))
    return results


def run_conformance(name: str, *, seed: int = 0) -> list[CheckResult]:
    """Run every check at every conformance case of mechanism ``name``: the one-call entry point.

    All checks run even after a failure, so one call shows everything that is wrong: it raises
    :class:`ConformanceError` listing every failed check, or returns the results (one per case
    and check, passed or not applicable; ``print(*results, sep="\\n")`` gives a summary).
    """
    results: list[CheckResult] = []
    failures: list[str] = []
    cases = conformance_cases(name)
    for case in cases:
        for check in CHECKS:
            try:
                results += check_mechanism(name, case.params, T=case.T, checks=[check], seed=seed)
            except ConformanceError as exc:
                failures.append(str(exc))
    if failures:
        total = len(cases) * len(CHECKS)
        listing = "\n".join(f"- {failure}" for failure in failures)
        raise ConformanceError(
            f"{name}: {len(failures)} of {total} conformance checks failed:\n{listing}"
        )
    return results
