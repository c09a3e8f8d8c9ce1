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
from structexport.structure_plan import StructurePlan

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


def test_evaluate_runs_the_program_on_real_images(package, repo_root, cifar10_dir):
    """evaluate takes model.pte as a shipped artifact: its top-1 on real CIFAR-10 images agrees
    with the source's (float32 XNNPACK against float32 torch)."""
    out, _manifest = package
    json_path = out.parent / "eval.json"
    r = CliRunner().invoke(main, ["evaluate", str(out), "--data", str(cifar10_dir / "test.npz"),
                                  "--preprocess", "cifar10", "--limit", "200", "--json", str(json_path)])
    assert r.exit_code == 0, r.output
    report = json.loads(json_path.read_text())
    assert {"model.onnx", "model.pte"} <= set(report["artifacts"])
    pte, source = report["artifacts"]["model.pte"], report["source"]
    assert pte["runtime"].startswith("ExecuTorch 1.5") and pte["images"] == source["images"] == 200
    assert pte["agreement"] >= 0.995 and pte["max_logit_diff"] < 1e-3
    assert abs(pte["top1"] - source["top1"]) <= 0.005


def test_regress_against_times_two_programs(package, tmp_path):
    """regress --against on two executorch packages times their model.pte files interleaved
    (the same package twice: a ratio near 1, a pass)."""
    out, _manifest = package
    md = tmp_path / "ab.md"
    r = CliRunner().invoke(main, ["regress", "--against", str(out), str(out), "--repeat", "20", "--warmup", "2",
                                  "--tolerance", "50%", "--markdown", str(md)])
    assert r.exit_code == 0, r.output
    text = md.read_text()
    assert "executorch" in text and "PASS" in text


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
    assert "left to the runtime's own kernels: aten.cumsum.default x4" in shown.get()
    assert "warning: 2 structured layers run partly outside XNNPACK" in captured.get()
    assert "a.pool, b.pool" in captured.get()


USER_MODEL = """
import torch, torch.nn as nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU())
        self.head = nn.Linear(32, 10)
    def forward(self, x):
        return self.head(self.body(torch.relu(self.stem(x))).mean((2, 3)))
def build():
    return Net()
"""


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """A user's own module whose two body convs are exactly structured (C/2x2x2 and C/4x2x2,
    8 and 16 coefficient channels), as a state dict with its --model file and as a .pt2."""
    import importlib.util

    from structexport.layers.structured import compose_kernel
    tmp = tmp_path_factory.mktemp("user")
    (tmp / "net.py").write_text(USER_MODEL)
    spec = importlib.util.spec_from_file_location("user_net", tmp / "net.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    net = mod.build().eval()
    with torch.no_grad():
        for conv, c in ((net.body[0], 8), (net.body[2], 16)):
            conv.weight.copy_(compose_kernel(torch.randn(conv.out_channels, c, 2, 2) * 0.1, conv.in_channels, 3))
    torch.save(net.state_dict(), tmp / "net_sd.pt")
    torch.export.save(torch.export.export(net, (torch.randn(1, 3, 32, 32),)), tmp / "net.pt2")
    return tmp, net


@pytest.mark.parametrize("target,front_end", [("executorch", "state dict with --model"), ("executorch", ".pt2"),
                                              ("litert", ".pt2")])
def test_models_from_torch_front_ends_get_the_plan_found_on_onnx(user_model, tmp_path, target, front_end):
    """The structure found on the ONNX graph is written into the torch program: the same
    convs in both IRs (shapes of every conv kernel), both verified against the source."""
    import onnx

    from structexport.targets import get_target
    if target == "litert":
        pytest.importorskip("litert_torch", reason="the litert extra is part of make setup")
    program = get_target(target, {}).programs["structured"]
    runner = get_target(target, {}).runner
    tmp, net = user_model
    args = ([str(tmp / "net_sd.pt"), "--model", f"{tmp / 'net.py'}:build", "--input-shape", "1,3,32,32"]
            if front_end.startswith("state") else [str(tmp / "net.pt2")])
    out = tmp_path / "pkg"
    r = CliRunner().invoke(main, ["convert", *args, "--target", target, "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    decomposed = [rec["layer"] for p in m["passes"] for rec in p["records"] if rec["action"] == "decomposed"]
    assert decomposed == ["body.0", "body.2"]
    assert m["dense"]["macs"] / m["after"]["macs"] == pytest.approx(3.73, abs=0.01)
    checks = {d["file"]: d for d in m["deployed_verification"]}
    assert checks[program]["passed"] and checks[program]["max_abs_diff"] < 1e-4
    d = m["target_build"]["delegation"]
    assert d["structured_layers_not_delegated"] == [] and d["macs_delegated_share"] == 1.0
    # The same plan in both IRs: the kernels of model.onnx's convs are the torch program's
    onnx_shapes = sorted(tuple(i.dims) for i in onnx.load(str(out / "model.onnx")).graph.initializer
                         if len(i.dims) == 4)
    from structexport.plan_torch import emit_torch
    plan = StructurePlan.from_dict(m["structure_plan"])
    assert sorted(plan.decomposed()) == ["body.0", "body.2"]
    gm, written = emit_torch(net, torch.randn(1, 3, 32, 32), plan, "banded")
    assert written == ["body.0", "body.2"]
    torch_shapes = sorted(tuple(p.shape) for p in list(gm.parameters()) + list(gm.buffers()) if p.ndim == 4)
    assert torch_shapes == onnx_shapes
    x = torch.randn(1, 3, 32, 32)           # the exported program's batch
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x), atol=1e-4, rtol=1e-4)
        want = net(x).numpy()
    np.testing.assert_allclose(runner(out / program)(x.numpy())[0], want, atol=1e-4, rtol=1e-4)


@pytest.fixture
def fake_program_timings(monkeypatch):
    """--autotune's per-layer timings on a program target, made up so that the test does not
    depend on the CPU: layers on maps of 8x8 or less are faster dense. Records each call."""
    from structexport.passes import autotune
    calls = []

    def fake(layer, pool, in_shape, runtime, threads=1, repeat=30, dense=False,
             candidates=autotune.PROGRAM_CANDIDATES):
        calls.append({"shape": tuple(in_shape), "runtime": runtime.name, "dense": dense,
                      "candidates": candidates})
        small = in_shape[-1] <= 8
        return {"banded": 0.5 if small else 0.2, **({"dense": 0.4} if dense else {})}
    monkeypatch.setattr(autotune, "measure_program", fake)
    return calls


@pytest.mark.parametrize("front_end", ["zoo", ".pt2"])
def test_autotune_weighs_bands_against_dense_on_the_runtime(front_end, fake_program_timings, user_model,
                                                             repo_root, tmp_path):
    """--autotune on executorch: per layer, the banded form against the dense conv, timed on
    ExecuTorch (here: made-up timings); a layer measured slower structured ships dense, in
    the plan and in the program, on both pipelines."""
    tmp, _net = user_model
    source = str(repo_root / TRAINED) if front_end == "zoo" else str(tmp / "net.pt2")
    cache = tmp_path / "tune.json"
    out = tmp_path / "pkg"
    r = CliRunner().invoke(main, ["convert", source, "--target", "executorch", "--autotune",
                                  "--tuning-cache", str(cache), "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert fake_program_timings and all(c["runtime"] == "executorch" and c["dense"] and c["candidates"] == ("banded",)
                                        for c in fake_program_timings)
    m = json.loads((out / "manifest.json").read_text())
    plan = StructurePlan.from_dict(m["structure_plan"])
    convs = {k: e for k, e in plan.layers.items() if e.kind == "structured conv"}
    dense = sorted(k for k, e in convs.items() if e.form == "dense")
    if front_end == "zoo":      # stage 3 reads 8x8 maps, but its first conv (stride 2) reads 16x16
        assert dense == sorted(k for k in convs if k.startswith("stage_3.") and k != "stage_3.0.conv_a")
        assert len(dense) == 5
    else:                       # the user model's two layers run on 32x32 and 16x16 maps
        assert dense == []
    for entry in convs.values():
        assert entry.details["chosen_by"] == "measurement"
        if entry.form == "dense":
            assert entry.reason == "measured 0.5000 ms structured against 0.4000 ms dense"
        else:
            assert entry.realization == "banded"
    # the program holds exactly the plan's structured layers, and reproduces the source
    delegation = m["target_build"]["delegation"]
    assert delegation["structured_layers"] == len(plan.decomposed())
    assert delegation["structured_layers_not_delegated"] == []
    assert all(d["passed"] for d in m["deployed_verification"])
    # the timings are cached under ExecuTorch's key: converting again measures nothing
    keys = list(json.loads(cache.read_text()))
    assert len(keys) == 1 and keys[0].startswith("executorch|ExecuTorch ")
    fake_program_timings.clear()
    r = CliRunner().invoke(main, ["convert", source, "--target", "executorch", "--autotune",
                                  "--tuning-cache", str(cache), "-o", str(tmp_path / "again")])
    assert r.exit_code == 0, r.output
    assert fake_program_timings == []


@pytest.mark.parametrize("target,runtime", [("executorch", "ExecuTorch"), ("litert", "LiteRT")])
def test_autotune_times_a_layer_under_the_runtime(target, runtime, tmp_path):
    """The real timing: one layer lowered banded and dense to the target's programs, timed
    under its runtime, the choice under the 1.05x margin, cached under the runtime's key."""
    from structexport.passes import PassContext
    from structexport.passes.autotune import Tuner
    from structexport.targets import get_target
    if target == "litert":
        pytest.importorskip("litert_torch", reason="the litert extra is part of make setup")
    layer = decompose(16, torch.randn(16, 8, 2, 2), None, 3, 1, 1, 1, "banded")
    ctx = PassContext(target, (1, 16, 16, 16), {"tuning_cache": str(tmp_path / "t.json"),
                                                "program_runtime": get_target(target)})
    tuner = Tuner(ctx)
    choice, times, cached = tuner.choose_layer(layer, layer.pool, (16, 16), 1, dense=True)
    assert set(times) == {"banded", "dense"} and all(0 < t < 100 for t in times.values())
    assert choice == ("dense" if times["dense"] < times["banded"] * 1.05 else "banded") and not cached
    assert layer.pool.realization == "banded"        # the layer is left as it was
    tuner.save()
    assert list(json.loads((tmp_path / "t.json").read_text()))[0].startswith(f"{target}|{runtime} ")
    again = Tuner(ctx).choose_layer(layer, layer.pool, (16, 16), 1, dense=True)
    assert again == (choice, times, True)


def test_onnx_sources_are_refused(tmp_path):
    runner = CliRunner()
    # a model from elsewhere (its structure would be found in ONNX): refused, naming the targets that take it
    onnx_path = tmp_path / "m.onnx"
    torch.onnx.export(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), (torch.randn(1, 3, 8, 8),), str(onnx_path),
                      dynamo=False)
    res = runner.invoke(main, ["convert", str(onnx_path), "--target", "executorch", "-o", str(tmp_path / "b")])
    assert res.exit_code == 2, res.output
    assert "--target executorch lowers torch programs" in res.output and "an ONNX model" in res.output
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


# --------------------------------------------------------------------------- INT8

def test_rebase_channel_sums_keeps_outputs_and_the_band_form():
    """The torch rebase (one scaled sum, then differences of two channels) changes no output,
    with one channel group and with several; a layer without a channel window is left alone,
    and a rebased sum-pool refuses another realization (its small conv was changed)."""
    torch.manual_seed(0)
    for in_channels, groups, c in ((16, 1, 8), (16, 2, 4)):
        alpha = torch.randn(8, c, 2, 2)
        layer = decompose(in_channels, alpha, torch.randn(8), 3, 1, 1, groups, "banded").eval()
        x = torch.randn(2, in_channels, 9, 9)
        with torch.no_grad():
            before = layer(x)
            assert layer.rebase_channel_sums() is True
            after = layer(x)
        torch.testing.assert_close(after, before, atol=1e-4, rtol=1e-4)   # float32 sums of 8-16 terms
        kc = layer.pool.window[0]
        assert kc == in_channels // groups - c + 1
        band = layer.pool.band[:, :, 0, 0]
        assert torch.allclose(band[0, :kc], torch.full((kc,), kc ** -0.5))   # channel 0: sum / sqrt(kc)
        assert sorted(band[1].unique().tolist()) == [-1.0, 0.0, 1.0]          # the others: differences
        assert layer.rebase_channel_sums() is False                           # once only
        with pytest.raises(ValueError, match="rebased for INT8 keeps its banded form"):
            layer.pool.realization = "cumsum"
    spatial_only = decompose(4, torch.randn(4, 4, 2, 2), None, 3, 1, 1, 1, "banded")
    assert spatial_only.pool.window[0] == 1 and spatial_only.rebase_channel_sums() is False


@pytest.fixture(scope="module")
def int8_package(tmp_path_factory, repo_root, cifar10_dir):
    """The trained ResNet-20 C/2x2x2 in INT8 for ExecuTorch, the per-layer timings read from
    a cache written here under this machine's key (stage 1 slower structured): the test does
    not depend on the CPU and times nothing."""
    from structexport.executorch_int8 import layer_key
    from structexport.executorch_runtime import require_executorch
    from structexport.layers.decomposed import DecomposedStructuredConv
    from structexport.passes import PIPELINE, PassContext, PassManager, select_passes
    from structexport.passes.autotune import machine_key
    tmp = tmp_path_factory.mktemp("et-int8")
    source = load_checkpoint(str(repo_root / TRAINED)).model.eval()
    x = torch.randn(1, 3, 32, 32)
    rewritten, _ = PassManager(select_passes(PIPELINE), check_inputs=x).run(
        source, PassContext("executorch", (1, 3, 32, 32), {"sumpool_realization": "banded"}))
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
    key = machine_key(f"executorch {require_executorch()} int8 xnnpack", 1)
    (cache / "executorch-int8-layers.json").write_text(json.dumps({key: entries}))
    out = tmp / "pkg"
    r = CliRunner().invoke(main, [str(a) for a in (
        "convert", repo_root / TRAINED, "--target", "executorch", "--precision", "int8", "--calibration",
        cifar10_dir / "train-25k.npz", "--preprocess", "cifar10", "--calibration-count", "32",
        "--int8-gate-images", "100", "-o", out)], env={"STRUCTEXPORT_CACHE": str(cache)}, terminal_width=250)
    assert r.exit_code == 0, r.output
    return out, json.loads((out / "manifest.json").read_text()), " ".join(r.output.split())


@pytest.mark.slow   # the INT8 conversion takes a minute here: ExecuTorch lowers each quantized graph slowly
def test_int8_program_is_checked_gated_and_chosen_per_layer(int8_package):
    out, manifest, said = int8_package
    assert manifest["precision"] == "int8" and manifest["target"] == "executorch"
    q = manifest["int8"]
    choice = q["layer_choice"]
    assert choice["measured"] == 0 and choice["from_cache"] == 18
    dense = [row["layer"] for row in choice["layers"] if row["choice"] == "dense"]
    assert dense == [f"stage_1.{b}.conv_{c}" for b in range(3) for c in "ab"] == q["composed_dense"]
    assert len(q["rebased"]) == 12 and not set(q["rebased"]) & set(dense)
    assert "12 of 18 decomposed layers stay structured" in said
    checks = {d["file"]: d for d in manifest["deployed_verification"]}
    for name in ("model.pte", "reference.int8.pte"):
        assert checks[name]["passed"] and checks[name]["precision"] == "int8"
        assert checks[name]["rtol"] == 0.0 and 0 < checks[name]["atol"] < 2.0   # 8 output steps
        assert checks[name]["max_abs_diff"] <= checks[name]["atol"]
    assert checks["reference.pte"]["precision"] == "fp32" and checks["reference.pte"]["max_abs_diff"] < 1e-4
    gate = q["gate"]
    assert gate["images"] == 100 and gate["passed"] and gate["agreement"] >= 0.97
    assert q["dense_int8"]["gate"]["images"] == 100
    # All of it in XNNPACK: the quantized convs, bands and boxes; only the shortcut padding outside
    d = manifest["target_build"]["delegation"]
    assert d["structured_layers_not_delegated"] == [] and d["macs_delegated_share"] == 1.0


@pytest.mark.slow
def test_int8_program_is_integer_and_bench_compares_it_with_dense_int8(int8_package):
    from structexport.bench import BenchOptions, run_bench
    from structexport.package import Package
    out, manifest, _said = int8_package
    # an integer program: several times smaller than the float32 dense one for 4.33x fewer MACs
    assert (out / "model.pte").stat().st_size * 4 < (out / "reference.pte").stat().st_size
    stored = Package.load(out).dense_int8_expected()
    assert set(stored) == {"random:0", "random:1", "random:2"} and stored["random:0"][0].shape == (1, 10)
    result = run_bench(str(out), None, BenchOptions(target=None, repeat=3, warmup=1))
    assert result["precision"] == "int8" and "reference.int8.pte" in result["baseline"]
    assert result["dense_int8_latency_ms"]["median"] > 0
    assert result["speedup_measured"] == pytest.approx(
        result["dense_int8_latency_ms"]["median"] / result["latency_ms"]["median"])

