"""Kernels to source layers: ONNX nodes and TVM PrimFunc calls mapped to the layer whose
weights they read (:func:`call_layers`), and the per-runtime owner functions built on it."""
from __future__ import annotations

import re
from pathlib import Path

# Operators that only prepare a layer's input (TVM names after legalization, ONNX names):
# attributed forward to the call that reads their output.
FORWARD_OPS = {"cumsum", "strided_slice", "subtract", "concatenate", "pad", "reshape",
               "take", "transpose", "avg_pool2d", "avg_pool3d", "layout_transform", "split",
               "squeeze", "expand_dims",
               # ONNX operators and ONNX Runtime's NCHWc input reorders
               "CumSum", "Slice", "Sub", "Concat", "Pad", "Reshape", "AveragePool", "Gather",
               "Transpose", "ReorderInput"}

# Inputs of quantized operators that are quantization parameters (scales, zero points), by
# position. They are not weights: they describe activations, and one is read alike by the
# kernel that produces a tensor and by every kernel that reads it, so they say nothing about
# the layer (a kernel is mapped by the tensors it computes with). QLinearConcat: see
# :func:`quant_param_positions`; other ``Q*`` operators: by ONNX Runtime's quantizer's names.
QUANT_PARAM_INPUTS = {
    "QuantizeLinear": (1, 2), "DequantizeLinear": (1, 2),
    "QLinearConv": (1, 2, 4, 5, 6, 7), "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "QLinearAdd": (1, 2, 4, 5, 6, 7), "QLinearMul": (1, 2, 4, 5, 6, 7),
    "QGemm": (1, 2, 4, 5, 7, 8),
    "QLinearGlobalAveragePool": (1, 2, 3, 4), "QLinearAveragePool": (1, 2, 3, 4),
    "QLinearSigmoid": (1, 2, 3, 4), "QLinearLeakyRelu": (1, 2, 3, 4),
    "QLinearSoftmax": (1, 2, 3, 4), "QLinearReduceMean": (1, 2, 3, 4),
    "ConvInteger": (2, 3), "MatMulInteger": (2, 3),
}
QUANT_PARAM_SUFFIXES = ("_scale", "_zero_point")
# ONNX Runtime's graph transformers name the nodes they create after the node they replace,
# with a unique suffix: ``node_Conv_643_token_34`` (a QLinearConv fused from a QDQ group)
ORT_FUSED_SUFFIX = re.compile(r"(_token_\d+)+$")


def quant_param_positions(op: str, names: list[str]) -> set[int]:
    """Positions of ``names`` (a node's inputs, empty strings kept) that are quantization
    parameters of the quantized operator ``op`` (empty for other operators)."""
    if op in QUANT_PARAM_INPUTS:
        return set(QUANT_PARAM_INPUTS[op])
    if op == "QLinearConcat":   # Y_scale, Y_zero_point, then (X, X_scale, X_zero_point) per input
        return {0, 1} | {i for i in range(2, len(names)) if (i - 2) % 3}
    if op.startswith("QLinear") or op in ("QAttention", "QEmbedLayerNormalization"):
        return {i for i, n in enumerate(names) if n.endswith(QUANT_PARAM_SUFFIXES)}
    return set()


def onnx_calls(path: Path) -> list[dict]:
    """The nodes of an ONNX graph as calls for :func:`call_layers` (a node that reads only
    weights, e.g. a transpose of one or the DequantizeLinear of an INT8 weight, passes the
    weight's name on to its output, and is marked ``alias``). The quantization parameters of
    quantized operators (:data:`QUANT_PARAM_INPUTS`) are left out of the weights."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    alias: dict[str, str] = {}
    calls = []
    for node in model.graph.node:
        names = list(node.input)
        params = quant_param_positions(node.op_type, names)
        ins = [alias.get(i, i) for k, i in enumerate(names)
               if i and not (k in params and alias.get(i, i) in inits)]
        weights = [i for i in ins if i in inits]
        data = [i for i in ins if i not in inits]
        only_weights = bool(weights) and not data
        if only_weights:
            alias.update({o: weights[0] for o in node.output})
            inits.update(node.output)
        calls.append({"name": node.name or node.output[0], "op": node.op_type, "weights": weights,
                      "inputs": data, "outputs": list(node.output), "alias": only_weights})
    return calls


def onnx_node_layers(path: Path, layers: set[str]) -> dict[str, str]:
    """Source layer of each node of an ONNX graph, by node name and by output tensor name
    (runtimes name the nodes they rewrite after them); nodes without one are left out."""
    calls = onnx_calls(path)
    out: dict[str, str] = {}
    for c, layer in zip(calls, call_layers(calls, layers)):
        if layer:
            out.setdefault(c["name"], layer)
            for o in c["outputs"]:
                out.setdefault(o, layer)
    return out


def ort_owner(path: Path, optimized: Path | None, layers):
    """Profile node names are those of ONNX Runtime's optimized graph. Its nodes that ONNX
    Runtime kept or renamed after an exported node or tensor (``conv2d_44_nchwc``; the
    QLinearConv ``node_Conv_643_token_34`` fused from an INT8 model's QDQ group around
    ``node_Conv_643``) take that node's layer; the ones it added (layout reorders, whose
    weights it renamed too) follow the rules of :func:`call_layers` from their neighbours in
    the optimized graph."""
    owners = onnx_node_layers(path, layers)

    def exported(name: str, outputs=()) -> str | None:
        return (owners.get(name) or owners.get(name.removesuffix("_nchwc"))
                or owners.get(ORT_FUSED_SUFFIX.sub("", name))
                or next((owners[o] for o in outputs if o in owners), None))
    opt: dict[str, str] = {}
    if optimized and optimized.is_file():
        calls = onnx_calls(optimized)
        known = {i: layer for i, c in enumerate(calls) if (layer := exported(c["name"], c["outputs"]))}
        opt = {c["name"]: layer for c, layer in zip(calls, call_layers(calls, layers, known)) if layer}
    return lambda call: opt.get(call["name"]) or exported(call["name"])


def call_layers(calls: list[dict], layers: set[str], known: dict[int, str] | None = None
                ) -> list[str | None]:
    """Source layer of each call (a TVM PrimFunc call or an ONNX node, in execution order,
    each ``{"op", "weights", "inputs", "outputs"}``): by the weights it reads (the longest
    layer name that prefixes a weight's ONNX initializer name); else, for data movement
    (:data:`FORWARD_OPS`), the layer of a call that reads its output; else the layer of the
    most recent call producing one of its inputs (activations; residual adds: the block's
    last conv, not the identity). A weight read by several
    calls says nothing about the layer: the exporter shares one constant between layers of
    the same shape (a sum-pool's band and box filters are named after the first such layer),
    so a call that reads only shared weights is placed like data movement, and only when
    that finds nothing by its weight's name. A call found by none of these (one that reads
    only a graph input, e.g. the QuantizeLinear of an INT8 model's input) goes to the layer
    of a call that reads its output. A call that only passes weights on (``alias``, e.g. the
    DequantizeLinear of an INT8 weight) is not counted as reading them. Cycles through a
    residual's shortcut are cut, and every input is tried, not only the first; None: no
    layer found.
    ``known``: layers already known for some calls (by index), taken as they are."""
    producer = {o: i for i, c in enumerate(calls) for o in c["outputs"]}
    readers: dict[str, list[int]] = {}
    for i, c in enumerate(calls):
        for a in c["inputs"]:
            readers.setdefault(a, []).append(i)
    memo: dict[int, str] = dict(known or {})
    weight_readers: dict[str, int] = {}
    for c in calls:
        if c.get("alias"):   # passes the weight on to the calls that read it: they count
            continue
        for w in set(c["weights"]):
            weight_readers[w] = weight_readers.get(w, 0) + 1

    def owner(name: str) -> str | None:
        parts = name.split(".")
        # the full name too: a layer of an ONNX source is named after its weight itself
        # when the weight's name has no ``.weight`` suffix (other exporters' names)
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in layers:
                return prefix
        return None

    # A call that no layer reaches must not be searched again from every later call: a
    # budget per top-level search keeps a graph with unmapped chains linear, not exponential.
    budget = {"steps": 0}

    def layer_of(i: int, visiting: frozenset = frozenset()) -> str | None:
        if i in memo:
            return memo[i]
        budget["steps"] += 1
        if i in visiting or len(visiting) > 200 or budget["steps"] > 5000:
            return None
        visiting = visiting | {i}
        c = calls[i]
        own = [w for w in c["weights"] if weight_readers.get(w, 0) <= 1]
        found = next((o for o in map(owner, own) if o), None)
        shared_only = bool(c["weights"]) and not own
        if found is None and (c["op"] in FORWARD_OPS or shared_only):
            for j in (j for o in c["outputs"] for j in readers.get(o, []) if j > i):
                found = layer_of(j, visiting)
                if found:
                    break
        if found is None:  # the most recent computing producer first: a residual add
            # follows its block's last conv, not the identity or the shortcut's data movement
            ps = sorted({producer[a] for a in c["inputs"] if a in producer and producer[a] < i},
                        key=lambda p: (calls[p]["op"] in FORWARD_OPS, -p))
            for p in ps:
                found = layer_of(p, visiting)
                if found:
                    break
        if found is None and shared_only:
            found = next((o for o in map(owner, c["weights"]) if o), None)
        if found is None and c["op"] not in FORWARD_OPS:   # e.g. quantizing the graph input
            for j in (j for o in c["outputs"] for j in readers.get(o, []) if j > i):
                found = layer_of(j, visiting)
                if found:
                    break
        if found:  # a None found under a cut cycle may resolve from elsewhere: not kept
            memo[i] = found
        return found
    out = []
    for i in range(len(calls)):
        budget["steps"] = 0
        out.append(layer_of(i))
    return out


def tvm_op(symbol: str) -> str:
    """The operator of a PrimFunc symbol: ``fused_conv2d3`` -> ``conv2d``."""
    return re.sub(r"\d+$", "", symbol.removeprefix("fused_"))


def tvm_owner(calls, layers):
    """Layer of each profiled TVM call (named ``symbol#index``) of the lowered program's
    ``calls`` (:func:`~structexport.profiling.tvm_host.tvm_program`)."""
    owners = call_layers([dict(c, op=tvm_op(c["symbol"])) for c in calls], layers)
    index = {f"{c['symbol']}#{k}": owners[k] for k, c in enumerate(calls)}
    return lambda call: index.get(call["name"])
