"""`Machine`: a VM with memory, vCPUs, buses, doorbells and interrupts, and the exit-dispatch
loop that runs a guest payload to its end."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping

from .args import as_index
from .devices import COM1, Doorbell, DoorbellWorker, Interrupt, MmioBus, PioBus, SerialConsole
from .devices.interrupt import IOAPIC_PINS, MSI_ADDRESS, default_routes, msi_data
from .errors import ClosedError
from .exits import Exit
from .ioevent import IoEventAddress
from .kick import check_timeout
from .kvm import Kvm
from .runloop import MAX_CONSOLE, MAX_REPORTS
from .runloop import STOPS as _STOPS
from .runloop import ConsoleBuffer, Outcome, RunControl, RunResult, Stop, finish, run_vcpu
from .smp import run_threads
from .vcpu import Vcpu
from .vm import Vm
from .vcpu_state import MpState

#: How a run ended (kept here for older imports: the run loop owns them).
STOPS = _STOPS

#: The stack each vCPU gets below the previous one's in a host-set SMP start.
AP_STACK_SIZE = 0x1000


ExitHandler = Callable[[Exit, Vcpu], "Stop | str | None"]

__all__ = ["AP_STACK_SIZE", "STOPS", "Machine", "MpState", "RunResult", "Stop"]


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
            if irqchip:
                self.vm.create_irqchip()
            self.vcpus = [self.vm.create_vcpu() for _ in range(count)]
            self.pio = PioBus()
            self.mmio = MmioBus()
            self.exit_handlers: dict[type, ExitHandler] = {}
            self._msi_routes: dict[int, tuple[int, int]] = {}
            #: Reports a run keeps (RunResult.dropped_reports counts the rest).
            self.max_reports = MAX_REPORTS
            self._console = ConsoleBuffer(MAX_CONSOLE)
            self.serial = None
            if serial:
                self.serial = SerialConsole(sink=self._console.write)
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
            if len(selected) == 1:
                outcome = self._run_one(selected[0], control, result, result.exits)
            else:
                outcome = self._run_threads(selected, control, result)
        finally:
            control.disarm()
            with self._lock:
                self._running = False
                self._control = RunControl(self.vcpus)  # a stop() from now on: the next run
        for bell in self.doorbells:
            bell.flush()  # every ring signalled so far counted and its callback run
        finish(result, outcome, control, started, self._console)
        if self._worker is not None and self._worker.errors and result.error is None:
            result.error = self._worker.errors[0][1]
        if result.error is not None and not isinstance(result.error, Exception):
            result.error.add_note(f"pyvmm: raised on vCPU {result.vcpu} in Machine.run(); "
                                  "every vCPU was stopped and joined first")
            raise result.error
        return result

    def _run_one(self, vcpu: Vcpu, control: RunControl, result: RunResult,
                 counts: Counter) -> Outcome:
        per_vcpu: Counter = Counter()
        result.exits_per_vcpu[vcpu.id] = per_vcpu
        try:
            outcome = run_vcpu(vcpu, control, result, console=self._console, counts=per_vcpu,
                               io=self.pio.handle_io, mmio=self.mmio.handle_mmio,
                               handlers=self.exit_handlers, max_reports=self.max_reports)
        finally:
            counts.update(per_vcpu)
        outcome.vcpu = vcpu.id
        return outcome

    def _run_threads(self, selected: list[Vcpu], control: RunControl,
                     result: RunResult) -> Outcome:
        counts: dict[int, Counter] = {v.id: Counter() for v in selected}
        try:
            return run_threads(selected, control,
                               lambda vcpu: self._run_one(vcpu, control, result, counts[vcpu.id]))
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

    # -- loaders --
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
