"""Train CIFAR-10 ResNet-20s with the project's own layers, resumably (issue 19 §3).

Four recipes, one budget each (epochs x batch 128 on 22,500 images):

- ``dense``:  ResNet-20 as it is;
- ``direct``: ``resnet20-struct-c2n2`` trained directly in the coefficients alpha with plain
              SGD (as the seeds train it), each layer's step scaled by 1/prod(window);
- ``direct-pc``: the same, each alpha's gradient preconditioned by ``(A^T A)^-1``: the step
              in W is then the dense step projected onto the structure (see ``precondition``);
- ``sr``:     the same trained in W with the structural-regularization loss
              (``loss = CE + sr_weight * sum_l ||(I - A A+) W_l|| / ||W_l||``), then decomposed
              (``alpha = A+ W``), with each layer's residual and the accuracy before and after.

Data: ``../shared/data/cifar10/train-25k.npz``: 22,500 images train, the last 2,500 of a fixed
permutation (seed 20261206, the same for every run) are held out for validation;
``test.npz`` is read only for the final figures. Preprocessing is the CSG reference
implementation's (``x/255``, per-channel mean and std); augmentation a random 32x32 crop of
the image padded by 4 and a random horizontal flip. SGD (momentum 0.9, Nesterov, weight decay
5e-4), learning rate 0.1 warmed up linearly over the first epoch, then cosine to 0.
Before every evaluation the BatchNorm statistics are recomputed on 40 training batches
("precise BN"): the running averages lag the weights, most of all for alpha trained directly,
and a figure should measure the weights, not the lag. ``--bf16`` trains under bfloat16
autocast (about 1.9x faster on CPUs with AMX, slow where bfloat16 is emulated); evaluation
and the saved weights are float32.

The run can be killed at any moment: its state (weights, optimizer, epoch, history) is
written atomically to RUN_DIR/state.pt after every epoch, and the same command resumes from
it (each epoch's shuffling and augmentation are seeded by (seed, epoch), so a resumed run
draws what an uninterrupted one would).

    python benchmarks/train_cifar.py --recipe sr --epochs 30 --seed 0 --run-dir runs/sr-0 \
        --out models/checkpoints/trained/resnet20-struct-c2n2-sr-seed0.safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10"
MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32)
STD = np.array([0.2023, 0.1994, 0.2010], np.float32)
SPLIT_SEED = 20261206
HELD_OUT = 2500
BATCH = 128
RECIPES = {"dense": ("resnet20", "coeff"), "direct": ("resnet20-struct-c2n2", "coeff"),
           "direct-pc": ("resnet20-struct-c2n2", "coeff"), "sr": ("resnet20-struct-c2n2", "dense")}
BN_BATCHES = 40


def load_split(data_dir: Path):
    """(train images, train labels, val images, val labels) as uint8 NHWC / int64."""
    with np.load(data_dir / "train-25k.npz", allow_pickle=False) as d:
        images, labels = d["images"], d["labels"].astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    val, train = order[-HELD_OUT:], order[:-HELD_OUT]
    return images[train], labels[train], images[val], labels[val]


def load_test(data_dir: Path):
    with np.load(data_dir / "test.npz", allow_pickle=False) as d:
        return d["images"], d["labels"].astype(np.int64)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> normalized float32 NCHW."""
    x = (images.astype(np.float32) / 255.0 - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def augmented_batches(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator):
    """Shuffled batches, each image randomly cropped from its 4-padded copy and flipped."""
    padded = np.pad(images, ((0, 0), (4, 4), (4, 4), (0, 0)))
    order = rng.permutation(len(images))
    for start in range(0, len(order) - BATCH + 1, BATCH):   # whole batches only (BN)
        idx = order[start:start + BATCH]
        dy, dx = rng.integers(0, 9, len(idx)), rng.integers(0, 9, len(idx))
        flip = rng.random(len(idx)) < 0.5
        batch = np.empty((len(idx), 32, 32, 3), np.uint8)
        for k, i in enumerate(idx):
            crop = padded[i, dy[k]:dy[k] + 32, dx[k]:dx[k] + 32]
            batch[k] = crop[:, ::-1] if flip[k] else crop
        yield to_tensor(batch), torch.from_numpy(labels[idx])


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), 500):
        logits = model(to_tensor(images[start:start + 500]))
        correct += int((logits.argmax(1).numpy() == labels[start:start + 500]).sum())
    return 100.0 * correct / len(images)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: np.ndarray, labels: np.ndarray, seed: int) -> None:
    """Replace every BatchNorm's running mean and variance by their average over
    ``BN_BATCHES`` augmented training batches under the current weights (float32)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None                     # cumulative average
    model.train()
    batches = augmented_batches(images, labels, np.random.default_rng([seed, 10**6]))
    for _, (x, _) in zip(range(BN_BATCHES), batches):
        model(x)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


def preconditioners(model: nn.Module) -> dict[int, torch.Tensor]:
    """``(A^T A)^-1`` per coefficient tensor (``id(alpha)``), A the layer's box basis.

    ``W = A alpha``; plain SGD moves W by ``A A^T g_W``, whose eigenvalues span prod(window) down
    to about 0.25 (condition numbers of 10^4 for a 64-channel C/2x2x2 layer): the smooth
    directions of the kernel race while the sharp ones hardly move. Multiplying alpha's
    gradient by ``(A^T A)^-1`` makes W's step ``A (A^T A)^-1 A^T g_W``, the dense gradient
    projected onto the structure. Weight decay on alpha stays plain: preconditioned, the
    gradient of ``||A alpha||^2 / 2`` is alpha itself."""
    from structexport.layers.structured import structure_basis
    out = {}
    for _, layer in structured_layers(model):
        A = structure_basis(layer.C, layer.N, layer.c, layer.n)
        out[id(layer.alpha)] = torch.linalg.inv(A.t() @ A).to(torch.float32)
    return out


def learning_rate(step: int, steps_per_epoch: int, epochs: int, peak: float = 0.1) -> float:
    warm = steps_per_epoch
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, epochs * steps_per_epoch - warm)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))


def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def structured_layers(model: nn.Module):
    from structexport.layers import StructuredConv2d
    return [(name, m) for name, m in model.named_modules() if isinstance(m, StructuredConv2d)]


def main(argv=None) -> int:
    from structexport.layers import structural_regularization_loss
    from structexport.loader import save_checkpoint
    from structexport.models import build_model
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sr-weight", type=float, default=1.0, help="weight of the SR loss (recipe sr)")
    p.add_argument("--run-dir", type=Path, required=True, help="where the resumable state lives")
    p.add_argument("--out", type=Path, help="the trained checkpoint (structexport's safetensors format)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    p.add_argument("--bf16", action="store_true", help="train under bfloat16 autocast (CPUs with AMX)")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--limit", type=int, default=0, help="train on the first N images only (smoke test)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)   # denormal activations early in training slow CPUs badly
    name, mode = RECIPES[args.recipe]
    config = {"recipe": args.recipe, "arch": name, "struct_mode": mode, "epochs": args.epochs,
              "seed": args.seed, "batch": BATCH, "sr_weight": args.sr_weight if args.recipe == "sr" else None,
              "optimizer": "SGD momentum 0.9 nesterov, weight decay 5e-4, lr 0.1 warmup 1 epoch + cosine",
              "augmentation": "random crop 32 of 4-padded, horizontal flip",
              "train_images": 25000 - HELD_OUT, "held_out": HELD_OUT, "split_seed": SPLIT_SEED,
              "limit": args.limit, "precision": "bfloat16 autocast" if args.bf16 else "float32",
              "batchnorm": f"statistics recomputed on {BN_BATCHES} training batches before each evaluation"}
    args.run_dir.mkdir(parents=True, exist_ok=True)
    state_path = args.run_dir / "state.pt"
    x_tr, y_tr, x_val, y_val = load_split(args.data)
    if args.limit:
        x_tr, y_tr = x_tr[:args.limit], y_tr[:args.limit]
    model = build_model(name, seed=args.seed, struct_mode=mode).train()
    # Coefficients trained directly move the composed kernel prod(window) times faster than
    # a dense weight at the same learning rate (each alpha feeds a whole box of W): their
    # step is scaled down by that factor, per layer, so that W moves as in dense training.
    groups = [{"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": 1.0}]
    alphas = {id(layer.alpha): math.prod(layer.window) if args.recipe == "direct" else 1
              for _, layer in structured_layers(model) if layer.mode == "coeff"}
    precondition = preconditioners(model) if args.recipe == "direct-pc" else {}
    for scale in sorted(set(alphas.values())):
        groups.append({"params": [p for p in model.parameters() if alphas.get(id(p)) == scale],
                       "weight_decay": 5e-4, "lr_scale": 1.0 / scale})
    groups.append({"params": [p for p in model.parameters() if p.ndim > 1 and id(p) not in alphas],
                   "weight_decay": 5e-4, "lr_scale": 1.0})
    opt = torch.optim.SGD([g for g in groups if g["params"]], lr=0.1, momentum=0.9, nesterov=True)
    if args.recipe == "direct":
        config["alpha_lr_scale"] = "1/prod(window) per layer"
    if precondition:
        config["alpha_gradient"] = "preconditioned by (A^T A)^-1 per layer"
    epoch, history = 0, []
    if state_path.exists():
        state = torch.load(state_path, weights_only=True)
        if state["config"] != config:
            print(f"error: {state_path} holds a run with another configuration ({state['config']}); "
                  "use another --run-dir", file=sys.stderr)
            return 2
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        epoch, history = state["epoch"], state["history"]
        print(f"resumed {args.run_dir} at epoch {epoch}/{args.epochs}", flush=True)
    steps = len(x_tr) // BATCH
    while epoch < args.epochs:
        model.train()
        rng = np.random.default_rng([args.seed, epoch])
        start, seen, loss_sum, sr_sum = time.perf_counter(), 0, 0.0, 0.0
        for k, (x, y) in enumerate(augmented_batches(x_tr, y_tr, rng)):
            for group in opt.param_groups:
                group["lr"] = learning_rate(epoch * steps + k, steps, args.epochs) * group["lr_scale"]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(model(x), y)
            total = loss
            if args.recipe == "sr":
                sr = structural_regularization_loss(model)
                total = loss + args.sr_weight * sr
                sr_sum += float(sr.detach())
            opt.zero_grad(set_to_none=True)
            total.backward()
            for p in model.parameters():
                if id(p) in precondition:
                    p.grad = (p.grad.reshape(len(p), -1) @ precondition[id(p)]).reshape(p.shape)
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        epoch += 1
        recalibrate_batchnorm(model, x_tr, y_tr, args.seed)
        val = accuracy(model, x_val, y_val)
        row = {"epoch": epoch, "loss": loss_sum / seen, "val_top1": val,
               "seconds": round(time.perf_counter() - start, 1)}
        if args.recipe == "sr":
            row["sr_loss"] = sr_sum / max(1, steps)
        history.append(row)
        save_atomic({"config": config, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "epoch": epoch, "history": history}, state_path)
        print(json.dumps(row), flush=True)

    x_te, y_te = load_test(args.data)
    result = {"config": config, "history": history, "val_top1": accuracy(model, x_val, y_val),
              "test_top1": accuracy(model, x_te, y_te)}
    if args.recipe == "sr":
        # Decompose: alpha = A+ W per layer; the residual is what the projection moves
        result["before_decomposition"] = {"val_top1": result["val_top1"], "test_top1": result["test_top1"]}
        result["residuals"] = {}
        for lname, layer in structured_layers(model):
            _, residual = layer.decompose()
            result["residuals"][lname] = residual
            layer.to_coeff()
        recalibrate_batchnorm(model, x_tr, y_tr, args.seed)
        result["val_top1"] = accuracy(model, x_val, y_val)
        result["test_top1"] = accuracy(model, x_te, y_te)
    (args.run_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("history", "residuals")}), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        model.eval()
        meta = {k: v for k, v in result.items() if k != "history"}
        meta["epochs_trained"] = len(history)
        save_checkpoint(model, args.out, name=name, extra=meta)
        print(f"wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
