"""The sessions a SessionManager holds: a bounded LRU cache, and those let go of it.

A session leaves the cache when it is the least recently used one beyond the bound
(the manager saves its changes first). A caller may still hold it then, and change it
after: so the cache keeps knowing it, weakly, for as long as anyone holds it. The
manager returns that same object again rather than load a second copy, and saves its
changes at shutdown. Once no caller holds it, it is gone.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterable

from persistence.models import ChatSession


class SessionCache:
    """At most `bound` cached sessions by id, least recently used first, plus the
    released ones still held elsewhere."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self._cached: OrderedDict[str, ChatSession] = OrderedDict()
        # Sessions that left the cache, by id(): a weak value goes with its object.
        self._released: weakref.WeakValueDictionary[int, ChatSession] = (
            weakref.WeakValueDictionary()
        )
        # Sets collecting the ids the cache takes in or lets go of (see `watch`).
        self._watches: list[set[str]] = []

    def __len__(self) -> int:
        return len(self._cached)

    def ids(self) -> list[str]:
        """The cached ids, least recently used first."""
        return list(self._cached)

    def get(self, session_id: str) -> ChatSession | None:
        return self._cached.get(session_id)

    def use(self, session_id: str) -> None:
        """Marks the cached session the most recently used."""
        self._cached.move_to_end(session_id)

    def watch(self) -> set[str]:
        """A set that collects, until `unwatch`, every session id the cache takes in or
        lets go of, and every id `touch` names."""
        ids: set[str] = set()
        self._watches.append(ids)
        return ids

    def unwatch(self, ids: set[str]) -> None:
        self._watches.remove(ids)

    def touch(self, session_id: str) -> None:
        """Tells the watches that `session_id` changed (in the cache or the store)."""
        for ids in self._watches:
            ids.add(session_id)

    def put(self, session: ChatSession) -> None:
        """Caches `session` as the most recently used (over the bound, if it is full)."""
        self.touch(session.session_id)
        self._released.pop(id(session), None)
        self._cached[session.session_id] = session
        self._cached.move_to_end(session.session_id)

    def put_oldest(self, sessions: Iterable[ChatSession]) -> None:
        """Caches sessions not cached yet as the least recently used, the first last."""
        for session in sessions:
            if session.session_id not in self._cached:
                self._cached[session.session_id] = session
                self._cached.move_to_end(session.session_id, last=False)

    def victim(self, sparing: ChatSession) -> ChatSession | None:
        """The session to let go of before `sparing` goes in, if the cache is full."""
        others = len(self._cached) - (self._cached.get(sparing.session_id) is sparing)
        if others < self.bound:
            return None
        return next(cached for cached in self._cached.values() if cached is not sparing)

    def track(self, session: ChatSession) -> None:
        """Knows `session` (weakly) before it goes in: it is on its way into the cache."""
        if self._cached.get(session.session_id) is not session:
            self._released[id(session)] = session

    def release(self, session: ChatSession) -> None:
        """Takes `session` out of the cache; it is still known while a caller holds it."""
        self.touch(session.session_id)
        if self._cached.get(session.session_id) is session:
            del self._cached[session.session_id]
        self._released[id(session)] = session

    def forget(self, session: ChatSession) -> None:
        """Forgets this object, cached or released."""
        self.touch(session.session_id)
        if self._cached.get(session.session_id) is session:
            del self._cached[session.session_id]
        self._released.pop(id(session), None)

    def forget_id(self, session_id: str) -> None:
        """Forgets every object of `session_id`."""
        self.touch(session_id)
        self._cached.pop(session_id, None)
        for session in self.released(session_id):
            self._released.pop(id(session), None)

    def released(self, session_id: str) -> list[ChatSession]:
        """The objects of `session_id` that left the cache and are still held, newest last."""
        return [s for s in list(self._released.values()) if s.session_id == session_id]

    def held(self) -> list[ChatSession]:
        """Every object known: the cached ones, then those released and still held."""
        cached = {id(session) for session in self._cached.values()}
        released = [s for s in list(self._released.values()) if id(s) not in cached]
        return [*self._cached.values(), *released]

    def forget_all_but(self, session_ids: set[str]) -> None:
        """Forgets every object but those of `session_ids`."""
        for session_id in [sid for sid in self._cached if sid not in session_ids]:
            del self._cached[session_id]
        for key, session in list(self._released.items()):
            if session.session_id not in session_ids:
                self._released.pop(key, None)
