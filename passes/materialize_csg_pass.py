"""materialize_csg: generated CSG kernels become plain conv weights, computed once.

A CSG model exported as it is regenerates every kernel (codes @ generator, reshape, crop)
at every inference. This pass computes each kernel once, at conversion, and leaves no
generator arithmetic in the model. With ``keep_csg_codes`` the codes and the generator
stay as they are (a smaller artifact), for targets that fold constants at load time.
"""
from __future__ import annotations

import torch.nn as nn

from structexport.layers import CSGConv2d, CSGGenerator

from .infra import LayerRecord, Pass, PassContext, PassError, PassResult, modules_of, replace_module


class MaterializeCSGPass(Pass):
    name = "materialize_csg"
    description = "CSG kernels computed once at conversion and stored as conv weights"

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        layers = modules_of(module, CSGConv2d)
        if ctx.option("keep_csg_codes", False):
            return PassResult(module, False, [
                LayerRecord(name, "kept codes", {"codes": list(m.code.shape),
                                                 "reason": "keep_csg_codes: the target folds constants"})
                for name, m in layers])
        records = []
        for name, conv in layers:
            replace_module(module, name, conv.to_dense())
            records.append(LayerRecord(name, "materialized", {
                "kernel": list(conv.kernel_shape), "codes": list(conv.code.shape),
                "slice": list(conv.generator.slice_shape)}))
        # The generator has no user left: drop it so it is not exported.
        for name, _ in modules_of(module, CSGGenerator):
            parent, _, child = name.rpartition(".")
            delattr(module.get_submodule(parent) if parent else module, child)
        return PassResult(module, bool(records), records)

    def ensures(self, module: nn.Module, ctx: PassContext) -> None:
        if ctx.option("keep_csg_codes", False):
            return
        left = [n for n, _ in modules_of(module, (CSGConv2d, CSGGenerator))]
        if left:
            raise PassError(f"CSG layers remain after materialization: {', '.join(left[:3])}")
