"""`Cap`: the KVM_CAP_* numbers as an IntEnum (names without the KVM_CAP_ prefix)."""

from __future__ import annotations

from enum import IntEnum

from ._ffi import constants

Cap = IntEnum("Cap", constants("KVM_CAP_"), module=__name__)
Cap.__doc__ = "KVM capability numbers for check_extension/enable_cap (kernel_headers/constants.h)."
