"""Weights the project trained itself on CIFAR-10 (``benchmarks/train_cifar.py``), beside the zoo.

Each file in ``models/checkpoints/trained/`` is structexport's own format (safetensors plus the
zoo name, so it loads without ``--arch``); its metadata holds the recipe, seed, budget and the
accuracies measured when it was written. Only the metadata is read here: listing the trained
weights loads no tensors. (A wheel holds no checkpoints: the list is empty there.)
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

TRAINED_DIR = Path(__file__).resolve().parent / "checkpoints" / "trained"


@dataclass(frozen=True)
class TrainedWeights:
    name: str                 # the zoo name the weights load into
    recipe: str               # dense | direct (alpha) | sr (W with the SR loss, decomposed)
    seed: int
    epochs: int
    test_top1: float          # CIFAR-10 test set, the source model (torch)
    val_top1: float           # the held-out training images
    path: Path
    info: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        return {"name": self.name, "recipe": self.recipe, "seed": self.seed, "epochs": self.epochs,
                "test_top1": self.test_top1, "val_top1": self.val_top1, "path": str(self.path)}


def read_trained(path: Path) -> TrainedWeights:
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    info = json.loads(meta.get("config") or "{}")
    config = info.get("config") or {}
    return TrainedWeights(name=meta.get("model", ""), recipe=config.get("recipe", "?"),
                          seed=int(config.get("seed", -1)), epochs=int(info.get("epochs_trained", 0)),
                          test_top1=float(info.get("test_top1", float("nan"))),
                          val_top1=float(info.get("val_top1", float("nan"))), path=path, info=info)


def trained_weights(name: str | None = None, folder: Path = TRAINED_DIR) -> list[TrainedWeights]:
    """Every trained checkpoint (of zoo model ``name`` when given), best test accuracy first."""
    if not folder.is_dir():
        return []
    found = [read_trained(p) for p in sorted(folder.glob("*.safetensors"))]
    return sorted((w for w in found if name is None or w.name == name), key=lambda w: -w.test_top1)
