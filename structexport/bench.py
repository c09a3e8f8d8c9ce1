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


def time_interleaved(sessions: dict[str, object], feed: np.ndarray, repeat: int, warmup: int
                     ) -> dict[str, dict]:
    names = list(sessions)
    inputs = {n: {s.get_inputs()[0].name: feed} for n, s in sessions.items()}
    for _ in range(warmup):
        for n in names:
            sessions[n].run(None, inputs[n])
    times = {n: [] for n in names}
    for i in range(repeat):
        for n in (names if i % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            sessions[n].run(None, inputs[n])
            times[n].append(time.perf_counter() - start)
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
    from structexport.costmodel import node_layers
    rows = {r.name: r for r in layer_table(source, shape)}
    layers = set(rows)
    table = {}
    for which, path in (("structured", structured_onnx), ("dense", dense_onnx)):
        owners = node_layers(path, layers)
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


def bench(source: nn.Module, structured_onnx: Path, shape: tuple[int, ...], opts: BenchOptions,
          workdir: Path, arch: str, progress: Callable[[str], None] | None = None) -> dict:
    """Time ``structured_onnx`` against the dense counterpart of ``source``."""
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
    sessions = {"structured": _session(structured_onnx, opts.threads),
                "dense": _session(dense_path, opts.threads)}
    say(f"timing ({opts.repeat} interleaved runs)")
    stats = time_interleaved(sessions, x.numpy(), opts.repeat, opts.warmup)
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
    }
    if opts.per_layer:
        say("profiling")
        feed = x.numpy()
        result["per_op_ms"] = {
            "structured": _by(_profile_events(structured_onnx, feed, opts.threads), lambda e: e[1]),
            "dense": _by(_profile_events(dense_path, feed, opts.threads), lambda e: e[1])}
        result["per_layer"] = per_layer_breakdown(source, shape, structured_onnx, dense_path,
                                                  feed, opts.threads)
    return result


def run_bench(path: str | None, arch: str | None, opts: BenchOptions,
              progress: Callable[[str], None] | None = None) -> dict:
    """Bench a converted OUTDIR, a checkpoint (converted on the fly) or a zoo ``arch``
    with weights drawn from ``opts.seed``."""
    from structexport.convert import ConvertOptions, _parse_shape, convert
    from structexport.loader import load_checkpoint, save_checkpoint
    from structexport.models import build_model, input_shape, parse_name
    say = progress or (lambda _m: None)
    if opts.target != "ort-cpu":
        raise BenchError(f"bench supports --target ort-cpu today, not {opts.target!r}")
    with tempfile.TemporaryDirectory(prefix="structexport-bench-") as tmp:
        work = Path(tmp)
        manifest_path = Path(path) / "manifest.json" if path else None
        if manifest_path and manifest_path.is_file():
            manifest = json.loads(manifest_path.read_text())
            source_path, arch = manifest["source"]["path"], manifest["source"]["arch"]
            shape = tuple(manifest["input_shape"])
            wanted = _parse_shape(opts.input_shape) if opts.input_shape else shape
            wanted = (opts.batch,) + tuple(wanted[1:])
            if not Path(source_path).is_file():
                raise BenchError(f"the source checkpoint {source_path} named in {manifest_path} "
                                 "is gone", "pass the checkpoint itself to bench")
            say("load")
            source = load_checkpoint(source_path, arch).model
            onnx_path = Path(path) / "model.onnx"
            retune = opts.pass_options.get("autotune") or opts.pass_options.get("sumpool_realization")
            if wanted != shape or manifest.get("precision") != "fp32" or retune:
                say("convert (other input shape or sum-pool realization)")
                result = convert(source_path, work / "converted", arch,
                                 ConvertOptions(target="ort-cpu", input_shape=wanted,
                                                pass_options=opts.pass_options), progress=say)
                onnx_path = result.outdir / "model.onnx"
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
            result = convert(ckpt, work / "converted", arch,
                             ConvertOptions(target="ort-cpu", input_shape=shape,
                                            pass_options=opts.pass_options), progress=say)
            onnx_path = result.outdir / "model.onnx"
        return bench(source, onnx_path, shape, opts, work, arch, progress=say)
