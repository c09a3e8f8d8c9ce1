"""Time each sum-pool realization of a C/2x2x2 structured 3x3 layer against the dense conv
under ONNX Runtime (CPU, 1 thread, batch 1), interleaved in one process.

    .venv/bin/python benchmarks/sumpool_realizations.py [--repeat 200]

Prints per layer shape: median latency of the dense conv and of each realization
(the whole decomposed layer: sum-pool + small conv), and the speedup over dense.
"""
from __future__ import annotations

import argparse
import io
import tempfile
import warnings
from pathlib import Path

import onnxruntime as ort
import torch
import torch.nn as nn

from structexport.layers.decomposed import decompose
from structexport.layers.sumpool import REALIZATIONS
from structexport.machine import machine
from structexport.ortsession import ort_session
from structexport.timing import time_interleaved

SHAPES = [(64, 56), (128, 28), (256, 14), (512, 7)]


def export(module: nn.Module, x: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        import contextlib
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            torch.onnx.export(module.eval(), (x,), dynamo=True, opset_version=18).save(str(path))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    cpu = machine()["cpu"]
    print(f"# {cpu['model']} ({cpu['machine']}, {' '.join(cpu['simd'])}), onnxruntime "
          f"{ort.__version__}, threads {args.threads}, batch 1, median of {args.repeat} interleaved runs")
    print("| layer | dense ms | " + " | ".join(f"{r} ms (speedup)" for r in REALIZATIONS) + " |")
    print("|---|---|" + "---|" * len(REALIZATIONS))
    tmp = Path(tempfile.mkdtemp())
    for C, H in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(1, C, H, H)
        dense = nn.Conv2d(C, C, 3, 1, 1, bias=False)
        alpha = torch.randn(C, C // 2, 2, 2) * 0.01
        models = {"dense": dense}
        for r in REALIZATIONS:
            models[r] = decompose(C, alpha, None, 3, 1, 1, 1, r)
        sessions = {}
        for name, m in models.items():
            export(m, x, tmp / f"{name}.onnx")
            sessions[name] = ort_session(tmp / f"{name}.onnx", args.threads)
        stats = time_interleaved(sessions, x.numpy(), args.repeat, warmup=10)
        med = {k: v["median"] for k, v in stats.items()}
        cells = [f"{med[r]:.3f} ({med['dense'] / med[r]:.2f}x)" for r in REALIZATIONS]
        print(f"| {C}, {H}x{H} | {med['dense']:.3f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
