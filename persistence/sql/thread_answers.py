"""Answers from a SQLite connection's thread that outlive the loop that asked.

aiosqlite's worker thread answers each call through the asking future's loop
(`call_soon_threadsafe`). Found by attack: when that loop had closed meanwhile (a
loop ended with the call in flight), the answer raised "Event loop is closed", so did
the error it then tried to send, and the thread died: every later call from every
loop, `close()` too, waited for good. Here each call answers its own future, and an
answer to a closed loop is dropped: nobody waits for it there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import suppress
from queue import SimpleQueue
from threading import Thread
from typing import Any

import aiosqlite
from aiosqlite import core as aiosqlite_core

Call = Callable[[], Any]


def settle(future: asyncio.Future[Any], succeeded: bool, value: Any) -> None:
    """Sets `future`'s outcome, unless it is done (cancelled meanwhile); in its loop."""
    if future.done():
        return
    if succeeded:
        future.set_result(value)
    else:
        future.set_exception(value)


def answer_from_thread(future: asyncio.Future[Any], succeeded: bool, value: Any) -> None:
    """Sends `future` its outcome from another thread; dropped if its loop is closed."""
    with suppress(RuntimeError):  # the loop is closed: nothing there awaits the answer
        future.get_loop().call_soon_threadsafe(settle, future, succeeded, value)


class _AnsweringQueue:
    """What the worker thread reads instead of the connection's queue: every call comes
    without its future, wrapped to answer the future itself."""

    __slots__ = ("_queue",)

    def __init__(self, queue: SimpleQueue[tuple[asyncio.Future[Any] | None, Call]]) -> None:
        self._queue = queue

    def get(self) -> tuple[None, Call]:
        future, function = self._queue.get()
        if future is None:
            return None, function
        return None, _answering(future, function)


def _answering(future: asyncio.Future[Any], function: Call) -> Call:
    def call() -> Any:
        try:
            result = function()
        except BaseException as exc:
            answer_from_thread(future, False, exc)
            raise  # the worker logs it and goes on (no future of its own to answer)
        answer_from_thread(future, True, result)
        return result  # the worker stops on its stop sentinel

    return call


def answer_safely(connection: aiosqlite.Connection) -> None:
    """Makes `connection`'s thread (not started yet) answer through `_AnsweringQueue`."""
    thread = connection._thread
    if thread.is_alive() or thread.ident is not None:
        raise RuntimeError("the connection's thread has started")
    connection._thread = Thread(
        target=aiosqlite_core._connection_worker_thread,
        args=(_AnsweringQueue(connection._tx),),
        daemon=True,
    )
