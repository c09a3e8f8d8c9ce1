"""The cost model (per ONNX node, per torch layer) and `bench`."""
from __future__ import annotations

import contextlib
import io
import json

import onnx
import pytest
import torch
from click.testing import CliRunner

from structexport.analysis import summarize
from structexport.bench import BenchOptions, run_bench
from structexport.reference import dense_counterpart
from structexport.cli import main
from structexport.convert import ConvertOptions, convert
from structexport.costmodel import node_costs, totals
from structexport.loader import save_checkpoint
from structexport.models import ARCHITECTURES, build_model, input_shape

DENSE_ZOO = sorted(ARCHITECTURES)


@pytest.mark.parametrize("name", DENSE_ZOO)
def test_macs_agree_with_ptflops_on_every_dense_zoo_model(name):
    """Same rules as ptflops' aten backend (convs and matrix products): within 1%."""
    from ptflops import get_model_complexity_info
    model, shape = build_model(name), input_shape(name)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ref, params = get_model_complexity_info(model, shape[1:], as_strings=False,
                                                print_per_layer_stat=False, backend="aten")
    ours = summarize(model, shape)
    assert abs(ours["macs"] - ref) <= 0.01 * ref, (ours["macs"], ref)
    assert ours["params"] == params


@pytest.fixture(scope="module")
def converted_struct(tmp_path_factory):
    root = tmp_path_factory.mktemp("cm")
    model = build_model("resnet20-struct-c2n2", seed=2)
    ckpt = save_checkpoint(model, root / "m.safetensors")
    return model, convert(str(ckpt), root / "out", None, ConvertOptions(target="onnx"))


def test_onnx_node_macs_equal_the_torch_layer_macs(converted_struct):
    model, result = converted_struct
    costs = node_costs(result.outdir / "model.onnx")
    assert totals(costs)["macs"] == summarize(model, (1, 3, 32, 32))["macs"] == 9_355_904
    # the sum-pools' bands and box filters count as additions, not multiplies
    assert totals(costs)["adds"] > 0
    assert all(c.macs == 0 for c in costs if c.adds and c.op == "Conv")


def test_dense_counterpart_reproduces_the_structured_model():
    for name in ("resnet20-struct-c2n2", "resnet20-csg-16x16x3x3-128", "resnet32x2-ssc-10"):
        model = build_model(name, seed=3).double()
        dense = dense_counterpart(model)
        assert not any(type(m).__module__.startswith("structexport.layers") for m in dense.modules())
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(dense(x), model(x), atol=1e-10, rtol=1e-10)


def test_bench_arch_reports_speedups_and_the_machine(tmp_path):
    result = run_bench(None, "resnet20-struct-c2n2", BenchOptions(repeat=5, warmup=1))
    for key in ("latency_ms", "dense_latency_ms"):
        assert result[key]["runs"] == 5 and 0 < result[key]["p10"] <= result[key]["median"] <= result[key]["p90"]
    assert result["speedup_theoretical"] == pytest.approx(40_551_040 / 9_355_904)
    assert result["speedup_measured"] == pytest.approx(
        result["dense_latency_ms"]["median"] / result["latency_ms"]["median"])
    assert result["realization_efficiency"] == pytest.approx(
        result["speedup_measured"] / result["speedup_theoretical"])
    assert result["machine"]["cpu"]["model"] and result["threads"] == 1


def test_bench_outdir_and_cli_json(converted_struct, tmp_path):
    _, conv = converted_struct
    out = tmp_path / "b.json"
    r = CliRunner().invoke(main, ["bench", str(conv.outdir), "--repeat", "3", "--warmup", "0",
                                  "--json", str(out)])
    assert r.exit_code == 0, r.output
    data = json.loads(out.read_text())
    for key in ("latency_ms", "dense_latency_ms", "speedup_measured", "speedup_theoretical",
                "realization_efficiency"):
        assert key in data
    assert data["latency_ms"]["median"] > 0 and data["arch"] == "resnet20-struct-c2n2"
    assert "realization efficiency" in r.output


def test_bench_csg_has_theoretical_speedup_one():
    result = run_bench(None, "resnet20-csg-16x16x3x3-128", BenchOptions(repeat=3, warmup=0))
    assert result["speedup_theoretical"] == pytest.approx(1.0)


def test_bench_without_anything_is_a_clear_error():
    r = CliRunner().invoke(main, ["bench"])
    assert r.exit_code == 40 and "pass OUTDIR, a checkpoint, or --arch NAME" in r.stderr


def test_onnx_nodes_map_back_to_source_layers(converted_struct):
    """Weights carry their torch names through export: every conv of the converted graph
    maps to its source layer, and a sum-pool's running sums to the layer they feed."""
    from structexport.analysis import layer_table
    from structexport.profile import onnx_node_layers
    model, result = converted_struct
    layers = {r.name for r in layer_table(model, (1, 3, 32, 32))}
    path = result.outdir / "model.onnx"
    owners = onnx_node_layers(path, layers)
    graph = onnx.load(str(path)).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert {owners[n.name] for n in convs} == {r for r in layers if r != "classifier"}
    for n in graph.node:
        if n.op_type == "CumSum":
            assert owners[n.name].startswith("stage_")


def test_bench_per_layer_breakdown(tmp_path):
    result = run_bench(None, "resnet20-struct-c2n2", BenchOptions(repeat=3, warmup=1, per_layer=True))
    rows = {r["layer"]: r for r in result["per_layer"]}
    assert "stage_2.1.conv_a" in rows and "conv_1_3x3" in rows
    row = rows["stage_2.1.conv_a"]
    assert row["speedup_theoretical"] == pytest.approx(4.5)
    assert row["structured_ms"] > 0 and row["dense_ms"] > 0
    assert rows["conv_1_3x3"]["speedup_theoretical"] == pytest.approx(1.0)
    assert set(result["per_op_ms"]) == {"structured", "dense"}
