"""Pieces the three layer families share."""
from __future__ import annotations

import torch
import torch.nn as nn


def dense_conv(weight: torch.Tensor, bias: torch.Tensor | None, stride, padding,
               groups: int = 1) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` holding ``weight`` (and ``bias``), in their dtype and device."""
    out_channels, in_per_group, kh, kw = weight.shape
    conv = nn.Conv2d(in_per_group * groups, out_channels, (kh, kw), stride, padding,
                     groups=groups, bias=bias is not None, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        conv.weight.copy_(weight)
        if bias is not None:
            conv.bias.copy_(bias)
    return conv


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` ``(out, in)`` (and ``bias``)."""
    out_features, in_features = weight.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, dtype=weight.dtype,
                       device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    return linear
