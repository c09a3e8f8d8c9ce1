"""A real device farm: TVM's own RPC tracker on loopback with two of TVM's RPC servers for
this host's CPU registered under one key, all subprocesses on free ports, each in its own
process group (killed whole at the end, or mid-run by a test). Through it:

- convert verifies a tvm-llvm library on the server the tracker gave out, and the
  manifest names that server; bench times there;
- a device that dies mid-run is replaced by the other one (failover), in the library API
  and in a convert run; the last one dying gives exit 43 with the artifact kept (slow);
- a request made while both devices are busy queues (it does not fail), says so on stderr,
  gets the device released first, and gives up after --rpc-timeout with exit 42;
- MetaSchedule tunes over the tracker with its RPC runner (slow).

Servers log each session ("connected from", "load_module PATH"): the tests read those
logs to tell on which server something ran."""
from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tvm")
import tornado  # noqa: E402,F401  TVM's tracker needs it (a test dependency: fail, never skip, without it)

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "benchmarks" / "baselines" / "resnet20-struct-c2n2.safetensors"
ARCH = "resnet20-struct-c2n2"
KEY = "structexport-farm"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def structexport(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "structexport", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


class Background:
    """``python -m structexport ...`` in the background, its stderr collected line by line."""

    def __init__(self, *args):
        self.proc = subprocess.Popen([sys.executable, "-m", "structexport", *map(str, args)], cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)
        self.stderr: list[str] = []
        self.stdout = ""
        self._readers = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_err(self):
        for line in self.proc.stderr:
            self.stderr.append(line)

    def _read_out(self):
        self.stdout = self.proc.stdout.read()

    def wait_for_stderr(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.stderr):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.wait(5)
                pytest.fail(f"no {text!r} on stderr (exit {self.proc.returncode}):\n{self.output}")
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        rc = self.proc.wait(timeout=timeout)
        for reader in self._readers:
            reader.join(10)
        return rc

    @property
    def output(self) -> str:
        return self.stdout + "".join(self.stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


class Farm:
    """The tracker and its servers. ``servers`` maps ``127.0.0.1:PORT`` to its process."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.port = free_port()
        self.tracker = f"127.0.0.1:{self.port}"
        self.procs: list[subprocess.Popen] = []
        self.servers: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def _spawn(self, args, log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start(self) -> None:
        """The tracker, listening (servers started before it would retry only every 5 s)."""
        self._spawn(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(self.port),
                     "--port-end", str(self.port + 1)], self.folder / "tracker.log")
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("TVM's RPC tracker did not start within 60 s: "
                                + (self.folder / "tracker.log").read_text()[-2000:])
                time.sleep(0.2)

    def start_server(self) -> str:
        port = free_port()
        address = f"127.0.0.1:{port}"
        self.logs[address] = self.folder / f"server-{port}.log"
        self.servers[address] = self._spawn(
            ["tvm.exec.rpc_server", "--tracker", self.tracker, "--key", KEY, "--host", "127.0.0.1",
             "--port", str(port), "--port-end", str(port + 1)], self.logs[address])
        return address

    def summary(self) -> dict:
        """The tracker's summary, asked with TVM's own client (not structexport's)."""
        from tvm.rpc.base import RPC_TRACKER_MAGIC, TrackerCode, recvall, recvjson, sendjson
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        try:
            sock.sendall(struct.pack("<i", RPC_TRACKER_MAGIC))
            assert struct.unpack("<i", recvall(sock, 4))[0] == RPC_TRACKER_MAGIC
            sendjson(sock, [TrackerCode.SUMMARY])
            code, summary = recvjson(sock)
            assert code == TrackerCode.SUCCESS
            return summary
        finally:
            sock.close()

    def registered(self) -> list[str]:
        return sorted(":".join(map(str, s["addr"])) for s in self.summary()["server_info"]
                      if s["key"] == f"server:{KEY}")

    def free(self) -> int:
        return self.summary()["queue_info"].get(KEY, {}).get("free", 0)

    def ready(self, n: int = 2, timeout: float = 90) -> list[str]:
        """``n`` live servers, all registered and free (dead ones replaced, extra ones killed)."""
        for address, proc in list(self.servers.items()):
            if proc.poll() is not None:
                del self.servers[address]
        while len(self.servers) > n:
            self.kill(sorted(self.servers)[-1])
        while len(self.servers) < n:
            self.start_server()
        deadline = time.monotonic() + timeout
        while True:
            if self.registered() == sorted(self.servers) and self.free() == n:
                return sorted(self.servers)
            if time.monotonic() > deadline:
                pytest.fail(f"the farm did not get {n} free servers within {timeout:g} s: "
                            f"{self.summary()}")
            time.sleep(0.2)

    def kill(self, address: str) -> None:
        proc = self.servers.pop(address)
        os.killpg(proc.pid, signal.SIGKILL)  # the server and its session process
        proc.wait(timeout=30)

    def marks(self) -> dict[str, int]:
        return {a: log.stat().st_size if log.exists() else 0 for a, log in self.logs.items()}

    def since(self, marks: dict[str, int]) -> dict[str, str]:
        """What each server logged after ``marks``."""
        out = {}
        for address, log in self.logs.items():
            data = log.read_bytes() if log.exists() else b""
            out[address] = data[marks.get(address, 0):].decode(errors="replace")
        return out

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def farm(request, tmp_path_factory):
    farm = Farm(tmp_path_factory.mktemp("farm"))
    request.addfinalizer(farm.close)  # before anything starts: a failed start is torn down too
    farm.start()
    farm.ready(2)
    return farm


def hold_both(farm):
    """Both devices taken by sessions of TVM's own tracker client; release with ``del``."""
    from tvm import rpc
    tracker = rpc.connect_tracker("127.0.0.1", farm.port)
    held = [tracker.request(KEY, session_timeout=300) for _ in range(2)]
    assert farm.free() == 0
    return held


def release(held: list, index: int = 0) -> None:
    held.pop(index)
    gc.collect()


def load_lines(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if "load_module" in ln]


@pytest.fixture(scope="module")
def converted(farm, tmp_path_factory):
    """resnet20-struct-c2n2 converted for tvm-llvm and verified through the tracker."""
    farm.ready(2)
    out = tmp_path_factory.mktemp("tracker") / "r20"
    marks = farm.marks()
    start = time.monotonic()
    res = structexport("convert", CKPT, "--arch", ARCH, "--target", "tvm-llvm",
                       "--tracker", farm.tracker, "--key", KEY, "-o", out)
    seconds = time.monotonic() - start
    return out, res, farm.since(marks), seconds


# ---------------------------------------------------------------- 1. convert, 2. bench

def test_convert_through_the_tracker_verifies_on_the_server_it_was_given(farm, converted):
    out, res, logs, _ = converted
    assert res.returncode == 0, res.stdout + res.stderr
    m = json.loads((out / "manifest.json").read_text())
    served = m["device"]["served_by"]
    assert served in logs, (served, list(logs))
    assert m["device"] == {"address": farm.tracker, "key": KEY, "emulated": False, "tracker": True,
                           "served_by": served}
    tv = m["target_verification"]
    assert tv["passed"] is True and len(tv["checks"]) == 3
    assert tv["max_abs_diff"] <= 1e-4
    assert tv["runtime"] == f"TVM VM, model.so on device {served} (key '{KEY}', from the tracker at {farm.tracker})"
    # It ran on that server (its log shows the upload loaded), and on no other one.
    assert any("structexport-" in ln and ln.endswith("-model.so") for ln in load_lines(logs[served])), logs[served]
    assert all(not load_lines(log) for a, log in logs.items() if a != served)
    # The artifact is the one the manifest describes.
    so = (out / "model.so").read_bytes()
    assert so[:4] == b"\x7fELF"
    assert hashlib.sha256(so).hexdigest() == m["artifacts"]["model.so"]["sha256"]


def test_the_library_from_the_farm_computes_the_source_models_outputs(farm, converted):
    """Numerically, on a device from the tracker: the stored source-model outputs."""
    from structexport.rpc import LoadedLibrary, parse_device
    out = converted[0]
    data = np.load(out / "verification.npz")
    spec = parse_device(tracker=farm.tracker, key=KEY, timeout_s=60)
    lib = LoadedLibrary(out / "model.so", spec)
    assert lib.served_by in farm.servers
    for i in range(3):
        got = lib.run(data[f"input/random:{i}"])[0]
        np.testing.assert_allclose(got, data[f"output/random:{i}/0"], atol=1e-4, rtol=1e-4)
    del lib
    gc.collect()


def test_bench_through_the_tracker_times_on_the_server_it_was_given(farm, converted, tmp_path):
    out = converted[0]
    farm.ready(2)
    marks = farm.marks()
    res = structexport("bench", out, "--tracker", farm.tracker, "--key", KEY, "--repeat", 5,
                       "--warmup", 1, "--json", tmp_path / "b.json")
    assert res.returncode == 0, res.stdout + res.stderr
    r = json.loads((tmp_path / "b.json").read_text())
    device = r["device"]
    assert device["address"] == farm.tracker and device["key"] == KEY and device["tracker"] is True
    assert device["served_by"] in farm.servers
    assert r["target"] == "tvm-llvm" and r["emulated"] is False
    assert r["latency_ms"]["runs"] == 5 and r["dense_latency_ms"]["runs"] == 5
    assert 0 < r["latency_ms"]["median"] < r["dense_latency_ms"]["median"]  # 4.3x fewer MACs
    logs = farm.since(marks)
    # Both libraries in one session on that server: the structured one and the dense one.
    assert len(load_lines(logs[device["served_by"]])) == 2, logs
    assert all(not load_lines(log) for a, log in logs.items() if a != device["served_by"])


def test_a_key_the_tracker_lacks_or_an_address_that_is_no_tracker_fails_at_once(farm):
    """``probe`` (every TVM target's preflight, before any work) asks the tracker itself."""
    from structexport.errors import DeviceUnreachableError
    from structexport.rpc import parse_device, probe
    (server, *_) = farm.ready(2)
    start = time.monotonic()
    with pytest.raises(DeviceUnreachableError) as info:
        probe(parse_device(tracker=farm.tracker, key="rpi9"))
    assert info.value.exit_code == 42
    assert str(info.value) == (f"the tracker at {farm.tracker} has no 'rpi9' device (it has '{KEY}') "
                               f"(check --key, or register one: python -m tvm.exec.rpc_server "
                               f"--tracker {farm.tracker} --key rpi9)")
    with pytest.raises(DeviceUnreachableError) as info:  # a device's own server, not a tracker
        probe(parse_device(tracker=server, key=KEY))
    assert info.value.message == (f"cannot reach the tracker at {server} (key '{KEY}'): it does not "
                                  "answer as a TVM RPC tracker")
    assert f"--rpc {server}" in info.value.hint
    assert time.monotonic() - start < 30
    probe(parse_device(tracker=farm.tracker, key=KEY))  # the farm's own key: no error
    farm.ready(2)  # the server that was probed as a tracker still serves


# ---------------------------------------------------------------- 3. a busy farm queues

def test_a_request_queues_while_both_devices_are_busy_and_gets_the_first_released(farm, capfd):
    from structexport.rpc import connect, parse_device
    farm.ready(2)
    held = hold_both(farm)
    spec = parse_device(tracker=farm.tracker, key=KEY, timeout_s=120)
    box: dict = {}

    def request():
        try:
            box["session"] = connect(spec)
        except Exception as exc:  # noqa: BLE001 - reported by the asserts below
            box["error"] = exc
    thread = threading.Thread(target=request, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(4)
    assert thread.is_alive() and not box, box          # queued, not failed
    assert farm.summary()["queue_info"][KEY]["pending"] == 1
    marks = farm.marks()
    release(held)
    thread.join(60)
    waited = time.monotonic() - start
    assert "session" in box, box
    assert waited >= 4
    got = spec.served["address"]
    assert "finish serving" in farm.since(marks)[got]  # the one released is the one given out
    err = capfd.readouterr().err
    assert (f"waiting for a free '{KEY}' device: the tracker at {farm.tracker} has 2 "
            f"({', '.join(sorted(farm.servers))}), all busy; giving up after --rpc-timeout 120 s") in err
    assert f"got the '{KEY}' device {got} after" in err
    box.clear()
    held.clear()
    gc.collect()


def test_bench_waits_for_a_busy_farm_and_gives_up_after_rpc_timeout(farm, converted, tmp_path):
    """Two bench runs while both devices are held: one with --rpc-timeout 5 gives up (42,
    one line naming the fix) and its cancelled request takes no device; the other waits and
    times on the device released first."""
    out = converted[0]
    farm.ready(2)
    held = hold_both(farm)
    try:
        impatient = Background("bench", out, "--tracker", farm.tracker, "--key", KEY, "--repeat", 3,
                               "--warmup", 0, "--rpc-timeout", 5)
        patient = Background("bench", out, "--tracker", farm.tracker, "--key", KEY, "--repeat", 3,
                             "--warmup", 0, "--rpc-timeout", 240, "--json", tmp_path / "b.json")
        for run in (impatient, patient):
            run.wait_for_stderr(f"waiting for a free '{KEY}' device", 180)
        assert impatient.wait(60) == 42, impatient.output
        errors = [ln for ln in impatient.stderr if ln.startswith("error:")]
        assert errors == [f"error: no '{KEY}' device came free at the tracker at {farm.tracker} within "
                          f"--rpc-timeout 5 s (2 registered, {', '.join(sorted(farm.servers))}: all busy) "
                          f"(raise --rpc-timeout, or free one (python -m tvm.exec.query_rpc_tracker "
                          f"--host 127.0.0.1 --port {farm.port} shows the queue))\n"], impatient.output
        assert patient.proc.poll() is None  # still waiting
        marks = farm.marks()
        release(held)
        assert patient.wait(120) == 0, patient.output
    finally:
        impatient.kill()
        patient.kill()
    r = json.loads((tmp_path / "b.json").read_text())
    got = r["device"]["served_by"]
    logs = farm.since(marks)
    assert "finish serving" in logs[got] and len(load_lines(logs[got])) == 2
    assert any(f"got the '{KEY}' device {got} after" in ln for ln in patient.stderr)
    assert r["latency_ms"]["runs"] == 3
    # The impatient run's request died with its connection: the released device went to the
    # patient run, and with everything released the farm is whole again.
    held.clear()
    gc.collect()
    farm.ready(2)
    assert farm.summary()["queue_info"][KEY]["pending"] == 0


# ---------------------------------------------------------------- 4. a device dies mid-run

def test_a_library_fails_over_to_the_other_device_when_its_own_dies(farm, converted, capfd):
    from structexport.rpc import LoadedLibrary, parse_device
    out = converted[0]
    farm.ready(2)
    data = np.load(out / "verification.npz")
    x, expected = data["input/random:0"], data["output/random:0/0"]
    spec = parse_device(tracker=farm.tracker, key=KEY, timeout_s=60)
    lib = LoadedLibrary(out / "model.so", spec)
    first = lib.served_by
    np.testing.assert_allclose(lib.run(x)[0], expected, atol=1e-4, rtol=1e-4)
    farm.kill(first)
    np.testing.assert_allclose(lib.run(x)[0], expected, atol=1e-4, rtol=1e-4)
    (second,) = farm.servers
    assert lib.served_by == second != first and lib.failovers == 1
    assert spec.to_dict()["served_by"] == second and spec.to_dict()["lost"] == [first]
    assert (f"the '{KEY}' device {first} stopped answering during a run; failing over to another "
            f"'{KEY}' device from the tracker at {farm.tracker}") in capfd.readouterr().err
    del lib
    gc.collect()


def test_convert_fails_over_when_its_device_dies_mid_run(farm, tmp_path):
    farm.ready(2)
    out = tmp_path / "r20"
    marks = farm.marks()
    run = Background("convert", CKPT, "--arch", ARCH, "--target", "tvm-llvm",
                     "--tracker", farm.tracker, "--key", KEY, "-o", out)
    try:
        killed, deadline = None, time.monotonic() + 240
        while killed is None:  # the verification's library is loading: kill its server
            for address, log in farm.since(marks).items():
                if load_lines(log):
                    killed = address
                    break
            else:
                assert run.proc.poll() is None, run.output
                assert time.monotonic() < deadline, "convert never connected to a server"
                time.sleep(0.02)
        farm.kill(killed)
        rc = run.wait(240)
    finally:
        run.kill()
    assert rc == 0, run.output
    (other,) = farm.servers
    m = json.loads((out / "manifest.json").read_text())
    assert m["device"]["served_by"] == other and m["device"].get("lost") == [killed], run.output
    assert m["target_verification"]["passed"] is True and m["target_verification"]["max_abs_diff"] <= 1e-4
    assert load_lines(farm.since(marks)[other]), "the library was not loaded on the other server"
    notice = f"the '{KEY}' device {killed} stopped answering during "
    assert notice in run.output and "failing over to another" in run.output
    if f"{notice}loading the library" in run.output:  # the usual moment: the upload
        # (died during a run: the runtime line is the one computed before it; see the report)
        assert f"model.so on device {other} " in m["target_verification"]["runtime"]


def test_a_library_whose_last_device_dies_raises_device_lost_43_naming_the_fix(farm, converted):
    from structexport.errors import DeviceLostError
    from structexport.rpc import LoadedLibrary, parse_device
    out = converted[0]
    (only,) = farm.ready(1)
    x = np.load(out / "verification.npz")["input/random:0"]
    spec = parse_device(tracker=farm.tracker, key=KEY, timeout_s=60)
    lib = LoadedLibrary(out / "model.so", spec)
    assert lib.served_by == only
    assert lib.run(x)[0].shape == (1, 10)
    farm.kill(only)
    with pytest.raises(DeviceLostError) as info:
        lib.run(x)
    err = info.value
    assert err.exit_code == 43
    assert err.message.startswith(f"the device {only} (key '{KEY}', from the tracker at {farm.tracker}) "
                                  "stopped answering during a run: ")
    assert f"no other '{KEY}' device to fail over to: the tracker at {farm.tracker} has no '{KEY}' device" in err.message
    assert f"python -m tvm.exec.rpc_server --tracker {farm.tracker} --key {KEY}" in err.hint
    assert "\n" not in str(err)
    del lib
    gc.collect()


@pytest.mark.slow
def test_convert_whose_only_device_dies_exits_43_and_keeps_the_verified_artifact(farm, tmp_path):
    (only,) = farm.ready(1)                  # a farm of one
    out = tmp_path / "r20"
    marks = farm.marks()
    run = Background("convert", CKPT, "--arch", ARCH, "--target", "tvm-llvm",
                     "--tracker", farm.tracker, "--key", KEY, "-o", out)
    try:
        deadline = time.monotonic() + 240
        while not load_lines(farm.since(marks)[only]):
            assert run.proc.poll() is None, run.output
            assert time.monotonic() < deadline
            time.sleep(0.02)
        farm.kill(only)
        rc = run.wait(240)
    finally:
        run.kill()
    assert rc == 43, run.output
    errors = [ln for ln in run.stderr if ln.startswith("error:")]
    assert len(errors) == 1, run.output
    line = errors[0]
    assert f"the device {only} (key '{KEY}', from the tracker at {farm.tracker}) stopped answering" in line
    assert f"no other '{KEY}' device to fail over to" in line
    assert f"{out} holds the built artifact, verified under ONNX Runtime but not on the device" in line
    assert f"python -m tvm.exec.rpc_server --tracker {farm.tracker} --key {KEY}" in line
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["passed"] is True
    assert m["target_verification"]["passed"] is None
    assert "stopped answering" in m["target_verification"]["skipped"]
    assert hashlib.sha256((out / "model.so").read_bytes()).hexdigest() == m["artifacts"]["model.so"]["sha256"]


# ---------------------------------------------------------------- 5. tuning over the tracker

@pytest.mark.slow
def test_tuning_over_the_tracker_measures_with_metaschedules_rpc_runner(farm, tmp_path):
    farm.ready(2)
    out = tmp_path / "tuned"
    marks = farm.marks()
    res = structexport("convert", CKPT, "--arch", ARCH, "--target", "tvm-llvm", "--tracker", farm.tracker,
                       "--key", KEY, "-o", out, "--tune-trials", 4, "--tuning-db", tmp_path / "db",
                       timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    m = json.loads((out / "manifest.json").read_text())
    tu = m["target_build"]["tuning"]
    assert tu["measured_on"] == f"'{KEY}' device from the tracker at {farm.tracker}"
    assert tu["trials_run"] >= 4 and tu["trials_failed"] < tu["trials_run"]
    tvm_target = m["target_build"]["tvm_target"]
    assert tvm_target["kind"] == "llvm" and tvm_target["num-cores"] == 1  # a remote device: one core
    records = (Path(tu["database"]) / "records.json").read_text().strip().splitlines()
    assert records
    assert m["target_verification"]["passed"] is True and m["target_verification"]["max_abs_diff"] <= 1e-4
    # The candidates ran on the farm's servers (MetaSchedule's runner uploads each one).
    candidates = [ln for log in farm.since(marks).values() for ln in load_lines(log)
                  if "structexport-" not in ln]
    assert len(candidates) >= tu["trials_run"] - tu["trials_failed"], farm.since(marks)
