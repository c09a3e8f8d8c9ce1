"""The model's structure plan, emitted to its torch form.

Models from outside the zoo are rewritten on ONNX: ``decompose_structured_conv`` finds, per
conv, the structure its weights have (``c x n x n`` coefficients over box masks), and the
conversion's :class:`~structexport.structure_plan.StructurePlan` records it by layer (the
conv weight's name). A runtime that loads torch programs (ExecuTorch, LiteRT) needs the same
rewrite on the torch module. This module applies the plan to the module's ``torch.export``
graph: each conv whose weight is ``<layer>.weight`` and that the plan decomposes becomes the
zoo's ``DecomposedStructuredConv`` (sum-pool + small conv), its coefficients projected from
the weight at the plan's ``(c, n)``. The MACs and the outputs of the two forms agree
(tested).
"""
from __future__ import annotations

import copy

import torch

from structexport.errors import StructExportError
from structexport.structure_plan import StructurePlan

_CONVS = ("aten.conv2d.default", "aten.convolution.default")


class PlanEmitError(StructExportError):
    exit_code, kind = 2, "usage"


def decomposed_layers(plan: StructurePlan) -> dict[str, dict]:
    """``{layer: {"C", "N", "c", "n"}}`` of the convs the plan decomposes; raises when the
    plan holds rewrites the torch form lacks (block sparsity lowered on ONNX)."""
    out, missing = {}, []
    for layer, entry in plan.layers.items():
        if entry.fused_structure is not None:
            out[layer] = {"C": entry.C, "N": entry.N, "c": entry.c, "n": entry.n,
                          "realization": entry.realization}
        elif entry.kind == "block sparse" and entry.realization == "grouped convs":
            missing.append(layer)
    if missing:
        raise PlanEmitError(f"{len(missing)} layer(s) have block sparsity lowered on ONNX ({', '.join(missing[:3])}), "
                            "which is not written for torch programs yet",
                            "convert it for ort-cpu or tvm-llvm, or with --skip-pass lower_sparse_conv")
    return out


def _conv_args(node) -> dict | None:
    """stride, padding, groups of an aten conv node in the plain form the ONNX pass takes."""
    args = list(node.args)
    name = str(node.target)
    if name.endswith("convolution.default"):
        if args[6] or any(args[7]):        # transposed or output padding
            return None
        stride, padding, dilation, groups = args[3], args[4], args[5], args[8]
    else:
        defaults = [None, None, None, [1, 1], [0, 0], [1, 1], 1]
        args = args + defaults[len(args):]
        stride, padding, dilation, groups = args[3], args[4], args[5], args[6]
    stride, padding, dilation = (list(v) if isinstance(v, (list, tuple)) else [v, v]
                                 for v in (stride, padding, dilation))
    if any(d != 1 for d in dilation) or len(set(stride)) > 1 or len(set(padding)) > 1:
        return None
    return {"stride": stride[0], "padding": padding[0], "groups": int(groups)}


def emit_torch(module, example: torch.Tensor, plan: StructurePlan, realization: str = "banded"):
    """``module`` (an ``nn.Module`` or an exported program's module) as a ``torch.fx``
    graph with the layers ``plan`` decomposes written as sum-pool + small conv, each in the
    plan's realization (``realization`` where the plan names none); (graph module, layers
    written)."""
    from structexport.layers.decomposed import decompose
    from structexport.layers.structured import project_to_structure
    wanted = decomposed_layers(plan)
    if isinstance(module, torch.fx.GraphModule):
        gm = copy.deepcopy(module)      # the source stays what it was: the reference
    else:
        try:
            with torch.no_grad():
                gm = torch.export.export(module.eval(), (example,)).module()
        except Exception as exc:
            raise PlanEmitError(f"torch.export cannot trace the model: {(str(exc).splitlines() or [''])[0][:200]}",
                                "convert it for ort-cpu (from ONNX), or export it yourself to a .pt2") from None
    written = []
    convs = [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) in _CONVS]
    for i, node in enumerate(convs):
        weight = node.args[1]
        layer = str(weight.target).removesuffix(".weight") if getattr(weight, "op", "") == "get_attr" else None
        if layer not in wanted:
            continue
        conv = _conv_args(node)
        details = wanted[layer]
        w = gm.get_parameter(weight.target) if conv else None
        if conv is None or w.ndim != 4 or w.shape[2] != w.shape[3] or w.shape[2] != details["N"]:
            raise PlanEmitError(f"{layer}: the torch graph's conv is not the one the structure plan decomposes",
                                "report this with the model")
        bias_node = node.args[2] if len(node.args) > 2 else None
        bias = gm.get_parameter(bias_node.target) if getattr(bias_node, "op", "") == "get_attr" else None
        alpha, _residual = project_to_structure(w.detach(), details["c"], details["n"])
        replacement = decompose(w.shape[1] * conv["groups"], alpha, None if bias is None else bias.detach(),
                                w.shape[2], conv["stride"], conv["padding"], conv["groups"],
                                details["realization"] or realization)
        name = "structured__" + layer.replace(".", "__")   # a flat name: the layer's holder module stays
        gm.add_submodule(name, replacement)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        written.append(layer)
    gm.graph.eliminate_dead_code()
    # the replaced convs' dense kernels are read by nothing now: drop them
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for layer in written:
        holder = gm.get_submodule(layer)
        for attr in ("weight", "bias"):
            if f"{layer}.{attr}" not in used and hasattr(holder, attr):
                delattr(holder, attr)
    gm.recompile()
    lost = sorted(set(wanted) - set(written))
    if lost:
        raise PlanEmitError(f"{len(lost)} decomposed layer(s) not found in the torch graph ({', '.join(lost[:3])})",
                            "report this with the model; --target ort-cpu takes it meanwhile")
    return gm, written


def dense_program_module(module, example: torch.Tensor):
    """The source as a torch.fx graph (its dense form), as :func:`emit_torch` starts from."""
    if isinstance(module, torch.fx.GraphModule):
        return module
    with torch.no_grad():
        return torch.export.export(module.eval(), (example,)).module()


