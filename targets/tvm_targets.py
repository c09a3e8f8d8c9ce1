"""Apache TVM targets: ``tvm-llvm`` (this host's CPU), ``tvm-arm`` (64-bit ARM with NEON,
cross-compiled, with board presets) and ``tvm-cuda`` (compiles on any machine, runs where a
CUDA GPU is).

The verified ONNX model is imported with TVM's Relax ONNX frontend, compiled with
``tvm.compile`` -- or, with ``--tune quick|full|N`` (a budget per task) or ``--tune-trials
N`` (in all), tuned with MetaSchedule and compiled with its database -- and exported as a shared library. The library is then loaded on its
device (this host, or a device over TVM's RPC: ``--rpc``, ``--tracker``, or for ARM the
emulated aarch64 device by default) and run on the same inputs as the ONNX verification,
against the PyTorch source model.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from pathlib import Path

from structexport.emulated_arm import CROSS_COMPILER as CROSS_CXX
from structexport.errors import CrossCompilerMissingError, StructExportError

from .base import Target


# How structured convs are compiled (--tvm-structured): see TvmLlvmTarget.structured_mode.
STRUCTURED_MODES = ("fused", "decomposed")


class TvmError(StructExportError):
    exit_code, kind = 41, "tvm-failed"


class TvmTargetSpecError(StructExportError):
    exit_code, kind = 2, "usage"


# Board presets for --target tvm-arm (--tvm-preset NAME). LLVM CPU names; NEON everywhere.
ARM_PRESETS: dict[str, dict] = {
    "aarch64": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]},
    "rpi4": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72",
             "mattr": ["+neon"], "num-cores": 4},
    "rpi5": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76",
             "mattr": ["+neon", "+dotprod", "+fullfp16"], "num-cores": 4},
    "jetson-orin-cpu": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a78ae",
                        "mattr": ["+neon", "+dotprod", "+fullfp16"], "num-cores": 12},
    "graviton2": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-n1",
                  "mattr": ["+neon", "+dotprod", "+fullfp16"]},
    "graviton3": {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v1",
                  "mattr": ["+neon", "+sve", "+dotprod", "+fullfp16"]},
}
PRESET_DESCRIPTIONS = {
    "aarch64": "any 64-bit ARM CPU with NEON (the default)",
    "rpi4": "Raspberry Pi 4 (Cortex-A72, 4 cores)",
    "rpi5": "Raspberry Pi 5 (Cortex-A76, 4 cores)",
    "jetson-orin-cpu": "NVIDIA Jetson AGX Orin's CPU (Cortex-A78AE, 12 cores)",
    "graviton2": "AWS Graviton2 (Neoverse N1)",
    "graviton3": "AWS Graviton3 (Neoverse V1, SVE)",
}


@contextlib.contextmanager
def quiet_native_stderr():
    """TVM's C++ runtime logs warnings straight to file descriptor 2."""
    if os.environ.get("STRUCTEXPORT_TVM_LOG"):
        yield
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tvm():
    try:
        import tvm
        from tvm import relax
    except Exception as exc:  # not installed, or a broken ffi pin
        raise TvmError(f"Apache TVM is not usable here: {type(exc).__name__}: {exc}",
                       "install it with pip install -e '.[tvm]' (make setup does)") from None
    return tvm, relax


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:200]


class TvmLlvmTarget(Target):
    name = "tvm-llvm"
    description = "Apache TVM for this host's CPU (LLVM): model.so"
    library = "model.so"
    device_kind = "cpu"

    default_structured_mode = "fused"

    def __init__(self, options: dict | None = None):
        self.options = dict(options or {})
        self.build_info: dict = {}

    def configure(self, options: dict) -> "TvmLlvmTarget":
        configured = copy.copy(self)
        configured.options = {k: v for k, v in options.items() if v is not None}
        configured.build_info = {}
        configured.tvm_target()  # validate now, before any work
        configured.structured_mode()
        return configured

    # ------------------------------------------------------------------ the TVM target
    def default_tvm_target(self) -> dict:
        """This host's CPU named (``mcpu``): without it LLVM emits no vector code beyond
        SSE2 (6.3x slower than ONNX Runtime measured, 1.5x with the CPU named). The
        library then runs on that CPU family only; ``--tvm-target`` builds for another."""
        from structexport.machine import llvm_host_cpu
        cpu = llvm_host_cpu()
        return {"kind": "llvm", "mcpu": cpu} if cpu else {"kind": "llvm"}

    def tvm_target(self) -> dict:
        """``--tvm-target JSON`` wins over ``--tvm-preset``, which wins over the default."""
        raw = self.options.get("tvm_target")
        if raw:
            try:
                spec = json.loads(raw) if isinstance(raw, str) else dict(raw)
            except json.JSONDecodeError as exc:
                raise TvmTargetSpecError(f"--tvm-target is not JSON: {exc.msg} at column {exc.colno}",
                                         'write it like \'{"kind": "llvm", "mcpu": "cortex-a72"}\'') from None
            if not isinstance(spec, dict) or "kind" not in spec:
                raise TvmTargetSpecError("--tvm-target must be a JSON object with a \"kind\"",
                                         'e.g. \'{"kind": "llvm", "mtriple": "aarch64-linux-gnu"}\'')
            return spec
        if self.options.get("tvm_preset"):
            raise TvmTargetSpecError(f"--tvm-preset applies to --target tvm-arm, not {self.name}",
                                     "use --tvm-target JSON to change this target")
        return self.default_tvm_target()

    def target_host(self) -> dict | None:
        """The host side of a device target (None: the target runs on its own host)."""
        return None

    def runs_on(self) -> str:
        """What the library needs, for the manifest."""
        mcpu = self.tvm_target().get("mcpu")
        return (f"CPUs of the LLVM family {mcpu!r} (and those with all its instruction sets)"
                if mcpu else "any CPU of the target's architecture (no mcpu: baseline instructions)")

    def _target(self, tvm):
        try:
            return tvm.target.Target(self.tvm_target(), host=self.target_host())
        except Exception as exc:
            raise TvmTargetSpecError(f"TVM does not accept the target {json.dumps(self.tvm_target())}: "
                                     f"{_first_line(exc)}", "fix --tvm-target") from None

    def preflight(self) -> None:
        _tvm()
        device = self.options.get("device")
        if device is not None and getattr(device, "remote", False):
            from structexport.rpc import probe
            probe(device)

    # ------------------------------------------------------------------ build
    def structured_mode(self) -> str:
        """``fused`` (default): structured convs become the fused operator of
        ``structexport.tvm_fused``, built from the composed graph convert hands over;
        ``decomposed``: the decomposed ONNX graph's operators, each compiled on its own."""
        mode = self.options.get("tvm_structured") or self.default_structured_mode
        if mode not in STRUCTURED_MODES:
            raise TvmTargetSpecError(f"unknown --tvm-structured {mode!r}", f"choose {' or '.join(STRUCTURED_MODES)}")
        return mode

    def wants_composed_graph(self) -> bool:
        """Whether convert should hand over the composed graph (structured convs as plain
        convs holding their exactly structured kernels) beside the verified model."""
        return self.structured_mode() == "fused"

    def _fuse(self, mod, composed, say):
        from structexport.structure_plan import StructurePlan, onnx_weights
        from structexport.tvm_fused import fuse_structured_convs
        say("fuse the structured convs")
        # which convs, and at what (c, n): the model's structure plan, matched to the
        # composed graph's kernels by value (Relax constants have no names); a package
        # written before plans existed has none, and the structure is discovered again
        plan = self.options.get("structure_plan")
        if isinstance(plan, dict):
            plan = StructurePlan.from_dict(plan)
        kernels = plan.by_kernel(onnx_weights(composed)) if plan is not None else None
        # the pool kernel's vector chunks follow the target's registers (NEON on tvm-arm)
        mod, records = fuse_structured_convs(mod, target=self.tvm_target(), plan=kernels)
        fused = [r for r in records if r.get("fused")]
        self.build_info["structured_convs"] = {
            "mode": "fused", "built_from": "the composed graph (structured convs as plain convs)",
            "structure_from": "the structure plan" if kernels is not None else "discovered in the kernels",
            "convs": len(records), "fused": len(fused),
            "macs_before": sum(int(r.get("macs_before") or 0) for r in fused),
            "macs_after": sum(int(r.get("macs_after") or 0) for r in fused),
            "layers": [{k: r.get(k) for k in ("name", "weight_shape", "structure", "fused", "reason",
                                              "macs_before", "macs_after")} for r in records]}
        return mod

    def export_library(self, executable, path: Path) -> None:
        executable.export_library(str(path))

    def cross_compile(self) -> bool:
        return False

    def write_artifacts(self, onnx_path: Path, outdir: Path) -> dict[str, str]:
        import onnx
        tvm, relax = _tvm()
        from tvm.relax.frontend.onnx import from_onnx
        target = self._target(tvm)
        trials = int(self.options.get("tune_trials") or 0)
        per_task = int(self.options.get("tune_per_task") or 0)
        say = self.options.get("progress") or (lambda _m: None)
        composed = self.options.get("composed_onnx")
        fuse = composed is not None and self.structured_mode() == "fused"
        try:
            with quiet_native_stderr():
                graph = onnx.load(str(composed if fuse else onnx_path))
                mod = from_onnx(graph, keep_params_in_input=False)
                if fuse:
                    mod = self._fuse(mod, graph, say)
                if trials > 0 or per_task > 0:
                    from structexport.tuning import TuningBudget, tune_and_compile, with_core_count
                    spec = with_core_count(self.tvm_target(), self.options.get("device"))
                    self.options["tvm_target"] = json.dumps(spec)
                    target = self._target(tvm)
                    executable, tuning = tune_and_compile(
                        mod, target, spec, TuningBudget(total=trials, per_task=per_task),
                        self.options.get("tuning_db"), device=self.options.get("device"),
                        cross_compile=self.cross_compile(), progress=say)
                    self.build_info["tuning"] = tuning.to_dict()
                else:
                    executable = tvm.compile(mod, target=target)
                self.export_library(executable, outdir / self.library)
        except StructExportError:
            raise
        except Exception as exc:
            raise TvmError(f"TVM could not compile the model: {type(exc).__name__}: {_first_line(exc)}") from None
        self.build_info["tvm_target"] = self.tvm_target()
        self.build_info["runs_on"] = self.runs_on()
        self.build_info.setdefault("structured_convs", {
            "mode": "decomposed", "built_from": onnx_path.name,
            "note": "the decomposed graph's operators compiled one by one"})
        self.build_info.setdefault("tuning", None)
        (outdir / "tvm_target.json").write_text(json.dumps(self.tvm_target()) + "\n")
        tuned = (f"tuned, {self.build_info['tuning']['tasks']} tasks" if self.build_info["tuning"]
                 else "untuned")
        fused = self.build_info["structured_convs"]["mode"] == "fused"
        if fused:
            tuned += f", {self.build_info['structured_convs']['fused']} structured convs fused"
        written = {self.library: f"TVM library for {json.dumps(self.tvm_target())} ({tuned})",
                   "tvm_target.json": "the TVM target the library was built for"}
        if fused:
            from structexport.package import COMPOSED
            if Path(composed) != outdir / COMPOSED:
                shutil.copyfile(composed, outdir / COMPOSED)
            written[COMPOSED] = ("the graph the library was compiled from (structured convs as "
                                 "plain convs with their structured kernels, fused by TVM): "
                                 "profile compiles it the same way")
        return written

    # ------------------------------------------------------------------ run and verify
    @contextlib.contextmanager
    def device_scope(self, progress=None):
        """The device to verify (and tune) on: ``--rpc``/``--tracker`` when given, else this host."""
        yield self.options.get("device")

    def _local_device_missing(self) -> str | None:
        return None

    def verify(self, outdir: Path, reference, inputs, precision, atol, rtol):
        from structexport.export import verify_runner
        from structexport.rpc import LoadedLibrary
        _tvm()
        device = self.options.get("device")
        if isinstance(device, str):          # no device: the reason it was not run
            return device
        if device is None and (missing := self._local_device_missing()):
            return missing
        with quiet_native_stderr():
            loaded = LoadedLibrary(outdir / self.library, device, self.device_kind,
                                   progress=self.options.get("progress"))

        def where():
            return device.describe() if device is not None else f"this host ({self.device_kind})"
        result = verify_runner(reference, loaded.run, inputs, precision, atol, rtol,
                               runtime=f"TVM VM, {self.library} on {where()}")
        result.runtime = f"TVM VM, {self.library} on {where()}"   # a failover mid-run moved it
        return result


class TvmArmTarget(TvmLlvmTarget):
    name = "tvm-arm"
    description = ("Apache TVM for 64-bit ARM with NEON (cross-compiled; --tvm-preset rpi4, rpi5, "
                   "jetson-orin-cpu, graviton2, graviton3): model.so, verified over RPC")

    def default_tvm_target(self) -> dict:
        return copy.deepcopy(ARM_PRESETS["aarch64"])

    def tvm_target(self) -> dict:
        preset = self.options.get("tvm_preset")
        if preset and not self.options.get("tvm_target"):
            if preset not in ARM_PRESETS:
                raise TvmTargetSpecError(f"unknown --tvm-preset {preset!r}",
                                         f"choose one of {', '.join(ARM_PRESETS)}, or pass --tvm-target JSON")
            return copy.deepcopy(ARM_PRESETS[preset])
        return super().tvm_target() if self.options.get("tvm_target") else self.default_tvm_target()

    def cross_compile(self) -> bool:
        return True

    def export_library(self, executable, path: Path) -> None:
        from tvm.support import cc
        executable.export_library(str(path), fcompile=cc.cross_compiler(CROSS_CXX))

    def preflight(self) -> None:
        if not shutil.which(CROSS_CXX):
            raise CrossCompilerMissingError(
                f"the aarch64 cross compiler {CROSS_CXX} is not on PATH",
                "install it with `apt-get install g++-aarch64-linux-gnu` or "
                "`structexport device setup-emulated-arm`")
        super().preflight()

    def write_artifacts(self, onnx_path: Path, outdir: Path) -> dict[str, str]:
        self.preflight()
        tuning = int(self.options.get("tune_trials") or 0) or int(self.options.get("tune_per_task") or 0)
        if tuning > 0 and not hasattr(self.options.get("device"), "remote"):
            from structexport.errors import TuningError
            raise TuningError("tuning for tvm-arm measures on an aarch64 device, and there is none",
                              "pass --rpc HOST:PORT or --tracker HOST:PORT --key KEY, or start "
                              "the emulated one with `structexport device start-emulated-arm`")
        return super().write_artifacts(onnx_path, outdir)

    @contextlib.contextmanager
    def device_scope(self, progress=None):
        """``--rpc``/``--tracker`` when given; else the emulated aarch64 device (the running
        one, or one started for this run when it is installed); else why there is none."""
        if self.options.get("device") is not None:
            yield self.options["device"]
            return
        from structexport.rpc import default_device_for_arm
        with default_device_for_arm(progress) as device:
            yield device


class TvmCudaTarget(TvmLlvmTarget):
    name = "tvm-cuda"
    description = "Apache TVM for NVIDIA GPUs (CUDA, sm_80 by default): model.so"
    device_kind = "cuda"

    def default_tvm_target(self) -> dict:
        return {"kind": "cuda", "arch": "sm_80"}

    def runs_on(self) -> str:
        return f"NVIDIA GPUs of compute capability {self.tvm_target().get('arch', 'sm_80')} or newer"

    # the fused sum-pool kernel is scheduled for CPUs (a loop nest with no GPU thread
    # binding), so CUDA compiles the decomposed graph
    default_structured_mode = "decomposed"

    def structured_mode(self) -> str:
        if self.options.get("tvm_structured") == "fused":
            raise TvmTargetSpecError("--tvm-structured fused is for the CPU targets (tvm-llvm, tvm-arm): "
                                     "the fused sum-pool kernel has no GPU schedule yet",
                                     "drop --tvm-structured, or pass --tvm-structured decomposed")
        return super().structured_mode()

    def target_host(self) -> dict | None:
        return {"kind": "llvm"}

    def _local_device_missing(self) -> str | None:
        tvm, _ = _tvm()
        if not tvm.cuda(0).exist:
            return "not run: no CUDA GPU on this machine; the library runs where one is"
        return None
