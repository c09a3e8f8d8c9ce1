"""decompose_structured_conv (ONNX): structure discovered in the weights of a model that is
not in the zoo. Three ways, as every pass: the pattern is there before (dense convs whose
kernels are exactly structured), gone after (each is a sum-pool and a smaller conv), and
the outputs still match (ONNX Runtime, optimizations off). Plus convert_onnx end to end."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn as nn

from structexport.convert import ConvertOptions, convert_onnx, prepare_onnx
from structexport.costmodel import node_costs, totals
from structexport.layer_cost import CostModel
from structexport.layers.structured import compose_kernel
from structexport.ortsession import ort_session
from structexport.passes import ONNX, PassContext, PassManager
from structexport.passes.decompose_structured_conv_pass import DecomposeStructuredConvPass

# (name, conv, structure (c, n) its kernel is built with, or None: dense random weights)
STRUCTURE = {"c1": (8, 2), "c2": (8, 2), "grouped": (4, 2), "depthwise": (1, 2), "pointwise": (16, 1)}


class MyNet(nn.Module):
    """A user's own CNN: two residual units, a strided, a grouped, a depthwise and a 1x1 conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1)
        self.c1 = nn.Conv2d(16, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.c2 = nn.Conv2d(16, 32, 3, 2, 1)
        self.grouped = nn.Conv2d(32, 32, 3, 1, 1, groups=4)
        self.depthwise = nn.Conv2d(32, 32, 3, 1, 1, groups=32)
        self.pointwise = nn.Conv2d(32, 32, 1)
        self.dense = nn.Conv2d(32, 32, 3, 1, 1)        # random: no structure to find
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn1(self.c1(x))) + x
        x = torch.relu(self.c2(x))
        x = torch.relu(self.grouped(x)) + x
        x = self.pointwise(self.depthwise(x))
        x = torch.relu(self.dense(x))
        return self.fc(x.mean((2, 3)))


def save_four_forms(net: nn.Module, x: torch.Tensor, root, module_source: str):
    """``net`` saved the four ways PyTorch users save models (issue 11): ONNX (dynamo),
    torch.export, a state dict with a ``mynet.py`` whose ``build()`` returns the module,
    and TorchScript; returns ``root``."""
    torch.onnx.export(net, (x,), dynamo=True, opset_version=18).save(str(root / "mynet.onnx"))
    torch.export.save(torch.export.export(net, (x,)), str(root / "mynet.pt2"))
    torch.save(net.state_dict(), root / "mynet_sd.pt")
    torch.jit.trace(net, x).save(str(root / "mynet_ts.pt"))
    (root / "mynet.py").write_text(module_source)
    return root


def structured_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = MyNet().eval()
    with torch.no_grad():
        for name, (c, n) in STRUCTURE.items():
            conv = getattr(net, name)
            O, C, N, _ = conv.weight.shape
            conv.weight.copy_(compose_kernel(torch.randn(O, c, n, n) * 0.2, C, N))
    return net


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    path = tmp_path_factory.mktemp("mynet") / "mynet.onnx"
    torch.onnx.export(structured_net(), (torch.randn(1, 3, 32, 32),), dynamo=True,
                      opset_version=18).save(str(path))
    return path


def conv_weights(model: ir.Model) -> dict[str, tuple]:
    return {n.inputs[1].name: tuple(n.inputs[1].const_value.shape) for n in model.graph
            if n.op_type == "Conv" and n.inputs[1].const_value is not None}


def run(proto, x):
    s = ort_session(proto.SerializeToString(), optimize=False)
    return s.run(None, {s.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("realization", [None, "box", "cumsum", "banded"])
def test_pattern_before_gone_after_outputs_match(exported, realization):
    proto = prepare_onnx(onnx.load(exported))
    before = ir.from_proto(proto)
    assert {"c1.weight", "grouped.weight", "pointwise.weight"} <= set(conv_weights(before))
    # realization None: the cost model's choice, on a machine where every structure pays (the
    # decision to keep a layer dense is tests/test_layer_cost.py's)
    ctx = PassContext("ort-cpu", (1, 3, 32, 32), {"sumpool_realization": realization} if realization
                      else {"cost_model": CostModel({"conv_mac": 1.0, "depthwise_mac": 1.0, "conv_output": 0.01,
                                                     "elementwise": 0.01, "op": 0.0})})
    x = torch.randn(1, 3, 32, 32)
    after, runs = PassManager([DecomposeStructuredConvPass()], check_inputs=x, model_kind=ONNX).run(before, ctx)
    records = {r.layer: r for r in runs[0].records}
    for name, (c, n) in STRUCTURE.items():
        assert records[name].action == "decomposed", records[name]
        assert (records[name].details["c"], records[name].details["n"]) == (c, n)
    assert records["dense"].action == "dense" and records["stem"].action == "dense"
    weights = conv_weights(after)
    for name, (c, n) in STRUCTURE.items():      # the dense kernels are gone, small ones took their place
        assert f"{name}.weight" not in weights
        O = getattr(MyNet(), name).weight.shape[0]
        groups = getattr(MyNet(), name).groups
        assert weights[f"{name}.alpha"] == (O, c, n, n) if groups == 1 else weights[f"{name}.alpha"][1:] == (c, n, n)
    assert "dense.weight" in weights
    out_proto = ir.to_proto(after)
    onnx.checker.check_model(out_proto, full_check=True)
    got, want = run(out_proto, x.numpy()), run(proto, x.numpy())
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-4)
    assert runs[0].max_abs_diff < 1e-5 * scale


def test_weights_held_in_constant_nodes_are_found(exported):
    """An exporter that keeps weights in Constant nodes: prepare_onnx lifts them."""
    proto = onnx.load(exported)
    inits = {i.name: i for i in proto.graph.initializer}
    moved = [n for n in ("c1.weight", "grouped.weight") if n in inits]
    for name in moved:
        init = inits[name]
        proto.graph.initializer.remove(init)
        proto.graph.node.insert(0, onnx.helper.make_node("Constant", [], [name], value=init))
    model = ir.from_proto(prepare_onnx(proto))
    result = DecomposeStructuredConvPass()(model, PassContext("ort-cpu", (1, 3, 32, 32), {}))
    actions = {r.layer: r.action for r in result.records}
    assert all(actions[n.removesuffix(".weight")] == "decomposed" for n in moved)


def test_approximate_structure_needs_max_residual(exported, tmp_path):
    net = structured_net()
    with torch.no_grad():
        w = net.c1.weight
        w.add_(torch.randn_like(w) * 1e-3 * w.norm() / w.numel() ** 0.5)
    path = tmp_path / "approx.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), dynamo=True, opset_version=18).save(str(path))
    proto = prepare_onnx(onnx.load(path))
    exact = DecomposeStructuredConvPass()(ir.from_proto(proto), PassContext("ort-cpu", (1, 3, 32, 32), {}))
    assert {r.layer: r.action for r in exact.records}["c1"] == "dense"
    loose = DecomposeStructuredConvPass()(ir.from_proto(proto), PassContext(
        "ort-cpu", (1, 3, 32, 32), {"max_residual": 1e-2}))
    rec = {r.layer: r for r in loose.records}["c1"]
    assert rec.action == "decomposed" and 1e-4 < rec.details["residual"] < 1e-2


def test_convert_onnx_writes_a_verified_package_with_the_discovered_speedup(exported, tmp_path):
    result = convert_onnx(onnx.load(exported), tmp_path / "out", ConvertOptions(target="ort-cpu"),
                          source={"path": str(exported), "name": "mynet", "format": "onnx"})
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["verification"]["passed"] is True and m["verification"]["max_rel_diff"] < 1e-3
    assert m["source"]["arch"] == "mynet" and m["source"]["format"] == "onnx"
    # before/after MACs are those of the two graphs: what the weights allow
    want_before = totals(node_costs(tmp_path / "out" / "reference.onnx"))["macs"]
    want_after = totals(node_costs(tmp_path / "out" / "model.onnx"))["macs"]
    assert (m["before"]["macs"], m["after"]["macs"]) == (want_before, want_after)
    assert m["before"]["macs"] / m["after"]["macs"] > 1.5   # 1.87x: the random dense conv stays
    layers = {row["name"] for row in m["source_layers"]}
    assert {"stem", "c1", "c2", "grouped", "depthwise", "pointwise", "dense", "fc"} <= layers
    assert result.verified


def test_approximate_structure_converts_against_the_decomposed_reference(tmp_path):
    """--max-residual: the projected kernels are decomposed, verification compares the
    artifact with the decomposed reference, and the manifest says how far it moved."""
    net = structured_net()
    with torch.no_grad():
        for name in ("c1", "grouped"):
            w = getattr(net, name).weight
            w.add_(torch.randn_like(w) * 1e-3 * w.norm() / w.numel() ** 0.5)
    path = tmp_path / "approx.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), dynamo=True, opset_version=18).save(str(path))
    exact = convert_onnx(onnx.load(path), tmp_path / "exact", ConvertOptions(target="ort-cpu"))
    actions = {r["layer"]: r["action"] for run in exact.manifest["passes"] for r in run["records"]}
    assert actions["c1"] == "dense" and exact.manifest["source_deviation"] is None
    loose = convert_onnx(onnx.load(path), tmp_path / "loose", ConvertOptions(
        target="ort-cpu", pass_options={"max_residual": 1e-2}))
    m = loose.manifest
    projected = {r["layer"]: r for r in m["passes"][0]["records"]}
    assert set(projected) == {"c1", "grouped"} and all(1e-4 < r["details"]["residual"] < 1e-2
                                                       for r in projected.values())
    decomposed = {r["layer"] for r in m["passes"][1]["records"] if r["action"] == "decomposed"}
    assert {"c1", "grouped"} <= decomposed
    assert m["verification"]["passed"] is True
    dev = m["source_deviation"]
    assert dev["max_abs_diff"] > 0 and dev["max_rel_diff"] < 0.1 and dev["top1_agreement"] == 1.0
    assert m["after"]["macs"] < exact.manifest["after"]["macs"]


def test_declared_structure_forces_a_layer_and_refuses_one_too_far(tmp_path):
    """--declare-structured on a model from outside the zoo: the declared layer is
    projected onto the declared structure (within --max-residual's 0.01 by default) and
    decomposed; a declaration the weights are far from is refused (exit 30) unless --force."""
    from structexport.errors import StructExportError
    net = structured_net()
    with torch.no_grad():
        w = net.c1.weight
        w.add_(torch.randn_like(w) * 1e-3 * w.norm() / w.numel() ** 0.5)
    path = tmp_path / "approx.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 32, 32),), dynamo=True, opset_version=18).save(str(path))
    r = convert_onnx(onnx.load(path), tmp_path / "declared", ConvertOptions(
        target="ort-cpu", pass_options={"declared_structures": {"c1": "c2n2"}}))
    records = {rec["layer"]: rec for run in r.manifest["passes"] for rec in run["records"]}
    assert records["c1"]["action"] == "decomposed" and (records["c1"]["details"]["c"], records["c1"]["details"]["n"]) == (8, 2)
    assert r.manifest["source_deviation"]["top1_agreement"] == 1.0
    with pytest.raises(StructExportError) as exc:     # the random dense conv is nowhere near c2n2
        convert_onnx(onnx.load(path), tmp_path / "far", ConvertOptions(
            target="ort-cpu", pass_options={"declared_structures": {"dense": "c2n2"}}))
    assert exc.value.exit_code == 30 and "too far" in str(exc.value)
    assert not (tmp_path / "far").exists()
