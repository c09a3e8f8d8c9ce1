"""Whole-model latency: structured zoo models against their dense counterparts on ONNX
Runtime CPU, interleaved in one process (weights drawn from a seed; latency does not
depend on trained values).

    .venv/bin/python benchmarks/whole_models.py [--threads 1] [--repeat 30] [NAME ...]

Prints a Markdown table: median latencies, measured and theoretical speedup, realization
efficiency, with the machine and the command.
"""
from __future__ import annotations

import argparse
import sys

from structexport.bench import BenchOptions, run_bench
from structexport.machine import machine

DEFAULT = ["resnet18-struct-c2n2", "resnet18-struct-c1n2", "resnet56-struct-c2n2",
           "vgg19-ssc-10", "vgg19-ssc-5", "vgg19-ssc-2", "resnet32x2-ssc-10", "resnet32x2-ssc-5",
           "resnet32x2-ssc-2", "resnet56-csg-16x16x3x3-128", "densenet-bc-40-36-csg-12x12x3x3-72",
           "shufflenetv2-0.5x-csg-16x16x1x1-16", "mobilenetv2-csg-16x16x1x1-16"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=DEFAULT)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=30)
    args = ap.parse_args()
    m = machine()
    print(f"Machine: {m['cpu']['model']} ({m['cpu']['machine']}, {m['cpu']['cores']} cores, "
          f"{' '.join(m['cpu']['simd'])}); onnxruntime {m['onnxruntime']}, torch {m['torch']}; "
          f"{args.threads} thread(s), batch 1, {args.repeat} interleaved runs, medians.")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/whole_models.py'] + sys.argv[1:])}`\n")
    print("| model | input | structured ms | dense ms | measured | theoretical | efficiency |")
    print("|---|---|---|---|---|---|---|")
    for name in args.names:
        r = run_bench(None, name, BenchOptions(threads=args.threads, repeat=args.repeat, warmup=5))
        eff = r["realization_efficiency"]
        print(f"| {name} | {'x'.join(map(str, r['input_shape'][1:]))} | {r['latency_ms']['median']:.2f} "
              f"| {r['dense_latency_ms']['median']:.2f} | {r['speedup_measured']:.2f}x "
              f"| {r['speedup_theoretical']:.2f}x | {'' if eff is None else f'{eff:.2f}'} |", flush=True)


if __name__ == "__main__":
    main()
