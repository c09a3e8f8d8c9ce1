"""Tests for structexport.layers.ssc (DESIGN.md section 1.3, working reading)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from structexport.layers.ssc import SSCConv2d, ssc_mask

DT = torch.float64


def rand(*shape, seed=0, dtype=DT):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_mask(out_c, in_c, K, p, g):
    """The ssc.py docstring, read with explicit loops.

    Channels split into g groups; filter j sees only its group's input channels; local
    input channel i gets a full KxK kernel when (i - j_local) mod p == 0, else only the
    centre tap.
    """
    cin_g, cout_g = in_c // g, out_c // g
    m = torch.zeros(out_c, in_c, K, K, dtype=torch.bool)
    for j in range(out_c):
        for i in range(in_c):
            if j // cout_g != i // cin_g:
                continue
            i_loc, j_loc = i % cin_g, j % cout_g
            if (i_loc - j_loc) % p == 0:
                for h in range(K):
                    for w in range(K):
                        m[j, i, h, w] = True
            else:
                m[j, i, K // 2, K // 2] = True
    return m


MASK_CASES = [
    # (out, in, K, p, g)
    (8, 8, 3, 2, 2),
    (6, 12, 3, 3, 3),
    (12, 6, 3, 2, 3),     # more filters than input channels per group
    (16, 16, 5, 4, 1),
    (4, 4, 1, 2, 2),      # 1x1 kernel
    (8, 8, 3, 5, 1),      # p not dividing the group size
    (8, 8, 3, 16, 2),     # p larger than the group: mostly point-wise
    (9, 6, 3, 2, 3),
    (32, 64, 3, 2, 4),
]


@pytest.mark.parametrize("out_c,in_c,K,p,g", MASK_CASES)
def test_ssc_mask_matches_loop_reading(out_c, in_c, K, p, g):
    m = ssc_mask(out_c, in_c, K, p, g)
    assert m.dtype == torch.bool and m.shape == (out_c, in_c, K, K)
    assert torch.equal(m, reference_mask(out_c, in_c, K, p, g))


def test_ssc_mask_p1_g1_is_dense():
    assert bool(ssc_mask(6, 5, 3, 1, 1).all())
    assert bool(ssc_mask(4, 4, 1, 1, 1).all())


@pytest.mark.parametrize("C,K", [(6, 3), (4, 5), (8, 1)])
def test_ssc_mask_p1_gC_is_depthwise(C, K):
    m = ssc_mask(C, C, K, 1, C)
    for j in range(C):
        used = m[j].flatten(1).any(1)
        assert used.nonzero().flatten().tolist() == [j]    # exactly one input channel
        assert bool(m[j, j].all())                         # with its full KxK kernel
    assert int(m.sum()) == C * K * K


@pytest.mark.parametrize("C,K,p,g", [(16, 3, 2, 1), (16, 3, 4, 2), (64, 3, 2, 4), (32, 5, 8, 2),
                                     (12, 3, 3, 1), (512, 3, 2, 16), (16, 3, 1, 4)])
def test_ssc_per_filter_counts_formula(C, K, p, g):
    m = ssc_mask(C, C, K, p, g)
    cg = C // g
    assert cg % p == 0
    expected = cg / p * K * K + cg * (1 - 1 / p)
    counts = m.flatten(1).sum(1)
    assert torch.all(counts == round(expected)), (counts.unique().tolist(), expected)


def test_ssc_p_larger_than_group_keeps_one_full_kernel_per_filter():
    # g=2 on 8 channels: group of 4, p=16 -> only i_local == j_local gets a KxK kernel.
    m = ssc_mask(8, 8, 3, 16, 2)
    full = m.flatten(2).all(2)
    assert torch.equal(full, torch.eye(8, dtype=torch.bool))
    assert torch.all(m.flatten(1).sum(1) == 9 + 3)


@pytest.mark.parametrize("out_c,in_c,p,g", [(8, 6, 1, 4), (6, 8, 1, 4), (8, 8, 1, 3),
                                            (8, 8, 0, 1), (8, 8, 2, 0), (8, 8, -1, 2)])
def test_ssc_mask_bad_arguments_raise(out_c, in_c, p, g):
    with pytest.raises(ValueError):
        ssc_mask(out_c, in_c, 3, p, g)
    with pytest.raises(ValueError):
        SSCConv2d(in_c, out_c, 3, p=p, g=g)


def test_ssc_mask_group_error_mentions_sizes():
    with pytest.raises(ValueError) as exc:
        ssc_mask(8, 6, 3, 1, 4)
    msg = str(exc.value)
    assert "g=4" in msg and "6" in msg and "8" in msg


# ---------------------------------------------------------------- SSCConv2d

@pytest.mark.parametrize("in_c,out_c,K,p,g,stride,padding,bias", [
    (8, 8, 3, 2, 2, 1, 1, True),
    (12, 6, 3, 3, 3, 2, 0, False),
    (16, 16, 5, 4, 1, 1, 2, True),
    (4, 4, 1, 2, 2, 1, 0, False),
])
def test_ssc_conv_forward_uses_only_masked_weights(in_c, out_c, K, p, g, stride, padding, bias):
    torch.manual_seed(0)
    conv = SSCConv2d(in_c, out_c, K, p=p, g=g, stride=stride, padding=padding,
                     bias=bias).double()
    mask = reference_mask(out_c, in_c, K, p, g)
    assert torch.equal(conv.mask, mask)
    # Initialisation already respects the mask.
    assert float(conv.weight.detach()[~mask].abs().sum()) == 0.0
    assert float(conv.weight.detach()[mask].abs().min()) > 0.0
    # Put garbage outside the mask: the forward must ignore it.
    with torch.no_grad():
        conv.weight.copy_(rand(out_c, in_c, K, K, seed=1))
        if bias:
            conv.bias.copy_(rand(out_c, seed=2))
    x = rand(2, in_c, 9, 7, seed=3)
    y = conv(x)
    expected = F.conv2d(x, conv.weight * mask.to(DT), conv.bias, stride, padding)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)
    if not bool(mask.all()):
        assert not torch.allclose(y, F.conv2d(x, conv.weight, conv.bias, stride, padding))
    torch.testing.assert_close(conv.masked_weight(), conv.weight * mask.to(DT), atol=0, rtol=0)

    assert conv.effective_params() == int(mask.sum()) + (out_c if bias else 0)

    dense = conv.to_dense().double()
    assert isinstance(dense, nn.Conv2d)
    assert (dense.stride, dense.padding) == ((stride, stride), (padding, padding))
    assert (dense.bias is None) == (not bias)
    w = dense.weight.detach()
    assert float(w[~mask].abs().sum()) == 0.0
    torch.testing.assert_close(w[mask], conv.weight.detach()[mask].float().double(),
                               atol=1e-6, rtol=0)
    with torch.no_grad():
        dense.weight.copy_(conv.masked_weight())   # exact in float64
        if bias:
            dense.bias.copy_(conv.bias)
    torch.testing.assert_close(dense(x), y, atol=1e-12, rtol=0)


def test_ssc_effective_params_known_values():
    conv = SSCConv2d(16, 16, 3, p=2, g=1)
    # per filter: 16/2*9 + 16*(1-1/2) = 72 + 8 = 80
    assert conv.effective_params() == 16 * 80
    assert int(conv.mask.sum()) == 16 * 80
    dense = SSCConv2d(16, 16, 3, p=1, g=1, bias=True)
    assert dense.effective_params() == 16 * 16 * 9 + 16


def test_ssc_gradient_is_zero_outside_mask():
    torch.manual_seed(0)
    conv = SSCConv2d(8, 8, 3, p=2, g=2, padding=1)
    conv(torch.randn(2, 8, 6, 6)).square().sum().backward()
    g = conv.weight.grad
    assert float(g[~conv.mask].abs().max()) == 0.0
    assert float(g[conv.mask].abs().max()) > 0.0


def test_ssc_mask_not_persistent_and_follows_dtype():
    conv = SSCConv2d(8, 8, 3, p=2, g=2)
    assert set(conv.state_dict()) == {"weight"}
    assert conv.mask.dtype == torch.bool
    assert conv.half().masked_weight().dtype == torch.float16
