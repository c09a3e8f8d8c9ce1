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
from structexport.profiling.layermap import onnx_node_layers
from structexport.profiling.options import ProfileError, ProfileOptions
from structexport.profiling.ort import measure_ort
from structexport.profiling.peak import measure_peak
from structexport.profiling.tvm_host import measure_tvm
from structexport.profiling.tvm_remote import profile_remote

# onnx_node_layers: bench and tests/test_costmodel_bench.py import it from here
__all__ = ["REMOTE_TARGETS", "TARGETS", "ProfileError", "ProfileOptions", "onnx_node_layers",
           "run_profile"]

TARGETS = ("ort-cpu", "tvm-llvm")
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
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="structexport-profile-") as tmp:
        work = Path(tmp)
        workload = resolve_workload(path, arch, WorkloadOptions(
            target=opts.target, input_shape=opts.input_shape, batch=opts.batch, seed=opts.seed,
            trust_pickle=opts.trust_pickle, allow_torchscript=opts.allow_torchscript,
            need="graph", command="profile"), work, say)
        src = _inputs_of(workload)
        target = src["target"]
        if spec is not None and target not in REMOTE_TARGETS:
            raise ProfileError(f"--rpc/--tracker profile TVM libraries ({', '.join(REMOTE_TARGETS)}), "
                               f"not {target!r}", "pass --target tvm-llvm or --target tvm-arm")
        if spec is None and target not in TARGETS:
            raise ProfileError(f"profile supports --target {' or '.join(TARGETS)} on this host, "
                               f"not {target!r}", "pass --target ort-cpu or --target tvm-llvm, or "
                               "--rpc HOST:PORT for a TVM device")
        dense_onnx = workload.package.reference_onnx
        feed = workload.package.feed()
        if spec is not None:
            measured = profile_remote(src["tvm_onnx"], dense_onnx, feed, opts, say, spec, target,
                                      src.get("tvm_target"), work, fuse=src["fuse"],
                                      package=workload.package)
        elif target == "ort-cpu":
            measured = measure_ort(src["onnx"], dense_onnx, feed, opts, say, work,
                                   package=workload.package)
        else:
            measured = measure_tvm(src["tvm_onnx"], dense_onnx, feed, opts, say,
                                   tvm_target=src.get("tvm_target"), artifact=src["artifact"],
                                   fuse=src["fuse"], package=workload.package)
        peak = measure_peak(opts.threads) if opts.peak else None
        report = assemble(src, target, dense_onnx, measured, peak, opts)
        if spec is not None:
            report["device"] = spec.describe()
            report["notes"].append("on a remote device each PrimFunc call is timed on its own "
                                   "(the VM's instrument hook does not cross RPC): "
                                   "`(outside kernels)` is the whole run minus those isolated "
                                   "times, and can be slightly negative; the machine peak is "
                                   "this host's")
        report["seconds"] = round(time.perf_counter() - started, 2)
        return report


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
        notes.append(f"{package.root}/model.so was tuned ({package.tuning.get('tasks', '?')} tasks); "
                     "the profiled builds are untuned, so per-layer times are the untuned "
                     "kernels' (model.so's own latency is in the totals)")
    return {"arch": package.arch, "checkpoint": workload.label if workload.origin != "outdir"
            else (package.source_path or workload.label),
            "outdir": str(package.root) if reused else None, "target": target,
            "shape": package.input_shape, "onnx": package.model_onnx, "passes": package.passes,
            "tvm_onnx": package.composed_onnx if fuse else package.model_onnx, "fuse": fuse,
            "tvm_target": tvm_target, "artifact": artifact, "notes": notes,
            "layers": [layer["name"] for layer in package.layers]}

