"""Target backends (installed as ``structexport.targets``): one interface for all.

Today: ``onnx``, ``ort-cpu`` and ``tvm-llvm`` (this host, untuned). The other Apache TVM
targets (64-bit ARM, CUDA) register here the same way.
"""
from structexport.errors import StructExportError

from .base import Target
from .onnx_targets import OnnxTarget, OrtCpuTarget
from .tvm_targets import TvmLlvmTarget

TARGETS: dict[str, Target] = {t.name: t for t in (OnnxTarget(), OrtCpuTarget(), TvmLlvmTarget())}


class UnknownTargetError(StructExportError):
    exit_code, kind = 35, "unknown-target"


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UnknownTargetError(f"unknown target {name!r}", f"choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["TARGETS", "Target", "get_target", "UnknownTargetError"]
