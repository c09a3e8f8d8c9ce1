"""The zoo lists the weights the project trained itself (models/checkpoints/trained/), read
from each file's metadata, and such a file converts without --arch."""
from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from structexport.cli import main
from structexport.loader import save_checkpoint
from structexport.models import build_model
from structexport.models.trained import TRAINED_DIR, read_trained, trained_weights


def _write(folder, name, recipe, seed, test, val, epochs=3):
    model = build_model(name, seed=seed)
    meta = {"config": {"recipe": recipe, "seed": seed, "epochs": epochs}, "test_top1": test,
            "val_top1": val, "epochs_trained": epochs}
    return save_checkpoint(model, folder / f"{name}-{recipe}-seed{seed}.safetensors", name=name, extra=meta)


def test_trained_weights_are_read_from_the_metadata(tmp_path):
    _write(tmp_path, "resnet20", "dense", 0, 88.5, 89.0)
    _write(tmp_path, "resnet20-struct-c2n2", "direct", 0, 86.25, 86.0)
    _write(tmp_path, "resnet20-struct-c2n2", "sr", 1, 87.75, 87.5)
    found = trained_weights(folder=tmp_path)
    assert [(w.name, w.recipe, w.seed, w.test_top1) for w in found] == [
        ("resnet20", "dense", 0, 88.5), ("resnet20-struct-c2n2", "sr", 1, 87.75),
        ("resnet20-struct-c2n2", "direct", 0, 86.25)]
    assert [w.recipe for w in trained_weights("resnet20-struct-c2n2", folder=tmp_path)] == ["sr", "direct"]
    assert trained_weights(folder=tmp_path / "missing") == []
    one = read_trained(found[0].path)
    assert one.epochs == 3 and one.val_top1 == 89.0

