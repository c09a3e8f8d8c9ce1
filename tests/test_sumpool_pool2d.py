"""The "pool2d" sum-pool realization (2-D AveragePools, DESIGN.md section 5) where the
realizations live besides the torch module (tests/test_sumpool.py): the ONNX emitter of
ONNX-source models, the cost model that picks one per layer, --autotune's candidates, the
CLI and regress lists, and a whole conversion."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from structexport.layers.structured import box_window, sum_pool
from structexport.layers.sumpool import (CLI_REALIZATIONS, MEASURABLE_REALIZATIONS, REALIZATIONS,
                                         SumPool)
from structexport.onnx_sumpool import GraphBuilder, emit_sumpool
from structexport.ortsession import ort_session
from structexport.layer_cost import CostModel, read_model, shipped_models
from structexport.passes.realize_sumpool_pass import RealizeSumPoolPass, estimate_costs

# (channels, groups, window, padding, H, W)
EMIT_CASES = [
    (8, 1, (5, 2, 2), 1, 7, 7),       # 3x3 conv at C/2 x 2 x 2
    (12, 3, (3, 2, 2), 1, 5, 6),      # grouped
    (6, 6, (1, 2, 2), 1, 5, 5),       # depthwise: spatial only
    (16, 1, (9, 1, 1), 0, 4, 4),      # 1x1 conv: channels only
    (7, 1, (4, 3, 3), 2, 9, 5),       # odd sizes, padding 2 > half of 3: an explicit Pad
    (9, 3, (2, 3, 1), 1, 5, 4),       # non-square window, kw = 1: an explicit Pad
    (4, 1, (4, 2, 2), 0, 2, 2),       # window as large as the input
]


def emitted_model(case, realization, dtype=np.float32) -> bytes:
    """One ONNX graph: input -> emit_sumpool -> output."""
    C, g, w, p, H, W = case
    elem = {np.float32: ir.DataType.FLOAT, np.float16: ir.DataType.FLOAT16}[dtype]
    x = ir.Value(name="x", type=ir.TensorType(elem), shape=ir.Shape([1, C, H, W]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18}, name="g")
    anchor = ir.node("Identity", [x], num_outputs=1, name="anchor")
    graph.append(anchor)
    b = GraphBuilder(graph, anchor, "layer")
    out = emit_sumpool(b, anchor.outputs[0], (1, C, H, W), g, w, p, realization, dtype)
    for node in b.nodes:
        graph.append(node)
    graph.outputs.append(out)
    out.type = ir.TensorType(elem)
    out.shape = ir.Shape([1, g * (C // g - w[0] + 1), H + 2 * p - w[1] + 1, W + 2 * p - w[2] + 1])
    model = ir.Model(graph, ir_version=9)
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def case_id(case):
    C, g, w, p, H, W = case
    return f"C{C}g{g}w{'x'.join(map(str, w))}p{p}_{H}x{W}"


# ---------------------------------------------------------------- the ONNX emitter

@pytest.mark.parametrize("realization", MEASURABLE_REALIZATIONS)
@pytest.mark.parametrize("case", EMIT_CASES, ids=case_id)
def test_emitted_sumpool_runs_in_ort_and_matches(case, realization):
    C, g, w, p, H, W = case
    x = torch.randn(1, C, H, W, generator=torch.Generator().manual_seed(11))
    want = sum_pool(x.double(), g, w, p).numpy()
    data = emitted_model(case, realization)
    for optimize in (False, True):   # all optimizations on: ORT's blocked-layout pools
        session = ort_session(data, optimize=optimize)
        (got,) = session.run(None, {"x": x.numpy()})
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max()), (realization, optimize)


@pytest.mark.parametrize("case", EMIT_CASES, ids=case_id)
def test_emitted_pool2d_is_2d_pools_only(case):
    C, g, w, p, H, W = case
    kc, kh, kw = w
    model = onnx.load_from_string(emitted_model(case, "pool2d"))
    ops = [n.op_type for n in model.graph.node]
    assert "CumSum" not in ops and "Conv" not in ops
    kernels = sorted(list(a.ints) for n in model.graph.node if n.op_type == "AveragePool"
                     for a in n.attribute if a.name == "kernel_shape")
    assert kernels == sorted(k for k in ([kc, 1], [kh, kw]) if k[0] * k[1] > 1)
    for n in model.graph.node:
        if n.op_type == "AveragePool":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
            assert attrs["count_include_pad"] == 1
    scales = [onnx.numpy_helper.to_array(i) for i in model.graph.initializer
              if i.name.endswith("sumpool_scale")]
    assert [float(s.item()) for s in scales] == ([float(kc * kh * kw)] if kc * kh * kw > 1 else [])


def test_emitter_writes_the_nodes_torch_exports():
    """The ONNX-source path and the torch path write pool2d alike (same operators, in order)."""
    case = (12, 3, (3, 2, 2), 1, 5, 6)
    C, g, w, p, H, W = case
    emitted = [n.op_type for n in onnx.load_from_string(emitted_model(case, "pool2d")).graph.node
               if n.op_type != "Identity"]
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/p.onnx"
        torch.onnx.export(SumPool(C, w, p, g, "pool2d").eval(), (torch.randn(1, C, H, W),),
                          dynamo=True, opset_version=18).save(path)
        exported = [n.op_type for n in onnx.load(path).graph.node if n.op_type != "Constant"]
    assert emitted == exported == ["Reshape", "AveragePool", "Reshape", "Mul", "AveragePool"]


def test_emitted_pool2d_float16():
    """fp16 packages: ONNX Runtime pools half floats (it has no double AveragePool: float64
    exactness is the torch module's, tests/test_sumpool.py)."""
    case = (8, 2, (3, 2, 2), 1, 5, 5)
    C, g, w, p, H, W = case
    x = torch.rand(1, C, H, W, generator=torch.Generator().manual_seed(5))
    want = sum_pool(x.half().double(), g, w, p).numpy()
    session = ort_session(emitted_model(case, "pool2d", np.float16))
    (got,) = session.run(None, {"x": x.half().numpy()})
    assert got.dtype == np.float16
    assert np.abs(got.astype(np.float64) - want).max() <= 2e-3 * np.abs(want).max()


# ---------------------------------------------------------------- the cost model

RESNET18_LAYERS = [(64, 56), (128, 28), (256, 14), (512, 7)]
# The relative weights the cost model had before it was fitted per CPU (an element-wise
# element = 1): the arithmetic of each form is checked with round numbers.
UNIT = CostModel({"conv_mac": 0.2, "depthwise_mac": 1.0, "elementwise": 1.0, "layout": 1.3,
                  "pool_add": 5.0, "naive_add": 10.0, "op": 0.0}, "unit")


@pytest.mark.parametrize("name", sorted(shipped_models()))
@pytest.mark.parametrize("C,H", RESNET18_LAYERS)
def test_cost_model_has_pool2d_and_does_not_pick_it_on_resnet18(C, H, name):
    """Measured (docs/benchmarks.md): ONNX Runtime's channel pool sums every window value
    by value, 5-7x slower than running sums at these shapes, so no shipped model picks pool2d."""
    pool = SumPool(C, box_window(C, 3, C // 2, 2), 1)
    costs = estimate_costs(pool, H, H, read_model(shipped_models()[name]))
    assert set(costs) == set(REALIZATIONS)
    assert all(v > 0 for v in costs.values())
    assert costs["pool2d"] > 2 * min(costs[r] for r in MEASURABLE_REALIZATIONS)
    assert costs["pool2d"] < costs["avgpool3d"]


def test_cost_model_pool2d_by_hand():
    # 8 channels, window 5x2x2, padding 1 (inside the pool), 6x6 input: c = 4, output 7x7.
    pool = SumPool(8, (5, 2, 2), 1)
    costs = estimate_costs(pool, 6, 6, UNIT)
    channel_pool = 5.0 * 5 * 4 * 36           # pool_add * kc * c * H * W
    mul = 4 * 36
    layout = 1.3 * (8 + 4) * 36                # out of the blocked layout and back
    spatial = 4 * 7 * 7 * 4                    # as the depthwise box: c * Ho * Wo * kh * kw
    assert costs["pool2d"] == pytest.approx(channel_pool + mul + layout + spatial)
    # padding 2 > half of the window: an explicit Pad, one pass over the padded values
    wide = SumPool(8, (5, 2, 2), 2)
    assert estimate_costs(wide, 6, 6, UNIT)["pool2d"] == pytest.approx(
        channel_pool + mul + layout + 4 * 9 * 9 * 4 + 4 * 10 * 10)


def test_cost_model_gemm_weight_decides_banded_against_box():
    """The banded form's channel sum is a GEMM: with a GEMM multiply at 0.2 of an element-wise
    element (the AVX2 AMD EPYC fit) the running-sum channel pool (box) wins at every ResNet-18
    shape, at 0.2 / 2^1.5 (AVX-512) banded wins up to 128 channels."""
    cheap = CostModel(dict(UNIT.coefficients, conv_mac=0.2 / 2 ** 1.5))
    choice = {}
    for label, model in (("unit", UNIT), ("cheap", cheap)):
        for C, H in RESNET18_LAYERS:
            costs = estimate_costs(SumPool(C, box_window(C, 3, C // 2, 2), 1), H, H, model)
            costs.pop("avgpool3d")
            choice[label, C] = min(costs, key=costs.get)
    assert [choice["unit", C] for C, _ in RESNET18_LAYERS] == ["box"] * 4
    assert [choice["cheap", C] for C, _ in RESNET18_LAYERS] == ["banded", "banded", "box", "box"]
    pool = SumPool(64, box_window(64, 3, 32, 2), 1)
    b8, b16 = (estimate_costs(pool, 56, 56, m) for m in (UNIT, cheap))
    gemm = 32 * 64 * 56 * 56                      # band MACs
    spatial = 32 * 57 * 57 * 4
    assert b8["banded"] == pytest.approx(0.2 * gemm + spatial)
    assert b16["banded"] == pytest.approx(0.2 / 2 ** 1.5 * gemm + spatial)
    assert b16["box"] == b8["box"] == pytest.approx(4 * 64 * 56 * 56 + spatial + 1.3 * 96 * 56 * 56)
    # the shipped AVX2 model is that fit
    avx2 = read_model(shipped_models()["amd-epyc-avx2"])
    for C, H in RESNET18_LAYERS:
        costs = estimate_costs(SumPool(C, box_window(C, 3, C // 2, 2), 1), H, H, avx2)
        costs.pop("avgpool3d")
        assert min(costs, key=costs.get) == "box"


def test_cost_model_depthwise_pool2d_pays_its_scale():
    """Spatial only (kc = 1): pool2d is the box's depthwise sum plus a Mul and its layout
    change, so the depthwise box stays the cheaper one."""
    pool = SumPool(32, (1, 2, 2), 1, 32)
    costs = estimate_costs(pool, 14, 14, UNIT)
    assert costs["pool2d"] == pytest.approx(costs["box"] + 32 * 14 * 14 + 1.3 * (32 + 32) * 14 * 14)
    assert costs["pool2d"] > costs["box"]


def test_node_costs_count_pool2d_additions_exactly(tmp_path):
    """structexport.costmodel counts an AveragePool's window additions: for pool2d they are
    exactly SumPool.additions, and nothing of it counts as multiplies."""
    from structexport.costmodel import node_costs, totals
    pool = SumPool(8, (5, 2, 2), 1, 1, "pool2d").eval()
    path = tmp_path / "p.onnx"
    torch.onnx.export(pool, (torch.randn(1, 8, 6, 6),), dynamo=True, opset_version=18).save(str(path))
    t = totals(node_costs(path))
    assert t["macs"] == 0
    assert t["adds"] == pool.additions(6, 6) == 4 * 36 * 4 + 4 * 49 * 3


# ---------------------------------------------------------------- autotune

def test_autotune_candidates_and_measurement_include_pool2d():
    from structexport.layers.decomposed import decompose
    from structexport.passes import autotune as at
    assert "pool2d" in at.CANDIDATES and "avgpool3d" not in at.CANDIDATES
    layer = decompose(8, torch.randn(8, 4, 2, 2), None, 3, 1, 1, 1, "box")
    times = at.measure(layer, layer.pool, (1, 8, 6, 6), repeat=3)
    assert set(times) == set(MEASURABLE_REALIZATIONS) and all(t > 0 for t in times.values())
    assert layer.pool.realization == "box"  # left as it was


def test_in_network_wrapper_is_an_identity_around_the_layer():
    from structexport.layers.decomposed import decompose
    from structexport.passes.autotune import InNetwork, in_network
    layer = decompose(8, torch.randn(16, 4, 2, 2, dtype=torch.float64), None, 3, 2, 1, 1, "pool2d")
    x = torch.randn(1, 8, 7, 7, dtype=torch.float64)
    wrapped = in_network(layer, x)
    assert isinstance(wrapped, InNetwork) and wrapped.layer is layer
    assert wrapped.after.in_channels == 16 and wrapped.before.in_channels == 8
    with torch.no_grad():
        assert torch.equal(wrapped(x), layer(x))
    assert layer.conv.weight.dtype == torch.float64  # the layer is not converted


def test_autotune_picks_pool2d_when_it_measures_fastest(tmp_path, monkeypatch):
    from structexport.models import build_model
    from structexport.passes import PassContext, PassManager, select_passes
    from structexport.passes import autotune as at
    from structexport.passes.infra import modules_of

    monkeypatch.setattr(at, "measure", lambda layer, pool, shape, threads=1, repeat=30, dense=False:
                        {"cumsum": 3.0, "banded": 2.0, "box": 1.5, "pool2d": 1.0})
    ctx = PassContext("ort-cpu", (1, 3, 32, 32), {"autotune": True, "tuning_cache": str(tmp_path / "t.json")})
    model = build_model("resnet20-struct-c2n2", seed=1).double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    out, runs = PassManager(select_passes(["decompose_structured", "realize_sumpool"])).run(model, ctx)
    records = runs[1].records
    assert records and {r.details["realization"] for r in records} == {"pool2d"}
    assert all(r.details["chosen_by"] == "measurement" for r in records)
    assert {p.realization for _, p in modules_of(out, SumPool)} == {"pool2d"}
    with torch.no_grad():
        got = out(x)
    assert (got - want).abs().max().item() <= 1e-9 * (1 + want.abs().max().item())


def test_realize_pass_cost_model_records_pool2d_cost():
    from structexport.passes import PassContext
    pool = SumPool(16, (9, 2, 2), 1, realization="avgpool3d")
    result = RealizeSumPoolPass()(torch.nn.Sequential(pool), PassContext(input_shape=(1, 16, 8, 8)))
    (record,) = result.records
    assert "pool2d" in record.details["estimated_cost"]
    assert record.details["realization"] != "pool2d"


# ---------------------------------------------------------------- CLI, regress, conversion

def test_cli_and_regress_offer_pool2d_with_the_default_first():
    from structexport.cli_common import sumpool_choice
    from structexport.regress.baseline import sumpool_realizations
    assert CLI_REALIZATIONS[0] == "cumsum" and "pool2d" in CLI_REALIZATIONS
    assert set(CLI_REALIZATIONS) == set(REALIZATIONS)
    assert "pool2d" in sumpool_choice().choices
    assert sumpool_realizations() == CLI_REALIZATIONS


def test_convert_forced_pool2d_verifies(tmp_path):
    """The whole path: a zoo model decomposed, every sum-pool as pool2d, exported, simplified,
    optimized by ONNX Runtime and verified against the source model."""
    from structexport.convert import ConvertOptions, convert
    from structexport.loader import save_checkpoint
    from structexport.models import build_model
    ckpt = save_checkpoint(build_model("resnet20-struct-c2n2", seed=4), tmp_path / "m.safetensors")
    result = convert(str(ckpt), tmp_path / "out", None,
                     ConvertOptions(target="ort-cpu", pass_options={"sumpool_realization": "pool2d"}))
    assert result.verified
    graph = onnx.load(str(result.outdir / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    assert "CumSum" not in ops and ops.count("AveragePool") == 2 * 18
    # the pools and their scale are additions and a Mul: the multiplies are the small convs'
    from structexport.costmodel import node_costs, totals
    t = totals(node_costs(result.outdir / "model.onnx"))
    assert t["macs"] == 9_355_904  # as every other realization (tests/test_costmodel_bench.py)
    assert t["adds"] > 0


def test_onnx_source_conv_decomposed_as_pool2d(tmp_path):
    """decompose_structured_conv (models that arrive as ONNX) with pool2d forced: a strided
    structured conv and a grouped one become 2-D pools and a small conv, outputs unchanged."""
    from structexport.convert import prepare_onnx
    from structexport.layers.structured import compose_kernel
    from structexport.passes import ONNX, PassContext, PassManager
    from structexport.passes.decompose_structured_conv_pass import DecomposeStructuredConvPass

    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, 1, 1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 32, 3, 2, 1, bias=False), torch.nn.ReLU(),
                              torch.nn.Conv2d(32, 32, 3, 1, 1, groups=4)).eval()
    with torch.no_grad():
        net[2].weight.copy_(compose_kernel(torch.randn(32, 8, 2, 2) * 0.2, 16, 3))
        net[4].weight.copy_(compose_kernel(torch.randn(32, 4, 2, 2) * 0.2, 8, 3))
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (torch.randn(1, 3, 12, 12),), dynamo=True, opset_version=18).save(str(path))
    proto = prepare_onnx(onnx.load(path))
    x = torch.randn(1, 3, 12, 12)
    ctx = PassContext("ort-cpu", (1, 3, 12, 12), {"sumpool_realization": "pool2d"})
    after, runs = PassManager([DecomposeStructuredConvPass()], check_inputs=x, model_kind=ONNX).run(
        ir.from_proto(proto), ctx)
    decomposed = [r for r in runs[0].records if r.action == "decomposed"]
    assert len(decomposed) == 2 and {r.details["realization"] for r in decomposed} == {"pool2d"}
    out = ir.to_proto(after)
    onnx.checker.check_model(out, full_check=True)
    ops = [n.op_type for n in out.graph.node]
    assert ops.count("AveragePool") == 4 and "CumSum" not in ops
    for optimize in (False, True):
        got = ort_session(out.SerializeToString(), optimize=optimize).run(None, {out.graph.input[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = net(x).numpy()
        np.testing.assert_allclose(got, want, atol=1e-4 * float(np.abs(want).max()), rtol=1e-4)
