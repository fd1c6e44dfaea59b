# SPDX-License-Identifier: GPL-2.0-or-later
"""The in-kernel i8254 PIT: its lost-tick policy (KVM_REINJECT_CONTROL).

KVM re-injects PIT ticks the guest missed unless told otherwise. kvm-unit-tests runs QEMU with
`kvm-pit.lost_tick_policy=discard`, which turns re-injection off (re-injection keeps AVIC
inhibited); `set_pit_reinject(vm, False)` does the same. The PIT itself is created with
`Vm.create_pit()` (KVM_CREATE_PIT2), after the in-kernel irqchip.
"""

from __future__ import annotations

from .._ffi import ffi
from ..ioctls import IOC, IOC_NONE, KVMIO, ioctl

#: KVM_REINJECT_CONTROL, _IO(KVMIO, 0x71); its argument is struct kvm_reinject_control
#: (u8 pit_reinject, u8 reserved[31]).
KVM_REINJECT_CONTROL = IOC(IOC_NONE, KVMIO, 0x71, 0)
_REINJECT_CONTROL_SIZE = 32


def set_pit_reinject(vm, enabled: bool) -> None:
    """Turn the in-kernel PIT's re-injection of lost ticks on or off (the PIT must exist:
    ENXIO otherwise)."""
    arg = ffi.new("unsigned char[]", _REINJECT_CONTROL_SIZE)
    arg[0] = 1 if enabled else 0
    ioctl(vm.fileno(), KVM_REINJECT_CONTROL, arg, role="vm",
          detail="KVM_REINJECT_CONTROL (ENXIO: no in-kernel PIT; call create_pit() first)")
