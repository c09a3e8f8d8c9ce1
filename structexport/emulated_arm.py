"""The emulated aarch64 device: TVM's RPC server running under qemu user mode on this machine.

It stands in for a real 64-bit ARM board when none is at hand: libraries cross-compiled for
aarch64 are uploaded to it over TVM RPC, loaded and run there, so an artifact is proven to
load and compute correctly on aarch64. Its timings are those of an emulator, never ARM
latency.

What it is made of (all under :func:`cache_dir`, ``$STRUCTEXPORT_CACHE/emulated-arm`` or
``~/.cache/structexport/emulated-arm``):

- ``rootfs/``: a Debian bookworm arm64 root file system with python3.11 and libstdc++6,
  built by ``debootstrap --foreign`` and completed by unpacking its packages (no binfmt
  is needed: nothing of the rootfs is ever run as a chroot);
- ``site-packages/``: the aarch64 wheels of apache-tvm, apache-tvm-ffi, numpy and the
  modules TVM's RPC server imports (``pip install --platform manylinux_2_28_aarch64``);
- ``bin/python3-aarch64``: a host shell script that runs the rootfs's python3.11 under
  ``qemu-aarch64-static -L rootfs``. There is no binfmt here, so an aarch64 Python can only
  start another aarch64 Python through this script: ``shim/sitecustomize.py`` sets every
  guest Python's ``sys.executable`` to it (TVM's RPC server starts its popen worker with
  ``sys.executable -m tvm.exec.popen_worker``) and registers ``structexport.device_info``,
  an RPC-callable function that reports the guest's machine (``aarch64``);
- ``installed.json``: written last, once the guest has been run and checked; an install
  without it is redone, never trusted;
- ``device.json`` (the running device: pid, port, start time) and ``rpc-server.log``.

Only one emulated device runs at a time: :func:`start` while one runs returns the running
one (or raises :class:`EmulatorError` when a different ``port`` is asked for).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from structexport.errors import CrossCompilerMissingError, EmulatorError
from structexport.fsutil import cache_root, write_text_atomic

Progress = Callable[[str], None] | None

HOST = "127.0.0.1"
SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
GUEST_PYTHON = "/usr/bin/python3.11"
GUEST_PYTHON_TAG = ("3.11", "cp311")
WHEEL_PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
WHEELS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy",
          "ml_dtypes", "typing_extensions", "psutil", "cloudpickle")
ROOTFS_SPEC = {"suite": SUITE, "arch": "arm64", "variant": "minbase",
               "include": ["python3.11", "libstdc++6"]}
# Host tools and the Debian packages that provide them.
HOST_TOOLS = {"qemu-aarch64-static": "qemu-user-static", "debootstrap": "debootstrap",
              "dpkg-deb": "dpkg", "aarch64-linux-gnu-gcc": "gcc-aarch64-linux-gnu",
              "aarch64-linux-gnu-g++": "g++-aarch64-linux-gnu"}
CROSS_COMPILER = "aarch64-linux-gnu-g++"
STAMP = ".structexport-stamp.json"
INSTALL_SCHEMA = 1
SETUP_HINT = "run `structexport device setup-emulated-arm`"
_CHILDREN: dict[int, subprocess.Popen] = {}   # servers this process started, kept to reap them


# --------------------------------------------------------------------------- layout

def cache_dir() -> Path:
    """Where everything of the emulated device lives."""
    return cache_root() / "emulated-arm"


def _path(name: str) -> Path:
    return cache_dir() / {
        "rootfs": "rootfs", "site": "site-packages", "shim": "shim",
        "wrapper": "bin/python3-aarch64", "marker": "installed.json",
        "state": "device.json", "log": "rpc-server.log",
    }[name]


@contextlib.contextmanager
def _lock(name: str) -> Iterator[None]:
    """An exclusive file lock, so two processes never install or start at once."""
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".{name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _say(progress: Progress, message: str) -> None:
    if progress:
        progress(message)


def _tail(text: str, lines: int = 3) -> str:
    """The last non-empty lines of ``text`` joined into one line."""
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]
    return " | ".join(kept) or "no output"


def _system_path() -> str:
    """PATH plus the sbin folders: debootstrap lives in /usr/sbin, which a plain user's or a
    CI job's PATH often lacks."""
    parts = os.environ.get("PATH", os.defpath).split(os.pathsep)
    return os.pathsep.join(parts + [d for d in ("/usr/local/sbin", "/usr/sbin", "/sbin") if d not in parts])


def _which(tool: str) -> str | None:
    return shutil.which(tool, path=_system_path())


def _run(cmd: list[str], what: str, error: type = EmulatorError, hint: str | None = None,
         env: dict | None = None, timeout: float = 1800) -> str:
    """Run ``cmd``; on failure raise ``error`` with one line naming ``what`` and the output."""
    env = dict(env if env is not None else os.environ, PATH=_system_path())
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise error(f"{what} failed: {exc}", hint) from None
    if done.returncode != 0:
        raise error(f"{what} failed (exit {done.returncode}): "
                    f"{_tail(done.stdout + done.stderr)}", hint)
    return done.stdout


# --------------------------------------------------------------------------- host packages

def _privilege_prefix(command: str, error: type) -> list[str]:
    """[] as root, ["sudo", "-n"] with password-less sudo, else a clear error."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"],
                                               capture_output=True).returncode == 0:
        return ["sudo", "-n"]
    raise error(f"installing Debian packages needs root: run `{command}` as root",
                "then run this again")


def _apt_install(packages: list[str], error: type, progress: Progress = None) -> None:
    """``apt-get update`` and ``apt-get install`` ``packages`` (waiting for apt's lock)."""
    command = "apt-get install -y --no-install-recommends " + " ".join(packages)
    if not shutil.which("apt-get"):
        raise error(f"{', '.join(packages)} missing and apt-get not found",
                    f"install them with your package manager ({command} on Debian)")
    sudo = _privilege_prefix(command, error)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    wait_lock = ["-o", "DPkg::Lock::Timeout=600"]
    _say(progress, f"apt-get install {' '.join(packages)}")
    for attempt in range(3):  # another apt-get may hold the lists' lock for a while
        try:
            _run(sudo + ["apt-get", "-q", *wait_lock, "update"], "apt-get update", error,
                 f"check the network, or run `{command}` yourself", env)
            break
        except error as exc:
            if "lock" not in str(exc).lower() or attempt == 2:
                raise
            time.sleep(20)
    _run(sudo + ["apt-get", "-q", "-y", "--no-install-recommends", *wait_lock, "install",
                 *packages], f"`{command}`", error, "run it yourself to see why", env)


def _missing_packages(tools: list[str]) -> list[str]:
    return sorted({HOST_TOOLS[t] for t in tools if not _which(t)})


def cross_compiler_path() -> str | None:
    """The path of ``aarch64-linux-gnu-g++``, or None."""
    return shutil.which(CROSS_COMPILER)


def ensure_cross_compiler(progress: Progress = None) -> str:
    """Install Debian's aarch64 g++ cross compiler if it is missing; return its path."""
    if not cross_compiler_path():
        with _lock("install"):
            if not cross_compiler_path():
                _apt_install(["g++-aarch64-linux-gnu"], CrossCompilerMissingError, progress)
    path = cross_compiler_path()
    if not path:
        raise CrossCompilerMissingError(f"{CROSS_COMPILER} not found after installing it",
                                        "apt-get install g++-aarch64-linux-gnu")
    return path


# --------------------------------------------------------------------------- components

def _stamp_ok(folder: Path, spec: dict) -> bool:
    try:
        return json.loads((folder / STAMP).read_text()) == spec
    except (OSError, ValueError):
        return False


def _build_into(folder: Path, spec: dict, build: Callable[[Path], None]) -> None:
    """Build a component in ``folder.partial`` and rename it into place once complete."""
    partial = folder.with_name(folder.name + ".partial")
    for stale in (partial, folder):
        if stale.exists():
            shutil.rmtree(stale)
    partial.mkdir(parents=True)
    build(partial)
    (partial / STAMP).write_text(json.dumps(spec))
    partial.rename(folder)


def _debootstrap(rootfs: Path) -> None:
    """First stage of debootstrap (no binfmt needed), then every package unpacked."""
    mirror = os.environ.get("STRUCTEXPORT_DEBIAN_MIRROR", DEFAULT_MIRROR)
    cmd = ["debootstrap", "--foreign", "--arch=arm64", "--variant=minbase",
           "--include=" + ",".join(ROOTFS_SPEC["include"])]
    keyring = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
    if keyring.exists():
        cmd.append(f"--keyring={keyring}")
    _run(cmd + [SUITE, str(rootfs), mirror], "debootstrap of the arm64 rootfs",
         hint=f"check that {mirror} is reachable (or set STRUCTEXPORT_DEBIAN_MIRROR)")
    archives = rootfs / "var/cache/apt/archives"
    for deb in sorted(archives.glob("*.deb")):
        _run(["sh", "-c", 'dpkg-deb --fsys-tarfile "$1" | tar -C "$2" --keep-directory-symlink -xf -',
              "unpack", str(deb), str(rootfs)], f"unpacking {deb.name} into the rootfs")
        deb.unlink()


def _pip_wheels(site: Path) -> None:
    """The aarch64 wheels, for the rootfs's CPython 3.11."""
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--no-compile", "--only-binary=:all:", "--target", str(site),
           "--python-version", GUEST_PYTHON_TAG[0], "--implementation", "cp",
           "--abi", GUEST_PYTHON_TAG[1]]
    for platform in WHEEL_PLATFORMS:
        cmd += ["--platform", platform]
    _run(cmd + list(WHEELS), "pip install of the aarch64 wheels",
         hint="check that PyPI is reachable and pip works in this environment")


def _ensure_rootfs(progress: Progress) -> None:
    if _stamp_ok(_path("rootfs"), ROOTFS_SPEC):
        return
    _say(progress, f"arm64 {SUITE} rootfs (debootstrap, ~230 MB)")
    _build_into(_path("rootfs"), ROOTFS_SPEC, _debootstrap)


def _ensure_wheels(progress: Progress) -> None:
    spec = {"wheels": list(WHEELS), "platforms": list(WHEEL_PLATFORMS)}
    if _stamp_ok(_path("site"), spec):
        return
    _say(progress, "aarch64 wheels: apache-tvm, apache-tvm-ffi, numpy, ... (~370 MB)")
    _build_into(_path("site"), spec, _pip_wheels)


SHIM = '''\
"""Written by structexport: runs at the start of every Python of the emulated aarch64 device."""
import json
import os
import platform
import sys

# No binfmt here: an aarch64 Python can start another one only through the host wrapper.
if os.environ.get("STRUCTEXPORT_GUEST_PYTHON"):
    sys.executable = sys._base_executable = os.environ["STRUCTEXPORT_GUEST_PYTHON"]


def _device_info():
    return json.dumps({"machine": platform.machine(), "system": platform.system(),
                       "python": platform.python_version(), "cpu_count": os.cpu_count(),
                       "emulated": True})


try:
    import tvm_ffi
    tvm_ffi.register_global_func("structexport.device_info", _device_info, override=True)
except Exception:  # the guest is usable without it
    pass
'''


def _write_launcher() -> Path:
    """The shim and the host wrapper that runs the guest's Python under qemu."""
    qemu = _which("qemu-aarch64-static")
    if not qemu:
        raise EmulatorError("qemu-aarch64-static not found", SETUP_HINT)
    rootfs, wrapper = _path("rootfs"), _path("wrapper")
    _path("shim").mkdir(parents=True, exist_ok=True)
    (_path("shim") / "sitecustomize.py").write_text(SHIM)
    wrapper.parent.mkdir(parents=True, exist_ok=True)
    script = (
        "#!/bin/sh\n"
        "# Written by structexport: the emulated aarch64 device's python3.11, run by qemu.\n"
        f"export PYTHONPATH='{_path('site')}:{_path('shim')}'\n"
        f"export STRUCTEXPORT_GUEST_PYTHON='{wrapper}'\n"
        "export PYTHONNOUSERSITE=1\n"
        "# TVM's runtime only (4 s to import under qemu instead of 20 s): the device never compiles.\n"
        'export TVM_USE_RUNTIME_LIB="${TVM_USE_RUNTIME_LIB:-1}"\n'
        f"exec '{qemu}' -L '{rootfs}' '{rootfs}{GUEST_PYTHON}' \"$@\"\n")
    write_text_atomic(wrapper, script, mode=0o755)
    return wrapper


def _guest_versions(progress: Progress) -> dict:
    """Run the guest for real: it must be aarch64 and import TVM's RPC server."""
    _say(progress, "checking the guest: python3.11 under qemu imports TVM's RPC server")
    code = ("import json, platform, numpy, psutil, tvm, tvm_ffi, tvm.rpc.server, "
            "tvm.exec.popen_worker; print(json.dumps({'machine': platform.machine(), "
            "'python': platform.python_version(), 'tvm': tvm.__version__, "
            "'tvm_ffi': tvm_ffi.__version__, 'numpy': numpy.__version__}))")
    output = _run([str(_path("wrapper")), "-c", code], "running TVM in the emulated guest",
                  hint="reinstall with `structexport device setup-emulated-arm --force`",
                  env=_guest_env(), timeout=600)
    versions = json.loads(output.strip().splitlines()[-1])
    if versions["machine"] != "aarch64":
        raise EmulatorError(f"the guest reports machine {versions['machine']!r}, not aarch64",
                            "reinstall with `structexport device setup-emulated-arm --force`")
    return versions


def _marker_spec() -> dict:
    return {"schema": INSTALL_SCHEMA, "rootfs": ROOTFS_SPEC, "wheels": list(WHEELS)}


def install_info() -> dict | None:
    """The marker of a complete install (versions, sizes), or None."""
    try:
        marker = json.loads(_path("marker").read_text())
    except (OSError, ValueError):
        return None
    return marker if marker.get("spec") == _marker_spec() else None


def is_installed() -> bool:
    return install_info() is not None


def _du_mb(folder: Path) -> float:
    total = sum(p.lstat().st_size for p in folder.rglob("*") if not p.is_symlink() and p.is_file())
    return round(total / 2**20, 1)


def ensure_installed(progress: Progress = None, *, force: bool = False) -> Path:
    """Install what is missing of the emulated device, reuse what is there; return
    :func:`cache_dir`. ``force`` redoes the rootfs and the wheels."""
    with _lock("install"):
        missing = _missing_packages(list(HOST_TOOLS))
        if missing:
            _apt_install(missing, EmulatorError, progress)
        if force:
            for name in ("marker", "rootfs", "site"):
                with contextlib.suppress(FileNotFoundError):
                    p = _path(name)
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        if is_installed():
            _write_launcher()
            return cache_dir()
        _ensure_rootfs(progress)
        _ensure_wheels(progress)
        _write_launcher()
        versions = _guest_versions(progress)
        marker = {"spec": _marker_spec(), "versions": versions, "installed_at": time.time(),
                  "size_mb": {"rootfs": _du_mb(_path("rootfs")), "wheels": _du_mb(_path("site"))}}
        write_text_atomic(_path("marker"), json.dumps(marker, indent=2) + "\n")
    return cache_dir()


# --------------------------------------------------------------------------- the device

@dataclass(frozen=True)
class EmulatedDevice:
    """A running emulated aarch64 device: TVM's RPC server at ``address``."""
    port: int
    pid: int
    host: str = HOST
    started_at: float = 0.0
    log_path: str = ""
    emulated: bool = True

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def to_dict(self) -> dict:
        return {**asdict(self), "address": self.address}


def _guest_env() -> dict:
    """A clean environment for the guest (qemu hands the whole of it to the aarch64 side)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "LANG": "C.UTF-8"}
    for name in ("TVM_NUM_THREADS", "OMP_NUM_THREADS", "TVM_USE_RUNTIME_LIB", "TMPDIR"):
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _port_answers(port: int, timeout: float = 5.0) -> bool:
    """Something listens on ``port``. Read from /proc/net/tcp where it can be: TVM's server
    has a listen backlog of 1 and accepts nothing while a session runs, so a probing connect
    can time out on a busy, healthy device. Else a TCP connect (the server drops it)."""
    try:
        rows = [ln.split() for name in ("tcp", "tcp6")
                for ln in Path(f"/proc/net/{name}").read_text().splitlines()[1:]]
    except OSError:
        rows = None
    if rows is not None:
        return any(r[1].rsplit(":", 1)[1] == f"{port:04X}" and r[3] == "0A" for r in rows)
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _pgrp(pid: int) -> int | None:
    """The process group of ``pid`` from /proc, or None when it is gone."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return None


def _threads_alive(pid: int) -> bool:
    """Some thread of ``pid`` is not a zombie (a process whose main thread has exited shows
    as a zombie in /proc/PID/stat while its other threads still run)."""
    for task in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            if task.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                return True
        except (OSError, IndexError):
            continue
    return False


def _pid_alive(pid: int) -> bool:
    """Alive and not a zombie (our own children are reaped here)."""
    if pid in _CHILDREN and _CHILDREN[pid].poll() is not None:
        del _CHILDREN[pid]
    return _threads_alive(pid)


def _is_emulator(pid: int) -> bool:
    """``pid`` is our qemu running TVM's RPC server (guards against reused pids)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return "qemu-aarch64" in cmdline and "tvm.exec.rpc_server" in cmdline


def _group_alive(pgid: int) -> bool:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            if _pgrp(int(entry.name)) == pgid and _threads_alive(int(entry.name)):
                return True
    return False


def _kill_group(pgid: int, grace: float = 5.0) -> None:
    """SIGTERM the server's whole process group, SIGKILL what is left after ``grace``."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            _pid_alive(pgid)  # reaps it when it is our child
            if not _group_alive(pgid):
                return
            time.sleep(0.1)


def _read_state() -> dict | None:
    try:
        return json.loads(_path("state").read_text())
    except (OSError, ValueError):
        return None


def _write_state(state: dict) -> None:
    write_text_atomic(_path("state"), json.dumps(state))


def _clear_state() -> None:
    _path("state").unlink(missing_ok=True)


def _device_from(state: dict) -> EmulatedDevice:
    return EmulatedDevice(port=state["port"], pid=state["pid"], started_at=state["started_at"],
                          log_path=state["log"])


def running() -> EmulatedDevice | None:
    """The emulated device this machine runs (its process alive and its port answering), or
    None. A state file whose process is gone is removed; one still starting counts as not
    running (yet)."""
    state = _read_state()
    if not state:
        return None
    if not (_pid_alive(state["pid"]) and _is_emulator(state["pid"])):
        _clear_state()
        return None
    if not state.get("ready") or not _port_answers(state["port"]):
        return None
    return _device_from(state)


def stop() -> bool:
    """Stop the emulated device (its whole process group); False when none was running."""
    state = _read_state()
    if not state:
        return False
    alive = _pid_alive(state["pid"]) and _is_emulator(state["pid"])
    if alive:
        _kill_group(state["pid"])
        deadline = time.monotonic() + 5.0
        while _port_answers(state["port"]) and time.monotonic() < deadline:
            time.sleep(0.1)
    _clear_state()
    return alive


def device_info(device: EmulatedDevice, session_timeout: float = 60.0) -> dict:
    """Ask the device itself over RPC: ``machine``, ``python``, ``cpu_count``, ``emulated``."""
    from tvm import rpc
    remote = rpc.connect(device.host, device.port, session_timeout=session_timeout)
    return json.loads(remote.get_function("structexport.device_info")())


def _launch(port: int) -> subprocess.Popen:
    """TVM's RPC server under qemu, in a new session, logging to ``rpc-server.log``."""
    cmd = [str(_path("wrapper")), "-m", "tvm.exec.rpc_server", "--host", HOST,
           "--port", str(port), "--port-end", str(port + 1)]
    with open(_path("log"), "w") as log:
        log.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=_guest_env(), cwd=cache_dir(),
                                start_new_session=True, close_fds=True)
    _CHILDREN[proc.pid] = proc
    return proc


def _log_tail() -> str:
    try:
        return _tail(_path("log").read_text(errors="replace"))
    except OSError:
        return "no log"


def _wait_ready(proc: subprocess.Popen, port: int, timeout: float, progress: Progress) -> None:
    """Until a real RPC session works and the device says it is aarch64."""
    t0, last = time.monotonic(), "its port never answered"
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise EmulatorError(f"the emulated aarch64 device exited during start-up "
                                f"(code {proc.returncode}): {_log_tail()}",
                                f"see {_path('log')}; reinstall with "
                                f"`structexport device setup-emulated-arm --force`")
        if _port_answers(port):
            try:
                info = device_info(EmulatedDevice(port=port, pid=proc.pid), 60.0)
                if info.get("machine") == "aarch64":
                    return
                last = f"it reports machine {info.get('machine')!r}"
            except Exception as exc:  # noqa: BLE001 -- still starting: retry until the deadline
                last = f"RPC failed: {_tail(str(exc), 1) if str(exc).strip() else type(exc).__name__}"
        _say(progress, f"waiting for the RPC server on port {port} ({time.monotonic() - t0:.0f} s)")
        time.sleep(0.5)
    raise EmulatorError(f"the emulated aarch64 device did not answer within {timeout:g} s "
                        f"({last}): {_log_tail()}",
                        f"see {_path('log')}; a busy machine may need a longer timeout")


def start(port: int | None = None, timeout: float = 180.0,
          progress: Progress = None) -> EmulatedDevice:
    """Start the emulated device (TVM's RPC server under qemu, detached) and wait until an
    RPC session works. If one already runs it is returned (EmulatorError if it runs on a
    port other than ``port``). Needs :func:`ensure_installed` first."""
    with _lock("start"):
        current = running()
        if current:
            if port not in (None, current.port):
                raise EmulatorError(f"the emulated aarch64 device already runs at "
                                    f"{current.address}, not on port {port}",
                                    "use it, or `structexport device stop` first")
            return current
        if not is_installed():
            raise EmulatorError("the emulated aarch64 device is not installed", SETUP_HINT)
        try:
            import tvm.rpc  # noqa: F401 -- the readiness check is a real RPC session
        except ImportError as exc:
            raise EmulatorError(f"TVM is not usable on this host: {exc}",
                                "pip install 'structexport[tvm]'") from None
        stop()  # a start that hung or a server that stopped answering
        _write_launcher()
        if port is not None and _port_answers(port):
            raise EmulatorError(f"port {port} is already in use", "pick another --port or none")
        port = port or _free_port()
        _say(progress, f"starting TVM's RPC server under qemu on port {port}")
        proc = _launch(port)
        state = {"pid": proc.pid, "port": port, "started_at": time.time(),
                 "log": str(_path("log")), "ready": False}
        _write_state(state)
        try:
            _wait_ready(proc, port, timeout, progress)
        except BaseException:
            _kill_group(proc.pid)
            _clear_state()
            raise
        _write_state({**state, "ready": True})
        return _device_from(state)


@contextlib.contextmanager
def temporary_device(port: int | None = None, timeout: float = 180.0,
                     progress: Progress = None) -> Iterator[EmulatedDevice]:
    """A running emulated device; stopped afterwards only if this call started it."""
    existing = running()
    device = existing or start(port, timeout, progress)
    try:
        yield device
    finally:
        state = _read_state()
        if existing is None and state and state["pid"] == device.pid:
            stop()
