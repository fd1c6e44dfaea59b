"""`IoEventAddress`: where an ioeventfd listens, a PIO port or an MMIO address."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IoEventAddress:
    is_pio: bool
    addr: int

    @classmethod
    def pio(cls, port: int) -> IoEventAddress:
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"PIO port {port:#x} is outside 0..0xffff")
        return cls(True, port)

    @classmethod
    def mmio(cls, address: int) -> IoEventAddress:
        if not 0 <= address < 1 << 64:
            raise ValueError(f"MMIO address {address:#x} is outside the 64-bit space")
        return cls(False, address)

    def __str__(self) -> str:
        return f"{'pio' if self.is_pio else 'mmio'} {self.addr:#x}"
