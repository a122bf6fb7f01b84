"""What a VMM restarted after a kexec imports: ``pyvfio_lu.luo`` and ``pyvfio_lu.vfio`` pull
in no standard-library module beyond the few they use (under an emulated CPU each import
is milliseconds of the guest's blackout; see benchmarks/RESULTS.md)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import pyvfio_lu

# modules the blackout path must not import: heavy, and nothing on it needs them
NOT_ON_THE_PATH = {"enum", "re", "collections", "functools", "importlib", "typing", "typing_extensions",
                   "mmap", "select", "json", "logging", "argparse", "pyroute2", "socket", "subprocess",
                   "dataclasses", "inspect", "pathlib", "tempfile", "threading", "gzip"}


def _new_modules(statement: str) -> set[str]:
    code = f"import sys; before = set(sys.modules); {statement}; print(' '.join(sorted(set(sys.modules) - before)))"
    root = os.path.dirname(os.path.dirname(pyvfio_lu.__file__))
    import _cffi_backend

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.path.dirname(_cffi_backend.__file__)]))
    # -S: no site (a deployed VMM's start; the venv's .pth files import more than the library)
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True, env=env, cwd="/")
    return set(out.stdout.split())


@pytest.mark.parametrize("statement", [
    "import pyvfio_lu.luo",
    "import pyvfio_lu.vfio",
    "from pyvfio_lu.luo import LiveUpdate; from pyvfio_lu.vfio import VfioDevice",
])
def test_the_blackout_path_imports_only_what_it_uses(statement):
    new = _new_modules(statement)
    assert not new & NOT_ON_THE_PATH, sorted(new & NOT_ON_THE_PATH)
    assert {m for m in new if not m.startswith("pyvfio_lu")} <= {
        "__future__", "_cffi_backend", "_collections", "_collections_abc", "_functools", "_operator", "_stat",
        "_struct", "errno", "genericpath", "itertools", "os", "os.path", "posixpath", "stat", "struct", "warnings"}


def test_the_package_alone_imports_nothing_of_the_library():
    new = _new_modules("import pyvfio_lu")
    assert new == {"pyvfio_lu", "__future__"} or new == {"pyvfio_lu"}
