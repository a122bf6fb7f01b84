"""Where the VM harness keeps what it builds: outside any checkout, shared by all of them."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


def cache_root() -> Path:
    """``$PYVFIO_LU_CACHE``, else ``$XDG_CACHE_HOME/pyvfio-lu``, else ``~/.cache/pyvfio-lu``."""
    explicit = os.environ.get("PYVFIO_LU_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "pyvfio-lu"


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock file so two builds never write one cache entry at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
