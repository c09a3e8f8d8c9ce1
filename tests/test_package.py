"""Self-contained packages: a converted OUTDIR benches, profiles and verifies on its own
(no source checkpoint), loads as one typed object, and a missing, corrupt or
incompatible package is one clear line with its exit code. Plus the one workload
resolver: each checkpoint loaded once, trust flags on every command that reads one."""
from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from structexport import loader
from structexport.bench import BenchOptions, run_bench
from structexport.cli import main
from structexport.costmodel import node_costs, totals
from structexport.loader import save_checkpoint
from structexport.models import build_model
from structexport.package import Package, PackageCorruptError, PackageIncompatibleError

ARCH = "resnet20-struct-c2n2"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def package_dir(tmp_path_factory):
    """A package converted from a checkpoint that is then deleted, copied to a new folder."""
    root = tmp_path_factory.mktemp("pkg")
    ckpt = save_checkpoint(build_model(ARCH, 0), root / "model.safetensors")
    r = cli("convert", ckpt, "--target", "ort-cpu", "-o", root / "built")
    assert r.exit_code == 0, r.output
    copied = root / "elsewhere" / "copied"
    shutil.copytree(root / "built", copied)
    ckpt.unlink()
    shutil.rmtree(root / "built")
    return copied


def test_package_holds_reference_and_verification_data(package_dir):
    package = Package.load(package_dir)
    assert package.self_contained and package.source_checkpoint is None
    assert package.arch == ARCH and package.target == "ort-cpu" and package.input_shape == (1, 3, 32, 32)
    m = package.manifest
    for key in ("before", "after", "verification", "target_verification", "artifacts"):
        assert key in m   # kept for compatibility
    assert m["structexport_manifest"] == 2
    assert m["before"]["macs"] >= m["after"]["macs"] > 0
    assert {"model.onnx", "reference.onnx", "verification.npz"} <= set(m["artifacts"])
    assert m["reference"]["verification"]["passed"] is True
    inputs, expected = package.verification_arrays()
    assert sorted(inputs) == ["random:0", "random:1", "random:2"]
    assert expected["random:0"][0].shape == (1, 10)
    # The stored outputs are the source model's: the reference reproduces them.
    import onnxruntime as ort
    session = ort.InferenceSession(str(package.reference_onnx), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: inputs["random:1"]})[0]
    np.testing.assert_allclose(got, expected["random:1"][0], atol=1e-4, rtol=1e-4)
    assert [layer["name"] for layer in package.layers][:2] == ["conv_1_3x3", "stage_1.0.conv_a"]


def test_copied_package_benches_without_its_checkpoint(package_dir, tmp_path):
    out = tmp_path / "bench.json"
    r = cli("bench", package_dir, "--repeat", "5", "--warmup", "1", "--json", out)
    assert r.exit_code == 0, r.output
    result = json.loads(out.read_text())
    package = Package.load(package_dir)
    # The theoretical speedup is that of the package's own two graphs.
    want = {"structured": totals(node_costs(package.model_onnx))["macs"],
            "dense": totals(node_costs(package.reference_onnx))["macs"]}
    assert result["macs"] == want and want["dense"] > 2 * want["structured"]
    assert result["speedup_theoretical"] == pytest.approx(want["dense"] / want["structured"])
    assert result["workload"]["origin"] == "outdir" and result["workload"]["package"] == str(package_dir)
    for key in ("speedup_measured", "speedup_theoretical", "realization_efficiency"):
        assert result[key] > 0


def test_copied_package_profiles_without_its_checkpoint(package_dir, tmp_path):
    r = cli("profile", package_dir, "--repeat", "4", "--warmup", "1", "--no-peak",
            "-o", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["source"]["outdir"] == str(package_dir)
    assert "stage_1.0.conv_a" in {row["layer"] for row in report["layers"]}


def test_package_that_needs_reconverting_without_its_checkpoint_names_the_fix(package_dir):
    r = cli("bench", package_dir, "--batch", "2", "--repeat", "3")
    assert r.exit_code == 39
    assert "input shape [2, 3, 32, 32]" in r.output and "pass the checkpoint itself" in r.output
    r = cli("bench", package_dir, "--sumpool-realization", "avgpool3d", "--repeat", "3")
    assert r.exit_code == 39 and "--sumpool-realization avgpool3d" in r.output


def _broken(package_dir, tmp_path, name):
    bad = tmp_path / name
    shutil.copytree(package_dir, bad)
    return bad


def test_missing_corrupt_and_incompatible_packages_are_one_line_each(package_dir, tmp_path):
    assert cli("bench", tmp_path / "nope").exit_code == 10
    empty = tmp_path / "empty"
    empty.mkdir()
    r = cli("bench", empty)
    assert r.exit_code == 11 and "manifest.json" in r.output

    bad = _broken(package_dir, tmp_path, "json")
    (bad / "manifest.json").write_text("{not json")
    r = cli("bench", bad)
    assert r.exit_code == 38 and "not valid JSON" in r.output and "Traceback" not in r.output

    bad = _broken(package_dir, tmp_path, "truncated")
    data = (bad / "reference.onnx").read_bytes()
    (bad / "reference.onnx").write_bytes(data[: len(data) // 2])
    r = cli("bench", bad)
    assert r.exit_code == 38 and "reference.onnx" in r.output and "truncated" in r.output

    bad = _broken(package_dir, tmp_path, "tampered")
    data = bytearray((bad / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    r = cli("bench", bad)
    assert r.exit_code == 38 and "SHA-256" in r.output

    bad = _broken(package_dir, tmp_path, "missing")
    (bad / "verification.npz").unlink()
    r = cli("profile", bad, "--no-peak", "-o", tmp_path / "x.html")
    assert r.exit_code == 38 and "verification.npz is missing" in r.output

    bad = _broken(package_dir, tmp_path, "future")
    m = json.loads((bad / "manifest.json").read_text())
    m["structexport_manifest"] = 99
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageIncompatibleError, match="version 99"):
        Package.load(bad)
    assert cli("bench", bad).exit_code == 39

    bad = _broken(package_dir, tmp_path, "keys")
    m = json.loads((bad / "manifest.json").read_text())
    del m["verification"]
    (bad / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(PackageCorruptError, match="lacks verification"):
        Package.load(bad)


def test_a_package_whose_model_no_longer_matches_its_outputs_is_refused(package_dir, tmp_path):
    bad = _broken(package_dir, tmp_path, "outputs")
    with np.load(bad / "verification.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["output/random:0/0"] = arrays["output/random:0/0"] + 1.0
    np.savez(bad / "verification.npz", **arrays)
    m = json.loads((bad / "manifest.json").read_text())
    m["artifacts"]["verification.npz"].update(bytes=(bad / "verification.npz").stat().st_size, sha256=None)
    (bad / "manifest.json").write_text(json.dumps(m))
    r = cli("bench", bad, "--repeat", "3")
    assert r.exit_code == 32 and "no longer reproduces" in r.output


def test_each_checkpoint_is_loaded_once_per_run(tmp_path, monkeypatch):
    ckpt = save_checkpoint(build_model(ARCH, 0), tmp_path / "m.safetensors")
    calls = []
    real = loader.load_checkpoint

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(loader, "load_checkpoint", counting)
    result = run_bench(str(ckpt), None, BenchOptions(repeat=3, warmup=0))
    assert calls == [str(ckpt)]
    assert result["workload"]["origin"] == "checkpoint"


def test_trust_flags_work_on_bench_and_profile(tmp_path):
    """A training checkpoint with a plain Python object beside the weights needs
    --trust-pickle on every command that reads it, not only convert."""
    path = tmp_path / "train.pt"
    torch.save({"state_dict": build_model("resnet20", 0).state_dict(),
                "args": argparse.Namespace(lr=0.1)}, path)
    r = cli("bench", path, "--arch", "resnet20", "--repeat", "3")
    assert r.exit_code == 15 and "--trust-pickle" in r.output
    r = cli("bench", path, "--arch", "resnet20", "--repeat", "3", "--warmup", "0", "--trust-pickle")
    assert r.exit_code == 0, r.output
    r = cli("profile", path, "--arch", "resnet20", "--no-peak", "-o", tmp_path / "r.html")
    assert r.exit_code == 15 and "--trust-pickle" in r.output
    r = cli("profile", path, "--arch", "resnet20", "--repeat", "3", "--warmup", "0", "--no-peak",
            "--trust-pickle", "-o", tmp_path / "r.html")
    assert r.exit_code == 0, r.output
