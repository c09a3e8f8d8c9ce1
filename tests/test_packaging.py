"""The wheel installs passes/, targets/ and models/ under ``structexport`` and nothing top-level.

The wheel is built from a copy of the working tree (so no build/ or egg-info lands in the
repository, and nothing stale from an earlier build leaks in), installed without dependencies
into a fresh virtual environment, and exercised from a folder outside the source tree. torch
and the other dependencies come from the test run's own environment through a plain path line
in a .pth file: .pth files inside a directory added that way are not processed, so the
editable install of the source tree cannot leak in (the test checks that it did not).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Never copied into the build tree: environments, VCS data, build outputs, caches.
IGNORED = {".venv", ".git", "build", "dist", "out", ".pytest_cache", "__pycache__"}



def _ignore(directory: str, names: list[str]) -> set[str]:
    return {n for n in names if n in IGNORED or n.endswith(".egg-info") or n.endswith(".pyc")}


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          env=_clean_env(), timeout=300, **kwargs)
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("packaging")
    src = tmp / "src"
    shutil.copytree(REPO_ROOT, src, ignore=_ignore, symlinks=True)
    out = tmp / "wheelhouse"
    # --no-build-isolation: the build requirements must already be in this environment
    # (the [test] extra brings them), so the build needs no network.
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
          "--disable-pip-version-check", "-q", "-w", out], cwd=src)
    wheels = list(out.glob("structexport-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    # This environment's pip installs into the fresh interpreter's environment.
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
          "--disable-pip-version-check", "-q", wheel])
    fresh_site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                      .stdout.strip())
    assert fresh_site.is_dir() and fresh_site.is_relative_to(venv)
    # A plain path line: the directory is appended to sys.path, its own .pth files
    # (the editable install's finder among them) are not run.
    deps_site = sysconfig.get_paths()["purelib"]
    (fresh_site / "zz_test_deps.pth").write_text(deps_site + "\n")
    return venv


def test_wheel_installs_subpackages_under_structexport(wheel, project_version):
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("structexport/__init__.py", "structexport/cli.py", "structexport/models/zoo.py",
                     "structexport/models/__init__.py", "structexport/passes/__init__.py",
                     "structexport/targets/__init__.py", "structexport/layers/csg.py",
                     "structexport/regress/ab.py", "structexport/profiling/layermap.py"):
        assert required in names, f"{required} missing from {wheel.name}"
    # every subpackage of the source tree is in the wheel (pyproject lists them one by one)
    root = Path(__file__).resolve().parents[1] / "structexport"
    for init in root.rglob("__init__.py"):
        rel = "structexport/" + init.relative_to(root).as_posix()
        assert rel in names, f"{rel} missing from {wheel.name}: add its package to pyproject.toml"
    # the shipped layer cost models (package data, not code)
    shipped = sorted(p.name for p in (root / "cost_models").glob("*.json"))
    assert shipped and all(f"structexport/cost_models/{n}" in names for n in shipped), shipped
    top_level = {n.split("/", 1)[0] for n in names}
    for forbidden in ("models", "passes", "targets", "tests", "benchmarks"):
        assert forbidden not in top_level, f"{wheel.name} installs a top-level {forbidden}/"
    assert top_level - {"structexport"} == {f"structexport-{project_version}.dist-info"}, top_level


SMOKE = r"""
import importlib, sys
from pathlib import Path
import structexport, structexport.models, structexport.passes, structexport.targets
print("FILE", structexport.__file__)
print("MODELS_FILE", structexport.models.__file__)
import torch
from structexport.models import build_model
model = build_model("resnet20")
with torch.no_grad():
    out = model(torch.zeros(1, 3, 32, 32))
print("SHAPE", list(out.shape))
for name in ("models", "passes", "targets"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        print("ABSENT", name)
    else:
        print("PRESENT", name, sys.modules[name].__file__)
"""


def test_installed_wheel_works_outside_the_source_tree(fresh_venv, tmp_path):
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    proc = _run([fresh_venv / "bin" / "python", "-c", SMOKE], cwd=workdir)
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
    # The package came from the wheel in the fresh environment, not the editable source tree.
    for key in ("FILE", "MODELS_FILE"):
        path = Path(lines[key]).resolve()
        assert path.is_relative_to(fresh_venv.resolve()), f"{key} {path} is not in {fresh_venv}"
        assert not path.is_relative_to(REPO_ROOT), f"{key} {path} leaked from the source tree"
    assert lines["SHAPE"] == "[1, 10]"
    absent = [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ABSENT ")]
    assert absent == ["models", "passes", "targets"], proc.stdout


def test_installed_console_script_reports_version(fresh_venv, tmp_path, project_version):
    script = fresh_venv / "bin" / "structexport"
    assert script.is_file()
    proc = _run([script, "--version"], cwd=tmp_path)
    assert project_version in proc.stdout
