# SPDX-License-Identifier: GPL-2.0-or-later
"""The framing of gdb's remote serial protocol: `$payload#checksum` packets, the `+`/`-`
acknowledgements, the binary escape (`}` then the byte XOR 0x20) and the out-of-band Ctrl-C
(a bare 0x03 byte). No sockets here: `PacketReader` is fed bytes and hands back events."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["INTERRUPT", "Ack", "Nak", "Packet", "PacketReader", "checksum", "decode_hex",
           "encode_hex", "escape", "frame", "hex_le", "parse_hex_le", "unescape"]

INTERRUPT = b"\x03"
_ESCAPED = frozenset(b"$#}*")


@dataclass(frozen=True)
class Packet:
    """One packet from gdb; `ok` is False when its checksum did not match (answer with `-`)."""

    data: bytes
    ok: bool = True


class Ack:
    """`+`: gdb received our last packet."""


class Nak:
    """`-`: gdb wants our last packet again."""


class Interrupt:
    """Ctrl-C: gdb asks for the running target to stop."""


def checksum(data: bytes) -> int:
    """The modulo-256 sum of the payload's bytes."""
    return sum(data) & 0xFF


def escape(data: bytes) -> bytes:
    """Escape `$`, `#`, `}` and `*` for a binary payload (qXfer answers)."""
    out = bytearray()
    for byte in data:
        if byte in _ESCAPED:
            out += bytes((0x7D, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """Undo `escape` (the payload of an X packet)."""
    out = bytearray()
    it = iter(data)
    for byte in it:
        if byte == 0x7D:
            try:
                out.append(next(it) ^ 0x20)
            except StopIteration:
                raise ValueError("a binary payload ends inside an escape") from None
        else:
            out.append(byte)
    return bytes(out)


def frame(payload: bytes) -> bytes:
    """`$payload#xx`, ready to send (the payload already escaped where it needs to be)."""
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


def encode_hex(data: bytes) -> bytes:
    return data.hex().encode()


def decode_hex(text: bytes | str) -> bytes:
    try:
        return bytes.fromhex(text.decode() if isinstance(text, bytes) else text)
    except ValueError:
        raise ValueError(f"not an even run of hex digits: {text!r}") from None


def hex_le(value: int, size: int) -> bytes:
    """A register value as gdb sends it: `size` bytes, little-endian, in hex."""
    return encode_hex((value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))


def parse_hex_le(text: bytes) -> int:
    return int.from_bytes(decode_hex(text), "little")


class PacketReader:
    """Turns the byte stream from gdb into `Packet`, `Ack`, `Nak` and `Interrupt` events."""

    def __init__(self, max_packet: int = 1 << 20) -> None:
        self._buf = bytearray()
        self._max = max_packet

    def feed(self, data: bytes) -> Iterator[Packet | type[Ack] | type[Nak] | type[Interrupt]]:
        """Add bytes and yield every complete event they finish."""
        self._buf += data
        buf = self._buf
        while buf:
            head = buf[0]
            if head == 0x2B:                # '+'
                del buf[0]
                yield Ack
            elif head == 0x2D:              # '-'
                del buf[0]
                yield Nak
            elif head == 0x03:
                del buf[0]
                yield Interrupt
            elif head == 0x24:              # '$'
                end = buf.find(b"#")
                if end < 0 or len(buf) < end + 3:
                    if len(buf) > self._max:
                        raise ValueError("a packet from gdb is larger than the stub accepts")
                    return                  # the rest of the packet is still on the way
                payload = bytes(buf[1:end])
                try:
                    ok = int(buf[end + 1: end + 3], 16) == checksum(payload)
                except ValueError:
                    ok = False
                del buf[: end + 3]
                yield Packet(payload, ok)
            else:
                del buf[0]                  # noise between packets (gdb sends none)
