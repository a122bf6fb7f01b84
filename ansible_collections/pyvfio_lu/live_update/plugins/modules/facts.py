#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) pyvfio-lu contributors
# SPDX-License-Identifier: MIT

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: facts
short_description: Live-update facts of a Linux host (LUO, KHO, sessions, VFIO devices)
version_added: 0.1.0
description:
  - Reads the host's live-update state through the pyvfio_lu library (nothing is parsed from
    command output) and returns it as the C(pyvfio_lu) fact.
  - With the default subset, after a live update the previous kernel's ledgers are adopted
    (the first open of /dev/liveupdate does that), so incoming sessions can be listed.
  - The C(boot) subset reads only the boot id, live update number, uptime and kexec state,
    without opening /dev/liveupdate; it is what the live_update action probes with while the
    host comes back.
options:
  gather_subset:
    description: What to gather.
    type: list
    elements: str
    choices: [all, boot]
    default: [all]
  exec_report:
    description:
      - Path of a report a detached kexec wrote on failure (see the kexec module). When it
        exists its content is returned as C(exec_report).
    type: path
requirements:
  - pyvfio-lu on the managed host (the interpreter Ansible uses must import pyvfio_lu)
  - Linux with /proc and /sys; root to see every process's sessions
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
  facts:
    description: Action returns an C(ansible_facts) dictionary that will update existing host facts.
    support: full
author:
  - pyvfio-lu contributors (!UNKNOWN)
seealso:
  - module: pyvfio_lu.live_update.preflight
  - module: pyvfio_lu.live_update.live_update
"""

EXAMPLES = r"""
- name: Gather live-update facts
  pyvfio_lu.live_update.facts:

- name: Show the live update number and who holds which session
  ansible.builtin.debug:
    msg: "{{ ansible_facts.pyvfio_lu.liveupdate_number }} {{ ansible_facts.pyvfio_lu.sessions }}"

- name: Only the boot identity (cheap; does not open /dev/liveupdate)
  pyvfio_lu.live_update.facts:
    gather_subset: [boot]
"""

RETURN = r"""
ansible_facts:
  description: Facts added under C(pyvfio_lu).
  returned: always
  type: dict
  contains:
    pyvfio_lu:
      description:
        - The host's live-update state. With the C(boot) subset only C(boot_id),
          C(liveupdate_number), C(uptime), C(kexec_loaded), C(kernel_release) and C(cmdline).
      returned: always
      type: dict
      contains:
        luo_enabled:
          description: /dev/liveupdate exists.
          type: bool
          returned: always
        kho_enabled:
          description: KHO is on (null when it cannot be told).
          type: bool
          returned: always
        liveupdate_number:
          description: The live update number the previous kernel handed over; null after a cold boot.
          type: int
          returned: always
        boot_id:
          description: This boot's id (/proc/sys/kernel/random/boot_id).
          type: str
          returned: always
        kexec_loaded:
          description: A kexec kernel is loaded.
          type: bool
          returned: always
        device_preservation:
          description: Whether this kernel can preserve VFIO devices (C(supported), C(source), C(detail)).
          type: dict
          returned: with the all subset
        devices:
          description:
            - PCI functions (bridges left out) with C(bdf), C(driver), C(iommu_group), C(group)
              (the group's other members), C(vfio_cdev), C(net) and C(preserved) (the session
              holding it, with its direction, or null).
          type: list
          elements: dict
          returned: with the all subset
        sessions:
          description: LUO session name -> the processes holding an fd for it (C(pid), C(comm), C(fd), C(cmdline)).
          type: dict
          returned: with the all subset
        outgoing:
          description: Sessions preserved in this boot, as their holders' ledgers describe them.
          type: dict
          returned: with the all subset
        came_in:
          description: Sessions that came through the last live update, each with C(finished).
          type: dict
          returned: with the all subset
        kho_scratch:
          description: The KHO scratch areas (C(address), C(size)) the next kernel must fit in; null without debugfs.
          type: list
          elements: dict
          returned: with the all subset
exec_report:
  description: The detached kexec's failure report, when I(exec_report) names an existing file.
  returned: when it exists
  type: dict
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pyvfio_lu.live_update.plugins.module_utils.common import (
    PyvfioError,
    fail_with,
    need_library,
)

BOOT_KEYS = ("boot_id", "liveupdate_number", "uptime", "kexec_loaded", "kernel_release", "cmdline")


def boot_facts():
    from pyvfio_lu import kexec, status

    def read(path):
        try:
            with open(path) as fh:
                return fh.read().strip()
        except (IOError, OSError):
            return ""

    return {
        "boot_id": read("/proc/sys/kernel/random/boot_id"),
        "liveupdate_number": status.liveupdate_number(),
        "uptime": status._uptime(),
        "kexec_loaded": kexec.loaded(),
        "kernel_release": os.uname()[2],
        "cmdline": read("/proc/cmdline"),
    }


def main():
    module = AnsibleModule(
        argument_spec=dict(
            gather_subset=dict(type="list", elements="str", choices=["all", "boot"], default=["all"]),
            exec_report=dict(type="path"),
        ),
        supports_check_mode=True,
    )
    need_library(module)
    from pyvfio_lu import status

    result = dict(changed=False)
    try:
        if "all" in module.params["gather_subset"]:
            facts = status.facts()
        else:
            facts = boot_facts()
    except PyvfioError as exc:
        fail_with(module, exc)
    path = module.params["exec_report"]
    if path and os.path.exists(path):
        try:
            with open(path) as fh:
                result["exec_report"] = json.load(fh)
        except (IOError, OSError, ValueError) as exc:
            result["exec_report"] = {"ok": False, "error": "unreadable", "message": str(exc)}
    result["ansible_facts"] = {"pyvfio_lu": json.loads(json.dumps(facts, default=str))}
    module.exit_json(**result)


if __name__ == "__main__":
    main()
