"""A real ONNX model trained and exported by another framework, through structexport.

The model is PaddleOCR's text-direction classifier ``ch_ppocr_mobile_v2.0_cls`` (a
MobileNetV3-small, trained by PaddlePaddle, exported by paddle2onnx: producer
``PaddlePaddle``, opset 11, weights held in ``Constant`` nodes, input ``x`` of shape
``[-1, 3, ?, ?]``, run at 1,3,48,192), as shipped inside the PyPI package
``rapidocr-onnxruntime`` 1.4.4 (Apache-2.0; a ``test`` extra of this project). See
docs/real-models.md.

    .venv/bin/python benchmarks/real_onnx.py [--out DIR] [--layers 11] [--repeat 200]
                                             [--structure structured grouped] [--tvm]
                                             [--json FILE] [--no-profile]

1. converts the model as shipped (``structexport convert MODEL --target ort-cpu
   --input-shape 1,3,48,192``): its weights are not structured, nothing is rewritten;
2. for each ``--structure``, writes a copy whose largest 1x1 pointwise convs (``--layers``,
   by multiplies) have their kernels replaced by their projection onto that structure;
   nothing else in the file changes (same graph, same Constant nodes, same names):
   - ``structured``: the least-squares projection onto a ``C/2 x 1 x 1`` structured conv
     (structure along input channels: ``project_kronecker(W, C/2, 1)``, ``compose_kernel``);
   - ``grouped``: a block-diagonal pattern of 2 groups (the off-diagonal blocks zeroed),
     the group sparsity SSC's ``p``/``g`` patterns generalize;
3. converts that copy (the structure is found in the weights: decompose_structured_conv
   for the first, lower_sparse_conv for the second), benches it (``structexport bench OUT
   --repeat R``, the converted model against its own dense reference, interleaved) at
   batch 1 and at the shipped batch 6, and profiles it;
4. times the converted model against the ORIGINAL model as shipped, and the projected
   copy, interleaved in one process (``structexport.timing.time_interleaved``, ONNX
   Runtime with all optimizations, 1 thread);
5. prints one JSON object (also written to ``--json``): the model's provenance, the
   layers projected and found, the theoretical and measured speedups, the machine and
   the commands.

The projected model's outputs are not the trained model's any more (accuracy is not the
point here: random weights of the same structure would do).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PACKAGE = "rapidocr-onnxruntime"
PACKAGE_VERSION = "1.4.4"
MODEL_FILE = "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"
# The package's own config.yaml: Cls.cls_image_shape [3, 48, 192]
INPUT_SHAPE = (1, 3, 48, 192)
SHIPPED_BATCH = 6     # config.yaml: Cls.cls_batch_num
STRUCTEXPORT = [sys.executable, "-m", "structexport"]


def model_path() -> Path:
    """The ``.onnx`` file inside the installed package, found through its distribution's
    file list (the package itself is not imported: that would load OpenCV)."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{PACKAGE} is not installed: pip install '{PACKAGE}=={PACKAGE_VERSION}' "
                                "(it is in this project's test extra)") from None
    for f in dist.files or []:
        if str(f) == MODEL_FILE:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
    raise FileNotFoundError(f"{PACKAGE} {dist.version} has no {MODEL_FILE}")


def provenance(path: Path) -> dict:
    import hashlib

    import onnx
    m = onnx.load(str(path))
    dist = importlib.metadata.distribution(PACKAGE)
    inp = m.graph.input[0]
    return {"package": PACKAGE, "version": dist.version, "license": dist.metadata.get("License"),
            "file": MODEL_FILE, "bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "producer": f"{m.producer_name} {m.producer_version}".strip(),
            "opset": next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")),
            "input": {"name": inp.name, "shape": [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                                                  for d in inp.type.tensor_type.shape.dim]},
            "run_at": list(INPUT_SHAPE)}


# --------------------------------------------------------------------------- the graph's convs

def _weight_holders(proto) -> dict:
    """Tensor name -> the TensorProto holding it (a Constant node's value or an initializer)."""
    holders = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    holders[node.output[0]] = a.t
    return holders


def conv_table(proto, shape=INPUT_SHAPE) -> list[dict]:
    """One row per Conv node: node name, weight name, weight shape, group, multiplies at
    ``shape`` (shapes inferred on a copy with the input fixed)."""
    import onnx
    from onnx import numpy_helper
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    for d, v in zip(fixed.graph.input[0].type.tensor_type.shape.dim, shape):
        d.Clear()
        d.dim_value = v
    inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=False, data_prop=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    holders = _weight_holders(proto)
    rows = []
    for node in proto.graph.node:
        if node.op_type != "Conv" or node.input[1] not in holders:
            continue
        w = numpy_helper.to_array(holders[node.input[1]])
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        out = shapes.get(node.output[0], [])
        macs = int(np.prod(out) * np.prod(w.shape[1:])) if out and all(out) else 0
        rows.append({"node": node.name, "weight": node.input[1], "shape": list(w.shape),
                     "group": int(group), "macs": macs})
    return rows


def pick_pointwise(table: list[dict], count: int) -> list[dict]:
    """The ``count`` 1x1 convs (group 1, an even number of input channels, at least 16) with
    the most multiplies."""
    pointwise = [r for r in table if r["group"] == 1 and r["shape"][2:] == [1, 1]
                 and r["shape"][1] % 2 == 0 and r["shape"][1] >= 16]
    return sorted(pointwise, key=lambda r: (-r["macs"], r["node"]))[:count]


STRUCTURES = ("structured", "grouped")


def _project_structured(w: np.ndarray) -> tuple[np.ndarray, str]:
    """Least-squares projection onto a ``C/2 x 1 x 1`` structured conv (structure along the
    input channels)."""
    import torch

    from structexport.discovery import project_kronecker
    from structexport.layers.structured import compose_kernel
    _, C, N, _ = w.shape
    alpha, _ = project_kronecker(torch.from_numpy(w.astype(np.float64)), C // 2, 1)
    return compose_kernel(alpha, C, N).numpy().astype(w.dtype), f"{C // 2}x1x1"


def _project_grouped(w: np.ndarray) -> tuple[np.ndarray, str]:
    """Projection onto a block-diagonal pattern of 2 groups (an SSC-style sparse
    pattern: the off-diagonal blocks zeroed), which a grouped conv computes."""
    O, C = w.shape[:2]
    mask = np.zeros_like(w)
    mask[:O // 2, :C // 2] = mask[O // 2:, C // 2:] = 1
    return w * mask, "2 groups"


def project_copy(proto, picks: list[dict], structure: str = "structured"):
    """A copy of ``proto`` whose picked kernels are replaced by their projection onto
    ``structure`` (``"structured"``: ``C/2 x 1 x 1``; ``"grouped"``: block-diagonal, 2
    groups), in place in the Constant nodes (or initializers) that hold them. Returns the
    copy and one record per layer (structure, relative change of the kernel)."""
    import onnx
    from onnx import numpy_helper
    project = {"structured": _project_structured, "grouped": _project_grouped}[structure]
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    holders = _weight_holders(out)
    records = []
    for r in picks:
        holder = holders[r["weight"]]
        w = numpy_helper.to_array(holder)
        projected, spec = project(w)
        change = float(np.linalg.norm((projected - w).astype(np.float64)) / np.linalg.norm(w.astype(np.float64)))
        holder.CopyFrom(numpy_helper.from_array(projected, holder.name))
        records.append(dict(r, structure=spec, residual=change))
    onnx.checker.check_model(out)
    return out, records


# --------------------------------------------------------------------------- the commands

def _cli(args: list[str], timeout: float, log: list[str]) -> subprocess.CompletedProcess:
    shown = "structexport " + " ".join(shlex.quote(a) for a in args)
    log.append(shown)
    t = time.perf_counter()
    proc = subprocess.run(STRUCTEXPORT + args, capture_output=True, text=True, timeout=timeout,
                          check=False)
    print(f"$ {shown}   [rc {proc.returncode}, {time.perf_counter() - t:.1f} s]", file=sys.stderr)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
    return proc


def convert(model: Path, outdir: Path, log: list[str]) -> dict:
    shape = ",".join(map(str, INPUT_SHAPE))
    proc = _cli(["convert", str(model), "--target", "ort-cpu", "--input-shape", shape,
                 "-o", str(outdir), "--json"], 600, log)
    if proc.returncode != 0:
        raise RuntimeError(f"convert {model} failed (exit code {proc.returncode})")
    return json.loads((outdir / "manifest.json").read_text())


REWRITTEN = ("decomposed", "lowered")   # decompose_structured_conv, lower_sparse_conv


def rewritten(manifest: dict) -> dict[str, dict]:
    """Layers a pass rewrote: {layer name: the pass record's details and action}."""
    return {r["layer"]: dict(r["details"], action=r["action"]) for run in manifest["passes"]
            for r in run["records"] if r["action"] in REWRITTEN}


def time_against_source(original: Path, projected: Path, package: Path, repeat: int) -> dict:
    """Interleaved medians (ms) of the original model as shipped, the projected copy and
    the converted projected model, ONNX Runtime all optimizations, 1 thread."""
    from structexport.ortsession import ort_session
    from structexport.timing import time_interleaved
    feed = np.random.default_rng(0).standard_normal(INPUT_SHAPE).astype(np.float32)
    workloads = {"original (as shipped)": ort_session(original, 1),
                 "projected copy (dense)": ort_session(projected, 1),
                 "converted projected": ort_session(package / "model.onnx", 1)}
    res = time_interleaved(workloads, feed, repeat, warmup=max(10, repeat // 10))
    base = res["original (as shipped)"]["median"]
    return {"repeat": repeat, "threads": 1, "latency_ms": res,
            "speedup_vs_original": base / res["converted projected"]["median"],
            "speedup_vs_projected_copy": res["projected copy (dense)"]["median"] / res["converted projected"]["median"]}


def bench(package: Path, repeat: int, log: list[str], batch: int = 1) -> dict:
    """``structexport bench PACKAGE --repeat R [--batch B]``: the converted model against its
    own dense reference (the source it was converted from), interleaved. At another batch
    than the package's, bench converts again from the source file."""
    out = package.parent / f"{package.name}.bench{batch}.json"
    proc = _cli(["bench", str(package), "--repeat", str(repeat), "--json", str(out)]
                + (["--batch", str(batch)] if batch != 1 else []), 900, log)
    if proc.returncode != 0:
        return {"failed": proc.returncode, "error": (proc.stdout + proc.stderr).strip().splitlines()[-1:]}
    b = json.loads(out.read_text())
    return {"speedup_measured": b["speedup_measured"], "speedup_theoretical": b["speedup_theoretical"],
            "realization_efficiency": b["realization_efficiency"],
            "median_ms": {"converted": b["latency_ms"]["median"], "dense": b["dense_latency_ms"]["median"]},
            "runs": b["latency_ms"]["runs"]}


def profile(package: Path, timeout: float, log: list[str]) -> dict:
    """``structexport profile PACKAGE -o PACKAGE.html``, given up after ``timeout`` seconds."""
    report = package.parent / f"{package.name}.profile.html"
    try:
        proc = _cli(["profile", str(package), "--repeat", "20", "--no-peak", "-o", str(report)], timeout, log)
    except subprocess.TimeoutExpired:
        return {"rc": None, "timed_out_s": timeout}
    return {"rc": proc.returncode, "report": str(report) if proc.returncode == 0 else None}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    ap.add_argument("--layers", type=int, default=11,
                    help="pointwise convs to project, the largest first [11: each has at least 2.5%% of the multiplies]")
    ap.add_argument("--repeat", type=int, default=200, help="timed runs of bench and of the interleaved timing [200]")
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--no-profile", action="store_true", help="skip structexport profile")
    ap.add_argument("--profile-timeout", type=float, default=60, help="seconds before a profile is given up [60]")
    ap.add_argument("--tvm", action="store_true", help="also convert the projected copies for tvm-llvm and bench them")
    ap.add_argument("--structure", nargs="+", choices=STRUCTURES, default=list(STRUCTURES),
                    help="the structures to project the picked layers onto [both]: structured "
                         "(C/2x1x1) and grouped (block-diagonal, 2 groups)")
    args = ap.parse_args(argv)
    import onnx

    from structexport.machine import machine
    work = args.out or Path(tempfile.mkdtemp(prefix="real-onnx-"))
    work.mkdir(parents=True, exist_ok=True)
    log: list[str] = []
    src = model_path()
    result = {"model": provenance(src), "machine": machine()}

    base = convert(src, work / "original", log)
    actions: dict[str, int] = {}
    for run in base["passes"]:
        for r in run["records"]:
            actions[r["action"]] = actions.get(r["action"], 0) + 1
    result["original"] = {"verification_passed": base["verification"]["passed"],
                          "decompose_actions": actions, "rewritten": sorted(rewritten(base)),
                          "macs": base["before"]["macs"],
                          "speedup_theoretical": base["before"]["macs"] / base["after"]["macs"],
                          "bench": bench(work / "original", args.repeat, log)}
    if not args.no_profile:
        result["original"]["profile"] = profile(work / "original", args.profile_timeout, log)

    proto = onnx.load(str(src))
    picks = pick_pointwise(conv_table(proto), args.layers)
    for structure in args.structure:
        projected, records = project_copy(proto, picks, structure)
        copy = work / f"{structure}.onnx"
        onnx.save(projected, str(copy))
        pkg_dir = work / structure
        pkg = convert(copy, pkg_dir, log)
        found = rewritten(pkg)     # convert keeps the source's weight names
        entry = {
            "layers": [{"node": r["node"], "source_weight": r["weight"], "shape": r["shape"], "macs": r["macs"],
                        "structure": r["structure"], "kernel_change": r["residual"],
                        "found": found.get(r["weight"])} for r in records],
            "rewritten_elsewhere": sorted(set(found) - {r["weight"] for r in records}),
            "verification_passed": pkg["verification"]["passed"],
            "macs_before": pkg["before"]["macs"], "macs_after": pkg["after"]["macs"],
            "sumpool_adds": pkg["after"]["sumpool_adds"],
            "speedup_theoretical": pkg["before"]["macs"] / pkg["after"]["macs"],
            "bench": bench(pkg_dir, args.repeat, log),
            # the batch the package that ships the model runs it at
            f"bench_batch{SHIPPED_BATCH}": bench(pkg_dir, args.repeat, log, batch=SHIPPED_BATCH)}
        if not args.no_profile:
            entry["profile"] = profile(pkg_dir, args.profile_timeout, log)
        entry["interleaved"] = time_against_source(src, copy, pkg_dir, args.repeat)
        if args.tvm:
            shape = ",".join(map(str, INPUT_SHAPE))
            proc = _cli(["convert", str(copy), "--target", "tvm-llvm", "--input-shape", shape,
                         "-o", str(work / f"{structure}-tvm")], 900, log)
            entry["tvm_llvm"] = (bench(work / f"{structure}-tvm", args.repeat, log) if proc.returncode == 0
                                 else {"failed": proc.returncode})
        result[structure] = entry
    result["commands"] = log
    text = json.dumps(result, indent=2, default=str)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return result


if __name__ == "__main__":
    main()
