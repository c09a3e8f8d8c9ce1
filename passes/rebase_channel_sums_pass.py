"""rebase_channel_sums: banded channel sums rewritten for INT8 as one scaled sum and
differences of channels, the small conv's weights changed to match (ONNX graphs).

A decomposed structured conv in the ``banded`` realization is ``Conv(band) -> [depthwise
Conv(ones)] -> Conv(alpha)``: the 0/1 band sums ``kc`` consecutive channels into each of
``c`` outputs, and consecutive outputs share ``kc - 1`` of their channels. The small conv
then computes, for the sharp parts of its kernel, differences of nearly equal sums. Fine in
float; in INT8 each sum is rounded to a step set by the range of a sum of ``kc`` channels,
and the difference of two such rounded sums loses the one channel that tells them apart.
Measured on the trained ResNet-20 C/2x2x2 (CIFAR-10, 2,000 test images, ONNX Runtime QDQ):
top-1 agreement with fp32 86% as bands, 98.0% rebased, 98.6% for the same kernels quantized
as dense 3x3 convs.

Any invertible ``T`` (per channel group) gives ``alpha @ band == (alpha @ T^-1) @ (T @ band)``;
this pass takes ``T`` lower bidiagonal:

- channel 0 stays a sum, divided by ``s = sqrt(kc)``;
- channel ``a > 0`` becomes ``sum_a - sum_(a-1) = x[a + kc - 1] - x[a - 1]``: two entries of
  +1/-1, exact in int8, with the range of one channel;
- the small conv's columns become suffix sums: ``alpha'[:, 0] = s * sum_a alpha[:, a]``,
  ``alpha'[:, j] = sum_(a >= j) alpha[:, a]``.

``s`` balances the two roundings the wide channel 0 meets: a sum of ``kc`` channels widens
the activation range (``s = 1``: 95.6% agreement above), an average makes its weight column
``kc`` times the others and coarsens every weight of the per-channel scale (``s = kc``:
95.2%); ``sqrt(kc)`` splits it (98.0%). The depthwise box between them acts per channel and
commutes with ``T``. Outputs are unchanged in exact arithmetic (the manager checks them).
"""
from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from .decompose_structured_conv_pass import layer_name
from .infra import LayerRecord, Pass, PassContext, PassError, PassResult


def conv_ints(node: ir.Node, key: str, default):
    attr = node.attributes.get(key)
    return list(attr.value) if attr is not None else list(default)


def conv_group(node: ir.Node) -> int:
    return int(node.attributes["group"].value) if "group" in node.attributes else 1


def conv_weight(node: ir.Node) -> np.ndarray | None:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    w = node.inputs[1]
    return None if w is None or w.const_value is None else w.const_value.numpy()


def _plain(node: ir.Node) -> bool:
    """Stride 1, no padding, no dilation, no bias (or a zero one), explicit pads."""
    if node.attributes.get("auto_pad") is not None and node.attributes["auto_pad"].value not in ("NOTSET", ""):
        return False
    if any(v != 1 for v in conv_ints(node, "strides", [1, 1]) + conv_ints(node, "dilations", [1, 1])):
        return False
    if any(conv_ints(node, "pads", [0, 0, 0, 0])):
        return False
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        b = node.inputs[2].const_value
        return b is not None and not np.any(b.numpy())
    return True


def band_window(node: ir.Node) -> tuple[int, int, int] | None:
    """``(groups, kc, c)`` when ``node`` is a grouped 1x1 conv whose weights are the 0/1 band
    ``SumPool`` writes (output ``g * c + a`` sums input channels ``a .. a + kc - 1`` of group
    ``g``), else None."""
    w = conv_weight(node)
    if w is None or w.ndim != 4 or w.shape[2:] != (1, 1) or not _plain(node):
        return None
    groups = conv_group(node)
    out, cg = w.shape[:2]
    if out % groups:
        return None
    c = out // groups
    kc = cg - c + 1
    if kc < 2:
        return None
    band = np.zeros((c, cg), w.dtype)
    for a in range(c):
        band[a, a:a + kc] = 1
    want = np.tile(band, (groups, 1))
    return (groups, kc, c) if np.array_equal(w[:, :, 0, 0], want) else None


def only_consumer(value: ir.Value) -> ir.Node | None:
    users = {id(n): n for n, _ in value.uses()}
    if len(users) != 1 or value.is_graph_output():
        return None
    return next(iter(users.values()))


def is_box(node: ir.Node, channels: int) -> bool:
    """A depthwise conv of ones over ``channels`` channels (it may pad: zeros commute)."""
    w = conv_weight(node)
    groups = conv_group(node)
    if w is None or groups != channels or w.shape[:2] != (channels, 1) or not np.all(w == 1):
        return False
    if any(v != 1 for v in conv_ints(node, "strides", [1, 1]) + conv_ints(node, "dilations", [1, 1])):
        return False
    return not (len(node.inputs) > 2 and node.inputs[2] is not None)


def find_channel_sums(graph: ir.Graph) -> list[tuple[ir.Node, ir.Node | None, ir.Node, tuple[int, int, int]]]:
    """Every ``band -> [box] -> small conv`` chain of the graph, with the band's window."""
    found = []
    for node in graph:
        window = band_window(node)
        if window is None:
            continue
        groups, _, c = window
        nxt = only_consumer(node.outputs[0])
        box = None
        if nxt is not None and is_box(nxt, groups * c):
            box, nxt = nxt, only_consumer(nxt.outputs[0])
        w = conv_weight(nxt) if nxt is not None else None
        if w is None or w.shape[1] != c or \
                conv_group(nxt) != groups:
            continue
        found.append((node, box, nxt, window))
    return found


def rebase(band: np.ndarray, alpha: np.ndarray, groups: int, c: int, scale: float):
    """``(T @ band, alpha @ T^-1)`` per group (float64 math, the inputs' dtypes back)."""
    new_band = band.astype(np.float64).copy()
    new_alpha = alpha.astype(np.float64).copy()
    o = alpha.shape[0] // groups
    for g in range(groups):
        rows = slice(g * c, (g + 1) * c)
        b = band[rows, :, 0, 0].astype(np.float64)
        nb = np.empty_like(b)
        nb[0] = b[0] / scale
        nb[1:] = b[1:] - b[:-1]
        new_band[rows, :, 0, 0] = nb
        a = alpha[g * o:(g + 1) * o].astype(np.float64)          # (o, c, n, n)
        na = np.empty_like(a)
        suffix = np.cumsum(a[:, ::-1], axis=1)[:, ::-1]           # sum over a >= j
        na[:, 0] = scale * suffix[:, 0]
        na[:, 1:] = suffix[:, 1:]
        new_alpha[g * o:(g + 1) * o] = na
    return new_band.astype(band.dtype), new_alpha.astype(alpha.dtype)


def _replace_weight(graph: ir.Graph, node: ir.Node, array: np.ndarray, name: str) -> None:
    """A weight of its own for ``node`` (initializers may be shared between layers): the old
    one's name when ``node`` was its only user, else ``name``."""
    old = node.inputs[1]
    if len({id(n) for n, _ in old.uses()}) == 1 and old.name in graph.initializers and not old.is_graph_output():
        name = old.name
        graph.initializers.pop(old.name)
    base, i = name, 1
    while name in graph.initializers:
        name, i = f"{base}_{i}", i + 1
    value = ir.Value(name=name, const_value=ir.tensor(np.ascontiguousarray(array)))
    graph.register_initializer(value)
    node.replace_input_with(1, value)
    if not old.uses() and graph.initializers.get(old.name) is old and not old.is_graph_output():
        graph.initializers.pop(old.name)


class RebaseChannelSumsPass(Pass):
    name = "rebase_channel_sums"
    description = ("banded channel sums as one sum scaled by 1/sqrt(kc) and differences of two "
                   "channels, the small conv's weights as suffix sums (INT8: no rounding between "
                   "nearly equal sums)")
    ir = "onnx"

    def call(self, model: ir.Model, ctx: PassContext) -> PassResult:
        records = []
        # Last first: an initializer shared by several layers' bands is named after the first
        # of them, which then takes the name over once the others have their own
        for band_node, box, small, (groups, kc, c) in reversed(find_channel_sums(model.graph)):
            scale = math.sqrt(kc)
            band, alpha = rebase(conv_weight(band_node), conv_weight(small), groups, c, scale)
            layer = layer_name(small.inputs[1])
            owner = layer[:-len(".conv")] if layer.endswith(".conv") else layer
            _replace_weight(model.graph, band_node, band, f"{owner}.pool.band")
            _replace_weight(model.graph, small, alpha, f"{layer}.weight")
            records.append(LayerRecord(layer, "rebased", {
                "channel_window": kc, "pooled_channels": groups * c, "groups": groups,
                "sum_scale": round(scale, 6), "box": box is not None,
                "nodes": [band_node.name] + ([box.name] if box is not None else []) + [small.name]}))
        return PassResult(model, bool(records), records[::-1])

    def ensures(self, model: ir.Model, ctx: PassContext) -> None:
        left = find_channel_sums(model.graph)
        if left:
            raise PassError(f"{len(left)} banded channel sum(s) left, e.g. {left[0][0].name}")
