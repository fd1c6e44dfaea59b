"""`Machine`'s payload and kernel loaders: `load()` (a pyvmm guest payload), `start_vcpu()`
(host-set SMP start), `load_multiboot()` and `load_linux()`. Loaders only write memory and set
vCPU state (Machine inherits `LoadMethods`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .vcpu_state import MpState

if TYPE_CHECKING:
    from .kvm import Kvm
    from .vcpu import Vcpu
    from .vm import Vm

#: The stack each vCPU gets below the previous one's in a host-set SMP start.
AP_STACK_SIZE = 0x1000


class LoadMethods:
    """`Machine.load()`, `start_vcpu()`, `load_multiboot()` and `load_linux()`."""

    if TYPE_CHECKING:
        kvm: Kvm
        vcpus: list[Vcpu]
        irqchip: bool
        payload: Any

        @property
        def vm(self) -> Vm: ...

    def load(self, payload, *, regs: dict[str, int] | None = None,
             memory_size: int | None = None, start_aps: bool = False,
             vcpu_regs: Callable[[int], Mapping[str, int]] | Mapping[int, Mapping[str, int]]
             | None = None):
        """Build (by name or path) or take a `pyvmm.guests.Payload`, give the VM RAM at 0 if it
        has none, write the image and system structures, and set vCPU 0 up for its mode.
        `regs` are the payload's parameters (e.g. {"rcx": 1000}).

        SMP: by default the other vCPUs (APs) only get the CPUID table, and are left for the
        guest to start (INIT-SIPI-SIPI with the in-kernel irqchip). With `start_aps=True` the
        host starts them: every vCPU is set up like vCPU 0 (see `start_vcpu`). `vcpu_regs`
        gives per-vCPU registers on top of `regs`: a function of the vCPU id, or a mapping
        from id to registers (e.g. `lambda i: {"r10": i}` to tell each vCPU its id)."""
        from . import guests

        if not isinstance(payload, guests.Payload):
            payload = guests.build(payload)
        if not self.vm.memory.regions(0):
            payload.create_memory(self.vm, max(memory_size or 0, payload.memory_size))
        payload.load(self.vm)
        self.payload = payload
        if vcpu_regs is None and not start_aps:
            payload.setup_vcpu(self.vcpus[0], regs=regs)
        else:
            self.start_vcpu(0, regs=self._regs_for(0, regs, vcpu_regs))
        for vcpu in self.vcpus[1:]:
            if start_aps:
                self.start_vcpu(vcpu.id, regs=self._regs_for(vcpu.id, regs, vcpu_regs))
            elif not vcpu.cpuid_set:
                # A guest-started AP switches to long mode itself, which needs LM in its CPUID.
                vcpu.set_cpuid(self.kvm.supported_cpuid())
        return payload

    @staticmethod
    def _regs_for(vcpu_id: int, regs, vcpu_regs) -> dict[str, int]:
        merged = dict(regs or {})
        if vcpu_regs is not None:
            extra = vcpu_regs(vcpu_id) if callable(vcpu_regs) else vcpu_regs.get(vcpu_id)
            merged.update(extra or {})
        return merged

    def _vcpu(self, vcpu_id: int) -> Vcpu:
        for vcpu in self.vcpus:
            if vcpu.id == vcpu_id:
                return vcpu
        raise ValueError(f"this machine has no vCPU {vcpu_id}")

    def start_vcpu(self, vcpu_id: int, *, regs: Mapping[str, int] | None = None) -> Vcpu:
        """Host-set start of one vCPU at the loaded payload's entry, in its mode: a stack of
        its own (the mode's default top minus `vcpu_id * AP_STACK_SIZE`, unless `regs` has
        "rsp") and `regs`; with the in-kernel irqchip also MP state RUNNABLE, which an AP
        otherwise reaches only through INIT and SIPI."""
        from .guests import modes

        if self.payload is None:
            raise RuntimeError("load() a payload before starting vCPUs")
        vcpu = self._vcpu(vcpu_id)
        regs = dict(regs or {})
        rsp = regs.pop("rsp", modes.default_stack(self.payload.mode) - vcpu_id * AP_STACK_SIZE)
        if self.irqchip and vcpu.get_mp_state() != MpState.RUNNABLE:
            vcpu.set_mp_state(MpState.RUNNABLE)
        self.payload.setup_vcpu(vcpu, rsp=rsp, regs=regs)
        return vcpu

    def load_multiboot(self, path, *, cmdline: str = "", modules=(), **kwargs):
        """Load a Multiboot v1 kernel (ELF32) into RAM and set vCPU 0 at its entry in 32-bit
        protected mode (EAX=0x2BADB002, EBX=the information structure); see
        `pyvmm.loaders.multiboot.load_multiboot`. The other vCPUs are left for the guest
        to start (INIT/SIPI)."""
        from .loaders.multiboot import load_multiboot

        info = load_multiboot(self, path, cmdline=cmdline, modules=modules, **kwargs)
        for vcpu in self.vcpus[1:]:
            if not vcpu.cpuid_set:
                vcpu.set_supported_cpuid()
        return info

    def load_linux(self, kernel, *, initrd=None, cmdline: str = ""):
        """Load a Linux kernel (a path or bytes: ELF vmlinux by its PVH entry, bzImage by its
        64-bit entry), `initrd` and `cmdline` into RAM at 0, vCPU 0 at its entry (see
        `pyvmm.loaders.linux.load_linux`)."""
        from .loaders.linux import load_linux

        return load_linux(self, kernel, initrd=initrd, cmdline=cmdline)
