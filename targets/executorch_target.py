"""The ``executorch`` target: an ExecuTorch program (``model.pte``) with the XNNPACK delegate.

It lowers the rewritten torch module (the same structure plan as ``model.onnx``: sum-pools as
banded 1x1 convs and depthwise convs of ones, the form XNNPACK delegates and the fastest
measured there, DESIGN.md section 6) with ``torch.export`` and XNNPACK's partitioner, and its
dense counterpart the same way (``reference.pte``, what ``bench`` times it against).
What XNNPACK did not take runs on ExecuTorch's portable kernels: the build records every
such op, the layers it belongs to and the share of multiply-accumulates delegated. The
artifacts, INT8 stage and checks are :class:`~.base.ProgramTarget`'s.
"""
from __future__ import annotations

from pathlib import Path

from structexport.executorch_lower import ExecuTorchExportError

from .base import ProgramTarget

PROGRAM = "model.pte"
DENSE_PROGRAM = "reference.pte"
DENSE_INT8_PROGRAM = "reference.int8.pte"


class ExecuTorchTarget(ProgramTarget):
    name = "executorch"
    description = ("ExecuTorch program (model.pte) with the XNNPACK delegate, for phones and boards; "
                   "reference.pte is its dense counterpart")
    # The sum-pool form XNNPACK delegates and runs fastest (DESIGN.md section 6): a banded
    # 1x1 conv over channels, a depthwise conv of ones over pixels.
    sumpool_realization = "banded"
    programs = {"structured": PROGRAM, "dense": DENSE_PROGRAM, "dense_int8": DENSE_INT8_PROGRAM}
    runtime_name = "ExecuTorch"
    lowering = "lower to ExecuTorch (XNNPACK)"
    quantizer_name = "XNNPACK's quantizer"
    export_error = ExecuTorchExportError

    def runtime_version(self) -> str:
        from structexport.executorch_runtime import require_executorch
        return require_executorch()

    def versions(self) -> dict:
        return {"runtime": "executorch", "executorch": self.runtime_version()}

    def runner(self, path: Path, threads: int = 1):
        from structexport.executorch_runtime import runner
        return runner(path, threads)

    def timer(self, path: Path, feed, threads: int = 1):
        from structexport.executorch_runtime import timer
        return timer(path, feed, threads)

    def lower(self, module, example, path: Path, structured_layers: list[str] | None = None) -> dict:
        from structexport.executorch_lower import lower_to_pte
        return lower_to_pte(module, example, path, structured_layers)

    def quantized_program(self, module, example, calibration, inputs: dict, path: Path,
                          structured_layers: list[str] | None = None):
        from structexport.executorch_int8 import quantized_program
        return quantized_program(module, example, calibration, inputs, path, structured_layers)

    def time_layer_int8(self, layer, in_shape, workdir: Path, threads: int = 1) -> dict[str, float]:
        from structexport.executorch_int8 import time_layer_int8
        return time_layer_int8(layer, in_shape, workdir, threads)

    def int8_layer_cache(self) -> Path:
        from structexport.executorch_int8 import layer_cache_path
        return layer_cache_path()

    def int8_machine_label(self) -> str:
        return f"executorch {self.runtime_version()} int8 xnnpack"
