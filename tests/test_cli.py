"""The ``structexport`` command: what it prints, what it returns, how it fails."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
from click.testing import CliRunner

from structexport.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]

REQUIRED_NAMES = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet32x2", "vgg19",
                  "densenet-bc-40-36", "densenet-bc-40-48", "shufflenetv2-0.5x", "mobilenetv2",
                  "resnet18", "resnet50", "resnet101",
                  # a few of the default variants
                  "resnet56-csg-16x16x3x3-128", "resnet56-bcsg-16x16x3x3-1024", "vgg19-ssc-10",
                  "resnet32x2-ssc-5", "resnet18-struct-c2n2", "densenet-bc-40-36-csg-12x12x3x3-72"]



def invoke(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in its own interpreter (doctor imports TVM; keep it out of this process)."""
    return subprocess.run([sys.executable, "-m", "structexport.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{text}"
    return lines[0]


# ---------------------------------------------------------------------------- --version

def test_version_matches_pyproject(project_version):
    result = invoke("--version")
    assert result.exit_code == 0
    assert project_version in result.output
    assert "structexport" in result.output


# ---------------------------------------------------------------------------- doctor

@pytest.fixture(scope="module")
def doctor_json() -> dict:
    proc = run_cli("doctor", "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _installed(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


@pytest.mark.parametrize("name,dist", [("torch", "torch"), ("onnx", "onnx"),
                                       ("onnxruntime", "onnxruntime"), ("onnxsim", "onnxsim"),
                                       ("tvm", "apache-tvm")])
def test_doctor_json_reports_package_versions(doctor_json, name, dist):
    packages = doctor_json["packages"]
    assert name in packages
    if _installed(dist) is None:
        assert packages[name] is None
    else:
        assert packages[name], f"{name} is installed ({_installed(dist)}) but doctor says {packages[name]!r}"
        assert "fails to import" not in packages[name]


def test_doctor_json_reports_tools_and_cpu(doctor_json, project_version):
    tools = doctor_json["tools"]
    cross = [k for k in tools if "aarch64" in k and "compiler" in k]
    qemu = [k for k in tools if "qemu" in k]
    assert cross and qemu, f"missing tool entries: {sorted(tools)}"
    if shutil.which("aarch64-linux-gnu-g++"):
        assert tools[cross[0]]
    if shutil.which("qemu-aarch64-static"):
        assert tools[qemu[0]]
    cpu = doctor_json["cpu"]
    assert isinstance(cpu["model"], str) and cpu["model"]
    assert isinstance(cpu["simd"], list) and all(isinstance(f, str) for f in cpu["simd"])
    assert cpu["cores"] >= 1
    assert doctor_json["structexport"] == project_version


def test_doctor_human_output_mentions_torch_and_cpu():
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout
    assert "CPU" in proc.stdout
    assert "SIMD" in proc.stdout


# ---------------------------------------------------------------------------- zoo

def test_zoo_lists_every_required_name():
    result = invoke("zoo")
    assert result.exit_code == 0
    for name in REQUIRED_NAMES:
        assert re.search(rf"(?m)(^|\s){re.escape(name)}\s", result.output), f"{name} not listed"
    assert "-csg-S0xS1xSHxSW-K" in result.output  # the variant grammar is shown


def test_zoo_json_lists_every_required_name():
    result = invoke("zoo", "--json")
    assert result.exit_code == 0
    names = json.loads(result.output)
    assert set(REQUIRED_NAMES) <= set(names)


def test_zoo_describes_resnet56():
    result = invoke("zoo", "resnet56", "--json")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["name"] == "resnet56"
    assert info["params"] == 853018
    assert info["trainable_params"] == 853018
    assert info["macs"] == 125485696
    assert info["input_shape"] == [1, 3, 32, 32]


def test_zoo_describes_binary_csg_without_fixed_generator():
    result = invoke("zoo", "resnet56-bcsg-16x16x3x3-1024", "--json")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["trainable_params"] == 381978
    assert info["generator"]["code_size"] == 1024


def test_zoo_unknown_name_exits_19_with_a_suggestion():
    result = invoke("zoo", "resnt56")
    assert result.exit_code == 19
    line = one_line(result.stderr)
    assert "did you mean" in line
    assert "resnet56" in line
    assert result.stdout == ""


# ---------------------------------------------------------------------------- inspect

def test_inspect_real_csg_checkpoint_json(fixtures_dir):
    ckpt = fixtures_dir / "resnet56-csg-12x12x3x3-72.t7"
    result = invoke("inspect", str(ckpt), "--arch", "resnet56", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["arch"] == "resnet56-csg-12x12x3x3-72"
    assert report["totals"]["params"] == 160450
    assert report["generator"]["code_size"] == 72
    assert report["generator"]["slice_shape"] == [12, 12, 3, 3]
    assert report["input_shape"] == [1, 3, 32, 32]


def test_inspect_missing_file_exits_10_with_one_line(tmp_path):
    result = invoke("inspect", str(tmp_path / "missing.t7"), "--arch", "resnet56")
    assert result.exit_code == 10
    line = one_line(result.stderr)
    assert "missing.t7" in line
    assert result.stdout == ""


def test_inspect_without_checkpoint_is_a_usage_error():
    result = invoke("inspect")
    assert result.exit_code == 2


def test_console_script_usage_errors_are_one_line(repo_root):
    """The installed `structexport` command reports usage errors like every other error."""
    exe = Path(sys.executable).with_name("structexport")
    for args, fragment in ((["convert"], "Missing argument 'CHECKPOINT'"),
                           (["convrt"], "No such command 'convrt'"),
                           (["zoo", "--bogus"], "No such option '--bogus'")):
        proc = subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr


def test_doctor_reports_the_emulated_device(doctor_json):
    emu = doctor_json["emulated_arm"]
    assert isinstance(emu["installed"], bool)
    assert emu["running"] is None or (emu["installed"] and emu["running"].startswith("127.0.0.1:"))
