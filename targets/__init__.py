"""Target backends (installed as ``structexport.targets``): one interface for all.

``onnx``, ``ort-cpu``, ``tvm-llvm`` (this host), ``tvm-arm`` (64-bit ARM, cross-compiled,
verified over RPC), ``tvm-cuda`` (compiles anywhere, verifies where a GPU is), ``executorch`` (an ExecuTorch
program with the XNNPACK delegate) and ``litert`` (a LiteRT/TFLite model with the XNNPACK
delegate).
"""
from structexport.errors import StructExportError

from .base import ProgramTarget, Target
from .executorch_target import ExecuTorchTarget
from .litert_target import LiteRTTarget
from .onnx_targets import OnnxTarget, OrtCpuTarget
from .tvm_targets import ARM_PRESETS, TvmArmTarget, TvmCudaTarget, TvmLlvmTarget

TARGETS: dict[str, Target] = {t.name: t for t in (OnnxTarget(), OrtCpuTarget(), TvmLlvmTarget(),
                                                  TvmArmTarget(), TvmCudaTarget(), ExecuTorchTarget(),
                                                  LiteRTTarget())}


class UnknownTargetError(StructExportError):
    exit_code, kind = 35, "unknown-target"


def is_program_target(name: str) -> bool:
    """Whether ``name`` is a target whose runtime loads a program lowered from torch (ExecuTorch,
    LiteRT)."""
    return isinstance(TARGETS.get(name), ProgramTarget)


def get_target(name: str, options: dict | None = None) -> Target:
    """The target called ``name``, configured with per-run ``options`` (TVM: tvm_target,
    tvm_preset, device, tune_trials, tuning_db, progress)."""
    if name not in TARGETS:
        raise UnknownTargetError(f"unknown target {name!r}", f"choose one of {', '.join(TARGETS)}")
    return TARGETS[name].configure(dict(options or {}))


__all__ = ["TARGETS", "ARM_PRESETS", "Target", "ProgramTarget", "get_target", "is_program_target",
           "UnknownTargetError"]
