"""Builds the cffi extension ``pyvfio_lu._cffi`` from cdefs/ (API mode, out of line).

On CPython (not a debug build) cffi compiles it against the limited C API (setuptools'
``py_limited_api``, hence ``_cffi.abi3.so``), so one wheel serves every CPython this
package supports: the wheel is tagged ``cp310-abi3``. ``scripts/wheel`` builds it.
"""

import platform
import sys

from setuptools import setup

options = {}
if platform.python_implementation() == "CPython" and not hasattr(sys, "gettotalrefcount"):
    options["bdist_wheel"] = {"py_limited_api": "cp310"}  # requires-python's lowest

setup(cffi_modules=["cdefs/build.py:ffibuilder"], options=options)
