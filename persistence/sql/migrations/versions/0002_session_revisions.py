"""Session revisions: each write increments one; incarnations tell a re-created session apart.

`revision` counts the writes of a session; a holder remembers the one it last
loaded or saved. `incarnation` is drawn when a session row is created, so a session
deleted and created again under the same id is never taken for the one a holder
knew. `next_position` is the position the next appended message takes: messages
removed by a rewind leave their positions unused, so order never depends on counts.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


# Reflected CHECK constraints keep their names as they are (a `ck` convention with
# %(constraint_name)s would prefix them again when SQLite's batch mode copies the table).
KEEP_NAMES = {"ck": "%(constraint_name)s"}


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    random_token = (
        "lower(hex(randomblob(16)))" if dialect == "sqlite" else "md5(random()::text || session_id)"
    )
    with op.batch_alter_table("chat_sessions", naming_convention=KEEP_NAMES) as batch:
        batch.add_column(sa.Column("revision", sa.BigInteger(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("incarnation", sa.String(32), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("next_position", sa.BigInteger(), nullable=False, server_default="0")
        )
    # Past the highest position stored, not the count: a store taken down to 0001 and
    # up again holds sessions whose rewinds left gaps in their positions.
    op.execute(
        "UPDATE chat_sessions SET next_position = (SELECT CASE"  # noqa: S608  # constant SQL
        " WHEN coalesce(max(m.position) + 1, 0) > chat_sessions.message_count"
        " THEN coalesce(max(m.position) + 1, 0) ELSE chat_sessions.message_count END"
        " FROM chat_messages m WHERE m.session_id = chat_sessions.session_id),"
        f" incarnation = {random_token}"
    )
    with op.batch_alter_table("chat_sessions", naming_convention=KEEP_NAMES) as batch:
        batch.alter_column("revision", server_default=None)
        batch.alter_column("incarnation", server_default=None)
        batch.alter_column("next_position", server_default=None)
        batch.create_check_constraint(op.f("ck_chat_sessions_revision"), "revision >= 1")
        batch.create_check_constraint(
            op.f("ck_chat_sessions_next_position"), "next_position >= message_count"
        )


def downgrade() -> None:
    with op.batch_alter_table("chat_sessions", naming_convention=KEEP_NAMES) as batch:
        batch.drop_constraint(op.f("ck_chat_sessions_next_position"), type_="check")
        batch.drop_constraint(op.f("ck_chat_sessions_revision"), type_="check")
        batch.drop_column("next_position")
        batch.drop_column("incarnation")
        batch.drop_column("revision")
