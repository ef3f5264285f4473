"""Rows become domain objects without re-validation, yet exactly as validation makes them."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from persistence import ChatMessage, ChatSession, PersistenceError, UploadedFileRecord
from persistence.sql.mapping import (
    MessageRows,
    file_record_from_row,
    history_from_rows,
    messages_from_rows,
    row_from_file_record,
    rows_from_messages,
    session_from_row,
)
from persistence.sql.types import json_loads

MOMENT = datetime(2025, 10, 16, 10, 0, 1, 123000, tzinfo=UTC)


def test_a_message_built_from_a_row_equals_a_validated_one() -> None:
    validated = ChatMessage(
        message_id="m1",
        session_id="s1",
        role="tool",
        content="hi",
        created_at=MOMENT,
        metadata={"k": [1, 2]},
    )
    # The metadata column is read as its JSON text (mapping.MESSAGE_METADATA_TEXT).
    row = {
        **rows_from_messages("s1", [validated], 0, documents=True)[0],
        "metadata": json.dumps(validated.metadata),
    }
    columns = ("message_id", "session_id", "role", "content", "created_at", "metadata")
    history_columns = tuple(name for name in columns if name != "session_id")

    # Of many sessions (every row names its session), and of one (no row does).
    (built,) = messages_from_rows([[row[key] for key in columns]])
    (from_history,) = history_from_rows("s1", [[row[key] for key in history_columns]])

    for message in (built, from_history):
        assert message == validated
        assert message.model_dump() == validated.model_dump()
        assert message.model_fields_set == validated.model_fields_set


def test_messages_with_empty_metadata_share_one_that_nothing_changes() -> None:
    """Once each got its own dict, so that changing one left the others as they were;
    now no message's metadata changes in place (persistence.frozen_metadata)."""
    rows = [[f"m{n}", "s1", "user", "hi", MOMENT, "{}"] for n in range(2)]

    first, second = messages_from_rows(rows)
    with pytest.raises(TypeError, match="edit_message"):
        first.metadata["mine"] = 1

    assert first.metadata is second.metadata and second.metadata == {}
    assert history_from_rows("s1", [row[:1] + row[2:] for row in rows])[1].metadata == {}


def test_a_session_built_from_a_row_behaves_like_a_validated_one() -> None:
    validated = ChatSession.create("m", session_id="s1", metadata={"a": 1})
    values = [
        validated.session_id,
        validated.model,
        validated.created_at,
        validated.updated_at,
        0,
        json.dumps(validated.metadata),
        validated.status,
        7,
        "incarnation",
        # next_position: two messages were removed.
        2,
    ]

    built = session_from_row(values, [], "token")

    assert built == validated
    assert built.revision == 7 and not built.has_changes_for("token")
    built.add_message("user", "still works")
    assert built.message_count == 1
    plan = built.plan_save("token")
    assert [m.content for m in plan.appends] == ["still works"] and plan.appends_only
    assert plan.base_removals == 2


def test_a_file_record_built_from_a_row_equals_a_validated_one() -> None:
    validated = UploadedFileRecord(
        file_id="f",
        gemini_file_name="n",
        gemini_file_uri="u",
        display_name="d",
        size=3,
        mime_type="text/plain",
        uploaded_at=MOMENT,
        expires_at=MOMENT,
    )

    assert file_record_from_row(list(row_from_file_record(validated).values())) == validated


def test_message_rows_build_any_slice_as_rows_from_messages_does() -> None:
    histories = []
    for size in (0, 3, 0, 1, 7, 2):
        session = ChatSession.create("m")
        for turn in range(size):
            session.add_message("user", f"turn {turn} \u6f22\u5b57 Straße")
        histories.append((session.session_id, session.messages, 5 * size))
    for documents in (True, False):
        expected = [
            row
            for session_id, messages, first in histories
            for row in rows_from_messages(session_id, messages, first, documents=documents)
        ]
        rows = MessageRows(histories, documents=documents)
        assert len(rows) == len(expected) == 13
        assert list(rows) == expected
        assert (rows[0], rows[-1], rows[6]) == (expected[0], expected[-1], expected[6])
        for start in range(-14, 15):
            for stop in range(-14, 15):
                assert rows[start:stop] == expected[start:stop], (start, stop)
    with pytest.raises(IndexError):
        MessageRows(histories, documents=True)[13]
    assert len(MessageRows([], documents=True)) == 0


@pytest.mark.parametrize(
    "text",
    [
        '{"title": "t", "n": [1, 2.5, -0.0, 1e308, 12345678901234567890], "x": null}',
        '{"a": {"b": {"c": [true, false, "\\u00e9\\ud83d\\ude00"]}}}',
        '{"a": NaN, "b": Infinity}',
        '{"a": 1, "a": 2}',
        '{"s": "\\ud800"}',
        '{"a": 1} ',
        ' {"a": 1}',
    ],
)
def test_a_metadata_column_reads_as_json_loads_reads_it(text: str) -> None:
    """json_loads calls json's C scanner directly; whatever it accepts, json.loads must."""
    assert repr(json_loads(text)) == repr(json.loads(text))


@pytest.mark.parametrize(
    "text",
    ['{"a": 1}x', '{"a": 1}{"b": 2}', "{", '{"a": }', "[1, 2]", "null", '"{}"', "\ufeff{}"],
)
def test_a_metadata_column_that_is_not_one_object_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        json_loads(text)


def test_a_stored_metadata_nested_past_the_interpreters_depth_is_named() -> None:
    """Found by attack: a hand-edited row nested 5,000 levels made loads raise a bare
    RecursionError naming nothing."""
    deep = '{"a": ' * 5000 + "1" + "}" * 5000
    rows = [["m1", "s1", "user", "hi", MOMENT, deep]]
    with pytest.raises(PersistenceError, match=r"message 'm1'.*metadata is not a JSON object"):
        messages_from_rows(rows)
