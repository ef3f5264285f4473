"""A storage opened, then the process forked (run as a script, never collected).

    python forked.py sqlite|postgresql TARGET use|drop|iterate FORK
    python forked.py gc - pause FORK
    python forked.py sqlite TARGET failed FORK

TARGET is a SQLite file or a PostgreSQL URL; FORK is `os` (os.fork) or `libc` (libc's
fork() through ctypes, which runs none of Python's at-fork hooks, as uWSGI's workers).

- use: the child calls the inherited storage on a loop of its own and closes it;
- drop: the child lets go of it (the garbage collector) without a call;
- iterate: the parent has read the first batch of `iter_sessions(1)`; the child
  resumes that iteration on a loop of its own, then lets go of it and of the storage;
- pause: the child is forked while another thread holds collection_paused();
- failed: the parent's initialize() fails after its engine was made, and the child
  opens the same storage.

The child then exits through the interpreter's own shutdown (`os`), and the parent
saves and loads through its storage after the child has gone. One JSON object is
printed: what the child saw and what the parent did afterwards.
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import json
import os
import sqlite3
import sys
import threading
import time
from typing import Any

from persistence import ChatSession, PostgreSQLSessionStorage, SQLiteSessionStorage
from persistence.garbage_collection import collection_paused
from persistence.sql.schema import VERSION_TABLE
from persistence.storage import SessionStorage

WAIT = 10.0


def _fork(how: str) -> int:
    if how == "libc":
        # PyDLL keeps the GIL through the call, as a fork made in C does: CDLL let
        # another thread (aiosqlite's) take it, and the child, forked holding none,
        # waited for it for good (found as a child left sleeping after a failed run).
        return int(ctypes.PyDLL(None).fork())
    return os.fork()


async def _outcome(call: Any) -> str:
    started = time.monotonic()
    try:
        await asyncio.wait_for(call, WAIT)
    except TimeoutError:
        return "hang"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return f"ok in {time.monotonic() - started:.2f} s"


async def _child_use(storage: SessionStorage, session_id: str) -> dict[str, str]:
    fresh = ChatSession.create("m")
    return {
        "load": await _outcome(storage.load_session(session_id)),
        "save": await _outcome(storage.save_session(fresh)),
        "search": await _outcome(storage.search_messages("first")),
        "close": await _outcome(storage.close()),
        "after close": await _outcome(storage.load_session(session_id)),
    }


def _report_from_child(write_end: int, report: dict[str, Any]) -> None:
    with os.fdopen(write_end, "w") as pipe:
        pipe.write(json.dumps(report))


def storage_then_fork(backend: str, target: str, mode: str, how: str) -> dict[str, Any]:
    loop = asyncio.new_event_loop()
    storage: SessionStorage | None = (
        SQLiteSessionStorage(target)
        if backend == "sqlite"
        else PostgreSQLSessionStorage(target, min_pool_size=1, max_pool_size=2)
    )
    assert storage is not None
    loop.run_until_complete(storage.initialize())
    session = ChatSession.create("m")
    session.add_message("user", "first words")
    loop.run_until_complete(storage.save_session(session))
    iteration = None
    iterated: list[str] = []
    if mode == "iterate":
        loop.run_until_complete(storage.save_session(ChatSession.create("m")))
        iteration = storage.iter_sessions(1)
        iterated = [s.session_id for s in loop.run_until_complete(anext(iteration))]

    read_end, write_end = os.pipe()
    pid = _fork(how)
    if pid == 0:
        os.close(read_end)
        report: dict[str, Any] = {}
        if mode == "use":
            report = asyncio.run(_child_use(storage, session.session_id))
        if iteration is not None:
            report = {"resume": asyncio.run(_outcome(anext(iteration)))}
        storage = iteration = None
        gc.collect()
        _report_from_child(write_end, report)
        if how == "libc":
            # Python's threading state was not reset for this child: its shutdown would
            # wait for the parent's threads.
            os._exit(0)
        sys.exit(0)  # the interpreter's own shutdown, finalisers and all
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child = json.loads(pipe.read() or "{}")
    _, status = os.waitpid(pid, 0)

    if iteration is not None:
        rest = loop.run_until_complete(_outcome(_read_on(iteration, iterated)))
        every: list[str] = []
        loop.run_until_complete(_read_on(storage.iter_sessions(), every))
        iterated = [rest, *iterated, "of", *every]
    session.add_message("assistant", "second words")
    parent: dict[str, Any] = {
        "iterated": iterated,
        "save": loop.run_until_complete(_outcome(storage.save_session(session))),
        "load": loop.run_until_complete(_outcome(storage.load_session(session.session_id))),
    }
    loaded = loop.run_until_complete(storage.load_session(session.session_id))
    parent["stored"] = None if loaded is None else [m.content for m in loaded.messages]
    loop.run_until_complete(storage.close())
    loop.close()
    return {"child": child, "child_status": status, "parent": parent}


async def _read_on(iteration: Any, into: list[str]) -> None:
    async for batch in iteration:
        into.extend(s.session_id for s in batch)


async def _open_save_load(storage: SessionStorage) -> str:
    await storage.initialize()
    session = ChatSession.create("m")
    session.add_message("user", "from the child")
    await storage.save_session(session)
    loaded = await storage.load_session(session.session_id)
    await storage.close()
    return "ok" if loaded is not None and loaded.message_count == 1 else "not stored"


def failed_open_then_fork(target: str, how: str) -> dict[str, Any]:
    """The parent's initialize() fails after its engine was made (the store's version
    row names a revision this version does not know); the child puts the row right and
    opens the same storage object."""
    asyncio.run(_open_save_load(SQLiteSessionStorage(target)))
    with sqlite3.connect(target) as connection:
        (head,) = connection.execute(f"SELECT version_num FROM {VERSION_TABLE}").fetchone()
        connection.execute(f"UPDATE {VERSION_TABLE} SET version_num = '9999'")
    connection.close()
    storage = SQLiteSessionStorage(target)
    try:
        asyncio.run(storage.initialize())
        parent = "opened"
    except Exception as exc:
        parent = type(exc).__name__
    read_end, write_end = os.pipe()
    pid = _fork(how)
    if pid == 0:
        os.close(read_end)
        with sqlite3.connect(target) as connection:
            connection.execute(f"UPDATE {VERSION_TABLE} SET version_num = ?", (head,))
        connection.close()
        try:
            child = asyncio.run(_open_save_load(storage))
        except Exception as exc:
            child = f"{type(exc).__name__}: {exc}"
        _report_from_child(write_end, {"open": child})
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        report = json.loads(pipe.read() or "{}")
    os.waitpid(pid, 0)
    return {"parent": parent, "child": report}


def pause_then_fork(how: str) -> dict[str, Any]:
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with collection_paused():
            held.set()
            release.wait()

    holder = threading.Thread(target=hold)
    holder.start()
    held.wait()
    read_end, write_end = os.pipe()
    pid = _fork(how)
    if pid == 0:
        os.close(read_end)
        report = {"enabled at start": gc.isenabled()}
        entered = threading.Event()

        def pause_once() -> None:
            with collection_paused():
                entered.set()

        threading.Thread(target=pause_once, daemon=True).start()
        report["could pause"] = entered.wait(WAIT)
        report["enabled after"] = gc.isenabled()
        _report_from_child(write_end, report)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        child = json.loads(pipe.read() or "{}")
    os.waitpid(pid, 0)
    release.set()
    holder.join()
    return {"child": child, "parent enabled": gc.isenabled()}


def main() -> None:
    backend, target, mode, how = sys.argv[1:5]
    if mode == "pause":
        print(json.dumps(pause_then_fork(how)))
    elif mode == "failed":
        print(json.dumps(failed_open_then_fork(target, how)))
    else:
        print(json.dumps(storage_then_fork(backend, target, mode, how)))


if __name__ == "__main__":
    main()
