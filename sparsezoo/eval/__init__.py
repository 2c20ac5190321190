"""Long-context evaluation suites: passkey, MQAR, loss by position, length extrapolation.

``sparsezoo eval <run id | run dir | checkpoint> --suite passkey,mqar`` (:func:`evaluate`) or
``eval.suites`` in a training config (:func:`evaluate_model`, run at the end of training) score
a trained model and log ``eval/<task>/...`` metrics, heatmaps and plots into its MLflow run.
One module per suite; :mod:`sparsezoo.eval.core` holds what they share.
"""

from sparsezoo.eval.core import CannotRun, EvalContext, SuiteOutput, TaskResult
from sparsezoo.eval.runner import (
    SUITES,
    EvalError,
    EvalResult,
    EvalTarget,
    evaluate,
    evaluate_model,
    load_model,
    parse_suites,
    resolve_target,
)

__all__ = [
    "SUITES",
    "CannotRun",
    "EvalContext",
    "EvalError",
    "EvalResult",
    "EvalTarget",
    "SuiteOutput",
    "TaskResult",
    "evaluate",
    "evaluate_model",
    "load_model",
    "parse_suites",
    "resolve_target",
]
