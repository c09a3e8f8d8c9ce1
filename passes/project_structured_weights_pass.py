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

import numpy as np
import onnx_ir as ir

from structexport.discovery import EXACT, discover_structure
from structexport.layers.structured import compose_kernel

from .decompose_structured_conv_pass import DEFAULT_MIN_SAVING, layer_name, plain_conv
from .infra import LayerRecord, Pass, PassContext, PassResult


class ProjectStructuredWeightsPass(Pass):
    name = "project_structured_weights"
    ir = "onnx"
    changes_outputs = True
    description = "approximately structured kernels are projected onto their structure (--max-residual)"

    def call(self, model: ir.Model, ctx: PassContext) -> PassResult:
        max_residual = ctx.option("max_residual") or EXACT
        min_saving = ctx.option("min_saving", DEFAULT_MIN_SAVING)
        records, modified = [], False
        if max_residual <= EXACT:
            return PassResult(model, False, records)
        for node in [n for n in model.graph if n.op_type == "Conv" and n.domain in ("", "ai.onnx")]:
            conv, _why = plain_conv(node)
            if conv is None:
                continue
            found = discover_structure(conv["weight"], max_residual)
            if not found.structured or found.macs_ratio > 1 - min_saving or found.residual <= EXACT:
                continue
            weight = node.inputs[1]
            alpha = found.alpha.detach().double() if hasattr(found.alpha, "detach") else found.alpha
            projected = compose_kernel(alpha, found.C, found.N).numpy().astype(conv["weight"].dtype)
            # in place, under its own name: the layer keeps its name in records and profiles
            weight.const_value = ir.tensor(np.ascontiguousarray(projected), name=weight.name)
            records.append(LayerRecord(layer_name(weight), "projected",
                                       {"c": found.c, "n": found.n, "residual": found.residual}))
            modified = True
        return PassResult(model, modified, records)
