# SPDX-License-Identifier: GPL-2.0-or-later
"""Debug a guest with gdb: a remote serial protocol stub over a `Machine`.

    pyvmm run debugme --gdb 127.0.0.1:1234
    gdb -ex 'file payload.elf' -ex 'target remote :1234'

`GdbServer(machine, address).serve()` is the same from Python. See docs/GDB.md.
"""

from .probe import DebugSupport, probe
from .server import GdbServer, parse_address

__all__ = ["DebugSupport", "GdbServer", "parse_address", "probe"]
