"""This machine: CPU model, ISA extensions, package versions, and its *class*.

A machine class is what a hardware-dependent ratio (speedup over dense, efficiency,
latency against a reference workload) depends on: the CPU model, its ISA extensions and
the thread count. Ratios recorded on one class are judged only on the same class.
"""
from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version

SIMD = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
        "avx512_bf16", "amx_tile", "neon", "asimd", "sve", "sve2")
VERSIONED = ("onnx", "onnxruntime", "onnxsim", "onnxscript", "apache-tvm", "apache-tvm-ffi")


def package_version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def cpu_info() -> dict:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features"):
                    flags.update(value.split())
    except OSError:
        pass
    return {"model": model, "machine": platform.machine(), "cores": os.cpu_count(),
            "simd": [f for f in SIMD if f in flags]}


def llvm_host_cpu() -> str | None:
    """LLVM's name for this host's CPU (``rocketlake``, ``znver3``, ``neoverse-n1``), as TVM
    reports it; None without TVM. A TVM target without ``mcpu`` (or with ``native``)
    compiles for a baseline x86-64 with no AVX at all."""
    try:
        import tvm
        name = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()
    except Exception:
        return None
    return str(name) if name and name != "generic" else None


def tool_versions() -> dict:
    """The versions a converted package and a measurement record."""
    import torch

    from structexport import __version__
    out = {"structexport": __version__, "torch": torch.__version__}
    out.update({dist: package_version(dist) for dist in VERSIONED})
    return out


def machine() -> dict:
    """This machine and the command being run, as bench records it."""
    import torch
    return {"cpu": cpu_info(), "python": platform.python_version(),
            "onnxruntime": package_version("onnxruntime"), "torch": torch.__version__,
            "command": " ".join(sys.argv)}


def machine_class(threads: int, cpu: dict | None = None) -> dict:
    """The class a hardware-dependent ratio belongs to (see the module docstring)."""
    cpu = cpu or cpu_info()
    return {"cpu": cpu["model"], "arch": cpu["machine"], "isa": list(cpu["simd"]),
            "threads": int(threads)}


def class_id(cls: dict) -> str:
    """A stable, readable key: ``x86_64 | Intel(R) Xeon(R) ... | avx2,avx512f,... | 1t``."""
    return f"{cls['arch']} | {cls['cpu']} | {','.join(sorted(cls['isa'])) or '-'} | {cls['threads']}t"
