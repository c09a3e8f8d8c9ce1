"""`profile` on the program targets: an ExecuTorch program (ETDump) and a LiteRT model, each
beside its dense counterpart program, per-operator times mapped back to source layers by
order against the package's ONNX graph, the rows adding up to the profiled run's total."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from structexport.cli import main
from structexport.profiling.assemble import OUTSIDE, UNMAPPED, validate
from structexport.profiling.options import ProfileError

TRAINED = "models/checkpoints/trained/resnet20-struct-c2n2-sr-seed0.safetensors"
# The trained ResNet-20 C/2x2x2's multiply-adds (test_executorch.py): structured, dense
MACS = {"structured": 9_355_904, "dense": 40_551_040}


def _convert(tmp_path_factory, repo_root, target: str) -> Path:
    from structexport.convert import ConvertOptions, convert
    out = tmp_path_factory.mktemp(f"profile-{target}") / "pkg"
    convert(str(repo_root / TRAINED), out, options=ConvertOptions(target=target))
    return out


def _profile(out: Path, html: Path, *extra) -> tuple[dict, str]:
    res = CliRunner().invoke(main, ["profile", str(out), "--repeat", "6", "--warmup", "1", "--no-peak",
                                    "-o", str(html), *extra])
    assert res.exit_code == 0, res.output
    return json.loads(html.with_suffix(".json").read_text()), res.output


def _layers(out: Path) -> list[dict]:
    from structexport.package import Package
    return Package.load(out, check_hashes=False).layers


def _check_report(report: dict, out: Path, programs: dict) -> None:
    """What every program target's report must hold: the schema, the package's layers as its
    rows (none unmapped), rows adding up to the profiled total, and the dense side."""
    assert validate(report) == []
    assert report["programs"] == programs and report["dense"]["program"] == programs["dense"]
    layers = [layer["name"] for layer in _layers(out)]
    rows = {r["layer"]: r for r in report["layers"]}
    assert [r["layer"] for r in report["layers"] if r["kind"] == "layer"] == layers
    assert UNMAPPED not in rows and OUTSIDE in rows
    assert report["mapping"]["unmapped_ms_by_op"] == {"structured": {}, "dense": {}}
    for which in ("structured", "dense"):
        t = report["totals"][which]
        assert t["unmapped_ms"] == 0 and t["calls"] > len(layers)
        assert sum(r[f"{which}_ms"] for r in report["layers"]) == pytest.approx(t["profiled_ms"], rel=1e-9)
        assert sum(r[f"{which}_share"] for r in report["layers"]) == pytest.approx(1.0, rel=1e-9)
        assert t["kernels_ms"] + t["outside_ms"] == pytest.approx(t["profiled_ms"], rel=1e-9)
        assert t["macs"] == MACS[which]
        # every structured layer's time is its own: the convs of its structure ran under it
        for layer in _layers(out):
            assert rows[layer["name"]][f"{which}_macs"] > 0
    assert report["speedup_theoretical"] == pytest.approx(MACS["dense"] / MACS["structured"])


# ---------------------------------------------------------------------- ExecuTorch

@pytest.fixture(scope="module")
def et_package(tmp_path_factory, repo_root) -> Path:
    pytest.importorskip("executorch", reason="the executorch extra is part of make setup")
    return _convert(tmp_path_factory, repo_root, "executorch")


@pytest.fixture(scope="module")
def et_report(et_package, tmp_path_factory):
    return _profile(et_package, tmp_path_factory.mktemp("et-report") / "report.html")


def test_executorch_report_rows_are_the_layers_and_add_up(et_package, et_report):
    report, output = et_report
    assert report["target"] == "executorch" and report["runtime"].startswith("ExecuTorch 1.5")
    assert "ETDump" in report["profiler"] and "by order" in report["mapping"]["rule"]
    _check_report(report, et_package, {"structured": "model.pte", "dense": "reference.pte"})
    rows = {r["layer"]: r for r in report["layers"]}
    structured = [layer["name"] for layer in _layers(et_package) if layer["kind"] == "structured"]
    assert len(structured) == 18
    for name in structured:   # band (1x1 conv: XNNPACK's FC), box (depthwise), small conv
        ops = rows[name]["structured_ops"]
        assert {"Fully Connected (NC, F32) GEMM", "Convolution (NHWC, F32) DWConv"} <= set(ops), (name, ops)
        assert any(op.startswith("Convolution (NHWC, F32)") and "DWConv" not in op for op in ops), (name, ops)
        assert not any("DWConv" in op or "Fully Connected" in op for op in rows[name]["dense_ops"])
    # The shortcuts' portable kernels (zero channels, strided slices) go to their block's last layer
    for block in ("stage_2.0", "stage_3.0"):
        assert {"full.out", "slice_copy.Tensor_out"} <= set(rows[f"{block}.conv_b"]["structured_ops"])
    for which in ("structured", "dense"):   # timed with the profiler off too (no timing asserted)
        assert report["totals"][which]["latency_ms"]["runs"] == 6
    assert "(outside kernels)" in output


def test_executorch_every_multiply_add_operator_maps_to_its_layer(et_package, tmp_path):
    """Each delegated conv / fully connected of both programs, event by event: the structured
    layers run three (band, box, small conv), the others one."""
    from structexport.package import Package
    from structexport.profiling.executorch import etdump_profile, event_layers, is_mac_event
    package = Package.load(et_package)
    prof = etdump_profile({"structured": package.program, "dense": package.dense_program}, package.feed(),
                          1, 2, 0, tmp_path)
    build = package.target_build
    order = [layer["name"] for layer in package.layers]
    kinds = {layer["name"]: layer["kind"] for layer in package.layers}
    for which, onnx, delegation in (("structured", package.model_onnx, build["delegation"]),
                                    ("dense", package.reference_onnx, build["dense_delegation"])):
        calls = prof[which]["calls"]
        owners = event_layers(calls, onnx, order, delegation, Path(which))
        assert None not in owners
        per_layer: dict[str, int] = {}
        for call, layer in zip(calls, owners):
            if is_mac_event(call["op"]):
                per_layer[layer] = per_layer.get(layer, 0) + 1
        want = {name: 3 if which == "structured" and kinds[name] == "structured" else 1 for name in order}
        assert per_layer == want


def test_operators_that_do_not_match_the_graph_are_a_clear_error(et_package):
    from structexport.package import Package
    from structexport.profiling.executorch import event_layers
    package = Package.load(et_package)
    order = [layer["name"] for layer in package.layers]
    calls = [{"name": "0:Convolution (NHWC, F32) IGEMM #1", "op": "Convolution (NHWC, F32) IGEMM",
              "delegate": 0}]
    with pytest.raises(ProfileError, match=r"runs 1 multiply-add operators and model.onnx has 56"):
        event_layers(calls, package.model_onnx, order, None, Path("model.pte"))
    # the stem is a 3x3 conv: a depthwise operator in its place is refused
    calls = [{"name": f"{k}:x", "op": "Convolution (NHWC, F32) DWConv", "delegate": 0} for k in range(56)]
    with pytest.raises(ProfileError, match="does not match model.onnx's node"):
        event_layers(calls, package.model_onnx, order, None, Path("model.pte"))


def test_module_layer_places_shortcuts_on_their_block():
    from structexport.profiling.executorch import module_layer
    order = ["conv_1_3x3", "stage_2.0.conv_a", "stage_2.0.conv_b", "stage_2.1.conv_a", "classifier"]
    assert module_layer("stage_2.0.downsample", order) == "stage_2.0.conv_b"
    assert module_layer("stage_2.0.conv_a.pool.band", order) == "stage_2.0.conv_a"
    assert module_layer("classifier", order) == "classifier"
    assert module_layer("other", order) is None


def test_an_int8_program_package_is_profiled_on_its_own_target_only(et_package, tmp_path):
    fake = tmp_path / "int8"
    shutil.copytree(et_package, fake)
    manifest = json.loads((fake / "manifest.json").read_text())
    manifest["precision"] = "int8"
    (fake / "manifest.json").write_text(json.dumps(manifest))
    res = CliRunner().invoke(main, ["profile", str(fake), "--target", "ort-cpu", "--no-peak",
                                    "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 40, res.output
    assert "INT8 executorch package" in res.output and "cannot run it on ort-cpu" in res.output
    assert "leave --target and --rpc out" in res.output
    assert not (tmp_path / "r.html").exists()


def _int8_package(tmp_path_factory, repo_root, cifar10_dir, target: str) -> Path:
    """The trained ResNet-20 C/2x2x2 in INT8 for ``target``, the per-layer choice read from a
    cache written here (stage 1 slower structured: its six layers kept dense)."""
    import torch

    from structexport.executorch_int8 import layer_key
    from structexport.layers.decomposed import DecomposedStructuredConv
    from structexport.loader import load_checkpoint
    from structexport.passes import PIPELINE, PassContext, PassManager, select_passes
    from structexport.passes.autotune import machine_key
    from structexport.targets import get_target
    tmp = tmp_path_factory.mktemp(f"profile-{target}-int8")
    source = load_checkpoint(str(repo_root / TRAINED)).model.eval()
    x = torch.randn(1, 3, 32, 32)
    rewritten, _ = PassManager(select_passes(PIPELINE), check_inputs=x).run(
        source, PassContext(target, (1, 3, 32, 32), {"sumpool_realization": "banded"}))
    shapes = {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: shapes.__setitem__(n, (m, tuple(a[0].shape))))
             for n, m in rewritten.named_modules() if isinstance(m, DecomposedStructuredConv)]
    with torch.no_grad():
        rewritten(x)
    for h in hooks:
        h.remove()
    entries = {layer_key(m, shape): {"structured": 0.09 if n.startswith("stage_1.") else 0.03, "dense": 0.06}
               for n, (m, shape) in shapes.items()}
    cache = tmp / "cache"
    cache.mkdir()
    program_target = get_target(target, {})
    key = machine_key(program_target.int8_machine_label(), 1)
    (cache / program_target.int8_layer_cache().name).write_text(json.dumps({key: entries}))
    out = tmp / "pkg"
    r = CliRunner().invoke(main, [str(a) for a in (
        "convert", repo_root / TRAINED, "--target", target, "--precision", "int8", "--calibration",
        cifar10_dir / "train-25k.npz", "--preprocess", "cifar10", "--calibration-count", "32",
        "--int8-gate-images", "100", "-o", out)], env={"STRUCTEXPORT_CACHE": str(cache)})
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.slow   # the INT8 conversions lower each quantized graph slowly (minutes)
@pytest.mark.parametrize("target,programs", [
    ("executorch", {"structured": "model.pte", "dense": "reference.int8.pte"}),
    ("litert", {"structured": "model.tflite", "dense": "reference.int8.tflite"})])
def test_int8_report_against_the_dense_int8_program(target, programs, tmp_path_factory, repo_root,
                                                    cifar10_dir, tmp_path):
    pytest.importorskip("executorch" if target == "executorch" else "ai_edge_litert")
    package = _int8_package(tmp_path_factory, repo_root, cifar10_dir, target)
    report, _output = _profile(package, tmp_path / "report.html")
    assert report["precision"] == "int8" and validate(report) == []
    assert report["programs"] == programs
    assert report["dense"]["program"] == programs["dense"] and report["int8"]["dense"] == programs["dense"]
    manifest = json.loads((package / "manifest.json").read_text())
    composed = set(manifest["int8"]["composed_dense"])
    assert composed == {f"stage_1.{b}.conv_{c}" for b in range(3) for c in "ab"}
    rows = {r["layer"]: r for r in report["layers"]}
    assert [r["layer"] for r in report["layers"] if r["kind"] == "layer"] == [x["name"] for x in _layers(package)]
    assert UNMAPPED not in rows
    for which in ("structured", "dense"):
        t = report["totals"][which]
        assert t["unmapped_ms"] == 0
        assert sum(r[f"{which}_ms"] for r in report["layers"]) == pytest.approx(t["profiled_ms"], rel=1e-9)
        assert all("QS8" in op or "QC8" in op for r in report["layers"] for op in r[f"{which}_ops"]
                   if op.startswith(("Convolution", "Fully Connected")))
    for name, row in rows.items():   # kept dense: one integer conv, no band or box
        if name in composed:
            assert not any("DWConv" in op or "Fully Connected" in op for op in row["structured_ops"]), name
    assert any("kept 6 layer(s) dense" in n for n in report["notes"])


def test_litert_profiler_events_split_into_runs():
    """The C API profiler's events: one ``Invoke`` (type 1) per run, its status event (type
    32) ignored; XNNPACK's partitions told apart by their node index starting again."""
    from structexport.profiling.litert import split_runs
    events = [{"tag": "LiteRT::Run[buffer registration]", "type": 1, "us": 9, "node": 0}]
    for _ in range(2):
        events += [{"tag": "Invoke", "type": 1, "us": 500, "node": 0},
                   {"tag": "Transpose (ND, X32) Transpose", "type": 8, "us": 2, "node": 0},
                   {"tag": "Convolution (NHWC, F32) IGEMM", "type": 8, "us": 25, "node": 1},
                   {"tag": "STRIDED_SLICE", "type": 2, "us": 38, "node": 37},
                   {"tag": "Add (ND)", "type": 8, "us": 1, "node": 0},
                   {"tag": "Fully Connected (NC, F32) GEMM", "type": 8, "us": 5, "node": 1},
                   {"tag": "Clamp (NC)", "type": 8, "us": 1, "node": 0},
                   {"tag": "Invoke", "type": 32, "us": 4294967296, "node": 2 ** 64 - 1},
                   {"tag": "LiteRT::Run[Buffer sync]", "type": 1, "us": 7, "node": 0}]
    runs = split_runs(events)
    assert len(runs) == 2 and runs[0]["total"] == 0.5
    calls = runs[1]["calls"]
    assert [c["op"] for c in calls] == ["Transpose (ND, X32)", "Convolution (NHWC, F32) IGEMM", "STRIDED_SLICE",
                                        "Add (ND)", "Fully Connected (NC, F32) GEMM", "Clamp (NC)"]
    assert [c["delegate"] for c in calls] == [0, 0, None, 1, 1, 2]
    assert calls[1]["ms"] == 0.025


# ---------------------------------------------------------------------- LiteRT (slow: its own package)

@pytest.fixture(scope="module")
def lt_package(tmp_path_factory, repo_root) -> Path:
    pytest.importorskip("ai_edge_litert", reason="the litert extra is part of make setup")
    return _convert(tmp_path_factory, repo_root, "litert")


@pytest.mark.slow
def test_litert_report_rows_are_the_layers_and_add_up(lt_package, tmp_path):
    report, _output = _profile(lt_package, tmp_path / "report.html")
    assert report["target"] == "litert" and report["runtime"].startswith("LiteRT 2.3")
    assert "C API profiler" in report["profiler"]
    _check_report(report, lt_package, {"structured": "model.tflite", "dense": "reference.tflite"})
    rows = {r["layer"]: r for r in report["layers"]}
    for layer in _layers(lt_package):
        if layer["kind"] != "structured":
            continue
        ops = rows[layer["name"]]["structured_ops"]
        assert {"Fully Connected (NC, F32) GEMM", "Convolution (NHWC, F32) DWConv",
                "Convolution (NHWC, F32) IGEMM"} <= set(ops), (layer["name"], ops)
    for block in ("stage_2.0", "stage_3.0"):   # the shortcuts' builtin strided slices
        assert "STRIDED_SLICE" in rows[f"{block}.conv_b"]["structured_ops"]
    for which in ("structured", "dense"):
        assert report["totals"][which]["latency_ms"]["runs"] == 6


@pytest.mark.slow
def test_litert_every_multiply_add_operator_maps_to_its_layer(lt_package):
    from structexport.litert_runtime import interpreter
    from structexport.package import Package
    from structexport.profiling.executorch import event_layers, is_mac_event
    from structexport.profiling.litert import litert_profile
    package = Package.load(lt_package)
    paths = {"structured": package.program, "dense": package.dense_program}
    prof = litert_profile(paths, package.feed(), 2, 0, {n: interpreter(p) for n, p in paths.items()})
    build = package.target_build
    order = [layer["name"] for layer in package.layers]
    kinds = {layer["name"]: layer["kind"] for layer in package.layers}
    for which, onnx, delegation in (("structured", package.model_onnx, build["delegation"]),
                                    ("dense", package.reference_onnx, build["dense_delegation"])):
        calls = prof[which]["calls"]
        owners = event_layers(calls, onnx, order, delegation, paths[which])
        assert None not in owners
        per_layer: dict[str, int] = {}
        for call, layer in zip(calls, owners):
            if is_mac_event(call["op"]):
                per_layer[layer] = per_layer.get(layer, 0) + 1
        assert per_layer == {name: 3 if which == "structured" and kinds[name] == "structured" else 1
                             for name in order}


@pytest.mark.slow
def test_litert_threads_other_than_one_are_refused(lt_package, tmp_path):
    res = CliRunner().invoke(main, ["profile", str(lt_package), "--threads", "2", "--no-peak",
                                    "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 40, res.output
    assert "--threads 2" in res.output and "CompiledModel" in res.output
    assert not (tmp_path / "r.html").exists()
