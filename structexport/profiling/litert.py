"""LiteRT collection: latency with the profiler off (the ``Interpreter``, as ``bench`` times
it), then per-operator times from the LiteRT C API's profiler, mapped to source layers by
order as for ExecuTorch (:func:`structexport.profiling.executorch.event_layers`).

The Python ``Interpreter`` and ``CompiledModel`` of ai-edge-litert have no profiler; the
wheel's ``libLiteRt.so`` exports the C API's (``LiteRtCompiledModelGetProfiler``,
``LiteRtStart/StopProfiler``, ``LiteRtGetProfilerEvents``), switched on by the opaque option
``runtime_options_string`` = ``enable_profiling = true``. It is called here through
ctypes, with struct layouts from the LiteRT 2.x C headers: an unofficial ABI, checked for
the ai-edge-litert versions in :data:`ABI_VERSIONS` only. The profiled runs go through a
``CompiledModel`` (CPU accelerator: the XNNPACK delegate, as the Interpreter applies it),
whose events per run are: ``Invoke`` (the whole interpreter invocation: the profiled run's
total), XNNPACK's operators (``Convolution (NHWC, F32) IGEMM``; node = index inside the
partition) and builtin kernels (``OPERATOR`` events, the TFLite op name), each in whole
microseconds.
"""
from __future__ import annotations

import ctypes as C
import statistics
from pathlib import Path

import numpy as np

from structexport.profiling.options import ProfileError, ProfileOptions
from structexport.profiling.runs import keep_fastest
from structexport.timing import time_interleaved

ABI_VERSIONS = ("2.3.",)
_P = C.c_void_p
# ProfiledEventData event types (litert/c/litert_profiler_event.h; 32, runtime instrumentation, is
# an Invoke's status, not a time)
_DEFAULT, _OPERATOR, _DELEGATE_PROFILED = 1, 2, 8
_ELEMENT = {np.dtype(np.float32): 1, np.dtype(np.int32): 2, np.dtype(np.uint8): 3, np.dtype(np.int64): 4,
            np.dtype(np.int8): 9}


class _Layout(C.Structure):           # litert/c/litert_layout.h
    _fields_ = [("rank", C.c_uint32, 7), ("has_strides", C.c_uint32, 1),
                ("dimensions", C.c_int32 * 8), ("strides", C.c_uint32 * 8)]


class _TensorType(C.Structure):       # LiteRtRankedTensorType
    _fields_ = [("element_type", C.c_int), ("layout", _Layout)]


class _Memory(C.Structure):
    _fields_ = [("total", C.c_size_t), ("in_use", C.c_size_t), ("private", C.c_size_t)]


class _Event(C.Structure):            # litert/c/litert_profiler_event.h ProfiledEventData
    _fields_ = [("tag", C.c_char_p), ("event_type", C.c_int), ("start_us", C.c_uint64),
                ("elapsed_us", C.c_uint64), ("begin_mem", _Memory), ("end_mem", _Memory),
                ("meta1", C.c_uint64), ("meta2", C.c_uint64), ("source", C.c_int)]


_NOOP = C.CFUNCTYPE(None, _P)(lambda _p: None)
_PAYLOAD = C.create_string_buffer(b"enable_profiling = true\n")   # lives as long as the module


def _library():
    from importlib.metadata import version

    from structexport.litert_runtime import require_litert
    require_litert()
    got = version("ai-edge-litert")
    if not got.startswith(ABI_VERSIONS):
        raise ProfileError(f"profile reads LiteRT's per-op profiler through its C API with struct layouts "
                           f"checked for ai-edge-litert {', '.join(v + 'x' for v in ABI_VERSIONS)}, not {got}",
                           "install ai-edge-litert 2.3 (pip install 'ai-edge-litert==2.3.*'), or profile "
                           "the model with --target ort-cpu")
    import ai_edge_litert
    return C.CDLL(str(Path(ai_edge_litert.__file__).parent / "libLiteRt.so"))


class _Profiled:
    """A ``CompiledModel`` of one ``.tflite`` with the profiler on, its buffers filled with
    ``feed`` once."""

    def __init__(self, lib, path: Path, feed, details: tuple[list, list]):
        self.lib, self.path = lib, path
        self.env, self.model, self.options, self.compiled, self.profiler = _P(), _P(), _P(), _P(), _P()
        self.buffers: list[_P] = []
        self._call("LiteRtCreateEnvironment", 0, None, C.byref(self.env))
        self._call("LiteRtCreateModelFromFile", self.env, str(path).encode(), C.byref(self.model))
        self._call("LiteRtCreateOptions", C.byref(self.options))
        self._call("LiteRtSetOptionsHardwareAccelerators", self.options, 1)   # CPU: XNNPACK
        opaque = _P()
        self._call("LiteRtCreateOpaqueOptions", b"runtime_options_string", C.cast(_PAYLOAD, _P), _NOOP,
                   C.byref(opaque))
        self._call("LiteRtAddOpaqueOptions", self.options, opaque)   # the options own it now
        self._call("LiteRtCreateCompiledModel", self.env, self.model, self.options, C.byref(self.compiled))
        ins, outs = details
        self.inputs = (_P * len(ins))(*[self._buffer(d, "Input", i) for i, d in enumerate(ins)])
        self.outputs = (_P * len(outs))(*[self._buffer(d, "Output", i) for i, d in enumerate(outs)])
        for buffer, array in zip(self.inputs, feed):
            host = _P()
            self._call("LiteRtLockTensorBuffer", _P(buffer), C.byref(host), 1)
            data = np.ascontiguousarray(array)
            C.memmove(host, data.ctypes.data, data.nbytes)
            self._call("LiteRtUnlockTensorBuffer", _P(buffer))
        self._call("LiteRtCompiledModelGetProfiler", self.compiled, C.byref(self.profiler))
        if not self.profiler.value:
            raise ProfileError(f"LiteRT gave no profiler for {path} (its enable_profiling option was not "
                               "honoured)", "report this with the ai-edge-litert version")

    def _call(self, name: str, *args) -> None:
        status = getattr(self.lib, name)(*args)
        if status != 0:
            raise ProfileError(f"LiteRT's C API {name} failed on {self.path} (LiteRtStatus {status})",
                               "profile the model with --target ort-cpu; bench times the .tflite itself")

    def _buffer(self, detail: dict, side: str, index: int) -> _P:
        requirements = _P()
        self._call(f"LiteRtGetCompiledModel{side}BufferRequirements", self.compiled, C.c_size_t(0),
                   C.c_size_t(index), C.byref(requirements))
        kind = _TensorType()
        kind.element_type = _ELEMENT[np.dtype(detail["dtype"])]
        kind.layout.rank = len(detail["shape"])
        for k, d in enumerate(detail["shape"]):
            kind.layout.dimensions[k] = int(d)
        buffer = _P()
        self._call("LiteRtCreateManagedTensorBufferFromRequirements", self.env, C.byref(kind), requirements,
                   C.byref(buffer))
        self.buffers.append(buffer)
        return buffer

    def run(self) -> None:
        self._call("LiteRtRunCompiledModel", self.compiled, C.c_size_t(0), len(self.inputs), self.inputs,
                   len(self.outputs), self.outputs)

    def output(self, index: int, detail: dict) -> np.ndarray:
        host = _P()
        self._call("LiteRtLockTensorBuffer", _P(self.outputs[index]), C.byref(host), 0)
        y = np.empty(detail["shape"], detail["dtype"])
        C.memmove(y.ctypes.data, host, y.nbytes)
        self._call("LiteRtUnlockTensorBuffer", _P(self.outputs[index]))
        return y

    def start(self) -> None:
        self._call("LiteRtResetProfiler", self.profiler)
        self._call("LiteRtStartProfiler", self.profiler)

    def events(self) -> list[dict]:
        self._call("LiteRtStopProfiler", self.profiler)
        n = C.c_int()
        self._call("LiteRtGetNumProfilerEvents", self.profiler, C.byref(n))
        raw = (_Event * n.value)()
        self._call("LiteRtGetProfilerEvents", self.profiler, n, raw)
        return [{"tag": (e.tag or b"").decode(errors="replace"), "type": e.event_type,
                 "us": int(e.elapsed_us), "node": int(e.meta1)} for e in raw]

    def close(self) -> None:
        lib = self.lib
        for buffer in self.buffers:
            lib.LiteRtDestroyTensorBuffer(buffer)
        if self.compiled.value:
            lib.LiteRtDestroyCompiledModel(self.compiled)
        if self.options.value:
            lib.LiteRtDestroyOptions(self.options)
        if self.model.value:
            lib.LiteRtDestroyModel(self.model)
        if self.env.value:
            lib.LiteRtDestroyEnvironment(self.env)


def split_runs(events: list[dict]) -> list[dict]:
    """The profiler's events per run: each run's ``Invoke`` total (ms) and its operator
    events in execution order (name, op, ms, delegate partition: a new partition where
    XNNPACK's node index starts again or after a builtin kernel)."""
    runs: list[dict] = []
    for e in events:
        if e["tag"] == "Invoke" and e["type"] == _DEFAULT:
            runs.append({"total": e["us"] / 1e3, "calls": [], "last_node": None, "delegate": -1})
            continue
        if not runs or e["type"] not in (_OPERATOR, _DELEGATE_PROFILED):
            continue
        run = runs[-1]
        delegate = None
        if e["type"] == _DELEGATE_PROFILED:
            if run["last_node"] is None or e["node"] <= run["last_node"]:
                run["delegate"] += 1
            run["last_node"] = e["node"]
            delegate = run["delegate"]
        else:
            run["last_node"] = None
        run["calls"].append({"tag": e["tag"], "op": e["tag"] if delegate is None else _xnnpack_op(e["tag"]),
                             "ms": e["us"] / 1e3, "delegate": delegate})
    return runs


def _xnnpack_op(tag: str) -> str:
    """``Transpose (ND, X32) Transpose`` -> ``Transpose (ND, X32)``; ``Convolution (NHWC, F32)
    IGEMM`` unchanged: XNNPACK's operator and its kernel, without a repeated name."""
    head, _, tail = tag.partition(")")
    words = tail.split()
    name = head.split(" (")[0]
    if words and words[0] == name:
        words = words[1:]
    return " ".join([head + ")"] + words)


def litert_profile(paths: dict[str, Path], feed, runs: int, warmup: int,
                   interpreters: dict) -> dict[str, dict]:
    """Each model run ``warmup + runs`` times (interleaved) under the profiler; per model its
    operator events in execution order (mean ms over the kept runs), the mean ``Invoke`` of
    the kept runs and their number, and the largest difference of its output to the
    Interpreter's on ``feed``."""
    lib = _library()
    arrays = list(feed.values()) if isinstance(feed, dict) else [feed]
    models = {}
    try:
        for name, path in paths.items():
            it = interpreters[name]
            ins, outs = it.get_input_details(), it.get_output_details()
            quantized = [_as_input(a, d) for a, d in zip(arrays, ins)]
            models[name] = (_Profiled(lib, path, quantized, (ins, outs)), outs)
        names = list(models)
        for n in names:
            models[n][0].run()
        for _ in range(warmup):
            for n in names:
                models[n][0].run()
        for n in names:
            models[n][0].start()
        for i in range(runs):
            for n in (names if i % 2 == 0 else names[::-1]):
                models[n][0].run()
        out = {}
        for n, (model, outs) in models.items():
            per_run = split_runs(model.events())
            if len(per_run) != runs or len({len(r["calls"]) for r in per_run}) != 1:
                raise ProfileError(f"LiteRT's profiler recorded {len(per_run)} runs of {paths[n]} with "
                                   f"{sorted({len(r['calls']) for r in per_run})} operator events each, not "
                                   f"{runs} alike", "report this with the ai-edge-litert version")
            kept = keep_fastest(per_run, lambda r: r["total"])
            first = per_run[0]["calls"]
            calls = [{"name": f"{k}:{c['tag']}", "op": c["op"], "delegate": c["delegate"],
                      "ms": statistics.fmean(r["calls"][k]["ms"] for r in kept)} for k, c in enumerate(first)]
            out[n] = {"calls": calls, "profiled_ms": statistics.fmean(r["total"] for r in kept),
                      "runs_kept": len(kept), "output": _as_output(model.output(0, outs[0]), outs[0])}
        return out
    finally:
        for model, _outs in models.values():
            model.close()


def _as_output(y: np.ndarray, detail: dict) -> np.ndarray:
    """An INT8 model's integer output dequantized with the scale it declares (as the
    Interpreter's runner does), a float one as it is."""
    if not np.issubdtype(y.dtype, np.integer):
        return y
    scale, zero = detail["quantization"]
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


def _as_input(x, detail: dict) -> np.ndarray:
    dtype = np.dtype(detail["dtype"])
    if not np.issubdtype(dtype, np.integer):
        return np.ascontiguousarray(x, dtype=dtype)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(np.asarray(x, np.float32) / scale) + zero, info.min, info.max).astype(dtype)


def measure_litert(package, opts: ProfileOptions, say, work: Path) -> dict:
    """``model.tflite`` and ``reference.tflite`` checked against the package's stored outputs
    and timed interleaved with the Interpreter (as ``bench``), then profiled through the C
    API's ``CompiledModel``, its outputs checked equal to the Interpreter's; the ``measured``
    dict :func:`~structexport.profiling.assemble.assemble` reads."""
    from structexport.litert_runtime import interpreter, runner
    from structexport.profiling.executorch import checked_timers, program_models, program_paths
    from structexport.targets import get_target
    target = get_target(package.target, {})
    structured, dense = program_paths(package)
    feed = package.feed()
    paths = {"structured": structured, "dense": dense}
    timers = checked_timers(package, structured, dense, feed, opts.threads, say)
    say(f"timing ({opts.repeat} interleaved runs)")
    latency = time_interleaved(timers, feed, opts.repeat, opts.warmup)
    say(f"profiling ({opts.repeat} interleaved runs, LiteRT C API profiler)")
    interpreters = {n: interpreter(p, opts.threads) for n, p in paths.items()}
    prof = litert_profile(paths, feed, opts.repeat, opts.warmup, interpreters)   # one thread
    for n, p in paths.items():   # the profiled CompiledModel computes what the Interpreter does
        want = runner(p, opts.threads)(feed)[0]
        got = prof[n]["output"].astype(np.float32)
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-4, rtol=1e-4):
            raise ProfileError(f"{p} profiled through LiteRT's CompiledModel does not compute what the "
                               f"Interpreter does (largest difference {float(np.abs(got - want).max()):.3g})",
                               "report this with the ai-edge-litert version; bench times the Interpreter")
    from structexport.profiling.executorch import MAPPING_RULE
    result = {"runtime": target.runtime(opts.threads),
              "profiler": "LiteRT C API profiler (libLiteRt.so through ctypes: XNNPACK's per-operator events, "
                          "builtin kernels' OPERATOR events, Invoke per run), on a CompiledModel with the CPU "
                          "accelerator",
              "latency": latency, "models": {}, "programs": {"structured": structured.name, "dense": dense.name},
              "mapping_rule": MAPPING_RULE.replace("portable kernels", "builtin kernels"),
              "outside": "Invoke minus the sum of its operator events: the interpreter, the XNNPACK "
                         "delegate's own work around its operators, and the profiler's hooks",
              "notes": ["LiteRT's profiler is read through its C API (ctypes, struct layouts of ai-edge-litert "
                        "2.3): the profiled runs go through a CompiledModel (CPU accelerator, XNNPACK, one "
                        "thread: the C API sets no thread count), the latency is the Interpreter's (as bench "
                        "times it); operator times are whole microseconds, means over the kept runs; "
                        "multiply-adds are counted on model.onnx and reference.onnx, which hold the models' "
                        "structure plans"]}
    result["models"] = program_models(package, prof, paths)
    return result
