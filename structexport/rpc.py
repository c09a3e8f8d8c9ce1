"""Devices reached through TVM's RPC: one code path for this host, a device on the network
(``--rpc HOST:PORT``), a device farm (``--tracker HOST:PORT --key KEY``) and the emulated
aarch64 device (``structexport device start-emulated-arm``).

Every remote step runs under :func:`device_errors`, which turns a refused connection into
:class:`DeviceUnreachableError` (exit 42) and a device that stops answering mid-run into
:class:`DeviceLostError` (exit 43), each one line that names the device and the fix.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from structexport.errors import DeviceLostError, DeviceUnreachableError, StructExportError

DEFAULT_SESSION_TIMEOUT_S = 900.0
CONNECT_TIMEOUT_S = 10.0


class DeviceSpecError(StructExportError):
    exit_code, kind = 2, "usage"


@dataclass(frozen=True)
class DeviceSpec:
    """Where a TVM library runs. ``host`` None means this machine, in this process."""
    host: str | None = None
    port: int | None = None
    key: str | None = None          # set: ``host:port`` is a tracker, ask it for ``key``
    emulated: bool = False
    session_timeout_s: float = DEFAULT_SESSION_TIMEOUT_S

    @property
    def remote(self) -> bool:
        return self.host is not None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}" if self.remote else "local"

    def describe(self) -> str:
        if not self.remote:
            return "this host"
        kind = "emulated aarch64 device" if self.emulated else "device"
        via = f" (tracker key {self.key!r})" if self.key else ""
        return f"{kind} at {self.address}{via}"

    def to_dict(self) -> dict:
        return {"address": self.address, "key": self.key, "emulated": self.emulated,
                "tracker": bool(self.key)}


def _host_port(value: str, flag: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DeviceSpecError(f"bad {flag} {value!r}", f"write it as HOST:PORT, e.g. {flag} 127.0.0.1:9090")
    return host, int(port)


def parse_device(rpc: str | None = None, tracker: str | None = None, key: str | None = None,
                 timeout_s: float | None = None, emulated: bool = False) -> DeviceSpec | None:
    """``--rpc`` / ``--tracker`` + ``--key`` -> a :class:`DeviceSpec`, or None for neither."""
    if rpc and tracker:
        raise DeviceSpecError("--rpc and --tracker exclude each other", "pass one of them")
    if tracker and not key:
        raise DeviceSpecError("--tracker needs --key", "name the device kind, e.g. --key rpi4")
    if key and not tracker:
        raise DeviceSpecError("--key is only used with --tracker", "add --tracker HOST:PORT")
    timeout = timeout_s or DEFAULT_SESSION_TIMEOUT_S
    if rpc:
        host, port = _host_port(rpc, "--rpc")
        return DeviceSpec(host, port, None, emulated or _is_emulated(host, port), timeout)
    if tracker:
        host, port = _host_port(tracker, "--tracker")
        return DeviceSpec(host, port, key, emulated, timeout)
    return None


def _is_emulated(host: str, port: int) -> bool:
    """Whether ``host:port`` is the emulated device this machine started."""
    try:
        from structexport import emulated_arm
        dev = emulated_arm.running()
    except Exception:
        return False
    return bool(dev) and dev.port == port and host in ("127.0.0.1", "localhost", dev.host)


def _unreachable(spec: DeviceSpec, why: str) -> DeviceUnreachableError:
    hint = ("is its RPC server running? start one with `structexport device start-emulated-arm`"
            if spec.emulated or spec.host in ("127.0.0.1", "localhost")
            else "check the address and that the device's RPC server (python -m tvm.exec.rpc_server) "
                 "is running and reachable")
    return DeviceUnreachableError(f"cannot reach the {spec.describe()}: {why}", hint)


def probe(spec: DeviceSpec) -> None:
    """Fail fast, with a clear line, when nothing listens at the address."""
    try:
        with socket.create_connection((spec.host, spec.port), timeout=CONNECT_TIMEOUT_S):
            pass
    except socket.timeout:
        raise _unreachable(spec, f"no answer within {CONNECT_TIMEOUT_S:g} s") from None
    except OSError as exc:
        raise _unreachable(spec, exc.strerror or type(exc).__name__) from None


def _with_deadline(fn: Callable, seconds: float, spec: DeviceSpec, what: str):
    """Run ``fn`` in a thread; a hung handshake becomes an error instead of a hang."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise _unreachable(spec, f"{what} did not finish within {seconds:g} s")
    if "error" in box:
        raise _unreachable(spec, f"{what} failed: {_first_line(box['error'])}")
    return box["value"]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # TVM errors end with the useful line; Python ones start with it.
    line = (lines[-1] if "Traceback" in text else lines[0]) if lines else type(exc).__name__
    return line.strip()[:200]


def connect(spec: DeviceSpec):
    """An RPC session to ``spec`` (raises :class:`DeviceUnreachableError`)."""
    from tvm import rpc
    probe(spec)
    if spec.key:
        tracker = _with_deadline(lambda: rpc.connect_tracker(spec.host, spec.port),
                                 CONNECT_TIMEOUT_S * 3, spec, "connecting to the tracker")
        return _with_deadline(lambda: tracker.request(spec.key, priority=1,
                                                      session_timeout=spec.session_timeout_s),
                              spec.session_timeout_s, spec, f"waiting for a free {spec.key!r} device")
    return _with_deadline(lambda: rpc.connect(spec.host, spec.port,
                                              session_timeout=spec.session_timeout_s),
                          CONNECT_TIMEOUT_S * 6, spec, "the RPC handshake")


@contextlib.contextmanager
def device_errors(spec: DeviceSpec, what: str) -> Iterator[None]:
    """Errors of a remote step -> :class:`DeviceLostError` naming the device and the step."""
    try:
        yield
    except StructExportError:
        raise
    except Exception as exc:
        if not spec.remote:
            raise
        if "RPCSessionTimeoutError" in str(exc) or "session has expired" in str(exc):
            hint = (f"the session ran into --rpc-timeout ({spec.session_timeout_s:g} s): raise it "
                     "for slow devices")
        else:
            hint = "check the device and run again" + (
                " (restart it with `structexport device stop` and `structexport device start-emulated-arm`)"
                if spec.emulated else "")
        raise DeviceLostError(f"the {spec.describe()} stopped answering during {what}: "
                              f"{_first_line(exc)}", hint) from None


class LoadedLibrary:
    """A TVM library loaded on a device, with its Relax VM: run it, time it."""

    def __init__(self, library: Path, spec: DeviceSpec | None, device_kind: str = "cpu",
                 session=None):
        import tvm
        from tvm import relax
        self.spec = spec or DeviceSpec()
        self._tvm = tvm
        with device_errors(self.spec, "loading the library"):
            if self.spec.remote:
                self.session = session or connect(self.spec)
                remote_name = f"structexport-{uuid.uuid4().hex[:8]}-{library.name}"
                self.session.upload(str(library), remote_name)
                module = self.session.load_module(remote_name)
                self.device = self.session.device(device_kind, 0)
            else:
                self.session = None
                module = tvm.runtime.load_module(str(library))
                self.device = tvm.device(device_kind, 0)
            self.vm = relax.VirtualMachine(module, self.device)

    def _tensor(self, x: np.ndarray):
        return self._tvm.runtime.tensor(np.ascontiguousarray(x), device=self.device)

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        with device_errors(self.spec, "a run"):
            out = self.vm["main"](self._tensor(x))
            return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]

    def timer(self, x: np.ndarray, number: int = 1) -> Callable[[], float]:
        """A function that runs ``main`` ``number`` times on the device and returns the
        mean seconds per run, timed on the device itself (no RPC round trip inside)."""
        arg = self._tensor(x)
        with device_errors(self.spec, "setting up the timer"):
            evaluator = self.vm.time_evaluator("main", self.device, number=number, repeat=1)

        def time_once() -> float:
            with device_errors(self.spec, "a timed run"):
                return float(evaluator(arg).results[0])
        return time_once


def open_session(spec: DeviceSpec):
    """One RPC session to share between libraries (a TVM RPC server serves one session at a
    time), or None for this host."""
    return connect(spec) if spec.remote else None


@contextlib.contextmanager
def default_device_for_arm(progress: Callable[[str], None] | None = None):
    """The emulated aarch64 device: the running one, or a temporary one when it is installed.
    A context manager yielding a :class:`DeviceSpec`, or a string saying why there is none."""
    try:
        from structexport import emulated_arm
    except ImportError:  # pragma: no cover - the module ships with the package
        yield "not run: no aarch64 device (pass --rpc HOST:PORT or --tracker HOST:PORT --key KEY)"
        return
    # STRUCTEXPORT_NO_EMULATOR=1: build only, never look for the emulated device.
    running = None if os.environ.get("STRUCTEXPORT_NO_EMULATOR") else emulated_arm.running()
    if running:
        yield DeviceSpec(running.host, running.port, None, True)
        return
    if os.environ.get("STRUCTEXPORT_NO_EMULATOR") or not emulated_arm.is_installed():
        yield ("not run: no aarch64 device here (pass --rpc HOST:PORT or --tracker HOST:PORT "
               "--key KEY, or install the emulated device with `structexport device setup-emulated-arm`)")
        return
    if progress:
        progress("starting the emulated aarch64 device")
    with emulated_arm.temporary_device() as dev:
        yield DeviceSpec(dev.host, dev.port, None, True)


def set_threads(spec, session, threads: int) -> None:
    """TVM's thread pool on the device (``--threads``), as ONNX Runtime's intra-op threads."""
    import tvm
    with device_errors(spec, "setting the thread count"):
        configure = (session.get_function("runtime.config_threadpool") if session is not None
                     else tvm.get_global_func("runtime.config_threadpool"))
        configure(1, threads)  # 1: big cores first, ``threads`` workers
