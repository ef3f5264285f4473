"""Hypothesis strategies for hostile values, and a strict comparison of round trips."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import strategies as st

# Every code point, lone surrogates and NUL included (hypothesis leaves out Cs by default).
any_char = st.characters(exclude_categories=())
any_text = st.text(alphabet=any_char, max_size=40)
SYNTAX = [
    *"\"'`*-+^():&|!<>{}[]~,.;\\/%_#@$=?\x00\t\n\r ",
    "AND",
    "OR",
    "NOT",
    "NEAR",
    "NEAR/2",
    "<->",
    "<2>",
    ":*",
    "--",
    "/*",
    "*/",
    "' OR '1'='1",
    "'; DROP TABLE chat_sessions; --",
    "..",
    "../",
    "\ud800",
    "\udfff",
    "\u202e",
    "\ufeff",
]
hostile_text = st.one_of(
    any_text,
    st.lists(st.one_of(st.sampled_from(SYNTAX), any_text), max_size=8).map("".join),
)
identifiers = st.one_of(
    hostile_text,
    st.sampled_from(
        [
            "../../etc/passwd",
            "a/b\\c",
            "..",
            ".",
            "'",
            '"',
            "%",
            "_",
            "x' OR '1'='1",
            "1; DROP TABLE chat_messages; --",
            " ",
            "\n",
            "é",
            "\U0001f600",
        ]
    ),
    st.integers(min_value=250, max_value=260).map(lambda n: "i" * n),
)

offsets = st.timedeltas(
    min_value=timedelta(hours=-23, minutes=-59), max_value=timedelta(hours=23, minutes=59)
)
datetimes = st.one_of(
    st.datetimes(timezones=st.builds(timezone, offsets)),
    st.datetimes(
        timezones=st.just(UTC), min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)
    ),
    st.datetimes(),  # naive: must be refused
)

# Floats at the edges of what JSON, JSONB's numeric and BSON keep.
EDGE_FLOATS = [0.0, 5e-324, -5e-324, 1e15, 9.999999999999998e15, 2.0**53, 0.1, 1e-7, -1e-300]
UNSTORABLE_FLOATS = [-0.0, 1e16, -1e16, 1.7976931348623157e308, math.nan, math.inf, -math.inf]
json_scalars = st.one_of(
    st.sampled_from(EDGE_FLOATS + UNSTORABLE_FLOATS),
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**65), max_value=2**65),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-1e20, max_value=1e20),
    hostile_text,
)
json_keys = st.one_of(hostile_text, st.sampled_from(["$set", "a.b", "", "\x00", "_id"]))
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(json_keys, children, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(json_keys, json_values, max_size=5)
wild_ints = st.one_of(
    st.integers(min_value=-5, max_value=10**6), st.integers(min_value=-(2**70), max_value=2**70)
)


def same(left: Any, right: Any) -> bool:
    """Equal, with the same types all the way down (1 != 1.0 != True, -0.0 != 0.0)."""
    if type(left) is not type(right):
        return False
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(same(left[k], right[k]) for k in left)
    if isinstance(left, list):
        return len(left) == len(right) and all(map(same, left, right))
    if isinstance(left, float):
        return left == right and math.copysign(1, left) == math.copysign(1, right)
    if isinstance(left, datetime):
        return left == right and left.utcoffset() == right.utcoffset()
    return bool(left == right)


def difference(left: Any, right: Any, path: str = "") -> str | None:
    """Where two dumps differ, for a readable failure."""
    if same(left, right):
        return None
    if isinstance(left, dict) and isinstance(right, dict) and left.keys() == right.keys():
        for key in left:
            found = difference(left[key], right[key], f"{path}.{key}")
            if found:
                return found
    if isinstance(left, list) and isinstance(right, list) and len(left) == len(right):
        for index, (a, b) in enumerate(zip(left, right, strict=True)):
            found = difference(a, b, f"{path}[{index}]")
            if found:
                return found
    return f"{path}: {left!r} != {right!r}"


# Mostly storable values, so that most examples reach the databases; hostile ones mixed in.
storable_char = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")
storable_text = st.one_of(
    st.text(alphabet=storable_char, max_size=40),
    st.lists(
        st.one_of(
            st.sampled_from(
                [s for s in SYNTAX if s.isprintable() and "\ud800" not in s and "\udfff" not in s]
            ),
            st.text(alphabet=storable_char, max_size=10),
        ),
        max_size=8,
    ).map("".join),
)
storable_ids = st.text(alphabet=storable_char, min_size=1, max_size=255)
storable_scalars = st.one_of(
    st.sampled_from(EDGE_FLOATS),
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False, max_value=1e15, min_value=-1e15).filter(
        lambda f: f != 0 or math.copysign(1, f) > 0
    ),
    st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()),
    storable_text,
)
storable_keys = st.text(alphabet=storable_char, max_size=12).filter(
    lambda k: not k.startswith("$") and "." not in k
)
storable_values = st.recursive(
    storable_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(storable_keys, children, max_size=4)
    ),
    max_leaves=12,
)
storable_objects = st.dictionaries(storable_keys, storable_values, max_size=5)
storable_datetimes = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.builds(timezone, offsets),
)


def mostly(
    storable: st.SearchStrategy[Any], hostile: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """Eight in nine draws storable, one hostile."""
    return st.one_of(*([storable] * 8), hostile)
