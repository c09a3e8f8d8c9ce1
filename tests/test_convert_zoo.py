"""Slow tier: every zoo model and variant converts for `onnx` and `ort-cpu` and verifies.

Run with `make test-slow` (pytest -m slow). Weights are drawn from a seed and saved in the
project's own format, so the loader, the passes, the export and the verification all run.
"""
from __future__ import annotations

import pytest

from structexport.convert import ConvertOptions, convert
from structexport.loader import save_checkpoint
from structexport.models import build_model, list_names

TARGETS = ["onnx", "ort-cpu"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = save_checkpoint(build_model(name, seed=1), root / f"{name}.safetensors")
        return cache[name]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", list_names())
def test_zoo_model_converts_and_verifies(checkpoints, tmp_path, name, target):
    result = convert(str(checkpoints(name)), tmp_path / "out", None, ConvertOptions(target=target))
    manifest = result.manifest
    assert manifest["verification"]["passed"], manifest["verification"]
    assert manifest["source"]["arch"] == name
    assert (tmp_path / "out" / "model.onnx").stat().st_size == manifest["artifacts"]["model.onnx"]["bytes"]
    ops = manifest["export"]["ops"]
    assert "MatMul" not in ops  # no CSG generator arithmetic, no naive sum-pool
    # SSC lowering may pad groups: a few % above the non-zeros, far below dense
    assert manifest["after"]["macs"] <= 1.15 * manifest["before"]["macs"]
