"""The ``onnx`` target (a portable ONNX model) and ``ort-cpu`` (ONNX Runtime on CPU)."""
from __future__ import annotations

import contextlib
from pathlib import Path

from .base import Deployment, Target


def ort_deployment(file: str, level: str, ort_format: bool = False, note: str = "") -> Deployment:
    """``file`` run by ONNX Runtime on CPU, one thread, at graph optimization ``level``."""
    from structexport.ortsession import ort_session, session_options, session_runner
    options = session_options(1, level, ort_format)
    if note:
        options["note"] = note
    return Deployment(file, options,
                      lambda path: session_runner(ort_session(path, 1, level=level, ort_format=ort_format)))


@contextlib.contextmanager
def _optimizing(level: str):
    """ONNX Runtime refusing to optimize the graph (its type inference at that level can fail
    on graphs it runs unoptimized): one line, with the target that does not need it."""
    from structexport.errors import InvalidOnnxModelError
    try:
        yield
    except Exception as exc:
        line = (str(exc).splitlines() or [""])[0][:240]
        raise InvalidOnnxModelError(f"ONNX Runtime cannot optimize the model at {level} (what ort-cpu "
                                    f"ships and times): {line}",
                                    "convert it for --target onnx, checked with optimizations off") from None


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
        with _optimizing("ORT_ENABLE_ALL"):
            # The optimized ONNX model, at the level ORT runs it (may hold host-specific layouts).
            ort_session(onnx_path, optimized_model_path=outdir / "model.optimized.onnx")
        written["model.optimized.onnx"] = "ONNX Runtime's optimized graph (all optimizations; this CPU)"
        # The .ort format for ONNX Runtime Mobile, at the portable (extended) level.
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(outdir / "model.ort")
        so.add_session_config_entry("session.save_model_format", "ORT")
        so.log_severity_level = 3
        with _optimizing("ORT_ENABLE_EXTENDED"):
            ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
        written["model.ort"] = "ORT format for ONNX Runtime Mobile (portable optimizations)"
        return written

    def deployments(self) -> list[Deployment]:
        return [
            ort_deployment("model.onnx", "ORT_ENABLE_ALL",
                           note="as bench, profile and regress run it (they check it again first)"),
            ort_deployment("model.optimized.onnx", "ORT_DISABLE_ALL",
                           note="optimized at conversion (ORT_ENABLE_ALL, this CPU); load it with "
                                "graph optimizations off"),
            ort_deployment("model.ort", "ORT_ENABLE_EXTENDED", ort_format=True,
                           note="made at ORT_ENABLE_EXTENDED, the portable level for ONNX Runtime Mobile"),
        ]
