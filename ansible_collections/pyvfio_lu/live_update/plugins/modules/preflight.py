#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) pyvfio-lu contributors
# SPDX-License-Identifier: MIT

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: preflight
short_description: Check every precondition of a kernel live update on a host, changing nothing
version_added: 0.1.0
description:
  - Runs C(pyvfio_lu.preflight.preflight) on the managed host and fails, naming each unmet
    precondition and the library's error class for the first (C(error)), unless all are met.
  - Checked - LUO (/dev/liveupdate) and KHO are on; the next kernel and initramfs are readable,
    a bzImage that x86's kexec_file_load takes, with a command line that fits and keeps
    C(kho=on liveupdate=on); kexec is not disabled; every segment fits the KHO scratch areas;
    each named session is held by a live process, described by a ledger, and not an unfinished
    incoming one; no session of the last live update is left unfinished; each VFIO device to
    carry is on vfio-pci with a cdev bound to an iommufd, has no IRQ enabled, is in D0 and is
    preserved in a held session.
  - Nothing is loaded or changed, so the module never reports a change and runs the same in
    check mode.
options:
  kernel:
    description: The next kernel (bzImage) as a path on the managed host.
    type: path
    required: true
  initrd:
    description: The next kernel's initramfs.
    type: path
  cmdline:
    description: The next kernel's command line (default the running kernel's).
    type: str
  cmdline_set:
    description: Parameters to replace or add on that command line (C(key=value) each).
    type: dict
    default: {}
  sessions:
    description: LUO sessions that must be carried (held now, so the kexec keeps them).
    type: list
    elements: str
    default: []
  devices:
    description:
      - VFIO devices (PCI addresses) that must be carried. Default - every device the held
        sessions' ledgers say is preserved.
    type: list
    elements: str
  require_preserved:
    description: A device must already be preserved in a held session (not only ready to be).
    type: bool
    default: true
requirements:
  - pyvfio-lu on the managed host
  - root (the kexec and /proc of every process)
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
author:
  - pyvfio-lu contributors (!UNKNOWN)
seealso:
  - module: pyvfio_lu.live_update.live_update
"""

EXAMPLES = r"""
- name: Is this host ready for a live update into the new kernel?
  pyvfio_lu.live_update.preflight:
    kernel: /boot/vmlinuz-7.2.14
    initrd: /boot/initrd.img-7.2.14
    sessions: [vm-1, vm-2]
  register: ready
"""

RETURN = r"""
checks:
  description: Every check, in order, with C(name), C(ok), C(detail) and C(error) (the library's error class when it failed).
  returned: always
  type: list
  elements: dict
  sample: [{"name": "kho", "ok": true, "detail": "KHO is on", "error": null}]
failed_checks:
  description: Names of the checks that failed.
  returned: always
  type: list
  elements: str
error:
  description: The error class of the first failed check, for example C(KexecImageTooLarge) or C(SessionNotHeld).
  returned: failure
  type: str
warnings_found:
  description: Things that do not stop a live update but should be known (a session no ledger describes).
  returned: always
  type: list
  elements: str
boot_id:
  description: This boot's id, for comparing after the live update.
  returned: always
  type: str
liveupdate_number:
  description: This boot's live update number (null after a cold boot).
  returned: always
  type: int
cmdline:
  description: The command line the next kernel would get.
  returned: always
  type: str
devices:
  description: The devices that were checked.
  returned: always
  type: list
  elements: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pyvfio_lu.live_update.plugins.module_utils.common import (
    PyvfioError,
    fail_with,
    need_library,
    next_cmdline,
)

ARGUMENT_SPEC = dict(
    kernel=dict(type="path", required=True),
    initrd=dict(type="path"),
    cmdline=dict(type="str"),
    cmdline_set=dict(type="dict", default={}),
    sessions=dict(type="list", elements="str", default=[]),
    devices=dict(type="list", elements="str"),
    require_preserved=dict(type="bool", default=True),
)


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    need_library(module)
    from pyvfio_lu.preflight import preflight

    p = module.params
    try:
        cmdline = next_cmdline(p["cmdline"], p["cmdline_set"])
        report = preflight(p["kernel"], p["initrd"], cmdline, sessions=p["sessions"], devices=p["devices"],
                           require_preserved=p["require_preserved"])
    except PyvfioError as exc:
        fail_with(module, exc, changed=False)
    result = dict(changed=False, checks=report["checks"], failed_checks=report["failed"],
                  warnings_found=report["warnings"], boot_id=report["boot_id"],
                  liveupdate_number=report["liveupdate_number"], cmdline=cmdline, devices=report["devices"])
    for text in report["warnings"]:
        module.warn(text)
    if not report["ok"]:
        module.fail_json(msg="live update preconditions not met: " + report["message"], error=report["error"],
                         **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
