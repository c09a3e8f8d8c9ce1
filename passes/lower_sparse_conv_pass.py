"""lower_sparse_conv: convs whose weights have a block or permuted-group zero pattern (SSC
tickets, pruned group structure) become (grouped) convs that follow the real zeros, in an
ONNX graph.

The lowering is ``lower_ssc``'s (:func:`~.lower_ssc_pass.lower_kernel`): the effective
kernel's non-zero (out, in) pairs are cut into connected blocks and packed into grouped
K x K and 1 x 1 convs fed by channel gathers. Here it runs on any ``Conv`` of an ONNX
graph, from its weights alone; a layer is lowered when that needs at most ``1 -
min_saving`` of its dense multiplies. The lowered layer is exported on its own (the
TorchScript-based exporter, at the graph's opset) and spliced in place of the conv.
"""
from __future__ import annotations

import io
import contextlib
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import torch

from .decompose_structured_conv_pass import layer_name, plain_conv
from .infra import LayerRecord, Pass, PassContext, PassResult
from .lower_ssc_pass import DEFAULT_MIN_SAVING, lower_kernel


def _opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", 18))


def splice_module(model: ir.Model, node: ir.Node, module: torch.nn.Module, input_shape, prefix: str) -> None:
    """Replace ``node`` (one input, one output) by ``module`` exported to ONNX."""
    x = torch.zeros(input_shape)
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()), torch.no_grad():
        path = Path(tmp) / "layer.onnx"
        torch.onnx.export(module.eval(), (x,), str(path), dynamo=False, opset_version=min(_opset(model), 20),
                          input_names=["x"], output_names=["y"], do_constant_folding=True)
        sub = ir.from_proto(onnx.load(str(path)))
    graph = model.graph
    x_in, y_out = sub.graph.inputs[0], sub.graph.outputs[0]
    for name in list(sub.graph.initializers):
        value = sub.graph.initializers.pop(name)
        value.name = f"{prefix}.{name}"
        graph.register_initializer(value)
    nodes = list(sub.graph)
    for n in nodes:
        sub.graph.remove(n)
        n.name = f"{prefix}/{n.name or n.op_type}"
        for out in n.outputs:
            out.name = f"{prefix}/{out.name}"
    x_in.replace_all_uses_with(node.inputs[0])
    sub.graph.outputs.clear()
    old = node.outputs[0]
    y_out.shape, y_out.type = old.shape, old.type
    ir.convenience.replace_nodes_and_values(graph, node, [node], nodes, [old], [y_out])


class LowerSparseConvPass(Pass):
    name = "lower_sparse_conv"
    ir = "onnx"
    description = "convs with block or permuted-group zeros become grouped convs that follow them (ONNX)"

    def call(self, model: ir.Model, ctx: PassContext) -> PassResult:
        min_saving = float(ctx.option("ssc_min_saving", DEFAULT_MIN_SAVING))
        records, modified = [], False
        for node in [n for n in model.graph if n.op_type == "Conv" and n.domain in ("", "ai.onnx")]:
            conv, _why = plain_conv(node)
            if conv is None or conv["groups"] != 1:
                continue
            w = torch.from_numpy(conv["weight"].copy())
            zeros = float((w == 0).float().mean())
            if zeros < min_saving:      # too few zeros to pay for any lowering
                continue
            O, I, K, _ = w.shape
            bias = None
            if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value is not None:
                bias = torch.from_numpy(node.inputs[2].const_value.numpy().copy())
            lowered, info = lower_kernel(w, bias, conv["stride"], conv["pad"])
            layer = layer_name(node.inputs[1])
            if lowered is None:
                continue
            ratio = lowered.macs_per_pixel() / (O * I * K * K)
            details = {"zeros": zeros, "macs_ratio": ratio, "groups": info["groups"]}
            if ratio > 1 - min_saving:
                records.append(LayerRecord(layer, "kept", dict(details, reason="saves under the minimum")))
                continue
            splice_module(model, node, lowered, conv["input_shape"], layer)
            records.append(LayerRecord(layer, "lowered", details))
            modified = True
        if modified:
            for name, value in list(model.graph.initializers.items()):
                if not value.uses() and not value.is_graph_output():
                    del model.graph.initializers[name]
        return PassResult(model, modified, records)
