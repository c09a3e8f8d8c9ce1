"""INT8 accuracy on the CIFAR-10 test set (issue 20): every published CSG checkpoint and every
trained checkpoint of the project, converted with ``--precision int8`` (calibrated on the
training images) and evaluated beside its float32 model and the dense model quantized the
same way.

    .venv/bin/python benchmarks/int8_accuracy.py [--limit N] [--int8-layers measure|structured]
        [--json FILE] [--markdown FILE] [NAME ...]

Each row is what these two commands give:

    structexport convert CHECKPOINT [--arch ARCH] --target ort-cpu --precision int8 \
        --calibration ../shared/data/cifar10/train-25k.npz --preprocess cifar10 \
        [--int8-layers structured] -o OUT
    structexport evaluate OUT --data ../shared/data/cifar10/test.npz \
        --artifact model.onnx --artifact model.fp32.onnx --artifact reference.int8.onnx

A checkpoint whose INT8 model fails convert's accuracy gate is converted again with --force
(the row says so): the table measures it either way.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10"
ARTIFACTS = ["model.onnx", "model.fp32.onnx", "reference.int8.onnx"]
TOLERANCE_POINTS = 0.5        # the bound: INT8 within this many points of float32


def checkpoints() -> dict[str, tuple[Path, str | None]]:
    """name -> (file, --arch): the published fixtures, then the project's trained weights."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from published_accuracy import CHECKPOINTS, FIXTURES

    from structexport.models.trained import trained_weights
    out = {name: (FIXTURES / name, arch) for name, (arch, _) in CHECKPOINTS.items()}
    for w in sorted(trained_weights(), key=lambda w: w.path.name):
        out[w.path.name] = (w.path, None)
    return out


def measure(name: str, path: Path, arch: str | None, workdir: Path, limit: int | None, layer_choice: str,
            say) -> dict:
    from structexport.convert import ConvertOptions, convert
    from structexport.datasets import Preprocess
    from structexport.evaluate import EvaluateOptions, evaluate
    from structexport.quantize import Int8GateError, Int8Options
    out = workdir / name
    opts = ConvertOptions(target="ort-cpu", precision="int8", preprocess=Preprocess.preset("cifar10").to_dict(),
                          int8=Int8Options(str(DATA / "train-25k.npz"), layer_choice=layer_choice))
    t = time.perf_counter()
    forced = None
    try:
        result = convert(str(path), out, arch, opts)
    except Int8GateError as exc:
        forced = exc.message
        say(f"{name}: {exc.message}; converted again with --force")
        opts.force = True
        result = convert(str(path), out, arch, opts)
    convert_s = time.perf_counter() - t
    q = result.manifest["int8"]
    say(f"{name}: converted ({convert_s:.0f} s), evaluating")
    report = evaluate(out, DATA / "test.npz", EvaluateOptions(artifacts=ARTIFACTS, limit=limit))
    a = report["artifacts"]
    row = {"checkpoint": name, "arch": result.manifest["source"]["arch"], "images": report["images"],
           "int8_layers": layer_choice,
           "source_top1": 100 * report["source"]["top1"],
           "fp32_top1": 100 * a["model.fp32.onnx"]["top1"],
           "int8_top1": 100 * a["model.onnx"]["top1"], "int8_agreement": 100 * a["model.onnx"]["agreement"],
           "dense_int8_top1": 100 * a["reference.int8.onnx"]["top1"],
           "dense_int8_agreement": 100 * a["reference.int8.onnx"]["agreement"],
           "gate_agreement": 100 * q["gate"]["agreement"], "gate_passed": q["gate"]["passed"],
           "gate_failure": forced, "rebased_layers": sum(rec["action"] == "rebased" for run in q["passes"] for rec in run["records"]),
           "dense_layers": sum(rec["action"] == "composed" for run in q["passes"] for rec in run["records"]),
           "min_sqnr_db": min((r["sqnr_db"] for r in q["layers"] if r["sqnr_db"] is not None), default=None),
           "convert_s": round(convert_s, 1)}
    row["int8_drop"] = row["fp32_top1"] - row["int8_top1"]
    row["dense_int8_drop"] = row["source_top1"] - row["dense_int8_top1"]
    row["within_bound"] = row["int8_drop"] <= TOLERANCE_POINTS
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| checkpoint | float32 | INT8 | drop | INT8 agreement | dense INT8 | dense INT8 drop | "
             "gate agreement (held out) | lowest SQNR dB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        mark = "" if r["within_bound"] else " **!**"
        gate = f"{r['gate_agreement']:.2f}" + ("" if r["gate_passed"] else " (failed)")
        lines.append(f"| `{r['checkpoint']}` | {r['fp32_top1']:.2f} | {r['int8_top1']:.2f} | "
                     f"{r['int8_drop']:+.2f}{mark} | {r['int8_agreement']:.2f} | {r['dense_int8_top1']:.2f} | "
                     f"{r['dense_int8_drop']:+.2f} | {gate} | {r['min_sqnr_db']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", help="checkpoint file names (default: all)")
    p.add_argument("--limit", type=int, help="evaluate the first N test images only")
    p.add_argument("--int8-layers", choices=["measure", "structured"], default="measure",
                   help="convert's per-layer choice (structured: every layer decomposed)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    table = checkpoints()
    names = args.names or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"unknown checkpoint(s) {unknown}; choose from {sorted(table)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="int8-accuracy-") as tmp:
        for name in names:
            path, arch = table[name]
            rows.append(measure(name, path, arch, Path(tmp), args.limit, args.int8_layers, say))
            say(json.dumps(rows[-1]))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2) + "\n")
    text = markdown(rows)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
