"""The sum-pool of a decomposed structured conv, in several equivalent realizations.

``SumPool`` zero-pads its input spatially by ``padding`` and sums, within each of
``groups`` channel groups, every ``window = (kc, kh, kw)`` box at stride 1: ``C`` channels
per group become ``C - kc + 1``. How that sum is written decides the speed on a target
(DESIGN.md section 2), so the realization is a per-layer choice:

- ``"avgpool3d"``: AveragePool-3D times the box volume. The naive form; 8x slower than
  the dense conv on ONNX Runtime CPU. Kept as the reference.
- ``"cumsum"``: running sums along each axis, then differences (2 adds per value per axis).
- ``"banded"``: the channel sum as a 1x1 conv with a banded 0/1 matrix, the spatial sum as a
  depthwise conv with a ``kh x kw`` kernel of ones.
- ``"box"``: running sums along channels, a depthwise box conv spatially.
- ``"pool2d"``: 2-D average pools times their size, no CumSum (DESIGN.md section 5): the
  channel sum as a ``(kc, 1)`` pool of the ``(N * groups, 1, C / groups, H * W)`` view,
  then one multiplication by ``kc * kh * kw``, then a ``(kh, kw)`` pool whose zero padding
  counts (``count_include_pad``) -- the form 2-D pooling runtimes (XNNPACK, ncnn, TVM)
  delegate. On ONNX Runtime CPU the channel pool is slow (MLAS sums each window, one
  value at a time, on a one-channel tensor): the cost model does not pick it there.

All realizations compute the same values; they differ in the ONNX operators they export
to and in cost.
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

REALIZATIONS = ("avgpool3d", "cumsum", "banded", "box", "pool2d")
# The ones worth choosing (cost model, --autotune): AveragePool-3D is only a reference.
MEASURABLE_REALIZATIONS = ("cumsum", "banded", "box", "pool2d")
# As the CLI offers them (the default first).
CLI_REALIZATIONS = ("cumsum", "banded", "box", "pool2d", "avgpool3d")


def _running_sum(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Sums of ``length`` consecutive entries along ``dim`` (valid positions only)."""
    if length == 1:
        return x
    c = torch.cumsum(x, dim)
    n = x.shape[dim]
    head = c.narrow(dim, length - 1, 1)
    tail = c.narrow(dim, length, n - length) - c.narrow(dim, 0, n - length)
    return torch.cat([head, tail], dim)


def pool_pads(window: tuple[int, int, int], padding: int) -> bool:
    """Whether ``"pool2d"`` pads inside its spatial pool (zeros counted) rather than with an
    explicit zero pad first: torch allows a pool's padding up to half its kernel, and
    without a spatial pool there is nothing to pad in."""
    _, kh, kw = window
    return bool(padding) and kh * kw > 1 and padding <= kh // 2 and padding <= kw // 2


class SumPool(nn.Module):
    def __init__(self, channels: int, window: tuple[int, int, int], padding: int = 0,
                 groups: int = 1, realization: str = "cumsum"):
        super().__init__()
        if channels % groups:
            raise ValueError(f"{channels} channels do not split into {groups} groups")
        if window[0] > channels // groups:
            raise ValueError(f"channel window {window[0]} exceeds {channels // groups} channels per group")
        self.channels, self.window, self.padding, self.groups = channels, tuple(window), padding, groups
        self.realization = realization  # validated by the setter below

    @property
    def realization(self) -> str:
        return self._realization

    @realization.setter
    def realization(self, value: str) -> None:
        if value not in REALIZATIONS:
            raise ValueError(f"unknown sum-pool realization {value!r}; expected one of {REALIZATIONS}")
        if getattr(self, "rebased", False):   # its small conv was changed to match the rebased band
            raise ValueError("a sum-pool rebased for INT8 keeps its banded form")
        self._realization = value
        self._buffers.pop("band", None)
        self._buffers.pop("ones", None)
        kc, kh, kw = self.window
        cg = self.channels // self.groups
        if value == "banded":
            # one 0/1 band per group: out channel a sums input channels a .. a+kc-1
            band = torch.zeros(self.groups * (cg - kc + 1), cg, 1, 1)
            for a in range(cg - kc + 1):
                band[a::cg - kc + 1, a:a + kc] = 1.0
            self.register_buffer("band", band, persistent=False)
        if value in ("banded", "box"):
            out_channels = self.groups * (cg - kc + 1)
            self.register_buffer("ones", torch.ones(out_channels, 1, kh, kw), persistent=False)

    @property
    def out_channels(self) -> int:
        return self.groups * (self.channels // self.groups - self.window[0] + 1)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, window={self.window}, padding={self.padding}, "
                f"groups={self.groups}, realization={self.realization}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.realization == "pool2d":
            return self._pool2d(x)
        kc, kh, kw = self.window
        # The channel sum commutes with zero padding, so the box-filter forms let their
        # depthwise conv pad (no Pad node, no channel sums over the border).
        conv_pads = self.realization in ("banded", "box") and kh * kw > 1
        if self.padding and not conv_pads:
            x = F.pad(x, (self.padding,) * 4)
        pad = self.padding if conv_pads else 0
        B, C, H, W = x.shape
        if self.realization == "avgpool3d":
            pooled = F.avg_pool3d(x.reshape(B * self.groups, 1, C // self.groups, H, W),
                                  self.window, stride=1) * float(kc * kh * kw)
            return pooled.reshape(B, self.out_channels, H - kh + 1, W - kw + 1)
        if self.realization == "banded":
            if kc > 1:
                x = F.conv2d(x, self.band.to(x.dtype), groups=self.groups)
            return F.conv2d(x, self.ones.to(x.dtype), padding=pad, groups=self.out_channels) if kh * kw > 1 else x
        # channel sums by running sums, per group (one group: no reshapes, two fewer nodes)
        if kc > 1 and self.groups == 1:
            x = _running_sum(x, 1, kc)
        elif kc > 1:
            x = x.reshape(B, self.groups, C // self.groups, H, W)
            x = _running_sum(x, 2, kc).reshape(B, self.out_channels, H, W)
        if self.realization == "box":
            return F.conv2d(x, self.ones.to(x.dtype), padding=pad, groups=self.out_channels) if kh * kw > 1 else x
        return _running_sum(_running_sum(x, 2, kh), 3, kw)

    def _pool2d(self, x: torch.Tensor) -> torch.Tensor:
        """Average pools times their size: ``F.avg_pool2d(divisor_override=1)`` would export
        as a plain mean (DESIGN.md section 5), so the scale is an explicit multiplication,
        done once, before the spatial pool (on fewer values than after it; on ONNX Runtime
        the pool and the small conv after it then share one blocked layout). The channel
        sum commutes with zero padding: it runs unpadded, the zeros come after it."""
        kc, kh, kw = self.window
        B, C, H, W = x.shape
        if kc > 1:
            x = F.avg_pool2d(x.reshape(B * self.groups, 1, C // self.groups, H * W), (kc, 1), stride=1)
            x = x.reshape(B, self.out_channels, H, W)
        if kc * kh * kw > 1:
            x = x * float(kc * kh * kw)
        inside = pool_pads(self.window, self.padding)
        if self.padding and not inside:
            x = F.pad(x, (self.padding,) * 4)
        if kh * kw > 1:
            x = F.avg_pool2d(x, (kh, kw), stride=1, padding=self.padding if inside else 0,
                             count_include_pad=True)
        return x

    def additions(self, height: int, width: int) -> int:
        """Additions per image for a ``height x width`` input (before padding): the naive
        box sum costs ``volume - 1`` per pooled value, a running sum about 2 per axis."""
        kc, kh, kw = self.window
        H, W = height + 2 * self.padding, width + 2 * self.padding
        values = self.out_channels * (H - kh + 1) * (W - kw + 1)
        if self.realization == "pool2d":  # each pool sums its whole window per value (unpadded channels)
            return self.out_channels * height * width * (kc - 1) + values * (kh * kw - 1)
        if self.realization in ("avgpool3d", "banded"):
            return values * (kc * kh * kw - 1)
        channel = 2 * values if kc > 1 else 0
        if self.realization == "box":
            return channel + values * (kh * kw - 1)
        return channel + 2 * values * ((kh > 1) + (kw > 1))
