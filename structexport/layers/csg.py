"""Convolutional Slice Generators (Omidvar et al., AISTATS 2021).

A CSG conv stores one code vector per kernel slice; one bias-free linear generator,
shared by the whole network, maps each code to a flattened slice of shape
``[s0, s1, sh, sw]``. The kernel is built in the reference implementation's layout: a
row-major reshape of the stacked slices to
``(ceil(out/s0)*s0, ceil(in/s1)*s1, sh, sw)`` followed by a crop to
``(out, in, kh, kw)`` -- not a tiling of ``s0 x s1`` blocks.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import dense_conv

SliceShape = tuple[int, int, int, int]


def num_slices(out_channels: int, in_channels: int, slice_shape: Sequence[int]) -> int:
    """Slices needed to cover an ``out x in`` kernel (partitions that overhang are cropped)."""
    s0, s1 = slice_shape[0], slice_shape[1]
    return math.ceil(out_channels / s0) * math.ceil(in_channels / s1)


def generate_kernel(codes: torch.Tensor, generator_weight: torch.Tensor,
                    kernel_shape: Sequence[int], slice_shape: Sequence[int]) -> torch.Tensor:
    """Kernel ``(out, in, kh, kw)`` from codes ``(num_slices, nc)`` and G ``(prod(slice), nc)``."""
    out_c, in_c, kh, kw = kernel_shape
    s0, s1, sh, sw = slice_shape
    stacked = codes @ generator_weight.t()
    full = stacked.reshape(math.ceil(out_c / s0) * s0, math.ceil(in_c / s1) * s1, sh, sw)
    return full[:out_c, :in_c, :kh, :kw]


class CSGGenerator(nn.Module):
    """The one generator shared by every CSG layer of a network.

    ``mode``: ``"trained"`` (a trainable parameter), ``"binary"`` (BCSG: fixed at
    ``0.5 * sign(kaiming_normal)`` drawn from ``seed``) or ``"frozen"`` (a pre-trained
    generator reused as a constant). Fixed generators stay parameters with
    ``requires_grad=False`` so they are counted in ``params`` but not in
    ``trainable_params``, as in the paper's tables.
    """

    MODES = ("trained", "binary", "frozen")

    def __init__(self, slice_shape: Sequence[int], code_size: int, mode: str = "trained",
                 seed: int = 0):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown generator mode {mode!r}; expected one of {self.MODES}")
        if len(slice_shape) != 4 or min(slice_shape) < 1 or code_size < 1:
            raise ValueError(f"bad CSG configuration: slice {list(slice_shape)}, code size {code_size}")
        self.slice_shape: SliceShape = tuple(int(s) for s in slice_shape)  # type: ignore[assignment]
        self.code_size = int(code_size)
        self.mode = mode
        weight = torch.empty(math.prod(self.slice_shape), self.code_size)
        gen = torch.Generator().manual_seed(seed)
        if mode == "binary":
            # kaiming-normal (fan_in = code size), then keep only the signs, scaled to +-0.5
            weight.normal_(0.0, math.sqrt(2.0 / self.code_size), generator=gen)
            weight = 0.5 * torch.where(weight >= 0, 1.0, -1.0)
        else:
            bound = 1.0 / math.sqrt(self.code_size)
            weight.uniform_(-bound, bound, generator=gen)
        self.weight = nn.Parameter(weight, requires_grad=(mode == "trained"))

    def freeze(self) -> "CSGGenerator":
        """Turn a trained generator into a frozen, pre-trained one."""
        self.weight.requires_grad_(False)
        self.mode = "frozen"
        return self

    def extra_repr(self) -> str:
        return f"slice={list(self.slice_shape)}, code_size={self.code_size}, mode={self.mode}"


class CSGConv2d(nn.Module):
    """A 2-D conv whose kernel is generated from per-slice codes by a shared generator.

    The generator is registered once at the top of the network; this layer keeps a
    plain (unregistered) reference so the state dict holds it once, not per layer.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 generator: CSGGenerator, stride: int = 1, padding: int = 0, bias: bool = False):
        super().__init__()
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        s0, s1, sh, sw = generator.slice_shape
        if sh < kh or sw < kw:
            raise ValueError(f"CSG slice {list(generator.slice_shape)} is smaller than the "
                             f"{kh}x{kw} kernel it must generate")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = (kh, kw)
        self.stride, self.padding = stride, padding
        object.__setattr__(self, "generator", generator)
        self.code = nn.Parameter(
            torch.randn(num_slices(out_channels, in_channels, generator.slice_shape),
                        generator.code_size) * 1e-3)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        return (self.out_channels, self.in_channels, *self.kernel_size)

    def kernel(self) -> torch.Tensor:
        return generate_kernel(self.code, self.generator.weight.to(self.code.dtype),
                               self.kernel_shape, self.generator.slice_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.kernel(), self.bias, self.stride, self.padding)

    def to_dense(self) -> nn.Conv2d:
        return dense_conv(self.kernel().detach(), self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, slices={self.code.shape[0]}, "
                f"slice={list(self.generator.slice_shape)}, code_size={self.generator.code_size}")
