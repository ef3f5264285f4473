"""A message's metadata, frozen: dicts and lists that refuse every change in place.

A `ChatMessage` is an immutable record, and a save writes what `add_message`,
`edit_message`, `rewind` and `pop_message` changed. A stored message's metadata
changed in place was found by no save (comparing every message's metadata on every
save would make a save's cost grow with the history), so the change was silently
dropped: found by attack, `loaded.messages[0].metadata["k"] = 2` then a save returned
True and the store kept the old value. Now such a change raises TypeError at once,
naming the way that works (`edit_message`).

FrozenDict and FrozenList are a dict and a list: equal to plain ones, written as JSON,
BSON and pickles as plain ones are, copied by `dict(...)`, `list(...)`, `.copy()` or
`|` into plain ones that may change, and by `thaw` into a plain deep copy.
`copy.copy` and `copy.deepcopy` give the object itself: nothing in it can change.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NoReturn

REFUSAL = (
    "message metadata cannot be changed in place (a message is an immutable record);"
    " use session.edit_message(message_id, metadata=...) with a new dict"
    " (persistence.thaw(message.metadata) is a copy that may change)"
)


def _refuse(self: object, *args: object, **kwargs: object) -> NoReturn:
    raise TypeError(REFUSAL)


class FrozenDict(dict[str, Any]):
    """A JSON object of a message's metadata: a dict that refuses changes.

    Every FrozenDict is non-empty but EMPTY, so `__init__` refuses any but a new one
    (found by attack: called again, it refilled the EMPTY all messages share), and a
    new one freezes what it is given (`dataclasses.asdict` rebuilds dicts by calling
    their class). The library makes them by `frozen_dict`, without a Python call.
    """

    __slots__ = ("_made",)
    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if self or self is EMPTY or getattr(self, "_made", False):
            _refuse(self)
        _fill_dict(self, freeze(dict(*args, **kwargs)))
        self._made = True

    @classmethod
    def fromkeys(cls, keys: Iterable[str], value: Any = None) -> FrozenDict:  # type: ignore[override]
        # Found by attack: a plain list given as the value stayed plain inside it.
        return freeze(dict.fromkeys(keys, value))

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self

    def __reduce__(self) -> tuple[Callable[..., FrozenDict], tuple[dict[str, Any]]]:
        return frozen_dict, (dict(self),)


class FrozenList(list[Any]):
    """A JSON array of a message's metadata: a list that refuses changes. Every one is
    non-empty but EMPTY_LIST; `__init__` as FrozenDict's."""

    __slots__ = ("_made",)
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __init__(self, items: Iterable[Any] = ()) -> None:
        if self or self is EMPTY_LIST or getattr(self, "_made", False):
            _refuse(self)
        _fill_list(self, _rebuilt(list(items), frozen_dict, frozen_list, keep=_FROZEN))
        self._made = True

    def __copy__(self) -> FrozenList:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenList:
        return self

    def __reduce__(self) -> tuple[Callable[..., FrozenList], tuple[list[Any]]]:
        return frozen_list, (list(self),)


# The plain types' own constructors and setters, which the frozen ones refuse to run:
# called directly they cost no Python frame (a load makes thousands of these).
_new_dict: Callable[[type[FrozenDict]], FrozenDict] = dict.__new__
_fill_dict: Callable[..., None] = dict.__init__
_new_list: Callable[[type[FrozenList]], FrozenList] = list.__new__
_fill_list: Callable[..., None] = list.__init__
_set_in_dict: Callable[[dict[str, Any], str, Any], None] = dict.__setitem__
_set_in_list: Callable[[list[Any], int, Any], None] = list.__setitem__


def frozen_dict(*args: Any, **kwargs: Any) -> FrozenDict:
    """A FrozenDict of what `dict(...)` takes, its values taken as they are (frozen
    already, or frozen after: the JSON decoder's arrays); EMPTY if it is empty."""
    made = _new_dict(FrozenDict)
    _fill_dict(made, *args, **kwargs)
    return made if made else EMPTY


def frozen_list(items: Iterable[Any] = ()) -> FrozenList:
    """A FrozenList of `items`, taken as they are; EMPTY_LIST if there are none."""
    made = _new_list(FrozenList)
    _fill_list(made, items)
    return made if made else EMPTY_LIST


# The metadata of most messages: one object serves them all, as nothing changes it;
# and every empty object or array in metadata.
EMPTY: FrozenDict = _new_dict(FrozenDict)
EMPTY_LIST: FrozenList = _new_list(FrozenList)
_FROZEN = (FrozenDict, FrozenList)


def freeze(metadata: dict[str, Any]) -> FrozenDict:
    """`metadata` as a FrozenDict, every dict and list in it frozen too: a deep copy,
    except of what is frozen already. Walks iteratively (metadata may nest deeply)."""
    if isinstance(metadata, FrozenDict):
        return metadata
    if not metadata:
        return EMPTY
    if not any(isinstance(value, dict | list) for value in metadata.values()):
        return frozen_dict(metadata)  # flat, the commonest: one copy
    frozen: FrozenDict = _rebuilt(metadata, frozen_dict, frozen_list, keep=_FROZEN)
    return frozen


def thaw(metadata: dict[str, Any]) -> dict[str, Any]:
    """A plain deep copy of (frozen) metadata, every dict and list in it a plain one
    that may change: to build the metadata given to `edit_message` from a message's."""
    thawed: dict[str, Any] = _rebuilt(metadata, dict, list, keep=())
    return thawed


def _rebuilt(
    value: Any, as_dict: Callable[..., Any], as_list: Callable[..., Any], keep: tuple[type, ...]
) -> Any:
    """A deep copy of `value` with its dicts made `as_dict` and its lists `as_list`,
    except those whose type is in `keep` (taken as they are), built iteratively."""
    # Each container is built once its children are; `done` maps id() to the copy.
    done: dict[int, Any] = {}

    def copied(child: Any) -> Any:
        if isinstance(child, dict | list) and type(child) not in keep:
            return done[id(child)]
        return child

    # Containers being built: met again among their own descendants, a cycle (found
    # by attack: thaw of a dict holding itself never ended). One met again once built
    # is shared (a child stack entry is done before the next is taken).
    building: set[int] = set()
    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        item, children_done = stack.pop()
        if children_done:
            done[id(item)] = (
                as_dict((key, copied(child)) for key, child in item.items())
                if isinstance(item, dict)
                else as_list(copied(child) for child in item)
            )
            building.discard(id(item))
            continue
        if id(item) in done:
            continue
        if id(item) in building:
            raise ValueError("metadata holds itself (a reference cycle): it is not JSON")
        building.add(id(item))
        stack.append((item, True))
        children = item.values() if isinstance(item, dict) else item
        stack.extend(
            (child, False)
            for child in children
            if isinstance(child, dict | list) and type(child) not in keep
        )
    return done[id(value)]


def freeze_arrays(value: FrozenDict) -> FrozenDict:
    """`value`, decoded with its objects frozen (object_pairs_hook), with each of its
    arrays frozen in place: this module's own setting of what nothing else may set."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        # Values replaced, no key or item added: iterating meanwhile is safe.
        places: Iterable[tuple[Any, Any]]
        set_in: Callable[[Any, Any, Any], None]
        if type(item) is FrozenDict:
            places = item.items()
            set_in = _set_in_dict
        else:
            places = enumerate(item)
            set_in = _set_in_list
        place: Any
        for place, child in places:
            kind = type(child)
            if kind is list:
                child = frozen_list(child)
                set_in(item, place, child)
                stack.append(child)
            elif kind is FrozenDict:
                stack.append(child)
    return value
