# SPDX-License-Identifier: GPL-2.0-or-later
"""The wire protocol of a live migration between two processes (pyvmm.migsocket uses it).

A stream is a sequence of frames over a connected stream socket. Each frame is an 8-byte
header (type: u8, three zero bytes, payload length: u32 little-endian) and its payload:

    source -> target                          target -> source
    HELLO   magic, version, page size          HELLO  magic, version, page size
    LAYOUT  JSON: the machine's layout          READY  (empty: the empty machine is built)
    PAGES   gpa u64, address space u16,         ACK    (empty: the state is loaded)
            zero u16, count u32, count pages    ERROR  UTF-8 text (then the target closes)
    ROUND   round u32, zero u32, pages u64
    STATE   JSON: vCPU, VM and device state
    COMMIT  (empty: the target runs from here; the source never resumes)
    ERROR   UTF-8 text (the source gives up)

Nothing but JSON and raw page bytes crosses the socket (no pickle): the states are encoded as
snapshot files encode them. The receiving side checks every header before it reads a payload:
the frame type against what may come next, the length against that type's bound, a page run's
GPA and count against the memory the layout declared; pages are then read straight into guest
memory, and every other payload into a buffer of at most its bound.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

__all__ = ["ACK", "COMMIT", "ERROR", "HELLO", "LAYOUT", "MAGIC", "MAX_JSON", "MAX_RUN",
           "HELLO_SIZE", "MigrationError", "MigrationStreamError", "NAMES", "PAGE", "PAGES",
           "PAGES_HEADER", "READY", "ROUND_SIZE",
           "ROUND", "STATE", "VERSION", "hello", "pack_pages", "pack_round", "read_exact",
           "read_frame_header", "read_into", "read_json", "send_frame", "unpack_hello",
           "unpack_pages", "unpack_round"]

MAGIC = b"pyvmm-migration\0"
VERSION = 1
PAGE = 4096
MAX_RUN = 256                  # pages in one PAGES frame (1 MiB)
MAX_JSON = 16 << 20            # the largest LAYOUT / STATE payload accepted
MAX_TEXT = 4096                # the largest ERROR text accepted

HELLO, LAYOUT, PAGES, ROUND, STATE, COMMIT, READY, ACK, ERROR = range(1, 10)
NAMES = {HELLO: "HELLO", LAYOUT: "LAYOUT", PAGES: "PAGES", ROUND: "ROUND", STATE: "STATE",
         COMMIT: "COMMIT", READY: "READY", ACK: "ACK", ERROR: "ERROR"}

_HEADER = struct.Struct("<B3xI")
_HELLO = struct.Struct(f"<{len(MAGIC)}sHHI")
_PAGES = struct.Struct("<QHHI")
_ROUND = struct.Struct("<IIQ")
PAGES_HEADER = _PAGES.size


class MigrationError(Exception):
    """A migration did not happen: the peer refused or vanished, or the stream was bad. A
    source that raises it is intact (paused): run() it again to continue the guest.
    `source_result` is what the source's run saw until it was stopped (None if it never
    ran)."""

    source_result: Any = None


class MigrationStreamError(MigrationError, ValueError):
    """The stream broke the protocol: truncated, corrupt, or out of order."""


def send_frame(sock: socket.socket, kind: int, *parts: bytes | memoryview) -> int:
    """Send one frame whose payload is `parts` joined (without copying them); returns the
    bytes sent. OSError (a peer gone) becomes MigrationError."""
    length = sum(len(p) for p in parts)
    pieces = [memoryview(_HEADER.pack(kind, length)), *(memoryview(p).cast("B") for p in parts)]
    total = length + _HEADER.size
    try:
        while pieces:
            sent = sock.sendmsg(pieces)
            while pieces and sent >= len(pieces[0]):
                sent -= len(pieces[0])
                pieces.pop(0)
            if sent:
                pieces[0] = pieces[0][sent:]
    except OSError as err:
        raise MigrationError(f"sending {NAMES.get(kind, kind)}: the peer is gone "
                             f"({err.strerror or err})") from None
    return total


def read_into(sock: socket.socket, view: memoryview, what: str) -> None:
    """Fill `view` from the socket; MigrationStreamError if the stream ends first."""
    done = 0
    while done < len(view):
        try:
            n = sock.recv_into(view[done:])
        except TimeoutError:
            raise MigrationError(f"the peer sent nothing for too long (inside {what})") from None
        except OSError as err:
            raise MigrationError(f"reading {what}: {err.strerror or err}") from None
        if not n:
            raise MigrationStreamError(f"the stream ends inside {what} (truncated: the peer "
                                       f"closed or died after {done} of {len(view)} bytes)")
        done += n


def read_exact(sock: socket.socket, n: int, what: str) -> bytes:
    """Exactly `n` bytes (the caller has bounded n)."""
    buf = bytearray(n)
    read_into(sock, memoryview(buf), what)
    return bytes(buf)


def read_frame_header(sock: socket.socket, allowed: dict[int, int]) -> tuple[int, int]:
    """(type, payload length) of the next frame. `allowed` maps each type that may come next
    to its largest payload; anything else is a MigrationStreamError. An ERROR frame from the
    peer is read and raised as MigrationError."""
    kind, length = _HEADER.unpack(read_exact(sock, _HEADER.size, "a frame header"))
    if kind == ERROR:
        if length > MAX_TEXT:
            raise MigrationStreamError(f"an ERROR frame of {length} bytes (at most {MAX_TEXT})")
        text = read_exact(sock, length, "an ERROR frame").decode("utf-8", "replace")
        raise MigrationError(f"the peer gave up: {text}")
    if kind not in allowed:
        want = ", ".join(NAMES[k] for k in allowed)
        raise MigrationStreamError(f"frame {NAMES.get(kind, f'type {kind}')} where {want} "
                                   "must come (corrupt or out-of-order stream)")
    if length > allowed[kind]:
        raise MigrationStreamError(f"a {NAMES[kind]} frame of {length} bytes: at most "
                                   f"{allowed[kind]} are accepted")
    return kind, length


def read_json(sock: socket.socket, length: int, what: str) -> dict[str, Any]:
    """A JSON object payload of `length` bytes (bounded by the caller)."""
    text = read_exact(sock, length, what)
    try:
        value = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MigrationStreamError(f"the {what} is not valid JSON ({err})") from None
    if not isinstance(value, dict):
        raise MigrationStreamError(f"the {what} is not a JSON object")
    return value


def hello() -> bytes:
    """A HELLO payload: this side's magic, version and page size."""
    return _HELLO.pack(MAGIC, VERSION, 0, PAGE)


def unpack_hello(payload: bytes) -> int:
    """Check a HELLO payload; returns the peer's version."""
    if len(payload) != _HELLO.size:
        raise MigrationStreamError(f"a HELLO of {len(payload)} bytes, not {_HELLO.size}")
    magic, version, _, page = _HELLO.unpack(payload)
    if magic != MAGIC:
        raise MigrationStreamError("the peer is not a pyvmm migration (bad magic)")
    if version != VERSION:
        raise MigrationStreamError(f"the peer speaks migration version {version}; this "
                                   f"side speaks {VERSION}")
    if page != PAGE:
        raise MigrationStreamError(f"the peer's page size is {page}, not {PAGE}")
    return version


def pack_pages(gpa: int, address_space: int, count: int) -> bytes:
    """The header of a PAGES payload (the pages follow)."""
    return _PAGES.pack(gpa, address_space, 0, count)


def unpack_pages(header: bytes, length: int) -> tuple[int, int, int]:
    """(gpa, address space, count) of a PAGES frame of `length` bytes, checked for form: a
    page-aligned GPA, 1..MAX_RUN pages, and a length that is exactly header + pages."""
    gpa, space, zero, count = _PAGES.unpack(header)
    if zero:
        raise MigrationStreamError("a PAGES header with reserved bits set")
    if not 0 < count <= MAX_RUN:
        raise MigrationStreamError(f"a PAGES frame of {count} pages (1..{MAX_RUN})")
    if gpa % PAGE:
        raise MigrationStreamError(f"a PAGES frame at unaligned GPA {gpa:#x}")
    if length != _PAGES.size + count * PAGE:
        raise MigrationStreamError(f"a PAGES frame of {length} bytes does not hold its "
                                   f"{count} pages")
    return gpa, space, count


def pack_round(number: int, pages: int) -> bytes:
    """A ROUND payload: the round just ended and how many pages it sent."""
    return _ROUND.pack(number, 0, pages)


def unpack_round(payload: bytes) -> tuple[int, int]:
    """(round, pages) of a ROUND payload."""
    if len(payload) != _ROUND.size:
        raise MigrationStreamError(f"a ROUND of {len(payload)} bytes, not {_ROUND.size}")
    number, zero, pages = _ROUND.unpack(payload)
    if zero:
        raise MigrationStreamError("a ROUND with reserved bits set")
    return number, pages


HELLO_SIZE, ROUND_SIZE = _HELLO.size, _ROUND.size
