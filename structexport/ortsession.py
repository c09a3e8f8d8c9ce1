"""The one place ONNX Runtime sessions are made, so every command runs a model alike."""
from __future__ import annotations

from pathlib import Path

# Graph optimization levels by the names the manifest records.
LEVELS = ("ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL")


def ort_session(model: str | Path | bytes, threads: int = 1, optimize: bool = True,
                profile_prefix: str | Path | None = None,
                optimized_model_path: str | Path | None = None,
                level: str | None = None, ort_format: bool = False):
    """A CPU session: all graph optimizations (``optimize=False``: none, for verification
    against the unoptimized graph; ``level`` names another one of :data:`LEVELS`),
    ``threads`` intra-op threads, sequential execution, warnings off. ``profile_prefix``
    turns on ONNX Runtime's profiler; ``optimized_model_path`` saves the optimized graph
    (whose node names the profile uses); ``ort_format``: ``model`` is an ``.ort`` file."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    level = level or ("ORT_ENABLE_ALL" if optimize else "ORT_DISABLE_ALL")
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    if ort_format:
        so.add_session_config_entry("session.load_model_format", "ORT")
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    if optimized_model_path is not None:
        so.optimized_model_filepath = str(optimized_model_path)
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])


def session_options(threads: int = 1, level: str = "ORT_ENABLE_ALL", ort_format: bool = False) -> dict:
    """What :func:`ort_session` sets, as a manifest records it."""
    import onnxruntime as ort
    out = {"runtime": f"onnxruntime {ort.__version__}", "provider": "CPUExecutionProvider",
           "graph_optimization_level": level, "intra_op_num_threads": threads,
           "execution_mode": "ORT_SEQUENTIAL"}
    if ort_format:
        out["model_format"] = "ORT"
    return out


# ONNX Runtime's input type names -> NumPy dtypes.
_DTYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
           "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8",
           "tensor(uint8)": "uint8", "tensor(bool)": "bool"}


def session_runner(session):
    """``run(x) -> outputs`` of a session: ``x`` is one array (the first input) or a dict of
    arrays by input name; each is cast to the dtype the session declares (an fp16
    package's dense reference is float32)."""
    import numpy as np
    specs = session.get_inputs()
    dtypes = {s.name: np.dtype(_DTYPES.get(s.type, "float32")) for s in specs}

    def run(x):
        feed = x if isinstance(x, dict) else {specs[0].name: x}
        return session.run(None, {k: np.asarray(v).astype(dtypes.get(k, np.asarray(v).dtype), copy=False)
                                  for k, v in feed.items()})
    return run


def feed_dict(session, feed) -> dict:
    """The ``run`` feed of a session: ``feed`` as it is when it names its inputs, else the
    session's first input."""
    return feed if isinstance(feed, dict) else {session.get_inputs()[0].name: feed}
