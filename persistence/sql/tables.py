"""The SQL schema as declarative models; alembic revisions create it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from persistence.sql.types import JsonObject, RowId, UtcDateTime

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class SessionRow(Base):
    __tablename__ = "chat_sessions"

    session_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    model: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)
    message_count: Mapped[int] = mapped_column(BigInteger, default=0)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JsonObject)
    status: Mapped[str] = mapped_column(String(16))
    # Incremented by every write; holders compare it with the one they last saw.
    revision: Mapped[int] = mapped_column(BigInteger)
    # Drawn when the row is created: a session deleted and created again is another one.
    incarnation: Mapped[str] = mapped_column(String(32))
    # The position of the next appended message (removed messages leave gaps).
    next_position: Mapped[int] = mapped_column(BigInteger)

    __table_args__ = (
        CheckConstraint("status IN ('active', 'archived', 'expired')", name="status"),
        CheckConstraint("message_count >= 0", name="message_count"),
        CheckConstraint("revision >= 1", name="revision"),
        CheckConstraint("next_position >= message_count", name="next_position"),
        # list_sessions: newest first, ties by session_id, with or without a status.
        Index("ix_chat_sessions_updated", "updated_at", "session_id"),
        Index("ix_chat_sessions_status_updated", "status", "updated_at", "session_id"),
    )


class MessageRow(Base):
    __tablename__ = "chat_messages"

    # An integer key gives FTS5 a stable rowid for its external-content index.
    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(255), unique=True)
    session_id: Mapped[str] = mapped_column(
        String(255), ForeignKey("chat_sessions.session_id", ondelete="CASCADE")
    )
    # Order is by position, never by time: equal timestamps keep insertion order.
    position: Mapped[int] = mapped_column(BigInteger)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JsonObject)
    # The search document of `content` (persistence.search.search_document); FTS5
    # (SQLite) and a tsvector in chat_message_terms (PostgreSQL) index its tokens. NULL:
    # not yet written (SQLite's inserts leave it to later: persistence.sql.indexing).
    search_text: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        CheckConstraint("role IN ('user', 'assistant', 'system', 'tool')", name="role"),
        Index("ix_chat_messages_session_position", "session_id", "position", unique=True),
        Index(
            "ix_chat_messages_pending",
            "id",
            sqlite_where=text("search_text IS NULL"),
            postgresql_where=text("search_text IS NULL"),
        ),
    )


class SessionCountRow(Base):
    """Sessions per status, spread over slots; triggers keep it exact (revision 0004)."""

    __tablename__ = "chat_session_counts"

    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    slot: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    sessions: Mapped[int] = mapped_column(BigInteger)


class SessionDeletionRow(Base):
    """A deleted session's id and incarnation, written by a trigger (revision 0010): a
    save retrying a creation of unknown outcome tells by it a session deleted since."""

    __tablename__ = "chat_session_deletions"

    session_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    incarnation: Mapped[str] = mapped_column(String(32), primary_key=True)
    deleted_at: Mapped[datetime] = mapped_column(UtcDateTime)


class SessionMergeRow(Base):
    """A new object's creation merged into the stored session of its id (revision
    0010): the delete of that session records the creation's incarnation deleted too."""

    __tablename__ = "chat_session_merges"

    session_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    incarnation: Mapped[str] = mapped_column(String(32), primary_key=True)
    into_incarnation: Mapped[str] = mapped_column(String(32))


class StoreRow(Base):
    """A fact about the store itself, by name (revision 0015). `store_id`: drawn when the
    table is made, the store's own identity wherever it is reached from."""

    __tablename__ = "persistence_store"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class FileRow(Base):
    __tablename__ = "uploaded_files"

    file_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    gemini_file_name: Mapped[str] = mapped_column(Text)
    gemini_file_uri: Mapped[str] = mapped_column(Text)
    display_name: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    mime_type: Mapped[str] = mapped_column(Text)
    uploaded_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JsonObject)

    __table_args__ = (
        CheckConstraint("size >= 0", name="size"),
        Index("ix_uploaded_files_uploaded", "uploaded_at", "file_id"),
    )


# Created by the revisions with dialect-specific DDL, so the ORM does not declare them:
# SQLite's FTS5 table (and its shadow tables), PostgreSQL's terms table with its GIN
# index, its pending ranges, and the function that computes the terms (revision 0009;
# before it, a generated tsvector column and its index), and the ranges a catch-up
# wrote, to look at again (revision 0013).
SEARCH_OBJECTS = frozenset(
    {"chat_messages_fts", "search_terms", "ix_chat_messages_search_terms"}
    | {"chat_message_terms", "chat_terms_pending", "ix_chat_message_terms_terms"}
    | {"chat_terms_recheck"}
    | {f"chat_messages_fts_{suffix}" for suffix in ("data", "idx", "docsize", "config", "content")}
)
