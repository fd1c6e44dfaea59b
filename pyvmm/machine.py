"""`Machine`: a VM with memory, vCPUs, buses, doorbells and interrupts, and the exit-dispatch
loop that runs a guest payload to its end."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from .devices import COM1, Doorbell, DoorbellWorker, Interrupt, MmioBus, PioBus, SerialConsole
from .devices.interrupt import IOAPIC_PINS, MSI_ADDRESS, default_routes, msi_data
from .errors import ClosedError
from .exits import Exit, HltExit, IntrExit, IoExit, MmioExit, ShutdownExit
from .ioevent import IoEventAddress
from .kvm import Kvm
from .vcpu import Vcpu, watchdog

#: How a run ended.
STOPS = ("done", "fail", "fault", "hlt", "shutdown", "timeout", "stopped", "closed", "unhandled",
         "error")


@dataclass
class RunResult:
    """What `Machine.run()` saw. `stop` is one of STOPS; `status` is the guest's DONE value."""

    stop: str
    status: int | None = None
    exits: Counter = field(default_factory=Counter)
    console: str = ""
    reports: list = field(default_factory=list)
    duration: float = 0.0
    vcpu: int | None = None
    last_exit: Exit | None = None
    event: Any = None
    error: BaseException | None = None
    exits_per_vcpu: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.stop == "done" and self.status == 0

    @property
    def values(self) -> list[int]:
        return [r.value for r in self.reports]

    def summary(self) -> str:
        lines = [f"stop: {self.stop}" + (f" (status {self.status})" if self.status is not None
                                         else "") + f" after {self.duration * 1e3:.1f} ms"]
        if self.event is not None and self.stop in ("fail", "fault", "unhandled"):
            lines.append(f"  {self.event}")
        if self.error is not None:
            lines.append(f"  error on vCPU {self.vcpu}: {self.error!r}")
        total = sum(self.exits.values())
        lines.append(f"exits: {total}" + "".join(f"\n  {name:<18} {n}" for name, n in
                                                sorted(self.exits.items(),
                                                       key=lambda kv: -kv[1])))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


UCALL_PORTS = range(0xE9, 0xEE)

#: The stack each vCPU gets below the previous one's in a host-set SMP start.
AP_STACK_SIZE = 0x1000


class MpState(IntEnum):
    """KVM_GET/SET_MP_STATE values (x86). With the in-kernel irqchip the APs (vCPUs 1 and
    up) start UNINITIALIZED and wait in KVM_RUN for INIT and SIPI; set RUNNABLE to start one
    from the host instead."""

    RUNNABLE = 0
    UNINITIALIZED = 1
    INIT_RECEIVED = 2
    HALTED = 3
    SIPI_RECEIVED = 4
    STOPPED = 5
    CHECK_STOP = 6
    OPERATING = 7
    LOAD = 8
    AP_RESET_HOLD = 9
    SUSPENDED = 10


ExitHandler = Callable[[Exit, Vcpu], Any]


class Machine:
    """A VM ready to run payloads.

        with Machine() as m:
            m.load("hello")
            print(m.run(timeout=5).console)

    `pio`/`mmio` are the buses; `doorbell()` and `interrupt()` make kernel fast-path devices;
    `exit_handlers[ExitClass] = fn(exit, vcpu)` serves other exits (return a stop reason
    string, or None to go on).
    """

    def __init__(self, *, vcpus: int = 1, memory_size: int | None = None, irqchip: bool = False,
                 kvm: Kvm | None = None, serial: bool = True) -> None:
        self._own_kvm = kvm is None
        self.kvm = kvm if kvm is not None else Kvm()
        try:
            self.vm = self.kvm.create_vm()
            self.irqchip = irqchip
            if irqchip:
                self.vm.create_irqchip()
            self.vcpus: list[Vcpu] = [self.vm.create_vcpu() for _ in range(vcpus)]
            self.pio = PioBus()
            self.mmio = MmioBus()
            self.exit_handlers: dict[type, ExitHandler] = {}
            self.doorbells: list[Doorbell] = []
            self.interrupts: list[Interrupt] = []
            self._msi_routes: dict[int, tuple[int, int]] = {}
            self._worker: DoorbellWorker | None = None
            self._console = bytearray()
            self.console_sink: Callable[[bytes], None] | None = None
            self.serial = None
            if serial:
                self.serial = SerialConsole(sink=self._console_write)
                self.pio.register(COM1, SerialConsole.length, self.serial)
            self.payload = None
            self._stop_reason: str | None = None
            self._running = False
            self._generation = 0
            self._lock = threading.Lock()
            if memory_size:
                self.vm.add_memory(0, memory_size)
        except BaseException:
            self.close()
            raise

    @property
    def memory(self):
        return self.vm.memory

    def add_memory(self, guest_addr: int, size: int, **kwargs):
        return self.vm.add_memory(guest_addr, size, **kwargs)

    def _console_write(self, data: bytes) -> None:
        self._console += data
        if self.console_sink is not None:
            self.console_sink(data)

    @property
    def console(self) -> str:
        return self._console.decode("utf-8", "replace")

    # -- payloads ------------------------------------------------------------------------

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

    # -- fast-path devices ---------------------------------------------------------------

    @property
    def worker(self) -> DoorbellWorker:
        if self.vm.closed:
            raise ClosedError("the machine is closed")
        if self._worker is None:
            self._worker = DoorbellWorker()
        return self._worker

    def doorbell(self, address: IoEventAddress, *, length: int = 0,
                 datamatch: int | None = None,
                 callback: Callable[[Doorbell, int], None] | None = None) -> Doorbell:
        """An ioeventfd doorbell. One with a callback is served by this machine's epoll
        worker; one without only counts (the eventfd accumulates rings in the kernel and
        `count`/`wait()` read them), which keeps a thread from waking on every ring."""
        bell = Doorbell(self.vm, address, length=length, datamatch=datamatch,
                        callback=callback, worker=self.worker if callback else None)
        self.doorbells.append(bell)
        return bell

    def msi_interrupt(self, vector: int, *, address: int = MSI_ADDRESS) -> Interrupt:
        """An irqfd whose GSI is routed to an MSI (`vector`, to local APIC 0 by default):
        the interrupt reaches the LAPIC directly, with no IOAPIC programming in the guest.
        Needs Machine(irqchip=True)."""
        if not self.irqchip:
            raise ValueError("irqfd interrupts need the in-kernel irqchip: "
                             "Machine(irqchip=True)")
        data = msi_data(vector)
        with self._lock:
            gsi = IOAPIC_PINS + len(self._msi_routes)
            routes = {**self._msi_routes, gsi: (address, data)}
            self.vm.set_gsi_routing(default_routes() + [("msi", g, a, d) for g, (a, d)
                                                        in sorted(routes.items())])
            self._msi_routes = routes
        irq = Interrupt(self.vm, gsi)
        self.interrupts.append(irq)
        return irq

    def interrupt(self, gsi: int) -> Interrupt:
        """An irqfd on `gsi` (needs Machine(irqchip=True))."""
        if not self.irqchip:
            raise ValueError("irqfd interrupts need the in-kernel irqchip: "
                             "Machine(irqchip=True)")
        irq = Interrupt(self.vm, gsi)
        self.interrupts.append(irq)
        return irq

    # -- running -------------------------------------------------------------------------

    def stop(self, reason: str = "stopped") -> None:
        """End the run() in progress, or the next one if none is, from any thread (a device
        callback, a signal handler, a timer)."""
        with self._lock:
            if self._stop_reason is None:
                self._stop_reason = reason
        for vcpu in self.vcpus:
            vcpu.kick()

    def _timeout(self, generation: int) -> None:
        # A deadline applies to the run() that armed it only, never to a later one.
        with self._lock:
            if generation != self._generation or not self._running:
                return
        self.stop("timeout")

    def run(self, timeout: float | None = 10.0, *, vcpus: list[int] | None = None) -> RunResult:
        """Run the vCPUs (vCPU 0 in this thread when it is the only one; one thread each
        otherwise) until the guest is done, fails, stops, or `timeout` seconds pass."""
        selected = [self.vcpus[i] for i in (vcpus if vcpus is not None else
                                            range(len(self.vcpus)))]
        with self._lock:
            if self._running:
                raise RuntimeError("this machine is already running")
            self._running = True
            self._generation += 1
            generation = self._generation
        self._console.clear()
        result = RunResult(stop="stopped")
        start = time.perf_counter()
        # pyvmm's one watchdog thread serves the deadline: no thread is started per run.
        token = (watchdog.arm(lambda _token: self._timeout(generation), timeout)
                 if timeout is not None else None)
        try:
            if len(selected) == 1:
                outcomes = {selected[0].id: self._run_vcpu(selected[0], result)}
            else:
                outcomes = self._run_threads(selected, result)
        finally:
            if token is not None:
                watchdog.disarm(token)
            with self._lock:
                self._running = False
                self._stop_reason = None  # a stop() from now on is for the next run
        result.duration = time.perf_counter() - start
        for bell in self.doorbells:
            # Rings the worker has not picked up yet: counted, and their callbacks run (one
            # batch at a time with the worker's), so the result accounts for every ring.
            bell._drain(deliver=True)
        self._merge(result, outcomes)
        result.console = self.console
        if self._worker is not None and self._worker.errors and result.error is None:
            result.error = self._worker.errors[0][1]
        return result

    def _run_threads(self, selected: list[Vcpu], result: RunResult) -> dict:
        """One thread per vCPU, each in its own exit loop on its own fd. A vCPU's DONE ends
        only that vCPU; the first failure (in time) stops the others, and `_merge` reports
        it with its vCPU id. Every thread is joined before this returns."""
        outcomes: dict[int, tuple] = {}
        parts: dict[int, RunResult] = {}
        first: list[int] = []
        first_lock = threading.Lock()

        def body(vcpu: Vcpu, part: RunResult) -> None:
            outcome = self._run_vcpu(vcpu, part)
            outcomes[vcpu.id] = outcome
            if outcome[0] not in ("done", "timeout", "stopped"):
                with first_lock:
                    # A vCPU that ended because of an earlier failure's stop() comes later.
                    if not first and (self._stop_reason is None or outcome[2] is not None
                                      or outcome[4] is not None):
                        first.append(vcpu.id)
                self.stop(outcome[0])  # the first failure ends the others

        for vcpu in selected:
            # Each thread counts its exits in its own Counter (merged below, exactly);
            # reports and the per-vCPU counters go straight to the shared result.
            part = RunResult(stop="stopped", reports=result.reports,
                             exits_per_vcpu=result.exits_per_vcpu)
            parts[vcpu.id] = part
        threads = [threading.Thread(target=body, args=(v, parts[v.id]),
                                    name=f"pyvmm-vcpu{v.id}") for v in selected]
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        except BaseException:
            # Interrupted (KeyboardInterrupt): end every vCPU thread before going on.
            self.stop("stopped")
            for t in threads:
                if t.is_alive() or t.ident is not None:
                    t.join()
            raise
        finally:
            for part in parts.values():
                result.exits.update(part.exits)
        self._first_failure = first[0] if first else None
        return outcomes

    def _merge(self, result: RunResult, outcomes: dict) -> None:
        # The run's stop is the first failure in time when there was one (threaded runs),
        # else the first non-"done" outcome by vCPU id, else done (with the first non-zero
        # status, if a vCPU finished with one).
        first, self._first_failure = getattr(self, "_first_failure", None), None
        chosen = None
        if first is not None and first in outcomes:
            chosen = (first, outcomes[first])
        for vcpu_id in sorted(outcomes):
            if chosen is not None:
                break
            outcome = outcomes[vcpu_id]
            if outcome[0] != "done":
                chosen = (vcpu_id, outcome)
        if chosen is None:
            vcpu_id = next((i for i in sorted(outcomes) if outcomes[i][1]), min(outcomes))
            chosen = (vcpu_id, outcomes[vcpu_id])
        vcpu_id, (stop, status, event, last_exit, error) = chosen
        # Detached copies: the live exits view the vCPU's kvm_run page, and a result that
        # outlives the machine must not keep that mapping (and the kernel's VM) alive.
        if isinstance(event, Exit):
            event = event.detached()
        if last_exit is not None:
            last_exit = last_exit.detached()
        result.stop, result.status, result.event = stop, status, event
        result.last_exit, result.error, result.vcpu = last_exit, error, vcpu_id

    def _run_vcpu(self, vcpu: Vcpu, result: RunResult) -> tuple:
        """The exit loop of one vCPU: (stop, status, event, last_exit, error)."""
        from .guests import ucall

        counts: Counter = Counter()
        result.exits_per_vcpu[vcpu.id] = counts
        pio, mmio, handlers = self.pio, self.mmio, self.exit_handlers
        handle_io, handle_mmio, run = pio.handle_io, mmio.handle_mmio, vcpu.run
        ucall_ports = UCALL_PORTS
        # The two hot exits are counted in locals and folded into `counts` when the loop
        # ends (their keys are still created at their first occurrence, in exit order).
        n_io = n_mmio = 0
        ex: Exit | None = None
        try:
            while True:
                if self._stop_reason is not None:
                    return (self._stop_reason, None, None, ex, None)
                ex = run()
                cls = type(ex)
                if cls is IoExit:
                    n_io += 1
                    if n_io == 1:
                        counts["IoExit"] += 0
                    if ex.port in ucall_ports:
                        event = ucall.decode(ex, vcpu)
                        if event is None:
                            handle_io(ex)
                        elif isinstance(event, ucall.ConsoleOutput):
                            self._console_write(event.data)
                        elif isinstance(event, ucall.Report):
                            result.reports.append(event)
                        else:
                            stop, status = ucall.outcome(event)
                            return (stop, status, event, ex, None)
                    else:
                        handle_io(ex)
                    continue
                if cls is MmioExit:
                    n_mmio += 1
                    if n_mmio == 1:
                        counts["MmioExit"] += 0
                    handle_mmio(ex)
                    continue
                counts[cls.__name__] += 1
                if cls is IntrExit:
                    continue  # a kick: the loop head sees why
                elif cls is HltExit:
                    return ("hlt", None, None, ex, None)
                elif cls is ShutdownExit:
                    return ("shutdown", None, None, ex, None)
                else:
                    handler = handlers.get(cls)
                    if handler is None:
                        return ("unhandled", None, ex, ex, None)
                    stop = handler(ex, vcpu)
                    if stop is not None:
                        return (stop, None, ex, ex, None)
        except Exception as err:  # a device model bug ends this run, not the host process
            return ("error", None, None, ex, err)
        finally:
            if n_io:
                counts["IoExit"] += n_io
            if n_mmio:
                counts["MmioExit"] += n_mmio
            for name, n in counts.items():
                result.exits[name] += n

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the doorbell worker, remove doorbells and interrupts, close the VM (and its
        vCPUs and memory) and, if this machine opened it, /dev/kvm. Idempotent; from another
        thread it first stops a run() in progress."""
        if getattr(self, "vcpus", None):
            self.stop("closed")
        for bell in getattr(self, "doorbells", []):
            bell.remove()
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.close()
            self._worker = None
        for irq in getattr(self, "interrupts", []):
            irq.close()
        try:
            if getattr(self, "vm", None) is not None:
                self.vm.close()
        finally:
            if self._own_kvm and getattr(self, "kvm", None) is not None:
                self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- x86 state --
    # Thin faces of pyvmm.snapshot (the file format and the work live there).

    def snapshot(self, path) -> dict:
        """Write this paused machine (memory, every vCPU's and the VM's state, the state of
        devices with save_state()/load_state()) to one file; returns its header."""
        from . import snapshot
        return snapshot.snapshot(self, path)

    @classmethod
    def restore(cls, path, *, kvm: Kvm | None = None,
                setup: Callable[[Machine], object] | None = None,
                strict: bool = True) -> Machine:
        """A new Machine continuing where the snapshot at `path` stopped. `setup(machine)`
        recreates devices, doorbells and interrupts before the states are loaded."""
        from . import snapshot
        return snapshot.restore(path, kvm=kvm, setup=setup, strict=strict)
