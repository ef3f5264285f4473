"""A transfer cancelled while it writes its second batch, as Ctrl-C or SIGTERM stop one."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from persistence.sql.runner import traced

ProgressCallback = Callable[[int, int], object]


async def cancelled_in_the_second_batch(
    transfer: Callable[[ProgressCallback], Coroutine[Any, Any, Any]], batch_size: int
) -> tuple[int, str]:
    """Runs `transfer(progress_callback)`, cancels it once while it writes the sessions
    of its second batch (a second cancel stops the batch too), and returns the last
    count its progress reported and the note of how far it got."""
    loop = asyncio.get_running_loop()
    reported = [0]
    task = asyncio.create_task(transfer(lambda done, total: reported.append(done)))
    cancelled: list[bool] = []

    def cancel(sql: str) -> None:
        if (
            sql.startswith(("INSERT INTO chat_sessions", "COPY chat_sessions"))
            and max(reported) == batch_size
            and not cancelled
        ):
            cancelled.append(True)
            loop.call_soon_threadsafe(task.cancel)

    with traced(cancel), pytest.raises(asyncio.CancelledError) as raised:
        await task
    return max(reported), " ".join(raised.value.__notes__)
