"""TVM on this host: the lowered program with weights as named inputs (:func:`tvm_program`)
and its PrimFunc calls timed by the Relax VM's instrument hook (:func:`measure_tvm`).

A tuned package (``convert --tune`` / ``--tune-trials``) is profiled otherwise: its
MetaSchedule records are keyed by the workloads of a build whose weights are bound
constants (marked layout-free, so that schedules may read them pre-packed), and a build
with weights as inputs has other workloads that none of them match: it would run untuned
kernels. :func:`tuned_program` compiles as model.so was compiled -- weights bound, the
tuning pipeline, the package's database applied -- and recognizes each constant a call
reads by its values (a weight pre-packed or transposed holds the same values in another
order); :func:`measure_tvm` then times model.so itself, its calls mapped one to one to
that build's (the same PrimFuncs in the same order, checked on every run)."""
from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from structexport.profiling.layermap import tvm_owner
from structexport.profiling.options import ProfileError, ProfileOptions
from structexport.profiling.runs import keep_fastest
from structexport.timing import stats
from structexport.tvm_fused import POOL


def tvm_modules():
    """``(tvm, tvm.relax)``, or a clear error where TVM is missing or broken."""
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


def tvm_program(onnx_path: Path, tvm_target: dict | None = None, fuse: bool = False, plan=None) -> dict:
    """Compile ``onnx_path`` for the host with weights as named inputs; return the VM
    executable, the weights (in ``main``'s order) and the PrimFunc calls of the lowered
    ``main`` in execution order, each with the weights it reads and its data inputs/outputs.

    ``fuse``: ``onnx_path`` is a composed graph and its structured convs become the fused
    operator (:func:`structexport.tvm_fused.fuse_structured_convs`), as model.so's were;
    each ``structured_sum_pool`` call is listed as reading the weight of the conv it
    replaced (its small conv reads a constant), so that it maps to that layer. ``plan``: the
    package's structure plan, which says what is fused (None: an older package, whose
    structure is discovered in the kernels, as its build did)."""
    import onnx
    tvm, relax = tvm_modules()
    from tvm.relax.frontend.onnx import from_onnx

    from structexport.targets.tvm_targets import TvmError, quiet_native_stderr
    target = tvm.target.Target(tvm_target or {"kind": "llvm"})
    fused_weights: list[str] = []
    try:
        with quiet_native_stderr():
            graph = onnx.load(str(onnx_path))
            mod = from_onnx(graph, keep_params_in_input=True)
            mod, params = relax.frontend.detach_params(mod)
            if fuse:
                from structexport.tvm_fused import fuse_structured_convs
                names_in = [_var_name(p) for p in mod["main"].params]
                values = {n: w.numpy() for n, w in zip(names_in[1:], params.get("main", []))}
                mod, records = fuse_structured_convs(mod, target=target, weights=values,
                                                     plan=_kernel_plans(plan, graph))
                fused_weights = [r["weight_param"] for r in records if r.get("fused")]
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

    def weight_of(arg) -> str | None:
        name = _var_name(arg)
        return name if name in weight_names else None
    calls = _walk_calls(lowered, onnx_path, weight_of, fused_weights if fuse else None)
    return {"executable": executable, "weights": weights, "input": names[0], "calls": calls,
            "device": tvm.cpu(0), "target": target, "lowered": lowered,
            "fused_convs": len(fused_weights)}


def _kernel_plans(plan, graph):
    """The structure plan by kernel value for ``graph``'s weights (None without a plan)."""
    if plan is None:
        return None
    from structexport.structure_plan import onnx_weights
    return plan.by_kernel(onnx_weights(graph))


def _walk_calls(lowered, onnx_path: Path, weight_of, fused_weights: list | None) -> list[dict]:
    """The PrimFunc calls of ``lowered``'s ``main`` in execution order, each with the weights
    it reads (``weight_of(arg)``: a weight's ONNX name, else None), its data inputs and
    outputs. A call that reads only weights (a weight transposed or reshaped at run time)
    passes the weight on to its output. ``fused_weights``: the weights of the fused
    structured convs in order, one per ``structured_sum_pool`` call (None: not fused).

    A fused conv's small conv reads coefficients the fusion made, which are no ONNX weight:
    it is listed as reading its pool's weight (the pool passing it on, ``alias``). Without
    that it would be placed by its inputs, and where a residual add is fused into it, the
    shortcut's 1x1 conv, run just before, took its time (ResNet-18's stride-2 blocks)."""
    tvm, relax = tvm_modules()
    from structexport.targets.tvm_targets import TvmError
    main = lowered["main"]
    prim = {gv.name_hint for gv, f in lowered.functions.items() if type(f).__name__ == "PrimFunc"}
    alias: dict[str, tuple[str, str]] = {}   # var -> ("w", weight) or ("d", the var it views)
    allocated: set[str] = set()
    written: set[str] = set()
    calls = []
    pools = 0
    pooled: dict[str, str] = {}   # a fused pool's output -> the weight of the conv it pools for
    for block in main.body.blocks:
        for b in block.bindings:
            v, var = b.value, _var_name(b.var)
            if not isinstance(v, relax.Call):
                continue
            op = v.op
            args = []
            for a in v.args:
                weight = weight_of(a)
                if weight is not None:
                    args.append(("w", weight))
                elif (name := _var_name(a)):
                    args.append(alias.get(name, ("d", name)))
            if isinstance(op, tvm.ir.GlobalVar) and op.name_hint in prim:
                outs = [n for k, n in args if k == "d" and n in allocated and n not in written]
                written.update(outs)
                reads = [n for k, n in args if k == "w"]
                data = [n for k, n in args if k == "d" and n not in outs]
                if reads and not data:  # a weight transposed or reshaped: still that weight
                    alias.update({o: ("w", reads[0]) for o in outs})
                passes_on = False
                if fused_weights is not None and op.name_hint.startswith(POOL) and pools < len(fused_weights):
                    found = fused_weights[pools]
                    reads, pools = ([found] if found else []), pools + 1   # the layer it pools for
                    if found:
                        pooled.update({o: found for o in outs})
                        passes_on = True
                elif not reads and (fed := next((pooled[n] for n in data if n in pooled), None)):
                    reads = [fed]   # the fused small conv: its pool's layer
                call = {"symbol": op.name_hint, "weights": reads, "inputs": data,
                        "outputs": outs, "arg_specs": [_arg_spec(a) for a in v.args]}
                if passes_on:
                    call["alias"] = True   # one layer's weight, read once (by its small conv)
                calls.append(call)
            elif isinstance(op, tvm.ir.Op) and op.name == "relax.vm.alloc_tensor":
                allocated.add(var)
            elif isinstance(op, relax.ExternFunc) and args:
                alias[var] = args[0]   # vm.builtin.reshape & co: a view of their first input
    if fused_weights is not None and pools != len(fused_weights):
        raise TvmError(f"the lowered program of {onnx_path.name} calls the sum-pool kernel "
                       f"{pools} times for {len(fused_weights)} fused convs",
                       "report this with the model: its calls cannot be mapped to layers")
    return calls


# ---------------------------------------------------------------------- tuned libraries

def tuned_database(package) -> Path | None:
    """The MetaSchedule database folder a tuned package's library was compiled with
    (``manifest.json`` ``target_build.tuning.database``), when it is on this machine; None
    for an untuned package or a database that is not here."""
    tuning = getattr(package, "tuning", None) if package is not None else None
    if not tuning or not tuning.get("database"):
        return None
    folder = Path(tuning["database"]).expanduser()
    if (folder / "workloads.json").is_file() and (folder / "records.json").is_file():
        return folder
    return None


def _fingerprint(array) -> tuple:
    """A tensor's values regardless of their order: a weight pre-packed by a tuned schedule
    (layout rewrite), transposed or reshaped at compile time keeps it."""
    import numpy as np
    flat = np.ascontiguousarray(np.asarray(array)).ravel()
    return str(flat.dtype), flat.size, hashlib.sha1(np.sort(flat).tobytes()).hexdigest()


def _weights_by_value(model) -> dict[tuple, str]:
    """ONNX initializers by :func:`_fingerprint`; values that several initializers hold
    (zero biases, a shared constant) name none of them, as a weight read by several calls
    names no layer (:func:`~structexport.profiling.layermap.call_layers`)."""
    from onnx import numpy_helper
    found: dict[tuple, list[str]] = {}
    for init in model.graph.initializer:
        found.setdefault(_fingerprint(numpy_helper.to_array(init)), []).append(init.name)
    return {fp: names[0] for fp, names in found.items() if len(names) == 1}


def _conv_weights(mod, weight_of) -> list[str | None]:
    """The weight of each ``relax.nn.conv2d`` of ``mod``'s Relax functions, in the order
    :func:`~structexport.tvm_fused.fuse_structured_convs` records them."""
    tvm, relax = tvm_modules()
    out: list[str | None] = []
    for _gv, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        bound = {}
        for block in func.body.blocks:
            for b in block.bindings:
                if hasattr(b, "value"):
                    bound[b.var] = b.value

        def visit(expr):
            if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == "relax.nn.conv2d":
                w, hops = expr.args[1], 0
                while isinstance(w, relax.Var) and w in bound and hops < 8:
                    w, hops = bound[w], hops + 1
                out.append(weight_of(w))
        relax.analysis.post_order_visit(func, visit)
    return out


def tuned_program(onnx_path: Path, tvm_target: dict | None, database: Path, fuse: bool = False,
                  plan=None) -> dict:
    """Compile ``onnx_path`` as a tuned model.so was compiled (``targets/tvm_targets.py``,
    :func:`structexport.tuning.tune_and_compile`): weights bound as constants, structured
    convs fused (``fuse``, as the structure ``plan`` says), the tuning pipeline (:func:`structexport.tuning.tunable_tasks`),
    the records of ``database`` applied, pre-packed weights split off and folded, the
    default pipeline. The database is read from a copy: profiling writes nothing to it.

    Returns what :func:`tvm_program` returns (no weight inputs: ``weights`` is empty), each
    call's weights recognized among the ONNX initializers by their values
    (:func:`_fingerprint`), and ``tuning``: the tasks and how many have a record."""
    import onnx
    tvm, relax = tvm_modules()
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.s_tir import meta_schedule as ms

    from structexport.targets.tvm_targets import TvmError, quiet_native_stderr
    from structexport.tuning import preload_tvm_tensor_intrinsics, tunable_tasks, weight_prepack
    target = tvm.target.Target(tvm_target or {"kind": "llvm"})
    model = onnx.load(str(onnx_path))
    by_value = _weights_by_value(model)

    def weight_of(arg) -> str | None:
        if isinstance(arg, tvm.ir.expr.Constant) and isinstance(getattr(arg, "value", None), tvm.runtime.Tensor):
            return by_value.get(_fingerprint(arg.value.numpy()))
        return None
    fused_weights: list[str | None] = []
    with tempfile.TemporaryDirectory(prefix="structexport-profile-db-") as tmp:
        try:
            for name in ("workloads.json", "records.json"):
                shutil.copyfile(database / name, Path(tmp) / name)
            with quiet_native_stderr():
                db = ms.database.JSONDatabase(path_workload=str(Path(tmp) / "workloads.json"),
                                              path_tuning_record=str(Path(tmp) / "records.json"),
                                              allow_missing=False)
                mod = from_onnx(model, keep_params_in_input=False)
                if fuse:
                    from structexport.tvm_fused import fuse_structured_convs
                    convs = _conv_weights(mod, weight_of)
                    mod, records = fuse_structured_convs(   # as the target's build does
                        mod, target=target, plan=_kernel_plans(plan, model))
                    if len(records) != len(convs):
                        raise TvmError(f"{onnx_path.name} has {len(convs)} convs and the fusion "
                                       f"recorded {len(records)}", "report this with the model")
                    fused_weights = [w for w, r in zip(convs, records) if r.get("fused")]
                preload_tvm_tensor_intrinsics()
                prepack = weight_prepack(target)
                mod, tasks = tunable_tasks(mod, target, prepack)
                scheduled = [t.task_name for t in tasks
                             if db.query_tuning_record(t.dispatched[0], target, t.task_name) is not None]
                with target, db:   # as structexport.tuning.compile_with_database
                    mod = relax.transform.MetaScheduleApplyDatabase()(mod)
                if prepack:
                    mod = tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(),
                                                    relax.transform.FoldConstant()])(mod)
                with target:
                    lowered = relax.get_pipeline("default")(mod)
                executable = relax.build(lowered, target=target, relax_pipeline=None)
        except TvmError:
            raise
        except Exception as exc:
            raise TvmError(f"TVM could not compile {onnx_path.name} with the tuning database "
                           f"{database} for profiling: {type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    main = lowered["main"]
    calls = _walk_calls(lowered, onnx_path, weight_of, fused_weights if fuse else None)
    return {"executable": executable, "weights": [], "input": _var_name(main.params[0]), "calls": calls,
            "device": tvm.cpu(0), "target": target, "lowered": lowered,
            "fused_convs": len(fused_weights),
            "tuning": {"database": str(database), "tasks": len(tasks), "scheduled": len(scheduled),
                       "prepacked": sum(c["symbol"].endswith("_prepacked") for c in calls)}}


def _first_difference(a: list, b: list) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _library_calls(vm, args, prims: set) -> list[str]:
    """The calls one run of ``vm`` makes, in order, but the VM's builtins (``vm.*``) other
    than ``prims`` (on a VM of its own: the instrument stays on it)."""
    seen: list[str] = []

    def instrument(func, symbol, before, ret, *a):
        if before and (symbol in prims or not symbol.startswith("vm.")):
            seen.append(symbol)
        return 0
    vm.set_instrument(instrument)
    vm["main"](*args)
    return seen


def _arg_spec(arg) -> tuple | None:
    """(shape, dtype) of a static tensor argument, None for anything else."""
    info = getattr(arg, "ty", None) or getattr(arg, "struct_info", None)  # TVM 0.27: ty
    shape = getattr(info, "shape", None)
    values = getattr(shape, "values", None)
    try:
        return tuple(int(v) for v in values), str(info.dtype)
    except (TypeError, ValueError, AttributeError):
        return None


def measure_tvm(structured: Path, dense: Path, feed, opts: ProfileOptions, say,
                tvm_target: dict | None = None, artifact: Path | None = None,
                fuse: bool = False, package=None) -> dict:
    """``artifact``: the OUTDIR's model.so, timed beside the two profiled builds. ``fuse``:
    ``structured`` is the package's composed graph, compiled with the fused structured
    operator as model.so was (:func:`tvm_program`). Every build timed is checked against
    ``package``'s stored outputs first.

    A tuned model.so whose database is on this machine (:func:`tuned_database`) is profiled
    itself: both models are compiled as it was, with that database (:func:`tuned_program`;
    the dense one's tasks have records where ``bench`` tuned its dense counterpart), and
    model.so's calls, checked equal to its rebuild's, take the rebuild's weights. Otherwise
    (untuned) the builds have weights as named inputs (:func:`tvm_program`) and model.so
    is only timed. ``measured["tuning"]`` says what was applied (None: untuned builds)."""
    tvm, relax = tvm_modules()
    from structexport.targets.tvm_targets import quiet_native_stderr
    try:  # TVM's own thread pool, as ONNX Runtime's intra-op threads
        tvm.get_global_func("runtime.config_threadpool")(1, opts.threads)
    except Exception:  # an older or trimmed runtime: its default pool
        pass
    plan = package.structure_plan if fuse and package is not None else None
    has_library = artifact is not None and artifact.is_file()
    database = tuned_database(package) if has_library else None
    if database is not None:
        say(f"compile as model.so was (weights bound, the tuning database {database} applied), "
            "to map its calls to layers")
        programs = {"structured": tuned_program(structured, tvm_target, database, fuse=fuse, plan=plan),
                    "dense": tuned_program(dense, tvm_target, database)}
    else:
        say("compile for TVM (weights as inputs, to map calls to layers)")
        programs = {"structured": tvm_program(structured, tvm_target, fuse=fuse, plan=plan),
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
    library_profiled = False
    library_calls: list[str] = []
    rebuilt_calls: list[str] = []
    if has_library:
        dev = programs["structured"]["device"]
        say(f"load {artifact} (native code: it runs in this process)")
        with quiet_native_stderr():
            library = tvm.runtime.load_module(str(artifact))
            timed["artifact"] = relax.VirtualMachine(library, dev)
        args["artifact"] = args["structured"][:1]
        if database is not None:
            rebuilt_calls = [c["symbol"] for c in programs["structured"]["calls"]]
            with quiet_native_stderr():
                library_calls = _library_calls(relax.VirtualMachine(library, dev), args["artifact"],
                                               set(rebuilt_calls))
            if library_calls == rebuilt_calls:   # profile model.so itself, mapped by its rebuild
                library_profiled = True
                vms["structured"] = timed["structured"] = timed.pop("artifact")
                args["structured"] = args.pop("artifact")
    if package is not None:
        from structexport.timedcheck import vm_runner
        dev = programs["structured"]["device"]
        for n, vm in timed.items():
            what = (f"{artifact} (native code) on this host"
                    if n == "artifact" or (n == "structured" and library_profiled)
                    else f"the {n} profiling build of {structured if n == 'structured' else dense}")
            say(f"check {what}")
            package.check_timed(vm_runner(tvm, vm, dev, args[n][1:]), what, "fp32" if n == "dense" else None)
    order = list(timed)
    say(f"timing ({opts.repeat} interleaved runs)")
    times = {n: [] for n in order}
    for i in range(opts.warmup + opts.repeat):
        for n in (order if i % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            timed[n]["main"](*args[n])
            if i >= opts.warmup:
                times[n].append(time.perf_counter() - start)
    latency = {n: stats(t) for n, t in times.items()}
    if library_profiled:   # the structured build profiled is model.so: one timing of it
        latency["artifact"] = latency["structured"]

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
    how = (f"structured convs fused ({programs['structured']['fused_convs']})" if fuse
           else "structured convs decomposed")
    tuning = None
    if database is not None:
        tuning = {"database": str(database), "library_profiled": library_profiled,
                  **{n: p["tuning"] for n, p in programs.items()}}
        st, de = programs["structured"]["tuning"], programs["dense"]["tuning"]
        what = ("model.so itself, its calls mapped to layers by a build compiled as it was"
                if library_profiled else
                f"a build compiled as model.so was (model.so made other calls: "
                f"{len(library_calls)} against the build's {len(programs['structured']['calls'])}, "
                f"first different #{_first_difference(library_calls, rebuilt_calls)}; the database "
                "changed since, or another structexport built it)")
        runtime = (f"Apache TVM {tvm.__version__} Relax VM, target {json.dumps(tvm_target or {'kind': 'llvm'})}; "
                   f"structured: {what} ({how}, weights bound as constants, MetaSchedule database "
                   f"{database} applied: {st['scheduled']} of {st['tasks']} tasks scheduled from "
                   f"it); dense: compiled the same way with the same database ({de['scheduled']} "
                   f"of {de['tasks']} tasks scheduled from it)")
        profiler = ("Relax VM instrument hook around every PrimFunc call; the weights each call "
                    "reads recognized among the ONNX initializers by their values")
    else:
        runtime = (f"Apache TVM {tvm.__version__} Relax VM, target "
                   f"{json.dumps(tvm_target or {'kind': 'llvm'})} (untuned, default pipeline, {how})")
        profiler = ("Relax VM instrument hook around every PrimFunc call; lowered main walked "
                    "for the weights each call reads")
    result = {"runtime": runtime, "profiler": profiler, "latency": latency, "models": {},
              "tuning": tuning}
    for n, p in programs.items():
        expected = [c["symbol"] for c in p["calls"]]
        for _wall, calls in records[n]:
            if [s for s, _ in calls] != expected:
                raise ProfileError(f"the TVM VM ran other PrimFunc calls than the lowered program "
                                   f"of the {n} model lists ({len(calls)} vs {len(expected)})",
                                   "report this with the model: calls cannot be mapped to layers")
        kept = keep_fastest(records[n], lambda r: r[0])
        ms = [sum(run[1][k][1] for run in kept) * 1e3 / len(kept) for k in range(len(expected))]
        result["models"][n] = {
            "onnx": structured if n == "structured" else dense,
            "calls": [{"name": f"{c['symbol']}#{k}", "op": c["symbol"], "ms": ms[k],
                       "weights": c["weights"]} for k, c in enumerate(p["calls"])],
            "profiled_ms": statistics.fmean(w for w, _ in kept) * 1e3, "runs_kept": len(kept),
            "mapper": lambda layers, p=p: tvm_owner(p["calls"], layers)}
    return result

