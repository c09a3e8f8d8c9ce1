"""The modules ``lower_ssc`` emits: a structured sparse conv as (grouped) convs that follow
its real zero pattern. How the pattern is found and packed is the pass's business
(``structexport.passes.lower_ssc_pass``); these modules only run the result."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class GatheredConv(nn.Module):
    """One grouped conv of a lowered layer: ``conv(x.index_select(1, in_index))``.

    ``slots[r]`` is the layer output channel that conv output ``r`` contributes to (-1: a
    zero-weight dummy channel that pads a group).
    """

    def __init__(self, conv: nn.Conv2d, in_index: torch.Tensor | None, slots: torch.Tensor):
        super().__init__()
        self.conv = conv
        self.register_buffer("in_index", in_index)
        self.register_buffer("slots", slots)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_index is not None:
            x = x.index_select(1, self.in_index)
        return self.conv(x)

    def extra_repr(self) -> str:
        gather = "all inputs in order" if self.in_index is None else f"gathers {len(self.in_index)} inputs"
        return f"{gather}, dummy outputs={int((self.slots < 0).sum())}"


class LoweredSSCConv(nn.Module):
    """An SSC layer as grouped K x K convs (``spatial``) plus grouped 1 x 1 convs on the
    centre tap (``pointwise``).

    Each part is a list of :class:`GatheredConv` (usually one, or none). A part's conv
    outputs are concatenated and gathered back to the layer's channel order with
    ``<part>_out`` (``None``: already in order; ``<part>_pad_zero``: a zero channel is
    appended first, for layer outputs the part does not produce). The parts are summed.
    The bias lives in the convs of a part that produces every output once
    (``bias_site``), else in ``bias``, added at the end.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 padding: int, spatial: list[GatheredConv], pointwise: list[GatheredConv],
                 bias: torch.Tensor | None):
        super().__init__()
        if not spatial and not pointwise:
            raise ValueError("a lowered SSC layer needs at least one conv")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.centre = kernel_size // 2
        # Offset of the centre tap's input pixel from (output pixel * stride).
        self.centre_offset = self.centre - padding
        self.centre_direct = self.centre_offset == 0 and kernel_size % 2 == 1
        self.spatial = nn.ModuleList(spatial)
        self.pointwise = nn.ModuleList(pointwise)
        for part in ("spatial", "pointwise"):
            out_index, pad_zero = self._output_gather(self._slots(part), out_channels)
            self.register_buffer(f"{part}_out", out_index)
            setattr(self, f"{part}_pad_zero", pad_zero)
        self.bias_site = "module"
        self.bias = None
        self._place_bias(bias)

    def _slots(self, part: str) -> torch.Tensor:
        branches = getattr(self, part)
        if not len(branches):
            return torch.empty(0, dtype=torch.long)
        return torch.cat([b.slots for b in branches])

    @staticmethod
    def _output_gather(slots: torch.Tensor, out_channels: int) -> tuple[torch.Tensor | None, bool]:
        """Gather index from a part's conv outputs to the layer's; ``True`` when a zero
        channel must be appended (a layer output the part does not produce, no dummy slot)."""
        R = len(slots)
        if R == 0:
            return None, False
        pos = torch.full((out_channels,), -1, dtype=torch.long)
        valid = slots >= 0
        pos[slots[valid]] = torch.arange(R)[valid]
        missing = pos < 0
        pad_zero = False
        if missing.any():
            dummies = (~valid).nonzero().flatten()
            if len(dummies):  # a dummy slot has zero weights and no bias: it outputs zeros
                pos[missing] = int(dummies[0])
            else:
                pos[missing] = R
                pad_zero = True
        if R == out_channels and torch.equal(pos, torch.arange(out_channels)):
            return None, False
        return pos, pad_zero

    def _covers_all(self, part: str) -> bool:
        slots = self._slots(part)
        valid = slots[slots >= 0]
        return len(valid) == self.out_channels and len(torch.unique(valid)) == self.out_channels

    def _branches(self):
        yield from self.spatial
        yield from self.pointwise

    def current_bias(self) -> torch.Tensor | None:
        """The layer's bias in output-channel order (``None`` when it has none)."""
        if self.bias_site == "module":
            return None if self.bias is None else self.bias.detach().clone()
        out = None
        for b in getattr(self, self.bias_site):
            if out is None:
                out = torch.zeros(self.out_channels, dtype=b.conv.bias.dtype, device=b.conv.bias.device)
            valid = b.slots >= 0
            out[b.slots[valid]] = b.conv.bias.detach()[valid]
        return out

    def _place_bias(self, bias: torch.Tensor | None) -> None:
        for b in self._branches():
            b.conv.bias = None
        self.bias, self.bias_site = None, "module"
        if bias is None:
            return
        bias = bias.detach()
        for part in ("spatial", "pointwise"):
            if self._covers_all(part):
                for b in getattr(self, part):
                    w = b.conv.weight
                    valid = b.slots >= 0
                    v = torch.zeros(len(b.slots), dtype=w.dtype, device=w.device)
                    v[valid] = bias.to(w.dtype)[b.slots[valid]]
                    b.conv.bias = nn.Parameter(v)
                self.bias_site = part
                return
        self.bias = nn.Parameter(bias.clone())

    @torch.no_grad()
    def fold_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Make this layer compute ``scale[c] * y[c] + shift[c]`` (folds a following BatchNorm)."""
        scale, shift = scale.detach().double(), shift.detach().double()
        weight = next(self._branches()).conv.weight
        for b in self._branches():
            w = b.conv.weight
            valid = b.slots >= 0
            f = torch.zeros(len(b.slots), dtype=torch.float64, device=w.device)
            f[valid] = scale.to(w.device)[b.slots[valid]]
            w.copy_((w.double() * f.view(-1, 1, 1, 1)).to(w.dtype))
        old = self.current_bias()
        new = shift.clone() if old is None else old.double().to(shift.device) * scale + shift
        self._place_bias(new.to(dtype=weight.dtype, device=weight.device))

    def macs_per_pixel(self) -> int:
        """Multiplies per output pixel of the lowered convs."""
        return sum(b.conv.weight.numel() for b in self._branches())

    def _centre_taps(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the centre tap sees it, for a stride-``s`` 1 x 1 conv: output pixel
        ``h`` reads input pixel ``h*s + centre - padding`` (zero outside the input)."""
        if self.centre_direct:
            return x
        K, s, P, d = self.kernel_size, self.stride, self.padding, self.centre_offset
        H, W = x.shape[-2], x.shape[-1]
        ho, wo = (H + 2 * P - K) // s + 1, (W + 2 * P - K) // s + 1
        lo = max(0, -d)
        hi_h, hi_w = max(0, (ho - 1) * s + d + 1 - H), max(0, (wo - 1) * s + d + 1 - W)
        if lo or hi_h or hi_w:
            x = F.pad(x, (lo, hi_w, lo, hi_h))
        start = d + lo
        return x[:, :, start:start + (ho - 1) * s + 1, start:start + (wo - 1) * s + 1]

    @staticmethod
    def _run_part(x: torch.Tensor, branches: nn.ModuleList, out_index, pad_zero: bool) -> torch.Tensor:
        ys = [b(x) for b in branches]
        y = ys[0] if len(ys) == 1 else torch.cat(ys, 1)
        if pad_zero:
            y = F.pad(y, (0, 0, 0, 0, 0, 1))
        if out_index is not None:
            y = y.index_select(1, out_index)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = None
        if len(self.spatial):
            y = self._run_part(x, self.spatial, self.spatial_out, self.spatial_pad_zero)
        if len(self.pointwise):
            yp = self._run_part(self._centre_taps(x), self.pointwise, self.pointwise_out,
                                self.pointwise_pad_zero)
            y = yp if y is None else y + yp
        if self.bias is not None:
            y = y + self.bias.view(1, -1, 1, 1)
        return y

    def extra_repr(self) -> str:
        K = self.kernel_size
        parts = []
        for part in ("spatial", "pointwise"):
            for b in getattr(self, part):
                c, k = b.conv, b.conv.kernel_size[0]
                parts.append(f"{part} {k}x{k} groups={c.groups} "
                             f"({c.out_channels // c.groups}x{c.in_channels // c.groups} per group)")
        dense = self.out_channels * self.in_channels * K * K
        bias = "none" if self.current_bias() is None else self.bias_site
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={K}, stride={self.stride}, "
                f"padding={self.padding}, " + ", ".join(parts)
                + f", macs/pixel={self.macs_per_pixel()} of {dense} dense, bias={bias}")
