"""A message's metadata refuses every change in place, and is otherwise a dict."""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from collections.abc import Callable
from typing import Any

import pytest

from persistence import ChatMessage, ChatSession, thaw
from persistence.frozen_metadata import EMPTY, FrozenDict, FrozenList, freeze
from persistence.sql.types import frozen_json_loads

METADATA = {"k": 1, "tool_calls": [{"id": "c1", "args": {"x": [1, [2]]}}], "none": None}


def _all_frozen(value: Any) -> bool:
    if isinstance(value, dict):
        return type(value) is FrozenDict and all(map(_all_frozen, value.values()))
    if isinstance(value, list):
        return type(value) is FrozenList and all(map(_all_frozen, value))
    return True


MUTATIONS: list[Callable[[Any], object]] = [
    lambda d: d.__setitem__("k", 2),
    lambda d: d.__delitem__("k"),
    lambda d: d.update(k=2),
    lambda d: d.pop("k"),
    lambda d: d.popitem(),
    lambda d: d.setdefault("new", 1),
    lambda d: d.clear(),
    lambda d: d.__ior__({"k": 2}),
    lambda d: d["tool_calls"].append(1),
    lambda d: d["tool_calls"].extend([1]),
    lambda d: d["tool_calls"].insert(0, 1),
    lambda d: d["tool_calls"].pop(),
    lambda d: d["tool_calls"].remove(d["tool_calls"][0]),
    lambda d: d["tool_calls"].clear(),
    lambda d: d["tool_calls"].sort(),
    lambda d: d["tool_calls"].reverse(),
    lambda d: d["tool_calls"].__setitem__(0, 1),
    lambda d: d["tool_calls"].__delitem__(0),
    lambda d: d["tool_calls"].__iadd__([1]),
    lambda d: d["tool_calls"].__imul__(2),
    lambda d: d["tool_calls"][0]["args"]["x"][1].append(3),
]


@pytest.mark.parametrize("mutate", MUTATIONS)
def test_every_change_in_place_is_refused_and_changes_nothing(
    mutate: Callable[[Any], object],
) -> None:
    message = ChatSession.create("m").add_message("user", "hi", metadata=METADATA)

    with pytest.raises(TypeError, match="edit_message"):
        mutate(message.metadata)

    assert message.metadata == METADATA


@pytest.mark.parametrize(
    "make",
    [
        lambda: ChatSession.create("m").add_message("user", "hi", metadata=METADATA),
        lambda: ChatMessage(session_id="s", role="user", content="hi", metadata=METADATA),
        lambda: ChatMessage.model_validate_json(
            json.dumps({"session_id": "s", "role": "user", "content": "hi", "metadata": METADATA})
        ),
    ],
    ids=["add_message", "constructor", "json"],
)
def test_every_way_of_making_a_message_freezes_a_deep_copy(make: Callable[[], ChatMessage]) -> None:
    message = make()
    assert _all_frozen(message.metadata) and message.metadata == METADATA
    assert message.metadata is not METADATA
    assert message.metadata["tool_calls"] is not METADATA["tool_calls"]


def test_frozen_metadata_is_written_copied_and_compared_as_a_plain_dict() -> None:
    frozen = freeze(METADATA)

    assert json.loads(json.dumps(frozen)) == METADATA
    assert json.dumps(frozen) == json.dumps(METADATA)
    assert copy.copy(frozen) is frozen and copy.deepcopy(frozen) is frozen
    unpickled = pickle.loads(pickle.dumps(frozen))
    assert unpickled == METADATA and _all_frozen(unpickled)
    for plain in (dict(frozen), frozen.copy(), frozen | {}):
        assert type(plain) is dict
        plain["k"] = 2  # a copy is the caller's to change
    assert type(list(frozen["tool_calls"])) is list
    assert frozen["k"] == 1
    assert freeze({}) is EMPTY and freeze(frozen) is frozen


def test_deep_nesting_is_frozen_without_recursion() -> None:
    deep: dict[str, Any] = {}
    inner = deep
    for _ in range(5000):
        inner["a"] = [{}]
        inner = inner["a"][0]
    frozen = freeze(deep)
    for _ in range(5000):
        assert type(frozen["a"]) is FrozenList
        frozen = frozen["a"][0]
    assert frozen == {}


@pytest.mark.parametrize(
    "text",
    [
        "{}",
        '{"k": 1}',
        json.dumps(METADATA),
        '{"x": "[not an array]", "y": [[], [[]]]}',
        '{"a": 1, "a": [2]}',
        ' {"k": [1]} ',
    ],
)
def test_a_stored_metadata_column_reads_frozen_as_json_reads_it(text: str) -> None:
    value = frozen_json_loads(text)
    assert value == json.loads(text) and _all_frozen(value)


@pytest.mark.parametrize("text", ["[1]", "null", '{"a": 1}x', "{", '"{}"'])
def test_a_stored_metadata_column_that_is_not_one_object_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        frozen_json_loads(text)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ChatMessage(session_id="s", role="user", content="hi"),
        lambda: ChatMessage.model_validate({"session_id": "s", "role": "user", "content": "hi"}),
        lambda: ChatSession.create("m").add_message("user", "hi"),
    ],
    ids=["constructor", "validate", "add_message"],
)
def test_a_message_made_without_metadata_has_the_frozen_empty_one(
    make: Callable[[], ChatMessage],
) -> None:
    """Found by attack: defaults skip validators, so the default was a plain dict."""
    message = make()
    assert message.metadata is EMPTY
    with pytest.raises(TypeError):
        message.metadata["k"] = 1


def test_calling_init_again_is_refused_and_the_shared_empty_stays_empty() -> None:
    """Found by attack: `EMPTY.__init__({"k": 1})` gave every message without metadata
    (other sessions', later loads') that key."""
    frozen = freeze(METADATA)
    for value, args in ((EMPTY, ({"k": 1},)), (frozen, ({"k": 2},)), (frozen["tool_calls"], ([],))):
        with pytest.raises(TypeError, match="edit_message"):
            value.__init__(*args)  # type: ignore[misc]
    assert EMPTY == {} and frozen == METADATA
    assert FrozenDict.fromkeys(["a", "b"], 0) == {"a": 0, "b": 0}


def test_thaw_gives_a_plain_deep_copy_that_may_change() -> None:
    thawed = thaw(freeze(METADATA))
    thawed["tool_calls"][0]["args"]["x"][1].append(3)
    assert type(thawed) is dict and type(thawed["tool_calls"]) is list
    assert thawed != METADATA and freeze(METADATA) == METADATA


def test_what_the_second_attack_got_past_is_closed() -> None:
    """Found by attack on the frozen metadata: fromkeys kept a plain list inside;
    dataclasses.asdict (which calls the class) was refused; a FrozenDict made empty
    could be filled by calling __init__ again; thaw of a cycle never ended; a pickle of
    the release before (plain metadata) unpickled changeable."""
    template = freeze({"k": 1}).fromkeys(["tags"], [])
    with pytest.raises(TypeError):
        template["tags"].append("x")

    @dataclasses.dataclass
    class Holder:
        metadata: dict[str, Any]

    assert dataclasses.asdict(Holder(freeze(METADATA))) == {"metadata": METADATA}
    made = FrozenDict({"q": [1]})
    assert _all_frozen(made)
    empty = FrozenDict()
    with pytest.raises(TypeError):
        empty.__init__({"k": 1})  # type: ignore[misc]
    assert empty == {}

    cycle: dict[str, Any] = {}
    cycle["self"] = cycle
    with pytest.raises(ValueError, match="cycle"):
        thaw(cycle)

    message = ChatSession.create("m").add_message("user", "hi", metadata=METADATA)
    state = message.__getstate__()
    state["__dict__"] = {**state["__dict__"], "metadata": copy.deepcopy(METADATA)}
    old = ChatMessage.__new__(ChatMessage)
    old.__setstate__(state)
    assert _all_frozen(old.metadata) and old.metadata == METADATA
