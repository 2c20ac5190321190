"""Tests of ``sparsezoo bench``: result structure, cost-model ratios, decode reads, outputs,
MLflow logging and input errors. Shapes are tiny; no assertion depends on measured speed."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import json
import os
import statistics
import subprocess
import sys
import time

import pytest
import torch

from sparsezoo import bench as bench_module
from sparsezoo import perf, registry
from sparsezoo.bench import (
    BenchConfig,
    BenchConfigError,
    BenchResult,
    add_bench_arguments,
    bench_command,
    bench_metrics,
    config_from_args,
    flatten_config,
    parse_lengths,
    parse_param,
    restore_cache,
    run_bench,
    write_outputs,
)
from sparsezoo.mechanisms.base import AttentionMechanism
from sparsezoo.mechanisms.dense import DenseAttention
from sparsezoo.registry import build_attention, get_mechanism, list_mechanisms
from sparsezoo.tracking import MlflowClient

WINDOW = 32
LENGTHS = [64, 128]
MODES = ["fwd", "fwdbwd", "decode", "decode_attn"]
METRICS = (
    "ms",
    "speedup",
    "speedup_min",
    "speedup_max",
    "theoretical_speedup",
    "peak_mem_mb",
    "peak_rss_mb",
)
TINY = {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "repeats": 2, "warmup": 1, "threads": 1}
TINY_ARGS = [
    *("--lengths", "64,128", "--heads", "4", "--kv-heads", "2", "--head-dim", "16"),
    *("--repeats", "2", "--threads", "1"),
]


def tiny_config(**overrides: object) -> BenchConfig:
    values = {
        "mechanisms": ["sliding_window"],
        "modes": list(MODES),
        "lengths": list(LENGTHS),
        "params": {"sliding_window": {"window": WINDOW}},
        **TINY,
        **overrides,
    }
    return BenchConfig(**values)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sparsezoo bench")
    add_bench_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def result() -> BenchResult:
    return run_bench(tiny_config(), progress=False)


def test_every_mechanism_mode_and_length_has_a_row(result: BenchResult) -> None:
    keys = [(r.mode, r.seq_len, r.mechanism) for r in result.rows]
    expected = itertools.product(MODES, LENGTHS, ["dense", "sliding_window"])
    assert sorted(keys) == sorted(expected)
    for r in result.rows:
        assert len(r.times_ms) == TINY["repeats"]
        assert all(t > 0 for t in r.times_ms)
        assert r.median_ms == statistics.median(r.times_ms)
        assert r.peak_mem_mb >= 0 and r.peak_rss_mb >= 0


def test_resolved_config_records_baseline_shape_and_device(result: BenchResult) -> None:
    cfg = result.config
    assert cfg.mechanisms == ["dense", "sliding_window"]
    assert cfg.d_model == 4 * 16
    assert cfg.device == "cpu"


def test_dense_is_the_baseline(result: BenchResult) -> None:
    for mode, T in itertools.product(MODES, LENGTHS):
        dense = result.row(mode, T, "dense")
        assert (dense.speedup, dense.theoretical_speedup, dense.share) == (1.0, 1.0, 1.0)
        assert (dense.speedup_min, dense.speedup_max) == (1.0, 1.0)
        window = result.row(mode, T, "sliding_window")
        assert window.speedup == pytest.approx(dense.median_ms / window.median_ms)
        paired = [d / w for d, w in zip(dense.times_ms, window.times_ms, strict=True)]
        assert (window.speedup_min, window.speedup_max) == (min(paired), max(paired))
        assert window.share == pytest.approx(window.speedup / window.theoretical_speedup)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
def test_prefill_theoretical_speedup_matches_hand_computation(
    result: BenchResult, mode: str
) -> None:
    # Attention FLOPs are 4·D per key: dense attends t keys at context t, the window
    # min(t, 32), so the FLOP ratio is the key ratio, summed over t = 1..T.
    # T=64: 64*65/2 = 2080 against 32*33/2 + 32*32 = 1552.
    assert result.row(mode, 64, "sliding_window").theoretical_speedup == pytest.approx(2080 / 1552)
    # T=128: 128*129/2 = 8256 against 528 + 96*32 = 3600.
    assert result.row(mode, 128, "sliding_window").theoretical_speedup == pytest.approx(8256 / 3600)


def test_decode_theoretical_speedup_is_keys_at_the_new_token(result: BenchResult) -> None:
    for T in LENGTHS:
        assert result.row("decode", T, "sliding_window").theoretical_speedup == pytest.approx(
            (T + 1) / WINDOW
        )


def test_theory_is_prefill_flops_and_decode_rows_with_the_indexer() -> None:
    """DSA's prefill theory counts its indexer FLOPs, its decode theory the indexer keys it
    reads besides the K/V rows (side rows), both from the cost model."""
    params = {"dsa": {"topk": 16, "warmup_steps": 0, "index_dim": 8, "index_rope_dim": 4}}
    res = run_bench(
        tiny_config(mechanisms=["dsa"], modes=["fwd", "decode"], lengths=[64], params=params),
        progress=False,
    )
    shape = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "head_dim": 16, "max_seq_len": 65}
    dsa = registry.build_attention("dsa", **shape, **params["dsa"])
    dense = registry.build_attention("dense", **shape)
    prefill = sum(dense.cost(t).flops for t in range(1, 65)) / sum(
        dsa.cost(t).flops for t in range(1, 65)
    )
    assert res.row("fwd", 64, "dsa").theoretical_speedup == pytest.approx(prefill)
    # 65 cached tokens: 16 selected rows + 65 indexer keys of 8 numbers over 2 heads x 2 x 16
    assert dsa.cost(65).side_rows == pytest.approx(65 * 8 / 64)
    decode = res.row("decode", 64, "dsa").theoretical_speedup
    assert decode == pytest.approx(65 / (16 + 65 * 8 / 64))


def test_decode_theory_counts_the_rows_read_and_dense_fallbacks() -> None:
    """The decode theory divides dense's rows by the rows the step read (measured) plus the
    side rows: MoBA's heads of a group read the union of their blocks, and a DSA step whose
    context fits in k runs dense attention with no indexer (theory 1, not below)."""
    params = {
        "moba": {"block_size": 16, "top_k": 2},
        "dsa": {"topk": 128, "warmup_steps": 0, "index_dim": 8, "index_rope_dim": 4},
    }
    cfg = tiny_config(mechanisms=["moba", "dsa"], modes=["decode"], lengths=[100], params=params)
    res = run_bench(dataclasses.replace(cfg, n_heads=8, n_kv_heads=1), progress=False)
    moba = res.row("decode", 100, "moba")
    assert moba.theoretical_speedup == pytest.approx(101 / moba.rows_read)
    dsa = res.row("decode", 100, "dsa")
    assert (dsa.rows_read, dsa.theoretical_speedup) == (101, 1.0)


def test_rounds_rotate_which_mechanism_runs_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every repeat round starts one case later than the previous one."""
    order: list[str] = []

    class Recorder:
        def __init__(self, name: str) -> None:
            self.name = name

        def prepare(self) -> None:
            pass

        def step(self) -> None:
            order.append(self.name)

    cases = {name: Recorder(name) for name in ("dense", "a", "b")}
    times = bench_module._measure(cases, warmup=0, repeats=4, device=torch.device("cpu"))
    assert order == ["dense", "a", "b", "a", "b", "dense", "b", "dense", "a", "dense", "a", "b"]
    assert {name: len(t) for name, t in times.items()} == {"dense": 4, "a": 4, "b": 4}


def test_decode_steps_start_from_evicted_caches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode modes evict the last-level cache after restoring the KV cache (restoring would
    leave part of it hot); prefill modes do not."""
    evicted: list[str] = []
    monkeypatch.setattr(bench_module, "evict_caches", lambda device: evicted.append("evict"))
    cfg = tiny_config(modes=["fwd", "decode", "decode_attn"], lengths=[64])
    run_bench(dataclasses.replace(cfg, repeats=3, warmup=1), progress=False)
    # two decode modes x two mechanisms x (1 warm-up + 3 repeats + 1 peak-memory step)
    assert len(evicted) == 2 * 2 * 5
    assert perf.last_level_cache_bytes(torch.device("cpu")) >= 1 << 20
    perf.evict_caches("cpu")


def test_environment_names_the_cpu_and_warns_when_the_machine_is_busy(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(bench_module, "_busy_cpus", lambda: 1.5)
    res = run_bench(tiny_config(modes=["fwd"], lengths=[64]), progress=True)
    env = res.environment
    assert env["busy_cpus_start"] == 1.5 and env["cpu_count"] == os.cpu_count()
    assert env["device_name"] not in ("", "x86_64")
    assert "warning: other processes keep 1.5 of" in capsys.readouterr().err
    monkeypatch.setattr(bench_module, "_busy_cpus", lambda: 0.1)
    run_bench(tiny_config(modes=["fwd"], lengths=[64]), progress=True)
    assert "busy" not in capsys.readouterr().err


def test_busy_cpus_counts_other_processes_not_this_one() -> None:
    """Sampled while this process sleeps: a CPU-bound child counts about one CPU."""
    idle = bench_module._busy_cpus(0.3)
    assert idle is not None and 0.0 <= idle <= os.cpu_count()
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.2)
        busy = bench_module._busy_cpus(0.5)
    finally:
        spin.kill()
        spin.wait()
    assert busy > 0.6


def test_phased_mechanisms_are_measured_past_their_warm_up_unless_told() -> None:
    """DSA with its default 1000 warm-up steps: the bench measures its sparse stage (16 of 65
    rows read per decode step, sparse theory) unless ``train_step`` puts it in the warm-up,
    where it reads every row as dense does."""
    params = {"dsa": {"topk": 16, "index_dim": 8, "index_rope_dim": 4}}
    runs = {
        step: run_bench(
            tiny_config(
                mechanisms=["dsa"], modes=["decode"], lengths=[64], params=params, train_step=step
            ),
            progress=False,
        ).row("decode", 64, "dsa")
        for step in (None, 999, 1000)
    }
    assert runs[None].rows_read == runs[1000].rows_read == 16
    assert runs[None].theoretical_speedup == pytest.approx(65 / (16 + 65 * 8 / 64))
    assert runs[999].rows_read == 65
    assert runs[999].theoretical_speedup == pytest.approx(1.0)


def test_decode_rows_read_match_each_mechanism(result: BenchResult) -> None:
    for T in LENGTHS:
        assert result.row("decode", T, "dense").rows_read == T + 1
        assert result.row("decode", T, "sliding_window").rows_read == min(WINDOW, T + 1)
        assert result.row("fwd", T, "dense").rows_read is None


def test_decode_attn_reads_what_the_whole_decode_step_reads(result: BenchResult) -> None:
    for T, name in itertools.product(LENGTHS, ["dense", "sliding_window"]):
        whole, attn = result.row("decode", T, name), result.row("decode_attn", T, name)
        assert attn.rows_read == whole.rows_read
        assert attn.theoretical_speedup == whole.theoretical_speedup


def test_decode_attn_rejects_a_mechanism_that_does_not_split_its_step() -> None:
    whole_step = type(
        "WholeStepOnly", (DenseAttention,), {"decode_reader": AttentionMechanism.decode_reader}
    )
    registry.register_mechanism("whole_step_for_test")(whole_step)
    try:
        with pytest.raises(BenchConfigError, match="whole_step_for_test do not") as info:
            tiny_config(
                mechanisms=["whole_step_for_test"], modes=["decode_attn"], params={}
            ).validate()
        assert info.value.field == "modes"
        tiny_config(mechanisms=["whole_step_for_test"], modes=["decode"], params={}).validate()
    finally:
        registry._registered.pop("whole_step_for_test", None)


def test_decode_rows_read_with_window_longer_than_the_context() -> None:
    res = run_bench(
        tiny_config(modes=["decode"], params={"sliding_window": {"window": 100}}), progress=False
    )
    assert res.row("decode", 64, "sliding_window").rows_read == 65
    assert res.row("decode", 128, "sliding_window").rows_read == 100


def test_run_bench_restores_threads_and_random_state() -> None:
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    run_bench(
        BenchConfig(modes=["fwd"], lengths=[8], n_heads=2, n_kv_heads=1, head_dim=8, repeats=1),
        progress=False,
    )
    run_bench(tiny_config(modes=["fwd"], lengths=[8], threads=threads + 1), progress=False)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), rng)


def test_write_outputs_json_and_png(result: BenchResult, tmp_path) -> None:
    json_path, png_path = write_outputs(result, tmp_path / "out")
    data = json.loads(json_path.read_text())
    assert data["config"]["mechanisms"] == ["dense", "sliding_window"]
    # every knob the module ran with, defaults included (dense has none)
    assert data["config"]["params"] == {"sliding_window": {"window": WINDOW, "backend": "auto"}}
    assert len(data["rows"]) == len(result.rows)
    row = data["rows"][0]
    assert row == dataclasses.asdict(result.rows[0])
    assert len(row["times_ms"]) == TINY["repeats"]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "bench.png"]


def test_metric_keys_and_flat_params(result: BenchResult) -> None:
    metrics = bench_metrics(result)
    assert metrics["bench/fwd/dense/T64/speedup"] == 1.0
    assert metrics["bench/decode/sliding_window/T128/rows_read"] == WINDOW
    assert "bench/fwd/sliding_window/T128/rows_read" not in metrics
    for mode, T, name in itertools.product(MODES, LENGTHS, ["dense", "sliding_window"]):
        for metric in METRICS:
            assert f"bench/{mode}/{name}/T{T}/{metric}" in metrics
    flat = flatten_config(result.config)
    assert flat["lengths"] == "64,128"
    assert flat["params.sliding_window.window"] == str(WINDOW)
    assert flat["params.sliding_window.backend"] == "auto"


def test_bench_command_end_to_end(tmp_path, monkeypatch, capsys) -> None:
    # MLflow puts a SQLite store's artifacts under ./mlruns: keep them in tmp_path.
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = parse(
        [
            *TINY_ARGS,
            *("--mechanisms", "sliding_window", "--modes", "fwd,decode"),
            *("--param", f"sliding_window.window={WINDOW}", "--out", str(tmp_path / "out")),
            *("--tracking-uri", uri, "--experiment", "bench-test"),
        ]
    )
    assert bench_command(args) == 0
    out = capsys.readouterr().out
    assert "sliding_window" in out and "theoretical" in out and "rounds" in out
    assert (tmp_path / "out" / "bench.json").is_file()

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("bench-test")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`sparsezoo.kind` = 'bench'"
    )
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["params.sliding_window.window"] == str(WINDOW)
    assert run.data.params["modes"] == "fwd,decode"
    for mode, T, name in itertools.product(["fwd", "decode"], LENGTHS, ["dense", "sliding_window"]):
        for metric in METRICS:
            assert f"bench/{mode}/{name}/T{T}/{metric}" in run.data.metrics
    assert run.data.metrics["bench/decode/dense/T64/rows_read"] == 65
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert artifacts == {"bench.json", "bench.png"}


@pytest.mark.parametrize(
    ("argv", "flag", "value"),
    [
        (["--modes", "fwd,prefill"], "--modes", "prefill"),
        (["--mechanisms", "sliding_window,nope"], "--mechanisms", "nope"),
        (["--lengths", "64,4x"], "--lengths", "4x"),
        (["--lengths", "0"], "--lengths", "0"),
        (["--param", "sliding_window.window"], "--param", "sliding_window.window"),
        (["--param", "window=3"], "--param", "window=3"),
        (["--param", "sliding_window.windw=3"], "--param", "windw"),
        (["--param", "sliding_window.window=0"], "--param", "window=0"),
        (["--param", "dense.window=3"], "--param", "dense"),
        (["--param", "moba.block=3"], "--param", "moba"),
        (["--repeats", "0"], "--repeats", "0"),
        (["--train-step", "-1"], "--train-step", "-1"),
        (["--kv-heads", "3"], "--heads/--kv-heads", "3"),
        (["--tracking-uri", "file:./mlruns"], "--tracking-uri", "file:./mlruns"),
    ],
)
def test_bad_input_fails_before_writing(argv, flag, value, tmp_path, capsys) -> None:
    out_dir = tmp_path / "out"
    base = [*TINY_ARGS, "--mechanisms", "sliding_window", "--out", str(out_dir)]
    mlflow_args = [] if "--tracking-uri" in argv else ["--no-mlflow"]
    assert bench_command(parse([*base, *mlflow_args, *argv])) == 2
    err = capsys.readouterr().err
    assert flag in err and value in err
    assert not out_dir.exists()


def test_out_must_be_a_directory(tmp_path, capsys) -> None:
    target = tmp_path / "file"
    target.write_text("x")
    assert bench_command(parse([*TINY_ARGS, "--no-mlflow", "--out", str(target)])) == 2
    assert "--out" in capsys.readouterr().err


def test_config_from_args_defaults_to_every_registered_mechanism() -> None:
    cfg = config_from_args(parse(TINY_ARGS))
    assert cfg.mechanisms == list_mechanisms()
    assert cfg.modes == ["fwd", "fwdbwd", "decode"]  # decode_attn is opt-in
    assert cfg.mechanism_names()[0] == "dense"


@pytest.mark.parametrize(
    ("overrides", "field", "value"),
    [
        ({"modes": ["prefill"]}, "modes", "prefill"),
        ({"modes": []}, "modes", "mode"),
        ({"lengths": []}, "lengths", "length"),
        ({"lengths": [64, -1]}, "lengths", "-1"),
        ({"mechanisms": ["nope"]}, "mechanisms", "registered:"),
        ({"dtype": "float16"}, "dtype", "float16"),
        ({"device": "tpu"}, "device", "tpu"),
        ({"warmup": -1}, "warmup", "-1"),
        ({"train_step": 1.5}, "train_step", "1.5"),
        ({"d_model": 0}, "d_model", "0"),
        ({"params": {"sliding_window": {"window": "big"}}}, "params", "big"),
    ],
)
def test_validate_names_the_field(overrides, field, value) -> None:
    with pytest.raises(BenchConfigError) as info:
        tiny_config(**overrides).validate()
    assert info.value.field == field
    assert value in str(info.value)


def test_parse_lengths_accepts_k_suffix() -> None:
    assert parse_lengths("4096, 8k,16K") == [4096, 8192, 16384]
    for bad in ("4x", "k", "-4", "1.5k"):
        with pytest.raises(BenchConfigError, match="lengths"):
            parse_lengths(bad)


def test_parse_param_types_values() -> None:
    assert parse_param("sliding_window.window=512") == ("sliding_window", "window", 512)
    assert parse_param("moba.ratio=0.5") == ("moba", "ratio", 0.5)
    assert parse_param("sliding_window.backend=torch") == ("sliding_window", "backend", "torch")
    assert parse_param("nsa.flag=True") == ("nsa", "flag", True)
    assert parse_param("nsa.name='a b'") == ("nsa", "name", "a b")


@pytest.mark.parametrize("name", list_mechanisms())
def test_restore_cache_resets_a_decoded_cache_in_place(name: str) -> None:
    """After a decode step on the working copy, restore_cache brings back the filled state in
    the copy's own tensors (same objects: the step reads long-lived memory), and the next step
    decodes exactly as the first did."""
    torch.manual_seed(0)
    module = build_attention(
        name, d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, max_seq_len=200,
        **get_mechanism(name).test_preset,
    ).eval()  # fmt: skip
    x_BTC, token_B1C = torch.randn(1, 150, 32), torch.randn(1, 1, 32)
    filled = module.new_cache(1, 151)
    module.fill_cache(x_BTC, filled)
    cache = copy.deepcopy(filled)
    tensors = {k: v for k, v in vars(cache).items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        first = module(token_B1C, cache=cache)
        assert cache.length == 151
        restore_cache(cache, filled)
        assert cache.length == filled.length == 150
        for key, tensor in tensors.items():
            assert getattr(cache, key) is tensor, key
            assert torch.equal(tensor, getattr(filled, key)), key
        assert torch.equal(module(token_B1C, cache=cache), first)
