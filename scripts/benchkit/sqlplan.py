"""The statements the library sends, and the query plan of its search.

The library's SQL core sends its hot-path statements straight to the driver and
reports each one to `persistence.sql.runner.traced`; older cores went through
SQLAlchemy, whose `before_cursor_execute` event sees them. Both are listened to.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine


@contextmanager
def captured_sql(engine: AsyncEngine) -> Iterator[list[str]]:
    """Collects the SQL of every statement the library sends meanwhile."""
    captured: list[str] = []
    with ExitStack() as stack:
        try:
            runner = importlib.import_module("persistence.sql.runner")
            stack.enter_context(runner.traced(captured.append))
        except (ModuleNotFoundError, AttributeError):
            # No runner: every statement goes through SQLAlchemy's cursor events.
            def listener(*args: Any) -> None:
                captured.append(args[2])

            event.listen(engine.sync_engine, "before_cursor_execute", listener)
            stack.callback(event.remove, engine.sync_engine, "before_cursor_execute", listener)
        yield captured


async def count_statements(engine: AsyncEngine, call: Awaitable[Any]) -> list[str]:
    """Runs `call`; returns the first words of each statement it sent, in order."""
    with captured_sql(engine) as captured:
        await call
    return [" ".join(statement.split()[:4]) for statement in captured]


async def explain_search(engine: AsyncEngine, call: Awaitable[Any], words: list[str]) -> str:
    """Runs the search `call`, then EXPLAINs the SELECT it sent with the same words.

    Both engines' search statements take the query, then the limit.
    """
    with captured_sql(engine) as captured:
        await call
    selects = [sql for sql in captured if sql.lstrip().upper().startswith("SELECT")]
    if not selects:
        return "no SELECT captured"
    if engine.dialect.name == "sqlite":
        prefix, query = "EXPLAIN QUERY PLAN ", " ".join(f'"{word}"' for word in words)
    else:
        prefix, query = "EXPLAIN ", " ".join(words)
    async with engine.connect() as connection:
        result = await connection.exec_driver_sql(prefix + selects[-1], (query, 50))
        rows = result.fetchall()
    return "\n".join(" ".join(str(value) for value in row) for row in rows)
