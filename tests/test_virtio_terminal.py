# SPDX-License-Identifier: GPL-2.0-or-later
"""The interactive console's terminal side on a real pseudo-terminal: raw mode while inside,
keys forwarded, Ctrl-A x quits, Ctrl-A Ctrl-A sends Ctrl-A, the settings restored after."""

from __future__ import annotations

import os
import pty
import termios
import threading
import time

from pyvmm.virtio.terminal import Terminal


def wait(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_terminal_raw_mode_keys_and_escape():
    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        got = bytearray()
        quit_called = threading.Event()
        with Terminal(got.extend, on_quit=quit_called.set, fd=slave):
            lflag = termios.tcgetattr(slave)[3]
            assert not lflag & (termios.ICANON | termios.ECHO)  # raw: no line editing, no echo
            os.write(master, b"ls -l\r\x01\x01")
            wait(lambda: bytes(got) == b"ls -l\r\x01")
            os.write(master, b"\x01x")
            assert quit_called.wait(5)
        assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)
