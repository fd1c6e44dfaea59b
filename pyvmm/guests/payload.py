# SPDX-License-Identifier: GPL-2.0-or-later
"""A built guest payload: its flat image, where it goes, how it starts, and its symbols."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import layout, modes

__all__ = ["Payload"]


@dataclass(frozen=True)
class Payload:
    """A flat guest image and what the host needs to run it.

    ``symbols`` maps every defined ELF symbol to its address (or value, for absolute
    constants such as those of ``pyvmm.inc``).
    """

    name: str
    mode: str
    load_address: int
    entry: int
    image: bytes = field(repr=False)
    symbols: Mapping[str, int] = field(repr=False)
    memory_size: int = 0x200000
    source: Path | None = None
    build_dir: Path | None = field(default=None, repr=False)
    cached: bool = field(default=False, compare=False)

    @classmethod
    def _from_build(cls, source: Path, header: Any, image: bytes, symbols: Mapping[str, int],
                    build_dir: Path | None, *, cached: bool) -> Payload:
        entry = header.entry if isinstance(header.entry, int) else symbols[header.entry]
        return cls(
            name=source.stem, mode=header.mode, load_address=header.load, entry=entry,
            image=image, symbols=dict(symbols), memory_size=header.memory, source=source,
            build_dir=build_dir, cached=cached,
        )

    @property
    def end(self) -> int:
        """The first address after the image and its .bss."""
        return self.symbols.get("__pyvmm_end", self.load_address + len(self.image))

    @property
    def elf_path(self) -> Path | None:
        return self.build_dir / "payload.elf" if self.build_dir else None

    def symbol(self, name: str) -> int:
        try:
            return self.symbols[name]
        except KeyError:
            raise KeyError(f"payload {self.name!r} has no symbol {name!r}") from None

    # -- putting it in a VM

    def create_memory(self, vm: Any, size: int | None = None, **kwargs: Any) -> Any:
        """Add the payload's RAM to ``vm`` at guest address 0 (``memory_size`` by default)."""
        return vm.add_memory(0, size or self.memory_size, **kwargs)

    def load(self, vm: Any) -> None:
        """Write the image at ``load_address`` and the system area (GDT, IDT, TSS, page tables).

        The VM must already have RAM covering both (see :meth:`create_memory`).
        """
        layout.write_system_area(vm.memory)
        vm.memory.write(self.load_address, self.image)

    def setup_vcpu(self, vcpu: Any, *, rsp: int | None = None,
                   regs: Mapping[str, int] | None = None,
                   cpuid: Iterable[Any] | None = None) -> None:
        """Registers, segments, control registers and CPUID for the payload's mode and entry."""
        modes.setup_vcpu(vcpu, self.mode, self.entry, rsp=rsp, regs=regs, cpuid=cpuid)

    def prepare(self, vm: Any, *, memory_size: int | None = None, add_memory: bool = True,
                cpuid: Iterable[Any] | None = None, regs: Mapping[str, int] | None = None) -> Any:
        """RAM (unless ``add_memory=False``), load, one vCPU set up for the mode; returns it."""
        if add_memory:
            self.create_memory(vm, memory_size)
        self.load(vm)
        vcpu = vm.create_vcpu()
        self.setup_vcpu(vcpu, cpuid=cpuid, regs=regs)
        return vcpu
