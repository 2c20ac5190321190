"""The README's worked example of a user mechanism runs and passes the conformance suite."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

from sparsezoo import registry

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_mechanism_example_passes_conformance() -> None:
    text = README.read_text()
    section = text.split("## Adding a mechanism", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert "run_conformance" in code
    # dataclasses resolve annotations through sys.modules, so the example runs as a real module
    module = types.ModuleType("readme_example")
    sys.modules[module.__name__] = module
    try:
        exec(compile(code, "README.md", "exec"), module.__dict__)
        assert "strided" in registry.list_mechanisms()
    finally:
        registry._registered.pop("strided", None)
        sys.modules.pop(module.__name__, None)
