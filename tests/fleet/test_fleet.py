"""A rolling live update across a fleet of guests, driven by ansible-core over SSH.

Three QEMU guests of the project's kernel (tests/fleet/harness.py), each carrying guest RAM in
a memfd (and, on a kernel that preserves devices, the edu device) through tests/fleet/vmm.py,
its stand-in VMM. The example playbook (serial 1, the first failure stops the rollout) runs:

1. rollout-1: every host live-updates; each host's live update number is 1 and its VMM found
   its RAM intact after the kexec (and took the device back);
2. rollout-2: fleet-b's preflight is made to fail - on a kernel that preserves devices its VMM
   enables the preserved device's interrupt (NotLiveUpdateReady: the kernel would refuse the
   kexec), elsewhere it is given a next initramfs larger than its memory (KexecImageTooLarge):
   fleet-a live-updates a second time, fleet-b is refused before anything changes and fleet-c
   is never reached; both keep their boot, their number and their held session;
3. rollout-3 (fleet-b and fleet-c, the interrupt off again or the initramfs fixed): both
   live-update and their VMMs find the RAM of their first boot intact: nothing was lost anywhere.

Each check is one test, by name (``test_fleet[upstream-rollout-1-fleet-a-data]``). Runs on each
kernel flavour the guest suite runs on (``PYVFIO_LU_FLEET_FLAVOURS`` to choose); skipped only
when that kernel is not cached (or with PYVFIO_LU_SKIP_GUEST=1).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import ROOT, Fleet

HOSTS = ["fleet-a", "fleet-b", "fleet-c"]
BROKEN = "fleet-b"
SKIP = os.environ.get("PYVFIO_LU_SKIP_GUEST")


def _flavours() -> list[str]:
    spec = os.environ.get("PYVFIO_LU_FLEET_FLAVOURS")
    if spec:
        return [f for f in spec.split(",") if f]
    if SKIP:
        return ["upstream"]
    sys.path.insert(0, str(ROOT / "tests"))
    from test_guest import RUNS

    return sorted({f for f, _i in RUNS}) or ["upstream"]


FLAVOURS = _flavours()

CHECKS = (
    [f"rollout-1-{h}-{c}" for h in HOSTS for c in ("live-update-number", "data", "timings")]
    + ["rollout-1-completed"]
    + [f"rollout-2-{BROKEN}-device-irq-on", "rollout-2-fleet-a-live-update-number", "rollout-2-fleet-a-data",
       f"rollout-2-{BROKEN}-preflight-refused", f"rollout-2-{BROKEN}-untouched",
       "rollout-2-fleet-c-not-reached", "rollout-2-fleet-c-untouched", "rollout-2-stopped",
       f"rollout-2-{BROKEN}-device-irq-off"]
    + [f"rollout-3-{h}-{c}" for h in ("fleet-b", "fleet-c") for c in ("live-update-number", "data")]
    + [f"{h}-device" for h in HOSTS]
    + ["guests-powered-off-cleanly"]
)

_RUNS: dict[str, dict] = {}


def _run(flavour: str) -> dict:
    if flavour in _RUNS:
        return _RUNS[flavour]
    from pyvfio_lu.vm.kernel import find_cached

    image = find_cached(flavour)
    if image is None:
        _RUNS[flavour] = {"skip": f"no {flavour} kernel in the cache (python -m pyvfio_lu.vm.kernel"
                                  f"{' --flavour vfio-lu --patches DIR' if flavour != 'upstream' else ''})"}
        return _RUNS[flavour]
    results = ROOT / "results" / "fleet" / f"{time.strftime('%Y%m%d-%H%M%S')}-{flavour}"
    fleet = Fleet(results, HOSTS, kernel=image.bzimage, echo=bool(os.environ.get("PYVFIO_LU_FLEET_ECHO")))
    run: dict = {"results": results, "checks": {}, "error": None}
    checks = run["checks"]

    def check(name: str, ok: bool, detail: object = "") -> None:
        checks[name] = (bool(ok), str(detail))

    t0 = time.monotonic()
    try:
        run["serving"] = fleet.start()
        expected = {h: fleet.expected_sha256(h) for h in HOSTS}

        def data_ok(host: str, stage: int) -> tuple[bool, object]:
            rep = fleet.vmm_report(host, stage)
            ok = bool(rep) and rep["came_in"] and rep["verified"] and rep["finished"] and rep["preserved"] \
                and rep.get("sha256") == expected[host] and not rep["problems"]
            return ok, rep

        def number_ok(report: dict | None, number: int) -> tuple[bool, object]:
            ok = bool(report) and not report.get("failed") and report.get("stage") == "done" \
                and report.get("liveupdate_number") == number
            return ok, report and {k: report.get(k) for k in ("stage", "liveupdate_number", "msg", "error")}

        # 1. every host
        r1 = fleet.rollout("rollout-1", {"live_update_cmdline_set": {"pyvfio_lu.stage": "2"}})
        run["rollout-1"] = r1
        for h in HOSTS:
            check(f"rollout-1-{h}-live-update-number", *number_ok(r1["reports"][h], 1))
            check(f"rollout-1-{h}-data", *data_ok(h, 2))
            timings = (r1["reports"][h] or {}).get("timings") or {}
            check(f"rollout-1-{h}-timings", all(k in timings for k in ("preflight", "load_and_exec", "kexec",
                                                                        "reconnect", "verify", "total")), timings)
        check("rollout-1-completed", r1["rc"] == 0, f"ansible-playbook rc={r1['rc']}, see {r1['log']}")

        # 2. fleet-b is not ready: refused before anything changes, fleet-c never reached
        before = fleet.facts()
        run["facts-before-2"] = before
        devices = bool((fleet.vmm_report(BROKEN, 2) or {}).get("device_preservation"))  # as the guest found
        if devices:  # its VMM turns the preserved device's interrupt on: the kexec would be refused
            answer = fleet.control(BROKEN, "irq-on")
            check(f"rollout-2-{BROKEN}-device-irq-on", answer["result"] == "ok", answer)
            expected_error, host_vars = "NotLiveUpdateReady", None
        else:  # the next initramfs cannot fit: sparse, larger than the guest's memory
            huge = results / BROKEN / "huge-initrd"
            with open(huge, "wb") as fh:
                fh.truncate(2 << 30)
            expected_error, host_vars = "KexecImageTooLarge", {BROKEN: {"live_update_initrd": "/shared/huge-initrd"}}
            for what in ("on", "off"):
                check(f"rollout-2-{BROKEN}-device-irq-{what}", True, "skip: this kernel cannot preserve VFIO devices "
                      "(fleet-b's preflight is failed with an initramfs too large instead)")
        r2 = fleet.rollout("rollout-2", {"live_update_cmdline_set": {"pyvfio_lu.stage": "3"}}, host_vars=host_vars)
        run["rollout-2"] = r2
        check("rollout-2-fleet-a-live-update-number", *number_ok(r2["reports"]["fleet-a"], 2))
        check("rollout-2-fleet-a-data", *data_ok("fleet-a", 3))
        rep_b = r2["reports"][BROKEN] or {}
        check(f"rollout-2-{BROKEN}-preflight-refused",
              rep_b.get("failed") and rep_b.get("stage") == "preflight" and rep_b.get("error") == expected_error
              and "before" not in rep_b
              and (not devices or (rep_b.get("preflight") or {}).get("failed_checks") == ["device 0000:00:04.0"]),
              {k: rep_b.get(k) for k in ("stage", "error", "msg")})
        check("rollout-2-fleet-c-not-reached", r2["reports"]["fleet-c"] is None, r2["reports"]["fleet-c"])
        check("rollout-2-stopped", r2["rc"] != 0 and "fleet-c" not in r2["output"].split("PLAY RECAP")[-1],
              f"rc={r2['rc']}")
        after = fleet.facts()
        run["facts-after-2"] = after
        for h in (BROKEN, "fleet-c"):
            b, a = before.get(h) or {}, after.get(h) or {}
            name = fleet.session(h)
            holders = [x["pid"] for x in (a.get("sessions") or {}).get(name, [])]
            held_before = [x["pid"] for x in (b.get("sessions") or {}).get(name, [])]
            ok = bool(a) and a.get("boot_id") == b.get("boot_id") and a.get("liveupdate_number") == 1 \
                and not a.get("kexec_loaded") and holders and holders == held_before \
                and name in (a.get("outgoing") or {})
            check(f"rollout-2-{h}-untouched", ok, {"boot": (b.get("boot_id"), a.get("boot_id")),
                                                   "number": a.get("liveupdate_number"),
                                                   "kexec_loaded": a.get("kexec_loaded"), "holders": holders})
        if devices:
            answer = fleet.control(BROKEN, "irq-off")
            check(f"rollout-2-{BROKEN}-device-irq-off", answer["result"] == "ok", answer)
        else:
            huge.unlink()

        # 3. the rest of the fleet, repaired: their data came through untouched
        r3 = fleet.rollout("rollout-3", {"live_update_cmdline_set": {"pyvfio_lu.stage": "4"}},
                           hosts=[BROKEN, "fleet-c"])
        run["rollout-3"] = r3
        for h in (BROKEN, "fleet-c"):
            check(f"rollout-3-{h}-live-update-number", *number_ok(r3["reports"][h], 2))
            check(f"rollout-3-{h}-data", *data_ok(h, 4))

        # the device, where the kernel can carry one (asked of each guest, not assumed)
        for h in HOSTS:
            reports = [fleet.vmm_report(h, s) for s in (1, 2, 3, 4)]
            reports = [r for r in reports if r]
            can = [r["device_preservation"] for r in reports]
            if not any(can):
                check(f"{h}-device", True, "skip: this kernel cannot preserve VFIO devices")
            else:
                after_kexec = [r for r in reports if r["came_in"]]
                check(f"{h}-device", all(r["device"] and r["device"]["retrieved"] and r["device"]["dma"]
                                         for r in after_kexec), [r["device"] for r in after_kexec])
    except Exception as exc:  # noqa: BLE001 - every check that did not run fails with this
        run["error"] = exc
    finally:
        stopped = fleet.stop()
        bad = {h: (r.stage_rc if r else None, r.markers.trouble[-3:] if r else None)
               for h, r in stopped.items() if r is None or not r.ok}
        check("guests-powered-off-cleanly", not bad, bad)
        run["seconds"] = round(time.monotonic() - t0, 1)
        run["summary"] = _summary(run)
        (results / "summary.txt").write_text(run["summary"])
        print("\n" + run["summary"], file=sys.stderr)
    _RUNS[flavour] = run
    return run


def _summary(run: dict) -> str:
    lines = [(f"fleet run: {run['results']} ({run.get('seconds')} s in all; guests serving after "
              f"{run.get('serving')})")]
    for name in ("rollout-1", "rollout-2", "rollout-3"):
        r = run.get(name)
        if not r:
            continue
        lines.append(f"  {name}: ansible-playbook rc={r['rc']}, {r['seconds']} s")
        for h, rep in r["reports"].items():
            if rep is None:
                lines.append(f"    {h}: not reached")
                continue
            t = rep.get("timings") or {}
            parts = ", ".join(f"{k} {t[k]:.1f}" for k in ("preflight", "load_and_exec", "kexec", "reconnect",
                                                           "verify", "total") if k in t)
            lines.append(f"    {h}: {rep.get('stage')} {rep.get('error') or ''} [{parts}]".replace("  [", " ["))
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("check", CHECKS)
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_fleet(flavour: str, check: str) -> None:
    if SKIP and not os.environ.get("PYVFIO_LU_FLEET_FLAVOURS"):
        pytest.skip("PYVFIO_LU_SKIP_GUEST is set: no guests")
    run = _run(flavour)
    if "skip" in run:
        pytest.skip(run["skip"])
    got = run["checks"].get(check)
    if got is None:
        pytest.fail(f"{check} did not run: {run['error']!r}\nresults: {run['results']}", pytrace=False)
    ok, detail = got
    if ok and detail.startswith("skip: "):
        pytest.skip(detail[6:])
    if not ok:
        pytest.fail(f"{check} on the {flavour} kernel: {detail}\nresults: {run['results']}"
                    + (f"\nerror: {run['error']!r}" if run["error"] else ""), pytrace=False)
