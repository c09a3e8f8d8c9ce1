"""decompose_structured_conv: convs whose *weights* are structured become a sum-pool and a
small conv, in an ONNX graph (models that arrive as ONNX, or any model exported to it).

Nothing is declared: for every ``Conv`` with a constant 2-D kernel, the cheapest
``c x n x n`` structure whose relative residual is within ``max_residual`` is discovered
in the weights (:func:`structexport.discovery.discover_structure`; exact structure by
default). A layer is rewritten when that structure needs at most ``1 - min_saving`` of the
dense multiplies and, on ONNX Runtime targets, when the layer cost model of this CPU class
(:mod:`structexport.layer_cost`) predicts the rewritten layer faster than the dense conv
(with ``autotune``: when it is measured faster); a layer kept dense is recorded with both
predictions:

``Conv(X, W, stride=s, pads=p) == Conv(SumPool(pad(X, p)), alpha, stride=s)``

(DESIGN.md section 1.1), the sum-pool emitted by :mod:`structexport.onnx_sumpool` in the
realization the cost model picks for the layer's input size; ``sumpool_realization`` forces
one, and ``autotune`` picks it by timing the candidates (:class:`.autotune.Tuner`, the same
measurement and cache as ``realize_sumpool``'s: the layer is rebuilt as the torch sum-pool
and small conv that compute it). Convs that cannot be read as
a dense 2-D conv with a constant square kernel (dilation, asymmetric padding, auto_pad,
weights computed at run time) are left as they are and recorded with the reason.
"""
from __future__ import annotations

import fnmatch

import numpy as np
import onnx_ir as ir

from structexport.discovery import EXACT, discover_structure
from structexport.layer_cost import (DENSE_BY_COST_TARGETS, LayerShape, decide, load_cost_model,
                                     measured_reason)
from structexport.layers.structured import box_window
from structexport.layers.sumpool import MEASURABLE_REALIZATIONS, SumPool
from structexport.onnx_sumpool import GraphBuilder, emit_sumpool
from structexport.structure_plan import layer_of_weight

from .infra import LayerRecord, Pass, PassContext, PassError, PassResult

DEFAULT_MIN_SAVING = 0.2


def declared_structure(layer: str, C: int, ctx: PassContext) -> tuple[int, int] | None:
    """The ``(c, n)`` that ``--declare-structured GLOB=SPEC`` forces on ``layer`` (C input
    channels per group), or None: then the structure is discovered."""
    for glob, spec in (ctx.option("declared_structures") or {}).items():
        if fnmatch.fnmatchcase(layer, glob):
            if spec in ("c2n2", "c1n2"):
                return (max(1, C // 2) if spec == "c2n2" else C), 2
            c, n = spec
            return int(c), int(n)
    return None


def check_declared_globs(layers: list[str], ctx: PassContext) -> None:
    """Refuse (exit 2) a ``--declare-structured GLOB`` that names no conv of the model: it
    would declare nothing."""
    unmatched = [glob for glob in (ctx.option("declared_structures") or {})
                 if not any(fnmatch.fnmatchcase(layer, glob) for layer in layers)]
    if unmatched:
        from .infra import PassOptionError
        shown = ", ".join(layers[:6]) + (", ..." if len(layers) > 6 else "")
        raise PassOptionError(f"--declare-structured {', '.join(repr(g) for g in unmatched)} "
                              f"match{'es' if len(unmatched) == 1 else ''} no conv of the model",
                              f"name its convs: {shown or 'it has none'}")


def conv_layers(model: ir.Model) -> list[str]:
    """The layer names of the graph's convs with a constant weight."""
    return [layer_name(n.inputs[1]) for n in model.graph
            if n.op_type == "Conv" and n.domain in ("", "ai.onnx") and len(n.inputs) > 1
            and n.inputs[1] is not None and n.inputs[1].const_value is not None]


def layer_name(weight: ir.Value) -> str:
    """The source layer a conv belongs to: its weight's name without ``.weight`` (the
    name the profile's layer mapping finds again as a prefix of the new weights)."""
    return layer_of_weight(weight.name or "conv")


def _int_list(node: ir.Node, key: str, default):
    attr = node.attributes.get(key)
    return list(attr.value) if attr is not None else list(default)


def plain_conv(node: ir.Node) -> tuple[dict | None, str]:
    """The conv's geometry when this pass can rewrite it, else (None, why not)."""
    weight = node.inputs[1] if len(node.inputs) > 1 else None
    if weight is None or weight.const_value is None:
        return None, "weight is computed at run time"
    w = weight.const_value.numpy()
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        return None, f"kernel {list(w.shape)} is not a square 2-D kernel"
    auto_pad = node.attributes.get("auto_pad")
    if auto_pad is not None and auto_pad.value not in ("NOTSET", b"NOTSET"):
        return None, f"auto_pad {auto_pad.value}"
    if any(d != 1 for d in _int_list(node, "dilations", [1, 1])):
        return None, "dilated"
    pads = _int_list(node, "pads", [0, 0, 0, 0])
    if len(set(pads)) != 1:
        return None, f"asymmetric padding {pads}"
    strides = _int_list(node, "strides", [1, 1])
    if strides[0] != strides[1]:
        return None, f"strides {strides}"
    x = node.inputs[0]
    if x.shape is None or len(x.shape) != 4 or not all(isinstance(d, int) for d in x.shape):
        return None, "input shape unknown (run shape inference with fixed dims)"
    group = node.attributes.get("group")
    return {"weight": w, "groups": int(group.value) if group is not None else 1, "pad": pads[0],
            "stride": strides[0], "input_shape": tuple(int(d) for d in x.shape)}, ""


class DecomposeStructuredConvPass(Pass):
    name = "decompose_structured_conv"
    ir = "onnx"
    description = "convs whose weights are structured become a sum-pool and a small conv (ONNX)"

    def call(self, model: ir.Model, ctx: PassContext) -> PassResult:
        max_residual = ctx.option("max_residual") or EXACT
        min_saving = ctx.option("min_saving", DEFAULT_MIN_SAVING)
        check_declared_globs(conv_layers(model), ctx)
        forced = ctx.option("sumpool_realization")
        cost_model = ctx.option("cost_model") or load_cost_model()
        tuner = None
        if ctx.option("autotune", False) and not forced:
            from .autotune import Tuner
            tuner = Tuner(ctx)
        graph = model.graph
        records, modified = [], False
        for node in [n for n in graph if n.op_type == "Conv" and n.domain in ("", "ai.onnx")]:
            layer = layer_name(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None \
                else node.name
            conv, why = plain_conv(node)
            if conv is None:
                records.append(LayerRecord(layer, "kept", {"reason": why}))
                continue
            w = conv["weight"]
            declared = declared_structure(layer, w.shape[1], ctx)
            if declared is not None and declared[1] > w.shape[2]:
                records.append(LayerRecord(layer, "kept", {"reason": f"declared {declared} does not fit {list(w.shape)}"}))
                continue
            # a declared layer was projected by project_structured_weights: exact now
            found = discover_structure(w, max(max_residual, 1e-4) if declared else max_residual,
                                       candidates=[declared] if declared else None)
            details = {"c": found.c, "n": found.n, "C": found.C, "N": found.N,
                       "residual": found.residual, "macs_ratio": found.macs_ratio,
                       "declared": declared is not None}
            if not found.structured:
                records.append(LayerRecord(layer, "dense", details))
                continue
            if found.macs_ratio > 1 - min_saving:
                details["reason"] = f"saves {1 - found.macs_ratio:.0%} of the multiplies, under {min_saving:.0%}"
                records.append(LayerRecord(layer, "kept", details))
                continue
            may_keep = not forced and (ctx.target in DENSE_BY_COST_TARGETS
                                       or (tuner is not None and tuner.weighs_dense))
            if not forced:
                decision = decide(self._shape(conv, found), cost_model, MEASURABLE_REALIZATIONS)
                details.update(decision.details())
                details["cost_model"] = cost_model.cpu
                if cost_model.note:     # a model of another CPU: convert says so
                    details["cost_model_note"] = cost_model.note
            if forced:
                realization, details["chosen_by"] = forced, "forced"
            elif tuner is not None:
                realization, details["measured_ms"], details["cached"] = self._measured(
                    tuner, node, conv, found, dense=may_keep)
                details["chosen_by"] = "measurement"
            else:
                realization, details["chosen_by"] = decision.best_realization, "cost model"
                if may_keep and decision.dense:
                    realization = "dense"
            if realization == "dense":
                ms = details.get("measured_ms")
                details["reason"] = decision.reason() if tuner is None else measured_reason(ms)
                records.append(LayerRecord(layer, "kept", details))
                continue
            self._rewrite(graph, node, conv, found, realization, layer)
            details["realization"] = realization
            records.append(LayerRecord(layer, "decomposed", details))
            modified = True
        if modified:
            self._drop_unused_initializers(graph)
        if tuner is not None:
            tuner.save()
        return PassResult(model, modified, records)

    @staticmethod
    def _measured(tuner, node: ir.Node, conv: dict, found, dense: bool = False) -> tuple[str, dict, bool]:
        """The realization ``--autotune`` measures fastest for this conv (``"dense"`` when
        ``dense`` asks to time the dense conv too and it wins): the layer rebuilt as the
        torch sum-pool + small conv (:func:`~structexport.layers.decomposed.decompose`),
        keyed and cached as ``realize_sumpool`` keys a zoo layer of the same shape."""
        import torch

        from structexport.layers.decomposed import decompose
        n, channels, height, width = conv["input_shape"]
        alpha = torch.as_tensor(np.asarray(found.alpha.detach().numpy() if hasattr(found.alpha, "detach")
                                           else found.alpha, dtype=np.float32))
        bias = None
        if len(node.inputs) > 2 and node.inputs[2] is not None and node.inputs[2].const_value is not None:
            bias = torch.from_numpy(node.inputs[2].const_value.numpy().astype(np.float32))
        layer = decompose(channels, alpha, bias, conv["weight"].shape[2], conv["stride"], conv["pad"],
                          conv["groups"])
        return tuner.choose_layer(layer, layer.pool, (height, width), n, dense)

    @staticmethod
    def _shape(conv: dict, found) -> LayerShape:
        n, channels, height, width = conv["input_shape"]
        window = box_window(channels // conv["groups"], found.N, found.c, found.n)
        pool = SumPool(channels, window, conv["pad"], conv["groups"])
        return LayerShape(pool, conv["weight"].shape[0], found.n, conv["stride"], height, width)

    @staticmethod
    def _rewrite(graph: ir.Graph, node: ir.Node, conv: dict, found, realization: str, layer: str) -> None:
        w = conv["weight"]
        n, channels, height, width = conv["input_shape"]
        groups = conv["groups"]
        window = box_window(channels // groups, found.N, found.c, found.n)
        b = GraphBuilder(graph, node, layer)
        pooled = emit_sumpool(b, node.inputs[0], conv["input_shape"], groups, window, conv["pad"],
                              realization, w.dtype)
        alpha = np.asarray(found.alpha.detach().numpy() if hasattr(found.alpha, "detach") else found.alpha,
                           dtype=w.dtype)
        inputs = [pooled, b.const(f"{layer}.alpha", alpha)]
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            inputs.append(node.inputs[2])
        small_name = f"{layer}/conv" if f"{layer}/conv" not in b._taken else b.name("conv")
        small = ir.node("Conv", inputs, attributes={"group": groups, "kernel_shape": [found.n, found.n],
                                                    "strides": [conv["stride"]] * 2},
                        name=small_name, num_outputs=1)
        small.outputs[0].name = f"{small_name}:0"
        b.nodes.append(small)
        old_out = node.outputs[0]
        small.outputs[0].shape, small.outputs[0].type = old_out.shape, old_out.type
        ir.convenience.replace_nodes_and_values(graph, node, [node], b.nodes, [old_out], [small.outputs[0]])

    @staticmethod
    def _drop_unused_initializers(graph: ir.Graph) -> None:
        # A replaced dense kernel would keep the dense model's size.
        for name, value in list(graph.initializers.items()):
            if not value.uses() and not value.is_graph_output():
                del graph.initializers[name]

    def ensures(self, model: ir.Model, ctx: PassContext) -> None:
        unused = [name for name, v in model.graph.initializers.items()
                  if not v.uses() and not v.is_graph_output()]
        if unused:
            raise PassError(f"left {len(unused)} unused initializer(s), e.g. {unused[0]}")
