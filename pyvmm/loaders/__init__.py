# SPDX-License-Identifier: GPL-2.0-or-later
"""Loaders: put a kernel of a known boot format in guest memory and set the vCPU state its
boot protocol asks for. They write memory and registers only; devices are the platform's."""

from .multiboot import MultibootError, MultibootImage, MultibootInfo, load_multiboot, parse_image

__all__ = ["MultibootError", "MultibootImage", "MultibootInfo", "load_multiboot", "parse_image"]
