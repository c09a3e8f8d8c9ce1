"""TVM on a device reached through RPC: each PrimFunc call timed on its own there."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from structexport.profiling.layermap import tvm_owner
from structexport.profiling.options import ProfileError, ProfileOptions
from structexport.profiling.tvm_host import tvm_modules, tvm_program
from structexport.timing import stats


def profile_remote(structured: Path, dense: Path, feed, opts: ProfileOptions, say, spec,
                   target_name: str, tvm_target: dict | None, work: Path,
                   fuse: bool = False, package=None) -> dict:
    """Both models on a device reached through TVM's RPC (``--rpc HOST:PORT`` or
    ``--tracker HOST:PORT --key KEY``, parsed by ``structexport.rpc``), in one session.

    The VM's instrument hook is a host-side Python callback and does not cross RPC, so each
    PrimFunc call of the lowered program (:func:`.tvm_host.tvm_program`) is timed on its own
    on the device (``time_evaluator`` of a library of the PrimFuncs alone, on arguments of
    the call's shapes), and whole runs with the VM's ``time_evaluator`` (weights as inputs),
    interleaved. Returns the ``measured`` dict of :func:`.tvm_host.measure_tvm`."""
    tvm, relax = tvm_modules()
    from structexport.rpc import device_errors, open_session, set_threads
    from structexport.targets import get_target
    from structexport.targets.tvm_targets import quiet_native_stderr
    target = get_target(target_name, {"tvm_target": tvm_target} if tvm_target else {})
    say(f"compile for TVM ({target_name}, weights as inputs, to map calls to layers)")
    plan = package.structure_plan if fuse and package is not None else None
    programs = {"structured": tvm_program(structured, target.tvm_target(), fuse=fuse, plan=plan),
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
        if package is not None:
            from structexport.timedcheck import vm_runner
            for n in vms:
                what = f"the {n} profiling build on the {spec.describe()}"
                say(f"check {what}")
                package.check_timed(vm_runner(tvm, vms[n], dev, args[n][1:]), what,
                                    "fp32" if n == "dense" else None)
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
                         "mapper": lambda layers, p=p: tvm_owner(p["calls"], layers)}
    return {"runtime": f"Apache TVM {tvm.__version__} Relax VM on the {spec.describe()}, target "
                       f"{json.dumps(target.tvm_target())} (untuned, default pipeline)",
            "profiler": f"each PrimFunc call timed on its own on the device ({number} runs "
                        "each); whole runs by the VM's time_evaluator",
            "latency": latency, "models": models}

