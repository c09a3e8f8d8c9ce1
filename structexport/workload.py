"""One resolver from what a user points a measuring command at to a converted package.

``bench``, ``profile`` and ``regress`` all take ``OUTDIR | CKPT | --arch NAME`` (plus a
target, an input shape, pass options and trust flags). :func:`resolve_workload` turns any
of them into a :class:`Workload` whose :class:`~structexport.package.Package` holds the
artifact, its dense reference and the verification data:

- an OUTDIR is used as it is when it fits the request (same input shape, fp32, a target
  whose graph it holds, no sum-pool option that would change it), after its artifact is
  checked against the stored verification outputs; otherwise it is converted again from
  its source checkpoint, where that still is (else a clear error says what differs);
- a checkpoint is loaded once (with the trust flags) and converted into the work folder;
- ``--arch NAME`` builds the zoo model with weights drawn from the seed, converted alike.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from structexport.errors import InputDimensionError, StructExportError
from structexport.package import Package, PackageIncompatibleError, is_package

# Pass options that change the rewritten graph: a package is reused only when they agree.
GRAPH_OPTIONS = ("sumpool_realization", "autotune")
# The pass options the ONNX passes of models outside the zoo read (convert_source).
SOURCE_PASS_OPTIONS = ("max_residual", "sumpool_realization", "autotune", "tuning_cache", "threads",
                       "declared_structures", "keep_csg_codes")


class WorkloadError(StructExportError):
    exit_code, kind = 40, "nothing-to-measure"


class BatchRefusedError(StructExportError):
    """--batch for a model whose batch dimension is fixed: it cannot take effect."""
    exit_code, kind = 2, "usage"


@dataclass
class WorkloadOptions:
    target: str | None = None            # None: the package's target (ort-cpu for checkpoints)
    input_shape: tuple[int, ...] | str | None = None
    batch: int = 1
    seed: int = 0                        # --arch: the weights' seed
    pass_options: dict = field(default_factory=dict)
    target_options: dict = field(default_factory=dict)
    trust_pickle: bool = False
    allow_torchscript: bool = False
    # What the command needs from a package: "graph" (the ONNX graph rewritten for the
    # target's family: profile) or "artifact" (the target's own library: bench).
    need: str = "artifact"
    command: str = "measure"             # the verb errors use ("nothing to bench")


@dataclass
class Workload:
    package: Package
    origin: str                          # "outdir" | "checkpoint" | "arch"
    label: str                           # what the user named, for reports
    target: str
    notes: list[str] = field(default_factory=list)
    converted_here: bool = False

    @property
    def arch(self) -> str:
        return self.package.arch

    @property
    def shape(self) -> tuple[int, ...]:
        return self.package.input_shape


def parse_shape(shape) -> tuple[int, ...]:
    from structexport.convert import parse_input_shape
    return parse_input_shape(shape)


def _wanted_shape(base: tuple[int, ...], opts: WorkloadOptions) -> tuple[int, ...]:
    shape = parse_shape(opts.input_shape) if opts.input_shape else tuple(base)
    return (opts.batch,) + tuple(shape[1:])


def graph_compatible(built_for: str, wanted: str, need: str) -> bool:
    """Whether a package built for ``built_for`` serves ``wanted``: the same target, or --
    when only the rewritten graph is needed -- a target whose passes are the same."""
    if built_for == wanted:
        return True
    if need != "graph":
        return False
    from structexport.targets import get_target
    try:
        return get_target(built_for, {}).default_passes() == get_target(wanted, {}).default_passes()
    except StructExportError:
        return False


def _differences(package: Package, target: str, shape, opts: WorkloadOptions) -> list[str]:
    """Why ``package`` does not serve the request (empty: it does)."""
    why = []
    if tuple(shape) != package.input_shape:
        why.append(f"input shape {list(shape)} (it was built for {list(package.input_shape)})")
    if package.precision not in ("fp32", "int8"):
        why.append(f"fp32 (it is {package.precision})")
    if not graph_compatible(package.target, target, opts.need):
        why.append(f"target {target} (it was built for {package.target})")
    recorded = package.pass_options
    for key in GRAPH_OPTIONS:
        if opts.pass_options.get(key) and opts.pass_options.get(key) != recorded.get(key):
            why.append(f"--{key.replace('_', '-')} {opts.pass_options[key]}")
    from structexport.targets import is_program_target
    if is_program_target(target) and opts.need == "artifact" and (package.program is None
                                                                  or package.dense_program is None):
        why.append(f"a {target} program and its dense counterpart")
    if target.startswith("tvm") and opts.need == "artifact":
        if package.library is None:
            why.append(f"a {target} library (it has none)")
        given = []
        if opts.target_options.get("tvm_preset"):
            given.append("--tvm-preset")
        wanted = opts.target_options.get("tvm_target")
        if wanted and _parsed(wanted) != package.tvm_target:   # its own target is no change
            given.append("--tvm-target")
        wanted_mode = opts.target_options.get("tvm_structured")
        built_mode = ((package.target_build or {}).get("structured_convs") or {}).get("mode", "decomposed")
        if wanted_mode and wanted_mode != built_mode:
            why.append(f"--tvm-structured {wanted_mode} (its library has them {built_mode})")
        if given:
            why.append(f"another TVM target ({', '.join(given)})")
        elif target == "tvm-llvm" and package.library is not None and not _remote(opts):
            # a library built for another CPU family may not even load here (SIGILL)
            from structexport.machine import llvm_host_cpu
            built_for, host = (package.tvm_target or {}).get("mcpu"), llvm_host_cpu()
            if built_for and host and built_for != host:
                why.append(f"a library for this host's CPU {host} (it was built for {built_for})")
    if not package.self_contained:
        why.append("a dense reference and verification data (it was written by an older structexport)")
    return why


def _remote(opts: WorkloadOptions) -> bool:
    """Whether the run measures on a device over RPC (the library need not suit this host)."""
    return getattr(opts.target_options.get("device"), "remote", False) is True


def _parsed(tvm_target):
    import json
    try:
        return json.loads(tvm_target) if isinstance(tvm_target, str) else tvm_target
    except ValueError:
        return tvm_target


def check_package_outputs(package: Package, progress: Callable[[str], None] | None = None) -> None:
    """The package's ONNX model, run here, still gives the stored outputs of its source."""
    from structexport.export import VerificationError, onnx_runner, verify_arrays
    say = progress or (lambda _m: None)
    say("check the package against its verification data")
    if package.precision == "int8":
        # ONNX Runtime's QDQ model.onnx against its fake-quantized outputs; a program target's
        # model.onnx is the float32 graph of the same plan (its program holds the INT8 model)
        package.check_timed(onnx_runner(package.model_onnx),
                            f"{package.model_onnx} (ONNX Runtime, optimizations off)",
                            "fp32" if package.program is not None else None)
        return
    inputs, expected = package.verification_arrays()
    precision = package.precision
    atol, rtol = package.tolerances
    result = verify_arrays(onnx_runner(package.model_onnx), inputs, expected, precision, atol, rtol)
    if not result.passed:
        raise VerificationError(f"{package.root}/model.onnx no longer reproduces its verification "
                                f"outputs on this machine: {result.summary()}",
                                "convert the model again")


def resolve_workload(path: str | None, arch: str | None, opts: WorkloadOptions, workdir: Path,
                     progress: Callable[[str], None] | None = None) -> Workload:
    """``path`` (an OUTDIR or a checkpoint) or ``arch`` -> a :class:`Workload` (converted
    into ``workdir`` when needed; the caller removes ``workdir``)."""
    say = progress or (lambda _m: None)
    if path and is_package(path):
        package = Package.load(path)
        target = opts.target or package.target
        shape = _wanted_shape(package.input_shape, opts)
        why = _differences(package, target, shape, opts)
        if not why:
            check_package_outputs(package, say)
            return Workload(package, "outdir", str(path), target)
        if package.precision == "int8":
            raise PackageIncompatibleError(
                f"{path} is an INT8 package and this run needs {'; '.join(why)}: converting it again "
                "here would lose its calibration", "convert the model again with --precision int8 and "
                "those options, or drop the options that differ")
        source = package.source_checkpoint
        if source is None:
            raise PackageIncompatibleError(
                f"{path} does not fit this run, which needs {'; '.join(why)}, and its source "
                f"checkpoint {package.source_path} "
                f"{'has changed since (its SHA-256 differs)' if package.source_path and Path(package.source_path).is_file() else 'is not there'}"
                " to convert again",
                "pass the checkpoint itself (with --arch if needed), or drop the options that differ")
        say(f"convert again from {source} ({'; '.join(why)})")
        from structexport.frontends import is_zoo_checkpoint
        if not is_zoo_checkpoint(source, None):   # ONNX, torch.export, TorchScript sources
            pass_options = {**package.pass_options,
                            **{k: v for k, v in opts.pass_options.items() if v not in (None, False)}}
            shape_opts = dataclasses.replace(opts, input_shape=tuple(shape), target=target,
                                             pass_options=pass_options)
            workload = _convert_source_here(str(source), None, shape_opts, workdir, say)
            workload.origin, workload.label = "outdir", str(path)
            workload.notes.append(f"converted again from {source}: {'; '.join(why)}")
            return workload
        loaded = _load(str(source), package.arch, opts, say)
        pass_options = {**package.pass_options,
                        **{k: v for k, v in opts.pass_options.items() if v not in (None, False)}}
        workload = _convert_here(loaded, target, shape, pass_options, opts, workdir, say,
                                 origin="outdir", label=str(path))
        workload.notes.append(f"converted again from {source}: {'; '.join(why)}")
        return workload
    if path:
        if Path(path).is_dir():  # a folder that is not a package: the package loader's error
            Package.load(path)
        from structexport.frontends import is_zoo_checkpoint
        if not is_zoo_checkpoint(path, arch):
            return _convert_source_here(path, arch, opts, workdir, say)
        loaded = _load(path, arch, opts, say)
        origin, label = "checkpoint", str(path)
    elif arch:
        loaded = _build(arch, opts.seed, say)
        origin, label = "arch", f"--arch {arch} (weights drawn from seed {opts.seed})"
    else:
        raise WorkloadError(f"nothing to {opts.command}", "pass OUTDIR, a checkpoint, or --arch NAME")
    from structexport.models import input_shape as default_input_shape
    shape = _wanted_shape(default_input_shape(loaded.arch), opts)
    return _convert_here(loaded, opts.target or "ort-cpu", shape, opts.pass_options, opts, workdir,
                         say, origin=origin, label=label)


def _load(path: str, arch: str | None, opts: WorkloadOptions, say):
    from structexport.loader import load_checkpoint
    say("load")
    return load_checkpoint(path, arch, trust_pickle=opts.trust_pickle,
                           allow_torchscript=opts.allow_torchscript)


def _build(arch: str, seed: int, say):
    """A zoo model with weights drawn from ``seed``, as a loaded checkpoint without a file."""
    from structexport.loader import LoadedCheckpoint
    from structexport.models import build_model, parse_name
    say("build")
    spec = parse_name(arch)
    model = build_model(spec, seed)
    return LoadedCheckpoint(model, spec.name, "", "", "zoo", notes=[f"weights drawn from seed {seed}"],
                            metadata={"seed": seed})


def _conversion(target: str, opts: WorkloadOptions, workdir: Path, kind: str, say) -> tuple[str, Path, dict]:
    """(the target to convert for, a fresh folder, its target options). When only the
    rewritten ONNX graph is needed, "onnx" runs the same passes without compiling a library
    nobody reads."""
    convert_target = "onnx" if opts.need == "graph" and graph_compatible("onnx", target, "graph") else target
    outdir = workdir / f"converted-{kind}-{len(list(workdir.glob('converted-*')))}"
    say(f"convert for {convert_target}")
    return convert_target, outdir, (opts.target_options if convert_target.startswith("tvm") else {})


def _convert_here(loaded, target: str, shape, pass_options: dict, opts: WorkloadOptions,
                  workdir: Path, say, origin: str, label: str) -> Workload:
    from structexport.convert import ConvertOptions, convert_loaded
    convert_target, outdir, target_options = _conversion(target, opts, workdir, origin, say)
    result = convert_loaded(loaded, outdir, ConvertOptions(
        target=convert_target, input_shape=shape, pass_options=pass_options,
        target_options=target_options), progress=say)
    return Workload(Package.load(result.outdir, check_hashes=False), origin, label, target,
                    converted_here=True)


def _convert_source_here(path: str, arch: str | None, opts: WorkloadOptions, workdir: Path, say) -> Workload:
    """A model from outside the zoo (ONNX, torch.export, TorchScript): its front end, then
    the ONNX passes, into the work folder."""
    from structexport.convert import ConvertOptions, convert_source
    from structexport.frontends import load_source
    target = opts.target or "ort-cpu"
    say("load")
    shape = parse_shape(opts.input_shape) if opts.input_shape else None
    if shape is not None and opts.batch != 1:
        shape = (opts.batch,) + tuple(shape[1:])

    def load(shape):
        try:
            return load_source(path, arch=arch, input_shape=shape, trust_pickle=opts.trust_pickle,
                               allow_torchscript=opts.allow_torchscript)
        except InputDimensionError as exc:
            if opts.batch == 1 or "dimension 0 " not in exc.message:
                raise
            raise BatchRefusedError(f"--batch {opts.batch}: {exc.message.replace(', --input-shape gives', ', --batch gives')}",
                                    "leave --batch out, or export the model with a dynamic batch "
                                    "dimension") from None
    source = load(shape)
    if shape is None and opts.batch != 1 and source.input_shape and source.input_shape[0] != opts.batch:
        # --batch without --input-shape: the model's own shape at that batch (a fixed batch
        # dimension is refused, exit 2)
        source = load((opts.batch,) + tuple(source.input_shape[1:]))
    convert_target, outdir, target_options = _conversion(target, opts, workdir, "source", say)
    result = convert_source(source, outdir, ConvertOptions(
        target=convert_target, pass_options={k: v for k, v in opts.pass_options.items()
                                             if k in SOURCE_PASS_OPTIONS},
        target_options=target_options), say)
    return Workload(Package.load(result.outdir, check_hashes=False), "checkpoint", str(path), target,
                    converted_here=True)
