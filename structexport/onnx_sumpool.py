"""The sum-pool of a decomposed structured conv, emitted as ONNX nodes (onnx_ir).

The same realizations as :class:`structexport.layers.sumpool.SumPool` (which the torch
passes export through the exporter), written directly into an ONNX graph for models that
arrive as ONNX: zero padding, then per channel group a ``kc x kh x kw`` box sum at stride 1.

- channel sums: running sums along the channel axis (CumSum, two Slices, Sub, Concat);
- spatial sums: ``"box"`` a depthwise Conv with a kernel of ones (it pads, so no Pad
  node), ``"cumsum"`` running sums along each spatial axis after a Pad, ``"banded"`` the
  channel sum as a 1x1 Conv with a 0/1 band instead of running sums, then the box;
- ``"pool2d"``: no CumSum, only 2-D AveragePools (DESIGN.md section 5): the channel sum as
  a ``(kc, 1)`` AveragePool of the ``(N * groups, 1, C / groups, H * W)`` view, one Mul by
  ``kc * kh * kw`` (an AveragePool is a mean), then a ``(kh, kw)`` AveragePool whose pads
  count as zeros (``count_include_pad=1``; a Pad first where the pads exceed half the kernel);
- ``"avgpool3d"``: the naive reference form (``--sumpool-realization avgpool3d`` only): a Pad,
  one ``(kc, kh, kw)`` AveragePool of the ``(N * groups, 1, C / groups, H, W)`` view and a Mul
  by its volume.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir


class GraphBuilder:
    """Nodes and initializers added before one node of a graph, named under a prefix."""

    def __init__(self, graph: ir.Graph, before: ir.Node, prefix: str):
        self.graph, self.before, self.prefix = graph, before, prefix
        self.nodes: list[ir.Node] = []
        self.count = 0
        self._taken = {n.name for n in graph}   # a graph decomposed before holds such names

    def name(self, what: str) -> str:
        self.count += 1
        name = f"{self.prefix}/{what}_{self.count}"
        while name in self._taken:
            self.count += 1
            name = f"{self.prefix}/{what}_{self.count}"
        self._taken.add(name)
        return name

    def const(self, name: str, array: np.ndarray) -> ir.Value:
        base, i = name, 1
        while name in self.graph.initializers:   # a graph decomposed before holds the name
            name, i = f"{base}_{i}", i + 1
        value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array)))
        self.graph.register_initializer(value)
        return value

    def op(self, op_type: str, inputs: list[ir.Value], **attrs) -> ir.Value:
        node = ir.node(op_type, inputs, attributes=attrs, name=self.name(op_type.lower()), num_outputs=1)
        node.outputs[0].name = node.name + ":0"
        self.nodes.append(node)
        return node.outputs[0]

    def ints(self, name: str, values) -> ir.Value:
        return self.const(f"{self.prefix}/{name}", np.asarray(values, dtype=np.int64))


def running_sum(b: GraphBuilder, x: ir.Value, axis: int, length: int, size: int) -> ir.Value:
    """Sums of ``length`` consecutive entries along ``axis`` (valid positions only) of a
    tensor whose ``axis`` has ``size`` entries."""
    if length == 1:
        return x
    axis_v = b.ints(f"axis{axis}_{b.count}", [axis])
    c = b.op("CumSum", [x, b.ints(f"cumaxis{axis}_{b.count}", axis)])
    head = b.op("Slice", [c, b.ints(f"h0_{b.count}", [length - 1]), b.ints(f"h1_{b.count}", [length]), axis_v])
    if size == length:
        return head
    upper = b.op("Slice", [c, b.ints(f"u0_{b.count}", [length]), b.ints(f"u1_{b.count}", [size]), axis_v])
    lower = b.op("Slice", [c, b.ints(f"l0_{b.count}", [0]), b.ints(f"l1_{b.count}", [size - length]), axis_v])
    tail = b.op("Sub", [upper, lower])
    return b.op("Concat", [head, tail], axis=axis)


def emit_sumpool(b: GraphBuilder, x: ir.Value, shape: tuple[int, int, int, int], groups: int,
                 window: tuple[int, int, int], padding: int, realization: str, dtype) -> ir.Value:
    """The pooled tensor ``(N, groups * (C/groups - kc + 1), H + 2p - kh + 1, W + 2p - kw + 1)``."""
    n, channels, height, width = shape
    kc, kh, kw = window
    cg = channels // groups
    out_channels = groups * (cg - kc + 1)
    if realization == "pool2d":
        return _pool2d(b, x, shape, groups, window, padding, dtype)
    if realization == "avgpool3d":
        return _avgpool3d(b, x, shape, groups, window, padding, dtype)
    if realization not in ("cumsum", "banded", "box"):
        raise ValueError(f"unknown sum-pool realization {realization!r}")
    if realization == "banded" and kc > 1:
        band = np.zeros((out_channels, cg, 1, 1), dtype=dtype)
        for a in range(cg - kc + 1):
            band[a::cg - kc + 1, a:a + kc] = 1.0
        x = b.op("Conv", [x, b.const(f"{b.prefix}.sumpool_band", band)], group=groups,
                 kernel_shape=[1, 1])
    elif kc > 1:
        if groups > 1:
            x = b.op("Reshape", [x, b.ints("grouped_shape", [n, groups, cg, height, width])])
            x = running_sum(b, x, 2, kc, cg)
            x = b.op("Reshape", [x, b.ints("pooled_shape", [n, out_channels, height, width])])
        else:
            x = running_sum(b, x, 1, kc, channels)
    if kh * kw == 1:
        if padding:
            x = b.op("Pad", [x, b.ints("pads", [0, 0, padding, padding, 0, 0, padding, padding])])
        return x
    if realization in ("box", "banded"):
        ones = np.ones((out_channels, 1, kh, kw), dtype=dtype)
        return b.op("Conv", [x, b.const(f"{b.prefix}.sumpool_ones", ones)], group=out_channels,
                    kernel_shape=[kh, kw], pads=[padding] * 4)
    if padding:
        x = b.op("Pad", [x, b.ints("pads", [0, 0, padding, padding, 0, 0, padding, padding])])
    x = running_sum(b, x, 2, kh, height + 2 * padding)
    return running_sum(b, x, 3, kw, width + 2 * padding)


def _pool2d(b: GraphBuilder, x: ir.Value, shape: tuple[int, int, int, int], groups: int,
            window: tuple[int, int, int], padding: int, dtype) -> ir.Value:
    """As :meth:`structexport.layers.sumpool.SumPool._pool2d` (the same nodes as its export;
    the reshapes leave the batch free)."""
    from structexport.layers.sumpool import pool_pads
    _, channels, height, width = shape
    kc, kh, kw = window
    cg = channels // groups
    out_channels = groups * (cg - kc + 1)
    if kc > 1:
        x = b.op("Reshape", [x, b.ints("pool_view", [-1, 1, cg, height * width])])
        x = b.op("AveragePool", [x], kernel_shape=[kc, 1], strides=[1, 1], pads=[0, 0, 0, 0],
                 count_include_pad=1)
        x = b.op("Reshape", [x, b.ints("pooled_shape", [-1, out_channels, height, width])])
    if kc * kh * kw > 1:
        x = b.op("Mul", [x, b.const(f"{b.prefix}.sumpool_scale", np.asarray(kc * kh * kw, dtype=dtype))])
    inside = pool_pads(window, padding)
    if padding and not inside:
        x = b.op("Pad", [x, b.ints("pads", [0, 0, padding, padding, 0, 0, padding, padding])])
    if kh * kw > 1:
        x = b.op("AveragePool", [x], kernel_shape=[kh, kw], strides=[1, 1],
                 pads=[padding if inside else 0] * 4, count_include_pad=1)
    return x


def _avgpool3d(b: GraphBuilder, x: ir.Value, shape: tuple[int, int, int, int], groups: int,
               window: tuple[int, int, int], padding: int, dtype) -> ir.Value:
    """As :class:`structexport.layers.sumpool.SumPool`'s ``avgpool3d``: the zero-padded input
    viewed as ``(N * groups, 1, C / groups, H, W)``, one 3-D AveragePool times its volume."""
    _, channels, height, width = shape
    kc, kh, kw = window
    cg = channels // groups
    out_channels = groups * (cg - kc + 1)
    if padding:
        x = b.op("Pad", [x, b.ints("pads", [0, 0, padding, padding, 0, 0, padding, padding])])
    hp, wp = height + 2 * padding, width + 2 * padding
    x = b.op("Reshape", [x, b.ints("pool3d_view", [-1, 1, cg, hp, wp])])
    if kc * kh * kw > 1:
        x = b.op("AveragePool", [x], kernel_shape=[kc, kh, kw], strides=[1, 1, 1], pads=[0] * 6,
                 count_include_pad=1)
        x = b.op("Mul", [x, b.const(f"{b.prefix}.sumpool_scale", np.asarray(kc * kh * kw, dtype=dtype))])
    return b.op("Reshape", [x, b.ints("pooled_shape", [-1, out_channels, hp - kh + 1, wp - kw + 1])])
