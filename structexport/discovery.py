"""Discover the structure a conv kernel actually has (DESIGN.md section 1.1).

A kernel ``W`` of shape ``(O, C, N, N)`` (``C`` = input channels per group) has structure
``c x n x n`` when every filter is a sum of ``c*n*n`` boxes, i.e. ``vec(W_o) = A alpha_o``
with ``A = B_C(c) (x) B_N(n) (x) B_N(n)``; ``B_L(l)`` is ``L x l`` with ones at rows
``j .. j+L-l`` of column ``j``. :func:`discover_structure` finds the cheapest ``(c, n)``
(fewest multiplies ``c*n*n``) whose relative residual ``||W - P W|| / ||W||`` is within a
tolerance, never forming ``A``:

* ``P = P_C (x) P_S`` (``P_S = P_N (x) P_N``), so ``||P W||^2 = tr(P_C H_n)`` with the
  ``C x C`` matrix ``H_n = sum_o W_o P_S W_o^T`` -- one Gram product per ``n``.
* The orthogonal complement of ``range(B_C(c))`` is the ``w``-periodic vectors with zero
  period sum (``w = C-c+1``). Its projector has a closed-form trace against ``H``:
  with ``m_a`` the number of indices ``i < C`` with ``i mod w = a`` and ``g_i = 1/m_{i mod w}``,
  ``tr(P_perp H) = sum_{i = j mod w} g_i H_ij - (g^T H g) / sum_a 1/m_a``.
  ``g`` takes only two values, so both sums are ``O((C/w)^2)`` look-ups in prefix sums of
  ``H`` (2-D, and along its diagonals): no linear solve, and ``O(C^2)`` for all ``c`` of
  one ``n`` (``sum_w (C/w)^2 < 1.7 C^2``) after the ``O(C^2 O n^2)`` Gram product.
  So a dense layer, where every candidate is compared, costs ``O(C^2 O N^3)``.
* Candidates are compared cheapest first; the first that passes is verified exactly by
  projection (:func:`project_kronecker`: the Kronecker pinv of ``A`` applied per axis;
  along channels by the same periodic complement and a running-sum recurrence, ``O(C)``
  per column), and the search goes on if the verification fails.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

# Relative residual below which a kernel counts as exactly structured. Measured
# (benchmarks/discovery.py --exact-floor): kernels composed by compose_kernel in float32
# from random coefficients (zero-mean or with mean 3) and stored in float32 measure at most
# 3.5e-8 on ResNet-50 shapes (C/2x2x2 at 64..512 channels; C/2 and C-1 along channels of
# 1x1 convs up to 2048; 2x4x4 on the 7x7 stem); composed in float64 then stored in float32,
# 2.2e-8. EXACT is ~300x above that floor, yet a kernel this close to a structure changes
# the layer's output only at the 1e-5 level: decomposing it is a rounding, not an
# approximation. SR-trained kernels are only approximately structured: pass a looser
# max_residual for them.
EXACT = 1e-5

_EPS = np.finfo(np.float64).eps


@dataclass(frozen=True)
class Discovery:
    """The cheapest structure found for one kernel ``(O, C, N, N)``."""
    c: int
    n: int
    C: int
    N: int
    residual: float            # exact relative residual of (c, n), by projection
    alpha: torch.Tensor        # (O, c, n, n) least-squares coefficients, the weight's dtype
    macs_ratio: float          # (c*n*n) / (C*N*N)
    candidates_checked: int    # candidates compared against the tolerance, cheapest first
    exact_checks: int          # of those, how many were verified by projection
    structured: bool           # (c, n) != (C, N)

    @property
    def window(self) -> tuple[int, int, int]:
        return (self.C - self.c + 1, self.N - self.n + 1, self.N - self.n + 1)


# ------------------------------------------------------------------ inputs and box matrices

def _as_float64(weight) -> tuple[np.ndarray, torch.dtype]:
    """``(O, C, N, N)`` float64 copy and the dtype to hand coefficients back in.
    2-D weights (linear layers) are read as ``(O, C, 1, 1)``."""
    if isinstance(weight, torch.Tensor):
        dtype = weight.dtype
        w = weight.detach().cpu().to(torch.float64).numpy()
    else:
        w = np.asarray(weight)
        dtype = torch.from_numpy(np.zeros(0, dtype=w.dtype)).dtype
        w = w.astype(np.float64)
    if w.ndim == 2:
        w = w[:, :, None, None]
    if w.ndim != 4 or w.shape[2] != w.shape[3]:
        raise ValueError(f"expected a conv weight (O, C, N, N), got shape {tuple(w.shape)}")
    if not dtype.is_floating_point:
        raise ValueError(f"expected a floating-point weight, got {dtype}")
    if not np.isfinite(w).all():
        raise ValueError("weight has non-finite values")
    return w, dtype


def box_matrix(L: int, l: int) -> np.ndarray:
    """``B_L(l)``: ``L x l``, column ``j`` is ones at rows ``j .. j+L-l``."""
    if not 1 <= l <= L:
        raise ValueError(f"structure size {l} does not fit an axis of length {L}")
    i = np.arange(L)[:, None]
    j = np.arange(l)[None, :]
    return ((i >= j) & (i <= j + L - l)).astype(np.float64)


def _box_pinv(L: int, l: int) -> np.ndarray:
    """``B_L(l)^+`` (``l x L``) by QR: ``R^-1 Q^T``. Used for the spatial axes only
    (``L = N`` is tiny); the channel axis has the closed forms below."""
    if l == L:
        return np.eye(L)
    q, r = np.linalg.qr(box_matrix(L, l))
    return np.linalg.solve(r, q.T)


def _box_orthonormal(L: int, l: int) -> np.ndarray:
    """Orthonormal basis (``L x l``) of ``range(B_L(l))``."""
    if l == L:
        return np.eye(L)
    return np.linalg.qr(box_matrix(L, l))[0]


# ------------------------------------------------------------------ exact projection

def _channel_complement(x: np.ndarray, c: int) -> np.ndarray:
    """``P_perp(c) x`` along axis 1 of ``x`` (``B x C x M``): the nearest ``w``-periodic
    vector with zero period sum (``w = C-c+1``), i.e. the residual of the channel
    projection. Per residue class ``a`` (``m_a`` members, mean ``xbar_a``) the minimiser
    under the zero-sum constraint is ``v_a = xbar_a - (sum_b xbar_b) / (sum_b 1/m_b) / m_a``
    (Lagrange). O(B C M), no factorisation of ``B_C``."""
    B, C, M = x.shape
    w = C - c + 1
    k, r = divmod(C, w)
    periods = -(-C // w)
    padded = np.zeros((B, periods * w, M))
    padded[:, :C] = x
    m = np.full((w, 1), float(k))
    m[:r] += 1.0
    mean = padded.reshape(B, periods, w, M).sum(axis=1) / m
    v = mean - mean.sum(axis=1, keepdims=True) / (1.0 / m).sum() / m
    return np.tile(v, (1, periods, 1))[:, :C]


def _channel_solve(y: np.ndarray, c: int) -> np.ndarray:
    """``alpha`` with ``B_C(c) alpha = y`` along axis 1 of ``y`` (``B x C x M``), for ``y``
    in ``range(B_C(c))``: ``y_i = sum_{j=i-w+1..i} alpha_j`` gives
    ``alpha_i = y_i - y_{i-1} + alpha_{i-w}``, a running sum of first differences along
    each residue class mod ``w``. It only adds, so rounding grows like the square root of
    the class length ``c/w``."""
    B, C, M = y.shape
    w = C - c + 1
    periods = -(-c // w)
    diff = np.zeros((B, periods * w, M))
    diff[:, :c] = np.diff(y[:, :c], axis=1, prepend=0.0)
    return np.cumsum(diff.reshape(B, periods, w, M), axis=1).reshape(B, -1, M)[:, :c]


def _project64(w: np.ndarray, c: int, n: int) -> tuple[np.ndarray, float]:
    """float64 ``alpha = (B_C^+ (x) B_N^+ (x) B_N^+) W`` and the relative residual
    ``||W - P W|| / ||W||``, computed from the projectors (accurate near 0)."""
    O, C, N, _ = w.shape
    norm = float(np.linalg.norm(w))
    if (c, n) == (C, N) or norm == 0.0:
        return np.zeros((O, c, n, n)) if norm == 0.0 else w.copy(), 0.0
    # Spatial first, flattened: (N*N, C*O). The spatial maps are Kronecker squares of the
    # tiny per-axis ones, applied as one wide gemm each (OpenBLAS is slow and erratic on
    # the skinny (C*O, N*N) layout: measured 2 ms .. 100 ms for the same product).
    wt = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(N * N, C * O)
    at, pt = wt, wt
    if n < N:  # pinv for alpha, orthogonal projector for P_S W
        pinv, q = _box_pinv(N, n), _box_orthonormal(N, n)
        q = np.kron(q, q)
        at = np.kron(pinv, pinv) @ wt
        pt = q @ (np.ascontiguousarray(q.T) @ wt)
    wt, pt = wt.reshape(N * N, C, O), pt.reshape(N * N, C, O)
    at = at.reshape(n * n, C, O)
    if c < C:
        comp = _channel_complement(pt, c)
        residual = np.linalg.norm((wt - pt) + comp)   # W - P_C P_S W, small terms first
        at = _channel_solve(at - _channel_complement(at, c), c)
    else:
        residual = np.linalg.norm(wt - pt)
    alpha = at.reshape(n, n, c, O).transpose(3, 2, 0, 1)
    return np.ascontiguousarray(alpha), float(residual / norm)


def project_kronecker(weight, c: int, n: int) -> tuple[torch.Tensor, float]:
    """Same result as ``structured.project_to_structure`` -- least-squares coefficients
    ``(O, c, n, n)`` in the weight's dtype and the relative residual -- but through the
    per-axis pseudo-inverses (closed forms along channels), so the cost is ``O(C O N^2)``
    instead of a dense lstsq on the ``C N^2 x c n^2`` basis."""
    w, dtype = _as_float64(weight)
    _, C, N, _ = w.shape
    if not (1 <= c <= C and 1 <= n <= N):
        raise ValueError(f"structure {c}x{n}x{n} does not fit a {C}x{N}x{N} kernel")
    alpha, residual = _project64(w, c, n)
    return torch.from_numpy(np.ascontiguousarray(alpha)).to(dtype), residual


# ------------------------------------------------------------------ fast residuals

def _spatial_gram(w: np.ndarray, n: int) -> tuple[np.ndarray, float]:
    """``H_n = sum_o W_o P_S W_o^T`` (``C x C``) and ``||W - W P_S||^2`` (the part of the
    residual the channel axis cannot change), with ``P_S = Q Q^T``, ``Q`` orthonormal, so
    ``H_n = X X^T`` for ``X = W Q``: one Gram product with inner size ``O*n^2``."""
    O, C, N, _ = w.shape
    flat = w.reshape(O, C, N * N)
    if n == N:
        x, spatial = flat, 0.0
    else:
        q1 = _box_orthonormal(N, n)
        q = np.kron(q1, q1)                      # (N^2, n^2), row-major (i, j) order
        x = flat @ q
        spatial = float(np.square(flat - x @ np.ascontiguousarray(q.T)).sum())
    x = np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(C, -1)
    return x @ x.T, spatial


def _prefix(x: np.ndarray, axes: tuple[int, ...]) -> np.ndarray:
    """Prefix sums along ``axes`` with a leading zero, so ``p[b] - p[a]`` sums ``[a, b)``."""
    p = np.zeros(tuple(d + 1 if i in axes else d for i, d in enumerate(x.shape)))
    p[tuple(slice(1, None) if i in axes else slice(None) for i in range(x.ndim))] = x
    for ax in axes:
        np.cumsum(p, axis=ax, out=p)
    return p


def _channel_complement_traces(h: np.ndarray) -> np.ndarray:
    """``t[c-1] = tr(P_perp(c) H)`` for every ``c`` in ``1..C``, where ``P_perp(c)``
    projects onto the complement of ``range(B_C(c))``: the ``w``-periodic, zero-period-sum
    vectors, ``w = C-c+1``. See the module docstring for the closed form; ``g`` is
    ``1/k`` plus ``beta`` on the inner set ``I = {i : i mod w < r}`` (``C = k w + r``), a
    union of ``k+1`` runs ``[t w, t w + r)``, so every sum below is ``O((C/w)^2)`` lookups
    in prefix sums."""
    C = h.shape[0]
    total = h.sum()
    # diag[d, i] = H[i, i+d] (0 past the end): row d is the d-th upper diagonal.
    padded = np.zeros((C, 2 * C))
    padded[:, :C] = h
    st = padded.strides
    diag = np.lib.stride_tricks.as_strided(padded, shape=(C, C), strides=(st[1], st[0] + st[1]),
                                           writeable=False)
    diag_cum = _prefix(diag, (1,))               # along each diagonal
    diag_sum = diag_cum[:, -1]
    row_sum = _prefix(h.sum(axis=1), (0,))       # of H's row sums
    block = _prefix(h, (0, 1))                   # 2-D: sums of H over rectangles
    out = np.empty(C)
    out[C - 1] = 0.0  # w = 1 (c = C): B_C is the identity; the formula would only cancel
    for w in range(2, C + 1):
        k, r = divmod(C, w)
        d = np.arange(0, C, w)                   # diagonals at multiples of w
        twice = np.full(d.size, 2.0)
        twice[0] = 1.0                           # H symmetric, g w-periodic: lower = upper
        same = twice @ diag_sum[d] / k           # sum_{i = j mod w} g_i H_ij ...
        z = r / (k + 1) + (w - r) / k            # sum_a 1/m_a
        quad = total / k**2                      # g^T H g
        if r:
            beta = 1.0 / (k + 1) - 1.0 / k
            lo = np.arange(k + 1) * w            # runs of I: [lo, hi)
            hi = lo + r
            same += beta * (twice @ (diag_cum[d[:, None], hi] - diag_cum[d[:, None], lo]).sum(1))
            row_in = (row_sum[hi] - row_sum[lo]).sum()           # 1^T H 1_I
            h_in = (block[hi[:, None], hi].sum() - 2.0 * block[lo[:, None], hi].sum()
                    + block[lo[:, None], lo].sum())
            quad += 2.0 * beta / k * row_in + beta**2 * h_in
        out[C - w] = same - quad / z
    return out


def _residuals_sq(w: np.ndarray, ns: Iterable[int]) -> dict[int, np.ndarray]:
    """Fast relative residual^2 for every ``c`` (index ``c-1``) of each ``n`` in ``ns``."""
    norm2 = float(np.square(w).sum())
    out = {}
    for n in ns:
        h, spatial = _spatial_gram(w, n)
        perp = np.maximum(_channel_complement_traces(h), 0.0)
        out[n] = (spatial + perp) / norm2 if norm2 > 0 else np.zeros(w.shape[1])
    return out


def candidate_residuals(weight) -> np.ndarray:
    """Relative residual of every candidate by the fast trace method: ``r[c-1, n-1]``."""
    w, _ = _as_float64(weight)
    res = _residuals_sq(w, range(1, w.shape[2] + 1))
    return np.sqrt(np.stack([res[n] for n in sorted(res)], axis=1))


# ------------------------------------------------------------------ discovery

def _candidate_list(C: int, N: int, candidates) -> list[tuple[int, int]]:
    """Valid ``(c, n)`` pairs, always with the unstructured ``(C, N)`` as the fallback."""
    if candidates is None:
        return [(c, n) for c in range(1, C + 1) for n in range(1, N + 1)]
    out = {(C, N)}
    for c, n in candidates:
        if not (1 <= c <= C and 1 <= n <= N):
            raise ValueError(f"candidate {c}x{n}x{n} does not fit a {C}x{N}x{N} kernel")
        out.add((int(c), int(n)))
    return sorted(out)


def _noise_sq(w: np.ndarray) -> float:
    """Rounding allowance on the fast residual^2: the trace difference cancels terms of
    size ~||W||^2, so its error is a few eps times the number of terms summed per entry.
    Measured on exactly structured float64 kernels (C/2, C-1, 2 along 2048 channels; C/2x2x2
    at 512x3x3; coefficients with and without a mean): at most 1e-14, while this allowance
    is >= 8e-12 -- candidates within it are verified by projection anyway."""
    _, C, N, _ = w.shape
    return 64.0 * _EPS * C * N * N


def discover_structure(weight, max_residual: float = EXACT, candidates=None) -> Discovery:
    """Cheapest ``(c, n)`` -- fewest multiplies ``c*n*n``, ties to the smaller residual --
    whose relative residual is ``<= max_residual``; ``(C, N)`` (residual 0) when no
    structure fits. ``candidates`` restricts the search to those ``(c, n)`` pairs."""
    if not max_residual >= 0.0:
        raise ValueError(f"max_residual must be >= 0, got {max_residual}")
    w, dtype = _as_float64(weight)
    _, C, N, _ = w.shape
    pairs = _candidate_list(C, N, candidates)
    fast = _residuals_sq(w, sorted({n for _, n in pairs}))
    allow = max_residual**2 + _noise_sq(w)
    groups: dict[int, list[tuple[float, int, int]]] = {}
    for c, n in pairs:
        groups.setdefault(c * n * n, []).append((float(fast[n][c - 1]), c, n))
    checked = exact = 0
    for macs in sorted(groups):
        best = None
        for r2, c, n in sorted(groups[macs]):
            checked += 1
            if r2 > allow:
                continue
            exact += 1  # verify by projection: the trace difference can cancel
            alpha, res = _project64(w, c, n)
            if res <= max_residual and (best is None or res < best[0]):
                best = (res, c, n, alpha)
        if best is not None:
            res, c, n, alpha = best
            return Discovery(c=c, n=n, C=C, N=N, residual=res,
                             alpha=torch.from_numpy(np.ascontiguousarray(alpha)).to(dtype),
                             macs_ratio=(c * n * n) / (C * N * N), candidates_checked=checked,
                             exact_checks=exact, structured=(c, n) != (C, N))
    raise AssertionError("unreachable: (C, N) always has residual 0")
