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

# The tokens of a document are separated by single spaces (persistence.search); no
# token of the fast path is longer than the old path's cut, and the bytes of its
# distinct terms cannot exceed the document's own.
FAST_PATH_FUNCTION = r"""
CREATE OR REPLACE FUNCTION persistence_search_terms(document text) RETURNS tsvector
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    terms text[];
BEGIN
    IF octet_length(document) <= 1000000 AND document !~ '[^ ]{201}' THEN
        RETURN array_to_tsvector(array_remove(string_to_array(document, ' '), ''));
    END IF;
    SELECT array_agg(DISTINCT left(token, 200)) INTO terms
    FROM unnest(string_to_array(document, ' ')) AS token
    WHERE token <> '';
    IF terms IS NULL THEN
        RETURN ''::tsvector;
    END IF;
    IF (SELECT sum(octet_length(term)) FROM unnest(terms) AS term) > 1000000 THEN
        RETURN array_to_tsvector(ARRAY[chr(167) || chr(167)]);
    END IF;
    RETURN array_to_tsvector(terms);
END
$$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(FAST_PATH_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        previous = importlib.import_module(
            "persistence.sql.migrations.versions.0003_search_documents"
        ).POSTGRESQL_TERMS_FUNCTION
        op.execute(previous.replace("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION", 1))
        # As revision 0005 left it.
        op.execute("ALTER FUNCTION persistence_search_terms(text) STRICT")
