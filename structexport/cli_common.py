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
