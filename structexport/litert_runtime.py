"""LiteRT (TFLite) on this host: load a ``.tflite`` with the XNNPACK delegate, run it, time
it, and report what XNNPACK took.

LiteRT is an optional extra (``structexport[litert]``, plus litert-torch and litert-converter
installed with ``--no-deps``: docs/litert.md); every entry point checks for it first and
names the install commands when it is missing. Running a ``.tflite`` needs only the runtime
(ai-edge-litert); converting needs litert-torch too (:func:`require_litert_converter`).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import re
import time
from pathlib import Path

import numpy as np

from structexport.errors import StructExportError

INSTALL_HINT = ("install it with: pip install 'structexport[litert]' && pip install --no-deps "
                "litert-torch==0.10.0 litert-converter==0.5.0 (make setup does both; docs/litert.md)")
# Loggers of the converter stack (jax, absl, litert_torch) that talk on import and conversion.
_LOGGERS = ("jax", "jax._src", "absl", "litert_torch", "ai_edge_quantizer", "ai_edge_litert", "torchao",
            "torch._export", "torch.utils._pytree")


class LiteRTMissingError(StructExportError):
    exit_code, kind = 2, "usage"


class LiteRTRunError(StructExportError):
    exit_code, kind = 40, "litert-failed"


def require_litert() -> str:
    """The LiteRT runtime's version (ai-edge-litert); a clear error (exit 2) when it is not
    installed."""
    try:
        from importlib.metadata import version
        with quiet_litert():
            from ai_edge_litert import interpreter  # noqa: F401  (the runtime)
        return version("ai-edge-litert")
    except ImportError as exc:
        raise LiteRTMissingError(f"the litert target needs LiteRT (ai-edge-litert), which is not installed "
                                 f"({(str(exc).splitlines() or [''])[0][:120]})", INSTALL_HINT) from None


def require_litert_converter() -> str:
    """litert-torch's version (the converter from torch); exit 2 naming the extra without it."""
    require_litert()
    try:
        from importlib.metadata import version
        with quiet_litert():
            import litert_torch  # noqa: F401
        return version("litert-torch")
    except ImportError as exc:
        raise LiteRTMissingError(f"the litert target converts with litert-torch, which is not installed "
                                 f"({(str(exc).splitlines() or [''])[0][:120]})", INSTALL_HINT) from None


@contextlib.contextmanager
def native_output_muted():
    """LiteRT's C++ logging (``INFO: Created TensorFlow Lite XNNPACK delegate``, the flatbuffer
    exporter's op count) and litert-torch's progress lines write to file descriptors 1 and 2
    directly."""
    import sys
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(1), os.dup(2)]
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)


def _tame_absl() -> None:
    """absl (imported by jax and LiteRT) puts its handler on the root logger, bound to whatever
    ``sys.stderr`` was at import time (here a redirected stream), and closes that stream when
    logging's handlers are shut down (``logging.config.dictConfig`` does, TVM's MetaSchedule
    calls it): the caller's stream would be closed under it. Bind the handler to the real
    stderr, which absl never closes, and take it off the root logger: structexport's own
    logging stays as Python configures it."""
    import sys
    absl = sys.modules.get("absl.logging")
    if absl is None:
        return
    handler = absl.get_absl_handler()
    handler.python_handler.stream = sys.__stderr__
    logging.root.removeHandler(handler)


@contextlib.contextmanager
def quiet_litert():
    """LiteRT, jax, absl and litert-torch log, warn and print on import and conversion; keep
    the user's terminal ours."""
    from structexport.export import quiet
    loggers = [logging.getLogger(n) for n in _LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    saved_env = {k: os.environ.get(k) for k in ("TF_CPP_MIN_LOG_LEVEL", "GLOG_minloglevel")}
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    os.environ["GLOG_minloglevel"] = "3"
    try:
        with quiet(), native_output_muted():
            yield
    finally:
        _tame_absl()
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def interpreter(path: Path, threads: int = 1, delegate: bool = True):
    """An allocated ``Interpreter`` for ``path``: XNNPACK applied (LiteRT's default), or the
    builtin kernels only (``delegate=False``)."""
    require_litert()
    with quiet_litert():
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    resolver = OpResolverType.AUTO if delegate else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        with native_output_muted():
            it = Interpreter(model_path=str(path), num_threads=int(threads),
                             experimental_op_resolver_type=resolver)
            it.allocate_tensors()
        return it
    except Exception as exc:
        raise LiteRTRunError(f"LiteRT cannot load {path}: {(str(exc).splitlines() or [''])[0][:200]}",
                             "convert the model again with --target litert") from None


def _quantize(x: np.ndarray, detail: dict) -> np.ndarray:
    """A float input as the integer tensor an INT8 model takes (its scale and zero point)."""
    dtype = detail["dtype"]
    if not np.issubdtype(dtype, np.integer):
        return np.ascontiguousarray(x, dtype=dtype)
    scale, zero = detail["quantization"]
    info = np.iinfo(dtype)
    return np.clip(np.round(np.asarray(x, np.float32) / scale) + zero, info.min, info.max).astype(dtype)


def _dequantize(y: np.ndarray, detail: dict) -> np.ndarray:
    if not np.issubdtype(y.dtype, np.integer):
        return np.array(y, copy=True)
    scale, zero = detail["quantization"]
    return ((y.astype(np.float32) - zero) * scale).astype(np.float32)


def _feed(x, details: list[dict]) -> list[np.ndarray]:
    arrays = list(x.values()) if isinstance(x, dict) else [x]
    return [_quantize(np.asarray(a), d) for a, d in zip(arrays, details)]


def runner(path: Path, threads: int = 1):
    """``run(x) -> list of float32 np.ndarray`` of the ``.tflite`` at ``path`` (x: an array or
    a dict, in the model's input order). An INT8 model's integer input is quantized and its
    output dequantized here, with the scales the model declares."""
    it = interpreter(path, threads)
    ins, outs = it.get_input_details(), it.get_output_details()

    def run(x):
        for detail, a in zip(ins, _feed(x, ins)):
            it.set_tensor(detail["index"], a)
        it.invoke()
        return [_dequantize(it.get_tensor(d["index"]), d) for d in outs]
    return run


def timer(path: Path, feed, threads: int = 1):
    """A timer for :func:`structexport.timing.time_interleaved`: seconds per ``invoke`` of the
    ``.tflite`` at ``path`` on ``feed`` (set once, outside the timing)."""
    it = interpreter(path, threads)
    ins = it.get_input_details()
    for detail, a in zip(ins, _feed(feed, ins)):
        it.set_tensor(detail["index"], a)
    invoke = it.invoke

    def run_once() -> float:
        t = time.perf_counter()
        invoke()
        return time.perf_counter() - t
    return run_once


# ------------------------------------------------------------------ delegation report

def layer_names_by_location(module) -> dict[str, str]:
    """litert-torch names a tensor after the module path it came from, each step written as
    ``package.Class_attribute`` and joined by ``/`` (the root class first): that path for
    every submodule of ``module``, mapped to its dotted name."""
    out = {}
    modules = dict(module.named_modules())
    root = type(module)
    out[f"{root.__module__}.{root.__qualname__}"] = ""
    for name in modules:
        if not name:
            continue
        parts, steps = name.split("."), [f"{root.__module__}.{root.__qualname__}"]
        for i, part in enumerate(parts):
            cls = type(modules[".".join(parts[:i + 1])])
            steps.append(f"{cls.__module__}.{cls.__qualname__}_{part}")
        out["/".join(steps)] = name
    return out


def layer_of(tensor_name: str, locations: dict[str, str]) -> str:
    """The innermost source layer a tensor's name points at ('' when none): the name is one
    location or several fused with ``;;``, each ending in ``;N``."""
    best = ""
    for piece in tensor_name.split(";;"):
        piece = re.sub(r";\d*$", "", piece)
        while piece:
            if piece in locations:
                if len(locations[piece]) > len(best):
                    best = locations[piece]
                break
            piece = piece.rpartition("/")[0]
    return best


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def op_macs(op: dict, shapes: dict[int, tuple]) -> int:
    """Multiply-accumulates of a conv or fully-connected TFLite op (0 for anything else).
    Weights are [O, H, W, I] (CONV_2D), [1, H, W, C*m] (DEPTHWISE_CONV_2D), [O, I] (FC)."""
    name = op["op_name"]
    if name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"):
        return 0
    outs = [int(t) for t in op["outputs"] if t >= 0]
    ins = [int(t) for t in op["inputs"]]
    if not outs or len(ins) < 2 or ins[1] < 0:
        return 0
    out, weight = shapes[outs[0]], shapes[ins[1]]
    if name == "CONV_2D":
        return _numel(out) * _numel(weight[1:])
    if name == "DEPTHWISE_CONV_2D":
        return _numel(out) * _numel(weight[1:3])
    if name == "FULLY_CONNECTED":
        return _numel(out) * int(weight[-1])
    return _numel(shapes[ins[2]]) * _numel(weight[1:3]) if len(ins) > 2 else 0   # TRANSPOSE_CONV


def delegation_report(path: Path, structured_layers: list[str] | None = None, module=None) -> dict:
    """What XNNPACK runs in the ``.tflite`` at ``path`` and what falls back to LiteRT's builtin
    kernels, in ExecuTorch's report format (``portable``: the ops outside the delegate).

    LiteRT lists the model's N original nodes even after delegation, then one ``DELEGATE``
    node per XNNPACK partition: an original node is delegated when a walk back from a
    partition's outputs through producing nodes reaches it before the partition's inputs.
    Source layers come from the tensor names litert-torch writes (``module`` the converted
    torch module)."""
    base = interpreter(path, 1, delegate=False)
    n_orig = len(base._get_ops_details())
    it = interpreter(path, 1, delegate=True)
    ops = it._get_ops_details()
    orig, partitions = ops[:n_orig], ops[n_orig:]
    if any(p["op_name"] != "DELEGATE" for p in partitions):
        raise LiteRTRunError(f"unexpected nodes after delegation in {path}: "
                             f"{sorted({p['op_name'] for p in partitions} - {'DELEGATE'})}")
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    shapes = {i: tuple(int(d) for d in t["shape"]) for i, t in tensors.items()}
    producer = {int(t): o["index"] for o in orig for t in o["outputs"] if t >= 0}
    delegated = set()
    for p in partitions:
        stop = {int(t) for t in p["inputs"]}
        todo = [int(t) for t in p["outputs"]]
        while todo:
            t = todo.pop()
            if t in stop or t not in producer or producer[t] in delegated:
                continue
            delegated.add(producer[t])
            todo.extend(int(x) for x in orig[producer[t]]["inputs"] if x >= 0)
    locations = layer_names_by_location(module) if module is not None else {}
    total_macs, builtin_macs, builtin = 0, 0, collections.OrderedDict()
    for op in orig:
        macs = op_macs(op, shapes)
        total_macs += macs
        if op["index"] in delegated:
            continue
        builtin_macs += macs
        entry = builtin.setdefault(op["op_name"], {"op": op["op_name"], "count": 0, "layers": []})
        entry["count"] += 1
        outs = [int(t) for t in op["outputs"] if t >= 0]
        layer = layer_of(tensors[outs[0]]["name"], locations) if outs and locations else ""
        if layer and layer not in entry["layers"]:
            entry["layers"].append(layer)
    builtin_ops = sum(e["count"] for e in builtin.values())
    structured = structured_layers or []
    falling_back = sorted({layer for e in builtin.values() for layer in e["layers"]
                           if any(layer == s or layer.startswith(s + ".") for s in structured)})
    return {
        "backend": "XNNPACK (TFLite delegate)",
        "delegate_calls": len(partitions),
        "delegated_ops": len(delegated),
        "portable_ops": builtin_ops,
        "ops_delegated_share": len(delegated) / n_orig if n_orig else None,
        "macs_total": total_macs,
        "macs_delegated_share": (total_macs - builtin_macs) / total_macs if total_macs else None,
        "portable": list(builtin.values()),
        "structured_layers": len(structured_layers or []),   # in the program, the plan's structured convs
        "structured_layers_not_delegated": falling_back,
        "ops": dict(collections.Counter(o["op_name"] for o in orig)),
    }
