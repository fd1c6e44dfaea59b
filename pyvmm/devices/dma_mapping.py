# SPDX-License-Identifier: GPL-2.0-or-later
"""A live PV-DMA mapping and its host view: one piece per memslot the guest range crosses.
A device reads and writes guest memory through it while it is mapped, never after."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import GuestError
from ..memory import PAGE_SIZE

__all__ = ["DmaMapping", "DmaPiece"]


@dataclass(frozen=True, slots=True)
class DmaPiece:
    """The part of a mapping that lies in one memslot."""

    region: Any          # MemoryRegion
    offset: int          # into the region
    length: int
    gpa: int

    @property
    def host_addr(self) -> int:
        return self.region.host_addr + self.offset


@dataclass(eq=False, slots=True)
class DmaMapping:
    """A live DMA mapping: ``npages`` guest pages from ``gpa``, pinned in host memory. The
    host view is one piece per memslot the range crosses."""

    gpa: int
    npages: int
    pieces: tuple[DmaPiece, ...]
    active: bool = True
    _views: list[memoryview] = field(default_factory=list, repr=False)

    @property
    def size(self) -> int:
        return self.npages * PAGE_SIZE

    @property
    def end(self) -> int:
        return self.gpa + self.size

    @property
    def host_pages(self) -> list[int]:
        return [p.host_addr + i for p in self.pieces for i in range(0, p.length, PAGE_SIZE)]

    @property
    def host_ranges(self) -> list[tuple[int, int, int]]:
        """(gpa, host address, length) of each piece."""
        return [(p.gpa, p.host_addr, p.length) for p in self.pieces]

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end

    def _check(self, offset: int, length: int) -> None:
        if not self.active:
            raise GuestError(f"DMA mapping {self.gpa:#x}+{self.npages} pages is unmapped")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise GuestError(f"DMA access {offset:#x}+{length:#x} is outside the mapping of "
                             f"{self.size:#x} bytes at {self.gpa:#x}")

    def _chunks(self, offset: int, length: int):
        for piece in self.pieces:
            if length <= 0:
                break
            if offset >= piece.length:
                offset -= piece.length
                continue
            n = min(length, piece.length - offset)
            yield piece, offset, n
            offset = 0
            length -= n

    def views(self) -> list[memoryview]:
        """Writable zero-copy views of the mapped guest memory, one per piece. They are
        released when the mapping is unmapped."""
        self._check(0, 0)
        out = [p.region.view(p.offset, p.length) for p in self.pieces]
        self._views.extend(out)
        return out

    def view(self) -> memoryview:
        """The one view of a mapping that lies in a single memslot."""
        if len(self.pieces) != 1:
            raise ValueError(f"the mapping at {self.gpa:#x} spans {len(self.pieces)} memslots; "
                             "use views()")
        return self.views()[0]

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return b"".join(bytes(p.region.view(p.offset + o, n))
                        for p, o, n in self._chunks(offset, length))

    def write(self, offset: int, data: bytes) -> None:
        src = memoryview(data).cast("B")
        self._check(offset, len(src))
        done = 0
        for p, o, n in self._chunks(offset, len(src)):
            p.region.view(p.offset + o, n)[:] = src[done: done + n]
            done += n

    def release(self) -> None:
        """Mark the mapping unmapped and release every view handed out (the device unpins
        its pages)."""
        self.active = False
        for v in self._views:
            try:
                v.release()
            except (BufferError, ValueError):
                pass
        self._views.clear()
