"""Passwords out of sight: URLs, free text and log records with every password masked.

The URL rules live in `persistence.urls` (the backends use them too); this module adds
the log formatter the command line puts on every handler it installs.
"""

from __future__ import annotations

import logging

from persistence.urls import (
    mask_secrets,
    mask_typed_words,
    mask_url,
    port_problem,
    postgresql_url_problem,
    userinfo_problem,
)

__all__ = [
    "MaskingFormatter",
    "mask_secrets",
    "mask_typed_words",
    "mask_url",
    "port_problem",
    "postgresql_url_problem",
    "userinfo_problem",
]


class MaskingFormatter(logging.Formatter):
    """A Formatter whose every line (tracebacks included) has its URLs' passwords masked,
    whichever logger the record came from (SQLAlchemy, asyncpg, PyMongo, alembic, ours)."""

    def format(self, record: logging.LogRecord) -> str:
        return mask_secrets(super().format(record))
