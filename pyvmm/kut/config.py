# SPDX-License-Identifier: GPL-2.0-or-later
"""kvm-unit-tests' `x86/unittests.cfg`: the test list, and what each test asks of the machine.

The file is INI-like: a `[name]` line starts a test, then `key = value` lines (file, smp,
test_args, qemu_params or its older name extra_params, groups, arch, accel, machine, check,
disabled_if, timeout). A params value may span lines between triple quotes.
"""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DEFAULT_TIMEOUT", "KutTest", "MachineParams", "find_tests", "load_tests",
           "machine_params", "parse_cfg", "parse_timeout"]

#: The suite's own default per-test timeout (scripts/runtime.bash): 90 s.
DEFAULT_TIMEOUT = 90.0

_SECTION = re.compile(r"^\[(.*)\]\s*$")
_KEY = re.compile(r"^([a-z_]+)\s*=\s*(.*)$")


@dataclass(frozen=True)
class KutTest:
    """One `[name]` section of unittests.cfg."""

    name: str
    file: str
    smp: int = 1
    test_args: str = ""
    extra_params: str = ""
    groups: tuple[str, ...] = ()
    arch: str = ""
    accel: str = ""
    machine: str = ""
    check: tuple[str, ...] = ()
    disabled_if: str = ""
    timeout: float = DEFAULT_TIMEOUT

    @property
    def args(self) -> list[str]:
        """test_args as the shell words the suite's runner passes (its `eval` removes one level
        of quoting; the guest splits the -append text at blanks). Backticks (`date +%s` in
        one test) are not run: the words stay as written."""
        return shlex.split(self.test_args) if self.test_args else []


def parse_timeout(text: str) -> float:
    """A unittests.cfg/timeout(1) duration ("90", "90s", "2m", "1h", "0.5d") in seconds."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise ValueError(f"not a timeout: {text!r} (a number with an optional s/m/h/d)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[
        match.group(2)]


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    return value


def parse_cfg(text: str, *, source: str = "unittests.cfg") -> list[KutTest]:
    """Every test of a unittests.cfg text, in file order. ValueError names the line of a
    malformed entry."""
    tests: list[KutTest] = []
    current: dict | None = None
    lines = text.splitlines()
    i = 0

    def finish() -> None:
        if current is None:
            return
        if "file" not in current:
            raise ValueError(f"{source}: test [{current['name']}] has no file")
        tests.append(KutTest(**current))

    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        section = _SECTION.match(line)
        if section:
            finish()
            current = {"name": section.group(1).strip()}
            continue
        match = _KEY.match(line)
        if not match or current is None:
            raise ValueError(f"{source}:{i}: cannot parse {line!r}")
        key, value = match.groups()
        if key in ("qemu_params", "extra_params") and value.startswith('"""'):
            parts = [value[3:]]
            while not parts[-1].rstrip().endswith('"""'):
                if i >= len(lines):
                    raise ValueError(f"{source}:{i}: unterminated \"\"\" in [{current['name']}]")
                parts.append(lines[i])
                i += 1
            value = " ".join(p.strip() for p in parts).rstrip()[:-3].replace("\\ ", " ")
        try:
            if key == "file":
                current["file"] = value.strip()
            elif key == "smp":
                current["smp"] = int(value)
            elif key == "test_args":
                current["test_args"] = value.strip()
            elif key in ("qemu_params", "extra_params"):
                current["extra_params"] = value.strip()
            elif key == "groups":
                current["groups"] = tuple(value.split())
            elif key == "check":
                current["check"] = tuple(value.split())
            elif key == "timeout":
                current["timeout"] = parse_timeout(value)
            elif key in ("arch", "accel", "machine", "disabled_if"):
                current[key] = _unquote(value)
            # Other keys (kvmtool_params, ...) are for other VMMs.
        except ValueError as err:
            raise ValueError(f"{source}:{i}: [{current['name']}] {key}: {err}") from None
    finish()
    return tests


def find_tests(kut_dir: str | os.PathLike) -> Path:
    """The unittests.cfg of a built kvm-unit-tests tree. ValueError (one line, with how to
    build one) when the directory is missing or not built."""
    root = Path(kut_dir)
    cfg = root / "x86" / "unittests.cfg"
    how = ("build one with: git clone https://gitlab.com/kvm-unit-tests/kvm-unit-tests.git && "
           "cd kvm-unit-tests && ./configure --arch=x86_64 && make -j")
    if not root.is_dir():
        raise ValueError(f"no kvm-unit-tests directory at {root}; {how}")
    if not cfg.is_file():
        raise ValueError(f"{root} has no x86/unittests.cfg (not an x86 kvm-unit-tests tree); "
                         f"{how}")
    if not any((root / "x86").glob("*.flat")):
        raise ValueError(f"{root} is not built (no x86/*.flat); run ./configure "
                         f"--arch=x86_64 && make -j there")
    return cfg


def load_tests(kut_dir: str | os.PathLike) -> list[KutTest]:
    """The tests of a built kvm-unit-tests tree (see `find_tests`)."""
    cfg = find_tests(kut_dir)
    return parse_cfg(cfg.read_text(), source=str(cfg))


@dataclass
class MachineParams:
    """What a test's QEMU parameters ask for, in pyvmm's terms. `unsupported` lists the
    parameters pyvmm cannot honour (the test is then reported SKIP with them as reason);
    `notes` the ones honoured only in part."""

    memory_size: int | None = None
    pit: bool = True
    cpu: str = ""
    devices: list[str] = field(default_factory=list)
    unsupported: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _memory_size(text: str) -> int:
    match = re.fullmatch(r"([0-9]+)([kKmMgGtT]?)[bB]?", text)
    if not match:
        raise ValueError(f"bad -m size {text!r}")
    scale = {"": 1 << 20, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[
        match.group(2).lower()]
    return int(match.group(1)) * scale


def machine_params(extra_params: str) -> MachineParams:
    """Translate a test's QEMU parameters (`-cpu`, `-m`, `-machine pit=off`, ...) to what a
    pyvmm PC platform does; the rest goes to `unsupported`."""
    params = MachineParams()
    q35: list[str] = []   # honoured only as the frame of an intel-iommu (see below)
    words = shlex.split(extra_params)
    i = 0
    while i < len(words):
        word = words[i]
        value = words[i + 1] if i + 1 < len(words) else ""
        if word in ("-enable-kvm", "--enable-kvm"):
            i += 1
            continue
        if word in ("-cpu", "--cpu"):
            params.cpu = value
        elif word in ("-m", "--m"):
            size = value.split(",")[0].removeprefix("size=")
            params.memory_size = _memory_size(size)
        elif word in ("-machine", "-M", "--machine"):
            for option in value.split(","):
                if option == "pit=off":
                    params.pit = False
                elif option in ("accel=kvm", "pc", "pit=on"):
                    pass
                elif option in ("q35", "kernel-irqchip=split"):
                    q35.append(f"-machine {option}")
                else:
                    params.unsupported.append(f"-machine {option}")
        elif word == "-device" and _device(value, params):
            pass
        elif word.startswith("-"):
            params.unsupported.append(f"{word} {value}".strip())
        else:
            params.unsupported.append(word)
            i += 1
            continue
        i += 2
    # q35 with a split irqchip is what QEMU needs for its intel-iommu; pyvmm adds the IOMMU
    # to its PC and keeps KVM's irqchip (pyvmm.kut.iommu says what that leaves out).
    if "intel-iommu" in params.devices:
        params.notes += [f"{option}: pyvmm's PC with the in-kernel irqchip" for option in q35]
    else:
        params.unsupported[:0] = q35
    return params


#: -device NAME[,options] pyvmm adds (pyvmm.kut.iommu), and the options it honours.
DEVICES = {"edu": frozenset(), "intel-iommu": frozenset({"intremap=on", "eim=off"})}


def _device(value: str, params: MachineParams) -> bool:
    name, *options = value.split(",")
    if name not in DEVICES or not set(options) <= DEVICES[name]:
        return False
    params.devices.append(name)
    return True
