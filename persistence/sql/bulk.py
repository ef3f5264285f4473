"""Many rows in one statement: the bulk form of an INSERT.

`BulkInsert` is an INSERT of every column of a table but its generated key. The
runners (runner.py) send it for many rows at once in the dialect's bulk form:

- SQLite: multi-row `INSERT ... VALUES (...), (...), ...` of up to 500 rows each,
  within the one thread hop of the transaction. Not `executemany`: FTS5 flushes its
  pending index data at the end of every statement (its savepoint), so one
  statement per row wrote one index segment per row, and the merges cost more than
  the rows; one statement per 500 rows indexes them in the same statement batch.
- PostgreSQL: `COPY ... FROM STDIN (FORMAT binary)` (from MIN_COPIED_ROWS rows on;
  fewer go as one prepared INSERT, executemany). It replaced one `INSERT ... SELECT
  ... FROM unnest($1::type[], ...)`, each column bound as one array: asyncpg tested
  every element of those arrays for being an array itself, and the server projected
  the rows out of them. 1,000 messages took 28.5-31.3 ms by COPY against 34.9-37.7 ms
  by the arrays, alternated on two equal stores
  (scripts/results/2026-12-01-copy-vs-unnest.md). The rows go in parts
  (`copied_parts`): the client builds a part's rows while the server stores the part
  before, where one COPY left each waiting for the other.

Either way every row still goes through the table's triggers and indexes, so the
full-text index is kept in the same transaction as the rows it indexes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from itertools import chain
from operator import itemgetter
from typing import Any

from sqlalchemy import Dialect, Table, bindparam, insert

from persistence.sql.statements import Statement

Processor = Callable[[Any], Any] | None
# Rows per SQLite statement: 500 x the columns stays under SQLite's default limit of
# 32,766 bound parameters. Smaller statements take power-of-two sizes, so only a
# few distinct SQL texts exist and the driver's statement cache keeps them prepared.
ROWS_PER_STATEMENT = 500
# PostgreSQL sends fewer rows than this as one prepared INSERT (executemany): a COPY
# costs the prepare of asyncpg's column query on every new connection, which a save of
# a few messages would pay after each reconnect for no gain.
MIN_COPIED_ROWS = 32


# A PostgreSQL bulk insert is sent as several COPYs: the first of FIRST_COPIED_PART
# rows, each next one twice as large up to LARGEST_COPIED_PART. The runner builds a
# part's records (search documents and all) while the server stores the part before,
# so the two work at once; the first part is small to set the server working soon.
# Larger parts gained nothing: a part must fit the socket's buffer to be on its way
# while the next one is built.
FIRST_COPIED_PART = 64
LARGEST_COPIED_PART = 256


def copied_parts(total: int) -> Iterator[tuple[int, int]]:
    """The [start, stop) bounds of the COPYs that send `total` rows, in order."""
    start, size = 0, FIRST_COPIED_PART
    while start < total:
        yield start, min(total, start + size)
        start += size
        size = min(2 * size, LARGEST_COPIED_PART)


class BulkInsert(Statement):
    """An INSERT of all of `table`'s columns but its generated key, one row or many."""

    def __init__(self, table: Table) -> None:
        self.table = table
        generated = table.autoincrement_column
        self.names = tuple(column.name for column in table.columns if column is not generated)
        super().__init__(
            insert(table).values(
                {name: bindparam(name, type_=table.c[name].type) for name in self.names}
            )
        )

    def copies(self, dialect: Dialect, rows: Sequence[Any]) -> bool:
        """Whether these rows go in the PostgreSQL form, a COPY (see MIN_COPIED_ROWS)."""
        return dialect.name == "postgresql" and len(rows) >= MIN_COPIED_ROWS

    def copy_sql(self) -> str:
        """The COPY that `records` feeds (what the runners trace for it)."""
        return f"COPY {self.table.name} ({', '.join(self.names)}) FROM STDIN (FORMAT binary)"

    def records(self, dialect: Dialect, rows: Sequence[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """The PostgreSQL form: a tuple per row of `names`, each value processed for the
        driver as the compiled INSERT binds it, for asyncpg's `copy_records_to_table`."""
        plan = self.compile(dialect).plan
        return list(zip(*_processed_columns(plan, rows), strict=True))

    def multirow(
        self, dialect: Dialect, rows: Sequence[Mapping[str, Any]]
    ) -> Iterator[tuple[str, list[Any]]]:
        """The SQLite form: multi-row INSERT statements and their flat parameters."""
        compiled = self.compile(dialect)
        head, _, group = compiled.sql.partition(" VALUES ")
        start = 0
        while start < len(rows):
            size = _statement_rows(len(rows) - start)
            sql = f"{head} VALUES {', '.join([group] * size)}"
            columns = _processed_columns(compiled.plan, rows[start : start + size])
            yield sql, list(chain.from_iterable(zip(*columns, strict=True)))
            start += size


def _processed_columns(
    plan: Sequence[tuple[str, Processor]], rows: Sequence[Mapping[str, Any]]
) -> list[Iterable[Any]]:
    """The rows' values column by column, in `plan`'s order, each through its processor.

    By columns: the rows are cut into tuples and transposed in C, and a processor is
    mapped over its column, so the interpreter's work per value is the processor's.
    """
    columns: list[Iterable[Any]] = list(
        zip(*map(itemgetter(*(name for name, _ in plan)), rows), strict=True)
    )
    for index, (_, process) in enumerate(plan):
        if process is not None:
            columns[index] = map(process, columns[index])
    return columns


def _statement_rows(remaining: int) -> int:
    if remaining >= ROWS_PER_STATEMENT:
        return ROWS_PER_STATEMENT
    return 1 << (remaining.bit_length() - 1)
