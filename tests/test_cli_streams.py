"""Standard input and output of `persistence` as a shell gives them: a file read part
way, a pipe whose reader goes away, a closed descriptor. Each command runs in its own
process, with the `persistence` this test imported."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

import persistence

pytestmark = pytest.mark.usefixtures("workdir")

# The tree whose `persistence` the test imports: the child must run the same one.
SOURCE_ROOT = str(Path(persistence.__file__).resolve().parent.parent)


def run(
    *args: str,
    stdin: IO[bytes] | int | None = subprocess.DEVNULL,
    stdout: IO[bytes] | int | None = subprocess.PIPE,
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=SOURCE_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "persistence", *args],
        stdin=stdin,
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def ok(*args: str, stdin: IO[bytes] | None = None) -> str:
    done = run(*args, stdin=stdin if stdin is not None else subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _export(tmp_path: Path, name: str, sessions: int) -> tuple[Path, set[str]]:
    """An export file of a new store of `sessions` demo sessions, and their ids."""
    url = f"sqlite:///{tmp_path / name}.db"
    for _ in range(sessions):
        ok("--url", url, "demo")
    export = tmp_path / f"{name}.json"
    ok("--url", url, "export-all", str(export))
    return export, _session_ids(url)


def _session_ids(url: str) -> set[str]:
    return {row["session_id"] for row in json.loads(ok("--url", url, "sessions", "list", "--json"))}


@pytest.mark.sqlite
def test_import_of_stdin_read_part_way_writes_the_document_it_checked(tmp_path: Path) -> None:
    """Found by attack: the check read stdin from where it stood, the writing from byte 0,
    so a header line the caller had read made a checked import fail half-way (a new store
    left behind), and stdin at the second of two exports wrote the first, unchecked."""
    small, small_ids = _export(tmp_path, "small", 1)
    other, other_ids = _export(tmp_path, "other", 2)

    header = b"# bundle v1\n"
    bundle = tmp_path / "bundle.txt"
    bundle.write_bytes(header + small.read_bytes())
    with open(bundle, "rb") as given:
        given.seek(len(header))  # as `{ read -r header; persistence import -; } < bundle.txt`
        ok("--url", "sqlite:///a.db", "import", "-", stdin=given)
    assert _session_ids("sqlite:///a.db") == small_ids

    both = tmp_path / "both.json"
    both.write_bytes(other.read_bytes() + small.read_bytes())
    with open(both, "rb") as given:
        given.seek(other.stat().st_size)
        ok("--url", "sqlite:///b.db", "import", "-", stdin=given)
    assert _session_ids("sqlite:///b.db") == small_ids

    # At the first of the two: the content after it is refused, and no store is left.
    with open(both, "rb") as given:
        refused = run("--url", "sqlite:///c.db", "import", "-", stdin=given)
    assert refused.returncode == 1, refused.stderr
    assert refused.stderr.startswith("error: standard input: "), refused.stderr
    assert not Path("c.db").exists()
    assert other_ids.isdisjoint(small_ids)


async def _many_sessions(path: Path, count: int) -> None:
    from persistence import ChatSession, SQLiteSessionStorage

    async with SQLiteSessionStorage(path) as storage:
        batch = [ChatSession.create("gemini-2.5-flash") for _ in range(count)]
        for session in batch:
            session.add_message("user", "a message long enough to fill a pipe quickly " * 4)
        assert await storage.insert_sessions(batch)


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store whose listing, search and export are each far beyond a pipe's 64 KiB."""
    path = tmp_path_factory.mktemp("big") / "big.db"
    asyncio.run(_many_sessions(path, 3000))
    return f"sqlite:///{path}"


@pytest.mark.sqlite
@pytest.mark.parametrize("unbuffered", ["1", ""], ids=["PYTHONUNBUFFERED", "buffered"])
@pytest.mark.parametrize(
    "command",
    [
        ["sessions", "list", "--limit", "100000"],
        ["sessions", "list", "--limit", "100000", "--json"],
        ["search", "message", "--limit", "100000"],
        ["search", "message", "--limit", "100000", "--json"],
        ["export-all", "-"],
    ],
    ids=lambda command: " ".join(command[:2]) + (" --json" if "--json" in command else ""),
)
def test_a_reader_that_goes_away_ends_the_command_quietly_with_status_1(
    big_store: str, command: list[str], unbuffered: str
) -> None:
    """Found by attack: `sessions list | head -1` said "error: [Errno 32] Broken pipe";
    with PYTHONUNBUFFERED, `search --json | head -c 100` exited 0, its output cut."""
    env = dict(os.environ, PYTHONPATH=SOURCE_ROOT, PYTHONUNBUFFERED=unbuffered)
    with subprocess.Popen(
        [sys.executable, "-m", "persistence", "--url", big_store, *command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as running:
        assert running.stdout is not None and running.stderr is not None
        assert running.stdout.readline()  # what `head -1` reads, then it exits
        running.stdout.close()
        errors = running.stderr.read().decode()
        status = running.wait(timeout=120)
    assert (status, errors) == (1, "")


@pytest.mark.sqlite
@pytest.mark.parametrize(
    ("command", "closing", "expected"),
    [
        (["sessions", "list"], ">&-", "error: standard output is closed: nowhere to write"),
        (["export-all", "-"], ">&-", "error: standard output is closed: nowhere to write"),
        (["import", "-"], "<&-", "error: standard input is closed: nothing to import"),
    ],
)
def test_a_closed_standard_stream_is_an_error_naming_it(
    big_store: str, tmp_path: Path, command: list[str], closing: str, expected: str
) -> None:
    """Found by attack: `sessions list >&-` printed nothing and exited 0; `export-all - >&-`
    and `import - <&-` said "unexpected AttributeError: 'NoneType' object ..."."""
    url = big_store if command[0] != "import" else f"sqlite:///{tmp_path / 'new.db'}"
    env = dict(os.environ, PYTHONPATH=SOURCE_ROOT)
    shell = ["sh", "-c", f'exec "$0" "$@" {closing}', sys.executable]
    done = subprocess.run(
        [*shell, "-m", "persistence", "--url", url, *command],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert done.stderr.startswith(expected) and len(done.stderr.splitlines()) == 1, done.stderr
    assert not (tmp_path / "new.db").exists()


_HELP_AND_VERSION = pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        [],
        ["stats", "--help"],
        ["sessions"],
        ["sessions", "list", "--help"],
    ],
    ids=lambda args: " ".join(args) or "no arguments",
)


@_HELP_AND_VERSION
def test_help_and_version_on_a_full_disk_are_one_error_line_with_status_1(
    args: list[str],
) -> None:
    """Found by attack: `persistence --help > /dev/full` printed a traceback, where every
    command says "error: [Errno 28] No space left on device" and exits 1."""
    with open("/dev/full", "wb") as full:
        done = run(*args, stdout=full)
    assert (done.returncode, done.stderr) == (1, "error: [Errno 28] No space left on device\n")


@_HELP_AND_VERSION
def test_help_and_version_on_a_closed_output_are_one_error_line_with_status_1(
    args: list[str],
) -> None:
    """Found by attack: click's echo writes nothing to a closed standard output (Python's
    sys.stdout is None), so `persistence --help >&-` printed nothing and exited 0."""
    env = dict(os.environ, PYTHONPATH=SOURCE_ROOT)
    done = subprocess.run(
        ["sh", "-c", 'exec "$0" "$@" >&-', sys.executable, "-m", "persistence", *args],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert (done.returncode, done.stderr) == (
        1,
        "error: standard output is closed: nowhere to write the result (send it to /dev/null)\n",
    )


def _imported_from_a_pipe(given: bytes, before: Callable[[], None] | None, **env: str) -> str:
    """What `import -` of `given` into piped.db says on stderr, failing; `before` runs in
    the child before it starts, `env` is added to its environment."""
    done = subprocess.run(
        [sys.executable, "-m", "persistence", "--url", "sqlite:///piped.db", "import", "-"],
        input=given,
        capture_output=True,
        env=dict(os.environ, PYTHONPATH=SOURCE_ROOT, **env),
        preexec_fn=before,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    return done.stderr.decode()


@pytest.mark.sqlite
def test_import_of_a_pipe_whose_copy_finds_no_room_names_the_temporary_directory(
    tmp_path: Path,
) -> None:
    """Found by attack: with TMPDIR full, `import -` from a pipe printed only
    "error: [Errno 28] No space left on device" (its input is copied there first)."""
    export, _ = _export(tmp_path, "small", 3)
    given = export.read_bytes()
    spool_directory = tmp_path / "tmp"
    spool_directory.mkdir()
    limit = len(given) // 2

    def limited() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    said = _imported_from_a_pipe(given, limited, TMPDIR=str(spool_directory))

    assert said == (
        f"error: cannot copy standard input into a temporary file in {spool_directory}:"
        " File too large (an import reads its input twice, so input from a pipe is copied"
        " first: this process's file size limit, `ulimit -f`, is below the input's size)\n"
    )
    assert not Path("piped.db").exists()
    assert list(spool_directory.iterdir()) == []


@pytest.mark.sqlite
def test_import_of_a_pipe_into_a_full_temporary_directory_names_it(
    tmp_path: Path, full_filesystem: Path
) -> None:
    """Found by attack: `import -` printed only "error: [Errno 28] No space left on
    device"."""
    asyncio.run(_many_sessions(tmp_path / "many.db", 200))  # an export of about 140 KB
    export = tmp_path / "many.json"
    ok("--url", f"sqlite:///{tmp_path / 'many.db'}", "export-all", str(export))

    # SQLite's own temporary files elsewhere.
    said = _imported_from_a_pipe(
        export.read_bytes(), None, TMPDIR=str(full_filesystem), SQLITE_TMPDIR=str(tmp_path)
    )

    assert said == (
        f"error: cannot copy standard input into a temporary file in {full_filesystem}:"
        " No space left on device (an import reads its input twice, so input from a pipe"
        " is copied first: free room there, set TMPDIR to another directory, or give the"
        " file itself)\n"
    )
    assert not Path("piped.db").exists()
