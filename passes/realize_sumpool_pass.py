"""realize_sumpool: write each sum-pool in the form that is fast on the target.

The realizations (see :mod:`structexport.layers.sumpool`) compute the same values; a
cost model picks one per layer from its shape. The model counts element-wise passes over
memory, dense 1x1 multiply-accumulates (cheap: a GEMM, the cheaper the wider the CPU's
vectors), depthwise ones, pooling additions and layout changes, with weights fitted to
``benchmarks/sumpool_realizations.py`` and ``--autotune`` timings on ONNX Runtime CPU (one
thread).
AveragePool-3D is the reference form: never chosen, 8-12x slower than the dense conv.
``ctx.options["sumpool_realization"]`` forces one realization for every layer;
``ctx.options["autotune"]`` chooses by measurement instead (:mod:`.autotune`), cached per
target, machine and layer shape in ``ctx.options["tuning_cache"]`` (default
``~/.cache/structexport/sumpool-autotune.json``).
"""
from __future__ import annotations

import functools

import torch
import torch.nn as nn

from structexport.layers.sumpool import REALIZATIONS, SumPool, pool_pads

from .infra import LayerRecord, Pass, PassContext, PassError, PassResult, modules_of

# Relative cost of one unit of each kind of work (element-wise element = 1), fitted to
# --autotune, benchmarks/sumpool_realizations.py and ONNX Runtime profiler timings of the
# ResNet-18 layers on ONNX Runtime CPU, one thread (docs/benchmarks.md).
# A dense 1x1 multiply-accumulate (a GEMM) costs less the wider the CPU's vectors, while
# element-wise passes stay bound by memory: 0.2 per MAC at 8 fp32 lanes (fitted on an AVX2
# AMD EPYC: there the running-sum channel pool, "box", beat the banded 1x1 GEMM at every
# ResNet-18 shape), 0.07 at 16 (profiled on an AVX-512 Intel Xeon: a 64@56x56 band conv,
# 6.4 M MACs, 0.10 ms; 0.22 ns per element of an element-wise pass), i.e. 0.2 * (8 / lanes)^1.5.
GEMM_MAC_AT_8_LANES = 0.2
GEMM_LANES_EXPONENT = 1.5
DEPTHWISE_MAC = 1.0
ELEMENTWISE_PASSES = 4  # a running sum along one axis: cumsum, two slices, subtract, concat
# ONNX Runtime runs convs and 2-D pools of a network in its blocked layout (NCHWc), one
# after the other; an element-wise channel sum (CumSum..Concat, a Mul, a pool of a
# one-channel view) runs in the plain layout: its input leaves the blocked layout and its
# output comes back, a reorder each (profiled: 0.28 ns per element, 1.3 passes).
LAYOUT_CHANGE = 1.3
# An AveragePool over the channels of the (N, 1, C, H*W) view: ONNX Runtime's plain-layout
# pooling sums every window value by value (kc additions per pooled value, measured ~5x an
# element-wise pass each), where running sums need a fixed few passes.
POOL_WINDOW_ADD = 5.0


@functools.lru_cache(maxsize=1)
def simd_lanes() -> int:
    """fp32 lanes of this CPU's widest vector unit (the host the conversion runs on)."""
    from structexport.machine import cpu_info
    simd = set(cpu_info()["simd"])
    return 16 if "avx512f" in simd else 8 if "avx2" in simd else 4


def estimate_costs(pool: SumPool, height: int, width: int, lanes: int | None = None) -> dict[str, float]:
    """Estimated cost of each realization for an input of ``height x width`` (unpadded),
    on a CPU with ``lanes`` fp32 vector lanes (None: this host's)."""
    kc, kh, kw = pool.window
    Hp, Wp = height + 2 * pool.padding, width + 2 * pool.padding
    C, c = pool.channels, pool.out_channels
    Ho, Wo = Hp - kh + 1, Wp - kw + 1
    gemm_mac = GEMM_MAC_AT_8_LANES * (8 / (lanes or simd_lanes())) ** GEMM_LANES_EXPONENT
    # The box-filter forms pad inside their depthwise conv: channel sums run unpadded.
    channel_running_padded = ELEMENTWISE_PASSES * C * Hp * Wp if kc > 1 else 0
    channel_running = ELEMENTWISE_PASSES * C * height * width if kc > 1 else 0
    spatial_box = DEPTHWISE_MAC * c * Ho * Wo * kh * kw if kh * kw > 1 else 0
    spatial_running = ELEMENTWISE_PASSES * c * (Hp * Wp * (kh > 1) + Hp * Wo * (kw > 1))
    banded_channel = gemm_mac * c * (C // pool.groups) * height * width if kc > 1 else 0
    # leaving the blocked layout before an element-wise channel sum, and coming back after
    layout = LAYOUT_CHANGE * (C + c) * height * width
    # pool2d: the channel pool, one Mul by the volume, a zero Pad where the spatial pool
    # cannot pad, the spatial pool (a window sum per value, as the depthwise box)
    pool2d = (POOL_WINDOW_ADD * kc * c * height * width if kc > 1 else 0) + spatial_box
    if kc * kh * kw > 1:
        pool2d += c * height * width + layout
    if pool.padding and not pool_pads(pool.window, pool.padding):
        pool2d += c * Hp * Wp
    return {
        "avgpool3d": float(c * Ho * Wo * kc * kh * kw * 10),  # measured ~10x the adds it does
        "cumsum": float(channel_running_padded + spatial_running + (layout if kc * kh * kw > 1 else 0)),
        "banded": float(banded_channel + spatial_box),
        "box": float(channel_running + spatial_box + (layout if kc > 1 else 0)),
        "pool2d": float(pool2d),
    }


def _input_sizes(module: nn.Module, pools: list[tuple[str, SumPool]], shape) -> dict[str, tuple]:
    sizes, hooks = {}, []

    def record(name):
        def hook(_module, inputs, _output):
            sizes.setdefault(name, tuple(inputs[0].shape[-2:]))  # returns None: output kept
        return hook

    for name, pool in pools:
        hooks.append(pool.register_forward_hook(record(name)))
    training = module.training
    try:
        param = next(module.parameters(), None)
        with torch.no_grad():  # eval mode: a probe must not move batch-norm statistics
            module.eval()(torch.zeros(shape, dtype=param.dtype if param is not None else torch.float32))
    finally:
        module.train(training)
        for h in hooks:
            h.remove()
    return sizes


def _tuner(ctx: PassContext):
    """The measuring tuner when ``--autotune`` asked for one (and no realization is forced)."""
    if not ctx.option("autotune", False) or ctx.option("sumpool_realization"):
        return None
    from .autotune import Tuner
    return Tuner(ctx)


class RealizeSumPoolPass(Pass):
    name = "realize_sumpool"
    description = "each sum-pool written in its cheapest form for the target (cost model)"

    def requires(self, module: nn.Module, ctx: PassContext) -> None:
        forced = ctx.option("sumpool_realization")
        if forced is not None and forced not in REALIZATIONS:
            raise PassError(f"unknown sum-pool realization {forced!r}",
                            f"choose one of {', '.join(REALIZATIONS)}")

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        pools = modules_of(module, SumPool)
        if not pools:
            return PassResult(module, False, [])
        forced = ctx.option("sumpool_realization")
        sizes = _input_sizes(module, pools, ctx.input_shape)
        tuner = _tuner(ctx)
        records, modified = [], False
        for name, pool in pools:
            if name not in sizes:  # never reached at this input: no shape for the cost model
                if pool.realization == "avgpool3d" and not forced:
                    pool.realization, modified = "cumsum", True
                elif forced:
                    pool.realization = forced
                records.append(LayerRecord(name, "unused", {"realization": pool.realization}))
                continue
            costs = estimate_costs(pool, *sizes[name])
            choice = forced or min((r for r in REALIZATIONS if r != "avgpool3d"), key=costs.get)
            details = {"estimated_cost": {k: round(v) for k, v in costs.items()}}
            if tuner:
                choice, details["measured_ms"], details["cached"] = tuner.choose(
                    module, name, pool, sizes[name], ctx.input_shape[0])
                details["chosen_by"] = "measurement"
            else:
                details["chosen_by"] = "forced" if forced else "cost model"
            modified |= choice != pool.realization
            pool.realization = choice
            records.append(LayerRecord(name, "realized", {
                "realization": choice, "forced": forced is not None,
                "input": list(sizes[name]), "window": list(pool.window),
                "additions": pool.additions(*sizes[name]), **details}))
        if tuner:
            tuner.save()
        return PassResult(module, modified, records)

    def ensures(self, module: nn.Module, ctx: PassContext) -> None:
        if ctx.option("sumpool_realization") == "avgpool3d":
            return  # asked for explicitly
        naive = [n for n, p in modules_of(module, SumPool) if p.realization == "avgpool3d"]
        if naive:
            raise PassError(f"sum-pools left as AveragePool-3D: {', '.join(naive[:3])}")
