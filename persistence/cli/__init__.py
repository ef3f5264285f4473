"""The `persistence` command line (typer): `app` is the console script's entry point."""

from __future__ import annotations

from persistence.cli.app import app

__all__ = ["app"]
