"""Builds the cffi extension ``pyvfio_lu._cffi`` from cdefs/ (API mode, out of line), and
``pyvfio_lu._speedups`` (cdefs/speedups.c: the hot paths as plain CPython builtins).

On CPython (not a debug build) both are compiled against the limited C API (setuptools'
``py_limited_api``, hence ``*.abi3.so``), so one wheel serves every CPython this package
supports: the wheel is tagged ``cp310-abi3``. ``scripts/wheel`` builds it.
"""

import platform
import sys

from setuptools import Extension, setup

options = {}
limited = platform.python_implementation() == "CPython" and not hasattr(sys, "gettotalrefcount")
if limited:
    options["bdist_wheel"] = {"py_limited_api": "cp310"}  # requires-python's lowest

speedups = Extension(
    "pyvfio_lu._speedups",
    ["cdefs/speedups.c"],
    py_limited_api=limited,
    define_macros=[("Py_LIMITED_API", "0x030A0000")] if limited else [],
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

setup(cffi_modules=["cdefs/build.py:ffibuilder"], ext_modules=[speedups], options=options)
