"""``bench``: a converted model against its dense reference, timed interleaved.

The workload comes from :func:`structexport.workload.resolve_workload` (an OUTDIR, a
checkpoint converted on the fly, or a zoo ``--arch``). Its package holds the artifact and
``reference.onnx``: the same network with the structured model's own dense-equivalent
kernels, so both compute the same outputs. Both run under the same runtime settings; each
repeat runs A then B (order alternating), so drifts of a shared, noisy machine hit both
alike. Reported: medians and spreads, measured speedup (dense / structured median),
theoretical speedup (dense MACs / structured MACs of the two ONNX graphs) and realization
efficiency (measured / theoretical).

A tuned TVM library's speed depends on the tuning's luck (four 64-trial tunings of one
dense conv ran 1.84-2.85 ms): ``tune_repeats`` N > 1 tunes and builds the structured and
the dense library N times, each time afresh (a new tuning database, MetaSchedule seed
0, 1, ...), times each pair interleaved, and reports every repeat with the median, min
and max of the speedup and efficiency; the headline speedup is then the median.
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from structexport.costmodel import node_costs, totals
from structexport.errors import StructExportError
from structexport.machine import machine
from structexport.package import Package, is_package
from structexport.profiling.layermap import ORT_FUSED_SUFFIX, onnx_node_layers
from structexport.profiling.ort import node_times
from structexport.quantize import DENSE_INT8, FP32_MODEL
from structexport.timedcheck import (checked_int8_baseline, checked_int8_program, checked_libraries,
                                     checked_programs, checked_sessions)
from structexport.timing import time_interleaved
from structexport.workload import Workload, WorkloadOptions, resolve_workload


class BenchError(StructExportError):
    exit_code, kind = 40, "bench-failed"


class BenchUsageError(StructExportError):
    """An option that cannot take effect for this run (the CLI's usage exit code)."""
    exit_code, kind = 2, "usage"


@dataclass
class BenchOptions:
    target: str = "ort-cpu"
    threads: int = 1
    batch: int = 1
    input_shape: tuple[int, ...] | None = None
    repeat: int = 100
    warmup: int = 10
    per_layer: bool = False
    seed: int = 0
    pass_options: dict = field(default_factory=dict)
    # TVM targets: tvm_target, tvm_preset, device (a structexport.rpc.DeviceSpec), tune_trials,
    # tuning_db -- the dense counterpart is built with the same ones (an equal tuning budget).
    target_options: dict = field(default_factory=dict)
    # More workloads to time in the same interleaved loop (name -> ONNX Runtime session, or a
    # timer: a function returning seconds per run); reported under "extra_latency_ms".
    extra_workloads: dict = field(default_factory=dict)
    # TVM targets on this host: also time both models under ONNX Runtime, interleaved.
    compare_ort: bool = False
    # The loader's trust flags, for checkpoints.
    trust_pickle: bool = False
    allow_torchscript: bool = False
    # TVM targets with a tuning budget: tune and build structured and dense this many times,
    # each afresh (its own database, MetaSchedule seed 0, 1, ...), and report the spread.
    tune_repeats: int = 1
    # Where the repeats' databases are kept (<root>/bench-tune-repeats/<run>/repeat-K); None:
    # in the work folder, removed at the end. run_bench sets it to a --tuning-db given.
    repeat_db_root: str | None = None
    # Lines worth keeping on screen (one per finished tuning repeat); None: progress only.
    log: Callable[[str], None] | None = None


BENCH_TARGETS = ("ort-cpu", "tvm-llvm", "tvm-arm", "tvm-cuda", "executorch", "litert")


def _by(events, key) -> dict[str, float]:
    out: dict[str, float] = {}
    for ev in events:
        out[key(ev)] = out.get(key(ev), 0.0) + ev[2]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def per_layer_breakdown(layer_names: list[str], structured_onnx: Path, dense_onnx: Path,
                        feed: np.ndarray, threads: int) -> list[dict]:
    """Time and MACs per source layer, structured beside dense (ONNX nodes mapped back to
    layers through the names of the weights they read; unmapped nodes under "(input)").
    ORT's own layout nodes (NCHWc reorders) are not in the ONNX graph: listed as "(runtime)"."""
    layers = set(layer_names)
    table = {}
    for which, path in (("structured", structured_onnx), ("dense", dense_onnx)):
        owners = onnx_node_layers(path, layers)
        costs = {c.name: c for c in node_costs(path)}
        for node, _op, ms in node_times(path, feed, threads):
            # ONNX Runtime's names for what it kept or fused (conv_nchwc; an INT8 model's
            # QLinearConv node_Conv_7_token_3 fused from the QDQ group around node_Conv_7)
            layer = (owners.get(node) or owners.get(node.removesuffix("_nchwc"))
                     or owners.get(ORT_FUSED_SUFFIX.sub("", node), "(runtime)"))
            entry = table.setdefault(layer, {"layer": layer, "structured_ms": 0.0, "dense_ms": 0.0,
                                             "structured_macs": 0, "dense_macs": 0})
            entry[f"{which}_ms"] += ms
        for name, cost in costs.items():
            layer = owners.get(name, "(runtime)")
            if layer in table:
                table[layer][f"{which}_macs"] += cost.macs
    out = []
    for entry in table.values():
        s_ms, d_ms = entry["structured_ms"], entry["dense_ms"]
        entry["speedup_measured"] = d_ms / s_ms if s_ms else None
        entry["speedup_theoretical"] = (entry["dense_macs"] / entry["structured_macs"]
                                        if entry["structured_macs"] else None)
        entry["realization_efficiency"] = (entry["speedup_measured"] / entry["speedup_theoretical"]
                                           if entry["speedup_measured"] and entry["speedup_theoretical"] else None)
        out.append(entry)
    return sorted(out, key=lambda e: -e["dense_ms"])


def _tvm_workloads(opts: BenchOptions, package: Package, structured_library: Path | None, dense_onnx: Path,
                   feed: np.ndarray, workdir: Path, say,
                   tuning: dict | None = None) -> tuple[dict, object, dict, dict | None]:
    """Both libraries loaded on one device session (an RPC server serves one session at a
    time); the dense one built with the same TVM target and tuning options. ``tuning`` (a
    tuning repeat: {"repeat", "seed", "tuning_db"}): the structured library is built here
    too, from the package's graph, and both are tuned with that database and seed.
    Returns (timers, device, the dense build, the structured build when built here)."""
    from structexport.rpc import DeviceSpec, LoadedLibrary, open_session, set_threads
    from structexport.targets import get_target
    from structexport.tuning import tuning_seed
    options = dict(opts.target_options, progress=say)
    tag = ""
    if tuning is not None:
        options["tuning_db"] = tuning["tuning_db"]
        tag = f"-{tuning['repeat']}"
    target = get_target(opts.target, options)
    dense_dir = workdir / f"dense-tvm{tag}"
    dense_dir.mkdir()
    structured_build = None
    seeded = tuning_seed(tuning["seed"]) if tuning else contextlib.nullcontext()
    with target.device_scope(say) as device, seeded:
        if isinstance(device, str):
            raise BenchError(f"cannot time {opts.target} here: {device.removeprefix('not run: ')}")
        if structured_library is None:
            # the package's graph, compiled as convert compiles it (the composed graph when
            # its library has the structured convs fused)
            built = get_target(opts.target, dict(options, composed_onnx=package.composed_onnx,
                                                 structure_plan=package.structure_plan))
            built.options["device"] = device
            structured_dir = workdir / f"structured-tvm{tag}"
            structured_dir.mkdir()
            say("build the structured library")
            built.write_artifacts(package.model_onnx, structured_dir)
            structured_library, structured_build = structured_dir / built.library, built.build_info
        target.options["device"] = device
        say("build the dense counterpart with TVM")
        target.write_artifacts(dense_onnx, dense_dir)
    spec = device or DeviceSpec()
    session = open_session(spec)
    set_threads(spec, session, opts.threads)
    kind = target.device_kind
    # A TVM library is native code: loading it runs it with this user's privileges
    say(f"load {structured_library} (native code) and the dense library built here")
    libs = {"structured": LoadedLibrary(structured_library, spec, kind, session=session),
            "dense": LoadedLibrary(dense_dir / target.library, spec, kind, session=session)}
    checked_libraries(package, libs, spec.describe(), say)
    return {n: lib.timer(feed) for n, lib in libs.items()}, spec, target.build_info, structured_build


def _tuning_facts(build: dict | None) -> dict | None:
    """What a repeat's report says of one library's tuning."""
    tuning = (build or {}).get("tuning")
    if not tuning:
        return None
    return {k: tuning.get(k) for k in ("database", "seed", "trials_requested", "trials_run", "trials_failed",
                                       "trials_per_task", "tasks", "tasks_from_database", "seconds")}


def _repeat_databases(opts: BenchOptions, workdir: Path) -> Path:
    """The folder holding one database folder per tuning repeat: a new one per run."""
    if opts.repeat_db_root:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        return Path(opts.repeat_db_root).expanduser() / "bench-tune-repeats" / f"{stamp}-{os.getpid()}"
    return workdir / "tune-repeats"


def _tuned_repeats(opts: BenchOptions, package: Package, dense_onnx: Path, feed: np.ndarray, workdir: Path,
                   shared: dict, say) -> list[dict]:
    """``opts.tune_repeats`` fresh tunings: each builds both libraries with its own database
    and seed, then times them (with the ``shared`` workloads) in one interleaved loop."""
    root = _repeat_databases(opts, workdir)
    count = opts.tune_repeats
    log = opts.log or say
    runs = []
    for k in range(1, count + 1):
        seed = k - 1
        tuning = {"repeat": k, "seed": seed, "tuning_db": str(root / f"repeat-{k}")}
        tell = (lambda m, k=k: say(f"tuning repeat {k}/{count}: {m}"))
        tell(f"MetaSchedule seed {seed}, database {tuning['tuning_db']}")
        timers, device, dense_build, structured_build = _tvm_workloads(
            opts, package, None, dense_onnx, feed, workdir, tell, tuning)
        tell(f"timing ({opts.repeat} interleaved runs)")
        stats = time_interleaved({**timers, **shared}, feed, opts.repeat, opts.warmup)
        del timers
        speedup = stats["dense"]["median"] / stats["structured"]["median"]
        log(f"tuning repeat {k}/{count} (seed {seed}): structured {stats['structured']['median']:.3f} ms, "
            f"dense {stats['dense']['median']:.3f} ms, speedup {speedup:.2f}x")
        runs.append({"repeat": k, "seed": seed, "database": tuning["tuning_db"], "stats": stats,
                     "device": device, "dense_build": dense_build, "structured_build": structured_build})
    return runs


def _spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def tune_repeats_summary(runs: list[dict], theoretical: float | None) -> dict:
    """Per repeat the structured and dense latency, speedup and efficiency; over the
    repeats the median, min and max of both. ``runs``: {"repeat", "seed", "database",
    "stats" (time_interleaved's), optional builds}. ``reported_repeat``: the repeat whose
    latencies stand for the run (the median speedup's; of an even count, the lower middle)."""
    repeats = []
    for run in runs:
        stats = run["stats"]
        speedup = stats["dense"]["median"] / stats["structured"]["median"]
        entry = {"repeat": run["repeat"], "seed": run["seed"], "database": run["database"],
                 "latency_ms": stats["structured"], "dense_latency_ms": stats["dense"],
                 "speedup_measured": speedup,
                 "realization_efficiency": speedup / theoretical if theoretical else None,
                 "tuning": {"structured": _tuning_facts(run.get("structured_build")),
                            "dense": _tuning_facts(run.get("dense_build"))}}
        if "ort-structured" in stats:
            entry["onnxruntime"] = {"latency_ms": stats["ort-structured"]["median"],
                                    "dense_latency_ms": stats["ort-dense"]["median"],
                                    "tvm_over_ort": stats["structured"]["median"] / stats["ort-structured"]["median"]}
        repeats.append(entry)
    speedups = [r["speedup_measured"] for r in repeats]
    middle = sorted(repeats, key=lambda r: r["speedup_measured"])[(len(repeats) - 1) // 2]
    return {"count": len(repeats), "seeds": [r["seed"] for r in repeats], "repeats": repeats,
            "speedup_measured": _spread(speedups),
            "realization_efficiency": _spread([s / theoretical for s in speedups]) if theoretical else None,
            "reported_repeat": middle["repeat"]}


def bench_workload(workload: Workload, opts: BenchOptions, workdir: Path,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Time the workload's artifact against its package's dense reference."""
    say = progress or (lambda _m: None)
    package = workload.package
    structured_onnx, dense_path = package.model_onnx, package.reference_onnx
    feed = package.feed()
    device, dense_build = None, None
    int8 = package.precision == "int8"
    from structexport.targets import get_target, is_program_target
    program_target = is_program_target(opts.target)
    repeated = opts.tune_repeats > 1 and opts.target.startswith("tvm")
    if int8 and opts.target != package.target:
        raise BenchError(f"{package.root} is an INT8 package for {package.target}; {opts.target} cannot time it",
                         f"bench it with --target {package.target}")
    if opts.target == "ort-cpu":
        workloads = checked_sessions(package, {"structured": structured_onnx, "dense": dense_path},
                                     opts.threads, say)
        if int8:
            workloads["dense-int8"] = checked_int8_baseline(package, opts.threads, say)
    elif program_target:
        workloads = checked_programs(package, {"structured": package.program, "dense": package.dense_program},
                                     feed, opts.threads, say)
        if int8:
            workloads["dense-int8"] = checked_int8_program(package, package.dense_int8_program,
                                                           feed, opts.threads, say)
    elif repeated:      # the TVM pair is built and timed per tuning repeat, below
        workloads, device = {}, opts.target_options.get("device")
    else:
        workloads, device, dense_build, _ = _tvm_workloads(opts, package, package.library, dense_path,
                                                           feed, workdir, say)
    if opts.compare_ort:
        if opts.target == "ort-cpu" or getattr(device, "remote", False):
            raise BenchError("--compare-ort compares a TVM target on this host with ONNX Runtime",
                             "use it with --target tvm-llvm and no --rpc/--tracker")
        workloads.update(checked_sessions(package, {"ort-structured": structured_onnx,
                                                    "ort-dense": dense_path}, opts.threads, say))
    workloads.update(opts.extra_workloads)
    runs = None
    if repeated:
        runs = _tuned_repeats(opts, package, dense_path, feed, workdir, workloads, say)
        # the repeat with the median speedup stands for the run (its latencies, its build)
        middle = runs[tune_repeats_summary(runs, None)["reported_repeat"] - 1]
        stats, device, dense_build = middle["stats"], middle["device"], middle["dense_build"]
    else:
        where = f" on the {device.describe()}" if device is not None and device.remote else ""
        say(f"timing ({opts.repeat} interleaved runs{where})")
        stats = time_interleaved(workloads, feed, opts.repeat, opts.warmup)
    # An INT8 graph's convs read dequantized weights: its MACs are the float32 model's
    costs_of = package.root / FP32_MODEL if int8 and (package.root / FP32_MODEL).is_file() else structured_onnx
    cost_s, cost_d = totals(node_costs(costs_of)), totals(node_costs(dense_path))
    # INT8: judged against the dense model quantized the same way (what an INT8 user ships)
    baseline = "dense-int8" if int8 else "dense"
    measured = stats[baseline]["median"] / stats["structured"]["median"]
    # None: the cost model counted no MACs (shapes it cannot infer, e.g. inside If branches)
    theoretical = cost_d["macs"] / cost_s["macs"] if cost_s["macs"] and cost_d["macs"] else None
    result = {
        "arch": package.arch, "target": opts.target, "threads": opts.threads,
        "input_shape": list(package.input_shape), "inputs": package.inputs,
        "repeat": opts.repeat, "warmup": opts.warmup,
        "workload": {"origin": workload.origin, "label": workload.label,
                     "package": None if workload.converted_here else str(package.root),
                     "notes": workload.notes},
        "latency_ms": stats["structured"], "dense_latency_ms": stats["dense"],
        "speedup_measured": measured, "speedup_theoretical": theoretical,
        "realization_efficiency": measured / theoretical if theoretical else None,
        "macs": {"structured": cost_s["macs"], "dense": cost_d["macs"]},
        "sumpool_adds": cost_s["adds"] - cost_d["adds"],
        "machine": machine(),
        "device": device.to_dict() if device is not None else None,
        "emulated": bool(device is not None and device.emulated),
        # How the dense counterpart's TVM library was built (target, tuning): the same
        # target and tuning budget as the structured one.
        "dense_target_build": dense_build,
    }
    if runs is not None:
        summary = tune_repeats_summary(runs, theoretical)
        result["tune_repeats"] = summary
        # the headline figures are the repeats' medians; latencies are the median repeat's
        result["speedup_measured"] = summary["speedup_measured"]["median"]
        result["realization_efficiency"] = ((summary["realization_efficiency"] or {}).get("median"))
    if program_target:
        result["runtime"] = get_target(opts.target, {}).runtime(opts.threads)
    # the promise of per-layer decisions: never slower than the source on its own target
    result["slower_than_dense"] = bool(result["speedup_measured"] < 1)
    if device is not None and device.emulated:
        result["note"] = ("timed on the emulated aarch64 device (qemu user mode): these timings "
                          "prove the library runs; they are not ARM latency")
    if opts.compare_ort:
        ort_s, ort_d = stats["ort-structured"]["median"], stats["ort-dense"]["median"]
        result["onnxruntime"] = {
            "latency_ms": stats["ort-structured"], "dense_latency_ms": stats["ort-dense"],
            "speedup_measured": ort_d / ort_s,
            # > 1: TVM is slower than ONNX Runtime on the same model and machine.
            "tvm_over_ort": stats["structured"]["median"] / ort_s,
            "tvm_over_ort_dense": stats["dense"]["median"] / ort_d}
    if int8:
        result["precision"] = "int8"
        result["baseline"] = ("the dense model quantized the same way, with the same calibration "
                              f"({(package.dense_int8_program or package.root / DENSE_INT8).name})")
        result["dense_int8_latency_ms"] = stats["dense-int8"]
        result["speedup_over_dense_fp32"] = stats["dense"]["median"] / stats["structured"]["median"]
        result["dense_int8_over_dense_fp32"] = stats["dense"]["median"] / stats["dense-int8"]["median"]
        # The shipped graph's MACs count the rebased bands and any layer kept dense (the
        # per-layer choice); the structure's own theory is every structured layer decomposed,
        # its sum-pools as additions (counted by convert before the INT8 passes)
        structure_macs = (package.manifest.get("int8") or {}).get("structure_macs")
        if structure_macs and cost_d["macs"]:
            structure = cost_d["macs"] / structure_macs
            result["structure_theoretical"] = {"speedup": structure, "efficiency": measured / structure}
    if opts.extra_workloads:
        result["extra_latency_ms"] = {n: stats[n] for n in opts.extra_workloads}
    if opts.per_layer:
        say("profiling")
        # INT8: layer by layer against the dense INT8 baseline, as the speedup is
        dense_profiled = package.root / DENSE_INT8 if int8 else dense_path
        result["per_op_ms"] = {
            "structured": _by(node_times(structured_onnx, feed, opts.threads), lambda e: e[1]),
            "dense": _by(node_times(dense_profiled, feed, opts.threads), lambda e: e[1])}
        result["per_layer"] = per_layer_breakdown([layer["name"] for layer in package.layers],
                                                  structured_onnx, dense_profiled, feed, opts.threads)
    return result


def library_options(package: Package, target_options: dict) -> dict:
    """The TVM target and tuning budget the package's library was built with, so the dense
    counterpart gets the same (options given on the command line win)."""
    build = package.target_build
    given = {k: v for k, v in target_options.items() if v not in (None, 0, "")}
    out = {}
    if build.get("tvm_target") and not (given.get("tvm_target") or given.get("tvm_preset")):
        out["tvm_target"] = json.dumps(build["tvm_target"])
    tuning = build.get("tuning")
    if tuning and not (given.get("tune_trials") or given.get("tune_per_task")):
        if tuning.get("trials_per_task"):
            out["tune_per_task"] = tuning["trials_per_task"]
        else:
            out["tune_trials"] = tuning["trials_requested"]
        out["tuning_db"] = str(Path(tuning["database"]).parent)
    return {**target_options, **out}


def run_bench(path: str | None, arch: str | None, opts: BenchOptions,
              progress: Callable[[str], None] | None = None) -> dict:
    """Bench a converted OUTDIR, a checkpoint (converted on the fly) or a zoo ``arch``
    with weights drawn from ``opts.seed``, on ``opts.target`` (None: the OUTDIR's target,
    else ort-cpu)."""
    from structexport.targets import get_target
    say = progress or (lambda _m: None)
    package = Package.load(path) if path and is_package(path) else None
    if opts.target is None:
        built_for = package.target if package else None
        opts.target = built_for if built_for in BENCH_TARGETS else "ort-cpu"
    if opts.target not in BENCH_TARGETS:
        raise BenchError(f"bench cannot time --target {opts.target!r}", f"choose one of {', '.join(BENCH_TARGETS)}")
    if opts.per_layer and opts.target != "ort-cpu":
        raise BenchError("--per-layer profiles ONNX Runtime", "use `structexport profile` for TVM targets")
    if opts.tune_repeats > 1 and opts.repeat_db_root is None:
        opts.repeat_db_root = opts.target_options.get("tuning_db") or None
    if package is not None and opts.target != "ort-cpu" and package.target == opts.target:
        opts.target_options = library_options(package, opts.target_options)
    check_tune_repeats(opts)
    if opts.target == "ort-cpu":
        get_target("ort-cpu", opts.target_options)  # refuses TVM-only options
        return _resolve_and_bench(path, arch, opts, say)
    # One device for the whole run: the conversion's check and the timing share it (an
    # emulated device started here is stopped at the end).
    target = get_target(opts.target, dict(opts.target_options, progress=say))
    target.preflight()
    with target.device_scope(say) as device:
        if isinstance(device, str):
            raise BenchError(f"cannot time {opts.target} here: {device.removeprefix('not run: ')}")
        opts.target_options = dict(opts.target_options, device=device)
        return _resolve_and_bench(path, arch, opts, say)


def check_tune_repeats(opts: BenchOptions) -> None:
    """``tune_repeats`` > 1 repeats a MetaSchedule tuning: it needs a TVM target and a
    tuning budget (given, or the one a tuned package was built with)."""
    count = opts.tune_repeats
    if count < 1:
        raise BenchUsageError(f"--tune-repeats {count}: give 1 or more", "pass --tune-repeats N with N >= 1")
    if count == 1:
        return
    if not str(opts.target).startswith("tvm"):
        raise BenchUsageError(f"--tune-repeats {count} repeats the TVM targets' MetaSchedule tuning, and "
                              f"--target {opts.target} is not tuned",
                              "use it with --target tvm-llvm (or tvm-arm, tvm-cuda) and --tune quick|full|N, "
                              "or leave --tune-repeats out")
    budget = opts.target_options
    if not (budget.get("tune_trials") or budget.get("tune_per_task")):
        raise BenchUsageError(f"--tune-repeats {count} repeats the tuning, and this run has no tuning budget "
                              "(it would build the same untuned libraries each time)",
                              "add --tune quick|full|N or --tune-trials N, or leave --tune-repeats out")


def workload_options(opts: BenchOptions, need: str = "artifact") -> WorkloadOptions:
    target_options = opts.target_options
    if opts.tune_repeats > 1:
        # each repeat tunes and builds its own structured library: the workload's own is
        # built (and verified) untuned
        target_options = {k: v for k, v in target_options.items()
                          if k not in ("tune_trials", "tune_per_task", "tuning_db")}
    return WorkloadOptions(target=opts.target, input_shape=opts.input_shape, batch=opts.batch,
                           seed=opts.seed, pass_options=opts.pass_options,
                           target_options=target_options, trust_pickle=opts.trust_pickle,
                           allow_torchscript=opts.allow_torchscript, need=need, command="bench")


def _resolve_and_bench(path, arch, opts: BenchOptions, say) -> dict:
    with tempfile.TemporaryDirectory(prefix="structexport-bench-") as tmp:
        work = Path(tmp)
        workload = resolve_workload(path, arch, workload_options(opts), work, say)
        return bench_workload(workload, opts, work, say)
