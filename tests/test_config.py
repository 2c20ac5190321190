"""Configs: composition, overrides, validation errors naming the key, layer specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparsezoo.config import (
    ConfigError,
    compose,
    flatten,
    load_config,
    parse_layer_spec,
    split_study_file,
    to_yaml,
)

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_defaults_are_valid() -> None:
    cfg = load_config()
    assert cfg.attention.mechanism == "dense"
    assert cfg.data.corpus == ["stdlib"]


def test_includes_then_file_then_overrides(tmp_path: Path) -> None:
    (tmp_path / "base.yaml").write_text("model:\n  d_model: 96\n  n_layers: 3\ntrain:\n  lr: 0.1\n")
    (tmp_path / "exp.yaml").write_text("include: [base.yaml]\nmodel:\n  n_layers: 5\n")
    cfg = load_config(tmp_path / "exp.yaml", ["train.lr=0.2"])
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.train.lr) == (96, 5, 0.2)


def test_shipped_configs_and_experiments_load() -> None:
    cfg = load_config(ROOT / "experiments" / "demo.yaml")
    assert cfg.experiment == "demo" and cfg.model.name == "tiny"
    assert cfg.attention.params["sliding_window"]["window"] == 64
    for size in ("tiny", "small", "base"):
        assert load_config(ROOT / "configs" / "model" / f"{size}.yaml").model.name == size


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.dmodel=3"],
            "unknown config key 'model.dmodel'; valid keys here: name, vocab_size",
        ),
        (["trian.lr=3"], "unknown config key 'trian'"),
        (["model.d_model=abc"], "invalid value for 'model.d_model'"),
        (["train.progress_bar=maybe"], "invalid value for 'train.progress_bar'"),
        (["train.lr=0"], "train.lr=0.0 is invalid; allowed: > 0"),
        (["data.val_fraction=1.5"], "data.val_fraction=1.5 is invalid"),
        (["data.vocab_size=100"], "data.vocab_size=100 is invalid; allowed: 257..65535"),
        (["model.n_kv_heads=3"], "a divisor of model.n_heads=4"),
        (["model.d_model=130"], "a multiple of model.n_heads=4"),
        (["train.precision=fp8"], "train.precision='fp8' is invalid"),
        (["attention.mechanism=nsaa"], "unknown attention mechanism 'nsaa'; registered: dense"),
        (["attention.layers=dense*3"], "names 3 layers but model.n_layers=4"),
        (["attention.layers=dense*x,dense"], "bad item 'dense*x'"),
        (["attention.params.sliding_window.window=0"], "attention.params.sliding_window: window=0"),
        (["attention.params.sliding_window.win=4"], "unknown parameter(s) ['win']"),
        (["attention.params.nope.x=1"], "unknown attention mechanism 'nope'"),
        (["lr"], "override 'lr' must look like key=value"),
    ],
)
def test_bad_values_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert message in str(info.value)


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("model: {d_model: [\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(tmp_path / "broken.yaml")
    (tmp_path / "a.yaml").write_text("include: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("include: [a.yaml]\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(tmp_path / "a.yaml")


def test_layer_spec() -> None:
    assert parse_layer_spec("", "dense", 3) == ["dense"] * 3
    assert parse_layer_spec("sliding_window*2, dense", "x", 3) == [
        "sliding_window",
        "sliding_window",
        "dense",
    ]


def test_resolved_yaml_roundtrip_and_flatten(tmp_path: Path) -> None:
    cfg = load_config(
        None, ["attention.mechanism=sliding_window", "attention.params.sliding_window.window=7"]
    )
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path) == cfg
    flat = flatten(cfg)
    assert flat["attention.params.sliding_window.window"] == "7"
    assert flat["data.corpus"] == "stdlib"
    assert flat["model.head_dim"] == "None"


def test_split_study_file_returns_base_and_section(tmp_path) -> None:
    path = tmp_path / "study.yaml"
    path.write_text("experiment: s\ntrain:\n  max_steps: 7\nsweep:\n  study: s\n  n: [1, 2]\n")
    base, section, rest = split_study_file(path, "sweep")
    assert section == {"study": "s", "n": [1, 2]} and rest == []
    cfg = compose([base])
    assert cfg.experiment == "s" and cfg.train.max_steps == 7
    # sweep.* overrides edit the section (below a path-keyed mapping the rest is one key);
    # the others come back for the base config
    overrides = ["sweep.n=[3]", "sweep.space.data.seq_len=[64]", "train.max_steps=9"]
    _, section, rest = split_study_file(path, "sweep", overrides, ("space",))
    assert section == {"study": "s", "n": [3], "space": {"data.seq_len": [64]}}
    assert rest == ["train.max_steps=9"]
    with pytest.raises(ConfigError, match=r"sweep\.n is not a mapping"):
        split_study_file(path, "sweep", ["sweep.n.x=1"])
    with pytest.raises(ConfigError, match="no 'ablation:' section"):
        split_study_file(path, "ablation")
    path.write_text("sweep: [1, 2]\n")
    with pytest.raises(ConfigError, match="'sweep' must be a mapping"):
        split_study_file(path, "sweep")
