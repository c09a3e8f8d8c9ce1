"""Parameters, MACs and additions per node of an ONNX graph (the converted artifact).

One counting rule per operator, as ptflops keeps one per layer type; the torch-side
counterpart is :mod:`structexport.analysis` (per source layer). Multiply-accumulates
(``macs``) come from Conv, ConvTranspose, Gemm and MatMul. The additions of sum-pools
(``adds``) are counted apart, because the theoretical speedup is a ratio of multiplies
(DESIGN.md section 4); they are the nodes of a decomposed conv's sum-pool, recognised by
the shapes every realization takes (:mod:`structexport.onnx_sumpool`,
:class:`structexport.layers.sumpool.SumPool` through the exporter):

- running sums: a CumSum read only by Slices, and the Sub of two Slices of one CumSum;
- box filters and bands: a Conv whose weights are only 0s and 1s (its work is additions);
- ``pool2d`` / ``avgpool3d``: a stride-1 AveragePool next to a Mul by a whole multiple of
  its window (an AveragePool is a mean: the Mul makes it a sum), through a Reshape or Pad.

Any other average pooling (AveragePool, GlobalAveragePool, a ReduceMean over the spatial
axes) is a model's ordinary pooling: its additions are ``pool_adds``, never sum-pool
additions; MaxPool and element-wise Add/Sub count nothing.
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
    adds: int = 0                  # a structured conv's sum-pool
    pool_adds: int = 0             # the model's ordinary average pooling
    params: int = 0
    output_shape: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return asdict(self)


def tensor_shapes(model) -> dict[str, tuple[int, ...]]:
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


class _Graph:
    """Producers, consumers and small constants of a graph, for the sum-pool patterns."""

    def __init__(self, model):
        from onnx import numpy_helper
        self.producer = {o: n for n in model.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for node in model.graph.node:
            for i in node.input:
                self.consumers.setdefault(i, []).append(node)
        self.const = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer
                      if math.prod(i.dims) <= 8}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.const[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)

    def is_running_sum(self, node) -> bool:
        """A CumSum read only by Slices (a running sum cut into window sums)."""
        readers = self.consumers.get(node.output[0], [])
        return bool(readers) and all(r.op_type == "Slice" for r in readers)

    def is_window_difference(self, node) -> bool:
        """A Sub of two Slices of one running sum."""
        sources = [self.producer.get(i) for i in node.input[:2]]
        if len(sources) != 2 or any(s is None or s.op_type != "Slice" for s in sources):
            return False
        cumsum = self.producer.get(sources[0].input[0])
        return (sources[0].input[0] == sources[1].input[0] and cumsum is not None
                and cumsum.op_type == "CumSum")

    def is_sum_pool(self, node) -> bool:
        """A stride-1 AveragePool scaled by a Mul to the sum of its window."""
        attrs = {a.name: a for a in node.attribute}
        kernel = list(attrs["kernel_shape"].ints) if "kernel_shape" in attrs else []
        if not kernel or any(s != 1 for s in (attrs["strides"].ints if "strides" in attrs else [])):
            return False
        volume = math.prod(kernel)
        after = self._through(node.output[0], forward=True)
        before = self._through(node.input[0], forward=False)
        return any(self._scales(mul, volume) for mul in after + before)

    def _through(self, value: str, forward: bool) -> list:
        """The Muls next to ``value``, past one Reshape or Pad."""
        found = []
        nodes = self.consumers.get(value, []) if forward else \
            [self.producer[value]] if value in self.producer else []
        for node in nodes:
            if node.op_type in ("Reshape", "Pad"):
                nodes_next = self.consumers.get(node.output[0], []) if forward else \
                    [self.producer[node.input[0]]] if node.input[0] in self.producer else []
                found += [n for n in nodes_next if n.op_type == "Mul"]
            elif node.op_type == "Mul":
                found.append(node)
        return found

    def _scales(self, mul, volume: int) -> bool:
        """Whether ``mul`` multiplies by a whole multiple of ``volume`` (kc x kh x kw)."""
        for i in mul.input:
            value = self.const.get(i)
            if value is not None and value.size == 1:
                k = float(value.reshape(-1)[0]) / volume
                return k >= 1 and abs(k - round(k)) < 1e-6
        return False


def _pool_adds(node, out: tuple, shapes: dict, graph: _Graph) -> int:
    """Additions of an ordinary average pool: ``window - 1`` per output value."""
    out_elems = math.prod(out) if out else 0
    if node.op_type == "AveragePool":
        kernel = [list(a.ints) for a in node.attribute if a.name == "kernel_shape"]
        return out_elems * (math.prod(kernel[0]) - 1) if kernel else 0
    x = shapes.get(node.input[0])
    if not x or not out_elems:
        return 0
    if node.op_type == "ReduceMean":
        axes = [list(a.ints) for a in node.attribute if a.name == "axes"]
        axes = axes[0] if axes else (graph.const[node.input[1]].reshape(-1).tolist()
                                     if len(node.input) > 1 and node.input[1] in graph.const else [])
        if len(x) != 4 or sorted(a % 4 for a in axes) != [2, 3]:
            return 0   # a mean over anything but the spatial axes is not pooling
    return math.prod(x) - out_elems   # GlobalAveragePool, spatial ReduceMean


def node_costs(path: str | Path) -> list[NodeCost]:
    import onnx
    model = onnx.load(str(path))
    shapes = tensor_shapes(model)
    inits = {i.name: i for i in model.graph.initializer}
    graph = _Graph(model)
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
        elif node.op_type == "CumSum" and graph.is_running_sum(node):
            cost.adds = out_elems
        elif node.op_type == "Sub" and graph.is_window_difference(node):
            cost.adds = out_elems
        elif node.op_type == "AveragePool" and graph.is_sum_pool(node):
            kernel = [list(a.ints) for a in node.attribute if a.name == "kernel_shape"]
            cost.adds = out_elems * (math.prod(kernel[0]) - 1)
        elif node.op_type in ("AveragePool", "GlobalAveragePool", "ReduceMean"):
            cost.pool_adds = _pool_adds(node, out, shapes, graph)
        costs.append(cost)
    return costs


def totals(costs: list[NodeCost]) -> dict:
    """``adds`` are sum-pool additions only; ``pool_adds`` the model's own average pooling."""
    return {"macs": sum(c.macs for c in costs), "adds": sum(c.adds for c in costs),
            "pool_adds": sum(c.pool_adds for c in costs),
            "params": sum(c.params for c in costs), "nodes": len(costs)}
