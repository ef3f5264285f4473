"""`python -m persistence`: the same command line as the `persistence` script."""

from persistence.cli import app

app(prog_name="persistence")
