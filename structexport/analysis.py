"""Parameter and MAC counting, per layer, with one rule per layer type (as ptflops does).

MACs are multiply-accumulates of convs and linear layers at a given input shape:
- dense conv: ``out_elements * (C_in / groups) * kh * kw``;
- structured conv: the small ``c x n x n`` conv after the sum-pool,
  ``out_elements * c * n * n``; the sum-pool's additions are counted separately
  (``adds``, naive count ``prod(window) - 1`` per pooled value);
- CSG conv: as dense (kernels are generated once, then the conv runs dense);
- SSC conv: ``output pixels * non-zeros of the mask``;
- linear: ``out_features * in_features`` per row.
Parameters count every distinct tensor once (a shared CSG generator once), SSC weights
by the non-zeros of their mask, and structured layers by their coefficients.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from structexport.layers import (CSGConv2d, CSGGenerator, SSCConv2d, StructuredConv2d,
                                 StructuredLinear)
from structexport.layers.sumpool import SumPool

LAYER_TYPES = (nn.Conv2d, nn.Linear, CSGConv2d, SSCConv2d, StructuredConv2d, StructuredLinear,
               SumPool)


@dataclass
class LayerInfo:
    name: str
    kind: str                      # dense | structured | CSG | BCSG | SSC | linear | sumpool
    op: str                        # conv2d | linear | sumpool
    weight_shape: list[int]        # the dense-equivalent kernel shape
    structure: str                 # e.g. "c=8 n=2", "slice=[16,16,3,3] code=128", "p=2 g=4"
    params: int
    macs: int = 0
    adds: int = 0
    output_shape: list[int] = field(default_factory=list)
    residual: float | None = None  # dense weight trained toward a structure: distance to it

    def to_dict(self) -> dict:
        return asdict(self)


def _kind_and_structure(module: nn.Module) -> tuple[str, str, list[int]]:
    if isinstance(module, SumPool):
        return ("sumpool", f"window {'x'.join(map(str, module.window))} ({module.realization})",
                [module.out_channels, module.channels])
    if isinstance(module, CSGConv2d):
        g = module.generator
        kind = "BCSG" if g.mode == "binary" else "CSG"
        return kind, f"slice {'x'.join(map(str, g.slice_shape))} code {g.code_size}", list(module.kernel_shape)
    if isinstance(module, StructuredConv2d):
        return ("structured", f"{module.c}x{module.n}x{module.n} ({module.mode})",
                [module.out_channels, module.in_channels // module.groups, module.kernel_size,
                 module.kernel_size])
    if isinstance(module, StructuredLinear):
        return ("structured", f"c={module.c} ({module.mode})",
                [module.out_features, module.in_features])
    if isinstance(module, SSCConv2d):
        return ("SSC", f"p={module.p} g={module.g}", list(module.weight.shape))
    if isinstance(module, nn.Linear):
        return "linear", "", list(module.weight.shape)
    groups = f"groups={module.groups}" if module.groups > 1 else ""
    return "dense", groups, list(module.weight.shape)


def _own_params(module: nn.Module) -> int:
    """Parameters a layer owns (a CSG layer's codes, not the shared generator)."""
    if isinstance(module, SSCConv2d):
        return module.effective_params()
    return sum(p.numel() for p in module.parameters(recurse=False))


def _macs(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> tuple[int, int]:
    if isinstance(module, SumPool):
        return 0, x.shape[0] * module.additions(x.shape[-2], x.shape[-1])
    if isinstance(module, (nn.Linear, StructuredLinear)):
        in_f = module.in_features
        rows = out.numel() // out.shape[-1]
        if isinstance(module, StructuredLinear):
            win = module.in_features - module.c + 1
            return rows * module.out_features * module.c, rows * module.c * (win - 1)
        return rows * module.out_features * in_f, 0
    out_elems = out.numel()
    if isinstance(module, StructuredConv2d):
        # The pooled tensor is computed at stride 1 over the padded input.
        window, pad = module.window, module.padding
        pooled = (x.shape[0] * module.groups * module.c *
                  (x.shape[-2] + 2 * pad - window[1] + 1) * (x.shape[-1] + 2 * pad - window[2] + 1))
        return out_elems * module.c * module.n * module.n, pooled * (math.prod(window) - 1)
    spatial = math.prod(out.shape[-2:]) * out.shape[0]
    if isinstance(module, SSCConv2d):
        return spatial * int(module.mask.sum()), 0
    if isinstance(module, CSGConv2d):
        return out_elems * module.in_channels * math.prod(module.kernel_size), 0
    return out_elems * (module.in_channels // module.groups) * math.prod(module.kernel_size), 0


def layer_table(model: nn.Module, input_shape=None, example: torch.Tensor | None = None
                ) -> list[LayerInfo]:
    """One row per conv/linear layer, in execution order, at ``input_shape``."""
    rows: dict[str, LayerInfo] = {}
    order: list[str] = []
    names = {m: n for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)}
    hooks = []

    def hook(module, inputs, output):
        name = names[module]
        macs, adds = _macs(module, inputs[0], output)
        if name in rows:  # a layer called twice adds its MACs twice
            rows[name].macs += macs
            rows[name].adds += adds
            return
        kind, structure, shape = _kind_and_structure(module)
        op = ("linear" if kind == "linear" or isinstance(module, StructuredLinear)
              else "sumpool" if kind == "sumpool" else "conv2d")
        rows[name] = LayerInfo(name, kind, op,
                               shape, structure, _own_params(module), macs, adds,
                               list(output.shape))
        order.append(name)

    for module in names:
        hooks.append(module.register_forward_hook(hook))
    try:
        if example is None:
            param = next(model.parameters())
            example = torch.zeros(input_shape, dtype=param.dtype)
        with torch.no_grad():
            model.eval()(example)
    finally:
        for h in hooks:
            h.remove()
    # Layers that never ran (unused at this input) still appear, without MACs.
    for module, name in names.items():
        if name not in rows:
            kind, structure, shape = _kind_and_structure(module)
            rows[name] = LayerInfo(name, kind, "conv2d", shape, structure, _own_params(module))
            order.append(name)
    return [rows[n] for n in order]


def count_params(model: nn.Module) -> tuple[int, int]:
    """``(params, trainable_params)``: each distinct tensor once, SSC weights by mask."""
    total = trainable = 0
    masks = {id(m.weight): m.mask for m in model.modules() if isinstance(m, SSCConv2d)}
    for p in {id(p): p for p in model.parameters()}.values():
        n = int(masks[id(p)].sum()) if id(p) in masks else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return total, trainable


def generator_info(model: nn.Module) -> dict | None:
    gens = {id(m): m for m in model.modules() if isinstance(m, CSGGenerator)}
    if not gens:
        return None
    g = next(iter(gens.values()))
    return {"slice_shape": list(g.slice_shape), "code_size": g.code_size, "mode": g.mode,
            "params": g.weight.numel(), "trainable": g.weight.requires_grad}


def summarize(model: nn.Module, input_shape) -> dict:
    """Totals used by ``zoo --json`` and ``inspect``."""
    rows = layer_table(model, input_shape)
    params, trainable = count_params(model)
    return {"params": params, "trainable_params": trainable,
            "macs": sum(r.macs for r in rows), "sumpool_adds": sum(r.adds for r in rows),
            "input_shape": list(input_shape), "layers": rows,
            "generator": generator_info(model)}
