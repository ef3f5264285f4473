"""SessionManager: auto-save, a bounded LRU cache, expiry, statistics and exports."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from persistence import formats
from persistence.arguments import path_argument
from persistence.clock import MAX_EXPIRY_HOURS, utc_now
from persistence.errors import (
    InvalidDataError,
    PersistenceError,
    SessionConflictError,
    SessionDeletedError,
)
from persistence.models import ChatSession
from persistence.session_cache import SessionCache
from persistence.storage import SessionStorage, check_last
from persistence.store_files import refuse_own_file
from persistence.turns import Turns
from persistence.validation import check_instance, lookup_id

logger = logging.getLogger(__name__)


def _check_session(session: ChatSession) -> None:
    """Refuses what is not a ChatSession, or one given another id than it had.

    Raises:
        InvalidDataError: naming the problem (found by review: a dict raised a bare
            AttributeError, and a renamed object was cached under its new id).
    """
    check_instance(session, ChatSession, "session")
    session.refuse_changed_id()


# How many times shutdown() saves again what other tasks change while it saves.
_LATE_ROUNDS = 3


def _change_mark(session: ChatSession) -> tuple[Any, ...]:
    """A value that moves with every change to the session, its metadata changed in
    place too (found by attack: such a change, made while shutdown() saved the session,
    looked like a value whose == is never True, and was let go unsaved)."""
    return (session.change_mark(), repr(session.metadata))


def _cache_bound(bound: int) -> int:
    if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
        raise InvalidDataError(f"max_cached_sessions: must be a whole number >= 1, got {bound!r}")
    return bound


class SessionManager:
    """The everyday front of a store: cached sessions, auto-save, expiry and exports.

    The cache keeps at most `max_cached_sessions` sessions, least recently used
    first out; a session with unsaved changes is saved before it leaves. A session
    that left the cache while a caller still holds it stays known to the manager
    (weakly): `get_session` returns that same object again, and `shutdown()` saves
    changes made to it since.
    """

    # How many messages `startup()`'s warm-up reads at most, all sessions together: a
    # session that would pass it is left to its first `get_session`. Found by attack:
    # one session of 200,000 messages made the warm-up take 737 ms and 270 MB.
    warm_up_messages: int = 50_000

    def __init__(
        self,
        storage: SessionStorage,
        auto_save_enabled: bool = True,
        expiry_hours: float = 72,
        max_cached_sessions: int = 1000,
    ) -> None:
        if (
            isinstance(expiry_hours, bool)
            or not isinstance(expiry_hours, int | float)
            or not 0 < expiry_hours <= MAX_EXPIRY_HOURS
        ):
            raise InvalidDataError(
                f"expiry_hours: must be a number more than 0 and at most {MAX_EXPIRY_HOURS:,},"
                f" got {expiry_hours!r}"
            )
        if not isinstance(auto_save_enabled, bool):
            # Found by attack: "false" (read from an environment variable or a form)
            # turned auto-save on, by its truth value.
            raise InvalidDataError(
                f"auto_save_enabled: must be True or False, got {auto_save_enabled!r}"
            )
        self.storage = storage
        self.auto_save_enabled = auto_save_enabled
        self.expiry_hours = expiry_hours
        self._cache = SessionCache(_cache_bound(max_cached_sessions))
        # Saves of one object take turns (by id()), and loads of one session (by its id),
        # with its deletes and archives.
        self._writing = Turns(
            "this SessionManager is saving this session object in another event loop"
            " (another thread): a manager's session is worked on from one loop at a time"
        )
        self._loading = Turns(
            "this SessionManager is working on session {key!r} in another event loop"
            " (another thread): a manager's session is worked on from one loop at a time"
        )

    @property
    def max_cached_sessions(self) -> int:
        """How many sessions the cache keeps at most (the next one cached applies a new
        bound)."""
        return self._cache.bound

    @max_cached_sessions.setter
    def max_cached_sessions(self, bound: int) -> None:
        self._cache.bound = _cache_bound(bound)

    @property
    def cached_session_ids(self) -> list[str]:
        """The ids in the cache, least recently used first."""
        return self._cache.ids()

    def has_unsaved_changes(self, session_id: str) -> bool:
        """Whether the manager's copy of the session holds changes the store lacks."""
        held = [self._cache.get(session_id), *self._cache.released(session_id)]
        return any(session is not None and self._dirty(session) for session in held)

    def _dirty(self, session: ChatSession) -> bool:
        return self.storage.has_unsaved_changes(session)

    async def _write(self, session: ChatSession) -> bool:
        """Saves the session, resolving conflicts; False if it was deleted meanwhile.

        On a conflict the session is reloaded and this manager's pending changes are
        applied over it (its values win for what it changed), then saved again. Saves
        of one object take turns here, so no save is in flight while it is rebased.
        """
        # Before the turn: a save this task's own unit of work would hold back must not
        # wait in it, holding back other tasks' saves that wait for that unit (for good).
        self.storage.check_plain_save(session)
        async with self._writing(id(session)):
            return await self._write_resolving(session)

    async def _write_resolving(self, session: ChatSession) -> bool:
        try:
            await self.storage.save_session(session)
            return True
        except SessionDeletedError:
            return self._deleted(session)
        except SessionConflictError as exc:
            logger.warning(
                "session %s: %s changed by another writer too; reloading and reapplying"
                " this manager's changes (they win)",
                session.session_id,
                ", ".join(exc.conflicts),
            )
        fresh = await self._reloaded(session)
        if fresh is None:
            return self._deleted(session)
        try:
            dropped = session.rebase(self.storage.token, fresh)
        except SessionDeletedError:
            return self._deleted(session)
        if dropped:
            logger.warning(
                "session %s: edits of messages another writer removed were dropped: %s",
                session.session_id,
                ", ".join(dropped),
            )
        # Writers may have changed it again since the reload: this manager's values win.
        try:
            await self.storage.save_session(session, force=True)
        except SessionDeletedError:
            return self._deleted(session)
        return True

    async def _reloaded(self, session: ChatSession) -> ChatSession | None:
        """The session as the store holds it now, as much of it as `rebase` needs.

        A whole copy is reloaded whole. A partial one (`last=`): its newest messages, as
        many as it carries, when it holds only appends and field changes. Holding edits,
        removals or a save of unknown outcome: the newest messages that hold every one
        it touches (`touched_ids`), as many as it carries, then back to where it was
        loaded from (if that is less than half the history), else the whole history
        (where a message is missing, only the whole shows it removed or lost: found by
        attack, another writer had appended the copy's messages again, before its oldest
        one). Found by attack: such a copy of the newest 20 of 50,000 messages was
        reloaded whole, 396 ms against 8.8 ms at 100, and carried all 50,000 after.
        """
        load, session_id = self.storage.load_session, session.session_id
        token = self.storage.token
        if session.omitted_messages == 0:
            return await load(session_id)
        carried = len(session.messages)
        if not (session.has_history_changes(token) or session.has_unconfirmed_saves(token)):
            return await load(session_id, last=carried)
        touched = session.touched_ids(token)
        last = max(carried, 1)
        for _ in range(2):
            fresh = await load(session_id, last=last)
            if fresh is None or fresh.omitted_messages == 0:
                return fresh
            if touched.issubset(message.message_id for message in fresh.messages):
                return fresh
            back_to_load = fresh.message_count - session.omitted_messages
            if back_to_load <= last or 2 * back_to_load > fresh.message_count:
                # No further back, or most of the history: read it whole at once (found
                # by attack: after others' 20,000 appends, 40,012 messages for 20,009).
                break
            last = back_to_load
        return await load(session_id)

    def _deleted(self, session: ChatSession) -> bool:
        logger.warning(
            "session %s was deleted by another writer; dropped from the cache, not saved",
            session.session_id,
        )
        self._cache.forget(session)
        return False

    async def _remember(self, session: ChatSession) -> None:
        """Caches the session as most recently used, evicting (and saving) beyond the bound.

        Room is made before the session goes in, and nothing is awaited after: the
        caller always gets back an object the cache holds. Other tasks use the cache
        during the saves, so each step looks at it again.
        """
        session_id = session.session_id
        # Known from now on, if only weakly: a cancel during the saves below loses nothing.
        self._cache.track(session)
        # A leaving session is saved again only if it changed since its last save here.
        # Found by attack: one that still looked unsaved after its save (a value whose ==
        # is never True) was saved again and again, and the caller never got its session.
        saved: dict[int, tuple[Any, ...]] = {}
        while True:
            cached = self._cache.get(session_id)
            if cached is not None and cached is not session:
                # Another object of the same session: keep what it holds before replacing it.
                if self._must_save(cached, saved) and await self._saved_before_release(cached):
                    continue
                self._cache.release(cached)
            victim = self._cache.victim(sparing=session)
            if victim is None:
                break
            if self._must_save(victim, saved) and await self._saved_before_release(victim):
                continue
            self._cache.release(victim)
        self._cache.put(session)

    def _must_save(self, leaving: ChatSession, saved: dict[int, tuple[Any, ...]]) -> bool:
        """Whether a session leaving the cache needs a save first: unsaved, and changed
        since it was saved while this room was made (tasks change it meanwhile)."""
        if not self._dirty(leaving):
            return False
        mark = _change_mark(leaving)
        if saved.get(id(leaving)) == mark:
            logger.warning(
                "session %s still differs from what its save stored, unchanged since: it"
                " leaves the cache; whoever holds it saves it",
                leaving.session_id,
            )
            return False
        saved[id(leaving)] = mark
        return True

    async def _saved_before_release(self, victim: ChatSession) -> bool:
        """Saves a session about to leave the cache; False if it may go unsaved.

        A backend failure surfaces (the session stays cached). A session no save can
        ever store (its `messages` list changed directly, say) may go: kept, it would
        fail every caller's eviction from now on. Whoever holds it still gets the
        error from their own save, and `shutdown()` reports it.
        """
        try:
            await self._write(victim)
        except InvalidDataError as exc:
            logger.error(
                "session %s cannot be saved (%s): it leaves the cache unsaved",
                victim.session_id,
                exc,
            )
            return False
        return True

    async def startup(self) -> dict[str, Any]:
        """Recovers after a restart: expiry sweep, expired file records, cache warm-up.

        The warm-up loads the most recently updated active sessions, at most
        `max_cached_sessions` of them and `warm_up_messages` messages in all, so its
        cost grows neither with the store nor with a long history.

        Raises:
            PersistenceError: if the backend fails.
        """
        expired = await self.cleanup_expired_sessions()
        files_deleted = await self.storage.delete_expired_files()
        # What the warm-up reads may change before it is cached: such sessions are left
        # out (found by attack: a delete racing the warm-up returned True, and the
        # deleted session stayed cached; then a copy loaded, saved, archived and evicted
        # meanwhile). Those being deleted or loaded now, and those the cache takes in or
        # lets go of, or the manager deletes or archives, from now on.
        touched = self._cache.watch()
        touched.update(str(key) for key in self._loading.busy())
        try:
            room = self.max_cached_sessions - len(self._cache)
            page = await self.storage.list_sessions(status="active", limit=max(room, 0))
            # A session a caller still holds is that object again, never a second copy.
            held = {s.session_id: s for s in self._cache.held()}
            wanted = self._within_warm_up_budget([s for s in page if s.session_id not in held])
            read = {s.session_id: s for s in await self.storage.load_sessions(list(wanted))}
            # Counted again as read (found by attack: a session that grew by 5,000
            # messages between the listing and the load was cached whole).
            loaded = self._within_warm_up_budget([read[i] for i in wanted if i in read])
        finally:
            self._cache.unwatch(touched)
        touched.update(str(key) for key in self._loading.busy())
        # Each goes to the front, oldest last: the most recently updated is the least
        # likely to be evicted, and sessions already in use stay ahead of them all.
        # Other tasks may have filled the cache meanwhile: only the room left is used.
        warm = [
            held.get(s.session_id) or loaded.get(s.session_id)
            for s in page
            if s.session_id not in touched
        ]
        room = self.max_cached_sessions - len(self._cache)
        self._cache.put_oldest([s for s in warm if s is not None][: max(room, 0)])
        # Per status only: counting messages would scan the whole store.
        by_status = await self.storage.count_sessions()
        result = {
            "backend": self.storage.backend_name,
            "active_sessions": by_status.get("active", 0),
            "expired_sessions": expired,
            "expired_files_deleted": files_deleted,
            "total_sessions": sum(by_status.values()),
            "cached_sessions": len(self._cache),
        }
        logger.info("startup: %s", result)
        return result

    def _within_warm_up_budget(self, sessions: list[ChatSession]) -> dict[str, ChatSession]:
        """Those sessions, by id in order, whose message counts fit `warm_up_messages`."""
        budget = self.warm_up_messages
        fitting = {}
        for session in sessions:
            if session.message_count <= budget:
                budget -= session.message_count
                fitting[session.session_id] = session
        return fitting

    async def create_session(
        self, model: str, metadata: dict[str, Any] | None = None
    ) -> ChatSession:
        """Starts a new session, saved at once when auto-save is on.

        Raises:
            pydantic.ValidationError: if a value cannot be stored faithfully.
            PersistenceError: if the backend fails.
        """
        session = ChatSession.create(model, metadata=metadata)
        await self._remember(session)
        if self.auto_save_enabled:
            await self._write(session)
        logger.debug("created session %s (%s)", session.session_id, model)
        return session

    async def get_session(self, session_id: str, *, last: int | None = None) -> ChatSession | None:
        """Returns the session (from the cache, else the store), or None.

        With `last=N` a session not cached is loaded with its newest N messages only
        (`message_count` the full count); it can be appended to and saved. A cached
        copy is returned as it is, unless it carries fewer than N messages and holds
        no unsaved changes, in which case it is loaded again.

        Raises:
            InvalidDataError: if `last` is negative.
            PersistenceError: if the backend fails.
        """
        lookup_id(session_id, "session_id")
        # Checked here, not only by the load: found by attack, a cached session was
        # returned for `last=-1` and `last="3"` raised a bare TypeError.
        check_last(last)
        if (cached := self._cached_enough(session_id, last)) is not None:
            return cached
        # One load of a session at a time: a second caller gets the first one's object.
        async with self._loading(session_id):
            return await self._get_uncached(session_id, last)

    def _cached_enough(self, session_id: str, last: int | None) -> ChatSession | None:
        """The cached copy, marked used, if it carries what the caller asks for."""
        cached = self._cache.get(session_id)
        if cached is None or self._too_short(cached, last):
            return None
        self._cache.use(session_id)
        return cached

    async def _get_uncached(self, session_id: str, last: int | None) -> ChatSession | None:
        if (cached := self._cached_enough(session_id, last)) is not None:
            return cached
        cached = self._cache.get(session_id)
        # A copy that left the cache while a caller kept it: the same object again, unless
        # the cached copy is newer. Found by attack: a partial copy took the place of the
        # whole one, saved a message, and was asked for the whole again: the old whole
        # copy came back without that message (and so did export_session).
        for released in reversed(self._cache.released(session_id)):
            if (
                released is not cached
                and not self._too_short(released, last)
                and not _older(released, cached)
            ):
                await self._remember(released)
                return released
        loaded = await self.storage.load_session(session_id, last=last)
        if loaded is None:
            if cached is not None and not self._dirty(cached):
                self._cache.forget(cached)
            return None
        # Another object may have been cached while this one was loading (a save).
        if (cached := self._cached_enough(session_id, last)) is not None:
            return cached
        await self._remember(loaded)
        return loaded

    def _too_short(self, session: ChatSession, last: int | None) -> bool:
        """A cached copy missing messages a caller asks for, that can be replaced."""
        carried = len(session.messages)
        wanted = session.message_count if last is None else min(last, session.message_count)
        return session.omitted_messages > 0 and carried < wanted and not self._dirty(session)

    async def save_session(self, session: ChatSession) -> bool:
        """Saves the session now, whatever the auto-save setting, and caches it.

        Conflicts with other writers are resolved (see `auto_save`).

        Returns:
            False if the session was deleted by another writer (it leaves the cache).

        Raises:
            InvalidDataError: if a message belongs to another session, or `messages` was
                changed in a way the model cannot express.
            PersistenceError: if the backend fails.
        """
        _check_session(session)
        return await self._save(session)

    async def _save(self, session: ChatSession) -> bool:
        await self._remember(session)
        return await self._write(session)

    async def delete_session(self, session_id: str) -> bool:
        """Deletes the session and its messages from the store and drops it from the cache.

        Returns:
            False if the store did not hold it.

        Raises:
            PersistenceError: if the backend fails.
        """
        lookup_id(session_id, "session_id")
        # After any load of it in flight, which would cache what it read (found by
        # attack: a get_session racing this one cached the deleted session for good).
        async with self._loading(session_id):
            self._cache.touch(session_id)
            # Copies holding unsaved changes go only once the store has deleted the
            # session (found by attack: a delete that failed or was cancelled had dropped
            # them, and shutdown() then reported everything saved); the others at once,
            # so a cancel that comes after the delete landed leaves none to be served.
            # A cancelled delete's unsaved copy stays: its next save says whether the
            # session is gone.
            for held in [self._cache.get(session_id), *self._cache.released(session_id)]:
                if held is not None and not self._dirty(held):
                    self._cache.forget(held)
            deleted = await self.storage.delete_session(session_id)
            self._cache.forget_id(session_id)
            return deleted

    async def auto_save(self, session: ChatSession) -> bool:
        """Saves the session if auto-save is on; with auto-save off it is not written now,
        but held again (if it left the cache), so that eviction and `shutdown()` save it.

        Only what changed since the last load or save is written. If another writer
        changed the same field, metadata key or message meanwhile, the session is
        reloaded and this manager's changes are applied over it (its values win, logged
        at WARNING) and saved.

        Returns:
            True if the store holds the session's changes; False with auto-save off, or
            if another writer deleted the session (it leaves the cache, logged).

        Raises:
            PersistenceError: if the backend fails.
        """
        _check_session(session)
        if not self.auto_save_enabled:
            # Held again, in case it left the cache: eviction and shutdown() save it.
            await self._remember(session)
            return False
        # Even with nothing to write: the save then asks the store whether the session
        # is still there (found by attack: a clean copy another instance deleted was
        # said saved, and stayed cached).
        return await self._save(session)

    async def archive_session(self, session_id: str) -> bool:
        """Marks the session archived in the store (and in the cache).

        Returns:
            False if there is no such session.

        Raises:
            PersistenceError: if the backend fails.
        """
        lookup_id(session_id, "session_id")
        # After any load of it in flight (found by attack: a get_session racing an
        # archive cached the active copy it had read, after the archive returned).
        async with self._loading(session_id):
            cached = self._cache.get(session_id)
            if cached is None:
                self._cache.touch(session_id)
                return await self._archive_uncached(session_id)
        cached.status = "archived"
        return await self._write(cached)

    async def _archive_uncached(self, session_id: str) -> bool:
        archived = await self.storage.set_status([session_id], "archived")
        if not archived and await self.storage.load_session(session_id, last=0) is None:
            return False
        # Copies that left the cache but are still held follow, as cached ones do.
        for held in self._cache.released(session_id):
            held.note_stored_status(self.storage.token, "archived")
            held.status = "archived"
        return True

    async def cleanup_expired_sessions(self) -> int:
        """Marks active sessions not updated for `expiry_hours` expired, in the store.

        One statement in the database, whatever the size of the store; cached copies
        the store expired follow (one read of the cached ones idle that long, as another
        holder may have used them since). With auto-save on, cached changes are saved
        first so that a session in use is judged by its latest activity.

        Returns:
            How many sessions this sweep expired.

        Raises:
            PersistenceError: if the backend fails.
        """
        if self.auto_save_enabled:
            await self._save_dirty()
        cutoff = utc_now() - timedelta(hours=self.expiry_hours)
        expired = await self.storage.expire_sessions(cutoff)
        token = self.storage.token
        stale = [
            session
            for session in self._cache.held()
            if session.status == "active"
            and (stored := session.stored_updated_at(token)) is not None
            and stored < cutoff
        ]
        if stale:
            await self._follow_expiry(stale, cutoff)
        if expired:
            logger.info("expired %d sessions not updated since %s", expired, cutoff.isoformat())
        return expired

    async def _follow_expiry(self, stale: list[ChatSession], cutoff: datetime) -> None:
        """Marks the cached copies the store now holds expired as expired there."""
        # Found by review: another holder may have used a session since this copy last
        # saw the store, so the store, not the copy's last save, says what was expired.
        token = self.storage.token
        held = await self.storage.load_sessions([session.session_id for session in stale])
        expired = {session.session_id for session in held if session.status == "expired"}
        for session in stale:
            if session.session_id not in expired:
                continue
            # A copy used since keeps its own status, which its next save writes back.
            session.note_stored_status(token, "expired")
            if session.updated_at < cutoff:
                session.status = "expired"

    async def export_session(self, session_id: str, format: str = "json") -> str | None:
        """Renders the session as json, text or markdown; None if there is no such session.

        Raises:
            InvalidDataError: for an unknown format.
            PersistenceError: if the backend fails.
        """
        formats.check_format(format)
        session = await self.get_session(session_id)
        if session is not None and session.omitted_messages:
            # get_session reloads a partial copy whole unless it holds unsaved changes.
            raise InvalidDataError(
                f"session {session_id!r}: the manager holds only its newest"
                f" {len(session.messages)} of {session.message_count} messages (loaded with"
                " last=), with unsaved changes; save it (save_session) to export it whole"
            )
        return None if session is None else formats.render(session, format)

    async def export_to_file(
        self, session_id: str, output_path: str | Path, format: str = "json"
    ) -> bool:
        """Writes the export atomically (temp file + rename); False if there is no such session.

        Raises:
            InvalidDataError: for an unknown format, or a path that is one of the
                store's own files (a SQLite store's database or journals).
            OSError: if the file cannot be written.
            PersistenceError: if the backend fails.
        """
        target = path_argument(output_path, "output_path")
        refuse_own_file(self.storage, target)
        rendered = await self.export_session(session_id, format)
        if rendered is None:
            return False
        await asyncio.to_thread(formats.write_atomically, target, rendered)
        return True

    async def get_statistics(self) -> dict[str, Any]:
        """Counts the store's sessions, messages and files inside the database.

        Raises:
            PersistenceError: if the backend fails.
        """
        counts = await self.storage.count()
        by_status = counts.sessions_by_status
        return {
            "backend": self.storage.backend_name,
            "total_sessions": counts.total_sessions,
            "active_sessions": by_status.get("active", 0),
            "archived_sessions": by_status.get("archived", 0),
            "expired_sessions": by_status.get("expired", 0),
            "total_messages": counts.messages,
            "total_files": counts.files,
            "expired_files": counts.expired_files,
            "cached_sessions": len(self._cache),
            "unsaved_sessions": len(
                {session.session_id for session in self._cache.held() if self._dirty(session)}
            ),
            "auto_save_enabled": self.auto_save_enabled,
            "expiry_hours": self.expiry_hours,
        }

    async def _save_dirty(
        self, sessions: list[ChatSession] | None = None
    ) -> list[tuple[str, Exception]]:
        """Saves the held sessions (or `sessions`) with changes; the failures."""
        failures: list[tuple[str, Exception]] = []
        for session in self._cache.held() if sessions is None else sessions:
            if not self._dirty(session):
                continue
            try:
                await self._write(session)
            except Exception as exc:  # every save is tried; each failure is reported
                logger.error("could not save session %s: %s", session.session_id, exc)
                failures.append((session.session_id, exc))
        return failures

    async def shutdown(self) -> None:
        """Saves every session the manager holds with changes, then empties the cache.

        That is every cached session, and every one that left the cache but is still
        held by a caller. Every save is attempted even when one fails; the sessions that
        failed stay held, so calling `shutdown()` again retries them. What other tasks
        change or hand back while it saves is saved too, for `_LATE_ROUNDS` rounds.

        Raises:
            PersistenceError: after trying them all, if any session could not be saved,
                or was still changed after those rounds.
        """
        failures = await self._save_dirty()
        failed = {session_id for session_id, _ in failures}
        # Other tasks run during the saves: what they changed or handed back meanwhile
        # is saved too, before the cache is emptied (found by attack: an auto_save made
        # during shutdown() was forgotten unsaved). A session that still looks unsaved
        # right after its save (a value whose == is never True) is tried once more, then
        # let go, as eviction lets it go. One still changed after a few rounds (a task
        # that never leaves it alone) is reported, and held for the next shutdown().
        tried: dict[int, tuple[Any, ...]] = {}
        for _ in range(_LATE_ROUNDS):
            late = self._changed_since(tried, failed)
            if not late:
                break
            late_failures = await self._save_dirty(late)
            failures += late_failures
            failed.update(session_id for session_id, _ in late_failures)
        else:
            for session in self._changed_since(tried, failed):
                failures.append(
                    (
                        session.session_id,
                        PersistenceError(
                            f"changed again each time shutdown() saved it ({_LATE_ROUNDS} times)"
                        ),
                    )
                )
                failed.add(session.session_id)
        self._cache.forget_all_but(failed)
        if failures:
            detail = "; ".join(f"{sid}: {exc}" for sid, exc in failures[:5])
            raise PersistenceError(
                f"shutdown: {len(failures)} session(s) could not be saved ({detail})"
            ) from failures[0][1]

    def _changed_since(
        self, tried: dict[int, tuple[Any, ...]], failed: set[str]
    ) -> list[ChatSession]:
        """The held sessions with changes not yet tried again since they were made (each
        try noted by its change mark); none that failed."""
        late = []
        for session in self._cache.held():
            if session.session_id in failed or not self._dirty(session):
                continue
            mark = _change_mark(session)
            if tried.get(id(session)) == mark:
                continue
            tried[id(session)] = mark
            late.append(session)
        return late


def _older(session: ChatSession, than: ChatSession | None) -> bool:
    """Whether `session` was last loaded or saved at an older revision than `than`."""
    if than is None or session.revision is None or than.revision is None:
        return False
    return session.revision < than.revision
