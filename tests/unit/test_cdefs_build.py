"""cdefs/build.py: the cffi cdef is derived from our own C text, and that text stands alone."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from cffi import FFI

MODULES = ("liveupdate", "vfio", "iommufd")


def test_build_covers_the_three_header_modules(cdefs_build):
    assert tuple(cdefs_build.HEADER_MODULES) == MODULES
    assert set(cdefs_build.headers) == set(MODULES)


def test_to_cdef_replaces_each_define_value_with_dots(cdefs_build):
    text = "#define A 0x10\n#define B_C (1 << 3)\n#define D _IO(X, Y + 2)\n"
    assert cdefs_build.to_cdef(text) == "#define A ...\n#define B_C ...\n#define D ...\n"


def test_to_cdef_leaves_structs_and_other_lines_verbatim(cdefs_build):
    text = "struct s {\n    uint32_t argsz;\n    uint8_t data[];\n};\n#define N 1\n/* note */\n"
    assert cdefs_build.to_cdef(text) == text.replace("#define N 1", "#define N ...")


def test_declared_constants_lists_every_define_in_order(cdefs_build):
    assert cdefs_build.declared_constants("#define A 1\nint x;\n#define B (A + 1)\n") == ["A", "B"]


@pytest.mark.parametrize("module", MODULES)
def test_every_define_of_a_header_becomes_dots(cdefs_build, module):
    cdef = cdefs_build.to_cdef(cdefs_build.headers[module])
    defines = re.findall(r"^#define\s+(\w+)\s+(.*)$", cdef, re.M)
    assert defines and all(value == "..." for _, value in defines)
    assert [name for name, _ in defines] == cdefs_build.declared_constants(cdefs_build.headers[module])


@pytest.mark.parametrize("module", MODULES)
def test_every_non_define_line_of_a_header_is_kept(cdefs_build, module):
    header = cdefs_build.headers[module]
    keep = [line for line in header.splitlines() if not line.startswith("#define")]
    assert [line for line in cdefs_build.to_cdef(header).splitlines() if not line.startswith("#define")] == keep


@pytest.mark.parametrize("module", MODULES)
def test_header_needs_no_kernel_header(cdefs_build, module):
    assert "#include" not in cdefs_build.headers[module]
    assert "__u32" not in cdefs_build.headers[module] and "__user" not in cdefs_build.headers[module]


@pytest.mark.parametrize("module", MODULES)
def test_cdef_is_accepted_by_cffi(cdefs_build, module):
    FFI().cdef(cdefs_build.to_cdef(cdefs_build.headers[module]))


@pytest.fixture(scope="module")
def gcc():
    path = shutil.which("gcc")
    if path is None:
        pytest.skip("needs gcc")
    return path


@pytest.mark.parametrize("module", MODULES)
def test_header_compiles_standalone_with_gcc(cdefs_build, gcc, module, tmp_path):
    src = tmp_path / f"{module}.c"
    src.write_text("#include <stdint.h>\n#include <sys/ioctl.h>\n" + cdefs_build.headers[module])
    proc = subprocess.run([gcc, "-std=gnu11", "-fsyntax-only", "-Wall", "-Werror", str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_all_headers_compile_together_with_the_helpers(cdefs_build, gcc, tmp_path):
    """What the extension compiles: the helper source, then every HEADER, in one unit."""
    src = tmp_path / "all.c"
    src.write_text(cdefs_build.helpers.SOURCE + "\n".join(cdefs_build.headers.values()))
    proc = subprocess.run([gcc, "-std=gnu11", "-fsyntax-only", "-Wall", "-Wno-unused-function", "-Werror", str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_the_extension_stub_declares_exactly_its_functions_and_int_constants():
    """pyvfio_lu/_cffi.pyi (what type checkers see) against the built extension: the same
    helper functions, and every other attribute of ``lib`` an int (its ``__getattr__``)."""
    import ast
    from pathlib import Path

    import pyvfio_lu
    from pyvfio_lu._cffi import lib

    stub = ast.parse((Path(pyvfio_lu.__file__).parent / "_cffi.pyi").read_text())
    lib_class = next(n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "_Lib")
    declared = {f.name for f in lib_class.body if isinstance(f, ast.FunctionDef)} - {"__getattr__"}
    functions = {name for name in dir(lib) if callable(getattr(lib, name))}
    assert declared == functions
    assert all(type(getattr(lib, name)) is int for name in dir(lib) if name not in functions)
