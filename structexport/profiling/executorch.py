"""ExecuTorch collection: latency with the profiler off, then per-operator times from ETDump
(read with ``executorch.devtools.Inspector``), mapped to source layers by order.

XNNPACK's events carry only its operator names (``Convolution (NHWC, F32) IGEMM #3``), with
no debug handle or module path: they are mapped to the package's ONNX graph, which holds the
same structure plan as the program, **by order**. The events that do multiply-adds
(convolutions, fully connected) are matched one to one, in execution order, with the ONNX
graph's multiply-add nodes (Conv, Gemm, MatMul) in graph order, and the match is checked
(the same count, and depthwise where and only where the ONNX conv is depthwise); each takes
the layer :func:`~structexport.profiling.layermap.onnx_node_layers` gives its node. The
other XNNPACK operators (transposes, adds, clamps, copies, pooling) go to the layer of the
previous multiply-add event (the output they process: activations, residual adds, layout
changes; a delegate call may begin with the residual add of a block whose last conv ran in
the call before), those before the first one to that first one (the input's layout
change). Operators outside the delegate (portable kernels) go to the layer torch.export's
module stack names for them (the manifest's delegation report; a shortcut module's op to
the last layer of its block, whose residual add reads it), else to the layer of the next
multiply-add event.

:func:`event_layers` serves LiteRT too (:mod:`.litert`): its XNNPACK events are the same
operators, its builtin kernels are listed in its delegation report the same way.
"""
from __future__ import annotations

import re
import statistics
from pathlib import Path

import numpy as np

from structexport.profiling.layermap import onnx_node_layers
from structexport.profiling.options import ProfileError, ProfileOptions
from structexport.profiling.runs import keep_fastest
from structexport.timing import time_interleaved

# XNNPACK operators that do multiply-adds (its names, up to the first parenthesis)
MAC_EVENTS = ("Convolution", "Deconvolution", "Fully Connected", "Batch Matrix Multiply")
MAC_NODES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
EXECUTE, DELEGATE_CALL, OPERATOR_CALL = "Method::execute", "DELEGATE_CALL", "OPERATOR_CALL"
PORTABLE_PREFIX = "native_call_"
_INDEX = re.compile(r"\s+#\d+$")

MAPPING_RULE = (
    "XNNPACK's events name only its operators, so they are mapped by order: the events that do "
    "multiply-adds (Convolution, Fully Connected) one to one, in execution order, with the "
    "multiply-add nodes (Conv, Gemm, MatMul) of the package's ONNX graph (same structure plan; "
    "checked: same count, depthwise alike), each taking its node's layer (the layer whose weights "
    "it reads); other XNNPACK operators (transposes, adds, clamps, copies, pooling) the layer of "
    "the previous multiply-add event (the output they process), those before the first one that "
    "first one's; portable kernels the layer of their torch module (manifest delegation report; "
    "a shortcut's to its block's last layer), else the next multiply-add event's")
OUTSIDE_TEXT = ("Method::execute minus the sum of its operator events: ExecuTorch's executor, the "
                "delegate calls' own work around XNNPACK's operators, and ETDump's own hooks")


def _event_op(name: str) -> str:
    """``Convolution (NHWC, F32) IGEMM #3`` -> ``Convolution (NHWC, F32) IGEMM``;
    ``native_call_full.out`` -> ``full.out``."""
    return _INDEX.sub("", name).removeprefix(PORTABLE_PREFIX)


def is_mac_event(op: str) -> bool:
    return op.startswith(MAC_EVENTS)


def etdump_profile(paths: dict[str, Path], feed, threads: int, runs: int, warmup: int,
                   workdir: Path) -> dict[str, dict]:
    """Each program run ``warmup + runs`` times (interleaved) with ETDump on; per program the
    operator events of one run in execution order (name, mean ms over the kept runs, whether
    XNNPACK ran it, its delegate call's index), the mean ``Method::execute`` of the kept runs
    and their number. The runs kept are those no slower than the median run."""
    import torch

    from structexport.executorch_runtime import load_method, quiet_executorch
    arrays = list(feed.values()) if isinstance(feed, dict) else [feed]
    args = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    loaded = {n: load_method(p, threads, etdump=True) for n, p in paths.items()}
    names = list(loaded)
    for i in range(warmup + runs):
        for n in (names if i % 2 == 0 else names[::-1]):
            loaded[n][0].execute(args)
    with quiet_executorch():
        from executorch.devtools import Inspector
        from executorch.devtools.inspector import TimeScale
    out = {}
    for n, (_method, program) in loaded.items():
        dump = workdir / f"{n}.etdp"
        program.write_etdump_result_to_file(str(dump), str(workdir / f"{n}.debug.bin"))
        with quiet_executorch():
            inspector = Inspector(etdump_path=str(dump), source_time_scale=TimeScale.NS,
                                  target_time_scale=TimeScale.MS)
        blocks = [b for b in inspector.event_blocks if any(e.name == EXECUTE for e in b.events)]
        if len(blocks) != 1:
            raise ProfileError(f"ETDump of {paths[n]} has {len(blocks)} blocks of method runs, not one",
                               "report this with the package (executorch version)")
        events = [e for e in blocks[0].events if e.perf_data is not None]
        counts = {len(e.perf_data.raw) for e in events}
        if counts != {warmup + runs}:
            raise ProfileError(f"ETDump of {paths[n]} recorded {sorted(counts)} runs per event, not "
                               f"{warmup + runs}: the runs did not all execute the same operators",
                               "report this with the package")
        total = next(e for e in events if e.name == EXECUTE).perf_data.raw[warmup:]
        kept = keep_fastest(list(range(runs)), lambda k: total[k])
        calls, delegate = [], 0
        for e in events:
            if e.name == DELEGATE_CALL:
                delegate += 1
                continue
            portable = e.name.startswith(PORTABLE_PREFIX)
            if not (e.is_delegated_op or portable):   # wrappers: Method::execute, OPERATOR_CALL
                continue
            raw = e.perf_data.raw[warmup:]
            calls.append({"name": f"{len(calls)}:{e.name}", "op": _event_op(e.name),
                          "ms": statistics.fmean(float(raw[k]) for k in kept),
                          "delegate": delegate if e.is_delegated_op else None})
        out[n] = {"calls": calls, "profiled_ms": statistics.fmean(float(total[k]) for k in kept),
                  "runs_kept": len(kept)}
    return out


def onnx_mac_nodes(path: Path) -> list[dict]:
    """The multiply-add nodes of an ONNX graph in graph order: name, op, depthwise."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type not in MAC_NODES:
            continue
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        weight = shapes.get(node.input[1]) if len(node.input) > 1 else None
        depthwise = node.op_type == "Conv" and group > 1 and weight is not None and weight[1] == 1
        out.append({"name": node.name or node.output[0], "op": node.op_type, "depthwise": depthwise})
    return out


def module_layer(path: str, order: list[str]) -> str | None:
    """The source layer of a torch module path: the layer it is or lies in; else (a module
    that is no layer's, e.g. a shortcut) the last layer of the nearest enclosing module."""
    inside = [layer for layer in order if path == layer or path.startswith(layer + ".")]
    if inside:
        return max(inside, key=len)
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        parent = ".".join(parts[:cut]) + "."
        under = [layer for layer in order if layer.startswith(parent)]
        if under:
            return under[-1]
    return None


def portable_layers(delegation: dict | None, calls: list[dict], order: list[str]) -> dict[int, str]:
    """Index (in ``calls``) -> layer of each portable kernel whose torch module the
    delegation report names: the k-th occurrence of an op reported ``count`` times in
    ``len(layers)`` modules belongs to module ``k // (count / len(layers))`` (occurrences in
    execution order, the same number per module)."""
    by_op: dict[str, dict] = {}
    for entry in (delegation or {}).get("portable") or []:
        base = str(entry.get("op", "")).removeprefix("aten.").split(".")[0]
        by_op[base] = entry
    seen: dict[str, int] = {}
    out = {}
    for i, c in enumerate(calls):
        if c["delegate"] is not None:
            continue
        base = c["op"].split(".")[0]
        k = seen.get(base, 0)
        seen[base] = k + 1
        entry = by_op.get(base)
        if not entry or not entry.get("layers") or entry["count"] % len(entry["layers"]):
            continue
        per = entry["count"] // len(entry["layers"])
        if k // per < len(entry["layers"]):
            layer = module_layer(entry["layers"][k // per], order)
            if layer:
                out[i] = layer
    return out


def event_layers(calls: list[dict], onnx_path: Path, order: list[str], delegation: dict | None,
                 program: Path, composed: list[str] | tuple = ()) -> list[str | None]:
    """The source layer of each operator event (:data:`MAPPING_RULE`); a clear error when the
    multiply-add events do not match the ONNX graph's multiply-add nodes. ``composed``: the
    layers the program runs as one dense conv where the ONNX graph has their structure (an
    INT8 program's layers kept dense): their nodes count as one (not depthwise)."""
    owners = onnx_node_layers(onnx_path, set(order))
    nodes = []
    for node in onnx_mac_nodes(onnx_path):
        owner = owners.get(node["name"])
        if owner in composed and nodes and owners.get(nodes[-1]["name"]) == owner:
            continue   # the composed layer's first node stands for it
        nodes.append(dict(node, depthwise=False) if owner in composed else node)
    macs = [i for i, c in enumerate(calls) if is_mac_event(c["op"])]
    if len(macs) != len(nodes):
        raise ProfileError(f"{program} runs {len(macs)} multiply-add operators and {onnx_path.name} has "
                           f"{len(nodes)} multiply-add nodes: profile maps ExecuTorch's operators to layers "
                           "by that order and cannot here", "report this with the package; --target ort-cpu "
                           "profiles the same model under ONNX Runtime")
    for i, node in zip(macs, nodes):
        if ("DWConv" in calls[i]["op"]) != node["depthwise"]:
            raise ProfileError(f"{program}'s operator {calls[i]['name']} ({calls[i]['op']}) does not match "
                               f"{onnx_path.name}'s node {node['name']} ({'depthwise ' * node['depthwise']}"
                               f"{node['op']}) in order: profile cannot map the program to layers",
                               "report this with the package; --target ort-cpu profiles the same model "
                               "under ONNX Runtime")
    layer = [None] * len(calls)
    for i, node in zip(macs, nodes):
        layer[i] = owners.get(node["name"])
    portable = portable_layers(delegation, calls, order)
    mac_set = set(macs)

    def previous(i):
        return next((layer[j] for j in range(i - 1, -1, -1) if j in mac_set), None)

    def following(i):
        return next((layer[j] for j in range(i + 1, len(calls)) if j in mac_set), None)
    for i, c in enumerate(calls):
        if i in mac_set:
            continue
        if c["delegate"] is None:
            layer[i] = portable.get(i) or following(i) or previous(i)
        else:
            layer[i] = previous(i) or following(i)
    return layer


def measure_executorch(package, opts: ProfileOptions, say, work: Path) -> dict:
    """``model.pte`` and its dense counterpart (``reference.pte``; an INT8 package's
    ``reference.int8.pte``) checked against the package's stored outputs, timed interleaved
    with ETDump off, then profiled with it on; the ``measured`` dict
    :func:`~structexport.profiling.assemble.assemble` reads."""
    from structexport.targets import get_target
    target = get_target(package.target, {})
    structured, dense = program_paths(package)
    feed = package.feed()
    timers = checked_timers(package, structured, dense, feed, opts.threads, say)
    say(f"timing ({opts.repeat} interleaved runs)")
    latency = time_interleaved(timers, feed, opts.repeat, opts.warmup)
    say(f"profiling ({opts.repeat} interleaved runs, ETDump)")
    prof = etdump_profile({"structured": structured, "dense": dense}, feed, opts.threads,
                          opts.repeat, opts.warmup, work)
    result = {"runtime": target.runtime(opts.threads),
              "profiler": "ExecuTorch ETDump (XNNPACK's per-operator events, portable kernels' events, "
                          "Method::execute per run), read with executorch.devtools.Inspector",
              "latency": latency, "models": {}, "programs": {"structured": structured.name, "dense": dense.name},
              "mapping_rule": MAPPING_RULE, "outside": OUTSIDE_TEXT,
              "notes": ["XNNPACK reports its operators' times in whole microseconds (an operator under "
                        "1 us reads 0 in a run): per-layer times are means over the kept runs; "
                        "multiply-adds are counted on model.onnx and reference.onnx, which hold the "
                        "programs' structure plans"]}
    result["models"] = program_models(package, prof, {"structured": structured, "dense": dense})
    return result


def program_models(package, prof: dict, paths: dict[str, Path]) -> dict:
    """The report's ``models`` of both profiled programs (ExecuTorch or LiteRT): their operator
    events and a mapper that gives each event its source layer (:func:`event_layers`)."""
    onnx, delegation, composed = mapping_inputs(package)
    models = {}
    for which, path in paths.items():
        p = prof[which]

        def mapper(layers, p=p, which=which, path=path):
            order = [name for name in package_layer_order(package) if name in layers]
            owners = event_layers(p["calls"], onnx[which], order, delegation[which], path, composed[which])
            index = {c["name"]: owners[k] for k, c in enumerate(p["calls"])}
            return lambda call: index.get(call["name"])
        models[which] = {"onnx": onnx[which], "calls": [
            {"name": c["name"], "op": c["op"], "ms": c["ms"]} for c in p["calls"]],
            "profiled_ms": p["profiled_ms"], "runs_kept": p["runs_kept"], "mapper": mapper}
    return models


def package_layer_order(package) -> list[str]:
    return [layer["name"] for layer in package.layers]


def mapping_inputs(package) -> tuple[dict, dict, dict]:
    """Per side (structured, dense): the ONNX graph holding its program's structure plan, its
    delegation report, and the layers it runs composed (an INT8 program's layers kept dense)."""
    build = package.target_build or {}
    int8 = package.precision == "int8"
    onnx = {"structured": package.model_onnx, "dense": package.reference_onnx}
    delegation = {"structured": build.get("delegation"),
                  "dense": build.get("dense_int8_delegation" if int8 else "dense_delegation")}
    composed = {"structured": list((package.manifest.get("int8") or {}).get("composed_dense") or []) if int8
                else [], "dense": []}
    return onnx, delegation, composed


def checked_timers(package, structured: Path, dense: Path, feed, threads: int, say) -> dict:
    """Timers of both programs, each checked first as ``bench`` checks it: the structured one
    against the package's stored outputs, the dense one against the dense float32 outputs or,
    for an INT8 package, its own fake-quantized graph's."""
    from structexport.timedcheck import checked_int8_program, checked_programs
    if package.precision != "int8":
        return checked_programs(package, {"structured": structured, "dense": dense}, feed, threads, say)
    timers = checked_programs(package, {"structured": structured}, feed, threads, say)
    timers["dense"] = checked_int8_program(package, dense, feed, threads, say)
    return timers


def program_paths(package) -> tuple[Path, Path]:
    """The structured program and its dense counterpart (float32; INT8: the dense INT8
    program), each checked to be there."""
    structured = package.program
    dense = package.dense_int8_program if package.precision == "int8" else package.dense_program
    if structured is None or dense is None or not structured.is_file() or not dense.is_file():
        raise ProfileError(f"{package.root} has no {package.target} program and dense counterpart to profile",
                           f"convert the model again with --target {package.target}")
    return structured, dense
