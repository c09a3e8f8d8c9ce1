"""Predicted time of a structured layer's forms, and of its dense conv, per CPU class.

A layer with structure (a sum-pool + small conv, :mod:`structexport.layers.decomposed`)
can run in several realizations of its sum-pool (:mod:`structexport.layers.sumpool`), or
as the dense conv it came from. Which is fastest depends on the shape and on the CPU: a
channel running sum over a 7x7 map is memory-bound and pays per-operator overhead that a
dense 1x1 GEMM does not. This module counts the work of each form in a few kinds
(:data:`FEATURES`) and predicts nanoseconds with one coefficient per kind:

- ``conv_mac``: a multiply-accumulate of a non-depthwise conv (the band, the small conv,
  the dense conv) -- a GEMM, cheaper the wider the vectors;
- ``depthwise_mac``: one of a depthwise conv (the box of ones, the spatial pool);
- ``conv_output``: one value a conv writes (and the next operator reads back): a 1x1 conv
  on a large map with few channels is bound by this, not by its multiplies;
- ``elementwise``: one element of an element-wise pass (a running sum along an axis is
  :data:`RUNNING_SUM_PASSES` of them: cumsum, two slices, a subtract, a concat);
- ``layout``: one element leaving ONNX Runtime's blocked layout before an element-wise
  channel sum and coming back after;
- ``pool_add``: one addition of an average pool over the channels of a one-channel view
  (ONNX Runtime sums such windows value by value);
- ``naive_add``: one addition of AveragePool-3D (the reference realization, never chosen);
- ``op``: one operator run (fixed overhead: dispatch, allocation, threading).

The coefficients are a :class:`CostModel`, fitted on a CPU by ``structexport costmodel fit``
(:mod:`structexport.cost_fit`: each form timed under ONNX Runtime, least squares with
non-negative weights) and stored per CPU: a fit made on this machine (in the cache) wins,
then one shipped for the same CPU model (``structexport/cost_models/``), then the shipped
one of the same vector width, with a note that says the CPU was not fitted.
``$STRUCTEXPORT_COST_MODEL`` (a path or a shipped name) overrides the lookup, as the tests
do so that their decisions are the same on every CPU.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from structexport.errors import StructExportError
from structexport.fsutil import cache_root, write_text_atomic

FEATURES = ("conv_mac", "depthwise_mac", "conv_output", "elementwise", "layout", "pool_add", "naive_add", "op")
RUNNING_SUM_PASSES = 4   # cumsum, two slices, a subtract, a concat: passes over the values
SHIPPED_DIR = Path(__file__).with_name("cost_models")
# Targets whose runtime the cost model predicts (ONNX Runtime CPU): there a layer predicted
# no faster structured than dense is kept dense. TVM fuses the sum-pool into its own kernel,
# and ExecuTorch and LiteRT choose per layer by timing their INT8 forms.
DENSE_BY_COST_TARGETS = ("onnx", "ort-cpu")
# A layer is decomposed only when its structure is predicted (or measured) at least this much
# faster than its dense conv: a smaller gain is within a prediction's error and a shared
# machine's noise, and the dense conv is the safe side (it is what the user gave).
MIN_SPEEDUP = 1.05
ENV = "STRUCTEXPORT_COST_MODEL"


class CostModelError(StructExportError):
    """A cost model file that cannot be used (named in the message)."""
    exit_code, kind = 2, "cost-model"


@dataclass
class CostModel:
    """Nanoseconds per unit of each feature, and where they come from."""
    coefficients: dict[str, float]
    cpu: str = "unknown"                  # the CPU model the coefficients were fitted on
    isa: list[str] = field(default_factory=list)
    threads: int = 1
    source: str = ""                      # how they were obtained (command, date, fit error)
    fit: dict = field(default_factory=dict)   # the fit's quality, when fitted here
    path: str | None = None               # the file it was read from
    note: str | None = None               # why this machine uses a model of another CPU

    def predict_ns(self, features: dict[str, float]) -> float:
        unknown = set(features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown cost features {sorted(unknown)}")
        return float(sum(self.coefficients.get(k, 0.0) * v for k, v in features.items()))

    def predict_ms(self, features: dict[str, float]) -> float:
        return self.predict_ns(features) / 1e6

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("path")
        out.pop("note")
        return out

    def describe(self) -> dict:
        """What a manifest records of the model a decision used."""
        return {"cpu": self.cpu, "isa": list(self.isa), "threads": self.threads,
                "source": self.source, "path": self.path, "note": self.note}

    @classmethod
    def from_dict(cls, data: dict, path: str | None = None) -> CostModel:
        coefficients = data.get("coefficients")
        if not isinstance(coefficients, dict) or not coefficients:
            raise CostModelError(f"{path or 'cost model'}: no coefficients")
        bad = [k for k, v in coefficients.items()
               if k not in FEATURES or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0]
        if bad:
            raise CostModelError(f"{path or 'cost model'}: bad coefficient(s) {bad} (expected "
                                 f"non-negative numbers for {', '.join(FEATURES)})")
        return cls({k: float(v) for k, v in coefficients.items()}, str(data.get("cpu", "unknown")),
                   list(data.get("isa", [])), int(data.get("threads", 1)), str(data.get("source", "")),
                   dict(data.get("fit") or {}), path)

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(path, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------- which model this machine uses

def vector_class(isa: list[str]) -> str:
    """The vector width class a CPU's ISA list falls in: ``avx512``, ``avx2`` or ``other``."""
    flags = set(isa)
    return "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"


def cpu_slug(model: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or "unknown-cpu"


def fitted_path(cpu_model: str | None = None) -> Path:
    """Where ``costmodel fit`` stores the model of ``cpu_model`` (this machine's by default)."""
    from structexport.machine import cpu_info
    return cache_root() / "cost-models" / f"{cpu_slug(cpu_model or cpu_info()['model'])}.json"


def shipped_models() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.json"))}


def read_model(path: str | Path) -> CostModel:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CostModelError(f"cannot read the cost model {path}: {exc}",
                             "fit it again with `structexport costmodel fit`") from None
    if not isinstance(data, dict):
        raise CostModelError(f"{path} is not a cost model (a JSON object)")
    return CostModel.from_dict(data, str(path))


def _by_name(name: str) -> CostModel:
    shipped = shipped_models()
    if name in shipped:
        return read_model(shipped[name])
    if Path(name).expanduser().is_file():
        return read_model(Path(name).expanduser())
    raise CostModelError(f"${ENV}={name!r} is neither a file nor a shipped cost model "
                         f"({', '.join(shipped) or 'none'})")


def load_cost_model(cpu: dict | None = None) -> CostModel:
    """The cost model for ``cpu`` (:func:`structexport.machine.cpu_info`, this machine's by
    default): ``$STRUCTEXPORT_COST_MODEL``, else a fit made here, else the shipped model of
    the same CPU model, else the shipped model of the same vector class (with a note)."""
    from structexport.machine import cpu_info
    override = os.environ.get(ENV)
    if override:
        return _by_name(override)
    cpu = cpu or cpu_info()
    fitted = fitted_path(cpu["model"])
    if fitted.is_file():
        return read_model(fitted)
    shipped = [read_model(p) for p in shipped_models().values()]
    for model in shipped:
        if model.cpu == cpu["model"]:
            return model
    wanted = vector_class(cpu["simd"])
    same = [m for m in shipped if vector_class(m.isa) == wanted] or \
        [m for m in shipped if vector_class(m.isa) == "avx2"] or shipped
    if not same:
        raise CostModelError(f"no cost model ships with this structexport ({SHIPPED_DIR} is empty)",
                             "run `structexport costmodel fit`, or reinstall structexport")
    model = same[0]
    model.note = (f"no cost model was fitted on this CPU ({cpu['model']}); using the one fitted "
                  f"on {model.cpu}: run `structexport costmodel fit` to fit this CPU")
    return model


# ---------------------------------------------------------------- the work of each form

def _add(*parts: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            if v:
                out[k] = out.get(k, 0.0) + float(v)
    return out


def sumpool_features(pool, height: int, width: int) -> dict[str, dict[str, float]]:
    """The work of each realization of ``pool`` (a :class:`~structexport.layers.sumpool.SumPool`)
    on an unpadded ``height x width`` input, as ONNX Runtime runs it."""
    from structexport.layers.sumpool import pool_pads
    kc, kh, kw = pool.window
    p = pool.padding
    Hp, Wp = height + 2 * p, width + 2 * p
    C, c = pool.channels, pool.out_channels
    Ho, Wo = Hp - kh + 1, Wp - kw + 1
    spatial = kh * kw > 1
    box = {"depthwise_mac": c * Ho * Wo * kh * kw, "conv_output": c * Ho * Wo, "op": 1} if spatial else {}
    # leaving the blocked layout before an element-wise channel sum, and coming back after
    layout = {"layout": (C + c) * height * width}
    running_channels = {"elementwise": RUNNING_SUM_PASSES * C * height * width, "op": 6} if kc > 1 else {}
    cumsum = _add({"elementwise": RUNNING_SUM_PASSES * C * Hp * Wp, "op": 6} if kc > 1 else {},
                  {"elementwise": RUNNING_SUM_PASSES * c * Hp * Wp, "op": 6} if kh > 1 else {},
                  {"elementwise": RUNNING_SUM_PASSES * c * Hp * Wo, "op": 6} if kw > 1 else {},
                  layout if kc * kh * kw > 1 else {})
    banded = _add({"conv_mac": c * (C // pool.groups) * height * width, "conv_output": c * height * width,
                   "op": 1} if kc > 1 else {}, box)
    boxed = _add(running_channels, box, layout if kc > 1 else {})
    # the channel pool of the (N * groups, 1, C / groups, H * W) view, one Mul by the
    # volume, a zero Pad where the spatial pool cannot pad, the spatial pool
    pool2d = _add({"pool_add": kc * c * height * width, "op": 3} if kc > 1 else {}, box,
                  _add({"elementwise": c * height * width, "op": 1}, layout) if kc * kh * kw > 1 else {},
                  {"elementwise": c * Hp * Wp, "op": 1} if p and not pool_pads(pool.window, p) else {})
    naive = {"naive_add": c * Ho * Wo * kc * kh * kw, "op": 4}
    return {"avgpool3d": naive, "cumsum": cumsum, "banded": banded, "box": boxed, "pool2d": pool2d}


def conv_features(out_channels: int, in_per_group: int, kernel: int, out_h: int, out_w: int,
                  groups: int = 1) -> dict[str, float]:
    """The work of one conv (``groups`` of ``out_channels / groups`` filters each)."""
    macs = out_channels * in_per_group * kernel * kernel * out_h * out_w
    depthwise = groups > 1 and in_per_group == 1
    return {"depthwise_mac" if depthwise else "conv_mac": macs, "conv_output": out_channels * out_h * out_w,
            "op": 1}


@dataclass
class LayerShape:
    """A decomposed layer: its sum-pool and small conv, the dense conv they compose to."""
    pool: object          # SumPool
    out_channels: int
    kernel: int           # the small conv's n
    stride: int
    height: int           # the layer's (unpadded) input
    width: int

    @property
    def dense_kernel(self) -> int:
        return self.kernel + self.pool.window[1] - 1

    @property
    def output(self) -> tuple[int, int]:
        p, N, s = self.pool.padding, self.dense_kernel, self.stride
        return (self.height + 2 * p - N) // s + 1, (self.width + 2 * p - N) // s + 1

    @classmethod
    def of(cls, layer, height: int, width: int) -> LayerShape:
        """Of a :class:`~structexport.layers.decomposed.DecomposedStructuredConv`."""
        conv = layer.conv
        return cls(layer.pool, conv.out_channels, conv.kernel_size[0], conv.stride[0], height, width)


def layer_features(shape: LayerShape) -> dict[str, dict[str, float]]:
    """The work of each realization (sum-pool + small conv) and of ``"dense"``."""
    pool = shape.pool
    oh, ow = shape.output
    g = pool.groups
    small = conv_features(shape.out_channels, pool.out_channels // g, shape.kernel, oh, ow, g)
    dense = conv_features(shape.out_channels, pool.channels // g, shape.dense_kernel, oh, ow, g)
    forms = {name: _add(f, small) for name, f in sumpool_features(pool, shape.height, shape.width).items()}
    forms["dense"] = dense
    return forms


def theoretical_speedup(shape: LayerShape) -> float:
    """Dense multiplies over the small conv's (DESIGN.md section 4)."""
    g = shape.pool.groups
    small = shape.out_channels * (shape.pool.out_channels // g) * shape.kernel ** 2
    dense = shape.out_channels * (shape.pool.channels // g) * shape.dense_kernel ** 2
    return dense / small


def _under_margin(speedup: float) -> str:
    return (f", under the {MIN_SPEEDUP:.2f}x a layer must gain to be decomposed"
            if 1 <= speedup < MIN_SPEEDUP else "")


def measured_reason(ms: dict[str, float]) -> str:
    """Why a layer ``--autotune`` timed stays dense (``ms``: each form's median, ``"dense"``'s)."""
    best = min(v for k, v in ms.items() if k != "dense")
    return (f"measured {best:.4f} ms structured against {ms['dense']:.4f} ms dense"
            + _under_margin(ms["dense"] / best if best else 0.0))


@dataclass
class Decision:
    """What a layer becomes, by the cost model: a realization, or ``"dense"``."""
    choice: str                         # a realization name or "dense"
    best_realization: str               # the cheapest realization (also when dense wins)
    predicted_ms: dict[str, float]      # every candidate, dense included
    theoretical_speedup: float
    predicted_speedup: float            # dense over the best realization

    @property
    def dense(self) -> bool:
        return self.choice == "dense"

    def reason(self) -> str:
        best = self.predicted_ms[self.best_realization]
        return (f"predicted {best:.4f} ms structured ({self.best_realization}) against "
                f"{self.predicted_ms['dense']:.4f} ms dense: {self.predicted_speedup:.2f}x "
                f"of a theoretical {self.theoretical_speedup:.2f}x" + _under_margin(self.predicted_speedup))

    def details(self) -> dict:
        return {"theoretical_speedup": round(self.theoretical_speedup, 3),
                "predicted_speedup": round(self.predicted_speedup, 3),
                "predicted_ms": {k: round(v, 5) for k, v in self.predicted_ms.items()}}


def decide(shape: LayerShape, model: CostModel, candidates: tuple[str, ...]) -> Decision:
    """The cheapest of ``candidates`` (realizations), or the dense conv unless that realization
    is predicted at least :data:`MIN_SPEEDUP` times faster, by ``model``."""
    features = layer_features(shape)
    predicted = {k: model.predict_ms(features[k]) for k in (*candidates, "dense")}
    best = min(candidates, key=predicted.get)
    speedup = predicted["dense"] / predicted[best] if predicted[best] > 0 else math.inf
    choice = "dense" if predicted["dense"] < predicted[best] * MIN_SPEEDUP else best
    return Decision(choice, best, predicted, theoretical_speedup(shape), speedup)
