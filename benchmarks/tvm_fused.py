"""The fused structured-conv operator for TVM against what the TVM targets build today.

    TVM_NUM_THREADS=1 .venv/bin/python benchmarks/tvm_fused.py [--trials 16] [--repeat 15]
        [--zoo resnet20-struct-c2n2] [--zoo-trials 0] [--tuning-db DIR]

For each workload -- one layer, 64@56x56 at C/2x2x2 (3x3, stride 1, pad 1, with a bias as a
folded batch norm leaves it), and optionally a zoo model -- three TVM builds of the same
network, all for this host's CPU (``mcpu`` named: without it TVM emits no AVX):

* ``dense``: the dense counterpart (composed kernels, batch norm folded), plain conv2d;
* ``decomposed``: the graph the TVM targets import today, after the default torch passes
  (decompose_structured, realize_sumpool, fold_batchnorm): the sum-pool in the realization
  the cost model picks (e.g. ``banded``: a 0/1 1x1 conv and a depthwise box conv) and the
  small conv, each its own kernel; ``decomposed-cumsum`` the same with the sum-pool forced
  to CumSum / Slice / Sub chains;
* ``fused``: the dense graph rewritten by ``structexport.tvm_fused.fuse_structured_convs``
  (one scheduled sum-pool kernel + the small conv2d).

each untuned and tuned with MetaSchedule (``--trials`` per task, records cached in
``--tuning-db`` so a rerun measures only). All builds are checked against the torch model
(float32; the largest error relative to the output's scale), then timed interleaved in one
process, one thread, batch 1, medians. ONNX Runtime (1 thread) on the dense and decomposed
ONNX files is timed in the same loop as a yardstick. All TVM builds share one tuning
database, so a workload two of them have (the small conv) is tuned once. Prints one JSON document.
"""
from __future__ import annotations

import os

os.environ.setdefault("TVM_NUM_THREADS", "1")   # before TVM starts its thread pool

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from structexport.machine import machine
from structexport.timing import time_interleaved


def layer_model() -> nn.Module:
    from structexport.layers import StructuredConv2d
    torch.manual_seed(0)
    conv = StructuredConv2d(64, 64, 3, 32, 2, stride=1, padding=1, bias=True)
    with torch.no_grad():
        conv.bias.normal_()
    return nn.Sequential(conv).eval()


def onnx_files(model: nn.Module, example: torch.Tensor, folder: Path, name: str) -> dict:
    """The dense ONNX file of ``model`` and its decomposed ones as the tvm-llvm target makes
    them: with the sum-pool realization its cost model picks, and forced to ``cumsum``."""
    from structexport.passes import PassContext, PassManager, select_passes
    from structexport.targets.tvm_targets import TvmLlvmTarget

    from structexport.export import export_onnx
    from structexport.reference import export_reference
    passes = TvmLlvmTarget().default_passes()
    dense = folder / f"{name}-dense.onnx"
    export_reference(model, example, name, passes, "tvm-llvm", dense)
    out = {"dense": dense, "passes": passes}
    for kind, options in (("decomposed", {}), ("decomposed-cumsum", {"sumpool_realization": "cumsum"})):
        manager = PassManager(select_passes(passes), check_inputs=example)
        decomposed_model, runs = manager.run(model, PassContext("tvm-llvm", tuple(example.shape), options))
        path = folder / f"{name}-{kind}.onnx"
        info = export_onnx(decomposed_model, example, path)
        out[kind] = path
        out[f"{kind} graph"] = {"sumpool_realizations": sorted(
            {str(rec.details["realization"]) for run in runs for rec in run.records
             if rec.details.get("realization")}), "onnx_ops": info.get("ops")}
    return out


def build(mod, target: dict, trials: int, db_dir: Path | None):
    """(executable, tuning info): untuned ``tvm.compile``, or tuned with the cached database."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from structexport.tvm_fused import tune
    if trials <= 0:
        return tvm.compile(mod, target=tvm.target.Target(target)), None
    db_dir.mkdir(parents=True, exist_ok=True)
    db = ms.database.JSONDatabase(path_workload=str(db_dir / "workloads.json"),
                                  path_tuning_record=str(db_dir / "records.json"), allow_missing=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tvm-fused-bench-") as work:
        executable, db, tasks, tuned = tune(mod, target, trials, work, database=db, skip_known=True)
    return executable, {"tasks": [t.task_name for t in tasks], "tuned_now": tuned,
                        "seconds": round(time.perf_counter() - start, 1)}


def pool_kernels_ms(fused_mod, target: dict, repeat: int) -> dict:
    """The fused model's sum-pool kernels timed alone (compiled from the module's own
    PrimFuncs, random input): ms per call of each, and the sum over all calls in ``main``."""
    import tvm
    from tvm import relax

    from structexport.tvm_fused import POOL
    counts: dict[str, int] = {}

    def visit(expr):
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == "relax.call_tir":
            callee = expr.args[0].name_hint
            if callee.startswith(POOL):
                counts[callee] = counts.get(callee, 0) + 1
    relax.analysis.post_order_visit(fused_mod["main"], visit)
    rng = np.random.default_rng(0)
    per_call = {}
    for callee in counts:
        func = fused_mod[fused_mod.get_global_var(callee)].with_attr("global_symbol", "main")
        lib = tvm.compile(tvm.IRModule({"main": func}), target=tvm.target.Target(target))
        args = [tvm.runtime.tensor(rng.standard_normal(tuple(int(d) for d in p.shape)).astype(str(p.dtype)))
                for p in func.params]
        ev = lib.mod.time_evaluator("main", tvm.cpu(), number=20, repeat=repeat)
        per_call[callee] = round(float(np.median(ev(*args).results)) * 1e3, 4)
    return {"per_call_ms": per_call, "calls": counts,
            "total_ms": round(sum(per_call[k] * counts[k] for k in counts), 4)}


def bench(name: str, model: nn.Module, shape, trials_list, repeat: int, db_root: Path, target: dict,
          folder: Path) -> dict:
    import onnx
    import onnxruntime as ort
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from structexport.tvm_fused import fuse_structured_convs
    example = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(example).double().numpy()
    files = onnx_files(model, example, folder, name)
    t0 = time.perf_counter()
    dense_mod = from_onnx(onnx.load(str(files["dense"])), keep_params_in_input=False)
    fused_mod, records = fuse_structured_convs(dense_mod)
    rewrite_s = time.perf_counter() - t0
    mods = {"dense": dense_mod, "fused": fused_mod}
    for kind in ("decomposed", "decomposed-cumsum"):
        mods[kind] = from_onnx(onnx.load(str(files[kind])), keep_params_in_input=False)
    feed = example.numpy()
    x = tvm.runtime.tensor(feed)
    dev = tvm.cpu()
    scale = float(np.abs(expected).max())
    workloads, builds = {}, {}
    for trials in trials_list:
        for kind, mod in mods.items():
            key = f"tvm {kind} {'untuned' if trials <= 0 else f'tuned {trials}/task'}"
            # One database for all builds: a workload they share (the small conv of the
            # decomposed graphs and of the fused one) is tuned once and gets one schedule.
            executable, tuning = build(mod, target, trials, db_root)
            vm = relax.VirtualMachine(executable, dev)
            got = vm["main"](x).numpy()
            err = float(np.abs(got - expected).max()) / scale
            builds[key] = {"rel_error_vs_torch": err, "tuning": tuning}
            once = vm.time_evaluator("main", dev, number=1, repeat=1)(x).mean
            number = max(1, int(0.02 / max(once, 1e-6)))     # ~20 ms per timed sample
            evaluator = vm.time_evaluator("main", dev, number=number, repeat=1)
            workloads[key] = (lambda ev=evaluator: ev(x).mean)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1
    for kind in ("dense", "decomposed", "decomposed-cumsum"):
        sess = ort.InferenceSession(str(files[kind]), opts, providers=["CPUExecutionProvider"])
        workloads[f"ort {kind}"] = sess
    times = time_interleaved(workloads, feed, repeat=repeat, warmup=2)
    pools = pool_kernels_ms(fused_mod, target, repeat)
    out = {"input_shape": list(shape), "layers": [
        {k: v for k, v in r.items() if k in ("name", "structure", "residual", "fused", "reason",
                                              "macs_before", "macs_after", "pool_additions")}
        for r in records],
           "rewrite_seconds": round(rewrite_s, 2), "passes": files["passes"],
           "decomposed_graphs": {k: files[f"{k} graph"] for k in ("decomposed", "decomposed-cumsum")},
           "builds": builds, "fused_sum_pool_kernels_alone": pools, "latency_ms": {k: round(v["median"], 4) for k, v in times.items()},
           "latency_ms_p10_p90": {k: [round(v["p10"], 4), round(v["p90"], 4)] for k, v in times.items()}}
    macs_before = sum(r["macs_before"] for r in records)
    macs_after = sum(r["macs_after"] for r in records)
    out["theoretical_speedup_structured_layers"] = round(macs_before / macs_after, 3)
    ratios = {}
    lat = out["latency_ms"]
    for trials in trials_list:
        tag = "untuned" if trials <= 0 else f"tuned {trials}/task"
        f, d = lat[f"tvm fused {tag}"], lat[f"tvm dense {tag}"]
        c, cc = lat[f"tvm decomposed {tag}"], lat[f"tvm decomposed-cumsum {tag}"]
        ratios[tag] = {"dense / fused": round(d / f, 3), "decomposed / fused": round(c / f, 3),
                       "decomposed-cumsum / fused": round(cc / f, 3),
                       "dense / decomposed": round(d / c, 3)}
    out["speedups"] = ratios
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=16, help="MetaSchedule trials per task (0: untuned only)")
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--zoo", default=None, help="also a zoo model, e.g. resnet20-struct-c2n2")
    ap.add_argument("--zoo-trials", type=int, default=0, help="trials per task for the zoo model")
    ap.add_argument("--no-layer", action="store_true", help="skip the single layer")
    ap.add_argument("--tuning-db", default=None, help="folder for the tuning records (cached)")
    args = ap.parse_args()
    import tvm

    from structexport.tvm_fused import llvm_host_target
    target = llvm_host_target(**{"num-cores": 1})
    db_root = Path(args.tuning_db or Path(tempfile.gettempdir()) / "structexport-tvm-fused-bench")
    db_root = db_root / "-".join(f"{k}={v}" for k, v in sorted(target.items()))
    report = {"machine": machine(), "tvm": tvm.__version__, "target": target,
              "threads": {"TVM_NUM_THREADS": os.environ.get("TVM_NUM_THREADS"), "onnxruntime": 1},
              "command": " ".join([".venv/bin/python", "benchmarks/tvm_fused.py"] + sys.argv[1:]),
              "timing": f"batch 1, {args.repeat} interleaved repeats, medians (ms); each TVM sample is "
                        "time_evaluator over ~20 ms of runs", "tuning_db": str(db_root), "results": {}}
    with tempfile.TemporaryDirectory(prefix="tvm-fused-onnx-") as tmp:
        folder = Path(tmp)
        trials = sorted({0, args.trials})
        if not args.no_layer:
            report["results"]["layer 64@56x56 C/2x2x2 3x3 s1 p1"] = bench(
                "layer", layer_model(), (1, 64, 56, 56), trials, args.repeat, db_root / "layer",
                target, folder)
        if args.zoo:
            from structexport.models.zoo import build_model, input_shape
            report["results"][args.zoo] = bench(
                args.zoo, build_model(args.zoo), input_shape(args.zoo), sorted({0, args.zoo_trials}),
                args.repeat, db_root / args.zoo, target, folder)
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
