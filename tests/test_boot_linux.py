# SPDX-License-Identifier: GPL-2.0-or-later
"""Boot the Debian kernel with pyvmm's Python virtio devices, for real.

A stock kernel needs stock KVM (kvm_pvm's emulator cannot run one), so these run in the
nested runner, where /dev/kvm is kvm_amd:

    python -m pyvmm.testing.nested -- python -m pytest -q tests/test_boot_linux.py

On kvm_pvm they are skipped as a missing capability and are part of the stock_kvm selection.
The guest is driven through its console like a user at a terminal: the test waits for the
shell prompt and types commands on /dev/hvc0.
"""

from __future__ import annotations

import io
import tarfile
import threading

import pytest

from pyvmm import boot, cli
from pyvmm.testing import hostinfo
from pyvmm.testing.plugin import CAP_SKIP_PROPERTY

pytestmark = pytest.mark.stock_kvm

#: Generous: the whole machine runs under QEMU's TCG, the kernel under nested SVM.
BOOT_TIMEOUT = 900.0
PROMPT = "/ # "


@pytest.fixture
def stock_kvm(request, kvm):
    if hostinfo.kvm_module() == "kvm_pvm":
        request.node.user_properties.append((CAP_SKIP_PROPERTY, ["STOCK_KERNEL"]))
        pytest.skip("pyvmm: missing KVM capability STOCK_KERNEL on kvm_pvm (its instruction "
                    "emulator cannot run a stock kernel)")
    return kvm


@pytest.fixture(scope="module")
def images():
    return boot.default_kernel_and_initrd()


class Session:
    """A LinuxMachine running in a background thread; the test types on its console."""

    def __init__(self, lm: boot.LinuxMachine) -> None:
        self.lm = lm
        self.result = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.result = self.lm.run(timeout=BOOT_TIMEOUT)

    def shell(self) -> str:
        assert self.lm.wait_for(boot.BOOT_MARKER, BOOT_TIMEOUT), self.lm.transcript[-3000:]
        assert self.lm.wait_for(PROMPT, 120), self.lm.transcript[-3000:]
        return self.lm.transcript

    def command(self, line: str, until: str, timeout: float = 300) -> str:
        start = self.lm.position
        self.lm.send(line + "\n")
        assert self.lm.wait_for(until, timeout, after=start), self.lm.transcript[-3000:]
        return self.lm.transcript

    def end(self, timeout: float = 300):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the guest did not end the run"
        return self.result


def test_boot_to_shell_with_the_cli(stock_kvm, images, capsys):
    # The command CI runs: `pyvmm boot --expect '# '` exits 0 at the busybox prompt.
    assert cli.main(["boot", "--expect", PROMPT, "--timeout", str(BOOT_TIMEOUT)]) == 0
    out = capsys.readouterr()
    assert boot.BOOT_MARKER in out.out and "BusyBox" in out.out
    assert "by ioeventfd" in out.err


def test_disk_round_trip_entropy_and_poweroff(stock_kvm, images, tmp_path):
    kernel, initrd = images
    disk = tmp_path / "disk.img"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        data = b"hello from the host disk\n"
        info = tarfile.TarInfo("hello.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    disk.write_bytes(buf.getvalue().ljust(2 << 20, b"\0"))
    with boot.LinuxMachine(kernel, initrd=initrd, disk=disk, kvm=stock_kvm) as lm:
        s = Session(lm)
        s.shell()
        s.command("tar -xOf /dev/vda hello.txt", "hello from the host disk")
        s.command("cat /sys/block/vda/serial; echo", "pyvmm-disk")
        s.command("echo written-by-the-guest | dd of=/dev/vda bs=512 seek=2048 conv=fsync "
                  "&& echo dd-ok", "dd-ok")
        s.command("head -c 64 /dev/hwrng | wc -c", "64")
        lm.send("poweroff -f\n")
        result = s.end()
        given = lm.transports["entropy"].device.given
    assert result.stop == "done" and result.power == "poweroff", result.summary()
    with open(disk, "rb") as f:  # the host sees what the guest wrote, after a clean end
        f.seek(2048 * 512)
        assert f.read(21) == b"written-by-the-guest\n"
    assert given >= 64
    stats = result.devices["disk"]
    assert stats["notify_doorbell"] > 0 and stats["irq_irqfd"] > 0
    assert stats.get("needs_reset", 0) == 0


def test_smp_boot_sees_all_cpus_and_reboot_ends_the_run(stock_kvm, images):
    kernel, initrd = images
    with boot.LinuxMachine(kernel, initrd=initrd, vcpus=2, kvm=stock_kvm) as lm:
        s = Session(lm)
        text = s.shell()
        assert f"{boot.BOOT_MARKER}" in text and "cpus=2" in text
        s.command("grep -c ^processor /proc/cpuinfo", "2\r\n")
        lm.send("reboot -f\n")
        result = s.end()
    assert result.stop == "shutdown" and result.power == "reset", result.summary()
