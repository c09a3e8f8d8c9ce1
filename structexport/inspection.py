"""``structexport inspect``: what a model holds, layer by layer.

Two reports, one per kind of input:

* a **zoo checkpoint** (a state dict of a zoo architecture, or the project's own format):
  the zoo model's layer table (:func:`inspect_checkpoint`), each dense 3x3 conv also with
  the structure discovered in its weights (``discovered``) where that search is cheap;
* **any other model** -- ONNX, a torch.export archive (``.pt2``), a state dict with
  ``--model FILE.py:FUNC``, TorchScript -- read through ONNX as ``convert`` reads it (torch
  modules are exported first): every ``Conv`` with a constant weight and every
  ``Gemm``/``MatMul`` linear layer, with the cheapest ``c x n x n`` structure discovered in
  its weights, whether ``convert`` would decompose it (and why not), and its params and
  MACs before and after (:func:`inspect_graph`).

:func:`inspect_model` picks the report from the file's content, as ``convert`` does.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch.nn as nn
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from structexport.analysis import count_params, generator_info, layer_table
from structexport.discovery import EXACT, discover_structure
from structexport.frontends import is_zoo_checkpoint, load_source
from structexport.frontends.base import check_module_runs, parse_input_shape
from structexport.layers import StructuredConv2d, structured_residual
from structexport.layers.structured import box_window
from structexport.loader import LoadedCheckpoint, load_checkpoint
from structexport.models import ARCHITECTURES, parse_name
from structexport.models import input_shape as zoo_input_shape

# Work of one structure search, in units of C*C*O*N^3 (C input channels per group, O
# filters, N the kernel size; linear layers N = 1). Measured on this project's CPUs:
# 512x512x3x3 (3.6e9) takes 0.4 s, a 4096x4096 linear layer (6.9e10) 4 s. Larger layers
# (VGG's 25088-wide classifier: 2.6e12) are listed without a search.
MAX_SEARCH_WORK = 1e11
# The zoo report searches dense 3x3 convs only when it is this cheap (a side column).
ZOO_SEARCH_WORK = 4e9
# The decompose_structured_conv pass rewrites convs only; a layer is decomposed when its
# structure saves at least DEFAULT_MIN_SAVING (there) of its multiplies.
LINEAR_REASON = "linear (convert decomposes convs)"


def _residual_structure(conv: nn.Conv2d, which: str) -> tuple[int, int] | None:
    """``(c, n)`` the zoo's struct variant would use for this dense conv, or None."""
    if conv.kernel_size != (3, 3):
        return None
    C = conv.in_channels // conv.groups
    return (max(1, C // 2) if which == "c2n2" else C), 2


def _search_work(shape) -> float:
    O, C = int(shape[0]), int(shape[1])
    N = int(shape[2]) if len(shape) > 2 else 1
    return float(C) * C * O * N ** 3


def _discovered(found) -> dict:
    return {"c": found.c, "n": found.n, "C": found.C, "N": found.N, "residual": found.residual,
            "macs_ratio": found.macs_ratio, "structured": found.structured}


def structure_label(c, n) -> str:
    return f"{c}x{n}x{n}"


# --------------------------------------------------------------------------- dispatch

def inspect_model(path: str, arch: str | None = None, model_spec: str | None = None,
                  input_shape=None, max_residual: float | None = None,
                  trust_pickle: bool = False, allow_torchscript: bool = False,
                  residual_structure: str = "c2n2",
                  progress: Callable[[str], None] | None = None) -> dict:
    """The ``inspect`` report of any model file ``convert`` takes."""
    say = progress or (lambda _msg: None)
    if is_zoo_checkpoint(path, arch, model_spec):
        say("load")
        return inspect_checkpoint(path, arch, trust_pickle=trust_pickle,
                                  allow_torchscript=allow_torchscript,
                                  residual_structure=residual_structure,
                                  input_shape=input_shape, max_residual=max_residual)
    say("load")
    source = load_source(path, model_spec=model_spec, arch=arch, input_shape=input_shape,
                         trust_pickle=trust_pickle, allow_torchscript=allow_torchscript)
    if source.format == "checkpoint" and source.checkpoint is not None:
        return inspect_loaded(source.checkpoint, residual_structure=residual_structure,
                              input_shape=input_shape, max_residual=max_residual)
    return inspect_source(source, max_residual=max_residual, progress=say)


# --------------------------------------------------------------------------- zoo checkpoints

def inspect_checkpoint(path: str, arch: str | None = None, trust_pickle: bool = False,
                       allow_torchscript: bool = False, residual_structure: str = "c2n2",
                       input_shape=None, max_residual: float | None = None) -> dict:
    loaded = load_checkpoint(path, arch, trust_pickle=trust_pickle,
                             allow_torchscript=allow_torchscript)
    return inspect_loaded(loaded, residual_structure=residual_structure, input_shape=input_shape,
                          max_residual=max_residual)


def inspect_loaded(loaded: LoadedCheckpoint, residual_structure: str = "c2n2", input_shape=None,
                   max_residual: float | None = None) -> dict:
    """The zoo report of a loaded checkpoint."""
    model, spec = loaded.model, parse_name(loaded.arch)
    shape = parse_input_shape(input_shape)
    if shape is None:
        shape = zoo_input_shape(spec)
    else:
        check_module_runs(model, shape, loaded.arch)
    tolerance = EXACT if max_residual is None else max_residual
    rows = layer_table(model, shape)
    stem = ARCHITECTURES[spec.base].stem
    modules = dict(model.named_modules())
    layers = []
    for row in rows:
        module = modules[row.name]
        discovered = None
        if isinstance(module, StructuredConv2d) and module.mode == "dense":
            row.residual = module.decompose()[1]
        elif type(module) is nn.Conv2d:
            if row.name != stem:
                density = float(module.weight.count_nonzero()) / module.weight.numel()
                if density < 0.999:  # e.g. weights pruned to a structured-sparse pattern
                    row.structure = (row.structure + " " if row.structure else "") + f"density {density:.3f}"
                cn = _residual_structure(module, residual_structure)
                if cn:
                    row.residual = structured_residual(module.weight, *cn)
                    row.structure = (row.structure + " " if row.structure else "") + \
                        f"vs {cn[0]}x{cn[1]}x{cn[1]}"
            if module.kernel_size == (3, 3) and _search_work(module.weight.shape) <= ZOO_SEARCH_WORK:
                discovered = _discovered(discover_structure(module.weight.detach(), tolerance))
        layers.append(dict(row.to_dict(), discovered=discovered))
    decisions = ort_decisions(model, shape)
    for layer in layers:
        if layer["name"] in decisions:
            layer["ort_cpu"] = decisions[layer["name"]]
    params, trainable = count_params(model)
    return {
        "source": {"path": loaded.path, "sha256": loaded.sha256, "format": "checkpoint",
                   "name": loaded.arch},
        "checkpoint": {"path": loaded.path, "sha256": loaded.sha256, "format": loaded.source_format,
                       "wrapper_key": loaded.wrapper_key, "stored_dtypes": loaded.stored_dtypes,
                       "metadata": loaded.metadata},
        "arch": loaded.arch,
        "input_shape": list(shape),
        "max_residual": tolerance,
        "notes": loaded.notes,
        "generator": generator_info(model),
        "layers": layers,
        "totals": {"params": params, "trainable_params": trainable,
                   "layer_params": sum(r.params for r in rows),
                   "macs": sum(r.macs for r in rows), "sumpool_adds": sum(r.adds for r in rows),
                   "layers": len(rows),
                   "by_kind": {k: sum(1 for r in rows if r.kind == k)
                               for k in sorted({r.kind for r in rows})}},
    }


def ort_decisions(model: nn.Module, shape) -> dict[str, dict]:
    """What ``convert --target ort-cpu`` would make of each structured layer of a zoo model, by
    this CPU's layer cost model: ``{layer: {"action", "theoretical_speedup",
    "predicted_speedup", "realization", "reason"}}`` (empty for a model without sum-pools)."""
    from structexport.passes import PassContext, PassManager, select_passes
    _, runs = PassManager(select_passes(["decompose_structured", "realize_sumpool"])).run(
        model, PassContext("ort-cpu", tuple(shape), {}))
    out = {}
    for rec in runs[-1].records:
        d = rec.details
        if "predicted_speedup" in d:
            out[rec.layer.rpartition(".")[0]] = {
                "action": "dense" if rec.action == "kept dense" else "structured",
                "theoretical_speedup": d["theoretical_speedup"], "predicted_speedup": d["predicted_speedup"],
                "realization": d.get("realization"), "reason": d.get("reason")}
    return out


# --------------------------------------------------------------------------- any other model

def inspect_source(source, max_residual: float | None = None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """The report of a front end's :class:`~structexport.frontends.base.SourceModel` that is
    not a zoo checkpoint."""
    from structexport.convert import prepare_onnx
    from structexport.export import source_to_onnx
    say = progress or (lambda _msg: None)
    proto = source.onnx if source.onnx is not None else source_to_onnx(source, say)
    say("discover structure")
    report = inspect_graph(prepare_onnx(proto), max_residual=max_residual)
    report["source"] = {"path": source.path, "sha256": source.sha256, "format": source.format,
                        "name": source.name}
    report["arch"] = source.name
    report["input_shape"] = list(source.input_shape)
    report["notes"] = list(source.notes)
    return {k: report[k] for k in ("source", "arch", "input_shape", "max_residual", "min_saving",
                                   "notes", "layers", "totals")}


def _ints(node, key: str, default) -> list[int]:
    attr = node.attributes.get(key)
    return [int(v) for v in attr.value] if attr is not None else list(default)


def _node_costs(proto) -> dict:
    """Cost-model rows by each node's first output name."""
    from structexport.costmodel import node_costs
    with tempfile.TemporaryDirectory(prefix="structexport-inspect-") as tmp:
        path = Path(tmp) / "m.onnx"
        path.write_bytes(proto.SerializeToString())
        costs = node_costs(path)
    return {node.output[0]: cost for node, cost in zip(proto.graph.node, costs) if node.output}


def _search(weight: np.ndarray, tolerance: float):
    """(Discovery, None) or (None, why the structure was not searched)."""
    if weight.ndim != 4 or weight.shape[2] != weight.shape[3]:
        return None, f"kernel {list(weight.shape)} is not square: structure not searched"
    if _search_work(weight.shape) > MAX_SEARCH_WORK:
        return None, f"a {'x'.join(map(str, weight.shape))} weight is over the search budget: structure not searched"
    try:
        return discover_structure(weight, tolerance), None
    except ValueError as exc:   # integer (quantized) or non-finite weights
        return None, f"structure not searched: {exc}"


def _conv_row(node, cost, tolerance: float, min_saving: float) -> dict:
    from structexport.layer_cost import decide, load_cost_model
    from structexport.layers.sumpool import MEASURABLE_REALIZATIONS, SumPool
    from structexport.passes.decompose_structured_conv_pass import DecomposeStructuredConvPass, plain_conv
    w = node.inputs[1].const_value.numpy()
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    bias_params = int(np.prod(bias.shape)) if bias is not None and bias.shape is not None else 0
    groups = int(node.attributes["group"].value) if "group" in node.attributes else 1
    strides = _ints(node, "strides", [1] * max(1, w.ndim - 2))
    row = _row_base(node, "conv2d", w, bias_params, cost)
    row.update(groups=groups, stride=strides[0] if len(set(strides)) == 1 else strides,
               padding=_ints(node, "pads", [0] * 2 * max(1, w.ndim - 2)),
               dilation=_ints(node, "dilations", [1] * max(1, w.ndim - 2)))
    conv, why = plain_conv(node)
    found, not_searched = _search(w, tolerance)
    _set_structure(row, found)
    if conv is None:
        row["reason"] = why
    elif found is None:
        row["reason"] = not_searched
    elif not found.structured:
        row["reason"] = "dense"
    elif found.macs_ratio > 1 - min_saving:
        row["reason"] = (f"saves {1 - found.macs_ratio:.0%} of the multiplies, "
                         f"under {min_saving:.0%}")
    else:
        # as convert decides on ONNX Runtime (its default target): this CPU's cost model
        decision = decide(DecomposeStructuredConvPass._shape(conv, found), load_cost_model(),
                          MEASURABLE_REALIZATIONS)
        row["theoretical_speedup"] = decision.theoretical_speedup
        row["predicted_speedup"] = decision.predicted_speedup
        if decision.dense:
            row["reason"] = f"kept dense: {decision.reason()}"
            return row
        row["decompose"], row["reason"] = True, None
        c, n = found.c, found.n
        out_elems = row["macs_before"] // (found.C * found.N * found.N)
        batch, _channels, height, width = conv["input_shape"]
        window = box_window(found.C, found.N, c, n)
        pad = conv["pad"]
        row["macs_after"] = out_elems * c * n * n
        # as convert counts them: the sum-pool realization its cost model picks, per image
        realization = decision.best_realization
        pool = SumPool(conv["input_shape"][1], window, pad, groups, realization)
        row["sumpool_adds"] = batch * pool.additions(height, width)
        row["realization"] = realization
        row["params_after"] = int(w.shape[0]) * c * n * n + bias_params
    return row


def _linear_row(node, cost, tolerance: float) -> dict:
    w = node.inputs[1].const_value.numpy()
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None
    bias_params = int(np.prod(bias.shape)) if bias is not None and bias.shape is not None else 0
    row = _row_base(node, "linear", w, bias_params, cost)
    row.update(groups=1, stride=None, padding=None, dilation=None)
    found, not_searched = None, None
    if w.ndim != 2:
        not_searched = f"weight {list(w.shape)} is not a matrix: structure not searched"
    else:
        trans_b = node.op_type == "Gemm" and "transB" in node.attributes and \
            int(node.attributes["transB"].value)
        found, not_searched = _search((w if trans_b else w.T)[:, :, None, None], tolerance)
    _set_structure(row, found)
    row["reason"] = not_searched or LINEAR_REASON
    return row


def _row_base(node, op: str, w: np.ndarray, bias_params: int, cost) -> dict:
    from structexport.passes.decompose_structured_conv_pass import layer_name
    params = int(w.size) + bias_params
    macs = int(cost.macs) if cost is not None else 0
    return {"name": layer_name(node.inputs[1]), "op": op, "onnx_op": node.op_type,
            "nodes": [node.name or node.outputs[0].name], "weight_shape": [int(d) for d in w.shape],
            "output_shape": [int(d) for d in cost.output_shape] if cost is not None else [],
            "structure": None, "c": None, "n": None, "C": None, "N": None, "residual": None,
            "macs_ratio": None, "structured": False, "decompose": False, "reason": None,
            "params_before": params, "params_after": params, "macs_before": macs,
            "macs_after": macs, "sumpool_adds": 0}


def _set_structure(row: dict, found) -> None:
    if found is None:
        return
    row.update({k: v for k, v in _discovered(found).items()})
    row["structure"] = structure_label(found.c, found.n) if found.structured else "dense"


def _float_initializer_params(proto) -> int:
    """Elements of the graph's floating-point initializers (weights, norms; not the integer
    shapes and axes exporters keep as initializers)."""
    from onnx import TensorProto
    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
    return sum(int(np.prod(i.dims)) for i in proto.graph.initializer if i.data_type in floats)


def inspect_graph(proto, max_residual: float | None = None, min_saving: float | None = None) -> dict:
    """Layers, discovered structure and before/after costs of an ONNX graph with fixed
    dimensions and inferred shapes (:func:`structexport.convert.prepare_onnx`'s output)."""
    import onnx_ir as ir

    from structexport.passes.decompose_structured_conv_pass import DEFAULT_MIN_SAVING
    tolerance = EXACT if max_residual is None else max_residual
    min_saving = DEFAULT_MIN_SAVING if min_saving is None else min_saving
    costs = _node_costs(proto)
    model = ir.from_proto(proto)
    rows: dict[str, dict] = {}
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or node.domain not in ("", "ai.onnx") \
                or len(node.inputs) < 2 or node.inputs[1] is None \
                or node.inputs[1].const_value is None:
            continue
        cost = costs.get(node.outputs[0].name)
        row = (_conv_row(node, cost, tolerance, min_saving) if node.op_type == "Conv"
               else _linear_row(node, cost, tolerance))
        first = rows.get(row["name"])
        if first is None:
            rows[row["name"]] = row
        else:   # one weight used by several nodes: one layer, its work counted per use
            first["nodes"] += row["nodes"]
            for key in ("macs_before", "macs_after", "sumpool_adds"):
                first[key] += row[key]
    layers = list(rows.values())
    graph_macs = sum(int(c.macs) for c in costs.values())
    layer_macs = sum(r["macs_before"] for r in layers)
    macs_before = graph_macs
    macs_after = graph_macs - sum(r["macs_before"] - r["macs_after"] for r in layers)
    totals = {
        "layers": len(layers),
        "by_op": {op: sum(1 for r in layers if r["op"] == op) for op in ("conv2d", "linear")},
        "structured": sum(1 for r in layers if r["structured"]),
        "decomposed": sum(1 for r in layers if r["decompose"]),
        "params_before": sum(r["params_before"] for r in layers),
        "params_after": sum(r["params_after"] for r in layers),
        "graph_params": _float_initializer_params(proto),
        "macs_before": macs_before,
        "macs_after": macs_after,
        "other_macs": graph_macs - layer_macs,
        "sumpool_adds": sum(r["sumpool_adds"] for r in layers),
        "pool_adds": sum(int(c.pool_adds) for c in costs.values()),   # the model's own pooling
        "speedup_theoretical": macs_before / macs_after if macs_after else None,
    }
    return {"max_residual": tolerance, "min_saving": min_saving, "layers": layers, "totals": totals}


# --------------------------------------------------------------------------- rendering

def render_inspection(report: dict, console: Console) -> None:
    if "checkpoint" in report:
        _render_zoo(report, console)
    else:
        _render_graph(report, console)


def _render_zoo(report: dict, console: Console) -> None:
    ck = report["checkpoint"]
    console.print(f"[bold]{escape(ck['path'])}[/]  {ck['format']}"
                  + (f", state dict under {escape(repr(ck['wrapper_key']))}" if ck["wrapper_key"] else "")
                  + f", stored {'/'.join(ck['stored_dtypes'])}, sha256 {ck['sha256'][:12]}")
    console.print(f"architecture [bold]{report['arch']}[/], input {report['input_shape']}")
    for note in report["notes"]:
        console.print(f"  - {escape(note)}")
    if report["generator"]:
        g = report["generator"]
        console.print(f"  CSG generator: slice {g['slice_shape']}, code size {g['code_size']}, "
                      f"{g['params']:,} weights, {g['mode']}")
    discovered = any(r.get("discovered") for r in report["layers"])
    table = Table(show_lines=False)
    columns = [("layer", {}), ("kind", {}), ("weight shape", {}), ("structure", {}),
               ("params", {"justify": "right"}), ("MACs", {"justify": "right"}),
               ("residual", {"justify": "right"})]
    if discovered:
        columns.append(("discovered", {}))
    decided = any(r.get("ort_cpu") for r in report["layers"])
    if decided:
        columns.append(("ort-cpu: theory / predicted", {"justify": "right"}))
    for col, kw in columns:
        table.add_column(col, **kw)
    for r in report["layers"]:
        cells = [escape(r["name"]), r["kind"], "x".join(map(str, r["weight_shape"])), escape(r["structure"]),
                 f"{r['params']:,}", f"{r['macs']:,}",
                 "" if r["residual"] is None else f"{r['residual']:.4f}"]
        if discovered:
            d = r.get("discovered")
            cells.append("" if d is None else
                         f"{structure_label(d['c'], d['n'])} ({d['residual']:.1e})" if d["structured"]
                         else "dense")
        if decided:
            o = r.get("ort_cpu")
            cells.append("" if o is None else
                         f"{'kept dense, ' if o['action'] == 'dense' else ''}{o['theoretical_speedup']:.2f}x / "
                         f"{o['predicted_speedup']:.2f}x")
        table.add_row(*cells)
    t = report["totals"]
    table.add_section()
    kinds = ", ".join(f"{n} {k}" for k, n in t["by_kind"].items())
    table.add_row(f"total ({t['layers']} layers: {kinds})", "", "", "",
                  f"{t['layer_params']:,}", f"{t['macs']:,}", "", *([""] if discovered else []),
                  *([""] if decided else []))
    console.print(table)
    console.print(f"params {t['params']:,} (trainable {t['trainable_params']:,}; the table counts "
                  f"conv and linear layers, the total adds norms and the shared generator), "
                  f"MACs {t['macs']:,}" + (f", sum-pool additions {t['sumpool_adds']:,}"
                                            if t["sumpool_adds"] else ""))
    if discovered:
        console.print(f"discovered: the cheapest c x n x n structure of each dense 3x3 conv's "
                      f"weights within relative residual {report['max_residual']:g}")
    if decided:
        console.print("ort-cpu: each structured layer's speedup over its dense conv in theory "
                      "(multiplies) and as this CPU's layer cost model predicts it; a layer predicted "
                      "under 1.05x is kept dense by convert (structexport costmodel show)")


def _render_graph(report: dict, console: Console) -> None:
    src = report["source"]
    console.print(f"[bold]{escape(src['path'])}[/]  {src['format']}, sha256 {src['sha256'][:12]}")
    console.print(f"model [bold]{escape(src['name'])}[/], input {report['input_shape']}")
    for note in report["notes"]:
        console.print(f"  - {escape(note)}")
    table = Table(show_lines=False)
    for col, kw in (("layer", {}), ("op", {}), ("weight shape", {}), ("groups", {"justify": "right"}),
                    ("stride", {"justify": "right"}), ("structure", {}), ("residual", {"justify": "right"}),
                    ("decompose", {}), ("speedup: theory / predicted", {"justify": "right"}),
                    ("params", {"justify": "right"}), ("MACs", {"justify": "right"})):
        table.add_column(col, **kw)

    def before_after(a: int, b: int) -> str:
        return f"{a:,}" if a == b else f"{a:,} -> {b:,}"

    for r in report["layers"]:
        if r["c"] is None:
            structure = ""
        elif r["structured"]:
            structure = f"{structure_label(r['c'], r['n'])} of {structure_label(r['C'], r['N'])}"
        else:
            structure = "dense"
        table.add_row(escape(r["name"]), r["onnx_op"], "x".join(map(str, r["weight_shape"])),
                      str(r["groups"]), "" if r["stride"] is None else str(r["stride"]), structure,
                      "" if r["residual"] is None or not r["structured"] else f"{r['residual']:.1e}",
                      "yes" if r["decompose"] else f"no: {escape(r['reason'] or '')}",
                      (f"{r['theoretical_speedup']:.2f}x / {r['predicted_speedup']:.2f}x"
                       if r.get("predicted_speedup") else ""),
                      before_after(r["params_before"], r["params_after"]),
                      before_after(r["macs_before"], r["macs_after"]))
    t = report["totals"]
    table.add_section()
    # every conv and linear layer is counted, structured or not: "0 of 0" read as "none found"
    table.add_row(f"total ({t['layers']} layers: {t['by_op']['conv2d']} conv, "
                  f"{t['by_op']['linear']} linear)", "", "", "", "", "", "",
                  f"{t['structured']} of {t['layers']} structured, {t['decomposed']} decomposed", "",
                  before_after(t["params_before"], t["params_after"]),
                  before_after(t["macs_before"], t["macs_after"]))
    console.print(table)
    speedup = t["speedup_theoretical"]
    console.print(f"params {t['params_before']:,} -> {t['params_after']:,} (conv and linear layers; "
                  f"the graph holds {t['graph_params']:,}), MACs {t['macs_before']:,} -> "
                  f"{t['macs_after']:,}"
                  + (f" ({t['other_macs']:,} of them outside the table)" if t["other_macs"] else "")
                  + (f", sum-pool additions {t['sumpool_adds']:,}" if t["sumpool_adds"] else "")
                  + (f", average pooling additions {t['pool_adds']:,} (the model's own pooling, "
                     "not sum-pools)" if t.get("pool_adds") else "")
                  + (f": theoretical speedup {speedup:.2f}x" if speedup else ""))
    console.print(f"structure: the cheapest c x n x n the weights have within relative residual "
                  f"{report['max_residual']:g}; decomposed when it saves at least "
                  f"{report['min_saving']:.0%} of a conv's multiplies and this CPU's cost model "
                  "predicts it faster than the dense conv on ONNX Runtime (as convert does)"
                  + ("; sum-pool additions estimated for the realizations convert's cost model "
                     "would choose" if t["sumpool_adds"] else ""))
