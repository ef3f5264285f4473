"""`python -m persistence`: the same command line as the `persistence` script."""

from persistence.cli import main

main()
