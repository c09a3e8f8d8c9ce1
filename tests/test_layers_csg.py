"""Tests for structexport.layers.csg (DESIGN.md section 1.2)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from structexport.layers.csg import CSGConv2d, CSGGenerator, generate_kernel, num_slices

DT = torch.float64


def rand(*shape, seed=0, dtype=DT):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def reference_kernel(codes, G, kernel_shape, slice_shape):
    """Independent reading of the reference layout.

    Every slice k is generated as ``G @ codes[k]``; the stacked slices (row k = slice k)
    are read as one row-major buffer of shape
    ``(ceil(out/s0)*s0, ceil(in/s1)*s1, sh, sw)`` and cropped to ``(out, in, kh, kw)``.
    Built with explicit loops and flat-index arithmetic, no reshape.
    """
    out_c, in_c, kh, kw = kernel_shape
    s0, s1, sh, sw = slice_shape
    flat: list[float] = []
    for k in range(codes.shape[0]):                 # one slice at a time
        flat.extend((G @ codes[k]).tolist())
    O = math.ceil(out_c / s0) * s0
    I = math.ceil(in_c / s1) * s1
    assert len(flat) == O * I * sh * sw
    out = torch.empty(out_c, in_c, kh, kw, dtype=codes.dtype)
    for o in range(out_c):
        for i in range(in_c):
            for h in range(kh):
                for w in range(kw):
                    out[o, i, h, w] = flat[((o * I + i) * sh + h) * sw + w]
    return out


def tiled_kernel(codes, G, kernel_shape, slice_shape):
    """The layout the reference does NOT use: slice k placed as an s0 x s1 block."""
    out_c, in_c, kh, kw = kernel_shape
    s0, s1, sh, sw = slice_shape
    nI = math.ceil(in_c / s1)
    O, I = math.ceil(out_c / s0) * s0, nI * s1
    full = torch.zeros(O, I, sh, sw, dtype=codes.dtype)
    for k in range(codes.shape[0]):
        bo, bi = divmod(k, nI)
        full[bo * s0:(bo + 1) * s0, bi * s1:(bi + 1) * s1] = (G @ codes[k]).reshape(s0, s1, sh, sw)
    return full[:out_c, :in_c, :kh, :kw]


# ---------------------------------------------------------------- num_slices

@pytest.mark.parametrize("out_c,in_c,slice_shape,expected", [
    (16, 16, [16, 16, 3, 3], 1),
    (32, 16, [16, 16, 3, 3], 2),
    (36, 24, [16, 16, 3, 3], 6),    # ceil(36/16)=3, ceil(24/16)=2
    (10, 7, [8, 4, 3, 3], 4),       # ceil(10/8)=2, ceil(7/4)=2
    (17, 16, [16, 16, 1, 1], 2),
    (1, 1, [16, 16, 3, 3], 1),
    (64, 64, [12, 12, 3, 3], 36),   # ceil(64/12)=6
    (1024, 464, [16, 16, 1, 1], 1856),
])
def test_num_slices(out_c, in_c, slice_shape, expected):
    assert num_slices(out_c, in_c, slice_shape) == expected
    assert num_slices(out_c, in_c, tuple(slice_shape)) == expected


# ---------------------------------------------------------------- generate_kernel

GEN_CASES = [
    # (kernel_shape, slice_shape, code_size)
    ((16, 16, 3, 3), (16, 16, 3, 3), 8),       # one slice, divides evenly
    ((32, 32, 3, 3), (16, 16, 3, 3), 5),       # divides evenly, 4 slices
    ((36, 24, 3, 3), (16, 16, 3, 3), 7),       # overhang on both axes
    ((10, 7, 3, 3), (8, 4, 3, 3), 6),          # non-square slice, overhang
    ((8, 12, 3, 3), (8, 4, 3, 3), 3),          # non-square slice, divides evenly
    ((24, 20, 1, 1), (16, 16, 1, 1), 4),       # 1x1 kernels from 1x1 slices
    ((10, 7, 1, 1), (8, 4, 3, 3), 5),          # 3x3 slice cropped to a 1x1 kernel
    ((5, 3, 2, 3), (4, 2, 3, 3), 2),           # rectangular crop of the slice
]


@pytest.mark.parametrize("kernel_shape,slice_shape,nc", GEN_CASES)
def test_generate_kernel_matches_reference_layout(kernel_shape, slice_shape, nc):
    ns = num_slices(kernel_shape[0], kernel_shape[1], slice_shape)
    codes = rand(ns, nc, seed=sum(kernel_shape))
    G = rand(math.prod(slice_shape), nc, seed=nc)
    got = generate_kernel(codes, G, kernel_shape, slice_shape)
    assert got.shape == kernel_shape
    torch.testing.assert_close(got, reference_kernel(codes, G, kernel_shape, slice_shape),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize("kernel_shape,slice_shape", [
    ((32, 32, 3, 3), (16, 16, 3, 3)),
    ((10, 7, 3, 3), (8, 4, 3, 3)),
])
def test_generate_kernel_is_not_a_tiling(kernel_shape, slice_shape):
    ns = num_slices(kernel_shape[0], kernel_shape[1], slice_shape)
    codes = rand(ns, 4, seed=1)
    G = rand(math.prod(slice_shape), 4, seed=2)
    got = generate_kernel(codes, G, kernel_shape, slice_shape)
    assert not torch.allclose(got, tiled_kernel(codes, G, kernel_shape, slice_shape))
    # In the row-major layout, slice 0 fills the first s0*s1*sh*sw entries of the
    # uncropped buffer: here that is the first s0*s1 / I_pad output rows.
    s0, s1, sh, sw = slice_shape
    I_pad = math.ceil(kernel_shape[1] / s1) * s1
    rows = (s0 * s1) // I_pad
    slice0 = (G @ codes[0]).reshape(rows, I_pad, sh, sw)
    torch.testing.assert_close(got[:rows], slice0[:, :kernel_shape[1]], atol=1e-12, rtol=0)


def test_generate_kernel_single_slice_even_is_plain_reshape():
    codes = rand(1, 3, seed=3)
    G = rand(16 * 16 * 9, 3, seed=4)
    got = generate_kernel(codes, G, (16, 16, 3, 3), (16, 16, 3, 3))
    torch.testing.assert_close(got, (G @ codes[0]).reshape(16, 16, 3, 3), atol=1e-12, rtol=0)


def test_generate_kernel_is_linear_in_codes_and_generator():
    shape, sl = (10, 7, 3, 3), (8, 4, 3, 3)
    c1, c2 = rand(4, 5, seed=5), rand(4, 5, seed=6)
    G = rand(math.prod(sl), 5, seed=7)
    k = lambda c, g: generate_kernel(c, g, shape, sl)  # noqa: E731
    torch.testing.assert_close(k(2 * c1 - c2, G), 2 * k(c1, G) - k(c2, G), atol=1e-12, rtol=0)
    torch.testing.assert_close(k(c1, 3 * G), 3 * k(c1, G), atol=1e-12, rtol=0)


# ---------------------------------------------------------------- CSGConv2d

class TwoLayerCSG(nn.Module):
    """A network that registers the shared generator once at the top."""

    def __init__(self, slice_shape=(8, 4, 3, 3), code_size=6, mode="trained", seed=0):
        super().__init__()
        self.generator = CSGGenerator(slice_shape, code_size, mode=mode, seed=seed)
        self.conv1 = CSGConv2d(7, 10, 3, self.generator, padding=1, bias=True)
        self.conv2 = CSGConv2d(10, 12, 3, self.generator, stride=2)

    def forward(self, x):
        return self.conv2(F.relu(self.conv1(x)))


@pytest.mark.parametrize("in_c,out_c,k,slice_shape,stride,padding,bias", [
    (7, 10, 3, (8, 4, 3, 3), 1, 1, True),
    (24, 36, 3, (16, 16, 3, 3), 2, 0, False),
    (20, 24, 1, (16, 16, 1, 1), 1, 0, True),
    (7, 10, 1, (8, 4, 3, 3), 2, 1, False),     # 3x3 slices generating a 1x1 kernel
])
def test_csg_conv_forward_equals_conv_with_generated_kernel(in_c, out_c, k, slice_shape,
                                                           stride, padding, bias):
    torch.manual_seed(0)
    g = CSGGenerator(slice_shape, 5, seed=1).double()
    conv = CSGConv2d(in_c, out_c, k, g, stride=stride, padding=padding, bias=bias).double()
    assert conv.code.shape == (num_slices(out_c, in_c, slice_shape), 5)
    assert conv.kernel_shape == (out_c, in_c, k, k)
    with torch.no_grad():
        conv.code.copy_(rand(*conv.code.shape, seed=2))
        if bias:
            conv.bias.copy_(rand(out_c, seed=3))
    K = conv.kernel()
    torch.testing.assert_close(
        K, reference_kernel(conv.code.detach(), g.weight.detach(), conv.kernel_shape, slice_shape),
        atol=1e-12, rtol=0)
    x = rand(2, in_c, 9, 7, seed=4)
    expected = F.conv2d(x, generate_kernel(conv.code, g.weight, conv.kernel_shape, slice_shape),
                        conv.bias, stride, padding)
    y = conv(x)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=0)
    dense = conv.to_dense()
    assert isinstance(dense, nn.Conv2d) and dense.weight.dtype == DT
    assert (dense.stride, dense.padding) == ((stride, stride), (padding, padding))
    assert (dense.bias is None) == (not bias)
    torch.testing.assert_close(dense.weight.detach(), K.detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(dense(x), y, atol=1e-12, rtol=0)


def test_csg_to_dense_float64_is_exact():
    g = CSGGenerator((8, 4, 3, 3), 5, seed=1).double()
    conv = CSGConv2d(7, 10, 3, g, padding=1, bias=True).double()
    with torch.no_grad():
        conv.code.copy_(rand(*conv.code.shape, seed=2))
        conv.bias.copy_(rand(10, seed=3))
    dense = conv.to_dense()
    assert dense.weight.dtype == DT
    torch.testing.assert_close(dense.weight.detach(), conv.kernel().detach(), atol=1e-12, rtol=0)
    torch.testing.assert_close(dense.bias.detach(), conv.bias.detach(), atol=1e-12, rtol=0)


def test_csg_conv_rectangular_kernel_size():
    g = CSGGenerator((4, 2, 3, 3), 3).double()
    conv = CSGConv2d(3, 5, (1, 3), g, padding=(0, 1)).double()
    assert conv.kernel_shape == (5, 3, 1, 3)
    x = rand(1, 3, 4, 6, seed=1)
    K = reference_kernel(conv.code.detach(), g.weight.detach(), (5, 3, 1, 3), (4, 2, 3, 3))
    torch.testing.assert_close(conv(x), F.conv2d(x, K, None, 1, (0, 1)), atol=1e-12, rtol=0)


def test_csg_conv_rejects_slice_smaller_than_kernel():
    g = CSGGenerator((16, 16, 1, 1), 4)
    with pytest.raises(ValueError, match="smaller"):
        CSGConv2d(16, 16, 3, g)


def test_generator_is_shared_and_not_in_layer_state_dict():
    model = TwoLayerCSG().double()
    c1, c2 = model.conv1, model.conv2
    assert c1.generator is model.generator and c2.generator is model.generator
    assert set(c1.state_dict()) == {"code", "bias"}
    assert set(c2.state_dict()) == {"code"}
    assert "generator" not in dict(c1.named_modules())
    sd = model.state_dict()
    assert [k for k in sd if "generator" in k] == ["generator.weight"]
    assert set(sd) == {"generator.weight", "conv1.code", "conv1.bias", "conv2.code"}
    # The generator is counted once in the parameter count.
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == (8 * 4 * 9 * 6 + c1.code.numel() + 10 + c2.code.numel())

    k1, k2 = c1.kernel().detach().clone(), c2.kernel().detach().clone()
    newG = rand(*model.generator.weight.shape, seed=9)
    with torch.no_grad():
        model.generator.weight.copy_(newG)
    n1, n2 = c1.kernel().detach(), c2.kernel().detach()
    assert not torch.allclose(n1, k1) and not torch.allclose(n2, k2)
    torch.testing.assert_close(n1, reference_kernel(c1.code.detach(), newG, (10, 7, 3, 3),
                                                    (8, 4, 3, 3)), atol=1e-12, rtol=0)
    torch.testing.assert_close(n2, reference_kernel(c2.code.detach(), newG, (12, 10, 3, 3),
                                                    (8, 4, 3, 3)), atol=1e-12, rtol=0)


def test_state_dict_round_trip_restores_outputs():
    torch.manual_seed(0)
    a = TwoLayerCSG(seed=0).double()
    b = TwoLayerCSG(seed=1).double()
    x = rand(1, 7, 8, 8, seed=2)
    assert not torch.allclose(a(x), b(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b(x), a(x), atol=0, rtol=0)
    # b's layers still use b's (now loaded) generator.
    assert b.conv1.generator is b.generator


def test_deepcopy_keeps_generator_shared_within_the_copy():
    import copy

    a = TwoLayerCSG().double()
    b = copy.deepcopy(a)
    assert b.conv1.generator is b.generator and b.conv2.generator is b.generator
    assert b.generator is not a.generator
    ka = a.conv1.kernel().detach().clone()
    with torch.no_grad():
        b.generator.weight.mul_(2.0)
    torch.testing.assert_close(b.conv1.kernel().detach(), 2 * ka, atol=1e-12, rtol=0)
    torch.testing.assert_close(a.conv1.kernel().detach(), ka, atol=0, rtol=0)


def test_gradients_reach_codes_and_trained_generator_only():
    torch.manual_seed(0)
    x = torch.randn(2, 7, 8, 8)
    trained = TwoLayerCSG(mode="trained")
    trained(x).square().sum().backward()
    for p in (trained.generator.weight, trained.conv1.code, trained.conv2.code):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0
    binary = TwoLayerCSG(mode="binary")
    binary(x).square().sum().backward()
    assert binary.generator.weight.grad is None
    assert binary.conv1.code.grad is not None and binary.conv1.code.grad.abs().max() > 0
    trainable = sum(p.numel() for p in binary.parameters() if p.requires_grad)
    assert trainable == sum(p.numel() for p in binary.parameters()) - 8 * 4 * 9 * 6


# ---------------------------------------------------------------- CSGGenerator modes

def test_binary_generator_is_half_sign_of_kaiming_normal():
    g = CSGGenerator((16, 16, 3, 3), 64, mode="binary", seed=3)
    w = g.weight
    assert w.shape == (16 * 16 * 9, 64)
    assert w.requires_grad is False
    assert set(w.unique().tolist()) == {-0.5, 0.5}
    assert 0.45 < float((w > 0).double().mean()) < 0.55
    # Independently: 0.5 * sign of a kaiming-normal draw (fan_in = code size) from the seed.
    draw = torch.empty(16 * 16 * 9, 64).normal_(0.0, math.sqrt(2.0 / 64),
                                                generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(w.detach(), 0.5 * torch.where(draw >= 0, 1.0, -1.0), atol=0, rtol=0)
    assert g.double().weight.requires_grad is False      # dtype moves keep it fixed


def test_generator_seed_reproducibility():
    for mode in ("binary", "trained", "frozen"):
        a = CSGGenerator((8, 4, 3, 3), 16, mode=mode, seed=5).weight.detach()
        b = CSGGenerator((8, 4, 3, 3), 16, mode=mode, seed=5).weight.detach()
        c = CSGGenerator((8, 4, 3, 3), 16, mode=mode, seed=6).weight.detach()
        assert torch.equal(a, b), mode
        assert not torch.equal(a, c), mode
        assert float((a != c).double().mean()) > 0.2, mode


def test_trained_and_frozen_generator_modes():
    t = CSGGenerator((4, 4, 3, 3), 25, mode="trained", seed=0)
    assert t.mode == "trained" and t.weight.requires_grad is True
    assert t.weight.shape == (144, 25)
    assert float(t.weight.detach().abs().max()) <= 1.0 / math.sqrt(25)
    assert float(t.weight.detach().abs().max()) > 0.15         # a real uniform draw, not zeros
    f = CSGGenerator((4, 4, 3, 3), 25, mode="frozen", seed=0)
    assert f.mode == "frozen" and f.weight.requires_grad is False
    assert torch.equal(f.weight.detach(), t.weight.detach())
    before = t.weight.detach().clone()
    assert t.freeze() is t
    assert t.mode == "frozen" and t.weight.requires_grad is False
    assert torch.equal(t.weight.detach(), before)
    assert isinstance(t.weight, nn.Parameter)
    assert "weight" in dict(t.named_parameters())


@pytest.mark.parametrize("kwargs", [
    dict(slice_shape=(16, 16, 3, 3), code_size=8, mode="binarized"),
    dict(slice_shape=(16, 16, 3, 3), code_size=8, mode="Trained"),
    dict(slice_shape=(16, 16, 3), code_size=8),
    dict(slice_shape=(16, 0, 3, 3), code_size=8),
    dict(slice_shape=(16, 16, 3, 3), code_size=0),
])
def test_generator_bad_configuration_raises(kwargs):
    with pytest.raises(ValueError):
        CSGGenerator(**kwargs)


# ---------------------------------------------------------------- FP16 storage

def test_fp16_storage_still_computes_and_is_close():
    torch.manual_seed(0)
    model = TwoLayerCSG(slice_shape=(8, 4, 3, 3), code_size=6)
    with torch.no_grad():
        for conv in (model.conv1, model.conv2):
            conv.code.copy_(torch.randn_like(conv.code))
        model.conv1.bias.copy_(torch.randn(10))
    x = torch.randn(2, 7, 8, 8)
    y32 = model(x).detach()
    k32 = [c.kernel().detach().clone() for c in (model.conv1, model.conv2)]

    model.half()
    assert model.generator.weight.dtype == torch.float16
    assert model.conv1.code.dtype == torch.float16 and model.conv2.code.dtype == torch.float16
    for conv, ref in zip((model.conv1, model.conv2), k32):
        k16 = conv.kernel().detach()
        assert k16.dtype == torch.float16 and k16.shape == ref.shape
        torch.testing.assert_close(k16.float(), ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()))
        assert conv.to_dense().weight.dtype == torch.float16

    # Half storage, float32 compute.
    model.float()
    y = model(x).detach()
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    torch.testing.assert_close(y, y32, rtol=2e-2, atol=2e-2 * float(y32.abs().max()))
    assert not torch.equal(y, y32)  # the half round-trip really rounded the stored values


def test_kernel_casts_generator_to_code_dtype():
    g = CSGGenerator((4, 2, 3, 3), 3)                      # float32 generator
    conv = CSGConv2d(2, 4, 3, g).double()                  # float64 codes
    K = conv.kernel()
    assert K.dtype == DT
    torch.testing.assert_close(
        K, reference_kernel(conv.code.detach(), g.weight.detach().double(), (4, 2, 3, 3),
                            (4, 2, 3, 3)), atol=1e-12, rtol=0)
