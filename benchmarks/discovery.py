"""Time structure discovery (structexport.discovery) over every conv of an ImageNet
ResNet-50 (torchvision layout, 53 convs), twice: with random weights (the worst case:
no structure, every candidate is compared) and with every 3x3 conv replaced by an
exactly C/2x2x2-structured kernel composed in float32.

    .venv/bin/python benchmarks/discovery.py [--seed 0] [--threads N] [--exact-floor]

Prints one row per layer shape (count, structure found, worst residual, seconds), the
totals, the machine, the command and the torch/numpy thread counts. --exact-floor also
prints the relative residual that float32 rounding leaves on exactly structured kernels
(the measurement behind discovery.EXACT).
"""
from __future__ import annotations

import argparse
import ctypes
import sys
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn

from structexport.discovery import EXACT, discover_structure, project_kronecker
from structexport.layers.structured import compose_kernel
from structexport.machine import machine
from structexport.models import build_model


def _openblas(action: str):
    """numpy's own OpenBLAS ``{get,set}_num_threads`` function (None when not found)."""
    try:
        with open("/proc/self/maps") as f:
            libs = {line.split()[-1] for line in f if "openblas" in line and ".so" in line}
    except OSError:
        return None
    for path in sorted(libs):
        lib = ctypes.CDLL(path)
        for name in (f"scipy_openblas_{action}_num_threads64_",
                     f"openblas_{action}_num_threads64_", f"openblas_{action}_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                return fn
    return None


def numpy_blas_threads() -> str:
    fn = _openblas("get")
    return "?" if fn is None else str(fn())


def set_threads(n: int) -> None:
    """Both torch's and numpy's BLAS to ``n`` threads."""
    torch.set_num_threads(n)
    fn = _openblas("set")
    if fn is None:
        raise SystemExit("--threads: numpy's OpenBLAS not found; set OPENBLAS_NUM_THREADS")
    fn(n)


def conv_weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    model = build_model("resnet50", seed=seed)
    return [(name, m.weight.detach()) for name, m in model.named_modules()
            if isinstance(m, nn.Conv2d)]


def structured_variant(weights, seed: int):
    """Every 3x3 conv replaced by compose_kernel of random C/2x2x2 coefficients (float32)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for name, w in weights:
        O, C, N, _ = w.shape
        if N == 3:
            alpha = torch.randn(O, C // 2, 2, 2, generator=gen, dtype=w.dtype)
            w = compose_kernel(alpha, C, N)
        out.append((name, w))
    return out


def run(label: str, weights) -> float:
    rows = defaultdict(lambda: {"count": 0, "found": set(), "res": 0.0, "s": 0.0, "checked": 0})
    start = time.perf_counter()
    for _, w in weights:
        t = time.perf_counter()
        d = discover_structure(w)
        row = rows[tuple(w.shape)]
        row["s"] += time.perf_counter() - t
        row["count"] += 1
        row["found"].add(f"{d.c}x{d.n}x{d.n}")
        row["res"] = max(row["res"], d.residual)
        row["checked"] = max(row["checked"], d.candidates_checked)
    total = time.perf_counter() - start
    print(f"\n### {label}\n")
    print("| weight (O, C, N, N) | convs | found (c x n x n) | worst residual | candidates checked "
          "| s total | s per conv |")
    print("|---|---|---|---|---|---|---|")
    for shape, r in sorted(rows.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        print(f"| {shape} | {r['count']} | {', '.join(sorted(r['found']))} | {r['res']:.1e} "
              f"| {r['checked']} | {r['s']:.3f} | {r['s'] / r['count']:.3f} |")
    print(f"\nTotal: {len(weights)} convs in {total:.2f} s")
    return total


def exact_floor(seed: int) -> None:
    """Residual of kernels that are exactly structured before float32 rounding."""
    gen = torch.Generator().manual_seed(seed)
    cases = [(64, 64, 3, 32, 2), (128, 128, 3, 64, 2), (256, 256, 3, 128, 2), (512, 512, 3, 256, 2),
             (512, 512, 3, 511, 1), (512, 512, 3, 1, 3), (256, 1024, 1, 512, 1),
             (512, 2048, 1, 1024, 1), (512, 2048, 1, 2047, 1), (64, 3, 7, 2, 4)]
    print(f"\n### float32 rounding floor (EXACT = {EXACT:g})\n")
    print("| O, C, N | c x n x n | composed in float32 | same, coefficients of mean 3 "
          "| composed in float64, stored float32 |")
    print("|---|---|---|---|---|")
    for O, C, N, c, n in cases:
        alpha = torch.randn(O, c, n, n, generator=gen, dtype=torch.float64)
        r32 = project_kronecker(compose_kernel(alpha.float(), C, N), c, n)[1]
        r32m = project_kronecker(compose_kernel(alpha.float() + 3.0, C, N), c, n)[1]
        r64 = project_kronecker(compose_kernel(alpha, C, N).float(), c, n)[1]
        print(f"| {O}, {C}, {N} | {c}x{n}x{n} | {r32:.1e} | {r32m:.1e} | {r64:.1e} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--exact-floor", action="store_true")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch and numpy BLAS threads (default: as the environment sets them)")
    args = ap.parse_args()
    if args.threads:
        set_threads(args.threads)
    m = machine()
    print(f"Machine: {m['cpu']['model']} ({m['cpu']['machine']}, {m['cpu']['cores']} cores, "
          f"{' '.join(m['cpu']['simd'])}); python {m['python']}, torch {m['torch']}, "
          f"numpy {np.__version__}; torch threads {torch.get_num_threads()}, "
          f"numpy BLAS threads {numpy_blas_threads()}.")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/discovery.py'] + sys.argv[1:])}`")
    weights = conv_weights(args.seed)
    run("ResNet-50, random weights (no structure)", weights)
    run("ResNet-50, every 3x3 conv exactly C/2x2x2 (float32)",
        structured_variant(weights, args.seed))
    if args.exact_floor:
        exact_floor(args.seed)


if __name__ == "__main__":
    main()
