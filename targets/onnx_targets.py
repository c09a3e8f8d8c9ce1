"""The ``onnx`` target (a portable ONNX model) and ``ort-cpu`` (ONNX Runtime on CPU)."""
from __future__ import annotations

from pathlib import Path

from .base import Target


class OnnxTarget(Target):
    name = "onnx"
    description = "portable ONNX model (opset 18); batch norm folded for runtimes that do not"
    folds_batchnorm = False


class OrtCpuTarget(Target):
    name = "ort-cpu"
    description = ("ONNX Runtime on CPU: model.onnx, ONNX Runtime's optimized model and its "
                   ".ort form for mobile runtimes")
    folds_batchnorm = True  # ONNX Runtime fuses Conv + BatchNormalization itself

    def write_artifacts(self, onnx_path: Path, outdir: Path) -> dict[str, str]:
        import onnxruntime as ort

        from structexport.ortsession import ort_session
        written = {}
        # The optimized ONNX model, at the level ORT runs it (may hold host-specific layouts).
        ort_session(onnx_path, optimized_model_path=outdir / "model.optimized.onnx")
        written["model.optimized.onnx"] = "ONNX Runtime's optimized graph (all optimizations; this CPU)"
        # The .ort format for ONNX Runtime Mobile, at the portable (extended) level.
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(outdir / "model.ort")
        so.add_session_config_entry("session.save_model_format", "ORT")
        so.log_severity_level = 3
        ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        written["model.ort"] = "ORT format for ONNX Runtime Mobile (portable optimizations)"
        return written
