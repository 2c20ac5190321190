"""The sparsezoo model family: a Llama-style decoder whose attention comes from the registry.

RMSNorm, RoPE (inside each mechanism), SwiGLU MLP, GQA, optional tied embeddings, and an
optional short causal convolution on each attention input (``model.short_conv``). Each layer's
attention mechanism is picked by name (``attention.layers`` makes hybrids one line), so dense,
sliding-window, NSA, MoBA and DSA models differ only in that choice.

Legend: B batch, T time, C d_model, V vocabulary.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsezoo.config import ExperimentConfig, attention_shape, parse_layer_spec
from sparsezoo.mechanisms.base import AttentionMechanism, KVCache
from sparsezoo.registry import get_mechanism


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (no mean centering, no bias), computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalize the last dimension to unit RMS and scale it."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """Gated MLP: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP."""
        return self.down(F.silu(self.gate(x)) * self.up(x))


@dataclass
class LayerCache:
    """One layer's decode state: its mechanism's KV cache and, with a short convolution, the
    last ``width - 1`` attention inputs [B, width - 1, C] the next token's convolution reads."""

    attn: KVCache
    conv_tail_BWC: torch.Tensor | None = None


class ShortConv(nn.Module):
    """Causal depthwise convolution over time with a residual: y_t = x_t + sum_j w_j * x_(t-j)
    for j = 0..width-1, one weight per channel and tap.

    On an attention input it gives every key the previous tokens' content, so a single
    attention layer can match "the token after an earlier occurrence of mine" (an induction
    copy) without first forming a previous-token head by position (the short convolutions of
    Zoology's MQAR models and of "canon layers"). It mixes only the last ``width`` tokens, so
    which keys a mechanism may attend to is unchanged.
    """

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.width = width
        # tap j of channel c at weight[c, 0, width - 1 - j]: conv1d's cross-correlation order
        self.weight = nn.Parameter(torch.zeros(dim, 1, width))

    def forward(
        self, x_BTC: torch.Tensor, tail_BWC: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y [B, T, C], the new tail): ``tail_BWC`` holds the ``width - 1`` inputs before
        ``x_BTC`` (decoding after a prefix), None for the sequence start (zeros)."""
        B, T, C = x_BTC.shape
        if tail_BWC is None:
            tail_BWC = x_BTC.new_zeros(B, self.width - 1, C)
        padded_BXC = torch.cat([tail_BWC, x_BTC], dim=1)
        mixed_BCT = F.conv1d(padded_BXC.transpose(1, 2), self.weight.to(x_BTC.dtype), groups=C)
        return x_BTC + mixed_BCT.transpose(1, 2), padded_BXC[:, T:]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(conv(norm(x))), then x + mlp(norm(x)); ``conv`` is
    a :class:`ShortConv` of ``conv_width`` taps, or absent (0)."""

    def __init__(
        self, attn: AttentionMechanism, dim: int, hidden: int, eps: float, conv_width: int = 0
    ) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(dim, eps)
        self.conv = ShortConv(dim, conv_width) if conv_width else None
        self.attn = attn
        self.mlp_norm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, hidden)

    def forward(self, x_BTC: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """Run the block; with a cache the attention decodes after the cached tokens."""
        h_BTC = self.attn_norm(x_BTC)
        if self.conv is not None:
            h_BTC, tail_BWC = self.conv(h_BTC, None if cache is None else cache.conv_tail_BWC)
            if cache is not None:
                cache.conv_tail_BWC = tail_BWC
        x_BTC = x_BTC + self.attn(h_BTC, cache=None if cache is None else cache.attn)
        return x_BTC + self.mlp(self.mlp_norm(x_BTC))


def mlp_hidden_size(d_model: int, hidden: int | None) -> int:
    """SwiGLU width: explicit, else 8/3 * d_model rounded up to a multiple of 32 (Llama rule)."""
    if hidden:
        return hidden
    return 32 * math.ceil(8 * d_model / 3 / 32)


class SparseLM(nn.Module):
    """Decoder-only language model with a per-layer choice of attention mechanism.

    Build it with :meth:`from_config`. ``forward(input_ids)`` returns logits; after a forward,
    :meth:`attention_stats` averages the mechanisms' stats over layers (``attn/density``,
    ``attn/<mechanism>/<stat>``) and :meth:`aux_loss` sums their auxiliary losses.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__()
        m = cfg.model
        if m.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (>= 1) before building the model")
        shape = attention_shape(cfg)
        names = parse_layer_spec(cfg.attention.layers, cfg.attention.mechanism, m.n_layers)
        hidden = mlp_hidden_size(m.d_model, m.mlp_hidden)
        blocks = []
        for name in names:
            cls = get_mechanism(name)
            params = cls.Params.from_dict(dict(cfg.attention.params.get(name, {})))
            blocks.append(Block(cls(shape, params), m.d_model, hidden, m.norm_eps, m.short_conv))
        self.layer_mechanisms = names
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        self.blocks = nn.ModuleList(blocks)
        self.norm = RMSNorm(m.d_model, m.norm_eps)
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False)
        if m.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._init_weights(m.init_std, m.n_layers)
        # parameters trainable before any phase froze some (set by set_training_step)
        self._phase_pool: list[nn.Parameter] | None = None

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> SparseLM:
        """Build the model described by a resolved experiment config."""
        return cls(cfg)

    def _init_weights(self, std: float, n_layers: int) -> None:
        # Residual output projections are scaled down with depth (GPT-2 rule) so the residual
        # stream's variance stays flat as layers are added. Short convolutions keep their zero
        # init: each starts as the identity and learns which earlier tokens to mix in.
        for name, p in self.named_parameters():
            if p.dim() < 2 or name.endswith("conv.weight"):
                continue
            scale = (
                1 / math.sqrt(2 * n_layers) if name.endswith(("wo.weight", "down.weight")) else 1
            )
            nn.init.normal_(p, mean=0.0, std=std * scale)

    def forward(
        self, input_ids_BT: torch.Tensor, caches: list[LayerCache] | None = None
    ) -> torch.Tensor:
        """Logits [B, T, V] for ``input_ids``; with per-layer caches, decode after the cached."""
        return self.lm_head(self.hidden_states(input_ids_BT, caches))

    def hidden_states(
        self, input_ids_BT: torch.Tensor, caches: list[LayerCache] | None = None
    ) -> torch.Tensor:
        """The final normalised hidden states [B, T, C], what ``lm_head`` turns into logits.

        A loss on a few positions (passkey answers) applies ``lm_head`` to those rows only:
        the logits of the others, [B, T, V], cost more than the tiny model's layers.
        """
        x_BTC = self.embed(input_ids_BT)
        for i, block in enumerate(self.blocks):
            x_BTC = block(x_BTC, None if caches is None else caches[i])
        return self.norm(x_BTC)

    def new_caches(self, batch_size: int, max_len: int) -> list[LayerCache]:
        """One empty decode cache per layer."""
        return [LayerCache(b.attn.new_cache(batch_size, max_len)) for b in self.blocks]

    def set_training_step(self, step: int) -> None:
        """Pass the global training step to every mechanism, then freeze what its phase asks.

        The trainer calls this before each training step. When any mechanism's
        ``phase_trainable_parameters`` returns a list, only the union of those lists trains
        this step; otherwise every parameter that was trainable at the first call trains again
        (parameters frozen by the user stay frozen). Frozen parameters get no gradient, so the
        optimizer leaves them untouched (no weight decay either). Under DDP, phases that freeze
        parameters need a strategy that allows unused parameters.
        """
        for attn in self.mechanisms():
            attn.set_step(step)
        if self._phase_pool is None:
            self._phase_pool = [p for p in self.parameters() if p.requires_grad]
        declared = [attn.phase_trainable_parameters() for attn in self.mechanisms()]
        restricted = any(params is not None for params in declared)
        allowed = {id(p) for params in declared if params is not None for p in params}
        for p in self._phase_pool:
            p.requires_grad_(not restricted or id(p) in allowed)

    def set_phase_params(self, params: dict[str, dict[str, Any]]) -> None:
        """Give every layer's mechanism the knobs ``params`` holds for it (keyed by mechanism
        name, a curriculum phase's ``attention_params``); a mechanism not named gets its
        configured knobs back."""
        for attn in self.mechanisms():
            attn.set_phase_params(params.get(attn.name, {}))

    def mechanisms(self) -> list[AttentionMechanism]:
        """The attention module of every layer, in order."""
        return [b.attn for b in self.blocks]

    def attention_stats(self) -> dict[str, float]:
        """Stats of the last forward averaged over layers, under stable metric keys.

        ``attn/density`` averages every layer's density (dense layers count as 1); other stats
        are averaged over the layers of the mechanism that reports them.
        """
        return _layer_average(
            ("attn/density" if stat == "density" else f"attn/{attn.name}/{stat}", float(value))
            for attn in self.mechanisms()
            for stat, value in attn.stats.items()
        )

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of all layers' auxiliary losses from the last forward (None if there are none)."""
        losses = [v for attn in self.mechanisms() for v in attn.aux_losses.values()]
        return torch.stack(losses).sum() if losses else None

    def aux_loss_terms(self) -> dict[str, float]:
        """Auxiliary losses of the last forward, layer-averaged, keyed ``attn/<mech>/<name>``."""
        return _layer_average(
            (f"attn/{attn.name}/{name}", float(value.detach()))
            for attn in self.mechanisms()
            for name, value in attn.aux_losses.items()
        )


def _layer_average(pairs: Iterable[tuple[str, float]]) -> dict[str, float]:
    """Average values sharing a key (one value per layer that reports it)."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for key, value in pairs:
        sums[key] += value
        counts[key] += 1
    return {k: sums[k] / counts[k] for k in sums}
