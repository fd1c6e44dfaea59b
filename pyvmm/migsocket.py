# SPDX-License-Identifier: GPL-2.0-or-later
"""Live migration to another process over a connected stream socket (a socketpair, a Unix or
TCP connection), in pyvmm.migwire's protocol.

The source calls `send(machine, sock)`: handshake (HELLO both ways), the machine's layout
(LAYOUT; the target builds an empty machine like it and answers READY), pre-copy rounds of
PAGES frames each closed by a ROUND marker, then the stop, the last pages and the paused
state (STATE). The target loads it and answers ACK; the source answers COMMIT, and from then
on the target is the machine. Until the source has sent COMMIT, a failure (the target
refuses, dies, or the stream breaks) leaves the source paused and intact: `send()` raises
MigrationError and `run()` on the source continues the guest where it stopped, nothing lost.

The target calls `receive(sock)`, which returns the new Machine once COMMIT has arrived (run
it). It trusts nothing it reads: see pyvmm.migwire.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from . import migwire as w
from . import snapshot
from .migration import MigrationResult, page_runs, precopy
from .migwire import MigrationError, MigrationStreamError

if TYPE_CHECKING:
    from .kvm import Kvm
    from .machine import Machine
    from .memory import MemoryRegion

__all__ = ["Incoming", "MigrationError", "MigrationStreamError", "receive", "send"]

PAGE = w.PAGE
ZERO_UNIT = 16                  # pages compared at once when round 0 leaves out zero pages
MAX_REGIONS = 64
_ZERO = bytes(ZERO_UNIT * PAGE)


def _give_up(sock: socket.socket, why: str) -> None:
    """Tell the peer (best effort) and shut the connection down."""
    with contextlib.suppress(OSError, MigrationError):
        w.send_frame(sock, w.ERROR, why.encode()[:w.MAX_TEXT])
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _SocketSink:
    """Sends pages and state over the socket (the source side of the protocol)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.sent = sock, 0

    def _run(self, region: MemoryRegion, view: memoryview, first: int, count: int) -> None:
        header = w.pack_pages(region.guest_addr + first * PAGE, region.address_space, count)
        self.sent += w.send_frame(self.sock, w.PAGES, header,
                                  view[first * PAGE:(first + count) * PAGE])

    def first_round(self, regions: list[MemoryRegion], views: list[memoryview]) -> int:
        # The target's memory is zero already: pages that are zero here are left out.
        total = 0
        for region, view in zip(regions, views, strict=True):
            pages: list[int] = []
            for start in range(0, len(view) // PAGE, ZERO_UNIT):
                end = min(start + ZERO_UNIT, len(view) // PAGE)
                if view[start * PAGE:end * PAGE].tobytes() != _ZERO[:(end - start) * PAGE]:
                    pages.extend(range(start, end))
            for first, count in page_runs(pages, w.MAX_RUN):
                self._run(region, view, first, count)
            total += len(pages)
        return total

    def pages(self, region: MemoryRegion, view: memoryview, pages: list[int]) -> None:
        for first, count in page_runs(pages, w.MAX_RUN):
            self._run(region, view, first, count)

    def end_round(self, number: int, pages: int) -> None:
        self.sent += w.send_frame(self.sock, w.ROUND, w.pack_round(number, pages))

    def switch_over(self, saved: dict[str, Any]) -> None:
        text = json.dumps(saved, separators=(",", ":")).encode()
        if len(text) > w.MAX_JSON:
            raise MigrationError(f"the state is {len(text)} bytes; the protocol takes at "
                                 f"most {w.MAX_JSON}")
        self.sent += w.send_frame(self.sock, w.STATE, text)
        w.read_frame_header(self.sock, {w.ACK: 0})
        self.sent += w.send_frame(self.sock, w.COMMIT)

    def sent_bytes(self) -> int:
        return self.sent


def send(source: Machine, sock: socket.socket, *, max_rounds: int = 30,
         threshold_pages: int = 256, run_timeout: float | None = None,
         on_round: Callable[[int, int], object] | None = None,
         timeout: float | None = 60.0) -> MigrationResult:
    """Live-migrate `source` (not running) to the process at the other end of `sock`, which
    calls receive(). Pre-copy ends when a round sends at most `threshold_pages` pages or after
    `max_rounds` rounds; `on_round(round, pages)` is called after each. `timeout` bounds each
    wait on the peer. Returns the rounds, pages, bytes and downtime (result.target is None);
    the source is then paused for good: close it. MigrationError (the source paused, intact,
    its dirty logging as before: run() it to go on) if the target refused or vanished before
    the switch-over. The socket is the caller's to close."""
    sock.settimeout(timeout)
    result = MigrationResult()
    try:
        w.send_frame(sock, w.HELLO, w.hello())
        _, length = w.read_frame_header(sock, {w.HELLO: w.HELLO_SIZE})
        w.unpack_hello(w.read_exact(sock, length, "the target's HELLO"))
        w.send_frame(sock, w.LAYOUT, json.dumps(snapshot.layout(source)).encode())
        w.read_frame_header(sock, {w.READY: 0})
        precopy(source, _SocketSink(sock), result, max_rounds=max_rounds,
                threshold_pages=threshold_pages, run_timeout=run_timeout, on_round=on_round,
                restore_logging=True)
    except MigrationError as err:
        _give_up(sock, str(err))
        err.source_result = result.source_result
        raise
    except BaseException as err:
        _give_up(sock, f"the source failed: {err!r}")
        raise
    return result


@dataclass
class Incoming:
    """What receive() got: the machine (run it; close it), the pages per round, the bytes."""

    machine: Machine
    rounds: list[int] = field(default_factory=list)
    bytes_received: int = 0
    seconds: float = 0.0


def _regions(description: dict[str, Any], max_memory: int) -> None:
    """Check a LAYOUT's shape before anything is built from it."""
    regions = description.get("regions")
    if not isinstance(regions, list) or not 0 < len(regions) <= MAX_REGIONS:
        raise MigrationStreamError(f"a layout must list 1..{MAX_REGIONS} memory regions")
    total = 0
    for r in regions:
        if not isinstance(r, dict) or not all(isinstance(r.get(k), int) and
                                              not isinstance(r.get(k), bool)
                                              for k in ("guest_addr", "size", "address_space")):
            raise MigrationStreamError(f"a layout region is malformed: {r!r:.200}")
        if r["size"] <= 0 or r["size"] % PAGE or r["guest_addr"] % PAGE or r["guest_addr"] < 0:
            raise MigrationStreamError(f"a layout region is not page-aligned: {r!r:.200}")
        total += r["size"]
    if total > max_memory:
        raise MigrationStreamError(f"the layout asks for {total} bytes of guest memory; this "
                                   f"target takes at most {max_memory}")


def _destination(spans: list[tuple[int, int, int, memoryview]], gpa: int, space: int,
                 count: int) -> memoryview:
    for s, start, end, view in spans:
        if s == space and start <= gpa and gpa + count * PAGE <= end:
            return view[gpa - start:gpa - start + count * PAGE]
    raise MigrationStreamError(f"a PAGES frame for {count} pages at GPA {gpa:#x} (address "
                               f"space {space}) is outside the guest's memory regions")


def _receive_into(sock: socket.socket, target: Machine, incoming: Incoming,
                  setup: Callable[[Machine], object] | None, strict: bool) -> None:
    spans = [(r.address_space, r.guest_addr, r.end, r.view())
             for r in snapshot.machine_vm(target).memory.regions(None)]
    this_round = 0
    stream = {w.PAGES: w.PAGES_HEADER + w.MAX_RUN * PAGE, w.ROUND: w.ROUND_SIZE,
              w.STATE: w.MAX_JSON}
    while True:
        kind, length = w.read_frame_header(sock, stream)
        incoming.bytes_received += 8 + length
        if kind == w.PAGES:
            if length < w.PAGES_HEADER:
                raise MigrationStreamError(f"a PAGES frame of {length} bytes")
            gpa, space, count = w.unpack_pages(
                w.read_exact(sock, w.PAGES_HEADER, "a PAGES header"), length)
            w.read_into(sock, _destination(spans, gpa, space, count),
                        f"{count} pages at GPA {gpa:#x}")
            this_round += count
        elif kind == w.ROUND:
            number, pages = w.unpack_round(w.read_exact(sock, length, "a ROUND marker"))
            if number != len(incoming.rounds) or pages != this_round:
                raise MigrationStreamError(
                    f"round marker {number} says {pages} pages; this is round "
                    f"{len(incoming.rounds)} and {this_round} pages came (lost or extra data)")
            incoming.rounds.append(pages)
            this_round = 0
        else:
            if not incoming.rounds or this_round:
                raise MigrationStreamError("the state came before the last round was closed")
            saved = w.read_json(sock, length, "state")
            break
    if setup is not None:
        setup(target)
    try:
        snapshot.load_paused_state(target, saved, strict=strict)
    except (ValueError, TypeError) as err:
        raise MigrationStreamError(f"the state does not load: {err}") from None
    w.send_frame(sock, w.ACK)
    w.read_frame_header(sock, {w.COMMIT: 0})


def receive(sock: socket.socket, factory: Callable[..., Machine] | None = None, *,
            kvm: Kvm | None = None, setup: Callable[[Machine], object] | None = None,
            strict: bool = True, timeout: float | None = 60.0,
            max_memory: int = 64 << 30) -> Incoming:
    """Receive a machine that the peer send()s: returns it (in `Incoming.machine`, made by
    `factory`, the Machine class by default) once the peer has committed the switch-over.
    `setup(machine)` recreates devices, doorbells and interrupts before states are loaded.
    `timeout` bounds each wait on the peer; `max_memory` the guest memory a layout may ask
    for. MigrationError (MigrationStreamError for a bad stream) if the peer gave up or died
    or the stream was not valid; nothing is left open then, and the peer is told why."""
    if factory is None:
        from .machine import Machine

        factory = Machine
    sock.settimeout(timeout)
    started = time.perf_counter()
    target: Machine | None = None
    try:
        _, length = w.read_frame_header(sock, {w.HELLO: w.HELLO_SIZE})
        w.unpack_hello(w.read_exact(sock, length, "the source's HELLO"))
        w.send_frame(sock, w.HELLO, w.hello())
        _, length = w.read_frame_header(sock, {w.LAYOUT: 1 << 20})
        description = w.read_json(sock, length, "layout")
        _regions(description, max_memory)
        try:
            target = snapshot.build(description, cast("Callable[..., Machine]", factory),
                                    kvm=kvm)
        except (ValueError, TypeError) as err:
            raise MigrationStreamError(f"the layout cannot be built: {err}") from None
        w.send_frame(sock, w.READY)
        incoming = Incoming(machine=target)
        _receive_into(sock, target, incoming, setup, strict)
        incoming.seconds = time.perf_counter() - started
        return incoming
    except BaseException as err:
        if target is not None:
            target.close()
        _give_up(sock, str(err) if isinstance(err, MigrationError) else
                 f"the target failed: {err!r}")
        raise
