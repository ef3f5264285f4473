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

from sqlalchemy import event, text
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
    """Runs the search `call`, then EXPLAINs the statements it sent for `words`.

    The library reads the newest rows, then (for rare words) its index: both plans
    are shown, with the parameters the library binds for the first word.
    """
    await call
    search = importlib.import_module("persistence.sql.search")
    module = importlib.import_module("persistence.sql.search_statements")
    dialect = engine.dialect.name
    shape = module.Shape(session=False, role=False)
    word = words[0].lower()
    arity, bound = module.word_parameters(dialect, [word], [])
    recheck, rechecked = module.word_parameters(dialect, [], [], "recheck_")
    if dialect == "postgresql":
        match, prefix = f"'{word}':* | '\u00a7\u00a7'", "EXPLAIN "
    else:
        match, prefix = f'"{word}"*', "EXPLAIN QUERY PLAN "
    plans = []
    window = {"below": 2**62, "skip": search.PROBE_ROWS - 1, "limit": 50}
    index = {**window, "edge": None, "match": match}
    async with engine.connect() as connection:
        for name, statement, params in (
            ("scan", module.scan_statement(shape, arity), window),
            ("index", module.index_statement(shape, arity, recheck), index),
        ):
            sql = str(statement.compile(engine.dialect).compiled.statement)
            params = {**params, **bound, **rechecked, "overflow": "'\u00a7\u00a7'"}
            rows = (await connection.execute(text(prefix + sql), params)).fetchall()
            plans.append(f"{name}: " + " | ".join(" ".join(str(v) for v in r) for r in rows))
    return "\n".join(plans)
