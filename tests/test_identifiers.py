"""Message ids drawn in batches: still uuid4s, never handed out twice, not across a fork."""

from __future__ import annotations

import asyncio
import ctypes
import json
import multiprocessing
import os
import threading
import uuid
from pathlib import Path

import pytest

from persistence import SQLiteSessionStorage, identifiers
from persistence.identifiers import POOL, random_hex_id


def test_an_id_is_a_uuid4_in_lowercase_hex() -> None:
    for _ in range(3 * POOL):
        drawn = random_hex_id()
        parsed = uuid.UUID(hex=drawn)
        assert parsed.hex == drawn
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


def test_ids_do_not_repeat_across_many_pools() -> None:
    drawn = [random_hex_id() for _ in range(50 * POOL)]
    assert len(set(drawn)) == len(drawn)


def test_the_random_bits_vary_in_every_position() -> None:
    # A bit stuck by the masks would show as a hex digit that never changes.
    drawn = [random_hex_id() for _ in range(4 * POOL)]
    for position in range(32):
        digits = {text[position] for text in drawn}
        if position == 12:
            assert digits == {"4"}
        elif position == 16:
            assert digits == set("89ab")
        else:
            assert len(digits) == 16, position


def test_threads_drawing_at_once_never_share_an_id() -> None:
    found: list[list[str]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def draw(into: list[str]) -> None:
        start.wait()
        into.extend(random_hex_id() for _ in range(5 * POOL))

    threads = [threading.Thread(target=draw, args=(into,)) for into in found]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [drawn for into in found for drawn in into]
    assert len(set(everything)) == len(everything) == 8 * 5 * POOL


def _draw_in_child(connection: multiprocessing.connection.Connection) -> None:
    connection.send([random_hex_id() for _ in range(POOL)])
    connection.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_repeat_the_parents_ids() -> None:
    random_hex_id()  # the parent's pool now holds ids a naive child would inherit
    if not identifiers._pool:  # that draw took the last id of a pool
        random_hex_id()
    assert identifiers._pool
    inherited = set(identifiers._pool)
    context = multiprocessing.get_context("fork")
    receiving, sending = context.Pipe(duplex=False)
    child = context.Process(target=_draw_in_child, args=(sending,))
    child.start()
    from_child = receiving.recv()
    child.join()
    assert child.exitcode == 0
    from_parent = [random_hex_id() for _ in range(POOL)]
    assert not set(from_child) & (inherited | set(from_parent))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_child_forked_in_c_draws_its_own_ids_once_it_opens_a_storage(tmp_path: Path) -> None:
    """libc's fork() runs no at-fork hook (uWSGI's workers): the child kept the
    parent's batch and handed out the same ids until it opened a storage, which now
    empties a batch another process drew."""
    random_hex_id()
    if not identifiers._pool:
        random_hex_id()
    inherited = set(identifiers._pool)
    read_end, write_end = os.pipe()
    pid = int(ctypes.PyDLL(None).fork())
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        drawn: list[str] = []
        try:
            os.close(read_end)
            storage = SQLiteSessionStorage(tmp_path / "child.db")
            asyncio.run(storage.initialize())
            drawn = [random_hex_id() for _ in range(POOL)]
            asyncio.run(storage.close())
        finally:
            os.write(write_end, json.dumps(drawn).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        from_child = json.loads(pipe.read() or "[]")
    os.waitpid(pid, 0)
    assert len(from_child) == POOL
    assert not set(from_child) & inherited
