"""INT8 speed (issue 20): structured INT8 against dense INT8, structured float32 and dense
float32 on ONNX Runtime CPU, all timed interleaved in one process (weights drawn from a seed:
latency does not depend on trained values).

    .venv/bin/python benchmarks/int8_speed.py [--repeat 100] [--all-structured] [NAME ...]

Each model is converted twice, as a user would: ``convert --target ort-cpu`` (float32) and
``convert --target ort-cpu --precision int8`` (calibrated on 64 CIFAR-10 training images,
upsampled to 224 for ImageNet-sized models). The weights are random, so the accuracy gate is
off and the integer-kernel check is recorded, not enforced (``--force``): rounding
differences travel further through untrained layers (measured up to 10 output steps, where
trained ResNets stay within 2).
Then ``bench`` on the INT8 package, with the float32 package's ``model.onnx`` in the same
loop (``--all-structured`` adds the INT8 model with every layer kept structured,
``--int8-layers structured``). Prints a Markdown table with the machine and the command.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10" / "train-25k.npz"
DEFAULT = ["resnet20-struct-c2n2", "resnet56-struct-c2n2", "resnet20-struct-c1n2", "resnet18-struct-c2n2",
           "resnet18-struct-c1n2", "resnet56-csg-16x16x3x3-128", "vgg19-ssc-10"]


def convert_both(name: str, work: Path, all_structured: bool, say) -> dict[str, Path]:
    import torch

    from structexport.convert import ConvertOptions, convert
    from structexport.datasets import Preprocess
    from structexport.models import build_model, input_shape, parse_name
    from structexport.quantize import Int8Options
    spec = parse_name(name)
    model = build_model(spec, 0)
    ckpt = work / f"{name}.pt"
    torch.save(model.state_dict(), ckpt)
    cifar = input_shape(spec)[-1] == 32
    preprocess = Preprocess.preset("cifar10" if cifar else "imagenet").to_dict()
    out = {"fp32": work / f"{name}-fp32", "int8": work / f"{name}-int8"}
    say(f"{name}: convert float32")
    convert(str(ckpt), out["fp32"], name, ConvertOptions(target="ort-cpu"))
    choices = {"int8": "measure"} | ({"int8-structured": "structured"} if all_structured else {})
    for key, choice in choices.items():
        out[key] = work / f"{name}-{key}"
        say(f"{name}: convert INT8 ({choice})")
        convert(str(ckpt), out[key], name, ConvertOptions(
            target="ort-cpu", precision="int8", preprocess=preprocess, force=True,
            int8=Int8Options(str(DATA), count=64, gate_count=100, min_agreement=0.0, layer_choice=choice)))
    return out


def measure(name: str, repeat: int, all_structured: bool, say) -> dict:
    from structexport.bench import BenchOptions, run_bench
    from structexport.package import Package
    from structexport.timedcheck import checked_sessions
    with tempfile.TemporaryDirectory(prefix="int8-speed-") as tmp:
        pkgs = convert_both(name, Path(tmp), all_structured, say)
        extra = checked_sessions(Package.load(pkgs["fp32"]), {"structured-fp32": pkgs["fp32"] / "model.onnx"}, 1, say)
        if all_structured:
            extra.update(checked_sessions(Package.load(pkgs["int8-structured"]),
                                          {"all-structured-int8": pkgs["int8-structured"] / "model.onnx"}, 1, say))
        say(f"{name}: timing ({repeat} interleaved runs)")
        r = run_bench(str(pkgs["int8"]), None, BenchOptions(threads=1, repeat=repeat, warmup=10,
                                                            extra_workloads=extra))
        q = json.loads((pkgs["int8"] / "manifest.json").read_text())["int8"]
        choice, kernels = q["layer_choice"], q["kernels_on_images"]
    med = {"structured_int8": r["latency_ms"]["median"], "dense_int8": r["dense_int8_latency_ms"]["median"],
           "dense_fp32": r["dense_latency_ms"]["median"],
           "structured_fp32": r["extra_latency_ms"]["structured-fp32"]["median"]}
    if all_structured:
        med["all_structured_int8"] = r["extra_latency_ms"]["all-structured-int8"]["median"]
    layers = choice.get("layers") or []
    st = r.get("structure_theoretical") or {}
    return {"model": name, "input": "x".join(map(str, r["input_shape"][1:])), "ms": med,
            "over_dense_int8": med["dense_int8"] / med["structured_int8"],
            "over_structured_fp32": med["structured_fp32"] / med["structured_int8"],
            "over_dense_fp32": med["dense_fp32"] / med["structured_int8"],
            "structure_theory": st.get("speedup"), "efficiency": st.get("efficiency"),
            "layers_structured": sum(row["choice"] == "structured" for row in layers), "layers": len(layers),
            "kernel_check": kernels, "choice": layers, "machine": r["machine"]}


def markdown(rows: list[dict], all_structured: bool) -> str:
    head = ("| model | input | struct INT8 ms | dense INT8 ms | struct fp32 ms | dense fp32 ms | "
            + ("all-struct INT8 ms | " if all_structured else "")
            + "over dense INT8 | over struct fp32 | over dense fp32 | theory | efficiency | layers structured |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ms = r["ms"]
        theory = "" if r["structure_theory"] is None else f"{r['structure_theory']:.2f}x"
        eff = "" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        lines.append(f"| {r['model']} | {r['input']} | {ms['structured_int8']:.3f} | {ms['dense_int8']:.3f} | "
                     f"{ms['structured_fp32']:.3f} | {ms['dense_fp32']:.3f} | "
                     + (f"{ms['all_structured_int8']:.3f} | " if all_structured else "")
                     + f"{r['over_dense_int8']:.2f}x | {r['over_structured_fp32']:.2f}x | {r['over_dense_fp32']:.2f}x | "
                     f"{theory} | {eff} | {r['layers_structured']}/{r['layers']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", default=DEFAULT)
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--all-structured", action="store_true",
                   help="also time the INT8 model with every layer structured (--int8-layers structured)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from structexport.machine import machine
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    m = machine()
    print(f"Machine: {m['cpu']['model']} ({m['cpu']['machine']}, {m['cpu']['cores']} cores, "
          f"{' '.join(m['cpu']['simd'])}); onnxruntime {m['onnxruntime']}; 1 thread, batch 1, "
          f"{args.repeat} interleaved runs, medians.")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/int8_speed.py'] + (argv or sys.argv[1:]))}`\n")
    rows = []
    for name in args.names:
        rows.append(measure(name, args.repeat, args.all_structured, say))
        say(json.dumps({k: v for k, v in rows[-1].items() if k not in ("choice", "machine")}))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows, args.all_structured))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
