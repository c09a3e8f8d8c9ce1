"""Structured convolutions (Bhalgat et al., NeurIPS 2020).

A ``C x N x N`` kernel has structure ``c x n x n`` when it is a sum of ``c*n*n`` box masks
weighted by coefficients ``alpha``: the full 3-D convolution of ``alpha`` with a
``(C-c+1) x (N-n+1) x (N-n+1)`` box of ones. Then ``conv2d(X, W, stride=s, padding=p)``
equals ``conv2d(SumPool3d(pad(X, p)), alpha, stride=s)``: the sum-pool is shared by all
output filters. Grouped convs are structured per group, depthwise convs (one channel
per group) spatially only, 1x1 convs and linear layers along channels only.

Two training modes:
- ``"coeff"``: the layer's parameter is ``alpha`` (shape ``out x c x n x n``).
- ``"dense"``: the layer keeps a dense ``weight`` trained toward the structure with
  :func:`structural_regularization_loss`; :meth:`decompose` then projects it.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .common import dense_conv, dense_linear

MODES = ("coeff", "dense")


def box_window(C: int, N: int, c: int, n: int) -> tuple[int, int, int]:
    """Sum-pool window ``(C-c+1, N-n+1, N-n+1)`` of a ``C x N x N`` kernel at ``c x n x n``."""
    if not (1 <= c <= C and 1 <= n <= N):
        raise ValueError(f"structure {c}x{n}x{n} does not fit a {C}x{N}x{N} kernel "
                         f"(need 1 <= c <= {C} and 1 <= n <= {N})")
    return (C - c + 1, N - n + 1, N - n + 1)


def _box_full(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """Full 1-D convolution of ``x`` with ``length`` ones along ``dim`` (running sums)."""
    if length == 1:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [length - 1, length - 1]
    c = F.pad(x, pad).cumsum(dim)
    size = x.shape[dim] + length - 1
    upper = c.narrow(dim, length - 1, size)
    lower = F.pad(c.narrow(dim, 0, size - 1), [0, 0] * (x.dim() - 1 - dim) + [1, 0])
    return upper - lower


def compose_kernel(alpha: torch.Tensor, C: int, N: int) -> torch.Tensor:
    """Dense kernels ``(O, C, N, N)`` from coefficients ``(O, c, n, n)``: sum of box masks.

    The box is separable, so the full 3-D convolution is three 1-D running sums."""
    O, c, n, _ = alpha.shape
    window = box_window(C, N, c, n)
    out = alpha
    for dim, length in zip((1, 2, 3), window):
        out = _box_full(out, dim, length)
    return out


def structure_basis(C: int, N: int, c: int, n: int, dtype=torch.float64) -> torch.Tensor:
    """Matrix ``A`` of shape ``(C*N*N, c*n*n)`` whose columns are the flattened boxes."""
    k = c * n * n
    eye = torch.eye(k, dtype=dtype).reshape(k, c, n, n)
    return compose_kernel(eye, C, N).reshape(k, C * N * N).t().contiguous()


def project_to_structure(weight: torch.Tensor, c: int, n: int) -> tuple[torch.Tensor, float]:
    """Least-squares ``alpha = A^+ W`` for kernels ``(O, C, N, N)``, and the relative residual
    ``||W - A alpha||_F / ||W||_F`` (0 for an exactly structured kernel)."""
    O, C, N, _ = weight.shape
    A = structure_basis(C, N, c, n, dtype=torch.float64)
    W = weight.detach().to(torch.float64).reshape(O, -1).t()
    alpha = torch.linalg.lstsq(A, W).solution
    norm = torch.linalg.norm(W)
    residual = float(torch.linalg.norm(W - A @ alpha) / norm) if norm > 0 else 0.0
    return alpha.t().reshape(O, c, n, n).to(weight.dtype), residual


def sum_pool(x: torch.Tensor, groups: int, window: tuple[int, int, int], padding: int) -> torch.Tensor:
    """The shared sum-pool of the decomposition: zero-pad spatially, then sum over a
    ``window`` box along (channel within group, height, width), stride 1."""
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    B, Cin, H, W = x.shape
    pooled = F.avg_pool3d(x.reshape(B * groups, 1, Cin // groups, H, W), window, stride=1,
                          divisor_override=1)
    return pooled.reshape(B, -1, *pooled.shape[-2:])


class _StructuredBase(nn.Module):
    """Shared by the conv and linear forms; ``C`` is input channels per group."""

    def _init_params(self, out_features: int, C: int, N: int, c: int, n: int, mode: str):
        if mode not in MODES:
            raise ValueError(f"unknown structured mode {mode!r}; expected one of {MODES}")
        box_window(C, N, c, n)  # validates c and n
        self.C, self.N, self.c, self.n, self.mode = C, N, c, n, mode
        # The output variance of nn.Conv2d's default init (std 1/sqrt(3 fan_in)), on the
        # small conv's real fan-in: each pooled value sums prod(window) inputs.
        # Zero mean per filter: a box kernel multiplies an input's mean by prod(window), so
        # without it a deep random network (eval-mode BN) overflows.
        if mode == "coeff":
            std = 1.0 / math.sqrt(3.0 * c * n * n * math.prod(box_window(C, N, c, n)))
            alpha = torch.randn(out_features, c, n, n)
            if c * n * n > 1:
                alpha -= alpha.mean(dim=(1, 2, 3), keepdim=True)
            self.alpha = nn.Parameter(alpha * std)
        else:
            self.weight = nn.Parameter(torch.randn(out_features, C, N, N) / math.sqrt(3.0 * C * N * N))

    @property
    def window(self) -> tuple[int, int, int]:
        return box_window(self.C, self.N, self.c, self.n)

    def dense_kernel(self) -> torch.Tensor:
        """The ``(out, C, N, N)`` kernel this layer applies."""
        if self.mode == "coeff":
            return compose_kernel(self.alpha, self.C, self.N)
        return self.weight

    def decompose(self) -> tuple[torch.Tensor, float]:
        """Coefficients of the nearest structured kernel and the relative residual."""
        if self.mode == "coeff":
            return self.alpha.detach().clone(), 0.0
        return project_to_structure(self.weight, self.c, self.n)

    def sr_loss(self) -> torch.Tensor:
        """Structural-regularization term ``||(I - A A^+) W||_F / ||W||_F`` (0 in coeff mode)."""
        if self.mode == "coeff":
            return self.alpha.new_zeros(())
        W = self.weight.reshape(self.weight.shape[0], -1).t()
        A, A_pinv = self._basis(W.dtype, W.device)
        return torch.linalg.norm(W - A @ (A_pinv @ W)) / torch.linalg.norm(W).clamp_min(1e-12)

    def _basis(self, dtype, device):
        cached = getattr(self, "_basis_cache", None)
        if cached is None or cached[0].dtype != dtype or cached[0].device != device:
            A = structure_basis(self.C, self.N, self.c, self.n)
            cached = (A.to(dtype=dtype, device=device),
                      torch.linalg.pinv(A).to(dtype=dtype, device=device))
            object.__setattr__(self, "_basis_cache", cached)
        return cached

    def to_coeff(self) -> "_StructuredBase":
        """Switch a dense-mode layer to coefficients (by projection); returns self."""
        if self.mode == "dense":
            alpha, _ = self.decompose()
            del self.weight
            self.alpha = nn.Parameter(alpha)
            self.mode = "coeff"
        return self


class StructuredConv2d(_StructuredBase):
    """2-D conv with ``c x n x n`` structure per filter (per group for grouped convs)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, c: int, n: int,
                 stride: int = 1, padding: int = 0, groups: int = 1, bias: bool = False,
                 mode: str = "coeff"):
        super().__init__()
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"channels {in_channels}->{out_channels} not divisible by groups={groups}")
        if not isinstance(kernel_size, int):
            if kernel_size[0] != kernel_size[1]:
                raise ValueError("structured convs need square kernels")
            kernel_size = kernel_size[0]
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding, self.groups = kernel_size, stride, padding, groups
        self._init_params(out_channels, in_channels // groups, kernel_size, c, n, mode)
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.dense_kernel(), self.bias, self.stride, self.padding, 1, self.groups)

    def forward_decomposed(self, x: torch.Tensor) -> torch.Tensor:
        """Same result via the explicit sum-pool followed by the small ``c x n x n`` conv."""
        alpha, _ = self.decompose() if self.mode == "dense" else (self.alpha, 0.0)
        pooled = sum_pool(x, self.groups, self.window, self.padding)
        return F.conv2d(pooled, alpha.to(x.dtype), self.bias, self.stride, 0, 1, self.groups)

    def to_dense(self) -> nn.Conv2d:
        return dense_conv(self.dense_kernel().detach(), self.bias, self.stride, self.padding,
                          self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"structure={self.c}x{self.n}x{self.n}, stride={self.stride}, "
                f"padding={self.padding}, groups={self.groups}, mode={self.mode}")


class StructuredLinear(_StructuredBase):
    """Linear layer structured along its input features (window ``in - c + 1``)."""

    def __init__(self, in_features: int, out_features: int, c: int, bias: bool = True,
                 mode: str = "coeff"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_params(out_features, in_features, 1, c, 1, mode)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_kernel().reshape(self.out_features, self.in_features), self.bias)

    def to_dense(self) -> nn.Linear:
        return dense_linear(self.dense_kernel().detach().reshape(self.out_features, self.in_features),
                            self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"structure={self.c}, mode={self.mode}")


def structural_regularization_loss(model: nn.Module) -> torch.Tensor:
    """Sum of the SR terms of every dense-mode structured layer of ``model``."""
    terms = [m.sr_loss() for m in model.modules()
             if isinstance(m, _StructuredBase) and m.mode == "dense"]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).sum()


def structured_residual(weight: torch.Tensor, c: int, n: int) -> float:
    """Relative residual of a dense conv/linear weight to its nearest ``c x n x n`` kernel."""
    if weight.dim() == 2:
        weight = weight[:, :, None, None]
    return project_to_structure(weight, c, n)[1]
