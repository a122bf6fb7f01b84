#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) pyvfio-lu contributors
# SPDX-License-Identifier: MIT

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: kexec
short_description: Load the next kernel with kexec_file_load, unload it, or reboot into it
version_added: 0.1.0
description:
  - Loads a kernel and initramfs with C(kexec_file_load), the only loader that hands live-update
    (KHO) state to the next kernel, through C(pyvfio_lu.kexec).
  - With I(state=executed) it loads, then reboots into the kernel from a detached process after
    I(delay) seconds, so this module returns its result before the connection drops. If the
    kernel refuses the reboot (a preserved device failed to freeze) the detached process writes
    the library's error to I(exec_report) and the host keeps running. To wait for the host and
    verify it, use the M(pyvfio_lu.live_update.live_update) action, which does all of that.
  - A failed load names the library's error (C(KexecImageTooLarge) when the images do not fit
    the KHO scratch areas, C(KexecNotPermitted), C(KexecError)); nothing is loaded then.
  - The kernel cannot say which image is loaded, so I(state=loaded) remembers what it loaded in
    C(/run/pyvfio-lu/kexec-loaded.json) and is idempotent only against that record.
options:
  state:
    description:
      - C(loaded) loads the image (unless this module's record shows the same image, command line
        and files are loaded).
      - C(unloaded) unloads whatever is loaded.
      - C(executed) loads the image and reboots into it after I(delay) seconds.
    type: str
    choices: [loaded, unloaded, executed]
    default: loaded
  kernel:
    description: The kernel (bzImage) to load. Required unless I(state=unloaded).
    type: path
  initrd:
    description: The initramfs to load with it.
    type: path
  cmdline:
    description: The next kernel's command line (default the running kernel's).
    type: str
  cmdline_set:
    description: Parameters to replace or add on that command line (C(key=value) each).
    type: dict
    default: {}
  delay:
    description:
      - With I(state=executed), seconds between the end of this module's process and the reboot
        (time for its result to reach the controller).
    type: float
    default: 2.0
  exec_report:
    description: With I(state=executed), where the detached process reports a refused reboot.
    type: path
    default: /run/pyvfio-lu/exec-report.json
requirements:
  - pyvfio-lu on the managed host
  - root (CAP_SYS_BOOT)
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: full
author:
  - pyvfio-lu contributors (!UNKNOWN)
seealso:
  - module: pyvfio_lu.live_update.live_update
  - module: pyvfio_lu.live_update.preflight
"""

EXAMPLES = r"""
- name: Load the next kernel (nothing reboots)
  pyvfio_lu.live_update.kexec:
    kernel: /boot/vmlinuz-7.2.14
    initrd: /boot/initrd.img-7.2.14

- name: Drop it again
  pyvfio_lu.live_update.kexec:
    state: unloaded
"""

RETURN = r"""
cmdline:
  description: The command line loaded with the kernel.
  returned: when a kernel is loaded
  type: str
load_seconds:
  description: How long C(kexec_file_load) took.
  returned: when a kernel was loaded
  type: float
before:
  description: The boot id and live update number of the kernel that ran the module (to compare after the reboot).
  returned: always
  type: dict
  sample: {"boot_id": "3e2c...", "liveupdate_number": 1}
exec_pid:
  description: The detached process that reboots the host.
  returned: with state=executed
  type: int
exec_report:
  description: Where that process reports a refused reboot.
  returned: with state=executed
  type: str
image:
  description: The read-only check of the image (pyvfio_lu.kexec.check_image), in check mode.
  returned: in check mode, when a kernel would be loaded
  type: dict
error:
  description: The library's error class when the module failed, for example C(KexecImageTooLarge).
  returned: failure
  type: str
"""

import json
import os
import time

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pyvfio_lu.live_update.plugins.module_utils.common import (
    PyvfioError,
    fail_with,
    need_library,
    next_cmdline,
)

RECORD = "/run/pyvfio-lu/kexec-loaded.json"


def identity(kernel, initrd, cmdline):
    """What was loaded: paths, sizes and mtimes of the files, and the command line."""
    out = {"cmdline": cmdline}
    for key, path in (("kernel", kernel), ("initrd", initrd)):
        if path:
            st = os.stat(path)
            out[key] = [path, st.st_size, st.st_mtime_ns]
        else:
            out[key] = None
    return out


def read_record():
    try:
        with open(RECORD) as fh:
            return json.load(fh)
    except (IOError, OSError, ValueError):
        return None


def write_record(doc):
    try:
        os.makedirs(os.path.dirname(RECORD), exist_ok=True)
        tmp = RECORD + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh)
        os.replace(tmp, RECORD)
    except (IOError, OSError):
        pass


def main():
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(type="str", choices=["loaded", "unloaded", "executed"], default="loaded"),
            kernel=dict(type="path"),
            initrd=dict(type="path"),
            cmdline=dict(type="str"),
            cmdline_set=dict(type="dict", default={}),
            delay=dict(type="float", default=2.0),
            exec_report=dict(type="path", default="/run/pyvfio-lu/exec-report.json"),
        ),
        required_if=[("state", "loaded", ("kernel",)), ("state", "executed", ("kernel",))],
        supports_check_mode=True,
    )
    need_library(module)
    from pyvfio_lu import kexec, status

    p = module.params
    st = status.status()
    result = dict(changed=False, before={"boot_id": st.boot_id, "liveupdate_number": st.liveupdate_number})
    was_loaded = kexec.loaded()
    try:
        if p["state"] == "unloaded":
            result["changed"] = was_loaded
            if was_loaded and not module.check_mode:
                kexec.unload()
                write_record(None)
            if module._diff:
                result["diff"] = dict(before={"loaded": was_loaded}, after={"loaded": False})
            module.exit_json(**result)

        cmdline = next_cmdline(p["cmdline"], p["cmdline_set"])
        result["cmdline"] = cmdline
        try:
            wanted = identity(p["kernel"], p["initrd"], cmdline)
        except (IOError, OSError) as exc:
            module.fail_json(msg="cannot read the image: %s" % exc, error="KexecError", **result)
        record = read_record() if was_loaded else None
        same = record == wanted
        if module._diff:
            result["diff"] = dict(before={"loaded": was_loaded, "image": record},
                                  after={"loaded": True, "image": wanted})
        if module.check_mode:
            image = kexec.check_image(p["kernel"], p["initrd"], cmdline)
            result["image"] = image
            if not image["ok"]:
                module.fail_json(msg="; ".join(image["problems"]), error=image["error"], **result)
            result["changed"] = p["state"] == "executed" or not same
            module.exit_json(**result)

        if p["state"] == "executed" or not same:
            t0 = time.monotonic()
            kexec.load(p["kernel"], p["initrd"], cmdline)
            result["load_seconds"] = round(time.monotonic() - t0, 3)
            write_record(wanted)
            result["changed"] = True
        if p["state"] == "executed":
            report = p["exec_report"]
            try:
                os.makedirs(os.path.dirname(report), exist_ok=True)
                os.unlink(report)
            except (IOError, OSError):
                pass
            # the reboot waits for this module's process to end, then for the delay
            result["exec_pid"] = kexec.execute_later(p["delay"], report, after_exit_of=os.getpid())
            result["exec_report"] = report
    except PyvfioError as exc:
        fail_with(module, exc, **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
