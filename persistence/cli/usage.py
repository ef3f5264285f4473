"""Usage errors (click's own: an unknown command, an extra argument, a bad choice)
with every URL's password masked, as in every other message of the command line; help
or version text that cannot be written, one error line as for every command; and
none of them written into a SQLite database or journal standing as standard output or
error."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import typer
from typer.core import TyperGroup

from persistence.cli.output import fail, os_error_line, refuse_output_into_sqlite_files
from persistence.cli.streams import closed_stdout_fails, escape_what_output_cannot_encode
from persistence.config.masking import mask_typed_words

try:
    # Recent typer runs its own copy of click, whose errors derive from this.
    from typer import TyperException as ClickError
except ImportError:  # older typer runs click itself
    from click import ClickException as ClickError  # type: ignore[assignment]  # same fields


@contextmanager
def _masked_usage_errors(typed: Sequence[str]) -> Iterator[None]:
    try:
        yield
    except ClickError as exc:
        # Found by attack: click repeats the words it refuses as they were typed
        # (`persistence stats postgresql://app:secret@db/app`). It keeps them in
        # `message`; the rest of its text (an option's name) is our declarations'.
        # Each typed word is masked whole: a password holding `://` or a new line
        # cannot be told from two URLs in free text.
        exc.message = mask_typed_words(exc.message, typed)
        raise


@contextmanager
def _unwritable_output() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:
        raise  # click ends the command quietly with status 1
    except OSError as exc:
        # Found by attack: `persistence --help > /dev/full` printed a traceback. click
        # prints --help and --version itself, outside every command's own `run`.
        fail(os_error_line(exc))


class MaskingGroup(TyperGroup):
    """The application's command group: parsing and running it (the subcommands and
    their own parsing included) raise usage errors with URL passwords masked, and
    output that cannot be written (their help; a closed standard output too) is one
    error line with status 1."""

    typed: tuple[str, ...] = ()  # the command line's words, as make_context got them

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the command line, standard output and error checked before anything is
        said: typer's shell-completion hook, usage errors, help and version text come
        before any store is known (found by attack: `_PERSISTENCE_COMPLETE=bash_source
        persistence 2>> store.db`, `persistence sessions lst 2>> store.db`)."""
        try:
            refuse_output_into_sqlite_files()
        except typer.Exit as exc:
            if not kwargs.get("standalone_mode", True):
                return exc.exit_code
            sys.exit(exc.exit_code)
        return super().main(*args, **kwargs)

    def make_context(
        self, info_name: str | None, args: list[str], *rest: Any, **kwargs: Any
    ) -> Any:
        self.typed = tuple(args)
        closed_stdout_fails()
        escape_what_output_cannot_encode()
        with _masked_usage_errors(self.typed), _unwritable_output():
            return super().make_context(info_name, args, *rest, **kwargs)

    def invoke(self, *args: Any, **kwargs: Any) -> Any:
        with _masked_usage_errors(self.typed), _unwritable_output():
            return super().invoke(*args, **kwargs)
