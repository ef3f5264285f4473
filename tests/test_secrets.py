"""A password with every reserved URL character never reaches any output.

Tried percent-encoded (as it must be written) and typed raw (which is refused, without
repeating it): masking, reprs, config errors, log lines of every logger at -v and -vv,
`stats --json`, backup, migrate and export summaries, and one-line errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
import typer
from sqlalchemy import make_url
from typer.testing import CliRunner

from persistence import ConfigError, InvalidDataError, PersistenceError, PostgreSQLSessionStorage
from persistence.cli import app
from persistence.cli.output import fail
from persistence.config import StorageConfig, config_from_url, load_config, mask_secrets, mask_url
from persistence.config.masking import MaskingFormatter

# An empty current directory and no STORAGE_* variable or config file: a fresh machine.
pytestmark = pytest.mark.usefixtures("workdir")

# Pieces joined by every character that ends or splits a URL's parts.
PIECES = ("Zq7", "Kx9", "Wm4", "Tr2", "Yp5", "Ab6", "Cd8")
PASSWORD = "Zq7@Kx9/Wm4?Tr2#Yp5:Ab6%Cd8"
ENCODED = quote(PASSWORD, safe="")
RAW_URLS = [
    f"postgresql://u:{PASSWORD}@db.example:5432/app",
    f"postgres://u:{PASSWORD}@db.example/app",
    f"mongodb://u:{PASSWORD}@h1.example,h2.example/app?replicaSet=rs",
    f"mongodb+srv://u:{PASSWORD}@cluster.example/",
    "postgresql://u:p@ss/w?rd#x@db.example/app",
]
ENCODED_URLS = [
    f"postgresql://u:{ENCODED}@db.example:5432/app",
    f"postgresql+asyncpg://u:{ENCODED}@db.example/app?password={ENCODED}&sslmode=require",
    f"postgresql://u@db.example/app?password={ENCODED}",
    f"mongodb://u:{ENCODED}@h1.example,h2.example/app?tlsCertificateKeyFilePassword={ENCODED}",
    f"mongodb+srv://u:{ENCODED}@cluster.example/",
    # The parameter's name percent-encoded: the driver decodes it to `password`.
    f"postgresql://u@db.example/app?pass%77ord={ENCODED}",
    f"postgresql://u@db.example/app?pass%77ord={ENCODED}&sslmode=require",
]


def assert_hidden(text: str, pieces: tuple[str, ...] = PIECES) -> None:
    for piece in pieces:
        assert piece not in text, f"password fragment {piece!r} in: {text[-600:]}"


@pytest.mark.parametrize("url", RAW_URLS + ENCODED_URLS)
def test_mask_url_and_mask_secrets_hide_every_fragment(url: str) -> None:
    pieces = ("p@ss", "w?rd", "rd#x") if "p@ss" in url else PIECES
    assert_hidden(mask_url(url), pieces)
    assert_hidden(mask_secrets(f"error: cannot reach {url} (timeout)"), pieces)
    assert_hidden(mask_secrets(f"config: StorageConfig(connection_string='{url}')"), pieces)
    assert "db.example" in mask_url(url) or "example" in mask_url(url)


def test_masking_keeps_what_is_not_a_secret() -> None:
    assert mask_url(f"postgresql://app:{ENCODED}@db:5432/chat?sslmode=require") == (
        "postgresql://app:***@db:5432/chat?sslmode=require"
    )
    assert mask_url("postgresql://app@db/chat") == "postgresql://app@db/chat"
    assert mask_url("sqlite:///srv/a@b.db") == "sqlite:///srv/a@b.db"
    # The raw password's @, / and ? are inside the user info: up to the LAST @.
    assert mask_url("postgresql://u:p@ss/w?rd#x@host/db") == "postgresql://u:***@host/db"


# Characters a URL in free text used to end at: typed raw in a password, allowed.
SPACED_PASSWORDS = ["Sec ret1", "Sec'ret1", 'Sec"ret1', "Sec`ret1", "Sec \t'\"`ret1"]


@pytest.mark.parametrize("password", SPACED_PASSWORDS)
def test_a_raw_password_with_a_space_quote_or_backtick_is_masked_whole(password: str) -> None:
    url = f"postgresql://app:{password}@db.example:5432/app"
    for text in (
        mask_url(url),
        mask_secrets(f"error: cannot reach {url} (timeout)"),
        mask_secrets(f"got {url!r}; and more"),
        mask_secrets(shlex.join(["persistence", "--url", url, "stats"])),
        mask_secrets(f"run `{url}`"),
    ):
        assert_hidden(text, ("Sec", "ret1"))
        assert "app:***@db.example:5432/app" in text


def test_masking_free_text_stops_at_the_line_and_at_the_next_url() -> None:
    assert mask_secrets("copy postgresql://a:p 1@h1/db to postgresql://b:p2@h2/db, done") == (
        "copy postgresql://a:***@h1/db to postgresql://b:***@h2/db, done"
    )
    assert mask_secrets("postgresql://a:p1@h1/db,postgresql://b:p 2@h2/db") == (
        "postgresql://a:***@h1/db,postgresql://b:***@h2/db"
    )
    assert mask_secrets("at postgresql://h/db\nmail ops@example.com") == (
        "at postgresql://h/db\nmail ops@example.com"
    )
    assert mask_secrets("sqlite:///a.db to postgresql://u:p w@h/db") == (
        "sqlite:///a.db to postgresql://u:***@h/db"
    )


@pytest.mark.parametrize("password", SPACED_PASSWORDS)
def test_an_error_line_quoting_a_raw_password_with_a_space_masks_it(
    password: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(typer.Exit):
        fail(f"cannot reach 'postgresql://app:{password}@db.example/app' (timeout)")
    error = capsys.readouterr().err
    assert_hidden(error, ("Sec", "ret1"))
    assert "app:***@db.example/app" in error


@pytest.mark.postgresql
@pytest.mark.parametrize("password", SPACED_PASSWORDS[:4])
def test_demo_with_a_raw_password_holding_a_space_or_quote_prints_it_masked(
    postgresql_url: str, password: str
) -> None:
    # Trust authentication: the server takes any password for this user.
    template = make_url(postgresql_url).set(password="PLACEHOLDER")
    url = template.render_as_string(hide_password=False).replace("PLACEHOLDER", password)
    for level in ([], ["-vv"]):
        code, text = _run(["--url", url, "demo", *level])
        assert code == 0, text
        assert_hidden(text, ("Sec", "ret1"))
        masked = url.replace(password, "***")
        assert f"persistence --url {shlex.quote(masked)} sessions list" in text


@pytest.mark.parametrize("url", RAW_URLS)
def test_a_raw_reserved_character_is_refused_without_repeating_the_password(url: str) -> None:
    with pytest.raises(ConfigError, match=r"connection_string.*percent-encode") as caught:
        StorageConfig(connection_string=url)
    assert_hidden(str(caught.value), ("p@ss", "w?rd", *PIECES))
    with pytest.raises(ConfigError) as caught:
        config_from_url(url)
    assert_hidden(str(caught.value), ("p@ss", "w?rd", *PIECES))


def test_a_raw_password_in_a_read_replica_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"read_replicas.*item 1.*percent-encode") as caught:
        StorageConfig(connection_string=ENCODED_URLS[0], read_replicas=[RAW_URLS[0]])
    assert_hidden(str(caught.value))


@pytest.mark.parametrize("url", ENCODED_URLS)
def test_configs_reprs_and_display_urls_hide_the_password(url: str) -> None:
    config = StorageConfig(connection_string=url)
    for text in (repr(config), str(config), config.display_url, repr(config.model_dump())):
        assert_hidden(text)


def test_postgresql_storage_repr_hides_passwords_of_primary_replicas_and_query() -> None:
    storage = PostgreSQLSessionStorage(ENCODED_URLS[1], read_replicas=[ENCODED_URLS[0]])
    assert_hidden(repr(storage))
    assert "db.example" in repr(storage)
    with pytest.raises(InvalidDataError, match="percent-encode") as caught:
        PostgreSQLSessionStorage(RAW_URLS[0])
    assert_hidden(str(caught.value))


def test_mongodb_storage_repr_and_bad_url_errors_hide_the_password() -> None:
    backend = pytest.importorskip("persistence.mongo.backend")
    storage = backend.MongoDBSessionStorage(ENCODED_URLS[3])
    assert_hidden(repr(storage))
    for url in (
        f"mongodb://u:{PASSWORD}@h.example/app",  # raw: the driver refuses it
        f"mongodb://u:{ENCODED}@h.example/app?noSuchOption=1",
        f"mongodb://u:{ENCODED}@h.example/app?w=notanumber&password={ENCODED}",
    ):
        with pytest.raises(Exception) as caught:
            backend.MongoDBSessionStorage(url)
        assert_hidden(f"{caught.value} {caught.value!r}")
        assert "***@cret" not in str(caught.value)


def test_the_masking_formatter_masks_every_logger_and_tracebacks() -> None:
    formatter = MaskingFormatter("%(name)s: %(message)s")
    try:
        raise RuntimeError(f"connect to {ENCODED_URLS[0]} failed")
    except RuntimeError:
        record = logging.LogRecord(
            "sqlalchemy.engine",
            logging.WARNING,
            __file__,
            1,
            "url %s",
            (RAW_URLS[0],),
            sys.exc_info(),
        )
    assert_hidden(formatter.format(record))


def _run(args: list[str], env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, args, env=env)
    text = result.output + (result.stderr if result.stderr_bytes is not None else "")
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        text += repr(result.exception)
    return result.exit_code, text


def test_a_raw_password_on_the_command_line_is_one_masked_error_line() -> None:
    for url in RAW_URLS:
        code, text = _run(["stats", "--url", url, "-vv"])
        assert code == 1, text
        assert "percent-encode" in text
        assert_hidden(text, ("p@ss", "w?rd", *PIECES))
    code, text = _run(["migrate", "--to", RAW_URLS[0]])
    assert code == 1
    assert_hidden(text)


@pytest.mark.parametrize("url", [RAW_URLS[0], ENCODED_URLS[0]], ids=["raw", "encoded"])
@pytest.mark.parametrize(
    ("args", "problem"),
    [
        (["stats", "{url}"], "Got unexpected extra argument(s) ({masked})"),
        (["--url=", "{url}", "stats"], "No such command '{masked}'."),
        (["migrate", "--to", "sqlite:///x.db", "{url}"], "unexpected extra argument(s) ({masked})"),
        (["sessions", "list", "--status", "{url}"], "'{masked}' is not one of 'active',"),
        (["export", "x", "--format", "{url}"], "'{masked}' is not one of 'json',"),
    ],
    ids=["extra-argument", "as-command", "migrate-extra", "status", "format"],
)
def test_a_usage_error_repeats_a_url_with_its_password_masked(
    args: list[str], problem: str, url: str
) -> None:
    """Found by attack: click's own usage errors repeated the words typed, password
    and all (`persistence stats postgresql://app:secret@db/app`)."""
    code, text = _run([arg.format(url=url) for arg in args], env={"COLUMNS": "300", "TERM": "dumb"})
    assert code == 2, text
    assert_hidden(text)
    assert problem.format(masked=mask_url(url)) in text, text
    assert "Usage: persistence" in text


# Secrets free text cannot cut out as a URL's: libpq key=value strings, and raw
# passwords holding `x://` after a separator (which could start a second URL).
TYPED_SECRETS = [
    "host=db.example user=u password=Zq7Kx9 dbname=app",
    "host=db.example password='Zq7 Kx9' dbname=app",
    "postgresql://u:Zq7,x://Kx9@db.example/app",
    "postgresql://u:Zq7 x://Kx9@db.example/app",
    "postgresql://u:Zq7'x://Kx9@db.example/app",
    "postgresql://u:Zq7=x://Kx9@db.example/app",
    "postgresql://u:Zq7@Kx9,x://Wm4@db.example/app",
]


@pytest.mark.parametrize("secret", TYPED_SECRETS)
@pytest.mark.parametrize(
    "args",
    [
        ["stats", "{secret}"],
        ["--url=", "{secret}", "stats"],
        ["migrate", "--to", "sqlite:///x.db", "{secret}"],
        ["sessions", "list", "--status", "{secret}"],
        ["export", "x", "--format", "{secret}"],
    ],
    ids=["extra-argument", "as-command", "migrate-extra", "status", "format"],
)
def test_a_usage_error_repeats_no_libpq_password_nor_one_holding_a_scheme(
    args: list[str], secret: str
) -> None:
    """Found by attack: usage errors repeated `password=s3cret` of a libpq string, and a
    raw password holding `,x://` (masking took it for a second URL)."""
    typed = [arg.format(secret=secret) for arg in args]
    code, text = _run(typed, env={"COLUMNS": "300", "TERM": "dumb"})
    assert code == 2, text
    assert_hidden(text, ("Zq7", "Kx9", "Wm4"))
    assert "Usage: persistence" in text
    assert ("password=***" if "host=" in secret else "postgresql://u:***@db.example/app") in text


def test_free_text_masks_libpq_passwords_and_raw_ones_holding_a_scheme() -> None:
    assert mask_secrets("could not use host=db password=Zq7 dbname=app; sslpassword = 'a b'") == (
        "could not use host=db password=*** dbname=app; sslpassword = ***"
    )
    for secret in TYPED_SECRETS[2:6]:
        assert mask_secrets(f"cannot reach {secret} (timeout)") == (
            "cannot reach postgresql://u:***@db.example/app (timeout)"
        )
    # What is not a secret stays: a URL's query, and a port before the next URL.
    assert mask_secrets("postgresql://h/db?password=x&sslmode=require") == (
        "postgresql://h/db?password=***&sslmode=require"
    )
    assert mask_secrets("copy postgresql://h:5432/db, to postgresql://u:p@h2/db") == (
        "copy postgresql://h:5432/db, to postgresql://u:***@h2/db"
    )


@pytest.mark.postgresql
def test_every_command_and_log_level_hides_an_encoded_password(
    postgresql_url: str, tmp_path: Path
) -> None:
    # Trust authentication: the server takes any password for this user.
    url = make_url(postgresql_url).set(password=PASSWORD).render_as_string(hide_password=False)
    assert ENCODED in url
    for level in ([], ["-v"], ["-vv"]):
        commands = [
            ["upgrade", "--url", url],
            ["demo", "--url", url],
            ["stats", "--json", "--url", url],
            ["stats", "--url", url],
            ["sessions", "list", "--url", url],
            ["export-all", str(tmp_path / f"all{len(level)}.json"), "--url", url],
            ["backup", str(tmp_path / f"backups{len(level)}"), "--url", url],
            ["migrate", "--from", url, "--to", f"sqlite:///{tmp_path / f'c{len(level)}.db'}"],
            ["migrate", "--to", url, "--url", f"sqlite:///{tmp_path / f'c{len(level)}.db'}"],
            ["cleanup", "--url", url],
        ]
        for args in commands:
            code, text = _run([*args, *level])
            assert code == 0, (args, text[-800:])
            assert_hidden(text)
        code, text = _run(["sessions", "show", "nothing-here", "--url", url, *level])
        assert code == 1
        assert_hidden(text)
    code, text = _run(["stats", "--json", "--url", url])
    assert json.loads(text)["database"].startswith("postgresql://postgres:***@")
    # The commands that change sessions name the store they changed, masked.
    code, text = _run(["cleanup", "--url", url])
    assert f"session(s) of {mask_url(url)} not updated" in text, text
    code, text = _run(["sessions", "delete", "nothing-here", "--url", url])
    assert code == 1 and f"not found in {mask_url(url)}: nothing deleted" in text, text
    # The same store through a config file and through the environment.
    config = tmp_path / "persistence.yaml"
    config.write_text(f"storage:\n  connection_string: '{url}'\n", encoding="utf-8")
    code, text = _run(["stats", "--json", "--config", str(config), "-vv"])
    assert code == 0, text
    assert_hidden(text)
    code, text = _run(["stats", "-vv"], env={"STORAGE_CONNECTION_STRING": url})
    assert code == 0, text
    assert_hidden(text)


@pytest.mark.postgresql
def test_a_password_expanded_from_the_environment_connects_and_stays_hidden(
    postgresql_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = make_url(postgresql_url)
    template = parsed.set(password="PLACEHOLDER").render_as_string(hide_password=False)
    template = template.replace("PLACEHOLDER", "${DB_PASSWORD}")
    config = tmp_path / "persistence.yaml"
    config.write_text(f"storage:\n  connection_string: '{template}'\n", encoding="utf-8")
    monkeypatch.setenv("DB_PASSWORD", PASSWORD)  # as it is: the expansion encodes it
    loaded = load_config(config)
    assert loaded.connection_string is not None
    assert ENCODED in loaded.connection_string.get_secret_value()
    code, text = _run(["stats", "--json", "--config", str(config), "-vv"])
    assert code == 0, text
    assert_hidden(text)


@pytest.mark.parametrize("setting", ["STORAGE_CONNECTION_STRING", "STORAGE_READ_REPLICAS"])
def test_a_raw_ampersand_in_a_password_parameter_is_not_repeated_by_the_error(
    monkeypatch: pytest.MonkeyPatch, setting: str
) -> None:
    monkeypatch.setenv("STORAGE_CONNECTION_STRING", "postgresql://u@db.example/app")
    monkeypatch.setenv(setting, "postgresql://u@db.example/app?password=Zq7&Kx9")
    with pytest.raises(ConfigError) as raised:
        load_config()
    assert "follows a password parameter" in str(raised.value)
    assert_hidden(str(raised.value), ("Zq7", "Kx9"))


@pytest.mark.parametrize(
    "args",
    [
        ["--config", "{url}", "stats"],
        ["restore", "{url}"],
        ["import", "{url}"],
        ["export-all", "{url}"],
        ["backup", "{url}"],
        ["export", "some-id", "--output", "{url}"],
    ],
)
def test_a_url_where_a_file_path_goes_is_refused_naming_only_its_scheme(
    args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by attack: pathlib made "://" ":/", which masking does not take for a URL,
    so the errors printed the password, and `backup` made directories named with it."""
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    url = "postgresql://app:Sup3rS3cret@db.example/app"
    code, text = _run([arg.format(url=url) for arg in args])
    assert code == 2, text
    assert "this is a postgresql: URL" in " ".join(text.replace("│", " ").split())
    assert "Sup3rS3cret" not in text
    assert list(here.iterdir()) == []


def test_a_url_in_persistence_config_is_refused_naming_only_its_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    url = "postgresql://app:Sup3rS3cret@db.example/app"
    code, text = _run(["stats"], env={"PERSISTENCE_CONFIG": url})
    text = " ".join(text.split())
    assert code == 1, text
    assert "$PERSISTENCE_CONFIG names a config file, and this is a postgresql: URL" in text
    assert "Sup3rS3cret" not in text
    with pytest.raises(ConfigError, match="--config names a config file") as raised:
        load_config("mongodb+srv://app:Sup3rS3cret@cluster.example/app")
    assert "Sup3rS3cret" not in str(raised.value)


@pytest.mark.postgresql
def test_errors_reprs_and_alembic_show_the_url_as_given_with_the_password_masked(
    postgresql_admin_url: str,
) -> None:
    """Found by attack: messages showed the driver's URL, libpq's parameters rewritten
    (`options=` as `dsn=postgresql%3A%2F%2F%3Foptions...`, `sslmode` as `ssl`)."""
    import subprocess

    base = make_url(postgresql_admin_url).set(database="persistence_no_such_database")
    host = base.set(password=None).render_as_string(hide_password=False)
    given = f"{host}?password={ENCODED}&options=-c%20search_path%3Dpublic&sslmode=disable"
    shown = f"{host}?password=***&options=-c%20search_path%3Dpublic&sslmode=disable"
    replica = f"postgresql://u:{ENCODED}@db.example/app?sslmode=require&options=-cx%3Dy"
    storage = PostgreSQLSessionStorage(given, read_replicas=[replica])
    assert repr(storage) == (
        f"PostgreSQLSessionStorage({shown!r},"
        " read_replicas=['postgresql://u:***@db.example/app?sslmode=require&options=-cx%3Dy'])"
    )
    failed = PostgreSQLSessionStorage(given)

    async def initialize() -> None:
        try:
            await failed.initialize()
        finally:
            await failed.close()

    with pytest.raises(PersistenceError) as caught:
        asyncio.run(initialize())
    assert f"of {shown} failed" in str(caught.value)
    code, text = _run(["stats", "--url", given])
    assert code == 1 and f"open {shown} failed" in text, text
    done = subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={given}", "current"],
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.stdout.startswith(f"FAILED: {shown}: "), done.stdout
    for said in (repr(storage), str(caught.value), text, done.stdout + done.stderr):
        assert_hidden(said)
