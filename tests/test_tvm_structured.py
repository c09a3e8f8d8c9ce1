"""The TVM targets compile structured convs fused by default (structexport.tvm_fused: the
sum-pool in one hand-scheduled kernel feeding the small conv, built from the composed
graph convert hands over) and, with --tvm-structured decomposed, as the decomposed ONNX
graph's operators. Both libraries verify against the source and agree with each other;
bench's dense counterpart is never fused (it has no composed graph). The operator itself
is tested in tests/test_tvm_fused.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from structexport.cli import main
from structexport.layers.decomposed import decompose, recompose

pytest.importorskip("tvm")

REPO = Path(__file__).resolve().parents[1]
STRUCT = REPO / "benchmarks" / "baselines" / "resnet20-struct-c2n2.safetensors"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("tvm-structured")
    out = {}
    for mode in ("fused", "decomposed"):
        r = cli("convert", STRUCT, "--target", "tvm-llvm", "--tvm-structured", mode, "-o", root / mode)
        assert r.exit_code == 0, r.output
        out[mode] = json.loads((root / mode / "manifest.json").read_text())
    return root, out


def test_recompose_gives_plain_convs_that_compute_the_same(tmp_path):
    torch.manual_seed(0)
    for C, O, N, c, n, stride, pad, groups in [(16, 8, 3, 8, 2, 1, 1, 1), (16, 16, 3, 4, 2, 2, 1, 2),
                                               (8, 8, 5, 8, 3, 1, 2, 1), (12, 6, 1, 6, 1, 1, 0, 1)]:
        alpha = torch.randn(O, c, n, n, dtype=torch.float64)
        layer = decompose(C, alpha, torch.randn(O, dtype=torch.float64), N, stride, pad, groups).double()
        plain = recompose(torch.nn.Sequential(layer))[0]
        assert isinstance(plain, torch.nn.Conv2d) and plain.kernel_size == (N, N)
        assert (plain.stride, plain.padding, plain.groups) == ((stride, stride), (pad, pad), groups)
        x = torch.randn(2, C, 9, 11, dtype=torch.float64)
        assert float((plain(x) - layer(x)).abs().max()) < 1e-10


def test_the_default_fuses_every_structured_conv_and_verifies(builds):
    root, m = builds
    sc = m["fused"]["target_build"]["structured_convs"]
    assert sc["mode"] == "fused" and sc["convs"] == 19 and sc["fused"] == 18   # the stem has no structure
    # C/2 x 2 x 2 on every 3x3 conv but the stem, found in the composed kernels
    assert all(r["structure"] == [r["weight_shape"][1] // 2, 2] for r in sc["layers"] if r["fused"])
    assert sc["macs_after"] * 4 < sc["macs_before"]
    assert m["fused"]["target_verification"]["passed"] is True
    assert m["fused"]["target_verification"]["max_abs_diff"] < 1e-4
    assert "18 structured convs fused" in m["fused"]["artifacts"]["model.so"]["description"]
    # the graph the library was compiled from, kept for profile: plain convs, no sum-pool
    import onnx
    composed = onnx.load(str(root / "fused" / "composed.onnx"))
    ops = {n.op_type for n in composed.graph.node}
    assert "Conv" in ops and not ops & {"CumSum", "AveragePool"}
    assert sum(n.op_type == "Conv" for n in composed.graph.node) == sc["convs"] == 19
    assert m["fused"]["artifacts"]["composed.onnx"]["bytes"] == (root / "fused" / "composed.onnx").stat().st_size
    assert "composed.onnx" not in m["decomposed"]["artifacts"]
    assert not (root / "decomposed" / "composed.onnx").exists()


def test_decomposed_mode_builds_the_decomposed_graph_and_both_agree(builds):
    import tvm
    from tvm import relax
    root, m = builds
    assert m["decomposed"]["target_build"]["structured_convs"]["mode"] == "decomposed"
    assert m["decomposed"]["target_verification"]["passed"] is True
    data = np.load(root / "fused" / "verification.npz")
    x = data["input/random:0"]
    outs = {}
    for mode in ("fused", "decomposed"):
        vm = relax.VirtualMachine(tvm.runtime.load_module(str(root / mode / "model.so")), tvm.cpu())
        outs[mode] = vm["main"](tvm.runtime.tensor(x)).numpy()
    assert np.abs(outs["fused"] - outs["decomposed"]).max() < 1e-4
    assert np.abs(outs["fused"] - data["output/random:0/0"]).max() < 1e-4


def test_bench_builds_the_dense_counterpart_unfused(builds, tmp_path):
    root, _ = builds
    r = cli("bench", root / "fused", "--repeat", 3, "--warmup", 1, "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    b = json.loads((tmp_path / "b.json").read_text())
    assert b["dense_target_build"]["structured_convs"]["mode"] == "decomposed"
    assert b["speedup_theoretical"] > 4


def test_an_unknown_mode_is_a_usage_error(tmp_path):
    r = cli("convert", STRUCT, "--target", "tvm-llvm", "--tvm-structured", "magic", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "fused" in r.output
    r = cli("convert", STRUCT, "--target", "ort-cpu", "--tvm-structured", "fused", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "--tvm-structured" in r.output and not (tmp_path / "o").exists()


def test_cuda_compiles_the_decomposed_graph(tmp_path):
    """The fused sum-pool kernel is scheduled for CPUs only: tvm-cuda keeps the decomposed
    graph, and asking it to fuse is a usage error naming the fix."""
    from structexport.targets import get_target
    assert get_target("tvm-cuda", {}).structured_mode() == "decomposed"
    assert not get_target("tvm-cuda", {}).wants_composed_graph()
    r = cli("convert", STRUCT, "--target", "tvm-cuda", "--tvm-structured", "fused", "-o", tmp_path / "o")
    assert r.exit_code == 2 and "no GPU schedule yet" in r.output and "--tvm-structured decomposed" in r.output
    assert not (tmp_path / "o").exists()


def test_bench_with_the_other_mode_converts_again(builds, tmp_path):
    root, _ = builds
    r = cli("bench", root / "fused", "--tvm-structured", "decomposed", "--repeat", 3, "--warmup", 1,
            "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    notes = json.loads((tmp_path / "b.json").read_text())["workload"]["notes"]
    assert any("--tvm-structured decomposed (its library has them fused)" in n for n in notes), notes


def _profile(path, out: Path, *extra):
    r = cli("profile", path, "--repeat", 3, "--warmup", 1, "--no-peak", "-o", out.with_suffix(".html"), *extra)
    assert r.exit_code == 0, r.output
    return json.loads(out.with_suffix(".json").read_text())


def test_profile_compiles_the_fused_operator_as_the_library_was(builds, tmp_path):
    """A fused package is profiled with its structured convs fused (from composed.onnx):
    each layer's time is its sum-pool kernel plus its small conv, mapped to the layer; a
    decomposed package is profiled from model.onnx's operators. The multiply counts are
    model.onnx's either way, so the theoretical speedup is the same."""
    root, m = builds
    fused = _profile(root / "fused", tmp_path / "f.json")
    decomposed = _profile(root / "decomposed", tmp_path / "d.json")
    assert "structured convs fused (18)" in fused["runtime"]
    assert "structured convs decomposed" in decomposed["runtime"]
    assert any("composed.onnx" in n for n in fused["notes"])
    assert fused["speedup_theoretical"] == pytest.approx(decomposed["speedup_theoretical"])
    assert fused["speedup_theoretical"] == pytest.approx(m["fused"]["dense"]["macs"] / m["fused"]["after"]["macs"], rel=1e-3)
    layers = {r["layer"]: r for r in fused["layers"] if r["kind"] == "layer"}
    structured = [r for r in m["fused"]["target_build"]["structured_convs"]["layers"] if r["fused"]]
    pooled = [name for name, r in layers.items() if any(op.startswith("structured_sum_pool")
                                                          for op in r["structured_ops"])]
    assert len(pooled) == len(structured) == 18          # every fused layer owns its pool kernel
    for name in pooled:
        ops = layers[name]["structured_ops"]
        assert any("conv2d" in op for op in ops), (name, ops)   # and its small conv
    assert fused["totals"]["structured"]["unmapped_ms"] == 0
    assert not any(op.startswith("structured_sum_pool")
                   for r in decomposed["layers"] for op in r["structured_ops"])


def test_profile_over_rpc_times_the_fused_kernels_on_the_device(builds, host_rpc_server, tmp_path):
    """Over RPC each PrimFunc is timed on its own: the hand-scheduled pool kernel builds and
    runs there too, and every call maps to a layer."""
    root, _ = builds
    _, server = host_rpc_server
    report = _profile(root / "fused", tmp_path / "remote.json", "--rpc", server)
    assert report["device"] == f"device at {server}"
    assert any("composed.onnx" in n for n in report["notes"])
    pools = [r for r in report["layers"] if any(op.startswith("structured_sum_pool")
                                                 for op in r["structured_ops"])]
    assert len(pools) == 18 and report["totals"]["structured"]["unmapped_ms"] == 0
