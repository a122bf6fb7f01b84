"""The version is written once (``pyvfio_lu.__version__``) and every other place reads it:
the installed package's metadata (setuptools' dynamic ``attr``), ``pyvfio-lu --version`` and
the changelog's heading for it."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyvfio_lu
from pyvfio_lu import cli

REPO = Path(__file__).resolve().parents[2]
VERSION = pyvfio_lu.__version__


def test_version_is_pep440_release():
    assert re.fullmatch(r"\d+\.\d+\.\d+", VERSION), VERSION


def test_metadata_matches_module():
    installed = importlib.metadata.version("pyvfio-lu")
    assert installed == VERSION, (
        f"installed metadata says {installed}, pyvfio_lu.__version__ says {VERSION}: "
        "reinstall (pip install -e .) after changing the version")


def test_pyproject_reads_the_module():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"], "the version belongs in pyvfio_lu/__init__.py only"
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "pyvfio_lu.__version__"}


def test_cli_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"pyvfio-lu {VERSION}\n"


def test_cli_version_as_a_command():
    script = Path(sys.executable).with_name("pyvfio-lu")
    commands = [[sys.executable, "-m", "pyvfio_lu", "--version"]]
    if script.exists():  # the console script of the installed package
        commands.append([str(script), "--version"])
    for cmd in commands:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout
        assert out == f"pyvfio-lu {VERSION}\n", cmd


def test_changelog_has_this_version():
    text = (REPO / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[{re.escape(VERSION)}\]", text, re.M), f"CHANGELOG.md has no section for {VERSION}"
