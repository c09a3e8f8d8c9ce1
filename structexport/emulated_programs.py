"""A converted package's phone-runtime program run on the emulated aarch64 device: LiteRT's
``model.tflite`` or ExecuTorch's ``model.pte`` under the aarch64 build of its runtime, in the
emulated device's arm64 userland (:mod:`structexport.emulated_arm`), compared with the
package's stored outputs within the package's tolerances.

This proves that the program loads on aarch64 and computes the package's verified outputs
there (XNNPACK's ARM kernels, not the x86 ones the host verified with). Its timings are those
of qemu translating every instruction on this x86 host, labelled ``emulated``: never ARM
latency.

What it adds to the emulated device's cache folder (``emulated_arm.cache_dir()``), by
:func:`ensure_runtime_installed`:

- ``litert-site/``: the ``ai-edge-litert`` aarch64 wheel for CPython 3.11, the version of the
  host's ``litert`` extra, installed ``--no-deps`` (its interpreter needs only numpy, which
  the device's ``site-packages`` has); the guest's python3.11 runs it;
- ``executorch-arm/``: the C++ runtime of the ``executorch`` aarch64 wheel (the version of the
  host's ``executorch`` extra): its shared libraries (``lib/``: the runtime, the CPU and
  quantized kernels, the XNNPACK delegate, the thread pool) and headers (``include/``), and
  ``et_runner``, a small C++ program (:data:`ET_RUNNER_CPP`) cross-compiled against them
  with ``aarch64-linux-gnu-g++`` and the compile definitions the wheel's CMake package names.
  The wheel's Python bindings are not used: they link libtorch, and PyPI's aarch64 torch is
  a CUDA build that needs the CUDA libraries to load;
- ``programs-root/``: the folder qemu's ``-L`` is pointed at for these runs: a symlink to
  every top-level entry of ``rootfs/`` except ``proc``, which is a real folder holding only a
  ``cpuinfo`` in the arm64 format. qemu 7.2's user mode hands the guest the host's x86
  ``/proc/cpuinfo``, on which the cpuinfo library that XNNPACK and both runtimes use crashes
  (SIGSEGV in ``cpuinfo_arm_linux_init``). ``-L`` looks every absolute path up under its
  folder first, so the guest reads this ``cpuinfo`` (one Neoverse-N1 entry per CPU of the
  host's ``/sys/devices/system/cpu/possible``, rewritten when that changes) and every other
  ``/proc`` path falls through to the host's. qemu emulates the same CPU
  (``QEMU_CPU=neoverse-n1``, :data:`QEMU_CPU`).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from structexport import emulated_arm as emu
from structexport.errors import EmulatorError, StructExportError
from structexport.fsutil import write_text_atomic

Progress = Callable[[str], None] | None

RUNTIMES = ("litert", "executorch")   # the package targets whose programs run here
# The host's runtimes: pyproject's extras pin ai-edge-litert==2.3.0 and executorch==1.5.1.
LITERT_WHEEL = "ai-edge-litert==2.3.0"
EXECUTORCH_WHEEL = "executorch==1.5.1"
WHEEL_PLATFORMS = ("manylinux_2_27_aarch64", "manylinux_2_28_aarch64", "manylinux2014_aarch64")
STAMP = ".structexport-stamp.json"
EMULATED = "emulated"
TIMING_NOTE = ("qemu-aarch64 user mode translating every instruction on this x86-64 host: "
               "proves the program runs on aarch64, says nothing of ARM latency")
# The CPU qemu emulates for these runs, the one the guest's cpuinfo names. qemu's default
# (``max``: SVE, SME, i8mm ...) makes XNNPACK's INT8 kernels compute wrong outputs under qemu
# 7.2, and a cpuinfo that disagrees with the emulated CPU can make XNNPACK pick instructions
# the CPU lacks (SIGILL): both must name one CPU.
QEMU_CPU = "neoverse-n1"
# The guest's /proc/cpuinfo, per CPU: an Arm Neoverse-N1 (MIDR 0x413fd0c1), ARMv8.2 features.
CPUINFO_ENTRY = ("processor\t: {n}\nBogoMIPS\t: 50.00\n"
                 "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp "
                 "cpuid asimdrdm lrcpc dcpop asimddp\n"
                 "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x3\n"
                 "CPU part\t: 0xd0c\nCPU revision\t: 1\n\n")
DEVICE_HINT = "run `structexport device setup-emulated-arm`, then this again"
REINSTALL_HINT = "reinstall it with `structexport device setup-emulated-arm --force`"
# What the wheel's CMake package (share/cmake/executorch-config.cmake) says a consumer compiles
# with, and the components et_runner loads (their static initializers register the kernels
# and the XNNPACK backend, hence --no-as-needed).
ET_DEFINES = ("C10_USING_CUSTOM_GENERATED_MACROS", "ET_EVENT_TRACER_ENABLED", "ET_USE_THREADPOOL")
ET_LIBS = ("executorch", "executorch_kernels_optimized", "executorch_kernels_quantized",
           "executorch_backend_xnnpack", "executorch_threadpool")


class EmulatedTargetUnsupportedError(StructExportError):
    exit_code, kind = 2, "usage"


# --------------------------------------------------------------------------- layout

def litert_site() -> Path:
    return emu.cache_dir() / "litert-site"


def executorch_dir() -> Path:
    return emu.cache_dir() / "executorch-arm"


def programs_root() -> Path:
    """The folder qemu's ``-L`` points at for these runs (the rootfs, with an arm64 cpuinfo)."""
    return emu.cache_dir() / "programs-root"


def _spec(runtime: str) -> dict:
    if runtime == "litert":
        return {"wheel": LITERT_WHEEL, "platforms": list(WHEEL_PLATFORMS), "no_deps": True}
    return {"wheel": EXECUTORCH_WHEEL, "platforms": list(WHEEL_PLATFORMS), "defines": list(ET_DEFINES),
            "libs": list(ET_LIBS), "runner_sha256": hashlib.sha256(ET_RUNNER_CPP.encode()).hexdigest()}


def _folder(runtime: str) -> Path:
    return litert_site() if runtime == "litert" else executorch_dir()


def _stamp_ok(folder: Path, spec: dict) -> bool:
    try:
        return json.loads((folder / STAMP).read_text()) == spec
    except (OSError, ValueError):
        return False


def runtime_installed(runtime: str) -> bool:
    """The emulated device and ``runtime``'s aarch64 build (``litert``, ``executorch``) are
    installed."""
    _check_runtime(runtime)
    return (emu.is_installed() and _stamp_ok(_folder(runtime), _spec(runtime))
            and (programs_root() / "proc" / "cpuinfo").is_file())


def _check_runtime(runtime: str) -> None:
    if runtime not in RUNTIMES:
        raise EmulatedTargetUnsupportedError(f"unknown runtime {runtime!r}: one of {', '.join(RUNTIMES)}")


# --------------------------------------------------------------------------- install

@contextlib.contextmanager
def _lock() -> Iterator[None]:
    emu.cache_dir().mkdir(parents=True, exist_ok=True)
    with open(emu.cache_dir() / ".programs.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _tail(text: str, lines: int = 3) -> str:
    return " | ".join([ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]) or "no output"


def _run(cmd: list[str], what: str, hint: str, timeout: float = 1800, env: dict | None = None) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EmulatorError(f"{what} failed: {exc}", hint) from None
    if done.returncode != 0:
        raise EmulatorError(f"{what} failed (exit {done.returncode}): {_tail(done.stdout + done.stderr)}", hint)
    return done.stdout


def _pip(verb: str, wheel: str, dest: Path) -> None:
    """``pip install --target`` / ``pip download --dest`` of the aarch64 CPython 3.11 wheel."""
    cmd = [sys.executable, "-m", "pip", verb, "--quiet", "--disable-pip-version-check", "--no-deps",
           "--only-binary=:all:", "--target" if verb == "install" else "--dest", str(dest),
           "--python-version", emu.GUEST_PYTHON_TAG[0], "--implementation", "cp",
           "--abi", emu.GUEST_PYTHON_TAG[1]]
    if verb == "install":
        cmd.append("--no-compile")
    for platform in WHEEL_PLATFORMS:
        cmd += ["--platform", platform]
    _run(cmd + [wheel], f"pip {verb} of the aarch64 {wheel} wheel",
         "check that PyPI is reachable and pip works in this environment")


def _install_litert(folder: Path, progress: Progress) -> None:
    if progress:
        progress(f"aarch64 {LITERT_WHEEL} (~15 MB)")
    _pip("install", LITERT_WHEEL, folder)


def _install_executorch(folder: Path, progress: Progress) -> None:
    """The wheel's shared libraries and headers, and et_runner compiled against them."""
    compiler = emu.ensure_cross_compiler(progress)
    if progress:
        progress(f"aarch64 {EXECUTORCH_WHEEL}: its C++ runtime (~18 MB download), and et_runner")
    with tempfile.TemporaryDirectory(prefix="structexport-et-wheel-") as tmp:
        _pip("download", EXECUTORCH_WHEEL, Path(tmp))
        wheels = sorted(Path(tmp).glob("executorch-*.whl"))
        if not wheels:
            raise EmulatorError(f"pip download of {EXECUTORCH_WHEEL} left no wheel", REINSTALL_HINT)
        with zipfile.ZipFile(wheels[0]) as whl:
            for name in whl.namelist():
                kept = name.startswith("executorch/include/") or (
                    name.startswith("executorch/lib/") and name.endswith(".so"))
                if kept and not name.endswith("/"):
                    target = folder / name[len("executorch/"):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(whl.read(name))
    missing = [lib for lib in ET_LIBS if not (folder / "lib" / f"lib{lib}.so").is_file()]
    if missing:
        raise EmulatorError(f"the aarch64 {EXECUTORCH_WHEEL} wheel lacks lib{missing[0]}.so", REINSTALL_HINT)
    source = folder / "et_runner.cpp"
    source.write_text(ET_RUNNER_CPP)
    include = folder / "include"
    cmd = [compiler, "-std=c++17", "-O2", *(f"-D{d}" for d in ET_DEFINES), f"-I{include}",
           f"-I{include}/executorch/runtime/core/portable_type/c10", str(source), "-o",
           str(folder / "et_runner"), f"-L{folder / 'lib'}", "-Wl,--no-as-needed",
           *(f"-l{lib}" for lib in ET_LIBS), "-Wl,--as-needed", "-Wl,-rpath,$ORIGIN/lib"]
    _run(cmd, "compiling et_runner against the aarch64 ExecuTorch runtime", REINSTALL_HINT, timeout=600)


def host_cpus() -> list[int]:
    """The CPUs the host's ``/sys/devices/system/cpu/possible`` lists (``0-1``, ``0-3,6``),
    which the guest's cpuinfo library reads too (from the host: only ``/proc`` is replaced)."""
    try:
        cpus: list[int] = []
        for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
            lo, _, hi = part.partition("-")
            cpus += range(int(lo), int(hi or lo) + 1)
        if cpus:
            return cpus
    except (OSError, ValueError):
        pass
    return list(range(os.cpu_count() or 1))


def cpuinfo_text(cpus: list[int]) -> str:
    """The guest's ``/proc/cpuinfo``: one Neoverse-N1 entry per CPU number."""
    return "".join(CPUINFO_ENTRY.format(n=n) for n in cpus)


def _write_cpuinfo(root: Path) -> None:
    text = cpuinfo_text(host_cpus())
    path = root / "proc" / "cpuinfo"
    with contextlib.suppress(OSError):
        if path.read_text() == text:
            return
    write_text_atomic(path, text)


def _write_root() -> None:
    """``programs-root/``: the rootfs's top-level entries as symlinks, and its own ``proc/``."""
    rootfs, root = emu.cache_dir() / "rootfs", programs_root()
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "proc").mkdir(parents=True)
    for entry in sorted(rootfs.iterdir()):
        if entry.name != "proc" and not entry.name.startswith("."):
            (partial / entry.name).symlink_to(entry)
    _write_cpuinfo(partial)
    shutil.rmtree(root, ignore_errors=True)
    partial.rename(root)


def ensure_runtime_installed(runtime: str, progress: Progress = None, *, force: bool = False) -> Path:
    """The emulated device (:func:`emulated_arm.ensure_installed`), ``runtime``'s aarch64 build
    (``litert``: ~15 MB; ``executorch``: ~18 MB and a cross-compile, ~30 s) and
    ``programs-root/``; return the runtime's folder. Idempotent: what is there is reused;
    ``force`` redoes the runtime. Each part is built in a ``.partial`` folder and renamed into
    place with its stamp: an interrupted install is redone."""
    _check_runtime(runtime)
    emu.ensure_installed(progress)
    with _lock():
        folder, spec = _folder(runtime), _spec(runtime)
        if force or not _stamp_ok(folder, spec):
            partial = folder.with_name(folder.name + ".partial")
            for stale in (partial, folder):
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir(parents=True)
            (_install_litert if runtime == "litert" else _install_executorch)(partial, progress)
            (partial / STAMP).write_text(json.dumps(spec))
            partial.rename(folder)
        if force or not (programs_root() / "proc" / "cpuinfo").is_file():
            _write_root()
    return folder


def ensure_programs_installed(progress: Progress = None, *, force: bool = False) -> dict[str, Path]:
    """Both runtimes (:func:`ensure_runtime_installed`): the installer step of
    ``structexport device setup-emulated-arm``."""
    return {runtime: ensure_runtime_installed(runtime, progress, force=force) for runtime in RUNTIMES}


# --------------------------------------------------------------------------- the guest

# Run by the rootfs's python3.11 under qemu: load the .tflite with LiteRT's default resolver
# (XNNPACK applied, as on the host), run every stored sample, time `invoke`, write the outputs.
GUEST_LITERT = r'''
import json, platform, sys, time
from importlib.metadata import version
import numpy as np
t0 = time.perf_counter()
from ai_edge_litert.interpreter import Interpreter
model, feed, out, runs, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
it = Interpreter(model_path=model, num_threads=threads)
it.allocate_tensors()
load_s = time.perf_counter() - t0
ins, outs = it.get_input_details(), it.get_output_details()


def quantize(x, d):   # an INT8 model's integer input, with the scale and zero point it declares
    if not np.issubdtype(d["dtype"], np.integer):
        return np.ascontiguousarray(x, dtype=d["dtype"])
    scale, zero = d["quantization"]
    info = np.iinfo(d["dtype"])
    return np.clip(np.round(np.asarray(x, np.float32) / scale) + zero, info.min, info.max).astype(d["dtype"])


def dequantize(y, d):
    if not np.issubdtype(y.dtype, np.integer):
        return np.array(y, dtype=np.float32)
    scale, zero = d["quantization"]
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


data = np.load(feed)
samples = sorted({int(k.split("/")[0]) for k in data.files})
results = {}
for n in samples:
    for j, d in enumerate(ins):
        it.set_tensor(d["index"], quantize(data[f"{n}/{j}"], d))
    it.invoke()
    for j, d in enumerate(outs):
        results[f"{n}/{j}"] = dequantize(it.get_tensor(d["index"]), d)
np.savez(out, **results)
times = []
for _ in range(runs):   # on the last sample, already set
    t = time.perf_counter()
    it.invoke()
    times.append(time.perf_counter() - t)
print(json.dumps({"machine": platform.machine(), "runtime_version": version("ai-edge-litert"),
                  "load_s": load_s, "times_s": times}))
'''

# Compiled for aarch64 against the executorch wheel's C++ runtime (executorch-arm/).
ET_RUNNER_CPP = r'''// Written by structexport: runs an ExecuTorch program's "forward" on the emulated device.
// Usage: et_runner model.pte inputs.f32 outputs.f32 runs threads
// inputs.f32: float32 samples, each every input of "forward" in order at the shape the program
// declares. Writes every output of every sample as float32, in order, then prints one JSON
// line: the outputs' shapes, the load time and the time of each of `runs` more forwards.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <string>
#include <sys/utsname.h>
#include <vector>

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>

namespace executorch::extension::threadpool {  // libexecutorch_threadpool.so; no header shipped
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
}  // namespace executorch::extension::threadpool

using executorch::aten::ScalarType;
using executorch::extension::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

static double since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

static int fail(const char* what, int code) {
  std::fprintf(stderr, "et_runner: %s (error 0x%x)\n", what, code);
  return 3;
}

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: %s model.pte inputs.f32 outputs.f32 runs threads\n", argv[0]);
    return 2;
  }
  const int runs = std::atoi(argv[4]), threads = std::atoi(argv[5]);
  executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(threads);
  auto t0 = std::chrono::steady_clock::now();
  Module module(argv[1]);
  if (Error e = module.load_method("forward"); e != Error::Ok) return fail("cannot load method forward", (int)e);
  const double load_s = since(t0);
  auto meta = module.method_meta("forward");
  if (!meta.ok()) return fail("no method_meta for forward", (int)meta.error());

  std::vector<std::vector<int32_t>> shapes;
  size_t per_sample = 0;
  for (size_t i = 0; i < meta->num_inputs(); ++i) {
    auto info = meta->input_tensor_meta(i);
    if (!info.ok()) return fail("an input that is not a tensor", (int)info.error());
    if (info->scalar_type() != ScalarType::Float) return fail("an input that is not float32", 0);
    std::vector<int32_t> sizes(info->sizes().begin(), info->sizes().end());
    size_t numel = 1;
    for (int32_t s : sizes) numel *= (size_t)s;
    per_sample += numel;
    shapes.push_back(sizes);
  }
  std::ifstream in(argv[2], std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const size_t n_floats = bytes.size() / sizeof(float);
  if (per_sample == 0 || bytes.size() % sizeof(float) || n_floats % per_sample)
    return fail("inputs.f32 does not hold whole samples of the program's inputs", (int)n_floats);
  const float* data = reinterpret_cast<const float*>(bytes.data());
  std::FILE* out = std::fopen(argv[3], "wb");
  if (!out) return fail("cannot write outputs.f32", 0);

  std::vector<executorch::extension::TensorPtr> keep;
  std::vector<EValue> args;
  std::string out_shapes;
  for (size_t sample = 0; sample < n_floats / per_sample; ++sample) {
    keep.clear();
    args.clear();
    for (const auto& sizes : shapes) {
      size_t numel = 1;
      for (int32_t s : sizes) numel *= (size_t)s;
      keep.push_back(executorch::extension::make_tensor_ptr(sizes, std::vector<float>(data, data + numel)));
      data += numel;
      args.emplace_back(*keep.back());
    }
    auto result = module.forward(args);
    if (!result.ok()) return fail("forward failed", (int)result.error());
    out_shapes.clear();
    for (const EValue& v : *result) {
      if (!v.isTensor() || v.toTensor().scalar_type() != ScalarType::Float)
        return fail("an output that is not a float32 tensor", 0);
      const auto& t = v.toTensor();
      std::fwrite(t.const_data_ptr<float>(), sizeof(float), t.numel(), out);
      out_shapes += out_shapes.empty() ? "[" : ",[";
      for (ssize_t d = 0; d < t.dim(); ++d) out_shapes += (d ? "," : "") + std::to_string(t.size(d));
      out_shapes += "]";
    }
  }
  std::fclose(out);
  std::string times;
  for (int r = 0; r < runs; ++r) {  // on the last sample's inputs
    auto t = std::chrono::steady_clock::now();
    auto result = module.forward(args);
    const double s = since(t);
    if (!result.ok()) return fail("forward failed while timing", (int)result.error());
    times += (r ? "," : "") + std::to_string(s);
  }
  struct utsname u;
  uname(&u);
  std::printf("{\"machine\": \"%s\", \"output_shapes\": [%s], \"load_s\": %f, \"times_s\": [%s]}\n",
              u.machine, out_shapes.c_str(), load_s, times.c_str());
  return 0;
}
'''


def _qemu() -> str:
    qemu = shutil.which("qemu-aarch64-static")
    if not qemu:
        raise EmulatorError("qemu-aarch64-static not found", DEVICE_HINT)
    return qemu


def qemu_version() -> str:
    """``qemu-aarch64 version 7.2.22 (...)``: the first line of its ``--version``."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run([_qemu(), "--version"], capture_output=True, text=True, timeout=30)
        return (done.stdout.splitlines() or ["unknown"])[0].strip()
    return "unknown"


def _guest_env() -> dict:
    """A clean environment (qemu hands all of it to the guest), with the CPU qemu emulates."""
    return {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "LANG": "C.UTF-8", "QEMU_CPU": QEMU_CPU,
            "PYTHONNOUSERSITE": "1", "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONPATH": f"{litert_site()}:{emu.cache_dir() / 'site-packages'}"}


def _run_guest(runtime: str, program_args: list[str], timeout: float) -> dict:
    root = programs_root()
    _write_cpuinfo(root)
    if runtime == "litert":
        cmd = [_qemu(), "-L", str(root), str(root) + emu.GUEST_PYTHON, *program_args]
    else:
        cmd = [_qemu(), "-L", str(root), str(executorch_dir() / "et_runner"), *program_args]
    name = {"litert": "LiteRT", "executorch": "ExecuTorch"}[runtime]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=_guest_env(), timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EmulatorError(f"{name} on the emulated aarch64 device did not finish within {timeout:.0f} s",
                            "the machine may be very busy: give it a longer timeout") from None
    if done.returncode != 0:
        signal = {-11: "SIGSEGV", 139: "SIGSEGV", -4: "SIGILL", 132: "SIGILL"}.get(done.returncode)
        what = f"crashed ({signal})" if signal else f"failed (exit {done.returncode})"
        raise EmulatorError(f"{name} on the emulated aarch64 device {what}: {_tail(done.stdout + done.stderr)}",
                            REINSTALL_HINT)
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise EmulatorError(f"{name} on the emulated aarch64 device printed no result: "
                            f"{_tail(done.stdout + done.stderr)}", REINSTALL_HINT) from None


# --------------------------------------------------------------------------- verification

def _expected(pkg) -> tuple[dict, dict, str, float, float]:
    """(inputs, expected outputs, precision, atol, rtol) as the package's own checks use them
    (:meth:`Package.check_timed`): an INT8 program against the stored fake-quantized outputs,
    with the INT8 tolerance."""
    from structexport.package import PackageCorruptError
    inputs, expected = pkg.verification_arrays()
    atol, rtol = pkg.tolerances
    if pkg.precision != "int8":
        return inputs, expected, pkg.precision, atol, rtol
    int8: dict[str, list] = {}
    with np.load(pkg.verification_data, allow_pickle=False) as data:
        for key in data.files:
            kind, _, rest = key.partition("/")
            if kind == "int8":
                label, _, index = rest.rpartition("/")
                int8.setdefault(label, []).append((int(index), data[key]))
    if set(int8) != set(inputs):
        raise PackageCorruptError(f"{pkg.root}: an INT8 package without INT8 outputs for every input",
                                  "convert the model again with `structexport convert`")
    expected = {k: [a for _, a in sorted(v)] for k, v in int8.items()}
    return inputs, expected, "int8", float(pkg.manifest["int8"]["tolerance"]["atol"]), 0.0


def _samples(inputs: dict) -> list[list[np.ndarray]]:
    """Each stored input as its arrays in the model's input order, as float32."""
    return [[np.asarray(a, dtype=np.float32) for a in (x.values() if isinstance(x, dict) else [x])]
            for x in inputs.values()]


def _run_litert(program: Path, samples: list, work: Path, runs: int, threads: int,
                timeout: float) -> tuple[list[list[np.ndarray]], dict]:
    np.savez(work / "feed.npz", **{f"{n}/{j}": a for n, arrays in enumerate(samples)
                                   for j, a in enumerate(arrays)})
    (work / "guest.py").write_text(GUEST_LITERT)
    info = _run_guest("litert", [str(work / "guest.py"), str(program), str(work / "feed.npz"),
                                 str(work / "out.npz"), str(runs), str(threads)], timeout)
    with np.load(work / "out.npz") as data:
        keys = sorted((tuple(int(p) for p in k.split("/")), k) for k in data.files)
        outputs = [[data[k] for (n2, _j), k in keys if n2 == n] for n in range(len(samples))]
    return outputs, info


def _run_executorch(program: Path, samples: list, work: Path, runs: int, threads: int,
                    timeout: float) -> tuple[list[list[np.ndarray]], dict]:
    np.concatenate([a.ravel() for arrays in samples for a in arrays]).astype(np.float32).tofile(work / "in.f32")
    info = _run_guest("executorch", [str(program), str(work / "in.f32"), str(work / "out.f32"),
                                     str(runs), str(threads)], timeout)
    flat = np.fromfile(work / "out.f32", dtype=np.float32)
    shapes = [tuple(s) for s in info["output_shapes"]]
    sizes = [int(np.prod(s)) for s in shapes]
    if flat.size != len(samples) * sum(sizes):
        raise EmulatorError(f"ExecuTorch on the emulated aarch64 device wrote {flat.size} output values, "
                            f"not {len(samples)} x {sum(sizes)}", REINSTALL_HINT)
    outputs, at = [], 0
    for _ in samples:
        sample = []
        for shape, size in zip(shapes, sizes):
            sample.append(flat[at:at + size].reshape(shape))
            at += size
        outputs.append(sample)
    return outputs, {**info, "runtime_version": EXECUTORCH_WHEEL.split("==")[1]}


def _timing(times_s: list[float], threads: int) -> dict:
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    if not ms.size:
        return {"label": EMULATED, "note": TIMING_NOTE, "runs": 0, "threads": threads}
    return {"label": EMULATED, "note": TIMING_NOTE, "runs": int(ms.size), "threads": threads,
            "median_ms": round(float(np.median(ms)), 3), "min_ms": round(float(ms.min()), 3),
            "max_ms": round(float(ms.max()), 3)}


def verify_on_emulated_arm(package_dir: str | os.PathLike, *, runs: int = 10, threads: int = 1,
                           timeout: float = 900.0, progress: Progress = None) -> dict:
    """Run the package's program (``model.tflite`` of a litert package, ``model.pte`` of an
    executorch one) on the emulated aarch64 device on every stored verification input, compare
    with the package's expected outputs within its tolerances (as its own checks do), and
    time ``runs`` more runs there with ``threads`` threads.

    Returns a dict: ``passed``, ``max_abs_diff``, ``max_rel_diff``, ``atol``/``rtol``,
    ``summary``, per-output ``checks``, ``timing`` (``label: "emulated"``; median/min/max ms),
    ``runtime`` and versions. Installs the aarch64 runtime when missing
    (:func:`ensure_runtime_installed`), but not the device itself (``structexport device
    setup-emulated-arm``: ~560 MB). Raises :class:`EmulatedTargetUnsupportedError` (exit 2)
    for a package of another target or bad ``runs``/``threads``, and
    :class:`~structexport.errors.EmulatorError` (exit 45) when the device is not installed or
    the guest cannot run the program. A mismatch is not raised: ``passed`` is False."""
    from structexport.export import verify_arrays
    from structexport.package import Package, PackageCorruptError
    pkg = Package.load(package_dir)
    if pkg.target not in RUNTIMES:
        raise EmulatedTargetUnsupportedError(
            f"{pkg.root} has target {pkg.target!r}: only the programs of litert and executorch packages "
            "run on the emulated aarch64 device here (a TVM library runs there through --target tvm-arm)",
            "convert with --target litert or --target executorch")
    program = pkg.program
    if program is None:
        raise PackageCorruptError(f"{pkg.root} lists no {pkg.target} program in its manifest",
                                  f"convert the model again with --target {pkg.target}")
    if runs < 1 or threads < 1:
        raise EmulatedTargetUnsupportedError(f"runs ({runs}) and threads ({threads}) must be at least 1")
    if not emu.is_installed():
        raise EmulatorError("the emulated aarch64 device is not installed", DEVICE_HINT)
    runtime = pkg.target
    ensure_runtime_installed(runtime, progress)
    inputs, expected, precision, atol, rtol = _expected(pkg)
    samples = _samples(inputs)
    if progress:
        progress(f"running {program.name} on the emulated aarch64 device ({QEMU_CPU} under qemu; "
                 f"timings {EMULATED})")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="structexport-emulated-") as tmp:
        run = _run_litert if runtime == "litert" else _run_executorch
        outputs, info = run(program, samples, Path(tmp), runs, threads, timeout)
    wall_s = time.perf_counter() - started
    if info.get("machine") != "aarch64":
        raise EmulatorError(f"the guest reports machine {info.get('machine')!r}, not aarch64", REINSTALL_HINT)
    qemu = qemu_version()
    name = {"litert": "LiteRT", "executorch": "ExecuTorch"}[runtime]
    described = f"{name} {info['runtime_version']} (XNNPACK), aarch64 {QEMU_CPU} emulated by {qemu}"
    replies = iter(outputs)

    def replay(_x):   # verify_arrays asks for the inputs in their order: the guest ran them so
        return next(replies)
    result = verify_arrays(replay, inputs, expected, precision, atol, rtol, runtime=described)
    return {"package": str(pkg.root), "program": program.name, "target": pkg.target,
            "precision": precision, "device": "emulated-arm", "emulated": True,
            "machine": info["machine"], "cpu": QEMU_CPU, "qemu": qemu, "runtime": described,
            "runtime_version": info["runtime_version"],
            "passed": bool(result.passed), "atol": atol, "rtol": rtol,
            "max_abs_diff": result.max_abs_diff, "max_rel_diff": result.max_rel_diff,
            "summary": result.summary(), "checks": [asdict(c) for c in result.checks],
            "load_s": round(float(info["load_s"]), 3), "wall_s": round(wall_s, 2),
            "timing": _timing(info["times_s"], threads)}
