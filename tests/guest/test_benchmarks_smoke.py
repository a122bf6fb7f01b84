"""The benchmarks' single-boot parts (benchmarks/guest.py) in smoke mode: cold imports,
bench.c built with the guest's (the host's) gcc against cdefs, ioctl round trips, MMIO,
a small DMA map/unmap, the calibration and the profiles, each through pyvfio_lu and C.

Nothing about speed is asserted, only that every benchmark ran on both sides and produced
numbers. The live-update benchmark needs a kexec of its own, so it is left to
``python -m benchmarks`` (no second boot in CI)."""

from __future__ import annotations

import json

from benchmarks import guest, imports, report

PY_ONLY = {"ioctl_get_info_raw", "ioctl_get_info_floor", "ioctl_get_name_raw", "ioctl_get_name_floor",
           "mmio_read32_floor", "python_loop", "dma_map_floor_2097152", "dma_unmap_floor_2097152",
           "dma_map_floor_4096", "dma_unmap_floor_4096", "mmio_read32_memoryview", "mmio_read_block",
           "mmio_write_block", "dma_map_batch_2097152", "dma_unmap_batch_2097152", "dma_map_batch_4096",
           "dma_unmap_batch_4096", "dma_map_batch_full", "dma_unmap_batch_full"}
BOTH = {"ioctl_get_info", "ioctl_get_name", "mmio_read32", "mmio_write32", "calib_fionread", "mmio_poll",
        "dma_map_2097152", "dma_unmap_2097152", "dma_map_4096", "dma_unmap_4096"}
C_ONLY = {"dma_map_full", "dma_unmap_full"}  # the full 1 GiB in 4 KiB pieces: Python maps it only in batch


def _check_sample(name: str, sample: dict, repeats: int) -> None:
    assert sample is not None, f"{name}: no sample"
    assert sample["iters"] > 0, name
    assert len(sample["ns"]) == repeats, f"{name}: {len(sample['ns'])} repeats, expected {repeats}"
    assert all(isinstance(t, int) and t > 0 for t in sample["ns"]), f"{name}: {sample['ns']}"


def test_benchmarks_smoke(tmp_path):
    cfg = guest.SMOKE
    res = guest.single_boot(cfg, tmp_path, log=lambda msg: None)

    assert (tmp_path / "c" / "bench").exists()
    assert res["facts"]["c_build"]["warnings"] == "", res["facts"]["c_build"]["warnings"]
    for name in BOTH | PY_ONLY:  # Python's samples (and C's where C has the same)
        rounds = cfg.dma_big_rounds if name.endswith("2097152") else (
            cfg.dma_small_rounds if name.endswith("_4096") else
            cfg.dma_full_rounds if name.endswith("_full") else cfg.repeats * cfg.alternations)
        _check_sample(f"python {name}", res["python"].get(name), rounds)
        if name in BOTH:
            _check_sample(f"C {name}", res["c"].get(name), rounds)
            assert res["c"][name]["iters"] == res["python"][name]["iters"], name
    for name in C_ONLY:
        _check_sample(f"C {name}", res["c"].get(name), cfg.dma_full_rounds)
        batch = res["python"].get(name.replace("_full", "_batch_full"))
        assert batch is not None and res["c"][name]["iters"] == batch["iters"], name
    assert set(res["imports"]) == set(imports.MODULES)
    for module, m in res["imports"].items():
        assert m["best_ns"] > 0 and len(m["wall_ns"]) == cfg.import_n, module
    assert {"ioctl_get_info", "mmio_read32", "dma_4096", "ioctl_get_name"} <= set(res["profiles"])

    # the host-side report accepts what the guest produced (the chart is left to the host run)
    results = {"meta": {"timestamp": "smoke", "smoke": True, "command": "pytest", "memory": "?", "git": "?"},
               "config": {"dma_big_total": cfg.dma_big_total, "dma_small_total": cfg.dma_small_total,
                          "dma_full_total": cfg.dma_full_total},
               "facts": res["facts"], "guest": {}, "python": res["python"], "c": res["c"], "lu": {},
               "imports": {"host": {}, "guest": res["imports"]}, "profiles": res["profiles"]}
    report.build(results)
    keys = {r["key"] for r in results["rows"]}
    assert {"ioctl_get_info", "ioctl_get_name", "mmio_read32", "dma_2097152_total", "dma_4096_total",
            "calib_guest", "dma_2097152_batch", "dma_4096_batch", "dma_full_batch", "mmio_read_block",
            "mmio_write_block", "mmio_poll", "mmio_read32_memoryview"} <= keys
    assert all(r["ratio"] > 0 for r in results["rows"])
    assert "| VFIO_DEVICE_GET_INFO" in report.markdown(results)
    json.dumps(results)
