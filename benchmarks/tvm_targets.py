"""TVM on this host: structured against dense (realization efficiency) at an equal tuning
budget, and TVM against ONNX Runtime, all four timed interleaved in one process.

    .venv/bin/python benchmarks/tvm_targets.py [--trials 0 64] [--repeat 20] [NAME ...]

For each model and each tuning budget (0: untuned) the structured model and its dense
counterpart are built for tvm-llvm with the same budget (MetaSchedule, records cached in
--tuning-db, so a second run reuses them), then timed with ONNX Runtime's two sessions in
the same loop. Prints a Markdown table with the machine and the command.
"""
from __future__ import annotations

import argparse
import sys
import time

from structexport.bench import BenchOptions, run_bench
from structexport.machine import machine

DEFAULT = ["resnet20-struct-c2n2", "resnet20-csg-16x16x3x3-72"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=DEFAULT)
    ap.add_argument("--trials", type=int, nargs="+", default=[0, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--tuning-db", default=None)
    args = ap.parse_args()
    m = machine()
    import tvm
    print(f"Machine: {m['cpu']['model']} ({m['cpu']['machine']}, {m['cpu']['cores']} cores, "
          f"{' '.join(m['cpu']['simd'])}); TVM {tvm.__version__}, onnxruntime {m['onnxruntime']}; "
          f"{args.threads} thread(s), batch 1, {args.repeat} interleaved runs, medians.")
    print(f"Command: `{' '.join(['.venv/bin/python', 'benchmarks/tvm_targets.py'] + sys.argv[1:])}`\n")
    print("| model | trials (each model) | TVM structured ms | TVM dense ms | TVM measured | theoretical "
          "| TVM efficiency | ORT structured ms | ORT dense ms | TVM / ORT (structured) | TVM / ORT (dense) | build s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.names:
        for trials in args.trials:
            start = time.perf_counter()
            r = run_bench(None, name, BenchOptions(
                target="tvm-llvm", threads=args.threads, repeat=args.repeat, warmup=3, compare_ort=True,
                target_options={"tune_trials": trials, "tuning_db": args.tuning_db}))
            o, eff = r["onnxruntime"], r["realization_efficiency"]
            print(f"| {name} | {trials} | {r['latency_ms']['median']:.2f} | {r['dense_latency_ms']['median']:.2f} "
                  f"| {r['speedup_measured']:.2f}x | {r['speedup_theoretical']:.2f}x "
                  f"| {'' if eff is None else f'{eff:.2f}'} | {o['latency_ms']['median']:.2f} "
                  f"| {o['dense_latency_ms']['median']:.2f} | {o['tvm_over_ort']:.1f}x "
                  f"| {o['tvm_over_ort_dense']:.1f}x | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
