"""Parameters, MACs and additions per node of an ONNX graph (the converted artifact).

One counting rule per operator, as ptflops keeps one per layer type; the torch-side
counterpart is :mod:`structexport.analysis` (per source layer). Multiply-accumulates
(``macs``) come from Conv, ConvTranspose, Gemm and MatMul; the element-wise additions of
sum-pools and box filters (CumSum, Add/Sub between activations, AveragePool -- the
window sums of the "pool2d" realization, whose Mul by the window's volume is a scale,
counted as neither -- and the ones-kernels of box convs) are counted apart (``adds``),
because the theoretical speedup is a ratio of multiplies (DESIGN.md section 4). A conv
whose weights are only 0s and 1s is a sum (a sum-pool's band or box filter): its work
counts as additions.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class NodeCost:
    name: str
    op: str
    macs: int = 0
    adds: int = 0
    params: int = 0
    output_shape: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def _shapes(model) -> dict[str, tuple[int, ...]]:
    import onnx
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[vi.name] = tuple(d.dim_value for d in dims)
    for init in inferred.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _binary_kernel_adds(init) -> float | None:
    """For a conv weight of only 0s and 1s (a sum-pool's band or box filter), the additions
    per output value (mean over filters of non-zeros - 1); None for a real kernel."""
    from onnx import numpy_helper
    w = numpy_helper.to_array(init)
    if w.size <= 1 or not bool(np.all((w == 0.0) | (w == 1.0))):
        return None
    nnz = (w != 0).reshape(w.shape[0], -1).sum(axis=1)
    return float(np.mean(np.maximum(nnz - 1, 0)))


def node_costs(path: str | Path) -> list[NodeCost]:
    import onnx
    model = onnx.load(str(path))
    shapes = _shapes(model)
    inits = {i.name: i for i in model.graph.initializer}
    costs = []
    for node in model.graph.node:
        out = shapes.get(node.output[0], ()) if node.output else ()
        out_elems = math.prod(out) if out else 0
        params = sum(math.prod(inits[i].dims) for i in node.input if i in inits)
        cost = NodeCost(node.name or node.output[0], node.op_type, params=params, output_shape=out)
        if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
            w = shapes.get(node.input[1])
            if w and out_elems:
                per_output = math.prod(w[1:]) if node.op_type == "Conv" else math.prod(w[2:]) * w[0] // max(1, out[1])
                adds = _binary_kernel_adds(inits[node.input[1]]) if node.input[1] in inits else None
                if adds is None:
                    cost.macs = out_elems * per_output
                else:
                    cost.adds = int(round(out_elems * adds))
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0])
            if a and out_elems:
                transposed = any(at.name == "transA" and at.i for at in node.attribute)
                k = a[-2] if transposed else a[-1]
                cost.macs = out_elems * k
        elif node.op_type == "CumSum":
            cost.adds = out_elems
        elif node.op_type == "Sub" and not any(i in inits for i in node.input):  # running-sum differences
            cost.adds = out_elems
        elif node.op_type == "AveragePool":
            kernel = [list(a.ints) for a in node.attribute if a.name == "kernel_shape"]
            if kernel:
                cost.adds = out_elems * (math.prod(kernel[0]) - 1)
        costs.append(cost)
    return costs


def totals(costs: list[NodeCost]) -> dict:
    return {"macs": sum(c.macs for c in costs), "adds": sum(c.adds for c in costs),
            "params": sum(c.params for c in costs), "nodes": len(costs)}
