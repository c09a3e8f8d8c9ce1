"""The one place ONNX Runtime sessions are made, so every command runs a model alike."""
from __future__ import annotations

from pathlib import Path


def ort_session(model: str | Path | bytes, threads: int = 1, optimize: bool = True,
                profile_prefix: str | Path | None = None,
                optimized_model_path: str | Path | None = None):
    """A CPU session: all graph optimizations (``optimize=False``: none, for verification
    against the unoptimized graph), ``threads`` intra-op threads, sequential execution,
    warnings off. ``profile_prefix`` turns on ONNX Runtime's profiler;
    ``optimized_model_path`` saves the optimized graph (whose node names the profile uses)."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                   else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
