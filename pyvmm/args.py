# SPDX-License-Identifier: GPL-2.0-or-later
"""Argument checks shared by the handles and the machine: a clear ValueError for what cannot
work, before any lock or ioctl."""

from __future__ import annotations

import operator

__all__ = ["as_index"]


def as_index(what: str, value: object) -> int:
    """`value` as an int: what `operator.index` accepts (int, IntEnum, numpy integers), but
    not bool (True is no id or count anyone means). ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, not {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{what} must be an integer, not {type(value).__name__} "
                         f"{value!r}") from None
