"""Tests for structexport.layers.structured (DESIGN.md section 1.1)."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from structexport.layers.structured import (
    StructuredConv2d,
    StructuredLinear,
    box_window,
    compose_kernel,
    project_to_structure,
    structural_regularization_loss,
    structure_basis,
    structured_residual,
    sum_pool,
)

DT = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape, seed=0, dtype=DT):
    return torch.randn(*shape, generator=gen(seed), dtype=dtype)


# ---------------------------------------------------------------- brute-force references

def box_mask(C, N, c, n, a, i, j):
    """B(a,i,j): 1 on [a, a+C-c] x [i, i+N-n] x [j, j+N-n], built with explicit loops."""
    B = torch.zeros(C, N, N, dtype=DT)
    for x in range(C):
        for y in range(N):
            for z in range(N):
                if a <= x <= a + C - c and i <= y <= i + N - n and j <= z <= j + N - n:
                    B[x, y, z] = 1.0
    return B


def brute_compose(alpha, C, N):
    """sum_{a,i,j} alpha[o,a,i,j] * B(a,i,j), per output filter o."""
    O, c, n, _ = alpha.shape
    out = torch.zeros(O, C, N, N, dtype=DT)
    for a in range(c):
        for i in range(n):
            for j in range(n):
                B = box_mask(C, N, c, n, a, i, j)
                for o in range(O):
                    out[o] += alpha[o, a, i, j] * B
    return out


def brute_sum_pool(x, groups, window, padding):
    """Zero-pad spatially, then sum every window box (channel-in-group, h, w) with loops."""
    B, Cin, H, W = x.shape
    xp = torch.zeros(B, Cin, H + 2 * padding, W + 2 * padding, dtype=x.dtype)
    xp[:, :, padding:padding + H, padding:padding + W] = x
    Cg = Cin // groups
    wc, wh, ww = window
    Hp, Wp = H + 2 * padding, W + 2 * padding
    oc, oh, ow = Cg - wc + 1, Hp - wh + 1, Wp - ww + 1
    out = torch.zeros(B, groups * oc, oh, ow, dtype=x.dtype)
    for g in range(groups):
        for k in range(oc):
            for y in range(oh):
                for z in range(ow):
                    block = xp[:, g * Cg + k: g * Cg + k + wc, y:y + wh, z:z + ww]
                    out[:, g * oc + k, y, z] = block.sum(dim=(1, 2, 3))
    return out


# ---------------------------------------------------------------- compose_kernel / box_window

COMPOSE_CASES = [
    # (C, N, c, n)
    (4, 3, 2, 2),
    (4, 3, 4, 3),   # c = C, n = N: identity structure
    (5, 3, 1, 1),   # c = 1, n = 1: one box covering everything
    (5, 5, 3, 3),   # odd sizes
    (3, 5, 2, 4),
    (7, 3, 5, 2),
    (1, 3, 1, 2),   # depthwise-like (single channel)
    (6, 1, 2, 1),   # 1x1 / linear-like (channels only)
]


@pytest.mark.parametrize("C,N,c,n", COMPOSE_CASES)
def test_compose_kernel_matches_box_mask_sum(C, N, c, n):
    alpha = rand(3, c, n, n, seed=C * 100 + N * 10 + c + n)
    got = compose_kernel(alpha, C, N)
    assert got.shape == (3, C, N, N)
    assert got.dtype == DT
    torch.testing.assert_close(got, brute_compose(alpha, C, N), atol=1e-12, rtol=0)


def test_compose_kernel_identity_when_structure_is_full():
    alpha = rand(2, 4, 3, 3, seed=1)
    torch.testing.assert_close(compose_kernel(alpha, 4, 3), alpha, atol=0, rtol=0)


def test_compose_kernel_c1_n1_is_constant():
    alpha = rand(3, 1, 1, 1, seed=2)
    K = compose_kernel(alpha, 5, 3)
    torch.testing.assert_close(K, alpha.expand(3, 5, 3, 3), atol=1e-15, rtol=0)


def test_compose_kernel_gradient_is_basis_transpose():
    C, N, c, n = 4, 3, 2, 2
    alpha = rand(2, c, n, n, seed=3).requires_grad_(True)
    G = rand(2, C, N, N, seed=4)
    (compose_kernel(alpha, C, N) * G).sum().backward()
    A = structure_basis(C, N, c, n)
    expected = (A.t() @ G.reshape(2, -1).t()).t().reshape(2, c, n, n)
    torch.testing.assert_close(alpha.grad, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("C,N,c,n", [(4, 3, 2, 2), (5, 5, 5, 1), (1, 3, 1, 3), (6, 1, 1, 1)])
def test_box_window_values(C, N, c, n):
    assert box_window(C, N, c, n) == (C - c + 1, N - n + 1, N - n + 1)


@pytest.mark.parametrize("C,N,c,n", [(4, 3, 5, 2), (4, 3, 2, 4), (4, 3, 0, 2), (4, 3, 2, 0),
                                     (1, 1, 2, 1)])
def test_box_window_rejects_bad_structure(C, N, c, n):
    with pytest.raises(ValueError) as exc:
        box_window(C, N, c, n)
    msg = str(exc.value)
    assert f"{c}x{n}x{n}" in msg and f"{C}x{N}x{N}" in msg


@pytest.mark.parametrize("kwargs", [dict(c=7, n=2), dict(c=3, n=4)])
def test_structured_conv_rejects_structure_larger_than_kernel(kwargs):
    with pytest.raises(ValueError) as exc:
        StructuredConv2d(6, 4, 3, **kwargs)
    msg = str(exc.value)
    assert f"{kwargs['c']}x{kwargs['n']}x{kwargs['n']}" in msg
    assert "6x3x3" in msg


def test_structured_conv_grouped_checks_structure_per_group():
    # 6 input channels in 2 groups: C = 3 per group, so c = 4 does not fit.
    with pytest.raises(ValueError) as exc:
        StructuredConv2d(6, 4, 3, c=4, n=2, groups=2)
    assert "3x3x3" in str(exc.value) and "4x2x2" in str(exc.value)


def test_structured_linear_rejects_c_larger_than_in():
    with pytest.raises(ValueError) as exc:
        StructuredLinear(5, 3, c=6)
    assert "6x1x1" in str(exc.value) and "5x1x1" in str(exc.value)


def test_bad_mode_and_groups_raise():
    with pytest.raises(ValueError, match="mode"):
        StructuredConv2d(4, 4, 3, c=2, n=2, mode="sparse")
    with pytest.raises(ValueError, match="groups"):
        StructuredConv2d(6, 4, 3, c=1, n=2, groups=4)


# ---------------------------------------------------------------- structure_basis

@pytest.mark.parametrize("C,N,c,n", COMPOSE_CASES)
def test_structure_basis_shape_rank_and_columns(C, N, c, n):
    A = structure_basis(C, N, c, n)
    k = c * n * n
    assert A.shape == (C * N * N, k)
    assert A.dtype == DT
    assert int(torch.linalg.matrix_rank(A)) == k
    # Binary, each column is one box with prod(window) ones.
    assert set(A.unique().tolist()) <= {0.0, 1.0}
    wc, wh, ww = box_window(C, N, c, n)
    torch.testing.assert_close(A.sum(0), torch.full((k,), float(wc * wh * ww), dtype=DT))
    # Column (a, i, j) in row-major order is the flattened box mask B(a, i, j).
    for col, (a, i, j) in enumerate(itertools.product(range(c), range(n), range(n))):
        torch.testing.assert_close(A[:, col], box_mask(C, N, c, n, a, i, j).reshape(-1))


# ---------------------------------------------------------------- sum_pool

@pytest.mark.parametrize("groups,Cin,window,padding", [
    (1, 5, (3, 2, 2), 0),
    (1, 4, (2, 3, 3), 1),
    (2, 6, (2, 2, 2), 2),
    (3, 3, (1, 2, 2), 1),   # depthwise: spatial only
    (1, 6, (4, 1, 1), 0),   # 1x1: channels only
])
def test_sum_pool_matches_brute_force(groups, Cin, window, padding):
    x = rand(2, Cin, 5, 6, seed=Cin + padding)
    got = sum_pool(x, groups, window, padding)
    torch.testing.assert_close(got, brute_sum_pool(x, groups, window, padding),
                               atol=1e-12, rtol=0)


# ---------------------------------------------------------------- decomposition == dense conv

def _conv_config(kind: str, k: int):
    n = 2 if k == 3 else 3
    if kind == "g1":
        return dict(in_channels=6, out_channels=4, groups=1, c=3, n=n)
    if kind == "g2":
        return dict(in_channels=6, out_channels=4, groups=2, c=2, n=n)
    # depthwise with channel multiplier 2: C = 1 per group, spatial structure only
    return dict(in_channels=4, out_channels=8, groups=4, c=1, n=n)


@pytest.mark.parametrize("hw", [(7, 9), (11, 5)])
@pytest.mark.parametrize("kind", ["g1", "g2", "dw"])
@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_forward_decomposed_equals_dense_conv(stride, padding, k, kind, hw):
    cfg = _conv_config(kind, k)
    torch.manual_seed(stride * 31 + padding * 7 + k)
    layer = StructuredConv2d(kernel_size=k, stride=stride, padding=padding, bias=True,
                             mode="coeff", **cfg).double()
    with torch.no_grad():
        layer.bias.copy_(rand(cfg["out_channels"], seed=9))
    x = rand(2, cfg["in_channels"], *hw, seed=hw[0] + k)
    dense = layer(x)
    ref = F.conv2d(x, compose_kernel(layer.alpha, layer.C, layer.N), layer.bias, stride,
                   padding, 1, cfg["groups"])
    torch.testing.assert_close(dense, ref, atol=1e-12, rtol=0)
    dec = layer.forward_decomposed(x)
    assert dec.shape == dense.shape
    torch.testing.assert_close(dec, dense, atol=1e-10, rtol=0)
    # The decomposition is "pool, then small strided conv with alpha".
    pooled = sum_pool(x, cfg["groups"], layer.window, padding)
    assert pooled.shape[1] == cfg["groups"] * cfg["c"]
    torch.testing.assert_close(
        F.conv2d(pooled, layer.alpha, layer.bias, stride, 0, 1, cfg["groups"]), dense,
        atol=1e-10, rtol=0)


@pytest.mark.parametrize("c,n", [(1, 1), (6, 3), (2, 1), (1, 3)])
def test_forward_decomposed_extreme_structures(c, n):
    torch.manual_seed(c * 10 + n)
    layer = StructuredConv2d(6, 3, 3, c=c, n=n, stride=2, padding=1).double()
    x = rand(1, 6, 9, 7, seed=5)
    torch.testing.assert_close(layer.forward_decomposed(x), layer(x), atol=1e-10, rtol=0)


def test_forward_decomposed_dense_mode_structured_weight():
    torch.manual_seed(0)
    layer = StructuredConv2d(6, 4, 3, c=3, n=2, stride=2, padding=1, groups=2,
                             mode="dense").double()
    with torch.no_grad():
        layer.weight.copy_(compose_kernel(rand(4, 2, 2, 2, seed=11), 3, 3))
    x = rand(2, 6, 7, 9, seed=12)
    torch.testing.assert_close(layer.forward_decomposed(x), layer(x), atol=1e-10, rtol=0)


# ---------------------------------------------------------------- projection / decompose

@pytest.mark.parametrize("C,N,c,n", [(4, 3, 2, 2), (5, 5, 3, 3), (6, 3, 1, 1), (3, 3, 3, 3),
                                     (8, 1, 3, 1)])
def test_exact_recovery_of_structured_kernel(C, N, c, n):
    alpha = rand(5, c, n, n, seed=C + N + c + n)
    W = compose_kernel(alpha, C, N)
    got_alpha, residual = project_to_structure(W, c, n)
    assert residual < 1e-10
    torch.testing.assert_close(got_alpha, alpha, atol=1e-8, rtol=0)


def test_decompose_dense_mode_recovers_alpha():
    torch.manual_seed(0)
    layer = StructuredConv2d(8, 5, 3, c=4, n=2, mode="dense").double()
    alpha = rand(5, 4, 2, 2, seed=21)
    with torch.no_grad():
        layer.weight.copy_(compose_kernel(alpha, 8, 3))
    got, residual = layer.decompose()
    assert residual < 1e-10
    torch.testing.assert_close(got, alpha, atol=1e-8, rtol=0)


def test_decompose_coeff_mode_returns_alpha_copy():
    layer = StructuredConv2d(4, 2, 3, c=2, n=2).double()
    got, residual = layer.decompose()
    assert residual == 0.0
    torch.testing.assert_close(got, layer.alpha.detach(), atol=0, rtol=0)
    got.add_(1.0)
    assert not torch.equal(got, layer.alpha.detach())  # a copy, not a view


@pytest.mark.parametrize("C,N,c,n", [(4, 3, 2, 2), (6, 5, 3, 2), (8, 1, 4, 1)])
def test_projection_of_random_weight_has_true_residual(C, N, c, n):
    W = rand(6, C, N, N, seed=7 * C + N)
    alpha, residual = project_to_structure(W, c, n)
    assert residual > 0.1
    A = structure_basis(C, N, c, n)
    Wm = W.reshape(6, -1).t()
    # Independent residual: ||W - A alpha|| / ||W||.
    expected = torch.linalg.norm(Wm - A @ alpha.reshape(6, -1).t()) / torch.linalg.norm(Wm)
    assert abs(residual - float(expected)) < 1e-12
    # alpha is the least-squares solution: normal equations A^T (W - A alpha) = 0.
    normal = A.t() @ (Wm - A @ alpha.reshape(6, -1).t())
    assert float(normal.abs().max()) < 1e-9
    # And the residual matches the projector formula ||(I - A A^+) W|| / ||W||.
    P = torch.eye(C * N * N, dtype=DT) - A @ torch.linalg.pinv(A)
    assert abs(residual - float(torch.linalg.norm(P @ Wm) / torch.linalg.norm(Wm))) < 1e-10


def test_project_to_structure_keeps_dtype_and_zero_weight():
    W32 = rand(2, 4, 3, 3, seed=1, dtype=torch.float32)
    alpha, residual = project_to_structure(W32, 2, 2)
    assert alpha.dtype == torch.float32 and alpha.shape == (2, 2, 2, 2)
    assert 0.0 < residual < 1.0
    alpha0, res0 = project_to_structure(torch.zeros(2, 4, 3, 3), 2, 2)
    assert res0 == 0.0 and float(alpha0.abs().max()) == 0.0


def test_structured_residual_linear_and_conv():
    a = rand(3, 2, 1, 1, seed=4)
    W = compose_kernel(a, 5, 1)[:, :, 0, 0]          # (3, 5) linear weight, structure c=2
    assert W.dim() == 2
    assert structured_residual(W, 2, 1) < 1e-10
    assert structured_residual(rand(3, 5, seed=5), 2, 1) > 0.1
    Wc = compose_kernel(rand(2, 3, 2, 2, seed=6), 5, 3)
    assert structured_residual(Wc, 3, 2) < 1e-10


# ---------------------------------------------------------------- SR loss

def _sr_reference(W: torch.Tensor, c: int, n: int) -> torch.Tensor:
    O, C, N, _ = W.shape
    A = structure_basis(C, N, c, n)
    Wm = W.reshape(O, -1).t()
    P = torch.eye(C * N * N, dtype=DT) - A @ torch.linalg.pinv(A)
    return torch.linalg.norm(P @ Wm) / torch.linalg.norm(Wm)


def _sr_model():
    torch.manual_seed(0)
    model = nn.Sequential(
        StructuredConv2d(4, 6, 3, c=2, n=2, padding=1, mode="dense"),
        nn.ReLU(),
        StructuredConv2d(6, 6, 3, c=1, n=2, groups=2, mode="dense"),
        StructuredConv2d(6, 3, 3, c=3, n=2, mode="coeff"),
        nn.Flatten(),
        StructuredLinear(12, 2, c=4, mode="coeff"),
    ).double()
    # Explicit weights, so the tests do not depend on the layers' init scheme.
    with torch.no_grad():
        model[0].weight.copy_(0.1 * rand(6, 4, 3, 3, seed=101))
        model[2].weight.copy_(0.1 * rand(6, 3, 3, 3, seed=102))
    return model


def test_sr_loss_equals_sum_of_per_layer_terms_for_random_weights():
    model = _sr_model()
    total = structural_regularization_loss(model)
    l0 = _sr_reference(model[0].weight.detach(), 2, 2)
    l2 = _sr_reference(model[2].weight.detach(), 1, 2)
    assert float(l0) > 0.1 and float(l2) > 0.1
    torch.testing.assert_close(total.detach(), l0 + l2, atol=1e-10, rtol=0)
    torch.testing.assert_close(model[0].sr_loss().detach(), l0, atol=1e-10, rtol=0)
    # SR term equals project_to_structure's residual for the same layer.
    assert abs(float(model[2].sr_loss().detach()) - project_to_structure(model[2].weight, 1, 2)[1]) < 1e-10
    # Coeff-mode layers contribute exactly zero.
    assert model[3].sr_loss().item() == 0.0 and model[5].sr_loss().item() == 0.0


def test_sr_loss_is_zero_for_structured_weights():
    model = _sr_model()
    with torch.no_grad():
        model[0].weight.copy_(compose_kernel(rand(6, 2, 2, 2, seed=1), 4, 3))
        model[2].weight.copy_(compose_kernel(rand(6, 1, 2, 2, seed=2), 3, 3))
    assert structural_regularization_loss(model).item() < 1e-10


def test_sr_loss_is_differentiable_and_descends():
    model = _sr_model()
    loss = structural_regularization_loss(model)
    loss.backward()
    for idx in (0, 2):
        g = model[idx].weight.grad
        assert g is not None and torch.isfinite(g).all() and float(g.abs().max()) > 0
    assert model[3].alpha.grad is None and model[5].alpha.grad is None
    # The gradient is the analytic one: checked against central finite differences.
    W = model[0].weight
    E = rand(*W.shape, seed=3)
    eps = 1e-6
    with torch.no_grad():
        W += eps * E
        up = structural_regularization_loss(model).item()
        W -= 2 * eps * E
        down = structural_regularization_loss(model).item()
        W += eps * E
    fd = (up - down) / (2 * eps)
    analytic = float((model[0].weight.grad * E).sum())
    assert abs(fd - analytic) < 1e-6 * max(1.0, abs(analytic))
    # Gradient descent on the SR loss drives the weights toward the structure.
    opt = torch.optim.SGD([model[0].weight, model[2].weight], lr=0.5)
    before = loss.item()
    for _ in range(5):
        opt.zero_grad()
        structural_regularization_loss(model).backward()
        opt.step()
    assert structural_regularization_loss(model).item() < 0.9 * before


def test_sr_loss_no_dense_layers_is_zero():
    model = nn.Sequential(StructuredConv2d(4, 4, 3, c=2, n=2), nn.Conv2d(4, 4, 3))
    assert structural_regularization_loss(model).item() == 0.0


# ---------------------------------------------------------------- to_dense / to_coeff

@pytest.mark.parametrize("mode", ["coeff", "dense"])
@pytest.mark.parametrize("groups", [1, 2])
def test_to_dense_matches_forward(mode, groups):
    torch.manual_seed(groups)
    layer = StructuredConv2d(6, 4, 3, c=2, n=2, stride=2, padding=1, groups=groups, bias=True,
                             mode=mode).double()
    with torch.no_grad():
        layer.bias.copy_(rand(4, seed=3))
    conv = layer.to_dense()
    assert isinstance(conv, nn.Conv2d)
    assert (conv.stride, conv.padding, conv.groups) == ((2, 2), (1, 1), groups)
    x = rand(2, 6, 9, 7, seed=4)
    torch.testing.assert_close(conv.double()(x), layer(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(conv.weight.double(), layer.dense_kernel().detach().double(),
                               atol=1e-6, rtol=0)


def test_to_dense_exact_in_double():
    layer = StructuredConv2d(4, 3, 5, c=2, n=3, padding=2, bias=False).double()
    conv = layer.to_dense().double()
    with torch.no_grad():
        conv.weight.copy_(layer.dense_kernel())
    assert conv.bias is None
    x = rand(1, 4, 7, 9, seed=1)
    torch.testing.assert_close(conv(x), layer(x), atol=1e-12, rtol=0)


def test_to_coeff_keeps_outputs_for_structured_weights():
    torch.manual_seed(0)
    layer = StructuredConv2d(6, 4, 3, c=3, n=2, padding=1, bias=True, mode="dense").double()
    alpha = rand(4, 3, 2, 2, seed=8)
    with torch.no_grad():
        layer.weight.copy_(compose_kernel(alpha, 6, 3))
        layer.bias.copy_(rand(4, seed=9))
    x = rand(2, 6, 7, 9, seed=10)
    before = layer(x)
    assert layer.to_coeff() is layer
    assert layer.mode == "coeff"
    names = {k for k, _ in layer.named_parameters()}
    assert names == {"alpha", "bias"}
    assert layer.alpha.shape == (4, 3, 2, 2)
    torch.testing.assert_close(layer.alpha.detach(), alpha, atol=1e-8, rtol=0)
    torch.testing.assert_close(layer(x), before, atol=1e-10, rtol=0)
    torch.testing.assert_close(layer.forward_decomposed(x), before, atol=1e-10, rtol=0)
    # Idempotent.
    a = layer.alpha
    assert layer.to_coeff().alpha is a


def test_to_coeff_projects_random_weights():
    torch.manual_seed(1)
    layer = StructuredConv2d(4, 3, 3, c=2, n=2, mode="dense").double()
    W = layer.weight.detach().clone()
    alpha, residual = project_to_structure(W, 2, 2)
    assert residual > 0.1
    layer.to_coeff()
    torch.testing.assert_close(layer.alpha.detach(), alpha, atol=1e-12, rtol=0)
    x = rand(1, 4, 6, 6, seed=2)
    torch.testing.assert_close(layer(x), F.conv2d(x, compose_kernel(alpha, 4, 3)),
                               atol=1e-12, rtol=0)
    assert structural_regularization_loss(layer).item() == 0.0


# ---------------------------------------------------------------- StructuredLinear

def brute_linear(x, alpha, in_features, c, bias):
    """y[o] = sum_k x[k] W[o,k] with W[o,k] = sum_{a <= k <= a + in - c} alpha[o,a]."""
    out_f = alpha.shape[0]
    W = torch.zeros(out_f, in_features, dtype=DT)
    for o in range(out_f):
        for k in range(in_features):
            for a in range(c):
                if a <= k <= a + in_features - c:
                    W[o, k] += alpha[o, a, 0, 0]
    y = torch.zeros(x.shape[0], out_f, dtype=DT)
    for b in range(x.shape[0]):
        for o in range(out_f):
            s = bias[o].item()
            for k in range(in_features):
                s += x[b, k].item() * W[o, k].item()
            y[b, o] = s
    return y, W


@pytest.mark.parametrize("in_f,out_f,c", [(7, 3, 3), (6, 4, 1), (5, 2, 5)])
def test_structured_linear_matches_brute_force(in_f, out_f, c):
    torch.manual_seed(in_f)
    lin = StructuredLinear(in_f, out_f, c=c).double()
    assert lin.alpha.shape == (out_f, c, 1, 1)
    assert lin.window == (in_f - c + 1, 1, 1)
    with torch.no_grad():
        lin.bias.copy_(rand(out_f, seed=1))
    x = rand(4, in_f, seed=2)
    y_ref, W_ref = brute_linear(x, lin.alpha.detach(), in_f, c, lin.bias.detach())
    torch.testing.assert_close(lin(x), y_ref, atol=1e-12, rtol=0)
    dense = lin.to_dense().double()
    assert isinstance(dense, nn.Linear)
    torch.testing.assert_close(dense.weight.detach(), W_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(dense(x), lin(x), atol=1e-5, rtol=0)


def test_structured_linear_dense_mode_and_to_coeff():
    torch.manual_seed(3)
    lin = StructuredLinear(8, 3, c=3, mode="dense", bias=False).double()
    assert lin.weight.shape == (3, 8, 1, 1)
    assert lin.bias is None
    alpha = rand(3, 3, 1, 1, seed=4)
    with torch.no_grad():
        lin.weight.copy_(compose_kernel(alpha, 8, 1))
    x = rand(2, 8, seed=5)
    y = lin(x)
    assert lin.sr_loss().item() < 1e-10
    lin.to_coeff()
    torch.testing.assert_close(lin.alpha.detach(), alpha, atol=1e-8, rtol=0)
    torch.testing.assert_close(lin(x), y, atol=1e-10, rtol=0)
    assert lin.to_dense().bias is None


def test_1x1_structured_conv_equals_structured_linear_per_pixel():
    torch.manual_seed(4)
    conv = StructuredConv2d(7, 5, 1, c=3, n=1, bias=True).double()
    lin = StructuredLinear(7, 5, c=3, bias=True).double()
    assert conv.window == lin.window == (5, 1, 1)
    with torch.no_grad():
        lin.alpha.copy_(conv.alpha)
        conv.bias.copy_(rand(5, seed=6))
        lin.bias.copy_(conv.bias)
    x = rand(2, 7, 4, 3, seed=7)
    y_conv = conv(x)
    y_lin = lin(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    torch.testing.assert_close(y_conv, y_lin, atol=1e-12, rtol=0)
    torch.testing.assert_close(conv.forward_decomposed(x), y_lin, atol=1e-10, rtol=0)


# ---------------------------------------------------------------- misc module behaviour

def test_parameter_counts_and_shapes():
    conv = StructuredConv2d(8, 6, 3, c=4, n=2, groups=2)
    assert conv.C == 4 and conv.alpha.shape == (6, 4, 2, 2)
    assert sum(p.numel() for p in conv.parameters()) == 6 * 4 * 2 * 2
    dense = StructuredConv2d(8, 6, 3, c=4, n=2, groups=2, mode="dense", bias=True)
    assert dense.weight.shape == (6, 4, 3, 3)
    assert sum(p.numel() for p in dense.parameters()) == 6 * 4 * 9 + 6
    assert set(dense.state_dict()) == {"weight", "bias"}


def test_tuple_kernel_size_accepted_and_nonsquare_rejected():
    conv = StructuredConv2d(4, 2, (3, 3), c=2, n=2)
    assert conv.kernel_size == 3 and conv.dense_kernel().shape == (2, 4, 3, 3)
    with pytest.raises(ValueError):
        StructuredConv2d(4, 2, (3, 5), c=2, n=2)


def test_coeff_mode_gradient_flows_to_alpha_in_float32():
    torch.manual_seed(5)
    layer = StructuredConv2d(4, 3, 3, c=2, n=2, padding=1)
    x = torch.randn(2, 4, 6, 6)
    layer(x).square().sum().backward()
    g = layer.alpha.grad
    assert g is not None and torch.isfinite(g).all() and float(g.abs().max()) > 0
    # float32 decomposition still agrees with the dense conv to float tolerance.
    torch.testing.assert_close(layer.forward_decomposed(x), layer(x), atol=1e-4, rtol=1e-4)
