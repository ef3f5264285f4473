"""The order messages were stored in on MongoDB: `seq`, drawn when a write is sent.

The SQL backends order stored messages by their row ids, which never go down; search
sorts MongoDB's by `seq`. An ObjectId is 4 bytes of seconds, 5 of this process and a
3-byte counter that starts anywhere and wraps, so two drawn one after the other go
down at the counter's wrap within one second (about one draw in 16.7 million: a bulk
import of millions of messages meets it), and after the system clock stepped back.
Found by attack (by reading, no server runs here): a search's newest first then put
the later message behind the earlier one. Each draw is now above the one before it in
this process; two processes' draws within one second still sort by process. A fork's
child starts afresh (found by attack: it went on from its parent's last draw, so the
two drew the same values), with a lock of its own.
"""

from __future__ import annotations

import os
import threading

from bson import ObjectId

_lock = threading.Lock()
_last = 0
_pid = os.getpid()


def next_seq() -> ObjectId:
    """An ObjectId above every one this process drew before."""
    global _last
    if _pid != os.getpid():
        # A fork made in C runs no at-fork hook (libc fork(), uWSGI): bson's ObjectId
        # looks at the process id the same way (found by review).
        _after_fork_in_child()
    drawn = int.from_bytes(ObjectId().binary, "big")
    with _lock:
        _last = max(drawn, _last + 1)
        value = _last
    return ObjectId(value.to_bytes(12, "big"))


def _after_fork_in_child() -> None:
    global _last, _lock, _pid
    _last, _lock, _pid = 0, threading.Lock(), os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)
