# SPDX-License-Identifier: GPL-2.0-or-later
"""The migration wire protocol's receiving side (pyvmm.migsocket.receive) against streams
written frame by frame: a well-formed one builds a machine holding exactly the pages sent;
every truncated, corrupt or out-of-order one is refused with a clear MigrationError before
anything outside guest memory is touched, the peer is told why (an ERROR frame), the
connection is shut down and nothing is left open."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading

import pytest

from pyvmm import Machine
from pyvmm import migwire as w
from pyvmm.migsocket import MigrationError, MigrationStreamError, receive, send

MEM = 1 << 20
LAYOUT = {"format": 1, "vcpus": [0], "irqchip": False, "pit": False, "serial": False,
          "regions": [{"guest_addr": 0, "size": MEM, "readonly": False, "log_dirty": False,
                       "address_space": 0}]}


def frame(kind: int, payload: bytes = b"") -> bytes:
    return struct.pack("<B3xI", kind, len(payload)) + payload


def pages(gpa: int, data: bytes, count: int | None = None, space: int = 0) -> bytes:
    n = len(data) // w.PAGE if count is None else count
    return frame(w.PAGES, w.pack_pages(gpa, space, n) + data)


def start(layout: dict | None = None) -> bytes:
    return frame(w.HELLO, w.hello()) + frame(w.LAYOUT, json.dumps(layout or LAYOUT).encode())


def saved_state(kvm) -> dict:
    """A real paused state of a 1-vCPU machine laid out as LAYOUT (what a source sends)."""
    from pyvmm.snapshot import paused_state

    with Machine(kvm=kvm, serial=False) as m:
        m.add_memory(0, MEM)
        m.load("state_user", regs={"rcx": 10})
        return paused_state(m)


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:  # the receiver closed with our frames unread: it gave up
        return b""


def feed(kvm, stream: bytes, *, close: bool = True, **kw):
    """receive() on one end of a socketpair while `stream` is written to the other; returns
    (what receive returned or raised, every frame type the receiver sent back)."""
    src, dst = socket.socketpair()
    replies: list[int] = []

    def peer() -> None:
        try:
            src.sendall(stream)
            if close:
                src.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        data = b""
        while chunk := _recv(src):
            data += chunk
            while len(data) >= 8:
                kind, length = struct.unpack("<B3xI", data[:8])
                if len(data) < 8 + length:
                    break
                replies.append(kind)
                data = data[8 + length:]
                if kind == w.ACK:
                    src.sendall(frame(w.COMMIT))
    thread = threading.Thread(target=peer)
    thread.start()
    try:
        try:
            got: object = receive(dst, kvm=kvm, timeout=10, **kw)
        except MigrationError as err:
            got = err
        dst.close()
        thread.join(10)
    finally:
        src.close()
    return got, replies


def test_a_well_formed_stream_builds_the_machine(kvm):
    state = json.dumps(saved_state(kvm)).encode()
    data = bytes(range(256)) * 16 * 3
    stream = (start() + pages(0x3000, data) + frame(w.ROUND, w.pack_round(0, 3))
              + pages(0x80000, b"\x5a" * w.PAGE) + frame(w.ROUND, w.pack_round(1, 1))
              + frame(w.STATE, state))
    before = len(os.listdir("/proc/self/fd"))
    got, replies = feed(kvm, stream, close=False)
    assert not isinstance(got, Exception), got
    with got.machine as m:
        assert got.rounds == [3, 1]
        assert m.memory.read(0x3000, 3 * w.PAGE) == data
        assert m.memory.read(0x80000, w.PAGE) == b"\x5a" * w.PAGE
        assert m.memory.read(0x2000, w.PAGE) == bytes(w.PAGE)
    assert replies == [w.HELLO, w.READY, w.ACK]
    assert len(os.listdir("/proc/self/fd")) == before


def _state(kvm) -> bytes:
    return frame(w.STATE, json.dumps(saved_state(kvm)).encode())


ROUND0 = frame(w.ROUND, w.pack_round(0, 0))
BAD = {
    "bad magic": (frame(w.HELLO, w.hello().replace(b"pyvmm", b"qemu!")), "bad magic"),
    "other version": (frame(w.HELLO, struct.pack(f"<{len(w.MAGIC)}sHHI", w.MAGIC, 9, 0,
                                                 4096)), "version 9"),
    "no hello": (frame(w.LAYOUT, b"{}"), "where HELLO must come"),
    "truncated header": (frame(w.HELLO, w.hello())[:5], "truncated"),
    "huge layout": (frame(w.HELLO, w.hello()) + struct.pack("<B3xI", w.LAYOUT, 1 << 30),
                    "at most"),
    "layout not json": (frame(w.HELLO, w.hello()) + frame(w.LAYOUT, b"{no"), "not valid JSON"),
    "layout too big": (start(dict(LAYOUT, regions=[dict(LAYOUT["regions"][0],
                                                        size=1 << 40)])), "at most"),
    "layout unaligned": (start(dict(LAYOUT, regions=[dict(LAYOUT["regions"][0],
                                                          size=1000)])), "page-aligned"),
    "layout bad vcpus": (start(dict(LAYOUT, vcpus=[3])), "cannot be built"),
    "unknown frame": (start() + frame(99, b"x"), "type 99"),
    "zero pages": (start() + pages(0, b"", count=0), "0 pages"),
    "too many pages": (start() + struct.pack("<B3xI", w.PAGES, 16 + 300 * 4096)
                       + w.pack_pages(0, 0, 300), "at most"),
    "unaligned gpa": (start() + pages(0x1234, bytes(4096)), "unaligned GPA"),
    "gpa outside memory": (start() + pages(MEM, bytes(4096)), "outside the guest's memory"),
    "run past the end": (start() + pages(MEM - 4096, bytes(8192)), "outside"),
    "other address space": (start() + pages(0, bytes(4096), space=1), "address space 1"),
    "length does not match": (start() + frame(w.PAGES, w.pack_pages(0, 0, 2) + bytes(4096)),
                              "does not hold"),
    "truncated page": (start() + struct.pack("<B3xI", w.PAGES, 16 + 4096)
                       + w.pack_pages(0, 0, 1) + bytes(100), "truncated"),
    "wrong round count": (start() + pages(0, bytes(4096)) + frame(w.ROUND, w.pack_round(0, 2)),
                          "lost or extra"),
    "rounds out of order": (start() + frame(w.ROUND, w.pack_round(1, 0)), "this is round 0"),
    "state before any round": (start() + frame(w.STATE, b"{}"), "before the last round"),
    "state not json": (start() + ROUND0 + frame(w.STATE, b"\xff\xfe"), "not valid JSON"),
    "state incomplete": (start() + ROUND0 + frame(w.STATE, b'{"vcpu_states": []}'),
                         "does not load"),
    "stream ends after layout": (start(), "truncated"),
    "source gives up": (start() + frame(w.ERROR, b"disk on fire"), "disk on fire"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_streams_are_refused_cleanly(kvm, case):
    stream, message = BAD[case]
    before = len(os.listdir("/proc/self/fd"))
    got, replies = feed(kvm, stream)
    assert isinstance(got, MigrationError), got
    assert message in str(got)
    if case != "source gives up":
        assert isinstance(got, MigrationStreamError)
    assert replies and replies[-1] == w.ERROR          # the peer is told why
    assert w.ACK not in replies
    assert len(os.listdir("/proc/self/fd")) == before  # the machine built is closed again


def test_state_that_does_not_fit_the_layout_is_refused(kvm):
    state = saved_state(kvm)
    state["vcpu_states"][0]["vcpu_id"] = 1
    got, _ = feed(kvm, start() + ROUND0 + frame(w.STATE, json.dumps(state).encode()))
    assert isinstance(got, MigrationStreamError) and "does not load" in str(got)


def test_target_that_speaks_another_protocol_is_refused_by_the_source(kvm):
    """The sending side checks what comes back too: a peer answering garbage makes send()
    fail before the guest has run, and the source is untouched."""
    src, dst = socket.socketpair()
    with src, dst, Machine(kvm=kvm, serial=False) as m:
        m.add_memory(0, MEM)
        m.load("state_user", regs={"rcx": 10})
        dst.sendall(frame(w.READY))
        with pytest.raises(MigrationStreamError, match="where HELLO must come"):
            send(m, src, timeout=10)
        assert not any(r.log_dirty for r in m.memory.regions())
        assert m.run(timeout=30).ok
