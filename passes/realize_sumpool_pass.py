"""realize_sumpool: write each sum-pool in the form that is fast on the target -- or, where
no form beats it, put the dense conv back.

The realizations (see :mod:`structexport.layers.sumpool`) compute the same values; the
layer cost model of this CPU class (:mod:`structexport.layer_cost`, fitted by
``structexport costmodel fit``) predicts each one's time, with the small conv it feeds, and
the dense conv's. The cheapest realization is chosen; on ONNX Runtime targets
(:data:`~structexport.layer_cost.DENSE_BY_COST_TARGETS`) a layer whose dense conv is
predicted at least as fast is composed back into it (exact: the composed kernel), so that
no layer is made slower by its structure. The record says why.
AveragePool-3D is the reference form: never chosen, 8-12x slower than the dense conv.
``ctx.options["sumpool_realization"]`` forces one realization for every layer (nothing is
composed back); ``ctx.options["autotune"]`` chooses by measurement instead (:mod:`.autotune`,
the dense conv timed too), cached per target, machine and layer shape in
``ctx.options["tuning_cache"]`` (default ``~/.cache/structexport/sumpool-autotune.json``).
``ctx.options["cost_model"]`` (a :class:`~structexport.layer_cost.CostModel`) replaces
this machine's model.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from structexport.layer_cost import (DENSE_BY_COST_TARGETS, CostModel, LayerShape, decide,
                                     load_cost_model, measured_reason, sumpool_features)
from structexport.layers.decomposed import DecomposedStructuredConv, composed_conv
from structexport.layers.sumpool import MEASURABLE_REALIZATIONS, REALIZATIONS, SumPool

from .infra import LayerRecord, Pass, PassContext, PassError, PassResult, modules_of, replace_module


def cost_model(ctx: PassContext) -> CostModel:
    """``ctx.options["cost_model"]``, else this machine's (:func:`load_cost_model`)."""
    return ctx.option("cost_model") or load_cost_model()


def estimate_costs(pool: SumPool, height: int, width: int, model: CostModel | None = None) -> dict[str, float]:
    """Predicted nanoseconds of each realization of ``pool`` (the sum-pool alone) for an
    input of ``height x width`` (unpadded), by ``model`` (None: this machine's)."""
    model = model or load_cost_model()
    return {k: model.predict_ns(f) for k, f in sumpool_features(pool, height, width).items()}


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
    description = ("each sum-pool written in its cheapest form for the target, or its layer "
                   "composed back to the dense conv where that is faster (cost model)")

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
        model = cost_model(ctx)
        records, modified = [], False
        for name, pool in pools:
            if name not in sizes:  # never reached at this input: no shape for the cost model
                if pool.realization == "avgpool3d" and not forced:
                    pool.realization, modified = "cumsum", True
                elif forced:
                    pool.realization = forced
                records.append(LayerRecord(name, "unused", {"realization": pool.realization}))
                continue
            layer_name = name.rpartition(".")[0]
            layer = module.get_submodule(layer_name) if layer_name else None
            if not (isinstance(layer, DecomposedStructuredConv) and layer.pool is pool):
                layer = None    # a lone sum-pool (a structured linear layer): no dense conv to weigh
            may_compose = layer is not None and not forced and (
                ctx.target in DENSE_BY_COST_TARGETS or (tuner is not None and tuner.weighs_dense))
            costs = estimate_costs(pool, *sizes[name], model)
            details = {"estimated_cost": {k: round(v) for k, v in costs.items()}}
            decision = decide(LayerShape.of(layer, *sizes[name]), model, MEASURABLE_REALIZATIONS) \
                if layer is not None else None
            if decision is not None:
                details.update(decision.details())
            choice = forced or (decision.best_realization if decision is not None else
                                min(MEASURABLE_REALIZATIONS, key=costs.get))
            if tuner:
                choice, details["measured_ms"], details["cached"] = tuner.choose(
                    module, name, pool, sizes[name], ctx.input_shape[0], dense=may_compose)
                details["chosen_by"] = "measurement"
            else:
                details["chosen_by"] = "forced" if forced else "cost model"
                if may_compose and decision.dense:
                    choice = "dense"
            if not forced:
                details["cost_model"] = model.cpu
                if model.note:     # a model of another CPU: convert says so
                    details["cost_model_note"] = model.note
            if choice == "dense":
                replace_module(module, layer_name, composed_conv(layer))
                modified = True
                ms = details.get("measured_ms")
                details["reason"] = decision.reason() if tuner is None else measured_reason(ms)
                records.append(LayerRecord(name, "kept dense", {
                    "input": list(sizes[name]), "window": list(pool.window), **details}))
                continue
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
