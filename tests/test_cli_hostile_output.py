"""The CLI's output with hostile values in it, and the CLI stopped by a signal."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from persistence import ChatSession, SQLiteSessionStorage
from tests.test_cli_streams import SOURCE_ROOT, _many_sessions, run

pytestmark = pytest.mark.sqlite

OVERRIDE = "user-\u202etxt.exe"  # shows as "user-exe.txt" where a terminal does bidi
CSI = "\x9b2J"  # the 8-bit CSI: "clear the screen" to a terminal that obeys C1 controls


async def _hostile_store(path: Path) -> None:
    async with SQLiteSessionStorage(path) as storage:
        session = ChatSession.create("m", session_id=OVERRIDE, metadata={"note": CSI})
        session.add_message("user", f"pay the invoice {OVERRIDE} {CSI} \u2066isolated\u2069")
        await storage.save_session(session)
        wide = ChatSession.create("m", session_id="team-" + "x" * 150)
        wide.add_message("user", "refund the invoice " + "word " * 40)
        await storage.save_session(wide)


@pytest.fixture
def hostile_url(tmp_path: Path) -> str:
    path = tmp_path / "hostile.db"
    asyncio.run(_hostile_store(path))
    return f"sqlite:///{path}"


_RAW = ("\u202e", "\u2066", "\u2069", "\x9b")


@pytest.mark.parametrize(
    "command",
    [
        ["sessions", "list"],
        ["sessions", "show", OVERRIDE],
        ["search", "invoice"],
        ["export", OVERRIDE, "-f", "text"],
        ["export", OVERRIDE, "-f", "markdown"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_text_outputs_show_bidirectional_and_c1_controls_escaped(
    hostile_url: str, command: list[str]
) -> None:
    """Found by attack: bidirectional controls went raw into every text output."""
    done = run(*command, "--url", hostile_url)
    assert done.returncode == 0, done.stderr
    assert not [raw for raw in _RAW if raw in done.stdout], done.stdout
    assert "\\u202e" in done.stdout


@pytest.mark.parametrize(
    "command",
    [
        ["sessions", "list", "--json"],
        ["sessions", "show", OVERRIDE, "--json"],
        ["search", "invoice", "--json"],
        ["export", OVERRIDE],
        ["export-all", "-"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_json_outputs_escape_what_a_terminal_obeys_and_read_back_exactly(
    hostile_url: str, command: list[str]
) -> None:
    """Found by attack: `--json` printed C1 controls (U+009B, the 8-bit CSI) and DEL raw,
    though the text outputs escaped them."""
    done = run(*command, "--url", hostile_url)
    assert done.returncode == 0, done.stderr
    assert not [raw for raw in _RAW if raw in done.stdout], done.stdout
    assert "\\u009b2J" in done.stdout
    assert OVERRIDE in json.dumps(json.loads(done.stdout), ensure_ascii=False)


def test_search_shows_every_column_beside_a_long_id_on_an_ascii_output(hostile_url: str) -> None:
    """Found by attack: one id of 151 characters gave Role and Content no width in any
    row, and an output that is not UTF-8 failed on the excerpt's ellipsis."""
    env = dict(os.environ, PYTHONPATH=SOURCE_ROOT, PYTHONIOENCODING="ascii", COLUMNS="120")
    done = subprocess.run(
        [sys.executable, "-m", "persistence", "search", "invoice", "--url", hostile_url],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "refund the invoice" in done.stdout and "pay the invoice" in done.stdout
    assert "..." in done.stdout  # the excerpt's end
    assert any("team-" + "x" * 150 in line for line in done.stdout.splitlines())  # one line


@pytest.mark.parametrize(
    ("stop", "status", "said"),
    [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")],
    ids=["SIGINT", "SIGTERM"],
)
def test_a_signal_stops_an_export_cleanly_with_the_shells_status(
    tmp_path: Path, stop: signal.Signals, status: int, said: str
) -> None:
    """Found by attack: SIGTERM (kill, timeout, a service manager) killed `export-all
    FILE` without its clean-up, leaving its temp file, and said nothing; Ctrl-C exited
    with status 1, as any error does."""
    asyncio.run(_many_sessions(tmp_path / "big.db", 20_000))
    out = tmp_path / "out"
    out.mkdir()
    # SIGINT as a terminal's Ctrl-C finds it, whatever this process inherited.
    command = [
        sys.executable,
        "-c",
        "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler);"
        " runpy.run_module('persistence', run_name='__main__', alter_sys=True)",
        "export-all",
        str(out / "all.json"),
        "--url",
        f"sqlite:///{tmp_path / 'big.db'}",
    ]
    env = dict(os.environ, PYTHONPATH=SOURCE_ROOT)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env)
    assert process.stderr is not None
    first = process.stderr.readline()  # its progress: the export is under way
    assert first, "no progress line"
    process.send_signal(stop)
    rest = process.stderr.read()
    assert process.wait(timeout=60) == status, rest
    assert rest.rstrip().endswith(f"error: {said}"), rest
    assert list(out.iterdir()) == []


def test_export_all_to_a_full_standard_output_names_it(hostile_url: str) -> None:
    """Found by attack: it said only "[Errno 28] No space left on device"."""
    with open("/dev/full", "w") as full:
        done = run("export-all", "-", "--url", hostile_url, stdout=full)
    assert done.returncode == 1
    assert (
        done.stderr.strip().splitlines()[-1].startswith("error: cannot write standard output:")
    ), done.stderr


@pytest.mark.parametrize("encoding", ["ascii", "latin-1"])
def test_an_output_that_cannot_encode_a_character_escapes_it_and_never_fails(
    tmp_path: Path, encoding: str
) -> None:
    """Found by attack: on an ASCII or Latin-1 stdout, `sessions delete caf\\u00e9-42`
    deleted the session, then failed printing its summary (status 1 after the work);
    `sessions show`, `search` and `export` of stored text failed. Text shows what it
    cannot encode as backslash escapes; JSON as `\\u` escapes, read back exactly."""
    path = tmp_path / "s.db"
    content = "h\u00e9llo w\u00f6rld \u2603 \U0001f464"

    async def store() -> None:
        async with SQLiteSessionStorage(path) as storage:
            for session_id in ("caf\u00e9-42", "caf\u00e9-43"):
                session = ChatSession.create("m\u00f3del", session_id=session_id)
                session.add_message("user", content)
                await storage.save_session(session)

    asyncio.run(store())
    env = dict(os.environ, PYTHONPATH=SOURCE_ROOT, PYTHONIOENCODING=encoding)

    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "persistence", *args, "--url", f"sqlite:///{path}"],
            capture_output=True,
            env=env,
            timeout=120,
            check=False,
        )

    shown = cli("sessions", "show", "caf\u00e9-42")
    assert shown.returncode == 0, shown.stderr
    assert "\\u2603 \\U0001f464" in shown.stdout.decode(encoding)
    for command in (["search", "w\u00f6rld", "--json"], ["export", "caf\u00e9-42", "-f", "json"]):
        done = cli(*command)
        assert done.returncode == 0, done.stderr
        assert done.stdout.isascii()
        assert content in json.dumps(json.loads(done.stdout), ensure_ascii=False)
    deleted = cli("sessions", "delete", "caf\u00e9-43")
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout.decode(encoding).startswith(
        "Deleted session caf\\xe9-43" if encoding == "ascii" else "Deleted session caf\u00e9-43"
    )


# A command run as `python -m stopped_at_start ...`: SIGTERM comes while the store is
# being set up, raised in code that `exec` runs from a string (as dataclasses make their
# methods at import), or in a finalizer, where Python ignores what it raises.
_STOPPED_AT_START = """
import os, signal, sys
import persistence.cli.output as output
from persistence.cli import main

def terminated_here():
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(10_000_000):
        pass
    raise AssertionError("SIGTERM was not handled")

class Finalized:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1_000_000):
            pass

real_create_storage = output.create_storage
where = sys.argv.pop(1)

def create_storage(*args, **kwargs):
    if where == "exec":
        exec("terminated_here()", {"terminated_here": terminated_here})
    else:
        Finalized()  # its __del__ runs here, and what it raises is ignored
    return real_create_storage(*args, **kwargs)

output.create_storage = create_storage
main()
"""


@pytest.mark.parametrize("where", ["exec", "finalizer"])
def test_sigterm_while_the_store_is_set_up_ends_the_command_as_terminated(
    tmp_path: Path, where: str
) -> None:
    """Found by attack, SIGTERM a few tenths of a second after `python -m persistence`
    started: raised in code `exec` ran, the command said `error: terminated` and then
    died by SIGINT (130, not 143); raised in a callback whose exceptions Python ignores,
    it was lost and the command ran to its end, exit 0."""
    (tmp_path / "stopped_at_start.py").write_text(_STOPPED_AT_START)
    asyncio.run(_hostile_store(tmp_path / "s.db"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SOURCE_ROOT, str(tmp_path)]))
    command = ["-m", "stopped_at_start", where, "sessions", "list"]
    done = subprocess.run(
        [sys.executable, *command, "--url", f"sqlite:///{tmp_path / 's.db'}"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stderr.splitlines()[-1:]) == (143, ["error: terminated"])
    assert done.stdout == ""


def test_summaries_and_error_lines_show_an_ids_invisible_characters(tmp_path: Path) -> None:
    """Found by attack on this round's fixes: `export ID -o FILE` printed its summary
    with the id's line break (a forged line) and U+200B raw; an error line kept U+034F
    (repr() takes it for printable), so `session 'vic\\u034ftim' not found` read as
    `victim`; a tab in an id showed as spaces."""
    path = tmp_path / "s.db"

    async def store() -> None:
        async with SQLiteSessionStorage(path) as storage:
            for session_id in ("vic\u200btim\nDeleted session x", "a\tb"):
                session = ChatSession.create("m", session_id=session_id)
                session.add_message("user", "hi")
                await storage.save_session(session)

    asyncio.run(store())
    url = f"sqlite:///{path}"
    target = tmp_path / "out.md"
    wrote = run(
        "export",
        "vic\u200btim\nDeleted session x",
        "-f",
        "markdown",
        "-o",
        str(target),
        "--url",
        url,
    )
    assert wrote.returncode == 0, wrote.stderr
    assert wrote.stdout.startswith("Wrote the markdown export of session vic\\u200btim\\nDeleted")
    assert len(wrote.stdout.splitlines()) == 1
    missing = run("sessions", "delete", "vic\u034ftim", "--url", url)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: session 'vic\\u034ftim' not found"), missing.stderr
    assert "a\\tb " in run("sessions", "list", "--url", url).stdout


def test_json_of_a_path_that_is_not_utf8_is_written_with_its_escapes(tmp_path: Path) -> None:
    """Found by attack on this round's fixes: `backup DIR --json`, DIR's name not UTF-8,
    wrote the backup, then failed printing its result (a lone surrogate) on a UTF-8
    standard output."""
    asyncio.run(_hostile_store(tmp_path / "s.db"))
    directory = tmp_path / os.fsdecode(b"bk-\xff")
    done = run("backup", str(directory), "--json", "--url", f"sqlite:///{tmp_path / 's.db'}")
    assert done.returncode == 0, done.stderr
    assert "bk-\\udcff" in done.stdout
    [backup] = directory.iterdir()
    assert os.fsencode(json.loads(done.stdout)["path"]) == os.fsencode(backup)
