"""MongoDB reads from secondaries, without a server: which calls carry which read
preference and which session, and how read-your-writes is carried between them.

No server answers here, so each storage call is stopped at the repository seam: the
repository functions (which send the queries; covered with a server by
tests/mongo/test_read_preference_server.py and the contract suite) are replaced by
recorders of the documents and the client session each call is given. A write's
recorder advances its session as a replica set's reply would, through PyMongo's
public `advance_*` methods.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from bson.timestamp import Timestamp
from pymongo.read_preferences import Nearest, Primary, Secondary, SecondaryPreferred

from persistence.config import StorageConfig, create_storage
from persistence.errors import InvalidDataError
from persistence.models import ChatSession, UploadedFileRecord
from persistence.mongo import repositories
from persistence.mongo import writes as save_path
from persistence.mongo.backend import MongoDBSessionStorage
from persistence.mongo.documents import DocumentSet, bind_documents
from persistence.mongo.reads import CausalClock, split_read_preference
from persistence.storage import StorageCounts

SECRET = "s3cr3t"
URL = f"mongodb://app:{SECRET}@127.0.0.1:1/?replicaSet=rs0"


@pytest.mark.parametrize(
    ("url", "mode", "kept", "expected"),
    [
        ("mongodb://h/", None, "mongodb://h/", None),
        ("mongodb://h/?readPreference=primary", None, "mongodb://h/", None),
        (
            "mongodb://u:p%3F@h1,h2/db?replicaSet=rs0&readPreference=secondaryPreferred"
            "&maxStalenessSeconds=120&w=majority",
            None,
            "mongodb://u:p%3F@h1,h2/db?replicaSet=rs0&w=majority",
            SecondaryPreferred(max_staleness=120),
        ),
        (
            "mongodb+srv://c.example.invalid/?READPREFERENCE=secondary"
            "&readPreferenceTags=dc:ny,rack:1&readPreferenceTags=",
            None,
            "mongodb+srv://c.example.invalid/",
            Secondary(tag_sets=[{"dc": "ny", "rack": "1"}, {}], max_staleness=90),
        ),
        (
            "mongodb://h/?readPreference=secondary",
            "nearest",
            "mongodb://h/",
            Nearest(max_staleness=90),
        ),
        # Found by review: without a bound a routed read could wait on a secondary far
        # behind; -1 is the URL's way to ask for none.
        (
            "mongodb://h/?readPreference=secondary&maxStalenessSeconds=-1",
            None,
            "mongodb://h/",
            Secondary(),
        ),
        ("mongodb://h/?maxStalenessSeconds=-1", None, "mongodb://h/", None),
        ("mongodb://h/?readPreference=secondary", "primary", "mongodb://h/", None),
    ],
)
def test_the_read_preference_is_taken_out_of_the_client_url(
    url: str, mode: str | None, kept: str, expected: Any
) -> None:
    assert split_read_preference(url, mode) == (kept, expected)


@pytest.mark.parametrize(
    ("url", "mode", "named"),
    [
        ("mongodb://h/", "secondaryish", "read_preference"),
        ("mongodb://h/?maxStalenessSeconds=30&readPreference=secondary", None, "at least 90"),
        ("mongodb://h/?maxStalenessSeconds=soon&readPreference=secondary", None, "whole"),
        ("mongodb://h/?readPreferenceTags=dc", "secondary", "name:value"),
        ("mongodb://h/?maxStalenessSeconds=120", "primary", "primary takes no"),
    ],
)
def test_a_bad_read_preference_is_refused_naming_it(url: str, mode: str | None, named: str) -> None:
    with pytest.raises(InvalidDataError, match=named):
        split_read_preference(url, mode)


async def test_the_client_reads_from_the_primary_and_only_routed_reads_do_not() -> None:
    storage = MongoDBSessionStorage(URL + "&readPreference=secondary&maxStalenessSeconds=90")
    try:
        # Writes, loads and units of work use the client as it is: on the primary.
        assert storage.client.read_preference == Primary()
        assert storage.read_preference == Secondary(max_staleness=90)
        assert storage.reading_database().read_preference == Secondary(max_staleness=90)
        assert SECRET not in repr(storage)
    finally:
        await storage.close()


async def test_without_a_read_preference_nothing_is_routed() -> None:
    storage = MongoDBSessionStorage(URL)
    try:
        assert storage.read_preference is None
        assert storage.client.read_preference == Primary()
    finally:
        await storage.close()


def test_the_configured_read_preference_reaches_the_storage_not_the_client_url() -> None:
    config = StorageConfig(connection_string=URL, options={"read_preference": "secondaryPreferred"})
    storage = create_storage(config)
    assert isinstance(storage, MongoDBSessionStorage)
    assert storage.read_preference == SecondaryPreferred(max_staleness=90)
    assert storage.client.read_preference == Primary()


async def test_the_clock_keeps_the_latest_times_and_advances_new_sessions() -> None:
    storage = MongoDBSessionStorage(URL)
    clock = CausalClock()
    try:
        async with clock.session(storage.client) as fresh:
            assert fresh.options.causal_consistency
            assert fresh.operation_time is None and fresh.cluster_time is None
        for seconds in (10, 7):
            async with storage.client.start_session() as write:
                write.advance_cluster_time({"clusterTime": Timestamp(seconds, 1), "signature": {}})
                write.advance_operation_time(Timestamp(seconds, 1))
                clock.observe(write)
        async with clock.session(storage.client) as read:
            assert read.operation_time == Timestamp(10, 1)
            assert read.cluster_time is not None
            assert read.cluster_time["clusterTime"] == Timestamp(10, 1)
    finally:
        await storage.close()


class _Recorder:
    """Stands in for the repository functions: records (call, documents, session)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, advance_to: int) -> None:
        self.calls: list[tuple[str, DocumentSet, Any]] = []
        self._advance_to = advance_to
        results: dict[str, Any] = {
            "read_session_page": [],
            "search_messages": [],
            "count_store": StorageCounts({}, 0, 0, 0),
            "read_session_batch_after": [],
            "read_file_records_after": [],
            "read_session": None,
            "read_sessions": [],
            "read_file_record": None,
            "read_file_records_page": [],
        }
        writes = [
            "delete_session_document",
            "write_file_record",
            "delete_files_expired_by",
            "expire_sessions_before",
            "set_sessions_status",
        ]
        for name, result in results.items():
            monkeypatch.setattr(repositories, name, self._reader(name, result))
        for name in writes:
            monkeypatch.setattr(repositories, name, self._writer(name))
        # A save goes through persistence.mongo.writes: record it the same way.
        monkeypatch.setattr(save_path, "write_plan", self._writer("write_plan"))

    def _reader(self, name: str, result: Any) -> Callable[..., Any]:
        async def read(docs: DocumentSet, client_session: Any, *args: Any, **kw: Any) -> Any:
            self.calls.append((name, docs, client_session))
            return result

        return read

    def _writer(self, name: str) -> Callable[..., Any]:
        async def write(docs: DocumentSet, client_session: Any, *args: Any, **kw: Any) -> Any:
            self.calls.append((name, docs, client_session))
            if client_session is not None:
                # What PyMongo does with a replica set's reply to the write.
                self._advance_to += 1
                time = Timestamp(self._advance_to, 1)
                client_session.advance_cluster_time({"clusterTime": time, "signature": {}})
                client_session.advance_operation_time(time)
            if name == "write_plan":
                return save_path.Saved(1, "incarnation", exact=True)
            return 0 if name != "delete_session_document" else True

        return write

    def last(self, name: str) -> tuple[DocumentSet, Any]:
        found = [(docs, session) for call, docs, session in self.calls if call == name]
        assert found, f"{name} was not called"
        return found[-1]


@pytest.fixture
async def routed(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Any, _Recorder]]:
    storage = MongoDBSessionStorage(URL, read_preference="secondaryPreferred")
    # What initialize() binds against a server: the primary's documents and the
    # documents of the database with the read preference.
    storage._docs, storage._reading = bind_documents(), bind_documents()
    recorder = _Recorder(monkeypatch, advance_to=100)
    yield storage, recorder
    await storage.close()


async def _every_routed_read(storage: MongoDBSessionStorage) -> None:
    await storage.list_sessions()
    await storage.search_messages("word")
    await storage.count()
    [batch async for batch in storage.iter_sessions()]
    [batch async for batch in storage.iter_file_records()]


ROUTED_READS = [
    "read_session_page",
    "search_messages",
    "count_store",
    "read_session_batch_after",
    "read_file_records_after",
]


async def test_routed_reads_carry_the_read_preference_and_the_time_of_the_last_write(
    routed: tuple[MongoDBSessionStorage, _Recorder],
) -> None:
    storage, recorder = routed
    await _every_routed_read(storage)
    for name in ROUTED_READS:
        docs, client_session = recorder.last(name)
        assert docs is storage._reading and docs is not storage._docs
        assert client_session.options.causal_consistency
        assert client_session.operation_time is None  # nothing written yet

    session = ChatSession.create("model")
    session.add_message("user", "hello")
    await storage.save_session(session)
    await _every_routed_read(storage)
    for name in ROUTED_READS:
        _, client_session = recorder.last(name)
        assert client_session.operation_time == Timestamp(101, 1)


@pytest.mark.parametrize(
    ("write", "name"),
    [
        (lambda s: s.delete_session("x"), "delete_session_document"),
        (
            lambda s: s.save_file_record(
                UploadedFileRecord(
                    file_id="f",
                    gemini_file_name="n",
                    gemini_file_uri="u",
                    display_name="d",
                    size=1,
                    mime_type="text/plain",
                    uploaded_at=datetime(2026, 1, 1, tzinfo=UTC),
                    expires_at=datetime(2026, 1, 2, tzinfo=UTC),
                )
            ),
            "write_file_record",
        ),
        (lambda s: s.delete_expired_files(), "delete_files_expired_by"),
        (lambda s: s.expire_sessions(datetime(2026, 1, 1, tzinfo=UTC)), "expire_sessions_before"),
        (lambda s: s.set_status(["x"], "archived"), "set_sessions_status"),
    ],
)
async def test_every_write_runs_in_a_causal_session_the_next_read_follows(
    routed: tuple[MongoDBSessionStorage, _Recorder], write: Any, name: str
) -> None:
    storage, recorder = routed
    await write(storage)
    docs, client_session = recorder.last(name)
    assert docs is storage._docs
    assert client_session is not None and client_session.options.causal_consistency
    await storage.list_sessions()
    assert recorder.last("read_session_page")[1].operation_time == Timestamp(101, 1)


async def test_loads_and_file_reads_go_to_the_primary_without_a_session(
    routed: tuple[MongoDBSessionStorage, _Recorder],
) -> None:
    storage, recorder = routed
    await storage.load_session("x")
    await storage.load_sessions(["x"])
    await storage.load_file_record("f")
    await storage.list_file_records()
    for name in ("read_session", "read_sessions", "read_file_record", "read_file_records_page"):
        docs, client_session = recorder.last(name)
        assert docs is storage._docs and client_session is None


async def test_without_a_read_preference_every_call_is_as_before(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    storage = MongoDBSessionStorage(URL)
    storage._docs = bind_documents()
    recorder = _Recorder(monkeypatch, advance_to=100)
    try:
        session = ChatSession.create("model")
        await storage.save_session(session)
        await _every_routed_read(storage)
        for name in [*ROUTED_READS, "write_plan"]:
            docs, client_session = recorder.last(name)
            assert docs is storage._docs and client_session is None
    finally:
        await storage.close()
