"""The ``sparsezoo`` command line: train, ablate, sweep, bench, eval, report, ui, mechanisms.

Every command takes a config file and/or ``key=value`` overrides where it makes sense. Bad input
ends with a one-line error naming the offending key or value and a non-zero exit status (2 for
usage and configuration errors, 1 for a run that failed after starting).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import traceback
from collections.abc import Sequence

from rich.table import Table

from sparsezoo.ablation_report import build_report, log_report
from sparsezoo.ablation_report import render_table as render_ablation
from sparsezoo.bench import add_bench_arguments, bench_command
from sparsezoo.config import ConfigError, load_config
from sparsezoo.console import console
from sparsezoo.data import CorpusError
from sparsezoo.mechanisms.base import MechanismConfigError
from sparsezoo.registry import UnknownMechanismError, get_mechanism, list_mechanisms
from sparsezoo.report import ReportError, print_report
from sparsezoo.tracking import TrackingError, check_tracking, resolve_tracking_uri

USER_ERRORS = (
    ConfigError,
    CorpusError,
    TrackingError,
    ReportError,
    MechanismConfigError,
    UnknownMechanismError,
    FileNotFoundError,
)


def _split_args(items: Sequence[str]) -> tuple[str | None, list[str]]:
    """Separate an optional leading config path from ``key=value`` overrides."""
    path = None
    overrides = []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif path is None:
            path = item
        else:
            raise ConfigError(f"unexpected argument {item!r}: give one config file, then key=value")
    return path, overrides


def cmd_train(args: argparse.Namespace) -> int:
    """Train one model from a config file plus overrides (or resume a run)."""
    from sparsezoo.train import train

    path, overrides = _split_args(args.items)
    if args.resume:
        if path is not None:
            raise ConfigError("--resume uses the run's saved config; pass only key=value overrides")
        result = train(resume=args.resume, overrides=overrides)
    else:
        result = train(load_config(path, overrides))
    con = console()
    con.print(f"[bold]run[/bold] {result.run_id or '(tracking disabled)'}  dir {result.run_dir}")
    for key in sorted(result.metrics):
        con.print(f"  {key:28s} {result.metrics[key]:.4f}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    """Train an ablation grid under one parent run, then print and log its report."""
    from sparsezoo.ablate import load_ablation, run_ablation

    path, overrides = _split_args(args.items)
    if path is None:
        raise ConfigError("sparsezoo ablate needs an ablation file: experiments/<name>.yaml")
    ablation = load_ablation(path, overrides)
    console().print(
        f"[bold]ablation[/bold] {ablation.name}: {len(ablation.points)} points "
        f"-> experiment {ablation.experiment}"
    )
    outcome = run_ablation(ablation, resume=args.resume)
    uri = ablation.configs[0].tracking.uri
    report = build_report(outcome.parent_run_id, uri)
    console().print(render_ablation(report))
    log_report(report, uri)
    if outcome.skipped:
        console().print(f"skipped {len(outcome.skipped)} finished point(s) (--resume)")
    if outcome.failed:
        for key, error in outcome.failed.items():
            print(f"error: point {key} failed: {error}", file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    """Run more trials of the Optuna study a sweep file describes, then print where it stands."""
    from sparsezoo.sweep import print_sweep, run_sweep

    path, overrides = _split_args(args.items)
    if path is None:
        raise ConfigError("sparsezoo sweep needs a sweep file: experiments/<name>.yaml")
    result = run_sweep(
        path,
        args.n_trials,
        study_trials=args.study_trials,
        storage=args.storage,
        study_name=args.study,
        overrides=overrides,
        timeout=args.timeout,
    )
    print_sweep(result)
    if result.interrupted:
        print("interrupted: run the same command again to continue the study", file=sys.stderr)
        return 130
    if result.trials_run and result.failed_this_run == len(result.trials_run):
        print("error: every trial failed; see the sparsezoo.error tags in MLflow", file=sys.stderr)
        return 1
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Evaluate a trained run with the named suites; print the metrics and where they went."""
    from sparsezoo.eval import evaluate, parse_suites

    result = evaluate(
        args.run,
        parse_suites(args.suite),
        args.items,
        tracking_uri=args.tracking_uri,
        new_run=args.new_run,
    )
    con = console()
    con.print(f"[bold]eval[/bold] step {result.step} -> run {result.run_id or '(not logged)'}")
    for key in sorted(result.metrics):
        con.print(f"  {key:40s} {result.metrics[key]:.4f}")
    for key, why in result.skipped.items():
        con.print(f"  [yellow]cannot run[/yellow] {key}: {why}")
    for path in result.files:
        con.print(f"  wrote {path}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """An ablation's report (by parent run id, or an experiment's latest ablation), else the
    side-by-side table of an experiment's training runs."""
    if not args.all:
        try:
            report = build_report(args.experiment, args.tracking_uri)
        except ReportError:
            report = None
        if report is not None:
            console().print(render_ablation(report))
            return 0
    print_report(args.experiment, args.tracking_uri, latest=not args.all)
    return 0


def cmd_mechanisms(args: argparse.Namespace) -> int:
    """List registered mechanisms with their knobs, defaults, allowed ranges and which knobs a
    curriculum phase may change (``data.curriculum[].attention_params``)."""
    con = console()
    for name in list_mechanisms():
        cls = get_mechanism(name)
        doc = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        table = Table(title=f"{name} — {doc}", title_justify="left", expand=False)
        for col in ("knob", "type", "default", "allowed", "phase", "help"):
            table.add_column(col)
        for k in cls.Params.describe():
            phase = "yes" if k.phase else ""
            table.add_row(k.name, k.type, repr(k.default), k.allowed, phase, k.help)
        if not cls.Params.describe():
            table.add_row("(none)", "", "", "", "", "")
        con.print(table)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    """Serve the MLflow UI on the configured store (loopback by default) and print its URL."""
    uri = resolve_tracking_uri(args.tracking_uri)
    check_tracking(uri)
    if uri.startswith(("http://", "https://")):
        print(f"MLflow UI: {uri}")
        return 0
    url = f"http://{args.host}:{args.port}"
    print(f"MLflow UI: {url}  (store {uri}; Ctrl-C to stop)", flush=True)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    cmd += ["--host", args.host, "--port", str(args.port), "--workers", "1"]
    try:
        return subprocess.call(cmd)
    except KeyboardInterrupt:
        return 0


def _setup_logging() -> None:
    """Show sparsezoo's progress messages on stderr without touching other libraries' logging."""
    logger = logging.getLogger("sparsezoo")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[sparsezoo] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``sparsezoo`` command."""
    parser = argparse.ArgumentParser(
        prog="sparsezoo", description="Comparative sparse-attention experimentation platform."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model from a config file and key=value overrides")
    p.add_argument("items", nargs="*", help="[CONFIG.yaml] [key=value ...]")
    p.add_argument("--resume", metavar="RUN_DIR|CKPT", help="continue an interrupted run")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("ablate", help="train an ablation grid and report it")
    p.add_argument("items", nargs="*", help="ABLATION.yaml [key=value ...]")
    p.add_argument("--resume", action="store_true", help="skip points that already finished")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("sweep", help="run trials of an Optuna sweep over config values")
    p.add_argument("items", nargs="*", help="SWEEP.yaml [key=value ...]")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--n-trials", type=int, help="trials to run in this call")
    budget.add_argument(
        "--study-trials",
        type=int,
        help="run until the study has N finished trials, shared with every worker on it",
    )
    p.add_argument("--storage", default=None, help="Optuna storage URL or journal:PATH")
    p.add_argument("--study", default=None, help="study name (default: sweep.study, file stem)")
    p.add_argument("--timeout", type=float, default=None, help="start no trial after S seconds")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("bench", help="time mechanisms against dense attention")
    add_bench_arguments(p)
    p.set_defaults(func=bench_command)

    p = sub.add_parser("eval", help="long-context evaluation of a trained run, logged to MLflow")
    p.add_argument("run", help="MLflow run id, run directory or checkpoint file")
    p.add_argument(
        "items",
        nargs="*",
        help="eval.<key>=value settings; attention.params.<mechanism>.<knob>=value test-time "
        "knobs (scored into a new eval run tagged with them)",
    )
    p.add_argument(
        "--suite",
        action="append",
        required=True,
        help="suites, comma-separated or repeated: passkey, mqar, loss_by_position, extrapolation",
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="tracking store of the evaluated run (default: the one its run.json records; for a "
        "run id, MLFLOW_TRACKING_URI or the local store)",
    )
    p.add_argument(
        "--new-run",
        action="store_true",
        help="log into a new eval run linked to the evaluated one (default: into that run)",
    )
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="compare an ablation's or an experiment's runs from MLflow")
    p.add_argument("experiment", help="ablation parent run id or MLflow experiment name")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument(
        "--all",
        action="store_true",
        help="the training-runs table with every run (not an ablation, not latest per mechanism)",
    )
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("ui", help="start the MLflow UI on the tracking store")
    p.add_argument("--tracking-uri", default=None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser("mechanisms", help="list registered mechanisms and their knobs")
    p.set_defaults(func=cmd_mechanisms)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sparsezoo`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot resume a positional list after an option
    # (`sweep FILE --n-trials 3 key=value`): the trailing key=value items join the list
    if extra and hasattr(args, "items") and all("=" in item for item in extra):
        args.items = [*args.items, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _setup_logging()
    try:
        return int(args.func(args))
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        # A failure after the run started: the traceback helps debugging; the MLflow run has
        # already been marked FAILED by the tracking layer.
        traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
