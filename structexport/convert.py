"""``convert``: load -> passes -> ONNX export -> verification -> target artifacts -> manifest.

Nothing is written to OUTDIR until every stage has passed: the run builds everything in a
temporary folder beside OUTDIR and swaps it in at the end, so an interrupted or failed run
leaves OUTDIR as it was. A failed verification writes nothing unless ``force``; then the
manifest records the failure.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from structexport.analysis import count_params, layer_table
from structexport.costmodel import node_costs
from structexport.errors import DeviceLostError, DeviceUnreachableError, StructExportError
from structexport.export import (TOLERANCES, VerificationError, export_onnx, onnx_runner, quiet,
                                 reference_outputs, source_to_onnx, verify_arrays)
from structexport.loader import LoadedCheckpoint, file_sha256, load_checkpoint
from structexport.machine import tool_versions
from structexport.models import input_shape as default_input_shape
from structexport.models import parse_name
from structexport.package import (COMPOSED, MANIFEST, MANIFEST_VERSION, REFERENCE, VERIFICATION_DATA,
                                  save_verification_arrays)
from structexport.quantize import (DENSE_INT8, FP32_MODEL, Int8OptionError, calibration_sets,
                                   dense_int8_baseline, int8_stage)
from structexport.reference import dense_reference_module, export_reference
from structexport.structure_plan import StructurePlan
from structexport.targets import get_target
from structexport.targets.base import TargetOptionError


class OutputDirError(StructExportError):
    exit_code, kind = 33, "output-dir"


class InputShapeError(StructExportError):
    exit_code, kind = 34, "input-shape"


class InputsFileError(StructExportError):
    exit_code, kind = 37, "inputs-file"


@dataclass
class ConvertOptions:
    target: str = "onnx"
    input_shape: tuple[int, ...] | None = None
    precision: str = "fp32"
    passes: list[str] | None = None
    skip_passes: list[str] = field(default_factory=list)
    inputs_file: str | None = None
    atol: float | None = None
    rtol: float | None = None
    force: bool = False
    random_inputs: int = 3
    seed: int = 0
    pass_options: dict = field(default_factory=dict)
    # TVM targets: tvm_target (JSON), tvm_preset, device (a structexport.rpc.DeviceSpec),
    # tune_trials, tuning_db.
    target_options: dict = field(default_factory=dict)
    trust_pickle: bool = False
    allow_torchscript: bool = False
    # A user's own architecture: "path/to/file.py:build" or "package.module:build".
    model_spec: str | None = None
    # The model's input preprocessing (structexport.datasets.Preprocess.to_dict()), stored in
    # the manifest for evaluate and calibration; None: not recorded.
    preprocess: dict | None = None
    # --precision int8: calibration and gate (a structexport.quantize.Int8Options)
    int8: object | None = None


@dataclass
class ConvertResult:
    outdir: Path
    manifest: dict

    @property
    def verified(self) -> bool:
        target = self.manifest.get("target_verification")
        return bool(self.manifest["verification"]["passed"]) and (
            target is None or target["passed"] is None or bool(target["passed"]))


def _check_outdir(outdir: Path) -> list[Path]:
    """Refuse an OUTDIR that cannot be written; returns its missing parent folders."""
    if outdir.exists() and not outdir.is_dir():
        raise OutputDirError(f"{outdir} exists and is not a directory", "choose another -o OUTDIR")
    missing, parent = [], outdir.resolve().parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    if not parent.is_dir():
        raise OutputDirError(f"cannot create {outdir}: {parent} is not a directory",
                             "choose another -o OUTDIR")
    if not os.access(parent, os.W_OK) or (outdir.exists() and not os.access(outdir, os.W_OK)):
        raise OutputDirError(f"cannot write to {outdir}: permission denied", "choose another -o OUTDIR")
    return missing[::-1]


def parse_input_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, str):
        try:
            shape = tuple(int(v) for v in shape.replace("x", ",").split(","))
        except ValueError:
            raise InputShapeError(f"bad --input-shape {shape!r}", "write it like 1,3,32,32") from None
    shape = tuple(shape)
    if len(shape) != 4 or min(shape) < 1:
        raise InputShapeError(f"bad input shape {list(shape)}: need 4 positive sizes (N,C,H,W)",
                              "write it like --input-shape 1,3,32,32")
    return shape


def _check_shape(model: nn.Module, shape: tuple[int, ...], arch: str) -> None:
    try:
        with torch.no_grad():
            model(torch.zeros(shape))
    except Exception as exc:
        raise InputShapeError(f"{arch} cannot take an input of shape {list(shape)}: "
                              f"{(str(exc).splitlines() or [''])[0][:160]}",
                              f"its default is {list(default_input_shape(arch))}") from None


def _load_inputs(path: str, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """A model with one image input: each array of the file is one more input."""
    arrays = _load_npz(path)
    out = {}
    for key, arr in arrays.items():
        if tuple(arr.shape) != tuple(shape) and tuple(arr.shape) != tuple(shape[1:]):
            raise InputsFileError(f"{path}: array {key!r} has shape {list(arr.shape)}, the model "
                                  f"takes {list(shape)}", "match --input-shape to your inputs")
        if not np.issubdtype(arr.dtype, np.floating):
            raise InputsFileError(f"{path}: array {key!r} is {arr.dtype}, not floating point")
        arr = arr.reshape(shape)
        out[f"user:{key}"] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    return out


def _totals(model: nn.Module, shape) -> dict:
    rows = layer_table(model, shape)
    params, _ = count_params(model)
    return {"params": params, "macs": sum(r.macs for r in rows),
            "sumpool_adds": sum(r.adds for r in rows)}


def _swap_in(staging: Path, outdir: Path) -> None:
    """Replace OUTDIR by the staging folder with renames only. Concurrent runs into one
    OUTDIR race here: whoever renames last wins, each a whole package, none fails."""
    for _attempt in range(100):
        try:
            os.rename(staging, outdir)   # only succeeds while OUTDIR is absent or empty
            return
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR):
                raise
        old = Path(tempfile.mkdtemp(prefix=f".{outdir.name}.old-", dir=outdir.parent))
        try:
            os.replace(outdir, old / "package")   # another run may have moved it already
        except FileNotFoundError:
            pass
        shutil.rmtree(old, ignore_errors=True)
    raise OutputDirError(f"cannot replace {outdir}: other runs keep writing it", "choose another -o OUTDIR")


@dataclass
class _Plan:
    """What is checked before any work: the target, OUTDIR, the passes."""
    target: object
    steps: list
    outdir: Path
    missing_parents: list[Path]


# The targets that take --precision int8: ONNX Runtime (QDQ, its own quantization tool) and
# ExecuTorch (PT2E with XNNPACK's quantizer)
INT8_TARGETS = ("ort-cpu", "executorch", "litert")


def prepare_int8(opts: ConvertOptions) -> ConvertOptions:
    """``--precision int8`` checked before any work (its calibration, its preprocessing, a
    target that runs and checks INT8), with the sum-pools realized as bands: 1x1 and
    depthwise convs, which have integer kernels (running sums have none)."""
    if opts.precision != "int8":
        if opts.int8 is not None:
            raise Int8OptionError(f"--calibration and its options quantize to INT8, and --precision is "
                                  f"{opts.precision}", "add --precision int8, or leave them out")
        return opts
    if opts.int8 is None:
        raise Int8OptionError("--precision int8 needs calibration images",
                              "add --calibration DATA (an .npz of images and labels, or a folder of class "
                              "subfolders) and the model's --preprocess")
    if opts.target not in INT8_TARGETS:
        why = ("TVM's Relax frontend has no INT8 conv: it runs float convs between QuantizeLinear and "
               "DequantizeLinear, 2.3x slower than float32 (docs/int8.md)" if opts.target.startswith("tvm")
               else "the INT8 model is checked and gated as ONNX Runtime runs it")
        raise Int8OptionError(f"--precision int8 is built for {' and '.join(INT8_TARGETS)}, not {opts.target}: {why}",
                              "use --target ort-cpu (its model.onnx is the portable QDQ model) or executorch")
    if opts.preprocess is None:
        raise Int8OptionError("--precision int8 calibrates on images preprocessed as the model expects, "
                              "and no preprocessing was given",
                              "add --preprocess cifar10 (or imagenet, none, or --scale/--mean/--std)")
    forced = opts.pass_options.get("sumpool_realization")
    if forced not in (None, "banded"):
        raise Int8OptionError(f"--sumpool-realization {forced} has no integer kernels in ONNX Runtime; "
                              "INT8 realizes each sum-pool as a banded 1x1 conv and a depthwise conv of ones",
                              "leave --sumpool-realization out")
    if opts.pass_options.get("autotune"):
        raise Int8OptionError("--autotune times float32 sum-pool realizations; INT8 realizes them as "
                              "banded 1x1 and depthwise convs", "leave --autotune out")
    return dataclasses.replace(opts, pass_options=dict(opts.pass_options, sumpool_realization="banded"))


def _num_classes(outputs) -> int | None:
    first = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    return int(first.shape[-1]) if getattr(first, "ndim", 0) >= 2 else None


def _plan(outdir: str | Path, opts: ConvertOptions, say) -> _Plan:
    from structexport.passes import select_passes
    from structexport.targets import get_target
    outdir = Path(outdir)
    target = get_target(opts.target, dict(opts.target_options, progress=say))
    if opts.precision not in TOLERANCES:
        raise InputShapeError(f"unknown precision {opts.precision!r}", "choose fp32, fp16 or int8")
    missing_parents = _check_outdir(outdir)
    target.preflight()
    steps = select_passes(target.default_passes(), opts.passes, opts.skip_passes)
    return _Plan(target, steps, outdir, missing_parents)


def convert(checkpoint: str, outdir: str | Path, arch: str | None = None,
            options: ConvertOptions | None = None,
            progress: Callable[[str], None] | None = None) -> ConvertResult:
    """Load ``checkpoint`` (checks first: nothing is loaded for a run that cannot succeed)
    and convert it into the package ``outdir``."""
    from structexport.frontends import load_source
    opts = prepare_int8(options or ConvertOptions())
    say = progress or (lambda _msg: None)
    from structexport.frontends import is_zoo_checkpoint
    from structexport.frontends.base import parse_input_shapes
    if is_zoo_checkpoint(checkpoint, arch, opts.model_spec):
        given = opts.input_shape     # --input-shape may repeat, for models with several inputs
        if isinstance(given, (list, tuple)) and given and isinstance(given[0], str):
            if len(given) > 1:
                raise InputShapeError("--input-shape given twice, but a zoo model takes one image",
                                      "give its shape once, e.g. --input-shape 1,3,32,32")
            given = given[0]
        if isinstance(given, str) and "=" in given:
            raise InputShapeError(f"--input-shape {given} names an input, but a zoo model takes one image",
                                  "give its shape bare, e.g. --input-shape 1,3,32,32")
        opts = dataclasses.replace(opts, input_shape=given or None)
        plan = _plan(outdir, opts, say)
        say("load")
        t = time.perf_counter()
        loaded = load_checkpoint(checkpoint, arch, trust_pickle=opts.trust_pickle,
                                 allow_torchscript=opts.allow_torchscript)
        return _convert(loaded, plan, opts, say, {"load": time.perf_counter() - t})
    bare, named = parse_input_shapes(opts.input_shape)
    get_target(opts.target, dict(opts.target_options, progress=say))   # usage errors first
    _check_outdir(Path(outdir))
    say("load")
    # --inputs arrays named after the model's inputs fix their shapes (and integer values)
    values = _load_npz(opts.inputs_file) if opts.inputs_file else {}
    source = load_source(checkpoint, model_spec=opts.model_spec, arch=arch, input_shape=bare,
                         input_shapes=named, input_values=values,
                         trust_pickle=opts.trust_pickle, allow_torchscript=opts.allow_torchscript)
    return convert_source(source, outdir, opts, say)


def convert_source(source, outdir: str | Path, options: ConvertOptions | None = None,
                   progress: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert a front end's :class:`~structexport.frontends.base.SourceModel`: a zoo
    checkpoint through the zoo's passes, anything else through ONNX (torch modules are
    exported first), with the structure discovered in its weights."""
    opts = prepare_int8(options or ConvertOptions())
    say = progress or (lambda _msg: None)
    if source.format == "checkpoint" and source.checkpoint is not None:
        return convert_loaded(source.checkpoint, outdir, opts, say)
    proto = source.onnx if source.onnx is not None else source_to_onnx(source, say)
    info = {"path": source.path, "sha256": source.sha256, "format": source.format, "name": source.name,
            "notes": list(source.notes)}
    # The reference is the model as given: the torch module itself, not its export
    return convert_onnx(proto, outdir, dataclasses.replace(opts, input_shape=None), say, info,
                        true_source=source.module if source.onnx is None else None)


def convert_loaded(loaded: LoadedCheckpoint, outdir: str | Path, options: ConvertOptions | None = None,
                   progress: Callable[[str], None] | None = None) -> ConvertResult:
    """Convert a checkpoint already loaded (``bench``, ``profile`` and ``regress`` load each
    checkpoint once per run) into the package ``outdir``."""
    opts = options or ConvertOptions()
    say = progress or (lambda _msg: None)
    return _convert(loaded, _plan(outdir, opts, say), opts, say, {})


def _jsonable_pass_options(options: dict) -> dict:
    """The pass options a package records (so that a second model can be converted alike)."""
    out = {}
    for key in ("sumpool_realization", "autotune", "keep_csg_codes", "max_residual"):
        if options.get(key) not in (None, False):
            out[key] = options[key]
    declared = options.get("declared_structures")
    if declared:
        out["declared_structures"] = {k: list(v) if isinstance(v, tuple) else v for k, v in declared.items()}
    return out


def _target_stage(target, staging: Path, onnx_path: Path, reference, inputs: dict, opts: ConvertOptions,
                  say, timings: dict, expected: dict, verification, portable_file: str = "model.onnx"):
    """The target's artifacts, verified on its device against ``reference`` (a torch module
    or a function of an input array), and every shipped file in the configuration it is
    deployed in against ``expected``; (artifacts, manifest record, device, device error,
    deployed checks)."""
    say("target")
    t = time.perf_counter()
    artifacts = {"model.onnx": "the verified ONNX model"}
    device_lost: StructExportError | None = None
    with target.device_scope(say) as device:
        if hasattr(target, "options"):
            target.options["device"] = device
        artifacts.update(target.write_artifacts(onnx_path, staging))
        timings["target"] = time.perf_counter() - t
        t = time.perf_counter()
        say(f"verify on {device.describe()}" if hasattr(device, "describe") else "verify target artifact")
        try:
            target_verification = target.verify(staging, reference, inputs, opts.precision,
                                                opts.atol, opts.rtol)
        except (DeviceUnreachableError, DeviceLostError) as exc:
            # The artifact is built and the ONNX model verified: keep them, record that
            # the device check did not run, and report the device error after writing.
            device_lost = exc
            target_verification = f"not run: {exc.message}"
        if target_verification is not None:
            timings["target_verify"] = time.perf_counter() - t
    if isinstance(target_verification, str):  # could not run here: say so in the manifest
        target_check = {"passed": None, "skipped": target_verification}
    else:
        target_check = target_verification.to_dict() if target_verification else None
    if target_verification is not None and not isinstance(target_verification, str) \
            and not target_verification.passed and not opts.force:
        raise VerificationError(f"{target.name} artifact failed verification: "
                                f"{target_verification.summary()}",
                                "nothing was written; pass --force to keep the artifact")
    deployed = _verify_deployed(target, staging, inputs, expected, opts, verification, target_check, say,
                                portable_file)
    return artifacts, target_check, device, device_lost, deployed


def _deployed_record(file: str, options: dict, result) -> dict:
    return {"file": file, "options": options, "passed": result["passed"], "checks": len(result["checks"]),
            "max_abs_diff": result["max_abs_diff"], "max_rel_diff": result["max_rel_diff"],
            "atol": result["atol"], "rtol": result["rtol"], "precision": result.get("precision")}


def _verify_deployed(target, staging: Path, inputs: dict, expected: dict, opts: ConvertOptions,
                     verification, target_check: dict | None, say, portable_file: str = "model.onnx") -> list[dict]:
    """Every shipped model file run as it is deployed (the target's :meth:`deployments`:
    ONNX Runtime's optimized sessions, the optimized model, the .ort file), compared with
    the source's outputs before anything is written; with the portable check of
    ``model.onnx`` and the target's own (TVM) check, one record per file and configuration.
    INT8: ``expected`` are the fake-quantized graph's outputs and the portable check is of
    ``portable_file``, the float32 model that was quantized."""
    from structexport.export import verify_arrays
    from structexport.ortsession import session_options
    arrays = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    portable = dict(session_options(1, "ORT_DISABLE_ALL"),
                    note="the portable check: the graph exactly as written")
    records = [_deployed_record(portable_file, portable, verification.to_dict())]
    for deployment in target.deployments():
        say(f"verify {deployment.file} ({deployment.options.get('graph_optimization_level') or deployment.options['runtime']})")
        run = deployment.open(staging / deployment.file)
        own = deployment.expected is not None
        result = verify_arrays(run, arrays, deployment.expected if own else expected,
                               deployment.precision or opts.precision,
                               deployment.atol if own else opts.atol, deployment.rtol if own else opts.rtol,
                               runtime=f"{deployment.options['runtime']}, "
                                       f"{deployment.options['graph_optimization_level']}")
        records.append(_deployed_record(deployment.file, deployment.options, result.to_dict()))
        if not result.passed and not opts.force:
            raise VerificationError(f"{deployment.file} as deployed ({result.runtime}) failed "
                                    f"verification: {result.summary()}",
                                    "nothing was written; pass --force to keep the artifact")
    if target_check and target_check.get("checks"):
        library = getattr(target, "library", None) or "model.so"
        records.append(_deployed_record(library, {"runtime": target_check["runtime"]}, target_check))
    return records


# The composed graph a fusing target builds from (structured convs as plain convs with
# their exactly structured kernels): staged for the target, which keeps it in the package
# (profile compiles it as the library was) when it fused from it.


def _wants_composed(target) -> bool:
    wants = getattr(target, "wants_composed_graph", None)
    return bool(wants and wants())


def _target_realization(target, opts: ConvertOptions) -> ConvertOptions:
    """A target with one sum-pool form its runtime delegates (ExecuTorch, LiteRT: bands) gets
    it, unless --sumpool-realization chose another, or --autotune times that form against the
    dense conv per layer on the target's own runtime."""
    realization = getattr(target, "sumpool_realization", None)
    if realization is None or opts.pass_options.get("autotune") or opts.pass_options.get("sumpool_realization"):
        return opts
    return dataclasses.replace(opts, pass_options=dict(opts.pass_options, sumpool_realization=realization))


def _pass_context(target, shape, opts: ConvertOptions):
    """The passes' context; a program target rides along, for --autotune to time its programs."""
    from structexport.passes import PassContext
    runtime = target if _wants_torch_modules(target) else None
    return PassContext(opts.target, shape, dict(opts.pass_options, force=opts.force, program_runtime=runtime))


def _wants_torch_modules(target) -> bool:
    return bool(getattr(target, "wants_torch_modules", False))


def _refuse_torch_target(target, what, torch_source=None) -> None:
    """A target that lowers torch programs takes a torch source (zoo checkpoint, state dict
    with --model, .pt2); an ONNX file or a TorchScript archive is refused (exit 2)."""
    if not _wants_torch_modules(target):
        return
    if isinstance(torch_source, nn.Module) and not isinstance(torch_source, torch.jit.ScriptModule):
        return
    from structexport.targets import TARGETS
    others = ", ".join(n for n, t in TARGETS.items() if not _wants_torch_modules(t))
    kind = "a TorchScript archive" if isinstance(torch_source, torch.jit.ScriptModule) else "an ONNX model"
    raise TargetOptionError(f"--target {target.name} lowers torch programs (torch.export); {what} is {kind}, "
                            f"which torch.export cannot take",
                            f"convert it for one of {others}; or give the PyTorch model itself (a zoo "
                            f"checkpoint, a state dict with --model, or a torch.export .pt2)")


def _structure_plan(target, runs, pipeline: str) -> StructurePlan:
    """The model's one structure plan, read from the passes' records: stored in the
    manifest, and handed to the target (TVM's fused operator builds from it)."""
    structure = StructurePlan.from_runs(runs, pipeline)
    if hasattr(target, "options"):      # a configurable target (TVM, the program targets)
        target.options["structure_plan"] = structure
    return structure


def _emit_torch_plan(target, true_source, structure: StructurePlan, inputs: dict, arrays: dict, given, sets,
                     opts, say) -> None:
    """The structure plan written into the torch source for a target that lowers torch
    programs; hands it the rewritten module and the source's dense form."""
    from structexport.plan_torch import dense_program_module, emit_torch
    say("write the structure plan into the torch model")
    example = next(iter(inputs.values()))
    realization = opts.pass_options.get("sumpool_realization") or "banded"
    rewritten, written = emit_torch(true_source, example, structure, realization)
    say(f"{len(written)} layer(s) decomposed in the torch model")
    target.options.update(torch_module=rewritten, dense_module=dense_program_module(true_source, example),
                          example=example, source=given, inputs=arrays, force=opts.force,
                          int8=(sets, opts.int8) if sets is not None else None)


def _drop_composed(target, staging: Path, artifacts: dict | None = None) -> None:
    if hasattr(target, "options"):
        target.options.pop("composed_onnx", None)
    if COMPOSED not in (artifacts or {}):
        (staging / COMPOSED).unlink(missing_ok=True)


def _artifact_records(staging: Path, artifacts: dict[str, str]) -> dict:
    return {name: {"description": desc, "bytes": (staging / name).stat().st_size,
                   "sha256": file_sha256(staging / name)} for name, desc in artifacts.items()}


def _publish(staging: Path, outdir: Path, manifest: dict, device_lost) -> None:
    """Write the manifest, swap the package in; a device lost on the way is reported after,
    with the artifact kept."""
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    _swap_in(staging, outdir)
    if device_lost is not None:
        raise type(device_lost)(device_lost.message,
                                f"{outdir} holds the built artifact, verified under ONNX Runtime "
                                f"but not on the device; {device_lost.hint}")


def _staging(plan: _Plan) -> Path:
    """A private folder beside OUTDIR that is swapped in whole at the end."""
    parent = plan.outdir.resolve().parent
    # Created now (exist_ok: a concurrent run may be creating them too), removed again if
    # the run fails; a concurrent run's clean-up can remove them under us: make them again
    for _attempt in range(10):
        parent.mkdir(parents=True, exist_ok=True)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{plan.outdir.name}.tmp-", dir=parent))
            break
        except FileNotFoundError:
            continue
    else:
        raise OutputDirError(f"cannot create {parent}: other runs keep removing it", "choose another -o OUTDIR")
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp makes it private; OUTDIR should not be
    return staging


def _clean_up(staging: Path, plan: _Plan) -> None:
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
    if not plan.outdir.exists():
        for folder in reversed(plan.missing_parents):
            try:
                folder.rmdir()
            except OSError:
                break


def _convert(loaded: LoadedCheckpoint, plan: _Plan, opts: ConvertOptions, say,
             timings: dict[str, float]) -> ConvertResult:
    from structexport.passes import PassManager
    target, steps, outdir = plan.target, plan.steps, plan.outdir
    opts = _target_realization(target, opts)
    source = loaded.model.eval()
    shape = parse_input_shape(opts.input_shape) if opts.input_shape else default_input_shape(loaded.arch)
    _check_shape(source, shape, loaded.arch)
    user_inputs = _load_inputs(opts.inputs_file, shape) if opts.inputs_file else {}
    gen = torch.Generator().manual_seed(opts.seed)
    inputs = {f"random:{i}": torch.randn(shape, generator=gen) for i in range(opts.random_inputs)}
    inputs.update(user_inputs)
    sets = None
    if opts.precision == "int8":   # the data is checked before any work
        with torch.no_grad():
            classes = _num_classes(source(torch.zeros(shape)))
        sets = calibration_sets(opts.int8, opts.preprocess, shape, classes, say)

    say("passes")
    t = time.perf_counter()
    ctx = _pass_context(target, shape, opts)
    # Passes are checked in float32 torch at fixed tolerances; --atol/--rtol are for the
    # verification of the exported model.
    manager = PassManager(steps, check_inputs=next(iter(inputs.values())),
                          atol=TOLERANCES["fp32"]["atol"], rtol=TOLERANCES["fp32"]["rtol"],
                          progress=lambda name: say(f"pass {name}"))
    rewritten, runs = manager.run(source, ctx)
    timings["passes"] = time.perf_counter() - t
    structure = _structure_plan(target, runs, "zoo (torch passes)")

    staging = _staging(plan)
    try:
        say("export")
        t = time.perf_counter()
        export_model = rewritten.half() if opts.precision == "fp16" else rewritten
        example = next(iter(inputs.values())).to(next(export_model.parameters()).dtype)
        onnx_path = staging / "model.onnx"
        export_info = export_onnx(export_model, example, onnx_path,
                                  fold_constants=not ctx.option("keep_csg_codes", False))
        timings["export"] = time.perf_counter() - t

        say("verify")
        t = time.perf_counter()
        expected = reference_outputs(source, inputs)
        verification = verify_arrays(onnx_runner(onnx_path), {k: v.numpy() for k, v in inputs.items()},
                                     expected, "fp32" if opts.precision == "int8" else opts.precision,
                                     opts.atol, opts.rtol)
        timings["verify"] = time.perf_counter() - t
        if not verification.passed and not opts.force:
            raise VerificationError(f"verification failed: {verification.summary()}",
                                    "nothing was written; loosen --atol/--rtol if the differences "
                                    "are expected, or pass --force to keep the artifact")
        int8, deploy_opts, deploy_expected, portable_file = None, opts, expected, "model.onnx"
        if sets is not None and not _wants_torch_modules(target):
            int8, deploy_opts, deploy_expected, portable_file = _quantize(
                staging, source, {k: v.numpy() for k, v in inputs.items()}, sets, opts, say, timings)

        if _wants_composed(target):
            from structexport.layers.decomposed import recompose
            say("export the composed graph for the target")
            composed_path = staging / COMPOSED
            export_onnx(recompose(export_model), example, composed_path,
                        fold_constants=not ctx.option("keep_csg_codes", False))
            target.options["composed_onnx"] = composed_path
        first_input = next(iter(inputs.values()))
        dense, dense_passes = dense_reference_module(source, first_input, loaded.arch,
                                                     [s.name for s in steps], opts.target)
        if _wants_torch_modules(target):
            # a target that lowers torch programs: the same rewritten model as model.onnx
            # (INT8: it quantizes them itself, with its runtime's quantizer)
            target.options.update(torch_module=rewritten, dense_module=dense, example=example, source=source,
                                  inputs={k: v.numpy() for k, v in inputs.items()}, force=opts.force,
                                  int8=(sets, opts.int8) if sets is not None else None)
        artifacts, target_check, device, device_lost, deployed = _target_stage(
            target, staging, onnx_path, source, inputs, deploy_opts, say, timings, deploy_expected,
            verification, portable_file)
        _drop_composed(target, staging, artifacts)

        say("export the dense reference")
        t = time.perf_counter()
        reference_info = export_reference(source, first_input, loaded.arch, dense_passes,
                                          opts.target, staging / REFERENCE, dense=dense)
        reference_check = verify_arrays(onnx_runner(staging / REFERENCE),
                                        {k: v.numpy() for k, v in inputs.items()}, expected, "fp32")
        if not reference_check.passed:
            raise VerificationError(f"the dense reference failed verification: {reference_check.summary()}",
                                    "nothing was written; report this (the dense export is wrong)")
        if int8 is not None:
            _dense_int8(staging, source, sets, opts, say, int8, artifacts)
        target_int8 = getattr(target, "int8", None)   # a target that quantized by itself
        save_verification_arrays(staging / VERIFICATION_DATA,
                                 {k: v.numpy() for k, v in inputs.items()},
                                 {k: [o.astype(np.float32) for o in outs] for k, outs in expected.items()},
                                 int8.expected if int8 is not None else
                                 target_int8.expected if target_int8 is not None else None,
                                 getattr(target_int8, "dense_expected", None))
        artifacts[REFERENCE] = ("the source model as exported, structured layers as dense kernels: "
                                "what the artifact was verified against, and bench's dense counterpart")
        artifacts[VERIFICATION_DATA] = "verification inputs and the source model's outputs on them"
        timings["reference"] = time.perf_counter() - t

        rewritten = rewritten.float()
        manifest = {
            "structexport_manifest": MANIFEST_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": str(Path(loaded.path).resolve()) if loaded.path else None,
                       "sha256": loaded.sha256, "format": loaded.source_format,
                       "arch": loaded.arch, "family": parse_name(loaded.arch).family,
                       "stored_dtypes": loaded.stored_dtypes, "notes": loaded.notes,
                       "metadata": loaded.metadata},
            "target": target.name, "precision": opts.precision, "input_shape": list(shape),
            "preprocess": opts.preprocess,
            "target_build": target.build_info or None,
            "device": device.to_dict() if hasattr(device, "to_dict") else None,
            "passes": [r.to_dict() for r in runs],
            "pass_options": _jsonable_pass_options(opts.pass_options),
            "structure_plan": structure.to_dict(),
            "source_layers": [r.to_dict() for r in layer_table(source, shape)],
            "before": _totals(source, shape), "after": _totals(rewritten, shape),
            # What a runtime would execute without structexport: the source with every
            # kernel dense (reference.onnx). The theoretical speedup is dense / after.
            "dense": _dense_totals(staging / REFERENCE),
            "export": export_info,
            "verification": verification.to_dict(),
            "verified_against": "the source torch module (the zoo model with the checkpoint's weights)",
            "reference": {"file": REFERENCE, "passes": reference_info["passes"],
                          "ops": reference_info.get("ops"), "verification": reference_check.to_dict()},
            "target_verification": target_check,
            "deployed_verification": deployed,
            "artifacts": _artifact_records(staging, artifacts),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "versions": tool_versions(),
        }
        if int8 is not None or target_int8 is not None:
            manifest["int8"] = (int8 or target_int8).record
        _publish(staging, outdir, manifest, device_lost)
    finally:
        _clean_up(staging, plan)
    return ConvertResult(outdir, manifest)


def _quantize(staging: Path, source, arrays: dict, sets, opts: ConvertOptions, say, timings: dict):
    """The INT8 stage on the verified float32 ``model.onnx``: (the stage's result, the options
    and outputs the deployed files are checked with, the file of the portable check)."""
    t = time.perf_counter()
    int8 = int8_stage(staging, source, arrays, sets, opts.int8, opts.force, say)
    timings["int8"] = time.perf_counter() - t
    return int8, dataclasses.replace(opts, atol=int8.atol, rtol=0.0), int8.expected, FP32_MODEL


def _dense_int8(staging: Path, source, sets, opts: ConvertOptions, say, int8, artifacts: dict) -> None:
    int8.record["dense_int8"] = dense_int8_baseline(staging, REFERENCE, source, sets, opts.int8, say)
    artifacts["model.onnx"] = ("the INT8 model (QDQ: int8 per-channel weights, calibrated uint8 "
                               "activations), checked against its fake-quantized graph and gated on "
                               "held-out images")
    artifacts[FP32_MODEL] = "the float32 model that was quantized (channel sums rebased), verified against the source"
    artifacts[DENSE_INT8] = "the dense reference quantized the same way, with the same calibration: the INT8 baseline"


# --------------------------------------------------------------------------- ONNX sources

def _onnx_inputs(proto) -> list:
    """Every graph input (not an initializer) as an :class:`InputSpec`, its dimensions fixed."""
    from onnx import helper

    from structexport.frontends.base import InputSpec
    inits = {i.name for i in proto.graph.initializer}
    specs = []
    for vi in proto.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        if min(shape, default=1) < 1:
            raise InputShapeError(f"input {vi.name!r} has shape {list(shape)}: not every dimension is fixed",
                                  f"pass --input-shape {vi.name}=SIZES")
        specs.append(InputSpec(vi.name, shape, helper.tensor_dtype_to_np_dtype(t.elem_type).name))
    return specs


def _several(specs) -> bool:
    return len(specs) != 1 or not specs[0].is_float or len(specs[0].shape) != 4


def _load_npz(path: str) -> dict[str, np.ndarray]:
    p = Path(path)
    if not p.is_file():
        raise InputsFileError(f"no such inputs file: {path}")
    try:
        with np.load(p, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as exc:
        raise InputsFileError(f"{path} is not a readable .npz file: {type(exc).__name__}",
                              "write it with numpy.savez(path, NAME=array) for each input") from None
    if not arrays:
        raise InputsFileError(f"{path} holds no arrays")
    return arrays


def _named_samples(specs, path: str | None, count: int, seed: int) -> tuple[dict, list[str]]:
    """Samples of a model with several inputs (or one that is not a float image), each a dict
    of arrays by input name: ``count`` random ones (seeded floats; the integer inputs take
    the values of ``--inputs``, else zeros) and the user's own (``user:inputs``, its
    missing float inputs drawn at random). Returns (samples by label, notes)."""
    from structexport.frontends.base import example_arrays
    names = [s.name for s in specs]
    values = _load_npz(path) if path else {}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise InputsFileError(f"{path} holds {', '.join(map(repr, unknown))}, which the model does not take "
                              f"(its inputs: {', '.join(names)})", "name each array after the input it feeds")
    for spec in specs:
        if spec.name not in values:
            continue
        arr = values[spec.name]
        if tuple(arr.shape) != tuple(spec.shape):
            raise InputsFileError(f"{path}: array {spec.name!r} has shape {list(arr.shape)}, the model's input "
                                  f"{spec.name!r} takes {list(spec.shape)}",
                                  f"pass --input-shape {spec.name}={','.join(map(str, arr.shape)) or '(scalar)'} "
                                  "or fix the array")
        if spec.is_float != bool(np.issubdtype(arr.dtype, np.floating)):
            raise InputsFileError(f"{path}: array {spec.name!r} is {arr.dtype}, the model's input "
                                  f"{spec.name!r} is {spec.dtype}", f"save it as {spec.dtype}")
    notes = [f"integer input {s.name!r} has no values: zeros used (pass --inputs FILE.npz with an array "
             f"named {s.name!r})" for s in specs if not s.is_float and s.name not in values]
    fixed = {k: v for k, v in values.items() if not next(s for s in specs if s.name == k).is_float}
    gen_seed = seed
    samples = {f"random:{i}": example_arrays(specs, fixed, gen_seed + i) for i in range(count)}
    if values:
        samples["user:inputs"] = example_arrays(specs, values, seed + count)
    return samples, notes


def _onnx_input(proto) -> tuple[str, tuple[int, ...]]:
    inits = {i.name for i in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in inits]
    if len(graph_inputs) != 1:
        raise InputShapeError(f"the model has {len(graph_inputs)} inputs; structexport converts "
                              "models with one image input", "export the model with a single input")
    dims = graph_inputs[0].type.tensor_type.shape.dim
    shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
    if len(shape) != 4 or min(shape) < 1:
        raise InputShapeError(f"input {graph_inputs[0].name!r} has shape {list(shape)}: need a fixed "
                              "N,C,H,W", "pass --input-shape N,C,H,W")
    return graph_inputs[0].name, shape


def onnx_layers(proto, costs: list) -> list[dict]:
    """The layer table of an ONNX graph (``costs``: its :func:`~structexport.costmodel.node_costs`):
    one row per conv or linear layer with a constant weight, named after the weight (as
    :func:`~structexport.passes.decompose_structured_conv_pass.layer_name`)."""
    import onnx_ir as ir

    from structexport.passes.decompose_structured_conv_pass import layer_name
    model = ir.from_proto(proto)
    costs = {c.name: c for c in costs}
    rows, seen = [], set()
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if weight is None or weight.const_value is None:
            continue
        name = layer_name(weight)
        if name in seen:
            continue
        seen.add(name)
        shape = list(weight.const_value.shape)
        cost = costs.get(node.name)
        rows.append({"name": name, "kind": "dense" if node.op_type == "Conv" else "linear",
                     "op": "conv2d" if node.op_type == "Conv" else "linear", "weight_shape": shape,
                     "structure": "", "params": int(np.prod(shape)), "macs": int(cost.macs) if cost else 0,
                     "adds": 0, "output_shape": [], "residual": None})
    return rows


def _dense_totals(reference: Path) -> dict:
    import onnx
    return _onnx_totals(node_costs(reference), onnx.load(str(reference)))


def _onnx_totals(costs: list, proto) -> dict:
    from structexport.costmodel import totals
    t = totals(costs)
    params = sum(int(np.prod(i.dims)) for i in proto.graph.initializer)
    return {"params": params, "macs": t["macs"], "sumpool_adds": t["adds"], "pool_adds": t["pool_adds"]}


def prepare_onnx(proto, fold_constants: bool = True):
    """Weights held in ``Constant`` nodes become initializers, subgraphs of constants are
    folded (a CSG generator's ``codes x generator``, reshape and crop become the kernel
    they compute; ``--keep-csg-codes`` keeps them), and every shape is inferred (the passes
    read a conv's kernel and its input's size from them)."""
    import onnx
    import onnx_ir as ir
    from onnx_ir.passes.common import LiftConstantsToInitializersPass
    model = ir.from_proto(proto)
    LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    proto = ir.to_proto(model)
    if fold_constants:
        import onnxsim
        try:
            with quiet():
                folded, ok = onnxsim.simplify(proto)
            if ok:
                proto = restore_weight_names(proto, folded)
        except Exception:  # an op onnxsim cannot evaluate: keep the graph unfolded
            pass
    return onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)


def restore_weight_names(before, after):
    """onnxsim names the kernels it folds (a batch norm into its conv) ``_v_NNN``, and the
    layer names of the manifest, bench and profile are the weights' names: give each
    Conv's new kernel back the name its weight had in ``before`` (matched by the Conv
    node's name, which onnxsim keeps) when that name is free in ``after``."""
    def conv_weights(proto):
        named = [n for n in proto.graph.node if n.op_type == "Conv" and n.name and len(n.input) > 1]
        counts = {}
        for n in named:
            counts[n.name] = counts.get(n.name, 0) + 1
        return {n.name: n for n in named if counts[n.name] == 1}
    old = {name: n.input[1] for name, n in conv_weights(before).items()}
    used = {v for n in after.graph.node for v in (*n.input, *n.output)}
    used |= {i.name for i in after.graph.input} | {o.name for o in after.graph.output}
    readers: dict[str, int] = {}
    for n in after.graph.node:
        for v in n.input:
            readers[v] = readers.get(v, 0) + 1
    initializers = {i.name: i for i in after.graph.initializer}
    for name, node in conv_weights(after).items():
        current, wanted = node.input[1], old.get(name)
        if (not wanted or wanted == current or wanted in used or current not in initializers
                or readers.get(current) != 1):
            continue
        initializers[current].name = wanted
        node.input[1] = wanted
        used.add(wanted)
    return after


def source_deviation(source: dict[str, list[np.ndarray]], reference: dict[str, list[np.ndarray]]) -> dict:
    """How far the decomposed reference's outputs moved from the source's, on the
    verification inputs: max abs and relative difference, and top-1 agreement (the share
    of rows whose arg-max over the last axis is the same)."""
    abs_diff = rel_diff = 0.0
    agree = rows = 0
    for label, outs in source.items():
        for a, b in zip(outs, reference[label]):
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            d = np.abs(a - b)
            abs_diff = max(abs_diff, float(d.max()) if d.size else 0.0)
            rel_diff = max(rel_diff, float((d / np.maximum(np.abs(a), 1e-12)).max()) if d.size else 0.0)
            if a.ndim >= 1 and a.shape[-1] > 1:
                a2, b2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
                agree += int((a2.argmax(-1) == b2.argmax(-1)).sum())
                rows += a2.shape[0]
    return {"max_abs_diff": abs_diff, "max_rel_diff": rel_diff,
            "top1_agreement": agree / rows if rows else None, "inputs": len(source)}


def convert_onnx(proto, outdir: str | Path, options: ConvertOptions | None = None,
                 progress: Callable[[str], None] | None = None, source: dict | None = None,
                 true_source=None) -> ConvertResult:
    """Convert an ONNX model whose dimensions are all fixed (a front end's output) into the
    package ``outdir``: the structure is discovered in its weights by the ONNX passes, and
    the artifact is verified against the model as given: ``proto`` itself under ONNX
    Runtime with its graph optimizations off (onnxsim's own check), or ``true_source``, the
    torch module ``proto`` was exported from. ``source``: path, sha256, format, name and
    notes, for the manifest."""
    import onnx
    import onnx_ir as ir

    from structexport.export import onnx_runner, verify_arrays
    from structexport.passes import ONNX, PassManager, select_onnx_passes
    opts = prepare_int8(options or ConvertOptions())
    say = progress or (lambda _msg: None)
    source = dict(source or {})
    outdir = Path(outdir)
    if opts.precision not in ("fp32", "int8"):
        raise InputShapeError(f"--precision {opts.precision} is for zoo checkpoints",
                              "convert ONNX models at fp32 (or int8)")
    target = get_target(opts.target, dict(opts.target_options, progress=say))
    _refuse_torch_target(target, source.get("path") or "the model", true_source)
    opts = _target_realization(target, opts)
    plan = _Plan(target, select_onnx_passes(opts.passes, opts.skip_passes), outdir, _check_outdir(outdir))
    target.preflight()
    timings: dict[str, float] = {}
    given = true_source if true_source is not None else onnx_runner(proto.SerializeToString())
    proto = prepare_onnx(proto, fold_constants=not opts.pass_options.get("keep_csg_codes"))
    specs = _onnx_inputs(proto)
    several = _several(specs)
    input_notes: list[str] = []
    if several:
        if target.name.startswith("tvm") or _wants_torch_modules(target):
            raise TargetOptionError(f"{target.name} converts models with one float input; this one takes "
                                    + ", ".join(f"{s.name} {list(s.shape)} {s.dtype}" for s in specs),
                                    "convert it for --target ort-cpu or --target onnx")
        shape = specs[0].shape
        inputs, input_notes = _named_samples(specs, opts.inputs_file, opts.random_inputs, opts.seed)
        for note in input_notes:
            say(f"warning: {note}")
    else:
        _name, shape = _onnx_input(proto)
        user_inputs = _load_inputs(opts.inputs_file, shape) if opts.inputs_file else {}
        gen = torch.Generator().manual_seed(opts.seed)
        inputs = {f"random:{i}": torch.randn(shape, generator=gen) for i in range(opts.random_inputs)}
        inputs.update(user_inputs)
    reference_bytes = proto.SerializeToString()
    run_reference = onnx_runner(reference_bytes)
    arrays = {k: v if isinstance(v, dict) else v.numpy() for k, v in inputs.items()}
    # What the source as given computes: the artifact is verified against it, and so is
    # reference.onnx, the folded graph bench times as the dense counterpart
    expected = source_expected = reference_outputs(given, inputs)
    reference_check = verify_arrays(run_reference, arrays, source_expected, "fp32", opts.atol, opts.rtol)
    if not reference_check.passed and not opts.force:
        raise VerificationError("folding the source's constants (onnxsim) changed its outputs: "
                                f"{reference_check.summary()}",
                                "nothing was written; pass --keep-csg-codes to convert it unfolded, "
                                "or --force")
    sets = None
    if opts.precision == "int8":   # the data is checked before any work
        if several:
            raise Int8OptionError("--precision int8 calibrates models with one image input; this one takes "
                                  + ", ".join(s.name for s in specs), "convert it at fp32")
        sets = calibration_sets(opts.int8, opts.preprocess, shape,
                                _num_classes(next(iter(source_expected.values()))), say)

    say("passes")
    t = time.perf_counter()
    ctx = _pass_context(target, shape, opts)

    def onnx_passes(steps, progress=None):
        return PassManager(steps, check_inputs=next(iter(inputs.values())),
                           atol=TOLERANCES["fp32"]["atol"], rtol=TOLERANCES["fp32"]["rtol"],
                           progress=progress, model_kind=ONNX)
    manager = onnx_passes(plan.steps, lambda name: say(f"pass {name}"))
    rewritten, runs = manager.run(ir.from_proto(proto), ctx)
    timings["passes"] = time.perf_counter() - t
    structure = _structure_plan(target, runs, "onnx passes")
    projected = manager.reference_model is not None
    if projected:
        # Approximately structured kernels were projected (--max-residual): the artifact is
        # verified against that decomposed reference; how far it moved from the source is
        # reported, not judged.
        reference_bytes = ir.to_proto(manager.reference_model).SerializeToString()
        run_reference = onnx_runner(reference_bytes)
        expected = reference_outputs(run_reference, inputs)

    staging = _staging(plan)
    try:
        say("write")
        onnx_path = staging / "model.onnx"
        out_proto = ir.to_proto(rewritten)
        try:
            onnx.checker.check_model(out_proto, full_check=True)
        except Exception as exc:
            raise VerificationError(f"the rewritten graph fails onnx.checker: {str(exc).splitlines()[0][:200]}",
                                    "rerun with --skip-pass decompose_structured_conv") from None
        onnx_path.write_bytes(out_proto.SerializeToString())
        (staging / REFERENCE).write_bytes(reference_bytes)

        say("verify")
        t = time.perf_counter()
        run_artifact = onnx_runner(onnx_path)
        verification = verify_arrays(run_artifact, arrays, expected, "fp32", opts.atol, opts.rtol)
        # projected: how far the artifact moved from the source as given
        deviation = (source_deviation(source_expected, reference_outputs(run_artifact, inputs))
                     if projected else None)
        timings["verify"] = time.perf_counter() - t
        if not verification.passed and not opts.force:
            raise VerificationError(f"verification failed: {verification.summary()}",
                                    "nothing was written; loosen --atol/--rtol or --max-residual, or pass "
                                    "--force to keep the artifact")
        int8, deploy_opts, deploy_expected, portable_file = None, opts, expected, "model.onnx"
        if sets is not None and not _wants_torch_modules(target):
            int8, deploy_opts, deploy_expected, portable_file = _quantize(staging, given, arrays, sets, opts,
                                                                          say, timings)
        if _wants_composed(target):
            # the same passes but the decomposition: structured convs stay plain convs,
            # their kernels projected when --max-residual asked for it
            say("compose the graph for the target")
            steps = [p for p in plan.steps if p.name != "decompose_structured_conv"]
            composed, _ = onnx_passes(steps).run(ir.from_proto(proto), ctx)
            (staging / COMPOSED).write_bytes(ir.to_proto(composed).SerializeToString())
            target.options["composed_onnx"] = staging / COMPOSED
        if _wants_torch_modules(target):
            _emit_torch_plan(target, true_source, structure, inputs, arrays, given, sets, opts, say)
        artifacts, target_check, device, device_lost, deployed = _target_stage(
            target, staging, onnx_path, run_reference, inputs, deploy_opts, say, timings, deploy_expected,
            verification, portable_file)
        _drop_composed(target, staging, artifacts)
        if int8 is not None:
            _dense_int8(staging, given, sets, opts, say, int8, artifacts)
        target_int8 = getattr(target, "int8", None)   # a target that quantized by itself
        save_verification_arrays(staging / VERIFICATION_DATA, arrays,
                                 {k: [o.astype(np.float32) for o in outs] for k, outs in expected.items()},
                                 int8.expected if int8 is not None else
                                 target_int8.expected if target_int8 is not None else None,
                                 getattr(target_int8, "dense_expected", None))
        artifacts[REFERENCE] = ("bench's dense counterpart: the source with its constants folded (onnxsim) "
                                "and its shapes fixed, checked against the source as given"
                                if not projected else
                                "the decomposed reference: the source with its approximately structured "
                                "kernels projected (--max-residual), what the artifact was verified "
                                "against, and bench's dense counterpart")
        artifacts[VERIFICATION_DATA] = "verification inputs and the source model's outputs on them"
        ops: dict[str, int] = {}
        for node in out_proto.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        name = source.get("name") or Path(source.get("path") or "model").stem
        reference_costs = node_costs(staging / REFERENCE)
        manifest = {
            "structexport_manifest": MANIFEST_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "source": {"path": str(Path(source["path"]).resolve()) if source.get("path") else None,
                       "sha256": source.get("sha256"), "format": source.get("format", "onnx"),
                       "arch": name, "family": "discovered", "notes": list(source.get("notes", [])),
                       "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
                       "producer": f"{proto.producer_name} {proto.producer_version}".strip()},
            "target": target.name, "precision": opts.precision, "input_shape": list(shape),
            "preprocess": opts.preprocess,
            "inputs": [spec.to_dict() for spec in specs],
            "input_notes": input_notes,
            "target_build": target.build_info or None,
            "device": device.to_dict() if hasattr(device, "to_dict") else None,
            "passes": [r.to_dict() for r in runs],
            "pass_options": _jsonable_pass_options(opts.pass_options),
            "structure_plan": structure.to_dict(),
            "source_layers": onnx_layers(proto, reference_costs),
            "before": _onnx_totals(reference_costs, proto),
            "dense": _onnx_totals(reference_costs, proto),   # the source's kernels are dense already
            "after": _onnx_totals(node_costs(staging / FP32_MODEL if int8 is not None else onnx_path), out_proto),
            "export": {"ops": dict(sorted(ops.items())), "from": "onnx"},
            "verification": verification.to_dict(),
            "verified_against": ("the source torch module" if true_source is not None else
                                 "the source ONNX file as given, under ONNX Runtime with graph "
                                 "optimizations off") if not projected else
                                "the decomposed reference (see source_deviation for the source)",
            "reference": {"file": REFERENCE, "passes": ["fold_constants"], "ops": None,
                          "note": "the source with its constants folded (onnxsim) and shapes fixed",
                          "verification": reference_check.to_dict()}
            if not projected else
            {"file": REFERENCE, "passes": ["fold_constants", "project_structured_weights"], "ops": None,
             "verification": {"passed": None, "note": "the decomposed reference: the source with its "
                              "approximately structured kernels projected (--max-residual)"}},
            "source_deviation": deviation,
            "target_verification": target_check,
            "deployed_verification": deployed,
            "artifacts": _artifact_records(staging, artifacts),
            "timings_s": {k: round(v, 3) for k, v in timings.items()},
            "versions": tool_versions(),
        }
        if int8 is not None or target_int8 is not None:
            manifest["int8"] = (int8 or target_int8).record
        _publish(staging, outdir, manifest, device_lost)
    finally:
        _clean_up(staging, plan)
    return ConvertResult(outdir, manifest)
