# SPDX-License-Identifier: GPL-2.0-or-later
"""Loaders: put a kernel image into guest memory and set the vCPU state its entry expects.
Loaders only write memory and set vCPU state (no devices), so a loaded machine can be
snapshotted and restored without them."""
