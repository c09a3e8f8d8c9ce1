"""The emulated aarch64 device: install, start, run a cross-compiled library, find, stop.

Uses the session fixture ``emulated_arm`` (tests/conftest.py): the first run installs the
device into the cache (~2 min here), later runs reuse it.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from structexport import emulated_arm as emu
from structexport.errors import EmulatorError

EM_AARCH64 = 183  # ELF e_machine of AArch64


def _cli(*args, env=None, timeout=300):
    code = "from structexport.cli import run; run()"
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def _env_with_cache(cache: Path) -> dict:
    return {**os.environ, "STRUCTEXPORT_CACHE": str(cache)}


def _closed(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


def _who_listens(port: int) -> str:
    ss = subprocess.run(["ss", "-tlnp"], capture_output=True, text=True).stdout
    return f"port {port} still answers: " + " | ".join(ln for ln in ss.splitlines() if f":{port} " in ln)


@pytest.fixture
def side_cache(tmp_path, emulated_arm, monkeypatch):
    """A second cache root that shares the installed rootfs and wheels (symlinks) but has its
    own state: a device started there is independent of the session's one."""
    real = emu.cache_dir()
    side = tmp_path / "cache"
    (side / "emulated-arm").mkdir(parents=True)
    for name in ("rootfs", "site-packages", "installed.json"):
        (side / "emulated-arm" / name).symlink_to(real / name)
    monkeypatch.setenv("STRUCTEXPORT_CACHE", str(side))
    yield side
    emu.stop()


def test_install_is_complete_and_reused(emulated_arm):
    t0 = time.monotonic()
    path = emu.ensure_installed()
    assert time.monotonic() - t0 < 10, "a complete install must be reused, not redone"
    assert path == emu.cache_dir()
    info = emu.install_info()
    assert info["versions"]["machine"] == "aarch64"
    assert info["versions"]["tvm"] == "0.27.0.post1"
    assert info["versions"]["tvm_ffi"] == "0.1.14.post1"
    assert info["versions"]["python"].startswith("3.11.")
    assert (path / "rootfs/usr/bin/python3.11").is_file()
    assert os.access(path / "bin/python3-aarch64", os.X_OK)
    assert emu.cross_compiler_path() == shutil.which("aarch64-linux-gnu-g++") is not None
    assert emu.ensure_cross_compiler() == emu.cross_compiler_path()


def test_device_reports_aarch64(emulated_arm):
    assert emulated_arm.emulated is True
    assert emulated_arm.address == f"127.0.0.1:{emulated_arm.port}"
    info = emu.device_info(emulated_arm)
    assert info["machine"] == "aarch64"
    assert info["emulated"] is True
    assert info["python"].startswith("3.11.")
    assert os.uname().machine != "aarch64"  # ... while this host is not


def test_cross_compiled_relax_function_runs_on_the_device(emulated_arm, tmp_path):
    import tvm
    from tvm import relax, rpc
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.support import cc

    @I.ir_module
    class Module:
        @R.function
        def main(x: R.Tensor((4, 8), "float32"), w: R.Tensor((8, 3), "float32")):
            with R.dataflow():
                y = R.nn.relu(R.add(R.matmul(x, w), R.const(0.5, "float32")))
                R.output(y)
            return y

    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})
    lib_path = tmp_path / "tiny_aarch64.so"
    tvm.compile(Module, target=target).export_library(
        str(lib_path), fcompile=cc.cross_compiler(emu.ensure_cross_compiler()))
    header = lib_path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64
    with pytest.raises(Exception):  # an aarch64 library cannot load on this x86 host
        tvm.runtime.load_module(str(lib_path))

    remote = rpc.connect(emulated_arm.host, emulated_arm.port, session_timeout=120)
    remote.upload(str(lib_path))
    dev = remote.cpu()
    vm = relax.VirtualMachine(remote.load_module(lib_path.name), dev)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 8)).astype("float32")
    w = rng.standard_normal((8, 3)).astype("float32")
    got = vm["main"](tvm.runtime.tensor(x, dev), tvm.runtime.tensor(w, dev)).numpy()
    want = np.maximum(x @ w + 0.5, 0)
    assert got.shape == (4, 3)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (got == 0).any() and (got > 0).any()  # the relu did something both ways


def test_running_is_found_from_another_process(emulated_arm):
    code = ("import json; from structexport import emulated_arm as e; d = e.running(); "
            "print(json.dumps(d.to_dict() if d else None))")
    found = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True,
                                      text=True, check=True, timeout=60).stdout)
    assert found["pid"] == emulated_arm.pid and found["port"] == emulated_arm.port
    assert found["address"] == emulated_arm.address and found["emulated"] is True


def test_start_while_running_returns_the_running_device(emulated_arm):
    assert emu.start() == emulated_arm
    assert emu.start(port=emulated_arm.port) == emulated_arm
    with pytest.raises(EmulatorError, match="already runs at"):
        emu.start(port=emulated_arm.port + 1 if emulated_arm.port < 65535 else 1024)


def test_cli_status_json_of_the_running_device(emulated_arm):
    done = _cli("device", "status", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["running"] is True and report["installed"] is True
    assert report["address"] == emulated_arm.address and report["pid"] == emulated_arm.pid
    assert report["emulated"] is True and report["uptime_s"] >= 0


def test_cli_start_stop_status_in_a_separate_cache(side_cache):
    env = _env_with_cache(side_cache)
    started = _cli("device", "start-emulated-arm", env=env)
    assert started.returncode == 0, started.stderr
    address = started.stdout.strip().splitlines()[-1]
    host, port = address.rsplit(":", 1)
    assert host == "127.0.0.1" and port.isdigit()
    assert "not ARM latency" in started.stderr
    device = emu.running()  # this process sees it too (same STRUCTEXPORT_CACHE)
    assert device is not None and device.port == int(port)
    assert emu.device_info(device)["machine"] == "aarch64"

    stopped = _cli("device", "stop", env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stderr
    assert _closed(int(port)), _who_listens(int(port))
    assert not emu._pid_alive(device.pid) and not emu._group_alive(device.pid)
    assert emu.running() is None
    assert not (side_cache / "emulated-arm" / "device.json").exists()


def test_api_stop_ends_the_device_and_closes_its_port(side_cache):
    with emu.temporary_device() as device:
        assert emu.running() == device
        pid, port = device.pid, device.port
    # temporary_device started it, so it stopped it
    assert not emu._pid_alive(pid) and not emu._group_alive(pid)
    assert _closed(port), _who_listens(port)
    assert emu.running() is None and emu.stop() is False


def test_cli_with_nothing_running(tmp_path):
    env = _env_with_cache(tmp_path / "empty")
    status = _cli("device", "status", "--json", env=env)
    assert status.returncode == 3, status.stderr
    report = json.loads(status.stdout)
    assert report == {"running": False, "emulated": True, "installed": False,
                      "cache": str(tmp_path / "empty" / "emulated-arm")}
    text = _cli("device", "status", env=env)
    assert text.returncode == 3 and "no emulated aarch64 device is running" in text.stdout
    stop = _cli("device", "stop", env=env)
    assert stop.returncode == 0
    assert stop.stderr.strip() == "no emulated aarch64 device is running (nothing to stop)"


def test_start_when_not_installed_is_exit_45(tmp_path):
    done = _cli("device", "start-emulated-arm", env=_env_with_cache(tmp_path / "empty"))
    assert done.returncode == 45
    lines = done.stderr.strip().splitlines()
    assert lines == ["error: the emulated aarch64 device is not installed "
                     "(run `structexport device setup-emulated-arm`)"]


def test_start_with_a_broken_rootfs_is_exit_45_in_one_line(tmp_path, emulated_arm):
    broken = tmp_path / "broken" / "emulated-arm"
    broken.mkdir(parents=True)
    shutil.copy(emu.cache_dir() / "installed.json", broken / "installed.json")  # a fake marker
    done = _cli("device", "start-emulated-arm", "--timeout", "60",
                env=_env_with_cache(tmp_path / "broken"))
    assert done.returncode == 45, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "exited during start-up" in lines[0]
    assert "setup-emulated-arm --force" in lines[0]
    assert done.stdout == ""
    assert not (broken / "device.json").exists()  # nothing left behind


def test_install_without_root_names_the_apt_get_command(monkeypatch):
    monkeypatch.setattr(emu.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(emu.shutil, "which", lambda name: None if name == "sudo" else "/usr/bin/" + name)
    with pytest.raises(EmulatorError) as info:
        emu._apt_install(["qemu-user-static", "debootstrap"], EmulatorError)
    assert str(info.value) == ("installing Debian packages needs root: run `apt-get install -y "
                               "--no-install-recommends qemu-user-static debootstrap` as root "
                               "(then run this again)")
    assert info.value.exit_code == 45
