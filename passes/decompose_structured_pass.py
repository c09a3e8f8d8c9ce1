"""decompose_structured: structured convs become an explicit sum-pool and a small conv.

``conv2d(X, W, stride=s, padding=p) == conv2d(SumPool(pad(X, p)), alpha, stride=s)``
(DESIGN.md section 1.1). The pass rewrites every :class:`StructuredConv2d`, and every dense
conv the user declares as trained toward a ``c x n x n`` structure
(``declared_structures``: ``{layer name or glob: "c2n2" | "c1n2" | (c, n)}``). A declared
dense conv is projected onto the structure; the relative residual is recorded, and the
pass refuses layers above ``max_residual`` unless ``force``.
"""
from __future__ import annotations

import fnmatch

import torch.nn as nn

from structexport.layers import StructuredConv2d, StructuredLinear, box_window, project_to_structure
from structexport.layers.common import dense_linear
from structexport.layers.decomposed import DecomposedStructuredLinear, decompose
from structexport.layers.sumpool import SumPool

from .infra import LayerRecord, Pass, PassContext, PassError, PassResult, modules_of, replace_module

DEFAULT_MAX_RESIDUAL = 0.01


def _structure_for(spec, conv: nn.Conv2d) -> tuple[int, int]:
    C = conv.in_channels // conv.groups
    if spec in ("c2n2", "c1n2"):
        return (max(1, C // 2) if spec == "c2n2" else C), 2
    c, n = spec
    return int(c), int(n)


class DecomposeStructuredPass(Pass):
    name = "decompose_structured"
    description = "structured convs (and declared dense convs) become sum-pool + small conv"

    def _declared(self, module: nn.Module, ctx: PassContext) -> list[tuple[str, nn.Conv2d, tuple]]:
        declared = ctx.option("declared_structures") or {}
        found = []
        for name, conv in modules_of(module, nn.Conv2d):
            for pattern, spec in declared.items():
                if fnmatch.fnmatchcase(name, pattern):
                    found.append((name, conv, _structure_for(spec, conv)))
                    break
        return found

    def requires(self, module: nn.Module, ctx: PassContext) -> None:
        convs = [name for name, _ in modules_of(module, nn.Conv2d)]
        unmatched = [glob for glob in (ctx.option("declared_structures") or {})
                     if not any(fnmatch.fnmatchcase(name, glob) for name in convs)]
        if unmatched:   # it would declare nothing: refused (exit 2), never ignored
            from .infra import PassOptionError
            shown = ", ".join(convs[:6]) + (", ..." if len(convs) > 6 else "")
            raise PassOptionError(f"--declare-structured {', '.join(repr(g) for g in unmatched)} "
                                  f"match{'es' if len(unmatched) == 1 else ''} no conv of the model",
                                  f"name its convs: {shown or 'it has none'}")
        for name, conv, (c, n) in self._declared(module, ctx):
            if conv.kernel_size[0] != conv.kernel_size[1] or conv.dilation != (1, 1):
                raise PassError(f"{name} cannot be declared structured: it needs a square, "
                                "undilated kernel")
            try:
                box_window(conv.in_channels // conv.groups, conv.kernel_size[0], c, n)
            except ValueError as exc:
                raise PassError(f"{name}: {exc}") from None

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        realization = ctx.option("sumpool_realization", "cumsum")
        max_residual = ctx.option("max_residual") or DEFAULT_MAX_RESIDUAL
        force = ctx.option("force", False)
        records, too_far = [], []
        for name, conv, (c, n) in self._declared(module, ctx):
            alpha, residual = project_to_structure(conv.weight.detach(), c, n)
            if residual > max_residual and not force:
                too_far.append((name, residual))
                continue
            replace_module(module, name, decompose(conv.in_channels, alpha, conv.bias, conv.kernel_size[0],
                                                   conv.stride[0], conv.padding[0], conv.groups,
                                                   realization))
            records.append(LayerRecord(name, "decomposed", {
                "structure": [c, n, n], "C": conv.in_channels // conv.groups, "N": conv.kernel_size[0],
                "residual": residual, "source": "declared dense conv",
                "forced": residual > max_residual}))
        if too_far:
            worst = max(too_far, key=lambda t: t[1])
            raise PassError(f"{len(too_far)} declared layers are too far from their structure "
                            f"(worst: {worst[0]}, relative residual {worst[1]:.4f} > {max_residual})",
                            "raise --max-residual, or pass --force to project them anyway")
        for name, layer in modules_of(module, StructuredConv2d):
            alpha, residual = layer.decompose()
            replace_module(module, name, decompose(layer.in_channels, alpha, layer.bias, layer.kernel_size,
                                                   layer.stride, layer.padding, layer.groups,
                                                   realization))
            records.append(LayerRecord(name, "decomposed", {
                "structure": [layer.c, layer.n, layer.n], "C": layer.in_channels // layer.groups,
                "N": layer.kernel_size, "residual": residual, "source": f"structured conv ({layer.mode} mode)"}))
        for name, layer in modules_of(module, StructuredLinear):
            alpha, residual = layer.decompose()
            pool = SumPool(layer.in_features, layer.window, 0, 1, realization)
            linear = dense_linear(alpha.reshape(layer.out_features, layer.c), layer.bias)
            replace_module(module, name, DecomposedStructuredLinear(pool, linear))
            records.append(LayerRecord(name, "decomposed", {
                "structure": [layer.c], "residual": residual, "source": "structured linear"}))
        return PassResult(module, bool(records), records)

    def ensures(self, module: nn.Module, ctx: PassContext) -> None:
        left = [n for n, _ in modules_of(module, (StructuredConv2d, StructuredLinear))]
        if left:
            raise PassError(f"structured convs remain: {', '.join(left[:3])}")
