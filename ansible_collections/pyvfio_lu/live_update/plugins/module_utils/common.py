# -*- coding: utf-8 -*-
# Copyright (c) pyvfio-lu contributors
# SPDX-License-Identifier: MIT
"""What every module of the collection shares: importing the library on the managed host, and
turning its named errors into module results."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import traceback

__all__ = ["HAS_PYVFIO_LU", "PyvfioError", "error_fields", "fail_with", "need_library", "next_cmdline"]

try:
    import pyvfio_lu  # noqa: F401 pylint: disable=unused-import
    from pyvfio_lu.errors import PyvfioError
except ImportError:
    HAS_PYVFIO_LU = False
    PYVFIO_LU_IMPORT_ERROR = traceback.format_exc()

    class PyvfioError(OSError):  # a stand-in so "except PyvfioError" still parses without the library
        """The library's error base class, missing on this host."""
else:
    HAS_PYVFIO_LU = True
    PYVFIO_LU_IMPORT_ERROR = None

LIBRARY = "pyvfio-lu (the pyvfio_lu Python package, importable by ansible_python_interpreter)"


def need_library(module):
    """Fail the module, saying what to install, unless pyvfio_lu is importable."""
    if not HAS_PYVFIO_LU:
        from ansible.module_utils.basic import missing_required_lib

        module.fail_json(msg=missing_required_lib(LIBRARY), exception=PYVFIO_LU_IMPORT_ERROR)


def error_fields(exc):
    """A library error as module result fields: its class name, errno, operation, target, reason."""
    return {
        "error": type(exc).__name__,
        "errno": getattr(exc, "errno_name", None) if getattr(exc, "errno", None) else None,
        "operation": getattr(exc, "operation", None),
        "target": getattr(exc, "target", None),
        "reason": getattr(exc, "reason", None),
    }


def fail_with(module, exc, **result):
    """fail_json with the library's named error in the result."""
    fields = error_fields(exc)
    fields.update(result)
    module.fail_json(msg=str(exc), **fields)


def next_cmdline(cmdline, cmdline_set):
    """The next kernel's command line: ``cmdline`` (default: the running kernel's) with each
    ``key: value`` of ``cmdline_set`` replaced or added (pyvfio_lu.kexec.cmdline_with)."""
    from pyvfio_lu import kexec

    cmd = kexec.current_cmdline() if cmdline is None else cmdline
    for key, value in (cmdline_set or {}).items():
        cmd = kexec.cmdline_with(cmd, **{str(key).replace(".", "__"): str(value)})
    return cmd
