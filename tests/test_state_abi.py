# SPDX-License-Identifier: GPL-2.0-or-later
"""The x86-state part of the ABI conformance check (tests/test_abi.py compares everything
pyvmm declares with the host's <linux/kvm.h>): every struct and ioctl the state, snapshot and
dirty-ring code uses is among what was compared, and agreed."""

from __future__ import annotations

from test_abi import kernel_view  # noqa: F401  (the fixture)

STRUCTS = ("kvm_xsave", "kvm_xcrs", "kvm_xcr", "kvm_debugregs", "kvm_nested_state",
           "kvm_vmx_nested_state_hdr", "kvm_svm_nested_state_hdr", "kvm_pic_state",
           "kvm_ioapic_state", "kvm_irqchip", "kvm_pit_channel_state", "kvm_pit_state2",
           "kvm_clock_data", "kvm_dirty_gfn", "kvm_clear_dirty_log")
IOCTLS = ("KVM_GET_XSAVE", "KVM_SET_XSAVE", "KVM_GET_XSAVE2", "KVM_GET_XCRS", "KVM_SET_XCRS",
          "KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", "KVM_GET_TSC_KHZ", "KVM_SET_TSC_KHZ",
          "KVM_KVMCLOCK_CTRL", "KVM_GET_NESTED_STATE", "KVM_SET_NESTED_STATE",
          "KVM_GET_IRQCHIP", "KVM_SET_IRQCHIP", "KVM_GET_PIT2", "KVM_SET_PIT2",
          "KVM_GET_CLOCK", "KVM_SET_CLOCK", "KVM_SET_IDENTITY_MAP_ADDR", "KVM_CLEAR_DIRTY_LOG",
          "KVM_RESET_DIRTY_RINGS", "KVM_GET_MSR_FEATURE_INDEX_LIST")


def test_state_structs_and_ioctls_were_compared(kernel_view):  # noqa: F811
    seen, expected, missing = kernel_view
    for name in STRUCTS:
        assert ("size", name) in seen, f"struct {name} was not compared ({missing})"
        assert seen[("size", name)] == expected[("size", name)], name
    for name in IOCTLS:
        assert ("ioctl", name) in seen, f"{name} was not compared ({missing})"
        assert seen[("ioctl", name)] == expected[("ioctl", name)], name
    for key in ("kvm_irqchip.chip.ioapic", "kvm_nested_state.data", "kvm_xcrs.xcrs",
                "kvm_pit_state2.flags", "kvm_clock_data.host_tsc", "kvm_dirty_gfn.offset"):
        assert ("field", key) in seen and seen[("field", key)] == expected[("field", key)]
