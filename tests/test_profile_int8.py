"""`profile` on an INT8 package: the dense side is the dense INT8 baseline
(``reference.int8.onnx``, checked before timing), every layer of the INT8 model gets its
kernels (ONNX Runtime's fused QLinearConv nodes mapped back to their layers), nothing is left
unmapped, the per-layer SQNR column is the manifest's, and TVM targets are refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from structexport.cli import main
from structexport.costmodel import node_costs, totals
from structexport.models.trained import trained_weights
from structexport.profiling.assemble import OUTSIDE, UNMAPPED, validate
from structexport.profiling.render import render_markdown, table_rows


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], terminal_width=250)


def structured_checkpoint() -> Path:
    return next(w for w in trained_weights() if w.name == "resnet20-struct-c2n2").path


@pytest.fixture(scope="module")
def int8_package(tmp_path_factory, cifar10_dir) -> Path:
    out = tmp_path_factory.mktemp("profile-int8") / "pkg"
    res = cli("convert", structured_checkpoint(), "--target", "ort-cpu", "--precision", "int8",
              "--calibration", cifar10_dir / "train-25k.npz", "--preprocess", "cifar10",
              "--calibration-count", "32", "--int8-gate-images", "50",
              "--int8-layers", "structured", "-o", out)   # every layer structured: the same on every CPU
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def profiled(int8_package):
    """The package profiled through the CLI; the dense INT8 baseline's check recorded."""
    import structexport.timedcheck as timedcheck
    real = timedcheck.checked_int8_baseline
    checked = []

    def recording(package, threads, say):
        checked.append(Path(package.root))
        return real(package, threads, say)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(timedcheck, "checked_int8_baseline", recording)
        html = int8_package.parent / "rep" / "report.html"
        res = cli("profile", int8_package, "--repeat", "6", "--warmup", "1", "--no-peak", "-o", html)
    assert res.exit_code == 0, res.output
    report = json.loads(html.with_suffix(".json").read_text())
    return report, res.output, html, checked


def manifest(package: Path) -> dict:
    return json.loads((package / "manifest.json").read_text())


def test_dense_side_is_the_dense_int8_baseline(int8_package, profiled):
    report, output, _, checked = profiled
    assert validate(report) == []
    assert report["precision"] == "int8"
    assert report["dense"]["onnx"] == "reference.int8.onnx"
    assert "quantized the same way" in report["dense"]["description"]
    assert any(n.startswith("dense: the dense model quantized the same way") for n in report["notes"])
    assert "dense INT8: reference.int8.onnx" in output
    # checked before timing, as bench checks it
    assert checked == [int8_package]
    # what was timed on the dense side runs integer kernels: the INT8 graph, not reference.onnx
    dense_ops = {op for r in report["layers"] if r["kind"] == "layer" for op in r["dense_ops"]}
    assert "QLinearConv" in dense_ops and not dense_ops & {"Conv", "FusedConv"}, dense_ops
    structured_ops = {op for r in report["layers"] if r["kind"] == "layer" for op in r["structured_ops"]}
    assert "QLinearConv" in structured_ops and not structured_ops & {"Conv", "FusedConv"}


def test_every_layer_has_its_time_and_nothing_is_unmapped(int8_package, profiled):
    report, *_ = profiled
    layers = [layer["name"] for layer in manifest(int8_package)["source_layers"]]
    rows = {r["layer"]: r for r in report["layers"]}
    assert [r["layer"] for r in report["layers"] if r["kind"] == "layer"] == layers
    for name in layers:
        assert rows[name]["structured_ms"] > 0, name
        assert rows[name]["dense_ms"] > 0, name
    # each 3x3 structured layer runs three integer convs (band, box, small conv)
    for name in layers:
        if name.startswith("stage_"):
            assert set(rows[name]["structured_ops"]) >= {"QLinearConv"}, name
    assert UNMAPPED not in rows
    for which in ("structured", "dense"):
        t = report["totals"][which]
        assert t["unmapped_ms"] <= 0.01 * t["kernels_ms"], (which, t)
        assert report["mapping"]["unmapped_ms_by_op"][which] == {}
        assert sum(r[f"{which}_ms"] for r in report["layers"]) == pytest.approx(t["profiled_ms"], rel=1e-9)
        assert sum(r[f"{which}_share"] for r in report["layers"]) == pytest.approx(1.0, abs=1e-9)
        assert sum(r[f"{which}_macs"] for r in report["layers"]) == t["macs"]
    # MACs of the float32 graphs that were quantized (as bench counts them)
    assert report["totals"]["structured"]["macs"] == totals(node_costs(int8_package / "model.fp32.onnx"))["macs"]
    assert report["totals"]["dense"]["macs"] == totals(node_costs(int8_package / "reference.onnx"))["macs"]
    assert report["layers"][-1]["layer"] == OUTSIDE


def test_fused_qlinearconv_nodes_map_to_the_layer_whose_weights_they_read(int8_package, tmp_path):
    """ONNX Runtime's optimized INT8 graph: QLinearConv nodes renamed ``<node>_token_<n>``,
    weights ``<weight>_quantized``. Each one that reads a weight of its own belongs to that
    weight's layer; the shared box-of-ones convs to the layer they feed."""
    from structexport.ortsession import ort_session
    from structexport.profiling.layermap import onnx_calls, ort_owner
    layers = {layer["name"] for layer in manifest(int8_package)["source_layers"]}
    for name in ("model.onnx", "reference.int8.onnx"):
        opt = tmp_path / f"{name}.optimized.onnx"
        ort_session(int8_package / name, 1, optimized_model_path=opt)
        owner = ort_owner(int8_package / name, opt, layers)
        calls = onnx_calls(opt)
        convs = [c for c in calls if c["op"] == "QLinearConv"]
        assert len(convs) >= 19
        readers: dict[str, int] = {}
        for c in convs:
            readers[c["weights"][0]] = readers.get(c["weights"][0], 0) + 1
        for c in convs:
            weight = c["weights"][0]
            assert weight.endswith("_quantized")
            got = owner(c)
            if readers[weight] == 1:
                expected = max((l for l in layers if weight.startswith(l + ".")), key=len)
                assert got == expected, (name, c["name"], weight, got)
            else:
                assert got is not None, (name, c["name"])
        assert all(owner(c) for c in calls), [c["name"] for c in calls if not owner(c)]
    # the structured model's 3x3 layers each own three integer convs
    opt = tmp_path / "model.onnx.optimized.onnx"
    owner = ort_owner(int8_package / "model.onnx", opt, layers)
    per_layer: dict[str, int] = {}
    for c in onnx_calls(opt):
        if c["op"] == "QLinearConv":
            per_layer[owner(c)] = per_layer.get(owner(c), 0) + 1
    assert all(per_layer[n] == 3 for n in layers if n.startswith("stage_")), per_layer
    assert per_layer["conv_1_3x3"] == 1


def test_sqnr_column_is_the_manifest_minimum_per_layer(int8_package, profiled):
    report, output, html, _ = profiled
    rows_m = manifest(int8_package)["int8"]["layers"]
    expected = {}
    for r in report["layers"]:
        if r["kind"] != "layer":
            assert r["sqnr_db"] is None
            continue
        values = [m["sqnr_db"] for m in rows_m if m["sqnr_db"] is not None
                  and (m["layer"] == r["layer"] or m["layer"].startswith(r["layer"] + "."))]
        assert values, r["layer"]
        assert r["sqnr_db"] == min(values), r["layer"]
        expected[r["layer"]] = min(values)
    # a structured layer's minimum is over its band, box and small conv
    band = next(m for m in rows_m if m["layer"] == "stage_1.0.conv_a.pool.band")
    assert expected["stage_1.0.conv_a"] <= band["sqnr_db"]
    lowest = sorted(expected.items(), key=lambda kv: kv[1])[:3]
    assert [(x["layer"], x["sqnr_db"]) for x in report["int8"]["lowest_sqnr"]] == lowest
    # the tables: Markdown, HTML and the terminal carry the column; the sentence names the three
    head, body = table_rows(report)
    assert head[-1] == "SQNR dB (min)"
    md = html.with_suffix(".md").read_text()
    assert "| SQNR dB (min) |" in md
    by_layer = {cells[0]: cells[-1] for cells in body}
    assert by_layer["stage_1.0.conv_a"] == f"{expected['stage_1.0.conv_a']:.2f}"
    assert "<th>SQNR dB (min)</th>" in html.read_text()
    assert "SQNR dB (min)" in output
    sentence = next(line for line in output.splitlines() if line.startswith("lowest SQNR"))
    for name, value in lowest:
        assert f"{name} {value:.2f} dB" in sentence
    # a float32 report has no SQNR column
    fp32 = dict(report, precision="fp32")
    assert "SQNR dB (min)" not in table_rows(fp32)[0] and "lowest SQNR" not in render_markdown(fp32)


def test_tvm_target_is_refused(int8_package, tmp_path):
    res = cli("profile", int8_package, "--target", "tvm-llvm", "-o", tmp_path / "r.html")
    assert res.exit_code == 40, res.output
    assert "INT8 package" in res.output and "--target ort-cpu" in res.output
    assert "convert again" not in res.output and not (tmp_path / "r.html").exists()
