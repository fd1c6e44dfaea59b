# SPDX-License-Identifier: GPL-2.0-or-later
"""The ``# pyvmm:`` header of a guest payload source: its syntax, its parser and its defaults.

A payload source is a ``.S`` file in GNU as (AT&T) syntax; its header is one or more comment
lines of the form::

    # pyvmm: mode=real16 load=0x1000 entry=start memory=0x200000

``key=value`` pairs separated by blanks; lines may repeat (later keys win). Keys:

``mode``    required: ``real16``, ``prot32``, ``long64`` or ``long64-user`` (64-bit CPL3)
``load``    load (and link) address of the flat image; default ``0x1000``
``entry``   a symbol name or a number; default ``start``
``memory``  guest RAM the payload needs, mapped at guest address 0; default ``0x200000``
            (numbers may be decimal, ``0x`` hex, or carry a ``K``/``M``/``G`` suffix)

:mod:`pyvmm.guests.toolchain` builds the payload the header describes.
"""

from __future__ import annotations

import re
import shlex

from . import layout

__all__ = ["DEFAULT_ENTRY", "DEFAULT_LOAD", "DEFAULT_MEMORY", "MODES", "HeaderError",
           "PayloadHeader", "parse_header"]

MODES = ("real16", "prot32", "long64", "long64-user")
DEFAULT_LOAD = 0x1000
DEFAULT_ENTRY = "start"
DEFAULT_MEMORY = 0x200000


class HeaderError(ValueError):
    """The ``# pyvmm:`` header of a payload is missing or invalid."""


class PayloadHeader:
    """The parsed ``# pyvmm:`` header of a source."""

    __slots__ = ("entry", "load", "memory", "mode")

    def __init__(self, mode: str, load: int, entry: str | int, memory: int):
        self.mode = mode
        self.load = load
        self.entry = entry
        self.memory = memory

    def __repr__(self) -> str:
        return (
            f"PayloadHeader(mode={self.mode!r}, load={self.load:#x}, entry={self.entry!r}, "
            f"memory={self.memory:#x})"
        )


_HEADER_RE = re.compile(r"^\s*#\s*pyvmm:(.*)$")
_SUFFIX = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _parse_number(key: str, text: str) -> int:
    t = text.strip().replace("_", "").lower()
    mult = 1
    if t and t[-1] in _SUFFIX:
        mult, t = _SUFFIX[t[-1]], t[:-1]
    try:
        return int(t, 0) * mult
    except ValueError:
        raise HeaderError(f"{key}={text!r} is not a number") from None


def parse_header(text: str, *, source: str = "<source>") -> PayloadHeader:
    """Parse the ``# pyvmm: key=value ...`` lines of a payload source."""
    fields: dict[str, str] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        m = _HEADER_RE.match(line)
        if not m:
            continue
        try:
            tokens = shlex.split(m.group(1))
        except ValueError as e:
            raise HeaderError(f"{source}:{lineno}: bad pyvmm header: {e}") from None
        for tok in tokens:
            key, sep, value = tok.partition("=")
            if not sep or not value:
                raise HeaderError(f"{source}:{lineno}: expected key=value in header, got {tok!r}")
            if key not in ("mode", "load", "entry", "memory"):
                raise HeaderError(
                    f"{source}:{lineno}: unknown header key {key!r} "
                    "(known: mode, load, entry, memory)"
                )
            fields[key] = value
    if "mode" not in fields:
        raise HeaderError(
            f"{source}: no `# pyvmm: mode=...` header line (modes: {', '.join(MODES)})"
        )
    mode = fields["mode"]
    if mode not in MODES:
        raise HeaderError(f"{source}: unknown mode {mode!r} (modes: {', '.join(MODES)})")
    load = _parse_number("load", fields["load"]) if "load" in fields else DEFAULT_LOAD
    memory = _parse_number("memory", fields["memory"]) if "memory" in fields else DEFAULT_MEMORY
    entry_text = fields.get("entry", DEFAULT_ENTRY)
    entry: str | int
    if re.fullmatch(r"[0-9].*", entry_text):
        entry = _parse_number("entry", entry_text)
    else:
        entry = entry_text
    if memory <= 0 or memory % 0x1000:
        raise HeaderError(f"{source}: memory={memory:#x} must be a positive multiple of 4 KiB")
    if memory < layout.SYSTEM_END:
        raise HeaderError(
            f"{source}: memory={memory:#x} must cover the system area (>= {layout.SYSTEM_END:#x})"
        )
    if mode == "real16" and load > 0xFFFF:
        raise HeaderError(f"{source}: a real16 payload must load below 64 KiB (CS=0)")
    return PayloadHeader(mode, load, entry, memory)
