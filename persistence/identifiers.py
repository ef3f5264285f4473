"""Random identifiers for messages: uuid4 hex strings, drawn from the OS in batches.

A bulk insert names thousands of messages; `uuid.uuid4()` makes one system call and
one UUID object for each (about 2.7 us, most of a message's cost in a bulk insert
next to the Agents SDK's whole 14 us). Here one `os.urandom` call draws POOL ids at
once, and their fixed bits are set for all of them in C (0.25 us an id; 0.7 when each
was formatted from an integer). The ids are the same kind: 122 random bits from the
OS's cryptographic source, with uuid4's version and variant bits.

A forked child starts with an empty pool, so parent and child never hand out the
same ids; list `pop` and `extend` are atomic, so threads never share one either. A
fork made in C runs none of Python's at-fork hooks (uWSGI's workers unless
`--py-call-osafterfork`) and keeps the rest of the parent's batch; such a child cannot
use a storage the parent opened (sql/forks.py), so every storage opened calls
`forget_inherited_ids`, which empties a pool another process drew. Ids a child draws
before it opens a storage can still repeat the parent's. Asking the process id for
every id would cost 0.18 us each (the id costs 0.24).
"""

from __future__ import annotations

import os
import uuid

POOL = 256
# uuid4's fixed bits, set in the raw bytes of all POOL ids at once (C loops):
# byte 6 holds the version (4) in its high nibble, byte 8 the RFC 4122 variant (10xx).
_VERSION = bytes((value & 0x0F) | 0x40 for value in range(256))
_VARIANT = bytes((value & 0x3F) | 0x80 for value in range(256))

_pool: list[str] = []
# The process that drew the pool's ids.
_drawn_by = os.getpid()


def _draw(count: int) -> list[str]:
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = raw[6::16].translate(_VERSION)
    raw[8::16] = raw[8::16].translate(_VARIANT)
    digits = raw.hex()
    return [digits[start : start + 32] for start in range(0, 32 * count, 32)]


def random_hex_id() -> str:
    """Returns a fresh random identifier: a uuid4 as 32 lowercase hex digits."""
    try:
        return _pool.pop()
    except IndexError:
        global _drawn_by
        _drawn_by = os.getpid()
        _pool.extend(_draw(POOL))
        return _pool.pop()


def forget_inherited_ids() -> None:
    """Empties the pool if another process drew it: this one is a child forked in C."""
    if _drawn_by != os.getpid():
        _pool.clear()


os.register_at_fork(after_in_child=_pool.clear)


def new_incarnation() -> str:
    """A fresh incarnation for a session being created: a uuid4 as 32 hex digits.

    Drawn by the object that creates the session, before it sends the creation: a
    creation of unknown outcome is retried with the same one (persistence.bookkeeping).
    """
    return uuid.uuid4().hex
