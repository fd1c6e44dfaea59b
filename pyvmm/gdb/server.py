# SPDX-License-Identifier: GPL-2.0-or-later
"""`GdbServer`: a gdb remote-protocol stub for a `Machine`.

    with Machine() as m:
        m.load("debugme")
        server = GdbServer(m, "127.0.0.1:1234")
        result = server.serve()        # gdb: target remote :1234

The guest waits at its first instruction until gdb continues it. One gdb thread per vCPU
(id = vCPU id + 1), all-stop (`runner.Runner` runs the machine). `detach` removes every
breakpoint and lets the guest run to its end; `kill` leaves it where it is. `serve()` returns
the session's `RunResult` (reports, console, exits of every run; the stop of the last). The
stub listens on loopback only unless `allow_remote=True`: it hands out the guest's memory.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Callable
from typing import Any

from ..exits import DebugExit
from ..runloop import RunResult
from . import protocol as p
from .probe import DebugSupport, probe
from .registers import ARCHS, RegisterFile, arch_of, target_xml
from .runner import Runner
from .target import Breakpoints, GuestMemory, NoSlot

__all__ = ["GdbServer", "parse_address"]

_PACKET_SIZE = 0x4000


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
        self.runner = Runner(machine, self.breakpoints, self.log)
        self._g = self._c = self.runner.live[0]
        self._session_arch = arch
        self._last_stop = f"T05thread:{self._g + 1:x};"
        self._pending: list[bytes] = []

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
        handlers[DebugExit] = self.runner.on_debug
        try:
            ending = self._session()
        finally:
            if previous is None:
                handlers.pop(DebugExit, None)
            else:
                handlers[DebugExit] = previous
            conn.close()
            self._conn = None
        if ending == "detach" and self.runner.live:
            self.log("gdb detached: the guest runs on")
            run = self.machine.run(timeout=detach_timeout, vcpus=self.runner.live)
            self.runner.results.append(run)
        elif ending == "kill":
            self.log("gdb killed the guest")
        return self.runner.session_result(ending)

    @property
    def target_arch(self) -> str:
        """The register layout gdb gets: the one asked for, else the current mode of the
        first vCPU ("x86-64", "i386" or "i8086")."""
        if self.arch is not None:
            return self.arch
        return arch_of(self.runner.vcpu(self.runner.live[0]).get_sregs())

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
        self.runner.close()

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

    # -- the wire -----------------------------------------------------------------------------

    @property
    def _sock(self) -> socket.socket:
        if self._conn is None:
            raise RuntimeError("gdb is not connected")
        return self._conn

    def _send(self, payload: bytes | str) -> None:
        data = payload.encode() if isinstance(payload, str) else payload
        self._sock.sendall(p.frame(data))
        self._last_sent = data

    def _next_packet(self) -> bytes | None:
        """The next packet from gdb (acknowledged), or None when it has hung up."""
        while True:
            if self._pending:
                return self._pending.pop(0)
            try:
                data = self._sock.recv(65536)
            except OSError:
                return None
            if not data:
                return None
            self._take(data)

    def _take(self, data: bytes) -> None:
        for event in self._reader.feed(data):
            if isinstance(event, p.Packet):
                if self._ack:
                    self._sock.sendall(b"+" if event.ok else b"-")
                if event.ok:
                    self._pending.append(event.data)
            elif event is p.Nak and getattr(self, "_last_sent", None) is not None:
                self._sock.sendall(p.frame(self._last_sent))
            elif event is p.Interrupt:
                self.runner.interrupt()

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
                return "OK" if int(body, 16) - 1 in self.runner.live else "E01"
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
                vcpu = self.runner.vcpu(self._g)
                data = self.memory.read(vcpu, gva, n)
                return p.encode_hex(self.breakpoints.hide(vcpu, gva, data))
            if cmd == "M":
                where, _, data = body.partition(b":")
                addr, _, _length = where.partition(b",")
                gva = int(addr, 16)
                raw = self.breakpoints.write_through(gva, p.decode_hex(data))
                self.memory.write(self.runner.vcpu(self._g), gva, raw)
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
            return "m" + ",".join(f"{i + 1:x}" for i in self.runner.live)
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
            vcpu_id = self.runner.live[0] if which == "g" or thread == 0 else -1
        else:
            vcpu_id = thread - 1
            if vcpu_id not in self.runner.live:
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
            self.breakpoints.insert(ztype, address, kind, self.runner.vcpu(self._g))
        except NoSlot as err:
            self.log(f"gdb breakpoint at {address:#x}: {err}")
            return "E28"
        return "OK"

    # -- running ------------------------------------------------------------------------------

    def _resume(self, step: bool, signalled: bool, body: bytes) -> str | tuple:
        # c [ADDR], s [ADDR], C SIG[;ADDR], S SIG[;ADDR]: the signal is not the guest's
        # business (an x86 guest has no signals), the address is where to resume.
        runner = self.runner
        addr = body.partition(b";")[2] if signalled else body
        stepper = self._c if self._c in runner.live else self._g
        if addr:
            vcpu = runner.vcpu(stepper)
            regs = vcpu.get_regs()
            regs.rip = int(addr, 16)
            vcpu.set_regs(regs)
        if not step and self.breakpoints.stepped:
            return self._stopped(*runner.continue_by_steps(self._sock, self._take))
        self.breakpoints.stepping = stepper if step else None
        self.breakpoints.apply_all()
        vcpus = [stepper] if step else list(runner.live)
        result = runner.run(vcpus, self._sock, self._take)
        self.breakpoints.stepping = None
        return self._stopped(*runner.stop_reply(result, vcpus))

    def _stopped(self, reply: str, vcpu_id: int | None, ending: str | None) -> str | tuple:
        if ending is not None:
            return (reply, ending)
        if vcpu_id is not None:
            self._g = self._c = vcpu_id
        self._last_stop = reply
        return reply

    # -- helpers --------------------------------------------------------------------------------

    def _arch(self) -> str:
        if self._session_arch is None:
            self._session_arch = self.target_arch
        return self._session_arch

    def _regfile(self) -> RegisterFile:
        return RegisterFile(self.runner.vcpu(self._g), self._arch())
