"""MongoDB's stored order (`seq`) never goes down in one process: no server needed."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator

import pytest
from bson import ObjectId

from persistence.mongo import sequence


def _drawn(*hexes: str) -> Iterator[ObjectId]:
    return iter(ObjectId(value) for value in hexes)


@pytest.mark.parametrize(
    "draws",
    [
        # The counter wraps within one second.
        ("6b149940a950c52215ffffff", "6b149940a950c52215000000"),
        # The clock steps back an hour.
        ("6b149940a950c52215000001", "6b148b30a950c52215000002"),
    ],
    ids=["counter wrap", "clock back"],
)
def test_each_seq_is_above_the_one_before(
    monkeypatch: pytest.MonkeyPatch, draws: tuple[str, ...]
) -> None:
    """Found by attack (by reading): `seq` was a plain ObjectId, which goes down at its
    counter's wrap and after the clock stepped back, so a search's newest first put the
    message stored later behind the one stored before it."""
    drawn = _drawn(*draws)
    monkeypatch.setattr(
        sequence, "ObjectId", lambda *args: next(drawn) if not args else ObjectId(*args)
    )
    monkeypatch.setattr(sequence, "_last", 0)
    first, second = sequence.next_seq(), sequence.next_seq()
    assert first == ObjectId(draws[0])
    assert second > first


def test_seq_follows_the_clock_when_it_is_ahead() -> None:
    before = sequence.next_seq()
    later = ObjectId()
    drawn = sequence.next_seq()
    assert drawn > before
    assert drawn.generation_time >= later.generation_time


@pytest.mark.parametrize("fork", ["os.fork", "libc fork"])
def test_a_forks_child_draws_afresh(monkeypatch: pytest.MonkeyPatch, fork: str) -> None:
    """Found by attack (by reading): a fork's child went on from its parent's last
    draw, so parent and child drew the same values (a plain ObjectId never does: bson
    draws new process bytes in the child). libc's fork() runs no at-fork hook (uWSGI's
    workers): the draw itself looks at the process id."""
    monkeypatch.setattr(sequence, "_last", 2**95)  # far above any ObjectId of today
    reading, writing = os.pipe()
    pid = os.fork() if fork == "os.fork" else int(ctypes.PyDLL(None).fork())
    if pid == 0:  # the child: its draw, through the pipe
        try:
            os.write(writing, sequence.next_seq().binary)
        finally:
            os._exit(0)
    os.close(writing)
    drawn = os.read(reading, 12)
    os.close(reading)
    os.waitpid(pid, 0)
    parents = sequence.next_seq()
    child = ObjectId(drawn)
    assert child != parents
    assert int.from_bytes(child.binary, "big") < 2**95  # a fresh ObjectId, not the parent's
