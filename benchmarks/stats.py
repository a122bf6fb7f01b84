"""Robust summaries: every benchmark is repeated; we keep the median and the minimum."""

from __future__ import annotations

import statistics

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from typing import Any


def per_op(sample: dict[str, Any]) -> list[float]:
    """ns per operation of each repeat of a {"iters": N, "ns": [total ns, ...]} sample."""
    n = max(int(sample["iters"]), 1)
    return [t / n for t in sample["ns"]]


def summarize(sample: dict[str, Any]) -> dict[str, Any]:
    values = per_op(sample)
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "repeats": len(values), "iters": int(sample["iters"])}


def merge(*samples: dict[str, Any] | None) -> dict[str, Any] | None:
    """Pool the repeats of several samples of one benchmark (same iteration count)."""
    present = [s for s in samples if s]
    if not present:
        return None
    iters = {int(s["iters"]) for s in present}
    if len(iters) != 1:
        raise ValueError(f"cannot pool samples with different iteration counts {sorted(iters)}")
    return {"iters": iters.pop(), "ns": [t for s in present for t in s["ns"]]}


def fmt_ns(ns: float) -> str:
    """A duration with a unit that keeps 3 significant digits."""
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"
