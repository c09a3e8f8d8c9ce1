"""ONNX Runtime collection: latency with the profiler off, per-node kernel times from its
profiler (:func:`ort_profile`, :func:`node_times`), as :func:`measure_ort` hands them on."""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import numpy as np

from structexport.machine import package_version
from structexport.ortsession import feed_dict, ort_session
from structexport.profiling.layermap import ort_owner
from structexport.profiling.options import ProfileError, ProfileOptions
from structexport.profiling.runs import keep_fastest
from structexport.timing import time_interleaved


def ort_profile(paths: dict[str, Path], feed: np.ndarray, threads: int, runs: int, warmup: int,
                optimized_dir: Path | None = None) -> dict[str, dict]:
    """Profile each model for ``runs`` runs (interleaved, after ``warmup``): mean ms per node
    over the runs kept, mean ms of the kept runs, and the operator of each node."""
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
                s.run(None, feed_dict(s, feed))
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
            kept = keep_fastest(per_run, lambda r: r[0])
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


def node_times(path: Path, feed: np.ndarray, threads: int, runs: int = 20
               ) -> list[tuple[str, str, float]]:
    """``(node name, operator, ms)`` from ONNX Runtime's profiler over ``runs`` runs, no
    warm-up: one entry per kernel event (a node once per run), each the event's time divided
    by ``runs``, so a node's entries add up to its mean ms per run. Names are those of the
    optimized graph (see :func:`~structexport.profiling.layermap.ort_owner`)."""
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(path, threads, profile_prefix=Path(tmp) / "prof")
        for _ in range(runs):
            session.run(None, feed_dict(session, feed))
        events = json.loads(Path(session.end_profiling()).read_text())
    return [(e["name"][: -len("_kernel_time")], e.get("args", {}).get("op_name", "?"),
             e["dur"] / 1e3 / runs)
            for e in events if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]


def measure_ort(structured: Path, dense: Path, feed, opts: ProfileOptions, say, work: Path,
                package=None) -> dict:
    """Both models timed interleaved with the profiler off (each session checked against
    ``package``'s stored outputs first), then profiled; the ``measured`` dict
    :func:`~structexport.profiling.assemble.assemble` reads.

    An INT8 package's dense side is its dense INT8 baseline (``reference.int8.onnx``): the
    structured model's integer kernels are checked against the package's fake-quantized
    outputs, the baseline's against its own QDQ graph run as written, as ``bench`` does
    (:func:`structexport.timedcheck.checked_int8_baseline`)."""
    from structexport.timedcheck import checked_sessions
    paths = {"structured": structured, "dense": dense}
    if package is not None and package.precision == "int8":
        from structexport.timedcheck import checked_int8_baseline
        from structexport.quantize import DENSE_INT8
        if Path(dense) != package.root / DENSE_INT8:
            raise ProfileError(f"an INT8 package is profiled against its {DENSE_INT8}, not {dense}",
                               "profile the package folder itself")
        sessions = checked_sessions(package, {"structured": structured}, opts.threads, say)
        sessions["dense"] = checked_int8_baseline(package, opts.threads, say)
    elif package is not None:
        sessions = checked_sessions(package, paths, opts.threads, say)
    else:
        sessions = {n: ort_session(p, opts.threads) for n, p in paths.items()}
    say(f"timing ({opts.repeat} interleaved runs)")
    latency = time_interleaved(sessions, feed, opts.repeat, opts.warmup)
    say(f"profiling ({opts.repeat} interleaved runs, ONNX Runtime profiler)")
    prof = ort_profile({"structured": structured, "dense": dense}, feed, opts.threads,
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
            "mapper": lambda layers, path=path, which=which: ort_owner(
                path, work / f"{which}.optimized.onnx", layers)}
    return result

