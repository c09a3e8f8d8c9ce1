"""Time each sum-pool realization of a C/2x2x2 structured 3x3 layer against the dense conv
under ONNX Runtime (CPU, 1 thread, batch 1), interleaved in one process.

    .venv/bin/python benchmarks/sumpool_realizations.py [--repeat 200] [--in-network]
        [--realizations box,pool2d] [--shapes 64x56,512x7]

Prints per layer shape: median latency of the dense conv and of each realization
(the whole decomposed layer: sum-pool + small conv), and the speedup over dense.

``--in-network`` times every model between two identity depthwise 1x1 convs, as a layer
sits inside a network: ONNX Runtime keeps convs and 2-D pools in its blocked (NCHWc)
layout from one to the next, and a realization whose channel sum is not a conv or a pool
(CumSum, Slice, Sub, Concat) pays a layout change in and out. Alone, every model pays them.
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


class InNetwork(nn.Module):
    """``layer`` between identity depthwise 1x1 convs (the same for every model timed)."""

    def __init__(self, layer: nn.Module, channels: int, out_channels: int):
        super().__init__()
        self.before = nn.Conv2d(channels, channels, 1, groups=channels, bias=False)
        self.layer = layer
        self.after = nn.Conv2d(out_channels, out_channels, 1, groups=out_channels, bias=False)
        with torch.no_grad():
            self.before.weight.fill_(1.0)
            self.after.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.layer(self.before(x)))


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
    ap.add_argument("--in-network", action="store_true",
                    help="time each model between identity depthwise 1x1 convs (see the docstring)")
    ap.add_argument("--realizations", default=",".join(REALIZATIONS),
                    help="comma-separated, from: " + ", ".join(REALIZATIONS))
    ap.add_argument("--shapes", default=",".join(f"{c}x{h}" for c, h in SHAPES),
                    help="CxH,... (channels x square input size)")
    args = ap.parse_args()
    realizations = [r for r in args.realizations.split(",") if r]
    unknown = set(realizations) - set(REALIZATIONS)
    if unknown:
        ap.error(f"unknown realization(s) {', '.join(sorted(unknown))}")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    cpu = machine()["cpu"]
    print(f"# {cpu['model']} ({cpu['machine']}, {' '.join(cpu['simd'])}), onnxruntime "
          f"{ort.__version__}, threads {args.threads}, batch 1, median of {args.repeat} interleaved runs"
          + (", in network (identity depthwise 1x1 convs before and after)" if args.in_network else ""))
    print("| layer | dense ms | " + " | ".join(f"{r} ms (speedup)" for r in realizations) + " |")
    print("|---|---|" + "---|" * len(realizations))
    tmp = Path(tempfile.mkdtemp())
    for C, H in shapes:
        torch.manual_seed(0)
        x = torch.randn(1, C, H, H)
        dense = nn.Conv2d(C, C, 3, 1, 1, bias=False)
        alpha = torch.randn(C, C // 2, 2, 2) * 0.01
        models = {"dense": dense}
        for r in realizations:
            models[r] = decompose(C, alpha, None, 3, 1, 1, 1, r)
        if args.in_network:
            models = {name: InNetwork(m, C, C) for name, m in models.items()}
        sessions = {}
        for name, m in models.items():
            export(m, x, tmp / f"{name}.onnx")
            sessions[name] = ort_session(tmp / f"{name}.onnx", args.threads)
        stats = time_interleaved(sessions, x.numpy(), args.repeat, warmup=10)
        med = {k: v["median"] for k, v in stats.items()}
        cells = [f"{med[r]:.3f} ({med['dense'] / med[r]:.2f}x)" for r in realizations]
        print(f"| {C}, {H}x{H} | {med['dense']:.3f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
