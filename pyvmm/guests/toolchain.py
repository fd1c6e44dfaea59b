# SPDX-License-Identifier: GPL-2.0-or-later
"""Build guest payloads: GNU ``as`` -> ``ld`` -> ``objcopy -O binary``, with a content-hash cache.

A payload source is a ``.S`` file in GNU as (AT&T) syntax. It is assembled by ``as`` directly
(no C preprocessor), so ``#`` starts a comment. Its ``# pyvmm:`` header (mode, load address,
entry, memory) is parsed by :mod:`pyvmm.guests.header`, whose names stay importable from here.

The image is linked with a generated script that places ``.text``, ``.rodata``, ``.data`` and
``.bss`` contiguously from the load address, so ``objcopy -O binary`` gives the bytes to copy at
``load``. Every defined symbol of the ELF (``nm``) is returned, including the absolute constants
of ``pyvmm.inc``, so the host can find a buffer or a parameter slot by name.

Results are cached under ``$PYVMM_GUEST_CACHE`` or ``$XDG_CACHE_HOME/pyvmm/guests`` (default
``~/.cache/pyvmm/guests``), keyed by a SHA-256 of the source, the include files next to it and
in the payload source folder, the versions of the tools and the builder's own format version.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from . import layout
from .header import (DEFAULT_ENTRY, DEFAULT_LOAD, DEFAULT_MEMORY, MODES, HeaderError,
                     PayloadHeader, parse_header)

if TYPE_CHECKING:
    from .payload import Payload

__all__ = [
    "DEFAULT_ENTRY",
    "DEFAULT_LOAD",
    "DEFAULT_MEMORY",
    "MODES",
    "AssemblyError",
    "HeaderError",
    "MissingToolError",
    "PayloadHeader",
    "ToolchainError",
    "available",
    "build",
    "cache_dir",
    "find_source",
    "parse_header",
    "sources_dir",
]

#: Bumped whenever the build recipe or the cache format changes.
BUILD_FORMAT = 1

TOOLS = ("as", "ld", "objcopy", "nm")
_TOOL_PACKAGE = "binutils"

_LINKER_SCRIPT = """\
ENTRY({entry})
SECTIONS
{{
  . = {load:#x};
  __pyvmm_image_start = .;
  .text : {{ *(.text.entry) *(.text .text.*) }}
  .rodata : {{ *(.rodata .rodata.*) }}
  .data : {{ *(.data .data.*) }}
  __pyvmm_image_end = .;
  .bss : {{ *(.bss .bss.*) *(COMMON) }}
  __pyvmm_end = .;
  /DISCARD/ : {{ *(.note .note.*) *(.comment) *(.eh_frame .eh_frame.*) }}
}}
"""


class ToolchainError(RuntimeError):
    """Building a guest payload failed."""


class MissingToolError(ToolchainError):
    """A binutils program is not on PATH."""

    def __init__(self, tool: str):
        self.tool = tool
        super().__init__(
            f"`{tool}` was not found on PATH. pyvmm assembles its guest payloads with GNU "
            f"binutils (as, ld, objcopy, nm): install the `{_TOOL_PACKAGE}` package, e.g. "
            f"`apt-get install {_TOOL_PACKAGE}`."
        )


class AssemblyError(ToolchainError):
    """A tool rejected the source; ``stderr`` holds its messages."""

    def __init__(self, tool: str, source: Path, stderr: str):
        self.tool = tool
        self.source = source
        self.stderr = stderr
        super().__init__(f"{tool} failed on {source}:\n{stderr.rstrip()}")


# --------------------------------------------------------------------------------------------
# where things are


def sources_dir() -> Path:
    """The folder of the payload sources shipped with pyvmm (the repo's ``guests/``)."""
    try:
        spec = importlib.util.find_spec("pyvmm._guest_sources")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc)
            if (p / "pyvmm.inc").is_file():
                return p
    return Path(__file__).resolve().parents[2] / "guests"


def available() -> list[str]:
    """Names of the shipped payloads (``guests/*.S``)."""
    return sorted(p.stem for p in sources_dir().glob("*.S"))


def find_source(name: str | os.PathLike[str]) -> Path:
    """A shipped payload name (``"hello"``) or a path to a ``.S`` file."""
    p = Path(name)
    if p.suffix == ".S" or os.sep in str(name):
        if p.is_file():
            return p.resolve()
        if os.sep in str(name):
            raise FileNotFoundError(f"payload source {str(name)!r} does not exist")
    src = sources_dir() / (p.name if p.suffix == ".S" else f"{p.name}.S")
    if not src.is_file():
        raise FileNotFoundError(
            f"no guest payload named {str(name)!r} in {sources_dir()} "
            f"(available: {', '.join(available()) or 'none'})"
        )
    return src


def cache_dir() -> Path:
    """``$PYVMM_GUEST_CACHE``, else ``$XDG_CACHE_HOME/pyvmm/guests`` (``~/.cache`` default)."""
    override = os.environ.get("PYVMM_GUEST_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pyvmm" / "guests"


# --------------------------------------------------------------------------------------------
# tools


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise MissingToolError(name)
    return path


@lru_cache(maxsize=16)
def _tool_version(path: str, mtime_ns: int) -> str:
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, check=False, timeout=30
        ).stdout
    except OSError as e:  # pragma: no cover - an unrunnable file on PATH
        raise ToolchainError(f"cannot run {path}: {e}") from e
    return out.splitlines()[0].strip() if out else "unknown"


def _tools() -> dict[str, tuple[str, str]]:
    """name -> (path, version line); raises MissingToolError for the first one missing."""
    result = {}
    for name in TOOLS:
        path = _tool(name)
        result[name] = (path, _tool_version(path, os.stat(path).st_mtime_ns))
    return result


def _run(argv: list[str], source: Path, cwd: Path) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, check=False)
    if proc.returncode != 0:
        raise AssemblyError(Path(argv[0]).name, source, proc.stderr or proc.stdout)
    return proc.stdout


# --------------------------------------------------------------------------------------------
# build


def _include_dirs(source: Path) -> list[Path]:
    dirs = [source.parent]
    shipped = sources_dir()
    if shipped.resolve() != source.parent.resolve():
        dirs.append(shipped)
    return dirs


def _cache_key(source_bytes: bytes, source: Path, tools: dict[str, tuple[str, str]]) -> str:
    h = hashlib.sha256()
    h.update(f"pyvmm-guest-build-{BUILD_FORMAT}\0".encode())
    h.update(_LINKER_SCRIPT.encode())
    for name in TOOLS:
        h.update(f"{name}={tools[name][1]}\0".encode())
    h.update(source_bytes)
    for d in _include_dirs(source):
        for inc in sorted(d.glob("*.inc")):
            h.update(b"\0inc:" + inc.name.encode() + b"\0")
            h.update(inc.read_bytes())
    return h.hexdigest()


def _parse_nm(text: str) -> dict[str, int]:
    symbols: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        # POSIX format: name type value [size]
        if len(parts) >= 3:
            try:
                symbols[parts[0]] = int(parts[2], 16)
            except ValueError:
                continue
    return symbols


def _assemble(source: Path, header: PayloadHeader, tools: dict[str, tuple[str, str]], out: Path):
    """Build into folder ``out``: payload.elf, payload.bin; returns the symbol table."""
    obj = out / "payload.o"
    elf = out / "payload.elf"
    binary = out / "payload.bin"
    script = out / "payload.ld"
    entry_sym = header.entry if isinstance(header.entry, str) else f"{header.entry:#x}"
    script.write_text(_LINKER_SCRIPT.format(entry=entry_sym, load=header.load))
    argv = [tools["as"][0], "--64"]
    for d in _include_dirs(source):
        argv += ["-I", str(d)]
    _run(argv + ["-o", str(obj), str(source)], source, out)
    _run([tools["ld"][0], "-m", "elf_x86_64", "-nostdlib", "-static", "-T", str(script),
          "-o", str(elf), str(obj)], source, out)
    _run([tools["objcopy"][0], "-O", "binary", str(elf), str(binary)], source, out)
    symbols = _parse_nm(_run([tools["nm"][0], "-P", "--defined-only", str(elf)], source, out))
    return symbols


def build(name: str | os.PathLike[str], *, cache: bool = True) -> Payload:
    """Assemble, link and flatten a payload (or take it from the cache)."""
    from .payload import Payload

    source = find_source(name)
    source_bytes = source.read_bytes()
    header = parse_header(source_bytes.decode("utf-8", "replace"), source=str(source))
    tools = _tools()
    key = _cache_key(source_bytes, source, tools)
    entry_dir = cache_dir() / key
    meta_path = entry_dir / "meta.json"

    if cache and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
            image = (entry_dir / "payload.bin").read_bytes()
            if meta.get("format") == BUILD_FORMAT and len(image) == meta["image_size"]:
                return Payload._from_build(source, header, image, meta["symbols"], entry_dir,
                                           cached=True)
        except (OSError, ValueError, KeyError):
            pass  # a damaged entry: rebuild it below

    tmp_parent = cache_dir() if cache else None
    if tmp_parent is not None:
        try:
            tmp_parent.mkdir(parents=True, exist_ok=True)
            if not os.access(tmp_parent, os.W_OK):
                raise PermissionError(tmp_parent)
        except OSError:
            cache, tmp_parent = False, None  # an unusable cache folder: build uncached
    with tempfile.TemporaryDirectory(prefix="build-", dir=tmp_parent) as tmp:
        tmpdir = Path(tmp)
        symbols = _assemble(source, header, tools, tmpdir)
        image = (tmpdir / "payload.bin").read_bytes()
        _check_image(source, header, image, symbols)
        if not cache:
            return Payload._from_build(source, header, image, symbols, None, cached=False)
        meta = {
            "format": BUILD_FORMAT,
            "source": str(source),
            "mode": header.mode,
            "load": header.load,
            "entry": header.entry,
            "memory": header.memory,
            "image_size": len(image),
            "symbols": symbols,
            "tools": {n: v for n, (_, v) in tools.items()},
        }
        (tmpdir / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        for junk in ("payload.o",):
            (tmpdir / junk).unlink(missing_ok=True)
        staged = Path(tempfile.mkdtemp(prefix="stage-", dir=tmp_parent))
        for f in tmpdir.iterdir():
            shutil.copy2(f, staged / f.name)
        try:
            os.replace(staged, entry_dir)  # atomic; fails if another process got there first
        except OSError:
            shutil.rmtree(staged, ignore_errors=True)
            if not meta_path.is_file():
                shutil.rmtree(entry_dir, ignore_errors=True)
                shutil.copytree(tmpdir, entry_dir, dirs_exist_ok=True)
    return Payload._from_build(source, header, image, symbols, entry_dir, cached=False)


def _check_image(source: Path, header: PayloadHeader, image: bytes, symbols: dict[str, int]):
    start = symbols.get("__pyvmm_image_start", header.load)
    if start != header.load:  # pragma: no cover - the linker script guarantees it
        raise ToolchainError(f"{source}: image starts at {start:#x}, not at load={header.load:#x}")
    end = symbols.get("__pyvmm_end", header.load + len(image))
    if isinstance(header.entry, str) and header.entry not in symbols:
        raise ToolchainError(f"{source}: entry symbol {header.entry!r} is not defined")
    if header.load < layout.SYSTEM_END and end > layout.SYSTEM_BASE:
        raise ToolchainError(
            f"{source}: image {header.load:#x}-{end:#x} overlaps the system area "
            f"{layout.SYSTEM_BASE:#x}-{layout.SYSTEM_END:#x}"
        )
    if end > header.memory:
        raise ToolchainError(f"{source}: image ends at {end:#x}, beyond memory={header.memory:#x}")
    if header.mode == "real16" and end > 0x10000:
        raise ToolchainError(f"{source}: a real16 image must end below 64 KiB (ends {end:#x})")
