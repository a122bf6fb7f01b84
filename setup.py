"""Builds the cffi extension ``pyvfio_lu._cffi`` from cdefs/ (API mode, out of line)."""

from setuptools import setup

setup(cffi_modules=["cdefs/build.py:ffibuilder"])
