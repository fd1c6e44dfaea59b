# SPDX-License-Identifier: GPL-2.0-or-later
"""The machine-check banks a platform vCPU reports: QEMU's 10, not KVM's default 32."""

from __future__ import annotations

import pytest

from pyvmm.devices.mce import DEFAULT_CAP, MCG_CTL_P, setup_mce, supported_mce_cap
from pyvmm.platform import PcPlatform

MSR_IA32_MCG_CAP = 0x179


def test_kvm_reports_the_flags_it_supports(kvm):
    assert supported_mce_cap(kvm) & MCG_CTL_P


def test_setup_mce_sets_mcg_cap(machine):
    cap = setup_mce(machine.vcpus[0], machine.kvm, banks=4)
    assert cap & 0xFF == 4 and cap & ~0xFF == DEFAULT_CAP & supported_mce_cap(machine.kvm)
    assert machine.vcpus[0].get_msrs([MSR_IA32_MCG_CAP])[MSR_IA32_MCG_CAP] == cap
    for banks in (0, 33):
        with pytest.raises(ValueError):
            setup_mce(machine.vcpus[0], machine.kvm, banks=banks)


def test_every_platform_vcpu_has_ten_banks(kvm):
    with PcPlatform.create(vcpus=2, memory_size=16 << 20, kvm=kvm) as pc:
        for vcpu in pc.machine.vcpus:
            assert vcpu.get_msrs([MSR_IA32_MCG_CAP])[MSR_IA32_MCG_CAP] & 0xFF == 10
