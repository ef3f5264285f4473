"""Overlapping the reads of one store with the work done on the previous batch."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TypeVar

T = TypeVar("T")


async def read_ahead(batches: AsyncIterator[T]) -> AsyncIterator[T]:
    """Yields what `batches` yields, reading the next item while the caller works.

    Reading the source and writing the destination then overlap; at most two
    batches are held at once, so memory stays bounded by the batch size.
    """
    iterator = aiter(batches)
    pending = asyncio.ensure_future(anext(iterator))
    try:
        while True:
            try:
                item = await pending
            except StopAsyncIteration:
                return
            pending = asyncio.ensure_future(anext(iterator))
            yield item
    finally:
        if not pending.done():
            pending.cancel()
        # Retrieved, so an unread failure is not logged as never retrieved.
        await asyncio.gather(pending, return_exceptions=True)
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()
