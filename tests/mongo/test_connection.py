"""Connection strings, password hiding, timeouts and life cycle, without a server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pymongo.errors import ServerSelectionTimeoutError

from persistence.errors import InvalidDataError, PersistenceError, StorageConnectionError
from persistence.mongo.backend import MongoDBSessionStorage
from persistence.mongo.connection import client_options, has_transactions

SECRET = "s3cr3t-Pa55"
# Port 1 on loopback: nothing listens, so the connection is refused at once.
UNREACHABLE = f"mongodb://admin:{SECRET}@127.0.0.1:1/"


@pytest.mark.parametrize(
    "url",
    [
        "mongodb://localhost",
        "mongodb://u:p@localhost:27017/app?authSource=admin",
        "mongodb://h1:27017,h2:27017/?replicaSet=rs0",
        "MongoDB://localhost",  # schemes are case-insensitive (RFC 3986); pymongo's is not
        # SRV records are looked up when connecting, not here.
        "mongodb+srv://u:p@cluster0.example.invalid/?retryWrites=true",
    ],
)
async def test_mongodb_and_srv_urls_are_accepted(url: str) -> None:
    storage = MongoDBSessionStorage(url)
    assert storage.backend_name == "mongodb"
    assert storage.connection_string.startswith(("mongodb://", "mongodb+srv://"))
    assert storage.database_name == "gemini_mcp"
    await storage.close()


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://admin:{SECRET}@localhost/db",
        f"sqlite:///{SECRET}.db",
        f"http://admin:{SECRET}@localhost/",
        f"admin:{SECRET}@localhost",
        "",
    ],
)
def test_other_schemes_are_refused_without_repeating_the_password(url: str) -> None:
    with pytest.raises(InvalidDataError, match="mongodb://") as raised:
        MongoDBSessionStorage(url)
    assert SECRET not in str(raised.value)


@pytest.mark.parametrize(
    "url",
    [
        f"mongodb://admin:{SECRET}:x@localhost/",  # an unescaped ':' in the password
        f"mongodb://admin:{SECRET}@localhost/?notAnOption=1",
        f"mongodb://admin:{SECRET}@localhost:99999/",
        f"mongodb+srv://admin:{SECRET}@cluster.example.invalid:27017/",  # SRV takes no port
    ],
)
def test_malformed_mongodb_urls_are_invalid_data_without_the_password(url: str) -> None:
    with pytest.raises(InvalidDataError, match="connection_string") as raised:
        MongoDBSessionStorage(url)
    assert SECRET not in str(raised.value)
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


@pytest.mark.parametrize("name", ["", "a/b", "a.b", "a b", "a$b", 'a"b', "x" * 64])
def test_database_names_mongodb_refuses_are_invalid_data(name: str) -> None:
    with pytest.raises(InvalidDataError, match="database_name"):
        MongoDBSessionStorage("mongodb://localhost", database_name=name)


async def test_repr_hides_the_password() -> None:
    storage = MongoDBSessionStorage(UNREACHABLE, database_name="app")
    assert SECRET not in repr(storage)
    assert (
        repr(storage) == "MongoDBSessionStorage('mongodb://***@127.0.0.1:1/', database_name='app')"
    )
    assert SECRET not in repr(storage.client)
    await storage.close()


async def test_server_selection_gives_up_after_five_seconds_by_default() -> None:
    storage = MongoDBSessionStorage("mongodb://localhost")
    assert storage.client.options.server_selection_timeout == 5.0
    assert storage.client.options.pool_options.connect_timeout == 5.0
    await storage.close()


def test_a_timeout_the_url_sets_is_kept() -> None:
    options = client_options("mongodb://h/?serverSelectionTimeoutMS=1500&connectTimeoutMS=900", 5.0)
    assert "serverSelectionTimeoutMS" not in options
    assert "connectTimeoutMS" not in options
    assert client_options("mongodb://h/", 2.5)["serverSelectionTimeoutMS"] == 2500


async def test_unreachable_server_raises_connection_error_without_the_password() -> None:
    storage = MongoDBSessionStorage(UNREACHABLE, server_selection_timeout=1.0)
    with pytest.raises(StorageConnectionError, match="unreachable") as raised:
        await storage.initialize()
    assert isinstance(raised.value.__cause__, ServerSelectionTimeoutError)
    assert SECRET not in str(raised.value)
    await storage.close()


async def test_unreachable_server_fails_every_operation_as_a_connection_error() -> None:
    storage = MongoDBSessionStorage(UNREACHABLE, server_selection_timeout=0.5)
    with pytest.raises(StorageConnectionError):
        await storage.drop_database()
    await storage.close()


async def test_use_before_initialize_is_refused() -> None:
    storage = MongoDBSessionStorage("mongodb://localhost")
    with pytest.raises(PersistenceError, match="not initialized"):
        await storage.load_session("x")
    with pytest.raises(PersistenceError, match="not initialized"):
        storage.unit_of_work()
    await storage.close()


async def test_closed_storage_is_refused_and_close_twice_is_harmless() -> None:
    storage = MongoDBSessionStorage("mongodb://localhost")
    await storage.close()
    await storage.close()
    with pytest.raises(PersistenceError, match="closed"):
        await storage.initialize()
    with pytest.raises(PersistenceError, match="closed"):
        await storage.list_sessions()
    with pytest.raises(PersistenceError, match="closed"):
        await storage.count()


async def test_bad_arguments_are_refused_before_any_io() -> None:
    storage = MongoDBSessionStorage("mongodb://localhost")
    with pytest.raises(InvalidDataError, match="status"):
        await storage.list_sessions(status="deleted")
    with pytest.raises(InvalidDataError, match="limit"):
        await storage.list_sessions(limit=-1)
    with pytest.raises(InvalidDataError, match="offset"):
        await storage.list_sessions(offset=-1)
    with pytest.raises(InvalidDataError, match="batch_size"):
        await anext(storage.iter_sessions(batch_size=0))
    with pytest.raises(InvalidDataError, match="status"):
        await storage.set_status(["a"], "gone")  # type: ignore[arg-type]
    with pytest.raises(InvalidDataError, match="one string 'abc'"):
        await storage.set_status("abc", "archived")
    assert await storage.copy_to_file(Path("unused")) is False
    await storage.close()


@pytest.mark.parametrize(
    ("hello", "expected"),
    [
        ({"isWritablePrimary": True, "logicalSessionTimeoutMinutes": 30, "ok": 1.0}, False),
        (
            {
                "isWritablePrimary": True,
                "setName": "rs0",
                "logicalSessionTimeoutMinutes": 30,
                "ok": 1.0,
            },
            True,
        ),
        ({"isWritablePrimary": True, "msg": "isdbgrid", "logicalSessionTimeoutMinutes": 30}, True),
        ({"isWritablePrimary": True, "setName": "rs0"}, False),
    ],
    ids=["standalone", "replica-set", "mongos", "no-sessions"],
)
def test_transactions_are_used_only_where_the_server_has_them(
    hello: dict[str, object], expected: bool
) -> None:
    assert has_transactions(hello) is expected


def test_a_failed_first_initialize_may_be_tried_again_from_another_loop() -> None:
    """Found by review: PyMongo binds a client to the loop of its first use (4.12+), so
    after a first initialize() failed, every retry from a new loop (a service retrying
    its start-up in a new asyncio.run, a test framework's loop per test) raised a raw
    RuntimeError. A failed opening now leaves a new client behind."""
    storage = MongoDBSessionStorage(UNREACHABLE, server_selection_timeout=0.3)
    for _ in range(2):
        with pytest.raises(StorageConnectionError):
            asyncio.run(storage.initialize())
    asyncio.run(storage.close())


async def test_a_failed_open_for_reading_leaves_the_storage_able_to_write() -> None:
    """Found by review: a failed open_for_reading() left the storage refusing every
    write, even after a successful initialize()."""
    storage = MongoDBSessionStorage(UNREACHABLE, server_selection_timeout=0.3)
    with pytest.raises(StorageConnectionError):
        await storage.open_for_reading()
    with pytest.raises(PersistenceError, match="not initialized"):
        storage.unit_of_work()
    await storage.close()


def test_a_storage_used_from_another_loop_says_so_and_close_lets_go() -> None:
    """Found by review: from a loop other than the one its client was first used in,
    every call raised PyMongo's raw RuntimeError, and close() from there raised it too
    and closed nothing. The storage records the loop it opened in (as an initialize()
    that reached the server would)."""
    storage = MongoDBSessionStorage(UNREACHABLE, server_selection_timeout=0.3)

    async def opened_here() -> None:
        storage._loop = asyncio.get_running_loop()

    async def from_another_loop() -> None:
        with pytest.raises(PersistenceError, match="another event loop"):
            await storage.load_session("x")
        with pytest.raises(PersistenceError, match="another event loop"):
            storage.unit_of_work()
        await storage.close()  # lets go of the client, raising nothing

    asyncio.run(opened_here())
    asyncio.run(from_another_loop())
    with pytest.raises(PersistenceError, match="closed"):
        asyncio.run(storage.initialize())


def test_a_client_first_used_in_a_loop_still_open_is_refused_elsewhere_and_let_go() -> None:
    """Found by review: PyMongo binds the client at its first use of any kind (here a
    drop_database() that failed), which the storage did not know: initialize() from
    another loop then raised a raw RuntimeError, and its failure, or a close() from
    there, waited for good on PyMongo's close() while the first loop stayed open."""
    storage = MongoDBSessionStorage(UNREACHABLE, server_selection_timeout=0.3)
    first = asyncio.new_event_loop()
    try:
        with pytest.raises(StorageConnectionError):
            first.run_until_complete(storage.drop_database())

        async def elsewhere() -> None:
            with pytest.raises(PersistenceError, match="another event loop"):
                await asyncio.wait_for(storage.initialize(), 10)
            await asyncio.wait_for(storage.close(), 10)  # lets go: returns at once

        asyncio.run(elsewhere())
    finally:
        first.close()
