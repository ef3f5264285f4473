"""Directories the tests make unwritable."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """The directory made unwritable: `chattr +i` as root (whom modes do not stop),
    else mode 0500; skips the test where neither can be done."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield
        finally:
            directory.chmod(0o700)
        return
    chattr = shutil.which("chattr")
    if chattr is None or subprocess.run([chattr, "+i", directory], check=False).returncode:
        pytest.skip("root, and chattr +i is not available here: no unwritable directory")
    try:
        yield
    finally:
        subprocess.run([chattr, "-i", directory], check=True)
