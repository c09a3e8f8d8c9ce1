"""The machine's measured fp32 multiply-accumulate peak, the yardstick of the GMAC/s plot."""
from __future__ import annotations

import math
import time

import numpy as np

from structexport.ortsession import ort_session


def measure_peak(threads: int, n: int = 512, budget_s: float = 1.5, max_runs: int = 300) -> dict:
    """The machine's fp32 multiply-accumulate rate, measured: an ``n x n x n`` MatMul under
    ONNX Runtime (MLAS, the same kernels as its convolutions) with ``threads`` intra-op
    threads, the best run within ``budget_s`` seconds (best, not median: a peak on a shared
    machine is what it reaches when nothing else runs)."""
    from onnx import TensorProto, helper, numpy_helper
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

