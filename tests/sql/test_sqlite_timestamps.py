"""SQLite's timestamp text: the one-entry reuse never hands out another instant's text."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from persistence.sql.types import _sqlite_text

_zones = st.sampled_from(
    [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))]
)
_instants = st.builds(
    lambda moment, zone: moment.replace(tzinfo=UTC).astimezone(zone),
    st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(9998, 1, 1)),
    _zones,
)


@given(st.lists(_instants, min_size=1, max_size=30), st.data())
def test_every_value_gets_the_text_of_its_own_instant(
    values: list[datetime], data: st.DataObject
) -> None:
    # Repeats, and the same instant in another zone right after, exercise the reuse.
    sequence = []
    for value in values:
        sequence.append(value)
        if data.draw(st.booleans()):
            sequence.append(value.astimezone(data.draw(_zones)))
    for value in sequence:
        assert _sqlite_text(value) == value.astimezone(UTC).isoformat(" ", "microseconds")
    assert _sqlite_text(None) is None


def test_times_a_dst_change_repeats_get_their_own_text() -> None:
    new_york = ZoneInfo("America/New_York")
    first = datetime(2024, 11, 3, 1, 30, tzinfo=new_york, fold=0)
    second = first.replace(fold=1)  # equal to `first` by ==, an hour later
    assert _sqlite_text(first) == "2024-11-03 05:30:00.000000+00:00"
    assert _sqlite_text(second) == "2024-11-03 06:30:00.000000+00:00"
