"""The `pyvmm` command: info, run, demo, migrate-demo, nested, bench, kut."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .caps import Cap

# Capabilities that matter to pyvmm, and what depends on each.
IMPORTANT_CAPS = [
    (Cap.USER_MEMORY, "memslots from anonymous host memory (every VM)"),
    (Cap.IOEVENTFD, "ioeventfd doorbells: guest writes signal an eventfd without a userspace exit"),
    (Cap.IOEVENTFD_ANY_LENGTH, "wildcard-length (length 0) doorbells"),
    (Cap.IRQFD, "irqfd interrupts: devices raise guest interrupts through an eventfd"),
    (Cap.IRQCHIP, "the in-kernel PIC/IOAPIC/LAPIC that irqfd and `sti; hlt` guests need"),
    (Cap.READONLY_MEM, "read-only memslots (writes become MMIO exits)"),
    (Cap.IMMEDIATE_EXIT, "kick without a lost wake-up (immediate_exit + signal)"),
    (Cap.BINARY_STATS_FD, "vcpu.stats(): the exit counters"),
    (Cap.X86_USER_SPACE_MSR, "RDMSR/WRMSR exits to userspace (MsrExit)"),
    (Cap.X86_MSR_FILTER, "MSR filters that choose which MSRs exit"),
    (Cap.X86_SMM, "System Management Mode: vcpu.smi(), SMRAM, RSM"),
    (Cap.MULTI_ADDRESS_SPACE, "address space 1, where SMRAM lives (needs 2)"),
    (Cap.EXIT_HYPERCALL, "hypercalls forwarded to userspace (KVM_HC_MAP_GPA_RANGE, PV-DMA)"),
    (Cap.COALESCED_MMIO, "machine.coalesce(): coalesced MMIO ring (value: its page offset)"),
    (Cap.COALESCED_PIO, "machine.coalesce(pio=True): port writes in the same ring"),
    (Cap.SYNC_REGS, "registers synced through kvm_run"),
    (Cap.DIRTY_LOG_RING, "dirty page rings"),
    (Cap.MANUAL_DIRTY_LOG_PROTECT2, "manual dirty log clearing"),
    (Cap.SPLIT_IRQCHIP, "userspace IOAPIC with in-kernel LAPICs"),
    (Cap.NR_VCPUS, "recommended vCPUs per VM"),
    (Cap.MAX_VCPUS, "maximum vCPUs per VM"),
    (Cap.NR_MEMSLOTS, "memslots per VM"),
    (Cap.USER_MEMORY2, "KVM_SET_USER_MEMORY_REGION2 (memslots that name a guest_memfd)"),
    (Cap.GUEST_MEMFD, "pyvmm.guest_memfd.create_guest_memfd(): memory owned by one VM"),
    (Cap.GUEST_MEMFD_FLAGS, "guest_memfd flags offered (bits: MMAP 1, INIT_SHARED 2)"),
    (Cap.MEMORY_ATTRIBUTES, "private/shared page attributes (private guest_memfd pages)"),
    (Cap.VM_TYPES, "KVM_CREATE_VM types offered (bit 0: the default VM)"),
    # x86 state: save/restore, snapshots, migration (pyvmm.state, pyvmm.snapshot)
    (Cap.XSAVE2, "vcpu.get_xsave(): KVM_GET_XSAVE2, size of the XSAVE area"),
    (Cap.XCRS, "vcpu.get_xcrs()/set_xcrs(): XCR0 in a saved state"),
    (Cap.DEBUGREGS, "vcpu.get_debugregs()/set_debugregs()"),
    (Cap.GET_TSC_KHZ, "vcpu.get_tsc_khz(): the guest TSC rate in a saved state"),
    (Cap.TSC_CONTROL, "vcpu.set_tsc_khz() to another rate (TSC scaling)"),
    (Cap.KVMCLOCK_CTRL, "vcpu.kvmclock_ctrl(): tell a paused guest's kvmclock"),
    (Cap.NESTED_STATE, "vcpu.get_nested_state(): nested guests in a saved state (max size)"),
    (Cap.ADJUST_CLOCK, "vm.get_clock()/set_clock(): kvmclock across a snapshot"),
    (Cap.PIT_STATE2, "vm.get_pit()/set_pit(): the in-kernel PIT in a saved state"),
]


def cmd_info(args: argparse.Namespace) -> int:
    from .kvm import Kvm
    from .testing.hostinfo import describe_host

    with Kvm(args.device) as kvm, kvm.create_vm() as vm:
        print(f"KVM at {args.device}: {describe_host()}")
        print(f"  API version        {kvm.api_version}")
        print(f"  vCPU mmap size     {kvm.vcpu_mmap_size} bytes")
        print(f"  CPUID leaves       {len(kvm.supported_cpuid())} supported")
        print("\nCapabilities (VM fd; value, then what it gives pyvmm):")
        missing = []
        for cap, why in IMPORTANT_CAPS:
            value = vm.check_extension(cap)
            shown = "yes" if value == 1 else ("no" if value == 0 else f"yes ({value})")
            print(f"  {cap.name:<26} {shown:<12} {why}")
            if value == 0:
                missing.append(cap)
        if Cap.X86_SMM in missing or Cap.EXIT_HYPERCALL in missing:
            print("\nMissing here, and why it matters:")
            if Cap.X86_SMM in missing:
                print("  - No SMM: SMI injection, SMRAM (address space 1) and RSM cannot be "
                      "tested on this host. `pyvmm nested` runs them on a stock kvm_amd "
                      "under QEMU.")
            if Cap.EXIT_HYPERCALL in missing:
                print("  - No hypercall exits: the hypercall doorbell path and PV-DMA over "
                      "hypercalls need stock KVM (`pyvmm nested`); PV-DMA falls back to PIO.")
        from .testing.hostinfo import kvm_module

        if kvm_module() == "kvm_pvm":
            print("\nNote: kvm_pvm reports KVM_CAP_EXIT_HYPERCALL but never forwards a "
                  "hypercall (VMCALL at CPL0 hangs KVM_RUN); guest CPL0 code is emulated, "
                  "CPL3 code runs natively (docs/HOSTS.md in pyvmm's repository).")
    return 0


def _parse_regs(pairs: list[str]) -> dict[str, int]:
    from .structs import Regs

    names = list(Regs().to_dict())
    regs = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        name = name.strip().lower()
        if not value:
            raise ValueError(f"--reg wants NAME=VALUE, got {pair!r} (e.g. --reg rcx=1000)")
        if name not in names:
            raise ValueError(f"--reg {pair!r}: no register named {name!r}; the registers are "
                             f"{', '.join(names)}")
        try:
            regs[name] = int(value, 0)
        except ValueError:
            raise ValueError(f"--reg {pair!r}: {value!r} is not a number (e.g. 1000, 0x3e8 or "
                             "0b1111101000)") from None
    return regs


def cmd_run(args: argparse.Namespace) -> int:
    from .machine import Machine

    with Machine(irqchip=args.irqchip) as machine:
        def echo(data: bytes) -> None:
            sys.stdout.write(data.decode("utf-8", "replace"))
            sys.stdout.flush()

        machine.console_sink = echo
        payload = machine.load(args.payload, regs=_parse_regs(args.reg))
        if args.gdb:
            result = _run_under_gdb(machine, payload, args)
        else:
            result = machine.run(timeout=args.timeout)
        print(f"\n--- {payload.name} ({payload.mode}, entry {payload.entry:#x})")
        for report in result.reports:
            print(f"  {report}")
        print(result.summary())
        return 0 if result.ok else 1


def _run_under_gdb(machine: Any, payload: Any, args: argparse.Namespace) -> Any:
    import shlex

    from .gdb import GdbServer

    try:
        server = GdbServer(machine, args.gdb, arch=args.gdb_arch)
    except ValueError as err:
        raise SystemExit(f"pyvmm: --gdb: {err}") from None
    with server:
        host, port = server.address
        print(f"pyvmm: gdb stub on {host}:{port} ({server.target_arch}); {payload.name} waits at "
              f"its first instruction. Connect with:\n  "
              f"{shlex.join(server.gdb_command(str(payload.elf_path)))}",
              file=sys.stderr, flush=True)
        return server.serve(detach_timeout=args.timeout)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import main

    return main(args.rings)


def cmd_migrate_demo(args: argparse.Namespace) -> int:
    from .migrate_demo import main

    try:
        return main(memory_mb=args.memory, pages=args.pages, steps=args.steps,
                    spins=tuple(args.spin or (400, 50)), threshold=args.threshold,
                    processes=args.processes)
    except ValueError as err:
        print(f"pyvmm migrate-demo: {err}", file=sys.stderr)
        return 2


def cmd_boot(args: argparse.Namespace) -> int:
    from .boot import main as boot_main

    return boot_main(args)


def cmd_kut(args: argparse.Namespace) -> int:
    from .kut.command import main as kut_main

    return kut_main(args)


def _version() -> str:
    from . import __version__

    return __version__


def _one_line(err: BaseException) -> str:
    """An error as the one line the CLI prints: its message, with the errno where it has one."""
    from .errors import KvmError

    if isinstance(err, KvmError):
        return str(err)
    if isinstance(err, OSError) and err.strerror:
        text = str(err.strerror)
        if err.filename and str(err.filename) not in text:
            text += f": {err.filename}"
        return text
    return str(err).splitlines()[0] if str(err) else type(err).__name__


def _known_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix (a missing device, payload or tool, a bad argument):
    one line, no traceback. Anything else is a bug and keeps its traceback."""
    from .errors import KvmError, KvmUnavailable
    from .guests.toolchain import ToolchainError

    return (KvmUnavailable, KvmError, ToolchainError, FileNotFoundError, ValueError)


def main(argv: list[str] | None = None) -> int:
    """The `pyvmm` command. Errors the user can fix print one line (`pyvmm: ...`) and exit 2;
    `pyvmm --debug ...` (or PYVMM_DEBUG=1) shows their tracebacks instead."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("PYVMM_DEBUG", "") not in ("", "0")
    while argv[:1] == ["--debug"]:
        debug = True
        argv = argv[1:]
    try:
        return _main(argv, debug)
    except KeyboardInterrupt:
        if debug:
            raise
        print("pyvmm: interrupted", file=sys.stderr)
        return 130
    except _known_errors() as err:
        if debug:
            raise
        print(f"pyvmm: {_one_line(err)}", file=sys.stderr)
        return 2


def _main(argv: list[str], debug: bool) -> int:
    parser = argparse.ArgumentParser(prog="pyvmm", description="Drive KVM from Python.")
    parser.add_argument("--version", action="version", version=f"pyvmm {_version()}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="what this host's KVM can do, and why it matters")
    p.add_argument("--device", default="/dev/kvm")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("run", help="run a guest payload; print its console and exits")
    p.add_argument("payload", help="a payload name (guests/NAME.S) or a path to a .S file")
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--reg", action="append", default=[], metavar="NAME=VALUE",
                   help="set a register before the first instruction (e.g. rcx=1000)")
    p.add_argument("--irqchip", action="store_true", help="create the in-kernel irqchip")
    p.add_argument("--gdb", metavar="[HOST:]PORT",
                   help="wait for gdb on this address (loopback) before the first instruction")
    p.add_argument("--gdb-arch", choices=("x86-64", "i386", "i8086"),
                   help="the registers gdb sees (default: the mode the payload starts in)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the doorbell harness: userspace exits vs ioeventfd")
    p.add_argument("--rings", type=int, default=20000)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("boot", help="boot a Linux kernel with virtio devices written in Python")
    from .boot import add_arguments as boot_arguments

    boot_arguments(p)
    p.set_defaults(func=cmd_boot)

    p = sub.add_parser("migrate-demo", help="live-migrate a guest that keeps writing memory")
    p.add_argument("--memory", type=int, default=64, help="guest RAM in MiB")
    p.add_argument("--pages", type=int, default=4093, help="pages of the buffer it writes")
    p.add_argument("--steps", type=int, default=3_000_000, help="writes the guest makes")
    p.add_argument("--spin", type=int, action="append", metavar="N",
                   help="spins between two writes, one migration each (default 400 and 50)")
    p.add_argument("--threshold", type=int, default=64,
                   help="pre-copy ends when a round sends at most this many pages")
    p.add_argument("--processes", action="store_true",
                   help="migrate to another process over a socket pair")
    p.set_defaults(func=cmd_migrate_demo)

    p = sub.add_parser("kut", help="run kvm-unit-tests under pyvmm (--qemu: and QEMU+KVM)")
    from .kut.command import add_arguments as kut_arguments

    kut_arguments(p)
    p.set_defaults(func=cmd_kut)

    if argv[:1] == ["nested"]:  # these parse their own options (before and after --)
        from .testing import nested

        return nested.main(argv[1:])
    if argv[:1] == ["bench"]:
        from .bench import main as bench_main

        return bench_main(argv[1:])
    sub.add_parser("bench", help="pyperf benchmarks against a C reference (see `pyvmm bench -h`)")
    # Listed for --help only: both parse their own options above.
    sub.add_parser("nested", help="run a command on stock KVM inside QEMU (SMM, hypercalls)")

    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
