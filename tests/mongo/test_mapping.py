"""Domain <-> document mapping, through the real BSON codec the client is configured with."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import bson
from bson.codec_options import CodecOptions

from persistence.models import ChatSession, UploadedFileRecord
from persistence.mongo.connection import client_options
from persistence.mongo.documents import FileRecordView, SessionSummary, SessionView
from persistence.mongo.mapping import (
    document_from_file_record,
    document_from_session,
    file_record_from_view,
    metadata_snapshot,
    session_from_view,
)

TOKEN = "storage-token"
METADATA: dict[str, Any] = {
    "small": 7,
    "int64": 2**40,
    "max": 2**63 - 1,
    "min": -(2**63),
    "float": 0.1,
    "integral float": 3.0,
    "flag": True,
    "nothing": None,
    "text": "héllo ✓ 中文",
    "": "empty key",
    "nested": {"list": [1, "two", {"three": [3.5, None]}], "z": {}, "a": []},
}


def _codec() -> CodecOptions[dict[str, Any]]:
    options = client_options("mongodb://localhost/", 5.0)
    return CodecOptions(
        tz_aware=options["tz_aware"],
        tzinfo=options["tzinfo"],
        type_registry=options["type_registry"],
    )


def _through_bson(document: dict[str, Any]) -> dict[str, Any]:
    return bson.decode(bson.encode(document), codec_options=_codec())


def _types(value: Any) -> Any:
    """The exact type of every leaf, so an int64 coming back as bson.Int64 shows."""
    if isinstance(value, dict):
        return {key: _types(child) for key, child in value.items()}
    if isinstance(value, list):
        return [_types(child) for child in value]
    return type(value)


def _session() -> ChatSession:
    session = ChatSession.create(
        "gemini-pro",
        metadata=METADATA,
        session_id="s-1",
    )
    # An offset that is not UTC and a sub-millisecond part: the model normalises both.
    session.created_at = datetime(
        2024, 2, 29, 23, 59, 59, 999_999, tzinfo=timezone(timedelta(hours=5))
    )
    session.add_message("user", "first", {"k": [1, 2**50]})
    session.add_message("assistant", "second ✓", METADATA)
    session.add_message("tool", "", {})
    return session


def test_session_round_trips_exactly_through_bson() -> None:
    session = _session()
    stored = _through_bson(document_from_session(session))
    loaded = session_from_view(SessionView.model_validate(stored), TOKEN)
    assert loaded == session
    assert loaded.model_dump() == session.model_dump()
    assert _types(loaded.metadata) == _types(session.metadata)
    assert [_types(m.metadata) for m in loaded.messages] == [
        _types(m.metadata) for m in session.messages
    ]
    assert list(loaded.metadata) == list(session.metadata)


def test_datetimes_come_back_aware_utc_to_the_millisecond() -> None:
    session = _session()
    loaded = session_from_view(
        SessionView.model_validate(_through_bson(document_from_session(session))), TOKEN
    )
    assert loaded.created_at == datetime(2024, 2, 29, 18, 59, 59, 999_000, tzinfo=UTC)
    for value in [loaded.created_at, loaded.updated_at, *(m.created_at for m in loaded.messages)]:
        assert value.tzinfo is UTC
        assert value.microsecond % 1000 == 0


def test_document_embeds_messages_in_order_without_repeating_the_session_id() -> None:
    session = _session()
    document = document_from_session(session)
    assert document["_id"] == "s-1"
    assert document["message_count"] == 3
    assert [m["message_id"] for m in document["messages"]] == [
        m.message_id for m in session.messages
    ]
    assert all("session_id" not in m for m in document["messages"])
    assert [
        m.session_id
        for m in session_from_view(SessionView.model_validate(document), TOKEN).messages
    ] == ["s-1"] * 3


def test_summary_maps_to_a_session_without_messages_but_with_its_count() -> None:
    session = _session()
    summary = session_from_view(
        SessionSummary.model_validate(_through_bson(document_from_session(session))), TOKEN
    )
    assert summary.messages == []
    assert summary.message_count == 3
    assert summary.model_dump(exclude={"messages"}) == session.model_dump(exclude={"messages"})


def test_file_record_round_trips_exactly_through_bson() -> None:
    record = UploadedFileRecord(
        file_id="f-1",
        gemini_file_name="files/abc",
        gemini_file_uri="https://example.invalid/files/abc",
        display_name="report.pdf",
        size=2**40,
        mime_type="application/pdf",
        uploaded_at=datetime(2024, 1, 1, 12, 0, 0, 123_456, tzinfo=UTC),
        expires_at=datetime(2024, 1, 3, 12, 0, 0, tzinfo=UTC),
        metadata=METADATA,
    )
    document = document_from_file_record(record)
    assert document["_id"] == "f-1"
    loaded = file_record_from_view(FileRecordView.model_validate(_through_bson(document)))
    assert loaded == record
    assert type(loaded.size) is int
    assert _types(loaded.metadata) == _types(record.metadata)


def test_a_load_remembers_the_revision_and_incarnation_it_read() -> None:
    document = _through_bson(document_from_session(_session(), "inc-7"))
    document["revision"] = 12
    loaded = session_from_view(SessionView.model_validate(document), TOKEN)
    assert loaded.revision == 12
    loaded.add_message("user", "more")
    plan = loaded.plan_save(TOKEN)
    assert (plan.revision, plan.incarnation, plan.certain, plan.exact) == (12, "inc-7", True, True)
    assert len(plan.appends) == 1


def test_a_document_written_before_revisions_reads_as_revision_1_of_a_fixed_incarnation() -> None:
    document = _through_bson(document_from_session(_session()))
    del document["revision"], document["incarnation"]
    loaded = session_from_view(SessionView.model_validate(document), TOKEN)
    plan = loaded.plan_save(TOKEN)
    assert (plan.revision, plan.incarnation) == (1, "")


def test_the_metadata_snapshot_is_not_shared_with_the_loaded_object() -> None:
    document = _through_bson(document_from_session(_session()))
    loaded = session_from_view(SessionView.model_validate(document), TOKEN)
    loaded.metadata["nested"]["list"].append("changed in place")
    loaded.metadata["int64"] = 2**40 + 1

    changes = loaded.plan_save(TOKEN).metadata_changes

    assert set(changes) == {"nested", "int64"}
    assert changes["int64"] == (2**40, 2**40 + 1)
    assert changes["nested"][0] == METADATA["nested"]


def test_the_metadata_snapshot_keeps_1_1_0_and_true_apart() -> None:
    snapshot = metadata_snapshot({"i": 1, "f": 1.0, "b": True, "n": None, "big": 2**63 - 1})
    value = snapshot.value()
    assert [type(value[k]) for k in ("i", "f", "b", "n", "big")] == [
        int,
        float,
        bool,
        type(None),
        int,
    ]


def test_a_summary_counts_every_stored_message_as_omitted() -> None:
    document = _through_bson(document_from_session(_session()))
    listed = session_from_view(SessionSummary.model_validate(document), TOKEN)
    assert listed.omitted_messages == 3 and listed.message_count == 3
    added = listed.add_message("user", "from a listing")
    assert listed.plan_save(TOKEN).appends == (added,)


def test_a_loaded_session_is_built_as_model_construct_builds_it() -> None:
    document = _through_bson(document_from_session(_session()))
    first = session_from_view(SessionView.model_validate(document), TOKEN)
    second = session_from_view(SessionView.model_validate(document), TOKEN)
    constructed = ChatSession.model_construct(
        **{name: getattr(first, name) for name in ChatSession.model_fields}
    )
    assert first.__pydantic_fields_set__ == constructed.__pydantic_fields_set__
    assert first.__pydantic_private__ is not None and constructed.__pydantic_private__ is not None
    assert first.__pydantic_private__.keys() == constructed.__pydantic_private__.keys()
    # Each object's bookkeeping is its own.
    assert first.__pydantic_private__["_bases"] is not second.__pydantic_private__["_bases"]
    assert first.model_dump() == constructed.model_dump() == second.model_dump()
    first.messages[0] = first.messages[1]
    assert second.plan_save(TOKEN).appends == ()
    first.rewind(None)
    assert len(first.__pydantic_private__["_log"]) == 1
    assert len(second.__pydantic_private__["_log"]) == 0
