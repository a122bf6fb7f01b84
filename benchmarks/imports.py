"""Cold-import cost: ``python -S -X importtime -c "import X"`` in fresh processes, best of N.

As a deployed VMM starts (and as the blackout benchmark runs it): without ``site``, the
package and cffi found through PYTHONPATH. With ``site``, this project's virtualenv would
first run its editable-install finder (a ``.pth`` file importing ``pathlib``, ``re``,
``enum``, ``collections`` and more), which no installed package has and which would hide the
cost of any of those the library imports; without it, what the statement imports is all
counted, ``os`` included (which ``site`` would otherwise have imported).

Each process times the import statement itself (perf_counter_ns around it) and reports
``-X importtime``'s cumulative microseconds of the top-level entries the statement caused;
one uncounted warm-up process first writes the bytecode caches (into ``pycache_prefix``,
so the source tree is untouched and a PYTHONDONTWRITEBYTECODE environment does not turn
every run into a compile), as an installed package would have them.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from typing import Any

MODULES = ("pyvfio_lu", "pyvfio_lu._cffi", "pyvfio_lu.luo", "pyvfio_lu.vfio")
_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)\s*$")
_MARK = "pyvfio-lu-bench-import-start"


def _code(module: str) -> str:
    return (f"import sys, time; sys.stderr.write('{_MARK}\\n'); sys.stderr.flush(); t0 = time.perf_counter_ns(); "
            f"import {module}; t1 = time.perf_counter_ns(); print(t1 - t0)")


def parse_importtime(stderr: str) -> tuple[int, list[tuple[str, int, int, str]]]:
    """(cumulative µs of the top-level imports after the marker,
    [(module, self µs, cumulative µs, the module that imported it)])."""
    lines = stderr.splitlines()
    if _MARK in lines:
        lines = lines[lines.index(_MARK) + 1:]
    total, rows = 0, []
    for line in lines:
        m = _LINE.match(line)
        if not m:
            continue
        depth = (len(m[3]) - 1) // 2
        rows.append((m[4], int(m[1]), int(m[2]), depth))
        if depth <= 0:
            total += int(m[2])
    entries = []
    for i, (name, self_us, cum_us, depth) in enumerate(rows):
        # -X importtime prints a module after everything it imported: its importer is the
        # next line that is less indented
        parent = next((r[0] for r in rows[i + 1:] if r[3] < depth), "")
        entries.append((name, self_us, cum_us, parent))
    return total, entries


def search_path(pythonpath: str | None = None) -> str:
    """PYTHONPATH for a process without ``site``: ``pythonpath`` (another pyvfio_lu tree) or
    this checkout's, then cffi's directory (its backend is all the library needs from there)."""
    import _cffi_backend

    root = pythonpath or str(Path(__file__).resolve().parents[1])
    return os.pathsep.join([root, os.path.dirname(_cffi_backend.__file__)])


def measure(module: str, n: int, python: str | None = None, pythonpath: str | None = None,
            pycache_prefix: str = "/tmp/pyvfio-lu-bench-pycache") -> dict[str, Any]:
    """Import ``module`` in ``n`` fresh interpreters (after one warm-up); wall and importtime figures in ns."""
    env = dict(os.environ, PYTHONPYCACHEPREFIX=pycache_prefix, PYTHONPATH=search_path(pythonpath))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    walls: list[int]
    cums: list[int]
    best_entries: list[tuple[str, int, int, str]]
    warmup_ns: int | None
    walls, cums, best_entries, warmup_ns = [], [], [], None
    for i in range(n + 1):
        proc = subprocess.run([python or sys.executable, "-S", "-X", "importtime", "-c", _code(module)],
                              check=False, capture_output=True, text=True, env=env, cwd="/")
        if proc.returncode != 0:
            raise RuntimeError(f"import {module} failed: {proc.stderr[-2000:]}")
        wall = int(proc.stdout.strip().splitlines()[-1])
        cum_us, entries = parse_importtime(proc.stderr)
        if i == 0:
            warmup_ns = wall
            continue
        if not walls or wall < min(walls):
            best_entries = entries
        walls.append(wall)
        cums.append(cum_us * 1000)
    top = sorted(best_entries, key=lambda e: -e[1])[:8]
    importers = {name: parent for name, _s, _c, parent in best_entries}
    return {"module": module, "n": n, "wall_ns": walls, "importtime_ns": cums,
            "warmup_ns": warmup_ns, "best_ns": min(walls), "median_ns": statistics.median(walls),
            "top_self_us": [{"module": name, "self_us": s, "cumulative_us": c, "imported_by": parent}
                            for name, s, c, parent in top],
            "imported_by": importers}


def measure_all(n: int, python: str | None = None, pythonpath: str | None = None,
                pycache_prefix: str = "/tmp/pyvfio-lu-bench-pycache") -> dict[str, dict[str, Any]]:
    return {m: measure(m, n, python, pythonpath, pycache_prefix) for m in MODULES}
