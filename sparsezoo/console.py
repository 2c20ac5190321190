"""The rich console every command prints its tables with."""

from __future__ import annotations

from rich.console import Console


def console() -> Console:
    """A console that never wraps table cells: wide when output is piped or captured.

    Rich assumes 80 columns when stdout is not a terminal, which folds metric names and numbers
    across lines in logs and CI output; tables are meant to be read and grepped one row a line.
    """
    con = Console()
    return con if con.is_terminal else Console(width=200)
