"""Training: the LightningModule, Trainer assembly, and the run lifecycle around them.

One call of :func:`train` prepares data (tokenizer and token caches by content hash), creates or
reopens the MLflow run, trains with Lightning (AdamW, warmup + cosine, grad clipping, periodic
validation, checkpoints), runs the eval suites the config names (``eval.suites``) on the trained
model and ends the run FINISHED, FAILED or KILLED. ``resume`` continues an interrupted run from
its last checkpoint into the same MLflow run. With ``data.passkey_mix`` > 0 a share of the
training rows are synthetic passkey sequences and the loss is averaged per row; with
``data.curriculum`` the first steps train on shorter rows, phase by phase.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger
from mlflow.tracking import MlflowClient
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sparsezoo import tracking
from sparsezoo.config import (
    ExperimentConfig,
    flatten,
    load_config,
    parse_layer_spec,
    phase_attention_params,
    phase_passkey_mix,
    to_yaml,
    trains_on_passkeys,
)
from sparsezoo.data import (
    IGNORE_INDEX,
    DataBundle,
    PasskeyMix,
    TokenWindows,
    default_cache_dir,
    prepare_data,
)
from sparsezoo.data.curriculum import Phase, PhasedBatches
from sparsezoo.distributed import (
    RUN_NAME_ENV,
    is_launcher_process,
    resolve_strategy,
    shared_run_name,
)
from sparsezoo.model import SparseLM
from sparsezoo.perf import process_peak_rss_mb

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"


class LMModule(L.LightningModule):
    """Next-token language modelling on a :class:`SparseLM`, with mechanisms' auxiliary losses.

    Logs ``train/loss`` (the LM loss alone, comparable across mechanisms), ``train/total_loss``
    when auxiliary losses exist, ``val/loss``, ``val/ppl`` and the attention stats.
    """

    def __init__(self, cfg: ExperimentConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = SparseLM.from_config(cfg)

    def forward(self, input_ids_BT: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of token ids."""
        return self.model(input_ids_BT)

    def _lm_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # logits only at labelled positions: a passkey row labels its 5 answer tokens out of
        # thousands, and the full [B, T, V] logits took 15-23% of a tiny-model step at 4k
        # (same loss and gradients: an unlabelled position's logits get none)
        labels_BT = batch["labels"]
        labelled_BT = labels_BT != IGNORE_INDEX
        h_NC = self.model.hidden_states(batch["input_ids"])[labelled_BT]
        losses_N = F.cross_entropy(
            self.model.lm_head(h_NC).float(), labels_BT[labelled_BT], reduction="none"
        )
        if trains_on_passkeys(self.cfg):
            # a passkey row has passkey_len labels against a text row's seq_len: averaging per
            # row gives its answer the weight of a whole text row
            losses_BT = losses_N.new_zeros(labels_BT.shape).masked_scatter(labelled_BT, losses_N)
            return row_mean_loss(losses_BT, labels_BT)
        return losses_N.mean()

    def on_train_batch_start(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Pass the global step to the mechanisms' phase schedules (e.g. DSA's warm-up) and
        give them the knobs of the curriculum phase it falls in."""
        self.model.set_training_step(self.global_step)
        self.model.set_phase_params(phase_attention_params(self.cfg, self.global_step))

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """LM loss plus the mechanisms' auxiliary losses; logs loss and attention stats."""
        lm_loss = self._lm_loss(batch)
        aux = self.model.aux_loss()
        loss = lm_loss if aux is None else lm_loss + aux
        self.log("train/loss", lm_loss, prog_bar=True)
        if aux is not None:
            self.log("train/total_loss", loss)
        if self.global_step % self.cfg.train.log_every == 0:
            stats = {**self.model.attention_stats(), **self.model.aux_loss_terms()}
            self.log_dict(stats)
        return loss

    def on_validation_epoch_start(self) -> None:
        """Reset the validation loss accumulator."""
        self._val_losses: list[torch.Tensor] = []

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        """Accumulate the LM loss of one batch of the fixed validation windows."""
        self._val_losses.append(self._lm_loss(batch).detach())

    def on_validation_epoch_end(self) -> None:
        """Log the mean validation loss and its perplexity (averaged across processes)."""
        val_loss = torch.stack(self._val_losses).mean()
        self.log("val/loss", val_loss, prog_bar=True, sync_dist=True)
        self.log("val/ppl", torch.exp(val_loss.float().clamp(max=50.0)), sync_dist=True)

    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (no decay on norms and biases) with linear warmup then cosine to min_lr."""
        t = self.cfg.train
        decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.requires_grad and p.dim() < 2]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": t.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=t.lr,
            betas=(t.beta1, t.beta2),
        )
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda=lr_schedule(self.cfg))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def token_losses(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position, FloatTensor[B, T]; 0 where the label is ignored."""
    return F.cross_entropy(
        logits_BTV.flatten(0, 1).float(),
        labels_BT.flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(labels_BT.shape)


def row_mean_loss(losses_BT: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean over rows of each row's mean loss over its labelled positions (unlabelled rows skipped).

    Equals the plain token mean when every row has the same number of labels.
    """
    valid_BT = labels_BT != IGNORE_INDEX
    per_row_B = (losses_BT * valid_BT).sum(1) / valid_BT.sum(1).clamp(min=1)
    return per_row_B[valid_BT.any(1)].mean()


def lr_schedule(cfg: ExperimentConfig) -> Any:
    """Multiplier of the base lr at each step: linear warmup, then cosine down to min_lr_ratio."""
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        span = max(1, t.max_steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class PerfMonitor(Callback):
    """Logs ``perf/step_ms``, ``perf/tokens_per_s`` and ``perf/peak_mem_mb`` every log_every steps.

    Step time is wall-clock from batch start to batch end (forward, backward, optimizer step),
    averaged over the steps since the last log; the first step of a fit is excluded because it
    includes one-off warm-up costs. Tokens are counted from the batches themselves (a length
    curriculum changes them). Peak memory is the device's peak allocation on CUDA and the
    process's peak resident set size on CPU.
    """

    def __init__(self, log_every: int) -> None:
        self.log_every = log_every
        self._start = 0.0
        self._times: list[float] = []
        self._tokens = 0
        self._first = True

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        """Start the step timer."""
        self._start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: dict[str, torch.Tensor],
        batch_idx: int,
    ) -> None:
        """Stop the timer and log averages every ``log_every`` steps."""
        elapsed = time.perf_counter() - self._start
        if self._first:
            self._first = False
            return
        self._times.append(elapsed)
        self._tokens += batch["input_ids"].numel()
        if trainer.global_step % self.log_every and trainer.global_step != trainer.max_steps:
            return
        seconds = sum(self._times)
        step_s = seconds / len(self._times)
        tokens, self._tokens = self._tokens, 0
        self._times.clear()
        world = trainer.world_size
        pl_module.log_dict(
            {
                "perf/step_ms": 1000.0 * step_s,
                "perf/tokens_per_s": tokens * world / seconds,
                "perf/peak_mem_mb": peak_memory_mb(pl_module.device),
            }
        )


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA peak allocation, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return process_peak_rss_mb()


class _OffsetWindows(torch.utils.data.Dataset):
    """Training windows ``start .. start + n`` of an endless seeded stream.

    Resuming at step s starts the stream at s * batch_size, so a resumed run sees exactly the
    batches the uninterrupted run would have seen.
    """

    def __init__(self, windows: Dataset, start: int, n: int) -> None:
        self.windows, self.start, self.n = windows, start, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.windows[self.start + i]


class LMDataModule(L.LightningDataModule):
    """Seeded token windows over the train and validation token caches."""

    def __init__(self, cfg: ExperimentConfig, data: DataBundle) -> None:
        super().__init__()
        self.cfg, self.data = cfg, data

    def train_dataloader(self) -> DataLoader:
        """Windows for the remaining steps (after a resume, continuing where the run stopped)."""
        if self.cfg.data.curriculum:
            return self._curriculum_loader()
        t = self.cfg.train
        # batch_size is per process: a step consumes batch_size * world rows of one stream,
        # dealt out to the processes by _loader, so a DDP run sees the same rows per step as
        # one process with the global batch
        rows_per_step = t.batch_size * self._world()
        windows = TokenWindows(
            self.data.train_path, self.cfg.data.seq_len, t.max_steps * rows_per_step, self.cfg.seed
        )
        d = self.cfg.data
        rows: Dataset = windows
        if d.passkey_mix > 0:
            vocab, seed = self.cfg.model.vocab_size, self.cfg.seed
            rows = PasskeyMix(
                windows,
                d.passkey_mix,
                vocab,
                d.passkey_len,
                seed,
                d.passkey_near,
                d.passkey_distinct,
            )
        done = self.trainer.global_step * rows_per_step if self.trainer else 0
        remaining = max(rows_per_step, t.max_steps * rows_per_step - done)
        return self._loader(_OffsetWindows(rows, done, remaining))

    def _curriculum_loader(self) -> DataLoader:
        """Whole steps of the ``data.curriculum`` phases, then of ``data.seq_len`` rows.

        All phases index one stream of rows (phase k starts where phase k-1 ended), so no two
        steps share a row's text window seed or passkey draw.
        """
        cfg, world = self.cfg, self._world()
        d, t = cfg.data, cfg.train
        specs = [
            (
                p.seq_len,
                p.steps,
                p.batch_size or t.batch_size,
                phase_passkey_mix(cfg, p),
                d.passkey_near if p.passkey_near is None else p.passkey_near,
            )
            for p in d.curriculum
        ]
        rest = t.max_steps - sum(p.steps for p in d.curriculum)
        specs.append((d.seq_len, rest, t.batch_size, d.passkey_mix, d.passkey_near))
        total_rows = sum(steps * batch * world for _, steps, batch, _, _ in specs)
        phases, first = [], 0
        for seq_len, steps, batch, mix, near in specs:
            rows: Dataset = TokenWindows(self.data.train_path, seq_len, total_rows, cfg.seed)
            if mix > 0:
                vocab, digits = cfg.model.vocab_size, d.passkey_len
                rows = PasskeyMix(
                    rows, mix, vocab, digits, cfg.seed, near, d.passkey_distinct, d.passkey_edges
                )
            phases.append(Phase(rows, steps, batch * world, first))
            first += steps * batch * world
        done = self.trainer.global_step if self.trainer else 0
        rank = self.trainer.global_rank if self.trainer else 0
        batches = PhasedBatches(phases, min(done, t.max_steps - 1), rank, world)
        return DataLoader(batches, batch_size=None)

    def _world(self) -> int:
        return self.trainer.world_size if self.trainer else 1

    def _loader(self, rows: Dataset) -> DataLoader:
        """Batches of ``rows`` in order; with several processes, rank r takes rows r, r + W, ...

        The sampler is explicit (Lightning's own distributed sampler is off): Lightning would
        shuffle the training rows, and then a DDP step would not see the rows of the same step
        of a single-process run.
        """
        sampler = None
        if self._world() > 1:
            sampler = DistributedSampler(
                rows, num_replicas=self._world(), rank=self.trainer.global_rank, shuffle=False
            )
        return DataLoader(rows, batch_size=self.cfg.train.batch_size, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        """The same validation windows at every evaluation, so val losses are comparable."""
        t = self.cfg.train
        windows = TokenWindows(
            self.data.val_path,
            self.cfg.data.seq_len,
            t.val_batches * t.batch_size * self._world(),
            self.cfg.seed + 1,
        )
        return self._loader(windows)


@dataclass
class TrainResult:
    """What a finished training run produced."""

    run_id: str | None
    run_dir: Path
    metrics: dict[str, float]
    checkpoint: Path | None


def mechanism_tag(cfg: ExperimentConfig) -> str:
    """The value of the ``sparsezoo.mechanism`` tag: the mechanism, or the hybrid's layer spec."""
    names = parse_layer_spec(cfg.attention.layers, cfg.attention.mechanism, cfg.model.n_layers)
    return names[0] if len(set(names)) == 1 else cfg.attention.layers


def default_run_name(cfg: ExperimentConfig) -> str:
    """A readable unique run name: mechanism, model size and a timestamp."""
    return (
        f"{mechanism_tag(cfg).replace(',', '+')}-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    )


def resolve_precision(cfg: ExperimentConfig) -> str:
    """``auto`` means fp32 on CPU and bf16-mixed when a GPU will be used."""
    t = cfg.train
    if t.precision != "auto":
        return t.precision
    gpu = t.accelerator in ("gpu", "cuda") or (
        t.accelerator == "auto" and torch.cuda.is_available()
    )
    return "bf16-mixed" if gpu else "32-true"


def _set_aside_checkpoints(run_dir: Path) -> None:
    """Rename the checkpoints a previous run left in ``run_dir`` before a fresh run starts there.

    A fresh run reuses a directory when its run name repeats (ablation points are named by
    their index and point). Left in place, the old ``last.ckpt`` would stay the one that
    resume and ``sparsezoo eval`` read while Lightning saved the new run's as ``last-v1.ckpt``;
    renamed to ``checkpoints.previous-<time>`` nothing is lost and ``last.ckpt`` is this run's.
    """
    old = run_dir / "checkpoints"
    if not old.is_dir() or not any(old.iterdir()):
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir / f"checkpoints.previous-{stamp}"
    n = 1
    while target.exists():
        target, n = run_dir / f"checkpoints.previous-{stamp}-{n}", n + 1
    old.rename(target)
    log.warning("%s held another run's checkpoints: moved to %s", run_dir, target.name)


def load_run_dir(
    path: str | Path, overrides: Sequence[str] = ()
) -> tuple[ExperimentConfig, Path, Path, dict[str, Any]]:
    """Locate a run to resume from a run directory or a checkpoint file inside it.

    Returns the run's saved config (with ``overrides`` applied), its directory, the checkpoint to
    resume from and the run record (MLflow run id and tracking URI).
    """
    p = Path(path)
    run_dir = p.parent.parent if p.is_file() else p
    ckpt = p if p.is_file() else run_dir / "checkpoints" / "last.ckpt"
    record_path = run_dir / RUN_FILE
    if not record_path.is_file():
        raise FileNotFoundError(
            f"--resume {path}: no {RUN_FILE} in {run_dir} (not a run directory)"
        )
    if not ckpt.is_file():
        raise FileNotFoundError(f"--resume {path}: no checkpoint at {ckpt}")
    cfg = load_config(run_dir / CONFIG_FILE, overrides)
    return cfg, run_dir, ckpt, json.loads(record_path.read_text())


def prepare_run_data(cfg: ExperimentConfig) -> DataBundle:
    """The tokenizer and token caches of a run's data section (built once, then cached)."""
    return prepare_data(
        list(cfg.data.corpus),
        vocab_size=cfg.data.vocab_size,
        val_fraction=cfg.data.val_fraction,
        seed=cfg.seed,
        cache_dir=Path(cfg.data.cache_dir) if cfg.data.cache_dir else default_cache_dir(),
        max_bytes=cfg.data.max_bytes,
        jsonl_field=cfg.data.jsonl_field,
    )


def train(
    cfg: ExperimentConfig | None = None,
    *,
    resume: str | Path | None = None,
    overrides: Sequence[str] = (),
    callbacks: Sequence[Callback] = (),
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
) -> TrainResult:
    """Train one model as configured and log it to MLflow; see the module docstring.

    With ``resume`` (a run directory or checkpoint), the run's own saved config is reloaded
    (``overrides`` may extend it, e.g. more steps) and training continues from the checkpoint
    into the same MLflow run. Extra Lightning ``callbacks`` are added to the trainer. A new run
    gets the extra ``tags`` and, with ``parent_run_id``, is nested under that run (ablation
    grid points and sweep trials). Under a multi-process strategy only the launcher process
    (global rank 0) creates and closes the MLflow run (:mod:`sparsezoo.distributed`).
    """
    record: dict[str, Any] = {}
    ckpt: Path | None = None
    if resume is not None:
        cfg, run_dir, ckpt, record = load_run_dir(resume, overrides)
    elif cfg is None:
        cfg = load_config(None, overrides)
    owner = is_launcher_process()
    strategy = resolve_strategy(cfg)  # a strategy this machine cannot run fails before the run
    if cfg.run_name is None:
        cfg.run_name = (None if owner else os.environ.get(RUN_NAME_ENV)) or default_run_name(cfg)
    if resume is None:
        run_dir = Path(cfg.output_dir) / cfg.experiment / cfg.run_name
    t = cfg.train
    if t.threads > 0:
        torch.set_num_threads(t.threads)
    uri = tracking.resolve_tracking_uri(record.get("tracking_uri") or cfg.tracking.uri)
    tracked = cfg.tracking.enabled and owner
    if tracked:
        tracking.check_tracking(uri)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    log.info("preparing data: corpus %s, vocab %d", list(cfg.data.corpus), cfg.data.vocab_size)
    started = time.perf_counter()
    data = prepare_run_data(cfg)
    log.info(
        "data ready in %.1fs: %d train / %d val tokens, vocabulary %d",
        time.perf_counter() - started,
        data.n_train_tokens,
        data.n_val_tokens,
        data.vocab_size,
    )
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = data.vocab_size
    run_dir.mkdir(parents=True, exist_ok=True)
    if owner and resume is None:
        _set_aside_checkpoints(run_dir)
    if owner:
        (run_dir / CONFIG_FILE).write_text(to_yaml(cfg))

    client = MlflowClient(uri) if tracked else None
    run_id = record.get("run_id")
    if client is not None and run_id is None:
        run_id = tracking.create_run(
            client,
            cfg.experiment,
            cfg.run_name,
            {"sparsezoo.mechanism": mechanism_tag(cfg), "sparsezoo.kind": "train", **(tags or {})},
            parent_run_id,
        )
        tracking.log_params(client, run_id, flatten(cfg))
        client.log_artifact(run_id, str(run_dir / CONFIG_FILE))
        client.log_artifact(run_id, str(data.tokenizer_path))
    elif client is not None:
        client.update_run(run_id, status="RUNNING")
    if owner:
        (run_dir / RUN_FILE).write_text(json.dumps({"run_id": run_id, "tracking_uri": uri}))

    def fit() -> TrainResult:
        module = LMModule(cfg)
        checkpoint = ModelCheckpoint(
            dirpath=run_dir / "checkpoints",
            every_n_train_steps=t.checkpoint_every,
            save_last=True,
            save_top_k=0,
        )
        logger = (
            MLFlowLogger(experiment_name=cfg.experiment, tracking_uri=uri, run_id=run_id)
            if client is not None
            else False
        )
        trainer = L.Trainer(
            max_steps=t.max_steps,
            accelerator=t.accelerator,
            devices=t.devices,
            num_nodes=t.num_nodes,
            strategy=strategy,
            precision=resolve_precision(cfg),
            gradient_clip_val=t.grad_clip or None,
            val_check_interval=t.val_every,
            check_val_every_n_epoch=None,
            limit_val_batches=t.val_batches,
            num_sanity_val_steps=0,
            log_every_n_steps=t.log_every,
            logger=logger,
            callbacks=[
                checkpoint,
                PerfMonitor(t.log_every),
                *callbacks,
            ],
            enable_progress_bar=t.progress_bar,
            enable_model_summary=False,
            default_root_dir=run_dir,
            use_distributed_sampler=False,  # LMDataModule deals rows to processes itself
        )
        datamodule = LMDataModule(cfg, data)
        with shared_run_name(cfg):
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
        last = run_dir / "checkpoints" / "last.ckpt"
        if trainer.global_step % t.checkpoint_every:
            # ModelCheckpoint refreshes last.ckpt only when it makes a periodic save, so a run
            # whose last step is not a multiple of checkpoint_every would leave resume, eval and
            # TrainResult the weights of its last periodic save (step 700 of a 750-step run).
            # Every rank calls this: the trainer writes on rank zero and syncs the others.
            trainer.save_checkpoint(last)
        if t.max_steps % t.val_every:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        if cfg.eval.suites and trainer.is_global_zero:
            from sparsezoo.eval import evaluate_model  # the eval package builds on this module

            evaluation = evaluate_model(
                module.model,
                cfg,
                out_dir=run_dir / "eval",
                val_path=lambda: data.val_path,
                step=trainer.global_step,
                client=client,
                run_id=run_id,
            )
            metrics |= evaluation.metrics
        return TrainResult(run_id, run_dir, metrics, last if last.exists() else None)

    if client is None:
        return fit()
    with tracking.run_status(client, run_id):
        return fit()
