"""Target backends (installed as ``structexport.targets``): one interface for all.

Today: ``onnx``, ``ort-cpu``, ``tvm-llvm`` (this host) and ``tvm-cuda`` (compiles anywhere,
verifies where a GPU is), TVM ones untuned. ``tvm-arm`` registers here the same way.
"""
from structexport.errors import StructExportError

from .base import Target
from .onnx_targets import OnnxTarget, OrtCpuTarget
from .tvm_targets import TvmCudaTarget, TvmLlvmTarget

TARGETS: dict[str, Target] = {t.name: t for t in (OnnxTarget(), OrtCpuTarget(), TvmLlvmTarget(), TvmCudaTarget())}


class UnknownTargetError(StructExportError):
    exit_code, kind = 35, "unknown-target"


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UnknownTargetError(f"unknown target {name!r}", f"choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["TARGETS", "Target", "get_target", "UnknownTargetError"]
