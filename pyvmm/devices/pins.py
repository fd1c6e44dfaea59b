# SPDX-License-Identifier: GPL-2.0-or-later
"""Pinning host pages for DMA: mlock with a count per page, one table per VM.

The kernel does not count mlock (one munlock undoes any number of mlocks of a page), so
overlapping DMA mappings share pages through a count here: a page is locked while its count
is above 0. The table also counts a VM's live mappings, so their number has one bound per VM.
"""

from __future__ import annotations

import errno
import threading
import weakref
from collections.abc import Iterator
from typing import Any

from .._ffi import ffi, libc
from ..memory import PAGE_SIZE

__all__ = ["PinTable", "locked_pages", "mlock", "munlock", "pin_table"]


def locked_pages(status_path: str = "/proc/self/status") -> int:
    """Pages this process has locked in memory (VmLck of /proc/self/status, in 4 KiB pages)."""
    with open(status_path) as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024 // PAGE_SIZE
    return 0


def mlock(addr: int, length: int) -> int:
    """mlock(2) of a host range: 0, or the errno it failed with."""
    if libc.mlock(ffi.cast("void *", addr), length) != 0:
        return ffi.errno or errno.ENOMEM
    return 0


def munlock(addr: int, length: int) -> None:
    """munlock(2) of a host range."""
    libc.munlock(ffi.cast("void *", addr), length)


def runs(pages: list[int]) -> Iterator[tuple[int, int]]:
    """(first host address, length) of each run of consecutive host pages."""
    if not pages:
        return
    start = prev = pages[0]
    for page in pages[1:]:
        if page != prev + PAGE_SIZE:
            yield start, prev + PAGE_SIZE - start
            start = page
        prev = page
    yield start, prev + PAGE_SIZE - start


class PinTable:
    """Pin counts of one VM's host pages, and the number of its live mappings."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[int, int] = {}
        self.mappings = 0

    def pin(self, pages: list[int], max_mappings: int | None = None) -> int:
        """Take one pin on each page for one more mapping; 0, or an errno (ENOSPC: the VM
        already has `max_mappings` live mappings; else mlock's), nothing pinned then."""
        with self.lock:
            if max_mappings is not None and self.mappings >= max_mappings:
                return errno.ENOSPC
            fresh = [p for p in pages if not self.counts.get(p)]
            done: list[tuple[int, int]] = []
            for addr, length in runs(fresh):
                err = mlock(addr, length)
                if err:
                    for a, n in done:
                        munlock(a, n)
                    return err
                done.append((addr, length))
            for p in pages:
                self.counts[p] = self.counts.get(p, 0) + 1
            self.mappings += 1
            return 0

    def unpin(self, pages: list[int]) -> None:
        """Drop the pins of one mapping; pages nobody else pins are unlocked."""
        with self.lock:
            freed = []
            for p in pages:
                n = self.counts.get(p, 0) - 1
                if n > 0:
                    self.counts[p] = n
                else:
                    self.counts.pop(p, None)
                    freed.append(p)
            for addr, length in runs(sorted(freed)):
                munlock(addr, length)
            self.mappings = max(0, self.mappings - 1)

    @property
    def pinned(self) -> int:
        """Host pages pinned (each counted once)."""
        with self.lock:
            return len(self.counts)


_tables: weakref.WeakKeyDictionary[Any, PinTable] = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()


def pin_table(vm) -> PinTable:
    """The pin table of `vm` (shared by every PV-DMA device of that VM)."""
    with _tables_lock:
        table = _tables.get(vm)
        if table is None:
            table = _tables[vm] = PinTable()
        return table
