"""Host runs collect tests/unit and tests/test_guest.py (which boots the guest and reports
each guest test by name); inside the guest, tests/guest runs for real."""

import os

pytest_plugins = ["pyvfio_lu.pytest_plugin"]

# The guest tests need the real kernel: on the host they are collected through
# tests/test_guest.py, never directly.
collect_ignore = [] if os.environ.get("PYVFIO_LU_GUEST_STAGE") else ["guest"]
