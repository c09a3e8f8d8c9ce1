"""``structexport costmodel fit``: the layer cost model of this CPU, from measurements.

Each layer shape of a grid (:data:`GRID`: the ResNet-18 and CIFAR ResNet convs with channel
and spatial structure, and MobileNet-style 1x1 convs with channel structure only) is built
as a sum-pool + small conv with random coefficients, and every realization of it and its
dense conv are timed under ONNX Runtime, interleaved, in the same network context as
``--autotune`` times them (:class:`structexport.passes.autotune.InNetwork`). The
coefficients of :mod:`structexport.layer_cost` are then fitted by non-negative least squares
on the relative error (each measurement weighs the same whatever its size), and stored for
this CPU (:func:`structexport.layer_cost.fitted_path`), where every later conversion on a
machine with this CPU model finds them.

AveragePool-3D, the reference form never chosen, is measured too, so that its coefficient
is this CPU's as well. The fit reports how well it predicts: the median and worst relative error of the predicted
times, and in how many layers the form it predicts fastest is the one measured fastest (or
within 10% of it).
"""
from __future__ import annotations

import datetime
import statistics
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from structexport.layer_cost import FEATURES, CostModel, LayerShape, layer_features
from structexport.layers.sumpool import REALIZATIONS


@dataclass(frozen=True)
class GridLayer:
    """A conv with structure: ``C`` inputs, ``out`` outputs, ``N x N`` kernel at ``c x n x n``."""
    C: int
    out: int
    size: int
    N: int
    c: int
    n: int
    padding: int
    stride: int = 1

    def label(self) -> str:
        return (f"{self.C}->{self.out} {self.N}x{self.N} at {self.c}x{self.n}x{self.n} "
                f"{self.size}x{self.size}" + (f" /{self.stride}" if self.stride > 1 else ""))


# ResNet-18 (ImageNet) and CIFAR ResNet convs, C/2 x 2x2; convs with spatial structure only;
# MobileNet-style 1x1 convs with channel structure C/2, on maps from 56x56 down to 7x7.
GRID = (
    GridLayer(16, 16, 32, 3, 8, 2, 1), GridLayer(32, 32, 16, 3, 16, 2, 1),
    GridLayer(64, 64, 8, 3, 32, 2, 1), GridLayer(64, 64, 56, 3, 32, 2, 1),
    GridLayer(128, 128, 28, 3, 64, 2, 1), GridLayer(256, 256, 14, 3, 128, 2, 1),
    GridLayer(512, 512, 7, 3, 256, 2, 1), GridLayer(64, 128, 56, 3, 32, 2, 1, 2),
    GridLayer(64, 64, 28, 3, 64, 2, 1), GridLayer(128, 128, 14, 3, 128, 2, 1),
    GridLayer(24, 72, 56, 1, 12, 1, 0), GridLayer(40, 120, 28, 1, 20, 1, 0),
    GridLayer(96, 96, 14, 1, 48, 1, 0), GridLayer(144, 48, 14, 1, 72, 1, 0),
    GridLayer(288, 96, 7, 1, 144, 1, 0), GridLayer(576, 576, 7, 1, 288, 1, 0),
    GridLayer(160, 480, 7, 1, 80, 1, 0), GridLayer(16, 64, 112, 1, 8, 1, 0),
)
# A handful for a quick look (tests, --quick): one of each kind.
QUICK_GRID = (GRID[0], GRID[2], GRID[12])


def build_layer(spec: GridLayer, seed: int = 0):
    """The sum-pool + small conv of ``spec``, random coefficients."""
    from structexport.layers.decomposed import decompose
    g = torch.Generator().manual_seed(seed)
    alpha = torch.randn(spec.out, spec.c, spec.n, spec.n, generator=g)
    return decompose(spec.C, alpha, None, spec.N, spec.stride, spec.padding, 1)


def in_network_features(shape: LayerShape) -> dict[str, float]:
    """The two identity depthwise 1x1 convs :class:`~structexport.passes.autotune.InNetwork`
    puts around every measured form (the same for all of a layer's forms)."""
    oh, ow = shape.output
    return {"depthwise_mac": shape.pool.channels * shape.height * shape.width
            + shape.out_channels * oh * ow,
            "conv_output": shape.pool.channels * shape.height * shape.width + shape.out_channels * oh * ow,
            "op": 2}


def measure_grid(grid=GRID, threads: int = 1, repeat: int = 30,
                 progress: Callable[[str], None] | None = None) -> list[dict]:
    """One row per layer and form: ``{"layer", "form", "ms", "features"}`` (features include
    the network context the form was timed in)."""
    from structexport.passes.autotune import measure
    say = progress or (lambda _m: None)
    rows = []
    for i, spec in enumerate(grid):
        layer = build_layer(spec, seed=i)
        shape = LayerShape.of(layer, spec.size, spec.size)
        say(f"costmodel: layer {i + 1}/{len(grid)}: {spec.label()}")
        times = measure(layer, layer.pool, (1, spec.C, spec.size, spec.size), threads, repeat,
                        dense=True, candidates=REALIZATIONS)
        context = in_network_features(shape)
        features = layer_features(shape)
        for form, ms in times.items():
            f = dict(features[form])
            for k, v in context.items():
                f[k] = f.get(k, 0.0) + v
            rows.append({"layer": spec.label(), "form": form, "ms": float(ms), "features": f})
    return rows


def fit_coefficients(rows: list[dict]) -> dict[str, float]:
    """Non-negative least squares of ``ms`` on the features, each row scaled by 1 / ms (so
    the relative error is what is minimised). Features no row uses get 0."""
    from scipy.optimize import nnls
    used = [k for k in FEATURES if any(r["features"].get(k) for r in rows)]
    A = np.array([[r["features"].get(k, 0.0) for k in used] for r in rows], dtype=np.float64)
    y = np.array([r["ms"] * 1e6 for r in rows], dtype=np.float64)     # nanoseconds
    scale = A.max(axis=0)
    scale[scale == 0] = 1.0
    weighted = A / scale / y[:, None]
    solution, _ = nnls(weighted, np.ones(len(rows)), maxiter=50 * len(used))
    coefficients = {k: 0.0 for k in FEATURES}
    coefficients.update({k: float(v / s) for k, v, s in zip(used, solution, scale)})
    return coefficients


def evaluate_fit(model: CostModel, rows: list[dict], tolerance: float = 0.10) -> dict:
    """How well ``model`` predicts ``rows``: relative errors, and per layer whether the form it
    predicts fastest is measured fastest (or within ``tolerance`` of the fastest)."""
    errors = [abs(model.predict_ms(r["features"]) - r["ms"]) / r["ms"] for r in rows]
    layers: dict[str, list[dict]] = {}
    for r in rows:
        if r["form"] != "avgpool3d":
            layers.setdefault(r["layer"], []).append(r)
    agree = 0
    per_layer = []
    for name, forms in layers.items():
        predicted = min(forms, key=lambda r: model.predict_ms(r["features"]))
        measured = min(forms, key=lambda r: r["ms"])
        ok = predicted["ms"] <= measured["ms"] * (1 + tolerance)
        agree += ok
        per_layer.append({"layer": name, "predicted_fastest": predicted["form"],
                          "measured_fastest": measured["form"],
                          "lost": round(predicted["ms"] / measured["ms"] - 1, 4)})
    return {"rows": len(rows), "median_relative_error": round(statistics.median(errors), 4),
            "max_relative_error": round(max(errors), 4), "layers": len(layers),
            "choices_within_tolerance": agree, "tolerance": tolerance, "per_layer": per_layer}


def fit_model(rows: list[dict], threads: int = 1, command: str = "structexport costmodel fit") -> CostModel:
    """A :class:`CostModel` of this machine fitted to ``rows``, with its fit quality."""
    from structexport.machine import cpu_info, package_version
    cpu = cpu_info()
    coefficients = fit_coefficients(rows)
    model = CostModel(coefficients, cpu["model"], list(cpu["simd"]), threads)
    model.fit = evaluate_fit(model, rows)
    model.source = (f"`{command}` on {datetime.date.today().isoformat()}, onnxruntime "
                    f"{package_version('onnxruntime')}, {threads} thread(s), {len({r['layer'] for r in rows})} "
                    f"layer shapes x {len({r['form'] for r in rows})} forms")
    return model
