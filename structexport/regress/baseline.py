"""The baseline file of ``structexport regress``: its format, entries, machine classes,
loading, validation and saving.

A baseline (schema version 2, docs/regress.md) lists *entries*. An entry is what is
measured -- a zoo architecture (weights drawn from a seed) or a checkpoint, a target,
threads, input shape and the bench options that matter -- recorded once, and its results
per *machine class* (:func:`structexport.machine.machine_class`: CPU model, ISA extensions,
threads): ``results`` maps a class id to that class's metrics, how they were measured and
when. A hardware-dependent ratio recorded on one class is judged only on the same class
(:attr:`Metric.per_class`); see :mod:`structexport.regress.judge`.

Version-1 files (one ``metrics`` per entry, the machine at the top) are read too: their
metrics belong to the class of the file's ``machine`` with the entry's thread count.
:func:`save_baseline` always writes version 2.

Every problem with a file is a :class:`RegressUsageError` (exit code 2) that names the fix.
"""
from __future__ import annotations

import copy
import datetime as dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from structexport import __version__
from structexport.errors import StructExportError
from structexport.fsutil import write_json_atomic
from structexport.machine import class_id, machine, machine_class

FORMAT = "structexport-regress-baseline"
VERSION = 2
READABLE_VERSIONS = (1, 2)
DEFAULT_REPEAT = 500
DEFAULT_WARMUP = 30
EXIT_PASS, EXIT_REGRESSION, EXIT_USAGE = 0, 1, 2

# Bench options an entry may carry (passed to the passes as BenchOptions.pass_options).
ENTRY_OPTIONS = {"sumpool_realization": (str, type(None)), "autotune": (bool, type(None))}
# What a v1 file's entry metrics belong to when the file records no machine.
UNKNOWN_MACHINE = {"cpu": "unknown", "machine": "unknown", "simd": []}
MACHINE_CLASS_FIELDS = {"cpu": str, "arch": str, "isa": list, "threads": int}
CLASS_RESULT_FIELDS = ("machine_class", "metrics", "measurement", "recorded")


class RegressUsageError(StructExportError):
    """A usage or environment error: missing/corrupt baseline, unknown arch, bad option."""
    exit_code, kind = EXIT_USAGE, "regress-usage"


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    unit: str
    description: str
    # True: a property of the CPU as much as of the model, judged only against results of
    # this machine's class. False: deterministic (MAC counts), judged against any class.
    per_class: bool = True

    def fmt(self, value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.2f}x" if self.unit == "x" else f"{value:.3f}"


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("speedup_measured", True, "x", "dense counterpart / structured model, fastest runs"),
    Metric("realization_efficiency", True, "", "measured speedup / theoretical speedup"),
    Metric("speedup_theoretical", True, "x", "dense MACs / structured MACs (ONNX graphs)", per_class=False),
    Metric("latency_vs_reference", False, "",
           "structured model / reference workload timed interleaved, fastest runs"),
)}
PER_CLASS_METRICS = tuple(n for n, m in METRICS.items() if m.per_class)
CROSS_CLASS_METRICS = tuple(n for n, m in METRICS.items() if not m.per_class)


def sumpool_realizations() -> tuple[str, ...]:
    """The sum-pool realizations an entry may force (imported when needed: it loads torch)."""
    from structexport.layers.sumpool import CLI_REALIZATIONS
    return tuple(CLI_REALIZATIONS)


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------- machines

def machine_info() -> dict:
    """This machine, as recorded beside a measurement (informational: never compared)."""
    m = machine()
    cpu = m["cpu"]
    return {"cpu": cpu["model"], "arch": cpu["machine"], "cores": cpu["cores"], "simd": cpu["simd"],
            "python": m["python"], "onnxruntime": m["onnxruntime"], "torch": m["torch"],
            "structexport": __version__}


def this_class(threads: int) -> dict:
    """This machine's class for an entry run with ``threads`` intra-op threads."""
    return machine_class(threads)


def class_of_machine(info: dict | None, threads: int) -> dict:
    """The class of a recorded machine (a v1 file's ``machine``: cpu, arch, simd)."""
    info = info or {}
    return machine_class(threads, {"model": str(info.get("cpu") or UNKNOWN_MACHINE["cpu"]),
                                   "machine": str(info.get("arch") or UNKNOWN_MACHINE["machine"]),
                                   "simd": [str(f) for f in info.get("simd") or []]})


# --------------------------------------------------------------------------- entries

@dataclass
class ClassResult:
    """An entry's results on one machine class."""
    machine_class: dict
    metrics: dict = field(default_factory=dict)
    measurement: dict = field(default_factory=dict)
    recorded: str | None = None

    @property
    def id(self) -> str:
        return class_id(self.machine_class)

    @property
    def machine(self) -> dict | None:
        """The machine that recorded it (cpu, cores, versions), where the measurement says."""
        m = self.measurement.get("machine")
        return m if isinstance(m, dict) else None

    def to_json(self) -> dict:
        return {"machine_class": dict(self.machine_class), "metrics": dict(self.metrics),
                "measurement": dict(self.measurement), "recorded": self.recorded}


@dataclass
class Entry:
    arch: str | None = None
    checkpoint: str | None = None          # relative to the baseline file's folder
    seed: int = 0
    target: str = "ort-cpu"
    threads: int = 1
    batch: int = 1
    input_shape: list[int] | None = None   # N,C,H,W; None: the model's own
    options: dict = field(default_factory=dict)
    repeat: int = DEFAULT_REPEAT
    warmup: int = DEFAULT_WARMUP
    tolerance: dict = field(default_factory=dict)   # metric -> fraction, overrides --tolerance
    results: dict[str, ClassResult] = field(default_factory=dict)   # class id -> results
    id: str = ""

    def __post_init__(self):
        if not self.id:
            self.id = self.default_id()

    def default_id(self) -> str:
        parts = [self.arch if not self.checkpoint else self.checkpoint, self.target, f"{self.threads}t"]
        if self.input_shape:
            parts.append("x".join(map(str, self.input_shape)))
        elif self.batch != 1:
            parts.append(f"b{self.batch}")
        if self.options.get("sumpool_realization"):
            parts.append(f"sumpool={self.options['sumpool_realization']}")
        if self.options.get("autotune"):
            parts.append("autotune")
        if self.seed:
            parts.append(f"seed{self.seed}")
        return " ".join(str(p) for p in parts)

    def same_measurement(self, other: Entry) -> bool:
        """Whether ``other`` measures the same thing (``--update`` replaces its class results then)."""
        key = lambda e: (e.arch if not e.checkpoint else None, e.checkpoint, e.seed, e.target,  # noqa: E731
                         e.threads, e.batch, tuple(e.input_shape or ()),
                         tuple(sorted((k, v) for k, v in e.options.items() if v)))
        return key(self) == key(other)

    def result_for(self, cid: str) -> ClassResult | None:
        return self.results.get(cid)

    def with_result(self, result: ClassResult) -> Entry:
        """A copy whose results for ``result``'s class are replaced (the others kept, in order)."""
        out = copy.deepcopy(self)
        out.results[result.id] = result
        return out

    def to_json(self) -> dict:
        out = {"id": self.id, "arch": self.arch, "checkpoint": self.checkpoint, "seed": self.seed,
               "target": self.target, "threads": self.threads, "batch": self.batch,
               "input_shape": self.input_shape,
               "options": {"sumpool_realization": self.options.get("sumpool_realization"),
                           "autotune": bool(self.options.get("autotune"))},
               "repeat": self.repeat, "warmup": self.warmup}
        if self.tolerance:
            out["tolerance"] = dict(self.tolerance)
        out["results"] = {cid: r.to_json() for cid, r in self.results.items()}
        return out


@dataclass
class Baseline:
    path: Path
    entries: list[Entry] = field(default_factory=list)
    machine: dict | None = None            # the machine of the latest --update (informational)
    created: str | None = None
    updated: str | None = None
    reference: dict | None = None          # the reference workload when the file was written
    extra: dict = field(default_factory=dict)   # unknown top-level keys, kept on rewrite
    read_version: int = VERSION            # the schema version the file had when read

    @property
    def folder(self) -> Path:
        return self.path.resolve().parent

    def classes(self) -> dict[str, ClassResult]:
        """Every class with results in some entry, in the order first seen: class id -> the
        first entry's results for it (its machine_class and the machine that recorded it)."""
        out: dict[str, ClassResult] = {}
        for e in self.entries:
            for cid, r in e.results.items():
                out.setdefault(cid, r)
        return out

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "created": self.created, "updated": self.updated,
                "machine": self.machine, "reference": self.reference,
                **self.extra, "entries": [e.to_json() for e in self.entries]}


# --------------------------------------------------------------------------- validation

def fix_hint(path: Path) -> str:
    return (f"fix the file, or recreate it with `structexport regress --update --baseline {path} "
            "--arch NAME --target TARGET`")


def entry_error(path: Path, where: str, what: str, hint: str | None = None) -> RegressUsageError:
    return RegressUsageError(f"baseline {path}, {where}: {what}", hint or fix_hint(path))


def _check_type(path, where, key, value, types, required=True):
    if value is None and not required:
        return
    if isinstance(value, bool) and bool not in types:
        types = ()
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types) if types else "a number"
        raise entry_error(path, where, f"{key!r} must be {names}, not {json.dumps(value)}")


def _check_metric_table(path: Path, where: str, key: str, table) -> dict:
    table = table or {}
    _check_type(path, where, key, table, (dict,))
    for name, value in table.items():
        if name not in METRICS:
            raise entry_error(path, where, f"unknown metric {name!r} in {key!r} (known: {', '.join(METRICS)})")
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise entry_error(path, where, f"{key}.{name} must be a non-negative number, not {json.dumps(value)}")
    return {k: v for k, v in table.items() if v is not None}


def _class_result_from_json(path: Path, where: str, key: str, raw, threads: int) -> ClassResult:
    where = f"{where}, results[{key!r}]"
    if not isinstance(raw, dict):
        raise entry_error(path, where, "not a JSON object")
    unknown = sorted(set(raw) - set(CLASS_RESULT_FIELDS))
    if unknown:
        raise entry_error(path, where, f"unknown field(s) {', '.join(map(repr, unknown))}",
                          "see docs/regress.md for the baseline format")
    cls = raw.get("machine_class")
    _check_type(path, where, "machine_class", cls, (dict,))
    unknown = sorted(set(cls) - set(MACHINE_CLASS_FIELDS))
    missing = sorted(set(MACHINE_CLASS_FIELDS) - set(cls))
    if unknown or missing:
        what = (f"unknown field(s) {', '.join(map(repr, unknown))}" if unknown
                else f"missing field(s) {', '.join(map(repr, missing))}")
        raise entry_error(path, where, f"machine_class: {what} (it has {', '.join(MACHINE_CLASS_FIELDS)})")
    for name, kind in MACHINE_CLASS_FIELDS.items():
        _check_type(path, where, f"machine_class.{name}", cls[name], (kind,))
    if not all(isinstance(f, str) for f in cls["isa"]):
        raise entry_error(path, where, "machine_class.isa must be a list of strings")
    if cls["threads"] != threads:
        raise entry_error(path, where, f"machine_class.threads is {cls['threads']}, the entry's threads "
                          f"{threads}", "a class's thread count is the entry's")
    metrics = _check_metric_table(path, where, "metrics", raw.get("metrics"))
    measurement = raw.get("measurement") or {}
    _check_type(path, where, "measurement", measurement, (dict,))
    _check_type(path, where, "recorded", raw.get("recorded"), (str,), required=False)
    return ClassResult(dict(cls, isa=list(cls["isa"])), metrics, measurement, raw.get("recorded"))


IDENTITY_FIELDS = ("id", "arch", "checkpoint", "seed", "target", "threads", "batch", "input_shape",
                   "options", "repeat", "warmup", "tolerance")
V1_FIELDS = (*IDENTITY_FIELDS, "metrics", "measurement")
V2_FIELDS = (*IDENTITY_FIELDS, "results")


def _entry_from_json(path: Path, index: int, raw, version: int, v1_machine: dict | None,
                     v1_updated: str | None) -> Entry:
    where = f"entry {index}"
    if not isinstance(raw, dict):
        raise entry_error(path, where, "not a JSON object")
    if raw.get("id"):
        where = f"entry {index} ({raw['id']!r})"
    known = V1_FIELDS if version == 1 else V2_FIELDS
    unknown = sorted(set(raw) - set(known))
    if unknown:
        hint = "see docs/regress.md for the baseline format"
        if version == 2 and set(unknown) & {"metrics", "measurement"}:
            hint = "version 2 keeps an entry's metrics and measurement per machine class, under 'results'"
        raise entry_error(path, where, f"unknown field(s) {', '.join(map(repr, unknown))}", hint)
    arch, ckpt = raw.get("arch"), raw.get("checkpoint")
    if not arch and not ckpt:
        raise entry_error(path, where, "names neither 'arch' nor 'checkpoint'")
    _check_type(path, where, "arch", arch, (str,), required=False)
    _check_type(path, where, "checkpoint", ckpt, (str,), required=False)
    for key, default in (("seed", 0), ("threads", 1), ("batch", 1), ("repeat", DEFAULT_REPEAT),
                         ("warmup", DEFAULT_WARMUP)):
        _check_type(path, where, key, raw.get(key, default), (int,))
    if raw.get("threads", 1) < 1 or raw.get("batch", 1) < 1 or raw.get("repeat", DEFAULT_REPEAT) < 3 \
            or raw.get("warmup", DEFAULT_WARMUP) < 0:
        raise entry_error(path, where, "threads and batch must be >= 1, repeat >= 3, warmup >= 0")
    _check_type(path, where, "target", raw.get("target", "ort-cpu"), (str,))
    shape = raw.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 4 and
                                  all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise entry_error(path, where, f"'input_shape' must be null or [N, C, H, W], not {json.dumps(shape)}")
    options = raw.get("options") or {}
    _check_type(path, where, "options", options, (dict,))
    for key, value in options.items():
        if key not in ENTRY_OPTIONS:
            raise entry_error(path, where, f"unknown option {key!r} (known: {', '.join(ENTRY_OPTIONS)})")
        _check_type(path, where, f"options.{key}", value, ENTRY_OPTIONS[key])
    realizations = sumpool_realizations()
    if options.get("sumpool_realization") not in (None, *realizations):
        raise entry_error(path, where, f"unknown sumpool_realization {options['sumpool_realization']!r} "
                          f"(one of {', '.join(realizations)})")
    tolerance = _check_metric_table(path, where, "tolerance", raw.get("tolerance"))
    threads = raw.get("threads", 1)
    results: dict[str, ClassResult] = {}
    if version == 1:
        metrics = _check_metric_table(path, where, "metrics", raw.get("metrics"))
        measurement = raw.get("measurement") or {}
        _check_type(path, where, "measurement", measurement, (dict,))
        if metrics:
            r = ClassResult(class_of_machine(v1_machine, threads), metrics, measurement,
                            measurement.get("measured_at") or v1_updated)
            results[r.id] = r
    else:
        table = raw.get("results") or {}
        _check_type(path, where, "results", table, (dict,))
        for key, value in table.items():
            r = _class_result_from_json(path, where, key, value, threads)
            if r.id in results:   # keys are re-derived from machine_class: two may agree
                raise entry_error(path, where, f"results {key!r} and another key are both class {r.id!r}",
                                  "keep one result per machine class")
            results[r.id] = r
    return Entry(arch=arch, checkpoint=ckpt, seed=raw.get("seed", 0), target=raw.get("target", "ort-cpu"),
                 threads=threads, batch=raw.get("batch", 1), input_shape=shape,
                 options={k: v for k, v in options.items() if v not in (None, False)},
                 repeat=raw.get("repeat", DEFAULT_REPEAT), warmup=raw.get("warmup", DEFAULT_WARMUP),
                 tolerance=tolerance, results=results, id=raw.get("id") or "")


def load_baseline(path: str | os.PathLike) -> Baseline:
    """Read and validate a baseline file (version 1 or 2); every problem is a
    :class:`RegressUsageError`."""
    path = Path(path)
    if not path.exists():
        raise RegressUsageError(f"baseline {path} does not exist",
                                f"create it with `structexport regress --update --baseline {path} "
                                "--arch NAME --target TARGET`")
    if path.is_dir():
        raise RegressUsageError(f"baseline {path} is a directory", "pass the baseline JSON file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RegressUsageError(f"baseline {path} cannot be read ({exc.__class__.__name__}: {exc})",
                                fix_hint(path)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegressUsageError(f"baseline {path} is not valid JSON (line {exc.lineno}, column "
                                f"{exc.colno}: {exc.msg})", fix_hint(path)) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RegressUsageError(f"baseline {path} is not a structexport regress baseline "
                                f"(no \"format\": \"{FORMAT}\")", fix_hint(path))
    version = data.get("version")
    if isinstance(version, bool) or version not in READABLE_VERSIONS:
        raise RegressUsageError(f"baseline {path} has schema version {json.dumps(version)}, this structexport "
                                f"reads versions {' and '.join(map(str, READABLE_VERSIONS))}", fix_hint(path))
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise RegressUsageError(f"baseline {path} has no \"entries\" list", fix_hint(path))
    machine_ = data.get("machine") if isinstance(data.get("machine"), dict) else None
    parsed = [_entry_from_json(path, i, raw, version, machine_, data.get("updated"))
              for i, raw in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, e in enumerate(parsed):
        if e.id in seen:
            raise entry_error(path, f"entry {i}", f"id {e.id!r} repeats entry {seen[e.id]}",
                              "give each entry its own id")
        seen[e.id] = i
    known_top = {"format", "version", "created", "updated", "machine", "reference", "entries"}
    reference = data.get("reference") if isinstance(data.get("reference"), dict) else None
    return Baseline(path, parsed, machine_, data.get("created"), data.get("updated"), reference,
                    {k: v for k, v in data.items() if k not in known_top}, version)


def save_baseline(baseline: Baseline) -> None:
    """Write the baseline as version 2, atomically (a temporary file beside it, then renamed)."""
    try:
        write_json_atomic(baseline.path, baseline.to_json(), indent=2)
    except OSError as exc:
        raise RegressUsageError(f"cannot write baseline {baseline.path} ({exc.strerror or exc})",
                                "check the folder exists and is writable") from None


def check_entry(baseline_path: Path, entry: Entry, index: int | None = None) -> None:
    """What can be checked without measuring: the arch, the checkpoint, the target."""
    from structexport.models import parse_name
    from structexport.targets import TARGETS
    if index is None:  # a new entry, from --update --arch/--checkpoint/--target
        where, fix = f"new entry {entry.id!r}", "check --arch, --checkpoint and --target"
    else:
        where = f"entry {index} ({entry.id!r})"
        fix = ("fix or remove the entry, or re-add it with `structexport regress --update --baseline "
               f"{baseline_path} --arch NAME --target TARGET`")
    if entry.arch:
        try:
            parse_name(entry.arch)
        except StructExportError as exc:
            raise entry_error(baseline_path, where, exc.message,
                              f"{exc.hint}; {fix}" if exc.hint else fix) from None
    if entry.checkpoint and not resolve_checkpoint(baseline_path, entry).is_file():
        raise entry_error(baseline_path, where, f"checkpoint {entry.checkpoint!r} not found at "
                          f"{resolve_checkpoint(baseline_path, entry)}", fix)
    if entry.target not in TARGETS or entry.target == "onnx":
        choices = ", ".join(t for t in TARGETS if t != "onnx")
        raise entry_error(baseline_path, where, f"unknown target {entry.target!r}",
                          f"one of {choices}; {fix}")


def resolve_checkpoint(baseline_path: Path, entry: Entry) -> Path:
    ckpt = Path(entry.checkpoint)
    return ckpt if ckpt.is_absolute() else Path(baseline_path).resolve().parent / ckpt
