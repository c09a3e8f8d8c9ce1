"""Devices reached through TVM's RPC: one code path for this host, a device on the network
(``--rpc HOST:PORT``), a device farm (``--tracker HOST:PORT --key KEY``) and the emulated
aarch64 device (``structexport device start-emulated-arm``).

Every remote step runs under :func:`device_errors`, which turns a refused connection into
:class:`DeviceUnreachableError` (exit 42) and a device that stops answering mid-run into
:class:`DeviceLostError` (exit 43), each one line that names the device and the fix.

Through a tracker, :func:`connect` speaks the tracker's protocol itself (as TVM's
``TrackerSession.request`` does) so that it knows which server it was given (recorded in
``DeviceSpec.served``, shown by ``describe()`` and ``to_dict()``), fails at once for a key
no server is registered under, says on stderr when every device of the key is busy and
the request queues, and gives up after ``--rpc-timeout`` seconds, cancelling the request.
A :class:`LoadedLibrary` with a session of its own fails over to another device of the
same key when its device dies mid-run (TVM's ``request_and_run`` does the same).
"""
from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from structexport.errors import DeviceLostError, DeviceUnreachableError, StructExportError

DEFAULT_SESSION_TIMEOUT_S = 900.0
CONNECT_TIMEOUT_S = 10.0
WAIT_NOTICE_S = 1.0      # a tracker request unanswered this long is queued: say so
WAIT_RECHECK_S = 2.0     # while queued, check this often that the key still has devices
MAX_FAILOVERS = 2        # devices of a tracker key a LoadedLibrary may move to after its own dies


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
    # Through a tracker: the server it gave out last ("address") and those that died
    # mid-run ("lost"), filled in by connect() and LoadedLibrary's failover.
    served: dict = field(default_factory=dict, compare=False, repr=False)

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
        if self.key:
            got = self.served.get("address")
            if got:
                return f"{kind} {got} (key {self.key!r}, from the tracker at {self.address})"
            return f"{self.key!r} {kind} from the tracker at {self.address}"
        return f"{kind} at {self.address}"

    def to_dict(self) -> dict:
        out = {"address": self.address, "key": self.key, "emulated": self.emulated,
               "tracker": bool(self.key)}
        if self.key:
            out["served_by"] = self.served.get("address")
            if self.served.get("lost"):
                out["lost"] = list(self.served["lost"])
        return out


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


def _unreachable(spec: DeviceSpec, why: str, hint: str | None = None) -> DeviceUnreachableError:
    if spec.key:
        return DeviceUnreachableError(
            f"cannot reach the tracker at {spec.address} (key {spec.key!r}): {why}",
            hint or "check the address and that the tracker (python -m tvm.exec.rpc_tracker) is "
                    "running and reachable")
    hint = ("is its RPC server running? start one with `structexport device start-emulated-arm`"
            if spec.emulated or spec.host in ("127.0.0.1", "localhost")
            else "check the address and that the device's RPC server (python -m tvm.exec.rpc_server) "
                 "is running and reachable")
    return DeviceUnreachableError(f"cannot reach the {spec.describe()}: {why}", hint)


def _dup_stderr() -> int | None:
    try:
        return os.dup(2)
    except OSError:
        return None


# The process's stderr as it was when this module was imported (the CLI imports it while
# parsing options): notices still reach it while fd 2 is pointed at /dev/null for a moment
# (the TVM targets silence the C++ runtime's log that way while a library loads).
_STDERR_FD = _dup_stderr()


def _silenced(fd: int) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(os.devnull))
    except OSError:
        return False


def _notify(message: str, progress: Callable[[str], None] | None = None) -> None:
    """A line the user must see even without a terminal (waiting, failing over): stderr,
    which the CLI's spinner redirects above itself; and ``progress`` when given."""
    if progress is not None:
        progress(message)
    stream = sys.stderr
    try:
        if (stream.fileno() == 2 and _STDERR_FD is not None and _silenced(2)
                and not _silenced(_STDERR_FD)):
            stream.flush()
            os.write(_STDERR_FD, (message + "\n").encode(errors="replace"))
            return
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        pass
    print(message, file=stream, flush=True)


def probe(spec: DeviceSpec) -> None:
    """Fail fast, with a clear line, when nothing listens at the address -- and, for a
    tracker, when it is no tracker or has no server registered under the key."""
    try:
        with socket.create_connection((spec.host, spec.port), timeout=CONNECT_TIMEOUT_S):
            pass
    except socket.timeout:
        raise _unreachable(spec, f"no answer within {CONNECT_TIMEOUT_S:g} s") from None
    except OSError as exc:
        raise _unreachable(spec, exc.strerror or type(exc).__name__) from None
    if spec.key:
        _registered(spec, tracker_summary(spec))


# ---------------------------------------------------------------- the tracker's protocol

def _tracker_socket(spec: DeviceSpec) -> socket.socket:
    """A connection to the tracker, past its handshake (``tvm.rpc.base``'s framing)."""
    from tvm.rpc import base
    try:
        sock = socket.create_connection((spec.host, spec.port), timeout=CONNECT_TIMEOUT_S)
    except socket.timeout:
        raise _unreachable(spec, f"no answer within {CONNECT_TIMEOUT_S:g} s") from None
    except OSError as exc:
        raise _unreachable(spec, exc.strerror or type(exc).__name__) from None
    try:
        sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
        magic = struct.unpack("<i", base.recvall(sock, 4))[0]
    except Exception:  # closed on us, or silent: an RPC server, or anything else
        magic = None
    if magic != base.RPC_TRACKER_MAGIC:
        sock.close()
        raise _unreachable(spec, "it does not answer as a TVM RPC tracker",
                           f"a device's own RPC server is reached with --rpc {spec.address}, "
                           "without --key; a tracker is python -m tvm.exec.rpc_tracker")
    return sock


def _tracker_call(spec: DeviceSpec, sock: socket.socket, message: list):
    from tvm.rpc import base
    try:
        base.sendjson(sock, message)
        value = base.recvjson(sock)
    except (OSError, RuntimeError) as exc:
        raise _unreachable(spec, f"the tracker closed the connection ({_first_line(exc)})") from None
    return value


def tracker_summary(spec: DeviceSpec) -> dict:
    """The tracker's ``{"queue_info": {key: {"free", "pending"}}, "server_info": [...]}``."""
    from tvm.rpc.base import TrackerCode
    sock = _tracker_socket(spec)
    try:
        value = _tracker_call(spec, sock, [TrackerCode.SUMMARY])
    finally:
        sock.close()
    if not isinstance(value, list) or value[0] != TrackerCode.SUCCESS:
        raise _unreachable(spec, f"unexpected answer to a summary request: {str(value)[:100]}")
    return value[1]


def tracker_servers(summary: dict, key: str) -> list[str]:
    """``HOST:PORT`` of the servers registered under ``key`` (free or busy)."""
    return sorted(":".join(str(a) for a in info.get("addr", ()))
                  for info in summary.get("server_info", []) if info.get("key") == f"server:{key}")


def _registered(spec: DeviceSpec, summary: dict) -> list[str]:
    servers = tracker_servers(summary, spec.key)
    if not servers:
        keys = sorted({info["key"].split(":", 1)[1] for info in summary.get("server_info", [])
                       if info.get("key", "").startswith("server:")})
        have = f"it has {', '.join(repr(k) for k in keys)}" if keys else "it has no devices at all"
        error = DeviceUnreachableError(
            f"the tracker at {spec.address} has no {spec.key!r} device ({have})",
            f"check --key, or register one: python -m tvm.exec.rpc_server --tracker {spec.address} "
            f"--key {spec.key}")
        error.reason = "no-device"
        raise error
    return servers


def _request_from_tracker(spec: DeviceSpec, progress: Callable[[str], None] | None = None):
    """A session on a ``spec.key`` device from the tracker: queued while all are busy (said
    on stderr), given up after ``spec.session_timeout_s`` (the request is cancelled)."""
    from tvm import rpc
    from tvm.rpc import base
    from tvm.rpc.base import TrackerCode
    start = time.monotonic()
    deadline = start + spec.session_timeout_s
    summary = tracker_summary(spec)
    servers = _registered(spec, summary)
    queue = summary.get("queue_info", {}).get(spec.key, {})
    sock = _tracker_socket(spec)
    waited = False
    last_error = None
    try:
        # A server given out but dead by the time we connect: ask again (TVM retries too).
        for _ in range(len(servers) + 2):
            base.sendjson(sock, [TrackerCode.REQUEST, spec.key, "", 1])
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    error = DeviceUnreachableError(
                        f"no {spec.key!r} device came free at the tracker at {spec.address} within "
                        f"--rpc-timeout {spec.session_timeout_s:g} s ({len(servers)} registered, "
                        f"{', '.join(servers)}: all busy)",
                        f"raise --rpc-timeout, or free one (python -m tvm.exec.query_rpc_tracker "
                        f"--host {spec.host} --port {spec.port} shows the queue)")
                    error.reason = "timeout"
                    raise error
                ready, _, _ = select.select([sock], [], [], min(left, WAIT_RECHECK_S if waited
                                                                else WAIT_NOTICE_S))
                if ready:
                    break
                if waited:  # every device of the key gone (died, deregistered): stop waiting
                    servers = _registered(spec, tracker_summary(spec))
                else:
                    waited = True
                    ahead = int(queue.get("pending", 0))
                    _notify(f"waiting for a free {spec.key!r} device: the tracker at {spec.address} has "
                            f"{len(servers)} ({', '.join(servers)}), all busy"
                            + (f", {ahead} request(s) queued before this one" if ahead else "")
                            + f"; giving up after --rpc-timeout {spec.session_timeout_s:g} s", progress)
            sock.settimeout(CONNECT_TIMEOUT_S)
            try:
                value = base.recvjson(sock)
            except (OSError, RuntimeError) as exc:
                raise _unreachable(spec, f"the tracker closed the connection ({_first_line(exc)})") from None
            if not isinstance(value, list) or value[0] != TrackerCode.SUCCESS:
                raise _unreachable(spec, f"unexpected answer to a device request: {str(value)[:100]}")
            url, port, matchkey = value[1]
            seconds = min(CONNECT_TIMEOUT_S * 6, max(1.0, deadline - time.monotonic()))
            session, why = _bounded(lambda u=url, p=port, k=matchkey: rpc.connect(
                u, p, k, session_timeout=spec.session_timeout_s), seconds)
            if session is None:
                last_error = DeviceUnreachableError(
                    f"the {spec.key!r} device {url}:{port} from the tracker at {spec.address} did not "
                    f"answer the RPC handshake: {why}",
                    "check the device, or run again: the tracker gives out another one")
                spec.served.setdefault("lost", []).append(f"{url}:{port}")
                _notify(f"the {spec.key!r} device {url}:{port} the tracker gave out did not answer "
                        f"({why}); asking the tracker for another", progress)
                continue
            spec.served["address"] = f"{url}:{port}"
            if waited:
                _notify(f"got the {spec.key!r} device {url}:{port} after "
                        f"{time.monotonic() - start:.0f} s of waiting", progress)
            return session
    finally:
        sock.close()  # an unanswered request dies with the connection
    raise last_error


def _run_bounded(fn: Callable, seconds: float) -> tuple:
    """``(value, error, timed_out)`` of ``fn()`` run in a thread for at most ``seconds`` (a
    hung handshake becomes an answer instead of a hang)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # reported in the caller's thread
            box["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    return box.get("value"), box.get("error"), thread.is_alive()


def _bounded(fn: Callable, seconds: float):
    """``(fn(), None)``, or ``(None, why)`` when it raised or ran past ``seconds``."""
    value, error, timed_out = _run_bounded(fn, seconds)
    if timed_out:
        return None, f"no answer within {seconds:g} s"
    if error is not None:
        return None, _first_line(error)
    return value, None


def _with_deadline(fn: Callable, seconds: float, spec: DeviceSpec, what: str):
    """Run ``fn`` in a thread; a hung handshake becomes an error instead of a hang."""
    value, error, timed_out = _run_bounded(fn, seconds)
    if timed_out:
        raise _unreachable(spec, f"{what} did not finish within {seconds:g} s")
    if error is not None:
        raise _unreachable(spec, f"{what} failed: {_first_line(error)}")
    return value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    # TVM errors end with the useful line; Python ones start with it.
    line = (lines[-1] if "Traceback" in text else lines[0]) if lines else type(exc).__name__
    return line.strip()[:200]


def connect(spec: DeviceSpec, progress: Callable[[str], None] | None = None):
    """An RPC session to ``spec`` (raises :class:`DeviceUnreachableError`)."""
    from tvm import rpc
    if spec.key:
        return _request_from_tracker(spec, progress)
    probe(spec)
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
        expired = "RPCSessionTimeoutError" in str(exc) or "session has expired" in str(exc)
        if expired:
            hint = (f"the session ran into --rpc-timeout ({spec.session_timeout_s:g} s): raise it "
                     "for slow devices")
        elif spec.key:
            hint = (f"check the device, or run again: the tracker at {spec.address} gives out "
                    f"another {spec.key!r} device")
        else:
            hint = "check the device and run again" + (
                " (restart it with `structexport device stop` and `structexport device start-emulated-arm`)"
                if spec.emulated else "")
        lost = DeviceLostError(f"the {spec.describe()} stopped answering during {what}: "
                               f"{_first_line(exc)}", hint)
        lost.session_expired = expired
        raise lost from None


def _session_alive(session) -> bool:
    """Whether an RPC session still answers (a remote call, bounded in time)."""
    _, error, timed_out = _run_bounded(lambda: session.get_function("tvm.rpc.server.upload"),
                                       CONNECT_TIMEOUT_S)
    return not timed_out and error is None


class LoadedLibrary:
    """A TVM library loaded on a device, with its Relax VM: run it, time it.

    Through a tracker, with a session of its own (``session`` not given), a device that
    dies while the library is loaded or run is replaced by another device of the same key
    (up to :data:`MAX_FAILOVERS` times; said on stderr, recorded in ``spec.served["lost"]``)
    and the step is run again there. Timed runs never fail over (a timing must come from
    one device), nor does a shared session (its other libraries are gone with it)."""

    def __init__(self, library: Path, spec: DeviceSpec | None, device_kind: str = "cpu",
                 session=None, progress: Callable[[str], None] | None = None):
        import tvm
        from tvm import relax
        self.spec = spec or DeviceSpec()
        self.library = Path(library)
        self.device_kind = device_kind
        self.failovers = 0
        self._tvm, self._relax = tvm, relax
        self._progress = progress
        self._own_session = session is None
        if self.spec.remote:
            try:
                with device_errors(self.spec, "loading the library"):
                    self._load_remote(session)
            except DeviceLostError as exc:
                self._fail_over(exc, "loading the library")
        else:
            with device_errors(self.spec, "loading the library"):
                self.session = None
                module = tvm.runtime.load_module(str(self.library))
                self.device = tvm.device(device_kind, 0)
                self.vm = relax.VirtualMachine(module, self.device)

    @property
    def served_by(self) -> str:
        """Where the library is loaded now: the server's address, or the spec's description."""
        return self.spec.served.get("address") or self.spec.describe()

    def _load_remote(self, session=None) -> None:
        self.session = session or connect(self.spec, self._progress)
        remote_name = f"structexport-{uuid.uuid4().hex[:8]}-{self.library.name}"
        self.session.upload(str(self.library), remote_name)
        module = self.session.load_module(remote_name)
        self.device = self.session.device(self.device_kind, 0)
        self.vm = self._relax.VirtualMachine(module, self.device)

    def _may_fail_over(self, exc: DeviceLostError) -> bool:
        return (bool(self.spec.key) and self._own_session and self.failovers < MAX_FAILOVERS
                and not getattr(exc, "session_expired", False)
                and not (getattr(self, "session", None) is not None and _session_alive(self.session)))

    def _fail_over(self, lost: DeviceLostError, what: str) -> None:
        """Load the library on another device of the key, or raise ``lost`` (exit 43)."""
        while True:
            if not self._may_fail_over(lost):
                raise lost
            self.failovers += 1
            gone = self.spec.served.pop("address", None)
            self.spec.served.setdefault("lost", []).append(gone)
            self.session = None
            _notify(f"the {self.spec.key!r} device {gone} stopped answering during {what}; "
                    f"failing over to another {self.spec.key!r} device from the tracker at "
                    f"{self.spec.address}", self._progress)
            try:
                with device_errors(self.spec, "loading the library"):
                    self._load_remote()
                return
            except DeviceUnreachableError as exc:
                hint = (f"restart its RPC server (python -m tvm.exec.rpc_server --tracker "
                        f"{self.spec.address} --key {self.spec.key}) or free another, and run again"
                        if getattr(exc, "reason", None) in ("no-device", "timeout") else exc.hint)
                raise DeviceLostError(f"{lost.message}; no other {self.spec.key!r} device to fail "
                                      f"over to: {exc.message}", hint) from None
            except DeviceLostError as exc:
                lost = exc

    def _call(self, what: str, fn: Callable):
        while True:
            try:
                with device_errors(self.spec, what):
                    return fn()
            except DeviceLostError as exc:
                if not self.spec.remote:
                    raise
                self._fail_over(exc, what)

    def _tensor(self, x: np.ndarray):
        return self._tvm.runtime.tensor(np.ascontiguousarray(x), device=self.device)

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        def once():
            out = self.vm["main"](self._tensor(x))
            return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
        return self._call("a run", once)

    def timer(self, x: np.ndarray, number: int = 1) -> Callable[[], float]:
        """A function that runs ``main`` ``number`` times on the device and returns the
        mean seconds per run, timed on the device itself (no RPC round trip inside)."""
        def set_up():
            return self._tensor(x), self.vm.time_evaluator("main", self.device, number=number, repeat=1)
        arg, evaluator = self._call("setting up the timer", set_up)

        def time_once() -> float:
            with device_errors(self.spec, "a timed run"):
                return float(evaluator(arg).results[0])
        return time_once


def open_session(spec: DeviceSpec, progress: Callable[[str], None] | None = None):
    """One RPC session to share between libraries (a TVM RPC server serves one session at a
    time), or None for this host."""
    return connect(spec, progress) if spec.remote else None


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
