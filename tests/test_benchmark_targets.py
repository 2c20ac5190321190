"""benchmarks/targets.py: the issues' targets grouped into bench calls, judged, and run end to
end at tiny lengths (the harness, not the targets: no assertion depends on measured speed)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from sparsezoo.bench import BenchConfig, BenchResult, BenchRow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "targets.py"


@pytest.fixture(scope="module")
def targets():
    """The script as a module (registered while it loads: its dataclasses look it up)."""
    spec = importlib.util.spec_from_file_location("benchmark_targets", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def test_issue_targets_are_listed_as_filed(targets) -> None:
    """The targets of issues 3 (NSA), 4 (MoBA) and 5 (DSA): mode, length, layout, ratio and
    the memory rule, as the issues state them."""
    table = {(t.mechanism, t.mode, t.length): t for t in targets.TARGETS}
    assert len(table) == len(targets.TARGETS) == 11
    gqa, mha, prefill = targets.DECODE_GQA, targets.DECODE_MHA, targets.PREFILL
    assert (prefill.n_heads, prefill.n_kv_heads, prefill.head_dim) == (16, 1, 64)
    assert (gqa.n_heads, gqa.n_kv_heads, gqa.head_dim) == (64, 4, 128)
    assert (mha.n_heads, mha.n_kv_heads, mha.head_dim) == (16, 16, 128)
    expected = {
        ("nsa", "fwd", 8192): (prefill, 1.0, False),
        ("nsa", "fwd", 32768): (prefill, 4.5, False),
        ("nsa", "fwdbwd", 32768): (prefill, 3.0, True),
        ("nsa", "decode_attn", 65536): (gqa, 10.0, False),
        ("moba", "fwd", 32768): (prefill, 6.0, True),
        ("moba", "fwdbwd", 32768): (prefill, 4.0, True),
        ("moba", "decode", 65536): (mha, 10.0, False),
        ("moba", "decode_attn", 65536): (mha, 10.0, False),
        ("dsa", "fwd", 32768): (prefill, 3.0, False),
        ("dsa", "fwdbwd", 32768): (prefill, 2.0, False),
        ("dsa", "decode_attn", 65536): (gqa, 6.0, False),
    }
    assert {k: (t.layout, t.speedup, t.memory) for k, t in table.items()} == expected


def test_groups_measure_every_target_once_with_its_layout(targets) -> None:
    """One bench call per (layout, mode); each target in exactly one, whose config has its
    mechanism, mode, scaled length and heads; MoBA gets the paper's blocks, the others their
    defaults; decode calls warm up even when asked for none."""
    groups = targets.bench_groups(targets.TARGETS, repeats=2, warmup=0, scale=4)
    seen = []
    for cfg, members in groups:
        assert isinstance(cfg, BenchConfig) and len(cfg.modes) == 1
        for t in members:
            seen.append(t)
            assert t.mode == cfg.modes[0] and t.mechanism in cfg.mechanisms
            assert t.length // 4 in cfg.lengths
            assert (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
                t.layout.n_heads,
                t.layout.n_kv_heads,
                t.layout.head_dim,
            )
        assert cfg.params == (
            {"moba": {"block_size": 512, "top_k": 3}} if "moba" in cfg.mechanisms else {}
        )
        assert cfg.repeats == 2 and cfg.warmup == (1 if cfg.modes[0].startswith("decode") else 0)
    assert sorted(seen, key=targets.TARGETS.index) == list(targets.TARGETS)
    prefill_fwd = [cfg for cfg, _ in groups if cfg.modes == ["fwd"]]
    assert len(prefill_fwd) == 1 and prefill_fwd[0].lengths == [2048, 8192]
    assert prefill_fwd[0].mechanisms == ["nsa", "moba", "dsa"]


def _row(mechanism: str, speedup: float, peak: float) -> BenchRow:
    return BenchRow(
        mode="fwdbwd",
        seq_len=512,
        mechanism=mechanism,
        times_ms=[1.0],
        median_ms=1.0,
        speedup=speedup,
        speedup_min=speedup - 0.5,
        speedup_max=speedup + 0.5,
        theoretical_speedup=6.5,
        share=speedup / 6.5,
        peak_mem_mb=peak,
        peak_rss_mb=peak,
        rows_read=None,
    )


@pytest.mark.parametrize(
    ("speedup", "peak", "memory", "met"),
    [
        (3.0, 100.0, False, True),  # exactly the required ratio
        (2.99, 100.0, False, False),
        (3.5, 100.0, True, True),  # as much memory as dense is allowed
        (3.5, 100.1, True, False),  # fast enough, but more memory than dense
        (3.5, 100.1, False, True),  # memory not part of this target
    ],
)
def test_verdict_judges_speed_and_memory(
    targets, speedup: float, peak: float, memory: bool, met: bool
) -> None:
    """Met when the median speedup reaches the required one and, for a memory target, the
    peak is no higher than dense's; the line carries the numbers and the verdict."""
    result = BenchResult(
        config=BenchConfig(),
        environment={},
        rows=[_row("dense", 1.0, 100.0), _row("nsa", speedup, peak)],
    )
    target = targets.Target("nsa", "fwdbwd", 2048, targets.PREFILL, 3.0, memory=memory)
    ok, line = targets.verdict(target, result, scale=4)
    assert ok is met
    assert line.endswith(": met" if met else ": NOT met")
    assert f"{speedup:5.2f}x" in line and "required 3x" in line and "T=512" in line
    assert ("dense 100.0 MB" in line) is memory


def test_unknown_mechanism_and_bad_values_exit_2_naming_them(targets, capsys) -> None:
    """A mechanism without targets, a scale below 1 and a bench value the config rejects each
    stop before anything runs, with exit status 2 and a message naming the value."""
    for argv, named in [
        (["--mechanisms", "nsa,sliding_window"], "sliding_window"),
        (["--mechanisms", ""], "--mechanisms"),
        (["--scale", "0"], "--scale"),
        (["--repeats", "0"], "repeats"),
    ]:
        with pytest.raises(SystemExit) as exc:
            targets.main(argv)
        assert exc.value.code == 2
        assert named in capsys.readouterr().err


def test_runs_end_to_end_at_tiny_lengths(targets, tmp_path, capsys) -> None:
    """MoBA's four targets at 1/256 of their lengths: a table per bench call, one verdict
    line per target, the count of targets met, and each call's bench.json under --out."""
    argv = ["--mechanisms", "moba", "--scale", "256", "--repeats", "1", "--warmup", "0"]
    code = targets.main([*argv, "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out.splitlines()
    lines = [ln for ln in out if ln.startswith("moba ")]
    assert len(lines) == 4
    assert all(ln.endswith((": met", ": NOT met")) for ln in lines)
    met = sum(ln.endswith(": met") for ln in lines)
    assert out[-1] == f"{met} of 4 targets met"
    written = sorted(p.parent.name for p in tmp_path.glob("*/bench.json"))
    assert written == [
        "decode-mha-decode",
        "decode-mha-decode_attn",
        "prefill-fwd",
        "prefill-fwdbwd",
    ]
    rows = json.loads((tmp_path / "prefill-fwd" / "bench.json").read_text())["rows"]
    assert {(r["mechanism"], r["seq_len"]) for r in rows} == {("dense", 128), ("moba", 128)}
