"""Helpers shared by the kernel tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an aten op returns.

    Kernel tests use it to prove a fast path never materialises a [T, T]- or [T, N]-sized
    tensor, in forward or backward.
    """

    def __init__(self) -> None:
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        """Run the op unchanged and remember the size of its largest output tensor."""
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, tuple | list) else (out,):
            if isinstance(x, torch.Tensor):
                self.numel = max(self.numel, x.numel())
        return out


def interpreted_report(module: str) -> dict[str, str]:
    """Run ``module.compare_triton_with_naive()`` in a child with TRITON_INTERPRET=1; its report.

    The variable must be set before any Triton kernel module is imported, hence the child
    process; the report maps each case id to '' (match) or why it mismatched.
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    child = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"import {module} as t; print(json.dumps(t.compare_triton_with_naive()))"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
