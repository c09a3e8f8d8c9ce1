"""The ``structexport`` command: a thin layer over the importable API."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from rich.markup import escape
from rich.table import Table

from structexport import __version__, cli_costmodel, cli_device, cli_evaluate, cli_profile, cli_regress
from structexport.cli_common import (OptionRefusedError, check_measure_flags, check_pass_flags,
                                     check_source_flags, check_tvm_flags, package_facts, declared_structures, device_options,
                                     device_spec, err, fail_cleanly, given, out, source_kind,
                                     sumpool_choice, trust_options, tune_options, tvm_build_options)
from structexport.targets import TARGETS



@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="structexport")
def main():
    """Export CNNs built from structured convolutions (structured convs, CSG, SSC) for edge
    deployment, and measure the speedup they really deliver."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def doctor(as_json):
    """Versions of the toolchain, cross compiler and emulator, CPU model and SIMD features."""
    from structexport.doctor import collect
    info = collect()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"structexport {info['structexport']} (Python {info['python']})",
                  show_header=False)
    for name, ver in info["packages"].items():
        table.add_row(name, ver or "[red]not installed[/]")
    for name, ver in info["tools"].items():
        table.add_row(name, ver or "[yellow]not found[/]")
    emu = info["emulated_arm"]
    table.add_row("emulated aarch64 device",
                  f"running at {emu['running']}" if emu["running"] else
                  "installed, not running" if emu["installed"] else
                  "[yellow]not installed[/] (structexport device setup-emulated-arm)")
    cpu = info["cpu"]
    table.add_row("CPU", f"{cpu['model']} ({cpu['machine']}, {cpu['cores']} cores)")
    table.add_row("SIMD", " ".join(cpu["simd"]) or "none detected")
    out.print(table)


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@fail_cleanly
def zoo(name, as_json):
    """List the model zoo, or describe one model: params, MACs and input shape."""
    from structexport.analysis import summarize
    from structexport.models import ARCHITECTURES, build_model, input_shape, list_names, parse_name
    from structexport.models.trained import trained_weights
    trained = trained_weights()

    def trained_text(model_name: str) -> str:
        mine = [w for w in trained if w.name == model_name]     # best first
        if not mine:
            return ""
        more = f" (+{len(mine) - 1} more: structexport zoo {model_name})" if len(mine) > 1 else ""
        return f"{mine[0].recipe} (seed {mine[0].seed}) {mine[0].test_top1:.2f}%{more}"
    if not name:
        if as_json:
            click.echo(json.dumps(list_names(), indent=2))
            return
        table = Table(title="structexport zoo")
        table.add_column("name")
        table.add_column("input")
        table.add_column("description")
        table.add_column("trained weights (CIFAR-10 test top-1)")
        names = list_names()
        names += sorted({w.name for w in trained} - set(names))
        for n in names:
            spec = parse_name(n)
            arch = ARCHITECTURES[spec.base]
            table.add_row(n, "x".join(map(str, arch.input_shape[1:])),
                          arch.description if spec.family == "dense" else f"  {spec.family} variant",
                          trained_text(n))
        out.print(table)
        out.print("Variants: -csg-S0xS1xSHxSW-K[-frozen], -bcsg-S0xS1xSHxSW-K, -ssc-T, "
                  "-struct-c2n2, -struct-c1n2. Trained weights: models/checkpoints/trained/ "
                  "(`structexport zoo NAME` gives the files)")
        return
    spec = parse_name(name)
    summary = summarize(build_model(spec), input_shape(spec))
    info = {"name": spec.name, "family": spec.family, "params": summary["params"],
            "trainable_params": summary["trainable_params"], "macs": summary["macs"],
            "sumpool_adds": summary["sumpool_adds"], "input_shape": summary["input_shape"],
            "generator": summary["generator"],
            "trained": [w.to_dict() for w in trained if w.name == spec.name]}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    table = Table(title=spec.name, show_header=False)
    for key in ("family", "params", "trainable_params", "macs", "sumpool_adds", "input_shape"):
        value = info[key]
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    if info["generator"]:
        table.add_row("generator", json.dumps(info["generator"]))
    for w in info["trained"]:
        table.add_row(f"trained ({w['recipe']}, seed {w['seed']})",
                      f"test top-1 {w['test_top1']:.2f}%, {w['epochs']} epochs: {w['path']}")
    out.print(table)


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=True, path_type=str))
@click.option("--arch", help="Zoo name of the checkpoint's architecture (base name is enough; "
              "optional for structexport checkpoints).")
@click.option("--model", "model_spec", metavar="FILE.py:FUNC",
              help="Your own architecture for a state dict: path/to/file.py:build or "
              "package.module:build (importing your code is your choice, the checkpoint is still "
              "read weights-only).")
@click.option("--input-shape", multiple=True, metavar="[NAME=]D0,D1,...",
              help="Fix an input's shape: NAME=1,3,224,224 for the input called NAME (repeat for each "
              "input of a model with several), a bare shape for the first input. Any layout the "
              "model takes (N,C,H,W; NHWC for TensorFlow exports; [batch, time] for audio). "
              "Default: the model's own.")
@click.option("--max-residual", type=click.FloatRange(min=0),
              help="Largest relative residual a discovered structure may have (default: exact, "
              "1e-5; larger takes approximately structured weights).")
@click.option("--residual-structure", default="c2n2", show_default=True,
              type=click.Choice(["c2n2", "c1n2"]),
              help="Zoo checkpoints: structure dense 3x3 weights are measured against (relative residual).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow arbitrary unpickling (runs code from the file: trusted files only).")
@click.option("--allow-torchscript", is_flag=True,
              help="Allow TorchScript archives (they carry code: trusted files only).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@fail_cleanly
def inspect(checkpoint, arch, model_spec, input_shape, max_residual, residual_structure, trust_pickle,
            allow_torchscript, as_json):
    """Load CHECKPOINT and show its layers: shapes, structure, params, MACs. CHECKPOINT is
    anything convert takes: a zoo checkpoint, an ONNX model, a torch.export archive (.pt2),
    a state dict with --model, or TorchScript (with --allow-torchscript).

    For models outside the zoo (torch modules are exported to ONNX first, as convert does),
    every Conv with a constant weight and every Gemm/MatMul layer is listed with the
    cheapest c x n x n structure found in its weights and whether convert would decompose
    it. --json keys:

    \b
    source {path, sha256, format, name}, arch, input_shape, max_residual, min_saving, notes,
    layers[]: name, op (conv2d|linear), onnx_op, nodes, weight_shape, output_shape, groups,
      stride, padding, dilation, structure ("cxnxn", e.g. "8x2x2" | "dense" | null when
      not searched), c, n, C, N, residual, macs_ratio, structured, decompose, reason (why
      not: "dense", "saves N% ... under 20%", "dilated", ...), params_before, params_after,
      macs_before, macs_after (the small conv's), sumpool_adds (naive count, apart)
    totals: layers, by_op {conv2d, linear}, structured, decomposed, params_before,
      params_after (conv and linear layers), graph_params, macs_before, macs_after (whole
      graph), other_macs, sumpool_adds, pool_adds (the model's own average pooling, not
      sum-pools), speedup_theoretical (macs_before / macs_after)

    \b
    Zoo checkpoints: source, checkpoint {path, sha256, format, wrapper_key, stored_dtypes,
    metadata}, arch, input_shape, max_residual, notes, generator, layers[] (name, kind, op,
    weight_shape, structure, params, macs, adds, output_shape, residual, discovered
    {c, n, C, N, residual, macs_ratio, structured} for dense 3x3 convs, else null), totals
    {params, trainable_params, layer_params, macs, sumpool_adds, layers, by_kind}."""
    from structexport.inspection import inspect_model, render_inspection
    with err.status("inspecting", spinner="dots") as status:
        report = inspect_model(checkpoint, arch, model_spec=model_spec, input_shape=list(input_shape) or None,
                               max_residual=max_residual, trust_pickle=trust_pickle,
                               allow_torchscript=allow_torchscript,
                               residual_structure=residual_structure,
                               progress=lambda stage: status.update(f"inspecting: {stage}"))
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        render_inspection(report, out)


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=True, path_type=str))
@click.option("--arch", help="Zoo name of the checkpoint's architecture (base name is enough).")
@click.option("--model", "model_spec", metavar="FILE.py:FUNC",
              help="Your own architecture for a state dict: path/to/file.py:build or package.module:build "
              "(build() returns the nn.Module; importing your code is your choice, the checkpoint is "
              "still read weights-only).")
@click.option("--target", "target", default="onnx", show_default=True,
              type=click.Choice(sorted(TARGETS)), help="What to build for.")
@click.option("-o", "--output", "outdir", required=True, type=click.Path(path_type=str),
              help="Output folder (replaced atomically; left as it was on failure).")
@click.option("--input-shape", multiple=True, metavar="[NAME=]D0,D1,...",
              help="Fix an input's shape: NAME=1,3,224,224 for the input called NAME (repeat for each "
              "input of a model with several), a bare shape for the first input. Any layout the "
              "model takes (N,C,H,W; NHWC for TensorFlow exports; [batch, time] for audio). "
              "Default: the model's own.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "fp16", "int8"]),
              help="int8: static INT8 for ort-cpu, calibrated on --calibration images and gated on "
                   "held-out ones (docs/int8.md).")
@click.option("--calibration", "calibration", type=click.Path(path_type=str), metavar="DATA",
              help="--precision int8: images to calibrate on, read like evaluate's --data (an .npz or "
                   "a folder of class subfolders) with the model's --preprocess.")
@click.option("--calibration-count", type=click.IntRange(1), default=256, show_default=True,
              help="Images (a seeded random draw of DATA) to calibrate on.")
@click.option("--calibration-method", type=click.Choice(["minmax", "percentile", "entropy"]),
              default="minmax", show_default=True, help="How activation ranges are calibrated.")
@click.option("--int8-gate-images", type=click.IntRange(1), default=500, show_default=True,
              help="Further images of DATA, held out from calibration, for the accuracy gate.")
@click.option("--int8-min-agreement", type=click.FloatRange(0, 1), default=0.97, show_default=True,
              help="The gate: least top-1 agreement of the INT8 model with the float32 source.")
@click.option("--int8-max-logit-diff", type=click.FloatRange(0), help="The gate: largest logit "
              "difference from the float32 source allowed (default: not gated, only reported).")
@click.option("--keep-fp32", multiple=True, metavar="GLOB",
              help="Keep these layers in float32 (layer or node names, as the SQNR table shows; repeatable).")
@click.option("--int8-layers", type=click.Choice(["measure", "structured"]), default="measure", show_default=True,
              help="measure: time each decomposed layer shape in INT8 on this machine, structured and "
                   "dense (cached), and ship it dense where that is faster; structured: keep every "
                   "layer decomposed.")
@click.option("--passes", help="Comma-separated passes to run instead of the target's default.")
@click.option("--skip-pass", "skip_passes", multiple=True, help="A pass not to run (repeatable).")
@click.option("--inputs", "inputs_file", type=click.Path(path_type=str),
              help=".npz of your own inputs to verify on (besides random ones). For a model with "
              "several inputs, one array per input, named after it (float, integer or scalar): they "
              "fix its shape, and integer inputs keep their values in every verification sample.")
@click.option("--atol", type=float, help="Absolute tolerance of the verification.")
@click.option("--rtol", type=float, help="Relative tolerance of the verification.")
@click.option("--force", is_flag=True, help="Write the artifact even if verification fails (the "
              "manifest records it), and project declared layers above --max-residual.")
@click.option("--keep-csg-codes", is_flag=True, help="Keep CSG codes and generator as initializers "
              "(smaller artifact) instead of materialized kernels.")
@click.option("--sumpool-realization", type=sumpool_choice(),
              help="Force one sum-pool realization instead of the cost model's per-layer choice.")
@click.option("--autotune", is_flag=True, help="Choose each sum-pool realization, or the dense conv, by "
              "measuring them on this machine: under ONNX Runtime, or on the runtime of --target "
              "executorch/litert (cached per target and layer shape).")
@click.option("--tuning-cache", type=click.Path(dir_okay=False, path_type=str),
              help="Autotune cache file (default ~/.cache/structexport/sumpool-autotune.json).")
@click.option("--declare-structured", multiple=True, metavar="GLOB=SPEC",
              help="Dense convs trained toward a structure, e.g. 'layer*.conv2=c2n2' or 'conv3=8x2'.")
@click.option("--max-residual", type=float,
              help="Largest relative residual a layer's structure may have: declared layers "
              "(default 0.01), and layers of models outside the zoo, whose structure is "
              "discovered (default: exact, 1e-5; larger takes approximately structured weights).")
@click.option("--trust-pickle", is_flag=True, help="Allow arbitrary unpickling (trusted files only).")
@click.option("--allow-torchscript", is_flag=True, help="Allow TorchScript archives (trusted files only).")
@tvm_build_options
@device_options
@cli_evaluate.preprocess_options
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON for machines.")
@click.pass_context
@fail_cleanly
def convert(ctx, checkpoint, arch, model_spec, target, outdir, input_shape, precision, passes, skip_passes,
            inputs_file, atol, rtol, force, keep_csg_codes, sumpool_realization, autotune,
            tuning_cache, declare_structured, max_residual, trust_pickle, allow_torchscript,
            tvm_preset, tvm_target, tvm_structured, tune_per_task, tune_trials, tuning_db, rpc,
            tracker, key, rpc_timeout, preprocess, as_json, calibration, calibration_count,
            calibration_method, int8_gate_images, int8_min_agreement, int8_max_logit_diff, keep_fp32,
            int8_layers):
    """Rewrite CHECKPOINT's structured layers, export it to ONNX, verify it against the
    source model and write the package OUTDIR. CHECKPOINT is a zoo checkpoint, an ONNX
    model, a torch.export archive (.pt2), a state dict with --model, or TorchScript (with
    --allow-torchscript): for models outside the zoo the structure is found in the weights."""
    from structexport.convert import ConvertOptions
    from structexport.convert import convert as run_convert
    pass_options = {"keep_csg_codes": keep_csg_codes, "max_residual": max_residual,
                    "declared_structures": declared_structures(declare_structured),
                    "autotune": autotune, "tuning_cache": tuning_cache}
    if sumpool_realization:
        pass_options["sumpool_realization"] = sumpool_realization
    only = [p.strip() for p in passes.split(",") if p.strip()] if passes else None
    kind = source_kind(checkpoint, arch, model_spec)
    check_source_flags(checkpoint, kind, arch, model_spec, trust_pickle, allow_torchscript)
    check_pass_flags(kind, target, pass_options, only, list(skip_passes))
    check_tvm_flags(ctx, tvm_preset, tvm_target, tune_per_task, tune_trials, tuning_db, rpc, tracker)
    if kind == "onnx" and precision == "fp16":
        raise OptionRefusedError(f"--precision {precision} exports zoo checkpoints at half precision; "
                                 f"{checkpoint} is converted through its ONNX graph, at fp32",
                                 "leave --precision out")
    int8 = _int8_options(ctx, precision, calibration, calibration_count, calibration_method,
                         int8_gate_images, int8_min_agreement, int8_max_logit_diff, keep_fp32, int8_layers)
    options = ConvertOptions(
        target=target, input_shape=list(input_shape) or None, precision=precision,
        passes=only, skip_passes=list(skip_passes), inputs_file=inputs_file, atol=atol, rtol=rtol, force=force,
        pass_options=pass_options, trust_pickle=trust_pickle, allow_torchscript=allow_torchscript,
        model_spec=model_spec, int8=int8,
        preprocess=(built.to_dict() if (built := preprocess.build()) else None),
        target_options={"tvm_target": tvm_target, "tvm_preset": tvm_preset,
                        "tvm_structured": tvm_structured,
                        "device": device_spec(rpc, tracker, key, rpc_timeout),
                        **tune_options(tune_trials, tune_per_task), "tuning_db": tuning_db})
    with err.status("converting", spinner="dots") as status:
        result = run_convert(checkpoint, outdir, arch, options,
                             progress=lambda stage: status.update(f"converting: {stage}"))
    manifest = result.manifest
    # a cost model fitted on another CPU decided the layers: said on stderr, with --json too
    cost_notes = {rec["details"]["cost_model_note"] for r in manifest["passes"] for rec in r["records"]
                  if (rec.get("details") or {}).get("cost_model_note")}
    for note in sorted(cost_notes):
        err.print(f"[yellow]note:[/] {escape(note)}")
    if as_json:
        click.echo(json.dumps(manifest, indent=2, default=str))
    else:
        _render_convert(manifest, result.outdir)
    if not result.verified:
        sys.exit(32)


@main.command()
@click.argument("path", required=False, type=click.Path(path_type=str))
@click.option("--arch", help="Zoo name; without PATH, weights are drawn from --seed.")
@click.option("--target", type=click.Choice(["ort-cpu", "tvm-llvm", "tvm-arm", "tvm-cuda"]),
              help="Runtime to time on (default: OUTDIR's target, else ort-cpu).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 256))
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1, 4096))
@click.option("--input-shape", help="N,C,H,W (the batch is taken from --batch).")
@click.option("--repeat", default=100, show_default=True, type=click.IntRange(3, 100000),
              help="Interleaved timed runs of each model.")
@click.option("--warmup", default=10, show_default=True, type=click.IntRange(0, 10000))
@click.option("--per-layer", is_flag=True, help="Add a per-operator breakdown (ONNX Runtime profiler).")
@click.option("--compare-ort", is_flag=True, help="With a TVM target on this host: also time both "
              "models under ONNX Runtime in the same interleaved loop.")
@click.option("--sumpool-realization", type=sumpool_choice(),
              help="Force one sum-pool realization (default: the cost model's choice per layer).")
@click.option("--autotune", is_flag=True, help="Choose sum-pool realizations by measurement (cached).")
@click.option("--tuning-cache", type=click.Path(dir_okay=False, path_type=str),
              help="Autotune cache file (default ~/.cache/structexport/sumpool-autotune.json).")
@click.option("--seed", default=0, show_default=True, type=int)
@trust_options
@tvm_build_options
@click.option("--tune-repeats", default=1, show_default=True, type=click.IntRange(1, 100), metavar="N",
              help="TVM targets with --tune/--tune-trials: tune and build both models N times, each "
                   "afresh (its own database, MetaSchedule seed 0..N-1), time each pair, and report "
                   "every repeat with the median, min and max speedup (a tuning's luck varies).")
@device_options
@click.option("--json", "json_file", type=click.Path(path_type=str), help="Also write the result here.")
@click.pass_context
@fail_cleanly
def bench(ctx, path, arch, target, threads, batch, input_shape, repeat, warmup, per_layer, compare_ort,
          sumpool_realization, autotune, tuning_cache, seed, tvm_preset, tvm_target, tvm_structured,
          tune_per_task, tune_trials, tune_repeats,
          tuning_db, rpc, tracker, key, rpc_timeout, json_file, trust_pickle, allow_torchscript):
    """Time PATH (a converted OUTDIR or a checkpoint) or --arch NAME against its dense
    reference, interleaved in one process: measured vs theoretical speedup. An OUTDIR holds
    its own reference (reference.onnx): its source checkpoint is not needed."""
    pass_options = {"autotune": autotune, "tuning_cache": tuning_cache,
                    **({"sumpool_realization": sumpool_realization} if sumpool_realization else {})}
    kind = check_measure_flags(ctx, "bench", path, arch, trust_pickle, allow_torchscript, pass_options,
                               target)
    facts = package_facts(path) if kind == "package" else {}
    check_tvm_flags(ctx, tvm_preset, tvm_target, tune_per_task, tune_trials, tuning_db, rpc, tracker,
                    tuned_package=bool(facts.get("tuned")))
    built_for = facts.get("target") or ""
    timed_on = target or (built_for if built_for.startswith("tvm") else "ort-cpu")
    if per_layer and timed_on != "ort-cpu":
        raise OptionRefusedError(f"--per-layer breaks ONNX Runtime's time down by operator, and this "
                                 f"run times {timed_on}", "use `structexport profile` for TVM targets")
    if compare_ort and (timed_on == "ort-cpu" or rpc or tracker):
        raise OptionRefusedError("--compare-ort times a TVM target on this host beside ONNX Runtime"
                                 + ("; this run times ort-cpu already" if timed_on == "ort-cpu"
                                    else "; --rpc/--tracker time on a device"),
                                 "use it with --target tvm-llvm and no --rpc/--tracker")
    from structexport.bench import BenchOptions, run_bench
    opts = BenchOptions(target=target, threads=threads, batch=batch, input_shape=input_shape,
                        repeat=repeat, warmup=warmup, per_layer=per_layer, seed=seed,
                        compare_ort=compare_ort, trust_pickle=trust_pickle,
                        allow_torchscript=allow_torchscript, tune_repeats=tune_repeats,
                        log=lambda line: err.print(f"bench: {escape(line)}"),
                        pass_options={"autotune": autotune, "tuning_cache": tuning_cache,
                                      "threads": threads,
                                      **({"sumpool_realization": sumpool_realization}
                                         if sumpool_realization else {})},
                        target_options={"tvm_target": tvm_target, "tvm_preset": tvm_preset,
                                        "tvm_structured": tvm_structured,
                                        "device": device_spec(rpc, tracker, key, rpc_timeout),
                                        **tune_options(tune_trials, tune_per_task),
                                        "tuning_db": tuning_db})
    with err.status("bench", spinner="dots") as status:
        result = run_bench(path, arch, opts, progress=lambda m: status.update(f"bench: {m}"))
    if json_file:
        Path(json_file).write_text(json.dumps(result, indent=2) + "\n")
    s, d = result["latency_ms"], result["dense_latency_ms"]
    shown = (f"inputs {', '.join(i['name'] + ' ' + str(i['shape']) for i in result['inputs'])}"
             if len(result.get("inputs") or []) > 1 else f"input {result['input_shape']}")
    table = Table(title=f"{result['arch']} on {result['target']}, {result['threads']} thread(s), {shown}",
                  title_justify="left")
    for col in ("model", "median ms", "p10 ms", "p90 ms", "MACs"):
        table.add_column(col, justify="right")
    int8 = result.get("precision") == "int8"
    table.add_row("structured INT8" if int8 else "structured", f"{s['median']:.3f}", f"{s['p10']:.3f}",
                  f"{s['p90']:.3f}", f"{result['macs']['structured']:,}")
    if int8:
        q = result["dense_int8_latency_ms"]
        table.add_row("dense INT8", f"{q['median']:.3f}", f"{q['p10']:.3f}", f"{q['p90']:.3f}",
                      f"{result['macs']['dense']:,}")
    table.add_row("dense fp32" if int8 else "dense", f"{d['median']:.3f}", f"{d['p10']:.3f}", f"{d['p90']:.3f}",
                  f"{result['macs']['dense']:,}")
    out.print(table)
    if int8:
        out.print(f"INT8: structured INT8 over dense fp32 {result['speedup_over_dense_fp32']:.2f}x; dense INT8 "
                  f"over dense fp32 {result['dense_int8_over_dense_fp32']:.2f}x. The speedup below is over "
                  "dense INT8, quantized the same way with the same calibration.")
    eff = result["realization_efficiency"]
    device = result.get("device")
    where = ((f"device {device['served_by']} (key {device['key']!r}, from the tracker at {device['address']})"
              if device.get("served_by") else
              f"{'emulated aarch64 device' if result.get('emulated') else 'device'} at {device['address']}")
             if device and device["address"] != "local" else result["machine"]["cpu"]["model"])
    theory = result["speedup_theoretical"]
    repeats = result.get("tune_repeats")
    if repeats:
        _render_tune_repeats(repeats)
    out.print(f"speedup measured {result['speedup_measured']:.2f}x"
              + (f" (median of {repeats['count']} tunings)" if repeats else "") + ", theoretical "
              f"{'n/a (no MACs counted in the graphs)' if theory is None else f'{theory:.2f}x'}, realization efficiency "
              f"{'n/a' if eff is None else f'{eff:.2f}'} ({result['repeat']} interleaved runs"
              + (" per tuning" if repeats else "") + f", {where})")
    if repeats:
        sp, ef = repeats["speedup_measured"], repeats["realization_efficiency"]
        out.print(f"over {repeats['count']} tunings: speedup median {sp['median']:.2f}x, min {sp['min']:.2f}x, "
                  f"max {sp['max']:.2f}x"
                  + (f"; efficiency median {ef['median']:.2f}, min {ef['min']:.2f}, max {ef['max']:.2f}" if ef else "")
                  + f" (the table above shows tuning {repeats['reported_repeat']}, the median's)")
    if result.get("slower_than_dense"):
        hint = ("convert with --autotune (each layer's forms and its dense conv timed on this machine), "
                "or fit this CPU's layer cost model: structexport costmodel fit"
                if result["target"] in ("ort-cpu", "onnx") else
                "profile it to see which layers lose (structexport profile OUTDIR)")
        err.print(f"[yellow]warning:[/] the converted model ran slower than its "
                  f"{'dense INT8 baseline' if result.get('precision') == 'int8' else 'dense counterpart'} "
                  f"here ({result['speedup_measured']:.2f}x): {hint}")
    if result.get("structure_theoretical"):
        st = result["structure_theoretical"]
        out.print(f"against the structure's theory ({st['speedup']:.2f}x: every structured layer decomposed, "
                  f"sum-pools as additions): efficiency {st['efficiency']:.2f}")
    if result.get("note"):
        out.print(f"[yellow]note:[/] {result['note']}")
    if result.get("onnxruntime"):
        o = result["onnxruntime"]
        out.print(f"ONNX Runtime, same loop: structured {o['latency_ms']['median']:.3f} ms, dense "
                  f"{o['dense_latency_ms']['median']:.3f} ms ({o['speedup_measured']:.2f}x); TVM / ORT "
                  f"latency: structured {o['tvm_over_ort']:.2f}x, dense {o['tvm_over_ort_dense']:.2f}x")
    for which, ops in result.get("per_op_ms", {}).items():
        out.print(f"{which}: " + ", ".join(f"{op} {ms:.3f} ms" for op, ms in list(ops.items())[:8]))
    if result.get("per_layer"):
        layers = Table(title="per layer (ONNX Runtime profiler)", title_justify="left")
        for col in ("layer", "structured ms", "dense ms", "measured", "theoretical", "efficiency"):
            layers.add_column(col, justify="right" if col != "layer" else "left")
        fmt = lambda v, f: "" if v is None else format(v, f)  # noqa: E731
        for e in result["per_layer"]:
            layers.add_row(e["layer"], f"{e['structured_ms']:.3f}", f"{e['dense_ms']:.3f}",
                           fmt(e["speedup_measured"], ".2f"), fmt(e["speedup_theoretical"], ".2f"),
                           fmt(e["realization_efficiency"], ".2f"))
        out.print(layers)


def _render_tune_repeats(repeats: dict) -> None:
    table = Table(title=f"{repeats['count']} tunings, each afresh (own database and seed)", title_justify="left")
    for col in ("tuning", "seed", "structured ms", "dense ms", "speedup", "efficiency"):
        table.add_column(col, justify="right")
    for r in repeats["repeats"]:
        eff = r["realization_efficiency"]
        table.add_row(str(r["repeat"]), str(r["seed"]), f"{r['latency_ms']['median']:.3f}",
                      f"{r['dense_latency_ms']['median']:.3f}", f"{r['speedup_measured']:.2f}x",
                      "n/a" if eff is None else f"{eff:.2f}")
    out.print(table)


_INT8_FLAGS = {"calibration_count": "--calibration-count", "calibration_method": "--calibration-method",
               "int8_gate_images": "--int8-gate-images", "int8_min_agreement": "--int8-min-agreement",
               "int8_max_logit_diff": "--int8-max-logit-diff", "keep_fp32": "--keep-fp32",
               "int8_layers": "--int8-layers"}


def _int8_options(ctx, precision, calibration, count, method, gate_images, min_agreement, max_logit_diff,
                  keep_fp32, layer_choice):
    """The INT8 flags as one :class:`~structexport.quantize.Int8Options`, or None; flags
    that would do nothing without --calibration are refused."""
    from structexport.quantize import Int8Options
    orphans = [flag for name, flag in _INT8_FLAGS.items() if given(ctx, name)]
    if calibration is None:
        if orphans:
            raise OptionRefusedError(f"{', '.join(orphans)} {'sets' if len(orphans) == 1 else 'set'} up INT8 "
                                     "calibration, and there is none without --calibration DATA",
                                     "add --precision int8 --calibration DATA, or leave "
                                     f"{'it' if len(orphans) == 1 else 'them'} out")
        return None
    return Int8Options(data=calibration, count=count, gate_count=gate_images, method=method,
                       keep_fp32=list(keep_fp32), min_agreement=min_agreement, max_logit_diff=max_logit_diff,
                       layer_choice=layer_choice)


def _render_int8(q: dict) -> None:
    g, cal = q["gate"], q["calibration"]
    quant = q["quantization"]
    how = quant.get("calibration_method") or quant.get("tool")
    out.print(f"INT8: calibrated on {cal['calibration_images']} images of {escape(cal['data'])} "
              f"({how}); weights {quant['weights']}, activations {quant['activations']}"
              + (f"; kept in float32: {', '.join(quant['kept_fp32'])}" if quant.get("kept_fp32") else ""))
    islands = quant.get("kept_fp32_always") or {}
    if islands:
        kinds = sorted(set(islands.values()))
        out.print(f"  {len(islands)} node(s) kept in float32 around the quantized convs: " + "; ".join(
            f"{sum(v == k for v in islands.values())} x {k}" for k in kinds))
    actions = [rec["action"] for run in q.get("passes", []) for rec in run["records"]]
    choice = q.get("layer_choice") or {}
    if choice.get("layers"):
        rows = choice["layers"]
        dense = [r["layer"] for r in rows if r["choice"] == "dense"]
        unmeasured = (f", {choice['unmeasured']} not timed (shape unknown)" if choice.get("unmeasured") else "")
        out.print(f"  per-layer choice ({choice['policy']}: {choice.get('measured', 0)} layer shape(s) timed now, "
                  f"{choice.get('from_cache', 0)} layer(s) from {escape(str(choice.get('cache')))}{unmeasured}): "
                  f"{len(rows) - len(dense)} of {len(rows)} decomposed layers stay structured"
                  + (f"; dense where faster in INT8: {escape(', '.join(dense))}" if dense else ""))
    rebased = actions.count("rebased") or len(q.get("rebased") or [])
    if rebased:
        out.print(f"  {rebased} channel sum(s) rebased for INT8 (one sum / sqrt(window), "
                  "then differences)")
    mark = "[green]passed[/]" if g["passed"] else "[red]FAILED[/]"
    out.print(f"  accuracy gate {mark} on {g['images']} held-out images: top-1 agreement with the float32 "
              f"source {100 * g['agreement']:.2f}% (at least {100 * g['min_agreement']:.2f}%), largest logit "
              f"difference {g['max_logit_diff']:.3g}; top-1 {100 * g['reference_top1']:.2f}% float32, "
              f"{100 * g['int8_top1']:.2f}% INT8")
    for failure in g.get("failures") or []:
        out.print(f"    [red]{escape(failure)}[/]")
    dense = q.get("dense_int8")
    if dense:
        d = dense["gate"]
        out.print(f"  the dense model quantized the same way ({dense['file']}): agreement "
                  f"{100 * d['agreement']:.2f}%, top-1 {100 * d['int8_top1']:.2f}%")
    rows = sorted((r for r in q.get("layers") or [] if r["sqnr_db"] is not None), key=lambda r: r["sqnr_db"])[:5]
    if rows:
        out.print("  lowest per-layer SQNR (calibration images, errors of earlier layers included): "
                  + ", ".join(f"{escape(r['layer'])} {r['sqnr_db']:.1f} dB" for r in rows))


def _render_convert(m: dict, outdir) -> None:
    from collections import Counter
    several = len(m.get("inputs") or []) > 1 or any(i["dtype"] not in ("float32", "float16")
                                                    for i in m.get("inputs") or [])
    shown = (", ".join(f"{i['name']} {i['shape']} {i['dtype']}" for i in m["inputs"]) if several
             else m["input_shape"])
    out.print(f"[bold]{m['source']['arch']}[/] -> {m['target']} ({m['precision']}), "
              f"input{'s' * several} {shown}")
    for note in m.get("input_notes") or []:
        out.print(f"[yellow]warning:[/] {note}")
    table = Table(title="passes", title_justify="left")
    for col in ("pass", "changed", "layers", "actions", "max abs diff", "seconds"):
        table.add_column(col)
    for r in m["passes"]:
        actions = Counter(rec["action"] for rec in r["records"])
        table.add_row(r["name"], "yes" if r["modified"] else "no", str(len(r["records"])),
                      ", ".join(f"{n} {a}" for a, n in actions.items()),
                      "" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.2g}",
                      f"{r['seconds']:.2f}")
    out.print(table)
    b, a = m["before"], m["after"]
    dense = m.get("dense")
    # A zoo model's layers are structured already (before == after); its dense form is
    # what the speedup is against. An ONNX source's kernels are dense: no third column.
    show_dense = dense is not None and dense["macs"] != b["macs"]
    summary = Table(show_header=True)
    for col in ("", *(("dense",) if show_dense else ()), "before", "after"):
        summary.add_column(col, justify="right")
    rows = [("params", "params"), ("MACs", "macs"), ("sum-pool additions", "sumpool_adds")]
    if a.get("pool_adds"):   # the model's own average pooling, counted apart from sum-pools
        rows.append(("average pooling additions", "pool_adds"))
    for label, key in rows:
        summary.add_row(label, *((f"{dense.get(key, 0):,}",) if show_dense else ()), f"{b.get(key, 0):,}",
                        f"{a.get(key, 0):,}")
    out.print(summary)
    if dense and a["macs"]:
        out.print(f"theoretical speedup over the dense model: {dense['macs'] / a['macs']:.2f}x (MACs)")
    v = m["verification"]
    mark = "[green]passed[/]" if v["passed"] else "[red]FAILED[/]"
    against = f" against {m['verified_against']}" if m.get("verified_against") else ""
    out.print(f"verification {mark}{escape(against)}: {len(v['checks'])} output checks on ONNX Runtime "
              f"(optimizations off), max abs diff {v['max_abs_diff']:.3g}, max rel diff "
              f"{v['max_rel_diff']:.3g} (atol {v['atol']:g}, rtol {v['rtol']:g})")
    if m.get("int8"):
        if m["target"] == "ort-cpu":
            out.print(f"  ({v.get('file', 'model.fp32.onnx')}: the float32 model that was quantized to INT8)")
        else:
            out.print("  (model.onnx: the float32 graph of the same structure plan; the target quantized its own)")
        _render_int8(m["int8"])
    for d in (m.get("deployed_verification") or [])[1:]:   # the first is the check above
        if "graph_optimization_level" not in d["options"]:
            continue    # the TVM library: shown below as the target's own check
        mark = "[green]passed[/]" if d["passed"] else "[red]FAILED[/]"
        o = d["options"]
        # INT8 files are held to their fake-quantized graph (older manifests: every file of an INT8 package)
        int8_check = d.get("precision", "int8" if m.get("int8") else None) == "int8"
        against = f" against its fake-quantized graph (atol {d['atol']:.3g})" if int8_check else ""
        out.print(f"  {d['file']} as deployed ({o['graph_optimization_level']}"
                  f"{', ORT format' if o.get('model_format') == 'ORT' else ''}){against} {mark}: "
                  f"max abs diff {d['max_abs_diff']:.3g}, max rel diff {d['max_rel_diff']:.3g}")
    tv = m.get("target_verification")
    if tv and tv.get("skipped"):
        out.print(f"{m['target']} artifact verification {tv['skipped']}")
    elif tv:
        mark = "[green]passed[/]" if tv["passed"] else "[red]FAILED[/]"
        out.print(f"{m['target']} artifact {mark}: {len(tv['checks'])} output checks on {tv['runtime']}, "
                  f"max abs diff {tv['max_abs_diff']:.3g} (atol {tv['atol']:g}, rtol {tv['rtol']:g})")
    build = m.get("target_build") or {}
    if build.get("tuning"):
        tu = build["tuning"]
        budget = (f"{tu['trials_per_task']} per task" if tu.get("trials_per_task")
                  else f"{tu['trials_requested']} in all")
        out.print(f"tuning ({budget}): {tu['trials_run']} MetaSchedule trials run on {tu['measured_on']} "
                  f"({tu['tasks_from_database']} of {tu['tasks']} tasks from the database "
                  f"{tu['database']}), {tu['seconds']:.0f} s")
        if tu.get("per_task"):
            tasks = Table(title="tuning tasks", title_justify="left")
            for col, justify in (("task", "left"), ("trials now", "right"), ("best ms", "right"),
                                 ("from the database", "left")):
                tasks.add_column(col, justify=justify)
            for t in tu["per_task"]:
                tasks.add_row(t["task"], str(t["trials"]),
                              "-" if t["best_ms"] is None else f"{t['best_ms']:.4f}",
                              "yes" if t["from_database"] else "no")
            out.print(tasks)
    if build.get("delegation"):
        _render_delegation(build["delegation"], build.get("delegate", "the delegate"))
    if (m.get("device") or {}).get("emulated"):
        out.print("device: emulated aarch64 (qemu user mode) -- it proves the library runs and is "
                  "correct; its timings are not ARM latency")
    for name, art in m["artifacts"].items():
        out.print(f"  {outdir}/{name}  {art['bytes']:,} bytes  {art['description']}")
    out.print(f"  {outdir}/manifest.json")


def _render_delegation(d: dict, delegate: str) -> None:
    """What the runtime's delegate runs, and a warning for structured layers it does not."""
    share = d.get("macs_delegated_share")
    out.print(f"{delegate} delegate: {d['delegated_ops']} of {d['delegated_ops'] + d['portable_ops']} ops "
              f"in {d['delegate_calls']} delegate calls"
              + (f", {100 * share:.1f}% of multiply-accumulates" if share is not None else ""))
    if d["portable"]:
        out.print(f"  left to the runtime's own kernels: " + ", ".join(f"{e['op']} x{e['count']}" for e in d["portable"]))
    falling = d.get("structured_layers_not_delegated") or []
    if falling:
        more = f" and {len(falling) - 4} more" if len(falling) > 4 else ""
        err.print(f"[yellow]warning:[/] {len(falling)} structured layer{'s' * (len(falling) > 1)} run partly "
                  f"outside {delegate}, on the runtime's slow reference kernels: {', '.join(falling[:4])}{more} "
                  f"(the manifest lists each op under target_build.delegation)")


# Commands that live in their own modules; they import structexport.cli_common, never this
# module, so registering them here makes no import cycle.
main.add_command(cli_costmodel.costmodel)
main.add_command(cli_device.device)
main.add_command(cli_evaluate.evaluate)
main.add_command(cli_profile.profile)
main.add_command(cli_regress.regress)


def run() -> None:
    """Console entry point: like ``main``, but a usage error is one ``error:`` line too."""
    try:
        main.main(standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        sys.exit(130)
    except click.UsageError as exc:
        command = exc.ctx.command_path if exc.ctx else "structexport"
        err.print(f"[bold red]error:[/] {escape(exc.format_message())} (see `{escape(command)} --help`)")
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        err.print(f"[bold red]error:[/] {escape(exc.format_message())}")
        sys.exit(exc.exit_code)


if __name__ == "__main__":  # python -m structexport.cli
    run()
