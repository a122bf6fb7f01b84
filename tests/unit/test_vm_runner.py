"""The guest runner's pure logic: cpio writer, QEMU command line, markers, timeouts. No VM."""

from __future__ import annotations

import gzip
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from pyvfio_lu.vm import initramfs, qemu, run
from pyvfio_lu.vm.initramfs import CpioEntry, newc_archive
from pyvfio_lu.vm.qemu import GuestError, GuestTimeout, QemuSpec


def parse_newc(data: bytes) -> list[dict[str, object]]:
    """A minimal newc reader, independent of the writer, for round trips."""
    members = []
    off = 0
    while True:
        assert data[off:off + 6] == b"070701", f"bad magic at {off}"
        fields = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        ino, mode, uid, _gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, _ = fields
        name_start = off + 110
        name = data[name_start:name_start + namesize - 1].decode()
        assert data[name_start + namesize - 1] == 0
        body = name_start + namesize + (-(110 + namesize) % 4)
        assert (body - off) % 4 == 0
        content = data[body:body + size]
        off = body + size + (-size % 4)
        if name == "TRAILER!!!":
            assert off == len(data)
            return members
        members.append({"name": name, "mode": mode, "data": content, "rdev": (rmaj, rmin),
                        "ino": ino, "uid": uid, "mtime": mtime, "nlink": nlink})


SAMPLE = [
    CpioEntry.directory("bin"),
    CpioEntry.file("bin/tool", b"\x7fELF" + bytes(range(256)) * 3, 0o755),
    CpioEntry.symlink("bin/sh", "tool"),
    CpioEntry.directory("dev"),
    CpioEntry.char_device("dev/console", 5, 1),
    CpioEntry.file("init", b"#!/bin/sh\necho hi\n", 0o755),
    CpioEntry.file("odd", b"x"),  # a size needing padding
]


def test_newc_round_trip_by_parsing() -> None:
    data = newc_archive(SAMPLE)
    assert len(data) % 4 == 0
    members = parse_newc(data)
    assert [m["name"] for m in members] == [e.name for e in SAMPLE]
    by_name = {m["name"]: m for m in members}
    assert by_name["bin/tool"]["data"] == SAMPLE[1].data
    assert stat.S_ISREG(by_name["bin/tool"]["mode"]) and by_name["bin/tool"]["mode"] & 0o777 == 0o755
    assert stat.S_ISLNK(by_name["bin/sh"]["mode"]) and by_name["bin/sh"]["data"] == b"tool"
    assert stat.S_ISCHR(by_name["dev/console"]["mode"]) and by_name["dev/console"]["rdev"] == (5, 1)
    assert stat.S_ISDIR(by_name["bin"]["mode"])
    assert len({m["ino"] for m in members}) == len(members)
    assert all(m["uid"] == 0 and m["mtime"] == 0 for m in members)
    assert newc_archive(SAMPLE) == data  # reproducible


@pytest.mark.skipif(shutil.which("cpio") is None, reason="no cpio binary")
def test_newc_round_trip_with_cpio(tmp_path: Path) -> None:
    archive = tmp_path / "a.cpio"
    archive.write_bytes(newc_archive(SAMPLE))
    with archive.open("rb") as fh:
        listing = subprocess.run(["cpio", "-it", "--quiet"], stdin=fh,
                                 capture_output=True, text=True, check=True).stdout.split()
    assert listing == [e.name for e in SAMPLE]
    out = tmp_path / "x"
    out.mkdir()
    with archive.open("rb") as fh:
        subprocess.run(["cpio", "-id", "--quiet", "--no-absolute-filenames"],
                       stdin=fh, cwd=out, check=True,
                       capture_output=True)  # the device node may fail unprivileged: checked below
    assert (out / "bin/tool").read_bytes() == SAMPLE[1].data
    assert (out / "bin/sh").readlink() == Path("tool")
    assert (out / "init").stat().st_mode & 0o111


def test_newc_rejects_empty_name() -> None:
    with pytest.raises(ValueError):
        newc_archive([CpioEntry.file("/", b"")])


def test_build_initramfs_caches_by_inputs(tmp_path: Path) -> None:
    script = tmp_path / "init.sh"
    script.write_text("#!/bin/sh\necho one\n")
    busybox = tmp_path / "busybox"
    busybox.write_bytes(b"not really busybox")
    first = initramfs.build_initramfs(script, busybox, cache=tmp_path / "cache")
    assert first.parent == tmp_path / "cache" / "initramfs"
    mtime = first.stat().st_mtime_ns
    assert initramfs.build_initramfs(script, busybox, cache=tmp_path / "cache") == first
    assert first.stat().st_mtime_ns == mtime
    members = {m["name"]: m for m in parse_newc(gzip.decompress(first.read_bytes()))}
    assert members["init"]["data"] == b"#!/bin/sh\necho one\n"
    assert members["bin/busybox"]["data"] == b"not really busybox"
    for applet in ("sh", "mount", "chroot", "poweroff", "ip", "env"):
        assert members[f"bin/{applet}"]["data"] == b"busybox"
    for d in ("proc", "sys", "dev", "lower", "rw", "newroot"):
        assert stat.S_ISDIR(members[d]["mode"])
    script.write_text("#!/bin/sh\necho two\n")
    second = initramfs.build_initramfs(script, busybox, cache=tmp_path / "cache")
    assert second != first
    busybox.write_bytes(b"another busybox")
    assert initramfs.build_initramfs(script, busybox, cache=tmp_path / "cache") not in (first, second)


def test_init_script_is_valid_sh() -> None:
    subprocess.run(["sh", "-n", str(initramfs.INIT_SCRIPT)], check=True)
    text = initramfs.INIT_SCRIPT.read_text()
    assert "trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower" in text
    assert 'say() { echo "pyvfio-lu: $*"; }' in text
    assert 'say "stage $stage begin"' in text and 'say "stage $stage end rc=$rc"' in text


# --- QEMU command line -----------------------------------------------------------------------


def spec(tmp_path: Path, **kw: object) -> QemuSpec:
    return QemuSpec(kernel=Path("/k/bzImage"), initrd=Path("/k/initrd.gz"),
                    results_dir=tmp_path, **kw)  # type: ignore[arg-type]


def opt(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_argv_intel_tcg(tmp_path: Path) -> None:
    argv = qemu.qemu_argv(spec(tmp_path))
    assert argv[0] == "qemu-system-x86_64"
    assert opt(argv, "-accel") == ["tcg,thread=single"]  # MTTCG: "Oops: int3" on code patching
    assert opt(argv, "-machine") == ["q35"] and opt(argv, "-cpu") == ["max"]
    assert opt(argv, "-smp") == ["2"] and opt(argv, "-m") == ["2G"]
    devices = opt(argv, "-device")
    assert devices[0] == "intel-iommu,intremap=on,caching-mode=on"  # before the PCI devices
    assert "edu,addr=0x4" in devices
    assert "virtio-net-pci,netdev=net0,addr=0x5" in devices
    assert "e1000e,netdev=net1,addr=0x8,romfile=" in devices  # the device with PM, MSI-X, reset
    assert opt(argv, "-netdev") == ["user,id=net1,restrict=on", "user,id=net0,restrict=on"]
    fsdevs = opt(argv, "-fsdev")
    assert fsdevs[0] == "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap"
    assert fsdevs[1] == f"local,id=shared,path={tmp_path},security_model=none,multidevs=remap"
    assert "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot,addr=0x6" in devices
    assert "virtio-9p-pci,fsdev=shared,mount_tag=shared,addr=0x7" in devices
    assert opt(argv, "-kernel") == ["/k/bzImage"] and opt(argv, "-initrd") == ["/k/initrd.gz"]
    assert opt(argv, "-append") == [("console=ttyS0 panic=-1 kho=on liveupdate=on "
                                      "initcall_blacklist=e1000_init_module pyvfio_lu.stage=1")]
    assert opt(argv, "-serial") == ["stdio"] and "-no-reboot" in argv and "-nodefaults" in argv
    assert not any("virtio-iommu" in d for d in devices)


def test_argv_virtio_iommu_kvm(tmp_path: Path) -> None:
    argv = qemu.qemu_argv(spec(tmp_path, iommu="virtio", accel="kvm", net=False, memory="3G",
                               append=" quiet ", stage=2))
    devices = opt(argv, "-device")
    assert "virtio-iommu-pci,addr=0x3" in devices
    assert not any(d.startswith("intel-iommu") for d in devices)
    assert opt(argv, "-accel") == ["kvm"]
    assert opt(argv, "-machine") == ["q35,kernel-irqchip=split"]
    assert opt(argv, "-cpu") == ["host"] and opt(argv, "-m") == ["3G"]
    assert opt(argv, "-netdev") == ["user,id=net1,restrict=on"] and not any("virtio-net" in d for d in devices)
    assert opt(argv, "-append") == [
        ("console=ttyS0 panic=-1 kho=on liveupdate=on initcall_blacklist=e1000_init_module pyvfio_lu.stage=2 "
         "vfio_iommu_type1.allow_unsafe_interrupts=1 iommufd.allow_unsafe_interrupts=1 quiet")]


def test_argv_escapes_commas_and_checks_modes(tmp_path: Path) -> None:
    odd = tmp_path / "a,b"
    argv = qemu.qemu_argv(spec(odd))
    assert f"path={tmp_path}/a,,b," in opt(argv, "-fsdev")[1]
    with pytest.raises(ValueError):
        spec(tmp_path, iommu="amd")
    with pytest.raises(ValueError):
        spec(tmp_path, accel="hvf")


# --- markers ---------------------------------------------------------------------------------

CANNED = """\
0.050 | SeaBIOS (version 1.16.2-debian-1.16.2-1)
0.900 | [    0.000000] Linux version 7.2.13 (root@host) (gcc) #1 SMP PREEMPT_DYNAMIC
3.800 | [    2.100000] Run /init as init process
3.900 | pyvfio-lu: init stage=1
4.500 | pyvfio-lu: stage 1 begin
5.000 | console=ttyS0 panic=-1 kho=on liveupdate=on pyvfio_lu.stage=1
6.000 | pyvfio-lu: stage 1 command rc=0
6.100 | pyvfio-lu: kexec load
8.000 | pyvfio-lu: kexec exec
8.200 | [   10.0] kexec_core: Starting new kernel
8.900 | [    0.000000] Linux version 7.2.13 (root@host) (gcc) #1 SMP PREEMPT_DYNAMIC
13.000 | pyvfio-lu: init stage=2
14.000 | pyvfio-lu: stage 2 begin
15.000 | pyvfio-lu: stage 2 command rc=3
15.100 | pyvfio-lu: stage 2 end rc=3
15.200 | pyvfio-lu: poweroff
"""


def canned_lines(text: str = CANNED) -> list[tuple[float, str]]:
    return [(float(t), s) for t, _, s in (ln.partition(" | ") for ln in text.splitlines())]


def test_parse_markers_and_timings() -> None:
    m = qemu.parse_markers(canned_lines())
    assert m.times["kernel1"] == 0.9 and m.times["kernel2"] == 8.9
    assert m.times["init1"] == 3.9 and m.times["init2"] == 13.0
    assert m.times["stage1.begin"] == 4.5 and m.times["stage2.end"] == 15.1
    assert "stage1.end" not in m.times
    assert m.command_rc == {1: 0, 2: 3} and m.end_rc == {2: 3}
    assert m.kexec_happened
    assert m.boot_seconds == 4.5
    assert m.kexec_load_seconds == pytest.approx(1.9)
    assert m.kexec_seconds == pytest.approx(6.0)
    assert m.times["poweroff"] == 15.2
    assert m.trouble == []


def test_parse_markers_surfaces_panic() -> None:
    text = CANNED.split("8.200")[0] + (
        "8.100 | pyvfio-lu: kexec failed rc=255\n"
        "9.000 | [   11.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x0\n")
    m = qemu.parse_markers(canned_lines(text))
    assert not m.kexec_happened and m.kexec_seconds is None
    assert len(m.trouble) == 2 and "Kernel panic" in m.trouble[1]


# --- running a stand-in for QEMU -------------------------------------------------------------


def test_timeout_kills_and_reports_tail(tmp_path: Path) -> None:
    script = "for i in $(seq 1 60); do echo line $i; done; exec sleep 30"
    t0 = time.monotonic()
    with pytest.raises(GuestTimeout) as info:
        qemu.run_console(["sh", "-c", script], log_path=tmp_path / "console.log", timeout=1.5)
    assert time.monotonic() - t0 < 10
    err = info.value
    assert len(err.tail) == qemu.TAIL_LINES and err.tail[-1] == "line 60"
    assert "line 60" in str(err) and "line 20\n" not in str(err)
    logged = (tmp_path / "console.log").read_text()
    assert " | line 1\n" in logged and " | line 60\n" in logged  # the log keeps every line


def test_timeout_with_plain_sleep(tmp_path: Path) -> None:
    with pytest.raises(GuestTimeout):
        qemu.run_console(["sleep", "30"], log_path=tmp_path / "c.log", timeout=0.5)


def test_finished_marker_then_lingering_process(tmp_path: Path) -> None:
    seen: list[str] = []
    script = "echo a; printf 'b\\r\\n'; echo 'pyvfio-lu: poweroff'; exec sleep 30"
    res = qemu.run_console(["sh", "-c", script], log_path=tmp_path / "c.log", timeout=20,
                           finished=qemu.POWEROFF, grace=0.5,
                           on_line=lambda t, s: seen.append(s))
    assert seen == ["a", "b", "pyvfio-lu: poweroff"] and res.returncode is None
    assert res.seconds < 10


def test_stop_marker_and_clean_exit(tmp_path: Path) -> None:
    res = qemu.run_console(["sh", "-c", "echo 'pyvfio-lu: init stage=1'; exec sleep 30"],
                           log_path=tmp_path / "c.log", timeout=20, stop=qemu.INIT_REACHED)
    assert res.stopped and res.seconds < 10
    res = qemu.run_console(["sh", "-c", "echo out; echo err >&2; printf tail; exit 3"],
                           log_path=tmp_path / "c.log", timeout=20)
    assert [s for _, s in res.lines] == ["out", "err", "tail"] and res.returncode == 3


# --- accelerator -----------------------------------------------------------------------------

VMX = "processor\t: 0\nflags\t\t: fpu vme vmx sse\n"
NOVIRT = "processor\t: 0\nflags\t\t: fpu vme sse\n"


def test_choose_accel(tmp_path: Path) -> None:
    calls: list[int] = []

    def probe() -> bool:
        calls.append(1)
        return True

    kvm = tmp_path / "kvm"
    kvm.write_text("")
    cache = tmp_path / "probe.json"
    kw = {"cache_file": cache, "kvm_device": kvm, "key": "k1"}
    assert qemu.choose_accel(probe, env={"PYVFIO_LU_ACCEL": "kvm"}, cpuinfo=NOVIRT, **kw) == "kvm"
    assert qemu.choose_accel(probe, env={}, cpuinfo=NOVIRT, **kw) == "tcg" and not calls
    assert qemu.choose_accel(probe, env={}, cpuinfo=VMX, kvm_device=tmp_path / "none",
                             cache_file=cache, key="k1") == "tcg" and not calls
    assert qemu.choose_accel(probe, env={}, cpuinfo=VMX, **kw) == "kvm" and len(calls) == 1
    assert qemu.choose_accel(probe, env={}, cpuinfo=VMX, **kw) == "kvm" and len(calls) == 1
    assert qemu.choose_accel(lambda: False, env={}, cpuinfo=VMX, cache_file=cache,
                             kvm_device=kvm, key="k2") == "tcg"
    assert qemu.choose_accel(probe, env={"PYVFIO_LU_ACCEL": "TCG"}, cpuinfo=VMX, **kw) == "tcg"
    with pytest.raises(ValueError):
        qemu.choose_accel(probe, env={"PYVFIO_LU_ACCEL": "xen"}, cpuinfo=VMX, **kw)
    assert qemu.cpu_has_virt("flags : svm\n") and not qemu.cpu_has_virt("")


# --- run.sh and run_in_guest with a fake QEMU ------------------------------------------------


def test_run_script_shape(tmp_path: Path) -> None:
    text = run.run_script({1: "a", 2: "b"}, Path("/k/bz Image"), Path("/k/i.gz"), Path("/w"))
    path = tmp_path / "run.sh"
    path.write_text(text)
    subprocess.run(["sh", "-n", str(path)], check=True)
    assert "-m pyvfio_lu.kexec --kernel '/k/bz Image' --initrd /k/i.gz" in text
    assert text.index("/shared/stage-1.rc") < text.index("pyvfio_lu.kexec") < text.index("2)")
    assert "pyvfio_lu.stage=2" in text and "kill" not in text
    single = run.run_script({1: "a"}, Path("/k/bz"), Path("/k/i"), Path("/w"))
    assert "kexec" not in single


def test_kexec_step_runs_pyvfio_lu_kexec(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "$*" >> "$LOG"\necho "pyvfio-lu: kexec exec"\nexit 1\n')
    fake.chmod(0o755)
    snippet = run.kexec_commands(Path("/k"), Path("/i"), 2, python=str(fake))
    log = tmp_path / "log"
    out = subprocess.run(["sh", "-c", snippet], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", "LOG": str(log)}).stdout
    assert log.read_text().split() == ["-m", "pyvfio_lu.kexec", "--kernel", "/k", "--initrd", "/i", "--set",
                                       "pyvfio_lu.stage=2", "--exec", "--announce", "pyvfio-lu:", "kexec", "exec"]
    assert out.splitlines() == ["pyvfio-lu: kexec load", "pyvfio-lu: kexec exec", "pyvfio-lu: kexec failed rc=1"]


def test_kexec_cmdline_rewrite() -> None:
    from pyvfio_lu.kexec import cmdline_with

    assert cmdline_with("a pyvfio_lu.stage=1 b", pyvfio_lu__stage="2") == "a b pyvfio_lu.stage=2"
    assert cmdline_with("a b", pyvfio_lu__stage="2") == "a b pyvfio_lu.stage=2"
    assert cmdline_with("kho=on x=1", x="2", y="3") == "kho=on x=2 y=3"


FAKE_GUEST = """\
echo 'Linux version 7.2.13'
echo 'pyvfio-lu: init stage=1'; echo 'pyvfio-lu: stage 1 begin'
echo 0 > "$R/stage-1.rc"; echo 'pyvfio-lu: stage 1 command rc=0'
echo 'pyvfio-lu: kexec load'; echo 'pyvfio-lu: kexec exec'
echo 'Linux version 7.2.13'
echo 'pyvfio-lu: init stage=2'; echo 'pyvfio-lu: stage 2 begin'
echo 5 > "$R/stage-2.rc"; echo 'pyvfio-lu: stage 2 command rc=5'
echo 'pyvfio-lu: stage 2 end rc=5'; echo 'pyvfio-lu: poweroff'
"""


@pytest.fixture
def fake_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PYVFIO_LU_CACHE", str(tmp_path / "cache"))
    (tmp_path / "busybox").write_bytes(b"fake busybox")
    monkeypatch.setenv("PYVFIO_LU_BUSYBOX", str(tmp_path / "busybox"))
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(b"kernel")
    script: list[str] = []

    def argv(spec: QemuSpec) -> list[str]:
        assert spec.kernel == kernel and spec.initrd.name.endswith(".cpio.gz")
        return ["sh", "-c", f"R={spec.results_dir}\n" + script[0]]

    monkeypatch.setattr(qemu, "qemu_argv", argv)
    return kernel, script


def test_run_in_guest_with_fake_qemu(tmp_path: Path, fake_qemu) -> None:  # type: ignore[no-untyped-def]
    kernel, script = fake_qemu
    script.append(FAKE_GUEST)
    res = run.run_in_guest("true", "false", kernel=kernel, accel="tcg",
                           results_dir=tmp_path / "out", timeout=20)
    assert res.stage_rc == {1: 0, 2: 5} and not res.ok and res.kexec
    assert res.qemu_rc == 0 and res.console_log.exists()
    assert (tmp_path / "out" / "stage-2.sh").read_text() == "false\n"
    assert (tmp_path / "out" / "result.json").exists()
    assert "-m pyvfio_lu.kexec" in (tmp_path / "out" / "run.sh").read_text()
    assert "stage 2 rc=5" in res.summary()


def test_run_in_guest_without_end_marker(tmp_path: Path, fake_qemu) -> None:  # type: ignore[no-untyped-def]
    kernel, script = fake_qemu
    script.append(FAKE_GUEST.split("echo 'Linux version 7.2.13'\necho 'pyvfio-lu: init stage=2'")[0]
                  + "echo 'Kernel panic - not syncing: VFS: Unable to mount root fs'\nexit 0\n")
    with pytest.raises(GuestError) as info:
        run.run_in_guest("true", "true", kernel=kernel, accel="tcg",
                         results_dir=tmp_path / "out", timeout=20)
    assert "before stage 2 finished" in str(info.value) and "Kernel panic" in str(info.value)
    assert isinstance(info.value.result, run.GuestResult) and not info.value.result.kexec
