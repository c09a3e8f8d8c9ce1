"""``profile``: per-layer device profiles of a structured model beside its dense counterpart.

collect (:func:`run_profile`) -> a typed report dict (:data:`SCHEMA`) -> render
(:func:`render_html`, :func:`render_markdown`, JSON via :func:`write_reports`).

Where the time comes from:

- ``ort-cpu``: ONNX Runtime's profiler (one ``*_kernel_time`` event per node and run, one
  ``model_run`` event per run). The nodes of ONNX Runtime's optimized graph (the names the
  profiler reports) are mapped back to source layers by the names of the weights they read
  (:func:`onnx_node_layers`, which ``bench --per-layer`` uses too), with residual shortcuts
  handled (:func:`call_layers`).
- ``tvm-llvm``: the Relax VM's instrument hook (TVM 0.27 has no ``profile=True`` VM any
  more: :meth:`tvm.runtime.vm.VirtualMachine.set_instrument` is what it offers), timing every
  call of a compiled PrimFunc. The ONNX model is imported with ``keep_params_in_input=True``
  so that weights stay named parameters of ``main``; the lowered ``main`` is walked binding by
  binding, which gives each PrimFunc call the weights it reads (through the VM's reshapes),
  and the VM runs those calls in that order. The library profiled is compiled from the same
  ``model.onnx`` with the same target and pipeline as ``model.so``, weights passed as inputs;
  the dense counterpart is exported, rewritten by the same passes and compiled the same way.
- ``--rpc`` / ``--tracker`` (tvm-llvm, tvm-arm on a device, :func:`profile_remote`): the
  instrument hook does not cross RPC; each PrimFunc call is timed on its own on the device.

Rows that are not a source layer, never dropped: ``(unmapped)`` (kernels no layer could be
found for; what they are is listed in ``mapping``) and ``(outside kernels)`` (the profiled
run's time outside any kernel: ONNX Runtime's executor, the TVM VM's interpreter,
allocations and the profiler's own hooks). The rows add up to the profiled run's total.
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from structexport.errors import StructExportError
from structexport.machine import package_version

SCHEMA = "structexport-profile/1"
UNMAPPED = "(unmapped)"
OUTSIDE = "(outside kernels)"
TARGETS = ("ort-cpu", "tvm-llvm")
REMOTE_TARGETS = ("tvm-llvm", "tvm-arm")
FIGURES = {
    "fig-time": "Time per layer, dense vs structured",
    "fig-speedup": "Measured vs theoretical speedup per layer",
    "fig-throughput": "Achieved GMAC/s per layer against the machine's measured peak",
}
# Operators that only prepare a layer's input (TVM names after legalization, ONNX names):
# attributed forward to the call that reads their output.
FORWARD_OPS = {"cumsum", "strided_slice", "subtract", "concatenate", "pad", "reshape",
               "take", "transpose", "avg_pool2d", "avg_pool3d", "layout_transform", "split",
               "squeeze", "expand_dims",
               # ONNX operators and ONNX Runtime's NCHWc input reorders
               "CumSum", "Slice", "Sub", "Concat", "Pad", "Reshape", "AveragePool", "Gather",
               "Transpose", "ReorderInput"}


class ProfileError(StructExportError):
    exit_code, kind = 40, "profile-failed"


@dataclass
class ProfileOptions:
    target: str | None = None        # None: the OUTDIR's target (ort-cpu for checkpoints)
    threads: int = 1
    batch: int = 1
    input_shape: tuple[int, ...] | None = None
    repeat: int = 50                  # profiled runs of each model (interleaved)
    warmup: int = 5
    seed: int = 0
    peak: bool = True                 # measure the machine's GEMM peak
    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None
    rpc_timeout: float | None = None   # seconds an RPC session may last (None: the default)
    trust_pickle: bool = False        # the loader's trust flags, for checkpoints
    allow_torchscript: bool = False


# --------------------------------------------------------------------------- collect

def run_profile(path: str | None, arch: str | None, opts: ProfileOptions,
                progress: Callable[[str], None] | None = None) -> dict:
    """Profile a converted OUTDIR, a checkpoint (converted on the fly) or a zoo ``arch``
    (weights from ``opts.seed``); returns the report dict (:data:`SCHEMA`)."""
    from structexport.workload import WorkloadOptions, resolve_workload
    say = progress or (lambda _m: None)
    spec = None
    if opts.rpc or opts.tracker or opts.key:
        from structexport import rpc
        spec = rpc.parse_device(opts.rpc, opts.tracker, opts.key, opts.rpc_timeout)  # usage errors first
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="structexport-profile-") as tmp:
        work = Path(tmp)
        workload = resolve_workload(path, arch, WorkloadOptions(
            target=opts.target, input_shape=opts.input_shape, batch=opts.batch, seed=opts.seed,
            trust_pickle=opts.trust_pickle, allow_torchscript=opts.allow_torchscript,
            need="graph"), work, say)
        src = _inputs_of(workload)
        target = src["target"]
        if spec is not None and target not in REMOTE_TARGETS:
            raise ProfileError(f"--rpc/--tracker profile TVM libraries ({', '.join(REMOTE_TARGETS)}), "
                               f"not {target!r}", "pass --target tvm-llvm or --target tvm-arm")
        if spec is None and target not in TARGETS:
            raise ProfileError(f"profile supports --target {' or '.join(TARGETS)} on this host, "
                               f"not {target!r}", "pass --target ort-cpu or --target tvm-llvm, or "
                               "--rpc HOST:PORT for a TVM device")
        dense_onnx = workload.package.reference_onnx
        feed = workload.package.feed()
        if spec is not None:
            measured = profile_remote(src["onnx"], dense_onnx, feed, opts, say, spec, target,
                                      src.get("tvm_target"), work)
        elif target == "ort-cpu":
            measured = _measure_ort(src["onnx"], dense_onnx, feed, opts, say, work)
        else:
            measured = _measure_tvm(src["onnx"], dense_onnx, feed, opts, say,
                                    tvm_target=src.get("tvm_target"), artifact=src["artifact"])
        peak = measure_peak(opts.threads) if opts.peak else None
        report = assemble(src, target, dense_onnx, measured, peak, opts)
        if spec is not None:
            report["device"] = spec.describe()
            report["notes"].append("on a remote device each PrimFunc call is timed on its own "
                                   "(the VM's instrument hook does not cross RPC): "
                                   "`(outside kernels)` is the whole run minus those isolated "
                                   "times, and can be slightly negative; the machine peak is "
                                   "this host's")
        report["seconds"] = round(time.perf_counter() - started, 2)
        return report


def _inputs_of(workload) -> dict:
    """What the collectors and :func:`assemble` read of a workload's package."""
    package, target = workload.package, workload.target
    notes = list(workload.notes)
    reused = workload.origin == "outdir" and not workload.converted_here
    # the TVM target the package's library was built for, when that is the one profiled
    tvm_target = package.tvm_target if target.startswith("tvm") and package.target == target else None
    artifact = package.library if reused and package.target == target == "tvm-llvm" else None
    if reused and package.tuning and target.startswith("tvm"):
        notes.append(f"{package.root}/model.so was tuned ({package.tuning.get('tasks', '?')} tasks); "
                     "the profiled builds are untuned, so per-layer times are the untuned "
                     "kernels' (model.so's own latency is in the totals)")
    return {"arch": package.arch, "checkpoint": workload.label if workload.origin != "outdir"
            else (package.manifest["source"].get("path") or workload.label),
            "outdir": str(package.root) if reused else None, "target": target,
            "shape": package.input_shape, "onnx": package.model_onnx, "passes": package.passes,
            "tvm_target": tvm_target, "artifact": artifact, "notes": notes,
            "layers": [layer["name"] for layer in package.layers]}


def _keep_fastest(runs: list, wall: Callable) -> list:
    """The runs no slower than the median run: a shared machine's hiccups dropped alike
    from the structured and the dense model."""
    cut = statistics.median(wall(r) for r in runs)
    return [r for r in runs if wall(r) <= cut]


# ---- ONNX Runtime

def _ort_profile(paths: dict[str, Path], feed: np.ndarray, threads: int, runs: int, warmup: int,
                 optimized_dir: Path | None = None) -> dict[str, dict]:
    """Profile each model for ``runs`` runs (interleaved, after ``warmup``): mean ms per node
    over the runs kept, mean ms of the kept runs, and the operator of each node."""
    from structexport.ortsession import ort_session
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for name, path in paths.items():
            # the optimized graph is the one whose node names the profile reports
            sessions[name] = ort_session(
                path, threads, profile_prefix=Path(tmp) / f"prof-{name}",
                optimized_model_path=optimized_dir / f"{name}.optimized.onnx" if optimized_dir else None)
        names = list(sessions)
        for i in range(warmup + runs):
            for n in (names if i % 2 == 0 else names[::-1]):
                s = sessions[n]
                s.run(None, {s.get_inputs()[0].name: feed})
        for n, s in sessions.items():
            events = json.loads(Path(s.end_profiling()).read_text())
            model_runs = sorted((e for e in events if e.get("cat") == "Session"
                                 and e.get("name") == "model_run"), key=lambda e: e["ts"])[warmup:]
            nodes = [e for e in events if e.get("cat") == "Node"
                     and e.get("name", "").endswith("_kernel_time")]
            per_run = []
            for r in model_runs:
                lo, hi = r["ts"], r["ts"] + r["dur"]
                per_run.append((r["dur"] / 1e3, [e for e in nodes if lo <= e["ts"] <= hi]))
            kept = _keep_fastest(per_run, lambda r: r[0])
            node_ms: dict[str, float] = {}
            ops: dict[str, str] = {}
            for _total, evs in kept:
                for e in evs:
                    key = e["name"][: -len("_kernel_time")]
                    node_ms[key] = node_ms.get(key, 0.0) + e["dur"] / 1e3 / len(kept)
                    ops[key] = e.get("args", {}).get("op_name", "?")
            out[n] = {"node_ms": node_ms, "ops": ops,
                      "profiled_ms": statistics.fmean(t for t, _ in kept), "runs_kept": len(kept)}
    return out


def _measure_ort(structured: Path, dense: Path, feed, opts: ProfileOptions, say, work: Path) -> dict:
    from structexport.ortsession import ort_session
    from structexport.timing import time_interleaved
    say(f"timing ({opts.repeat} interleaved runs)")
    latency = time_interleaved({"structured": ort_session(structured, opts.threads),
                                "dense": ort_session(dense, opts.threads)},
                               feed, opts.repeat, opts.warmup)
    say(f"profiling ({opts.repeat} interleaved runs, ONNX Runtime profiler)")
    prof = _ort_profile({"structured": structured, "dense": dense}, feed, opts.threads,
                        opts.repeat, opts.warmup, optimized_dir=work)
    result = {"runtime": f"ONNX Runtime {package_version('onnxruntime')}, CPUExecutionProvider, "
                         f"all graph optimizations",
              "profiler": "ONNX Runtime profiler (per-node kernel events, model_run per run)",
              "latency": latency, "models": {}}
    for which, path in (("structured", structured), ("dense", dense)):
        p = prof[which]
        result["models"][which] = {"onnx": path, "calls": [
            {"name": node, "op": p["ops"][node], "ms": ms} for node, ms in p["node_ms"].items()],
            "profiled_ms": p["profiled_ms"], "runs_kept": p["runs_kept"],
            "mapper": lambda layers, path=path, which=which: _ort_owner(
                path, work / f"{which}.optimized.onnx", layers)}
    return result


def onnx_calls(path: Path) -> list[dict]:
    """The nodes of an ONNX graph as calls for :func:`call_layers` (a node that reads only
    weights, e.g. a transpose of one, passes the weight's name on to its output)."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    alias: dict[str, str] = {}
    calls = []
    for node in model.graph.node:
        ins = [alias.get(i, i) for i in node.input if i]
        weights = [i for i in ins if i in inits]
        data = [i for i in ins if i not in inits]
        if weights and not data:
            alias.update({o: weights[0] for o in node.output})
            inits.update(node.output)
        calls.append({"name": node.name or node.output[0], "op": node.op_type, "weights": weights,
                      "inputs": data, "outputs": list(node.output)})
    return calls


def onnx_node_layers(path: Path, layers: set[str]) -> dict[str, str]:
    """Source layer of each node of an ONNX graph, by node name and by output tensor name
    (runtimes name the nodes they rewrite after them); nodes without one are left out."""
    calls = onnx_calls(path)
    out: dict[str, str] = {}
    for c, layer in zip(calls, call_layers(calls, layers)):
        if layer:
            out.setdefault(c["name"], layer)
            for o in c["outputs"]:
                out.setdefault(o, layer)
    return out


def _ort_owner(path: Path, optimized: Path | None, layers):
    """Profile node names are those of ONNX Runtime's optimized graph. Its nodes that ONNX
    Runtime kept or renamed after an exported node or tensor (``conv2d_44_nchwc``) take that
    node's layer; the ones it added (layout reorders, whose weights it renamed too) follow
    the rules of :func:`call_layers` from their neighbours in the optimized graph."""
    owners = onnx_node_layers(path, layers)

    def exported(name: str, outputs=()) -> str | None:
        return (owners.get(name) or owners.get(name.removesuffix("_nchwc"))
                or next((owners[o] for o in outputs if o in owners), None))
    opt: dict[str, str] = {}
    if optimized and optimized.is_file():
        calls = onnx_calls(optimized)
        known = {i: layer for i, c in enumerate(calls) if (layer := exported(c["name"], c["outputs"]))}
        opt = {c["name"]: layer for c, layer in zip(calls, call_layers(calls, layers, known)) if layer}
    return lambda call: opt.get(call["name"]) or exported(call["name"])


# ---- TVM (host)

def _tvm_modules():
    from structexport.targets.tvm_targets import TvmError
    try:
        import tvm
        from tvm import relax
    except Exception as exc:
        raise TvmError(f"Apache TVM is not usable here: {type(exc).__name__}: {exc}",
                       "install it with pip install -e '.[tvm]' (make setup does)") from None
    return tvm, relax


def _var_name(v) -> str | None:
    return getattr(v, "name_hint", None) or getattr(v, "name", None)


def tvm_program(onnx_path: Path, tvm_target: dict | None = None) -> dict:
    """Compile ``onnx_path`` for the host with weights as named inputs; return the VM
    executable, the weights (in ``main``'s order) and the PrimFunc calls of the lowered
    ``main`` in execution order, each with the weights it reads and its data inputs/outputs."""
    import onnx
    tvm, relax = _tvm_modules()
    from tvm.relax.frontend.onnx import from_onnx

    from structexport.targets.tvm_targets import TvmError, quiet_native_stderr
    target = tvm.target.Target(tvm_target or {"kind": "llvm"})
    try:
        with quiet_native_stderr():
            mod = from_onnx(onnx.load(str(onnx_path)), keep_params_in_input=True)
            mod, params = relax.frontend.detach_params(mod)
            with target:
                lowered = relax.get_pipeline("default")(mod)
            executable = relax.build(lowered, target=target, relax_pipeline=None)
    except Exception as exc:
        raise TvmError(f"TVM could not compile {onnx_path.name} for profiling: "
                       f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}") from None
    main = lowered["main"]
    names = [_var_name(p) for p in main.params]
    weights = list(params.get("main", []))
    weight_names = set(names[1:])
    prim = {gv.name_hint for gv, f in lowered.functions.items() if type(f).__name__ == "PrimFunc"}
    alias: dict[str, str] = {}
    allocated: set[str] = set()
    written: set[str] = set()
    calls = []
    for block in main.body.blocks:
        for b in block.bindings:
            v, var = b.value, _var_name(b.var)
            if not isinstance(v, relax.Call):
                continue
            op = v.op
            args = [alias.get(_var_name(a), _var_name(a)) for a in v.args if _var_name(a)]
            if isinstance(op, tvm.ir.GlobalVar) and op.name_hint in prim:
                outs = [a for a in args if a in allocated and a not in written]
                written.update(outs)
                reads = [a for a in args if a in weight_names]
                data = [a for a in args if a not in outs and a not in weight_names]
                if reads and not data:  # a weight transposed or reshaped: still that weight
                    alias.update({o: reads[0] for o in outs})
                calls.append({"symbol": op.name_hint, "weights": reads, "inputs": data,
                              "outputs": outs, "arg_specs": [_arg_spec(a) for a in v.args]})
            elif isinstance(op, tvm.ir.Op) and op.name == "relax.vm.alloc_tensor":
                allocated.add(var)
            elif isinstance(op, relax.ExternFunc) and args:
                alias[var] = args[0]   # vm.builtin.reshape & co: a view of their first input
    return {"executable": executable, "weights": weights, "input": names[0], "calls": calls,
            "device": tvm.cpu(0), "target": target, "lowered": lowered}


def _arg_spec(arg) -> tuple | None:
    """(shape, dtype) of a static tensor argument, None for anything else."""
    info = getattr(arg, "ty", None) or getattr(arg, "struct_info", None)  # TVM 0.27: ty
    shape = getattr(info, "shape", None)
    values = getattr(shape, "values", None)
    try:
        return tuple(int(v) for v in values), str(info.dtype)
    except (TypeError, ValueError, AttributeError):
        return None


def call_layers(calls: list[dict], layers: set[str], known: dict[int, str] | None = None
                ) -> list[str | None]:
    """Source layer of each call (a TVM PrimFunc call or an ONNX node, in execution order,
    each ``{"op", "weights", "inputs", "outputs"}``): by the weights it reads (the longest
    layer name that prefixes a weight's ONNX initializer name); else, for data movement
    (:data:`FORWARD_OPS`), the layer of a call that reads its output; else the layer of the
    most recent call producing one of its inputs (activations; residual adds: the block's
    last conv, not the identity). A weight read by several
    calls says nothing about the layer: the exporter shares one constant between layers of
    the same shape (a sum-pool's band and box filters are named after the first such layer),
    so a call that reads only shared weights is placed like data movement, and only when
    that finds nothing by its weight's name. Cycles through a residual's shortcut are cut,
    and every input is tried, not only the first; None: no layer found.
    ``known``: layers already known for some calls (by index), taken as they are."""
    producer = {o: i for i, c in enumerate(calls) for o in c["outputs"]}
    readers: dict[str, list[int]] = {}
    for i, c in enumerate(calls):
        for a in c["inputs"]:
            readers.setdefault(a, []).append(i)
    memo: dict[int, str] = dict(known or {})
    weight_readers: dict[str, int] = {}
    for c in calls:
        for w in set(c["weights"]):
            weight_readers[w] = weight_readers.get(w, 0) + 1

    def owner(name: str) -> str | None:
        parts = name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in layers:
                return prefix
        return None

    def layer_of(i: int, visiting: frozenset = frozenset()) -> str | None:
        if i in memo:
            return memo[i]
        if i in visiting or len(visiting) > 200:
            return None
        visiting = visiting | {i}
        c = calls[i]
        own = [w for w in c["weights"] if weight_readers[w] == 1]
        found = next((o for o in map(owner, own) if o), None)
        shared_only = bool(c["weights"]) and not own
        if found is None and (c["op"] in FORWARD_OPS or shared_only):
            for j in (j for o in c["outputs"] for j in readers.get(o, []) if j > i):
                found = layer_of(j, visiting)
                if found:
                    break
        if found is None:  # the most recent computing producer first: a residual add
            # follows its block's last conv, not the identity or the shortcut's data movement
            ps = sorted({producer[a] for a in c["inputs"] if a in producer and producer[a] < i},
                        key=lambda p: (calls[p]["op"] in FORWARD_OPS, -p))
            for p in ps:
                found = layer_of(p, visiting)
                if found:
                    break
        if found is None and shared_only:
            found = next((o for o in map(owner, c["weights"]) if o), None)
        if found:  # a None found under a cut cycle may resolve from elsewhere: not kept
            memo[i] = found
        return found
    return [layer_of(i) for i in range(len(calls))]


def _measure_tvm(structured: Path, dense: Path, feed, opts: ProfileOptions, say,
                 tvm_target: dict | None = None, artifact: Path | None = None) -> dict:
    """``artifact``: the OUTDIR's model.so, timed beside the two profiled builds (it is not
    profiled itself: its weights are baked-in constants, without names)."""
    tvm, relax = _tvm_modules()
    from structexport.targets.tvm_targets import quiet_native_stderr
    try:  # TVM's own thread pool, as ONNX Runtime's intra-op threads
        tvm.get_global_func("runtime.config_threadpool")(1, opts.threads)
    except Exception:  # an older or trimmed runtime: its default pool
        pass
    say("compile for TVM (weights as inputs, to map calls to layers)")
    programs = {"structured": tvm_program(structured, tvm_target),
                "dense": tvm_program(dense, tvm_target)}
    vms, args = {}, {}
    for n, p in programs.items():
        dev = p["device"]
        with quiet_native_stderr():
            vms[n] = relax.VirtualMachine(p["executable"], dev)
        args[n] = [tvm.runtime.tensor(feed, device=dev)] + [
            tvm.runtime.tensor(w.numpy(), device=dev) for w in p["weights"]]
    names = list(vms)
    timed = dict(vms)
    if artifact is not None and artifact.is_file():
        dev = programs["structured"]["device"]
        with quiet_native_stderr():
            timed["artifact"] = relax.VirtualMachine(tvm.runtime.load_module(str(artifact)), dev)
        args["artifact"] = args["structured"][:1]
    order = list(timed)
    say(f"timing ({opts.repeat} interleaved runs)")
    times = {n: [] for n in order}
    for i in range(opts.warmup + opts.repeat):
        for n in (order if i % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            timed[n]["main"](*args[n])
            if i >= opts.warmup:
                times[n].append(time.perf_counter() - start)
    from structexport.timing import stats
    latency = {n: stats(t) for n, t in times.items()}

    say(f"profiling ({opts.repeat} interleaved runs, Relax VM instrument)")
    prims = {n: {c["symbol"] for c in p["calls"]} for n, p in programs.items()}
    records: dict[str, list] = {n: [] for n in names}
    state: dict = {}
    for n in names:
        def instrument(func, symbol, before, ret, *a, n=n):
            if before:
                if symbol in prims[n]:
                    state["t"] = time.perf_counter()
            else:
                t = time.perf_counter()
                if symbol in prims[n]:
                    state["calls"].append((symbol, t - state["t"]))
            return 0
        vms[n].set_instrument(instrument)
    for i in range(opts.warmup + opts.repeat):
        for n in (names if i % 2 == 0 else names[::-1]):
            state["calls"] = []
            start = time.perf_counter()
            vms[n]["main"](*args[n])
            wall = time.perf_counter() - start
            if i >= opts.warmup:
                records[n].append((wall, state["calls"]))
    result = {"runtime": f"Apache TVM {tvm.__version__} Relax VM, target "
                         f"{json.dumps(tvm_target or {'kind': 'llvm'})} (untuned, default pipeline)",
              "profiler": "Relax VM instrument hook around every PrimFunc call; lowered main "
                          "walked for the weights each call reads",
              "latency": latency, "models": {}}
    for n, p in programs.items():
        expected = [c["symbol"] for c in p["calls"]]
        for _wall, calls in records[n]:
            if [s for s, _ in calls] != expected:
                raise ProfileError(f"the TVM VM ran other PrimFunc calls than the lowered program "
                                   f"of the {n} model lists ({len(calls)} vs {len(expected)})",
                                   "report this with the model: calls cannot be mapped to layers")
        kept = _keep_fastest(records[n], lambda r: r[0])
        ms = [sum(run[1][k][1] for run in kept) * 1e3 / len(kept) for k in range(len(expected))]
        result["models"][n] = {
            "onnx": structured if n == "structured" else dense,
            "calls": [{"name": f"{c['symbol']}#{k}", "op": c["symbol"], "ms": ms[k],
                       "weights": c["weights"]} for k, c in enumerate(p["calls"])],
            "profiled_ms": statistics.fmean(w for w, _ in kept) * 1e3, "runs_kept": len(kept),
            "mapper": lambda layers, p=p: _tvm_owner(p["calls"], layers)}
    return result


def _tvm_op(symbol: str) -> str:
    return re.sub(r"\d+$", "", symbol.removeprefix("fused_"))


def _tvm_owner(calls, layers):
    owners = call_layers([dict(c, op=_tvm_op(c["symbol"])) for c in calls], layers)
    index = {f"{c['symbol']}#{k}": owners[k] for k, c in enumerate(calls)}
    return lambda call: index.get(call["name"])


# ---- remote TVM devices

def profile_remote(structured: Path, dense: Path, feed, opts: ProfileOptions, say, spec,
                   target_name: str, tvm_target: dict | None, work: Path) -> dict:
    """Both models on a device reached through TVM's RPC (``--rpc HOST:PORT`` or
    ``--tracker HOST:PORT --key KEY``, parsed by ``structexport.rpc``), in one session.

    The VM's instrument hook is a host-side Python callback and does not cross RPC, so each
    PrimFunc call of the lowered program (:func:`tvm_program`) is timed on its own on the
    device (``time_evaluator`` of a library of the PrimFuncs alone, on arguments of the
    call's shapes), and whole runs with the VM's ``time_evaluator`` (weights as inputs),
    interleaved. Returns the ``measured`` dict of :func:`_measure_tvm`."""
    tvm, relax = _tvm_modules()
    from structexport.rpc import device_errors, open_session, set_threads
    from structexport.timing import stats
    from structexport.targets import get_target
    from structexport.targets.tvm_targets import quiet_native_stderr
    target = get_target(target_name, {"tvm_target": tvm_target} if tvm_target else {})
    say(f"compile for TVM ({target_name}, weights as inputs, to map calls to layers)")
    programs = {"structured": tvm_program(structured, target.tvm_target()),
                "dense": tvm_program(dense, target.tvm_target())}
    files = {}
    for n, p in programs.items():
        tir = tvm.IRModule({gv: f for gv, f in p["lowered"].functions.items()
                            if type(f).__name__ == "PrimFunc"})
        with quiet_native_stderr():
            kernels = tvm.tirx.build(tir, target=p["target"])
            target.export_library(kernels, work / f"{n}-kernels.so")
            target.export_library(p["executable"], work / f"{n}-vm.so")
        files[n] = (work / f"{n}-kernels.so", work / f"{n}-vm.so")
    say(f"connect to the {spec.describe()}")
    session = open_session(spec)
    set_threads(spec, session, opts.threads)
    rng = np.random.default_rng(opts.seed)
    with device_errors(spec, "profiling"):
        dev = session.device(target.device_kind, 0)
        vms, kernels, args = {}, {}, {}
        for n, (klib, vmlib) in files.items():
            for f in (klib, vmlib):
                session.upload(str(f), f"structexport-profile-{f.name}")
            kernels[n] = session.load_module(f"structexport-profile-{klib.name}")
            vms[n] = relax.VirtualMachine(session.load_module(f"structexport-profile-{vmlib.name}"), dev)
            args[n] = [tvm.runtime.tensor(feed, device=dev)] + [
                tvm.runtime.tensor(w.numpy(), device=dev) for w in programs[n]["weights"]]
        say(f"timing ({opts.repeat} interleaved runs on the device)")
        evals = {n: vms[n].time_evaluator("main", dev, number=1, repeat=1) for n in vms}
        times = {n: [] for n in vms}
        for i in range(opts.warmup + opts.repeat):
            for n in (list(vms) if i % 2 == 0 else list(vms)[::-1]):
                t = float(evals[n](*args[n]).results[0])
                if i >= opts.warmup:
                    times[n].append(t)
        latency = {n: stats(t) for n, t in times.items()}
        say("profiling (each PrimFunc call on its own, on the device)")
        number = max(3, opts.repeat // 5)
        models = {}
        for n, p in programs.items():
            calls = []
            for k, c in enumerate(p["calls"]):
                if any(a is None for a in c["arg_specs"]):
                    raise ProfileError(f"call {k} ({c['symbol']}) of the {n} model takes an argument "
                                       "that is not a static tensor", "profile on this host instead")
                tensors = [tvm.runtime.tensor(
                    (rng.standard_normal(shape) * 0.1).astype(dtype) if dtype.startswith("float")
                    else np.zeros(shape, dtype), device=dev) for shape, dtype in c["arg_specs"]]
                ev = kernels[n].time_evaluator(c["symbol"], dev, number=number, repeat=1)
                ms = float(ev(*tensors).results[0]) * 1e3
                calls.append({"name": f"{c['symbol']}#{k}", "op": c["symbol"], "ms": ms,
                              "weights": c["weights"]})
            models[n] = {"onnx": structured if n == "structured" else dense, "calls": calls,
                         "profiled_ms": latency[n]["median"], "runs_kept": latency[n]["runs"],
                         "mapper": lambda layers, p=p: _tvm_owner(p["calls"], layers)}
    return {"runtime": f"Apache TVM {tvm.__version__} Relax VM on the {spec.describe()}, target "
                       f"{json.dumps(target.tvm_target())} (untuned, default pipeline)",
            "profiler": f"each PrimFunc call timed on its own on the device ({number} runs "
                        "each); whole runs by the VM's time_evaluator",
            "latency": latency, "models": models}


# ---- machine peak

def measure_peak(threads: int, n: int = 512, budget_s: float = 1.5, max_runs: int = 300) -> dict:
    """The machine's fp32 multiply-accumulate rate, measured: an ``n x n x n`` MatMul under
    ONNX Runtime (MLAS, the same kernels as its convolutions) with ``threads`` intra-op
    threads, the best run within ``budget_s`` seconds (best, not median: a peak on a shared
    machine is what it reaches when nothing else runs)."""
    from onnx import TensorProto, helper, numpy_helper

    from structexport.ortsession import ort_session
    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.standard_normal((n, n), dtype=np.float32), "B")
    graph = helper.make_graph([helper.make_node("MatMul", ["A", "B"], ["C"])], "gemm",
                              [helper.make_tensor_value_info("A", TensorProto.FLOAT, [n, n])],
                              [helper.make_tensor_value_info("C", TensorProto.FLOAT, [n, n])], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = min(model.ir_version, 10)
    s = ort_session(model.SerializeToString(), threads)
    feed = {"A": rng.standard_normal((n, n), dtype=np.float32)}
    for _ in range(3):
        s.run(None, feed)
    best, runs, until = math.inf, 0, time.perf_counter() + budget_s
    while runs < max_runs and (runs < 10 or time.perf_counter() < until):
        t = time.perf_counter()
        s.run(None, feed)
        best = min(best, time.perf_counter() - t)
        runs += 1
    return {"gmacs": n ** 3 / best / 1e9, "label": "measured",
            "method": f"ONNX Runtime MatMul {n}x{n}x{n} fp32 (MLAS), {threads} thread(s), "
                      f"best of {runs} runs", "threads": threads, "runs": runs}


# --------------------------------------------------------------------------- assemble

def assemble(src: dict, target: str, dense_onnx: Path, measured: dict, peak: dict | None,
             opts: ProfileOptions) -> dict:
    from structexport.costmodel import node_costs, totals
    from structexport.machine import machine
    order = list(src["layers"])
    layers = set(order)
    rows: dict[str, dict] = {}

    def row(name: str) -> dict:
        return rows.setdefault(name, {"layer": name, "kind": "layer" if name in layers else
                                      ("outside" if name == OUTSIDE else "unmapped"),
                                      "structured_ms": 0.0, "dense_ms": 0.0,
                                      "structured_macs": 0, "dense_macs": 0,
                                      "structured_ops": {}, "dense_ops": {}})
    for name in order:
        row(name)
    totals_out, unmapped_calls = {}, {}
    for which in ("structured", "dense"):
        m = measured["models"][which]
        owner = m["mapper"](layers)
        onnx_path = src["onnx"] if which == "structured" else dense_onnx
        kernels = 0.0
        lost: dict[str, float] = {}
        for call in m["calls"]:
            layer = owner(call) or UNMAPPED
            r = row(layer)
            r[f"{which}_ms"] += call["ms"]
            r[f"{which}_ops"][call["op"]] = r[f"{which}_ops"].get(call["op"], 0.0) + call["ms"]
            kernels += call["ms"]
            if layer == UNMAPPED:
                lost[call["op"]] = lost.get(call["op"], 0.0) + call["ms"]
        row(OUTSIDE)[f"{which}_ms"] += m["profiled_ms"] - kernels
        owners = onnx_node_layers(onnx_path, layers)
        costs = node_costs(onnx_path)
        macs_unmapped = 0
        for c in costs:
            layer = owners.get(c.name)
            if layer in layers:
                row(layer)[f"{which}_macs"] += c.macs
            else:
                macs_unmapped += c.macs
        if macs_unmapped:
            row(UNMAPPED)[f"{which}_macs"] += macs_unmapped
        t = totals(costs)
        totals_out[which] = {"latency_ms": measured["latency"][which], "profiled_ms": m["profiled_ms"],
                             "kernels_ms": kernels, "unmapped_ms": sum(lost.values()),
                             "outside_ms": m["profiled_ms"] - kernels, "runs_kept": m["runs_kept"],
                             "calls": len(m["calls"]), "macs": t["macs"], "adds": t["adds"]}
        if which == "structured" and "artifact" in measured["latency"]:
            totals_out[which]["artifact_latency_ms"] = measured["latency"]["artifact"]
        unmapped_calls[which] = dict(sorted(lost.items(), key=lambda kv: -kv[1]))
    peak_gmacs = peak["gmacs"] if peak else None
    out_rows = []
    for name in order + [n for n in rows if n not in layers]:
        r = rows[name]
        if r["kind"] == "unmapped" and not (r["structured_ms"] or r["dense_ms"] or r["structured_macs"]
                                           or r["dense_macs"]):
            continue
        for which in ("structured", "dense"):
            total = totals_out[which]["profiled_ms"]
            r[f"{which}_share"] = r[f"{which}_ms"] / total if total else None
            ms, macs = r[f"{which}_ms"], r[f"{which}_macs"]
            r[f"{which}_gmacs"] = macs / (ms * 1e6) if ms > 0 and macs else None
        for which in ("structured", "dense"):
            r[f"{which}_ops"] = dict(sorted(r[f"{which}_ops"].items(), key=lambda kv: -kv[1]))
        s, d = r["structured_ms"], r["dense_ms"]
        r["speedup_measured"] = d / s if s > 0 and d > 0 else None
        r["speedup_theoretical"] = (r["dense_macs"] / r["structured_macs"]
                                    if r["structured_macs"] and r["kind"] == "layer" else None)
        r["efficiency"] = (r["speedup_measured"] / r["speedup_theoretical"]
                           if r["speedup_measured"] and r["speedup_theoretical"] else None)
        r["peak_fraction"] = (r["structured_gmacs"] / peak_gmacs
                              if r["structured_gmacs"] and peak_gmacs else None)
        out_rows.append(r)
    s_lat, d_lat = totals_out["structured"]["latency_ms"], totals_out["dense"]["latency_ms"]
    theo = (totals_out["dense"]["macs"] / totals_out["structured"]["macs"]
            if totals_out["structured"]["macs"] else None)
    meas = d_lat["median"] / s_lat["median"]
    notes = list(src.get("notes", []))
    over = [r["layer"] for r in out_rows if peak_gmacs and max(r["structured_gmacs"] or 0,
                                                              r["dense_gmacs"] or 0) > peak_gmacs]
    if over:
        notes.append(f"{len(over)} layer(s) ran above the measured peak ({', '.join(over[:5])}): "
                     "the peak was measured while the machine was busier, or the runtime "
                     "overlapped work across kernels")
    if target.startswith("tvm"):
        notes.append("the profiled TVM builds are compiled from the same model.onnx with the same "
                     "target and pipeline as model.so, weights passed as inputs (named, so that "
                     "each PrimFunc call can be mapped to the layer whose weights it reads)")
    mach = machine()
    if target.startswith("tvm"):
        mach["tvm"] = package_version("apache-tvm")
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "arch": src["arch"], "target": target, "device": "this host",
        "source": {"checkpoint": src["checkpoint"], "outdir": src["outdir"]},
        "input_shape": list(src["shape"]), "threads": opts.threads, "repeat": opts.repeat,
        "warmup": opts.warmup, "runtime": measured["runtime"], "profiler": measured["profiler"],
        "totals": totals_out,
        "speedup_measured": meas, "speedup_theoretical": theo,
        "efficiency": meas / theo if theo else None,
        "peak": peak, "machine": mach, "notes": notes,
        "layers": out_rows,
        "mapping": {
            "rule": "a kernel belongs to the source layer whose weights it reads (longest layer "
                    "name prefixing the weight's ONNX initializer name); data movement to the "
                    "layer it feeds; activations and residual adds to the layer they follow",
            "unmapped_ms_by_op": unmapped_calls,
            "outside": "profiled run total minus the sum of its kernels: executor or VM "
                       "interpreter, allocations and the profiler's own hooks",
        },
    }


# --------------------------------------------------------------------------- checks

LAYER_KEYS = {"layer": str, "kind": str, "structured_ms": float, "dense_ms": float,
              "structured_share": (float, type(None)), "dense_share": (float, type(None)),
              "structured_macs": int, "dense_macs": int,
              "structured_gmacs": (float, type(None)), "dense_gmacs": (float, type(None)),
              "speedup_measured": (float, type(None)), "speedup_theoretical": (float, type(None)),
              "efficiency": (float, type(None)), "peak_fraction": (float, type(None)),
              "structured_ops": dict, "dense_ops": dict}
TOP_KEYS = {"schema": str, "created": str, "arch": str, "target": str, "device": str,
            "source": dict, "input_shape": list, "threads": int, "repeat": int, "warmup": int,
            "runtime": str, "profiler": str, "totals": dict, "speedup_measured": float,
            "speedup_theoretical": (float, type(None)), "efficiency": (float, type(None)),
            "peak": (dict, type(None)), "machine": dict, "notes": list, "layers": list,
            "mapping": dict}


def validate(report: dict) -> list[str]:
    """What is wrong with ``report`` against :data:`SCHEMA` (empty when nothing)."""
    problems = []
    for key, typ in TOP_KEYS.items():
        if key not in report:
            problems.append(f"missing {key}")
        elif not isinstance(report[key], typ):
            problems.append(f"{key}: {type(report[key]).__name__}")
    if report.get("schema") != SCHEMA:
        problems.append(f"schema {report.get('schema')!r} != {SCHEMA!r}")
    for i, r in enumerate(report.get("layers", [])):
        for key, typ in LAYER_KEYS.items():
            if key not in r:
                problems.append(f"layers[{i}] missing {key}")
            elif not isinstance(r[key], typ) or (typ is float and isinstance(r[key], bool)):
                if not (typ is float and isinstance(r[key], int)):
                    problems.append(f"layers[{i}].{key}: {type(r[key]).__name__}")
    for which in ("structured", "dense"):
        t = report.get("totals", {}).get(which, {})
        for key in ("latency_ms", "profiled_ms", "kernels_ms", "unmapped_ms", "outside_ms", "macs"):
            if key not in t:
                problems.append(f"totals.{which} missing {key}")
    return problems


# --------------------------------------------------------------------------- render

def _fmt(v, spec=".3f", none="") -> str:
    if v is None:
        return none
    return format(v, spec)


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The per-layer table as strings, shared by Markdown, HTML and the terminal."""
    head = ["layer", "structured ms", "dense ms", "share (struct)", "MACs (struct)",
            "MACs (dense)", "GMAC/s (struct)", "GMAC/s (dense)", "measured", "theoretical",
            "efficiency"]
    body = []
    for r in report["layers"]:
        body.append([r["layer"], _fmt(r["structured_ms"]), _fmt(r["dense_ms"]),
                     _fmt(r["structured_share"] * 100 if r["structured_share"] is not None else None, ".1f") + "%",
                     f"{r['structured_macs']:,}", f"{r['dense_macs']:,}",
                     _fmt(r["structured_gmacs"], ".2f"), _fmt(r["dense_gmacs"], ".2f"),
                     _fmt(r["speedup_measured"], ".2f", "") + ("x" if r["speedup_measured"] else ""),
                     _fmt(r["speedup_theoretical"], ".2f", "") + ("x" if r["speedup_theoretical"] else ""),
                     _fmt(r["efficiency"], ".2f")])
    return head, body


def summary_lines(report: dict) -> list[str]:
    t = report["totals"]
    s, d = t["structured"], t["dense"]
    peak = report["peak"]
    lines = [
        f"{report['arch']} on {report['target']} ({report['device']}), input "
        f"{'x'.join(map(str, report['input_shape']))}, {report['threads']} thread(s), "
        f"{report['repeat']} interleaved runs",
        f"runtime: {report['runtime']}; profiler: {report['profiler']}",
        f"latency (profiler off, median): structured {s['latency_ms']['median']:.3f} ms, dense "
        f"{d['latency_ms']['median']:.3f} ms; speedup measured {report['speedup_measured']:.2f}x, "
        f"theoretical {_fmt(report['speedup_theoretical'], '.2f', 'n/a')}x, efficiency "
        f"{_fmt(report['efficiency'], '.2f', 'n/a')}",
        (f"profiled run (profiler on, mean of the {s['runs_kept']} fastest): structured "
         if report["device"] == "this host" else
         "whole run on the device (median) vs its PrimFunc calls timed one by one: structured ")
        + f"{s['profiled_ms']:.3f} ms = kernels {s['kernels_ms']:.3f} + outside kernels "
        f"{s['outside_ms']:.3f} ms (unmapped kernels {s['unmapped_ms']:.3f} ms); dense "
        f"{d['profiled_ms']:.3f} ms = {d['kernels_ms']:.3f} + {d['outside_ms']:.3f} ms "
        f"(unmapped {d['unmapped_ms']:.3f} ms)",
        f"MACs: structured {s['macs']:,}, dense {d['macs']:,}",
    ]
    if s.get("artifact_latency_ms"):
        lines.append(f"model.so itself (profiler off, median): {s['artifact_latency_ms']['median']:.3f} ms")
    if peak:
        lines.append(f"machine peak ({peak['label']}): {peak['gmacs']:.1f} GMAC/s, {peak['method']}")
    cpu = report["machine"].get("cpu", {})
    lines.append(f"machine: {cpu.get('model', '?')} ({cpu.get('machine', '?')}, {cpu.get('cores', '?')} "
                 f"cores, {' '.join(cpu.get('simd', []))}); onnxruntime {report['machine'].get('onnxruntime')}"
                 + (f", TVM {report['machine']['tvm']}" if report["machine"].get("tvm") else "")
                 + f", torch {report['machine'].get('torch')}")
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return lines


def render_markdown(report: dict) -> str:
    head, body = table_rows(report)
    out = [f"# Profile: {report['arch']} on {report['target']}", ""]
    out += [f"- {line}" for line in summary_lines(report)]
    out += ["", "## Per layer", "", "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    out += ["", f"`{UNMAPPED}`: kernels no source layer was found for; by operator: "
            + "; ".join(f"{w}: " + (", ".join(f"{op} {ms:.3f} ms" for op, ms in ops.items()) or "none")
                        for w, ops in report["mapping"]["unmapped_ms_by_op"].items()) + ".",
            f"`{OUTSIDE}`: {report['mapping']['outside']}.",
            "", f"Plots: {', '.join(FIGURES.values())} (in the HTML report).",
            f"Created {report['created']}; command: `{report['machine'].get('command', '')}`.", ""]
    return "\n".join(out)


def _plots(report: dict) -> dict[str, str]:
    """The three plots as base64 PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["layers"]
    names = [r["layer"] for r in rows]
    y = np.arange(len(rows))
    height = max(3.0, 0.28 * len(rows) + 1.2)
    figs = {}

    def png(fig) -> str:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=96)
        plt.close(fig)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    fig, ax = plt.subplots(figsize=(9, height))
    ax.barh(y - 0.2, [r["dense_ms"] for r in rows], 0.4, label="dense", color="#9aa5b1")
    ax.barh(y + 0.2, [r["structured_ms"] for r in rows], 0.4, label="structured", color="#2f6fb0")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per run (profiled)")
    ax.set_title(FIGURES["fig-time"])
    ax.legend()
    figs["fig-time"] = png(fig)

    layer_rows = [r for r in rows if r["kind"] == "layer"]
    ly = np.arange(len(layer_rows))
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.28 * len(layer_rows) + 1.2)))
    ax.barh(ly - 0.2, [r["speedup_theoretical"] or 0 for r in layer_rows], 0.4,
            label="theoretical (dense MACs / structured MACs)", color="#f0b44c")
    ax.barh(ly + 0.2, [r["speedup_measured"] or 0 for r in layer_rows], 0.4,
            label="measured (dense ms / structured ms)", color="#2f6fb0")
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.set_yticks(ly, [r["layer"] for r in layer_rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over the dense counterpart (x)")
    ax.set_title(FIGURES["fig-speedup"])
    ax.legend(fontsize=8)
    figs["fig-speedup"] = png(fig)

    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.28 * len(layer_rows) + 1.2)))
    ax.barh(ly - 0.2, [r["dense_gmacs"] or 0 for r in layer_rows], 0.4, label="dense", color="#9aa5b1")
    ax.barh(ly + 0.2, [r["structured_gmacs"] or 0 for r in layer_rows], 0.4, label="structured",
            color="#2f6fb0")
    peak = report.get("peak")
    if peak:
        ax.axvline(peak["gmacs"], color="#c0392b", lw=1.5,
                   label=f"machine peak, measured: {peak['gmacs']:.1f} GMAC/s")
    ax.set_yticks(ly, [r["layer"] for r in layer_rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("achieved GMAC/s (layer MACs / layer time)")
    ax.set_title(FIGURES["fig-throughput"])
    ax.legend(fontsize=8)
    figs["fig-throughput"] = png(fig)
    return figs


_CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #d0d7de;padding:3px 7px;text-align:right}td:first-child,th:first-child{text-align:left}
tr.unmapped td,tr.outside td{color:#6a737d;font-style:italic}figure{margin:18px 0}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#444}
ul.summary li{margin:3px 0;font-size:13px}code{background:#f3f4f6;padding:1px 3px}"""

_SCRIPT = """window.addEventListener('load', function () {
  var ok = 0;
  document.querySelectorAll('figure img').forEach(function (img) {
    img.setAttribute('data-natural-width', String(img.naturalWidth));
    if (img.complete && img.naturalWidth > 0) ok += 1;
  });
  document.body.setAttribute('data-plots-decoded', String(ok));
});"""


def render_html(report: dict) -> str:
    """A self-contained page: summary, the three plots (inline PNG), the per-layer table."""
    esc = html.escape
    head, body = table_rows(report)
    figs = _plots(report)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>structexport profile: {esc(report['arch'])} on {esc(report['target'])}</title>",
             f"<style>{_CSS}</style></head>",
             f'<body data-plots="{len(figs)}">',
             f"<h1>Profile: {esc(report['arch'])} on {esc(report['target'])}</h1>",
             '<ul class="summary">' + "".join(f"<li>{esc(line)}</li>" for line in summary_lines(report))
             + "</ul>"]
    for fig_id, caption in FIGURES.items():
        parts.append(f'<figure id="{fig_id}"><img alt="{esc(caption)}" '
                     f'src="data:image/png;base64,{figs[fig_id]}"><figcaption>{esc(caption)}'
                     "</figcaption></figure>")
    parts.append("<h2>Per layer</h2><table><thead><tr>"
                 + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>")
    for r, cells in zip(report["layers"], body):
        ops = "; ".join(f"{w}: " + ", ".join(f"{op} {ms:.3f} ms" for op, ms in r.get(f"{w}_ops", {}).items())
                        for w in ("structured", "dense"))
        parts.append(f'<tr class="{r["kind"]}" title="{esc(ops)}">'
                     + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    parts.append("</tbody></table>")
    unm = report["mapping"]["unmapped_ms_by_op"]
    parts.append(f"<p><code>{esc(UNMAPPED)}</code>: kernels no source layer was found for: "
                 + esc("; ".join(f"{w}: " + (", ".join(f"{op} {ms:.3f} ms" for op, ms in ops.items())
                                               or "none") for w, ops in unm.items()))
                 + f". <code>{esc(OUTSIDE)}</code>: {esc(report['mapping']['outside'])}. "
                 f"Mapping: {esc(report['mapping']['rule'])}.</p>")
    parts.append(f"<p>Created {esc(report['created'])}; command: <code>"
                 f"{esc(report['machine'].get('command', ''))}</code>. Schema {esc(report['schema'])}.</p>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def write_reports(report: dict, html_path: str | Path) -> dict[str, Path]:
    """Write ``html_path`` and, beside it, the same name with ``.md`` and ``.json``."""
    html_path = Path(html_path)
    if html_path.suffix.lower() not in (".html", ".htm"):
        html_path = html_path.with_name(html_path.name + ".html")
    try:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        paths = {"html": html_path, "markdown": html_path.with_suffix(".md"),
                 "json": html_path.with_suffix(".json")}
        paths["html"].write_text(render_html(report), encoding="utf-8")
        paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
        paths["json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot write the report at {html_path}: {exc.strerror or exc}",
                           "pass -o with a writable path") from None
    return paths
