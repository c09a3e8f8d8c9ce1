"""The zoo lists the weights the project trained itself (models/checkpoints/trained/), read
from each file's metadata, and such a file converts without --arch."""
from __future__ import annotations

import json

import pytest
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



def test_the_zoo_names_the_committed_trained_weights():
    """Every committed trained checkpoint is listed by `structexport zoo` with its accuracy."""
    committed = trained_weights()
    assert TRAINED_DIR.is_dir() and committed, f"no trained weights in {TRAINED_DIR}"
    r = CliRunner().invoke(main, ["zoo"], terminal_width=250)
    assert r.exit_code == 0, r.output
    best = {}
    for w in committed:                       # best first: the table names each model's best
        best.setdefault(w.name, w)
    for w in best.values():
        assert f"{w.recipe} (seed {w.seed}) {w.test_top1:.2f}%" in r.output
    for w in committed:
        info = json.loads(CliRunner().invoke(main, ["zoo", w.name, "--json"]).output)
        assert w.to_dict() in info["trained"]
        state = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(w.path))
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())


def _converted_accuracy(w, cifar10_dir, tmp_path, limit):
    from structexport.convert import ConvertOptions, convert
    from structexport.datasets import Preprocess
    from structexport.evaluate import EvaluateOptions, evaluate
    out = tmp_path / w.path.stem
    convert(str(w.path), out, options=ConvertOptions(target="ort-cpu",
                                                     preprocess=Preprocess.preset("cifar10").to_dict()))
    return evaluate(out, cifar10_dir / "test.npz", EvaluateOptions(artifacts=["model.onnx"], limit=limit))


def test_trained_weights_keep_their_accuracy_through_the_artifact(cifar10_dir, tmp_path):
    """The structured trained checkpoint (no --arch: the file names its model), converted for
    ort-cpu: on the first 500 test images the artifact predicts what the source predicts."""
    w = next(w for w in trained_weights() if w.name == "resnet20-struct-c2n2")
    report = _converted_accuracy(w, cifar10_dir, tmp_path, 500)
    art = report["artifacts"]["model.onnx"]
    assert report["images"] == 500
    assert art["agreement"] >= 0.998 and abs(art["top1"] - report["source"]["top1"]) <= 0.002
    assert report["source"]["top1"] > 0.7       # a trained model, on real labels


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_trained_weights_reproduce_their_stored_accuracy(index, cifar10_dir, tmp_path):
    """On the full test set: the source reproduces the accuracy stored in the file, and the
    artifact is within 0.1 points of it."""
    w = trained_weights()[index]
    report = _converted_accuracy(w, cifar10_dir, tmp_path, None)
    assert abs(100 * report["source"]["top1"] - w.test_top1) < 0.01
    assert abs(100 * report["artifacts"]["model.onnx"]["top1"] - w.test_top1) <= 0.1
