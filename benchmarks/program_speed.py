"""The phone runtimes' speed (issue 21): on ExecuTorch or LiteRT with the XNNPACK delegate,
1 thread, batch 1, structured against dense, float32 and INT8, all four programs timed
interleaved in one loop (weights drawn from a seed: latency does not depend on trained values).

    .venv/bin/python benchmarks/program_speed.py [--target executorch|litert] [--repeat 100] [NAME ...]

Each model is converted twice, as a user would: ``convert --target T`` (float32: the program
and its dense counterpart) and ``--precision int8`` (PT2E with the runtime's quantizer,
calibrated on 64 CIFAR-10 training images, upsampled to 224 for ImageNet-sized models; the
per-layer choice timed on this machine). The weights are random, so the accuracy gate is off
(``--force``). Then ``bench`` on the INT8 package with the float32 package's program in the
same loop. Prints a Markdown table with the machine and command.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar10" / "train-25k.npz"
DEFAULT = ["resnet18-struct-c2n2", "resnet20-struct-c2n2", "vgg19-ssc-10"]


def convert_both(name: str, target: str, work: Path, say) -> dict[str, Path]:
    import torch

    from structexport.convert import ConvertOptions, convert
    from structexport.datasets import Preprocess
    from structexport.models import build_model, input_shape, parse_name
    from structexport.quantize import Int8Options
    spec = parse_name(name)
    ckpt = work / f"{name}.pt"
    torch.save(build_model(spec, 0).state_dict(), ckpt)
    cifar = input_shape(spec)[-1] == 32
    preprocess = Preprocess.preset("cifar10" if cifar else "imagenet").to_dict()
    out = {"fp32": work / f"{name}-fp32", "int8": work / f"{name}-int8"}
    say(f"{name}: convert float32")
    convert(str(ckpt), out["fp32"], name, ConvertOptions(target=target), progress=say)
    say(f"{name}: convert INT8")
    convert(str(ckpt), out["int8"], name, ConvertOptions(
        target=target, precision="int8", preprocess=preprocess, force=True,
        int8=Int8Options(str(DATA), count=64, gate_count=100, min_agreement=0.0)), progress=say)
    return out


def measure(name: str, target: str, repeat: int, say) -> dict:
    from structexport.bench import BenchOptions, run_bench
    from structexport.package import Package
    from structexport.timedcheck import checked_programs
    with tempfile.TemporaryDirectory(prefix=f"{target}-speed-") as tmp:
        pkgs = convert_both(name, target, Path(tmp), say)
        fp32 = Package.load(pkgs["fp32"])
        extra = checked_programs(fp32, {"structured": fp32.program}, fp32.feed(), 1, say)
        say(f"{name}: timing ({repeat} interleaved runs)")
        r = run_bench(str(pkgs["int8"]), None, BenchOptions(target=None, threads=1, repeat=repeat, warmup=10,
                                                            extra_workloads={"structured-fp32": extra["structured"]}))
        manifest = json.loads((pkgs["int8"] / "manifest.json").read_text())
        fp32_delegation = fp32.target_build["delegation"]
    choice = manifest["int8"]["layer_choice"].get("layers") or []
    med = {"structured_int8": r["latency_ms"]["median"], "dense_int8": r["dense_int8_latency_ms"]["median"],
           "dense_fp32": r["dense_latency_ms"]["median"],
           "structured_fp32": r["extra_latency_ms"]["structured-fp32"]["median"]}
    theory = r["speedup_theoretical"]
    return {"model": name, "input": "x".join(map(str, r["input_shape"][1:])), "ms": med, "theory": theory,
            "fp32_over_dense": med["dense_fp32"] / med["structured_fp32"],
            "int8_over_dense_int8": med["dense_int8"] / med["structured_int8"],
            "int8_over_structured_fp32": med["structured_fp32"] / med["structured_int8"],
            "layers_structured": sum(row["choice"] == "structured" for row in choice), "layers": len(choice),
            "delegated_macs": fp32_delegation["macs_delegated_share"],
            "portable_ops": [f"{e['op']} x{e['count']}" for e in fp32_delegation["portable"]],
            "choice": choice, "machine": r["machine"]}


def markdown(rows: list[dict]) -> str:
    head = ("| model | input | struct fp32 ms | dense fp32 ms | fp32 speedup | of theory | struct INT8 ms | "
            "dense INT8 ms | INT8 speedup | of theory | INT8 layers structured | MACs delegated | ops outside XNNPACK (fp32) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ms, t = r["ms"], r["theory"]
        lines.append(f"| {r['model']} | {r['input']} | {ms['structured_fp32']:.3f} | {ms['dense_fp32']:.3f} | "
                     f"{r['fp32_over_dense']:.2f}x | {r['fp32_over_dense'] / t:.2f} | {ms['structured_int8']:.3f} | "
                     f"{ms['dense_int8']:.3f} | {r['int8_over_dense_int8']:.2f}x | {r['int8_over_dense_int8'] / t:.2f} | "
                     f"{r['layers_structured']}/{r['layers']} | {100 * r['delegated_macs']:.0f}% | "
                     f"{', '.join(r['portable_ops']) or 'none'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    sys.path.insert(0, str(REPO))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", default=DEFAULT)
    p.add_argument("--target", choices=["executorch", "litert"], default="executorch")
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    from structexport.machine import machine
    from structexport.targets import get_target
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    m = machine()
    print(f"Machine: {m['cpu']['model']} ({m['cpu']['machine']}, {m['cpu']['cores']} cores, "
          f"{' '.join(m['cpu']['simd'])}); {get_target(args.target, {}).runtime(1)}, batch 1, "
          f"{args.repeat} interleaved runs, medians.")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/program_speed.py'] + (argv or sys.argv[1:]))}`\n")
    rows = []
    for name in args.names:
        rows.append(measure(name, args.target, args.repeat, say))
        say(json.dumps({k: v for k, v in rows[-1].items() if k not in ("choice", "machine")}))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
