"""What the CLI's command modules share: the consoles, the one error-to-exit-code mapping,
and the option groups several commands take. Command modules import this, never
:mod:`structexport.cli` (which imports them to register their commands)."""
from __future__ import annotations

import sys
from functools import wraps

import click
from rich.console import Console
from rich.markup import escape

from structexport.errors import StructExportError

# Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def fail_cleanly(fn):
    """Map the one user-facing error type to one line on stderr and its exit code."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StructExportError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
            sys.exit(exc.exit_code)
    return wrapper


def human(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def device_options(fn):
    """--rpc / --tracker / --key / --rpc-timeout: where a TVM library runs (one code path)."""
    for decorator in reversed([
        click.option("--rpc", metavar="HOST:PORT", help="Run on the device whose TVM RPC server "
                     "listens there (e.g. the emulated one: structexport device start-emulated-arm)."),
        click.option("--tracker", metavar="HOST:PORT", help="Ask this TVM RPC tracker (a device farm) "
                     "for a device of kind --key."),
        click.option("--key", metavar="KEY", help="Device kind to request from --tracker."),
        click.option("--rpc-timeout", type=click.FloatRange(1, 86400), default=900, show_default=True,
                     help="Seconds an RPC session may last before it is ended as hung."),
    ]):
        fn = decorator(fn)
    return fn


def _tune_budget(ctx, param, value):
    from structexport.tuning import TUNE_BUDGETS
    if value is None:
        return None
    if value in TUNE_BUDGETS:
        return TUNE_BUDGETS[value]
    try:
        trials = int(value)
    except ValueError:
        trials = 0
    if trials < 1:
        raise click.BadParameter(f"{value!r} is not a budget: give quick, full or a number of "
                                 "trials per task (1 or more)")
    return trials


def tune_options(tune_trials: int, tune_per_task: int | None) -> dict:
    """The target options of --tune-trials / --tune (one of them)."""
    if tune_trials and tune_per_task:
        raise click.UsageError("--tune and --tune-trials both set a tuning budget: give one")
    return {"tune_trials": tune_trials, "tune_per_task": tune_per_task}


def tvm_build_options(fn):
    """--tvm-target / --tvm-preset / --tune / --tune-trials / --tuning-db (TVM targets only)."""
    from structexport.targets import ARM_PRESETS
    for decorator in reversed([
        click.option("--tvm-preset", type=click.Choice(sorted(ARM_PRESETS)),
                     help="Board preset for --target tvm-arm (default: any aarch64 with NEON)."),
        click.option("--tvm-target", metavar="JSON", help="TVM target as JSON, overriding the "
                     "target's default and --tvm-preset, e.g. '{\"kind\": \"llvm\", \"mcpu\": \"znver3\"}'."),
        click.option("--tvm-structured", type=click.Choice(["fused", "decomposed"]),
                     help="How TVM targets compile structured convs: fused (the default: the "
                          "sum-pool in one hand-scheduled kernel feeding the small conv) or "
                          "decomposed (the decomposed ONNX graph's operators one by one)."),
        click.option("--tune", "tune_per_task", metavar="quick|full|N", callback=_tune_budget,
                     help="Tune with MetaSchedule, a budget per task: quick (16 trials), full (64: "
                          "ONNX Runtime's level on a CIFAR ResNet-20, about 1 s a trial) or N. "
                          "Tasks already in the tuning database are not tuned again."),
        click.option("--tune-trials", type=click.IntRange(0, 1_000_000), default=0, show_default=True,
                     help="MetaSchedule trials in all, shared by the tasks as MetaSchedule sees fit "
                          "(0: untuned; --tune gives every task its own budget)."),
        click.option("--tuning-db", type=click.Path(file_okay=False, path_type=str),
                     help="Tuning database folder (default ~/.cache/structexport/tvm-tuning)."),
    ]):
        fn = decorator(fn)
    return fn


def device_spec(rpc, tracker, key, rpc_timeout):
    from structexport.rpc import parse_device
    return parse_device(rpc, tracker, key, rpc_timeout)


def declared_structures(values) -> dict:
    """``GLOB=c2n2|c1n2|CxN`` -> {glob: spec}."""
    out = {}
    for value in values:
        glob, sep, spec = value.partition("=")
        if not sep or not glob:
            raise click.BadParameter(f"{value!r}: write GLOB=c2n2, GLOB=c1n2 or GLOB=CxN",
                                     param_hint="--declare-structured")
        if spec in ("c2n2", "c1n2"):
            out[glob] = spec
        else:
            try:
                c, n = (int(v) for v in spec.lower().split("x"))
            except ValueError:
                raise click.BadParameter(f"{value!r}: structure must be c2n2, c1n2 or CxN",
                                         param_hint="--declare-structured") from None
            out[glob] = (c, n)
    return out


def trust_options(fn):
    """--trust-pickle / --allow-torchscript: the loader's opt-ins, on every command that
    reads checkpoints (nothing from a checkpoint runs code without them)."""
    for decorator in reversed([
        click.option("--trust-pickle", is_flag=True,
                     help="Allow arbitrary unpickling (trusted files only)."),
        click.option("--allow-torchscript", is_flag=True,
                     help="Allow TorchScript archives (trusted files only)."),
    ]):
        fn = decorator(fn)
    return fn


class LazyChoice(click.Choice):
    """A click.Choice whose choices are read when first needed: the sum-pool realizations
    live with the layers, whose import loads torch, which `structexport --help` should not."""

    def __init__(self, load):
        self._load, self._loaded = load, None
        super().__init__((), case_sensitive=True)

    @property
    def choices(self):
        if self._loaded is None:
            self._loaded = tuple(self._load())
        return self._loaded

    @choices.setter
    def choices(self, _value):   # click.Choice.__init__ assigns it
        pass


def _sumpool_realizations() -> tuple[str, ...]:
    from structexport.layers.sumpool import CLI_REALIZATIONS
    return tuple(CLI_REALIZATIONS)


def sumpool_choice() -> LazyChoice:
    """--sumpool-realization's choices: the one list, kept with the layers."""
    return LazyChoice(_sumpool_realizations)


# --------------------------------------------------------------------------- refused flags
# Every option either takes effect for the source and target it is given with, or is
# refused here (exit 2) with what to use instead: a flag that silently does nothing is a
# bug (issue 18).

class OptionRefusedError(StructExportError):
    """An option that would do nothing for this source or target."""
    exit_code, kind = 2, "usage"


def given(ctx: click.Context, name: str) -> bool:
    """Whether the option ``name`` was given on the command line (not its default)."""
    from click.core import ParameterSource
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)


def source_kind(path, arch: str | None = None, model_spec: str | None = None) -> str | None:
    """What PATH is: "package" (a converted OUTDIR), "zoo" (a checkpoint the zoo's loader
    reads, the torch passes), "onnx" (any other model: the ONNX passes), or None when it
    cannot be read (the command's own error then names the problem)."""
    from pathlib import Path
    if not path or not Path(path).exists():
        return None
    from structexport.package import is_package
    if Path(path).is_dir():
        return "package" if is_package(path) else None
    from structexport.frontends import is_zoo_checkpoint
    return "zoo" if is_zoo_checkpoint(path, arch, model_spec) else "onnx"


def file_frontend(path):
    """The front end whose content test ``path`` passes (None: unreadable or unknown)."""
    from structexport.frontends import detect_frontend, frontend_for_suffix
    try:
        return detect_frontend(path) or frontend_for_suffix(path)
    except (StructExportError, OSError):
        return None


def check_source_flags(path, kind: str | None, arch, model_spec, trust_pickle: bool,
                       allow_torchscript: bool) -> None:
    """--arch / --model / --trust-pickle / --allow-torchscript against the file they are for."""
    if kind not in ("zoo", "onnx"):
        return
    frontend = file_frontend(path)
    name = getattr(frontend, "name", None)
    family = getattr(frontend, "family", None)
    title = getattr(frontend, "title", "this file")
    if frontend is not None and family != "torch":
        for flag, value in (("--arch", arch), ("--model", model_spec)):
            if value:
                raise OptionRefusedError(f"{flag} names the architecture of a state dict; {path} is "
                                         f"{title}, which carries its own", f"leave {flag} out")
    if allow_torchscript and frontend is not None and name != "torchscript":
        raise OptionRefusedError(f"--allow-torchscript allows TorchScript archives; {path} is {title}",
                                 "leave --allow-torchscript out")
    if trust_pickle and frontend is not None and family == "onnx":
        raise OptionRefusedError(f"--trust-pickle allows unpickling; {path} is {title}, which holds "
                                 "no pickle", "leave --trust-pickle out")


def check_pass_flags(kind: str | None, target: str, pass_options: dict, only=None, skip=None) -> None:
    """Pass options and --passes/--skip-pass against the pipeline the source goes through
    (zoo checkpoints and --arch: the torch passes; any other model: the ONNX passes)."""
    from structexport.passes import check_pass_options, select_onnx_passes, select_passes
    if kind == "onnx":
        names = [p.name for p in select_onnx_passes(only, skip)]
        check_pass_options(names, pass_options, "onnx")
        return
    if kind not in ("zoo", "arch"):
        return
    from structexport.targets import get_target
    try:
        default = get_target(target, {}).default_passes()
    except StructExportError:
        return       # the command reports an unknown target itself
    names = [p.name for p in select_passes(default, only, skip)]
    check_pass_options(names, pass_options, "torch")


def check_tvm_flags(ctx: click.Context, tvm_preset, tvm_target, tune_per_task, tune_trials, tuning_db,
                    rpc, tracker, tuned_package: bool = False) -> None:
    """TVM options that only take effect with another one."""
    if tvm_preset and tvm_target:
        raise OptionRefusedError("--tvm-target overrides --tvm-preset: the preset would not be used",
                                 "pass one of them")
    if tuning_db and not (tune_per_task or tune_trials) and not tuned_package:
        raise OptionRefusedError("--tuning-db holds MetaSchedule's records, and nothing is tuned "
                                 "without --tune or --tune-trials", "add --tune quick|full|N, or leave "
                                 "--tuning-db out")
    if given(ctx, "rpc_timeout") and not (rpc or tracker):
        raise OptionRefusedError("--rpc-timeout bounds an RPC session, and there is none without "
                                 "--rpc or --tracker", "add --rpc HOST:PORT or --tracker HOST:PORT "
                                 "--key KEY, or leave --rpc-timeout out")


def package_facts(path) -> dict:
    """What a package's manifest says of its source and build: {"pipeline": "zoo"|"onnx",
    "target": ..., "tuned": bool} (empty when it cannot be read)."""
    import json
    from pathlib import Path
    try:
        m = json.loads((Path(path) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}
    source = m.get("source") or {}
    return {"pipeline": "onnx" if source.get("family") == "discovered" else "zoo",
            "target": m.get("target"), "tuned": bool((m.get("target_build") or {}).get("tuning"))}


def check_measure_flags(ctx: click.Context, command: str, path, arch, trust_pickle: bool,
                        allow_torchscript: bool, pass_options: dict | None = None, target=None) -> str | None:
    """The flags ``bench``/``profile``/``regress`` share, against what PATH is; returns its
    kind (:func:`source_kind`, or "arch" for --arch alone)."""
    kind = source_kind(path, arch) if path else ("arch" if arch else None)
    if path and given(ctx, "seed"):
        raise OptionRefusedError(f"--seed draws the weights of --arch NAME without a checkpoint; {path} "
                                 "has its own (and is timed on its stored verification input)",
                                 "leave --seed out")
    if kind == "package":
        if arch:
            raise OptionRefusedError(f"--arch names a checkpoint's architecture; {path} is a converted "
                                     "package, which records its own", "leave --arch out")
        facts = package_facts(path)
        if pass_options:
            check_pass_flags("onnx" if facts.get("pipeline") == "onnx" else "zoo",
                             target or facts.get("target") or "ort-cpu", pass_options)
        return kind
    check_source_flags(path, kind, arch, None, trust_pickle, allow_torchscript)
    if pass_options:
        check_pass_flags(kind, target or "ort-cpu", pass_options)
    return kind
