"""lower_ssc: SSC layers become grouped convs that follow the weights' real zeros.

Tested three ways: the pattern is there before (SSCConv2d layers), gone after, and the
outputs match in float64. The lowered multiplies are counted here from the lowered
modules' conv weights, independently of the pass's own records.
"""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest
import torch
import torch.nn as nn

from structexport.layers import SSCConv2d
from structexport.models import build_model
from structexport.passes import PassContext, PassError, PassManager
from structexport.layers.lowered_ssc import LoweredSSCConv
from structexport.passes.lower_ssc_pass import LowerSSCPass

DT = torch.float64
ATOL = 1e-10


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


def ssc_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SSCConv2d)]


def conv_macs(module: nn.Module) -> int:
    """Multiplies per output pixel of every conv inside ``module`` (itself included)."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Conv2d))


def lower(model, **options):
    return LowerSSCPass()(model, PassContext(options=options))


def macs_table(model, lowered):
    """(dense MACs, lowered MACs, non-zeros) summed over the SSC layers of ``model``."""
    dense = low = nonzeros = 0
    for name, layer in ssc_layers(model):
        dense += layer.weight.numel()
        nonzeros += int((layer.masked_weight() != 0).sum())
        low += conv_macs(lowered.get_submodule(name))
    return dense, low, nonzeros


# ----------------------------------------------------------------------------------------
# Zoo tickets
# ----------------------------------------------------------------------------------------

# name -> the most multiplies the lowered SSC layers may keep, as a fraction of dense
TICKETS = {"vgg19-ssc-10": 0.10, "vgg19-ssc-2": 0.02,
           "resnet32x2-ssc-10": 0.10, "resnet32x2-ssc-2": 0.02}


@pytest.mark.parametrize("name", list(TICKETS))
def test_zoo_ticket_lowered(name):
    model = build_model(name).to(DT)
    before = ssc_layers(model)
    assert len(before) > 10                                   # the pattern is there before
    x = rand(2, 3, 32, 32, seed=1)
    with torch.no_grad():
        ref = model(x)
    source = copy.deepcopy(model)

    result = lower(model)
    out_model = result.module
    assert result.modified
    assert not ssc_layers(out_model)                          # gone after
    assert [r.layer for r in result.records] == [n for n, _ in before]
    with torch.no_grad():
        out = out_model(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < ATOL              # outputs unchanged

    dense, low, nonzeros = macs_table(source, out_model)
    assert low < dense * TICKETS[name], (name, low / dense)
    # the block packing pads little: at most 10% more multiplies than non-zero weights
    assert nonzeros <= low <= 1.10 * nonzeros, (name, low / nonzeros)
    for rec in result.records:
        sub = out_model.get_submodule(rec.layer)
        assert rec.action in ("lowered", "kept dense")
        assert isinstance(sub, LoweredSSCConv if rec.action == "lowered" else nn.Conv2d)
        assert rec.details["result_macs_per_pixel"] == conv_macs(sub)
        assert rec.details["nonzeros"] == int((source.get_submodule(rec.layer).masked_weight() != 0).sum())
        for key in ("dense_macs_per_pixel", "lowered_macs_per_pixel", "groups"):
            assert key in rec.details


def test_group_conv_layer_stays_dense():
    """VGG-19's 64-filter layers have p=1, g=1 (a full conv): lowering saves nothing."""
    model = build_model("vgg19-ssc-10")
    result = lower(model)
    rec = next(r for r in result.records if r.details["kernel"][:2] == [64, 64])
    assert rec.action == "kept dense"
    assert "ssc_min_saving" in rec.details["reason"]
    assert type(result.module.get_submodule(rec.layer)) is nn.Conv2d


# ----------------------------------------------------------------------------------------
# Single layers
# ----------------------------------------------------------------------------------------

def _random_layer(seed):
    r = random.Random(seed)
    K = r.choice([1, 2, 3, 3, 3, 5])
    g = r.choice([1, 2, 4])
    cin, cout = g * r.randint(1, 6), g * r.randint(1, 6)
    p, stride, padding = r.randint(1, 7), r.randint(1, 3), r.randint(0, K)
    layer = SSCConv2d(cin, cout, K, p, g, stride, padding, bias=r.random() < 0.5).to(DT)
    with torch.no_grad():
        layer.weight.copy_(rand(*layer.weight.shape, seed=seed) * layer.mask)
        if layer.bias is not None:
            layer.bias.copy_(rand(cout, seed=seed + 1))
        if r.random() < 0.3:  # prune further, at random
            layer.weight[rand(*layer.weight.shape, seed=seed + 2) < 0] = 0
    H, W = r.randint(K, 11), r.randint(K, 11)
    return layer, (2, cin, H, W)


@pytest.mark.parametrize("seed", range(40))
def test_random_single_layer(seed):
    layer, shape = _random_layer(seed)
    model = nn.Sequential(layer)
    x = rand(*shape, seed=100 + seed)
    with torch.no_grad():
        ref = model(x)
    result = lower(model, ssc_min_saving=0.0)
    assert not ssc_layers(result.module)
    with torch.no_grad():
        out = result.module(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() < ATOL, (seed, result.module)


@pytest.mark.parametrize("K,padding,stride", [(3, 0, 1), (3, 2, 2), (3, 3, 3), (2, 0, 1), (2, 1, 2),
                                              (4, 2, 1), (5, 1, 2), (1, 1, 2), (1, 0, 3)])
def test_centre_tap_offsets(K, padding, stride):
    """The 1x1 part reads the centre tap at every padding / stride / kernel size."""
    torch.manual_seed(K * 100 + padding * 10 + stride)
    layer = SSCConv2d(8, 8, K, p=4, g=2, stride=stride, padding=padding, bias=True).to(DT)
    with torch.no_grad():
        layer.bias.normal_()
    model = nn.Sequential(layer)
    x = rand(1, 8, 9, 7, seed=K)
    with torch.no_grad():
        ref = model(x)
    lowered = lower(model, ssc_min_saving=0.0).module
    assert isinstance(lowered[0], LoweredSSCConv) and len(lowered[0].pointwise)
    with torch.no_grad():
        assert (lowered(x) - ref).abs().max().item() < ATOL


# ----------------------------------------------------------------------------------------
# The lowering follows the real zeros, never the assumed (p, g)
# ----------------------------------------------------------------------------------------

def _lowered_macs(layer, **options):
    model = nn.Sequential(layer)
    x = rand(1, layer.in_channels, 8, 8, seed=7)
    with torch.no_grad():
        ref = model(x)
    result = lower(model, **options)
    with torch.no_grad():
        assert (result.module(x) - ref).abs().max().item() < ATOL
    return conv_macs(result.module), result


def test_extra_zeros_beyond_the_mask_are_followed():
    torch.manual_seed(0)
    layer = SSCConv2d(32, 32, 3, p=2, g=2, padding=1).to(DT)
    full_macs, _ = _lowered_macs(copy.deepcopy(layer))
    # zero whole groups of input channels: a quarter of the inputs are gone
    with torch.no_grad():
        layer.weight[:, 8:16] = 0
        layer.weight[:, 24:32] = 0
    nonzeros = int((layer.masked_weight() != 0).sum())
    pruned_macs, result = _lowered_macs(layer)
    assert pruned_macs < 0.6 * full_macs
    assert pruned_macs <= 1.10 * nonzeros
    assert result.records[0].details["nonzeros"] == nonzeros


def test_dense_by_mask_but_block_diagonal_by_weights():
    """(p=1, g=1) says dense; the weights say 4 shuffled diagonal blocks: 4 groups."""
    torch.manual_seed(1)
    layer = SSCConv2d(16, 16, 3, p=1, g=1, padding=1).to(DT)
    perm_out, perm_in = torch.randperm(16), torch.randperm(16)
    keep = torch.zeros(16, 16, dtype=torch.bool)
    for b in range(4):
        keep[perm_out[4 * b:4 * b + 4, None], perm_in[None, 4 * b:4 * b + 4]] = True
    with torch.no_grad():
        layer.weight.mul_(keep[:, :, None, None])
    macs, result = _lowered_macs(layer)
    assert result.records[0].action == "lowered"
    assert macs == 16 * 4 * 9
    assert result.records[0].details["groups"]["kxk"] == [4]


def test_only_centre_taps_become_pointwise():
    torch.manual_seed(2)
    layer = SSCConv2d(16, 16, 3, p=2, g=1, padding=1).to(DT)
    with torch.no_grad():
        layer.weight[:, :, [0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 2, 0, 2, 0, 1, 2]] = 0
    macs, result = _lowered_macs(layer)
    lowered = result.module[0]
    assert not len(lowered.spatial) and len(lowered.pointwise)
    assert macs == 16 * 16


def test_lowering_uses_weight_times_mask():
    """Values stored outside the mask are never applied: the lowering ignores them."""
    torch.manual_seed(3)
    clean = SSCConv2d(24, 24, 3, p=3, g=2, padding=1).to(DT)
    dirty = copy.deepcopy(clean)
    with torch.no_grad():
        dirty.weight.add_(10 * rand(*dirty.weight.shape, seed=9) * ~dirty.mask)
    assert (dirty.weight * ~dirty.mask).abs().sum() > 0
    clean_macs, _ = _lowered_macs(clean)
    dirty_macs, result = _lowered_macs(dirty)   # also checks outputs against the masked layer
    assert dirty_macs == clean_macs
    assert result.records[0].details["nonzeros"] == int(clean.mask.sum())


def test_all_zero_layer_kept_dense():
    layer = SSCConv2d(8, 8, 3, p=2, g=2, padding=1, bias=True).to(DT)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(rand(8))
    _, result = _lowered_macs(layer)
    assert result.records[0].action == "kept dense"
    assert not ssc_layers(result.module)


def test_min_saving_option():
    torch.manual_seed(4)
    layer = SSCConv2d(32, 32, 3, p=2, g=2, padding=1).to(DT)  # ~28% of dense
    _, lowered = _lowered_macs(copy.deepcopy(layer))
    assert lowered.records[0].action == "lowered"
    _, kept = _lowered_macs(copy.deepcopy(layer), ssc_min_saving=0.9)
    assert kept.records[0].action == "kept dense"
    assert type(kept.module[0]) is nn.Conv2d
    with pytest.raises(PassError):
        lower(nn.Sequential(layer), ssc_min_saving=1.5)


def test_readable_repr_and_ensures():
    model = build_model("resnet32x2-ssc-10")
    text = repr(lower(copy.deepcopy(model)).module.stage_3[0].conv_b)
    assert "LoweredSSCConv" in text and "groups=" in text and "macs/pixel=" in text
    with pytest.raises(PassError, match="SSC layers remain"):
        LowerSSCPass().ensures(model, PassContext())


def test_through_pass_manager():
    model = build_model("resnet32x2-ssc-2")
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    out, runs = PassManager([LowerSSCPass()], check_inputs=x).run(model, PassContext())
    assert runs[0].name == "lower_ssc" and runs[0].max_abs_diff < 1e-4
    assert not ssc_layers(out) and ssc_layers(model)  # the manager works on a copy


# ----------------------------------------------------------------------------------------
# The lowering exports to ONNX as ordinary ops
# ----------------------------------------------------------------------------------------

def test_lowered_model_exports_and_runs_in_onnxruntime(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    model = lower(build_model("resnet32x2-ssc-10")).module.eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    path = tmp_path / "lowered.onnx"
    torch.onnx.export(model, (x,), dynamo=True, opset_version=18).save(str(path))

    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Conv" in ops and "Gather" in ops
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
