"""PostgreSQL bulk inserts plan the queries their triggers run for each row only once.

The library's connections run with `plan_cache_mode=force_custom_plan` (engines.py),
so that no cached plan outlives the data it was made for. That setting also reaches
the queries the server itself runs for every inserted row: the foreign-key check of
each message and the count trigger of each session. Each of them was planned again
for every row, about 25 us, a quarter of what a bulk-inserted message cost.

So around the one statement of a bulk insert (bulk.py), the transaction plans as
PostgreSQL does by default (`auto`: after a few executions a query keeps one plan),
with sequential scans disabled: a kept plan made while a table was small must not
scan it whole once it is large. Both settings are put back right after the
statement, so the rest of a unit of work plans as before. A failed statement aborts
the transaction, which undoes them as well (`set_config(..., true)` is local to it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import String, column, text

from persistence.sql.statements import Statement

# Returns the settings as they were, then changes them: the materialised CTE is read
# before the outer query's set_config calls run.
KEEP_PLANS = Statement(
    text(
        "WITH before AS MATERIALIZED (SELECT current_setting('plan_cache_mode') AS plan_cache_mode,"
        " current_setting('enable_seqscan') AS enable_seqscan)"
        " SELECT plan_cache_mode, enable_seqscan,"
        " set_config('plan_cache_mode', 'auto', true), set_config('enable_seqscan', 'off', true)"
        " FROM before"
    ).columns(column("plan_cache_mode", String), column("enable_seqscan", String))
)

RESTORE_PLANS = Statement(
    text(
        "SELECT set_config('plan_cache_mode', :plan_cache_mode, true),"
        " set_config('enable_seqscan', :enable_seqscan, true)"
    )
)


def restoring(before: Sequence[Sequence[Any]]) -> Mapping[str, Any]:
    """RESTORE_PLANS' parameters from KEEP_PLANS' reply."""
    plan_cache_mode, enable_seqscan = before[0][:2]
    return {"plan_cache_mode": plan_cache_mode, "enable_seqscan": enable_seqscan}
