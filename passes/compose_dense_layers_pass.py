"""compose_dense_layers: chosen decomposed layers become one dense conv again (ONNX graphs).

A decomposed structured conv in the ``banded`` realization is ``Conv(band) -> [depthwise
Conv(ones)] -> Conv(alpha)`` (or ``Conv(ones) -> Conv(alpha)`` when the channels carry no
structure). Where that chain runs slower than the dense conv it came from, on the target as
quantized, the layer is better shipped dense: in INT8 each of the three convs is its own
integer kernel with its own requantization, and on small maps (a CIFAR ResNet's 32x32x16)
the per-kernel overhead outweighs the multiplies saved. Which layers: ``ctx.options
["dense_layers"]``, ``{layer: why}`` (the INT8 stage measures each layer shape on this
machine and names the slower ones, :func:`structexport.quantize.choose_dense_layers`).

The dense kernel is the composition, exact in float64: for every output ``o`` and input
channel ``i`` of a group, ``W[o, i] = sum_j alpha[o, j] (*) box (x) band[j, i]``, the
full 2-D convolution of ``alpha``'s ``n x n`` kernel with the ``k x k`` box of ones
(``(n + k - 1)`` square, the source's ``N``). The box carries the source's padding and is
stride 1; the small conv carries the stride. Outputs are unchanged (the manager checks).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .decompose_structured_conv_pass import layer_name
from .infra import LayerRecord, Pass, PassContext, PassError, PassResult
from .rebase_channel_sums_pass import (band_window, conv_group, conv_ints, conv_weight, is_box,
                                       only_consumer)


@dataclass
class DecomposedLayer:
    """One decomposed conv in the graph: its nodes, in order, and its source layer's name."""
    layer: str
    band: ir.Node | None
    box: ir.Node | None
    small: ir.Node

    @property
    def nodes(self) -> list[ir.Node]:
        return [n for n in (self.band, self.box, self.small) if n is not None]

    @property
    def input(self) -> ir.Value:
        return self.nodes[0].inputs[0]


def source_layer(small: ir.Node) -> str:
    """The source layer a small conv belongs to: ``stage_1.0.conv_a`` for the zoo's
    ``stage_1.0.conv_a.conv.weight`` and for ``decompose_structured_conv``'s
    ``stage_1.0.conv_a.alpha``."""
    name = layer_name(small.inputs[1])
    for suffix in (".conv", ".alpha"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _small_conv(node: ir.Node | None, channels: int) -> bool:
    """A conv with a constant, non-binary weight reading ``channels`` channels (the
    layer's ``alpha``), no padding of its own when it follows a box."""
    w = conv_weight(node) if node is not None else None
    return w is not None and w.ndim == 4 and w.shape[1] * conv_group(node) == channels \
        and not np.all((w == 0) | (w == 1)) and conv_ints(node, "dilations", [1, 1]) == [1, 1]


def find_decomposed(graph: ir.Graph) -> list[DecomposedLayer]:
    """Every ``band -> [box] -> small`` and ``box -> small`` chain of the graph."""
    found, seen_boxes = [], set()
    for node in graph:
        window = band_window(node)
        if window is None:
            continue
        groups, _, c = window
        box, nxt = None, only_consumer(node.outputs[0])
        if nxt is not None and is_box(nxt, groups * c):
            box, nxt = nxt, only_consumer(nxt.outputs[0])
        if _small_conv(nxt, groups * c) and conv_group(nxt) == groups and \
                (box is None or not any(conv_ints(nxt, "pads", [0, 0, 0, 0]))):
            found.append(DecomposedLayer(source_layer(nxt), node, box, nxt))
            if box is not None:
                seen_boxes.add(id(box))
    for node in graph:
        w = conv_weight(node)
        if w is None or id(node) in seen_boxes or not is_box(node, w.shape[0]):
            continue
        nxt = only_consumer(node.outputs[0])
        if _small_conv(nxt, w.shape[0]) and not any(conv_ints(nxt, "pads", [0, 0, 0, 0])):
            found.append(DecomposedLayer(source_layer(nxt), None, node, nxt))
    return found


def composed_weight(layer: DecomposedLayer) -> np.ndarray:
    """The dense kernel of ``layer`` (float64 math, ``alpha``'s dtype back)."""
    alpha = conv_weight(layer.small)
    groups = conv_group(layer.small)
    out, c, n1, n2 = alpha.shape
    a = alpha.astype(np.float64)
    if layer.box is not None:
        k1, k2 = conv_weight(layer.box).shape[2:]
        spatial = np.zeros((out, c, n1 + k1 - 1, n2 + k2 - 1))
        for u in range(k1):
            for v in range(k2):
                spatial[:, :, u:u + n1, v:v + n2] += a
    else:
        spatial = a
    if layer.band is None:
        return spatial.astype(alpha.dtype)
    band = conv_weight(layer.band)[:, :, 0, 0].astype(np.float64)      # (groups * c, C / groups)
    per_group = out // groups
    dense = np.empty((out, band.shape[1], *spatial.shape[2:]))
    for g in range(groups):
        o, rows = slice(g * per_group, (g + 1) * per_group), slice(g * c, (g + 1) * c)
        dense[o] = np.einsum("ojyx,ji->oiyx", spatial[o], band[rows])
    return dense.astype(alpha.dtype)


def dense_conv_attributes(layer: DecomposedLayer, kernel: tuple[int, int]) -> dict:
    """The dense conv's attributes: the box's padding (the small conv's when there is no
    box), the small conv's stride and groups."""
    padded = layer.box if layer.box is not None else layer.small
    return {"group": conv_group(layer.small), "kernel_shape": list(kernel),
            "strides": conv_ints(layer.small, "strides", [1, 1]),
            "pads": conv_ints(padded, "pads", [0, 0, 0, 0])}


def _compose(graph: ir.Graph, layer: DecomposedLayer) -> tuple[int, int]:
    weight = composed_weight(layer)
    name, i = f"{layer.layer}.weight", 1
    while name in graph.initializers:
        name, i = f"{layer.layer}.weight_{i}", i + 1
    w = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(weight)))
    graph.register_initializer(w)
    bias = layer.small.inputs[2] if len(layer.small.inputs) > 2 else None
    inputs = [layer.input, w] + ([bias] if bias is not None else [])
    conv = ir.node("Conv", inputs, attributes=dense_conv_attributes(layer, weight.shape[2:]),
                   name=f"{layer.layer}/dense", num_outputs=1)
    old = layer.small.outputs[0]
    conv.outputs[0].shape, conv.outputs[0].type = old.shape, old.type
    ir.convenience.replace_nodes_and_values(graph, layer.small, layer.nodes, [conv], [old], [conv.outputs[0]])
    return tuple(weight.shape)


class ComposeDenseLayersPass(Pass):
    name = "compose_dense_layers"
    description = ("decomposed layers measured slower than their dense conv become that conv "
                   "again (INT8: per-layer choice)")
    ir = "onnx"

    def requires(self, model: ir.Model, ctx: PassContext) -> None:
        chosen = ctx.option("dense_layers") or {}
        known = {d.layer for d in find_decomposed(model.graph)}
        unknown = sorted(set(chosen) - known)
        if unknown:
            raise PassError(f"no decomposed layer {unknown[0]!r} to compose"
                            + (f" ({len(unknown) - 1} more)" if len(unknown) > 1 else ""))

    def call(self, model: ir.Model, ctx: PassContext) -> PassResult:
        chosen = ctx.option("dense_layers") or {}
        records = []
        for layer in find_decomposed(model.graph):
            if layer.layer not in chosen:
                continue
            nodes = [n.name for n in layer.nodes]
            shape = _compose(model.graph, layer)
            records.append(LayerRecord(layer.layer, "composed", {"why": chosen[layer.layer], "replaced": nodes,
                                                                 "weight_shape": list(shape)}))
        if records:
            for name, value in list(model.graph.initializers.items()):
                if not value.uses() and not value.is_graph_output():
                    del model.graph.initializers[name]
        return PassResult(model, bool(records), records)

    def ensures(self, model: ir.Model, ctx: PassContext) -> None:
        left = sorted({d.layer for d in find_decomposed(model.graph)} & set(ctx.option("dense_layers") or {}))
        if left:
            raise PassError(f"{len(left)} chosen layer(s) still decomposed, e.g. {left[0]}")
