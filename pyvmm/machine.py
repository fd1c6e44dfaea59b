"""`Machine`: a VM with memory, vCPUs, buses, doorbells and interrupts, and the exit-dispatch
loop that runs a guest payload to its end."""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Callable

from .args import as_index
from .devices import COM1, Doorbell, DoorbellWorker, Interrupt, MmioBus, PioBus, SerialConsole
from .devices.interrupt import GsiRouting
from .devices.serial import COM1_IRQ
from .detached import detached_error
from .errors import ClosedError
from .exits import Exit
from .kick import check_timeout
from .kvm import Kvm
from .machine_coalesced import CoalescedMachineMethods
from .machine_fastpath import FastPathMethods
from .machine_load import AP_STACK_SIZE, LoadMethods
from .runloop import MAX_CONSOLE, MAX_REPORTS
from .runloop import STOPS as _STOPS
from .runloop import ConsoleBuffer, Outcome, RunControl, RunResult, Stop, finish, run_vcpu
from .smp import run_threads
from .snapshot import SnapshotMethods
from .vcpu import Vcpu
from .vm import Vm
from .vcpu_state import MpState

#: How a run ended (kept here for older imports: the run loop owns them).
STOPS = _STOPS

#: Seconds run() waits at its end for doorbell callbacks (one may never return).
FLUSH_TIMEOUT = 5.0


ExitHandler = Callable[[Exit, Vcpu], "Stop | str | None"]

__all__ = ["AP_STACK_SIZE", "STOPS", "Machine", "MpState", "RunResult", "Stop"]


class Machine(LoadMethods, FastPathMethods, CoalescedMachineMethods, SnapshotMethods):
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
        count = as_index("vcpus", vcpus)
        if count < 0:
            raise ValueError(f"vcpus must be >= 0, not {count}")
        # Everything close() looks at exists before anything can fail.
        self._own_kvm = kvm is None
        self._vm: Vm | None = None
        self.vcpus: list[Vcpu] = []
        self.doorbells: list[Doorbell] = []
        self.interrupts: list[Interrupt] = []
        self._worker: DoorbellWorker | None = None
        self._control = RunControl()
        self.kvm: Kvm = kvm if kvm is not None else Kvm()
        try:
            limit = self.kvm.max_vcpus
            if count > limit:
                raise ValueError(f"Machine(vcpus={count}): this KVM allows at most {limit} "
                                 "vCPUs per VM (KVM_CAP_MAX_VCPUS)")
            self._vm = self.kvm.create_vm()
            self.irqchip = irqchip
            self._routing: GsiRouting | None = None  # the GSIs irqfds may use
            if irqchip:
                self.vm.create_irqchip()
                self._routing = GsiRouting(self.vm)
            self.vcpus = [self.vm.create_vcpu() for _ in range(count)]
            self.pio = PioBus()
            self.mmio = MmioBus()
            self.exit_handlers: dict[type, ExitHandler] = {}
            #: Reports a run keeps (RunResult.dropped_reports counts the rest).
            self.max_reports = MAX_REPORTS
            #: Seconds run() waits for doorbell callbacks at its end (RunResult.callbacks_pending).
            self.flush_timeout = FLUSH_TIMEOUT
            self._console = ConsoleBuffer(MAX_CONSOLE)
            self.serial = None
            if serial:  # its output is in the machine's console: no second copy (keep=0)
                irq = functools.partial(self.vm.irq_line, COM1_IRQ) if irqchip else None
                self.serial = SerialConsole(sink=self._console.write, keep=0, irq=irq)
                self.pio.register(COM1, SerialConsole.length, self.serial)
            self.payload = None
            self._running = False
            self._lock = threading.Lock()
            self._control = RunControl(self.vcpus)
            if memory_size:
                self.vm.add_memory(0, memory_size)
        except BaseException:
            self.close()
            raise

    @property
    def vm(self) -> Vm:
        """The machine's VM."""
        if self._vm is None:
            raise ClosedError("the machine has no VM (its creation failed)")
        return self._vm

    @property
    def memory(self):
        return self.vm.memory

    def add_memory(self, guest_addr: int, size: int, **kwargs):
        return self.vm.add_memory(guest_addr, size, **kwargs)

    def move_memory(self, region, guest_addr: int):
        """`Vm.move_memory`: show `region` at `guest_addr` from now on (also while running)."""
        return self.vm.move_memory(region, guest_addr)

    @property
    def console_sink(self) -> Callable[[bytes], None] | None:
        """Called with every console byte as it comes (serial and the ucall console port)."""
        return self._console.sink

    @console_sink.setter
    def console_sink(self, sink: Callable[[bytes], None] | None) -> None:
        self._console.sink = sink

    @property
    def max_console(self) -> int:
        """Console bytes a run keeps: the last ones (RunResult.dropped_console counts the
        rest)."""
        return self._console.limit

    @max_console.setter
    def max_console(self, limit: int) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError(f"max_console must be an int >= 0, not {limit!r}")
        self._console.limit = limit

    @property
    def console(self) -> str:
        """The console output of the current (or last) run, as text."""
        return self._console.getvalue().decode("utf-8", "replace")

    # -- running -------------------------------------------------------------------------

    def stop(self, reason: str = Stop.STOPPED, *, status: int | None = None) -> None:
        """End the run() in progress, or the next one if none is, from any thread (a device
        callback, a signal handler, a timer). `status` becomes `RunResult.status`."""
        self._control.stop(reason, status=status)

    def run(self, timeout: float | None = 10.0, *, vcpus: list[int] | None = None) -> RunResult:
        """Run the vCPUs (vCPU 0 in this thread when it is the only one; one thread each
        otherwise) until the guest is done, fails, stops, or `timeout` seconds pass.

        A device or handler exception ends the run as "error" (`result.error`, with its vCPU
        in `result.vcpu`) and stops the other vCPUs. A KeyboardInterrupt or SystemExit
        raised on any vCPU thread stops every vCPU and, once all of them are joined, is
        raised again here: it asks the process to stop, which a result would hide."""
        timeout = check_timeout(timeout)
        ids = list(range(len(self.vcpus))) if vcpus is None else list(vcpus)
        if not ids:
            raise ValueError("nothing to run: this machine has no vCPU" if not self.vcpus
                             else "nothing to run: vcpus=[] selects no vCPU")
        for i in ids:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(self.vcpus):
                raise ValueError(f"vcpus: {i!r} is not the index of one of this machine's "
                                 f"{len(self.vcpus)} vCPUs")
        selected = [self.vcpus[i] for i in ids]
        with self._lock:
            if self._running:
                raise RuntimeError("this machine is already running")
            self._running = True
            control = self._control
        self._console.clear()
        result = RunResult(stop=Stop.STOPPED)
        started = time.monotonic()
        try:
            control.arm(timeout)
            wrap_run = self._coalesced_run()   # None without coalesced zones
            if len(selected) == 1:
                outcome = self._run_one(selected[0], control, result, result.exits, wrap_run)
            else:
                outcome = self._run_threads(selected, control, result, wrap_run)
            outcome = self._drain_at_end(outcome)
        finally:
            control.disarm()
            with self._lock:
                self._running = False
                self._control = RunControl(self.vcpus)  # a stop() from now on: the next run
        if self._worker is not None:  # every ring signalled so far served, within a bound
            result.callbacks_pending = not self._worker.flush(timeout=self.flush_timeout)
        finish(result, outcome, control, started, self._console)
        if self._worker is not None and self._worker.errors and result.error is None:
            result.error = detached_error(self._worker.errors[0][1])
        if result.error is not None and not isinstance(result.error, Exception):
            result.error.add_note(f"pyvmm: raised on vCPU {result.vcpu} in Machine.run(); "
                                  "every vCPU was stopped and joined first")
            raise result.error
        return result

    def _drain_at_end(self, outcome: Outcome) -> Outcome:
        # Coalesced writes the guest made after the last exit reach their devices too.
        try:
            self.drain_coalesced()
        except Exception as err:
            if outcome.error is None:
                return Outcome(Stop.ERROR, None, None, outcome.last_exit, err, outcome.vcpu)
        return outcome

    def _run_one(self, vcpu: Vcpu, control: RunControl, result: RunResult,
                 counts: Counter, wrap_run=None) -> Outcome:
        per_vcpu: Counter = Counter()
        result.exits_per_vcpu[vcpu.id] = per_vcpu
        try:
            outcome = run_vcpu(vcpu, control, result, console=self._console, counts=per_vcpu,
                               io=self.pio.handle_io, mmio=self.mmio.handle_mmio,
                               handlers=self.exit_handlers, max_reports=self.max_reports,
                               wrap_run=wrap_run)
        finally:
            counts.update(per_vcpu)
        outcome.vcpu = vcpu.id
        return outcome

    def _run_threads(self, selected: list[Vcpu], control: RunControl,
                     result: RunResult, wrap_run=None) -> Outcome:
        counts: dict[int, Counter] = {v.id: Counter() for v in selected}
        try:
            return run_threads(selected, control,
                               lambda vcpu: self._run_one(vcpu, control, result, counts[vcpu.id],
                                                          wrap_run))
        finally:
            for c in counts.values():
                result.exits.update(c)

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the doorbell worker, remove doorbells and interrupts, close the VM (and its
        vCPUs and memory) and, if this machine opened it, /dev/kvm. Idempotent; from another
        thread it first stops a run() in progress. Every step runs even when an earlier one
        fails (the VM is always closed); the first failure is raised at the end."""
        errors: list[BaseException] = []

        def step(fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as err:
                errors.append(err)

        if self.vcpus:
            step(lambda: self.stop(Stop.CLOSED))
        for bell in self.doorbells:
            step(bell.remove)
        worker, self._worker = self._worker, None
        if worker is not None:
            step(worker.close)
        for irq in self.interrupts:
            step(irq.close)
        if self._vm is not None:
            step(self._vm.close)
        if self._own_kvm:
            step(self.kvm.close)
        if errors:
            raise errors[0]

    def __del__(self) -> None:
        # A machine dropped without close(): its worker thread, doorbells, interrupts and VM
        # go with it (the worker would otherwise keep the VM and its RAM alive forever).
        try:
            if self._vm is not None and not self._vm.closed:
                self.close()
        except Exception:
            pass

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Inherited: load(), start_vcpu(), load_multiboot(), load_linux() from
    # pyvmm.machine_load; doorbell(), interrupt(), msi_interrupt(), worker from
    # pyvmm.machine_fastpath; coalesce(), drain_coalesced() from pyvmm.machine_coalesced;
    # snapshot(path) and Machine.restore(path) from pyvmm.snapshot.
