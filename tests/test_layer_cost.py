"""The layer cost model (structexport.layer_cost): the work it counts per form, the decision
that keeps a layer dense when its structure would make it slower (both pipelines, with the
reason recorded), where a machine's model comes from, the fit, and ``costmodel fit|show``."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from structexport import cost_fit
from structexport.cli import main
from structexport.layer_cost import (ENV, FEATURES, CostModel, CostModelError, LayerShape, decide,
                                     fitted_path, layer_features, load_cost_model, read_model,
                                     shipped_models, theoretical_speedup)
from structexport.layers.decomposed import DecomposedStructuredConv, decompose
from structexport.layers.structured import compose_kernel
from structexport.layers.sumpool import MEASURABLE_REALIZATIONS, SumPool
from structexport.passes import ONNX, PassContext, PassManager
from structexport.passes.decompose_structured_conv_pass import DecomposeStructuredConvPass
from structexport.passes.infra import modules_of
from structexport.passes.realize_sumpool_pass import RealizeSumPoolPass

# Two made-up machines: on one every operator costs a fixed 1 ms (a form of several
# operators never beats one dense conv), on the other operators are free and multiplies
# cost (structure always pays).
OVERHEAD_BOUND = CostModel({"conv_mac": 1e-3, "depthwise_mac": 1e-3, "elementwise": 1e-3,
                            "layout": 1e-3, "pool_add": 1e-3, "naive_add": 1e-2, "op": 1e6}, "overhead-bound")
MAC_BOUND = CostModel({"conv_mac": 1.0, "depthwise_mac": 1e-3, "elementwise": 1e-3,
                       "layout": 1e-3, "pool_add": 1e-3, "naive_add": 1e-2, "op": 0.0}, "mac-bound")


# ---------------------------------------------------------------- what each form costs

def test_layer_features_by_hand():
    """16 -> 16 channels, 3x3 kernel at 8 x 2 x 2, padding 1, 8x8 input: window (9, 2, 2),
    the pooled map 9x9, the output 8x8."""
    pool = SumPool(16, (9, 2, 2), 1)
    f = layer_features(LayerShape(pool, 16, 2, 1, 8, 8))
    small = 16 * 8 * 2 * 2 * 64
    box = 8 * 9 * 9 * 4                                   # c * Ho * Wo * kh * kw
    written = 16 * 64 + 8 * 81                             # the small conv's output, the box's
    assert f["dense"] == {"conv_mac": 16 * 16 * 9 * 64, "conv_output": 16 * 64, "op": 1}
    assert f["banded"] == {"conv_mac": 8 * 16 * 64 + small, "depthwise_mac": box,
                           "conv_output": 8 * 64 + written, "op": 3}
    assert f["box"] == {"elementwise": 4 * 16 * 64, "depthwise_mac": box, "conv_mac": small,
                        "conv_output": written, "layout": (16 + 8) * 64, "op": 8}
    # cumsum: channels over the padded 10x10 map, then both spatial axes
    assert f["cumsum"]["elementwise"] == 4 * 16 * 100 + 4 * 8 * 100 + 4 * 8 * 10 * 9
    assert theoretical_speedup(LayerShape(pool, 16, 2, 1, 8, 8)) == pytest.approx(16 * 9 / (8 * 4))


def test_predict_is_the_weighted_sum():
    model = CostModel({"conv_mac": 0.5, "op": 1000.0})
    assert model.predict_ns({"conv_mac": 4, "op": 2}) == 2002.0
    assert model.predict_ms({"conv_mac": 4e6}) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="unknown cost features"):
        model.predict_ns({"flops": 1})


def test_decide_depends_on_the_machine():
    shape = LayerShape(SumPool(64, (33, 2, 2), 1), 64, 2, 1, 14, 14)
    slow = decide(shape, OVERHEAD_BOUND, MEASURABLE_REALIZATIONS)
    fast = decide(shape, MAC_BOUND, MEASURABLE_REALIZATIONS)
    assert slow.dense and slow.choice == "dense" and slow.predicted_speedup < 1
    assert "dense" in slow.reason() and f"{slow.theoretical_speedup:.2f}x" in slow.reason()
    assert not fast.dense and fast.choice == fast.best_realization in MEASURABLE_REALIZATIONS
    assert fast.predicted_speedup > 1
    assert slow.theoretical_speedup == fast.theoretical_speedup == pytest.approx(64 * 9 / (32 * 4))


# ---------------------------------------------------------------- the zoo pipeline (torch)

class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = decompose(8, torch.randn(8, 4, 2, 2, generator=g, dtype=torch.float64), None, 3, 1, 1, 1)
        self.b = decompose(8, torch.randn(8, 4, 2, 2, generator=g, dtype=torch.float64), None, 3, 1, 1, 1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _realize(model, ctx):
    return PassManager([RealizeSumPoolPass()], check_inputs=torch.randn(*ctx.input_shape, dtype=torch.float64)
                       ).run(model, ctx)


def test_realize_keeps_a_layer_dense_when_predicted_slower():
    net = TwoLayers().double().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        want = net(x)
    out, runs = _realize(net, PassContext("ort-cpu", (2, 8, 6, 6), {"cost_model": OVERHEAD_BOUND}))
    records = {r.layer: r for r in runs[0].records}
    assert set(records) == {"a.pool", "b.pool"}
    for name in ("a", "b"):
        rec = records[f"{name}.pool"]
        assert rec.action == "kept dense"
        assert rec.details["reason"].startswith("predicted") and "dense" in rec.details["reason"]
        assert rec.details["predicted_speedup"] < 1 < rec.details["theoretical_speedup"]
        assert rec.details["cost_model"] == "overhead-bound"
        conv = getattr(out, name)
        assert type(conv) is nn.Conv2d and conv.weight.shape == (8, 8, 3, 3)
    assert not modules_of(out, SumPool)
    with torch.no_grad():
        assert torch.allclose(out(x), want, atol=1e-10)


def test_realize_keeps_structure_where_it_pays_or_the_target_is_not_ort():
    net = TwoLayers().double().eval()
    out, runs = _realize(net, PassContext("ort-cpu", (2, 8, 6, 6), {"cost_model": MAC_BOUND}))
    assert [r.action for r in runs[0].records] == ["realized", "realized"]
    assert all(isinstance(m, DecomposedStructuredConv) for m in (out.a, out.b))
    # TVM fuses the pool into its own kernel: the ONNX Runtime model does not decide there
    out, runs = _realize(TwoLayers().double().eval(),
                         PassContext("tvm-llvm", (2, 8, 6, 6), {"cost_model": OVERHEAD_BOUND}))
    assert [r.action for r in runs[0].records] == ["realized", "realized"]
    # a forced realization is what the user asked for: nothing is composed back
    out, runs = _realize(TwoLayers().double().eval(), PassContext(
        "ort-cpu", (2, 8, 6, 6), {"cost_model": OVERHEAD_BOUND, "sumpool_realization": "box"}))
    assert [r.details["realization"] for r in runs[0].records] == ["box", "box"]


@pytest.mark.parametrize("dense_ms,action", [(0.1, "kept dense"), (0.205, "kept dense"), (0.5, "realized")])
def test_autotune_keeps_dense_when_measured_faster(tmp_path, dense_ms, action):
    """A cached measurement (both layers have one shape, so one entry): where the dense conv
    won, the layers are composed back and the reason quotes the measured times."""
    from structexport.passes import autotune as at
    net = TwoLayers().double().eval()
    cache = at.AutotuneCache(tmp_path / "tune.json")
    cache.put(at.machine_key("ort-cpu", 1), at.layer_key(net.a, net.a.pool, (6, 6)),
              {"ms": {"cumsum": 0.3, "banded": 0.2, "box": 0.25, "pool2d": 0.9, "dense": dense_ms}})
    cache.save()
    out, runs = _realize(net, PassContext("ort-cpu", (2, 8, 6, 6), {
        "autotune": True, "tuning_cache": str(tmp_path / "tune.json"), "cost_model": MAC_BOUND}))
    assert [r.action for r in runs[0].records] == [action, action]
    if action == "kept dense":
        # 0.205 ms dense: structure gains 1.025x, under the margin a layer must gain
        assert runs[0].records[0].details["reason"] == (
            f"measured 0.2000 ms structured against {dense_ms:.4f} ms dense"
            + (", under the 1.05x a layer must gain to be decomposed" if dense_ms > 0.2 else ""))
        assert type(out.a) is nn.Conv2d and type(out.b) is nn.Conv2d
    else:
        assert [r.details["realization"] for r in runs[0].records] == ["banded", "banded"]
        assert isinstance(out.a, DecomposedStructuredConv)


# ---------------------------------------------------------------- models from elsewhere (ONNX)

def _onnx_with_structured_conv(tmp_path):
    net = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, bias=False)).eval()
    with torch.no_grad():
        net[0].weight.copy_(compose_kernel(torch.randn(16, 8, 2, 2), 16, 3))
    x = torch.randn(1, 16, 8, 8)
    path = tmp_path / "net.onnx"
    torch.onnx.export(net, (x,), dynamo=True, opset_version=18).save(str(path))
    from structexport.convert import prepare_onnx
    return ir.from_proto(prepare_onnx(onnx.load(path))), x


@pytest.mark.parametrize("model,action", [(OVERHEAD_BOUND, "kept"), (MAC_BOUND, "decomposed")])
def test_decompose_structured_conv_asks_the_cost_model(tmp_path, model, action):
    graph, x = _onnx_with_structured_conv(tmp_path)
    after, runs = PassManager([DecomposeStructuredConvPass()], check_inputs=x, model_kind=ONNX).run(
        graph, PassContext("ort-cpu", (1, 16, 8, 8), {"cost_model": model}))
    (rec,) = [r for r in runs[0].records if r.details.get("c")]
    assert rec.action == action, rec
    assert rec.details["theoretical_speedup"] == pytest.approx(16 * 9 / (8 * 4), rel=1e-3)
    convs = [n for n in after.graph if n.op_type == "Conv"]
    if action == "kept":
        assert "predicted" in rec.details["reason"] and len(convs) == 1
    else:
        assert rec.details["predicted_speedup"] > 1 and len(convs) >= 2


# ---------------------------------------------------------------- where the model comes from

def test_shipped_models_are_valid_and_named_after_their_cpu():
    shipped = shipped_models()
    assert shipped, "no cost model ships"
    for name, path in shipped.items():
        model = read_model(path)
        assert set(model.coefficients) == set(FEATURES), name
        assert model.source and model.cpu != "unknown"


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("STRUCTEXPORT_CACHE", str(tmp_path))
    # an AVX2 CPU nobody fitted: the shipped AVX2 model, with a note naming the fix
    cpu = {"model": "Made-up CPU 9000", "simd": ["avx2", "fma"], "machine": "x86_64"}
    model = load_cost_model(cpu)
    assert "avx2" in model.isa and "costmodel fit" in model.note and "Made-up CPU 9000" in model.note
    # a fit made on this CPU wins, without a note
    mine = CostModel({k: 1.0 for k in FEATURES}, "Made-up CPU 9000", ["avx2"], source="test")
    mine.save(fitted_path("Made-up CPU 9000"))
    model = load_cost_model(cpu)
    assert model.source == "test" and model.note is None
    # the variable overrides both, by shipped name or path
    name = next(iter(shipped_models()))
    monkeypatch.setenv(ENV, name)
    assert load_cost_model(cpu).path == str(shipped_models()[name])
    monkeypatch.setenv(ENV, str(tmp_path / "nope.json"))
    with pytest.raises(CostModelError, match="neither a file nor a shipped cost model") as exc:
        load_cost_model(cpu)
    assert exc.value.exit_code == 2


def test_a_broken_model_file_is_refused(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"coefficients": {"conv_mac": -1.0}}))
    with pytest.raises(CostModelError, match=r"bad coefficient\(s\) \['conv_mac'\]"):
        read_model(bad)
    bad.write_text("{")
    with pytest.raises(CostModelError, match="cannot read the cost model"):
        read_model(bad)


# ---------------------------------------------------------------- the fit

def test_fit_recovers_known_coefficients():
    """Rows made from known coefficients are fitted back exactly (nothing else is in them)."""
    truth = {"conv_mac": 0.02, "depthwise_mac": 0.5, "elementwise": 0.3, "layout": 0.4,
             "pool_add": 0.9, "naive_add": 0.0, "op": 900.0}
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        f = {k: float(rng.integers(1, 10 ** 6)) for k in FEATURES if k != "naive_add"}
        f["op"] = float(rng.integers(1, 20))
        rows.append({"layer": f"l{i // 5}", "form": f"f{i % 5}",
                     "ms": CostModel(truth).predict_ms(f), "features": f})
    got = cost_fit.fit_coefficients(rows)
    for k, v in truth.items():
        assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
    fit = cost_fit.evaluate_fit(CostModel(got), rows)
    assert fit["median_relative_error"] < 1e-6 and fit["choices_within_tolerance"] == fit["layers"] == 8


def test_costmodel_fit_quick_writes_a_model_of_this_cpu(tmp_path, monkeypatch):
    from structexport.machine import cpu_info
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("STRUCTEXPORT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "quick.json"
    result = CliRunner().invoke(main, ["costmodel", "fit", "--quick", "--repeat", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    model = read_model(out)
    assert model.cpu == cpu_info()["model"] and model.isa == cpu_info()["simd"]
    assert model.fit["rows"] == 3 * 6 and model.fit["layers"] == 3
    assert all(v >= 0 for v in model.coefficients.values())
    assert "costmodel fit" in model.source
    assert not fitted_path().exists()           # --out: this CPU's place in the cache untouched
    # --quick alone would replace this CPU's model with three shapes' worth: refused
    result = CliRunner().invoke(main, ["costmodel", "fit", "--quick"])
    assert result.exit_code == 2 and "--out PATH" in result.output


def test_costmodel_show_names_the_source(monkeypatch):
    name = next(iter(shipped_models()))
    monkeypatch.setenv(ENV, name)
    result = CliRunner().invoke(main, ["costmodel", "show", "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown["path"] == str(shipped_models()[name])
    assert set(shown["coefficients"]) == set(FEATURES)


# ---------------------------------------------------------------- bench says when it is slower

def test_bench_warns_when_the_converted_model_is_slower_than_dense(monkeypatch, tmp_path):
    """bench records ``slower_than_dense`` and, when it is true, warns naming the fixes: the
    measured speedup is made 0.8x here (a real run, its figure replaced), so the warning's
    text is what is checked, not this machine's speed."""
    import structexport.bench as bench
    real = bench.run_bench
    seen = {}

    def slower(*args, **kwargs):
        result = real(*args, **kwargs)
        seen["real"] = result["slower_than_dense"] == (result["speedup_measured"] < 1)
        result["speedup_measured"], result["slower_than_dense"] = 0.8, True
        return result
    monkeypatch.setattr(bench, "run_bench", slower)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(main, ["bench", "--arch", "resnet20-struct-c2n2", "--target", "ort-cpu",
                                       "--repeat", "3", "--warmup", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    assert seen["real"] is True
    assert "ran slower than its dense counterpart here (0.80x)" in result.output
    assert "--autotune" in result.output and "structexport costmodel fit" in result.output
    assert json.loads(out.read_text())["slower_than_dense"] is True


# ---------------------------------------------------------------- inspect shows the decisions

def test_inspect_shows_each_structured_layer_decision(repo_root, monkeypatch):
    """inspect of a zoo checkpoint: every structured layer's theoretical and predicted
    speedup on ort-cpu, and the layers convert would keep dense (with the shipped Intel Xeon
    model: MobileNetV2's structured depthwise convs, measured slower than dense there)."""
    from structexport.inspection import ort_decisions
    from structexport.layer_cost import MIN_SPEEDUP
    from structexport.models import build_model
    monkeypatch.setenv(ENV, "intel-xeon-avx512-amx")
    decisions = ort_decisions(build_model("mobilenetv2-struct-c2n2").eval(), (1, 3, 32, 32))
    assert len(decisions) == 17
    for d in decisions.values():
        assert (d["action"] == "dense") == (d["predicted_speedup"] < MIN_SPEEDUP)
        assert d["theoretical_speedup"] == pytest.approx(9 / 4)      # depthwise 3x3 at 1x2x2
    assert sum(d["action"] == "dense" for d in decisions.values()) > 0
    ckpt = repo_root / "models" / "checkpoints" / "trained" / "resnet20-struct-c2n2-sr-seed0.safetensors"
    result = CliRunner().invoke(main, ["inspect", str(ckpt), "--json"])
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    decided = [r for r in layers if r.get("ort_cpu")]
    assert len(decided) == 18 and all(r["kind"] == "structured" for r in decided)
    assert all(r["ort_cpu"]["theoretical_speedup"] == pytest.approx(4.5) for r in decided)


def test_convert_says_when_the_cost_model_is_another_cpus(monkeypatch, tmp_path, repo_root):
    """On a CPU nobody fitted, convert uses the shipped model of its vector width and says so,
    naming the command that fits this CPU; the records name the model used."""
    import structexport.machine as machine
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("STRUCTEXPORT_CACHE", str(tmp_path / "cache"))
    real = machine.cpu_info()
    monkeypatch.setattr(machine, "cpu_info", lambda: dict(real, model="Made-up CPU 9000",
                                                          simd=["sse4_2", "avx", "avx2", "fma"]))
    ckpt = repo_root / "models" / "checkpoints" / "trained" / "resnet20-struct-c2n2-sr-seed0.safetensors"
    result = CliRunner().invoke(main, ["convert", str(ckpt), "--target", "ort-cpu",
                                       "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.output
    assert "no cost model was fitted on this CPU (Made-up CPU 9000)" in result.stderr
    assert "structexport costmodel fit" in result.stderr
    m = json.loads(result.stdout)
    used = {rec["details"].get("cost_model") for r in m["passes"] for rec in r["records"]
            if r["name"] == "realize_sumpool"}
    assert used == {"AMD EPYC (AVX2)"}
