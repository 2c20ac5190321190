"""The mechanism contract every attention mechanism implements.

A mechanism is a ``torch.nn.Module`` built from an :class:`AttentionShape` and a typed params
dataclass. It owns its projections and RoPE, maps ``x_BTC -> y_BTC`` as causal self-attention,
decodes new tokens against a cache, reports per-step statistics and auxiliary losses through
attributes (so the forward return type never changes), and gives an analytic cost model.

Legend: B batch, T time (new tokens), S cached length, C d_model, HQ query heads, H KV heads,
D head dim, G = HQ // H query heads per KV head.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from sparsezoo.kernels.rope import apply_rope, rope_angles


class MechanismConfigError(ValueError):
    """A mechanism knob (or the attention shape) holds a value outside its allowed range."""


@dataclass(frozen=True)
class AttentionShape:
    """The attention geometry every mechanism is built from.

    ``head_dim`` defaults to ``d_model // n_heads``. ``max_seq_len`` is the longest sequence the
    model is trained on (mechanisms may size buffers or defaults from it; decoding further works).
    ``rope_dim`` rotates only part of each head (see ``rope_angles``; None: all of it).
    """

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "n_kv_heads", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise MechanismConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise MechanismConfigError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2:
            raise MechanismConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_theta <= 0:
            raise MechanismConfigError(f"rope_theta must be > 0, got {self.rope_theta}")
        r = self.rope_dim
        if r is not None and (not isinstance(r, int) or r % 2 or not 0 <= r <= self.head_dim):
            raise MechanismConfigError(
                f"rope_dim must be null or an even integer in 0..head_dim={self.head_dim}, "
                f"got {r!r}"
            )

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G)."""
        return self.n_heads // self.n_kv_heads


def knob(
    default: Any,
    *,
    help: str,
    low: float | None = None,
    high: float | None = None,
    choices: tuple[Any, ...] | None = None,
    phase: bool = False,
) -> Any:
    """Declare a mechanism parameter with its default, help text and allowed range.

    The range metadata drives both validation and the ``sparsezoo mechanisms`` listing, so the
    documented range and the enforced range can never drift apart. ``phase`` marks a knob a
    curriculum phase may change during training: it leaves the parameters as they are, and the
    mechanism reads it from ``self.params`` on every call.
    """
    metadata = {"help": help, "low": low, "high": high, "choices": choices, "phase": phase}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class KnobInfo:
    """One parameter of a mechanism as users see it (name, type, default, allowed values, help,
    and whether a curriculum phase may change it)."""

    name: str
    type: str
    default: Any
    allowed: str
    help: str
    phase: bool = False


@dataclass
class MechanismParams:
    """Base class of every mechanism's params dataclass.

    Subclasses declare fields with :func:`knob`; :meth:`validate` checks types and ranges from the
    metadata and subclasses extend it with cross-field rules (calling ``super().validate``).
    """

    def validate(self, shape: AttentionShape) -> None:
        """Raise MechanismConfigError naming the first knob outside its allowed range."""
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            meta = f.metadata
            expected = hints.get(f.name)
            if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
                raise MechanismConfigError(f"{f.name} must be an integer, got {value!r}")
            if expected is float and (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
            ):
                raise MechanismConfigError(f"{f.name} must be a finite number, got {value!r}")
            if meta.get("choices") is not None and value not in meta["choices"]:
                raise MechanismConfigError(
                    f"{f.name}={value!r} is not allowed; choose one of {list(meta['choices'])}"
                )
            low, high = meta.get("low"), meta.get("high")
            if low is not None and value < low:
                raise MechanismConfigError(f"{f.name}={value!r} is below the minimum {low}")
            if high is not None and value > high:
                raise MechanismConfigError(f"{f.name}={value!r} is above the maximum {high}")

    @classmethod
    def phase_knobs(cls) -> tuple[str, ...]:
        """The knobs a curriculum phase may change (declared with ``knob(..., phase=True)``)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("phase"))

    @classmethod
    def describe(cls) -> list[KnobInfo]:
        """List the knobs with their types, defaults, allowed ranges and help texts."""
        hints = typing.get_type_hints(cls)
        out = []
        for f in dataclasses.fields(cls):
            meta = f.metadata
            if meta.get("choices") is not None:
                allowed = " | ".join(str(c) for c in meta["choices"])
            elif meta.get("low") is not None or meta.get("high") is not None:
                lo = meta.get("low")
                hi = meta.get("high")
                allowed = f"[{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"
            else:
                allowed = "any"
            hint = hints.get(f.name)
            out.append(
                KnobInfo(
                    name=f.name,
                    type=getattr(hint, "__name__", str(hint)),
                    default=f.default,
                    allowed=allowed,
                    help=meta.get("help", ""),
                    phase=bool(meta.get("phase")),
                )
            )
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MechanismParams:
        """Build the params from a mapping, rejecting unknown keys with the list of valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise MechanismConfigError(
                f"unknown parameter(s) {unknown} for {cls.__name__}; valid: {names or 'none'}"
            )
        return cls(**values)


@dataclass(frozen=True)
class Cost:
    """Analytic per-query cost at context t: KV rows read, attention FLOPs (per query head),
    and other cached rows a decode step reads besides the K/V rows (DSA's indexer keys), as
    K/V-row equivalents (numbers read over the 2·D numbers of one KV head's K and V row)."""

    keys: float
    flops: float
    side_rows: float = 0.0

    @property
    def rows(self) -> float:
        """Everything a decode step reads, in K/V rows: ``keys + side_rows``."""
        return self.keys + self.side_rows


class KVCache:
    """Decode cache holding post-RoPE keys and values for every past token.

    ``length`` counts cached tokens; ``rows_read`` is how many KV rows (per KV head) the last
    decode step read, so sparse decoding can be audited. Mechanisms that need more state
    (compressed keys, block means, indexer keys) subclass it.
    """

    def __init__(
        self,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.max_len = max_len
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.k_BSHD, self.v_BSHD = self._kv_buffers(shape, dtype, device)
        self.length = 0
        self._deferred_rows: Callable[[], int] | None = None
        self.rows_read = 0

    def _kv_buffers(
        self, shape: tuple[int, int, int, int], dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The zeroed K and V buffers [B, S, H, D]: two tensors here; a subclass may return
        views of one storage laid out for its decode reads."""
        k_BSHD = torch.zeros(shape, dtype=dtype, device=device)
        return k_BSHD, torch.zeros_like(k_BSHD)

    @property
    def rows_read(self) -> int:
        """KV rows per KV head the last decode step read; computed here, on first read, when
        the step deferred it (:meth:`defer_rows_read`)."""
        if self._deferred_rows is not None:
            compute, self._deferred_rows = self._deferred_rows, None
            self._rows_read = int(compute())
        return self._rows_read

    @rows_read.setter
    def rows_read(self, value: int) -> None:
        self._rows_read, self._deferred_rows = value, None

    def defer_rows_read(self, compute: Callable[[], int]) -> None:
        """Make ``rows_read`` of this step ``compute()``, run only if someone reads it: the
        count is an audit, and its small ops and host sync need not slow every decode step."""
        self._deferred_rows = compute

    def append(self, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor) -> None:
        """Store the keys and values of ``T`` new tokens after the cached ones."""
        T = k_BTHD.shape[1]
        if self.length + T > self.max_len:
            raise ValueError(
                f"cache overflow: {self.length} cached + {T} new tokens > max_len={self.max_len}"
            )
        self.k_BSHD[:, self.length : self.length + T] = k_BTHD
        self.v_BSHD[:, self.length : self.length + T] = v_BTHD
        self.length += T

    def keys(self, start: int = 0) -> torch.Tensor:
        """Cached keys from ``start`` to the end, [B, S, H, D] (a view, no copy)."""
        return self.k_BSHD[:, start : self.length]

    def values(self, start: int = 0) -> torch.Tensor:
        """Cached values from ``start`` to the end, [B, S, H, D] (a view, no copy)."""
        return self.v_BSHD[:, start : self.length]


def decode_mask(
    n_new: int, start: int, length: int, window: int | None = None
) -> torch.Tensor | None:
    """Boolean mask [n_new, length - start] for new queries against cached keys [start, length).

    New query i sits at position ``length - n_new + i`` and sees key j iff j <= its position (and
    j > position - window when a window is given). Returns None when every key is visible, which
    lets single-token decode skip masking entirely.
    """
    q_pos = torch.arange(length - n_new, length)[:, None]
    k_pos = torch.arange(start, length)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return None if bool(allowed.all()) else allowed


class AttentionMechanism(nn.Module, abc.ABC):
    """The contract every attention mechanism implements.

    Subclasses set ``name``, ``Params`` and ``test_preset`` (knob values that make the mechanism
    genuinely sparse at the conformance suite's lengths, a few hundred tokens) and implement
    :meth:`forward` (causal self-attention ``x_BTC -> y_BTC``; with a cache, decoding),
    :meth:`new_cache`, :meth:`fill_cache` and :meth:`cost`. After each forward, ``self.stats``
    holds detached scalars (at least ``density``) and ``self.aux_losses`` holds differentiable
    scalars the training loop adds to the loss. Most mechanisms derive from
    :class:`QKVAttention`, which supplies Llama-style projections, RoPE and a raw K/V cache;
    mechanisms with their own projections (NSA's per-branch keys and gate) implement the
    contract directly.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type[MechanismParams]] = MechanismParams
    test_preset: ClassVar[dict[str, Any]] = {}
    # attention branches that each read keys for a query: a query at context t reads at most
    # branches * t keys (NSA's selected and window branches may read the same position)
    branches: ClassVar[int] = 1

    def __init__(self, shape: AttentionShape, params: MechanismParams | None = None) -> None:
        super().__init__()
        params = self.Params() if params is None else params
        if not isinstance(params, self.Params):
            raise TypeError(f"{type(self).__name__} expects {self.Params.__name__}, got {params!r}")
        params.validate(shape)
        self.shape = shape
        self.params = params
        # the knobs it was built with: a training phase may override some for its steps
        self.configured_params = params
        self.scale = shape.head_dim**-0.5
        self._deferred_stats: Callable[[], dict[str, torch.Tensor]] | None = None
        self.stats = {}
        self.aux_losses: dict[str, torch.Tensor] = {}

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """Detached scalars of the last forward (at least ``density``); when the forward
        deferred them (:meth:`defer_stats`) they are computed here, on first read."""
        if self._deferred_stats is not None:
            compute, self._deferred_stats = self._deferred_stats, None
            self._stats = compute()
        return self._stats

    @stats.setter
    def stats(self, value: dict[str, torch.Tensor]) -> None:
        self._stats, self._deferred_stats = value, None

    def defer_stats(self, compute: Callable[[], dict[str, torch.Tensor]]) -> None:
        """Make the stats of this forward ``compute()``, run only if someone reads them.

        Diagnostics such as histograms are dozens of tiny ops: a training loop reads them when
        it logs, an inference forward or decode step never does and should not pay for them.
        ``compute`` must only use tensors that this forward created (nothing later mutates).
        """
        self._deferred_stats = compute

    @classmethod
    def dense_limit(cls, seq_len: int) -> dict[str, Any] | None:
        """Knob values under which the mechanism equals dense attention at ``seq_len``, or None."""
        return None

    def set_phase_params(self, overrides: dict[str, Any]) -> None:
        """Use the configured knobs with ``overrides`` (a training phase's, see
        ``data.curriculum``); ``{}`` restores the configured ones. Only the phase knobs may
        differ: those declared ``knob(..., phase=True)`` (the config refuses the others).
        Raises MechanismConfigError for invalid values."""
        params = dataclasses.replace(self.configured_params, **overrides)
        # called before every training step: validate only when the knobs change
        if params != self.params:
            params.validate(self.shape)
            self.params = params

    def set_step(self, step: int) -> None:
        """Training-phase hook: the trainer passes the global step before every training step.

        Mechanisms whose training follows a schedule (DSA's dense warm-up, then sparse
        training) switch phase here; the step should be kept in the module's state so a
        reloaded checkpoint resumes in its phase. The default ignores it.
        """

    def phase_trainable_parameters(self) -> list[nn.Parameter] | None:
        """The only parameters of the whole model allowed to train in the current phase.

        None (the default) restricts nothing. A list freezes every other parameter of the model
        (other layers, embeddings, head included) for the step, as DSA's warm-up trains only
        its indexer; when several layers return lists, their union trains. The model applies
        it after :meth:`set_step` (see ``SparseLM.set_training_step``).
        """
        return None

    @abc.abstractmethod
    def forward(self, x_BTC: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Causal self-attention over ``x_BTC``; with a cache, decode its tokens after the cached.

        Without a cache this is training/prefill. With one, the tokens of ``x_BTC`` are appended
        to the cache and their outputs are returned (feeding a sequence token by token equals the
        full forward).
        """

    @abc.abstractmethod
    def new_cache(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None
    ) -> KVCache:
        """Create an empty decode cache for ``batch_size`` sequences of up to ``max_len`` tokens."""

    @abc.abstractmethod
    def fill_cache(self, x_BTC: torch.Tensor, cache: KVCache) -> None:
        """Append the tokens of ``x_BTC`` to the cache without computing their outputs."""

    @abc.abstractmethod
    def cost(self, t: int) -> Cost:
        """Analytic cost of one query at context ``t`` (t keys causally visible)."""

    def decode_reader(
        self, x_BTC: torch.Tensor, cache: KVCache
    ) -> Callable[[], torch.Tensor] | None:
        """Split a decode step into the part that reads the context and the part that does not.

        Projects the new tokens of ``x_BTC`` and appends them to ``cache`` (work whose size does
        not grow with the context), then returns a function that reads the cache and returns the
        attention output o_BTHD [B, T, HQ, D] before the output projection; calling it once
        completes the step, and ``forward(x_BTC, cache)`` is the output projection of it. The
        ``decode_attn`` bench mode times only that function: at B=1 the projection weights of a
        large model outweigh a long KV cache, so a whole-module decode step hides the attention
        cost the mechanisms differ in. The default returns None (the mechanism does not split
        its step) without touching the cache.
        """
        return None

    def rope_tables(
        self, start: int, length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) [length, D] of the positions start .. start + length - 1, to rotate
        several tensors of the same tokens with one table (``apply_rope``)."""
        return self._angles(torch.arange(start, start + length, device=device))

    def _angles(self, positions_T: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE (cos, sin) [T, D] of the given positions under this shape's theta and rope_dim."""
        s = self.shape
        return rope_angles(positions_T, s.head_dim, s.rope_theta, s.rope_dim)

    def rope(self, x_BTHD: torch.Tensor, start: int) -> torch.Tensor:
        """Apply RoPE to ``x_BTHD`` whose first token sits at absolute position ``start``."""
        return apply_rope(x_BTHD, *self.rope_tables(start, x_BTHD.shape[1], x_BTHD.device))

    def rope_at(self, x_BTHD: torch.Tensor, positions_T: torch.Tensor) -> torch.Tensor:
        """Apply RoPE to ``x_BTHD`` whose tokens sit at the given absolute positions."""
        return apply_rope(x_BTHD, *self._angles(positions_T))

    def attention_flops(self, keys: float) -> float:
        """FLOPs of one query head attending ``keys`` keys: QK^T and PV, 2 FLOPs per MAC."""
        return 4.0 * keys * self.shape.head_dim

    def sdpa(
        self,
        q_BTHD: torch.Tensor,
        k_BSHD: torch.Tensor,
        v_BSHD: torch.Tensor,
        *,
        mask: torch.Tensor | None = None,
        is_causal: bool = False,
    ) -> torch.Tensor:
        """Scaled dot-product attention in the [B, T, H, D] layout with GQA, no K/V repeat.

        Without ``is_causal`` (decoding: a few new queries against a long cache) the G query
        heads of each KV head are folded into the query rows, so each KV head's keys and values
        are streamed once for its whole group; SDPA's own GQA reads them once per query head
        (at 64k cached tokens, 64 query on 4 KV heads of 128: 295 ms against 34 ms folded).
        The mask's rows are repeated per folded head. Causal prefill keeps ``enable_gqa``.
        """
        B, T, HQ, D = q_BTHD.shape
        H, G = k_BSHD.shape[2], self.shape.group_size
        k_BHSD, v_BHSD = k_BSHD.transpose(1, 2), v_BSHD.transpose(1, 2)
        if is_causal or G == 1:
            o_BHTD = nn.functional.scaled_dot_product_attention(
                q_BTHD.transpose(1, 2),
                k_BHSD,
                v_BHSD,
                attn_mask=None if mask is None else mask.to(q_BTHD.device),
                is_causal=is_causal,
                scale=self.scale,
                enable_gqa=G > 1,
            )
            return o_BHTD.transpose(1, 2)
        # rows (t, g) of KV head h: query head h·G + g at new token t
        q_BHYD = q_BTHD.reshape(B, T, H, G, D).permute(0, 2, 1, 3, 4).reshape(B, H, T * G, D)
        mask_YS = None if mask is None else mask.to(q_BTHD.device).repeat_interleave(G, dim=0)
        o_BHYD = nn.functional.scaled_dot_product_attention(
            q_BHYD, k_BHSD, v_BHSD, attn_mask=mask_YS, scale=self.scale
        )
        return o_BHYD.reshape(B, H, T, G, D).permute(0, 2, 1, 3, 4).reshape(B, T, HQ, D)


class QKVAttention(AttentionMechanism):
    """A mechanism over one set of Llama-style projections: Q/K/V/O with RoPE and a raw K/V cache.

    Subclasses implement :meth:`attend` (prefill: RoPE'd q [B,T,HQ,D], k and v [B,T,H,D] ->
    o [B,T,HQ,D]), :meth:`decode` (the newest queries against a filled cache, setting
    ``cache.rows_read``) and :meth:`cost`; a mechanism with extra cache state extends
    :meth:`new_cache` and :meth:`cache_append`.
    """

    def __init__(self, shape: AttentionShape, params: MechanismParams | None = None) -> None:
        super().__init__(shape, params)
        hq, h, d = shape.n_heads, shape.n_kv_heads, shape.head_dim
        self.wq = nn.Linear(shape.d_model, hq * d, bias=False)
        self.wk = nn.Linear(shape.d_model, h * d, bias=False)
        self.wv = nn.Linear(shape.d_model, h * d, bias=False)
        self.wo = nn.Linear(hq * d, shape.d_model, bias=False)

    def project(
        self, x_BTC: torch.Tensor, start: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project ``x_BTC`` to RoPE'd queries [B,T,HQ,D], RoPE'd keys and values [B,T,H,D]."""
        B, T, _ = x_BTC.shape
        s = self.shape
        q_BTHD = self.wq(x_BTC).view(B, T, s.n_heads, s.head_dim)
        k_BTHD = self.wk(x_BTC).view(B, T, s.n_kv_heads, s.head_dim)
        v_BTHD = self.wv(x_BTC).view(B, T, s.n_kv_heads, s.head_dim)
        # fresh projections: rotated in place (no second copy of q), by one angle table
        cos_TD, sin_TD = self.rope_tables(start, T, x_BTC.device)
        q_BTHD = apply_rope(q_BTHD, cos_TD, sin_TD, in_place=True)
        return q_BTHD, apply_rope(k_BTHD, cos_TD, sin_TD, in_place=True), v_BTHD

    def forward(self, x_BTC: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Project, attend (or append to the cache and decode), and project the output back."""
        B, T, _ = x_BTC.shape
        if cache is None:
            q_BTHD, k_BTHD, v_BTHD = self.project(x_BTC, 0)
            o_BTHD = self.attend(q_BTHD, k_BTHD, v_BTHD)
        else:
            o_BTHD = self.decode_reader(x_BTC, cache)()
        return self.wo(o_BTHD.reshape(B, T, -1))

    def decode_reader(self, x_BTC: torch.Tensor, cache: KVCache) -> Callable[[], torch.Tensor]:
        """Project and append the new tokens; the returned function runs :meth:`decode`."""
        q_BTHD, k_BTHD, v_BTHD = self.project(x_BTC, cache.length)
        self.cache_append(cache, k_BTHD, v_BTHD)
        return functools.partial(self.decode, q_BTHD, cache)

    def new_cache(
        self, batch_size: int, max_len: int, *, dtype: torch.dtype | None = None
    ) -> KVCache:
        """A raw K/V cache for ``batch_size`` sequences of up to ``max_len`` tokens."""
        w = self.wk.weight
        return KVCache(
            batch_size,
            max_len,
            self.shape.n_kv_heads,
            self.shape.head_dim,
            dtype=dtype or w.dtype,
            device=w.device,
        )

    def cache_append(self, cache: KVCache, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor) -> None:
        """Append projected keys/values to the cache; mechanisms with extra state extend this."""
        cache.append(k_BTHD, v_BTHD)

    @torch.no_grad()
    def fill_cache(self, x_BTC: torch.Tensor, cache: KVCache) -> None:
        """Append the tokens of ``x_BTC`` to the cache without computing their outputs."""
        _, k_BTHD, v_BTHD = self.project(x_BTC, cache.length)
        self.cache_append(cache, k_BTHD, v_BTHD)

    @abc.abstractmethod
    def attend(
        self, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor
    ) -> torch.Tensor:
        """Causal attention for prefill/training; returns o [B, T, HQ, D] and sets ``stats``."""

    @abc.abstractmethod
    def decode(self, q_BTHD: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Outputs of the newest ``T`` cached tokens' queries; sets ``cache.rows_read``."""


def causal_pairs(T: int) -> int:
    """Number of causal query-key pairs in a length-T sequence, T(T+1)/2."""
    return T * (T + 1) // 2
