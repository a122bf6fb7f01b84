"""results.json -> the rows (Python vs C), ``results.md`` and ``chart.png``."""

from __future__ import annotations

from dataclasses import dataclass

from .stats import fmt_ns, summarize

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (type checkers treat it as True)

if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

IMPORT_TARGET_NS = 25e6
BLACKOUT_TARGET_NS = 500e6  # process start -> first DMA, Python, in the guest
RSS_TARGET_KIB = 20 * 1024  # peak RSS with 2000 sessions, above an empty interpreter
IMPORT_TARGET_MODULE = "pyvfio_lu"


@dataclass(frozen=True)
class Row:
    key: str
    group: str
    label: str
    py: str  # key in results["python"]
    c: str  # key in results["c"]
    target: float | None
    per: str  # "op": figures per call; "round": per repeat (the whole loop)
    base: str = "c"  # the side the denominator comes from: "c", or "python" (a floor row of this run)


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def _dma_rows(piece: int, what: str) -> list[Row]:
    k = f"dma_{piece}"
    # the target is the batch row's (issue: batch map+unmap <= 1.10x C); one Iommu.map per
    # piece is shown for what it costs, and the floor for what any per-call Python loop costs
    return [
        Row(f"{k}_map", "dma", f"IOMMU_IOAS_MAP, {what}", f"dma_map_{piece}", f"dma_map_{piece}", None, "round"),
        Row(f"{k}_unmap", "dma", f"IOMMU_IOAS_UNMAP, {what}", f"dma_unmap_{piece}", f"dma_unmap_{piece}", None,
            "round"),
        Row(f"{k}_total", "dma", f"MAP + UNMAP, {what}: one `Iommu.map`/`unmap` per piece", f"dma_total_{piece}",
            f"dma_total_{piece}", None, "round"),
        Row(f"{k}_batch", "dma", f"**MAP + UNMAP, {what}: batch `map_many` + `unmap_many`**",
            f"dma_total_batch_{piece}", f"dma_total_{piece}", 1.1, "round"),
        Row(f"{k}_run", "dma", f"**MAP + UNMAP, {what}: `map_run` + `unmap_run` (array columns, one object)**",
            f"dma_total_run_{piece}", f"dma_total_{piece}", 1.1, "round"),
        Row(f"{k}_floor", "dma", f"MAP + UNMAP, {what}: plain-Python floor, `lib.pvl_ioctl` (reference)",
            f"dma_total_floor_{piece}", f"dma_total_{piece}", None, "round"),
    ]


def rows(results: dict[str, Any]) -> list[Row]:
    big = _size(results.get("config", {}).get("dma_big_total", 1 << 30))
    small = _size(results.get("config", {}).get("dma_small_total", 16 << 20))
    full = _size(results.get("config", {}).get("dma_full_total", 1 << 30))
    return [
        Row("calib_host", "calib", "Calibration, no device: FIONREAD on a pipe, cffi floor — **host, native**",
            "host_calib_fionread", "host_calib_fionread", None, "op"),
        Row("calib_guest", "calib", "Calibration, no device: FIONREAD on a pipe, cffi floor — guest, TCG",
            "calib_fionread", "calib_fionread", None, "op"),
        Row("ioctl_get_info", "ioctl", "VFIO_DEVICE_GET_INFO: `dev.info()`", "ioctl_get_info", "ioctl_get_info",
            None, "op"),
        Row("ioctl_get_info_raw", "ioctl", "VFIO_DEVICE_GET_INFO: raw `call()`", "ioctl_get_info_raw",
            "ioctl_get_info", None, "op"),
        Row("ioctl_get_info_floor", "ioctl", "VFIO_DEVICE_GET_INFO: cffi floor, `lib.pvl_ioctl` (reference)",
            "ioctl_get_info_floor", "ioctl_get_info", None, "op"),
        Row("ioctl_get_info_vs_floor", "floor", "`dev.info()` **against the cffi floor** (not C)", "ioctl_get_info",
            "ioctl_get_info_floor", 2.0, "op", "python"),
        Row("ioctl_get_info_raw_vs_floor", "floor", "raw `call()`, VFIO_DEVICE_GET_INFO, **against the cffi floor**",
            "ioctl_get_info_raw", "ioctl_get_info_floor", 1.5, "op", "python"),
        Row("ioctl_get_name", "ioctl", "LIVEUPDATE_SESSION_GET_NAME: `session.get_name()`", "ioctl_get_name",
            "ioctl_get_name", None, "op"),
        Row("ioctl_get_name_raw", "ioctl", "LIVEUPDATE_SESSION_GET_NAME: raw `call()`", "ioctl_get_name_raw",
            "ioctl_get_name", None, "op"),
        Row("ioctl_get_name_floor", "ioctl", "LIVEUPDATE_SESSION_GET_NAME: cffi floor (reference)",
            "ioctl_get_name_floor", "ioctl_get_name", None, "op"),
        Row("ioctl_get_name_vs_floor", "floor", "`session.get_name()` **against the cffi floor**", "ioctl_get_name",
            "ioctl_get_name_floor", 2.0, "op", "python"),
        Row("ioctl_get_name_raw_vs_floor", "floor", "raw `call()`, LIVEUPDATE_SESSION_GET_NAME, **against the cffi "
            "floor**", "ioctl_get_name_raw", "ioctl_get_name_floor", 1.5, "op", "python"),
        Row("mmio_read32", "mmio", "MMIO read32: `bar.read32(0)`", "mmio_read32", "mmio_read32", None, "op"),
        Row("mmio_read32_floor", "mmio", "MMIO read32: cffi floor, `lib.pvl_mmio_read32` (reference)",
            "mmio_read32_floor", "mmio_read32", None, "op"),
        Row("mmio_write32", "mmio", "MMIO write32: `bar.write32(4, x)`", "mmio_write32", "mmio_write32", None, "op"),
        Row("mmio_read32_memoryview", "mmio",
            "MMIO read32: `memoryview(bar).cast('I')[0]`, the pure-Python idiom (no width guarantee; reference)",
            "mmio_read32_memoryview", "mmio_read32", None, "op"),
        Row("mmio_read32_vs_floor", "floor", "`bar.read32(0)` **against the cffi floor**", "mmio_read32",
            "mmio_read32_floor", 2.0, "op", "python"),
        Row("mmio_read32_regs", "mmio", "MMIO read32: `regs[0]` (`regs = bar.regs32`, exact width by subscript)",
            "mmio_read32_regs", "mmio_read32", None, "op"),
        Row("mmio_read32_vs_memoryview", "floor", "`bar.read32(0)` (a call) against the memoryview idiom (a subscript)",
            "mmio_read32", "mmio_read32_memoryview", None, "op", "python"),
        Row("mmio_regs32_vs_memoryview", "floor", "`regs[0]` (`bar.regs32`) **against the memoryview idiom** (no slower)",
            "mmio_read32_regs", "mmio_read32_memoryview", 1.0, "op", "python"),
        Row("mmio_read_block", "mmio", "MMIO block read: `bar.read_block(256 offsets, out=...)` (arrays), per access",
            "mmio_read_block", "mmio_block_read", None, "op"),
        Row("mmio_write_block", "mmio", "MMIO block write: `bar.write_block(256 offsets, values)` (arrays), per access",
            "mmio_write_block", "mmio_block_write", None, "op"),
        Row("mmio_block_read", "mmio", "**MMIO block read: `RegisterBlock.read()`, 256 registers**, per access",
            "mmio_block_read", "mmio_block_read", 1.2, "op"),
        Row("mmio_block_write", "mmio", "**MMIO block write: `RegisterBlock.write()`, 256 registers**, per access",
            "mmio_block_write", "mmio_block_write", 1.2, "op"),
        Row("mmio_block_read_4096", "mmio", "**MMIO block read: `RegisterBlock.read()`, 4096 registers**, per access",
            "mmio_block_read_4096", "mmio_block_read_4096", 1.2, "op"),
        Row("mmio_block_write_4096", "mmio",
            "**MMIO block write: `RegisterBlock.write()`, 4096 registers**, per access",
            "mmio_block_write_4096", "mmio_block_write_4096", 1.2, "op"),
        Row("mmio_poll", "mmio", "Register poll that matches at once: `bar.poll(0, mask, id, 1.0)`", "mmio_poll",
            "mmio_poll", 1.2, "op"),
        *_dma_rows(2 << 20, f"{big} in 2 MiB pieces"),
        *_dma_rows(4096, f"{small} in 4 KiB pieces"),
        Row("dma_map_vs_floor_2m", "floor", "`Iommu.map` per 2 MiB piece **against the plain-Python floor**",
            f"dma_map_{2 << 20}", f"dma_map_floor_{2 << 20}", 2.0, "round", "python"),
        Row("dma_map_vs_floor_4k", "floor", "`Iommu.map` per 4 KiB piece **against the plain-Python floor**",
            "dma_map_4096", "dma_map_floor_4096", 2.0, "round", "python"),
        Row("dma_full_batch", "dma", f"**MAP + UNMAP, {full} in 4 KiB pieces: batch `map_many` + `unmap_many`**",
            "dma_total_batch_full", "dma_total_full", 1.1, "round"),
        Row("dma_full_run", "dma", f"**MAP + UNMAP, {full} in 4 KiB pieces: `map_run` + `unmap_run`**",
            "dma_total_run_full", "dma_total_full", 1.1, "round"),
        Row("lu_preserve", "lu", "Live update, before kexec: create session + preserve N memfds", "lu_preserve",
            "lu_preserve", None, "round"),
        Row("lu_retrieve", "lu", "Live update, after kexec: retrieve session + N memfds (verified) + finish",
            "lu_retrieve", "lu_retrieve", None, "round"),
        Row("lu_total", "lu", "Live update of N memfds, both sides: one `preserve`/`retrieve` per file", "lu_total",
            "lu_total", None, "round"),
        Row("lu_batch_preserve", "lu", "Live update, before kexec: batch `Memfd.create_many` + `preserve_many`",
            "lu_batch_preserve", "lu_preserve", 1.2, "round"),
        Row("lu_batch_retrieve", "lu", "Live update, after kexec: batch `retrieve_many` + `Memfd.verify_many` + finish",
            "lu_batch_retrieve", "lu_retrieve", 1.2, "round"),
        Row("lu_batch_total", "lu", "**Live update of N memfds, both sides, in batches (made, preserved; retrieved, verified)**",
            "lu_batch_total", "lu_total", 1.2, "round"),
        Row("lu_floor", "lu", "Live update, both sides: plain-Python floor, `os.*` + `lib.pvl_ioctl` (reference)",
            "lu_total_floor", "lu_total", None, "round"),
    ]


def derive(results: dict[str, Any]) -> None:
    """Add the combined samples (DMA map+unmap per round, live update both sides)."""
    for side in ("python", "c"):
        data = results.get(side, {})
        for piece in (2 << 20, 4096, "full"):
            for kind in ("", "floor_", "batch_", "run_"):
                m, u = data.get(f"dma_map_{kind}{piece}"), data.get(f"dma_unmap_{kind}{piece}")
                if m and u:
                    data[f"dma_total_{kind}{piece}"] = {"iters": m["iters"],
                                                        "ns": [a + b for a, b in zip(m["ns"], u["ns"])]}
        lu = results.get("lu", {})
        files = lu.get("files", 0)
        pre, ret = lu.get(f"preserve_{side}") or [], lu.get(f"retrieve_{side}") or []
        if pre:
            data["lu_preserve"] = {"iters": files, "ns": pre}
        if ret:
            data["lu_retrieve"] = {"iters": files, "ns": ret}
        if pre and ret:
            data["lu_total"] = {"iters": files, "ns": [a + b for a, b in zip(pre, ret)]}
        bpre, bret = lu.get("preserve_batch") or [], lu.get("retrieve_batch") or []
        if side == "python" and bpre:
            data["lu_batch_preserve"] = {"iters": files, "ns": bpre}
        if side == "python" and bret:
            data["lu_batch_retrieve"] = {"iters": files, "ns": bret}
        if side == "python" and bpre and bret:
            data["lu_batch_total"] = {"iters": files, "ns": [a + b for a, b in zip(bpre, bret)]}
        if side == "python" and lu.get("preserve_floor") and lu.get("retrieve_floor"):
            data["lu_total_floor"] = {"iters": files, "ns": [a + b for a, b in zip(lu["preserve_floor"],
                                                                                    lu["retrieve_floor"])]}


def compare(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per row that has both sides: figures, ratio, target, met."""
    out = []
    for row in rows(results):
        py, c = results.get("python", {}).get(row.py), results.get(row.base, {}).get(row.c)
        if not py or not c:
            continue
        sp, sc = summarize(py), summarize(c)
        scale = sp["iters"] if row.per == "round" else 1
        ratio = sp["median"] / sc["median"] if sc["median"] else float("inf")
        out.append({
            "key": row.key, "group": row.group, "label": row.label, "per": row.per, "target": row.target,
            "python_median_ns": sp["median"] * scale, "python_min_ns": sp["min"] * scale,
            "c_median_ns": sc["median"] * scale, "c_min_ns": sc["min"] * scale,
            "ratio": ratio, "ratio_min": sp["min"] / sc["min"] if sc["min"] else float("inf"),
            "iters": sp["iters"], "repeats": sp["repeats"], "c_repeats": sc["repeats"],
            "met": None if row.target is None else ratio <= row.target,
        })
    return out


def import_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Import times; the 25 ms target is the one for ``import pyvfio_lu`` (host and guest);
    the submodules are shown against it for information."""
    out = []
    for module, guest in results.get("imports", {}).get("guest", {}).items():
        host = results.get("imports", {}).get("host", {}).get(module)
        host_met = None if host is None else host["best_ns"] <= IMPORT_TARGET_NS
        guest_met = guest["best_ns"] <= IMPORT_TARGET_NS
        out.append({"module": module, "guest_best_ns": guest["best_ns"], "guest_median_ns": guest["median_ns"],
                    "host_best_ns": host["best_ns"] if host else None,
                    "host_median_ns": host["median_ns"] if host else None, "n": guest["n"],
                    "target_ns": IMPORT_TARGET_NS, "host_met": host_met, "guest_met": guest_met,
                    "counts": module == IMPORT_TARGET_MODULE,
                    "met": (guest_met and host_met is not False) if module == IMPORT_TARGET_MODULE else None})
    return out


# --- markdown ----------------------------------------------------------------------------------
def _iters_text(r: dict[str, Any]) -> str:
    if r["group"] == "dma":
        return f"{r['iters']} pieces × {r['repeats']} rounds"
    if r["group"] == "lu":
        return f"{r['iters']} files × {r['repeats']} samples"
    return f"{r['iters']} calls × {r['repeats']} repeats"


def _met(r: dict[str, Any]) -> str:
    if r["met"] is None:
        return "—"
    return f"≤{r['target']:g}x: **met**" if r["met"] else f"≤{r['target']:g}x: **missed**"


def table(results: dict[str, Any]) -> str:
    lines = ["| Benchmark | Python median (min) | C median (min) | Python/C median (min) | Target | Iterations |",
             "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        unit = "/call" if r["per"] == "op" else ("/round" if r["group"] == "dma" else "")
        lines.append(
            f"| {r['label']} | {fmt_ns(r['python_median_ns'])}{unit} ({fmt_ns(r['python_min_ns'])}) "
            f"| {fmt_ns(r['c_median_ns'])}{unit} ({fmt_ns(r['c_min_ns'])}) "
            f"| **{r['ratio']:.2f}x** ({r['ratio_min']:.2f}x) | {_met(r)} | {_iters_text(r)} |")
    imp = results.get("import_rows") or []
    if imp:
        lines += ["", ("| Cold import (fresh process, bytecode cached) | Host best (median) | Guest best (median) "
                       "| Target | Processes |"), "|---|---|---|---|---|"]
        for r in imp:
            host = "—" if r["host_best_ns"] is None else f"{fmt_ns(r['host_best_ns'])} ({fmt_ns(r['host_median_ns'])})"
            verdict = ", ".join(f"{where} {'met' if ok else 'missed'}" for where, ok in
                                (("host", r["host_met"]), ("guest", r["guest_met"])) if ok is not None)
            target = (f"≤{fmt_ns(r['target_ns'])}: **{verdict}**" if r["counts"] else
                      f"(≤{fmt_ns(r['target_ns'])}: {verdict})")
            lines.append(f"| `import {r['module']}` | {host} | {fmt_ns(r['guest_best_ns'])} "
                         f"({fmt_ns(r['guest_median_ns'])}) | {target} | best of {r['n']} |")
    return "\n".join(lines)


def _row(results: dict[str, Any], key: str) -> dict[str, Any] | None:
    return next((r for r in results["rows"] if r["key"] == key), None)


def _top(results: dict[str, Any], name: str, k: int = 4) -> str:
    prof = results.get("profiles", {}).get(name)
    if not prof:
        return ""
    total = prof["total_ns_per_iter"] or 1
    parts = []
    for e in [e for e in prof["top"] if "_lsprof" not in e["function"]][:k]:
        parts.append(f"`{e['function']}` {100 * e['own_ns_per_iter'] / total:.0f}%")
    return f" cProfile, own time per call ({name}): " + ", ".join(parts) + "."


def _chain(results: dict[str, Any], where: str, module: str, name: str) -> str:
    """'a <- b <- c': who imported ``name`` during ``import module``."""
    importers = results.get("imports", {}).get(where, {}).get(module, {}).get("imported_by", {})
    chain, seen = [name], {name}
    while importers.get(chain[-1]) and importers[chain[-1]] not in seen and len(chain) < 6:
        chain.append(importers[chain[-1]])
        seen.add(chain[-1])
    return " ← ".join(f"`{c}`" for c in chain)


def _dma_floor_text(results: dict[str, Any]) -> str:
    floors = [(f, lbl) for f, lbl in ((_row(results, "dma_2097152_floor"), "2 MiB"),
                                      (_row(results, "dma_4096_floor"), "4 KiB")) if f]
    calib = _row(results, "calib_guest")
    if not floors:
        return ""
    text = " The plain-Python floor (a struct and `lib.pvl_ioctl` per piece, nothing else) is " + " and ".join(
        f"{f['ratio']:.2f}x C with {lbl} pieces ({fmt_ns((f['python_median_ns'] - f['c_median_ns']) / f['iters'] / 2)}"
        " more per ioctl)" for f, lbl in floors) + "."
    if calib:
        text += (f" That is several times the {fmt_ns(calib['python_median_ns'] - calib['c_median_ns'])} a bare "
                 "call costs in the calibration row: most likely the kernel's own share of each map/unmap runs "
                 "slower when the interpreter runs between the calls (TCG's software TLB and the caches are "
                 "refilled every time), a cost no Python code avoids here, so 1.1x is out of reach under TCG.")
    return text


def analysis(results: dict[str, Any]) -> list[str]:
    """Where the Python time goes, from the floor rows, the profiles and the DMA scaling: what
    remains in each missed row, and why."""
    out = []
    py = results.get("python", {})
    loop = summarize(py["python_loop"])["median"] if py.get("python_loop") else None

    info, raw, floor = (_row(results, k) for k in ("ioctl_get_info", "ioctl_get_info_raw", "ioctl_get_info_floor"))
    gn, gnr, gnf = (_row(results, k) for k in ("ioctl_get_name", "ioctl_get_name_raw", "ioctl_get_name_floor"))
    if info and raw and floor:
        out.append(
            f"- **ioctl (VFIO_DEVICE_GET_INFO)** — C {fmt_ns(info['c_median_ns'])}; the cffi floor (`lib.pvl_ioctl` on "
            f"a ready struct) {fmt_ns(floor['python_median_ns'])}, {floor['ratio']:.2f}x C: under TCG a cffi call "
            "(which releases and re-takes the GIL and converts each argument) costs more than the syscall. "
            f"`dev.info()` takes {fmt_ns(info['python_median_ns'])} "
            f"({info['python_median_ns'] / floor['python_median_ns']:.2f}x the floor): its lean path is one "
            "builtin call, `_speedups.ioctl_record` (the prepared argument copied, the ioctl issued with the GIL "
            "kept, the `DeviceInfo` record allocated as the namedtuple itself from the struct's words), and a "
            "flags test; what is left over the floor is the Python method call."
            f"{_top(results, 'ioctl_get_info')} The raw `call()` layer takes {fmt_ns(raw['python_median_ns'])} "
            f"({raw['python_median_ns'] / floor['python_median_ns']:.2f}x the floor): it must return a fresh cffi "
            "struct (one `ffi.new`, itself about as dear as the floor's call), goes through cffi's call (GIL "
            "released) and is a keyword-argument call with `**fields`; 1.5x the floor would leave it half of one "
            "cffi call for all of that, so the generic layer stays as it is and the verbs take the lean path.")
    if gn and gnr and gnf:
        out.append(
            f"- **ioctl (LIVEUPDATE_SESSION_GET_NAME)** — C {fmt_ns(gn['c_median_ns'])}, floor "
            f"{fmt_ns(gnf['python_median_ns'])}, `get_name()` {fmt_ns(gn['python_median_ns'])} "
            f"({gn['python_median_ns'] / gnf['python_median_ns']:.2f}x the floor), raw `call()` "
            f"{fmt_ns(gnr['python_median_ns'])}. `get_name()` is one builtin call, `_speedups.ioctl_text` (the "
            "ioctl, then the name decoded in C), which skips cffi's GIL release and so can be quicker than the "
            "floor; a closed session's fd reads -1, so the error is named on the failure path only."
            f"{_top(results, 'ioctl_get_name')}")
    rd, rdf, mv = _row(results, "mmio_read32"), _row(results, "mmio_read32_floor"), _row(results, "mmio_read32_memoryview")
    rg = _row(results, "mmio_read32_regs")
    if rd and rdf:
        extra = f" (the bare `for` loop is {fmt_ns(loop)} of each)" if loop else ""
        out.append(
            f"- **MMIO** — C {fmt_ns(rd['c_median_ns'])} per read32: under TCG an MMIO load is a call into QEMU's "
            "edu model from translated code, no VM exit, so it is as cheap as a C function call while every Python "
            f"call is dear. `bar.read32` takes {fmt_ns(rd['python_median_ns'])}{extra}: a builtin method of the "
            "BAR's `_speedups.Window` (bounds and alignment checked in C, one volatile 32-bit load, no cffi call); "
            f"the cffi floor `lib.pvl_mmio_read32` takes {fmt_ns(rdf['python_median_ns'])}"
            + (f" and the memoryview idiom {fmt_ns(mv['python_median_ns'])}, which is one subscript with no call at "
               "all: the call of a builtin is the whole difference." if mv else ".")
            + (f" The library's own subscript form, `regs[0]` with `regs = bar.regs32` (a `_speedups.Registers`: "
               "the same checks and the same exact 32-bit load, in the mapping's `mp_subscript` slot), takes "
               f"{fmt_ns(rg['python_median_ns'])}." if rg else "")
            + f"{_top(results, 'mmio_read32')} A register block costs one such call plus the loop in C, "
            "against bench.c's loop over the same offsets array into the same uint64 values array (the "
            "single-register rows' C loop reads one fixed address, two memory accesses fewer per register, "
            "which under TCG's software TLB is most of a block's per-access difference): the call's fixed "
            "cost (about a microsecond under TCG) weighs against 256 accesses, and is spread to a few percent "
            "over 4096. `bar.poll` that matches at once is one call "
            "with five arguments and a 3-tuple back against C's single load and compare (about 100 ns): no call "
            "from Python gets near 1.2x of that under TCG (nor under KVM, where the load itself is a VM exit for "
            "both sides and the ratio would fall toward 1).")
    m2, u2, m4, u4 = (_row(results, k) for k in ("dma_2097152_map", "dma_2097152_unmap", "dma_4096_map",
                                                  "dma_4096_unmap"))
    b4, bf = _row(results, "dma_4096_batch"), _row(results, "dma_full_batch")
    r2, r4, rf = (_row(results, k) for k in ("dma_2097152_run", "dma_4096_run", "dma_full_run"))
    if m2 and u2 and m4 and u4:
        def over(r: dict[str, float]) -> float:
            return (r["python_median_ns"] - r["c_median_ns"]) / r["iters"]

        def per(r: dict[str, float], side: str) -> float:
            return r[f"{side}_median_ns"] / r["iters"]

        out.append(
            f"- **DMA mapping** — per `Iommu.map` of an address, Python adds {fmt_ns(over(m2))} (2 MiB pieces, C "
            f"{fmt_ns(per(m2, 'c'))} per map) and {fmt_ns(over(m4))} (4 KiB pieces, C {fmt_ns(per(m4, 'c'))}): the "
            "lean path packs the argument and issues the ioctl in one builtin call (the GIL released above a MiB), "
            "then makes the `Mapping` and lists it; per `Iommu.unmap` "
            f"{fmt_ns(over(u2))} and {fmt_ns(over(u4))}.{_top(results, 'dma_4096')}"
            + (f" The batch verbs, 4 KiB pieces: {b4['ratio']:.2f}x C" if b4 else "")
            + (f", and {bf['ratio']:.2f}x for the whole 1 GiB ({bf['iters']} mappings)" if bf else "")
            + ". The loop is in C and the bookkeeping makes no Python call per piece (each `Mapping` a tuple made "
            "by `map()`, forgotten by `map()`), but under TCG every Python object costs: allocating a plain "
            "4-tuple is 1.5-2.4 µs here (measured apart from this run: 4096 of them take 6-10 ms), against C's "
            "9-16 µs for the map "
            "and unmap of a 4 KiB piece. The caller's `(offset, iova, size)` triples, their conversion to C arrays "
            "and one `Mapping` per piece are 5-8 µs per piece together. `map_run`/`unmap_run` take the pieces as "
            "three `array('Q')` columns and keep them as one `MappingRun` (C arrays; listed in `Iommu.runs`, its "
            "pieces made as objects only on demand), so nothing per piece is a Python object: "
            + ", ".join(f"{r['ratio']:.2f}x C {lbl}" for r, lbl in ((r2, "in 2 MiB pieces"),
                                                                  (r4, "in 4 KiB pieces"),
                                                                  (rf, "for the whole 1 GiB in 4 KiB pieces"))
                        if r)
            + ". Besides a few fixed calls (the checks, copying the columns), what is left is inside the C "
            "loops, the same loops as bench.c's compiled into the extension, and moves between runs with the "
            "kernel's own time."
            + _dma_floor_text(results))
    lp, lr = _row(results, "lu_preserve"), _row(results, "lu_retrieve")
    lb, fl = _row(results, "lu_batch_total"), _row(results, "lu_floor")
    if lp and lr:
        n = lp["iters"] or 1
        out.append(
            f"- **Live update** — one `preserve`/`retrieve` per file: per memfd Python spends "
            f"{fmt_ns((lp['python_median_ns'] - lp['c_median_ns']) / n)} more than C before the kexec and "
            f"{fmt_ns((lr['python_median_ns'] - lr['c_median_ns']) / n)} after it."
            f"{_top(results, 'lu_preserve')}{_top(results, 'lu_retrieve')}"
            + (f" In batches both sides take {lb['ratio']:.2f}x C" if lb else "")
            + (f", against {fl['ratio']:.2f}x for the plainest Python making the same syscalls one by one "
               "(`os.memfd_create`/`ftruncate`/`pwrite`/`fstat`/`pread`/`close` and `lib.pvl_ioctl`, no pyvfio_lu "
               "objects)" if fl else "")
            + ". The batch row includes making the memfds and verifying them after the kexec, as C does, each loop "
            "in C: `Memfd.create_many` (memfd_create, ftruncate, pwrite per file), `preserve_many`, `retrieve_many`, "
            "`Memfd.verify_many` (one pread and compare per file). What remains per file is what owning it takes: "
            "a `Memfd` made and closed before the kexec, with its ledger record (one `fstat` and a dict), an `OwnedFd` "
            "made and closed after it; each is a few Python calls, and under TCG a Python call costs several µs "
            "against C's 60-120 µs for a file's whole round trip, so 1.2x would need no Python object per file.")
    for r in results.get("import_rows") or []:
        if r["module"] in ("pyvfio_lu.luo", "pyvfio_lu.vfio"):
            for where in ("host", "guest"):
                top = results["imports"].get(where, {}).get(r["module"], {}).get("top_self_us", [])[:6]
                if top:
                    out.append(f"- **`import {r['module']}`**, {where} (best {fmt_ns(r[f'{where}_best_ns'])}): "
                               "largest own import times: " + ", ".join(
                                   f"`{t['module']}` {t['self_us'] / 1000:.2f} ms" for t in top) + ".")
            importers = results["imports"].get("guest", {}).get(r["module"], {}).get("imported_by", {})
            if "inspect" in importers:
                out.append(f"  `inspect` (with `ast`, `tokenize`, `dis`...) is imported here: "
                           f"{_chain(results, 'guest', r['module'], 'inspect')}; a `namedtuple`/`__slots__` "
                           "class instead of the dataclass keeps it out.")
    imp = {r["module"]: r for r in results.get("import_rows") or []}
    luo = imp.get("pyvfio_lu.luo") or {}
    if luo.get("host_best_ns") and luo.get("guest_best_ns"):  # the guest-only smoke run has no host figures
        out.append(
            "- **Imports and the blackout** — importing is "
            f"{luo['guest_best_ns'] / luo['host_best_ns']:.0f} times slower "
            f"in this guest than natively (the host imports `pyvfio_lu.luo` in "
            f"{fmt_ns(luo['host_best_ns'])}, the guest in "
            f"{fmt_ns(luo['guest_best_ns'])}). Both submodules import only what they use (no `enum`, `re`, "
            "`collections`, `functools`, `importlib`, `typing`, `mmap`, `select`; records are tuples made by "
            "`pyvfio_lu._record`; a unit test holds the list), so what is left is the number of modules: under "
            "TCG the import system's own Python code costs milliseconds per module"
            + (f", and the package alone (an `__init__` that imports nothing) takes "
               f"{fmt_ns(imp['pyvfio_lu']['guest_best_ns'])}" if "pyvfio_lu" in imp else "")
            + (f"; cffi's backend with the uAPI extension {fmt_ns(imp['pyvfio_lu._cffi']['guest_best_ns'])}"
               if "pyvfio_lu._cffi" in imp else "")
            + ". 25 ms leaves room for one or two modules here while the host needs a few ms for all of "
            "them. The blackout's interpreter start alone is most of its 500 ms budget under TCG (see its section).")
    return out


def _plain(label: str | None) -> str:
    return (label or "").replace("**", "")


def tcg_note(results: dict[str, Any]) -> str:
    text = ("**Measured under TCG: read the ratios with care.** The guest runs on QEMU's TCG (no KVM here): "
            "every guest instruction is translated, which makes syscalls dearer than on hardware but slows the "
            "Python interpreter even more (bytecode dispatch is all guest instructions). An MMIO access is "
            "no VM exit under TCG but a call into QEMU's device model from the translated code, so C's MMIO "
            "is cheap here while Python's is interpreter-bound: the MMIO ratio is a worst case (under KVM each "
            "access is a VM exit of a microsecond or more for both sides, which would bring the ratio toward 1).")
    host, guest = _row(results, "calib_host"), _row(results, "calib_guest")
    if host and guest:
        text += (f" The calibration rows measure this on an ioctl any machine has (FIONREAD on a pipe, bare "
                 f"`lib.pvl_ioctl` vs C): {host['ratio']:.2f}x natively on the host "
                 f"({fmt_ns(host['python_median_ns'])} vs {fmt_ns(host['c_median_ns'])}), {guest['ratio']:.2f}x "
                 f"in the guest ({fmt_ns(guest['python_median_ns'])} vs {fmt_ns(guest['c_median_ns'])}): under "
                 f"TCG every Python-side overhead weighs about {guest['ratio'] / host['ratio']:.1f}x more against "
                 "the kernel than on hardware.")
    return text


def markdown(results: dict[str, Any]) -> str:
    meta, cfg = results["meta"], results.get("config", {})
    facts = results.get("facts", {})
    guest = results.get("guest", {})
    misses = [r for r in results["rows"] if r["met"] is False] + [
        r for r in results.get("import_rows") or [] if r["met"] is False]
    met = [r for r in results["rows"] if r["met"]] + [r for r in results.get("import_rows") or [] if r["met"]]
    lines = [
        f"# pyvfio-lu benchmarks: Python vs C{' (SMOKE RUN: tiny counts, figures meaningless)' if meta['smoke'] else ''}",
        "",
        (f"Run {meta['timestamp']} of pyvfio-lu {meta.get('git', '?')} with `{meta['command']}`: one guest boot "
        f"(kernel {facts.get('kernel', '?')}, QEMU {guest.get('accel', '?')}, {meta.get('memory', '?')} RAM, "
        f"{guest.get('iommu', '?')} vIOMMU, edu device) and its kexec; in that boot pair every measurement is "
        f"taken once through pyvfio_lu (Python {facts.get('python', '?')}) and once by `benchmarks/bench.c` "
        f"({facts.get('c_build', {}).get('version', 'gcc')} {facts.get('c_build', {}).get('cflags', '')}) making the "
        "same kernel calls, built in the guest against pyvfio-lu's own uAPI declarations (`cdefs/`). "
        "Ratios are Python/C of the medians (of the minimums in brackets); lower is better."),
        "",
        tcg_note(results),
        "",
        table(results),
        "",
        f"Targets met: {len(met)}; missed: {len(misses)}"
        + (" (" + "; ".join(_plain(r.get("label")) or f"import {r['module']}" for r in misses) + ")" if misses else "")
        + ".",
        "",
        "Method: Python loops are written plainly (`for _ in range(n): dev.info()`), so the loop's own cost is "
        "included" + (f" ({fmt_ns(summarize(results['python']['python_loop'])['median'])} per iteration here)"
        if results.get("python", {}).get("python_loop") else "") + "; C loops re-initialise the argument struct "
        f"on every call, as `call()` does. ioctl/MMIO: {cfg.get('alternations', '?')} alternating passes "
        "(Python block, C block) whose repeats are pooled. DMA: a "
        f"{_size(cfg.get('dma_big_total', 1 << 30))} anonymous shared mapping (the Python side "
        f"a `DmaBuffer`, mapped piece by piece with `Iommu.map(address, iova, size=..., unsafe_address=True)`), "
        "every page faulted in beforehand, each round maps every piece then unmaps each; the device is attached "
        "to the IOAS (intel vIOMMU), IOVAs from 4 GiB up. The 4 KiB-piece case maps a fixed "
        f"{_size(cfg.get('dma_small_total', 0))} subset ({cfg.get('dma_small_total', 0) // 4096} pieces), the "
        "same for C and Python: all 262144 pieces of 1 GiB take minutes per round under TCG; the plain-Python "
        "floor rows issue the same ioctls from a bare loop in the same "
        "process. Live update: untimed warm-up sessions first, then per sample three sessions, `bench-py-K` "
        "(pyvfio_lu), `bench-c-K` (C) and `bench-floor-K` (plain Python: `os.*` and `lib.pvl_ioctl`), preserved "
        "in rotating order before the kexec and retrieved in the same order after it, each of "
        f"{cfg.get('lu_files', '?')} memfds of 4 KiB holding `file-data-<i>` (as the kernel's "
        "`luo_stress_files` selftest); the time spans opening /dev/liveupdate to the last close, not the holder "
        "process. Imports: `python -S -X importtime -c 'import X'` (no site, the package and cffi on PYTHONPATH, "
        "as a deployed VMM starts) in fresh processes after one warm-up that writes the bytecode cache (as an "
        "installed package has it).",
        "",
        *blackout_markdown(results),
        *rss_markdown(results),
        "## Where the Python time goes",
        "",
        *analysis(results),
        "",
        "![Python/C ratios and import times](chart.png)",
        "",
        "Raw data: `results.json` (every repeat, the profiles, the import breakdowns) in the run's directory.",
    ]
    return "\n".join(lines) + "\n"


def against(results: dict[str, Any], baseline: dict[str, Any]) -> str:
    """A markdown section: this run's Python figures next to a baseline run's (e.g. before and
    after a library change benchmarked with --pythonpath)."""
    meta = baseline.get("meta", {})
    lines = [(f"## Against the baseline run {meta.get('timestamp', '?')} (pyvfio-lu {meta.get('git', '?')}, "
             f"`{meta.get('command', '?')}`)"), "",
             "| Benchmark | Python, baseline | Python, this run | Change | Python/C, baseline | Python/C, this run |",
             "|---|---|---|---|---|---|"]
    base = {r["key"]: r for r in baseline.get("rows", [])}
    for r in results["rows"]:
        b = base.get(r["key"])
        if not b:
            continue
        unit = "/call" if r["per"] == "op" else ""
        change = (r["python_median_ns"] - b["python_median_ns"]) / b["python_median_ns"] * 100
        lines.append(f"| {r['label']} | {fmt_ns(b['python_median_ns'])}{unit} | {fmt_ns(r['python_median_ns'])}{unit} "
                     f"| {change:+.0f}% | {b['ratio']:.2f}x | **{r['ratio']:.2f}x** |")
    base_imp = {r["module"]: r for r in baseline.get("import_rows", [])}
    for r in results.get("import_rows") or []:
        b = base_imp.get(r["module"])
        if b:
            change = (r["guest_best_ns"] - b["guest_best_ns"]) / b["guest_best_ns"] * 100
            lines.append(f"| `import {r['module']}` (guest, best) | {fmt_ns(b['guest_best_ns'])} "
                         f"| {fmt_ns(r['guest_best_ns'])} | {change:+.0f}% | — | — |")
    return "\n".join(lines) + "\n"


# --- chart -------------------------------------------------------------------------------------
def chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rws = results["rows"]
    imp = results.get("import_rows") or []
    fig, axes = plt.subplots(1, 2, figsize=(15, max(5, 0.42 * len(rws) + 1.5)),
                             gridspec_kw={"width_ratios": [2.2, 1]})
    ax = axes[0]
    labels = [r["label"].replace("**", "").replace("`", "") for r in rws]
    ratios = [r["ratio"] for r in rws]
    colors = ["#9e9e9e" if r["met"] is None else ("#2e7d32" if r["met"] else "#c62828") for r in rws]
    y = list(range(len(rws)))[::-1]
    ax.barh(y, ratios, color=colors)
    for yi, r in zip(y, rws):
        ax.text(r["ratio"] * 1.04, yi, f"{r['ratio']:.2f}x", va="center", fontsize=8)
        if r["target"]:
            ax.plot([r["target"], r["target"]], [yi - 0.4, yi + 0.4], color="black", lw=2)
    ax.axvline(1.0, color="#555", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=8)
    ax.set_xlabel("Python / C (median; log scale). Black tick: target. Green met, red missed, grey reference")
    ax.set_title("pyvfio_lu vs C in the guest (QEMU TCG)")
    ax2 = axes[1]
    if imp:
        names = [r["module"] for r in imp]
        yis = list(range(len(imp)))[::-1]
        ax2.barh([v + 0.2 for v in yis], [r["guest_best_ns"] / 1e6 for r in imp], height=0.4, label="guest (TCG)",
                 color="#1565c0")
        ax2.barh([v - 0.2 for v in yis], [(r["host_best_ns"] or 0) / 1e6 for r in imp], height=0.4, label="host",
                 color="#90caf9")
        ax2.axvline(IMPORT_TARGET_NS / 1e6, color="black", lw=1.5, ls="--", label="target 25 ms (import pyvfio_lu)")
        ax2.set_yticks(yis)
        ax2.set_yticklabels([f"import {n}" for n in names], fontsize=8)
        ax2.set_xlabel("ms, best of N fresh processes")
        ax2.set_title("Cold import")
        ax2.legend(fontsize=8)
    else:
        ax2.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- the blackout ---------------------------------------------------------------------------------
BLACKOUT_STEPS = (("start", "main", "process start to the first line (interpreter and its start-up; C: exec)"),
                  ("main", "session", "imports (Python) and LIVEUPDATE_IOCTL_RETRIEVE_SESSION"),
                  ("session", "bound", "retrieve the fds; the device bound to a new iommufd and attached"),
                  ("bound", "mapped", "guest RAM mapped (IOMMU_IOAS_MAP_FILE)"),
                  ("mapped", "dma", "bus master on, first DMA done (edu's DMA timer is 100 ms of it)"))


def blackout_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    """Median per step and in all, for Python and C; the floors; the target on Python's total."""
    b = results.get("blackout") or {}
    if not b.get("python") or not b.get("c"):
        return None
    import statistics

    def med(samples: list[dict[str, int]], a: str, z: str) -> float:
        return statistics.median(s[z] - s[a] for s in samples)

    steps = [{"from": a, "to": z, "what": what, "python_ns": med(b["python"], a, z), "c_ns": med(b["c"], a, z)}
             for a, z, what in BLACKOUT_STEPS]
    total_py, total_c = med(b["python"], "start", "dma"), med(b["c"], "start", "dma")
    spread = [s["dma"] - s["start"] for s in b["python"]]
    return {"device": b.get("device"), "samples": len(b["python"]), "steps": steps,
            "python_total_ns": total_py, "c_total_ns": total_c,
            "python_min_ns": min(spread), "python_max_ns": max(spread),
            "python_floor_ns": statistics.median(b["python_floor"]) if b.get("python_floor") else None,
            "c_floor_ns": statistics.median(b["c_floor"]) if b.get("c_floor") else None,
            "target_ns": BLACKOUT_TARGET_NS, "met": total_py <= BLACKOUT_TARGET_NS}


def blackout_markdown(results: dict[str, Any]) -> list[str]:
    s = results.get("blackout_summary")
    if not s:
        return []
    what = "guest RAM and the edu device" if s["device"] else "guest RAM only (this kernel cannot preserve devices)"
    lines = ["## The blackout after the kexec", "",
             (f"A fresh process in the new kernel, from its start to the device DMA-ready again ({what}): "
              f"median of {s['samples']} samples per side, each with its own session"
              + (" and edu device" if s["device"] else "") + ", Python and C alternating. Python runs "
              "`python -S benchmarks/blackout.py` (no site, the package and cffi on PYTHONPATH, as a deployed "
              "VMM starts); C runs `bench blackout`. The devices were bound to vfio-pci beforehand, untimed (the "
              "host does it at boot)."), "",
             "| step | Python | C |", "|---|---|---|"]
    for st in s["steps"]:
        lines.append(f"| {st['what']} | {fmt_ns(st['python_ns'])} | {fmt_ns(st['c_ns'])} |")
    verdict = "**met**" if s["met"] else "**missed**"
    total = (f"| **process start to first DMA** | **{fmt_ns(s['python_total_ns'])}** (range "
             f"{fmt_ns(s['python_min_ns'])}-{fmt_ns(s['python_max_ns'])}) | **{fmt_ns(s['c_total_ns'])}** |")
    floor = ("| floor: `python -S -c pass` / `/bin/true`, start to exit | "
             f"{fmt_ns(s['python_floor_ns']) if s['python_floor_ns'] else '—'} | "
             f"{fmt_ns(s['c_floor_ns']) if s['c_floor_ns'] else '—'} |")
    lines += [total, floor, "",
              f"Target: Python's process start to first DMA ≤ {fmt_ns(s['target_ns'])}: {verdict}.", ""]
    bound = blackout_bound(s)
    if bound and not s["met"]:
        lines += [(f"What no Python program could go below here: the interpreter's start to a script's first "
                   f"line ({fmt_ns(bound['start_ns'])}, the first step above) plus the steps as C takes them "
                   f"({fmt_ns(bound['c_steps_ns'])}, of which the edu device's own DMA is most) is "
                   f"{fmt_ns(bound['bound_ns'])}"
                   + (", already over the target under TCG" if bound["bound_ns"] > s["target_ns"] else "")
                   + f". Python's remaining {fmt_ns(bound['library_ns'])} is importing the library and its "
                   "calls; the import is what this project can still cut (see the imports section)."), ""]
    return lines


def blackout_bound(s: dict[str, Any]) -> dict[str, float] | None:
    """The lowest blackout any Python program could have in this run: Python's own start
    (process start to the script's first line) plus C's time for every later step."""
    steps = s.get("steps") or []
    if not steps or steps[0]["from"] != "start":
        return None
    start, c_rest = steps[0]["python_ns"], sum(st["c_ns"] for st in steps[1:])
    return {"start_ns": start, "c_steps_ns": c_rest, "bound_ns": start + c_rest,
            "library_ns": s["python_total_ns"] - start - c_rest}


def rss_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    """Median peak RSS (KiB) with the sessions held and of the empty interpreter; the target
    is on the difference."""
    r = results.get("rss") or {}
    if not r.get("sessions_kib") or not r.get("empty_kib"):
        return None
    import statistics

    held, empty = statistics.median(r["sessions_kib"]), statistics.median(r["empty_kib"])
    return {"sessions": r["sessions"], "held_kib": held, "empty_kib": empty, "above_kib": held - empty,
            "samples": len(r["sessions_kib"]), "target_kib": RSS_TARGET_KIB, "met": held - empty <= RSS_TARGET_KIB}


def rss_markdown(results: dict[str, Any]) -> list[str]:
    s = results.get("rss_summary")
    if not s:
        return []
    verdict = "**met**" if s["met"] else "**missed**"
    return ["## Peak RSS with many sessions", "",
            (f"A fresh Python process creates {s['sessions']} LUO sessions and preserves a 4 KiB memfd in each, all "
             "held at once as before a kexec (then asks each its name, and closes them); against the same script "
             f"doing nothing (an empty interpreter). Peak RSS (`VmHWM` of the process), median of {s['samples']} processes "
             f"each: {s['held_kib'] / 1024:.1f} MiB against {s['empty_kib'] / 1024:.1f} MiB, "
             f"**{s['above_kib'] / 1024:.1f} MiB above** the empty interpreter "
             f"(target ≤ {s['target_kib'] / 1024:.0f} MiB: {verdict})."), ""]


def build(results: dict[str, Any]) -> dict[str, Any]:
    derive(results)
    results["rows"] = compare(results)
    results["import_rows"] = import_rows(results)
    results["blackout_summary"] = blackout_summary(results)
    results["rss_summary"] = rss_summary(results)
    return results


def missing(results: dict[str, Any]) -> list[str]:
    """Benchmarks that produced no numbers (for the smoke check)."""
    have = {r["key"] for r in results["rows"]}
    gone = [r.key for r in rows(results) if r.key not in have]
    for m in ("pyvfio_lu", "pyvfio_lu._cffi", "pyvfio_lu.luo", "pyvfio_lu.vfio"):
        for where in ("host", "guest"):
            if m not in results.get("imports", {}).get(where, {}):
                gone.append(f"import {m} ({where})")
    for r in results["rows"]:
        if not all(v > 0 for v in (r["python_median_ns"], r["c_median_ns"])):
            gone.append(f"{r['key']} (zero time)")
    return gone



__all__ = ["build", "chart", "markdown", "missing"]
