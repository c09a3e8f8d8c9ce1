"""The ``litert`` target: a LiteRT (TFLite) model (``model.tflite``) with the XNNPACK delegate.

It converts the rewritten torch module (the same structure plan as ``model.onnx``: sum-pools
as banded 1x1 convs and depthwise convs of ones, the form XNNPACK delegates and the fastest
measured there too) with litert-torch, and its dense counterpart the same way
(``reference.tflite``, what ``bench`` times it against). What XNNPACK does not take runs on
LiteRT's builtin kernels: the build records every such op, the layers it belongs to and the
share of multiply-accumulates delegated. The INT8 form is PT2E with litert-torch's quantizer,
with the decisions of the executorch target (docs/litert.md); the artifacts, INT8 stage and
checks are :class:`~.base.ProgramTarget`'s.
"""
from __future__ import annotations

from pathlib import Path

from structexport.litert_lower import LiteRTExportError

from .base import ProgramTarget

PROGRAM = "model.tflite"
DENSE_PROGRAM = "reference.tflite"
DENSE_INT8_PROGRAM = "reference.int8.tflite"


class LiteRTTarget(ProgramTarget):
    name = "litert"
    description = ("LiteRT (TFLite) model (model.tflite) with the XNNPACK delegate, for phones and boards; "
                   "reference.tflite is its dense counterpart")
    # The sum-pool form XNNPACK delegates and runs fastest on LiteRT too (2.78x over the dense
    # 3x3 conv for one C/2x2x2 layer): a banded 1x1 conv over channels, a depthwise conv of ones.
    sumpool_realization = "banded"
    programs = {"structured": PROGRAM, "dense": DENSE_PROGRAM, "dense_int8": DENSE_INT8_PROGRAM}
    runtime_name = "LiteRT"
    program_noun = "model"
    lowering = "convert to LiteRT (litert-torch)"
    quantizer_name = "litert-torch's PT2EQuantizer"
    quantization_notes = {"io": "int8 input and output; the runner quantizes the input and dequantizes "
                                "the output with the model's scales"}
    export_error = LiteRTExportError

    def runtime_version(self) -> str:
        from structexport.litert_runtime import require_litert
        return require_litert()

    def versions(self) -> dict:
        from structexport.litert_runtime import require_litert_converter
        return {"runtime": "litert", "litert": self.runtime_version(), "litert_torch": require_litert_converter()}

    def runner(self, path: Path, threads: int = 1):
        from structexport.litert_runtime import runner
        return runner(path, threads)

    def timer(self, path: Path, feed, threads: int = 1):
        from structexport.litert_runtime import timer
        return timer(path, feed, threads)

    def lower(self, module, example, path: Path, structured_layers: list[str] | None = None) -> dict:
        from structexport.litert_lower import convert_to_tflite
        return convert_to_tflite(module, example, path, structured_layers)

    def quantized_program(self, module, example, calibration, inputs: dict, path: Path,
                          structured_layers: list[str] | None = None):
        from structexport.litert_int8 import quantized_program
        return quantized_program(module, example, calibration, inputs, path, structured_layers)

    def time_layer_int8(self, layer, in_shape, workdir: Path, threads: int = 1) -> dict[str, float]:
        from structexport.litert_int8 import time_layer_int8
        return time_layer_int8(layer, in_shape, workdir, threads)

    def int8_layer_cache(self) -> Path:
        from structexport.litert_int8 import layer_cache_path
        return layer_cache_path()

    def int8_machine_label(self) -> str:
        from structexport.litert_runtime import require_litert_converter
        return f"litert-torch {require_litert_converter()} int8 xnnpack"
