"""Shared test fixtures.

The real checkpoints the loader must accept live outside the repository, in the shared
folder beside the clone: ``<repo>/../shared/fixtures/associativeconv`` (CI has the same
layout). A test that needs them fails -- it never skips -- when the folder is missing, so a
run without them cannot pass by testing less.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
# Decisions that depend on the CPU's layer cost model (dense or structured, which
# realization) are made with one fixed model in every test, on every CPU; tests of the
# lookup itself unset it (tests/test_layer_cost.py).
os.environ["STRUCTEXPORT_COST_MODEL"] = str(REPO_ROOT / "tests" / "cost_model.json")
FIXTURES_DIR = REPO_ROOT.parent / "shared" / "fixtures" / "associativeconv"
CIFAR10_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar10"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root folder (the one holding pyproject.toml)."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The folder of real CSG checkpoints; fails the requesting test when it is missing."""
    if not FIXTURES_DIR.is_dir():
        pytest.fail(
            f"checkpoint fixtures not found at {FIXTURES_DIR}: tests that read real checkpoints "
            f"need the shared folder beside the repository (<repo>/../shared/fixtures/"
            f"associativeconv); clone the repository next to it", pytrace=False)
    if not any(FIXTURES_DIR.glob("*.t7")):
        pytest.fail(f"checkpoint fixtures folder {FIXTURES_DIR} holds no *.t7 files",
                    pytrace=False)
    return FIXTURES_DIR


@pytest.fixture(scope="session")
def cifar10_dir() -> Path:
    """The real CIFAR-10 data (``<repo>/../shared/data/cifar10``: test.npz, train-25k.npz);
    fails the requesting test -- never skips -- when it is missing."""
    if not (CIFAR10_DIR / "test.npz").is_file():
        pytest.fail(
            f"CIFAR-10 data not found at {CIFAR10_DIR}/test.npz: tests that measure accuracy need the "
            f"shared folder beside the repository (<repo>/../shared/data/cifar10); clone the "
            f"repository next to it", pytrace=False)
    return CIFAR10_DIR


@pytest.fixture(scope="session")
def project_version() -> str:
    """The version pyproject.toml declares."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    try:
        import tomllib
        return tomllib.loads(text)["project"]["version"]
    except ImportError:  # Python 3.10
        return re.search(r'(?m)^version\s*=\s*"([^"]+)"', text).group(1)


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread():
    """The suite's tensors are small: on a shared 2-core machine intra-op threads only fight."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def emulated_arm():
    """A running emulated aarch64 device (TVM's RPC server under qemu): installed on first use
    (apt + debootstrap + aarch64 wheels, ~2 min, then reused from the cache), started once per
    session (~10-30 s) and stopped at its end -- unless one was already running, which is used
    and left running. Yields a ``structexport.emulated_arm.EmulatedDevice``."""
    from structexport import emulated_arm as emu
    emu.ensure_installed()
    with emu.temporary_device() as device:
        yield device


@pytest.fixture()
def host_rpc_server():
    """TVM's RPC server for this host's CPU in its own process group, on a free port: the
    same server a board runs, a stand-in for a device. Yields ``(process, "127.0.0.1:PORT")``;
    a test may kill the process (a device that dies mid-run)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1",
                             "--port", str(port), "--port-end", str(port + 1)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("TVM's RPC server did not start within 60 s")
                time.sleep(0.3)
        yield proc, f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the server and its worker process
        proc.wait(timeout=30)
