"""Graph passes that rewrite structured layers (installed as ``structexport.passes``).

One pass per file, named ``<verb>_<noun>_pass.py``; :mod:`.infra` holds the pass base
class, the context, the records and the manager. ``PIPELINE`` is the default order.
"""
from structexport.errors import StructExportError

from .decompose_structured_conv_pass import DecomposeStructuredConvPass
from .decompose_structured_pass import DecomposeStructuredPass
from .fold_batchnorm_pass import FoldBatchNormPass
from .infra import (ONNX, TORCH, LayerRecord, ModelKind, Pass, PassContext, PassError, PassManager,
                    PassResult, PassRun, replace_module)
from .lower_sparse_conv_pass import LowerSparseConvPass
from .lower_ssc_pass import LowerSSCPass
from .materialize_csg_pass import MaterializeCSGPass
from .project_structured_weights_pass import ProjectStructuredWeightsPass
from .realize_sumpool_pass import RealizeSumPoolPass

PASS_CLASSES = [DecomposeStructuredPass, RealizeSumPoolPass, MaterializeCSGPass, LowerSSCPass,
                FoldBatchNormPass]
PASSES = {cls.name: cls for cls in PASS_CLASSES}
PIPELINE = [cls.name for cls in PASS_CLASSES]
# Passes over ONNX graphs, for models that arrive without the zoo's layer classes: the
# structure is discovered in their weights.
ONNX_PASS_CLASSES = [ProjectStructuredWeightsPass, DecomposeStructuredConvPass, LowerSparseConvPass]
ONNX_PASSES = {cls.name: cls for cls in ONNX_PASS_CLASSES}
ONNX_PIPELINE = [cls.name for cls in ONNX_PASS_CLASSES]


class UnknownPassError(StructExportError):
    exit_code, kind = 36, "unknown-pass"


def select_passes(default: list[str], only: list[str] | None = None,
                  skip: list[str] | None = None) -> list[Pass]:
    """The passes to run: ``only`` (in pipeline order) or ``default``, minus ``skip``."""
    for name in (only or []) + (skip or []):
        if name not in PASSES:
            raise UnknownPassError(f"unknown pass {name!r}", f"choose from {', '.join(PIPELINE)}")
    chosen = [n for n in PIPELINE if n in only] if only else list(default)
    return [PASSES[n]() for n in chosen if n not in (skip or [])]


__all__ = ["LayerRecord", "ModelKind", "ONNX", "TORCH", "Pass", "PassContext", "PassError", "PassManager",
           "PassResult", "PassRun", "replace_module", "PASSES", "PIPELINE", "ONNX_PASSES", "ONNX_PIPELINE",
           "select_passes", "select_onnx_passes", "UnknownPassError"]


def select_onnx_passes(only: list[str] | None = None, skip: list[str] | None = None) -> list[Pass]:
    """The ONNX passes to run: ``only`` (in pipeline order) or all, minus ``skip``."""
    for name in (only or []) + (skip or []):
        if name not in ONNX_PASSES and name not in PASSES:
            raise UnknownPassError(f"unknown pass {name!r}", f"choose from {', '.join(ONNX_PIPELINE)}")
    chosen = [n for n in ONNX_PIPELINE if n in only] if only else list(ONNX_PIPELINE)
    return [ONNX_PASSES[n]() for n in chosen if n not in (skip or [])]
