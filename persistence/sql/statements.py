"""Core statements, compiled once per dialect, with SQLAlchemy's own type processing.

The hot paths send these compiled strings straight to the driver (see runner.py), so a
save or a load pays for no statement building, compiling or result-object machinery,
yet every value is bound and decoded exactly as SQLAlchemy would do it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Dialect
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

from persistence.validation import shown

Processor = Callable[[Any], Any] | None


@dataclass(frozen=True, slots=True)
class Compiled:
    """One statement as one dialect's driver takes it."""

    compiled: SQLCompiler
    sql: str
    defaults: Mapping[str, Any]
    expanding: bool
    bind_processors: Mapping[str, Processor]
    plan: tuple[tuple[str, Processor], ...]
    processed_columns: tuple[tuple[int, Callable[[Any], Any]], ...]
    described: tuple[tuple[str, str], ...]
    """Each result column's name (table.column where known) and what it holds."""

    def bind(self, params: Mapping[str, Any]) -> tuple[str, tuple[Any, ...]]:
        """Returns the SQL and its positional parameters, processed for the driver."""
        if self.expanding:
            state = self.compiled.construct_expanded_state(params)
            processors = self.bind_processors
            return state.statement, tuple(
                value if (process := processors.get(name)) is None else process(value)
                for name in state.positiontup or ()
                for value in (state.parameters[name],)
            )
        return self.sql, self.values(params)

    def values(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        """The positional parameters of a statement without expanding (IN) parameters."""
        if self.defaults:
            params = {**self.defaults, **params}
        return tuple(
            params[name] if process is None else process(params[name])
            for name, process in self.plan
        )

    def decode(self, rows: Sequence[Sequence[Any]]) -> Sequence[Sequence[Any]]:
        """Returns driver rows with SQLAlchemy's result processing applied.

        Column by column, with `map`: a history is thousands of rows, and this keeps
        the per-row interpreter work to the processors themselves.
        """
        if not self.processed_columns or not rows:
            return rows
        columns: list[Any] = list(zip(*rows, strict=True))
        for index, process in self.processed_columns:
            columns[index] = map(process, columns[index])
        return list(zip(*columns, strict=True))

    def unreadable(self, rows: Sequence[Sequence[Any]]) -> str:
        """Names the first value that `decode` cannot read, walking `rows` again (only
        once decoding failed); its row by its first column (a session's or message's id).
        """
        for row in rows:
            for index, process in self.processed_columns:
                try:
                    process(row[index])
                except (ValueError, TypeError):
                    name, kind = self._described(index)
                    text = shown(row[index])
                    of_row = f" (the row of {self._described(0)[0]} {row[0]!r})" if index else ""
                    return f"{name} holds {text}, which is not {kind}{of_row}"
        return "a stored value cannot be read"

    def _described(self, index: int) -> tuple[str, str]:
        return (
            self.described[index]
            if index < len(self.described)
            else (f"column {index}", "a valid value")
        )


class Statement:
    """A Core statement with named bind parameters, compiled lazily per dialect.

    `element` is the statement, or a function of the dialect's name that builds it
    where the two dialects need different constructs (ON CONFLICT, full-text search).
    """

    def __init__(self, element: ClauseElement | Callable[[str], ClauseElement]) -> None:
        self._element = element
        self._compiled: dict[str, Compiled] = {}

    def compile(self, dialect: Dialect) -> Compiled:
        cached = self._compiled.get(dialect.name)
        if cached is None:
            element = self._element
            if not isinstance(element, ClauseElement):
                element = element(dialect.name)
            cached = self._compiled[dialect.name] = _compile(element, dialect)
        return cached


def _compile(element: ClauseElement, dialect: Dialect) -> Compiled:
    compiled = element.compile(dialect=dialect)
    assert isinstance(compiled, SQLCompiler)
    binds = compiled.binds
    defaults = {
        name: bind.effective_value
        for name, bind in binds.items()
        if bind.value is not None or bind.callable is not None
    }
    columns = list(getattr(element, "selected_columns", None) or [])
    if not columns:
        columns = list(getattr(element, "_returning", ()) or ())
    bind_processors = {
        name: bind.type.dialect_impl(dialect).bind_processor(dialect)
        for name, bind in binds.items()
    }
    names = tuple(compiled.positiontup or ())
    return Compiled(
        compiled=compiled,
        sql=compiled.string,
        defaults=defaults,
        expanding=any(bind.expanding for bind in binds.values()),
        bind_processors=bind_processors,
        plan=tuple((name, bind_processors.get(name)) for name in names),
        processed_columns=tuple(
            (index, _none_safe(process) if getattr(column, "nullable", True) else process)
            for index, column in enumerate(columns)
            if (process := column.type.dialect_impl(dialect).result_processor(dialect, None))
        ),
        described=tuple(_describe(column) for column in columns),
    )


def _describe(column: Any) -> tuple[str, str]:
    name = str(getattr(column, "name", None) or getattr(column, "key", None) or "a column")
    table = getattr(getattr(column, "table", None), "name", None)
    # A TypeDecorator (UtcDateTime) says only `object`: its implementation says more.
    type_ = getattr(column.type, "impl_instance", column.type)
    named = f"{table}.{name}" if table else name
    try:
        python_type = type_.python_type
    except NotImplementedError:
        return named, "a valid value"
    kind = {datetime: "a timestamp", dict: "JSON", int: "an integer"}.get(
        python_type, f"a valid {python_type.__name__}"
    )
    return named, kind


def _none_safe(process: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else process(value)
