#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) pyvfio-lu contributors
# SPDX-License-Identifier: MIT

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: live_update
short_description: Live-update a host into a new kernel - preflight, load, kexec, reconnect, verify
version_added: 0.1.0
description:
  - An action (it runs on the controller) that live-updates one host, each host-side step a
    module of this collection calling the pyvfio_lu library there.
  - 1. M(pyvfio_lu.live_update.preflight) - every precondition, read-only; a failure stops here
    and nothing has changed.
  - 2. M(pyvfio_lu.live_update.kexec) with I(state=executed) - C(kexec_file_load) of the kernel
    and initramfs (a failure, such as C(KexecImageTooLarge), stops here, nothing rebooted), then
    C(reboot(LINUX_REBOOT_CMD_KEXEC)) from a detached process after I(delay) seconds.
  - 3. Probes the host (M(pyvfio_lu.live_update.facts) with the C(boot) subset, the connection
    reset each time) until it answers with a new boot id. If the kernel refused the kexec
    (C(KexecRefused) - a preserved device failed to freeze) the host runs on with its sessions
    still held, and the task fails with that error.
  - 4. M(pyvfio_lu.live_update.verify) - live update number one more than before, the named
    sessions came through and reached I(sessions_state) (by default finished by the host's own
    post-kexec job).
  - The result has the wall time of each step in C(timings). Check mode runs the preflight only.
  - What holds the sessions across the kexec (C(pyvfio_lu.holder)) and what takes them back after
    it (the host's VMM or a service using C(pyvfio_lu.luo)) are the host's; this action only
    checks them.
options:
  kernel:
    description: The next kernel (bzImage) as a path on the managed host.
    type: path
    required: true
  initrd:
    description: Its initramfs.
    type: path
  cmdline:
    description: Its command line (default the running kernel's, which carries C(kho=on liveupdate=on)).
    type: str
  cmdline_set:
    description: Parameters to replace or add on that command line.
    type: dict
    default: {}
  sessions:
    description: LUO sessions that must be carried (and verified after the kexec).
    type: list
    elements: str
    default: []
  sessions_state:
    description: What the sessions must have become after the kexec (see M(pyvfio_lu.live_update.verify)).
    type: str
    choices: [finished, incoming, present]
    default: finished
  sessions_timeout:
    description: Seconds to wait for them after the host is back.
    type: float
    default: 120
  devices:
    description: VFIO devices that must be carried (default - those the held sessions preserve).
    type: list
    elements: str
  require_preserved:
    description: A device must already be preserved in a held session.
    type: bool
    default: true
  preflight:
    description: Run the preflight first (it is cheap and closes the gap since any earlier check).
    type: bool
    default: true
  delay:
    description: Seconds between loading and the reboot (lets the module's result reach the controller).
    type: float
    default: 1.0
  reboot_timeout:
    description: Seconds to wait for the host to come back.
    type: float
    default: 600
  old_kernel_grace:
    description: Seconds the old kernel may still answer after the kexec was due before the task fails.
    type: float
    default: 60
  probe_interval:
    description: Seconds between probes while the host comes back.
    type: float
    default: 1.0
  exec_report:
    description: Where the detached reboot reports a refusal on the host.
    type: path
    default: /run/pyvfio-lu/exec-report.json
requirements:
  - pyvfio-lu on the managed host, root there
  - an SSH connection that notices a dead peer (for example C(-o ServerAliveInterval=2))
attributes:
  action:
    description: Indicates this has a corresponding action plugin so some parts of the options can be executed on the controller.
    support: full
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: none
author:
  - pyvfio-lu contributors (!UNKNOWN)
seealso:
  - module: pyvfio_lu.live_update.preflight
  - module: pyvfio_lu.live_update.kexec
  - module: pyvfio_lu.live_update.verify
"""

EXAMPLES = r"""
- name: Live-update into the new kernel, carrying the VMs' sessions
  pyvfio_lu.live_update.live_update:
    kernel: /boot/vmlinuz-7.2.14
    initrd: /boot/initrd.img-7.2.14
    sessions: [vm-1, vm-2]
  register: lu

- name: Where the time went
  ansible.builtin.debug:
    var: lu.timings
"""

RETURN = r"""
stage:
  description: The step reached - C(preflight), C(load), C(kexec), C(verify) or C(done).
  returned: always
  type: str
error:
  description: The library's error class of the failure (C(KexecImageTooLarge), C(SessionNotHeld), C(KexecRefused), ...).
  returned: failure
  type: str
preflight:
  description: The preflight's checks (see M(pyvfio_lu.live_update.preflight)).
  returned: when the preflight ran
  type: dict
before:
  description: Boot id and live update number before the kexec.
  returned: once the kernel was loaded
  type: dict
boot_id:
  description: The new boot id.
  returned: when the host came back
  type: str
liveupdate_number:
  description: The new live update number.
  returned: when the host came back
  type: int
verify:
  description: What M(pyvfio_lu.live_update.verify) found.
  returned: when the host came back
  type: dict
timings:
  description:
    - Wall seconds per step, on the controller - C(preflight), C(load_and_exec) (the kexec module,
      with the guest-side load in C(load_seconds)), C(kexec) (from that module's return to the new
      kernel's start, from the host's uptime; includes I(delay)), C(reconnect) (the new kernel's
      start to its first answer), C(verify), C(total).
  returned: always
  type: dict
  sample: {"preflight": 3.1, "load_and_exec": 3.4, "kexec": 2.9, "reconnect": 9.8, "verify": 3.0, "total": 24.1}
load_seconds:
  description: How long C(kexec_file_load) took on the host.
  returned: once the kernel was loaded
  type: float
"""
