"""Eval suites on tiny models: scoring against hand-made oracles, determinism, batching,
models built past the trained length, mechanisms that cannot run there, config validation."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from sparsezoo import registry, tracking
from sparsezoo.ablate import load_ablation
from sparsezoo.config import (
    EVAL_SUITES,
    ConfigError,
    ExperimentConfig,
    attention_shape,
    load_config,
)
from sparsezoo.data.dataset import TOKEN_DTYPE
from sparsezoo.data.synthetic import NEEDLE_MARKER, QUERY_MARKER
from sparsezoo.eval import SUITES, CannotRun, EvalContext, evaluate_model
from sparsezoo.eval.extrapolation import run as run_extrapolation
from sparsezoo.eval.loss_by_position import loss_by_position_task
from sparsezoo.eval.mqar import mqar_task
from sparsezoo.eval.passkey import passkey_task
from sparsezoo.eval.runner import TAG_CANNOT_RUN
from sparsezoo.mechanisms.dense import DenseAttention
from sparsezoo.model import SparseLM
from sparsezoo.registry import get_mechanism
from sparsezoo.train import token_losses

VOCAB = 64
TINY = [
    f"model.vocab_size={VOCAB}",
    "model.d_model=32",
    "model.n_layers=2",
    "model.n_heads=2",
    "model.n_kv_heads=1",
    "data.seq_len=64",
    "eval.batch_size=3",
]


def tiny_cfg(*overrides: str) -> ExperimentConfig:
    """A validated config of a 2-layer model at a 64-token training length."""
    return load_config(None, [*TINY, *overrides])


class LogitsOracle(nn.Module):
    """A hand-written stand-in for SparseLM: ``forward`` gives the logits, which are also its
    hidden states (the eval applies ``lm_head``, here the identity, to those it needs)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the context a device
        self.lm_head = nn.Identity()

    def hidden_states(self, ids_BT: torch.Tensor) -> torch.Tensor:
        """The logits of ``forward``."""
        return self(ids_BT)


class PasskeyOracle(LogitsOracle):
    """Copies the passkey from the needle, like a perfect retrieval model.

    Sees the needle only when the query is at most ``reach`` tokens after it (a sliding-window
    caricature); ``shift`` copies the digit that many places later (an off-by-one model).
    """

    def __init__(
        self, passkey_len: int, reach: int = 10**9, shift: int = 0, slip: int | None = None
    ) -> None:
        super().__init__()
        self.k, self.reach, self.shift, self.slip = passkey_len, reach, shift, slip

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        B, T = ids_BT.shape
        logits_BTV = torch.zeros(B, T, VOCAB)
        for b in range(B):
            row = ids_BT[b].tolist()
            needle = next(i for i in range(T) if tuple(row[i : i + 2]) == NEEDLE_MARKER)
            query = row.index(QUERY_MARKER)
            if query - needle > self.reach:
                continue
            digits = row[needle + 2 : needle + 2 + self.k]
            for j in range(self.k):
                # answer step ``slip`` copies the digit after the right one (a slipped copy)
                shift = self.shift + (j == self.slip)
                logits_BTV[b, query + j, digits[(j + shift) % self.k]] = 1.0
        return logits_BTV


class InductionOracle(LogitsOracle):
    """Predicts the token that followed the latest earlier occurrence of the current token."""

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        B, T = ids_BT.shape
        logits_BTV = torch.zeros(B, T, VOCAB)
        for b in range(B):
            last: dict[int, int] = {}
            row = ids_BT[b].tolist()
            for t, token in enumerate(row):
                if token in last:
                    logits_BTV[b, t, row[last[token] + 1]] = 1.0
                last[token] = t
        return logits_BTV


def context(model: nn.Module, cfg: ExperimentConfig, val_path: Path | None = None) -> EvalContext:
    return EvalContext(model, cfg, lambda: val_path, "test")  # type: ignore[arg-type]


def test_passkey_perfect_retrieval_scores_one_everywhere() -> None:
    cfg = tiny_cfg("eval.passkey.depths=[0,50,100]", "eval.passkey.samples=5")
    result = passkey_task(context(PasskeyOracle(5), cfg), [48, 64])
    cells = {f"L{n}/D{d}" for n in (48, 64) for d in (0, 50, 100)}
    assert cells <= set(result.metrics)
    assert all(result.metrics[c] == 1.0 for c in cells)
    assert result.metrics["acc"] == result.metrics["min_acc"] == 1.0
    assert result.headline == {48: 1.0, 64: 1.0}
    assert result.metrics["L64/acc"] == 1.0
    assert set(result.figures) == {"passkey_heatmap"}


def test_passkey_eval_uses_distinct_digits_when_training_did() -> None:
    seen: list[torch.Tensor] = []

    class Recording(PasskeyOracle):
        def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
            seen.append(ids_BT[:, -5:])
            return super().forward(ids_BT)

    for distinct in (False, True):
        seen.clear()
        cfg = tiny_cfg(
            "eval.passkey.samples=32",
            "eval.passkey.depths=[50]",
            f"data.passkey_distinct={distinct}",
        )
        result = passkey_task(context(Recording(5), cfg), [64])
        assert result.metrics["L64/D50"] == 1.0
        repeats = sum(len(set(row)) < 5 for batch in seen for row in batch.tolist())
        assert (repeats == 0) == distinct


def test_passkey_off_by_one_digits_score_zero() -> None:
    cfg = tiny_cfg("eval.passkey.depths=[0,100]", "eval.passkey.samples=6")
    result = passkey_task(context(PasskeyOracle(5, shift=1), cfg), [64])
    assert result.metrics["acc"] == 0.0


def test_passkey_digit_accuracy_tells_a_slipped_copy_from_a_missed_needle() -> None:
    """One wrong digit of five fails exact match but keeps 4/5 of the digits; a needle out of
    reach gets none right, a perfect copy all (distinct digits: a shifted digit is wrong)."""
    cfg = tiny_cfg(
        "eval.passkey.depths=[0,100]", "eval.passkey.samples=6", "data.passkey_distinct=true"
    )
    cases = {PasskeyOracle(5, slip=3): 0.8, PasskeyOracle(5, shift=1): 0.0, PasskeyOracle(5): 1.0}
    for oracle, digit_acc in cases.items():
        result = passkey_task(context(oracle, cfg), [48, 64])
        assert result.metrics["acc"] == (1.0 if digit_acc == 1.0 else 0.0)
        assert result.metrics["L48/digit_acc"] == pytest.approx(digit_acc)
        assert result.metrics["digit_acc"] == pytest.approx(digit_acc)
    local = passkey_task(context(PasskeyOracle(5, reach=16), cfg), [64])
    assert local.metrics["digit_acc"] == pytest.approx(0.5)  # depth 100% right, 0% not


def test_passkey_local_model_fails_only_at_far_depths() -> None:
    # at length 64 the needle at depth 100% is 7 tokens before the query, at 0% about 58
    cfg = tiny_cfg("eval.passkey.depths=[0,50,100]", "eval.passkey.samples=4")
    result = passkey_task(context(PasskeyOracle(5, reach=16), cfg), [64])
    assert result.metrics["L64/D0"] == 0.0
    assert result.metrics["L64/D50"] == 0.0
    assert result.metrics["L64/D100"] == 1.0
    assert result.metrics["min_acc"] == 0.0
    assert result.metrics["acc"] == pytest.approx(1 / 3)


def test_mqar_perfect_recall_and_metric_names() -> None:
    cfg = tiny_cfg("eval.mqar.n_pairs=[2,8]", "eval.mqar.samples=5")
    result = mqar_task(context(InductionOracle(), cfg), [32, 64])
    for name in ("L32/KV2", "L32/KV8", "L64/KV2", "L64/KV8", "KV2/acc", "KV8/acc", "L64/acc"):
        assert result.metrics[name] == 1.0, name
    assert result.metrics["acc"] == 1.0
    assert set(result.figures) == {"mqar_heatmap"}


def test_mqar_random_model_is_near_chance() -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg("eval.mqar.n_pairs=[4]", "eval.mqar.samples=8")
    result = mqar_task(context(SparseLM.from_config(cfg), cfg), [64])
    assert result.metrics["acc"] < 0.2


@pytest.fixture
def val_tokens(tmp_path: Path) -> Path:
    """A held-out token file of random ids below the tiny vocabulary."""
    path = tmp_path / "val.bin"
    np.random.default_rng(0).integers(0, VOCAB, 5000).astype(TOKEN_DTYPE).tofile(path)
    return path


def test_loss_by_position_buckets_average_to_the_length_loss(val_tokens: Path) -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg("eval.loss_by_position.buckets=4", "eval.loss_by_position.samples=5")
    model = SparseLM.from_config(cfg)
    result = loss_by_position_task(context(model, cfg, val_tokens), [64])
    buckets = [result.metrics[f"L64/P{p}"] for p in (0, 16, 32, 48)]
    assert result.metrics["L64/loss"] == pytest.approx(sum(buckets) / 4, rel=1e-5)
    assert result.metrics["loss"] == result.metrics["L64/loss"]
    # an untrained model is near uniform over the vocabulary
    assert result.metrics["loss"] == pytest.approx(np.log(VOCAB), rel=0.1)
    assert set(result.figures) == {"loss_by_position"}


def test_scoring_is_batched_deterministic_and_leaves_the_model_as_it_was() -> None:
    torch.manual_seed(0)
    cfg = tiny_cfg("eval.passkey.depths=[0,50,100]", "eval.passkey.samples=3")
    model = SparseLM.from_config(cfg).train()
    ids = torch.randint(0, VOCAB, (7, 64))
    one = context(model, tiny_cfg("eval.batch_size=1"))
    seven = context(model, tiny_cfg("eval.batch_size=7"))
    assert torch.equal(one.predictions(ids, [5, 63]), seven.predictions(ids, [5, 63]))
    labels = torch.randint(0, VOCAB, (7, 64))
    losses = one.losses(ids, labels)
    with torch.no_grad():
        logits = model.eval()(ids)
        expected = token_losses(logits, labels)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=1e-5)
    # predictions apply the head at the asked positions only: the argmax of the full logits
    assert torch.equal(one.predictions(ids, [5, 63]), logits[:, [5, 63]].argmax(-1))
    model.train()
    first = passkey_task(context(model, cfg), [64]).metrics
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert passkey_task(context(model, cfg), [64]).metrics == first


def test_cells_have_distinct_stable_seeds() -> None:
    ctx = context(PasskeyOracle(5), tiny_cfg())
    assert ctx.seed("passkey", 64, 0) == ctx.seed("passkey", 64, 0)
    seeds = {ctx.seed("passkey", n, d) for n in (64, 128) for d in (0, 50, 100)}
    assert len(seeds) == 6
    other = context(PasskeyOracle(5), tiny_cfg("eval.seed=7"))
    assert other.seed("passkey", 64, 0) != ctx.seed("passkey", 64, 0)


def test_model_past_the_trained_length_shares_the_weights() -> None:
    cfg = tiny_cfg()
    model = SparseLM.from_config(cfg)
    ctx = context(model, cfg)
    assert ctx.model_at(64) is model
    longer = ctx.model_at(256)
    assert longer is ctx.model_at(256)
    assert longer.mechanisms()[0].shape.max_seq_len == 256
    assert model.mechanisms()[0].shape.max_seq_len == 64
    assert longer.embed.weight.data_ptr() == model.embed.weight.data_ptr()


def test_extrapolation_runs_every_task_at_every_factor(val_tokens: Path) -> None:
    cfg = tiny_cfg(
        "eval.suites=[extrapolation]",
        "eval.extrapolation.tasks=[passkey,mqar,loss_by_position]",
        "eval.passkey.depths=[0,100]",
        "eval.passkey.samples=2",
        "eval.mqar.n_pairs=[4]",
        "eval.mqar.samples=2",
        "eval.loss_by_position.samples=2",
    )
    out = run_extrapolation(context(SparseLM.from_config(cfg), cfg, val_tokens))
    for task, name in (("passkey", "acc"), ("mqar", "acc"), ("loss_by_position", "loss")):
        for factor in (2, 4):
            assert f"eval/extrapolation/{task}/x{factor}/{name}" in out.metrics
    assert "eval/extrapolation/passkey/L256/D100" in out.metrics
    assert "eval/extrapolation/loss_by_position/L128/P0" in out.metrics
    assert "eval/passkey/acc" not in out.metrics
    assert out.skipped == {}
    assert set(out.figures) == {
        "extrapolation_passkey_heatmap",
        "extrapolation_mqar_heatmap",
        "extrapolation_loss_by_position",
    }


class ShortDense(DenseAttention):
    """Dense attention that refuses sequences longer than 100 tokens."""

    def attend(
        self, q_BTHD: torch.Tensor, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor
    ) -> torch.Tensor:
        if q_BTHD.shape[1] > 100:
            raise ValueError(f"sequence of {q_BTHD.shape[1]} tokens is longer than 100")
        return super().attend(q_BTHD, k_BTHD, v_BTHD)


@pytest.fixture
def short_dense() -> Iterator[str]:
    """The ShortDense mechanism, registered for one test."""
    registry.register_mechanism("short_dense_eval")(ShortDense)
    yield "short_dense_eval"
    registry._registered.pop("short_dense_eval", None)


def test_a_mechanism_that_cannot_run_at_a_length_is_reported(short_dense: str) -> None:
    cfg = tiny_cfg(
        f"attention.mechanism={short_dense}",
        "eval.suites=[extrapolation]",
        "eval.extrapolation.factors=[2,4]",
        "eval.passkey.depths=[0,100]",
        "eval.passkey.samples=2",
        "eval.extrapolation.tasks=[passkey]",
    )
    ctx = EvalContext(SparseLM.from_config(cfg), cfg, lambda: Path(), short_dense)
    out = run_extrapolation(ctx)
    # 2 x 64 = 128 and 4 x 64 = 256 are both past the mechanism's limit
    assert set(out.skipped) == {
        "eval/extrapolation/passkey/L128",
        "eval/extrapolation/passkey/L256",
    }
    why = out.skipped["eval/extrapolation/passkey/L128"]
    assert "short_dense_eval cannot run at length 128 (trained at 64)" in why
    assert "longer than 100" in why
    assert not any(k.startswith("eval/extrapolation/passkey/L") for k in out.metrics)
    assert "extrapolation_passkey_heatmap" in out.figures  # grey cells, not a crash
    with pytest.raises(CannotRun, match="cannot run at length 128"):
        ctx.predictions(torch.zeros(1, 128, dtype=torch.long), [0])
    # at the trained length a failure is a bug and propagates as is
    cfg_short = tiny_cfg(f"attention.mechanism={short_dense}", "data.seq_len=128")
    ctx_short = EvalContext(SparseLM.from_config(cfg_short), cfg_short, lambda: Path(), "s")
    with pytest.raises(ValueError, match="longer than 100"):
        ctx_short.predictions(torch.zeros(1, 128, dtype=torch.long), [0])


def test_every_configured_suite_is_registered() -> None:
    assert tuple(SUITES) == EVAL_SUITES


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["eval.suites=[passkey,needle]"], "eval.suites"),
        (["eval.suites=[passkey,passkey]"], "eval.suites"),
        (["eval.batch_size=0"], "eval.batch_size"),
        (["eval.device=tpu"], "eval.device"),
        (["eval.suites=[passkey]", "eval.passkey.depths=[0,101]"], "eval.passkey.depths"),
        (["eval.suites=[passkey]", "eval.passkey.samples=0"], "eval.passkey.samples"),
        (["eval.suites=[passkey]", "eval.passkey.lengths=[8]"], "eval.passkey at length 8"),
        (["eval.suites=[mqar]", "eval.mqar.n_pairs=[32]"], "eval.mqar at length 64"),
        (["eval.suites=[mqar]", "eval.mqar.n_pairs=[]"], "eval.mqar.n_pairs"),
        (["eval.suites=[loss_by_position]", "eval.loss_by_position.buckets=65"], "buckets"),
        (["eval.suites=[extrapolation]", "eval.extrapolation.factors=[1]"], "factors"),
        (["eval.suites=[extrapolation]", "eval.extrapolation.tasks=[ppl]"], "tasks"),
        # the extrapolated lengths are checked too: 2 x 64 = 128 cannot hold 40 pairs
        (
            [
                "eval.suites=[extrapolation]",
                "eval.extrapolation.tasks=[mqar]",
                "eval.mqar.n_pairs=[40]",
            ],
            "eval.mqar at length 128",
        ),
        (["data.passkey_mix=1.5"], "data.passkey_mix"),
        (["data.passkey_len=0"], "data.passkey_len"),
        (["data.passkey_near=2"], "data.passkey_near"),
        (["data.passkey_mix=0.5", "data.seq_len=12"], "data.passkey_mix"),
    ],
)
def test_eval_config_errors_name_the_key(overrides: list[str], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace("[", r"\[")):
        tiny_cfg(*overrides)


def test_unused_suite_settings_are_not_checked() -> None:
    # the default MQAR grid (64 pairs) does not fit 64 tokens, but no suite runs MQAR
    cfg = tiny_cfg("eval.suites=[passkey]")
    assert cfg.eval.mqar.n_pairs == [4, 16, 64]


def test_passkey_4k_experiment_trains_every_mechanism_sparse_at_4k() -> None:
    root = Path(__file__).resolve().parents[1] / "experiments"
    ablation = load_ablation(root / "passkey_4k.yaml")
    assert (root / "passkey_4k.md").is_file()
    names = [cfg.attention.mechanism for cfg in ablation.configs]
    assert names == ["dense", "sliding_window", "nsa", "moba", "dsa"]
    for cfg in ablation.configs:
        assert cfg.data.seq_len == 4096 and cfg.data.passkey_mix > 0
        assert "passkey" in cfg.eval.suites and 4096 in cfg.eval.passkey.lengths
        assert cfg.eval.passkey.depths[0] == 0 and cfg.eval.passkey.depths[-1] == 100
        if cfg.attention.mechanism != "dense":
            # the sparse mechanisms read a small share of the keys at 4k (analytic cost model)
            cls = get_mechanism(cfg.attention.mechanism)
            params = cls.Params.from_dict(cfg.attention.params[cfg.attention.mechanism])
            module = cls(attention_shape(cfg), params)
            # the cost after training: DSA is dense during its warm-up steps, sparse after
            module.set_step(cfg.train.max_steps)
            keys = module.cost(4096).keys
            assert keys < 0.25 * 4096, cfg.attention.mechanism


def test_cannot_run_is_tagged_on_the_run_and_cleared_by_a_clean_rerun(
    short_dense: str, tmp_path: Path
) -> None:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = tracking.create_run(client, "test", "run", {"sparsezoo.kind": "train"})
    settings = [
        f"attention.mechanism={short_dense}",
        "eval.suites=[extrapolation]",
        "eval.extrapolation.factors=[2]",
        "eval.extrapolation.tasks=[passkey]",
        "eval.passkey.depths=[100]",
        "eval.passkey.samples=1",
    ]
    for seq_len, runs in ((64, False), (48, True)):  # 2 x 64 = 128 > 100; 2 x 48 = 96 fits
        cfg = tiny_cfg(*settings, f"data.seq_len={seq_len}")
        result = evaluate_model(
            SparseLM.from_config(cfg),
            cfg,
            out_dir=tmp_path / "eval",
            val_path=Path,
            client=client,
            run_id=run_id,
        )
        tags = client.get_run(run_id).data.tags
        assert (TAG_CANNOT_RUN in tags) is not runs
        assert bool(result.skipped) is not runs
    assert "eval/extrapolation/passkey/x2/acc" in client.get_run(run_id).data.metrics
