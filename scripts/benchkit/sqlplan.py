"""Statements a SQLAlchemy engine issues, and the plan of a captured one."""

from __future__ import annotations

from collections.abc import Awaitable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine


@contextmanager
def captured_statements(engine: AsyncEngine) -> Iterator[list[tuple[str, Any]]]:
    """Collects (SQL, parameters) of every statement sent through `engine` meanwhile."""
    captured: list[tuple[str, Any]] = []

    def listener(*args: Any) -> None:
        _connection, _cursor, statement, parameters = args[:4]
        captured.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", listener)
    try:
        yield captured
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", listener)


async def count_statements(engine: AsyncEngine, call: Awaitable[Any]) -> list[str]:
    """Runs `call`; returns the first words of each statement it sent, in order."""
    with captured_statements(engine) as captured:
        await call
    return [" ".join(statement.split()[:4]) for statement, _ in captured]


async def explain_captured(engine: AsyncEngine, call: Awaitable[Any]) -> str:
    """Runs `call`, then EXPLAINs the last SELECT it sent, with the same parameters."""
    with captured_statements(engine) as captured:
        await call
    selects = [
        (sql, params) for sql, params in captured if sql.lstrip().upper().startswith("SELECT")
    ]
    if not selects:
        return "no SELECT captured"
    statement, parameters = selects[-1]
    prefix = "EXPLAIN QUERY PLAN " if engine.dialect.name == "sqlite" else "EXPLAIN "
    async with engine.connect() as connection:
        result = await connection.exec_driver_sql(prefix + statement, tuple(parameters))
        rows = result.fetchall()
    return "\n".join(" ".join(str(value) for value in row) for row in rows)
