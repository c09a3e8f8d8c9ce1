"""Measuring a baseline entry: :func:`structexport.bench.run_bench` with the reference
workload timed in the same interleaved loop, and the ratios that yields.

``speedup_measured``        dense counterpart / structured model (interleaved)
``realization_efficiency``  measured speedup / theoretical speedup
``speedup_theoretical``     dense MACs / structured MACs of the two ONNX graphs
``latency_vs_reference``    structured model / :class:`ReferenceWorkload`

Times are each workload's fastest of its interleaved runs (:data:`STATISTIC`); medians
are recorded beside them for information.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from structexport.regress.baseline import Entry, machine_info, resolve_checkpoint, utc_now

# Which statistic of each workload's interleaved runs the ratios are computed from. The
# fastest run is what the machine's other load did not disturb: on the shared 2-core
# machines it moved <2% under added load where the medians' ratios moved 3-6%
# (docs/regress.md, "Why the fastest run").
STATISTIC = "min"


class ReferenceWorkload:
    """A fixed dense conv stack under ONNX Runtime, timed interleaved with the models.

    Three 3x3 convolutions (32 -> 32 channels, 32x32, bias, ReLU), about 28 M
    multiply-accumulates, with weights from a fixed seed: the same kind of work as the
    models (MLAS convolutions, the same session options and thread count), so the clock,
    the SIMD width, the caches and the load of a shared machine scale both alike and
    ``structured latency / reference latency`` moves little from run to run. Change
    anything here and bump :attr:`ID`: a baseline recorded against another reference is
    not compared on ``latency_vs_reference``.

    A :class:`structexport.timing.Timer`: :meth:`time_once` runs it once.
    """

    ID = "ort-conv3x3-c32-32x32-x3/v1"
    CHANNELS, SIZE, LAYERS = 32, 32, 3

    def __init__(self, threads: int = 1):
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        from structexport.ortsession import ort_session
        rng = np.random.RandomState(20261123)
        c, s = self.CHANNELS, self.SIZE
        nodes, inits, prev = [], [], "x"
        for i in range(self.LAYERS):
            w = (rng.standard_normal((c, c, 3, 3)) * math.sqrt(2.0 / (9 * c))).astype(np.float32)
            b = (rng.standard_normal(c) * 0.01).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"],
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            prev = f"y{i}" if i < self.LAYERS - 1 else "y"
            nodes.append(helper.make_node("Relu", [f"c{i}"], [prev]))
        graph = helper.make_graph(
            nodes, "structexport_regress_reference",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, s, s])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, s, s])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        onnx.checker.check_model(model)
        self.session = ort_session(model.SerializeToString(), threads)
        self.feed = {"x": rng.standard_normal((1, c, s, s)).astype(np.float32)}
        self.threads = threads

    def time_once(self) -> float:
        """Run the reference once; the seconds it took (wall clock)."""
        start = time.perf_counter()
        self.session.run(None, self.feed)
        return time.perf_counter() - start

    @classmethod
    def info(cls) -> dict:
        """As a baseline file records it."""
        return {"id": cls.ID, "description": (cls.__doc__ or "").strip().splitlines()[0]}


@dataclass
class Measurement:
    metrics: dict
    raw: dict
    seconds: float


# What run_regress and update_baseline call to measure an entry (tests pass a fake).
Measure = Callable[[Path, Entry, Callable[[str], None] | None], Measurement]

_REFERENCES: dict[int, ReferenceWorkload] = {}


def reference_for(threads: int) -> ReferenceWorkload:
    """One reference workload per thread count, built once per process."""
    if threads not in _REFERENCES:
        _REFERENCES[threads] = ReferenceWorkload(threads)
    return _REFERENCES[threads]


def measure_entry(baseline_path: Path, entry: Entry,
                  progress: Callable[[str], None] | None = None) -> Measurement:
    """Bench one entry and the reference workload alongside it; the ratios it yields."""
    from structexport.bench import BenchOptions, run_bench
    say = progress or (lambda _m: None)
    start = time.perf_counter()
    reference = reference_for(entry.threads)
    pass_options = {"threads": entry.threads, "autotune": bool(entry.options.get("autotune"))}
    if entry.options.get("sumpool_realization"):
        pass_options["sumpool_realization"] = entry.options["sumpool_realization"]
    shape = ",".join(map(str, entry.input_shape)) if entry.input_shape else None
    # The reference runs as a third workload in bench's interleaved loop.
    opts = BenchOptions(target=entry.target, threads=entry.threads, batch=entry.batch, input_shape=shape,
                        repeat=entry.repeat, warmup=entry.warmup, seed=entry.seed,
                        pass_options=pass_options, extra_workloads={"reference": reference})
    path = str(resolve_checkpoint(baseline_path, entry)) if entry.checkpoint else None
    result = run_bench(path, entry.arch, opts, progress=say)
    ref_stats, how = result["extra_latency_ms"]["reference"], "interleaved"
    s, d = result["latency_ms"], result["dense_latency_ms"]
    theoretical = result.get("speedup_theoretical")
    speedup = d[STATISTIC] / s[STATISTIC] if s[STATISTIC] else None
    metrics = {
        "speedup_measured": speedup,
        "realization_efficiency": speedup / theoretical if speedup and theoretical else None,
        "speedup_theoretical": theoretical,
        "latency_vs_reference": s[STATISTIC] / ref_stats[STATISTIC] if ref_stats[STATISTIC] else None,
    }
    metrics = {k: (float(v) if v is not None and math.isfinite(v) else None) for k, v in metrics.items()}
    raw = {"statistic": STATISTIC,
           "latency_ms": {k: round(s[k], 4) for k in ("min", "median")},
           "dense_latency_ms": {k: round(d[k], 4) for k in ("min", "median")},
           "reference_ms": {k: round(ref_stats[k], 4) for k in ("min", "median")},
           "median_ratios": {"speedup_measured": round(d["median"] / s["median"], 4),
                             "latency_vs_reference": round(s["median"] / ref_stats["median"], 4)},
           "reference": ReferenceWorkload.ID, "reference_timing": how, "runs": entry.repeat,
           "input_shape": result.get("input_shape"), "arch": result.get("arch"), "macs": result.get("macs"),
           "machine": machine_info(), "measured_at": utc_now()}
    return Measurement(metrics, raw, time.perf_counter() - start)
