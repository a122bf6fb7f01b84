"""Our C declarations (cdefs/*.py, compiled into pyvfio_lu._cffi) against the kernel's own uAPI.

The oracle is Debian sid's ``linux-libc-dev`` (the 7.2 ``make headers_install`` output),
fetched by the set-up itself into the harness cache, never the machine's /usr/include
(bookworm: 6.1, no liveupdate.h). Everything is enumerated from *our* side: every struct
cffi knows (``ffi.list_types()``) with every field cffi reports (anonymous-union members
and flexible array members included), and every ``#define`` of every cdefs HEADER. One C
probe program including the sid headers prints the kernel's value of each; each test
lists every difference it finds.

Checked per struct: sizeof, alignment; per field: offset, size (element size for a
flexible array), signedness of integers, identity of nested struct types, pointee size;
per constant: its value as C computes it, ``(long long)(NAME)`` (so ``1 << 31`` is
negative, as in C). A second, independent oracle: the hand-checked ioctl table of
kernel-contract.md §0.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from pyvfio_lu._cffi import ffi, lib

KERNEL_HEADERS = {
    "liveupdate": "linux/liveupdate.h",
    "vfio": "linux/vfio.h",
    "iommufd": "linux/iommufd.h",
}
_STRUCT = re.compile(r"^struct\s+(\w+)\s*\{", re.M)
_DEFINE_VALUE = re.compile(r"^#define\s+(\w+)\s+(\S.*)$", re.M)


# --- what we declare ------------------------------------------------------------------------
def declared_structs(header: str) -> list[str]:
    return _STRUCT.findall(header)


def ioctl_names(header: str) -> set[str]:
    return {name for name, value in _DEFINE_VALUE.findall(header) if value.startswith("_IO(")}


@dataclass(frozen=True)
class Check:
    module: str
    what: str  # human-readable: "struct vfio_irq_set: sizeof", "VFIO_TYPE"
    kind: str  # "struct", "offset", "field", "constant"
    expr: str  # the C expression, printed as (long long)
    ours: int


def _signed(ctype) -> bool:
    return int(ffi.cast(ctype, -1)) < 0


def struct_checks(module: str, name: str) -> list[Check]:
    ctype = ffi.typeof(f"struct {name}")
    s = f"struct {name}"
    out = [
        Check(module, f"{s}: sizeof", "struct", f"sizeof({s})", ffi.sizeof(ctype)),
        Check(module, f"{s}: alignment", "struct", f"_Alignof({s})", ffi.alignof(ctype)),
    ]
    for field, info in ctype.fields:
        member = f"(({s} *)0)->{field}"
        where = f"{s}.{field}"
        if info.bitsize != -1:
            raise AssertionError(f"{where} is a bit-field; teach this test to check it")
        out.append(Check(module, f"{where}: offset", "offset", f"offsetof({s}, {field})",
                         ffi.offsetof(ctype, field)))
        t = info.type
        elem = member
        if t.kind == "array":
            elem = f"{member}[0]"
            base = t.item
            if t.length is None:  # flexible array member: no sizeof in C
                out.append(Check(module, f"{where}[]: element size", "field", f"sizeof({elem})",
                                 ffi.sizeof(base)))
            else:
                out.append(Check(module, f"{where}: size", "field", f"sizeof({member})", ffi.sizeof(t)))
                out.append(Check(module, f"{where}: element size", "field", f"sizeof({elem})",
                                 ffi.sizeof(base)))
        else:
            base = t
            out.append(Check(module, f"{where}: size", "field", f"sizeof({member})", ffi.sizeof(t)))
        if base.kind == "primitive":
            out.append(Check(module, f"{where}: signedness (1 = signed)", "field",
                             f"((__typeof__({elem}))-1 < 0)", int(_signed(base))))
        elif base.kind == "struct":
            out.append(Check(module, f"{where}: is a {base.cname}", "field",
                             f"__builtin_types_compatible_p(__typeof__({elem}), {base.cname})", 1))
        elif base.kind == "pointer":
            out.append(Check(module, f"{where}: pointee size", "field", f"sizeof(*{elem})",
                             ffi.sizeof(base.item)))
        else:
            raise AssertionError(f"{where} has a {base.kind} type; teach this test to check it")
    return out


def constant_checks(module: str, names: list[str]) -> list[Check]:
    return [Check(module, name, "constant", f"(long long)({name})", getattr(lib, name)) for name in names]


# --- the kernel's side ----------------------------------------------------------------------
@dataclass
class Probe:
    source: str  # "linux-libc-dev 7.2.13-1 (Debian sid)"
    checks: list[Check]
    kernel: dict[int, int]  # index into checks -> the kernel's value
    absent: dict[int, str]  # index into checks -> gcc's error (not in the kernel header)

    def differences(self, module: str | None = None) -> list[str]:
        out = []
        for i, c in enumerate(self.checks):
            if module is not None and c.module != module:
                continue
            if i in self.absent:
                out.append(f"{c.what}: ours {c.ours}, the kernel header does not declare it ({self.absent[i]})")
            elif self.kernel[i] != c.ours:
                out.append(f"{c.what}: ours {c.ours}, kernel {self.kernel[i]}")
        return out


def _sid_headers() -> tuple[Path, str]:
    """(extracted usr/include of sid's linux-libc-dev, 'linux-libc-dev <version>')."""
    if not (shutil.which("apt-get") and shutil.which("apt-cache") and shutil.which("dpkg-deb")):
        pytest.skip("the ABI oracle is Debian sid's linux-libc-dev: needs apt-get, apt-cache and dpkg-deb")
    from pyvfio_lu.vm import debian
    from pyvfio_lu.vm.cache import cache_root, locked

    root = cache_root()
    with locked(root / "uapi.lock"):
        deb = debian.download(root / "debian", "linux-libc-dev", refresh=False)
        dest = debian.extract(deb, root / "uapi" / deb.stem)
    version = deb.name.split("_")[1].replace("%3a", ":")
    return dest / "usr" / "include", f"linux-libc-dev {version} (Debian {debian.SUITE})"


def _probe_source(checks: list[Check], skip: set[int]) -> tuple[str, dict[int, int]]:
    """The probe's C text, and line number -> check index."""
    lines = ["#include <stddef.h>", "#include <stdio.h>"]
    lines += [f"#include <{h}>" for h in KERNEL_HEADERS.values()]
    lines += [
        "#if !defined(LIVEUPDATE_IOCTL_TYPE) || !defined(IOMMU_IOAS_MAP_FILE)",
        '#error "these are not the 7.x uAPI headers (no LIVEUPDATE_IOCTL_TYPE / IOMMU_IOAS_MAP_FILE)"',
        "#endif",
        "int main(void)",
        "{",
    ]
    line_of = {}
    for i, c in enumerate(checks):
        if i in skip:
            continue
        lines.append(f'    printf("%d %lld\\n", {i}, (long long)({c.expr}));')
        line_of[len(lines)] = i
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines), line_of


def _compile(include: Path, checks: list[Check], workdir: Path) -> Probe:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc to compile the ABI probe")
    triplet = subprocess.run([gcc, "-print-multiarch"], capture_output=True, text=True).stdout.strip()
    arch_dir = include / triplet
    assert (arch_dir / "asm" / "types.h").is_file(), f"no {triplet}/asm in {include}: unexpected package layout"
    # sid's dirs come before the system's, so <linux/...> and <asm/...> resolve there.
    env = dict(os.environ, LC_ALL="C")  # plain quotes in gcc's messages
    flags = [f"-I{arch_dir}", f"-I{include}", "-std=gnu11", "-O0", "-w", "-fdiagnostics-plain-output"]
    src = workdir / "abi_probe.c"
    exe = workdir / "abi_probe"
    absent: dict[int, str] = {}
    for _ in range(3):
        text, line_of = _probe_source(checks, set(absent))
        src.write_text(text)
        proc = subprocess.run([gcc, *flags, "-o", str(exe), str(src)], capture_output=True, text=True, env=env)
        if proc.returncode == 0:
            break
        failed = {}
        for m in re.finditer(rf"^{re.escape(str(src))}:(\d+):\d+: (?:error|note): (.*)$", proc.stderr, re.M):
            i = line_of.get(int(m.group(1)))
            if i is not None and i not in failed:
                failed[i] = m.group(2)
        if not failed:
            pytest.fail(f"the ABI probe does not compile against {include}:\n{proc.stderr[-4000:]}")
        absent.update(failed)
    else:
        pytest.fail(f"the ABI probe still does not compile:\n{proc.stderr[-4000:]}")

    # Where did <linux/*.h> and <asm/*.h> come from? All of them must be sid's.
    deps = subprocess.run([gcc, *flags, "-M", str(src)], capture_output=True, text=True, check=True,
                          env=env).stdout
    paths = [Path(p) for p in deps.replace("\\\n", " ").split()[1:]]
    kernel_deps = [p for p in paths if re.search(r"/(linux|asm|asm-generic)/", str(p))]
    package = include.parent.parent.resolve()  # sid's asm/* are symlinks into its usr/lib/linux/uapi
    foreign = [str(p) for p in kernel_deps if not p.resolve().is_relative_to(package)]
    assert kernel_deps and not foreign, f"kernel headers taken from outside {package}: {foreign}"

    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    kernel = {int(i): int(v) for i, v in (line.split() for line in out.splitlines())}
    return Probe("", checks, kernel, absent)


def all_checks(build) -> list[Check]:
    checks = []
    for module in KERNEL_HEADERS:
        header = build.headers[module]
        for name in declared_structs(header):
            checks += struct_checks(module, name)
        checks += constant_checks(module, build.declared_constants(header))
    return checks


@pytest.fixture(scope="module")
def probe(cdefs_build, tmp_path_factory, abi_report) -> Probe:
    include, source = _sid_headers()
    result = _compile(include, all_checks(cdefs_build), tmp_path_factory.mktemp("abi"))
    result.source = source
    abi_report["_source"] = source
    return result


# --- the tests ------------------------------------------------------------------------------
@pytest.mark.parametrize("module", list(KERNEL_HEADERS))
def test_declarations_identical_to_kernel_uapi_header(module, probe, cdefs_build, abi_report, record_property):
    header = cdefs_build.headers[module]
    mine = [c for c in probe.checks if c.module == module]
    structs = declared_structs(header)
    constants = cdefs_build.declared_constants(header)
    counts = {
        "structs": len(structs),
        "fields": sum(len(ffi.typeof(f"struct {s}").fields) for s in structs),
        "offsets": sum(c.kind == "offset" for c in mine),
        "constants": len(constants),
        "ioctls": len(ioctl_names(header)),
    }
    diffs = probe.differences(module)
    counts["differences"] = len(diffs)
    abi_report[module] = counts
    for key, value in counts.items():
        record_property(f"abi_{module}_{key}", value)
    assert counts["offsets"] == counts["fields"]
    assert not diffs, (
        f"{len(diffs)} difference(s) between cdefs/{module}.py and <{KERNEL_HEADERS[module]}> of "
        f"{probe.source}:\n  " + "\n  ".join(diffs))


def test_cross_check_covers_every_struct_and_constant(probe, cdefs_build):
    typedefs, structs, unions = ffi.list_types()
    assert typedefs == [] and unions == [], "named typedefs/unions: teach the ABI test to check them"
    declared = {s for m in KERNEL_HEADERS for s in declared_structs(cdefs_build.headers[m])}
    assert set(structs) == declared, "ffi structs and the cdefs HEADER structs differ"
    assert not _STRUCT.findall(cdefs_build.helpers.CDEF), "the helper module declares structs"

    constants = {n for m in KERNEL_HEADERS for n in cdefs_build.declared_constants(cdefs_build.headers[m])}
    on_lib = {n for n in dir(lib) if isinstance(getattr(lib, n), int) and not n.startswith("PVL_")}
    assert on_lib == constants, (
        f"integer constants on lib but in no HEADER: {sorted(on_lib - constants)}; "
        f"in a HEADER but not on lib (stale extension?): {sorted(constants - on_lib)}")

    checked_structs = {c.what.split(":")[0] for c in probe.checks if c.kind == "struct"}
    assert checked_structs == {f"struct {s}" for s in structs}
    offsets = {c.what for c in probe.checks if c.kind == "offset"}
    for s in structs:
        for field, _ in ffi.typeof(f"struct {s}").fields:
            assert f"struct {s}.{field}: offset" in offsets
    assert {c.what for c in probe.checks if c.kind == "constant"} == constants
    answered = set(probe.kernel) | set(probe.absent)
    assert answered == set(range(len(probe.checks))), "the probe did not answer every check"


def test_cross_check_sees_anonymous_union_members_and_flexible_arrays(probe):
    whats = {c.what for c in probe.checks}
    for member in ("struct vfio_pci_dependent_device.group_id", "struct vfio_pci_dependent_device.devid",
                   "struct iommu_hw_info.in_data_type", "struct iommu_hw_info.out_data_type"):
        assert f"{member}: offset" in whats
    for flexible in ("struct vfio_irq_set.data", "struct vfio_pci_hot_reset_info.devices",
                     "struct vfio_pci_hot_reset.group_fds", "struct vfio_region_info_cap_sparse_mmap.areas"):
        assert f"{flexible}[]: element size" in whats


def test_negative_constants_compare_as_c_computes_them(probe):
    by_name = {c.what: i for i, c in enumerate(probe.checks) if c.kind == "constant"}
    assert lib.VFIO_PCI_DEVID_NOT_OWNED == -1
    assert lib.VFIO_REGION_TYPE_PCI_VENDOR_TYPE == -(1 << 31)
    assert probe.kernel[by_name["VFIO_PCI_DEVID_NOT_OWNED"]] == -1
    assert probe.kernel[by_name["VFIO_REGION_TYPE_PCI_VENDOR_TYPE"]] == -(1 << 31)


# kernel-contract.md §0, hand-checked: an oracle independent of any header.
CONTRACT_IOCTLS = {
    "LIVEUPDATE_IOCTL_CREATE_SESSION": 0xBA00,
    "LIVEUPDATE_IOCTL_RETRIEVE_SESSION": 0xBA01,
    "LIVEUPDATE_SESSION_PRESERVE_FD": 0xBA40,
    "LIVEUPDATE_SESSION_RETRIEVE_FD": 0xBA41,
    "LIVEUPDATE_SESSION_FINISH": 0xBA42,
    "LIVEUPDATE_SESSION_GET_NAME": 0xBA43,
    "VFIO_GET_API_VERSION": 0x3B64,
    "VFIO_CHECK_EXTENSION": 0x3B65,
    "VFIO_SET_IOMMU": 0x3B66,
    "VFIO_GROUP_GET_STATUS": 0x3B67,
    "VFIO_GROUP_SET_CONTAINER": 0x3B68,
    "VFIO_GROUP_UNSET_CONTAINER": 0x3B69,
    "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A,
    "VFIO_DEVICE_GET_INFO": 0x3B6B,
    "VFIO_DEVICE_GET_REGION_INFO": 0x3B6C,
    "VFIO_DEVICE_GET_IRQ_INFO": 0x3B6D,
    "VFIO_DEVICE_SET_IRQS": 0x3B6E,
    "VFIO_DEVICE_RESET": 0x3B6F,
    "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO": 0x3B70,
    "VFIO_DEVICE_PCI_HOT_RESET": 0x3B71,
    "VFIO_DEVICE_QUERY_GFX_PLANE": 0x3B72,
    "VFIO_DEVICE_GET_GFX_DMABUF": 0x3B73,
    "VFIO_DEVICE_IOEVENTFD": 0x3B74,
    "VFIO_DEVICE_FEATURE": 0x3B75,
    "VFIO_DEVICE_BIND_IOMMUFD": 0x3B76,
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT": 0x3B77,
    "VFIO_DEVICE_DETACH_IOMMUFD_PT": 0x3B78,
    "VFIO_MIG_GET_PRECOPY_INFO": 0x3B79,
    "VFIO_IOMMU_GET_INFO": 0x3B70,
    "VFIO_IOMMU_MAP_DMA": 0x3B71,
    "VFIO_IOMMU_UNMAP_DMA": 0x3B72,
    "VFIO_IOMMU_ENABLE": 0x3B73,
    "VFIO_IOMMU_DISABLE": 0x3B74,
    "VFIO_IOMMU_DIRTY_PAGES": 0x3B75,
    "IOMMU_DESTROY": 0x3B80,
    "IOMMU_IOAS_ALLOC": 0x3B81,
    "IOMMU_IOAS_ALLOW_IOVAS": 0x3B82,
    "IOMMU_IOAS_COPY": 0x3B83,
    "IOMMU_IOAS_IOVA_RANGES": 0x3B84,
    "IOMMU_IOAS_MAP": 0x3B85,
    "IOMMU_IOAS_UNMAP": 0x3B86,
    "IOMMU_OPTION": 0x3B87,
    "IOMMU_VFIO_IOAS": 0x3B88,
    "IOMMU_HWPT_ALLOC": 0x3B89,
    "IOMMU_GET_HW_INFO": 0x3B8A,
    "IOMMU_IOAS_MAP_FILE": 0x3B8F,
}

CONTRACT_SIZES = {
    "liveupdate_ioctl_create_session": 72,
    "liveupdate_ioctl_retrieve_session": 72,
    "liveupdate_session_preserve_fd": 16,
    "liveupdate_session_retrieve_fd": 16,
    "liveupdate_session_finish": 8,
    "liveupdate_session_get_name": 72,
    "vfio_group_status": 8,
    "vfio_device_info": 24,
    "vfio_region_info": 32,
    "vfio_irq_info": 16,
    "vfio_irq_set": 20,
    "vfio_pci_hot_reset_info": 12,
    "vfio_pci_dependent_device": 8,
    "vfio_pci_hot_reset": 12,
    "vfio_device_ioeventfd": 32,
    "vfio_device_feature": 8,
    "vfio_device_bind_iommufd": 24,
    "vfio_device_attach_iommufd_pt": 16,
    "vfio_device_detach_iommufd_pt": 12,
    "vfio_precopy_info": 24,
    "vfio_iommu_type1_info": 24,
    "vfio_iommu_type1_dma_map": 32,
    "vfio_iommu_type1_dma_unmap": 24,
    "vfio_bitmap": 24,
    "vfio_iommu_type1_dirty_bitmap": 8,
    "iommu_destroy": 8,
    "iommu_ioas_alloc": 12,
    "iommu_ioas_allow_iovas": 24,
    "iommu_ioas_copy": 40,
    "iommu_ioas_iova_ranges": 32,
    "iommu_ioas_map": 40,
    "iommu_ioas_unmap": 24,
    "iommu_option": 24,
    "iommu_vfio_ioas": 12,
    "iommu_hwpt_alloc": 48,
    "iommu_hw_info": 40,
    "iommu_ioas_map_file": 40,
}


def test_every_ioctl_number_equals_the_contract_table(cdefs_build):
    declared = set().union(*(ioctl_names(cdefs_build.headers[m]) for m in KERNEL_HEADERS))
    assert declared == set(CONTRACT_IOCTLS), (
        f"not in the §0 table: {sorted(declared - set(CONTRACT_IOCTLS))}; "
        f"in the table, not declared: {sorted(set(CONTRACT_IOCTLS) - declared)}")
    wrong = {n: (hex(getattr(lib, n)), hex(v)) for n, v in CONTRACT_IOCTLS.items() if getattr(lib, n) != v}
    assert not wrong, f"ours vs kernel-contract.md §0: {wrong}"


def test_every_ioctl_number_is_io_with_no_size_or_direction():
    for name in CONTRACT_IOCTLS:
        assert getattr(lib, name) >> 16 == 0, f"{name} = {getattr(lib, name):#x} encodes a direction or size"


def test_struct_sizes_equal_the_contract_table():
    wrong = {s: (ffi.sizeof(f"struct {s}"), n) for s, n in CONTRACT_SIZES.items() if ffi.sizeof(f"struct {s}") != n}
    assert not wrong, f"sizeof ours vs kernel-contract.md §0: {wrong}"
