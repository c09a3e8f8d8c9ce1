"""Graph passes that rewrite structured layers (installed as ``structexport.passes``).

One pass per file, named ``<verb>_<noun>_pass.py``; :mod:`.infra` holds the pass base
class, the context, the records and the manager. ``PIPELINE`` is the default order.
"""
from structexport.errors import StructExportError

from .compose_dense_layers_pass import ComposeDenseLayersPass
from .decompose_structured_conv_pass import DecomposeStructuredConvPass
from .decompose_structured_pass import DecomposeStructuredPass
from .fold_batchnorm_pass import FoldBatchNormPass
from .infra import (ONNX, TORCH, LayerRecord, ModelKind, Pass, PassContext, PassError, PassManager,
                    PassOptionError,
                    PassResult, PassRun, replace_module)
from .lower_sparse_conv_pass import LowerSparseConvPass
from .lower_ssc_pass import LowerSSCPass
from .materialize_csg_pass import MaterializeCSGPass
from .project_structured_weights_pass import ProjectStructuredWeightsPass
from .realize_sumpool_pass import RealizeSumPoolPass
from .rebase_channel_sums_pass import RebaseChannelSumsPass

PASS_CLASSES = [DecomposeStructuredPass, RealizeSumPoolPass, MaterializeCSGPass, LowerSSCPass,
                FoldBatchNormPass]
PASSES = {cls.name: cls for cls in PASS_CLASSES}
PIPELINE = [cls.name for cls in PASS_CLASSES]
# Passes over ONNX graphs, for models that arrive without the zoo's layer classes: the
# structure is discovered in their weights.
ONNX_PASS_CLASSES = [ProjectStructuredWeightsPass, DecomposeStructuredConvPass, LowerSparseConvPass]
ONNX_PASSES = {cls.name: cls for cls in ONNX_PASS_CLASSES}
ONNX_PIPELINE = [cls.name for cls in ONNX_PASS_CLASSES]
# Run by convert --precision int8 on the exported graph, before it is quantized: the layers
# measured slower structured than dense in INT8 are composed, the rest rebased.
INT8_PASS_CLASSES = [ComposeDenseLayersPass, RebaseChannelSumsPass]


class UnknownPassError(StructExportError):
    exit_code, kind = 36, "unknown-pass"


def _flags(only, skip, names) -> str:
    return " and ".join(f"{flag} {', '.join(n for n in given if n in names)}"
                        for flag, given in (("--passes", only or []), ("--skip-pass", skip or []))
                        if any(n in names for n in given))


def _select(table: dict, pipeline: list[str], default: list[str], foreign_table: dict, kind: str,
            foreign_kind: str, only: list[str] | None, skip: list[str] | None) -> list[Pass]:
    """``only`` (in ``pipeline`` order) or ``default``, minus ``skip``; a pass of the other
    pipeline (``foreign_table``) is refused (exit 2), an unknown one is exit 36."""
    given = (only or []) + (skip or [])
    for name in given:
        if name not in table and name not in foreign_table:
            raise UnknownPassError(f"unknown pass {name!r}", f"choose from {', '.join(pipeline)}")
    foreign = [n for n in given if n in foreign_table]
    if foreign:
        raise PassOptionError(f"{_flags(only, skip, foreign)}: "
                              f"{'a pass' if len(set(foreign)) == 1 else 'passes'} of {foreign_kind}, "
                              f"never run on {kind}", f"{kind} run {', '.join(pipeline)}")
    chosen = [n for n in pipeline if n in only] if only else list(default)
    return [table[n]() for n in chosen if n not in (skip or [])]


def select_passes(default: list[str], only: list[str] | None = None,
                  skip: list[str] | None = None) -> list[Pass]:
    """The passes to run on a zoo checkpoint: ``only`` (in pipeline order) or ``default``,
    minus ``skip``. A pass of the ONNX pipeline (models outside the zoo) is refused (exit 2),
    an unknown one is exit 36."""
    return _select(PASSES, PIPELINE, default, ONNX_PASSES, "zoo checkpoints",
                   "models outside the zoo (ONNX graphs)", only, skip)

__all__ = ["LayerRecord", "ModelKind", "ONNX", "TORCH", "Pass", "PassContext", "PassError", "PassManager",
           "PassResult", "PassRun", "replace_module", "PASSES", "PIPELINE", "ONNX_PASSES", "ONNX_PIPELINE",
           "INT8_PASS_CLASSES",
           "select_passes", "select_onnx_passes", "UnknownPassError", "PassOptionError",
           "OPTION_CONSUMERS", "check_pass_options"]


# Which passes read each pass option, per pipeline: an option none of the passes that will
# run reads would do nothing, so it is refused (check_pass_options). keep_csg_codes is also
# read outside the passes (the export keeps constant subgraphs unfolded), so it is not here.
OPTION_CONSUMERS = {
    "torch": {"autotune": ("realize_sumpool",),
              "sumpool_realization": ("decompose_structured", "realize_sumpool"),
              "declared_structures": ("decompose_structured",),
              "max_residual": ("decompose_structured",)},
    "onnx": {"autotune": ("decompose_structured_conv",),
             "sumpool_realization": ("decompose_structured_conv",),
             "declared_structures": ("project_structured_weights", "decompose_structured_conv"),
             "max_residual": ("project_structured_weights", "decompose_structured_conv")},
}
_FLAGS = {"autotune": "--autotune", "sumpool_realization": "--sumpool-realization",
          "declared_structures": "--declare-structured", "max_residual": "--max-residual",
          "tuning_cache": "--tuning-cache"}


def check_pass_options(names: list[str], options: dict, ir: str) -> None:
    """Refuse (exit 2) pass options that would do nothing with the passes ``names`` of the
    ``ir`` pipeline ("torch": zoo checkpoints, "onnx": models outside the zoo)."""
    given = {k for k, v in options.items() if v not in (None, False, {}, (), [])}
    if "tuning_cache" in given and "autotune" not in given:
        raise PassOptionError("--tuning-cache is the cache of --autotune's measurements, and nothing "
                              "is measured without --autotune", "add --autotune, or leave --tuning-cache out")
    if "autotune" in given and "sumpool_realization" in given:
        raise PassOptionError(f"--autotune and --sumpool-realization {options['sumpool_realization']} "
                              "both choose the sum-pool realizations: a forced one is never measured",
                              "pass one of them")
    if ir == "torch" and "max_residual" in given and "declared_structures" not in given:
        raise PassOptionError("--max-residual on a zoo checkpoint bounds the layers --declare-structured "
                              "names (its structured layers are exact by construction)",
                              "add --declare-structured GLOB=SPEC, or leave --max-residual out")
    for key, consumers in OPTION_CONSUMERS[ir].items():
        if key in given and not any(n in names for n in consumers):
            raise PassOptionError(f"{_FLAGS[key]} is read by {' or '.join(consumers)}, which "
                                  f"{'does' if len(consumers) == 1 else 'do'} not run here "
                                  f"(passes: {', '.join(names) or 'none'})",
                                  f"run {consumers[0]} too, or leave {_FLAGS[key]} out")


def select_onnx_passes(only: list[str] | None = None, skip: list[str] | None = None) -> list[Pass]:
    """The ONNX passes to run: ``only`` (in pipeline order) or all, minus ``skip``. A zoo pass
    (torch modules) is refused (exit 2): it would run nothing on an ONNX graph; an unknown
    one is exit 36."""
    return _select(ONNX_PASSES, ONNX_PIPELINE, ONNX_PIPELINE, PASSES, "models outside the zoo",
                   "zoo checkpoints (torch modules)", only, skip)
