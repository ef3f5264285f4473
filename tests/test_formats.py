"""Export renderers: the JSON document, the markdown and plain-text transcripts."""

from __future__ import annotations

import json
import re
import unicodedata
from datetime import UTC, datetime

import pytest

from persistence import ChatMessage, ChatSession, InvalidDataError
from persistence.formats import one_line, render, render_json, render_markdown, render_text


def _session(*messages: tuple[str, str, datetime]) -> ChatSession:
    created = datetime(2025, 10, 16, 10, 0, 0, tzinfo=UTC)
    session = ChatSession(
        session_id="abc-123", model="gemini-2.5-flash", created_at=created, updated_at=created
    )
    for role, content, at in messages:
        session.messages.append(
            ChatMessage(session_id="abc-123", role=role, content=content, created_at=at)
        )
    session.message_count = len(session.messages)
    return session


def _at(second: int, day: int = 16) -> datetime:
    return datetime(2025, 10, day, 10, 0, second, tzinfo=UTC)


EXAMPLE = _session(("user", "Hello!", _at(1)), ("assistant", "Hi there!", _at(2)))


def test_markdown_matches_the_documented_example() -> None:
    assert render_markdown(EXAMPLE) == (
        "# Chat Session: abc-123\n"
        "\n"
        "**Model:** gemini-2.5-flash\n"
        "**Created:** 2025-10-16 10:00:00\n"
        "**Messages:** 2\n"
        "\n"
        "---\n"
        "\n"
        "### 👤 User (10:00:01)\n"
        "\n"
        "Hello!\n"
        "\n"
        "### 🤖 Assistant (10:00:02)\n"
        "\n"
        "Hi there!\n"
    )


def test_text_matches_the_documented_example() -> None:
    assert render_text(EXAMPLE) == (
        "Chat Session: abc-123\n"
        "Model: gemini-2.5-flash\n"
        "Created: 2025-10-16 10:00:00\n"
        "Messages: 2\n"
        "\n" + "=" * 80 + "\n"
        "\n"
        "[10:00:01] USER:\n"
        "Hello!\n"
        "\n"
        "[10:00:02] ASSISTANT:\n"
        "Hi there!\n"
    )


def test_json_is_the_session_with_its_messages_in_order_and_reads_back() -> None:
    session = ChatSession.create("m", metadata={"k": [1, "two"]})
    for i in range(5):
        session.add_message("user" if i % 2 == 0 else "assistant", f"message {i}", {"i": i})
    document = json.loads(render_json(session))
    assert [m["content"] for m in document["messages"]] == [f"message {i}" for i in range(5)]
    assert document["created_at"].endswith("+00:00")
    assert datetime.fromisoformat(document["updated_at"]) == session.updated_at
    assert ChatSession.model_validate(document) == session


def test_messages_on_another_day_show_their_date() -> None:
    session = _session(("user", "late", _at(5, day=17)))
    assert "### 👤 User (2025-10-17 10:00:05)" in render_markdown(session)
    assert "[2025-10-17 10:00:05] USER:" in render_text(session)


def _markdown_sections(markdown: str) -> list[str]:
    """Splits a transcript at the lines a markdown renderer treats as h1-h3 headings."""
    return re.findall(r"^ {0,3}#{1,3} (.*)$", markdown, flags=re.MULTILINE)


HOSTILE = (
    "Quoting the transcript:\n"
    "### 🤖 Assistant (10:00:09)\n"
    "# Chat Session: forged\n"
    "  ## indented heading\n"
    "> ### inside a quote\n"
    "- ### in a list\n"
    "Setext heading\n"
    "===\n"
    "<!-- unclosed comment\n"
)


def test_markdown_heading_lines_in_a_message_stay_inside_its_section() -> None:
    session = _session(("user", HOSTILE, _at(1)), ("assistant", "Answer", _at(2)))
    markdown = render_markdown(session)
    assert _markdown_sections(markdown) == [
        "Chat Session: abc-123",
        "👤 User (10:00:01)",
        "🤖 Assistant (10:00:02)",
    ]
    assert "\\### 🤖 Assistant (10:00:09)" in markdown
    assert "\\===" in markdown
    assert "\\<!-- unclosed comment" in markdown
    assert "> \\### inside a quote" in markdown


def test_markdown_unclosed_code_fence_is_closed_before_the_next_section() -> None:
    session = _session(
        ("assistant", "```python\nprint('hi')\n### not a heading in code", _at(1)),
        ("user", "thanks", _at(2)),
    )
    markdown = render_markdown(session)
    body = markdown.split("### 🤖 Assistant (10:00:01)\n\n", 1)[1].split("\n### 👤 User")[0]
    assert body == "```python\nprint('hi')\n### not a heading in code\n```\n"


def test_markdown_keeps_balanced_code_fences_and_formatting_as_given() -> None:
    content = "**bold** and a list:\n\n- one\n- two\n\n~~~\n# a comment in code\n~~~\nend"
    session = _session(("assistant", content, _at(1)))
    assert render_markdown(session).endswith("\n" + content + "\n")


def test_text_header_lines_in_a_message_are_indented() -> None:
    forged = "before\n[10:00:09] ASSISTANT:\nI am not a message\n[2025-10-17 10:00:09] USER:"
    session = _session(("user", forged, _at(1)), ("assistant", "real", _at(2)))
    text = render_text(session)
    headers = re.findall(r"^\[[\d :-]+\] [A-Z]+:$", text, flags=re.MULTILINE)
    assert headers == ["[10:00:01] USER:", "[10:00:02] ASSISTANT:"]
    assert "\n  [10:00:09] ASSISTANT:\n" in text


def test_line_breaks_in_content_are_kept() -> None:
    session = _session(("user", "a\r\nb\rc\nd", _at(1)))
    assert "\na\r\nb\rc\nd\n" in render_text(session)
    assert "\na\r\nb\rc\nd\n" in render_markdown(session)


def test_an_id_with_a_newline_cannot_add_a_header_line() -> None:
    session = ChatSession.create("model\n### 🤖 Assistant", session_id="x\n# y")
    markdown = render_markdown(session)
    assert _markdown_sections(markdown) == ["Chat Session: x\\n# y"]


def test_unknown_format_is_refused() -> None:
    with pytest.raises(InvalidDataError, match="format: 'pdf'"):
        render(EXAMPLE, "pdf")


def test_terminal_controls_are_written_visibly_in_transcripts_not_in_json() -> None:
    content = "\x1b[31mred\x1b]0;title\x07\x01\x7f\x9b\tkept\nnext"
    session = _session(("user", content, _at(1)))
    for rendered in (render_text(session), render_markdown(session)):
        assert "\\x1b[31mred\\x1b]0;title\\x07\\x01\\x7f\\x9b\tkept\nnext" in rendered
        assert not any(c in rendered for c in "\x1b\x07\x01\x7f\x9b")
    assert json.loads(render(session, "json"))["messages"][0]["content"] == content


def test_years_before_1000_are_padded_to_four_digits() -> None:
    """Found by review: strftime's year is not zero-padded on glibc (999, not 0999)."""
    early = datetime(999, 12, 31, 23, 59, 59, tzinfo=UTC)
    session = ChatSession(session_id="old", model="m", created_at=early, updated_at=early)
    session.messages.append(
        ChatMessage(session_id="old", role="user", content="hi", created_at=_at(1, 1))
    )
    session.message_count = 1

    assert "**Created:** 0999-12-31 23:59:59\n" in render_markdown(session)
    assert "Created: 0999-12-31 23:59:59\n" in render_text(session)
    later = _session(("user", "hi", datetime(999, 1, 2, 3, 4, 5, tzinfo=UTC)))
    assert "[0999-01-02 03:04:05] USER:" in render_text(later)


def test_no_character_makes_a_one_line_field_two_lines() -> None:
    """Found by attack: U+2028 in a session id made a forged row of `sessions list`
    and `search` for readers that split lines as str.splitlines() does."""
    splitting = [
        hex(code)
        for code in range(0x110000)
        if not 0xD800 <= code <= 0xDFFF and len(one_line(f"a{chr(code)}b").splitlines()) != 1
    ]
    assert splitting == []


def test_no_character_in_a_one_line_field_shows_as_nothing_or_as_a_space() -> None:
    """Found by attack: `victim`, `vic\\u200btim` and `vict\\u2060im` listed as three
    `sessions list` rows reading `victim`, so a delete of what was read took another
    session. Every format character (category Cf) of this Python's Unicode, every space
    but U+0020, and the default-ignorable fillers and selectors are written as escapes."""
    invisible = [
        code
        for code in range(0x110000)
        if unicodedata.category(chr(code)) in ("Cf", "Zs") and code != 0x20
    ] + [0x034F, 0x115F, 0x1160, 0x17B4, 0x180B, 0x3164, 0xFE0F, 0xFFA0, 0xE0000, 0xE0100]
    shown_raw = [hex(code) for code in invisible if chr(code) in one_line(f"a{chr(code)}b")]
    assert shown_raw == []
    assert one_line("vic\u200btim") == "vic\\u200btim"
    assert one_line("tag\U000e0041") == "tag\\U000e0041"
    shown = "caf\u00e9 \u0645\u0631\u062d\u0628\u0627"  # Latin and Arabic letters
    assert one_line(shown) == shown


def test_message_content_keeps_its_joiners_and_marks() -> None:
    """Content is not a name: emoji sequences (ZWJ), Persian words (ZWNJ) and
    right-to-left text (RLM) hold format characters, which print as they are."""
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"
    content = f"family \U0001f468\u200d\U0001f469 {persian} \u200f!"
    session = _session(("user", content, _at(1)))
    assert content in render_text(session) and content in render_markdown(session)
