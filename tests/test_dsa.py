"""DSA mechanism: validation, stages and the training-phase hook, gradient isolation, the KL
target, stats, decoding reads, cost model, and a warm-up-then-sparse training run."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

import sparsezoo
from sparsezoo.config import load_config
from sparsezoo.kernels.dsa import indexer
from sparsezoo.kernels.rope import apply_rope, rope_angles
from sparsezoo.mechanisms import MechanismConfigError
from sparsezoo.mechanisms import dsa as dsa_module
from sparsezoo.mechanisms.base import causal_pairs
from sparsezoo.mechanisms.dsa import DeepSeekSparseAttention, DSACache
from sparsezoo.model import SparseLM
from sparsezoo.testing import check_mechanism
from sparsezoo.train import train

SPARSE = {"topk": 16, "warmup_steps": 0, "index_heads": 2, "index_dim": 8, "index_rope_dim": 4}


def _dsa(d_model: int = 64, n_heads: int = 4, n_kv_heads: int = 2, **params: object):
    torch.manual_seed(0)
    attn = sparsezoo.build_attention(
        "dsa", d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, **params
    )
    assert isinstance(attn, DeepSeekSparseAttention)
    return attn


def _x(B: int = 2, T: int = 80, C: int = 64) -> torch.Tensor:
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"topk": 0}, "topk=0 is below the minimum 1"),
        ({"index_heads": 0}, "index_heads=0 is below the minimum 1"),
        ({"index_dim": 1}, "index_dim=1 is below the minimum 2"),
        ({"index_rope_dim": 3}, "index_rope_dim=3 must be even"),
        ({"index_dim": 16, "index_rope_dim": 32}, "index_rope_dim=32 must be <= index_dim=16"),
        ({"sharing": "per_head"}, "sharing='per_head' is not allowed"),
        ({"stage": "dense"}, "stage='dense' is not allowed; choose one of"),
        ({"warmup_steps": -1}, "warmup_steps=-1 is below the minimum 0"),
        ({"kl_coef": 0.0}, "kl_coef=0.0 must be > 0"),
        ({"kl_coef": -1.0}, "kl_coef=-1.0 is below the minimum 0.0"),
        ({"backend": "cuda"}, "backend='cuda' is not allowed"),
    ],
)
def test_validation_names_the_knob(params: dict, message: str) -> None:
    with pytest.raises(MechanismConfigError, match=message.replace("(", r"\(")):
        _dsa(**params)


def test_stage_switch_follows_the_step_and_survives_a_state_dict() -> None:
    attn = _dsa(warmup_steps=3)
    assert attn.stage == "warmup"
    assert {id(p) for p in attn.phase_trainable_parameters()} == {
        id(p) for p in attn.indexer.parameters()
    }
    attn.set_step(3)
    assert attn.stage == "sparse" and attn.phase_trainable_parameters() is None
    reloaded = _dsa(warmup_steps=3)
    reloaded.load_state_dict(attn.state_dict())
    assert reloaded.stage == "sparse"


@pytest.mark.parametrize("pinned", ["warmup", "sparse"])
def test_pinned_stage_ignores_the_step(pinned: str) -> None:
    """``stage: warmup`` / ``sparse`` hold at every step (auto switches at warmup_steps), and
    the pinned stage decides what trains and how the forward attends."""
    attn = _dsa(**{**SPARSE, "warmup_steps": 3, "stage": pinned})
    for step in (0, 2, 3, 10**9):
        attn.set_step(step)
        assert attn.stage == pinned
    trainable = attn.phase_trainable_parameters()
    if pinned == "warmup":
        assert {id(p) for p in trainable} == {id(p) for p in attn.indexer.parameters()}
    else:
        assert trainable is None
    attn.set_step(0)
    with torch.no_grad():
        attn(_x(1, 60))
    assert (float(attn.stats["density"]) == 1.0) == (pinned == "warmup")


def test_curriculum_phase_pins_the_stage() -> None:
    """``stage`` is a phase knob: a curriculum phase's attention_params pin it, and leaving the
    phase gives the configured ``auto`` back."""
    model = _tiny_lm("dsa", "dsa", warmup_steps=100)
    model.set_phase_params({"dsa": {"stage": "sparse"}})
    model.set_training_step(0)
    assert [b.attn.stage for b in model.blocks] == ["sparse", "sparse"]
    assert all(p.requires_grad for p in model.parameters())
    model.set_phase_params({})
    model.set_training_step(1)
    assert [b.attn.stage for b in model.blocks] == ["warmup", "warmup"]
    assert {id(p) for p in model.parameters() if p.requires_grad} == {
        id(p) for b in model.blocks for p in b.attn.indexer.parameters()
    }


def _tiny_lm(*layers: str, **params: object) -> SparseLM:
    cfg = load_config(
        None,
        [
            "model.vocab_size=50",
            "model.d_model=32",
            "model.n_layers=2",
            "model.n_heads=2",
            "model.n_kv_heads=1",
            f"attention.layers={','.join(layers)}",
            *(f"attention.params.dsa.{k}={v}" for k, v in params.items()),
        ],
    )
    torch.manual_seed(0)
    return SparseLM.from_config(cfg)


def test_training_step_hook_freezes_all_but_the_indexer_during_warmup() -> None:
    """SparseLM.set_training_step: warm-up trains only DSA indexers (of every DSA layer),
    everything trains after, and a parameter the user froze stays frozen throughout."""
    model = _tiny_lm("dsa", "dense", warmup_steps=2)
    model.embed.weight.requires_grad_(False)  # frozen by the user
    indexer = {id(p) for p in model.blocks[0].attn.indexer.parameters()}
    for step in (0, 1):
        model.set_training_step(step)
        trainable = {id(p) for p in model.parameters() if p.requires_grad}
        assert trainable == indexer
    model.set_training_step(2)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in model.parameters()} - {id(model.embed.weight)}
    assert model.blocks[0].attn.stage == "sparse"


def test_training_step_hook_changes_nothing_for_mechanisms_without_phases() -> None:
    model = _tiny_lm("dense", "sliding_window")
    before = [p.requires_grad for p in model.parameters()]
    model.set_training_step(5)
    assert [p.requires_grad for p in model.parameters()] == before


def test_warmup_optimizer_step_updates_only_the_indexer() -> None:
    """One AdamW step (weight decay on) in warm-up moves indexer weights and nothing else."""
    model = _tiny_lm("dsa", "dsa", warmup_steps=5, topk=4)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.set_training_step(0)
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = model(ids)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()) + model.aux_loss()
    loss.backward()
    opt.step()
    for name, p in model.named_parameters():
        moved = not torch.equal(p.detach(), before[name])
        assert moved == (".indexer." in name), name


def _grads(loss: torch.Tensor, module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named gradients of ``loss`` that exist and are non-zero (x included as 'x')."""
    named = [("x", x), *module.named_parameters()]
    grads = torch.autograd.grad(loss, [t for _, t in named], allow_unused=True, retain_graph=True)
    return {n: g for (n, _), g in zip(named, grads, strict=True) if g is not None and g.any()}


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
@pytest.mark.parametrize("sharing", ["shared", "kv_group"])
def test_gradient_isolation(stage: str, sharing: str) -> None:
    """LM side: the output's gradient reaches x and the attention weights, never the indexer
    (no gradient through top-k, indexer input detached). KL side: the aux loss reaches only
    the indexer (detached target, detached input)."""
    attn = _dsa(**{**SPARSE, "warmup_steps": 1 if stage == "warmup" else 0, "sharing": sharing})
    assert attn.stage == stage
    x = _x().requires_grad_()
    y = attn.train()(x)
    indexer = {f"indexer.{n}" for n, _ in attn.indexer.named_parameters()}
    lm = _grads((y * torch.randn_like(y)).sum(), attn, x)
    assert set(lm) == {"x", "wq.weight", "wk.weight", "wv.weight", "wo.weight"}
    kl = _grads(attn.aux_losses["indexer_kl"], attn, x)
    assert set(kl) == indexer


def test_kl_target_is_the_head_averaged_probability_not_logits() -> None:
    """In warm-up the KL equals one computed by hand from p = mean over heads of softmax
    (not softmax of the summed logits) against softmax of the dense indexer scores."""
    attn = _dsa(n_kv_heads=1, topk=8, warmup_steps=5, index_heads=2, index_dim=8, index_rope_dim=4)
    x = _x(1, 20)
    attn.train()(x)
    with torch.no_grad():
        q, k, _, (q_idx, k_idx, w) = attn._project(x, 0)
        scores = torch.einsum("bthd,bshd->bhts", q, k.expand(-1, -1, 4, -1)) * attn.scale
        causal = torch.ones(20, 20, dtype=torch.bool).tril()
        p = scores.masked_fill(~causal, float("-inf")).softmax(-1).mean(1)
        index = torch.einsum("btne,bse->btns", q_idx, k_idx).relu()
        index = torch.einsum("btn,btns->bts", w, index) * attn.index_scale
        log_q = index.masked_fill(~causal, float("-inf")).log_softmax(-1)
        kl = torch.where(causal, p * (p.clamp_min(1e-30).log() - log_q), 0.0).sum(-1).mean()
        wrong = scores.mean(1).masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(attn.stats["kl"], kl)
    assert not torch.allclose(wrong, p, atol=1e-3)  # the logit-sum target would differ


@pytest.mark.parametrize("sharing", ["shared", "kv_group"])
def test_warmup_kl_by_checkpointed_chunks_equals_one_chunk(
    monkeypatch: pytest.MonkeyPatch, sharing: str
) -> None:
    """Long warm-up sequences compute the KL by checkpointed query chunks: same KL, recall
    and indexer gradients as one chunk."""
    results = []
    for chunk_elements in (1 << 22, 2000):
        monkeypatch.setattr(dsa_module, "_CHUNK_ELEMENTS", chunk_elements)
        attn = _dsa(**{**SPARSE, "warmup_steps": 5, "sharing": sharing}).train()
        attn(_x(2, 60))
        kl = attn.aux_losses["indexer_kl"]
        grads = torch.autograd.grad(kl, list(attn.indexer.parameters()))
        results.append([kl, attn.stats["recall"], *grads])
    for one, chunked in zip(*results, strict=True):
        torch.testing.assert_close(chunked, one)


def test_stats_density_recall_and_kl_coefficient() -> None:
    attn = _dsa(**{**SPARSE, "kl_coef": 0.5}).train()
    T = 80
    attn(_x(2, T))
    st = attn.stats
    expected = sum(min(16, t + 1) for t in range(T)) / causal_pairs(T)
    assert float(st["density"]) == pytest.approx(expected)
    assert 0 < float(st["recall"]) < 1 and float(st["kl"]) > 0 and float(st["stage"]) == 1.0
    torch.testing.assert_close(attn.aux_losses["indexer_kl"], 0.5 * st["kl"])
    # k >= T selects everything: density 1, all attention mass recalled
    full = _dsa(**{**SPARSE, "topk": T}).train()
    full(_x(2, T))
    assert float(full.stats["density"]) == 1.0
    assert float(full.stats["recall"]) == pytest.approx(1.0, abs=1e-5)
    # eval mode: no aux loss, no KL work
    attn.eval()(_x(2, T))
    assert attn.aux_losses == {} and set(attn.stats) == {"density", "stage"}


def test_indexer_rope_is_non_interleaved_on_the_leading_dims() -> None:
    """The first index_rope_dim dims of q_idx and k_idx are rotated rotate-half style at the
    token's position; the rest pass through unrotated."""
    attn = _dsa(index_heads=2, index_dim=8, index_rope_dim=4)
    x = _x(1, 5)
    q_idx, k_idx, _ = attn.indexer(x, 3)
    with torch.no_grad():
        raw_q = attn.indexer.wq(x).view(1, 5, 2, 8)
        raw_k = attn.indexer.k_norm(attn.indexer.wk(x)).view(1, 5, 1, 8)
        cos, sin = rope_angles(torch.arange(3, 8), 4)
    torch.testing.assert_close(q_idx[..., :4], apply_rope(raw_q[..., :4], cos, sin))
    torch.testing.assert_close(q_idx[..., 4:], raw_q[..., 4:])
    torch.testing.assert_close(k_idx[..., :4], apply_rope(raw_k[..., :4], cos, sin)[:, :, 0])
    # rotate-half pairs dims (i, i + 2); an interleaved rotation pairs (2i, 2i + 1) instead
    angle = 3.0  # position 3, first frequency
    x0, x2 = raw_q[0, 0, 0, 0], raw_q[0, 0, 0, 2]
    torch.testing.assert_close(q_idx[0, 0, 0, 0], x0 * math.cos(angle) - x2 * math.sin(angle))


@pytest.mark.parametrize("sharing", ["shared", "kv_group"])
def test_kv_group_and_shared_modes_conform(sharing: str) -> None:
    """Both sharing modes pass every conformance check at the preset's sparsity."""
    check_mechanism("dsa", {**DeepSeekSparseAttention.test_preset, "sharing": sharing}, T=301)


def test_per_group_selection_differs_between_groups() -> None:
    attn = _dsa(**{**SPARSE, "sharing": "kv_group"})
    with torch.no_grad():
        q_idx, k_idx, w = attn.indexer(_x(1, 60), 0)
    assert w.shape == (1, 60, 2, 2)
    idx = sparsezoo.kernels.dsa.indexer_topk(q_idx, k_idx, w, 16)
    assert idx.shape == (1, 60, 2, 16) and not torch.equal(idx[:, :, 0], idx[:, :, 1])


@pytest.mark.parametrize(
    ("sharing", "context"), [("shared", 300), ("kv_group", 300), ("shared", 9)]
)
def test_decode_reads_only_selected_rows(
    monkeypatch: pytest.MonkeyPatch, sharing: str, context: int
) -> None:
    """One decode step reads min(k, context) K/V rows per KV head; the cache keeps the
    indexer keys of every token, row-major, scored where they lie (no copy), and each token's
    K and V side by side in one storage (the layout sparse_attention gathers whole tokens
    from)."""
    scored: list[torch.Tensor] = []
    score = indexer._few_query_scores

    def recording(q_CNE: torch.Tensor, k_PE: torch.Tensor, w_CUN: torch.Tensor) -> torch.Tensor:
        scored.append(k_PE)
        return score(q_CNE, k_PE, w_CUN)

    monkeypatch.setattr(indexer, "_few_query_scores", recording)
    attn = _dsa(**{**SPARSE, "sharing": sharing}).eval()
    cache = attn.new_cache(2, context)
    assert isinstance(cache, DSACache)
    H, D = cache.k_BSHD.shape[2:]
    assert cache.k_BSHD.untyped_storage().data_ptr() == cache.v_BSHD.untyped_storage().data_ptr()
    assert cache.k_BSHD.stride(1) == 2 * H * D
    assert cache.v_BSHD.storage_offset() - cache.k_BSHD.storage_offset() == H * D
    x = _x(2, context)
    with torch.no_grad():
        attn.fill_cache(x[:, :-1], cache)
        attn(x[:, -1:], cache=cache)
    assert cache.rows_read == min(16, context)
    assert cache.k_idx_BSE.dtype == torch.float32 and cache.k_idx_BSE[:, : context - 1].any()
    assert cache.k_idx_BSE.is_contiguous()
    # past k tokens each sequence's step scores the cache's own keys, its newest included
    assert [(k.data_ptr(), k.shape[0]) for k in scored] == (
        [(cache.k_idx_BSE[b].data_ptr(), context) for b in range(2)] if context > 16 else []
    )
    expected_density = min(16, context) / context
    assert float(attn.stats["density"]) == pytest.approx(expected_density)


def test_warmup_decoding_is_dense() -> None:
    attn = _dsa(**{**SPARSE, "warmup_steps": 10}).eval()
    cache = attn.new_cache(1, 100)
    with torch.no_grad():
        attn.fill_cache(_x(1, 99), cache)
        attn(_x(1, 1), cache=cache)
    assert cache.rows_read == 100


def test_cost_model() -> None:
    """Sparse past k tokens: k K/V rows, FLOPs add the indexer, shared by the query heads; up
    to k tokens a query attends all of them unscored (as the forward and decode steps do: no
    indexer), and in warm-up: dense."""
    attn = _dsa(d_model=1024, n_heads=16, n_kv_heads=1, topk=2048, warmup_steps=0)
    for t in (100, 2048, 2049, 32768):
        cost = attn.cost(t)
        assert cost.keys == min(t, 2048)
        index = 2 * t * 4 * (64 + 1) / 16 if t > 2048 else 0.0
        assert cost.flops == pytest.approx(4 * cost.keys * 64 + index)
        assert cost.side_rows == (t * 64 / (2 * 64) if t > 2048 else 0.0)
    # the indexer costs f = H_I·d_I / (2·h·D) = 1/8 of dense attention per visible key
    assert attn.cost(32768).flops - attn.attention_flops(2048) == pytest.approx(
        attn.attention_flops(32768) / 8, rel=0.02
    )
    assert _dsa(warmup_steps=1).cost(5000).keys == 5000
    # the indexer keys a decode step reads: E = 64 numbers per token for all of the KV heads
    wide = _dsa(n_heads=4, n_kv_heads=4, head_dim=128, topk=2048, warmup_steps=0)
    assert wide.cost(65536).side_rows == 65536 * 64 / (2 * 4 * 128)
    assert 65536 / wide.cost(65536).rows == pytest.approx(10.67, abs=0.01)  # issue 5's bound
    assert _dsa(warmup_steps=1).cost(5000).side_rows == 0


@pytest.mark.parametrize(
    ("name", "topk", "dims"), [("dsa", 2048, (4, 64)), ("dsa_cpu", 64, (4, 16))]
)
def test_mechanism_configs_build(name: str, topk: int, dims: tuple[int, int]) -> None:
    """The paper (k = 2048, indexer 4 x 64) and CPU configs build DSA layers."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    small = ["model.vocab_size=64", "model.d_model=64", "model.n_layers=1", "model.n_heads=2"]
    cfg = load_config(configs / "mechanism" / f"{name}.yaml", [*small, "model.n_kv_heads=1"])
    model = SparseLM.from_config(cfg)
    attn = model.blocks[0].attn
    assert isinstance(attn, DeepSeekSparseAttention)
    assert attn.params.topk == topk and (attn.params.index_heads, attn.params.index_dim) == dims
    assert attn.params.sharing == "shared" and attn.params.warmup_steps > 0


class _StartFrom(Callback):
    """Load a dense run's weights into the model at fit start (the indexer keeps its init)."""

    def __init__(self, checkpoint: Path) -> None:
        self.state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        missing, unexpected = pl_module.load_state_dict(self.state, strict=False)
        assert not unexpected and all(".indexer." in m or "_extra_state" in m for m in missing)


@pytest.mark.slow
def test_tiny_dsa_warms_up_then_trains_sparse(tmp_path: Path, data_cache: Path) -> None:
    """The paper's recipe on CPU: from a dense model trained for 60 steps, 30 warm-up steps
    (attention dense, only the indexer trains: the LM loss holds, the indexer's KL falls),
    then sparse training at density ~0.4 where the LM loss keeps falling; metrics in MLflow."""
    configs = Path(__file__).resolve().parents[1] / "configs"
    parts = ("model/tiny", "data/stdlib", "train/cpu", "mechanism/dsa_cpu")
    experiment = tmp_path / "dsa.yaml"
    experiment.write_text("include:\n" + "".join(f"  - {configs / p}.yaml\n" for p in parts))
    common = [
        "data.max_bytes=1500000",
        "data.vocab_size=1024",
        "data.seq_len=256",
        f"data.cache_dir={data_cache}",
        "train.batch_size=8",
        "train.log_every=5",
        "train.threads=1",
        "train.progress_bar=false",
        f"output_dir={tmp_path / 'runs'}",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    dense = train(
        load_config(
            experiment,
            [*common, "experiment=dense", "attention.mechanism=dense", "train.max_steps=60"],
        )
    )
    cfg = load_config(
        experiment,
        [
            *common,
            "experiment=dsa",
            "attention.params.dsa.warmup_steps=30",
            "train.max_steps=90",
            "train.val_every=90",
        ],
    )
    train(cfg, callbacks=[_StartFrom(dense.checkpoint)])
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("dsa").experiment_id])[0]

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    def mean(key: str, lo: int, hi: int) -> float:
        values = [v for step, v in history(key) if lo <= step < hi]
        return sum(values) / len(values)

    stage = dict(history("attn/dsa/stage"))
    assert all(v == 0.0 for s, v in stage.items() if s < 30) and stage[max(stage)] == 1.0
    # warm-up: the model is frozen, so the LM loss holds while the indexer's KL falls
    kl = history("attn/dsa/indexer_kl")
    assert mean("attn/dsa/indexer_kl", 20, 30) < 0.5 * kl[0][1], kl
    # (batches differ, so the frozen model's loss moves by ~0.1 from step to step)
    assert abs(mean("train/loss", 20, 30) - mean("train/loss", 0, 10)) < 0.25, history("train/loss")
    # sparse training: the LM keeps learning at density ~0.4
    assert mean("train/loss", 75, 90) < mean("train/loss", 20, 30) - 0.15, history("train/loss")
    assert run.data.metrics["attn/density"] < 0.5
    assert 0 < run.data.metrics["attn/dsa/recall"] <= 1
    assert run.data.metrics["val/loss"] < dense.metrics["val/loss"]
