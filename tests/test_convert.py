"""`convert` end to end: every published fixture converts, verifies, and the converted ONNX
model reproduces the reference implementation under ONNX Runtime; bad input leaves nothing."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

import reference_impl as R
from structexport.cli import main
from structexport.convert import ConvertOptions, convert
from structexport.ortsession import ort_session
from structexport.loader import save_checkpoint
from structexport.models import build_model
from structexport.analysis import summarize

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "associativeconv"
# fixture -> (--arch base name, reference tolerance of the outside check)
CASES = {
    "resnet56.t7": ("resnet56", 1e-4),
    "resnet56-csg-12x12x3x3-72.t7": ("resnet56", 1e-4),
    "resnet56-csg-16x16x3x3-128.t7": ("resnet56", 1e-4),
    "resnet56-csg-16x16x3x3-128-fp16.t7": ("resnet56", 1e-3),
    "resnet20-csg-16x16x3x3-72.t7": ("resnet20", 1e-4),
    "densenet-bc-40-36-csg-12x12x3x3-72.t7": ("densenet-bc-40-36", 1e-4),
    "densenet-bc-40-48-csg-12x12x3x3-72-fp16.t7": ("densenet-bc-40-48", 1e-3),
    "shufflenetv2-0.5x.t7": ("shufflenetv2-0.5x", 1e-4),
    "shufflenetv2-0.5x-csg-16x16x1x1-16.t7": ("shufflenetv2-0.5x", 1e-4),
}


def _cifar_like(n: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    img = torch.rand(n, 3, 32, 32, generator=g)
    mean = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
    std = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)
    return (img - mean) / std


def _ort_outputs(path: Path, x: torch.Tensor) -> np.ndarray:
    session = ort_session(path, optimize=False)
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 1].numpy()})[0] for i in range(len(x))])


def _ops(path: Path) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path)).graph.node)


def _averagepool3d(path: Path) -> list[str]:
    """AveragePool nodes over three spatial axes (the naive sum-pool)."""
    found = []
    for node in _ops(path):
        if node.op_type == "AveragePool":
            kernel = [list(a.ints) for a in node.attribute if a.name == "kernel_shape"][0]
            if len(kernel) == 3:
                found.append(node.name)
    return found


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Each fixture converted once for ort-cpu."""
    assert FIXTURES.is_dir(), f"fixtures missing at {FIXTURES}"
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name, (arch, _) in CASES.items():
        out[name] = convert(str(FIXTURES / name), root / name, arch, ConvertOptions(target="ort-cpu"))
    return out


@pytest.mark.parametrize("name", sorted(CASES))
def test_fixture_converts_verifies_and_matches_the_reference(converted, name):
    result = converted[name]
    manifest = json.loads((result.outdir / "manifest.json").read_text())
    assert manifest["verification"]["passed"] is True
    assert len(manifest["verification"]["checks"]) == 3
    assert manifest["verification"]["max_abs_diff"] < 1e-4
    assert manifest["source"]["sha256"] == hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest()
    assert set(manifest["artifacts"]) == {"model.onnx", "model.optimized.onnx", "model.ort",
                                          "reference.onnx", "verification.npz"}
    assert manifest["structexport_manifest"] == 2 and manifest["reference"]["verification"]["passed"]
    for artifact, info in manifest["artifacts"].items():
        assert (result.outdir / artifact).stat().st_size == info["bytes"]
    # The outside acceptance check, on the converted model: reference code vs ONNX Runtime.
    x = _cifar_like()
    want = R.forward(R.raw_state(FIXTURES / name), x, torch.float64)
    got = torch.from_numpy(_ort_outputs(result.outdir / "model.onnx", x)).double()
    rel = float((got - want).norm() / want.norm())
    assert rel <= CASES[name][1], rel
    assert torch.equal(got.argmax(1), want.argmax(1))


@pytest.mark.parametrize("name", sorted(CASES))
def test_converted_csg_graphs_hold_no_generator_arithmetic(converted, name):
    path = converted[name].outdir / "model.onnx"
    assert "MatMul" not in {n.op_type for n in _ops(path)}
    assert _averagepool3d(path) == []
    manifest = converted[name].manifest
    csg = [r for r in manifest["passes"] if r["name"] == "materialize_csg"][0]
    assert csg["modified"] == ("-csg-" in name)


def test_keep_csg_codes_artifact_is_at_most_055_of_materialized(tmp_path):
    ckpt = str(FIXTURES / "resnet56-csg-16x16x3x3-128.t7")
    full = convert(ckpt, tmp_path / "full", "resnet56", ConvertOptions(target="onnx"))
    small = convert(ckpt, tmp_path / "codes", "resnet56",
                    ConvertOptions(target="onnx", pass_options={"keep_csg_codes": True}))
    ratio = small.manifest["artifacts"]["model.onnx"]["bytes"] / full.manifest["artifacts"]["model.onnx"]["bytes"]
    assert ratio <= 0.55, ratio
    assert small.manifest["verification"]["passed"]
    assert "MatMul" in {n.op_type for n in _ops(tmp_path / "codes" / "model.onnx")}


def test_structured_model_has_no_averagepool3d_for_ort_cpu(tmp_path):
    model = build_model("resnet20-struct-c2n2", seed=1)
    ckpt = save_checkpoint(model, tmp_path / "s.safetensors")
    result = convert(str(ckpt), tmp_path / "out", None, ConvertOptions(target="ort-cpu"))
    assert _averagepool3d(tmp_path / "out" / "model.onnx") == []
    assert not [n for n in _ops(tmp_path / "out" / "model.onnx") if n.op_type == "AveragePool"]
    dense_macs = summarize(build_model("resnet20"), (1, 3, 32, 32))["macs"]
    assert result.manifest["after"]["macs"] == result.manifest["before"]["macs"] < dense_macs * 0.4
    assert result.manifest["after"]["sumpool_adds"] > 0
    # the dense form (reference.onnx) is the zoo's dense resnet20, MAC for MAC
    assert result.manifest["dense"]["macs"] == dense_macs
    assert result.manifest["dense"]["sumpool_adds"] == 0
    decomposed = [r for r in result.manifest["passes"] if r["name"] == "decompose_structured"][0]
    assert len(decomposed["records"]) == 18


def test_user_inputs_file_is_verified(tmp_path):
    ckpt = FIXTURES / "resnet20-csg-16x16x3x3-72.t7"
    npz = tmp_path / "x.npz"
    np.savez(npz, a=_cifar_like(1).numpy(), b=_cifar_like(1).numpy()[0])
    result = convert(str(ckpt), tmp_path / "out", "resnet20",
                     ConvertOptions(target="onnx", inputs_file=str(npz)))
    labels = {c["input"] for c in result.manifest["verification"]["checks"]}
    assert {"user:a", "user:b"} <= labels


# ---------------------------------------------------------------------------- bad input

def _cli(*args):
    return CliRunner().invoke(main, ["convert", *args])


def _assert_one_line(result, code, *fragments):
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def _nothing_left(parent: Path, outdir_name: str) -> None:
    left = [p.name for p in parent.iterdir() if outdir_name in p.name]
    assert left == [], left


SMALL = str(FIXTURES / "resnet20-csg-16x16x3x3-72.t7")


def test_unknown_arch(tmp_path):
    _assert_one_line(_cli(SMALL, "--arch", "resnet21", "-o", str(tmp_path / "o")), 19, "resnet21")
    _nothing_left(tmp_path, "o")


def test_shape_the_model_cannot_take(tmp_path):
    r = _cli(SMALL, "--arch", "resnet20", "-o", str(tmp_path / "o"), "--input-shape", "1,4,32,32")
    _assert_one_line(r, 34, "cannot take an input of shape [1, 4, 32, 32]")
    _nothing_left(tmp_path, "o")
    r = _cli(SMALL, "--arch", "resnet20", "-o", str(tmp_path / "o"), "--input-shape", "1,3,x")
    _assert_one_line(r, 34, "bad --input-shape")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere; covered by the missing-parent case")
def test_unwritable_outdir(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    _assert_one_line(_cli(SMALL, "--arch", "resnet20", "-o", str(locked / "o")), 33, "permission denied")


def test_outdir_under_a_file_or_that_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    _assert_one_line(_cli(SMALL, "--arch", "resnet20", "-o", str(f / "o")), 33, "is not a directory")
    _assert_one_line(_cli(SMALL, "--arch", "resnet20", "-o", str(f)), 33, "not a directory")
    assert f.read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["file"]


def test_missing_parents_are_created_and_removed_again_on_failure(tmp_path):
    deep = tmp_path / "a" / "b" / "o"
    r = _cli(SMALL, "--arch", "resnet20", "-o", str(deep), "--atol", "0", "--rtol", "0")
    assert r.exit_code == 32
    assert list(tmp_path.iterdir()) == []
    r = _cli(SMALL, "--arch", "resnet20", "-o", str(deep))
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in deep.iterdir()) == ["manifest.json", "model.onnx", "reference.onnx",
                                                         "verification.npz"]


def test_inputs_file_with_wrong_shapes(tmp_path):
    npz = tmp_path / "bad.npz"
    np.savez(npz, x=np.zeros((1, 3, 16, 16), np.float32))
    r = _cli(SMALL, "--arch", "resnet20", "-o", str(tmp_path / "o"), "--inputs", str(npz))
    _assert_one_line(r, 37, "has shape [1, 3, 16, 16]", "[1, 3, 32, 32]")
    _nothing_left(tmp_path, "o")


def test_failed_verification_writes_nothing_and_keeps_the_old_outdir(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    r = _cli(SMALL, "--arch", "resnet20", "-o", str(out), "--atol", "0", "--rtol", "0")
    _assert_one_line(r, 32, "verification failed", "max abs diff", "--force")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["o"]
    # --force writes the artifact and the manifest records the failure
    r = _cli(SMALL, "--arch", "resnet20", "-o", str(out), "--atol", "0", "--rtol", "0", "--force", "--json")
    assert r.exit_code == 32
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["verification"]["passed"] is False
    assert not (out / "keep.txt").exists()


def test_unknown_pass_and_skip_pass(tmp_path):
    _assert_one_line(_cli(SMALL, "--arch", "resnet20", "-o", str(tmp_path / "o"), "--skip-pass", "nope"),
                     36, "unknown pass 'nope'", "materialize_csg")
    r = _cli(SMALL, "--arch", "resnet20", "-o", str(tmp_path / "o"), "--skip-pass", "materialize_csg",
             "--json")
    assert r.exit_code == 0, r.output
    manifest = json.loads(r.stdout)
    assert [p["name"] for p in manifest["passes"]] == ["decompose_structured", "realize_sumpool",
                                                       "lower_ssc", "fold_batchnorm"]
    assert manifest["verification"]["passed"]


def test_fp16_precision_exports_half_and_verifies_with_fp16_tolerances(tmp_path):
    result = convert(SMALL, tmp_path / "o", "resnet20", ConvertOptions(target="onnx", precision="fp16"))
    v = result.manifest["verification"]
    assert v["passed"] and (v["atol"], v["rtol"]) == (2e-2, 2e-2)
    model = onnx.load(str(tmp_path / "o" / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert result.manifest["precision"] == "fp16"
    assert 0 < v["max_abs_diff"] < 2e-2


def test_tvm_llvm_target_builds_a_library_that_verifies_on_the_host(tmp_path):
    import tvm
    from tvm import relax
    result = convert(SMALL, tmp_path / "o", "resnet20", ConvertOptions(target="tvm-llvm"))
    m = result.manifest
    assert m["verification"]["passed"] and m["target_verification"]["passed"]
    assert m["target_verification"]["max_abs_diff"] < 1e-4
    assert "TVM" in m["target_verification"]["runtime"]
    # this host's CPU is named: without mcpu LLVM emits no AVX at all
    from structexport.machine import llvm_host_cpu
    host = llvm_host_cpu()
    assert host, "TVM names no host CPU"
    assert json.loads((tmp_path / "o" / "tvm_target.json").read_text()) == {"kind": "llvm", "mcpu": host}
    assert m["target_build"]["tvm_target"]["mcpu"] == host and host in m["target_build"]["runs_on"]
    # the library runs on its own and reproduces the reference implementation
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(tmp_path / "o" / "model.so")), tvm.cpu())
    x = _cifar_like(1)
    got = torch.from_numpy(vm["main"](tvm.runtime.tensor(x.numpy())).numpy()).double()
    want = R.forward(R.raw_state(FIXTURES / "resnet20-csg-16x16x3x3-72.t7"), x, torch.float64)
    assert float((got - want).norm() / want.norm()) < 1e-4


def test_tvm_cuda_target_compiles_here_and_verifies_where_a_gpu_is(tmp_path):
    import tvm
    result = convert(SMALL, tmp_path / "o", "resnet20", ConvertOptions(target="tvm-cuda"))
    m = result.manifest
    assert json.loads((tmp_path / "o" / "tvm_target.json").read_text())["kind"] == "cuda"
    assert (tmp_path / "o" / "model.so").stat().st_size == m["artifacts"]["model.so"]["bytes"] > 0
    if tvm.cuda(0).exist:
        assert m["target_verification"]["passed"] is True
    else:  # recorded as not run, never as passed
        assert m["target_verification"]["passed"] is None
        assert "no CUDA GPU" in m["target_verification"]["skipped"]
    assert result.verified
