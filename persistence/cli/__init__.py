"""The `persistence` command line (typer): `main` is the console script's entry point,
`app` the command group it runs."""

from __future__ import annotations

from persistence.cli.app import app

__all__ = ["app", "main"]


def main() -> None:
    """The console script (and `python -m persistence`), under the name its messages
    and its shell-completion variable use whatever the script is called."""
    app(prog_name="persistence")
