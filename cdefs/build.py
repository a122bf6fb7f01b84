"""The cffi builder: every header module's declarations in one out-of-line API-mode extension.

``setup.py`` names ``cdefs/build.py:ffibuilder`` in ``cffi_modules``; the result is the
compiled module ``pyvfio_lu._cffi`` exposing ``ffi`` and ``lib``.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING

from cffi import FFI

if TYPE_CHECKING:
    from types import ModuleType

HERE = Path(__file__).resolve().parent
HEADER_MODULES = ("liveupdate", "vfio", "iommufd")

_DEFINE = re.compile(r"^#define\s+(\w+)\s+\S.*$", re.M)


def _load(name: str) -> ModuleType:
    # Loaded by path: setup.py runs this file as a script, not as part of a package.
    spec = importlib.util.spec_from_file_location(f"_pyvfio_lu_cdefs_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None  # a .py path always has both
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def to_cdef(header: str) -> str:
    """The cffi cdef for a header text: each ``#define NAME value`` becomes ``NAME ...``."""
    return _DEFINE.sub(lambda m: f"#define {m.group(1)} ...", header)


def declared_constants(header: str) -> list[str]:
    return _DEFINE.findall(header)


headers = {name: _load(name).HEADER for name in HEADER_MODULES}
helpers = _load("helpers")
batch = _load("batch")

ffibuilder = FFI()
for text in headers.values():
    ffibuilder.cdef(to_cdef(text))
ffibuilder.cdef(helpers.CDEF)
ffibuilder.cdef(batch.CDEF)
ffibuilder.set_source(
    "pyvfio_lu._cffi",
    helpers.SOURCE + "\n".join(headers.values()) + batch.SOURCE,
    extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
