"""TVM on this host: the lowered program with weights as named inputs (:func:`tvm_program`)
and its PrimFunc calls timed by the Relax VM's instrument hook (:func:`measure_tvm`)."""
from __future__ import annotations

import json
import statistics
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


def tvm_program(onnx_path: Path, tvm_target: dict | None = None, fuse: bool = False) -> dict:
    """Compile ``onnx_path`` for the host with weights as named inputs; return the VM
    executable, the weights (in ``main``'s order) and the PrimFunc calls of the lowered
    ``main`` in execution order, each with the weights it reads and its data inputs/outputs.

    ``fuse``: ``onnx_path`` is a composed graph and its structured convs become the fused
    operator (:func:`structexport.tvm_fused.fuse_structured_convs`), as model.so's were;
    each ``structured_sum_pool`` call is listed as reading the weight of the conv it
    replaced (its small conv reads a constant), so that it maps to that layer."""
    import onnx
    tvm, relax = tvm_modules()
    from tvm.relax.frontend.onnx import from_onnx

    from structexport.targets.tvm_targets import TvmError, quiet_native_stderr
    target = tvm.target.Target(tvm_target or {"kind": "llvm"})
    fused_weights: list[str] = []
    try:
        with quiet_native_stderr():
            mod = from_onnx(onnx.load(str(onnx_path)), keep_params_in_input=True)
            mod, params = relax.frontend.detach_params(mod)
            if fuse:
                from structexport.tvm_fused import fuse_structured_convs
                names_in = [_var_name(p) for p in mod["main"].params]
                values = {n: w.numpy() for n, w in zip(names_in[1:], params.get("main", []))}
                mod, records = fuse_structured_convs(mod, target=target, weights=values)
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
    prim = {gv.name_hint for gv, f in lowered.functions.items() if type(f).__name__ == "PrimFunc"}
    alias: dict[str, str] = {}
    allocated: set[str] = set()
    written: set[str] = set()
    calls = []
    pools = 0
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
                if fuse and op.name_hint.startswith(POOL) and pools < len(fused_weights):
                    reads, pools = [fused_weights[pools]], pools + 1   # the layer it pools for
                calls.append({"symbol": op.name_hint, "weights": reads, "inputs": data,
                              "outputs": outs, "arg_specs": [_arg_spec(a) for a in v.args]})
            elif isinstance(op, tvm.ir.Op) and op.name == "relax.vm.alloc_tensor":
                allocated.add(var)
            elif isinstance(op, relax.ExternFunc) and args:
                alias[var] = args[0]   # vm.builtin.reshape & co: a view of their first input
    if fuse and pools != len(fused_weights):
        raise TvmError(f"the lowered program of {onnx_path.name} calls the sum-pool kernel "
                       f"{pools} times for {len(fused_weights)} fused convs",
                       "report this with the model: its calls cannot be mapped to layers")
    return {"executable": executable, "weights": weights, "input": names[0], "calls": calls,
            "device": tvm.cpu(0), "target": target, "lowered": lowered,
            "fused_convs": len(fused_weights)}


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
    """``artifact``: the OUTDIR's model.so, timed beside the two profiled builds (it is not
    profiled itself: its weights are baked-in constants, without names). ``fuse``:
    ``structured`` is the package's composed graph, compiled with the fused structured
    operator as model.so was (:func:`tvm_program`). Every build timed is checked against
    ``package``'s stored outputs first."""
    tvm, relax = tvm_modules()
    from structexport.targets.tvm_targets import quiet_native_stderr
    try:  # TVM's own thread pool, as ONNX Runtime's intra-op threads
        tvm.get_global_func("runtime.config_threadpool")(1, opts.threads)
    except Exception:  # an older or trimmed runtime: its default pool
        pass
    say("compile for TVM (weights as inputs, to map calls to layers)")
    programs = {"structured": tvm_program(structured, tvm_target, fuse=fuse),
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
        say(f"load {artifact} (native code: it runs in this process)")
        with quiet_native_stderr():
            timed["artifact"] = relax.VirtualMachine(tvm.runtime.load_module(str(artifact)), dev)
        args["artifact"] = args["structured"][:1]
    if package is not None:
        from structexport.timedcheck import vm_runner
        dev = programs["structured"]["device"]
        for n, vm in timed.items():
            what = (f"{artifact} (native code) on this host" if n == "artifact"
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
    result = {"runtime": f"Apache TVM {tvm.__version__} Relax VM, target "
                         f"{json.dumps(tvm_target or {'kind': 'llvm'})} (untuned, default "
                         f"pipeline, {how})",
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
        kept = keep_fastest(records[n], lambda r: r[0])
        ms = [sum(run[1][k][1] for run in kept) * 1e3 / len(kept) for k in range(len(expected))]
        result["models"][n] = {
            "onnx": structured if n == "structured" else dense,
            "calls": [{"name": f"{c['symbol']}#{k}", "op": c["symbol"], "ms": ms[k],
                       "weights": c["weights"]} for k, c in enumerate(p["calls"])],
            "profiled_ms": statistics.fmean(w for w, _ in kept) * 1e3, "runs_kept": len(kept),
            "mapper": lambda layers, p=p: tvm_owner(p["calls"], layers)}
    return result

