"""Lowering a torch module to an ExecuTorch program with the XNNPACK delegate, and the report
of what the delegate took: ops, multiply-accumulates, and what fell back to portable kernels,
by source layer."""
from __future__ import annotations

import collections
from pathlib import Path

from structexport.errors import StructExportError
# Lowered-graph nodes that are plumbing, not compute.
_PLUMBING = ("executorch_call_delegate", "getitem", "alloc")


class ExecuTorchExportError(StructExportError):
    exit_code, kind = 31, "export-failed"


def _contiguous(module):
    """XNNPACK's lowering needs contiguous constants (some weights are built as views)."""
    import torch
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if not tensor.is_contiguous():
                tensor.data = tensor.data.contiguous()
    return module


def _macs(node) -> int:
    """Multiply-accumulates of a conv or matmul node (0 for anything else)."""
    name = str(node.target)
    out = node.meta.get("val")
    if out is None or not hasattr(out, "shape"):
        return 0
    numel = 1
    for d in out.shape:
        numel *= int(d)
    if "convolution" in name or "conv2d" in name:
        weight = node.args[1].meta.get("val")
        if weight is None:
            return 0
        per_output = 1
        for d in weight.shape[1:]:
            per_output *= int(d)
        return numel * per_output
    if any(k in name for k in ("addmm", ".mm.", "linear", "bmm")):
        inputs = node.args[1] if "addmm" in name else node.args[0]
        val = inputs.meta.get("val") if hasattr(inputs, "meta") else None
        return numel * int(val.shape[-1]) if val is not None else 0
    return 0


def _layer_of(node) -> str:
    """The innermost source module a node came from ('' when torch.export kept none)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # torch.export names submodules L['self'].layer1[0].conv1 or layer1.0.conv1
    return path.replace("L['self'].", "").replace("[", ".").replace("]", "").strip(".")


def delegation_report(exported, lowered_gm, structured_layers: list[str]) -> dict:
    """What XNNPACK runs and what falls back to portable kernels, from the exported program
    (before partitioning) and the lowered graph."""
    total_macs = sum(_macs(n) for n in exported.graph_module.graph.nodes if n.op == "call_function")
    delegate_calls, portable = 0, collections.OrderedDict()
    portable_macs = 0
    for node in lowered_gm.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if "executorch_call_delegate" in name:
            delegate_calls += 1
            continue
        if any(p in name for p in _PLUMBING):
            continue
        op = getattr(node.target, "__name__", name)
        entry = portable.setdefault(op, {"op": op, "count": 0, "layers": []})
        entry["count"] += 1
        layer = _layer_of(node)
        if layer and layer not in entry["layers"]:
            entry["layers"].append(layer)
        portable_macs += _macs(node)
    delegated_ops = 0
    for node in lowered_gm.graph.nodes:
        if node.op == "get_attr" and str(node.target).startswith("lowered_module"):
            inner = getattr(lowered_gm, node.target).original_module.graph_module
            delegated_ops += sum(1 for m in inner.graph.nodes if m.op == "call_function")
    portable_ops = sum(e["count"] for e in portable.values())
    falling_back = sorted({layer for e in portable.values() for layer in e["layers"]
                           if any(layer == s or layer.startswith(s + ".") for s in structured_layers)})
    return {
        "backend": "XnnpackBackend",
        "delegate_calls": delegate_calls,
        "delegated_ops": delegated_ops,
        "portable_ops": portable_ops,
        "ops_delegated_share": delegated_ops / (delegated_ops + portable_ops) if delegated_ops + portable_ops else None,
        "macs_total": total_macs,
        "macs_delegated_share": (total_macs - portable_macs) / total_macs if total_macs else None,
        "portable": list(portable.values()),
        "structured_layers": len(structured_layers or []),   # in the program, the plan's structured convs
        "structured_layers_not_delegated": falling_back,
    }


def lower_to_pte(module, example, path: Path, structured_layers: list[str] | None = None) -> dict:
    """``module`` exported and lowered to XNNPACK, written to ``path``; its delegation report."""
    import torch

    from structexport.executorch_runtime import quiet_executorch
    with quiet_executorch():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
    if not isinstance(module, torch.fx.GraphModule):   # a PT2E-quantized graph has no eval()
        module = module.eval()
    module = _contiguous(module)
    try:
        with torch.no_grad(), quiet_executorch():
            exported = torch.export.export(module, (example,))
            edge = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
            report = delegation_report(exported, edge.exported_program().graph_module,
                                       structured_layers or [])
            program = edge.to_executorch()
    except StructExportError:
        raise
    except Exception as exc:
        raise ExecuTorchExportError(f"ExecuTorch could not lower the model: "
                                    f"{(str(exc).splitlines() or [''])[0][:240]}",
                                    "report this with the model; --target ort-cpu takes it meanwhile") from None
    Path(path).write_bytes(program.buffer)
    return report


def structured_layer_names(module) -> list[str]:
    """The rewritten layers that carry structure (decomposed, lowered SSC, sum-pools)."""
    from structexport.layers.decomposed import DecomposedStructuredConv, DecomposedStructuredLinear
    from structexport.layers.lowered_ssc import GatheredConv, LoweredSSCConv
    kinds = (DecomposedStructuredConv, DecomposedStructuredLinear, LoweredSSCConv, GatheredConv)
    return [name for name, m in module.named_modules() if isinstance(m, kinds)]
