"""``profile``: per-layer device profiles of a structured model beside its dense counterpart.

The driver: :func:`run_profile` resolves the workload, hands it to the collector of its
target and assembles the report; the collectors, the layer mapping, the report and its
rendering are in :mod:`structexport.profiling` (whose docstring says where the time comes
from).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Callable

from structexport.profiling.assemble import assemble
from structexport.profiling.executorch import measure_executorch
from structexport.profiling.layermap import onnx_node_layers
from structexport.profiling.litert import measure_litert
from structexport.profiling.options import ProfileError, ProfileOptions
from structexport.profiling.ort import measure_ort
from structexport.profiling.peak import measure_peak
from structexport.profiling.tvm_host import measure_tvm, tuned_database
from structexport.profiling.tvm_remote import profile_remote

# onnx_node_layers: bench and tests/test_costmodel_bench.py import it from here
__all__ = ["REMOTE_TARGETS", "TARGETS", "ProfileError", "ProfileOptions", "onnx_node_layers",
           "run_profile"]

TARGETS = ("ort-cpu", "tvm-llvm")
# Program targets (torch lowered to a phone runtime's program) whose per-op profiler profile reads
PROGRAM_TARGETS = ("executorch", "litert")
REMOTE_TARGETS = ("tvm-llvm", "tvm-arm")


def run_profile(path: str | None, arch: str | None, opts: ProfileOptions,
                progress: Callable[[str], None] | None = None) -> dict:
    """Profile a converted OUTDIR, a checkpoint (converted on the fly) or a zoo ``arch``
    (weights from ``opts.seed``); returns the report dict
    (:data:`~structexport.profiling.assemble.SCHEMA`)."""
    from structexport.workload import WorkloadOptions, resolve_workload
    say = progress or (lambda _m: None)
    spec = None
    if opts.rpc or opts.tracker or opts.key:
        from structexport import rpc
        spec = rpc.parse_device(opts.rpc, opts.tracker, opts.key, opts.rpc_timeout)  # usage errors first
    _refuse_int8_elsewhere(path, opts.target, spec is not None)   # before any conversion
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="structexport-profile-") as tmp:
        work = Path(tmp)
        program = _requested_program_target(path, opts.target)
        if program and program not in PROGRAM_TARGETS:
            raise _program_refusal(program)
        if program == "litert" and opts.threads != 1:
            raise ProfileError(f"--threads {opts.threads}: LiteRT's profiler runs the model in a CompiledModel, "
                               "whose thread count its C API does not set (it runs on one thread)",
                               "profile litert with --threads 1 (the default); bench --threads N times "
                               "the Interpreter on N threads")
        # a program target profiles its own program: a package without one is converted again
        workload = resolve_workload(path, arch, WorkloadOptions(
            target=opts.target, input_shape=opts.input_shape, batch=opts.batch, seed=opts.seed,
            trust_pickle=opts.trust_pickle, allow_torchscript=opts.allow_torchscript,
            need="artifact" if program else "graph", command="profile"), work, say)
        src = _inputs_of(workload)
        target = src["target"]
        if src["precision"] == "int8" and (spec is not None or target != workload.package.target
                                           or target not in ("ort-cpu",) + PROGRAM_TARGETS):
            raise _int8_refusal(workload.package.root, target, spec is not None, workload.package.target)
        if spec is not None and target not in REMOTE_TARGETS:
            raise ProfileError(f"--rpc/--tracker profile TVM libraries ({', '.join(REMOTE_TARGETS)}), "
                               f"not {target!r}", "pass --target tvm-llvm or --target tvm-arm")
        from structexport.targets import is_program_target
        if spec is None and is_program_target(target) and target not in PROGRAM_TARGETS:
            raise _program_refusal(target)
        if spec is None and target not in TARGETS + PROGRAM_TARGETS:
            raise ProfileError(f"profile supports --target {' or '.join(TARGETS)} on this host, "
                               f"not {target!r}", "pass --target ort-cpu or --target tvm-llvm, or "
                               "--rpc HOST:PORT for a TVM device")
        # a program's dense side is a program; MACs are counted on its float32 reference.onnx
        dense_onnx = workload.package.reference_onnx if program else _dense_side(workload.package)
        feed = workload.package.feed()
        if spec is not None:
            measured = profile_remote(src["tvm_onnx"], dense_onnx, feed, opts, say, spec, target,
                                      src.get("tvm_target"), work, fuse=src["fuse"],
                                      package=workload.package)
        elif target == "executorch":
            measured = measure_executorch(workload.package, opts, say, work)
        elif target == "litert":
            measured = measure_litert(workload.package, opts, say, work)
        elif target == "ort-cpu":
            measured = measure_ort(src["onnx"], dense_onnx, feed, opts, say, work,
                                   package=workload.package)
        else:
            measured = measure_tvm(src["tvm_onnx"], dense_onnx, feed, opts, say,
                                   tvm_target=src.get("tvm_target"), artifact=src["artifact"],
                                   fuse=src["fuse"], package=workload.package)
        peak = measure_peak(opts.threads) if opts.peak else None
        report = assemble(src, target, dense_onnx, measured, peak, opts)
        if "programs" in measured:   # a program target: what was profiled, and how it was mapped
            report["programs"] = measured["programs"]
            report["dense"]["program"] = measured["programs"]["dense"]
            report["mapping"]["rule"] = measured["mapping_rule"]
            report["mapping"]["outside"] = measured["outside"]
            report["notes"].extend(measured.get("notes", []))
            if src["precision"] == "int8":
                _program_int8_notes(report, workload.package, measured["programs"]["dense"])
        if spec is not None:
            report["device"] = spec.describe()
            report["notes"].append("on a remote device each PrimFunc call is timed on its own "
                                   "(the VM's instrument hook does not cross RPC): "
                                   "`(outside kernels)` is the whole run minus those isolated "
                                   "times, and can be slightly negative; the machine peak is "
                                   "this host's")
        report["seconds"] = round(time.perf_counter() - started, 2)
        return report


def _program_int8_notes(report: dict, package, dense: str) -> None:
    """An INT8 program's report: its dense side is the dense INT8 program, and its MACs are
    model.onnx's (every structured layer decomposed), as bench counts them."""
    composed = list((package.manifest.get("int8") or {}).get("composed_dense") or [])
    report["dense"] = {"onnx": dense, "program": dense,
                       "description": "the dense model quantized the same way, with the same calibration "
                                      "(the INT8 baseline on this runtime)"}
    report["int8"]["dense"] = dense
    report["notes"] = [n for n in report["notes"] if not n.startswith(("dense: the dense model quantized",
                                                                        "MACs are counted on the float32"))]
    report["notes"].append(f"dense: {dense}, the dense model quantized the same way with the same "
                           "calibration (checked against its fake-quantized graph before timing), the INT8 "
                           "baseline on this runtime; bench also times the dense float32 program")
    report["notes"].append("MACs are counted on model.onnx and reference.onnx (float32), as bench counts "
                           "them: every structured layer decomposed" + (
                               f"; the INT8 stage kept {len(composed)} layer(s) dense ({', '.join(composed[:6])}"
                               f"{', ...' if len(composed) > 6 else ''}), which run one dense conv each: their "
                               "structured MACs understate what runs" if composed else ""))


def _requested_program_target(path: str | None, target: str | None) -> str | None:
    """The program target (executorch, litert) this run profiles, None for the others: the
    one named, else a package's own."""
    from structexport.package import Package, is_package
    from structexport.targets import is_program_target
    if target is None and path and is_package(path):
        try:
            target = Package.load(path, check_hashes=False).target
        except Exception:   # resolve_workload reports a broken package with its own error
            return None
    return target if target and is_program_target(target) else None


def _program_refusal(target: str) -> ProfileError:
    return ProfileError(f"profile does not read {target}'s per-op profiler yet (docs/{target}.md says "
                        "what it gives)", "pass --target ort-cpu to profile the same model converted for ONNX "
                        "Runtime; bench times the program itself")


def _int8_refusal(root, target: str | None, remote: bool, own: str = "ort-cpu") -> ProfileError:
    from structexport.targets import is_program_target
    if is_program_target(own):
        where = "on a device (--rpc/--tracker)" if remote else f"on {target}"
        return ProfileError(f"{root} is an INT8 {own} package: its integer program runs on {own}, and "
                            f"profile cannot run it {where}", f"profile it on its own target ({own}: leave "
                            "--target and --rpc out)")
    where = "on a device (--rpc/--tracker)" if remote else f"on {target}"
    return ProfileError(f"{root} is an INT8 package: its integer kernels run under ONNX Runtime, "
                        f"and profile cannot run them {where} (TVM has no INT8 convolution; "
                        "docs/int8.md)", "profile it with --target ort-cpu, its own target; TVM "
                        "targets profile float32 packages")


def _refuse_int8_elsewhere(path: str | None, target: str | None, remote: bool) -> None:
    """An INT8 package profiles on ort-cpu only: refused before anything is converted (another
    target would otherwise send its QDQ graph to TVM, or convert its source again at fp32)."""
    from structexport.package import Package, is_package
    if not path or not is_package(path):
        return
    try:
        package = Package.load(path, check_hashes=False)
    except Exception:   # resolve_workload reports a broken package with its own error
        return
    wanted = target or package.target
    if package.precision == "int8" and (remote or wanted != package.target
                                        or wanted not in ("ort-cpu",) + PROGRAM_TARGETS):
        raise _int8_refusal(package.root, wanted, remote, package.target)


def _dense_side(package) -> Path | None:
    """The dense model profiled beside the structured one: ``reference.onnx``, or for an INT8
    package the dense model quantized the same way (``reference.int8.onnx``, the baseline an
    INT8 user would otherwise ship, as ``bench`` judges it)."""
    if package.precision != "int8":
        return package.reference_onnx
    from structexport.quantize import DENSE_INT8
    path = package.root / DENSE_INT8
    if DENSE_INT8 not in package.manifest["artifacts"] or not path.is_file():
        raise ProfileError(f"{package.root} is an INT8 package without {DENSE_INT8}, the dense "
                           "INT8 baseline it is profiled against",
                           "convert the model again with this structexport")
    return path


def layer_sqnr(rows: list[dict], layers: list[str]) -> dict[str, float | None]:
    """The lowest SQNR (dB) of each source layer among an INT8 package's per-layer rows
    (``manifest["int8"]["layers"]``, named ``stage_1.0.conv_a.conv``,
    ``stage_1.0.conv_a.pool.band`` ...): those whose layer is the source layer or starts
    with its name and a dot; None where no row has a finite SQNR."""
    out: dict[str, float | None] = {}
    for name in layers:
        values = [float(r["sqnr_db"]) for r in rows
                  if (r.get("layer") == name or str(r.get("layer", "")).startswith(name + "."))
                  and isinstance(r.get("sqnr_db"), (int, float))]
        out[name] = min(values) if values else None
    return out


def _inputs_of(workload) -> dict:
    """What the collectors and :func:`assemble` read of a workload's package."""
    package, target = workload.package, workload.target
    notes = list(workload.notes)
    reused = workload.origin == "outdir" and not workload.converted_here
    # the TVM target the package's library was built for, when that is the one profiled
    tvm_target = package.tvm_target if target.startswith("tvm") and package.target == target else None
    artifact = package.library if reused and package.target == target == "tvm-llvm" else None
    # TVM compiles what model.so was compiled from: the composed graph with the fused
    # operator, where the package keeps one (a fused tvm-* package); else model.onnx
    fuse = (target.startswith("tvm") and package.target == target
            and package.composed_onnx is not None)
    if (target.startswith("tvm") and not fuse and package.target.startswith("tvm")
            and package.structured_mode == "fused"):
        notes.append(f"{package.root}/model.so fuses its structured convs, but the package has no "
                     "composed.onnx (an older structexport wrote it): the profiled builds "
                     "compile model.onnx's decomposed operators; convert again to profile the "
                     "fused operator")
    if reused and package.tuning and target.startswith("tvm"):
        tuned = f"{package.root}/model.so was tuned ({package.tuning.get('tasks', '?')} tasks)"
        database = tuned_database(package)
        if artifact is not None and database is not None:
            notes.append(f"{tuned}: on this host the profiled structured build is model.so itself, "
                         "its calls mapped to layers by a build compiled as it was (weights bound "
                         f"as constants, its tuning database {database} applied, each constant "
                         "recognized among the ONNX initializers by its values), or that build "
                         "where model.so makes other calls (the runtime line says which); the "
                         "dense reference is compiled the same way with the same database, its "
                         "kernels tuned where bench tuned the dense counterpart into it. Over "
                         "--rpc/--tracker the profiled builds are untuned")
        else:
            why = ("its tuning database is not on this machine" if artifact is not None
                   else "it is profiled from untuned builds for this target")
            notes.append(f"{tuned}, but {why}: the profiled builds are untuned, so per-layer "
                         "times are the untuned kernels' (model.so's own latency is in the totals)")
    layers = [layer["name"] for layer in package.layers]
    src = {"arch": package.arch, "checkpoint": workload.label if workload.origin != "outdir"
           else (package.source_path or workload.label),
           "outdir": str(package.root) if reused else None, "target": target,
           "shape": package.input_shape, "onnx": package.model_onnx, "passes": package.passes,
           "tvm_onnx": package.composed_onnx if fuse else package.model_onnx, "fuse": fuse,
           "tvm_target": tvm_target, "artifact": artifact, "notes": notes,
           "layers": layers, "precision": package.precision}
    if package.precision == "int8":
        from structexport.quantize import DENSE_INT8, FP32_MODEL
        int8 = package.manifest.get("int8") or {}
        rows = list(int8.get("layers") or [])
        # An INT8 graph's convs read dequantized weights (and its 0/1 and +-1 channel-sum
        # kernels are not recognizable once quantized): MACs are counted on the float32 model
        # that was quantized and on the dense reference, as bench counts them
        from structexport.targets import is_program_target
        program = is_program_target(package.target)   # its model.onnx is float32 already
        src["macs_onnx"] = {"structured": package.model_onnx if program else package.root / FP32_MODEL,
                            "dense": package.reference_onnx}
        src["int8"] = {
            "dense": DENSE_INT8,
            "dense_description": "the dense model quantized the same way, with the same "
                                 "calibration (the INT8 baseline)",
            "sqnr": layer_sqnr(rows, layers),
            "sqnr_source": "manifest.json int8.layers: SQNR of each conv/linear output in the QDQ "
                           "graph against float32, on the calibration images, errors of earlier "
                           "layers included; per source layer the lowest of its rows" if rows or not program
                           else f"none: the {package.target} INT8 stage records no per-layer SQNR",
            "gate": int8.get("gate"), "dense_int8": int8.get("dense_int8")}
    return src

