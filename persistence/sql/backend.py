"""The SQL backends: SQLiteSessionStorage and PostgreSQLSessionStorage (one code path).

sql_storage.py holds what both share; each dialect's module what is its own.
"""

from persistence.sql.postgresql_storage import PostgreSQLSessionStorage
from persistence.sql.sql_storage import SqlSessionStorage
from persistence.sql.sqlite_storage import SQLiteSessionStorage

__all__ = ["PostgreSQLSessionStorage", "SQLiteSessionStorage", "SqlSessionStorage"]
