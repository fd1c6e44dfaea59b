# SPDX-License-Identifier: GPL-2.0-or-later
"""`PcPlatform`: the PC that kvm-unit-tests' x86 test kernels (and small OS guests) expect,
assembled on a `Machine` from pyvmm devices.

In the kernel (KVM): the 8259 PICs, the IOAPIC and the LAPICs (`Machine(irqchip=True)`), the
i8254 PIT (lost ticks discarded, as kvm-unit-tests runs QEMU), and QEMU's machine-check
setup (10 MCE banks). In Python, on the buses (`pyvmm.devices`):

    0x0060, 0x0064  i8042 (reset line)       0x0070-0x0071  CMOS/RTC (IRQ 8)
    0x0092          System Control Port A    0x00e0-0x00eb  pc-testdev scratch, flush page
    0x00f4-0x00f7   isa-debug-exit           0x0510-0x0511  fw_cfg
    0x0600-0x060b   ACPI PM1 and PM timer    0x0cf8-0x0cff  PCI mechanism #1, reset control
    0x2000-0x2017   pc-testdev IRQ lines     0x3f8-0x3ff    16550 serial (the Machine's)
    0xc000-0xc0ff   pci-testdev BAR 1        0xfebff000     pci-testdev BAR 0 (4 KiB)
    0xff000000      pc-testdev iomem (64 KiB)
PCI: the host bridge at 00:00.0, pci-testdev at 00:02.0. In memory: the ACPI tables at
0xe0000 (RSDP, RSDT, XSDT, FADT, FACS, DSDT, MADT with one LAPIC per vCPU), the real-mode
IVT and BIOS data area, and BIOS-area code (`pyvmm.devices.firmware`).

RAM follows QEMU's PC layout: up to 3.5 GiB (`LOWMEM_LIMIT`) at address 0; a larger RAM is
split into 3 GiB below 4 GiB and the rest above. `memory_map()` is the map a loader gives the
guest (multiboot mmap, e820): the BIOS area 0x9fc00-0xfffff reserved (the ACPI tables live
there), the rest usable.

For a loader: write the kernel and set vCPU 0 up at its entry as the boot protocol says
(multiboot: 32-bit flat protected mode, EAX/EBX). The first `run()` sends a vCPU 0 that
starts in 32-bit protected mode without paging through `firmware_entry()` first, so the
kernel finds the 8259s and the PIT as SeaBIOS leaves them under QEMU (`bios=False` turns
that off; a loader may also start vCPU 0 at `firmware_entry(entry)` itself). The other
vCPUs wait for the guest's INIT/SIPI. `run()` ends when the guest writes isa-debug-exit
(status `(value << 1) | 1`, as QEMU exits), powers off (status 0), resets ("shutdown"), or
times out:

    with PcPlatform.create(vcpus=2, memory_size=128 << 20) as pc:
        pc.machine.load_multiboot("x86/msr.flat")       # a loader: memory and vCPU state
        result = pc.run(timeout=60)
        print(result.console, result.status, pc.power_event)
"""

from __future__ import annotations

import inspect
import time
from collections import Counter
from dataclasses import dataclass
from enum import IntEnum

from .devices import acpi
from .devices.acpi_pm import PM_BASE, AcpiPm
from .devices.debug_exit import DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, DebugExit
from .devices import firmware
from .devices.fw_cfg import FW_CFG_PORT, FwCfg
from .devices.i8042 import SYSTEM_CONTROL_A, I8042, SystemControlA
from .devices.pc_testdev import PcTestdev, flush_guest_page
from .devices.pci import PciBus
from .devices.pci_testdev import PciTestdev
from .devices.mce import setup_mce
from .devices.pit import set_pit_reinject
from .devices.rtc import RTC_PORT, Rtc, pc_cmos_bytes
from .guests import modes
from .kvm import Kvm
from .machine import Machine, RunResult

MIB = 1 << 20
GIB = 1 << 30
#: QEMU's default RAM size, and what kvm-unit-tests runs with unless a test asks for more.
DEFAULT_MEMORY = 128 * MIB
#: RAM up to this size stays below 4 GiB in one piece.
LOWMEM_LIMIT = 0xE0000000
#: A larger RAM keeps this much below 4 GiB (QEMU i440fx "gigabyte alignment").
LOWMEM_SPLIT = 3 * GIB
HIGHMEM_BASE = 4 * GIB
#: The end of conventional memory (639 KiB): the EBDA and the BIOS area follow.
CONVENTIONAL_END = 0x9FC00
BIOS_AREA_END = 0x100000
#: Smallest RAM the platform accepts: the BIOS area (ACPI tables) and a little above it.
MIN_MEMORY = 2 * MIB


class MemoryType(IntEnum):
    """e820 / multiboot memory map types."""

    USABLE = 1
    RESERVED = 2
    ACPI = 3


@dataclass(frozen=True)
class MemoryRange:
    """One entry of the guest's memory map."""

    base: int
    length: int
    type: MemoryType

    @property
    def end(self) -> int:
        return self.base + self.length


def ram_layout(memory_size: int) -> list[tuple[int, int]]:
    """Where `memory_size` bytes of RAM go: [(guest address, size)], one or two pieces."""
    if memory_size < MIN_MEMORY or memory_size % 0x1000:
        raise ValueError(f"memory_size must be a multiple of 4 KiB and at least "
                         f"{MIN_MEMORY >> 20} MiB, got {memory_size:#x}")
    if memory_size <= LOWMEM_LIMIT:
        return [(0, memory_size)]
    return [(0, LOWMEM_SPLIT), (HIGHMEM_BASE, memory_size - LOWMEM_SPLIT)]


def memory_map(memory_size: int) -> list[MemoryRange]:
    """The guest's memory map for `memory_size` bytes of RAM (sorted, non-overlapping)."""
    from .loaders.memory_map import build_memory_map

    return [MemoryRange(base, length, MemoryType(kind))
            for base, length, kind in build_memory_map(ram_layout(memory_size))]


def _accepts_status(stop) -> bool:
    try:
        return "status" in inspect.signature(stop).parameters
    except (TypeError, ValueError):
        return False


class PcPlatform:
    """The devices of a PC on `machine` (which needs the in-kernel irqchip and no RAM yet:
    the platform adds RAM as `ram_layout()` says). `PcPlatform.create()` makes the Machine.
    `testdev=False` / `pci_testdev=False` leave QEMU's test devices out (an OS guest).

    The devices are attributes: `debug_exit`, `fw_cfg`, `testdev`, `pci` (the bus) and
    `pci_testdev`, `rtc`, `pm`, `i8042`, `port92`; `acpi` says where the tables are.
    `exit_status` is what the guest's last debug-exit write reported ((value << 1) | 1),
    None before one."""

    def __init__(self, machine: Machine, *, memory_size: int = DEFAULT_MEMORY,
                 pit: bool = True, testdev: bool = True, pci_testdev: bool = True,
                 bios: bool = True) -> None:
        if not machine.irqchip:
            raise ValueError("a PcPlatform needs the in-kernel irqchip: Machine(irqchip=True)")
        if machine.memory.regions(0):
            raise ValueError("a PcPlatform lays out RAM itself: give it a Machine without "
                             "memory (no memory_size)")
        pieces = ram_layout(memory_size)
        vm = machine.vm
        if vm is None:
            raise ValueError("the machine is closed")
        self.vm = vm
        self.machine = machine
        self.memory_size = memory_size
        self.vcpus = len(machine.vcpus)
        for base, size in pieces:
            machine.add_memory(base, size)
        if pit:
            vm.create_pit()
            set_pit_reinject(vm, False)
        for vcpu in machine.vcpus:
            setup_mce(vcpu, machine.kvm)   # QEMU's 10 banks, not KVM's 32
        self._stop_has_status = _accepts_status(machine.stop)
        self._run_status: int | None = None
        self._suspended = False
        self._bios_pending = bios
        #: How the guest last asked the machine to end or sleep: "poweroff", "reset",
        #: "suspend" (S3, still asleep) or "resume" (woke from S3); None: never.
        self.power_event: str | None = None
        self._add_chipset(pieces[0][1])
        self._add_test_devices(testdev=testdev, pci_testdev=pci_testdev)

    def _add_chipset(self, below_4g: int) -> None:
        machine = self.machine
        self.pci = PciBus(machine.pio, machine.mmio, on_reset=self._guest_reset)
        self.pci.attach()
        self.rtc = Rtc(set_irq=self.vm.irq_line)
        for index, value in pc_cmos_bytes(self.memory_size, self.vcpus,
                                          below_4g=below_4g).items():
            self.rtc.cmos[index] = value
        machine.pio.register(RTC_PORT, Rtc.length, self.rtc)
        self.pm = AcpiPm(on_poweroff=self._guest_poweroff, on_suspend=self._guest_suspend)
        machine.pio.register(PM_BASE, AcpiPm.length, self.pm)
        self.acpi = acpi.install(machine.memory, self.vcpus, pm_base=PM_BASE)
        firmware.install_low_memory(machine.memory)
        self.i8042 = I8042(on_reset=self._guest_reset)
        self.i8042.register(machine.pio)
        self.port92 = SystemControlA(on_reset=self._guest_reset)
        machine.pio.register(SYSTEM_CONTROL_A, SystemControlA.length, self.port92)
        self.fw_cfg = FwCfg(cpus=self.vcpus, ram_size=self.memory_size)
        machine.pio.register(FW_CFG_PORT, FwCfg.length, self.fw_cfg)

    def _add_test_devices(self, *, testdev: bool, pci_testdev: bool) -> None:
        machine = self.machine
        self.debug_exit = DebugExit(on_exit=self._guest_exit, length=DEBUG_EXIT_SIZE)
        machine.pio.register(DEBUG_EXIT_PORT, DEBUG_EXIT_SIZE, self.debug_exit)
        self.testdev: PcTestdev | None = None
        if testdev:
            self.testdev = PcTestdev(set_irq=self.vm.irq_line,
                                     flush_page=lambda gpa: flush_guest_page(machine.memory,
                                                                             gpa))
            self.testdev.attach(machine.pio, machine.mmio)
        self.pci_testdev: PciTestdev | None = None
        if pci_testdev:
            # Slot 2: where QEMU puts the first -device on a PC without VGA (-nodefaults).
            self.pci_testdev = PciTestdev(doorbell=self._doorbell)
            self.pci.add(2, 0, self.pci_testdev)

    @classmethod
    def create(cls, *, vcpus: int = 1, memory_size: int = DEFAULT_MEMORY,
               kvm: Kvm | None = None, **kwargs) -> PcPlatform:
        """A new Machine (in-kernel irqchip, `vcpus` vCPUs) with this platform on it. Closing
        the platform closes the Machine."""
        if not 1 <= vcpus <= 255:
            raise ValueError(f"vcpus must be 1..255 (xAPIC ids), got {vcpus}")
        ram_layout(memory_size)  # refuse a bad size before any VM exists
        machine = Machine(vcpus=vcpus, irqchip=True, kvm=kvm)
        try:
            return cls(machine, memory_size=memory_size, **kwargs)
        except BaseException:
            machine.close()
            raise

    # -- guest-ended runs --------------------------------------------------------------------

    def _guest_exit(self, status: int) -> None:
        self._run_status = status
        if self._stop_has_status:
            self.machine.stop("done", status=status)
        else:
            self.machine.stop("done")

    def _guest_reset(self) -> None:
        # No reboot (QEMU's --no-reboot, as kvm-unit-tests runs it): a reset ends the run.
        self.power_event = "reset"
        self.machine.stop("shutdown")

    def _guest_poweroff(self) -> None:
        self.power_event = "poweroff"
        self._run_status = 0
        if self._stop_has_status:
            self.machine.stop("done", status=0)
        else:
            self.machine.stop("done")

    def _guest_suspend(self) -> None:
        # The run stops here; run() wakes the machine when the RTC alarm goes off.
        self.power_event = "suspend"
        self._suspended = True
        self.machine.stop("stopped")

    def _resume(self) -> bool:
        """Wake from S3 as a PC BIOS does: the boot vCPU starts in real mode at the FACS's
        waking vector, PM1 status says WAK_STS. False when the guest left no vector."""
        facs = self.acpi.addresses["FACS"]
        vector = int.from_bytes(self.machine.memory.read(facs + 12, 4), "little")
        if vector == 0 or vector >= 0x100000:
            return False
        vcpu = self.machine.vcpus[0]
        vcpu.complete_io()        # the SLP_EN write completes before the state is replaced
        modes.setup_vcpu(vcpu, "real16", vector & 0xF, set_cpuid=False)
        sregs = vcpu.get_sregs()
        sregs.cs.selector, sregs.cs.base = vector >> 4, (vector >> 4) << 4
        vcpu.set_sregs(sregs)
        self.pm.wake()
        self.power_event = "resume"
        return True

    def _doorbell(self, address, length: int, datamatch: int | None):
        return self.machine.doorbell(address, length=length, datamatch=datamatch)

    def firmware_entry(self, entry: int) -> int:
        """Where a loader starts the boot vCPU (32-bit flat protected mode, its handover
        registers in EAX/EBX) so that the kernel at `entry` finds the 8259s and the PIT as a
        PC BIOS leaves them (see `pyvmm.devices.firmware`)."""
        self._bios_pending = False
        return firmware.install_init_stub(self.machine.memory, entry)

    def _enter_through_bios(self) -> None:
        """Before the first run: a boot vCPU set up in 32-bit protected mode without paging
        (a multiboot or PVH handover) starts at the BIOS init stub, which goes on to where
        the loader pointed it with the same registers."""
        self._bios_pending = False
        vcpu = self.machine.vcpus[0]
        sregs = vcpu.get_sregs()
        if not sregs.cr0 & modes.CR0_PE or sregs.cr0 & modes.CR0_PG or not sregs.cs.db \
                or sregs.cs.base != 0:
            return
        regs = vcpu.get_regs()
        regs.rip = self.firmware_entry(regs.rip)
        vcpu.set_regs(regs)

    @property
    def exit_status(self) -> int | None:
        return self.debug_exit.status

    def memory_map(self) -> list[MemoryRange]:
        """This platform's guest memory map."""
        return memory_map(self.memory_size)

    def run(self, timeout: float | None = 10.0, **kwargs) -> RunResult:
        """`machine.run()`; a run the guest ended through debug-exit carries that status (a
        poweroff: status 0). A guest that suspends to RAM (S3) sleeps until its RTC alarm
        and resumes at its FACS waking vector within the same run() and `timeout`; with no
        alarm set it stays asleep and the run ends ("stopped", power_event "suspend")."""
        if self._bios_pending:
            self._enter_through_bios()
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        console, exits = "", Counter[str]()
        while True:
            self._run_status = None
            self._suspended = False
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            result = self.machine.run(left, **kwargs)
            console += result.console
            exits.update(result.exits)
            if not (self._suspended and result.stop == "stopped"):
                break
            # Suspended to RAM: sleep until the RTC alarm, then resume (or stay asleep).
            wait = self.rtc.seconds_to_alarm()
            left = None if deadline is None else deadline - time.monotonic()
            if wait is None or (left is not None and wait > left):
                break
            time.sleep(wait)
            if not self._resume():
                break
        result.console, result.exits = console, exits
        result.duration = time.monotonic() - start
        if result.stop == "done" and result.status is None and self._run_status is not None:
            result.status = self._run_status
        return result

    # -- lifetime ----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the RTC's timer and close the Machine (and its VM)."""
        self.rtc.close()
        self.machine.close()

    def __enter__(self) -> PcPlatform:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
