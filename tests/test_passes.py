"""Tests for structexport.passes: each pass's pattern is there before, gone after, and the
model's outputs do not move (float64 where the rewrite is exact); the manager's ordering,
copies, timings, output checks and failure messages; pass selection."""
from __future__ import annotations

import json
import copy
import math
import re

import pytest
import torch
import torch.nn as nn

from structexport.layers import (CSGConv2d, CSGGenerator, StructuredConv2d, StructuredLinear,
                                 box_window, compose_kernel, project_to_structure)
from structexport.layers.sumpool import REALIZATIONS, SumPool
from structexport.models import build_model
from structexport.passes import (PASSES, PIPELINE, Pass, PassContext, PassError, PassManager,
                                 PassResult, UnknownPassError, select_passes)
from structexport.layers.decomposed import DecomposedStructuredConv, DecomposedStructuredLinear
from structexport.passes.decompose_structured_pass import DecomposeStructuredPass
from structexport.passes.infra import modules_of
from structexport.passes.materialize_csg_pass import MaterializeCSGPass
from structexport.layer_cost import MIN_SPEEDUP, load_cost_model
from structexport.passes.realize_sumpool_pass import RealizeSumPoolPass, estimate_costs

DT = torch.float64


def rand(*shape, seed=0, dtype=DT):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def forward(model, x):
    with torch.no_grad():
        return model(x)


def assert_outputs_match(got, want, tol=1e-9):
    """``|got - want| <= tol * (1 + max|want|)``, on outputs that are not trivially zero."""
    assert got.shape == want.shape
    assert want.abs().max().item() > 1e-6, "outputs too small for the comparison to mean anything"
    diff = (got.double() - want.double()).abs().max().item()
    assert diff <= tol * (1.0 + want.abs().max().item()), diff


def names_of(model, kinds):
    return [n for n, _ in modules_of(model, kinds)]


# ================================================================ decompose_structured

STRUCT_MODELS = ["resnet20-struct-c2n2", "mobilenetv2-struct-c2n2", "densenet-bc-40-36-struct-c1n2"]


@pytest.mark.parametrize("name", STRUCT_MODELS)
def test_decompose_zoo_models(name):
    model = build_model(name).double()
    x = rand(2, 3, 32, 32, seed=1)
    want = forward(model, x)
    before = {n: m for n, m in modules_of(model, StructuredConv2d)}
    assert before, "the zoo model has no structured convs to decompose"
    if name.startswith("mobilenetv2"):
        assert any(m.groups == m.in_channels > 1 for m in before.values()), "no depthwise conv"

    result = DecomposeStructuredPass()(model, PassContext())
    out = result.module
    assert result.modified
    assert names_of(out, (StructuredConv2d, StructuredLinear)) == []
    assert sorted(names_of(out, DecomposedStructuredConv)) == sorted(before)
    assert_outputs_match(forward(out, x), want)

    records = {r.layer: r for r in result.records}
    assert sorted(records) == sorted(before)
    for n, layer in before.items():
        rec = records[n]
        assert rec.action == "decomposed"
        assert rec.details["structure"] == [layer.c, layer.n, layer.n]
        assert rec.details["residual"] == 0.0
        assert "coeff" in rec.details["source"]
        new = out.get_submodule(n)
        assert new.pool.window == layer.window
        assert new.pool.groups == layer.groups and new.pool.padding == layer.padding
        assert new.conv.stride == (layer.stride, layer.stride) and new.conv.padding == (0, 0)
        assert new.conv.groups == layer.groups
        assert torch.equal(new.conv.weight, layer.alpha)
        if layer.groups == layer.in_channels > 1:  # depthwise: spatial structure only
            assert new.pool.window[0] == 1 and new.pool.out_channels == layer.in_channels


@pytest.mark.parametrize("cfg", [
    # in, out, kernel, c, n, stride, padding, groups, bias, H
    (6, 5, 3, 3, 2, 1, 1, 1, False, 7),
    (6, 4, 3, 3, 2, 2, 1, 1, True, 7),      # stride 2 on an odd size
    (4, 4, 3, 1, 2, 2, 1, 4, False, 9),     # depthwise, stride 2
    (8, 6, 5, 3, 3, 2, 2, 2, True, 11),     # 5x5 kernel, grouped (4 channels per group)
    (8, 3, 1, 3, 1, 1, 0, 1, True, 5),      # 1x1 conv, channel structure only
    (5, 2, 3, 5, 1, 1, 0, 1, False, 6),     # c = C, n = 1: spatial box only
])
def test_decompose_single_structured_conv(cfg):
    Cin, Cout, k, c, n, s, p, g, bias, H = cfg
    torch.manual_seed(3)
    layer = StructuredConv2d(Cin, Cout, k, c, n, s, p, g, bias).double()
    if bias:
        with torch.no_grad():
            layer.bias.copy_(rand(Cout, seed=4))
    model = nn.Sequential(layer)
    x = rand(2, Cin, H, H, seed=5)
    want = forward(model, x)
    result = DecomposeStructuredPass()(model, PassContext())
    assert isinstance(result.module[0], DecomposedStructuredConv)
    assert (result.module[0].conv.bias is not None) == bias
    assert_outputs_match(forward(result.module, x), want)


def test_decompose_dense_mode_structured_layers():
    """SR-trained (dense-mode) layers are projected; the record carries the residual."""
    model = build_model("resnet20-struct-c2n2", struct_mode="dense").double()
    projected = copy.deepcopy(model)
    for _, layer in modules_of(projected, StructuredConv2d):
        layer.to_coeff()
    x = rand(1, 3, 32, 32, seed=6)
    want = forward(projected, x)
    residuals = {n: layer.decompose()[1] for n, layer in modules_of(model, StructuredConv2d)}
    result = DecomposeStructuredPass()(model, PassContext())
    assert names_of(result.module, StructuredConv2d) == []
    assert_outputs_match(forward(result.module, x), want)
    for rec in result.records:
        assert "dense" in rec.details["source"]
        assert rec.details["residual"] > 0.1
        assert rec.details["residual"] == pytest.approx(residuals[rec.layer], rel=1e-9)


@pytest.mark.parametrize("shape", [(4, 12), (2, 3, 12)])
def test_decompose_structured_linear(shape):
    torch.manual_seed(7)
    linear = StructuredLinear(12, 5, c=4).double()
    with torch.no_grad():
        linear.bias.copy_(rand(5, seed=8))
    model = nn.Sequential(nn.Identity(), linear)
    x = rand(*shape, seed=9)
    want = forward(model, x)
    result = DecomposeStructuredPass()(model, PassContext())
    assert names_of(result.module, StructuredLinear) == []
    new = result.module[1]
    assert isinstance(new, DecomposedStructuredLinear)
    assert new.pool.window == (9, 1, 1)
    assert new.linear.in_features == 4 and new.linear.out_features == 5
    got = forward(result.module, x)
    assert got.shape == (*shape[:-1], 5)
    assert_outputs_match(got, want)
    (rec,) = result.records
    assert (rec.layer, rec.action) == ("1", "decomposed")
    assert rec.details["structure"] == [4] and rec.details["residual"] == 0.0


def test_decompose_leaves_plain_models_alone():
    model = build_model("resnet20").double()
    state = copy.deepcopy(model.state_dict())
    result = DecomposeStructuredPass()(model, PassContext())
    assert not result.modified and result.records == []
    assert names_of(result.module, DecomposedStructuredConv) == []
    assert all(torch.equal(state[k], v) for k, v in result.module.state_dict().items())


def _stage_convs(model):
    return [(n, m) for n, m in modules_of(model, nn.Conv2d) if n.startswith("stage_")]


def _structured_resnet20():
    """Plain ResNet-20 whose 3x3 convs after the stem hold exactly C/2 x 2 x 2 kernels."""
    model = build_model("resnet20").double()
    alphas = {}
    for i, (name, conv) in enumerate(_stage_convs(model)):
        C = conv.in_channels // conv.groups
        alpha = rand(conv.out_channels, C // 2, 2, 2, seed=100 + i)
        kernel = compose_kernel(alpha, C, 3)
        scale = 1.0 / (kernel.std().item() * math.sqrt(C * 9))  # keep activations O(1)
        alphas[name] = alpha * scale
        with torch.no_grad():
            conv.weight.copy_(kernel * scale)
    assert len(alphas) == 18
    return model, alphas


DECLARED = {"declared_structures": {"stage_*": "c2n2"}}


def test_decompose_declared_dense_convs():
    model, alphas = _structured_resnet20()
    x = rand(2, 3, 32, 32, seed=10)
    want = forward(model, x)
    result = DecomposeStructuredPass()(model, PassContext(options=dict(DECLARED)))
    out = result.module
    assert sorted(names_of(out, DecomposedStructuredConv)) == sorted(alphas)
    # the stem is not declared and stays a plain conv; no stage conv is left dense
    assert isinstance(out.get_submodule("conv_1_3x3"), nn.Conv2d)
    assert [n for n in names_of(out, nn.Conv2d) if n.startswith("stage_") and
            not n.endswith(".conv")] == []
    assert_outputs_match(forward(out, x), want)
    assert len(result.records) == 18
    for rec in result.records:
        conv = out.get_submodule(rec.layer).conv
        C = out.get_submodule(rec.layer).pool.channels
        assert rec.action == "decomposed"
        assert rec.details["structure"] == [C // 2, 2, 2]
        assert rec.details["residual"] < 1e-9
        assert rec.details["forced"] is False
        assert rec.details["source"] == "declared dense conv"
        assert (conv.weight - alphas[rec.layer]).abs().max().item() < 1e-9 * (
            1 + alphas[rec.layer].abs().max().item())


def test_decompose_declared_random_weights_refused():
    model = build_model("resnet20").double()
    residuals = {n: project_to_structure(m.weight.detach(), m.in_channels // 2, 2)[1]
                 for n, m in _stage_convs(model)}
    worst = max(residuals, key=residuals.get)
    with pytest.raises(PassError) as exc:
        DecomposeStructuredPass()(model, PassContext(options=dict(DECLARED)))
    err = exc.value
    assert err.exit_code == 30
    assert re.search(r"worst: (\S+?),", err.message).group(1) == worst
    assert f"{residuals[worst]:.4f}" in err.message
    assert err.message.startswith(f"{sum(r > 0.01 for r in residuals.values())} declared layers")
    assert "--max-residual" in str(err) and "--force" in str(err)


@pytest.mark.parametrize("options", [{"force": True}, {"max_residual": 1.0}])
def test_decompose_declared_random_weights_forced_or_tolerated(options):
    model = build_model("resnet20").double()
    projected = copy.deepcopy(model)
    expected = {}
    for n, conv in _stage_convs(projected):
        C = conv.in_channels
        alpha, residual = project_to_structure(conv.weight.detach(), C // 2, 2)
        expected[n] = residual
        with torch.no_grad():
            conv.weight.copy_(compose_kernel(alpha, C, 3))
    x = rand(1, 3, 32, 32, seed=11)
    want = forward(projected, x)
    result = DecomposeStructuredPass()(model, PassContext(options={**DECLARED, **options}))
    assert sorted(names_of(result.module, DecomposedStructuredConv)) == sorted(expected)
    assert_outputs_match(forward(result.module, x), want)
    for rec in result.records:
        assert rec.details["residual"] == pytest.approx(expected[rec.layer], rel=1e-9)
        assert rec.details["residual"] > 0.01
        assert rec.details["forced"] is ("force" in options)


@pytest.mark.parametrize("spec", [(17, 2), (8, 4), (0, 2), (8, 0)])
def test_decompose_bad_declared_structure_fails_in_requires(spec):
    model = build_model("resnet20")
    ctx = PassContext(options={"declared_structures": {"stage_1.0.conv_a": spec}})
    with pytest.raises(PassError, match=r"stage_1\.0\.conv_a"):
        DecomposeStructuredPass().requires(model, ctx)
    with pytest.raises(PassError, match=r"stage_1\.0\.conv_a"):
        DecomposeStructuredPass()(model, ctx)
    assert isinstance(model.get_submodule("stage_1.0.conv_a"), nn.Conv2d)  # untouched


def test_decompose_declared_explicit_structure():
    """A (c, n) tuple spec and a single-layer name, not a glob."""
    model, _ = _structured_resnet20()
    ctx = PassContext(options={"declared_structures": {"stage_2.0.conv_b": (16, 2)}})
    x = rand(1, 3, 32, 32, seed=12)
    want = forward(model, x)
    result = DecomposeStructuredPass()(model, ctx)
    assert names_of(result.module, DecomposedStructuredConv) == ["stage_2.0.conv_b"]
    (rec,) = result.records
    assert rec.details["structure"] == [16, 2, 2] and rec.details["residual"] < 1e-9
    assert_outputs_match(forward(result.module, x), want)


# ================================================================ realize_sumpool

def _decomposed(name, realization=None, dtype=DT):
    model = build_model(name).to(dtype)
    options = {"sumpool_realization": realization} if realization else {}
    return DecomposeStructuredPass()(model, PassContext(options=options)).module


@pytest.mark.parametrize("name", ["resnet20-struct-c2n2", "mobilenetv2-struct-c2n2"])
def test_realize_replaces_naive_pools(name):
    model = _decomposed(name, "avgpool3d")
    pools = modules_of(model, SumPool)
    assert pools and all(p.realization == "avgpool3d" for _, p in pools)
    x = rand(1, 3, 32, 32, seed=20)
    want = forward(model, x)
    result = RealizeSumPoolPass()(model, PassContext())
    assert result.modified
    after = modules_of(result.module, SumPool)
    records = {r.layer: r for r in result.records}
    assert sorted(records) == sorted(n for n, _ in pools)
    # a layer the cost model (tests/cost_model.json) predicts no faster than its dense conv
    # is composed back into that conv; every other pool is realized
    kept = [n for n, r in records.items() if r.action == "kept dense"]
    assert [n for n, _ in after] == [n for n, _ in pools if n not in kept]
    for n in kept:
        assert records[n].details["predicted_speedup"] < MIN_SPEEDUP
        assert type(result.module.get_submodule(n.rpartition(".")[0])) is nn.Conv2d
    assert all(p.realization != "avgpool3d" for _, p in after)
    for n, pool in after:
        rec = records[n]
        assert rec.action == "realized" and rec.details["forced"] is False
        assert rec.details["realization"] == pool.realization
        assert rec.details["window"] == list(pool.window)
        costs = estimate_costs(pool, *rec.details["input"])
        assert pool.realization == min((r for r in REALIZATIONS if r != "avgpool3d"), key=costs.get)
        assert rec.details["additions"] == pool.additions(*rec.details["input"])
    assert_outputs_match(forward(result.module, x), want)


@pytest.mark.parametrize("forced", REALIZATIONS)
def test_realize_forced(forced):
    start = "banded" if forced != "banded" else "box"
    model = _decomposed("resnet20-struct-c2n2", start)
    x = rand(1, 3, 32, 32, seed=21)
    want = forward(model, x)
    result = RealizeSumPoolPass()(model, PassContext(options={"sumpool_realization": forced}))
    pools = modules_of(result.module, SumPool)
    assert len(pools) == 18
    assert all(p.realization == forced for _, p in pools)
    assert result.modified
    assert all(r.details["forced"] is True and r.details["realization"] == forced
               for r in result.records)
    assert_outputs_match(forward(result.module, x), want)


def test_realize_unknown_forced_name():
    model = _decomposed("resnet20-struct-c2n2")
    with pytest.raises(PassError) as exc:
        RealizeSumPoolPass()(model, PassContext(options={"sumpool_realization": "fft"}))
    assert "'fft'" in exc.value.message
    for r in REALIZATIONS:
        assert r in str(exc.value)
    assert all(p.realization == "cumsum" for _, p in modules_of(model, SumPool))


def test_realize_without_pools_is_a_no_op():
    model = build_model("resnet20")
    result = RealizeSumPoolPass()(model, PassContext())
    assert not result.modified and result.records == []


class _OneUsedPool(nn.Module):
    def __init__(self, spare_realization):
        super().__init__()
        self.used = SumPool(4, (3, 2, 2), 1, realization="avgpool3d")
        self.spare = SumPool(4, (3, 2, 2), 1, realization=spare_realization)  # never called

    def forward(self, x):
        return self.used(x)


def test_realize_unused_pool_recorded():
    model = _OneUsedPool("cumsum")
    result = RealizeSumPoolPass()(model, PassContext(input_shape=(1, 4, 6, 6)))
    records = {r.layer: r for r in result.records}
    assert records["spare"].action == "unused"
    assert records["spare"].details["realization"] == "cumsum" == model.spare.realization
    assert records["used"].action == "realized" and records["used"].details["input"] == [6, 6]
    assert model.used.realization != "avgpool3d" and result.modified


def test_realize_unused_naive_pool_does_not_fail():
    model = _OneUsedPool("avgpool3d")
    result = RealizeSumPoolPass()(model, PassContext(input_shape=(1, 4, 6, 6)))
    records = {r.layer: r for r in result.records}
    assert records["spare"].action == "unused"
    assert model.used.realization != "avgpool3d"


RESNET18_LAYERS = [(64, 56), (128, 28), (256, 14), (512, 7)]


@pytest.mark.parametrize("C,H", RESNET18_LAYERS)
def test_estimate_costs_resnet18_layers(C, H):
    pool = SumPool(C, box_window(C, 3, C // 2, 2), 1)
    costs = estimate_costs(pool, H, H)
    assert set(costs) == set(REALIZATIONS)
    assert all(v > 0 for v in costs.values())
    others = [v for k, v in costs.items() if k != "avgpool3d"]
    assert costs["avgpool3d"] > max(others)
    # DESIGN.md section 2: the naive form is ~8x slower than the dense conv, the others ~3x
    # faster, so the model should put it more than an order of magnitude above the best
    assert costs["avgpool3d"] > 10 * min(others)
    c, Ho = C // 2, H + 1
    model = load_cost_model()       # tests/cost_model.json (conftest.py)
    assert costs["avgpool3d"] == pytest.approx(c * Ho * Ho * (C // 2 + 1) * 2 * 2 * model.coefficients["naive_add"]
                                               + 4 * model.coefficients["op"])


def test_realize_resnet18_at_64():
    model = _decomposed("resnet18-struct-c2n2", "avgpool3d", dtype=torch.float32)
    result = RealizeSumPoolPass()(model, PassContext(input_shape=(1, 3, 64, 64)))
    pools = modules_of(result.module, SumPool)
    assert len(pools) == 16  # every 3x3 conv of layers 1-4 (the stem is 7x7 and dense)
    assert all(p.realization != "avgpool3d" for _, p in pools)
    sizes = {r.layer: r.details["input"] for r in result.records}
    assert sizes["layer1.0.conv1.pool"] == [16, 16]
    assert sizes["layer2.0.conv1.pool"] == [16, 16] and sizes["layer2.0.conv2.pool"] == [8, 8]
    assert sizes["layer4.1.conv2.pool"] == [2, 2]


def test_realize_does_not_touch_batchnorm_statistics_in_train_mode():
    model = _decomposed("resnet20-struct-c2n2").train()
    state = copy.deepcopy(model.state_dict())
    RealizeSumPoolPass()(model, PassContext())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(state[k], v)]
    assert changed == []


# ================================================================ materialize_csg

CSG_MODELS = ["resnet20-csg-16x16x3x3-128", "resnet20-bcsg-16x16x3x3-1024",
              "shufflenetv2-0.5x-csg-16x16x1x1-16"]


def _csg_model(name):
    """Zoo CSG model in float64 with codes scaled so that kernels have ~1/sqrt(fan-in) entries."""
    model = build_model(name).double()
    for i, (_, conv) in enumerate(modules_of(model, CSGConv2d)):
        with torch.no_grad():
            conv.code.copy_(rand(*conv.code.shape, seed=200 + i))
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            conv.code.mul_(1.0 / (conv.kernel().std().item() * math.sqrt(fan_in)))
    return model


@pytest.mark.parametrize("name", CSG_MODELS)
def test_materialize_csg(name):
    model = _csg_model(name)
    layers = dict(modules_of(model, CSGConv2d))
    assert layers and len(modules_of(model, CSGGenerator)) == 1
    assert "generator.weight" in model.state_dict()
    kernels = {n: m.kernel().detach().clone() for n, m in layers.items()}
    x = rand(2, 3, 32, 32, seed=30)
    want = forward(model, x)

    result = MaterializeCSGPass()(model, PassContext())
    out = result.module
    assert result.modified
    assert modules_of(out, (CSGConv2d, CSGGenerator)) == []
    assert not any("generator" in k for k in out.state_dict())
    assert not hasattr(out, "generator")
    for n, kernel in kernels.items():
        conv = out.get_submodule(n)
        assert type(conv) is nn.Conv2d
        assert conv.weight.dtype == DT and torch.equal(conv.weight, kernel)
    assert_outputs_match(forward(out, x), want)
    records = {r.layer: r for r in result.records}
    assert sorted(records) == sorted(layers)
    gen = next(iter(layers.values())).generator
    for n, rec in records.items():
        assert rec.action == "materialized"
        assert rec.details["kernel"] == list(layers[n].kernel_shape)
        assert rec.details["codes"] == list(layers[n].code.shape)
        assert rec.details["slice"] == list(gen.slice_shape)
    if name.startswith("shufflenet"):
        assert all(rec.details["kernel"][2:] == [1, 1] for rec in records.values())
        assert gen.slice_shape == (16, 16, 1, 1)


@pytest.mark.parametrize("name", CSG_MODELS[:2])
def test_materialize_keep_codes_changes_nothing(name):
    model = _csg_model(name)
    state = copy.deepcopy(model.state_dict())
    kinds = [(n, type(m)) for n, m in model.named_modules()]
    x = rand(1, 3, 32, 32, seed=31)
    want = forward(model, x)
    result = MaterializeCSGPass()(model, PassContext(options={"keep_csg_codes": True}))
    out = result.module
    assert not result.modified
    assert [(n, type(m)) for n, m in out.named_modules()] == kinds
    new_state = out.state_dict()
    assert list(new_state) == list(state)
    assert all(torch.equal(state[k], new_state[k]) for k in state)
    assert torch.equal(forward(out, x), want)
    layers = dict(modules_of(out, CSGConv2d))
    assert sorted(r.layer for r in result.records) == sorted(layers)
    for rec in result.records:
        assert rec.action == "kept codes"
        assert rec.details["codes"] == list(layers[rec.layer].code.shape)


def test_materialize_without_csg_is_a_no_op():
    result = MaterializeCSGPass()(build_model("resnet20-struct-c2n2"), PassContext())
    assert not result.modified and result.records == []


# ================================================================ PassManager

THREE = ["decompose_structured", "realize_sumpool", "materialize_csg"]


def _three():
    return [DecomposeStructuredPass(), RealizeSumPoolPass(), MaterializeCSGPass()]


def test_manager_runs_in_order_on_a_copy():
    model = build_model("resnet20-struct-c2n2").double()
    state = copy.deepcopy(model.state_dict())
    kinds = [(n, type(m)) for n, m in model.named_modules()]
    x = rand(1, 3, 32, 32, seed=40)
    want = forward(model, x)
    seen = []
    manager = PassManager(_three(), check_inputs=x, progress=seen.append)
    out, runs = manager.run(model, PassContext())

    assert seen == THREE and [r.name for r in runs] == THREE
    assert out is not model
    # the input model is unchanged
    assert [(n, type(m)) for n, m in model.named_modules()] == kinds
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert len(modules_of(model, StructuredConv2d)) == 18
    # the output is rewritten and still computes the same function
    assert modules_of(out, StructuredConv2d) == [] and len(modules_of(out, SumPool)) == 18
    assert not out.training
    assert_outputs_match(forward(out, x), want)
    for run in runs:
        assert run.seconds >= 0 and math.isfinite(run.seconds)
        assert run.max_abs_diff is not None and 0 <= run.max_abs_diff <= 1e-9
        assert set(run.to_dict()) >= {"name", "modified", "seconds", "records", "max_abs_diff"}
    assert runs[0].modified is True and len(runs[0].records) == 18
    assert runs[1].modified is any(r.details["realization"] != "cumsum" for r in runs[1].records)
    assert runs[2].modified is False and runs[2].records == []
    final = (forward(out, x) - want).abs().max().item()
    assert runs[-1].max_abs_diff == pytest.approx(final, abs=1e-15)


def test_manager_without_check_inputs_records_no_diff():
    model = build_model("resnet20-csg-16x16x3x3-128")
    out, runs = PassManager(_three()).run(model, PassContext())
    assert [r.max_abs_diff for r in runs] == [None, None, None]
    assert [r.modified for r in runs] == [False, False, True]
    assert modules_of(out, CSGConv2d) == [] and len(modules_of(model, CSGConv2d)) == 18


class ScaleConvPass(Pass):
    """Deliberately wrong: doubles the first conv's weight."""
    name = "scale_conv"

    def call(self, module, ctx):
        _, conv = modules_of(module, nn.Conv2d)[0]
        with torch.no_grad():
            conv.weight.mul_(2.0)
        return PassResult(module, True, [])


class CrashPass(Pass):
    name = "crasher"

    def call(self, module, ctx):
        raise RuntimeError("boom at layer 3\nsecond line of detail")


class RefusePass(Pass):
    name = "refuser"

    def requires(self, module, ctx):
        raise PassError("cannot take this model", "do something else")


def test_manager_names_pass_that_changes_outputs():
    model = build_model("resnet20-struct-c2n2")
    state = copy.deepcopy(model.state_dict())
    x = rand(1, 3, 32, 32, seed=41, dtype=torch.float32)
    manager = PassManager([DecomposeStructuredPass(), RealizeSumPoolPass(), ScaleConvPass()],
                          check_inputs=x)
    with pytest.raises(PassError) as exc:
        manager.run(model, PassContext())
    message = str(exc.value)
    assert exc.value.exit_code == 30
    assert message.startswith("pass scale_conv changed the model's outputs")
    assert "(after decompose_structured, realize_sumpool)" in message
    assert "--skip-pass scale_conv" in message
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_manager_broken_pass_first_has_no_after():
    x = rand(1, 3, 32, 32, seed=42, dtype=torch.float32)
    with pytest.raises(PassError) as exc:
        PassManager([ScaleConvPass()], check_inputs=x).run(build_model("resnet20"), PassContext())
    assert "scale_conv" in exc.value.message and "after" not in exc.value.message


def test_manager_reports_crash():
    manager = PassManager([DecomposeStructuredPass(), CrashPass(), MaterializeCSGPass()])
    with pytest.raises(PassError) as exc:
        manager.run(build_model("resnet20-struct-c2n2"), PassContext())
    err = exc.value
    assert err.exit_code == 30
    assert err.message == ("pass crasher crashed: RuntimeError: boom at layer 3 "
                           "(after decompose_structured)")
    assert "\n" not in str(err) and "second line" not in str(err)
    assert "--skip-pass crasher" in err.hint
    assert isinstance(err.__cause__, RuntimeError)


def test_manager_reports_refusal():
    manager = PassManager([DecomposeStructuredPass(), RealizeSumPoolPass(), RefusePass()])
    with pytest.raises(PassError) as exc:
        manager.run(build_model("resnet20"), PassContext())
    assert exc.value.message == ("pass refuser failed: cannot take this model "
                                 "(after decompose_structured, realize_sumpool)")
    assert exc.value.hint == "do something else"


def test_manager_declared_refusal_names_pass():
    manager = PassManager(_three())
    with pytest.raises(PassError) as exc:
        manager.run(build_model("resnet20"), PassContext(options=dict(DECLARED)))
    assert exc.value.message.startswith("pass decompose_structured failed: ")
    assert "after" not in exc.value.message and "--force" in str(exc.value)


def test_manager_rejects_duplicate_names():
    with pytest.raises(ValueError, match="decompose_structured"):
        PassManager([DecomposeStructuredPass(), RealizeSumPoolPass(), DecomposeStructuredPass()])


# ================================================================ select_passes

def test_select_default_pipeline():
    chosen = select_passes(PIPELINE)
    assert [p.name for p in chosen] == PIPELINE
    assert all(type(p) is PASSES[p.name] for p in chosen)
    assert PIPELINE[:3] == THREE
    assert select_passes(PIPELINE)[0] is not chosen[0]  # fresh instances


def test_select_only_and_skip():
    only = select_passes(PIPELINE, only=["materialize_csg", "decompose_structured"])
    assert [p.name for p in only] == ["decompose_structured", "materialize_csg"]  # pipeline order
    skipped = select_passes(PIPELINE, skip=["realize_sumpool"])
    assert [p.name for p in skipped] == [n for n in PIPELINE if n != "realize_sumpool"]
    both = select_passes(PIPELINE, only=THREE, skip=["materialize_csg"])
    assert [p.name for p in both] == THREE[:2]
    assert [p.name for p in select_passes(THREE[1:])] == THREE[1:]
    assert select_passes(PIPELINE, skip=list(PIPELINE)) == []


@pytest.mark.parametrize("where", ["only", "skip"])
def test_select_unknown_pass(where):
    with pytest.raises(UnknownPassError) as exc:
        select_passes(PIPELINE, **{where: ["decompose_structured", "fold_bn"]})
    err = exc.value
    assert err.exit_code == 36
    assert "'fold_bn'" in err.message
    for name in PIPELINE:
        assert name in str(err)


def test_autotune_measures_once_then_reuses_the_cache(tmp_path, monkeypatch):
    """--autotune: the fastest measured candidate wins, and a second run only reads the cache."""
    from structexport.passes import autotune as at
    from structexport.passes import select_passes
    calls = []

    def fake_measure(layer, pool, in_shape, threads=1, repeat=30, dense=False):
        calls.append(tuple(in_shape))
        return {"cumsum": 3.0, "banded": 2.0, "box": 1.0}  # box fastest everywhere

    monkeypatch.setattr(at, "measure", fake_measure)
    cache = tmp_path / "tune.json"
    ctx = PassContext("ort-cpu", (1, 3, 32, 32), {"autotune": True, "tuning_cache": str(cache)})
    model = build_model("resnet20-struct-c2n2")
    passes = lambda: select_passes(["decompose_structured", "realize_sumpool"])  # noqa: E731
    _, runs = PassManager(passes()).run(model, ctx)
    records = runs[1].records
    assert {r.details["realization"] for r in records} == {"box"}
    assert all(r.details["chosen_by"] == "measurement" for r in records)
    distinct = len(calls)
    assert 0 < distinct < len(records)  # one measurement per distinct layer shape
    assert cache.is_file() and len(next(iter(json.loads(cache.read_text()).values()))) == distinct
    _, runs = PassManager(passes()).run(model, ctx)
    assert len(calls) == distinct  # nothing measured again
    assert all(r.details["cached"] for r in runs[1].records)


def test_autotune_cache_that_is_damaged_is_rebuilt(tmp_path):
    from structexport.passes.autotune import AutotuneCache
    path = tmp_path / "tune.json"
    path.write_text("{not json")
    cache = AutotuneCache(path)
    assert cache.data == {}
    cache.put("m", "k", {"choice": "box", "ms": {}})
    cache.save()
    assert AutotuneCache(path).get("m", "k")["choice"] == "box"
