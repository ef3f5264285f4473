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
    """A JSON object of a message's metadata: a dict that refuses changes."""

    __slots__ = ("_sealed",)
    __setitem__ = __delitem__ = __ior__ = _refuse
    clear = pop = popitem = setdefault = update = _refuse

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Found by attack: `__init__` called again filled the EMPTY every message
        # without metadata shares.
        if getattr(self, "_sealed", False):
            _refuse(self)
        super().__init__(*args, **kwargs)
        self._sealed = True

    @classmethod
    def fromkeys(cls, keys: Iterable[str], value: Any = None) -> FrozenDict:  # type: ignore[override]
        return cls(dict.fromkeys(keys, value))

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenDict:
        return self

    def __reduce__(self) -> tuple[type[FrozenDict], tuple[dict[str, Any]]]:
        return FrozenDict, (dict(self),)


class FrozenList(list[Any]):
    """A JSON array of a message's metadata: a list that refuses changes."""

    __slots__ = ("_sealed",)
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _refuse
    append = extend = insert = pop = remove = clear = sort = reverse = _refuse

    def __init__(self, *args: Any) -> None:
        if getattr(self, "_sealed", False):
            _refuse(self)
        super().__init__(*args)
        self._sealed = True

    def __copy__(self) -> FrozenList:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> FrozenList:
        return self

    def __reduce__(self) -> tuple[type[FrozenList], tuple[list[Any]]]:
        return FrozenList, (list(self),)


# The metadata of most messages: one object serves them all, as nothing changes it.
EMPTY = FrozenDict()
_FROZEN = (FrozenDict, FrozenList)


def freeze(metadata: dict[str, Any]) -> FrozenDict:
    """`metadata` as a FrozenDict, every dict and list in it frozen too: a deep copy,
    except of what is frozen already. Walks iteratively (metadata may nest deeply)."""
    if type(metadata) is FrozenDict:
        return metadata
    if not metadata:
        return EMPTY
    if not any(isinstance(value, dict | list) for value in metadata.values()):
        return FrozenDict(metadata)  # flat, the commonest: one copy
    frozen: FrozenDict = _rebuilt(metadata, FrozenDict, FrozenList, keep=_FROZEN)
    return frozen


def thaw(metadata: dict[str, Any]) -> dict[str, Any]:
    """A plain deep copy of (frozen) metadata, every dict and list in it a plain one
    that may change: to build the metadata given to `edit_message` from a message's."""
    thawed: dict[str, Any] = _rebuilt(metadata, dict, list, keep=())
    return thawed


def _rebuilt(value: Any, as_dict: type, as_list: type, keep: tuple[type, ...]) -> Any:
    """A deep copy of `value` with its dicts made `as_dict` and its lists `as_list`,
    except those whose type is in `keep` (taken as they are), built iteratively."""
    # Each container is built once its children are; `done` maps id() to the copy.
    done: dict[int, Any] = {}

    def copied(child: Any) -> Any:
        if isinstance(child, dict | list) and type(child) not in keep:
            return done[id(child)]
        return child

    stack: list[tuple[Any, bool]] = [(value, False)]
    while stack:
        item, children_done = stack.pop()
        if children_done:
            done[id(item)] = (
                as_dict((key, copied(child)) for key, child in item.items())
                if isinstance(item, dict)
                else as_list(copied(child) for child in item)
            )
            continue
        stack.append((item, True))
        children = item.values() if isinstance(item, dict) else item
        stack.extend(
            (child, False)
            for child in children
            if isinstance(child, dict | list) and type(child) not in keep
        )
    return done[id(value)]


# The plain types' own setters, which the frozen ones refuse to run.
_set_in_dict: Callable[[dict[str, Any], str, Any], None] = dict.__setitem__
_set_in_list: Callable[[list[Any], int, Any], None] = list.__setitem__


def freeze_arrays(value: FrozenDict) -> FrozenDict:
    """`value`, decoded with its objects frozen (object_pairs_hook), with each of its
    arrays frozen in place: this module's own setting of what nothing else may set."""
    stack: list[FrozenDict | FrozenList] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, FrozenDict):
            for key, child in list(item.items()):
                if type(child) is list:
                    child = FrozenList(child)
                    _set_in_dict(item, key, child)
                if type(child) in _FROZEN:
                    stack.append(child)
        else:
            for index, child in enumerate(item):
                if type(child) is list:
                    child = FrozenList(child)
                    _set_in_list(item, index, child)
                if type(child) in _FROZEN:
                    stack.append(child)
    return value
