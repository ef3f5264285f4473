"""Checks of the arguments that name files, stores and callbacks, before any I/O.

Found by attack: a path of None or 5 reached `Path()` (a TypeError naming nothing), a
NUL in one reached the operating system ("embedded null byte"), and a callback of 5
failed after the first batch was written. Each now raises InvalidDataError naming the
argument (API.md: bad input raises a ValueError subclass before anything is written).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from persistence.errors import InvalidDataError
from persistence.storage import SessionStorage


def path_argument(value: object, name: str) -> Path:
    """`value` as a Path: a str or an os.PathLike of one, not empty, without NUL.

    Raises:
        InvalidDataError: naming the argument.
    """
    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str):
        raise InvalidDataError(
            f"{name}: expected a path (str or os.PathLike), got {type(value).__name__}"
        )
    if not text:
        raise InvalidDataError(f"{name}: the path is empty")
    if (problem := unnamable(text)) is not None:
        raise InvalidDataError(f"{name}: the path {problem}")
    return Path(text)


def unnamable(path: str) -> str | None:
    """Why no file can have the name `path` (None: one can).

    Found by attack: a config file's `database_path: "chats-\\ud83d\\ude00.db"` (an
    emoji as JSON escapes, which YAML reads as two lone surrogates) was accepted, then
    opening the store raised a bare UnicodeEncodeError naming nothing.
    """
    if "\x00" in path:
        return "holds a NUL byte, which no file name can"
    try:
        os.fsencode(path)
    except UnicodeError:
        return f"holds a lone surrogate character, which no file name can ({path!a})"
    return None


def storage_argument(value: object, name: str) -> SessionStorage:
    """`value`, a SessionStorage.

    Raises:
        InvalidDataError: naming the argument.
    """
    if not isinstance(value, SessionStorage):
        raise InvalidDataError(f"{name}: expected a SessionStorage, got {type(value).__name__}")
    return value


async def refuse_one_store(
    source: SessionStorage, destination: SessionStorage, *, reading: bool = False
) -> None:
    """Refuses two sides that are one store: one storage, or two of one store by any path
    or URL (their tokens, so both must be open). With `reading` (a comparison, which
    writes nothing), copies of a store running apart under its token (a physical copy of
    a PostgreSQL cluster: running_instance) are two stores.

    Raises:
        InvalidDataError: naming both.
    """
    if source is destination:
        raise InvalidDataError("source and destination are the same storage")
    if source.token != destination.token:
        return
    if reading and await source.running_instance() != await destination.running_instance():
        # Found by attack: a physical copy running apart was refused as the same store.
        return
    # Found by attack: the same store by a symlink, a hard link or another URL form was
    # migrated into itself, and "verified" against itself.
    raise InvalidDataError(
        f"source and destination are the same store ({source!r} and {destination!r})"
    )


def callback_argument(value: object, name: str = "progress_callback") -> Callable[..., Any] | None:
    """`value`, None or callable.

    Raises:
        InvalidDataError: naming the argument.
    """
    if value is not None and not callable(value):
        raise InvalidDataError(f"{name}: expected a callable or None, got {type(value).__name__}")
    if inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(
        getattr(value, "__call__", None)  # noqa: B004  # an object with an async __call__
    ):
        # Found by attack: called, never awaited, it reported nothing.
        raise InvalidDataError(
            f"{name}: an async function is not awaited here; give a plain function"
            " (it may schedule a task)"
        )
    return value
