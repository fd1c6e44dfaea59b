# SPDX-License-Identifier: GPL-2.0-or-later
"""`GdbServer`: a gdb remote-protocol stub for a `Machine`.

    with Machine() as m:
        m.load("debugme")
        server = GdbServer(m, "127.0.0.1:1234")
        result = server.serve()        # gdb: target remote :1234

The guest waits at its first instruction until gdb connects and continues it. One gdb thread
per vCPU (thread id = vCPU id + 1). All-stop: when one vCPU stops for the debugger, the others
are stopped too; `s` steps only the selected vCPU. Runs go through `Machine.run()`, with a
DebugExit handler that ends the run at the debugger's stops and gives the guest back the #DB
and #BP exceptions that are its own. Ctrl-C in gdb stops a running guest (`Machine.stop()`,
which kicks every vCPU). `detach` removes every breakpoint and lets the guest run to its end;
`kill` ends the session with the guest where it is. `serve()` returns the session's
`RunResult` (reports, console and exits of every run, the stop of the last).

The stub listens on loopback only unless `allow_remote=True`: it gives whoever connects the
guest's memory and registers.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import select
import socket
import sys
import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

from ..exits import DebugExit
from ..runloop import RunResult
from ..ucall import PORT_DONE
from . import protocol as p
from .probe import DebugSupport, probe
from .registers import ARCHS, RegisterFile, arch_of, target_xml
from .target import Breakpoints, GuestMemory, NoSlot, StopReason

__all__ = ["GdbServer", "parse_address"]

SIGINT, SIGTRAP, SIGABRT, SIGSEGV = 2, 5, 6, 11
_KVM_EXIT_IO = 2
_PACKET_SIZE = 0x4000
#: How the end of a run that gdb did not ask for is shown to it (the guest stays stopped).
_STOP_SIGNALS = {"fail": SIGABRT, "fault": SIGSEGV, "shutdown": SIGSEGV, "error": SIGABRT,
                 "unhandled": SIGABRT, "hlt": SIGTRAP, "timeout": SIGINT, "closed": SIGINT}


def parse_address(address: str | int | tuple[str, int]) -> tuple[str, int]:
    """`"HOST:PORT"`, `":PORT"`, `"PORT"`, a port number or a (host, port) pair; the host
    defaults to 127.0.0.1."""
    if isinstance(address, tuple):
        host, port = address
    elif isinstance(address, int):
        host, port = "127.0.0.1", address
    else:
        host, sep, port_text = str(address).rpartition(":")
        if not sep:
            host, port_text = "", str(address)
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"gdb address {address!r}: the port is not a number") from None
        host = host.strip("[]") or "127.0.0.1"
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"gdb port {port} is outside 0..65535")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class GdbServer:
    """A gdb stub for `machine`, listening on `address` (see `parse_address`; port 0 picks a
    free one, `self.address` says which). `arch` forces the register layout ("x86-64",
    "i386", "i8086"); by default it is the mode of vCPU 0 when gdb connects. `log` receives
    one line per event worth telling the user (default: stderr). `support` is what the host
    can do (`probe()`, measured, by default); a weaker one picks a fallback (software
    breakpoints in debug registers, or found by single-stepping)."""

    def __init__(self, machine: Any, address: str | int | tuple[str, int] = "127.0.0.1:1234",
                 *, arch: str | None = None, allow_remote: bool = False,
                 log: Callable[[str], None] | None = None,
                 support: DebugSupport | None = None) -> None:
        host, port = parse_address(address)
        if not allow_remote and not _is_loopback(host):
            raise ValueError(f"the gdb stub listens on loopback only (asked for {host}): it "
                             f"hands out the guest's memory and registers; pass "
                             f"allow_remote=True to listen on {host}")
        if arch is not None and arch not in ARCHS:
            raise ValueError(f"unknown gdb architecture {arch!r} (one of {', '.join(ARCHS)})")
        self.machine = machine
        self.arch = arch
        self.log = log if log is not None else (lambda line: print(line, file=sys.stderr))
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(1)
        except OSError:
            self._listener.close()
            raise
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self.support: DebugSupport = support if support is not None else probe()
        self.memory = GuestMemory(machine)
        self.breakpoints = Breakpoints(machine, self.memory, self.support)
        self._conn: socket.socket | None = None
        self._reader = p.PacketReader()
        self._ack = True
        self._live = [v.id for v in machine.vcpus]
        self._g = self._c = self._live[0]
        self._session_arch = arch
        self._event: tuple[int, StopReason] | None = None
        self._event_lock = threading.Lock()
        self._interrupted = False
        self._machine_running = False
        self._last_stop = f"T05thread:{self._live[0] + 1:x};"
        self._results: list[RunResult] = []
        self._pending: list[bytes] = []
        self._wake_r, self._wake_w = os.pipe()

    # -- the session -----------------------------------------------------------------------

    def serve(self, *, detach_timeout: float | None = None,
              accept_timeout: float | None = None) -> RunResult:
        """Wait for gdb, serve it until it detaches, kills or the guest ends, and return what
        the guest did. After a detach the guest runs on for up to `detach_timeout` seconds."""
        self._listener.settimeout(accept_timeout)
        conn, peer = self._listener.accept()
        self._listener.close()
        self.log(f"gdb connected from {peer[0]}:{peer[1]}")
        self._conn = conn
        handlers = self.machine.exit_handlers
        previous = handlers.get(DebugExit)
        handlers[DebugExit] = self._on_debug
        try:
            ending = self._session()
        finally:
            if previous is None:
                handlers.pop(DebugExit, None)
            else:
                handlers[DebugExit] = previous
            conn.close()
            self._conn = None
        if ending == "detach" and self._live:
            self.log("gdb detached: the guest runs on")
            self._results.append(self.machine.run(timeout=detach_timeout, vcpus=self._live))
        elif ending == "kill":
            self.log("gdb killed the guest")
        return self._session_result(ending)

    @property
    def target_arch(self) -> str:
        """The register layout gdb gets: the one asked for, else the current mode of the
        first vCPU ("x86-64", "i386" or "i8086")."""
        if self.arch is not None:
            return self.arch
        return arch_of(self._vcpu(self._live[0]).get_sregs())

    def gdb_command(self, elf: str | None = None) -> list[str]:
        """A gdb command line for this stub: the architecture first where gdb cannot take
        it from the payload's ELF (always x86-64, also for 16- and 32-bit code), then the
        ELF for symbols, then the connection."""
        argv = ["gdb"]
        if self.target_arch != "x86-64":
            argv += ["-ex", f"set architecture {self.target_arch}"]
        if elf is not None:
            argv += ["-ex", f"file {elf}"]
        host, port = self.address
        host = f"[{host}]" if ":" in host else host
        return argv + ["-ex", f"target remote {host}:{port}"]

    def close(self) -> None:
        """Stop listening (a `serve()` waiting for gdb raises OSError)."""
        self._listener.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> GdbServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _session(self) -> str:
        while True:
            packet = self._next_packet()
            if packet is None:
                self.breakpoints.clear()
                return "detach"                 # gdb went away: let the guest finish
            reply = self._dispatch(packet)
            if isinstance(reply, tuple):        # (reply, how the session ends)
                if reply[0] is not None:
                    self._send(reply[0])
                if reply[1] is not None:
                    return reply[1]
                continue
            if reply is not None:
                self._send(reply)

    def _session_result(self, ending: str) -> RunResult:
        results = self._results
        if not results:
            return RunResult(stop="stopped")
        last = results[-1]
        merged = RunResult(stop=last.stop if ending != "kill" else "stopped",
                           status=last.status, vcpu=last.vcpu, last_exit=last.last_exit,
                           event=last.event, error=last.error)
        exits: Counter = Counter()
        for r in results:
            exits.update(r.exits)
            merged.reports.extend(r.reports)
            merged.console += r.console
            merged.duration += r.duration
            for vcpu_id, counts in r.exits_per_vcpu.items():
                merged.exits_per_vcpu.setdefault(vcpu_id, Counter()).update(counts)
        merged.exits = exits
        return merged

    # -- the wire -----------------------------------------------------------------------------

    def _send(self, payload: bytes | str) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        assert self._conn is not None
        self._conn.sendall(p.frame(data))
        self._last_sent = data

    def _next_packet(self) -> bytes | None:
        """The next packet from gdb (acknowledged), or None when it has hung up."""
        while True:
            if self._pending:
                return self._pending.pop(0)
            assert self._conn is not None
            try:
                data = self._conn.recv(65536)
            except OSError:
                return None
            if not data:
                return None
            self._take(data)

    def _take(self, data: bytes) -> None:
        for event in self._reader.feed(data):
            if isinstance(event, p.Packet):
                if self._ack:
                    self._conn.sendall(b"+" if event.ok else b"-")
                if event.ok:
                    self._pending.append(event.data)
            elif event is p.Nak and getattr(self, "_last_sent", None) is not None:
                self._conn.sendall(p.frame(self._last_sent))
            elif event is p.Interrupt:
                self._interrupt()

    def _interrupt(self) -> None:
        self._interrupted = True
        if self._machine_running:               # between runs there is nothing to stop
            self.machine.stop("stopped")

    # -- packets ----------------------------------------------------------------------------

    def _dispatch(self, packet: bytes) -> Any:
        cmd, body = chr(packet[0]), packet[1:]
        try:
            if cmd == "q":
                return self._query(body)
            if cmd == "Q":
                if body == b"StartNoAckMode":
                    self._send("OK")
                    self._ack = False
                    return None
                return ""
            if cmd == "?":
                return self._last_stop
            if cmd == "H":
                return self._select_thread(body)
            if cmd == "T":
                return "OK" if int(body, 16) - 1 in self._live else "E01"
            if cmd == "g":
                return p.encode_hex(self._regfile().read_all())
            if cmd == "G":
                regs = self._regfile()
                regs.write_all(p.decode_hex(body))
                regs.flush()
                return "OK"
            if cmd == "p":
                index = int(body, 16)
                regs = self._regfile()
                if index >= len(regs.regs):
                    return "E45"
                return p.encode_hex(regs.get(index))
            if cmd == "P":
                num, _, value = body.partition(b"=")
                regs = self._regfile()
                regs.set(int(num, 16), p.decode_hex(value))
                regs.flush()
                return "OK"
            if cmd == "m":
                addr, _, length = body.partition(b",")
                gva, n = int(addr, 16), min(int(length, 16), _PACKET_SIZE // 2)
                vcpu = self._vcpu(self._g)
                data = self.memory.read(vcpu, gva, n)
                return p.encode_hex(self.breakpoints.hide(vcpu, gva, data))
            if cmd == "M":
                where, _, data = body.partition(b":")
                addr, _, _length = where.partition(b",")
                gva = int(addr, 16)
                raw = self.breakpoints.write_through(gva, p.decode_hex(data))
                self.memory.write(self._vcpu(self._g), gva, raw)
                return "OK"
            if cmd in "Zz":
                return self._breakpoint(cmd == "Z", body)
            if cmd in "cCsS":
                return self._resume(cmd in "sS", cmd in "CS", body)
            if cmd == "D":
                self.breakpoints.clear()
                return ("OK", "detach")
            if cmd == "k":
                self.breakpoints.clear()
                return (None, "kill")
            if cmd == "v":
                if body.startswith(b"Kill"):
                    self.breakpoints.clear()
                    return ("OK", "kill")
                return ""
        except (ValueError, OSError, IndexError) as err:
            self.log(f"gdb packet {packet[:40]!r}: {err}")
            return "E01"
        return ""                                   # unsupported: gdb copes

    def _query(self, body: bytes) -> Any:
        if body.startswith(b"Supported"):
            return (f"PacketSize={_PACKET_SIZE:x};qXfer:features:read+;swbreak+;hwbreak+;"
                    f"QStartNoAckMode+")
        if body.startswith(b"Xfer:features:read:"):
            annex, _, span = body[len(b"Xfer:features:read:"):].partition(b":")
            if annex != b"target.xml":
                return "E00"
            offset, _, length = span.partition(b",")
            xml = target_xml(self._arch()).encode()
            start, n = int(offset, 16), int(length, 16)
            chunk = xml[start: start + n]
            return (b"l" if start + n >= len(xml) else b"m") + p.escape(chunk)
        if body == b"fThreadInfo":
            return "m" + ",".join(f"{i + 1:x}" for i in self._live)
        if body == b"sThreadInfo":
            return "l"
        if body == b"C":
            return f"QC{self._g + 1:x}"
        if body == b"Attached":
            return "1"                              # quitting gdb detaches, never kills
        if body.startswith(b"ThreadExtraInfo,"):
            vcpu_id = int(body.split(b",")[1], 16) - 1
            return p.encode_hex(f"vCPU {vcpu_id}".encode())
        if body.startswith(b"Symbol"):
            return "OK"
        return ""

    def _select_thread(self, body: bytes) -> str:
        which, thread = chr(body[0]), int(body[1:], 16) if body[1:] != b"-1" else -1
        if thread in (0, -1):
            vcpu_id = self._live[0] if which == "g" or thread == 0 else -1
        else:
            vcpu_id = thread - 1
            if vcpu_id not in self._live:
                return "E01"
        if which == "g":
            self._g = vcpu_id
        else:
            self._c = vcpu_id
        return "OK"

    def _breakpoint(self, insert: bool, body: bytes) -> str:
        fields = body.split(b";")[0].split(b",")
        ztype, address, kind = int(fields[0]), int(fields[1], 16), int(fields[2], 16)
        if ztype > 4:
            return ""
        if ztype >= 2 and not self.support.watchpoints_fire:
            return ""                       # this KVM never fires them: gdb can step instead
        if not insert:
            self.breakpoints.remove(ztype, address, kind)
            return "OK"
        try:
            self.breakpoints.insert(ztype, address, kind, self._vcpu(self._g))
        except NoSlot as err:
            self.log(f"gdb breakpoint at {address:#x}: {err}")
            return "E28"
        return "OK"

    # -- running ------------------------------------------------------------------------------

    def _resume(self, step: bool, signalled: bool, body: bytes) -> str | tuple:
        # c [ADDR], s [ADDR], C SIG[;ADDR], S SIG[;ADDR]: the signal is not the guest's
        # business (an x86 guest has no signals), the address is where to resume.
        addr = body.partition(b";")[2] if signalled else body
        stepper = self._c if self._c in self._live else self._g
        if addr:
            vcpu = self._vcpu(stepper)
            regs = vcpu.get_regs()
            regs.rip = int(addr, 16)
            vcpu.set_regs(regs)
        if not step and self.breakpoints.stepped:
            return self._continue_by_steps()
        self.breakpoints.stepping = stepper if step else None
        self.breakpoints.apply_all()
        vcpus = [stepper] if step else list(self._live)
        result = self._run(vcpus)
        self.breakpoints.stepping = None
        return self._stop_reply(result, vcpus)

    def _run(self, vcpus: list[int]) -> RunResult:
        """Machine.run() in a helper thread while this one watches the socket for Ctrl-C."""
        self._event, self._interrupted = None, False
        done: queue.Queue = queue.Queue()

        def runner() -> None:
            try:
                done.put(self.machine.run(timeout=None, vcpus=vcpus))
            except BaseException as err:        # reported to gdb as an abort, never lost
                done.put(RunResult(stop="error", error=err))
            finally:
                os.write(self._wake_w, b"x")

        thread = threading.Thread(target=runner, name="pyvmm-gdb-run", daemon=True)
        self._machine_running = True
        thread.start()
        while True:
            ready, _, _ = select.select([self._conn, self._wake_r], [], [])
            if self._wake_r in ready:
                os.read(self._wake_r, 1)
                break
            try:
                data = self._conn.recv(65536)
            except OSError:
                data = b""
            if not data:                        # gdb hung up while the guest runs
                self._interrupt()
                continue
            self._take(data)
        thread.join()
        self._machine_running = False
        result = done.get()
        self._results.append(result)
        return result

    def _continue_by_steps(self) -> str | tuple:
        """`c` where breakpoints cannot be planted (no int3 intercept, no debug-register
        breakpoints): single-step the live vCPUs in turn until one reaches a breakpoint,
        stops for another reason, or gdb sends Ctrl-C."""
        self._interrupted = False
        bps = self.breakpoints
        while True:
            for vcpu_id in list(self._live):
                vcpu = self._vcpu(vcpu_id)
                bps.stepping = vcpu_id
                bps.apply(vcpu)
                self._event = None
                result = self.machine.run(timeout=None, vcpus=[vcpu_id])
                self._results.append(result)
                bps.stepping = None
                bps.apply(vcpu)
                event = self._event
                if event is None and result.stop == "done" and self._finished(vcpu_id):
                    self._live.remove(vcpu_id)      # this vCPU is through; the others go on
                    if not self._live:
                        return self._stop_reply(result, [])
                    continue
                if event is None or event[1].kind != "step":
                    return self._stop_reply(result, [vcpu_id])
                sregs, regs = vcpu.get_sregs(), vcpu.get_regs()
                if sregs.cs.base + regs.rip in bps.stepped:
                    self._event = (vcpu_id, StopReason("swbreak"))
                    return self._stop_reply(result, [vcpu_id])
            ready, _, _ = select.select([self._conn], [], [], 0)
            if ready:
                try:
                    data = self._conn.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    self._interrupt()
                else:
                    self._take(data)
            if self._interrupted:
                self._event = None
                return self._stop_reply(RunResult(stop="stopped"), [])

    def _on_debug(self, exit: DebugExit, vcpu: Any) -> str | None:
        """The machine's DebugExit handler (runs on the vCPU's thread)."""
        reason = self.breakpoints.classify(exit, vcpu)
        if reason is None:
            # The guest's own #DB/#BP (its int3, its TF, its debug registers): give it back.
            self.breakpoints.apply(vcpu, inject=exit.exception)
            return None
        with self._event_lock:
            if self._event is None:
                self._event = (vcpu.id, reason)
        self.machine.stop("stopped")                # all-stop: the other vCPUs stop too
        return "stopped"

    def _finished(self, vcpu_id: int) -> bool:
        # A vCPU whose last exit was the guest's DONE has ended (its loop ran it no further).
        run = self._vcpu(vcpu_id).kvm_run
        return (run.exit_reason == _KVM_EXIT_IO and run.io.port == PORT_DONE
                and run.io.direction == 1)

    def _stop_reply(self, result: RunResult, ran: list[int]) -> str | tuple:
        for vcpu_id in ran:
            if self._finished(vcpu_id) and vcpu_id in self._live:
                self._live.remove(vcpu_id)
        if self._event is not None:
            vcpu_id, reason = self._event
            reply = f"T{SIGTRAP:02x}thread:{vcpu_id + 1:x};{reason.stop_reply_part()}"
        elif not self._live:
            status = result.status if result.status is not None else 0
            self.log(f"the guest finished: {result.stop}, status {status}")
            return (f"W{status & 0xFF:02x}", "exited")
        else:
            vcpu_id = result.vcpu if result.vcpu in self._live else self._live[0]
            if self._interrupted:
                signal = SIGINT
            elif result.stop == "done":
                signal = SIGTRAP              # one vCPU finished; gdb sees the others
            else:
                signal = _STOP_SIGNALS.get(str(result.stop), SIGTRAP)
                self.log(f"the guest stopped: {result.summary().splitlines()[0]}"
                         + (f" ({result.event})" if result.event is not None else ""))
            reply = f"T{signal:02x}thread:{vcpu_id + 1:x};"
        self._g = self._c = vcpu_id
        self._last_stop = reply
        return reply

    # -- helpers --------------------------------------------------------------------------------

    def _vcpu(self, vcpu_id: int) -> Any:
        for vcpu in self.machine.vcpus:
            if vcpu.id == vcpu_id:
                return vcpu
        raise ValueError(f"no vCPU {vcpu_id}")

    def _arch(self) -> str:
        if self._session_arch is None:
            self._session_arch = self.target_arch
        return self._session_arch

    def _regfile(self) -> RegisterFile:
        return RegisterFile(self._vcpu(self._g), self._arch())

