"""fold_batchnorm: an eval-mode BatchNorm2d right after a conv is folded into the conv.

In eval mode ``bn(y) = scale * y + shift`` per channel, with
``scale = gamma / sqrt(running_var + eps)`` and ``shift = beta - running_mean * scale``, so
``bn(conv(x))`` is one conv with weight ``scale[o] * W[o]`` and bias ``scale * b + shift``.
The BN becomes ``nn.Identity``.

Which BN follows which conv is read from a ``torch.fx`` trace of the model, read-only: the
model itself is rewritten at the level of modules, keeping its names. A pair is folded only
when the BN module is applied once, directly to the output of a conv module that is
applied once and whose output has no other user. Convs are ``nn.Conv2d`` (any groups,
stride, padding, padding mode) and any module that exposes ``fold_affine(scale, shift)``
(:class:`~structexport.layers.lowered_ssc.LoweredSSCConv`). The project's structured layers
(``structexport.layers``) and the modules other passes emit are kept whole in the trace, so
a BN after a CSG or SSC layer is left alone (materialise or lower those first).

A ``running_var`` of ``+inf`` (seen in a real FP16 checkpoint) gives that channel a scale of
exactly 0: its output is exactly the BN's ``beta``, as the BN itself computes it. A BN
whose statistics hold NaN is left alone. A model that ``torch.fx`` cannot trace is returned
unchanged, with one record saying why.

The scale and shift are computed in float64 and cast to the conv's dtype.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn as nn

from .infra import LayerRecord, Pass, PassContext, PassError, PassResult, replace_module

# Module classes defined under these packages are leaves of the trace.
_LEAF_PACKAGES = ("structexport.layers", "structexport.passes")


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if super().is_leaf_module(m, module_qualified_name):
            return True
        return type(m).__module__.startswith(_LEAF_PACKAGES)


def _foldable(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv2d) or callable(getattr(m, "fold_affine", None))


def _out_channels(m: nn.Module) -> int | None:
    return getattr(m, "out_channels", None)


def bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, shift)`` in float64 with ``bn(y) == scale * y + shift`` per channel (eval mode)."""
    mean = bn.running_mean.detach().double()
    var = bn.running_var.detach().double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    inv_std = torch.rsqrt(var + bn.eps)           # +inf variance: exactly 0
    scale = gamma * inv_std
    # Where the scale is 0 the channel is exactly beta (mean * 0 would be NaN for an
    # infinite mean, and is 0 otherwise).
    shift = beta - torch.where(inv_std == 0, torch.zeros_like(mean), mean * scale)
    return scale, shift


@torch.no_grad()
def fold_into_conv(conv: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """Make ``conv`` compute ``scale[o] * conv(x)[o] + shift[o]``."""
    if not isinstance(conv, nn.Conv2d):
        conv.fold_affine(scale, shift)
        return
    w = conv.weight
    w.copy_((w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype))
    old = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift)
    new = (old * scale + shift).to(dtype=w.dtype, device=w.device)
    if conv.bias is None:
        conv.bias = nn.Parameter(new)
    else:
        conv.bias.copy_(new)


class FoldBatchNormPass(Pass):
    name = "fold_batchnorm"
    description = "eval-mode BatchNorm2d directly after a conv folded into the conv's weight and bias"

    def __init__(self):
        self._folded: list[str] = []

    def _find_pairs(self, module: nn.Module):
        """``(pairs, refused)``: ``[(conv name, bn name)]`` and ``[(bn name, reason)]``."""
        graph = _Tracer().trace(module)
        calls: dict[str, int] = {}
        for node in graph.nodes:
            if node.op == "call_module":
                calls[node.target] = calls.get(node.target, 0) + 1
        pairs, refused, seen = [], [], set()
        for node in graph.nodes:
            if node.op != "call_module":
                continue
            bn = module.get_submodule(node.target)
            if not isinstance(bn, nn.BatchNorm2d) or node.target in seen:
                continue
            seen.add(node.target)
            reason = None
            src = node.args[0] if node.args else None
            src_mod = (module.get_submodule(src.target)
                       if isinstance(src, torch.fx.Node) and src.op == "call_module" else None)
            if bn.training:
                reason = "in training mode (normalises with batch statistics)"
            elif bn.running_mean is None or bn.running_var is None:
                reason = "keeps no running statistics"
            elif calls[node.target] > 1 or len(node.args) != 1 or node.kwargs:
                reason = "applied at several places"
            elif src_mod is None:
                what = src.target if isinstance(src, torch.fx.Node) else src
                reason = f"its input is not a conv module ({getattr(what, '__name__', what)})"
            elif not _foldable(src_mod):
                reason = f"follows {type(src_mod).__name__} ({src.target}), not a conv"
            elif calls[src.target] > 1:
                reason = f"conv {src.target} is applied at several places"
            elif len(src.users) != 1:
                reason = f"conv {src.target}'s output has other users"
            elif _out_channels(src_mod) != bn.num_features:
                reason = f"conv {src.target} has {_out_channels(src_mod)} outputs, BN {bn.num_features}"
            elif (torch.isnan(bn.running_mean).any() or torch.isnan(bn.running_var).any()
                  or (bn.running_var < 0).any()):
                reason = "running statistics hold NaN or a negative variance"
            if reason:
                refused.append((node.target, reason))
            else:
                pairs.append((src.target, node.target))
        return pairs, refused

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        self._folded = []
        try:
            pairs, refused = self._find_pairs(module)
        except Exception as exc:  # untraceable models are left as they are
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            return PassResult(module, False, [LayerRecord("(model)", "not traced", {
                "reason": f"torch.fx cannot trace the model: {type(exc).__name__}: {first}"[:300]})])
        records = []
        for conv_name, bn_name in pairs:
            conv, bn = module.get_submodule(conv_name), module.get_submodule(bn_name)
            scale, shift = bn_affine(bn)
            fold_into_conv(conv, scale, shift)
            replace_module(module, bn_name, nn.Identity())
            self._folded.append(bn_name)
            records.append(LayerRecord(bn_name, "folded", {
                "into": conv_name, "conv": type(conv).__name__, "channels": bn.num_features,
                "zero_scale_channels": int((scale == 0).sum()),
                "infinite_variance_channels": int(torch.isinf(bn.running_var).sum())}))
        records += [LayerRecord(name, "not folded", {"reason": reason}) for name, reason in refused]
        return PassResult(module, bool(self._folded), records)

    def ensures(self, module: nn.Module, ctx: PassContext) -> None:
        left = [n for n in self._folded if isinstance(module.get_submodule(n), nn.BatchNorm2d)]
        if left:
            raise PassError(f"folded batch norms are still BatchNorm2d: {', '.join(left[:3])}")
