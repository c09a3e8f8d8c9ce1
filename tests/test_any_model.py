"""Issue 11's four forms of a model that is not in the zoo -- ONNX, torch.export (.pt2), a
state dict with the user's own module (--model FILE.py:build) and TorchScript -- convert
through the CLI to verified packages, with the structure discovered in the weights and
the theoretical speedup (before.macs / after.macs) the same for all four."""
from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from structexport.cli import main
from structexport.package import Package
from test_decompose_structured_conv_pass import STRUCTURE, save_four_forms, structured_net

MODULE_SOURCE = "from test_decompose_structured_conv_pass import MyNet\n\n\ndef build():\n    return MyNet()\n"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("four")
    return save_four_forms(structured_net(), torch.randn(1, 3, 32, 32), root, MODULE_SOURCE)


FORMS = {
    "onnx": ["mynet.onnx"],
    "torch-export": ["mynet.pt2"],
    "module": ["mynet_sd.pt", "--model", "{root}/mynet.py:build", "--input-shape", "1,3,32,32"],
    "torchscript": ["mynet_ts.pt", "--allow-torchscript", "--input-shape", "1,3,32,32"],
}


@pytest.fixture(scope="module")
def converted(saved, tmp_path_factory):
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    out = {}
    for form, args in FORMS.items():
        args = [a.format(root=saved) for a in args]
        outdir = tmp_path_factory.mktemp("out") / form
        r = CliRunner().invoke(main, ["convert", str(saved / args[0]), *args[1:], "--target", "ort-cpu",
                                      "-o", str(outdir), "--json"])
        assert r.exit_code == 0, (form, r.output)
        out[form] = Package.load(outdir)
    return out


@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_converts_verified_with_the_structure_discovered(converted, form):
    package = converted[form]
    m = package.manifest
    assert m["source"]["format"] == form
    assert m["verification"]["passed"] is True and package.self_contained
    decomposed = {r["layer"]: r for run in m["passes"] for r in run["records"] if r["action"] == "decomposed"}
    # TorchScript's exporter folds the first batch norm into c1 and renames its weight
    expected = set(STRUCTURE) - ({"c1"} if form == "torchscript" else set())
    assert expected <= set(decomposed), decomposed
    for name in expected:
        assert (decomposed[name]["details"]["c"], decomposed[name]["details"]["n"]) == STRUCTURE[name]


def test_the_theoretical_speedup_is_what_the_weights_allow_in_every_form(converted):
    ratios = {form: p.manifest["before"]["macs"] / p.manifest["after"]["macs"] for form, p in converted.items()}
    assert min(ratios.values()) > 1.5, ratios
    assert max(ratios.values()) - min(ratios.values()) < 1e-9, ratios


def test_an_onnx_package_benches_and_profiles(converted, tmp_path):
    root = converted["onnx"].root
    r = CliRunner().invoke(main, ["bench", str(root), "--repeat", "5", "--warmup", "1",
                                  "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["speedup_theoretical"] > 1.5
    r = CliRunner().invoke(main, ["profile", str(root), "--repeat", "3", "--warmup", "1", "--no-peak",
                                  "-o", str(tmp_path / "p.html")])
    assert r.exit_code == 0, r.output
    rows = {row["layer"] for row in json.loads((tmp_path / "p.json").read_text())["layers"]}
    assert {"c2", "grouped", "pointwise"} <= rows


def test_csg_generator_subgraphs_are_folded_into_kernels(tmp_path):
    """An exported graph that computes its kernels (CSG: codes x generator, reshape, crop)
    converts with the generator folded away; --keep-csg-codes keeps it."""
    import onnx

    from structexport.convert import ConvertOptions, convert_onnx
    ckpt = __import__("pathlib").Path(__file__).resolve().parents[1] / "models" / "checkpoints" / "resnet20-csg-16x16x3x3-72.t7"
    r = CliRunner().invoke(main, ["convert", str(ckpt), "--arch", "resnet20", "--target", "onnx",
                                  "--keep-csg-codes", "-o", str(tmp_path / "codes")])
    assert r.exit_code == 0, r.output
    graph = onnx.load(tmp_path / "codes" / "model.onnx")
    assert sum(n.op_type == "MatMul" for n in graph.graph.node) == 18      # one generator product per CSG conv
    folded = convert_onnx(graph, tmp_path / "folded", ConvertOptions(target="ort-cpu"))
    assert folded.manifest["verification"]["passed"] and "MatMul" not in folded.manifest["export"]["ops"]
    kept = convert_onnx(graph, tmp_path / "kept", ConvertOptions(target="ort-cpu",
                                                                 pass_options={"keep_csg_codes": True}))
    assert kept.manifest["export"]["ops"].get("MatMul") == 18


def test_bench_profile_and_regress_take_the_files_directly(saved, converted, tmp_path):
    r = CliRunner().invoke(main, ["bench", str(saved / "mynet.onnx"), "--repeat", "5", "--warmup", "1",
                                  "--json", str(tmp_path / "b.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "b.json").read_text())["workload"]["origin"] == "checkpoint"
    r = CliRunner().invoke(main, ["profile", str(saved / "mynet.pt2"), "--repeat", "3", "--warmup", "1",
                                  "--no-peak", "-o", str(tmp_path / "p.html")])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["regress", "--against", str(converted["onnx"].root), str(saved / "mynet.onnx"),
                                  "--no-per-layer", "--retries", "2"])
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("make, args, code, text", [
    (lambda d: (d / "bad.onnx").write_bytes(b"\x08\x07garbage" * 10), ["bad.onnx"], 21, "ONNX"),
    (lambda d: (d / "cut.onnx").write_bytes((d / "mynet.onnx").read_bytes()[:2000]), ["cut.onnx"], 21, "ONNX"),
    (lambda d: None, ["mynet_sd.pt", "--model", "{root}/nope.py:build", "--input-shape", "1,3,32,32"], 26, "nope.py"),
    (lambda d: (d / "cut.pt2").write_bytes((d / "mynet.pt2").read_bytes()[:3000]), ["cut.pt2"], 25, ".pt2"),
])
def test_bad_input_is_one_line_with_its_exit_code_and_nothing_written(saved, tmp_path, make, args, code, text):
    make(saved)
    args = [a.format(root=saved) for a in args]
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["convert", str(saved / args[0]), *args[1:], "-o", str(out)])
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and r.output.count("error:") == 1 and text in r.output
    assert not out.exists()


@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_converts_for_tvm_llvm_verified(saved, converted, form, tmp_path):
    args = [a.format(root=saved) for a in FORMS[form]]
    r = CliRunner().invoke(main, ["convert", str(saved / args[0]), *args[1:], "--target", "tvm-llvm",
                                  "-o", str(tmp_path / "tvm")])
    assert r.exit_code == 0, r.output
    m = Package.load(tmp_path / "tvm").manifest
    assert m["target_verification"]["passed"] is True and (tmp_path / "tvm" / "model.so").is_file()
    ort = converted[form].manifest
    assert (m["before"]["macs"], m["after"]["macs"]) == (ort["before"]["macs"], ort["after"]["macs"])
    # TVM fuses, from the composed graph, exactly the layers ONNX Runtime's graph decomposes
    sc = m["target_build"]["structured_convs"]
    decomposed = [r for run in ort["passes"] for r in run["records"] if r["action"] == "decomposed"]
    assert sc["mode"] == "fused" and sc["fused"] == len(decomposed) == 5
    # the graph the library was compiled from is kept (profile compiles it the same way)
    assert "composed.onnx" in m["artifacts"] and (tmp_path / "tvm" / "composed.onnx").is_file()
    assert not (tmp_path / "tvm" / ".composed.onnx").exists()
