"""``structexport doctor``: what this machine has for building and measuring."""
from __future__ import annotations

import importlib
import platform
import shutil
import subprocess

from structexport.machine import cpu_info, package_version

PACKAGES = {"torch": "torch", "onnx": "onnx", "onnxruntime": "onnxruntime", "onnxsim": "onnxsim",
            "onnxscript": "onnxscript", "tvm": "apache-tvm", "tvm-ffi": "apache-tvm-ffi",
            "safetensors": "safetensors", "numpy": "numpy"}
# Each tool with the executable names Debian's packages install it under.
TOOLS = {"aarch64 cross compiler": ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-gcc"),
         "qemu (aarch64 user mode)": ("qemu-aarch64-static", "qemu-aarch64")}
def _tool_version(names: tuple[str, ...]) -> str | None:
    path = next((p for p in map(shutil.which, names) if p), None)
    if not path:
        return None
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).splitlines()[0].strip() or path
    except (OSError, subprocess.SubprocessError, IndexError):
        return path


def tvm_status() -> str | None:
    """TVM's version, or why it does not import (it is an optional extra)."""
    if package_version("apache-tvm") is None:
        return None
    try:
        tvm = importlib.import_module("tvm")
        return str(getattr(tvm, "__version__", package_version("apache-tvm")))
    except Exception as exc:  # a broken TVM install must not break doctor
        return f"installed but fails to import: {type(exc).__name__}: {exc}"


def emulated_device_status() -> dict:
    """Whether the emulated aarch64 device is installed, and where it runs."""
    try:
        from structexport import emulated_arm
        running = emulated_arm.running()
        return {"installed": emulated_arm.is_installed(),
                "running": running.address if running else None}
    except Exception as exc:  # a broken cache must not break doctor
        return {"installed": False, "running": None, "error": f"{type(exc).__name__}: {exc}"}


def collect() -> dict:
    from structexport import __version__
    packages = {name: package_version(dist) for name, dist in PACKAGES.items()}
    packages["tvm"] = tvm_status()
    return {"structexport": __version__, "python": platform.python_version(),
            "packages": packages,
            "tools": {name: _tool_version(names) for name, names in TOOLS.items()},
            "emulated_arm": emulated_device_status(),
            "cpu": cpu_info()}
