# SPDX-License-Identifier: GPL-2.0-or-later
"""Testing support for pyvmm: the pytest plugin (fixtures, ``requires_cap``) and the nested
KVM runner that gives the suite a stock kvm_amd under QEMU TCG (``pyvmm nested``).

Nothing here imports pyvmm's core at import time, so the plugin loads even where /dev/kvm or
the core package is unavailable.
"""

__all__ = ["NestedResult", "run_nested"]


def __getattr__(name):
    if name in __all__:
        from . import nested
        return getattr(nested, name)
    raise AttributeError(name)
