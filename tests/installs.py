"""A fresh virtual environment with this checkout installed as a user would install it.

The project is built from a copy of the checkout in a temp directory, so the build
leaves nothing (no `build/`, no `*.egg-info`) in the checkout. Its dependencies are
lent by the environment running the tests, whatever it is (a virtualenv, or a base
interpreter): a `.pth` file lists that environment's site-packages after the new
environment's own, so `persistence` itself is only the fresh install.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_NOT_SOURCES = shutil.ignore_patterns(
    ".git",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".venv",
    "*.db",
    "*.db-*",
)


def clean_environment() -> dict[str, str]:
    """os.environ without PYTHONPATH (which would put the checkout first) or STORAGE_*."""
    return {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "PERSISTENCE_CONFIG") and not k.upper().startswith("STORAGE_")
    }


def _lent_site_packages() -> list[str]:
    paths = [*site.getsitepackages(), sysconfig.get_paths()["purelib"]]
    if site.ENABLE_USER_SITE:
        paths.append(site.getusersitepackages())
    return list(dict.fromkeys(p for p in paths if Path(p).is_dir()))


def fresh_install(tmp_path: Path) -> Path:
    """Creates tmp_path/venv with this project installed; returns the venv's directory."""
    env = clean_environment()
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCES)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    ).stdout.strip()
    Path(purelib, "zz_lent_dependencies.pth").write_text(
        "".join(f"{path}\n" for path in _lent_site_packages()), encoding="utf-8"
    )
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(source)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
        env=env,
    )
    return venv
