#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright (c) pyvfio-lu contributors
# SPDX-License-Identifier: MIT

from __future__ import absolute_import, division, print_function

__metaclass__ = type

DOCUMENTATION = r"""
---
module: device
short_description: Bind a PCI device to vfio-pci, or give it back, with the CLI's safety refusals
version_added: 0.1.0
description:
  - Binds a PCI device to vfio-pci (through driver_override) so a VMM can open its VFIO cdev and
    a live update can preserve it, or unbinds it and optionally hands it to another driver.
  - Refuses, changing nothing, exactly as C(pyvfio-lu bind) does, with the library's named error
    in the result (C(error)) - C(GroupNotViable) when the device's IOMMU group has members on
    other kernel drivers, C(InterfaceInUse) when it backs a network interface that is up, has
    addresses or carries routes (I(force) skips this check only, like C(--force)).
  - Idempotent - a device already in the wanted state is left alone (C(changed=false)).
options:
  bdf:
    description: PCI address of the device, for example C(0000:00:04.0).
    type: str
    required: true
  state:
    description:
      - C(vfio) binds the device to vfio-pci.
      - C(unbound) takes it from its driver and, with I(driver), probes that driver.
    type: str
    choices: [vfio, unbound]
    default: vfio
  driver:
    description: With I(state=unbound), the driver to give the device to (default none).
    type: str
  force:
    description: Skip the network-interface check (never the IOMMU group check).
    type: bool
    default: false
requirements:
  - pyvfio-lu on the managed host
  - root
attributes:
  check_mode:
    description: Can run in check mode and return changed status prediction without modifying target.
    support: full
  diff_mode:
    description: Will return details on what has changed (or possibly needs changing in check_mode), when in diff mode.
    support: full
author:
  - pyvfio-lu contributors (!UNKNOWN)
"""

EXAMPLES = r"""
- name: Hand the edu device to vfio-pci
  pyvfio_lu.live_update.device:
    bdf: "0000:00:04.0"

- name: Give a NIC back to its driver
  pyvfio_lu.live_update.device:
    bdf: "0000:00:05.0"
    state: unbound
    driver: virtio-pci
"""

RETURN = r"""
bdf:
  description: The device's canonical PCI address.
  returned: always
  type: str
  sample: "0000:00:04.0"
driver:
  description: Its driver afterwards (in check mode, the driver it would have).
  returned: success
  type: str
previous_driver:
  description: Its driver before.
  returned: success
  type: str
vfio_cdev:
  description: Its VFIO cdev afterwards, when bound to vfio-pci.
  returned: success
  type: str
iommu_group:
  description: Its IOMMU group.
  returned: success
  type: int
forced_past:
  description: Active network interfaces I(force) went past.
  returned: success
  type: list
  elements: dict
error:
  description: The library's error class when the module failed, for example C(GroupNotViable) or C(InterfaceInUse).
  returned: failure
  type: str
  sample: GroupNotViable
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
            bdf=dict(type="str", required=True),
            state=dict(type="str", choices=["vfio", "unbound"], default="vfio"),
            driver=dict(type="str"),
            force=dict(type="bool", default=False),
        ),
        supports_check_mode=True,
    )
    need_library(module)
    from pyvfio_lu.netsafety import check_device
    from pyvfio_lu.sysfs import VFIO_DRIVER, PciDevice, check_driver_name, is_vfio_driver

    p = module.params
    try:
        pci = PciDevice(p["bdf"])
        before = pci.driver
        result = dict(changed=False, bdf=pci.bdf, previous_driver=before, iommu_group=pci.iommu_group,
                      forced_past=[])
        if p["state"] == "vfio":
            want = VFIO_DRIVER
            if not is_vfio_driver(before):
                pci.check_group_viable()  # refuse before anything changes
                usage = check_device(pci, force=p["force"])
                result["forced_past"] = [u.to_json() for u in usage if u.active]
                result["changed"] = True
                if not module.check_mode:
                    pci.bind_vfio()
        else:
            want = p["driver"]
            if want is not None:
                check_driver_name(want)
            if before != want:
                if before and not is_vfio_driver(before):
                    usage = check_device(pci, force=p["force"])
                    result["forced_past"] = [u.to_json() for u in usage if u.active]
                result["changed"] = True
                if not module.check_mode:
                    pci.restore(want)
        result["driver"] = want if module.check_mode and result["changed"] else pci.driver
        result["vfio_cdev"] = None if module.check_mode else pci.vfio_cdev
        if module._diff:
            result["diff"] = dict(before={"driver": before}, after={"driver": result["driver"]})
    except PyvfioError as exc:
        fail_with(module, exc, bdf=p["bdf"], changed=False)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
