"""Target backends (installed as ``structexport.targets``): one interface for all.

Today: ``onnx`` and ``ort-cpu``. Apache TVM targets (x86, 64-bit ARM, CUDA) arrive with the
TVM work and register here the same way.
"""
from structexport.errors import StructExportError

from .base import Target
from .onnx_targets import OnnxTarget, OrtCpuTarget

TARGETS: dict[str, Target] = {t.name: t for t in (OnnxTarget(), OrtCpuTarget())}


class UnknownTargetError(StructExportError):
    exit_code, kind = 35, "unknown-target"


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise UnknownTargetError(f"unknown target {name!r}", f"choose one of {', '.join(TARGETS)}")
    return TARGETS[name]


__all__ = ["TARGETS", "Target", "get_target", "UnknownTargetError"]
