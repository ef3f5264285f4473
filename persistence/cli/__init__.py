"""The `persistence` command line (typer): `main` is the console script's entry point,
`app` the command group it runs."""

from __future__ import annotations

import typer

from persistence.cli.app import app
from persistence.cli.output import refuse_output_into_sqlite_files

__all__ = ["app", "main"]


def main() -> None:
    """The console script (and `python -m persistence`): standard output and error are
    checked before typer runs at all. Found by attack: its shell-completion hook
    (`_PERSISTENCE_COMPLETE=... persistence 2>> store.db`) prints before any command's
    arguments are parsed, where the command group checks them."""
    try:
        refuse_output_into_sqlite_files()
    except typer.Exit as exc:
        raise SystemExit(exc.exit_code) from None
    app(prog_name="persistence")
