"""SQLite timestamps written before they carried their offset get it: `+00:00`.

The library's first releases stored SQLite timestamps as SQLAlchemy's default text,
UTC without an offset (`2026-12-05 17:28:54.074000`); since commit 3f8b901 they carry
it (`2026-12-05 17:28:54.074000+00:00`), which is read back aware in C with nothing
around it. Found by attack: no revision rewrote the older text, so a store written by
the first release loaded, after its upgrade, sessions whose timestamps had no zone;
their next save raised a raw TypeError, and `migrate_storage` called every such
timestamp a mismatch.

Only text of exactly the old shape changes, and only its offset is added: the order of
timestamps is the same before and after (a common prefix). No trigger fires on these
columns but the counts' (status only) and the search index's (its document only), and
no revision moves. PostgreSQL (timestamptz from the start) is unchanged. A data
revision: its tables are 0011's, so it leaves no mark (revision_marks.py).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

# The columns of UtcDateTime (persistence.sql.tables) that a release before 3f8b901
# could have written: chat_session_deletions came after it.
COLUMNS = (
    ("chat_sessions", "created_at"),
    ("chat_sessions", "updated_at"),
    ("chat_messages", "created_at"),
    ("uploaded_files", "uploaded_at"),
    ("uploaded_files", "expires_at"),
)
_DIGIT = "[0-9]"
# SQLAlchemy's SQLite DATETIME text: always six digits of microseconds.
OLD_SHAPE = (
    f"{_DIGIT * 4}-{_DIGIT * 2}-{_DIGIT * 2} {_DIGIT * 2}:{_DIGIT * 2}:{_DIGIT * 2}.{_DIGIT * 6}"
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    for table, column in COLUMNS:
        # Only constants are formatted into the statement.
        op.execute(
            f"UPDATE {table} SET {column} = {column} || '+00:00'"  # noqa: S608
            f" WHERE {column} GLOB '{OLD_SHAPE}'"
        )


def downgrade() -> None:
    """Nothing to undo: the text it leaves is the text 0011's library writes."""
