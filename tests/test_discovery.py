"""Tests for structexport.discovery: finding the (c, n) structure a conv kernel has."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from structexport import discovery
from structexport.discovery import (EXACT, candidate_residuals, discover_structure,
                                    project_kronecker)
from structexport.layers.structured import compose_kernel, project_to_structure

DT = torch.float64


def rand(*shape, seed=0, dtype=DT):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def structured(O, C, N, c, n, seed=0, dtype=DT):
    alpha = rand(O, c, n, n, seed=seed, dtype=dtype)
    return compose_kernel(alpha, C, N), alpha


# (C, N, c, n): both axes, spatial only (c = C), channels only (n = N), depthwise (C = 1),
# 1x1 (N = 1), odd sizes, the cheapest structure (1, 1)
EXACT_CASES = [(8, 3, 4, 2), (8, 3, 8, 2), (8, 3, 3, 3), (1, 3, 1, 2), (1, 5, 1, 3),
               (16, 1, 5, 1), (16, 1, 15, 1), (7, 5, 3, 2), (5, 7, 2, 4), (9, 3, 1, 1),
               (13, 3, 12, 1), (6, 4, 6, 3)]


@pytest.mark.parametrize("C,N,c,n", EXACT_CASES)
def test_exactly_structured_kernel_gives_its_structure(C, N, c, n):
    W, alpha = structured(6, C, N, c, n, seed=C * 100 + N * 10 + c + n)
    d = discover_structure(W)
    # never more multiplies than the generating structure, and exact
    assert d.c * d.n**2 <= c * n**2
    assert d.residual <= EXACT
    # random coefficients make every cheaper candidate fail: the generator is found
    assert (d.c, d.n) == (c, n)
    assert (d.C, d.N) == (C, N)
    assert d.residual < 1e-12
    assert d.structured == ((c, n) != (C, N))
    assert d.macs_ratio == pytest.approx(c * n * n / (C * N * N))
    assert d.alpha.dtype == DT and d.alpha.shape == (6, c, n, n)
    torch.testing.assert_close(d.alpha, alpha, rtol=0, atol=1e-10)
    torch.testing.assert_close(compose_kernel(d.alpha, C, N), W, rtol=0, atol=1e-10)
    assert 1 <= d.exact_checks <= d.candidates_checked <= C * N


def test_cheaper_structure_is_found_when_the_kernel_has_one():
    # declared as dense (C, N) = (6, 3) but constant: exactly structured at 1x1x1
    W = compose_kernel(torch.full((4, 1, 1, 1), 0.7, dtype=DT), 6, 3)
    d = discover_structure(W)
    assert (d.c, d.n) == (1, 1) and d.residual <= 1e-14
    torch.testing.assert_close(d.alpha, torch.full((4, 1, 1, 1), 0.7, dtype=DT))
    # constant along channels only: spatial structure 2x2 found at c = 1
    W, alpha = structured(4, 1, 3, 1, 2, seed=3)
    d = discover_structure(W.expand(4, 5, 3, 3).contiguous())
    assert (d.c, d.n) == (1, 2) and d.residual <= 1e-12
    torch.testing.assert_close(d.alpha, alpha, rtol=0, atol=1e-12)


@pytest.mark.parametrize("O,C,N,c,n", [(32, 64, 3, 32, 2), (16, 128, 1, 64, 1), (8, 3, 7, 2, 4),
                                       (16, 96, 3, 95, 1), (16, 1, 3, 1, 2)])
def test_float32_stored_exact_kernel_is_found_with_default_tolerance(O, C, N, c, n):
    W, alpha = structured(O, C, N, c, n, seed=7, dtype=torch.float32)   # composed in float32
    assert W.dtype == torch.float32
    d = discover_structure(W)
    assert (d.c, d.n) == (c, n)
    assert 0 < d.residual < 1e-6        # float32 rounding, far below EXACT
    assert d.alpha.dtype == torch.float32
    torch.testing.assert_close(d.alpha, alpha, rtol=1e-4, atol=1e-4)
    # the same kernel passed as a numpy array
    d2 = discover_structure(W.numpy())
    assert (d2.c, d2.n) == (c, n) and d2.alpha.dtype == torch.float32


@pytest.mark.parametrize("O,C,N", [(16, 8, 3), (4, 32, 1), (3, 1, 3), (2, 3, 7), (1, 5, 2)])
def test_random_dense_kernel_is_not_structured(O, C, N):
    W = rand(O, C, N, N, seed=O + C + N) + 0.3
    d = discover_structure(W)
    assert (d.c, d.n) == (C, N)
    assert not d.structured
    assert d.residual == 0.0 and d.macs_ratio == 1.0
    assert d.candidates_checked == C * N    # the worst case: every candidate compared
    torch.testing.assert_close(d.alpha, W, rtol=0, atol=0)


@pytest.mark.parametrize("O,C,N,c,n", [(16, 16, 3, 8, 2), (32, 24, 1, 12, 1), (8, 1, 5, 1, 3)])
def test_approximately_structured_kernel_needs_a_looser_tolerance(O, C, N, c, n):
    W0, _ = structured(O, C, N, c, n, seed=11)
    noise = rand(O, C, N, N, seed=12)
    W = W0 + noise * (1e-3 * W0.norm() / noise.norm())
    expected = project_to_structure(W, c, n)[1]
    assert 5e-4 < expected < 1.1e-3
    d = discover_structure(W)
    assert (d.c, d.n) == (C, N) and not d.structured
    d = discover_structure(W, max_residual=1e-2)
    assert (d.c, d.n) == (c, n) and d.structured
    assert d.residual == pytest.approx(expected, rel=1e-9)
    torch.testing.assert_close(d.alpha, project_to_structure(W, c, n)[0], rtol=0, atol=1e-10)


@pytest.mark.parametrize("O,C,N", [(3, 5, 3), (4, 7, 3), (2, 1, 3), (3, 6, 1), (2, 4, 5),
                                   (3, 9, 2)])
def test_project_kronecker_matches_dense_lstsq(O, C, N):
    W = rand(O, C, N, N, seed=C * N) + 0.5
    for c in range(1, C + 1):
        for n in range(1, N + 1):
            a_ref, r_ref = project_to_structure(W, c, n)
            a, r = project_kronecker(W, c, n)
            assert a.shape == (O, c, n, n) and a.dtype == DT
            torch.testing.assert_close(a, a_ref, rtol=0, atol=1e-10)
            assert r == pytest.approx(r_ref, abs=1e-10)


def test_project_kronecker_keeps_dtype_and_rejects_bad_sizes():
    W = rand(2, 6, 3, 3, dtype=torch.float32)
    a, r = project_kronecker(W, 3, 2)
    assert a.dtype == torch.float32 and 0 < r < 1
    with pytest.raises(ValueError):
        project_kronecker(W, 7, 2)
    with pytest.raises(ValueError):
        project_kronecker(W, 3, 0)


@pytest.mark.parametrize("O,C,N", [(5, 7, 3), (3, 10, 2), (4, 1, 4), (6, 13, 1), (2, 12, 5)])
def test_fast_trace_residuals_equal_projection_residuals(O, C, N):
    W = rand(O, C, N, N, seed=O * C * N) + 0.4
    fast = candidate_residuals(W)
    assert fast.shape == (C, N)
    exact = np.array([[project_to_structure(W, c, n)[1] for n in range(1, N + 1)]
                      for c in range(1, C + 1)])
    np.testing.assert_allclose(fast, exact, rtol=0, atol=1e-9)
    assert fast[C - 1, N - 1] == 0.0


def test_fast_residuals_at_large_C_equal_projection():
    W = rand(24, 700, 1, 1, seed=5) + 0.5
    fast = candidate_residuals(W)
    for c in (1, 2, 233, 349, 350, 351, 699, 700):
        assert fast[c - 1, 0] == pytest.approx(project_kronecker(W, c, 1)[1], abs=1e-9)


def test_large_C_exact_structure_and_fast_path_rejection():
    W, alpha = structured(8, 1024, 1, 300, 1, seed=9)
    d = discover_structure(W)
    assert (d.c, d.n) == (300, 1) and d.residual < 1e-12
    assert d.exact_checks == 1          # the fast residuals leave one candidate to verify
    torch.testing.assert_close(d.alpha, alpha, rtol=0, atol=1e-9)


def test_verification_by_projection_rejects_a_wrong_fast_pass(monkeypatch):
    """If the fast residuals admit every candidate, the exact check must still choose."""
    W, _ = structured(4, 6, 3, 3, 2, seed=4)
    monkeypatch.setattr(discovery, "_residuals_sq",
                        lambda w, ns: {n: np.zeros(w.shape[1]) for n in ns})
    d = discover_structure(W)
    assert (d.c, d.n) == (3, 2) and d.residual < 1e-12
    assert d.exact_checks == d.candidates_checked > 1


def test_ties_in_multiplies_go_to_the_smaller_residual():
    # 4x1x1 and 1x2x2 both cost 4; the kernel is exactly 1x2x2, nearly (not) 4x1x1
    W, _ = structured(3, 4, 3, 1, 2, seed=8)
    d = discover_structure(W, max_residual=2.0)   # everything passes: cheapest wins
    assert (d.c, d.n) == (1, 1)
    r4 = project_kronecker(W, 4, 1)[1]
    d = discover_structure(W, max_residual=2.0, candidates=[(4, 1), (1, 2)])
    assert r4 > 0 and (d.c, d.n) == (1, 2) and d.residual < 1e-12


def test_candidates_restrict_the_search():
    W, _ = structured(4, 8, 3, 4, 2, seed=2)
    d = discover_structure(W, candidates=[(4, 2), (2, 2)])
    assert (d.c, d.n) == (4, 2) and d.candidates_checked == 2
    d = discover_structure(W, candidates=[(2, 2), (8, 1)])
    assert (d.c, d.n) == (8, 3)          # no listed candidate fits: the dense fallback
    with pytest.raises(ValueError):
        discover_structure(W, candidates=[(9, 1)])
    with pytest.raises(ValueError):
        discover_structure(W, max_residual=-1.0)


def test_zero_linear_and_malformed_weights():
    d = discover_structure(torch.zeros(3, 5, 3, 3))
    assert (d.c, d.n) == (1, 1) and d.residual == 0.0
    assert torch.count_nonzero(d.alpha) == 0
    W, _ = structured(4, 10, 1, 5, 1, seed=6)
    d = discover_structure(W[:, :, 0, 0])       # a linear layer's (out, in) weight
    assert (d.c, d.n) == (5, 1)
    with pytest.raises(ValueError):
        discover_structure(torch.zeros(3, 5, 3, 2))
    with pytest.raises(ValueError):
        discover_structure(torch.full((2, 2, 1, 1), float("nan")))
