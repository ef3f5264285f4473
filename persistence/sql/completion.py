"""Database work that runs to its end even when the calling task is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def run_to_completion(operation: Coroutine[Any, Any, T]) -> T:
    """Awaits `operation` in a task of its own; a cancel waits for it, then propagates.

    aiosqlite cannot interrupt a statement running in its thread. A write cancelled
    half way makes SQLAlchemy close a connection whose statement is still active, and
    SQLite keeps that connection's write lock until the garbage collector finalizes
    the statement: every other writer, in every process, times out meanwhile. So the
    transaction finishes (commit or rollback), and only then does the cancel go on.

    Raises:
        asyncio.CancelledError: if the caller was cancelled, once `operation` is over.
    """
    task = asyncio.ensure_future(operation)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            if task.done() and cancelled is None and task.cancelled():
                raise
            cancelled = cancelled or exc
        except BaseException:
            break
    if cancelled is not None:
        if not task.cancelled() and task.exception() is not None:
            cancelled.__context__ = task.exception()
        raise cancelled
    return task.result()
