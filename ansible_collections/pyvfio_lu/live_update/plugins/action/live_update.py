# -*- coding: utf-8 -*-
# Copyright (c) pyvfio-lu contributors
# SPDX-License-Identifier: MIT
"""The live_update action: preflight, load and kexec, wait for the host, verify - on the controller,
each host-side step a module of this collection (see plugins/modules/live_update.py for the docs)."""

from __future__ import absolute_import, division, print_function

__metaclass__ = type

import time

from ansible.module_utils.common.text.converters import to_text
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display

display = Display()

PREFIX = "pyvfio_lu.live_update."

ARGUMENT_SPEC = dict(
    kernel=dict(type="path", required=True),
    initrd=dict(type="path"),
    cmdline=dict(type="str"),
    cmdline_set=dict(type="dict", default={}),
    sessions=dict(type="list", elements="str", default=[]),
    sessions_state=dict(type="str", choices=["finished", "incoming", "present"], default="finished"),
    sessions_timeout=dict(type="float", default=120),
    devices=dict(type="list", elements="str"),
    require_preserved=dict(type="bool", default=True),
    preflight=dict(type="bool", default=True),
    delay=dict(type="float", default=2.0),
    reboot_timeout=dict(type="float", default=600),
    old_kernel_grace=dict(type="float", default=60),
    probe_interval=dict(type="float", default=1.0),
    exec_report=dict(type="path", default="/run/pyvfio-lu/exec-report.json"),
)


class ActionModule(ActionBase):
    TRANSFERS_FILES = False
    _VALID_ARGS = frozenset(ARGUMENT_SPEC)

    def _module(self, name, args, task_vars):
        return self._execute_module(module_name=PREFIX + name, module_args=args, task_vars=task_vars)

    def _probe(self, args, task_vars):
        """The host's boot identity, or None while it cannot be reached."""
        try:
            self._connection.reset()
        except Exception:  # noqa: BLE001 - a connection that is already gone is fine
            pass
        try:
            res = self._module("facts", {"gather_subset": ["boot"], "exec_report": args["exec_report"]}, task_vars)
        except Exception as exc:  # noqa: BLE001 - the host is rebooting: AnsibleConnectionFailure and kin
            display.vvv("live_update: probe failed: %s" % to_text(exc).splitlines()[-1:])
            return None
        if res.get("unreachable") or res.get("failed"):
            display.vvv("live_update: probe: %s" % res.get("msg"))
            return None
        return res

    def run(self, tmp=None, task_vars=None):
        self._supports_check_mode = True
        result = super(ActionModule, self).run(tmp, task_vars)
        if result.get("skipped") or result.get("failed"):
            return result
        dummy, args = self.validate_argument_spec(argument_spec=ARGUMENT_SPEC)
        if self._connection.transport == "local":
            return dict(failed=True, changed=False, msg="live_update over a local connection would kexec the controller")
        t_start = time.monotonic()
        timings = {}
        result.update(changed=False, stage="preflight")
        image = {k: args[k] for k in ("kernel", "initrd", "cmdline", "cmdline_set")}

        # 1. everything ready? (read-only)
        if args["preflight"] or self._task.check_mode:
            t = time.monotonic()
            pre = self._module("preflight", dict(image, sessions=args["sessions"], devices=args["devices"],
                                                 require_preserved=args["require_preserved"]), task_vars)
            timings["preflight"] = round(time.monotonic() - t, 3)
            result["preflight"] = {k: pre.get(k) for k in ("checks", "failed_checks", "warnings_found", "boot_id",
                                                           "liveupdate_number", "cmdline", "devices")}
            if pre.get("failed") or pre.get("unreachable"):
                result.update(failed=True, msg=pre.get("msg", "preflight failed"), error=pre.get("error"),
                              timings=timings)
                return result
        if self._task.check_mode:
            result.update(changed=True, msg="preflight passed: a live update would be done", timings=timings)
            return result

        # what the host is now, to tell the new kernel from the old one
        if args["preflight"]:
            before = {"boot_id": pre.get("boot_id"), "liveupdate_number": pre.get("liveupdate_number")}
        else:
            res = self._probe(args, task_vars)
            if res is None:
                result.update(failed=True, unreachable=True, msg="cannot reach the host before the live update")
                return result
            facts = res["ansible_facts"]["pyvfio_lu"]
            before = {"boot_id": facts.get("boot_id"), "liveupdate_number": facts.get("liveupdate_number")}
        result["before"] = before

        # 2. load the kernel and kexec into it from a detached process (the connection drops)
        result["stage"] = "load"
        t = time.monotonic()
        try:
            ex = self._module("kexec", dict(image, state="executed", delay=args["delay"],
                                            exec_report=args["exec_report"]), task_vars)
        except Exception as exc:  # noqa: BLE001 - the connection may drop with the reboot itself
            ex = {"unreachable": True, "msg": to_text(exc)}
        t_exec = time.monotonic()
        timings["load_and_exec"] = round(t_exec - t, 3)
        if ex.get("failed"):
            result.update(failed=True, msg="nothing was rebooted: " + to_text(ex.get("msg")), error=ex.get("error"),
                          timings=timings)
            return result
        if ex.get("unreachable"):
            # the result was lost on the way (the reboot may have cut it): the probes below tell
            display.warning("live_update: the kexec module's result did not arrive (%s); waiting for the host "
                            "to tell whether it rebooted" % to_text(ex.get("msg")).strip()[:200])
            result["exec_result_lost"] = True
        result["changed"] = True
        result.update(cmdline=ex.get("cmdline"), load_seconds=ex.get("load_seconds"))

        # 3. wait for the new kernel to answer
        result["stage"] = "kexec"
        time.sleep(args["delay"] + args["probe_interval"])
        deadline = t_exec + args["reboot_timeout"]
        probe = None
        probes = 0
        while time.monotonic() < deadline:
            res = self._probe(args, task_vars)
            probes += 1
            if res is not None:
                facts = res["ansible_facts"]["pyvfio_lu"]
                if facts.get("boot_id") != before["boot_id"]:
                    probe = (time.monotonic(), facts)
                    break
                report = res.get("exec_report")
                if report:
                    result.update(failed=True, error=report.get("error"), timings=timings,
                                  msg="the kernel refused the kexec; the host runs on, its sessions still held: "
                                      + to_text(report.get("message")))
                    return result
                if time.monotonic() - t_exec > args["delay"] + args["old_kernel_grace"]:
                    result.update(failed=True, error="LiveUpdateNotVerified", timings=timings,
                                  msg="the host still runs its old kernel (boot id %s) %.0f s after the kexec was "
                                      "due" % (before["boot_id"], time.monotonic() - t_exec))
                    return result
            time.sleep(args["probe_interval"])
        if probe is None:
            result.update(failed=True, error="LiveUpdateNotVerified", timings=timings,
                          msg="the host did not come back within %.0f s after the kexec" % args["reboot_timeout"])
            return result
        t_up, facts = probe
        uptime = facts.get("uptime") or 0.0
        kernel_started = t_up - uptime
        timings["kexec"] = round(max(0.0, kernel_started - t_exec), 3)  # incl. the delay
        timings["reconnect"] = round(t_up - max(kernel_started, t_exec), 3)
        result["probes"] = probes

        # 4. did it carry what it should?
        result["stage"] = "verify"
        t = time.monotonic()
        ver = self._module("verify", {"previous_boot_id": before["boot_id"],
                                      "previous_liveupdate_number": before.get("liveupdate_number"),
                                      "sessions": args["sessions"], "sessions_state": args["sessions_state"],
                                      "sessions_timeout": args["sessions_timeout"]}, task_vars)
        timings["verify"] = round(time.monotonic() - t, 3)
        timings["total"] = round(time.monotonic() - t_start, 3)
        result["timings"] = timings
        result["verify"] = {k: ver.get(k) for k in ("boot_id", "liveupdate_number", "expected_number", "sessions",
                                                    "waited", "uptime")}
        result.update(boot_id=ver.get("boot_id"), liveupdate_number=ver.get("liveupdate_number"))
        if ver.get("failed") or ver.get("unreachable"):
            result.update(failed=True, error=ver.get("error"), msg=to_text(ver.get("msg")))
            return result
        result["stage"] = "done"
        result["msg"] = "live update %s done: %s" % (ver.get("liveupdate_number"), to_text(ver.get("msg")))
        return result
