# SPDX-License-Identifier: GPL-2.0-or-later
"""Host tools and the guest kernel for the nested runner.

The nested runner boots a stock Debian kernel under QEMU's TCG (which emulates AMD SVM) so that
the stock ``kvm_amd`` module gives the test suite a /dev/kvm with SMM and userspace hypercalls.
This module finds or installs what that needs:

* host packages: ``qemu-system-x86`` and ``busybox-static`` (apt, only when running as root);
* a Debian ``linux-image-6.1.0-N-amd64`` package fetched with ``apt-get download`` and unpacked
  with ``dpkg-deb -x`` into a cache folder (never installed into /boot);
* the uncompressed ``vmlinux`` pulled out of the bzImage, so QEMU can boot it through PVH;
* the KVM and 9p/virtio modules and everything they depend on (read from each module's
  ``.modinfo``, since the package ships no modules.dep), decompressed.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .kernel_image import extract_vmlinux, has_pvh_note  # noqa: F401  (re-exported)

# The modules the guest loads, by name; their dependencies are added automatically.
KVM_MODULES = ("irqbypass", "kvm", "ccp", "kvm_amd")
SHARE_MODULES = ("virtio_pci", "9pnet_virtio", "9p", "overlay")
# The virtio-mmio drivers a `pyvmm boot` guest loads (pyvmm.boot); kept in the same cache.
BOOT_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "virtio_rng")

HOST_PACKAGES = {
    # package: the file that shows it is installed
    "qemu-system-x86": "qemu-system-x86_64",
    "busybox-static": "/bin/busybox",
}
QBOOT = "/usr/share/qemu/qboot.rom"
KERNEL_PACKAGE_RE = re.compile(r"^linux-image-6\.1\.0-(\d+)-amd64$")

CACHE_LAYOUT_VERSION = "2"  # 2: the boot modules too


class NestedSetupError(RuntimeError):
    """Something the nested runner needs is missing and could not be provided."""


def cache_dir() -> Path:
    """$PYVMM_NESTED_CACHE, else $XDG_CACHE_HOME/pyvmm/nested, else ~/.cache/pyvmm/nested."""
    env = os.environ.get("PYVMM_NESTED_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "pyvmm" / "nested"


def _log(msg: str) -> None:
    print(f"pyvmm nested: {msg}", flush=True)


def _is_root() -> bool:
    return os.geteuid() == 0


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, text=True, capture_output=True, **kw)


# --------------------------------------------------------------------------------- host tools

def _apt_update() -> subprocess.CompletedProcess:
    return _run(["apt-get", "update", "-q"], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))


def _have(probe: str) -> bool:
    return os.path.exists(probe) if probe.startswith("/") else shutil.which(probe) is not None


def _is_static_elf(path: str) -> bool:
    """True if the ELF file has no PT_INTERP (so it runs in an initramfs with no libc)."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                return False
            phoff, = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
    except OSError:
        return False
    for i in range(phnum):
        p_type, = struct.unpack_from("<I", table, i * phentsize)
        if p_type == 3:  # PT_INTERP
            return False
    return True


def apt_install(packages: list[str]) -> None:
    """apt-get install --no-install-recommends, running apt-get update first if needed."""
    if not packages:
        return
    if not _is_root():
        raise NestedSetupError(
            "the nested runner needs these Debian packages: " + " ".join(packages)
            + "\ninstall them as root with: apt-get install --no-install-recommends "
            + " ".join(packages))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    _log("installing " + " ".join(packages))
    res = _run(cmd, env=env)
    if res.returncode != 0:
        _log("apt-get install failed; running apt-get update first")
        upd = _apt_update()
        if upd.returncode != 0:
            raise NestedSetupError("apt-get update failed:\n" + upd.stderr[-2000:])
        res = _run(cmd, env=env)
        if res.returncode != 0:
            raise NestedSetupError("apt-get install failed:\n" + res.stderr[-2000:])


def ensure_host_tools() -> dict[str, str]:
    """Find (or install, as root) QEMU and a static busybox; return their paths."""
    missing = [pkg for pkg, probe in HOST_PACKAGES.items() if not _have(probe)]
    if not os.path.exists(QBOOT) and "qemu-system-x86" not in missing:
        missing.append("qemu-system-x86")
    if _have("/bin/busybox") and not _is_static_elf("/bin/busybox"):
        # the dynamic "busybox" package owns /bin/busybox; busybox-static replaces it
        missing.append("busybox-static")
    apt_install(sorted(set(missing)))
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or not _is_static_elf("/bin/busybox"):
        raise NestedSetupError("qemu-system-x86_64 or a static /bin/busybox is still missing")
    return {"qemu": qemu, "busybox": "/bin/busybox",
            "qboot": QBOOT if os.path.exists(QBOOT) else ""}


# ------------------------------------------------------------------------------ kernel package

def _version_key(pkg: str) -> int:
    m = KERNEL_PACKAGE_RE.match(pkg)
    return int(m.group(1)) if m else -1


def available_kernel_packages() -> list[str]:
    """Names of linux-image-6.1.0-N-amd64 packages apt knows, oldest first."""
    if shutil.which("apt-cache") is None:
        return []
    res = _run(["apt-cache", "pkgnames", "linux-image-6.1.0-"])
    names = [n.strip() for n in res.stdout.splitlines() if KERNEL_PACKAGE_RE.match(n.strip())]
    return sorted(set(names), key=_version_key)


@dataclass(frozen=True)
class Kernel:
    """An unpacked guest kernel in the cache."""

    root: Path  # cache/kernels/<release>

    @property
    def release(self) -> str:
        return self.root.name

    @property
    def vmlinuz(self) -> Path:
        return self.root / "vmlinuz"

    @property
    def vmlinux(self) -> Path | None:
        p = self.root / "vmlinux"
        return p if p.exists() else None

    @property
    def modules(self) -> list[Path]:
        """The modules to insmod, dependencies first."""
        meta = json.loads((self.root / "modules.json").read_text())
        return [self.root / "modules" / f"{name}.ko" for name in meta["order"]]

    @property
    def boot_modules(self) -> list[Path]:
        """The virtio-mmio guest drivers of `pyvmm boot`, dependencies first."""
        meta = json.loads((self.root / "modules.json").read_text())
        return [self.root / "modules" / f"{name}.ko" for name in meta.get("boot_order", [])]


def _cached_kernels(base: Path) -> list[Kernel]:
    kdir = base / "kernels"
    out = []
    if kdir.is_dir():
        for d in kdir.iterdir():
            ready = d / "ready"
            # an older layout lacks modules this one extracts: fetched again
            if ready.exists() and ready.read_text().strip() == CACHE_LAYOUT_VERSION:
                out.append(Kernel(d))
    return sorted(out, key=lambda k: _version_key(f"linux-image-{k.release}"))


def ensure_kernel(base: Path | None = None, package: str | None = None) -> Kernel:
    """A cached guest kernel: the newest cached one, else download the newest apt offers.

    ``package`` (or $PYVMM_NESTED_KERNEL) names a specific linux-image package instead;
    $PYVMM_NESTED_REFRESH=1 looks for a newer package even when one is cached.
    """
    base = base or cache_dir()
    package = package or os.environ.get("PYVMM_NESTED_KERNEL") or None
    cached = _cached_kernels(base)
    if package:
        release = package.removeprefix("linux-image-")
        for k in cached:
            if k.release == release:
                return k
    elif cached and os.environ.get("PYVMM_NESTED_REFRESH") != "1":
        return cached[-1]

    if package is None:
        names = available_kernel_packages()
        if not names and _is_root():
            _log("no linux-image-6.1.0-*-amd64 package known to apt; running apt-get update")
            _apt_update()
            names = available_kernel_packages()
        if not names:
            if cached:
                return cached[-1]
            raise NestedSetupError(
                "apt knows no linux-image-6.1.0-*-amd64 package (Debian 12 'bookworm' sources "
                "needed; run apt-get update as root)")
        package = names[-1]
        release = package.removeprefix("linux-image-")
        for k in cached:
            if k.release == release:
                return k
    return _download_kernel(base, package)


def _download_kernel(base: Path, package: str) -> Kernel:
    if shutil.which("dpkg-deb") is None or shutil.which("apt-get") is None:
        raise NestedSetupError("apt-get and dpkg-deb are needed to fetch the guest kernel")
    release = package.removeprefix("linux-image-")
    (base / "kernels").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=base) as tmp:
        _log(f"downloading {package} (apt-get download)")
        cmd = ["apt-get", "download", "-q", package]
        if _is_root():
            # root's downloads cannot be sandboxed to _apt in a folder _apt cannot write
            cmd[2:2] = ["-o", "APT::Sandbox::User=root"]
        res = _run(cmd, cwd=tmp)
        if res.returncode != 0 and _is_root():
            _apt_update()
            res = _run(cmd, cwd=tmp)
        debs = list(Path(tmp).glob("*.deb"))
        if res.returncode != 0 or not debs:
            raise NestedSetupError(f"apt-get download {package} failed:\n{res.stderr[-2000:]}")
        tree = Path(tmp) / "tree"
        res = _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
        if res.returncode != 0:
            raise NestedSetupError(f"dpkg-deb -x failed:\n{res.stderr[-2000:]}")
        staging = Path(tmp) / release
        staging.mkdir()
        _install_kernel_tree(tree, release, staging)
        (staging / "package").write_text(debs[0].name + "\n")
        (staging / "ready").write_text(CACHE_LAYOUT_VERSION + "\n")
        final = base / "kernels" / release
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    _log(f"guest kernel {release} cached in {final}")
    return Kernel(final)


def _install_kernel_tree(tree: Path, release: str, dest: Path) -> None:
    """Copy the bzImage, vmlinux and the needed modules out of an unpacked linux-image package."""
    vmlinuz = tree / "boot" / f"vmlinuz-{release}"
    if not vmlinuz.exists():
        found = sorted((tree / "boot").glob("vmlinuz-*"))
        if not found:
            raise NestedSetupError("no /boot/vmlinuz-* in the kernel package")
        vmlinuz = found[0]
    shutil.copyfile(vmlinuz, dest / "vmlinuz")
    config = tree / "boot" / f"config-{release}"
    if config.exists():
        shutil.copyfile(config, dest / "config")
    try:
        elf = extract_vmlinux(vmlinuz.read_bytes())
    except (ValueError, lzma.LZMAError, OSError, EOFError) as e:
        _log(f"could not extract vmlinux ({e}); will boot the bzImage with SeaBIOS")
    else:
        if has_pvh_note(elf):
            (dest / "vmlinux").write_bytes(elf)
        else:
            _log("vmlinux has no PVH entry note; will boot the bzImage with SeaBIOS")

    moddirs = sorted((tree / "lib" / "modules").iterdir())
    if not moddirs:
        raise NestedSetupError("no /lib/modules in the kernel package")
    moddir = moddirs[0]
    builtin = _builtin_modules(moddir)
    index = _module_index(moddir / "kernel")
    order = module_load_order([*KVM_MODULES, *SHARE_MODULES], index, builtin)
    boot_order = module_load_order(BOOT_MODULES, index, builtin)
    (dest / "modules").mkdir()
    for name in dict.fromkeys([*order, *boot_order]):
        (dest / "modules" / f"{name}.ko").write_bytes(_read_module(index[name]))
    meta = {"release": release, "order": order, "boot_order": boot_order, "builtin_roots":
            sorted(n for n in (*KVM_MODULES, *SHARE_MODULES) if n in builtin)}
    (dest / "modules.json").write_text(json.dumps(meta, indent=1) + "\n")


def _normalise(name: str) -> str:
    return name.replace("-", "_")


def _module_name(path: Path) -> str:
    name = path.name
    for suffix in (".xz", ".zst", ".gz"):
        name = name.removesuffix(suffix)
    return _normalise(name.removesuffix(".ko"))


def _module_index(kernel_dir: Path) -> dict[str, Path]:
    index = {}
    for path in kernel_dir.rglob("*.ko*"):
        index[_module_name(path)] = path
    return index


def _builtin_modules(moddir: Path) -> set[str]:
    try:
        lines = (moddir / "modules.builtin").read_text().split()
    except OSError:
        return set()
    return {_module_name(Path(line)) for line in lines}


def _read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    if path.name.endswith(".zst"):
        res = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True)
        return res.stdout
    return data


def module_depends(data: bytes) -> list[str]:
    """The ``depends=`` list of a module's .modinfo section."""
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", data)
    if not m or not m.group(1):
        return []
    return [_normalise(d) for d in m.group(1).decode().split(",") if d]


def module_load_order(roots, index: dict[str, Path], builtin: set[str],
                      read=_read_module) -> list[str]:
    """Roots and their dependencies, each after what it depends on; built-ins left out."""
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        name = _normalise(name)
        if name in order or name in builtin:
            return
        if name not in index:
            raise NestedSetupError(f"kernel module {name} is neither built in nor shipped")
        if name in visiting:
            raise NestedSetupError(f"module dependency cycle through {name}")
        visiting.add(name)
        for dep in module_depends(read(index[name])):
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for root in roots:
        visit(root)
    return order


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
