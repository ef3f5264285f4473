"""The notes a store keeps about itself (persistence.store_notes): what the transfer
tools write there (a copy begun and not finished), beside the store's id."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from persistence import InvalidDataError, SessionStorage


async def test_a_note_is_written_read_replaced_and_removed(storage: SessionStorage) -> None:
    before = await storage.read_notes()
    assert "store_id" not in before
    try:
        await storage.write_note("copy from x", '{"a": 1}')
        await storage.write_note("other", "two\\nlines \\u2028 and \\x1b")
        assert await storage.read_notes() == {
            **before,
            "copy from x": '{"a": 1}',
            "other": "two\\nlines \\u2028 and \\x1b",
        }
        await storage.write_note("copy from x", "again")
        assert (await storage.read_notes())["copy from x"] == "again"
    finally:
        await storage.write_note("copy from x", None)
        await storage.write_note("other", None)
    assert await storage.read_notes() == before
    await storage.write_note("never written", None)  # removing what is not there: nothing


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("store_id", "mine", "the store's id"),
        ("", "v", "non-empty str"),
        ("n" * 65, "v", "at most 64"),
        (7, "v", "non-empty str"),
        ("fine", 7, "a str or None"),
        ("fine", b"bytes", "a str or None"),
        # Found by attack: raw UnicodeEncodeError on SQLite, a backend failure on
        # PostgreSQL (NUL), and SQLite kept NUL where PostgreSQL cannot.
        ("nul\x00name", "v", "NUL"),
        ("n", "nul\x00value", "NUL"),
        ("\udcff", "v", "lone surrogate"),
        ("n", "\ud800", "lone surrogate"),
    ],
)
async def test_a_note_that_is_not_one_is_refused_and_nothing_written(
    storage: SessionStorage, name: object, value: object, problem: str
) -> None:
    before = await storage.read_notes()
    with pytest.raises(InvalidDataError, match=problem):
        await storage.write_note(name, value)  # type: ignore[arg-type]
    assert await storage.read_notes() == before


async def test_a_note_edited_by_hand_into_anything_is_still_listed(storage: SessionStorage) -> None:
    """Found by attack: a time without its offset, or JSON nested too deep, failed
    `persistence stats` with a TypeError or a RecursionError."""
    from persistence.transfer import unfinished_copies

    garbled = {
        "copy from a": '{"source": "s1", "started_at": "2026-01-01T00:00:00"}',
        "copy from b": '{"source": "s2", "started_at": "2026-01-01T00:00:00+02:00"}',
        "copy from c": "[" * 100_000,
        "copy from d": '{"source": 7}',
    }
    try:
        for name, value in garbled.items():
            await storage.write_note(name, value)
        copies = await unfinished_copies(storage)
    finally:
        for name in garbled:
            await storage.write_note(name, None)
    assert [(copy.source, copy.started_at) for copy in copies] == [
        ("s2", datetime(2025, 12, 31, 22, tzinfo=UTC)),
        ("[" * 100_000, None),  # the illegible ones by their text
        ("s1", None),
        ('{"source": 7}', None),
    ]
