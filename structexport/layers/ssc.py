"""Structured sparse convolutions (Verma et al., WACV 2023), per DESIGN.md section 1.3.

Only the paper's supplement is at hand, so the sparsity pattern follows the project's
*working reading* (HetConv-style with groups). It is defined in :func:`ssc_mask` and
nowhere else, so that it can be corrected in one place:

- input and output channels are split into ``g`` groups; filter ``j`` sees only the
  channels of its own group;
- within the group, local input channel ``i`` gets a full ``K x K`` kernel when
  ``(i - j_local) mod p == 0`` and only the centre tap (a 1x1 kernel) otherwise.

``p=1`` gives group convolution, ``p=1, g=C`` depthwise convolution, and ``p`` larger
than the group makes most connections point-wise. Per filter this keeps
``(C/g)/p * K^2 + (C/g)(1 - 1/p)`` weights when ``p`` divides ``C/g``.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import dense_conv


def ssc_mask(out_channels: int, in_channels: int, kernel_size: int, p: int, g: int) -> torch.Tensor:
    """Boolean mask ``(out, in, K, K)`` of the weights an SSC layer may use."""
    if p < 1 or g < 1:
        raise ValueError(f"SSC needs p >= 1 and g >= 1, got p={p}, g={g}")
    if in_channels % g or out_channels % g:
        raise ValueError(f"SSC groups g={g} must divide both {in_channels} input and "
                         f"{out_channels} output channels")
    K = kernel_size
    cin_g, cout_g = in_channels // g, out_channels // g
    j = torch.arange(out_channels)
    i = torch.arange(in_channels)
    same_group = (j[:, None] // cout_g) == (i[None, :] // cin_g)
    full = ((i[None, :] % cin_g) - (j[:, None] % cout_g)) % p == 0
    mask = torch.zeros(out_channels, in_channels, K, K, dtype=torch.bool)
    mask[same_group & full] = True
    centre = torch.zeros(K, K, dtype=torch.bool)
    centre[K // 2, K // 2] = True
    mask[same_group & ~full] = centre
    return mask


class SSCConv2d(nn.Module):
    """A conv whose weight is zero outside :func:`ssc_mask` (the mask is applied in forward)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, p: int, g: int,
                 stride: int = 1, padding: int = 0, bias: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.p, self.g = kernel_size, stride, padding, p, g
        mask = ssc_mask(out_channels, in_channels, kernel_size, p, g)
        # Not persistent: the mask follows from (p, g) and the shapes.
        self.register_buffer("mask", mask, persistent=False)
        fan_in = max(1, int(mask[0].sum()))
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel_size, kernel_size)
                                   * math.sqrt(2.0 / fan_in) * mask)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def masked_weight(self) -> torch.Tensor:
        # where(), not a product: a non-finite value outside the mask must not leak in
        return torch.where(self.mask, self.weight, torch.zeros((), dtype=self.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.masked_weight(), self.bias, self.stride, self.padding)

    def effective_params(self) -> int:
        return int(self.mask.sum()) + (self.out_channels if self.bias is not None else 0)

    def to_dense(self) -> nn.Conv2d:
        return dense_conv(self.masked_weight().detach(), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"p={self.p}, g={self.g}, stride={self.stride}, padding={self.padding}, "
                f"density={float(self.mask.float().mean()):.4f}")
