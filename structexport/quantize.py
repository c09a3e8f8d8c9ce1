"""INT8: calibration data, ONNX Runtime static quantization, and the measurements that judge
the result (``convert --precision int8``).

The stage runs on the verified float32 ``model.onnx``:

1. ``rebase_channel_sums`` rewrites the banded channel sums of decomposed structured convs
   so that they quantize without rounding between nearly equal sums (see the pass);
2. ONNX Runtime's ``quantize_static`` writes a QDQ model: 8-bit symmetric per-channel
   weights, activations calibrated on the user's images (asymmetric uint8, ONNX Runtime's
   x86 form: U8S8);
3. it is judged three ways: the QDQ graph run as written (float convs between
   QuantizeLinear/DequantizeLinear: the fake-quantized reference) against the same file with
   ONNX Runtime's optimizations on (integer kernels), within a few output quantization
   steps; its top-1 agreement with the float32 source and largest logit difference on
   held-out images (the gate); and the SQNR of every layer's output against float32 on
   calibration images (where accuracy goes).
"""
from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from structexport.errors import StructExportError

CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
DEFAULT_CALIBRATION_COUNT = 256
DEFAULT_GATE_COUNT = 500
DEFAULT_MIN_AGREEMENT = 0.97
# The integer kernels and the fake-quantized graph may round a value to the neighbouring
# step, and such a step travels, growing with depth; measured on real images: 2 output steps
# at most on ResNet-20s, 5 on DenseNet-BC-40 (39 quantized convs, concatenations). A wrong
# kernel is off by far more (tests/test_int8.py shifts the logits by 3: 20 steps).
OUTPUT_STEPS = 8
SQNR_IMAGES = 32
KERNEL_CHECK_IMAGES = 64
# The ops whose outputs are a layer's (SQNR rows, --keep-fp32 names)
LAYER_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


class CalibrationError(StructExportError):
    exit_code, kind = 52, "calibration"


class Int8OptionError(StructExportError):
    exit_code, kind = 2, "usage"


class Int8GateError(StructExportError):
    exit_code, kind = 53, "int8-gate-failed"


@dataclass
class Int8Options:
    data: str
    count: int = DEFAULT_CALIBRATION_COUNT
    gate_count: int = DEFAULT_GATE_COUNT
    method: str = "minmax"
    keep_fp32: list[str] = field(default_factory=list)
    min_agreement: float = DEFAULT_MIN_AGREEMENT
    max_logit_diff: float | None = None
    seed: int = 0
    layer_choice: str = "measure"            # LAYER_CHOICES
    layer_cache: str | None = None           # the per-layer timings' cache (default layer_cache_path())

    def to_dict(self) -> dict:
        return {"data": str(self.data), "count": self.count, "gate_count": self.gate_count,
                "method": self.method, "keep_fp32": list(self.keep_fp32),
                "min_agreement": self.min_agreement, "max_logit_diff": self.max_logit_diff,
                "seed": self.seed, "layer_choice": self.layer_choice}


@dataclass
class CalibrationSets:
    calibration: np.ndarray          # (N, C, H, W) float32, preprocessed
    gate: np.ndarray                 # held-out images for the gate
    gate_labels: np.ndarray
    description: dict


def calibration_sets(opts: Int8Options, preprocess: dict | None, input_shape, num_classes: int | None,
                     say=lambda _m: None) -> CalibrationSets:
    """A shuffled draw (seeded) of ``count`` calibration images and the next ``gate_count``
    as held-out images for the gate, preprocessed as the package records it."""
    from structexport.datasets import Preprocess, open_dataset
    if opts.method not in CALIBRATION_METHODS:
        raise CalibrationError(f"unknown calibration method {opts.method!r}",
                               f"choose one of {', '.join(CALIBRATION_METHODS)}")
    if preprocess is None:
        raise CalibrationError("--calibration images need the model's preprocessing, and none was given",
                               "add --preprocess cifar10 (or imagenet, none, or --scale/--mean/--std)")
    pre = Preprocess.from_dict(preprocess)
    data = open_dataset(opts.data)
    data.check_for(pre, input_shape, num_classes)
    if opts.count < 1 or opts.gate_count < 1:
        raise CalibrationError("--calibration-count and the gate's images must be at least 1")
    need = opts.count + opts.gate_count
    if len(data) < need:
        raise CalibrationError(
            f"{data.describe()}: {need} images are needed ({opts.count} to calibrate and "
            f"{opts.gate_count} held out for the accuracy gate)",
            f"give more images, or lower --calibration-count (the gate takes {opts.gate_count})")
    order = np.random.default_rng(opts.seed).permutation(len(data))[:need]
    chosen = data.subset(order)
    say(f"read {need} calibration images from {data.path}")
    xs, labels = [], []
    for batch in chosen.batches(pre, 64):
        xs.append(batch.x.astype(np.float32))
        labels.append(batch.labels)
    x, y = np.concatenate(xs), np.concatenate(labels)
    return CalibrationSets(x[:opts.count], x[opts.count:], y[opts.count:], {
        "data": str(data.path), "kind": data.kind, "images_in_data": len(data),
        "calibration_images": opts.count, "gate_images": opts.gate_count, "seed": opts.seed,
        "draw": "a seeded permutation of the data: the first images calibrate, the next are held out",
        "preprocess": preprocess})


@contextlib.contextmanager
def _quiet_ort_quantization():
    """ONNX Runtime's quantization tool logs advice and progress to the root logger and stdout."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _consumers(graph) -> dict[str, list]:
    """tensor name -> the nodes that read it."""
    out: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            out.setdefault(i, []).append(node)
    return out


def _batched(x: np.ndarray, batch: int):
    for i in range(0, len(x) - batch + 1, batch):
        yield x[i:i + batch]


def model_batch(path: Path) -> tuple[str, int]:
    """The input name and fixed batch size of a one-input ONNX model."""
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    first = next(i for i in graph.input if i.name not in inits)
    dim = first.type.tensor_type.shape.dim[0]
    return first.name, (dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else 1)


def layer_nodes(path: Path) -> list[tuple[str, str, str]]:
    """(node name, op type, layer name) of every layer op of the graph; the layer name is the
    weight's without ``.weight`` (the source layer, where the export kept it)."""
    import onnx
    graph = onnx.load(str(path)).graph
    inits = {i.name for i in graph.initializer}
    users = _consumers(graph)

    def weight_of(node):
        return next((i for i in node.input[1:2] if i in inits), None)

    def plain(name):
        return name[:-len(".weight")] if name.endswith(".weight") else name

    out = []
    for node in graph.node:
        if node.op_type not in LAYER_OPS:
            continue
        weight = weight_of(node)
        layer = plain(weight) if weight else node.name
        if weight and len(users[weight]) > 1:
            # One constant shared by several layers (a sum-pool's band or box of ones is the
            # same for layers of one shape): named after the layer it feeds
            nxt = node
            for _ in range(3):
                consumers = users.get(nxt.output[0], [])
                if len(consumers) != 1:
                    break
                nxt = consumers[0]
                w = weight_of(nxt) if nxt.op_type in LAYER_OPS else None
                if w and len(users[w]) == 1:
                    owner = plain(w)
                    owner = owner[:-len(".conv")] if owner.endswith(".conv") else owner
                    layer = f"{owner}.pool.{weight.rsplit('.', 1)[-1]}"
                    break
        out.append((node.name, node.op_type, layer))
    return out


def excluded_nodes(path: Path, globs: list[str]) -> list[str]:
    """Nodes of ``path`` that ``--keep-fp32 GLOB`` names, by node name or layer name; a glob
    that names nothing is refused (it would keep nothing in float)."""
    nodes = layer_nodes(path)
    chosen, unmatched = [], []
    for glob in globs:
        hit = [n for n, _, layer in nodes if fnmatch.fnmatchcase(n, glob) or fnmatch.fnmatchcase(layer, glob)]
        if not hit:
            unmatched.append(glob)
        chosen += [n for n in hit if n not in chosen]
    if unmatched:
        shown = ", ".join(layer for _, _, layer in nodes[:6]) + (", ..." if len(nodes) > 6 else "")
        raise Int8OptionError(f"--keep-fp32 {', '.join(repr(g) for g in unmatched)} names no layer of the model",
                         f"name its layers (or nodes), as convert's per-layer SQNR table shows: {shown}")
    return chosen


def float_islands(path: Path) -> dict[str, str]:
    """Nodes kept in float32 whatever the user asks, each with why: a batch norm no conv
    absorbs (a pre-activation DenseNet's) scales each channel *after* the point where its
    input would be quantized, so the rounding of a small-range channel is multiplied by that
    channel's gain; and a concatenation it reads would give channels of very different ranges
    one shared scale. Kept in float, the quantization point moves to the conv after them.
    Measured on DenseNet-BC-40 (k=48): 44.4% top-1 in INT8 against 94.15% float32 (2,000
    test images); 45.8% with only the batch norms in float, 93.4% = float32 with the
    concatenations too (500 images); on the whole test set 94.59% against 94.60%."""
    import onnx
    graph = onnx.load(str(path), load_external_data=False).graph
    consumers = _consumers(graph)
    out = {}
    for node in graph.node:
        if not node.name:       # nodes_to_exclude matches by name: "" would match every unnamed node
            continue
        if node.op_type == "BatchNormalization":
            out[node.name] = "a batch norm no conv absorbs: it would amplify the rounding of its input per channel"
        elif node.op_type == "Concat" and any(c.op_type == "BatchNormalization"
                                              for c in consumers.get(node.output[0], [])):
            out[node.name] = "a concatenation read by a batch norm: its channels would share one scale"
    return out


def quantize_qdq(fp32_path: Path, out_path: Path, calibration: np.ndarray, method: str,
                 exclude: list[str]) -> dict:
    """ONNX Runtime static quantization of ``fp32_path`` into the QDQ model ``out_path``
    (``exclude``: nodes the user keeps in float; :func:`float_islands` are kept too)."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    name, batch = model_batch(fp32_path)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter([{name: x} for x in _batched(calibration, batch)])

        def get_next(self):
            return next(self._it, None)

    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile,
               "entropy": CalibrationMethod.Entropy}
    islands = {n: why for n, why in float_islands(fp32_path).items() if n not in exclude}
    t = time.perf_counter()
    with _quiet_ort_quantization():
        quantize_static(str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=methods[method], nodes_to_exclude=list(exclude) + list(islands),
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
    return {"tool": "onnxruntime.quantization.quantize_static", "format": "QDQ",
            "weights": "int8 symmetric, per output channel", "activations": "uint8 asymmetric, per tensor",
            "calibration_method": method, "kept_fp32": list(exclude), "kept_fp32_always": islands,
            "seconds": round(time.perf_counter() - t, 3)}


def output_tolerance(qdq_path: Path, expected: list[np.ndarray]) -> float:
    """``OUTPUT_STEPS`` quantization steps of the graph's outputs (the largest scale of the
    DequantizeLinear nodes that produce them). An output a float layer produces (--keep-fp32)
    from a quantized input: the same steps of that input through the layer's weights (the
    largest row sum of their magnitudes); anything else: 5% of its largest value."""
    import onnx
    from onnx import numpy_helper
    graph = onnx.load(str(qdq_path)).graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}

    def dq_scale(tensor):
        node = producers.get(tensor)
        if node is not None and node.op_type == "DequantizeLinear" and node.input[1] in inits:
            return float(np.max(numpy_helper.to_array(inits[node.input[1]])))
        return None

    steps = []
    for out, ref in zip(graph.output, expected):
        scale = dq_scale(out.name)
        node = producers.get(out.name)
        if scale is not None:
            steps.append(OUTPUT_STEPS * scale)
            continue
        if node is not None and node.op_type in LAYER_OPS and len(node.input) > 1 and node.input[1] in inits:
            step_in = dq_scale(node.input[0])
            if step_in is not None:
                w = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                columns = node.op_type == "MatMul" or (node.op_type == "Gemm" and not trans_b)
                rows = w.T if columns else w.reshape(w.shape[0], -1)   # one row per output
                steps.append(OUTPUT_STEPS * step_in * float(np.abs(rows).sum(axis=1).max()))
                continue
        steps.append(0.05 * float(np.max(np.abs(ref))))
    return max(steps)


def _dequantized_names(graph) -> dict[str, str]:
    """tensor -> the DequantizeLinear output that carries it quantized (Q then DQ)."""
    consumers = _consumers(graph)
    out = {}
    for node in graph.node:
        if node.op_type != "QuantizeLinear":
            continue
        dq = next((n for n in consumers.get(node.output[0], []) if n.op_type == "DequantizeLinear"), None)
        if dq is not None:
            out[node.input[0]] = dq.output[0]
    return out


def _with_outputs(path: Path, names: list[str]) -> bytes:
    import onnx
    model = onnx.load(str(path))
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def layer_sqnr(fp32_path: Path, qdq_path: Path, images: np.ndarray) -> list[dict]:
    """SQNR (dB) of every layer's output in the QDQ graph (as the integer kernels see it:
    after its QuantizeLinear/DequantizeLinear) against the float32 graph, on ``images``:
    ``10 log10(sum ref^2 / sum (ref - q)^2)``, errors of the layers before it included."""
    import onnx

    from structexport.ortsession import ort_session
    qgraph = onnx.load(str(qdq_path)).graph
    dq = _dequantized_names(qgraph)
    nodes = layer_nodes(fp32_path)
    fgraph = {n.name: n for n in onnx.load(str(fp32_path)).graph.node}
    f_tensors = {o for n in fgraph.values() for o in n.output}
    qnodes = {n.name: n for n in qgraph.node}
    rows = []
    for name, op, layer in nodes:
        # The quantizer folds a Relu into the layer before it (the uint8 range clips): the
        # layer's output in the QDQ graph then carries the Relu's name, as in float
        qnode = qnodes.get(name)
        out = qnode.output[0] if qnode is not None else fgraph[name].output[0]
        tensor = out if out in f_tensors else fgraph[name].output[0]
        rows.append({"node": name, "op": op, "layer": layer, "tensor": tensor,
                     "quantized": qnode is not None and out in dq, "q_tensor": dq.get(out, out)})
    f_sess = ort_session(_with_outputs(fp32_path, [r["tensor"] for r in rows]), optimize=False)
    q_sess = ort_session(_with_outputs(qdq_path, [r["q_tensor"] for r in rows]), optimize=False)
    f_names = [o.name for o in f_sess.get_outputs()]
    q_names = [o.name for o in q_sess.get_outputs()]
    input_name, batch = model_batch(fp32_path)
    signal = np.zeros(len(rows))
    noise = np.zeros(len(rows))
    for x in _batched(images, batch):
        f = dict(zip(f_names, f_sess.run(None, {input_name: x})))
        q = dict(zip(q_names, q_sess.run(None, {input_name: x})))
        for k, r in enumerate(rows):
            ref = f[r["tensor"]].astype(np.float64)
            signal[k] += float(np.sum(ref * ref))
            noise[k] += float(np.sum((ref - q[r["q_tensor"]].astype(np.float64)) ** 2))
    out = []
    for k, r in enumerate(rows):
        db = math.inf if noise[k] == 0 else 10 * math.log10(max(signal[k], 1e-30) / noise[k])
        out.append({"layer": r["layer"], "node": r["node"], "op": r["op"], "quantized": r["quantized"],
                    "sqnr_db": round(db, 2) if math.isfinite(db) else None})
    return out


def agreement(reference: Callable[[np.ndarray], np.ndarray], candidate: Callable[[np.ndarray], np.ndarray],
              images: np.ndarray, labels: np.ndarray, batch: int) -> dict:
    """Top-1 agreement, largest logit difference and both top-1 accuracies on ``images``."""
    agree = correct_ref = correct_cand = 0
    worst = 0.0
    seen = 0
    for start in range(0, len(images) - batch + 1, batch):
        x = images[start:start + batch]
        y = labels[start:start + batch]
        r, c = np.asarray(reference(x), np.float64), np.asarray(candidate(x), np.float64)
        r, c = r.reshape(len(x), -1), c.reshape(len(x), -1)
        agree += int((r.argmax(1) == c.argmax(1)).sum())
        correct_ref += int((r.argmax(1) == y).sum())
        correct_cand += int((c.argmax(1) == y).sum())
        worst = max(worst, float(np.abs(r - c).max()))
        seen += len(x)
    return {"images": seen, "agreement": agree / seen, "max_logit_diff": worst,
            "reference_top1": correct_ref / seen, "int8_top1": correct_cand / seen}


def gate_failures(result: dict, opts: Int8Options) -> list[str]:
    """What the gate refuses in ``result`` (empty: it passes)."""
    failed = []
    if result["agreement"] < opts.min_agreement:
        failed.append(f"top-1 agreement with the float32 source {100 * result['agreement']:.2f}% < "
                      f"{100 * opts.min_agreement:.2f}%")
    if opts.max_logit_diff is not None and result["max_logit_diff"] > opts.max_logit_diff:
        failed.append(f"largest logit difference {result['max_logit_diff']:.4g} > {opts.max_logit_diff:.4g}")
    return failed


def worst_layers(rows: list[dict], count: int = 3) -> list[dict]:
    scored = [r for r in rows if r["sqnr_db"] is not None]
    return sorted(scored, key=lambda r: r["sqnr_db"])[:count]


# --------------------------------------------------------------------------- per-layer choice

LAYER_CHOICES = ("measure", "structured")
LAYER_TIMING_REPEAT = 30


def layer_cache_path() -> Path:
    from structexport.fsutil import cache_root
    return cache_root() / "int8-layers.json"


def _conv_proto(name: str, x: str, y: str, weight: np.ndarray, bias: np.ndarray | None, attrs: dict):
    from onnx import helper, numpy_helper
    inits = [numpy_helper.from_array(np.ascontiguousarray(weight, np.float32), f"{name}.w")]
    inputs = [x, f"{name}.w"]
    if bias is not None:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(bias, np.float32), f"{name}.b"))
        inputs.append(f"{name}.b")
    return helper.make_node("Conv", inputs, [y], name=name, **attrs), inits


def layer_models(layer, in_shape: tuple[int, ...]) -> dict[str, bytes]:
    """The decomposed ``layer`` (:class:`~structexport.passes.compose_dense_layers_pass.
    DecomposedLayer`) as a one-layer float32 model, structured and composed dense, each
    between two identity depthwise 1x1 convs (ONNX Runtime's blocked layout flows in and out
    of it as in a network; the same for both)."""
    from onnx import TensorProto, helper

    from structexport.passes.compose_dense_layers_pass import composed_weight, dense_conv_attributes
    from structexport.passes.rebase_channel_sums_pass import conv_group, conv_ints, conv_weight

    def attrs(node) -> dict:
        return {"group": conv_group(node),
                "strides": conv_ints(node, "strides", [1, 1]), "pads": conv_ints(node, "pads", [0, 0, 0, 0])}

    channels = in_shape[1]
    bias = layer.small.inputs[2].const_value.numpy() if len(layer.small.inputs) > 2 and \
        layer.small.inputs[2] is not None and layer.small.inputs[2].const_value is not None else None
    out_channels = conv_weight(layer.small).shape[0]
    dense_w = composed_weight(layer)
    bodies = {"structured": [(n.name, conv_weight(n), bias if n is layer.small else None, attrs(n))
                             for n in layer.nodes],
              "dense": [("dense", dense_w, bias, dense_conv_attributes(layer, dense_w.shape[2:]))]}
    models = {}
    for kind, body in bodies.items():
        nodes, inits, value = [], [], "x"
        steps = [("before", np.ones((channels, 1, 1, 1)), None, {"group": channels})] + body + \
                [("after", np.ones((out_channels, 1, 1, 1)), None, {"group": out_channels})]
        for i, (name, w, b, a) in enumerate(steps):
            out = "y" if i == len(steps) - 1 else f"t{i}"
            node, node_inits = _conv_proto(f"{i}_{name}".replace("/", "_"), value, out, w, b, a)
            nodes.append(node)
            inits += node_inits
            value = out
        graph = helper.make_graph(nodes, kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
        models[kind] = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    return models


def layer_key(layer, in_shape: tuple[int, ...]) -> str:
    """What a layer's INT8 timing depends on: its input and every conv's shape and attributes."""
    from structexport.passes.rebase_channel_sums_pass import conv_group, conv_ints, conv_weight
    parts = [f"in {'x'.join(map(str, in_shape))}"]
    for role, node in (("band", layer.band), ("box", layer.box), ("small", layer.small)):
        if node is None:
            continue
        group = conv_group(node)
        parts.append(f"{role} {'x'.join(map(str, conv_weight(node).shape))}/g{group}"
                     f"/s{''.join(map(str, conv_ints(node, 'strides', [1, 1])))}"
                     f"/p{''.join(map(str, conv_ints(node, 'pads', [0] * 4)))}")
    return " ".join(parts)


def time_layer_int8(layer, in_shape: tuple[int, ...], threads: int = 1,
                    repeat: int = LAYER_TIMING_REPEAT) -> dict[str, float]:
    """Median ms of ``layer`` quantized as convert quantizes (QDQ, per-channel weights,
    minmax on random inputs: the time does not depend on the values), structured and dense,
    timed interleaved."""
    import tempfile

    from structexport.ortsession import ort_session
    from structexport.timing import time_interleaved
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((4 * in_shape[0], *in_shape[1:])).astype(np.float32)  # 4 batches
    sessions = {}
    with tempfile.TemporaryDirectory(prefix="structexport-int8-layer-") as tmp:
        for kind, model in layer_models(layer, in_shape).items():
            fp32, qdq = Path(tmp) / f"{kind}.onnx", Path(tmp) / f"{kind}.int8.onnx"
            fp32.write_bytes(model)
            quantize_qdq(fp32, qdq, calibration, "minmax", [])
            sessions[kind] = ort_session(qdq, threads)
        x = rng.standard_normal(in_shape).astype(np.float32)
        stats = time_interleaved(sessions, x, repeat, warmup=5)
    return {kind: round(stats[kind]["median"], 5) for kind in sessions}


def choose_dense_layers(model, policy: str, cache_path: Path | None, say,
                        threads: int = 1) -> tuple[dict[str, str], dict]:
    """Which decomposed layers of ``model`` (an ``onnx_ir.Model``) to ship dense in INT8:
    ``{layer: why}``, and the manifest's record of the choice. ``measure`` times each layer
    shape structured and dense, quantized, on this machine (cached per machine and shape);
    a layer stays structured only where that is faster. ``structured`` keeps every layer."""
    import onnx_ir as ir

    from structexport.costmodel import tensor_shapes
    from structexport.passes.autotune import AutotuneCache, machine_key
    from structexport.passes.compose_dense_layers_pass import find_decomposed
    layers = find_decomposed(model.graph)
    record = {"policy": policy, "layers": []}
    if policy == "structured" or not layers:
        return {}, record
    shapes = tensor_shapes(ir.to_proto(model))          # fully known shapes only
    cache = AutotuneCache(cache_path or layer_cache_path())
    machine = machine_key("ort-cpu int8 qdq", threads)
    record.update({"cache": str(cache.path), "machine": machine})
    dense, measured, from_cache, unmeasured = {}, 0, 0, 0
    for layer in layers:
        in_shape = shapes.get(layer.input.name)
        if not in_shape:
            record["layers"].append({"layer": layer.layer, "choice": "structured",
                                     "why": "input shape unknown: not measured"})
            unmeasured += 1
            continue
        key = layer_key(layer, in_shape)
        ms = cache.get(machine, key)
        cached = valid_timing(ms)
        from_cache += cached
        if not cached:
            say(f"int8: time {layer.layer} structured and dense ({key})")
            ms = time_layer_int8(layer, in_shape, threads)
            cache.put(machine, key, ms)
            measured += 1
        faster = ms["structured"] < ms["dense"]
        why = (f"INT8 {ms['structured']:.4f} ms structured, {ms['dense']:.4f} ms dense"
               + (" (cached)" if cached else ""))
        record["layers"].append({"layer": layer.layer, "choice": "structured" if faster else "dense",
                                 "structured_ms": ms["structured"], "dense_ms": ms["dense"],
                                 "speedup": round(ms["dense"] / ms["structured"], 3), "cached": cached,
                                 "key": key})
        if not faster:
            dense[layer.layer] = why
    if measured:
        cache.save()
    record.update({"measured": measured, "from_cache": from_cache, "unmeasured": unmeasured})
    return dense, record


def valid_timing(entry) -> bool:
    """A cached entry to trust: both times, positive numbers (anything else is measured again)."""
    return isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) and entry[k] > 0
                                           for k in ("structured", "dense"))


# --------------------------------------------------------------------------- the convert stage

FP32_MODEL = "model.fp32.onnx"
DENSE_INT8 = "reference.int8.onnx"


@dataclass
class Int8Result:
    expected: dict            # label -> outputs of the fake-quantized model.onnx (what the kernels must give)
    atol: float               # the tolerance of that check
    record: dict              # the manifest's "int8"


def logits_function(model) -> Callable[[np.ndarray], np.ndarray]:
    """``x -> first output`` of a torch module or of a runner returning a list of outputs."""
    import torch
    if isinstance(model, torch.nn.Module):
        def run(x):
            with torch.no_grad():
                out = model(torch.from_numpy(np.ascontiguousarray(x)))
            out = out[0] if isinstance(out, (tuple, list)) else out
            return out.float().numpy()
        return run
    return lambda x: np.asarray(model(x)[0])


def _session_logits(path: Path, optimize: bool) -> Callable[[np.ndarray], np.ndarray]:
    from structexport.ortsession import ort_session, session_runner
    run = session_runner(ort_session(path, 1, optimize=optimize))
    return lambda x: run(x)[0]


def int8_stage(staging: Path, source, inputs: dict[str, np.ndarray], sets: CalibrationSets,
               opts: Int8Options, force: bool, say) -> Int8Result:
    """``staging/model.onnx`` (float32, verified) becomes ``model.fp32.onnx`` (its channel
    sums rebased) and the QDQ ``model.onnx``; returns what the deployed files are checked
    against and the manifest record. Raises :class:`Int8GateError` (nothing written) when
    the gate fails and not ``force``."""
    import onnx
    import onnx_ir as ir
    import torch

    from structexport.passes import INT8_PASS_CLASSES, ONNX, PassContext, PassManager
    from structexport.export import TOLERANCES
    from structexport.ortsession import ort_session, session_runner
    from structexport.costmodel import node_costs, totals
    model_path, fp32_path = staging / "model.onnx", staging / FP32_MODEL
    # The structure's MACs, every structured layer decomposed and its sum-pools additions:
    # the theory bench judges the INT8 model by (composing and rebasing change the count)
    structure_macs = totals(node_costs(model_path))["macs"]
    model = ir.from_proto(onnx.load(str(model_path)))
    dense_layers, layer_choice = choose_dense_layers(model, opts.layer_choice,
                                                     Path(opts.layer_cache) if opts.layer_cache else None, say)
    if layer_choice["layers"]:
        kept = sum(r["choice"] == "structured" for r in layer_choice["layers"])
        say(f"int8: {kept} of {len(layer_choice['layers'])} decomposed layers stay structured "
            f"({opts.layer_choice})")
    say("int8: " + ", ".join(cls.name for cls in INT8_PASS_CLASSES))
    first = next(iter(inputs.values()))
    manager = PassManager([cls() for cls in INT8_PASS_CLASSES], check_inputs=torch.from_numpy(first),
                          atol=TOLERANCES["fp32"]["atol"], rtol=TOLERANCES["fp32"]["rtol"], model_kind=ONNX)
    rebased, runs = manager.run(model, PassContext(options={"dense_layers": dense_layers}))
    fp32_path.write_bytes(ir.to_proto(rebased).SerializeToString())
    model_path.unlink()
    exclude = excluded_nodes(fp32_path, opts.keep_fp32)
    say(f"int8: calibrate ({len(sets.calibration)} images, {opts.method}) and quantize")
    quantization = quantize_qdq(fp32_path, model_path, sets.calibration, opts.method, exclude)
    fake = session_runner(ort_session(model_path, 1, optimize=False))
    expected = {label: [np.asarray(o, np.float32) for o in fake(x)] for label, x in inputs.items()}
    atol = output_tolerance(model_path, next(iter(expected.values())))
    # The integer kernels against the fake-quantized graph on real images too (the deployed
    # checks run the verification inputs, which are random)
    _, batch = model_batch(fp32_path)
    kernels = _session_logits(model_path, True)
    images = sets.gate[:KERNEL_CHECK_IMAGES]
    worst = max((float(np.abs(np.asarray(kernels(x)) - np.asarray(fake(x)[0])).max())
                 for x in _batched(images, batch)), default=0.0)
    kernel_check = {"images": len(images) - len(images) % batch, "max_abs_diff": worst, "atol": atol,
                    "passed": worst <= atol}
    if worst > atol and not force:
        from structexport.export import VerificationError
        raise VerificationError(f"model.onnx's integer kernels differ from its QDQ graph on held-out images "
                                f"by {worst:.4g} > {atol:.4g} ({OUTPUT_STEPS} output steps)",
                                "nothing was written; pass --force to keep the artifact")
    say(f"int8: per-layer SQNR on {min(SQNR_IMAGES, len(sets.calibration))} calibration images")
    layers = layer_sqnr(fp32_path, model_path, sets.calibration[:SQNR_IMAGES])
    say(f"int8: accuracy gate on {len(sets.gate)} held-out images")
    reference = logits_function(source)
    gate = agreement(reference, kernels, sets.gate, sets.gate_labels, batch)
    failures = gate_failures(gate, opts)
    gate.update({"against": "the float32 source", "shipped": "model.onnx under ONNX Runtime, all optimizations",
                 "min_agreement": opts.min_agreement, "max_logit_diff_allowed": opts.max_logit_diff,
                 "passed": not failures, "failures": failures})
    if failures and not force:
        worst = ", ".join(f"{r['layer']} ({r['sqnr_db']} dB)" for r in worst_layers(layers))
        raise Int8GateError(f"the INT8 model fails the accuracy gate on {gate['images']} held-out images: "
                            + "; ".join(failures),
                            f"nothing was written. Keep the layers that lose most in float (--keep-fp32 "
                            f"LAYER; lowest SQNR: {worst}), calibrate on more images or with another "
                            "--calibration-method, lower --int8-min-agreement, or pass --force")
    record = {"calibration": sets.description, "quantization": quantization,
              "layer_choice": layer_choice, "passes": [r.to_dict() for r in runs],
              "structure_macs": structure_macs,
              "tolerance": {"atol": atol, "rtol": 0.0, "output_steps": OUTPUT_STEPS,
                            "note": "model.onnx with ONNX Runtime's optimizations (integer kernels) "
                                    "against the same QDQ graph run as written (fake-quantized)"},
              "kernels_on_images": kernel_check, "gate": gate, "layers": layers, "options": opts.to_dict()}
    return Int8Result(expected, atol, record)


def dense_int8_baseline(staging: Path, reference_file: str, source, sets: CalibrationSets,
                        opts: Int8Options, say) -> dict:
    """What an INT8 user would ship without structexport: the dense reference quantized the
    same way with the same calibration, judged by the same gate."""
    say("int8: the dense INT8 baseline")
    quantization = quantize_qdq(staging / reference_file, staging / DENSE_INT8, sets.calibration,
                                opts.method, [])
    _, batch = model_batch(staging / reference_file)
    gate = agreement(logits_function(source), _session_logits(staging / DENSE_INT8, True),
                     sets.gate, sets.gate_labels, batch)
    return {"file": DENSE_INT8, "quantization": quantization, "gate": gate}
