"""Export files whose header, strings or numbers are hostile: one clear, short error."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from persistence import InvalidDataError
from persistence.config import mask_secrets
from persistence.transfer import validate_backup_file, validate_export_file
from persistence.transfer.json_stream import MAX_RECORD_DEPTH

_HEADER = '"format": "persistence-export", "version": 1, "exported_at": "2025-01-01T00:00:00+00:00"'
_EMPTY = '"sessions": [], "file_records": []'
_COUNTS = '"counts": {"sessions": 0, "messages": 0, "files": 0}'


def _file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "export.json"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize("key", ["backend", "counts", "format"])
def test_a_header_value_nested_deep_is_refused_before_the_record_passes(
    tmp_path: Path, key: str
) -> None:
    """Found by attack: a header value nested 20,000 levels (a 39 KB file) took 1 GB in
    the record passes and was accepted; 1,000 levels raised RecursionError."""
    deep = "[" * 20_000 + "]" * 20_000
    fields = {"backend": f'"backend": {deep}', "counts": f'"counts": {deep}'}
    header = _HEADER.replace('"persistence-export"', deep) if key == "format" else _HEADER
    text = "{" + ", ".join([header, fields.get(key, '"backend": null'), _EMPTY]) + "}"
    if key != "counts":
        text = text[:-1] + ", " + _COUNTS + "}"
    tracemalloc.start()
    try:
        with pytest.raises(InvalidDataError, match=f"'{key}': nests deeper than"):
            validate_export_file(_file(tmp_path, text))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50_000_000
    assert MAX_RECORD_DEPTH < 100  # what the refusal keeps below Python's recursion limit


@pytest.mark.parametrize("key", ["format", "version", "exported_at", "counts", "unknown"])
def test_a_huge_header_value_is_quoted_short(tmp_path: Path, key: str) -> None:
    """Found by attack: a 5 MB value was quoted whole in the error line."""
    huge = json.dumps("x" * 1_000_000)
    fields = {
        "format": f'"format": {huge}, "version": 1',
        "version": f'"format": "persistence-export", "version": {huge}',
        "exported_at": f'"format": "persistence-export", "version": 1, "exported_at": {huge}',
    }
    header = fields.get(key, _HEADER)
    extra = {"counts": f'"counts": {{"sessions": {huge}}}', "unknown": f"{huge}: 1, {_COUNTS}"}
    text = "{" + ", ".join([header, _EMPTY, extra.get(key, _COUNTS)]) + "}"
    with pytest.raises(InvalidDataError) as refused:
        validate_export_file(_file(tmp_path, text))
    assert len(str(refused.value)) < 300, str(refused.value)[:300]


def test_a_raw_control_character_in_a_string_is_named(tmp_path: Path) -> None:
    """Found by attack: a TAB inside a string raised a bare json.JSONDecodeError."""
    text = "{" + _HEADER.replace('"persistence-export"', '"persistence\texport"') + "}"
    with pytest.raises(InvalidDataError, match="invalid control character in a string"):
        validate_export_file(_file(tmp_path, text))


@pytest.mark.parametrize(
    "number", ["9" * 4301, "1e99999999999999999999"], ids=["4,301 digits", "an exponent"]
)
def test_a_valid_number_no_store_keeps_is_not_called_corrupt(tmp_path: Path, number: str) -> None:
    """Found by attack: valid JSON numbers past Python's conversions were reported as
    "not valid JSON (truncated or corrupt file)"."""
    session = (
        '{"session_id": "a", "model": "m", "created_at": "2025-01-01T00:00:00+00:00",'
        ' "updated_at": "2025-01-01T00:00:00+00:00", "status": "active",'
        f' "metadata": {{"n": {number}}}, "messages": []}}'
    )
    counts = '"counts": {"sessions": 1, "messages": 0, "files": 0}'
    text = "{" + f'{_HEADER}, "sessions": [{session}], "file_records": [], {counts}' + "}"
    with pytest.raises(InvalidDataError, match="is out of the range any store keeps") as refused:
        validate_export_file(_file(tmp_path, text))
    assert "corrupt" not in str(refused.value)


@pytest.mark.parametrize(
    ("mark", "blanks"), [("", 100_000), ("\ufeff", (1 << 20) - 1)], ids=["100 KiB", "BOM, 1 MiB"]
)
def test_restore_takes_the_leading_blanks_import_takes(
    tmp_path: Path, mark: str, blanks: int
) -> None:
    """Found by attack: 100 KiB of whitespace before the document, which `import`
    skips, made `restore` call the file "not a backup"; then a byte order mark and
    1 MiB less a byte."""
    text = mark + " " * blanks + "{" + ", ".join([_HEADER, _EMPTY, _COUNTS]) + "}"
    path = _file(tmp_path, text)
    assert validate_export_file(path)["sessions"] == 0
    assert validate_backup_file(path) == "json"


@pytest.mark.parametrize("version", ["9" * 4300, "-" + "9" * 4300])
def test_a_huge_version_is_quoted_short(tmp_path: Path, version: str) -> None:
    text = "{" + _HEADER.replace('"version": 1', f'"version": {version}') + "}"
    with pytest.raises(InvalidDataError, match="version") as refused:
        validate_export_file(_file(tmp_path, text))
    assert len(str(refused.value)) < 300


def test_a_bad_escape_is_not_called_a_control_character(tmp_path: Path) -> None:
    text = "{" + _HEADER.replace('"persistence-export"', '"persistence\\xexport"') + "}"
    with pytest.raises(InvalidDataError, match="escape in a string") as refused:
        validate_export_file(_file(tmp_path, text))
    assert "control character" not in str(refused.value)


def test_a_key_twice_in_the_counts_is_refused(tmp_path: Path) -> None:
    """Found by attack: the last of two values was taken."""
    counts = '"counts": {"sessions": 5, "sessions": 0, "messages": 0, "files": 0}'
    text = "{" + ", ".join([_HEADER, _EMPTY, counts]) + "}"
    with pytest.raises(InvalidDataError, match="the key 'sessions' appears twice"):
        validate_export_file(_file(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("x" * 200_000 + " postgresql://u:s3cret@h/db", "x" * 200_000 + " postgresql://u:***@h/db"),
        ("1abc://u:pw@h", "abc://u:***@h"),
        ("see +db.x-1://u:pw@h", "see +db.x-1://u:***@h"),
    ],
    ids=["a long word before", "a digit before the scheme", "signs in the scheme"],
)
def test_urls_are_found_after_long_words_as_before(text: str, masked: str) -> None:
    """Found by attack: the search for a URL's start tried each letter of a long word
    as a scheme's first (an error line of 5 MB was never masked)."""
    assert mask_secrets(text).endswith(masked)
