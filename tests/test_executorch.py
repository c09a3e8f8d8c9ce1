"""The executorch target: an ExecuTorch program with the XNNPACK delegate, verified against
the source before anything is written, its delegation recorded, and timed by bench against
its dense counterpart on the same runtime."""
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

pytest.importorskip("executorch", reason="the executorch extra is part of make setup")

TRAINED = "models/checkpoints/trained/resnet20-struct-c2n2-sr-seed0.safetensors"


@pytest.fixture(scope="module")
def package(tmp_path_factory, repo_root):
    out = tmp_path_factory.mktemp("et") / "pkg"
    result = convert(str(repo_root / TRAINED), out, options=ConvertOptions(target="executorch"))
    return out, result.manifest


def test_program_is_verified_and_runs_like_the_source(package, repo_root):
    from structexport.executorch_runtime import runner
    out, manifest = package
    assert manifest["target"] == "executorch"
    assert {"model.pte", "reference.pte", "model.onnx", "reference.onnx"} <= set(manifest["artifacts"])
    checks = {d["file"]: d for d in manifest["deployed_verification"]}
    for name in ("model.pte", "reference.pte"):
        assert checks[name]["passed"] is True and checks[name]["checks"] == 3
        assert checks[name]["max_abs_diff"] < 1e-4
    # The sum-pools as bands: a 1x1 conv over channels and a depthwise conv of ones
    realized = [r for p in manifest["passes"] if p["name"] == "realize_sumpool" for r in p["records"]]
    assert len(realized) == 18 and {r["details"]["realization"] for r in realized} == {"banded"}
    # Run the shipped program again here, on an input it was not verified on
    source = load_checkpoint(str(repo_root / TRAINED)).model.eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(123))
    got = runner(out / "model.pte")(x.numpy())[0]
    with torch.no_grad():
        want = source(x).numpy()
    assert got.shape == (1, 10)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_delegation_is_recorded(package):
    _out, manifest = package
    d = manifest["target_build"]["delegation"]
    assert manifest["target_build"]["delegate"] == "XNNPACK"
    assert d["structured_layers_not_delegated"] == []
    assert d["macs_delegated_share"] == 1.0
    # Only the option-A shortcuts' zero channels stay outside XNNPACK (two downsamplings)
    portable = {e["op"]: e for e in d["portable"]}
    assert set(portable) == {"aten.full.default", "aten.slice_copy.Tensor"}
    assert portable["aten.full.default"]["count"] == 2
    assert portable["aten.full.default"]["layers"] == ["stage_2.0.downsample", "stage_3.0.downsample"]
    assert d["portable_ops"] == 6 and d["delegated_ops"] > 80
    # 18 structured convs: band, depthwise box and small conv each, plus the stem and the head
    assert d["macs_total"] == 9_355_904 + 2_766_048


def test_bench_times_the_program_against_its_dense_counterpart(package):
    from structexport.bench import BenchOptions, run_bench
    out, _manifest = package
    result = run_bench(str(out), None, BenchOptions(target=None, repeat=3, warmup=1))
    assert result["target"] == "executorch"
    assert result["runtime"].startswith("ExecuTorch 1.5") and "XNNPACK" in result["runtime"]
    assert result["macs"] == {"structured": 9_355_904, "dense": 40_551_040}
    assert result["speedup_theoretical"] == pytest.approx(40_551_040 / 9_355_904)
    assert result["latency_ms"]["median"] > 0 and result["dense_latency_ms"]["median"] > 0


def test_a_structured_layer_left_to_portable_kernels_is_reported():
    from structexport.executorch_lower import delegation_report, structured_layer_names
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    torch.manual_seed(0)
    alpha = torch.randn(8, 2, 2, 2)
    # cumsum runs on ExecuTorch's portable kernels; the banded form is delegated
    for realization, expect_fallback in (("cumsum", True), ("banded", False)):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), decompose(4, alpha, None, 3, 1, 1, 1, realization),
                              nn.ReLU()).eval()
        exported = torch.export.export(model, (torch.randn(1, 3, 8, 8),))
        lowered = to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()])
        report = delegation_report(exported, lowered.exported_program().graph_module,
                                   structured_layer_names(model))
        assert structured_layer_names(model) == ["1"]
        if expect_fallback:
            assert report["structured_layers_not_delegated"] == ["1.pool"]
            assert {e["op"] for e in report["portable"]} == {"aten.cumsum.default"}
            assert report["portable_ops"] > 0
        else:
            assert report["structured_layers_not_delegated"] == [] and report["portable_ops"] == 0
            assert report["ops_delegated_share"] == 1.0


def test_convert_warns_when_structured_layers_fall_back(monkeypatch, tmp_path):
    """The CLI's summary names the layers and points at the manifest."""
    from structexport import cli
    from structexport.cli_common import err
    report = {"delegated_ops": 10, "portable_ops": 4, "delegate_calls": 2, "macs_delegated_share": 1.0,
              "portable": [{"op": "aten.cumsum.default", "count": 4, "layers": ["a.pool", "b.pool"]}],
              "structured_layers_not_delegated": ["a.pool", "b.pool"]}
    with err.capture() as captured, cli.out.capture() as shown:
        cli._render_delegation(report, "XNNPACK")
    assert "10 of 14 ops in 2 delegate calls, 100.0% of multiply-accumulates" in shown.get()
    assert "aten.cumsum.default x4" in shown.get()
    assert "warning: 2 structured layers run partly outside XNNPACK" in captured.get()
    assert "a.pool, b.pool" in captured.get()


def test_autotune_and_onnx_sources_are_refused(repo_root, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["convert", str(repo_root / TRAINED), "--target", "executorch", "--autotune",
                               "-o", str(tmp_path / "a")])
    assert res.exit_code == 2, res.output
    assert "--autotune times sum-pool forms under ONNX Runtime" in res.output
    assert not (tmp_path / "a").exists()
    # a model from elsewhere (its structure would be found in ONNX): refused, naming the targets that take it
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), (torch.randn(1, 3, 8, 8),), str(onnx_path),
                      dynamo=False)
    res = runner.invoke(main, ["convert", str(onnx_path), "--target", "executorch", "-o", str(tmp_path / "b")])
    assert res.exit_code == 2, res.output
    assert "--target executorch lowers zoo checkpoints" in res.output
    assert "ort-cpu" in res.output and "tvm-llvm" in res.output
    assert not (tmp_path / "b").exists()


def test_missing_executorch_names_the_extra(monkeypatch):
    import builtins

    from structexport import executorch_runtime
    real_import = builtins.__import__

    def no_executorch(name, *args, **kwargs):
        if name.startswith("executorch"):
            raise ImportError(f"No module named '{name}'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_executorch)
    with pytest.raises(StructExportError) as info:
        executorch_runtime.require_executorch()
    assert info.value.exit_code == 2
    assert "pip install 'structexport[executorch]'" in info.value.hint
