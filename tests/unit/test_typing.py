"""Typing stays a static matter: the annotations cost nothing at import time."""

from __future__ import annotations

import subprocess
import sys

import pyvfio_lu


def test_all_lists_every_lazy_name():
    assert pyvfio_lu.__all__ == sorted(pyvfio_lu._LAZY)


def test_importing_the_api_does_not_import_typing():
    code = ("import sys, pyvfio_lu.luo, pyvfio_lu.vfio, pyvfio_lu.memfd; "
            "print(' '.join(m for m in ('typing', 'typing_extensions') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
