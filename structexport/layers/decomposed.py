"""The modules ``decompose_structured`` emits: a structured conv (or linear layer) as its
explicit sum-pool followed by the small ``c x n x n`` conv (DESIGN.md section 1.1)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from structexport.layers.structured import box_window
from structexport.layers.sumpool import SumPool


class DecomposedStructuredConv(nn.Module):
    """The shared sum-pool (``pool``) followed by the small ``c x n x n`` conv (``conv``)."""

    def __init__(self, pool: SumPool, conv: nn.Conv2d):
        super().__init__()
        self.pool, self.conv = pool, conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pool(x))

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def fold_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Make this layer compute ``scale[c] * y[c] + shift[c]`` (folds a following BN):
        the pool is linear, so only the small conv changes."""
        w = self.conv.weight
        scale, shift = scale.detach().double(), shift.detach().double()
        bias = shift if self.conv.bias is None else self.conv.bias.detach().double() * scale + shift
        with torch.no_grad():
            w.copy_((w.double() * scale.view(-1, 1, 1, 1)).to(w.dtype))
        self.conv.bias = nn.Parameter(bias.to(w.dtype))


    def rebase_channel_sums(self) -> bool:
        """For INT8: the banded channel sums as one sum scaled by ``1 / sqrt(kc)`` and
        differences of two channels (exact in int8), the small conv's columns changed to match,
        as the ONNX pass ``rebase_channel_sums`` does (its docstring gives the algebra and the
        measurements). Outputs are unchanged in exact arithmetic. False when there is nothing
        to rebase (no channel window, or not the banded realization)."""
        pool, conv = self.pool, self.conv
        kc = pool.window[0]
        if pool.realization != "banded" or kc == 1 or getattr(pool, "rebased", False):
            return False
        groups, per_group = pool.groups, pool.out_channels // pool.groups
        s = math.sqrt(kc)
        with torch.no_grad():
            band = pool.band.double().clone()           # rows: group g's sum a at g * per_group + a
            new_band = band.clone()
            for g in range(groups):
                rows = slice(g * per_group, (g + 1) * per_group)
                b = band[rows]
                new_band[rows.start] = b[0] / s
                new_band[rows.start + 1:rows.stop] = b[1:] - b[:-1]
            w = conv.weight.double()                    # (out, per_group, n, n), one group per output block
            suffix = w.flip(1).cumsum(1).flip(1)        # alpha'[:, j] = sum_(a >= j) alpha[:, a]
            suffix[:, 0] *= s
            conv.weight.copy_(suffix.to(conv.weight.dtype))
            pool.band = new_band.to(pool.band.dtype)
        pool.rebased = True
        return True


def decompose(in_channels: int, alpha: torch.Tensor, bias, kernel_size: int, stride: int,
              padding: int, groups: int, realization: str = "cumsum") -> DecomposedStructuredConv:
    out_channels, c, n, _ = alpha.shape
    window = box_window(in_channels // groups, kernel_size, c, n)
    pool = SumPool(in_channels, window, padding, groups, realization)
    conv = nn.Conv2d(groups * c, out_channels, n, stride, 0, groups=groups, bias=bias is not None,
                     dtype=alpha.dtype, device=alpha.device)
    with torch.no_grad():
        conv.weight.copy_(alpha)
        if bias is not None:
            conv.bias.copy_(bias)
    return DecomposedStructuredConv(pool, conv)


class DecomposedStructuredLinear(nn.Module):
    """A structured linear layer: the feature sum-pool followed by the small linear map."""

    def __init__(self, pool: SumPool, linear: nn.Linear):
        super().__init__()
        self.pool, self.linear = pool, linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pool(x.reshape(-1, x.shape[-1], 1, 1))
        return self.linear(pooled.reshape(*x.shape[:-1], -1))


def composed_conv(layer: DecomposedStructuredConv) -> nn.Conv2d:
    """The plain conv ``layer`` composes to: its (exactly structured) ``C x N x N`` kernel,
    the pool's padding and groups, the small conv's stride and bias."""
    from structexport.layers.common import dense_conv
    from structexport.layers.structured import compose_kernel
    pool, conv = layer.pool, layer.conv
    C = pool.channels // pool.groups
    N = conv.kernel_size[0] + pool.window[1] - 1
    with torch.no_grad():
        weight = compose_kernel(conv.weight.double(), C, N).to(conv.weight.dtype)
        bias = None if conv.bias is None else conv.bias.detach().clone()
    return dense_conv(weight, bias, conv.stride, pool.padding, pool.groups)


def recompose(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose decomposed structured convs are plain convs again, each
    holding its composed (exactly structured) kernel; everything else is shared as is.

    A compiler that fuses the sum-pool into the conv itself (the TVM targets'
    ``tvm_fused``) starts from this form: the structure is read back from the kernel, and
    no chain of separate pool operators is imported to be undone."""
    import copy
    out = copy.deepcopy(model)
    for name, module in list(out.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, DecomposedStructuredConv):
                setattr(module, child_name, composed_conv(child))
    return out
