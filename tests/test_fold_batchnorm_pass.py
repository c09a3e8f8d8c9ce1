"""fold_batchnorm: an eval-mode BatchNorm2d right after a conv is folded into the conv.

Tested three ways: conv -> BN pairs are there before, gone after (and only those: a BN that
does not directly and solely follow a conv stays), and the outputs match in float64.
"""
from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from structexport.layers import CSGConv2d
from structexport.models import build_model
from structexport.passes import PassContext, PassError, PassManager
from structexport.passes.fold_batchnorm_pass import FoldBatchNormPass
from structexport.layers.lowered_ssc import LoweredSSCConv
from structexport.passes.lower_ssc_pass import LowerSSCPass

DT = torch.float64
ATOL = 1e-10


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BN non-trivial statistics and affine parameters (the zoo's are 0/1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(n, generator=g))
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(1 + 0.3 * torch.randn(n, generator=g))
                m.bias.copy_(0.3 * torch.randn(n, generator=g))
    return model


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(conv, BN) pairs where a BatchNorm2d is applied right to an nn.Conv2d's only output.

    Independent of the pass: plain ``torch.fx.symbolic_trace`` (which traces through the
    project's layers, so a CSG conv shows up as a function call, not a conv module).
    """
    gm = torch.fx.symbolic_trace(model)
    mods = dict(model.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(mods[node.target], nn.BatchNorm2d):
            src = node.args[0]
            if (isinstance(src, torch.fx.Node) and src.op == "call_module"
                    and isinstance(mods[src.target], nn.Conv2d) and len(src.users) == 1):
                pairs.append((src.target, node.target))
    return pairs


def bn_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


def run_fold(model: nn.Module, x: torch.Tensor):
    with torch.no_grad():
        ref = model(x)
    result = FoldBatchNormPass()(model, PassContext())
    with torch.no_grad():
        out = result.module(x)
    assert out.shape == ref.shape
    return result, (out - ref).abs().max().item()


# name -> how many BatchNorm2d remain after folding
ZOO = {"resnet20": 0, "mobilenetv2": 0, "shufflenetv2-0.5x": 0, "vgg19": 0}


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_models_fold_completely(name):
    model = randomize_bn(build_model(name).to(DT))
    before = conv_bn_pairs(model)
    assert len(before) == len(bn_names(model)) > 10                # the pattern is there before
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(1))
    result, diff = run_fold(model, x)
    assert diff < ATOL                                            # outputs unchanged
    assert conv_bn_pairs(result.module) == []                     # gone after
    assert len(bn_names(result.module)) == ZOO[name]
    folded = {r.layer: r.details["into"] for r in result.records if r.action == "folded"}
    assert folded == {bn: conv for conv, bn in before}
    assert all(isinstance(result.module.get_submodule(bn), nn.Identity) for bn in folded)


def test_depthwise_and_biased_convs_get_bias():
    mnv2 = randomize_bn(build_model("mobilenetv2").to(DT))
    out = FoldBatchNormPass()(mnv2, PassContext()).module
    dw = out.layers[0].conv2
    assert dw.groups == dw.in_channels > 1 and dw.bias is not None
    vgg = randomize_bn(build_model("vgg19").to(DT))
    bias_before = vgg.features[0].bias.detach().clone()
    out = FoldBatchNormPass()(vgg, PassContext()).module
    assert not torch.allclose(out.features[0].bias, bias_before)


def test_densenet_bn_before_conv_is_not_folded():
    model = randomize_bn(build_model("densenet-bc-40-36").to(DT))
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(2))
    before = conv_bn_pairs(model)
    assert before and all(bn.endswith(".bn2") for _, bn in before)
    # BN -> ReLU -> conv: the BNs that come before a conv (bn1, transitions) must stay
    must_stay = {n for n in bn_names(model) if not n.endswith(".bn2")}
    assert len(must_stay) == 18 + 3
    result, diff = run_fold(model, x)
    assert diff < ATOL
    assert bn_names(result.module) == must_stay
    assert conv_bn_pairs(result.module) == []
    refused = {r.layer: r.details["reason"] for r in result.records if r.action == "not folded"}
    assert set(refused) == must_stay
    # the stem conv feeds both the first bn1 and the concatenation
    assert "other users" in refused["dense1.0.bn1"]


def test_csg_convs_left_alone():
    model = randomize_bn(build_model("resnet56-csg-16x16x3x3-128").to(DT))
    csg_bns = {n.replace("conv_", "bn_") for n, m in model.named_modules() if isinstance(m, CSGConv2d)}
    assert len(csg_bns) == 54
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(3))
    result, diff = run_fold(model, x)
    assert diff < ATOL
    assert bn_names(result.module) == csg_bns                      # only the stem BN folded
    assert [r.layer for r in result.records if r.action == "folded"] == ["bn_1"]
    assert all("CSGConv2d" in r.details["reason"] for r in result.records if r.action != "folded")


def test_lowered_ssc_layers_fold():
    model = randomize_bn(build_model("resnet32x2-ssc-10").to(DT))
    model = LowerSSCPass()(model, PassContext()).module
    assert any(isinstance(m, LoweredSSCConv) for m in model.modules())
    x = torch.randn(2, 3, 32, 32, dtype=DT, generator=torch.Generator().manual_seed(4))
    result, diff = run_fold(model, x)
    assert diff < ATOL
    assert not bn_names(result.module)
    assert {r.details["conv"] for r in result.records} >= {"LoweredSSCConv", "Conv2d"}


def _conv_bn(dtype=DT, bias=False):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, bias=bias), nn.BatchNorm2d(6)).to(dtype)
    randomize_bn(model)
    return model.eval()


def test_infinite_running_var():
    model = _conv_bn()
    with torch.no_grad():
        model[1].running_var[2] = float("inf")
    beta = model[1].bias.detach().clone()
    x = torch.randn(2, 4, 5, 5, dtype=DT, generator=torch.Generator().manual_seed(6))
    result, diff = run_fold(model, x)
    assert diff < ATOL
    conv = result.module[0]
    assert torch.isfinite(conv.weight).all() and torch.isfinite(conv.bias).all()
    assert (conv.weight[2] == 0).all()
    with torch.no_grad():
        out = result.module(x)
    assert (out[:, 2] == beta[2]).all()                            # exactly the BN bias
    assert result.records[0].details["infinite_variance_channels"] == 1


def test_infinite_running_var_fp16():
    model = _conv_bn(torch.float16, bias=True)
    with torch.no_grad():
        model[1].running_var[0] = float("inf")
    beta = model[1].bias.detach().clone()
    x = torch.randn(1, 4, 5, 5, generator=torch.Generator().manual_seed(8)).half()
    with torch.no_grad():
        ref = model(x)
    result = FoldBatchNormPass()(model, PassContext())
    conv = result.module[0]
    assert conv.weight.dtype == torch.float16
    assert torch.isfinite(conv.weight).all() and torch.isfinite(conv.bias).all()
    assert (conv.weight[0] == 0).all() and conv.bias[0] == beta[0]
    with torch.no_grad():
        out = result.module(x)
    assert (out[:, 0] == beta[0]).all() and (ref[:, 0] == beta[0]).all()
    assert (out.float() - ref.float()).abs().max() < 1e-2


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx refuses it
            x = -x
        return self.bn(self.conv(x))


def test_untraceable_model_returned_unchanged():
    model = randomize_bn(Untraceable().to(DT)).eval()
    x = torch.randn(1, 3, 6, 6, dtype=DT)
    result, diff = run_fold(model, x)
    assert diff == 0
    assert not result.modified
    assert isinstance(result.module.bn, nn.BatchNorm2d)
    assert result.records[0].action == "not traced" and "fx" in result.records[0].details["reason"]


class Awkward(nn.Module):
    """A conv applied twice, a conv whose output is used twice, a BN after a function."""

    def __init__(self):
        super().__init__()
        self.shared, self.bn_shared = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.branch, self.bn_branch = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.bn_after_relu = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn_shared(self.shared(x)) + self.shared(x)
        z = self.branch(y)
        return self.bn_branch(z) + z + self.bn_after_relu(F.relu(y))


def test_unsafe_pairs_not_folded():
    model = randomize_bn(Awkward().to(DT)).eval()
    x = torch.randn(1, 4, 5, 5, dtype=DT)
    result, diff = run_fold(model, x)
    assert diff < ATOL
    assert not result.modified
    assert bn_names(result.module) == {"bn_shared", "bn_branch", "bn_after_relu"}


def test_training_mode_bn_not_folded():
    model = _conv_bn()
    model[1].train()
    result = FoldBatchNormPass()(model, PassContext())
    assert isinstance(result.module[1], nn.BatchNorm2d)
    assert "training" in result.records[0].details["reason"]


def test_ensures_and_manager():
    with pytest.raises(PassError, match="still BatchNorm2d"):
        p = FoldBatchNormPass()
        p._folded = ["1"]
        p.ensures(_conv_bn(), PassContext())
    model = randomize_bn(build_model("resnet20"))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    out, runs = PassManager([FoldBatchNormPass()], check_inputs=x).run(model, PassContext())
    assert runs[0].modified and runs[0].max_abs_diff < 1e-4
    assert not bn_names(out) and len(bn_names(model)) == 19       # the manager works on a copy
