"""compose_dense_layers (issue 20: per-layer INT8 choice): the pass tested three ways (pattern
before, gone after, outputs match), on strided, grouped and channel-only layers; and the
choice that feeds it, from a cache (deterministic) and by measurement."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from structexport.export import export_onnx
from structexport.layers.decomposed import decompose
from structexport.passes import ONNX, PassContext, PassError, PassManager
from structexport.passes.compose_dense_layers_pass import (ComposeDenseLayersPass, composed_weight,
                                                           find_decomposed)
from structexport.passes.rebase_channel_sums_pass import RebaseChannelSumsPass, find_channel_sums
from structexport.quantize import choose_dense_layers, layer_key


class Net(torch.nn.Sequential):
    """Three decomposed layers: C/2x2x2 at stride 1, a grouped one at stride 2, and one with
    no channel structure (a box and a small conv, no band), ReLUs between them."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(
            decompose(16, 0.2 * torch.randn(16, 8, 2, 2), torch.randn(16), 3, 1, 1, 1, realization="banded"),
            torch.nn.ReLU(),
            decompose(16, 0.2 * torch.randn(24, 4, 2, 2), None, 3, 2, 1, groups=2, realization="banded"),
            torch.nn.ReLU(),
            decompose(24, 0.2 * torch.randn(24, 24, 2, 2), None, 3, 1, 1, 1, realization="banded"))


def net_graph() -> tuple[ir.Model, torch.Tensor, torch.Tensor]:
    net = Net().eval()
    x = torch.randn(1, 16, 12, 12)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "net.onnx"
        export_onnx(net, x, path)
        model = ir.from_proto(onnx.load(str(path)))
    with torch.no_grad():
        return model, x, net(x)


def test_compose_dense_layers_three_ways():
    model, x, expected = net_graph()
    layers = find_decomposed(model.graph)
    assert [(d.band is not None, d.box is not None) for d in layers] == [(True, True), (True, True), (False, True)]
    names = [d.layer for d in layers]
    assert len(set(names)) == 3
    # the composed kernel is the source's: 3x3, grouped where the layer was
    assert [composed_weight(d).shape for d in layers] == [(16, 16, 3, 3), (24, 8, 3, 3), (24, 24, 3, 3)]
    chosen = {names[1]: "slower", names[2]: "slower"}
    out, runs = PassManager([ComposeDenseLayersPass()], check_inputs=x, model_kind=ONNX).run(
        model, PassContext(options={"dense_layers": chosen}))
    assert [d.layer for d in find_decomposed(out.graph)] == [names[0]]       # gone after, the rest kept
    scale = float(expected.abs().max())          # float32 rounding of outputs near 1e3
    assert runs[0].max_abs_diff < 1e-6 * scale
    assert [(r.layer, r.action, r.details["why"]) for r in runs[0].records] == \
        [(names[1], "composed", "slower"), (names[2], "composed", "slower")]
    convs = [n for n in out.graph if n.op_type == "Conv"]
    dense = [n for n in convs if n.name.endswith("/dense")]
    assert len(convs) == 3 + 2 and len(dense) == 2
    assert dense[0].attributes["group"].value == 2 and list(dense[0].attributes["strides"].value) == [2, 2]
    assert all(n.inputs[1].name == f"{layer}.weight" for n, layer in zip(dense, names[1:]))
    # no initializer left behind by the removed nodes
    assert all(v.uses() for v in out.graph.initializers.values())
    proto = ir.to_proto(out)
    onnx.checker.check_model(proto)
    from structexport.ortsession import ort_session
    got = ort_session(proto.SerializeToString(), optimize=False).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, expected.numpy(), atol=1e-6 * scale, rtol=0)
    # the layer kept decomposed is still rebased by the pass that follows
    out2, _ = PassManager([RebaseChannelSumsPass()], check_inputs=x, model_kind=ONNX).run(out, PassContext())
    assert not find_channel_sums(out2.graph)


def test_compose_dense_layers_refuses_an_unknown_layer():
    model, x, _ = net_graph()
    with pytest.raises(PassError) as info:
        PassManager([ComposeDenseLayersPass()], check_inputs=x, model_kind=ONNX).run(
            model, PassContext(options={"dense_layers": {"nope": "?"}}))
    assert "no decomposed layer 'nope'" in info.value.message


def shapes_of(model: ir.Model) -> dict:
    from structexport.costmodel import tensor_shapes
    return tensor_shapes(ir.to_proto(model))


def test_choice_from_the_cache_keeps_a_layer_structured_only_where_faster(tmp_path):
    """Timings read from the cache (this machine's key): a layer whose INT8 form is slower
    than its dense conv is chosen dense, with the times in the reason; nothing is measured."""
    from structexport.passes.autotune import machine_key
    model, _, _ = net_graph()
    layers = find_decomposed(model.graph)
    shapes = shapes_of(model)
    keys = [layer_key(d, shapes[d.input.name]) for d in layers]
    assert len(set(keys)) == 3 and keys[0].startswith("in 1x16x12x12 band 8x16x1x1/g1/s11")
    times = [{"structured": 0.010, "dense": 0.030}, {"structured": 0.050, "dense": 0.020},
             {"structured": 0.020, "dense": 0.020}]           # a tie goes dense: it quantizes better
    cache = tmp_path / "int8-layers.json"
    cache.write_text(json.dumps({machine_key("ort-cpu int8 qdq", 1): dict(zip(keys, times))}))
    dense, record = choose_dense_layers(model, "measure", cache, lambda _m: None)
    assert record["measured"] == 0 and record["from_cache"] == 3 and record["unmeasured"] == 0
    assert [r["choice"] for r in record["layers"]] == ["structured", "dense", "dense"]
    assert set(dense) == {layers[1].layer, layers[2].layer}
    assert dense[layers[1].layer] == "INT8 0.0500 ms structured, 0.0200 ms dense (cached)"
    assert record["layers"][0]["speedup"] == 3.0
    # "structured" measures nothing and keeps every layer
    assert choose_dense_layers(model, "structured", cache, lambda _m: None) == ({}, {"policy": "structured",
                                                                                   "layers": []})
    # an entry that is not two positive times is measured again, never trusted
    data = json.loads(cache.read_text())
    data[machine_key("ort-cpu int8 qdq", 1)][keys[0]] = {"structured": 0}
    cache.write_text(json.dumps(data))
    said = []
    _, record = choose_dense_layers(model, "measure", cache, said.append)
    assert record["measured"] == 1 and record["from_cache"] == 2 and len(said) == 1


def test_choice_by_measurement_is_cached(tmp_path):
    """Measured once per layer shape on this machine (both forms quantized and timed), then
    read back: the second choice measures nothing and agrees with the first."""
    model, _, _ = net_graph()
    cache = tmp_path / "c.json"
    said = []
    dense, record = choose_dense_layers(model, "measure", cache, said.append)
    assert record["measured"] == 3 and len(said) == 3 and cache.is_file()
    for row in record["layers"]:
        assert row["structured_ms"] > 0 and row["dense_ms"] > 0
        assert (row["choice"] == "dense") == (row["dense_ms"] <= row["structured_ms"])
    assert set(dense) == {r["layer"] for r in record["layers"] if r["choice"] == "dense"}
    again, record2 = choose_dense_layers(model, "measure", cache, said.append)
    assert record2["measured"] == 0 and again.keys() == dense.keys() and len(said) == 3
