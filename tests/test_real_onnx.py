"""A real ONNX model that someone else trained and exported: PaddleOCR's text-direction
classifier (MobileNetV3-small, PaddlePaddle / paddle2onnx, opset 11, weights in Constant
nodes, dynamic H and W), shipped inside the PyPI package rapidocr-onnxruntime (the
``test`` extra). It converts for ort-cpu verified, with nothing decomposed (its weights
are not structured); copies with its largest 1x1 convs projected onto ``C/2 x 1 x 1``
structures, or onto a block-diagonal 2-group pattern (benchmarks/real_onnx.py), have
exactly those layers found (decomposed, or lowered to grouped convs), and bench and
profile. See docs/real-models.md."""
from __future__ import annotations

import importlib.util
import json
import signal
from pathlib import Path

import numpy as np
import pytest

from structexport.layer_cost import MIN_SPEEDUP
from click.testing import CliRunner

from structexport.cli import main
from structexport.package import Package

SHAPE = "1,3,48,192"
LAYERS = 11


def _script():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "real_onnx.py"
    spec = importlib.util.spec_from_file_location("real_onnx", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


R = _script()


@pytest.fixture(scope="module")
def source() -> Path:
    """The model file inside the installed package; fails (never skips) without it."""
    try:
        return R.model_path()
    except FileNotFoundError as exc:
        pytest.fail(str(exc), pytrace=False)


def _convert(model: Path, outdir: Path) -> Package:
    r = CliRunner().invoke(main, ["convert", str(model), "--target", "ort-cpu", "--input-shape", SHAPE,
                                  "-o", str(outdir), "--json"])
    assert r.exit_code == 0, r.output
    return Package.load(outdir)


@pytest.fixture(scope="module")
def original(source, tmp_path_factory) -> Package:
    return _convert(source, tmp_path_factory.mktemp("real") / "original")


def _projected(source, tmp_path_factory, structure):
    import onnx
    root = tmp_path_factory.mktemp(f"real-{structure}")
    proto = onnx.load(str(source))
    copy, records = R.project_copy(proto, R.pick_pointwise(R.conv_table(proto), LAYERS), structure)
    onnx.save(copy, str(root / "projected.onnx"))
    return proto, copy, records, _convert(root / "projected.onnx", root / "package")


@pytest.fixture(scope="module")
def projected(source, tmp_path_factory):
    return _projected(source, tmp_path_factory, "structured")


@pytest.fixture(scope="module")
def grouped(source, tmp_path_factory):
    return _projected(source, tmp_path_factory, "grouped")


def _actions(manifest: dict) -> dict[str, int]:
    out: dict[str, int] = {}
    for run in manifest["passes"]:
        for r in run["records"]:
            out[r["action"]] = out.get(r["action"], 0) + 1
    return out


def test_the_model_is_the_one_documented(source):
    p = R.provenance(source)
    assert (p["package"], p["version"], p["license"]) == ("rapidocr-onnxruntime", "1.4.4", "Apache-2.0")
    assert p["producer"] == "PaddlePaddle" and p["opset"] == 11
    # paddle2onnx writes the batch as dim_value -1, H and W as "?"
    assert p["input"] == {"name": "x", "shape": [-1, 3, "?", "?"]}
    assert p["sha256"] == "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"


def test_the_real_model_converts_verified_with_nothing_decomposed(original):
    m = original.manifest
    assert m["verification"]["passed"] is True and original.self_contained
    assert m["source"]["producer"] == "PaddlePaddle" and m["source"]["opset"] == 11
    assert m["input_shape"] == [1, 3, 48, 192]
    # 53 convs: 49 without a cheaper structure in their weights, 4 depthwise convs with
    # strides [2, 1] that the pass does not rewrite; no layer is decomposed
    assert _actions(m) == {"dense": 49, "kept": 4}
    assert m["before"]["macs"] == m["after"]["macs"] == 16_315_376
    assert m["before"]["params"] == m["after"]["params"] == 127_225
    # a trained two-class classifier (0 / 180 degrees): its outputs are probabilities
    data = np.load(original.root / "verification.npz")
    outs = [data[k] for k in data.files if not k.startswith("input")]
    assert outs and all(o.shape[-1] == 2 and np.allclose(o.sum(-1), 1, atol=1e-5) for o in outs)


def test_the_unmodified_package_benches(original, tmp_path):
    r = CliRunner().invoke(main, ["bench", str(original.root), "--repeat", "5", "--warmup", "1",
                                  "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["speedup_theoretical"] == 1.0
    assert b["latency_ms"]["median"] > 0 and b["dense_latency_ms"]["median"] > 0


def test_the_copy_changes_only_the_projected_kernels(projected):
    from onnx import numpy_helper
    proto, copy, records, _ = projected
    before, after = R._weight_holders(proto), R._weight_holders(copy)
    changed = {k for k in before if not np.array_equal(numpy_helper.to_array(before[k]),
                                                        numpy_helper.to_array(after[k]))}
    assert changed == {r["weight"] for r in records}
    assert len(records) == LAYERS
    assert all(r["shape"][2:] == [1, 1] and r["group"] == 1 and r["structure"] == f"{r['shape'][1] // 2}x1x1"
               for r in records)
    assert [len(copy.graph.node), copy.producer_name] == [len(proto.graph.node), proto.producer_name]


def test_the_projected_layers_are_found_with_their_structure(projected):
    _, _, records, package = projected
    m = package.manifest
    assert m["verification"]["passed"] is True
    # the package's layers keep the source's weight names (onnxsim's batch-norm folding
    # renames the fused kernels; convert gives them their names back)
    found = R.rewritten(m)
    # a layer whose sum-pool the cost model (tests/cost_model.json) predicts slower than the
    # multiplies it saves is found with its structure and kept dense, with both predictions
    kept = {r["layer"]: r["details"] for run in m["passes"] for r in run["records"]
            if r["action"] == "kept" and "predicted_speedup" in r["details"]}
    assert set(found) | set(kept) == {r["weight"] for r in records}, sorted(found)
    assert not set(found) & set(kept) and len(found) >= LAYERS - 3
    assert all(d["predicted_speedup"] < MIN_SPEEDUP and "predicted" in d["reason"] for d in kept.values())
    assert {row["name"] for row in m["source_layers"]} >= set(found)
    for r in records:
        f = found.get(r["weight"]) or kept[r["weight"]]
        assert (f["c"], f["n"], f["C"], f["N"]) == (r["shape"][1] // 2, 1, r["shape"][1], 1)
        assert f["residual"] < 1e-6
    assert _actions(m)["decomposed"] == len(found)
    # a C/2 x 1 x 1 structure halves the layer's multiplies (the sum-pool adds are counted apart)
    assert m["after"]["macs"] == m["before"]["macs"] - sum(r["macs"] for r in records
                                                           if r["weight"] in found) // 2
    assert m["before"]["macs"] / m["after"]["macs"] > 1.1
    assert m["after"]["sumpool_adds"] > 0


def test_the_grouped_layers_are_found_and_lowered(grouped):
    """Block-diagonal zeros in a plain conv: lower_sparse_conv finds the two groups from the
    weights alone and the layer becomes a conv with group=2, nothing else changes."""
    import onnx
    proto, copy, records, package = grouped
    m = package.manifest
    assert m["verification"]["passed"] is True
    assert m["verification"]["max_abs_diff"] < 1e-5
    found = R.rewritten(m)
    assert set(found) == {r["weight"] for r in records}, sorted(found)
    assert all(f["action"] == "lowered" and f["groups"] == {"kxk": [], "1x1": [2]} and f["zeros"] == 0.5
               for f in found.values())
    assert _actions(m)["lowered"] == LAYERS and "decomposed" not in _actions(m)
    assert m["after"]["macs"] == m["before"]["macs"] - sum(r["macs"] for r in records) // 2
    assert m["after"]["sumpool_adds"] == 0
    model = onnx.load(str(package.root / "model.onnx"))
    groups = [next((a.i for a in n.attribute if a.name == "group"), 1)
              for n in model.graph.node if n.op_type == "Conv"]
    assert len(groups) == 53 and groups.count(2) == LAYERS   # no gathers: the blocks are in place


def test_the_projected_package_benches(projected, tmp_path):
    package = projected[3]
    r = CliRunner().invoke(main, ["bench", str(package.root), "--repeat", "5", "--warmup", "1",
                                  "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    b = json.loads((tmp_path / "b.json").read_text())
    for key in ("speedup_measured", "speedup_theoretical", "realization_efficiency"):
        assert b[key] > 0, key
    assert b["speedup_theoretical"] == pytest.approx(package.manifest["before"]["macs"]
                                                     / package.manifest["after"]["macs"])
    assert b["latency_ms"]["runs"] == b["dense_latency_ms"]["runs"] == 5
    assert b["latency_ms"]["median"] > 0 and b["dense_latency_ms"]["median"] > 0


class _Timeout(Exception):
    pass


@pytest.mark.parametrize("which", ["original", "projected", "grouped"])
def test_the_packages_profile(which, original, projected, grouped, tmp_path):
    package = {"original": original, "projected": projected[3], "grouped": grouped[3]}[which]

    def _alarm(*_):
        raise _Timeout("profile did not finish in 15 s")
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(15)
    try:
        r = CliRunner().invoke(main, ["profile", str(package.root), "--repeat", "3", "--warmup", "1",
                                      "--no-peak", "-o", str(tmp_path / "p.html")])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if isinstance(r.exception, _Timeout):
        raise r.exception
    assert r.exit_code == 0, r.output
    rows = {row["layer"] for row in json.loads((tmp_path / "p.json").read_text())["layers"]}
    assert {row["name"] for row in package.manifest["source_layers"]} <= rows
