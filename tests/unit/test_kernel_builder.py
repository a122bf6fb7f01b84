"""The kernel builder's pure parts: patch application onto a tree (with the real ``patch``),
cache keys, the vfio-lu fragment's checks, finding a cached image. No kernel is built."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from pyvfio_lu.vm import kernel


def _tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    (tree / "drivers").mkdir(parents=True)
    (tree / "drivers" / "a.c").write_text("int a(void)\n{\n\treturn 1;\n}\n")
    return tree


def _patch(old: str, new: str, path: str = "drivers/a.c") -> str:
    return (f"diff --git a/{path} b/{path}\n--- a/{path}\n+++ b/{path}\n@@ -1,4 +1,4 @@\n int a(void)\n {{\n"
            f"-\treturn {old};\n+\treturn {new};\n }}\n")


def test_patches_apply_in_file_name_order_and_break_hard_links(tmp_path):
    pristine = _tree(tmp_path)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-al", str(pristine), str(copy)], check=True)
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "02-second.patch").write_text(_patch("2", "3"))
    (patches / "01-first.patch").write_text(_patch("1", "2"))
    (patches / "README").write_text("not a patch")
    files = kernel.patch_files(patches)
    assert [f.name for f in files] == ["01-first.patch", "02-second.patch"]
    report = kernel.apply_patches(copy, files, tmp_path / "log")
    assert report == ["01-first.patch: clean", "02-second.patch: clean"]
    assert "return 3;" in (copy / "drivers" / "a.c").read_text()
    assert "return 1;" in (pristine / "drivers" / "a.c").read_text()  # the pristine tree is untouched


def test_a_patch_that_does_not_apply_is_named_with_its_hunk(tmp_path):
    tree = _tree(tmp_path)
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "01-ok.patch").write_text(_patch("1", "2"))
    (patches / "02-bad.patch").write_text(_patch("7", "8"))
    with pytest.raises(kernel.KernelBuildError, match=r"patch 2/2 02-bad.patch does not apply.*\n.*FAILED"):
        kernel.apply_patches(tree, kernel.patch_files(patches), tmp_path / "log")


def test_not_a_diff_and_empty_directories_are_refused(tmp_path):
    (tmp_path / "p").mkdir()
    with pytest.raises(kernel.KernelBuildError, match="holds no patch"):
        kernel.patch_files(tmp_path / "p")
    with pytest.raises(kernel.KernelBuildError, match="does not exist"):
        kernel.patch_files(tmp_path / "missing")
    (tmp_path / "p" / "01.patch").write_text("just a mail\n")
    with pytest.raises(kernel.KernelBuildError, match="holds no diff"):
        kernel.apply_patches(_tree(tmp_path), kernel.patch_files(tmp_path / "p"), tmp_path / "log")


def test_touched_files():
    assert kernel.touched_files(_patch("1", "2") + "--- /dev/null\n+++ b/new.c\t2026\n") == ["drivers/a.c", "new.c"]


def test_cache_key_follows_the_patches_text(tmp_path):
    patches = tmp_path / "patches"
    patches.mkdir()
    (patches / "01.patch").write_text(_patch("1", "2"))
    k1 = kernel.input_key(kernel.VFIO_LU, patches)
    assert kernel.input_key(kernel.VFIO_LU, patches) == k1
    (patches / "01.patch").write_text(_patch("1", "4"))
    assert kernel.input_key(kernel.VFIO_LU, patches) != k1
    assert kernel.input_key(kernel.UPSTREAM) == kernel.fragment_hash(kernel.UPSTREAM)
    assert kernel.fragment_hash(kernel.VFIO_LU) != kernel.fragment_hash(kernel.UPSTREAM)


def test_vfio_lu_fragment_is_checked(tmp_path):
    wanted = kernel.wanted_symbols(kernel.VFIO_LU)
    assert wanted["CONFIG_PCI_LIVEUPDATE"] == wanted["CONFIG_VFIO_PCI_LIVEUPDATE"] == "y"
    assert wanted["CONFIG_CARDBUS"] == "n"
    good = "\n".join(f"{k}={v}" for k, v in wanted.items() if v != "n")
    assert kernel.check_config(good, kernel.VFIO_LU) == []
    dropped = good.replace("CONFIG_PCI_LIVEUPDATE=y", "# CONFIG_PCI_LIVEUPDATE is not set")
    assert kernel.check_config(dropped, kernel.VFIO_LU) == ["CONFIG_PCI_LIVEUPDATE: wanted y, got n"]
    assert kernel.check_config(good.replace("CONFIG_VFIO_PCI_LIVEUPDATE=y", ""), kernel.UPSTREAM) == []


def test_find_cached_by_flavour(tmp_path, monkeypatch):
    monkeypatch.setenv("PYVFIO_LU_CACHE", str(tmp_path))
    assert kernel.find_cached(kernel.VFIO_LU) is None
    for name, flavour in (("7.2.13-1-aaa", kernel.UPSTREAM), ("7.2.13-1-vfio-lu-bbb", kernel.VFIO_LU)):
        entry = tmp_path / "kernel" / name
        entry.mkdir(parents=True)
        (entry / "bzImage").write_bytes(b"k")
        (entry / "build-info.json").write_text(json.dumps(
            {"version": "7.2.13-1", "flavour": flavour, "fragments": kernel.fragment_hash(flavour), "release": "7.2.13"}))
    found = kernel.find_cached(kernel.VFIO_LU)
    assert found is not None and found.flavour == kernel.VFIO_LU and found.bzimage.parent.name.endswith("bbb")
    assert kernel.build(flavour=kernel.VFIO_LU).bzimage == found.bzimage  # no patches given: the cached one


def test_vfio_lu_without_patches_or_cache_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("PYVFIO_LU_CACHE", str(tmp_path))
    monkeypatch.delenv("PYVFIO_LU_KERNEL_PATCHES", raising=False)
    monkeypatch.delenv("PYVFIO_LU_KERNEL_TREE", raising=False)
    with pytest.raises(kernel.KernelBuildError, match="--patches DIR"):
        kernel.build(flavour=kernel.VFIO_LU)
    with pytest.raises(kernel.KernelBuildError, match="for the vfio-lu flavour"):
        kernel.build(flavour=kernel.UPSTREAM, patches=tmp_path)
    assert kernel.main(["--flavour", "vfio-lu", "--cached"]) == 3
