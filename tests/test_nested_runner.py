# SPDX-License-Identifier: GPL-2.0-or-later
"""The nested KVM runner (pyvmm.testing.nested) and the pytest plugin's skip accounting.

Everything but ``test_boot_end_to_end`` runs without booting: the initramfs is built for real
(from a small synthetic kernel tree and the host's busybox), the guest script is executed by
the host's /bin/sh, the console parser and the QEMU supervision are fed by a stand-in process,
and the skip check reads JSON files the plugin itself wrote in a pytester run.
"""

from __future__ import annotations

import importlib.metadata
import json
import lzma
import os
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyvmm.testing import initramfs, kernel, nested
from pyvmm.testing.initramfs import MARKER

pytest_plugins = ["pytester"]

INSIDE_NESTED = os.environ.get("PYVMM_NESTED") == "1"


# ------------------------------------------------------------------------- kernel & initramfs


def skip_unless_ci(reason: str):
    """Skip outside CI; in CI (which prepares the runner first) a missing piece is a failure."""
    if os.environ.get("CI") or os.environ.get("PYVMM_REQUIRE_KVM") == "1":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)

def _fake_module(name: str, depends: list[str]) -> bytes:
    # just enough of a .ko for the .modinfo scan: NUL-separated key=value strings
    return (b"\x7fELF" + b"\x00" * 60 + b"license=GPL\x00depends=" + ",".join(depends).encode()
            + b"\x00name=" + name.encode() + b"\x00vermagic=6.1.0 SMP\x00")


def _fake_tree(root: Path) -> dict[str, Path]:
    deps = {"irqbypass": [], "kvm": ["irqbypass"], "ccp": [], "kvm-amd": ["kvm", "ccp"],
            "virtio_ring": [], "virtio": ["virtio_ring"], "virtio_pci": ["virtio", "virtio_ring"],
            "9pnet": [], "9pnet_virtio": ["virtio", "9pnet", "virtio_ring"],
            "netfs": [], "fscache": ["netfs"], "9p": ["9pnet", "fscache", "netfs"],
            "unrelated": ["kvm"]}
    index = {}
    for name, d in deps.items():
        path = root / "kernel" / "x" / f"{name}.ko"
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _fake_module(name, [n.replace("-", "_") for n in d])
        if name == "ccp":  # one compressed module, as 6.12 ships them
            path = path.with_name("ccp.ko.xz")
            data = lzma.compress(data)
        path.write_bytes(data)
        index[name.replace("-", "_")] = path
    return index


def test_module_load_order_follows_modinfo_depends(tmp_path):
    index = _fake_tree(tmp_path)
    order = kernel.module_load_order(["kvm-amd", "9p", "9pnet_virtio", "virtio_pci"], index,
                                     builtin={"virtio_ring"})
    assert set(order) == {"irqbypass", "kvm", "ccp", "kvm_amd", "virtio", "virtio_pci", "9pnet",
                          "9pnet_virtio", "netfs", "fscache", "9p"}
    for before, after in [("irqbypass", "kvm"), ("kvm", "kvm_amd"), ("ccp", "kvm_amd"),
                          ("netfs", "fscache"), ("fscache", "9p"), ("virtio", "9pnet_virtio")]:
        assert order.index(before) < order.index(after)
    with pytest.raises(kernel.NestedSetupError, match="neither built in nor shipped"):
        kernel.module_load_order(["nosuch"], index, builtin=set())


def test_module_depends_parses_modinfo():
    assert kernel.module_depends(_fake_module("kvm_amd", ["kvm", "ccp"])) == ["kvm", "ccp"]
    assert kernel.module_depends(_fake_module("ccp", [])) == []
    assert kernel.module_depends(b"no modinfo at all") == []


def _fake_bzimage(elf: bytes) -> bytes:
    setup_sects = 3
    payload = lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)
    payload += struct.pack("<I", len(elf))  # the kernel appends the uncompressed size
    header = bytearray((setup_sects + 1) * 512)
    header[0x1F1] = setup_sects
    header[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", header, 0x206, 0x20F)
    pm = bytearray(0x300) + payload
    struct.pack_into("<II", header, 0x248, 0x300, len(payload))
    return bytes(header + pm)


def _elf_with_pvh_note() -> bytes:
    # ELF64 header, one PT_NOTE program header, one "Xen" note of type 18
    note = struct.pack("<III", 4, 4, 18) + b"Xen\x00" + struct.pack("<I", 0x1000000)
    ehdr = bytearray(64)
    ehdr[:5] = b"\x7fELF\x02"
    struct.pack_into("<Q", ehdr, 0x20, 64)
    struct.pack_into("<HH", ehdr, 0x36, 56, 1)
    phdr = bytearray(56)
    struct.pack_into("<I", phdr, 0, 4)
    struct.pack_into("<Q", phdr, 8, 120)
    struct.pack_into("<Q", phdr, 32, len(note))
    return bytes(ehdr + phdr + note)


def test_extract_vmlinux_from_bzimage():
    elf = _elf_with_pvh_note()
    out = kernel.extract_vmlinux(_fake_bzimage(elf))
    assert out == elf
    assert kernel.has_pvh_note(out)
    assert not kernel.has_pvh_note(elf[:64] + b"\x00" * 100)
    assert not kernel.has_pvh_note(elf[:130])  # truncated inside the note
    with pytest.raises(ValueError, match="not a bzImage"):
        kernel.extract_vmlinux(b"\x00" * 4096)


def test_static_elf_check(tmp_path):
    assert not kernel._is_static_elf(os.path.realpath(sys.executable))  # has an interpreter
    (tmp_path / "script").write_text("#!/bin/sh\n")
    assert not kernel._is_static_elf(str(tmp_path / "script"))


def _busybox() -> str:
    if not (os.path.exists("/bin/busybox") and kernel._is_static_elf("/bin/busybox")):
        skip_unless_ci("no static /bin/busybox (apt-get install busybox-static)")
    return "/bin/busybox"


def test_initramfs_content(tmp_path):
    busybox = _busybox()
    index = _fake_tree(tmp_path / "tree")
    kdir = tmp_path / "cache" / "kernels" / "6.1.0-99-amd64"
    (kdir / "modules").mkdir(parents=True)
    order = kernel.module_load_order([*kernel.KVM_MODULES, "9p"], index, builtin=set())
    for name in order:
        (kdir / "modules" / f"{name}.ko").write_bytes(kernel._read_module(index[name]))
    (kdir / "modules.json").write_text(json.dumps({"order": order}))
    k = kernel.Kernel(kdir)

    path = initramfs.build_initramfs(k, busybox, tmp_path / "cache")
    entries = initramfs.read_cpio(path.read_bytes())
    mode, init = entries["init"]
    assert stat.S_ISREG(mode) and mode & 0o111
    assert init.startswith(b"#!/bin/busybox sh\n")
    assert b"reboot -f" in init and MARKER.encode() in init
    assert entries["bin/busybox"][1] == Path(busybox).read_bytes()
    assert stat.S_ISCHR(entries["dev/console"][0])
    listed = entries["etc/pyvmm-modules"][1].decode().split()
    assert listed == order
    for name in order:
        assert entries[f"lib/modules/{name}.ko"][1].startswith(b"\x7fELF")  # ccp decompressed
    assert listed.index("irqbypass") < listed.index("kvm") < listed.index("kvm_amd")
    # cached by content: the same inputs give the same file, other modules another one
    assert initramfs.build_initramfs(k, busybox, tmp_path / "cache") == path
    (kdir / "modules" / "ccp.ko").write_bytes(_fake_module("ccp", []) + b"v2")
    assert initramfs.build_initramfs(k, busybox, tmp_path / "cache") != path


def test_init_script_is_valid_shell():
    res = subprocess.run(["sh", "-n"], input=initramfs.init_script(), text=True,
                         capture_output=True, check=False)
    assert res.returncode == 0, res.stderr


def test_cached_kernel_initramfs_is_complete():
    """The real kernel, if a previous run cached it: every module it needs is in the initramfs."""
    cached = kernel._cached_kernels(kernel.cache_dir())
    if not cached:
        skip_unless_ci("no guest kernel cached yet (pyvmm nested --prepare)")
    k = cached[-1]
    names = [m.stem for m in k.modules]
    for needed in ("irqbypass", "kvm", "ccp", "kvm_amd", "9p", "9pnet_virtio", "virtio_pci"):
        assert needed in names
    for m in k.modules:
        assert m.read_bytes()[:4] == b"\x7fELF"
    assert k.vmlinux is None or kernel.has_pvh_note(k.vmlinux.read_bytes())


# --------------------------------------------------------------------- command and environment

AWKWARD_ARGS = ["plain", "with space", "it's", 'say "hi"', "$HOME", "`id`", "a\nb", "*", ""]


def test_run_script_quotes_arguments_and_environment(tmp_path):
    env = {"PYVMM_X": "a b 'c' $d", "HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    cwd = tmp_path / "dir with space"
    cwd.mkdir()
    code = ("import json, os, sys; print(json.dumps([sys.argv[1:], os.getcwd(), "
            "os.environ['PYVMM_X']])); sys.exit(7)")
    command = [sys.executable, "-c", code, *AWKWARD_ARGS]
    script = nested.run_script(command, cwd=str(cwd), env=env, python=sys.executable,
                               probe=True, ctl=str(tmp_path))
    (tmp_path / "run.sh").write_text(script)
    res = subprocess.run(["env", "-i", "/bin/sh", str(tmp_path / "run.sh")],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 7
    lines = res.stdout.splitlines()
    assert lines[0].startswith(f"{MARKER} probe ")  # no /dev/kvm needed: "none" or caps
    assert lines[1] == f"{MARKER} start"
    argv, where, value = json.loads(lines[2])
    assert argv == AWKWARD_ARGS and where == str(cwd) and value == env["PYVMM_X"]
    assert lines[-1] == f"{MARKER} end 7"
    assert (tmp_path / "status").read_text().strip() == "7"


def test_guest_env_keeps_essentials_only():
    host = {"PATH": "/root/.pyenv/shims:/usr/bin", "HOME": "/root", "PYVMM_FOO": "1",
            "PYTHONPATH": "/src", "AWS_SECRET_ACCESS_KEY": "no", "SSH_AUTH_SOCK": "/x",
            "LC_ALL": "C.UTF-8"}
    env = nested.guest_env(host, python="/opt/py/bin/python3.11")
    assert env["PATH"].split(":")[:2] == ["/opt/py/bin", "/root/.pyenv/shims"]
    assert env["PYVMM_FOO"] == "1" and env["PYTHONPATH"] == "/src" and env["LC_ALL"] == "C.UTF-8"
    assert "AWS_SECRET_ACCESS_KEY" not in env and "SSH_AUTH_SOCK" not in env
    assert env["PYVMM_NESTED"] == "1" and env["PYVMM_REQUIRE_KVM"] == "1"
    assert env["TERM"] == "dumb"
    assert nested.guest_env({**host, "PYVMM_REQUIRE_KVM": "0"},
                            python="/p/python")["PYVMM_REQUIRE_KVM"] == "0"
    assert nested.guest_env(host, python="/p/python", extra={"X": "y"})["X"] == "y"


def test_resolve_command_uses_this_interpreter():
    assert nested.resolve_command(["python", "-m", "pytest"], "/opt/py/bin/python3.11") == [
        "/opt/py/bin/python3.11", "-m", "pytest"]
    assert nested.resolve_command(["python3", "-V"], "/x/python3")[0] == "/x/python3"
    assert nested.resolve_command(["sh", "-c", "true"], "/x/python3") == ["sh", "-c", "true"]


def test_qemu_command_escapes_commas():
    cmd = nested.qemu_command(qemu="qemu", kernel="vmlinux", initrd="i.cpio", bios="qboot.rom",
                              work="/src/a,b", ctl="/tmp/c", smp=1, memory_mb=2048)
    shares = [cmd[i + 1] for i, a in enumerate(cmd) if a == "-virtfs"]
    assert "path=/src/a,,b," in shares[1]
    assert "readonly=on" in shares[0] and "readonly" not in shares[1]
    assert cmd[cmd.index("-bios") + 1] == "qboot.rom" and "tcg" in cmd


def test_project_root(tmp_path):
    (tmp_path / "proj" / "sub").mkdir(parents=True)
    (tmp_path / "proj" / "pyproject.toml").write_text("")
    assert nested.project_root(tmp_path / "proj" / "sub") == (tmp_path / "proj").resolve()


# ------------------------------------------------------------------- console and supervision

def test_console_markers_partial_lines_and_carriage_returns():
    import io
    out = io.StringIO()
    c = nested.GuestConsole(out)
    c.feed("kernel noise\r\n" + MARKER + " boot 0.5\r\n" + MARKER + " setup kvm_amd 1.0\r\n", 1.0)
    c.feed(MARKER + " probe SMM=1 MULTI_ADDRESS_SPACE=2 EXIT_HYPERCALL=0\r\n", 1.5)
    c.feed(MARKER + " start\r\n" + "collecting 3\rcollected 9 items\r\n..", 2.0)
    assert out.getvalue().endswith("..")  # progress dots appear before the line ends
    c.feed(".\r", 2.5)
    c.feed("\n@", 2.6)  # a "\r\n" split across reads, then a possible marker start
    c.feed("not a marker\r\nno newline at the end" + MARKER + " end 3\r\n", 3.0)
    c.feed(MARKER + " halt 0\r\n[ 5.1] reboot: Restarting system\r\n", 3.5)
    c.close(4.0)
    text = out.getvalue()
    assert MARKER not in text and "reboot:" not in text
    assert "kernel noise\n" in text and "collecting 3\rcollected 9 items\n" in text
    r = nested._result_from_events(c, t0=0.0, end=4.0, timed_out=False, qemu_rc=0)
    assert r.returncode == 3 and r.kvm_module == "kvm_amd" and r.caps["SMM"] == 1
    assert r.output == "collected 9 items\n...\n@not a marker\nno newline at the end\n"
    assert (r.boot_s, r.setup_s, r.command_s, r.total_s) == (1.0, 1.0, 1.0, 4.0)
    assert "kvm_amd SMM=1 boot 1.0s setup 1.0s command 1.0s exit 3" in r.summary()


def _stand_in(script: str) -> list[str]:
    return [sys.executable, "-c", script]


def test_boot_supervision_timeout_kills_qemu():
    t0 = time.monotonic()
    r = nested._boot(_stand_in(f"import time; print('{MARKER} boot 0', flush=True); "
                               "time.sleep(120)"), timeout=1.5, stream=None)
    assert time.monotonic() - t0 < 10
    assert r.timed_out and r.returncode == nested.EXIT_TIMEOUT and r.boot_s < 1.5


def test_boot_supervision_vm_death_without_status():
    r = nested._boot(_stand_in(f"print('{MARKER} boot 0'); print('{MARKER} start'); "
                               "print('partial output')"), timeout=30, stream=None)
    assert r.returncode == nested.EXIT_VM_FAILED and r.output == "partial output\n"


# ------------------------------------------------------------------------------ skip checking

def _plugin_args() -> list[str]:
    names = {ep.name for ep in importlib.metadata.entry_points(group="pytest11")}
    return [] if "pyvmm" in names else ["-p", "pyvmm.testing.plugin"]


SAMPLE_TESTS = """
import pytest
from pyvmm import Cap

@pytest.mark.requires_cap(Cap.X86_SMM)
def test_smm():
    pass

@pytest.mark.requires_cap("IOEVENTFD", 117)
def test_by_name_and_number():
    pass

@pytest.mark.requires_cap(Cap.IOEVENTFD)
def test_everywhere():
    pass

def test_plain():
    pass
"""


def _run_sample(pytester, monkeypatch, **env) -> tuple[object, dict]:
    pytester.makepyfile(test_sample=SAMPLE_TESTS)
    out = pytester.path / "out.json"
    for name, value in env.items():
        monkeypatch.setenv(name, value.replace("{out}", str(out)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(Path(nested.__file__).parents[2]), os.environ.get("PYTHONPATH", "")]))
    result = pytester.runpytest_subprocess(*_plugin_args(), "-m", "stock_kvm", "-rs")
    return result, json.loads(out.read_text())


def _need_dev_kvm():
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        skip_unless_ci("/dev/kvm unavailable")


def test_plugin_writes_cap_skips_and_check_passes(pytester, monkeypatch, tmp_path):
    _need_dev_kvm()
    from pyvmm.testing import hostinfo
    has_smm = hostinfo.probe_caps({"smm": 117})["smm"] > 0
    monkeypatch.setenv("PYVMM_REQUIRE_KVM", "1")
    result, local = _run_sample(pytester, monkeypatch, PYVMM_CAP_SKIPS="{out}")
    assert local["format"] == "pyvmm-cap-skips/1"
    summary = [line for line in result.outlines if line.startswith("pyvmm: tests ran on")]
    assert len(summary) == 1
    if has_smm:
        assert local["skipped"] == {}
        result.assert_outcomes(passed=3)
        return
    # requires_cap tests were selected by -m stock_kvm; the unmarked one was not
    result.assert_outcomes(passed=1, skipped=2)
    assert local["skipped"] == {"test_sample.py::test_smm": ["X86_SMM"],
                                "test_sample.py::test_by_name_and_number": ["X86_SMM"]}
    assert "2 tests skipped for a missing KVM capability: X86_SMM 2" in summary[0]
    result.stdout.fnmatch_lines(["*test_sample.py:*: pyvmm: missing KVM capability X86_SMM on *"])

    local_path = tmp_path / "local.json"
    local_path.write_text(json.dumps(local))
    good = {"format": "pyvmm-outcomes/1", "kvm": "kvm_amd", "failed": [], "skipped": {},
            "passed": ["test_sample.py::test_smm", "test_sample.py::test_by_name_and_number",
                       "test_sample.py::test_everywhere"]}
    good_path = tmp_path / "nested-good.json"
    good_path.write_text(json.dumps(good))
    assert nested.main(["--check-skips", str(local_path), str(good_path)]) == 0

    bad = dict(good, passed=["test_sample.py::test_everywhere"],
               failed=["test_sample.py::test_smm"])
    bad_path = tmp_path / "nested-bad.json"
    bad_path.write_text(json.dumps(bad))
    assert nested.main(["--check-skips", str(local_path), str(bad_path)]) == 1
    ok, lines = nested.check_skips(local, bad)
    assert not ok
    assert any(line.startswith("FAILED in the nested run: test_sample.py::test_smm")
               for line in lines)
    assert any(line.startswith("NOT RUN in the nested run: test_sample.py::test_by_name")
               for line in lines)


def test_plugin_writes_outcomes(pytester, monkeypatch):
    _need_dev_kvm()
    _, outcomes = _run_sample(pytester, monkeypatch, PYVMM_PASSED="{out}")
    assert outcomes["format"] == "pyvmm-outcomes/1"
    assert "test_sample.py::test_everywhere" in outcomes["passed"]
    assert "test_sample.py::test_plain" not in outcomes["passed"]  # deselected, not run
    assert set(outcomes["cap_skips"]) <= set(outcomes["skipped"])


def test_check_skips_reports_skipped_again():
    local = {"skipped": {"t::a": ["X86_SMM"]}}
    ok, lines = nested.check_skips(local, {"passed": [], "skipped": {"t::a": "no SMM"}})
    assert not ok and lines[0].startswith("SKIPPED in the nested run too: t::a")
    ok, lines = nested.check_skips({"skipped": {}}, {"passed": []})
    assert ok and "0 of 0" in lines[-1]


def test_plugin_fixture_skips_or_fails_without_kvm(pytester, monkeypatch):
    pytester.makepyfile(test_nokvm="""
        import pyvmm

        def test_uses_kvm(monkeypatch, request):
            pass

        def test_needs_vm(vm):
            pass
    """)
    pytester.makeconftest("""
        import pytest, pyvmm

        @pytest.fixture(autouse=True)
        def _no_dev_kvm(monkeypatch):
            def unavailable(*a, **k):
                raise pyvmm.KvmUnavailable(2, "/dev/kvm does not exist (test)")
            monkeypatch.setattr(pyvmm, "Kvm", unavailable)
    """)
    monkeypatch.setenv("PYTHONPATH", str(Path(nested.__file__).parents[2]))
    monkeypatch.delenv("PYVMM_REQUIRE_KVM", raising=False)
    result = pytester.runpytest_subprocess(*_plugin_args(), "-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*/dev/kvm unavailable*does not exist (test)*"])
    monkeypatch.setenv("PYVMM_REQUIRE_KVM", "1")
    result = pytester.runpytest_subprocess(*_plugin_args())
    result.assert_outcomes(passed=1, errors=1)  # a fixture failing is a setup error
    result.stdout.fnmatch_lines(["*PYVMM_REQUIRE_KVM=1 but /dev/kvm unavailable*"])
    assert "During handling" not in result.stdout.str()


# ------------------------------------------------------------------------------- a real boot

@pytest.mark.slow
@pytest.mark.skipif(INSIDE_NESTED, reason="already inside the nested runner")
def test_boot_end_to_end(tmp_path):
    """Boot the nested VM once: stock kvm_amd has SMM, and the exit status comes back."""
    try:
        nested.prepare()
    except kernel.NestedSetupError as e:
        if os.environ.get("CI") or os.geteuid() == 0:
            raise
        skip_unless_ci(f"nested runner prerequisites missing: {e}")
    proj = tmp_path / "a project"
    proj.mkdir()
    (proj / "pyproject.toml").write_text("")
    src = str(Path(nested.__file__).parents[2])
    probe = (
        "import fcntl, os, sys\n"
        "fd = os.open('/dev/kvm', os.O_RDWR)\n"
        "print('fcntl SMM=%d' % fcntl.ioctl(fd, 0xAE03, 117))\n"
        f"sys.path.insert(0, {src!r})\n"
        "from pyvmm import Kvm, Cap\n"
        "with Kvm() as kvm:\n"
        "    print('pyvmm SMM=%d' % kvm.check_extension(Cap.X86_SMM))\n"
        "open('written inside.txt', 'w').write(os.environ['PYVMM_NESTED'])\n"
        "open(os.environ['PYVMM_PASSED'], 'w').write('{}')\n"
        "sys.exit(3)\n")
    result = nested.run_nested(["python", "-c", probe], cwd=proj, timeout=600, stream=None,
                               env={"PYVMM_PASSED": "out/passed.json"})
    print(result.console)
    print(result.summary())
    assert result.kvm_module == "kvm_amd"
    assert result.caps["SMM"] == 1 and result.caps["MULTI_ADDRESS_SPACE"] == 2
    assert "fcntl SMM=1" in result.output and "pyvmm SMM=1" in result.output
    assert result.returncode == 3, result.console
    assert (proj / "written inside.txt").read_text() == "1"
    assert (proj / "out" / "passed.json").read_text() == "{}"
    assert 0 < result.boot_s < 120 and result.command_s > 0


def test_check_skips_names_tests_no_kvm_here_can_run():
    # Skipped on both kernels for a capability newer than the nested runner's: run nowhere,
    # reported, not a failure; the same skip for SMM (which the runner must have) still fails.
    local = {"skipped": {"t::gmem": ["GUEST_MEMFD"], "t::smm": ["X86_SMM"]}}
    both = {"passed": [], "skipped": {"t::gmem": "no GUEST_MEMFD", "t::smm": "no SMM"}}
    ok, lines = nested.check_skips(local, both)
    assert not ok
    assert "ran on neither KVM: t::gmem (needs GUEST_MEMFD" in lines[0]
    assert lines[1].startswith("SKIPPED in the nested run too: t::smm")
    ok, lines = nested.check_skips({"skipped": {"t::gmem": ["GUEST_MEMFD"]}}, both)
    assert ok and "1 ran on neither KVM" in lines[-1]
    # Not run at all in the nested run (deselected): still a failure.
    ok, _ = nested.check_skips({"skipped": {"t::gmem": ["GUEST_MEMFD"]}}, {"passed": []})
    assert not ok
