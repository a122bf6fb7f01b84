#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) pyvfio-lu contributors
# SPDX-License-Identifier: MIT

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: verify
short_description: After a live update, check that it happened and the named sessions came through
version_added: 0.1.0
description:
  - Runs C(pyvfio_lu.verify.verify) on the managed host - the boot id differs from the one
    before the kexec, the live update number is one more, and each named session came in
    (this boot's ledger index lists it) and reached I(sessions_state), waiting up to
    I(sessions_timeout) seconds for the host's own post-kexec job.
  - Fails with the library's error class in C(error) (C(LiveUpdateNotVerified),
    C(NoSuchSession) for a session that did not come through, C(SessionNotFinished)).
  - Read-only apart from adopting the ledgers (what the first /dev/liveupdate open after a live
    update does).
options:
  previous_boot_id:
    description: The boot id before the kexec.
    type: str
    required: true
  previous_liveupdate_number:
    description: The live update number before the kexec (omit after a cold boot).
    type: int
  sessions:
    description: Sessions that must have come through.
    type: list
    elements: str
    default: []
  sessions_state:
    description:
      - C(finished) - retrieved and finished by the host's post-kexec job.
      - C(incoming) - left for that job (not finished yet).
      - C(present) - either.
    type: str
    choices: [finished, incoming, present]
    default: finished
  sessions_timeout:
    description: Seconds to wait for the sessions to reach I(sessions_state).
    type: float
    default: 120
requirements:
  - pyvfio-lu on the managed host
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
- name: Did the live update carry vm-1, and did its VMM take it back?
  pyvfio_lu.live_update.verify:
    previous_boot_id: "{{ before.boot_id }}"
    previous_liveupdate_number: "{{ before.liveupdate_number }}"
    sessions: [vm-1]
"""

RETURN = r"""
boot_id:
  description: This boot's id.
  returned: always
  type: str
liveupdate_number:
  description: This boot's live update number.
  returned: always
  type: int
expected_number:
  description: The number it should be.
  returned: always
  type: int
sessions:
  description: Each named session's state (C(finished), C(incoming), C(missing), C(not yet adopted)).
  returned: always
  type: dict
waited:
  description: Seconds spent waiting for the sessions.
  returned: always
  type: float
uptime:
  description: Seconds since this kernel started (to time the kexec from the controller).
  returned: always
  type: float
error:
  description: The library's error class when the check failed.
  returned: failure
  type: str
"""

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.pyvfio_lu.live_update.plugins.module_utils.common import (
    PyvfioError,
    fail_with,
    need_library,
)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            previous_boot_id=dict(type="str", required=True),
            previous_liveupdate_number=dict(type="int"),
            sessions=dict(type="list", elements="str", default=[]),
            sessions_state=dict(type="str", choices=["finished", "incoming", "present"], default="finished"),
            sessions_timeout=dict(type="float", default=120),
        ),
        supports_check_mode=True,
    )
    need_library(module)
    from pyvfio_lu.verify import verify

    p = module.params
    try:
        report = verify(p["previous_boot_id"], p["previous_liveupdate_number"], p["sessions"],
                        wanted=p["sessions_state"], timeout=p["sessions_timeout"])
    except PyvfioError as exc:
        fail_with(module, exc, changed=False)
    fields = dict((k, report[k]) for k in ("boot_id", "previous_boot_id", "liveupdate_number", "expected_number",
                                           "sessions", "waited", "uptime"))
    if report["error"]:
        fields["error"] = report["error"]
        module.fail_json(msg=report["message"], changed=False, **fields)
    module.exit_json(changed=False, msg=report["message"], **fields)


if __name__ == "__main__":
    main()
