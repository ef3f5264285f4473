"""PostgreSQL computes a message's search terms without a query for nearly all of them.

`persistence_search_terms` (revision 0003) runs two subqueries per row written: it
aggregates the distinct tokens, cut to 200 characters, and sums their bytes. That
took 22-24 us of the 56 us a bulk-inserted row cost the server (issue 14). A document
of at most 1,000,000 bytes whose tokens are all at most 200 characters needs neither:
its terms are its tokens, which `array_to_tsvector` deduplicates itself. Such a
document now takes one regular-expression test and one conversion (about 9 us); any
other goes the old way. The result is the same tsvector for every document, so the
stored column needs no recomputing.

SQLite has no such function: the revision changes nothing there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _replacing(function: str) -> str:
    """`function`'s CREATE as a CREATE OR REPLACE of the same signature."""
    return function.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1)


# Revision 0003's function as it stood (0005 then made it STRICT).
_REVISION_0003 = importlib.import_module(
    "persistence.sql.migrations.versions.0003_search_documents"
).POSTGRESQL_TERMS_FUNCTION
# The tokens of a document are separated by single spaces (persistence.search); no
# token of the fast path is longer than the old path's cut, and the bytes of its
# distinct terms cannot exceed the document's own.
_FAST_PATH = """BEGIN
    IF octet_length(document) <= 1000000 AND document !~ '[^ ]{201}' THEN
        RETURN array_to_tsvector(array_remove(string_to_array(document, ' '), ''));
    END IF;
"""
# 0003's function, STRICT, with the fast path first and 0003's body as the way for
# every other document.
FAST_PATH_FUNCTION = (
    _replacing(_REVISION_0003)
    .replace("IMMUTABLE", "IMMUTABLE STRICT", 1)
    .replace("BEGIN\n", _FAST_PATH, 1)
)
assert FAST_PATH_FUNCTION.count("STRICT") == 1 and FAST_PATH_FUNCTION.count("!~") == 1


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FAST_PATH_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_replacing(_REVISION_0003))
        # As revision 0005 left it.
        op.execute("ALTER FUNCTION persistence_search_terms(text) STRICT")
