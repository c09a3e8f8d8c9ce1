"""`regress --against BASE CANDIDATE`: A/B on this machine, judged on candidate/base ratios.

BASE is a package converted from a checkpoint; SAME is that checkpoint converted again in
the run (or a copy of the package); SLOW is the same model converted with AveragePool-3D
sum-pools, several times slower on every CPU (2.2x to 5.5x per layer here), so the verdict
does not depend on which CPU runs the test."""
from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import pytest
from click.testing import CliRunner

from structexport.cli import main
from structexport.loader import save_checkpoint
from structexport.models import build_model
from structexport.regress.ab import ABReport, Verdict, verdict_line

ARCH = "resnet20-struct-c2n2"


def cli(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab")
    ckpt = save_checkpoint(build_model(ARCH, 0), root / "model.safetensors")
    for name, extra in (("base", []), ("slow", ["--sumpool-realization", "avgpool3d"])):
        r = cli("convert", ckpt, "--target", "ort-cpu", "-o", root / name, *extra)
        assert r.exit_code == 0, r.output
    shutil.copytree(root / "base", root / "copy")
    return root


def test_same_model_passes(builds, tmp_path):
    r = cli("regress", "--against", builds / "base", builds / "model.safetensors", "--retries", "2",
            "--junit", tmp_path / "r.xml", "--markdown", tmp_path / "r.md", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    assert "PASS: candidate/base" in r.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["passed"] is True and result["exit_code"] == 0 and result["mode"] == "against"
    assert 0.9 <= result["whole"]["ratio"] <= 1.1
    judged = [layer for layer in result["layers"] if layer["tolerance"] is not None]
    assert judged and all(layer["status"] != "slower" for layer in judged)
    assert all(layer["share"] >= 0.03 for layer in judged)
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    assert suite.get("failures") == "0" and suite.get("errors") == "0"
    assert (tmp_path / "r.md").read_text().startswith("## structexport regress --against: PASS")


def test_package_against_its_copy_passes(builds):
    r = cli("regress", "--against", builds / "base", builds / "copy", "--no-per-layer", "--retries", "2")
    assert r.exit_code == 0, r.output


def test_avgpool3d_sumpools_fail_and_name_the_slower_layers(builds, tmp_path):
    r = cli("regress", "--against", builds / "base", builds / "slow", "--junit", tmp_path / "r.xml",
            "--json", tmp_path / "r.json")
    assert r.exit_code == 1, r.output
    assert "FAIL: the whole model is" in r.output and "layer(s) slower" in r.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["whole"]["ratio"] > 1.5 and result["whole"]["status"] == "slower"
    assert result["remeasured"] is True            # a failure is measured again before it counts
    slower = {layer["name"] for layer in result["layers"] if layer["status"] == "slower"}
    assert "stage_3.0.conv_b" in slower            # a structured 3x3 layer that got the 3-D pool
    assert "classifier" not in slower
    suite = ET.parse(tmp_path / "r.xml").getroot().find("testsuite")
    failures = [c for c in suite.iter("testcase") if c.find("failure") is not None]
    assert {c.get("name") for c in failures} == {"whole model", *slower}


def test_usage_errors_exit_2_with_one_line(builds, tmp_path):
    r = cli("regress", "--against", builds / "base", tmp_path / "nope.safetensors")
    assert r.exit_code == 2 and "CANDIDATE" in r.output and "does not exist" in r.output
    other = save_checkpoint(build_model("resnet20", 0), tmp_path / "other.safetensors")
    r = cli("regress", "--against", builds / "base", other)
    assert r.exit_code == 2 and "not the same model" in r.output
    r = cli("regress", "--against", builds / "base", builds / "copy", "--update")
    assert r.exit_code == 2 and "--update" in r.output
    r = cli("regress", "--baseline", tmp_path / "b.json", "--layer-tolerance", "20%")
    assert r.exit_code == 2 and "--against" in r.output
    r = cli("regress")
    assert r.exit_code == 2 and "--against BASE CANDIDATE" in r.output


def _report(whole: Verdict, layers: list[Verdict]) -> ABReport:
    return ABReport("b", "c", "ort-cpu", ARCH, [1, 3, 32, 32], 1, whole, whole.ratio, layers, {},
                    0.10, 0.30, 0.03)


def test_verdicts_judge_ratios_with_their_tolerances():
    ok = Verdict("whole model", 1.0, 1.09, 0.10)
    assert ok.status == "ok" and not ok.failed
    assert Verdict("whole model", 1.0, 1.11, 0.10).status == "slower"
    assert Verdict("whole model", 1.0, 0.85, 0.10).status == "faster"
    small = Verdict("tiny", 0.01, 0.10, None, share=0.01)
    assert small.status == "not judged" and not small.failed
    slow_layer = Verdict("stage_1.0.conv_a", 0.05, 0.08, 0.30, share=0.05)
    report = _report(ok, [slow_layer, small])
    assert report.failed and report.exit_code == 1
    assert "1 layer(s) slower: stage_1.0.conv_a 1.60x" in verdict_line(report)
    assert not _report(ok, [small]).failed


def test_the_committed_ci_base_is_a_package_of_the_committed_checkpoint():
    """CI times benchmarks/baselines/ci-base against this checkpoint converted by the commit
    under test: both must hold the same weights."""
    from pathlib import Path

    from structexport.loader import file_sha256
    from structexport.package import Package
    root = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines"
    base = Package.load(root / "ci-base")
    assert base.self_contained and base.target == "ort-cpu" and base.arch == ARCH
    assert base.manifest["source"]["sha256"] == file_sha256(root / "resnet20-struct-c2n2.safetensors")


def test_tvm_llvm_packages_compare_on_the_whole_model(builds, tmp_path):
    r = cli("convert", builds / "model.safetensors", "--target", "tvm-llvm", "-o", tmp_path / "tvm")
    assert r.exit_code == 0, r.output
    shutil.copytree(tmp_path / "tvm", tmp_path / "tvm-copy")
    r = cli("regress", "--against", tmp_path / "tvm", tmp_path / "tvm-copy", "--repeat", "20",
            "--warmup", "3", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["target"] == "tvm-llvm" and result["layers"] == []
    assert 0.8 <= result["whole"]["ratio"] <= 1.25
    # an ort-cpu package against a tvm-llvm one: not the same build target
    r = cli("regress", "--against", builds / "base", tmp_path / "tvm")
    assert r.exit_code == 2 and "tvm-llvm" in r.output
