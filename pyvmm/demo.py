"""`pyvmm demo`: the doorbell harness. The same guest loop rings a doorbell through each path
(a userspace MMIO or PIO exit served by a Python device, or an ioeventfd the kernel signals
without leaving the kernel) and the table compares them, with the vCPU's exit counts showing
that ioeventfd rings never reached userspace."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .devices import Counter
from .ioevent import IoEventAddress
from .kvm import Kvm
from .machine import Machine

DOORBELL_PORT = 0x510
DOORBELL_MMIO = 0xD0000000
# The guest's own reports (one REPORT, one DONE) are userspace exits on every path.
HARNESS_EXITS = 2


@dataclass
class DemoRow:
    path: str
    mode: str
    rings: int
    counted: int
    seconds: float
    guest_cycles: int
    userspace_exits: int
    kernel_exits: int

    @property
    def us_per_ring(self) -> float:
        return self.seconds / self.rings * 1e6

    @property
    def rings_per_second(self) -> float:
        return self.rings / self.seconds


PATHS = ("userspace MMIO", "userspace PIO", "ioeventfd MMIO", "ioeventfd PIO")
HYPERCALL_PATH = "hypercall"


def hypercalls_reach_userspace(kvm: Kvm) -> tuple[bool, str]:
    """Whether this host forwards KVM_HC_MAP_GPA_RANGE to userspace, and why (not)."""
    from .devices.pvdma import default_transport
    from .testing.hostinfo import kvm_module

    with kvm.create_vm() as vm:
        transport, why = default_transport(vm, kvm_module())
    return transport == "hypercall", why


def ring(path: str, mode: str, rings: int, *, kvm: Kvm | None = None,
         width: int = 4) -> DemoRow:
    """Run the doorbell payload once through `path` in `mode` ("cpl0" or "cpl3")."""
    payload = "doorbell" if mode == "cpl0" else "doorbell_user"
    mmio = "MMIO" in path
    with Machine(kvm=kvm, serial=False) as m:
        space = 1 if mmio else 0
        extra: dict[str, int] = {}
        if path == HYPERCALL_PATH:
            from .devices.hypercall import HypercallDispatcher, native_instruction
            from .exits import HypercallExit

            calls = [0]

            def serve(*args):
                calls[0] += 1
                return 0

            dispatcher = HypercallDispatcher()
            dispatcher.register(12, serve)   # KVM_HC_MAP_GPA_RANGE
            m.vm.enable_hypercall_exits(12)
            m.exit_handlers[HypercallExit] = dispatcher.handle
            count = lambda: calls[0]  # noqa: E731
            space = 2
            extra = {"r12": 1 if native_instruction(m.kvm) == "vmmcall" else 0}
        elif path.startswith("userspace"):
            device = Counter()
            if mmio:
                m.mmio.register(DOORBELL_MMIO, 8, device)
            else:
                m.pio.register(DOORBELL_PORT, 4, device)
            count = lambda: device.count
        else:
            address = (IoEventAddress.mmio(DOORBELL_MMIO) if mmio
                       else IoEventAddress.pio(DOORBELL_PORT))
            bell = m.doorbell(address, length=width)
            count = lambda: bell.count
        m.load(payload, regs={"rcx": rings, "rdi": space, "r10": width, "rsi": 1,
                              "r8": DOORBELL_PORT, "r9": DOORBELL_MMIO, **extra})
        before = m.vcpus[0].stats()["exits"]
        result = m.run(timeout=120)
        kernel_exits = m.vcpus[0].stats()["exits"] - before
        if not result.ok:
            raise RuntimeError(f"doorbell guest did not finish on {path}/{mode}:\n{result}")
        cycles = next((r.value64 for r in result.reports if r.tag == 0xDB), 0)
        return DemoRow(path, mode, rings, count(), result.duration, cycles,
                       sum(result.exits.values()) - HARNESS_EXITS, kernel_exits)


def run_demo(rings: int = 20000, modes: tuple[str, ...] = ("cpl0", "cpl3")) -> list[DemoRow]:
    rows = []
    with Kvm() as kvm:
        hypercalls, _why = hypercalls_reach_userspace(kvm)
        for mode in modes:
            for path in PATHS:
                rows.append(ring(path, mode, rings, kvm=kvm))
            if hypercalls and mode == "cpl0":  # hypercalls from CPL3 get -KVM_EPERM
                rows.append(ring(HYPERCALL_PATH, mode, rings, kvm=kvm))
    return rows


def hypercall_note() -> str:
    from .testing.hostinfo import kvm_module

    with Kvm() as kvm:
        works, why = hypercalls_reach_userspace(kvm)
    if works:
        return ("hypercall path: a VMCALL/VMMCALL of KVM_HC_MAP_GPA_RANGE per ring, forwarded "
                "to a Python handler (CPL0 only: from CPL3 KVM answers -KVM_EPERM).")
    if kvm_module() == "kvm_pvm":
        return ("hypercall path: not on this host. kvm_pvm cannot deliver hypercalls to "
                "userspace (VMCALL at CPL0 never returns; see docs/HOSTS.md). Stock KVM can: "
                "run it inside `pyvmm nested`.")
    return f"hypercall path: not on this host: {why}."


MODE_TITLES = {
    "cpl0": "guest at CPL0 (64-bit kernel mode)",
    "cpl3": "guest at CPL3 (64-bit user mode)",
}


def format_table(rows: list[DemoRow]) -> str:
    out = []
    for mode in dict.fromkeys(r.mode for r in rows):
        mine = [r for r in rows if r.mode == mode]
        base = next((r for r in mine if r.path == "userspace MMIO"), mine[0])
        out.append(f"{MODE_TITLES.get(mode, mode)}, {mine[0].rings} rings per path")
        out.append(f"  {'path':<16} {'rings/s':>9} {'us/ring':>8} {'speed-up':>9} "
                   f"{'counted':>8} {'userspace exits':>16} {'kernel exits':>13}")
        for r in mine:
            out.append(f"  {r.path:<16} {r.rings_per_second:>9.0f} {r.us_per_ring:>8.2f} "
                       f"{base.us_per_ring / r.us_per_ring:>8.2f}x {r.counted:>8} "
                       f"{r.userspace_exits:>16} {r.kernel_exits:>13}")
        out.append("")
    return "\n".join(out)


def main(rings: int = 20000) -> int:
    from .testing.hostinfo import describe_host

    print(f"pyvmm demo: the doorbell harness on {describe_host()}, {os.cpu_count()} CPUs")
    print("Each path runs the same guest loop (out/mov, dec, jnz) and counts rings in a Python")
    print("device (userspace) or in an eventfd the kernel signals (ioeventfd).\n")
    start = time.perf_counter()
    rows = run_demo(rings)
    print(format_table(rows))
    print(hypercall_note())
    lost = [r for r in rows if r.counted != r.rings]
    if lost:
        print(f"ERROR: rings lost on {[(r.path, r.mode) for r in lost]}")
        return 1
    leaked = [r for r in rows if r.path.startswith("ioeventfd") and r.userspace_exits]
    if leaked:
        print(f"ERROR: ioeventfd rings reached userspace on {[(r.path, r.mode) for r in leaked]}")
        return 1
    print(f"\nEvery ring counted; no ioeventfd ring reached userspace. "
          f"({time.perf_counter() - start:.1f} s)")
    return 0
