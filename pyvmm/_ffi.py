"""The one cffi FFI of pyvmm, built from the declarations in kernel_headers/.

ABI mode: nothing is compiled; libc's ioctl/mmap are called through the process's own C
library, and cffi releases the GIL around each call, so a vCPU blocked in KVM_RUN does not
stall other Python threads.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import cffi

# Order matters: x86.h declares structs that kvm.h embeds in kvm_run.
HEADER_FILES = ("x86.h", "kvm.h", "constants.h", "libc.h")


def _headers_dir() -> Path:
    # Installed: kernel_headers/ is the data package pyvmm._kernel_headers (a namespace
    # package, so ask the import system where it lives).
    try:
        spec = importlib.util.find_spec("pyvmm._kernel_headers")
    except ImportError:
        spec = None
    for location in (spec.submodule_search_locations or []) if spec else []:
        if (Path(location) / "kvm.h").is_file():
            return Path(location)
    # A source checkout that was not installed: kernel_headers/ sits beside pyvmm/.
    return Path(__file__).resolve().parent.parent / "kernel_headers"


HEADERS_DIR = _headers_dir()
HEADER_TEXT = {name: (HEADERS_DIR / name).read_text() for name in HEADER_FILES}

ffi = cffi.FFI()
ffi.cdef("\n".join(HEADER_TEXT[name] for name in HEADER_FILES))
libc = ffi.dlopen(None)

_DEFINE = re.compile(r"^#define\s+(\w+)\s+(\d+)\s*$", re.MULTILINE)


def constants(prefix: str) -> dict[str, int]:
    """The `#define PREFIXname value` constants of constants.h, as {name-without-prefix: value}."""
    return {
        name[len(prefix):]: int(value)
        for name, value in _DEFINE.findall(HEADER_TEXT["constants.h"])
        if name.startswith(prefix)
    }


def address_of(cdata) -> int:
    return int(ffi.cast("uintptr_t", cdata))
