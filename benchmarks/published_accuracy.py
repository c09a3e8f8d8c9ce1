"""The published CSG checkpoints' accuracies, reproduced: each of the 9 checkpoints in
``../shared/fixtures/associativeconv`` is converted for ``ort-cpu`` (fp32, and fp16 with
``--precision fp16``) with the CIFAR-10 preprocessing stored in the package, then evaluated
on the CIFAR-10 test set: the source model (torch, structexport's loader) and the artifact
``model.onnx`` (ONNX Runtime as deployed), beside the accuracy stored in the file (``acc``).

    .venv/bin/python benchmarks/published_accuracy.py [--limit N] [--write docs/accuracy.md] [NAME ...]

Each row is what these two commands give (the fp16 column: the same with --precision fp16):

    structexport convert FIXTURE --arch ARCH --target ort-cpu --preprocess cifar10 -o OUT
    structexport evaluate OUT --data ../shared/data/cifar10/test.npz --artifact model.onnx

Prints a Markdown table (and writes it with ``--write``); ``--json FILE`` keeps the rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures" / "associativeconv"
TEST_SET = REPO.parent / "shared" / "data" / "cifar10" / "test.npz"

# file -> (--arch, network)
CHECKPOINTS = {
    "resnet56.t7": ("resnet56", "ResNet-56 (dense)"),
    "resnet56-csg-12x12x3x3-72.t7": ("resnet56", "ResNet-56, CSG [12,12,3,3] / 72"),
    "resnet56-csg-16x16x3x3-128.t7": ("resnet56", "ResNet-56, CSG [16,16,3,3] / 128"),
    "resnet56-csg-16x16x3x3-128-fp16.t7": ("resnet56", "ResNet-56, CSG [16,16,3,3] / 128, stored fp16"),
    "resnet20-csg-16x16x3x3-72.t7": ("resnet20", "ResNet-20, CSG [16,16,3,3] / 72"),
    "densenet-bc-40-36-csg-12x12x3x3-72.t7": ("densenet-bc-40-36", "DenseNet-BC-40, k=36, CSG [12,12,3,3] / 72"),
    "densenet-bc-40-48-csg-12x12x3x3-72-fp16.t7": ("densenet-bc-40-48",
                                                   "DenseNet-BC-40, k=48, CSG [12,12,3,3] / 72, stored fp16"),
    "shufflenetv2-0.5x.t7": ("shufflenetv2-0.5x", "ShuffleNetV2 0.5x (dense)"),
    "shufflenetv2-0.5x-csg-16x16x1x1-16.t7": ("shufflenetv2-0.5x", "ShuffleNetV2 0.5x, CSG [16,16,1,1] / 16"),
}
PRECISIONS = ("fp32", "fp16")
TOLERANCE_POINTS = 0.1     # every accuracy within this many points of the stored one
# convert verifies an fp16 export at atol = rtol = 2e-2 on seeded Gaussian inputs; where a
# deep network's fp16 logits move further than that on them, the row is converted again
# at this tolerance and says so (its accuracy on real images is what the table measures).
FP16_LOOSER = 0.05


def measure(name: str, workdir: Path, data: Path = TEST_SET, limit: int | None = None,
            precisions=PRECISIONS, say=print) -> dict:
    """One row: convert ``name`` for ort-cpu at each precision, evaluate source and model.onnx."""
    from structexport.convert import ConvertOptions, convert
    from structexport.datasets import PRESETS
    from structexport.evaluate import EvaluateOptions, evaluate
    from structexport.export import VerificationError
    arch, network = CHECKPOINTS[name]
    path = FIXTURES / name
    row = {"checkpoint": name, "network": network, "arch": arch}
    for precision in precisions:
        t = time.perf_counter()
        out = workdir / f"{Path(name).stem}-{precision}"
        options = ConvertOptions(target="ort-cpu", precision=precision,
                                 preprocess=PRESETS["cifar10"].to_dict())
        tolerance = None
        try:
            result = convert(str(path), out, arch, options)
        except VerificationError as exc:
            if precision != "fp16":
                raise
            tolerance = {"atol": FP16_LOOSER, "rtol": FP16_LOOSER, "default_failed": exc.message}
            say(f"{name} {precision}: {exc.message}; converting again with --atol {FP16_LOOSER} "
                f"--rtol {FP16_LOOSER}")
            result = convert(str(path), out, arch,
                             dataclasses.replace(options, atol=FP16_LOOSER, rtol=FP16_LOOSER))
        converted_s = time.perf_counter() - t
        row.setdefault("stored", result.manifest["source"]["metadata"].get("acc"))
        row.setdefault("inferred_arch", result.manifest["source"]["arch"])
        t = time.perf_counter()
        report = evaluate(out, data, EvaluateOptions(artifacts=["model.onnx"], limit=limit))
        evaluated_s = time.perf_counter() - t
        art = report["artifacts"]["model.onnx"]
        row["images"] = report["images"]
        if report["source"] is not None:
            row["source"] = 100 * report["source"]["top1"]
            row["source_top5"] = 100 * report["source"]["top5"]
        row[precision] = {"top1": 100 * art["top1"], "top5": 100 * art["top5"],
                          "agreement": 100 * art["agreement"], "max_logit_diff": art["max_logit_diff"],
                          "verification": result.manifest["verification"]["max_abs_diff"],
                          "tolerance": tolerance,
                          "convert_s": round(converted_s, 1), "evaluate_s": round(evaluated_s, 1)}
        say(f"{name} {precision}: source {row.get('source', float('nan')):.2f}, model.onnx {row[precision]['top1']:.2f} "
            f"(stored {row['stored']}), {converted_s:.0f} s convert, {evaluated_s:.0f} s evaluate")
    return row


def worst(row: dict) -> float:
    """The largest distance, in points, of any measured accuracy from the stored one."""
    values = [row["source"]] + [row[p]["top1"] for p in PRECISIONS if p in row]
    return max(abs(v - row["stored"]) for v in values)


def _cpu() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    import platform
    return platform.processor() or "unknown CPU"


def render(rows: list[dict], meta: dict) -> str:
    lines = [
        "# The published accuracies, reproduced",
        "",
        "The 9 trained checkpoints published with the CSG paper's reference implementation "
        "(hamedomidvar/associativeconv, `Pretrained_Models/`; in `../shared/fixtures/associativeconv`) "
        "each store their CIFAR-10 test accuracy (`acc`). Each is converted for `ort-cpu` -- at fp32, "
        "and at fp16 with `--precision fp16` -- with the CIFAR-10 preprocessing stored in the package "
        "(`--preprocess cifar10`: pixels / 255, mean (0.4914, 0.4822, 0.4465), std (0.2023, 0.1994, "
        "0.2010), NCHW, as the reference implementation's test transform), and `evaluate`d on the full "
        f"CIFAR-10 test set (`../shared/data/cifar10/test.npz`, {meta['images']:,} images):",
        "",
        "- **stored**: the accuracy stored in the checkpoint file (`acc`);",
        "- **source**: the checkpoint loaded by structexport's loader into its zoo model, run in torch;",
        "- **fp32** / **fp16**: the converted artifact `model.onnx` under ONNX Runtime as deployed "
        "(`ORT_ENABLE_ALL`, 1 thread, batch 1), and its **agreement** with the source (the fraction of "
        "images with the source's top-1 class);",
        f"- **max diff**: the largest distance of source, fp32 or fp16 from stored (the slow-tier test "
        f"`tests/test_evaluate.py::test_published_accuracy_full` checks every row within "
        f"{TOLERANCE_POINTS} points).",
        "",
        "All in % top-1.",
        "",
        "| checkpoint | network | stored | source | fp32 | fp32 agreement | fp16 | fp16 agreement | max diff |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mark = " *" if r["fp16"].get("tolerance") else ""
        lines.append(f"| `{r['checkpoint']}` | {r['network']} | {r['stored']:.2f} | {r['source']:.2f} | "
                     f"{r['fp32']['top1']:.2f} | {r['fp32']['agreement']:.2f} | {r['fp16']['top1']:.2f}{mark} | "
                     f"{r['fp16']['agreement']:.2f} | {worst(r):.2f} |")
    looser = [r for r in rows if r["fp16"].get("tolerance")]
    if looser:
        lines += ["", f"\\* `convert --precision fp16` verifies the fp16 export against the fp32 source at "
                  f"atol = rtol = 2e-2 on 3 seeded Gaussian inputs; for these checkpoints it stopped "
                  f"(exit 32) and the row was converted with `--atol {FP16_LOOSER} --rtol {FP16_LOOSER}`: "
                  + "; ".join(f"`{Path(r['checkpoint']).stem}`: {r['fp16']['tolerance']['default_failed']}"
                              for r in looser) + "."]
    lines += [
        "",
        "Largest logit difference from the source, per artifact: "
        + "; ".join(f"`{Path(r['checkpoint']).stem}` fp32 {r['fp32']['max_logit_diff']:.2g}, fp16 "
                    f"{r['fp16']['max_logit_diff']:.2g}" for r in rows) + ".",
        "",
        f"Top-5 of the sources: " + ", ".join(f"`{Path(r['checkpoint']).stem}` {r['source_top5']:.2f}"
                                            for r in rows) + ".",
        "",
        "## How it was made",
        "",
        f"- Command: `{meta['command']}` ({meta['seconds'] / 60:.0f} min in all); each row is what "
        "these commands give, per checkpoint (and again with `--precision fp16`):",
        "",
        "  ```sh",
        "  structexport convert ../shared/fixtures/associativeconv/CHECKPOINT --arch ARCH --target ort-cpu \\",
        "      --preprocess cifar10 -o out/NAME",
        "  structexport evaluate out/NAME --data ../shared/data/cifar10/test.npz --artifact model.onnx",
        "  ```",
        "",
        f"- Machine: {meta['cpu']} ({meta['cores']} cores, shared with other jobs), {meta['date']}; "
        f"torch {meta['torch']}, onnxruntime {meta['onnxruntime']}, structexport {meta['structexport']}.",
        "- Time per checkpoint (convert + evaluate, fp32 / fp16, seconds): "
        + "; ".join(f"`{Path(r['checkpoint']).stem}` {r['fp32']['convert_s']:.0f}+{r['fp32']['evaluate_s']:.0f} / "
                    f"{r['fp16']['convert_s']:.0f}+{r['fp16']['evaluate_s']:.0f}" for r in rows) + ".",
        "",
        "The default test tier (`tests/test_evaluate.py::test_published_checkpoints_slice`) runs the "
        "first images of the test set through two of these checkpoints (given as model files) and checks the artifact's "
        "predictions equal the source's.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", default=list(CHECKPOINTS))
    ap.add_argument("--limit", type=int, help="the first N test images only (a quick look)")
    ap.add_argument("--write", type=Path, help="write the Markdown table here (e.g. docs/accuracy.md)")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    import onnxruntime
    import torch

    from structexport import __version__
    from structexport.machine import machine
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="published-accuracy-") as tmp:
        for name in args.names:
            rows.append(measure(name, Path(tmp), limit=args.limit, say=lambda m: print(m, file=sys.stderr)))
    meta = {"command": " ".join([".venv/bin/python", "benchmarks/published_accuracy.py"] + sys.argv[1:]),
            "seconds": time.perf_counter() - t0, "images": rows[0]["images"], "cpu": _cpu(),
            "cores": machine()["cpu"]["cores"], "date": dt.date.today().isoformat(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "structexport": __version__}
    text = render(rows, meta)
    print(text)
    if args.write:
        args.write.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
