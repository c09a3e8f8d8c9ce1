"""The phone runtimes' programs on the emulated aarch64 device: a litert package's
``model.tflite`` under the aarch64 LiteRT wheel and an executorch package's ``model.pte``
under the aarch64 ExecuTorch runtime, both in the device's arm64 userland under qemu,
against the package's stored outputs and tolerances.

The slow tests install the emulated device on first use (~2 min, docs/emulated-arm.md) and
each runtime beside it (LiteRT ~15 MB; ExecuTorch ~18 MB plus a cross-compile).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from structexport import emulated_arm as emu
from structexport import emulated_programs as ep
from structexport.convert import ConvertOptions, convert

TRAINED = "models/checkpoints/trained/resnet20-struct-c2n2-sr-seed0.safetensors"


def test_cpuinfo_names_one_neoverse_n1_per_host_cpu():
    text = ep.cpuinfo_text([0, 1, 2])
    assert text.count("processor\t: ") == 3 and "processor\t: 2\n" in text
    assert text.count("CPU part\t: 0xd0c\n") == 3 and text.count("CPU implementer\t: 0x41\n") == 3
    assert ep.QEMU_CPU == "neoverse-n1"
    cpus = ep.host_cpus()
    assert cpus == sorted(set(cpus)) and len(cpus) >= 1


def test_a_package_of_another_target_is_refused(tmp_path):
    manifest = {"structexport_manifest": 2, "source": {}, "target": "ort-cpu", "precision": "fp32",
                "input_shape": [1, 3, 32, 32], "passes": [], "before": {}, "after": {},
                "verification": {}, "artifacts": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ep.EmulatedTargetUnsupportedError) as err:
        ep.verify_on_emulated_arm(tmp_path)
    assert err.value.exit_code == 2
    assert "has target 'ort-cpu'" in str(err.value) and "--target litert or --target executorch" in str(err.value)


def test_cli_verify_emulated_refuses_another_target_with_exit_2(tmp_path):
    from click.testing import CliRunner

    from structexport.cli import main
    manifest = {"structexport_manifest": 2, "source": {}, "target": "tvm-llvm", "precision": "fp32",
                "input_shape": [1, 3, 32, 32], "passes": [], "before": {}, "after": {},
                "verification": {}, "artifacts": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(main, ["device", "verify-emulated", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "has target 'tvm-llvm'" in result.output and "--target litert or --target executorch" in result.output


@pytest.mark.slow
def test_cli_verify_emulated_passes_and_labels_the_time(litert_package):
    from click.testing import CliRunner

    from structexport.cli import main
    result = CliRunner().invoke(main, ["device", "verify-emulated", str(litert_package), "--runs", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["passed"] is True and report["timing"]["label"] == "emulated" and report["timing"]["runs"] == 2


@pytest.fixture(scope="module")
def litert_package(tmp_path_factory, repo_root) -> Path:
    emu.ensure_installed()
    out = tmp_path_factory.mktemp("emulated-litert") / "pkg"
    convert(str(repo_root / TRAINED), out, options=ConvertOptions(target="litert"))
    return out


def _assert_verified(result: dict, program: str, runtime: str) -> None:
    assert result["program"] == program and result["machine"] == "aarch64" and result["emulated"] is True
    assert result["cpu"] == "neoverse-n1" and result["runtime"].startswith(runtime)
    assert result["precision"] == "fp32" and result["atol"] == 1e-4 and result["rtol"] == 1e-4
    # the three stored inputs, one [1, 10] output each, within the package's tolerance
    assert len(result["checks"]) == 3
    assert all(c["passed"] and c["got_shape"] == [1, 10] for c in result["checks"])
    assert result["passed"] is True and 0 <= result["max_abs_diff"] < 1e-4
    assert result["max_abs_diff"] == max(c["max_abs_diff"] for c in result["checks"])
    timing = result["timing"]
    assert timing["label"] == "emulated" and timing["runs"] == 3 and timing["threads"] == 1
    assert 0 < timing["min_ms"] <= timing["median_ms"] <= timing["max_ms"]


@pytest.mark.slow
def test_litert_program_verifies_on_the_emulated_device(litert_package):
    result = ep.verify_on_emulated_arm(litert_package, runs=3)
    _assert_verified(result, "model.tflite", "LiteRT 2.3.0 (XNNPACK), aarch64")
    assert ep.runtime_installed("litert")


@pytest.mark.slow
def test_executorch_program_verifies_on_the_emulated_device(tmp_path_factory, repo_root):
    emu.ensure_installed()
    out = tmp_path_factory.mktemp("emulated-executorch") / "pkg"
    convert(str(repo_root / TRAINED), out, options=ConvertOptions(target="executorch"))
    result = ep.verify_on_emulated_arm(out, runs=3)
    _assert_verified(result, "model.pte", "ExecuTorch 1.5.1 (XNNPACK), aarch64")
    assert ep.runtime_installed("executorch") and (ep.executorch_dir() / "et_runner").is_file()


@pytest.mark.slow
def test_outputs_that_differ_from_the_stored_ones_fail(litert_package, tmp_path):
    """The comparison is real: with one stored output moved by 0.01, the same program fails
    on that input only, by that much."""
    out = tmp_path / "pkg"
    shutil.copytree(litert_package, out)
    path = out / "verification.npz"
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    key = sorted(k for k in arrays if k.startswith("output/"))[0]
    arrays[key] = arrays[key] + np.float32(0.01)
    np.savez(path, **arrays)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"]["verification.npz"].update(
        bytes=path.stat().st_size, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    (out / "manifest.json").write_text(json.dumps(manifest))
    result = ep.verify_on_emulated_arm(out, runs=1)
    assert result["passed"] is False
    assert [c["passed"] for c in result["checks"]] == [False, True, True]
    assert 0.0099 < result["max_abs_diff"] < 0.0101


def test_nothing_is_installed_in_an_empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTEXPORT_CACHE", str(tmp_path / "cache"))
    assert not emu.is_installed()
    assert not ep.runtime_installed("litert") and not ep.runtime_installed("executorch")
    assert ep.programs_root() == tmp_path / "cache" / "emulated-arm" / "programs-root"
    with pytest.raises(ep.EmulatedTargetUnsupportedError) as err:
        ep.ensure_runtime_installed("tvm")
    assert err.value.exit_code == 2 and "one of litert, executorch" in str(err.value)
