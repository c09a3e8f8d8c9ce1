"""project_structured_weights: kernels that are *approximately* structured (a model trained
with the structural-regularization loss) are replaced by their projection onto the
structure, in an ONNX graph, so that ``decompose_structured_conv`` can decompose them.

Only with ``max_residual`` above the exact tolerance (``--max-residual R``): a conv whose
cheapest structure within ``R`` saves at least ``min_saving`` of its multiplies gets the
least-squares projection of its kernel. This moves the model's outputs on purpose
(``changes_outputs``): the artifact is then verified against the projected graph -- the
*decomposed reference* -- and the conversion reports how far that moved from the source.
Exactly structured kernels (residual within float32 precision) are left as they are.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import torch

from structexport.discovery import EXACT, discover_structure, project_kronecker
from structexport.layers.structured import compose_kernel

from .decompose_structured_conv_pass import (DEFAULT_MIN_SAVING, check_declared_globs, conv_layers,
                                             declared_structure, layer_name, plain_conv)
from .decompose_structured_pass import DEFAULT_MAX_RESIDUAL as DECLARED_MAX_RESIDUAL
from .infra import LayerRecord, Pass, PassContext, PassError, PassResult


class ProjectStructuredWeightsPass(Pass):
    name = "project_structured_weights"
    ir = "onnx"
    changes_outputs = True
    description = "approximately structured kernels are projected onto their structure (--max-residual)"

    def call(self, model: ir.Model, ctx: PassContext) -> PassResult:
        max_residual = ctx.option("max_residual") or EXACT
        min_saving = ctx.option("min_saving", DEFAULT_MIN_SAVING)
        declared_any = bool(ctx.option("declared_structures"))
        records, modified, too_far = [], False, []
        check_declared_globs(conv_layers(model), ctx)
        if max_residual <= EXACT and not declared_any:
            return PassResult(model, False, records)
        for node in [n for n in model.graph if n.op_type == "Conv" and n.domain in ("", "ai.onnx")]:
            conv, _why = plain_conv(node)
            if conv is None:
                continue
            weight = node.inputs[1]
            declared = declared_structure(layer_name(weight), conv["weight"].shape[1], ctx)
            if declared is not None:
                if declared[1] > conv["weight"].shape[2]:
                    continue
                # declared layers: the user's structure, within --max-residual (0.01 by default)
                limit = ctx.option("max_residual") or DECLARED_MAX_RESIDUAL
                alpha, residual = project_kronecker(conv["weight"], *declared)
                if residual > limit and not ctx.option("force"):
                    too_far.append((layer_name(weight), residual))
                    continue
                found = _Found(declared[0], declared[1], conv["weight"].shape[1], conv["weight"].shape[2],
                               residual, alpha)
                if residual <= EXACT:
                    continue
            else:
                if max_residual <= EXACT:
                    continue
                found = discover_structure(conv["weight"], max_residual)
                if not found.structured or found.macs_ratio > 1 - min_saving or found.residual <= EXACT:
                    continue
            alpha = torch.as_tensor(found.alpha).double()
            projected = compose_kernel(alpha, found.C, found.N).numpy().astype(conv["weight"].dtype)
            # in place, under its own name: the layer keeps its name in records and profiles
            weight.const_value = ir.tensor(np.ascontiguousarray(projected), name=weight.name)
            records.append(LayerRecord(layer_name(weight), "projected",
                                       {"c": found.c, "n": found.n, "residual": found.residual,
                                        "declared": declared is not None}))
            modified = True
        if too_far:
            worst = max(too_far, key=lambda t: t[1])
            raise PassError(f"{len(too_far)} declared layers are too far from their structure "
                            f"(worst: {worst[0]}, relative residual {worst[1]:.4f})",
                            "raise --max-residual, or pass --force to project them anyway")
        return PassResult(model, modified, records)


@dataclass
class _Found:
    c: int
    n: int
    C: int
    N: int
    residual: float
    alpha: object
