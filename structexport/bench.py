"""``bench``: the structured model against its dense counterpart, timed interleaved.

The dense counterpart is the same network with the structured model's own
dense-equivalent kernels (``to_dense()`` of every structured layer), so both compute the
same outputs. Both are exported and run under the same runtime settings; each repeat runs
A then B (order alternating), so drifts of a shared, noisy machine hit both alike.
Reported: medians and spreads, measured speedup (dense / structured median), theoretical
speedup (dense MACs / structured MACs of the two ONNX graphs) and realization efficiency
(measured / theoretical).
"""
from __future__ import annotations

import copy
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from structexport.costmodel import node_costs, totals
from structexport.errors import StructExportError
from structexport.layers import CSGConv2d, SSCConv2d, StructuredConv2d, StructuredLinear


class BenchError(StructExportError):
    exit_code, kind = 40, "bench-failed"


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


BENCH_TARGETS = ("ort-cpu", "tvm-llvm", "tvm-arm", "tvm-cuda")


def dense_counterpart(model: nn.Module) -> nn.Module:
    """The same network with every structured layer replaced by its dense kernel."""
    from structexport.passes.infra import replace_module
    dense = copy.deepcopy(model).eval()
    for name, module in list(dense.named_modules()):
        if isinstance(module, (CSGConv2d, StructuredConv2d, StructuredLinear, SSCConv2d)):
            replace_module(dense, name, module.to_dense())
    for name in [n for n, _ in dense.named_children() if n == "generator"]:
        delattr(dense, name)
    return dense


def _session(path: Path, threads: int):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _stats(times: list[float]) -> dict:
    ms = sorted(t * 1e3 for t in times)
    q = lambda p: ms[min(len(ms) - 1, int(p * (len(ms) - 1) + 0.5))]  # noqa: E731
    return {"median": statistics.median(ms), "p10": q(0.10), "p90": q(0.90), "min": ms[0],
            "mean": statistics.fmean(ms), "runs": len(ms)}


def _timer(workload, feed: np.ndarray) -> Callable[[], float]:
    """An ONNX Runtime session becomes a timer of one run; a timer (a TVM library timed on
    its device) stays as it is."""
    if callable(getattr(workload, "run", None)) and callable(getattr(workload, "get_inputs", None)):
        inputs = {workload.get_inputs()[0].name: feed}

        def run_once() -> float:
            start = time.perf_counter()
            workload.run(None, inputs)
            return time.perf_counter() - start
        return run_once
    return workload


def time_interleaved(workloads: dict[str, object], feed: np.ndarray, repeat: int, warmup: int
                     ) -> dict[str, dict]:
    """Each repeat runs every workload once, the order alternating, so drifts of a shared
    machine hit all alike. Workloads: ONNX Runtime sessions or timers (see ``_timer``)."""
    names = list(workloads)
    timers = {n: _timer(w, feed) for n, w in workloads.items()}
    for _ in range(warmup):
        for n in names:
            timers[n]()
    times = {n: [] for n in names}
    for i in range(repeat):
        for n in (names if i % 2 == 0 else names[::-1]):
            times[n].append(timers[n]())
    return {n: _stats(t) for n, t in times.items()}


def _profile_events(path: Path, feed: np.ndarray, threads: int, runs: int = 20) -> list[tuple[str, str, float]]:
    """``(node name, operator, ms per run)`` from ONNX Runtime's profiler."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    with tempfile.TemporaryDirectory() as tmp:
        so.profile_file_prefix = str(Path(tmp) / "prof")
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(runs):
            session.run(None, {name: feed})
        events = json.loads(Path(session.end_profiling()).read_text())
    return [(e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", "?"), e["dur"] / 1e3 / runs)
            for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]


def _by(events, key) -> dict[str, float]:
    out: dict[str, float] = {}
    for ev in events:
        out[key(ev)] = out.get(key(ev), 0.0) + ev[2]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def per_layer_breakdown(source: nn.Module, shape, structured_onnx: Path, dense_onnx: Path,
                        feed: np.ndarray, threads: int) -> list[dict]:
    """Time and MACs per source layer, structured beside dense (ONNX nodes mapped back to
    layers through the names of the weights they read; unmapped nodes under "(input)").
    ORT's own layout nodes (NCHWc reorders) are not in the ONNX graph: listed as "(runtime)"."""
    from structexport.analysis import layer_table
    from structexport.profile import onnx_node_layers
    rows = {r.name: r for r in layer_table(source, shape)}
    layers = set(rows)
    table = {}
    for which, path in (("structured", structured_onnx), ("dense", dense_onnx)):
        owners = onnx_node_layers(path, layers)
        costs = {c.name: c for c in node_costs(path)}
        for node, _op, ms in _profile_events(path, feed, threads):
            layer = owners.get(node) or owners.get(node.removesuffix("_nchwc"), "(runtime)")
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


def machine() -> dict:
    from structexport.doctor import _version, cpu_info
    return {"cpu": cpu_info(), "python": platform.python_version(),
            "onnxruntime": _version("onnxruntime"), "torch": torch.__version__,
            "command": " ".join(sys.argv)}


def set_threads(spec, session, threads: int) -> None:
    """TVM's thread pool on the device (``--threads``), as ONNX Runtime's intra-op threads."""
    import tvm
    from structexport.rpc import device_errors
    with device_errors(spec, "setting the thread count"):
        configure = (session.get_function("runtime.config_threadpool") if session is not None
                     else tvm.get_global_func("runtime.config_threadpool"))
        configure(1, threads)  # 1: big cores first, ``threads`` workers


def _tvm_workloads(opts: BenchOptions, structured_library: Path | None, dense_onnx: Path,
                   feed: np.ndarray, workdir: Path, say) -> tuple[dict, object, dict]:
    """Both libraries loaded on one device session (an RPC server serves one session at a
    time); the dense one built with the same TVM target and tuning options."""
    from structexport.rpc import DeviceSpec, LoadedLibrary, open_session
    from structexport.targets import get_target
    target = get_target(opts.target, dict(opts.target_options, progress=say))
    dense_dir = workdir / "dense-tvm"
    dense_dir.mkdir()
    with target.device_scope(say) as device:
        if isinstance(device, str):
            raise BenchError(f"cannot time {opts.target} here: {device.removeprefix('not run: ')}")
        target.options["device"] = device
        say("build the dense counterpart with TVM")
        target.write_artifacts(dense_onnx, dense_dir)
    spec = device or DeviceSpec()
    session = open_session(spec)
    set_threads(spec, session, opts.threads)
    kind = target.device_kind
    libs = {"structured": LoadedLibrary(structured_library, spec, kind, session=session),
            "dense": LoadedLibrary(dense_dir / target.library, spec, kind, session=session)}
    outs = {n: lib.run(feed)[0] for n, lib in libs.items()}
    if not np.allclose(outs["structured"], outs["dense"], atol=1e-3, rtol=1e-3):
        raise BenchError(f"on the {spec.describe()}, the structured and dense TVM libraries disagree "
                         f"(max abs diff {float(np.abs(outs['structured'] - outs['dense']).max()):.3g})")
    return {n: lib.timer(feed) for n, lib in libs.items()}, spec, target.build_info


def bench(source: nn.Module, structured_onnx: Path, shape: tuple[int, ...], opts: BenchOptions,
          workdir: Path, arch: str, progress: Callable[[str], None] | None = None,
          structured_library: Path | None = None) -> dict:
    """Time ``structured_onnx`` (for TVM targets: ``structured_library``, built from it)
    against the dense counterpart of ``source``."""
    from structexport.export import export_onnx
    say = progress or (lambda _m: None)
    say("export dense counterpart")
    dense = dense_counterpart(source)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(opts.seed))
    with torch.no_grad():
        ref, got = source(x), dense(x)
    if not torch.allclose(ref, got, atol=1e-4, rtol=1e-4):
        raise BenchError(f"the dense counterpart of {arch} does not reproduce it "
                         f"(max abs diff {float((ref - got).abs().max()):.3g})")
    dense_path = workdir / "dense.onnx"
    export_onnx(dense, x, dense_path)
    device, dense_build = None, None
    if opts.target == "ort-cpu":
        workloads = {"structured": _session(structured_onnx, opts.threads),
                     "dense": _session(dense_path, opts.threads)}
    else:
        workloads, device, dense_build = _tvm_workloads(opts, structured_library, dense_path,
                                                        x.numpy(), workdir, say)
    if opts.compare_ort:
        if opts.target == "ort-cpu" or (device is not None and device.remote):
            raise BenchError("--compare-ort compares a TVM target on this host with ONNX Runtime",
                             "use it with --target tvm-llvm and no --rpc/--tracker")
        workloads["ort-structured"] = _session(structured_onnx, opts.threads)
        workloads["ort-dense"] = _session(dense_path, opts.threads)
    workloads.update(opts.extra_workloads)
    where = f" on the {device.describe()}" if device is not None and device.remote else ""
    say(f"timing ({opts.repeat} interleaved runs{where})")
    stats = time_interleaved(workloads, x.numpy(), opts.repeat, opts.warmup)
    cost_s, cost_d = totals(node_costs(structured_onnx)), totals(node_costs(dense_path))
    measured = stats["dense"]["median"] / stats["structured"]["median"]
    theoretical = cost_d["macs"] / cost_s["macs"] if cost_s["macs"] else float("nan")
    result = {
        "arch": arch, "target": opts.target, "threads": opts.threads, "input_shape": list(shape),
        "repeat": opts.repeat, "warmup": opts.warmup,
        "latency_ms": stats["structured"], "dense_latency_ms": stats["dense"],
        "speedup_measured": measured, "speedup_theoretical": theoretical,
        "realization_efficiency": measured / theoretical if theoretical == theoretical else None,
        "macs": {"structured": cost_s["macs"], "dense": cost_d["macs"]},
        "sumpool_adds": cost_s["adds"] - cost_d["adds"],
        "machine": machine(),
        "device": device.to_dict() if device is not None else None,
        "emulated": bool(device is not None and device.emulated),
        # How the dense counterpart's TVM library was built (target, tuning): the same
        # target and tuning budget as the structured one.
        "dense_target_build": dense_build,
    }
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
    if opts.extra_workloads:
        result["extra_latency_ms"] = {n: stats[n] for n in opts.extra_workloads}
    if opts.per_layer and opts.target != "ort-cpu":
        raise BenchError("--per-layer profiles ONNX Runtime", "use `structexport profile` for TVM targets")
    if opts.per_layer:
        say("profiling")
        feed = x.numpy()
        result["per_op_ms"] = {
            "structured": _by(_profile_events(structured_onnx, feed, opts.threads), lambda e: e[1]),
            "dense": _by(_profile_events(dense_path, feed, opts.threads), lambda e: e[1])}
        result["per_layer"] = per_layer_breakdown(source, shape, structured_onnx, dense_path,
                                                  feed, opts.threads)
    return result


def _library_options(manifest: dict, opts: BenchOptions) -> dict:
    """The TVM target and tuning budget the OUTDIR's library was built with, so the dense
    counterpart gets the same (options given on the command line win)."""
    build = manifest.get("target_build") or {}
    given = {k: v for k, v in opts.target_options.items() if v not in (None, 0, "")}
    out = {}
    if build.get("tvm_target") and not (given.get("tvm_target") or given.get("tvm_preset")):
        out["tvm_target"] = json.dumps(build["tvm_target"])
    tuning = build.get("tuning")
    if tuning and not given.get("tune_trials"):
        out["tune_trials"] = tuning["trials_requested"]
        out["tuning_db"] = str(Path(tuning["database"]).parent)
    return {**opts.target_options, **out}


def run_bench(path: str | None, arch: str | None, opts: BenchOptions,
              progress: Callable[[str], None] | None = None) -> dict:
    """Bench a converted OUTDIR, a checkpoint (converted on the fly) or a zoo ``arch``
    with weights drawn from ``opts.seed``, on ``opts.target`` (None: the OUTDIR's target,
    else ort-cpu)."""
    from structexport.targets import get_target
    manifest_path = Path(path) / "manifest.json" if path else None
    manifest = json.loads(manifest_path.read_text()) if manifest_path and manifest_path.is_file() else None
    if opts.target is None:
        built_for = (manifest or {}).get("target")
        opts.target = built_for if built_for in BENCH_TARGETS else "ort-cpu"
    if opts.target not in BENCH_TARGETS:
        raise BenchError(f"bench cannot time --target {opts.target!r}", f"choose one of {', '.join(BENCH_TARGETS)}")
    if opts.target == "ort-cpu":
        get_target("ort-cpu", opts.target_options)  # refuses TVM-only options
        return _run_bench(path, arch, manifest, opts, progress)
    # One device for the whole run: the conversion's check and the timing share it (an
    # emulated device started here is stopped at the end).
    say = progress or (lambda _m: None)
    target = get_target(opts.target, dict(opts.target_options, progress=say))
    target.preflight()
    with target.device_scope(say) as device:
        if isinstance(device, str):
            raise BenchError(f"cannot time {opts.target} here: {device.removeprefix('not run: ')}")
        opts.target_options = dict(opts.target_options, device=device)
        return _run_bench(path, arch, manifest, opts, progress)


def _run_bench(path, arch, manifest, opts: BenchOptions, progress) -> dict:
    from structexport.convert import ConvertOptions, _parse_shape, convert
    from structexport.loader import load_checkpoint, save_checkpoint
    from structexport.models import build_model, input_shape, parse_name
    say = progress or (lambda _m: None)
    tvm = opts.target != "ort-cpu"
    with tempfile.TemporaryDirectory(prefix="structexport-bench-") as tmp:
        work = Path(tmp)
        library = None

        def convert_here(ckpt: str, arch: str, shape) -> tuple[Path, Path | None]:
            """The structured model built for ``opts.target``: (model.onnx, model.so or None)."""
            result = convert(ckpt, work / "converted", arch,
                             ConvertOptions(target=opts.target, input_shape=shape,
                                            pass_options=opts.pass_options,
                                            target_options=opts.target_options), progress=say)
            return result.outdir / "model.onnx", (result.outdir / "model.so" if tvm else None)

        if manifest is not None:
            source_path, arch = manifest["source"]["path"], manifest["source"]["arch"]
            shape = tuple(manifest["input_shape"])
            wanted = _parse_shape(opts.input_shape) if opts.input_shape else shape
            wanted = (opts.batch,) + tuple(wanted[1:])
            if not Path(source_path).is_file():
                raise BenchError(f"the source checkpoint {source_path} named in {Path(path) / 'manifest.json'} "
                                 "is gone", "pass the checkpoint itself to bench")
            say("load")
            source = load_checkpoint(source_path, arch).model
            onnx_path = Path(path) / "model.onnx"
            if tvm:
                opts.target_options = _library_options(manifest, opts)
                library = Path(path) / "model.so"
            retune = opts.pass_options.get("autotune") or opts.pass_options.get("sumpool_realization")
            other_build = tvm and (manifest.get("target") != opts.target or not library.is_file()
                                   or opts.target_options.get("tvm_preset"))
            if wanted != shape or manifest.get("precision") != "fp32" or retune or other_build:
                say(f"convert for {opts.target} (other input shape, target or sum-pool realization)")
                onnx_path, library = convert_here(source_path, arch, wanted)
            shape = wanted
        else:
            if path:
                ckpt = path
            elif arch:
                say("build")
                ckpt = str(save_checkpoint(build_model(arch, opts.seed), work / "model.safetensors"))
            else:
                raise BenchError("nothing to bench", "pass OUTDIR, a checkpoint, or --arch NAME")
            loaded = load_checkpoint(ckpt, arch)
            arch, source = loaded.arch, loaded.model
            base = _parse_shape(opts.input_shape) if opts.input_shape else input_shape(parse_name(arch))
            shape = (opts.batch,) + tuple(base[1:])
            onnx_path, library = convert_here(ckpt, arch, shape)
        return bench(source, onnx_path, shape, opts, work, arch, progress=say, structured_library=library)
