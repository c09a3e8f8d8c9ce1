"""The litert target: a LiteRT (TFLite) model with the XNNPACK delegate, verified against the
source before anything is written, its delegation recorded, and timed by bench against its
dense counterpart on the same runtime."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from structexport.cli import main
from structexport.convert import ConvertOptions, convert
from structexport.errors import StructExportError
from structexport.layers.decomposed import decompose
from structexport.loader import load_checkpoint

pytest.importorskip("litert_torch", reason="the litert extra is part of make setup")

TRAINED = "models/checkpoints/trained/resnet20-struct-c2n2-sr-seed0.safetensors"


@pytest.fixture(scope="module")
def package(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("litert") / "pkg"
    result = convert(str(repo_root / TRAINED), out, options=ConvertOptions(target="litert"))
    return out, result.manifest


def test_model_is_verified_and_runs_like_the_source(package, repo_root):
    from structexport.litert_runtime import runner
    out, manifest = package
    assert manifest["target"] == "litert"
    assert {"model.tflite", "reference.tflite", "model.onnx", "reference.onnx"} <= set(manifest["artifacts"])
    checks = {d["file"]: d for d in manifest["deployed_verification"]}
    for name in ("model.tflite", "reference.tflite"):
        assert checks[name]["passed"] is True and checks[name]["checks"] == 3
        assert checks[name]["max_abs_diff"] < 1e-4
    realized = [r for p in manifest["passes"] if p["name"] == "realize_sumpool" for r in p["records"]]
    assert len(realized) == 18 and {r["details"]["realization"] for r in realized} == {"banded"}
    source = load_checkpoint(str(repo_root / TRAINED)).model.eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(123))
    got = runner(out / "model.tflite")(x.numpy())[0]
    with torch.no_grad():
        want = source(x).numpy()
    assert got.shape == (1, 10)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_delegation_is_recorded(package):
    _out, manifest = package
    build = manifest["target_build"]
    assert build["delegate"] == "XNNPACK" and build["programs"] == {"structured": "model.tflite",
                                                                    "dense": "reference.tflite"}
    d = build["delegation"]
    assert d["structured_layers_not_delegated"] == []
    assert d["macs_delegated_share"] == 1.0
    # Only the option-A shortcuts' strided subsampling stays outside XNNPACK (two downsamplings),
    # which splits the graph into three partitions
    assert d["portable"] == [{"op": "STRIDED_SLICE", "count": 4,
                              "layers": ["stage_2.0.downsample", "stage_3.0.downsample"]}]
    assert d["portable_ops"] == 4 and d["delegated_ops"] == 87 and d["delegate_calls"] == 3
    # each of the 18 structured convs: band (1x1 conv), pad, depthwise box, small conv
    assert d["ops"] == {"TRANSPOSE": 1, "CONV_2D": 37, "PAD": 18, "DEPTHWISE_CONV_2D": 18, "ADD": 9,
                        "STRIDED_SLICE": 4, "CONCATENATION": 2, "MEAN": 1, "FULLY_CONNECTED": 1}
    # the same multiply-accumulates as the ExecuTorch program: structured convs, stem and head
    assert d["macs_total"] == 9_355_904 + 2_766_048
    assert build["dense_delegation"]["delegated_ops"] == 35 and build["dense_delegation"]["portable_ops"] == 4


def test_bench_times_the_model_against_its_dense_counterpart(package):
    from structexport.bench import BenchOptions, run_bench
    out, _manifest = package
    result = run_bench(str(out), None, BenchOptions(target=None, repeat=3, warmup=1))
    assert result["target"] == "litert"
    assert result["runtime"].startswith("LiteRT 2.3") and "XNNPACK" in result["runtime"]
    assert result["macs"] == {"structured": 9_355_904, "dense": 40_551_040}
    assert result["latency_ms"]["median"] > 0 and result["dense_latency_ms"]["median"] > 0


def test_evaluate_runs_the_model_on_real_images(package, cifar10_dir):
    out, _manifest = package
    json_path = out.parent / "eval.json"
    r = CliRunner().invoke(main, ["evaluate", str(out), "--data", str(cifar10_dir / "test.npz"),
                                  "--preprocess", "cifar10", "--limit", "200", "--json", str(json_path)])
    assert r.exit_code == 0, r.output
    report = json.loads(json_path.read_text())
    assert {"model.onnx", "model.tflite"} <= set(report["artifacts"])
    tfl, source = report["artifacts"]["model.tflite"], report["source"]
    assert tfl["runtime"].startswith("LiteRT 2.3") and tfl["images"] == source["images"] == 200
    assert tfl["agreement"] >= 0.995 and tfl["max_logit_diff"] < 1e-3
    assert abs(tfl["top1"] - source["top1"]) <= 0.005


def test_regress_against_times_two_models(package, tmp_path):
    """regress --against on two litert packages times their model.tflite files interleaved."""
    out, _manifest = package
    md = tmp_path / "ab.md"
    r = CliRunner().invoke(main, ["regress", "--against", str(out), str(out), "--repeat", "20", "--warmup", "2",
                                  "--tolerance", "50%", "--markdown", str(md)])
    assert r.exit_code == 0, r.output
    text = md.read_text()
    assert "on litert" in text and "PASS" in text


def test_a_structured_layer_left_to_builtin_kernels_is_reported(tmp_path):
    from structexport.executorch_lower import structured_layer_names
    from structexport.litert_lower import convert_to_tflite

    torch.manual_seed(0)
    alpha = torch.randn(8, 2, 2, 2)
    # cumsum runs on LiteRT's builtin CUMSUM kernel (XNNPACK has none); the banded form is delegated
    for realization, expect_fallback in (("cumsum", True), ("banded", False)):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), decompose(4, alpha, None, 3, 1, 1, 1, realization),
                              nn.ReLU()).eval()
        assert structured_layer_names(model) == ["1"]
        report = convert_to_tflite(model, torch.randn(1, 3, 8, 8), tmp_path / f"{realization}.tflite",
                                   structured_layer_names(model))
        if expect_fallback:
            assert report["structured_layers_not_delegated"] == ["1.pool"]
            assert [e["op"] for e in report["portable"]] == ["CUMSUM"]
            assert report["portable"][0]["layers"] == ["1.pool"]
            assert report["delegate_calls"] >= 2 and report["portable_ops"] > 0
        else:
            assert report["structured_layers_not_delegated"] == [] and report["portable_ops"] == 0
            assert report["ops_delegated_share"] == 1.0 and report["delegate_calls"] == 1


def test_missing_litert_names_the_extra(monkeypatch):
    import builtins

    from structexport import litert_runtime
    real_import = builtins.__import__

    def no_litert(name, *args, **kwargs):
        if name.startswith("ai_edge_litert") or name.startswith("litert_torch"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_litert)
    for check in (litert_runtime.require_litert, litert_runtime.require_litert_converter):
        with pytest.raises(StructExportError) as info:
            check()
        assert info.value.exit_code == 2
        assert "pip install 'structexport[litert]'" in info.value.hint
        assert "--no-deps litert-torch==0.10.0 litert-converter==0.5.0" in info.value.hint


# --------------------------------------------------------------------------- INT8

def test_shared_dequantize_nodes_are_duplicated():
    """litert-torch 0.10.0 fails on a dequantize node shared by F.pad and a residual add; each
    user gets its own copy, and the graph computes the same."""
    import torch.nn.functional as F

    from structexport.litert_int8 import duplicate_shared_dq, quantize_pt2e

    class PadAndAdd(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.dw = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=8)

        def forward(self, x):
            x = F.relu(self.stem(x))
            return F.relu(x + self.dw(F.pad(x, (1, 1, 1, 1))))

    torch.manual_seed(0)
    x = torch.randn(1, 3, 8, 8)
    fake, _quantizer = quantize_pt2e(PadAndAdd().eval(), x, torch.randn(4, 3, 8, 8).numpy())
    dq = [n for n in fake.graph.nodes if n.op == "call_function" and "dequantize" in str(n.target)]
    assert dq and all(len(n.users) == 1 for n in dq)
    before = fake(x)
    assert torch.equal(duplicate_shared_dq(fake)(x), before)


@pytest.fixture(scope="module")
def int8_package(tmp_path_factory, repo_root, cifar10_dir):
    """The trained ResNet-20 C/2x2x2 in INT8 for LiteRT, the per-layer timings read from a
    cache written here under this machine's key (stage 1 slower structured): the test does
    not depend on the CPU and times nothing."""
    from structexport.executorch_int8 import layer_key
    from structexport.layers.decomposed import DecomposedStructuredConv
    from structexport.litert_runtime import require_litert_converter
    from structexport.passes import PIPELINE, PassContext, PassManager, select_passes
    from structexport.passes.autotune import machine_key
    tmp = tmp_path_factory.mktemp("litert-int8")
    source = load_checkpoint(str(repo_root / TRAINED)).model.eval()
    x = torch.randn(1, 3, 32, 32)
    rewritten, _ = PassManager(select_passes(PIPELINE), check_inputs=x).run(
        source, PassContext("litert", (1, 3, 32, 32), {"sumpool_realization": "banded"}))
    shapes, entries = {}, {}
    hooks = [m.register_forward_pre_hook(lambda m, a, n=n: shapes.__setitem__(n, (m, tuple(a[0].shape))))
             for n, m in rewritten.named_modules() if isinstance(m, DecomposedStructuredConv)]
    with torch.no_grad():
        rewritten(x)
    for h in hooks:
        h.remove()
    for name, (module, shape) in shapes.items():
        slow = name.startswith("stage_1.")
        entries[layer_key(module, shape)] = {"structured": 0.09 if slow else 0.03, "dense": 0.06}
    cache = tmp / "cache"
    cache.mkdir()
    key = machine_key(f"litert-torch {require_litert_converter()} int8 xnnpack", 1)
    (cache / "litert-int8-layers.json").write_text(json.dumps({key: entries}))
    out = tmp / "pkg"
    r = CliRunner().invoke(main, [str(a) for a in (
        "convert", repo_root / TRAINED, "--target", "litert", "--precision", "int8", "--calibration",
        cifar10_dir / "train-25k.npz", "--preprocess", "cifar10", "--calibration-count", "32",
        "--int8-gate-images", "100", "-o", out)], env={"STRUCTEXPORT_CACHE": str(cache)}, terminal_width=250)
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "manifest.json").read_text()), " ".join(r.output.split())


@pytest.mark.slow   # the INT8 conversion takes about a minute here: four litert-torch conversions
def test_int8_model_is_checked_gated_and_chosen_per_layer(int8_package):
    out, manifest, said = int8_package
    assert manifest["precision"] == "int8" and manifest["target"] == "litert"
    q = manifest["int8"]
    choice = q["layer_choice"]
    assert choice["measured"] == 0 and choice["from_cache"] == 18
    assert choice["cache"].endswith("litert-int8-layers.json")
    dense = [row["layer"] for row in choice["layers"] if row["choice"] == "dense"]
    assert dense == [f"stage_1.{b}.conv_{c}" for b in range(3) for c in "ab"] == q["composed_dense"]
    assert len(q["rebased"]) == 12 and not set(q["rebased"]) & set(dense)
    assert "12 of 18 decomposed layers stay structured" in said
    checks = {d["file"]: d for d in manifest["deployed_verification"]}
    for name in ("model.tflite", "reference.int8.tflite"):
        assert checks[name]["passed"] and checks[name]["precision"] == "int8"
        assert checks[name]["rtol"] == 0.0 and 0 < checks[name]["atol"] < 2.0   # 8 output steps
        assert checks[name]["max_abs_diff"] <= checks[name]["atol"]
    assert checks["reference.tflite"]["precision"] == "fp32" and checks["reference.tflite"]["max_abs_diff"] < 1e-4
    gate = q["gate"]
    assert gate["images"] == 100 and gate["passed"] and gate["agreement"] >= 0.97
    assert q["dense_int8"]["gate"]["images"] == 100
    d = manifest["target_build"]["delegation"]
    assert d["structured_layers_not_delegated"] == [] and d["macs_delegated_share"] == 1.0
    assert manifest["target_build"]["programs"]["dense_int8"] == "reference.int8.tflite"


@pytest.mark.slow
def test_int8_model_is_integer_and_bench_compares_it_with_dense_int8(int8_package):
    from structexport.bench import BenchOptions, run_bench
    from structexport.litert_runtime import interpreter
    from structexport.package import Package
    out, _manifest, _said = int8_package
    assert (out / "model.tflite").stat().st_size * 4 < (out / "reference.tflite").stat().st_size
    it = interpreter(out / "model.tflite", delegate=False)
    assert it.get_input_details()[0]["dtype"] == np.int8 and it.get_output_details()[0]["dtype"] == np.int8
    convs = [o for o in it._get_ops_details() if o["op_name"] in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")]
    assert convs and all(o["operand_types"][0] is np.int8 for o in convs)
    stored = Package.load(out).dense_int8_expected()
    assert set(stored) == {"random:0", "random:1", "random:2"} and stored["random:0"][0].shape == (1, 10)
    result = run_bench(str(out), None, BenchOptions(target=None, repeat=3, warmup=1))
    assert result["precision"] == "int8" and "reference.int8.tflite" in result["baseline"]
    assert result["dense_int8_latency_ms"]["median"] > 0
    assert result["speedup_measured"] == pytest.approx(
        result["dense_int8_latency_ms"]["median"] / result["latency_ms"]["median"])
