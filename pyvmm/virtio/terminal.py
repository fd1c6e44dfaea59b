# SPDX-License-Identifier: GPL-2.0-or-later
"""The host terminal as a guest console: raw mode while the guest runs, keys forwarded to a
`Console`, and an escape (Ctrl-A x) that ends the run, as QEMU's -nographic has."""

from __future__ import annotations

import os
import select
import sys
import termios
import threading
import tty
from collections.abc import Callable

ESCAPE = 0x01  # Ctrl-A


class Terminal:
    """`with Terminal(send, on_quit=...)`: while inside, the keys typed on stdin go to
    `send(bytes)`; Ctrl-A x calls `on_quit()`, Ctrl-A Ctrl-A sends one Ctrl-A. The tty's
    settings are restored on exit, whatever happens."""

    def __init__(self, send: Callable[[bytes], None], *, on_quit: Callable[[], None],
                 fd: int | None = None) -> None:
        self.send = send
        self.on_quit = on_quit
        self.fd = sys.stdin.fileno() if fd is None else fd
        self._saved: list | None = None
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._loop, name="pyvmm-terminal", daemon=True)

    def __enter__(self) -> Terminal:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=2)
        if self._saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _loop(self) -> None:
        escaped = False
        while True:
            ready, _, _ = select.select([self.fd, self._stop_r], [], [])
            if self._stop_r in ready:
                return
            data = os.read(self.fd, 1024)
            if not data:
                return
            out = bytearray()
            for byte in data:
                if escaped:
                    escaped = False
                    if byte in (ord("x"), ord("X")):
                        self.on_quit()
                        return
                    out.append(byte)
                elif byte == ESCAPE:
                    escaped = True
                else:
                    out.append(byte)
            if out:
                self.send(bytes(out))
