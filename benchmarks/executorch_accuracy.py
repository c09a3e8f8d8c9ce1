"""ExecuTorch accuracy and speed on the CIFAR-10 test set (issue 21): trained checkpoints
converted for ``--target executorch`` in float32 and in INT8 (PT2E with XNNPACK's quantizer,
calibrated on training images), each program evaluated on the 10,000 test images beside the
source, and timed against its dense counterpart on ExecuTorch.

    .venv/bin/python benchmarks/executorch_accuracy.py [--limit N] [--repeat 50] [--json FILE] [NAME ...]

Each row is what these commands give:

    structexport convert CKPT --target executorch -o FP32
    structexport convert CKPT --target executorch --precision int8 \\
        --calibration ../shared/data/cifar10/train-25k.npz --preprocess cifar10 -o INT8
    structexport evaluate FP32 --data ../shared/data/cifar10/test.npz --preprocess cifar10 --artifact model.pte
    structexport evaluate INT8 --data ../shared/data/cifar10/test.npz --artifact model.pte --artifact reference.int8.pte
    structexport bench FP32; structexport bench INT8
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10"
TRAINED = REPO / "models" / "checkpoints" / "trained"
DEFAULT = ["resnet20-dense-seed0.safetensors", "resnet20-struct-c2n2-sr-seed0.safetensors",
           "resnet20-struct-c2n2-direct-pc-seed0.safetensors"]


def measure(name: str, work: Path, limit: int | None, repeat: int, say) -> dict:
    from structexport.bench import BenchOptions, run_bench
    from structexport.convert import ConvertOptions, convert
    from structexport.datasets import Preprocess
    from structexport.evaluate import EvaluateOptions, evaluate
    from structexport.quantize import Int8Options
    pre = Preprocess.preset("cifar10").to_dict()
    fp32, int8 = work / f"{name}-fp32", work / f"{name}-int8"
    say(f"{name}: convert float32")
    convert(str(TRAINED / name), fp32, None, ConvertOptions(target="executorch", preprocess=pre))
    say(f"{name}: convert INT8")
    convert(str(TRAINED / name), int8, None, ConvertOptions(
        target="executorch", precision="int8", preprocess=pre, int8=Int8Options(str(DATA / "train-25k.npz"))))
    say(f"{name}: evaluate")
    e32 = evaluate(str(fp32), str(DATA / "test.npz"), EvaluateOptions(limit=limit, artifacts=["model.pte"]))
    e8 = evaluate(str(int8), str(DATA / "test.npz"), EvaluateOptions(limit=limit,
                                                                    artifacts=["model.pte", "reference.int8.pte"]))
    say(f"{name}: bench")
    b32 = run_bench(str(fp32), None, BenchOptions(target=None, repeat=repeat, warmup=10))
    b8 = run_bench(str(int8), None, BenchOptions(target=None, repeat=repeat, warmup=10))
    q = json.loads((int8 / "manifest.json").read_text())["int8"]
    layers = q["layer_choice"].get("layers") or []
    return {"checkpoint": name, "images": e32["source"]["images"],
            "source_top1": e32["source"]["top1"], "fp32_pte_top1": e32["artifacts"]["model.pte"]["top1"],
            "int8_pte_top1": e8["artifacts"]["model.pte"]["top1"],
            "dense_int8_pte_top1": e8["artifacts"]["reference.int8.pte"]["top1"],
            "int8_agreement": e8["artifacts"]["model.pte"]["agreement"],
            "fp32_ms": b32["latency_ms"]["median"], "fp32_dense_ms": b32["dense_latency_ms"]["median"],
            "fp32_speedup": b32["speedup_measured"], "theory": b32["speedup_theoretical"],
            "int8_ms": b8["latency_ms"]["median"], "int8_dense_ms": b8["dense_int8_latency_ms"]["median"],
            "int8_speedup": b8["speedup_measured"],
            "layers_structured": sum(r["choice"] == "structured" for r in layers), "layers": len(layers),
            "machine": b8["machine"]}


def markdown(rows: list[dict]) -> str:
    head = ("| checkpoint | images | source top-1 | fp32 .pte | INT8 .pte | dense INT8 .pte | "
            "fp32 ms (dense) | fp32 speedup | INT8 ms (dense INT8) | INT8 speedup | theory | INT8 layers structured |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    pct = lambda v: f"{100 * v:.2f}"  # noqa: E731
    for r in rows:
        lines.append(f"| `{r['checkpoint']}` | {r['images']:,} | {pct(r['source_top1'])} | {pct(r['fp32_pte_top1'])} | "
                     f"{pct(r['int8_pte_top1'])} | {pct(r['dense_int8_pte_top1'])} | "
                     f"{r['fp32_ms']:.3f} ({r['fp32_dense_ms']:.3f}) | {r['fp32_speedup']:.2f}x | "
                     f"{r['int8_ms']:.3f} ({r['int8_dense_ms']:.3f}) | {r['int8_speedup']:.2f}x | "
                     f"{r['theory']:.2f}x | {r['layers_structured']}/{r['layers']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", default=DEFAULT)
    p.add_argument("--limit", type=int)
    p.add_argument("--repeat", type=int, default=50)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from structexport.executorch_runtime import require_executorch
    from structexport.machine import machine
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    m = machine()
    print(f"Machine: {m['cpu']['model']} ({m['cpu']['cores']} cores); ExecuTorch {require_executorch()} with "
          f"XNNPACK; 1 thread, batch 1, {args.repeat} interleaved runs, medians.")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/executorch_accuracy.py'] + (argv or sys.argv[1:]))}`\n")
    rows = []
    with tempfile.TemporaryDirectory(prefix="et-accuracy-") as tmp:
        for name in args.names:
            rows.append(measure(name, Path(tmp), args.limit, args.repeat, say))
            say(json.dumps({k: v for k, v in rows[-1].items() if k != "machine"}))
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
