"""``regress``: latency regression checks for CI, judged by ratios measured in one run.

A *baseline* file (JSON, see docs/regress.md) lists entries -- a zoo architecture (weights
drawn from a seed) or a checkpoint, a target, threads, input shape and the bench options
that matter -- each with the ratios recorded when the baseline was made. ``run_regress``
re-measures every entry with :func:`structexport.bench.run_bench` and compares ratios
only, never raw times, so a baseline made on another machine is still meaningful:

``speedup_measured``        dense counterpart / structured model (interleaved)
``realization_efficiency``  measured speedup / theoretical speedup
``speedup_theoretical``     dense MACs / structured MACs of the two ONNX graphs
``latency_vs_reference``    structured model / a fixed reference workload (a small dense
                            conv stack under ONNX Runtime) timed interleaved with the two

Times are each workload's fastest of its interleaved runs (:data:`STATISTIC`); medians
are recorded beside them for information.

Each metric has a direction; only a change for the worse beyond the tolerance counts. A
failing entry is re-measured once (``retries``) and a metric fails only if it fails both
times. Usage and environment errors raise :class:`RegressUsageError` (exit code 2).
"""
from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import math
import os
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from structexport import __version__
from structexport.errors import StructExportError

FORMAT = "structexport-regress-baseline"
VERSION = 1
DEFAULT_TOLERANCE = 0.10
DEFAULT_REPEAT = 500
DEFAULT_WARMUP = 30
EXIT_PASS, EXIT_REGRESSION, EXIT_USAGE = 0, 1, 2
# Which statistic of each workload's interleaved runs the ratios are computed from. The
# fastest run is what the machine's other load did not disturb: on the shared 2-core
# machines it moved <2% under added load where the medians' ratios moved 3-6%
# (docs/regress.md, "Why the fastest run").
STATISTIC = "min"

# Bench options an entry may carry (passed to the passes as BenchOptions.pass_options).
ENTRY_OPTIONS = {"sumpool_realization": (str, type(None)), "autotune": (bool, type(None))}
SUMPOOL_REALIZATIONS = ("cumsum", "banded", "box", "avgpool3d")
# Errors raised while measuring that mean the code under test broke (a pass, the export
# or the verification failed): the entry fails (exit 1). Every other error is a usage or
# environment error (exit 2).
CODE_FAILURE_EXIT_CODES = {30, 31, 32}


class RegressUsageError(StructExportError):
    """A usage or environment error: missing/corrupt baseline, unknown arch, bad option."""
    exit_code, kind = EXIT_USAGE, "regress-usage"


@dataclass(frozen=True)
class Metric:
    name: str
    higher_is_better: bool
    unit: str
    description: str

    def fmt(self, value: float | None) -> str:
        if value is None:
            return "-"
        return f"{value:.2f}x" if self.unit == "x" else f"{value:.3f}"


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("speedup_measured", True, "x", "dense counterpart / structured model, fastest runs"),
    Metric("realization_efficiency", True, "", "measured speedup / theoretical speedup"),
    Metric("speedup_theoretical", True, "x", "dense MACs / structured MACs (ONNX graphs)"),
    Metric("latency_vs_reference", False, "",
           "structured model / reference workload timed interleaved, fastest runs"),
)}


def parse_tolerance(text: str | float) -> float:
    """``"10%"`` or ``"0.1"`` -> 0.1. A bare number must be a fraction below 1 (``"10"``
    is refused as ambiguous); with ``%`` any non-negative value (``"150%"``: a
    lower-is-better ratio may grow 2.5x)."""
    raw = str(text).strip()
    try:
        if raw.endswith("%"):
            value = float(raw[:-1].strip()) / 100.0
        else:
            value = float(raw)
            if value >= 1:
                raise RegressUsageError(
                    f"tolerance {raw!r} is ambiguous", f"write it as a percentage, e.g. --tolerance {raw}%")
    except ValueError:
        raise RegressUsageError(f"bad tolerance {raw!r}",
                                "write a percentage or a fraction, e.g. --tolerance 10% or 0.1") from None
    if not math.isfinite(value) or value < 0:
        raise RegressUsageError(f"tolerance {raw!r} is out of range",
                                "use a non-negative percentage, e.g. --tolerance 10%")
    return value


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def machine_info() -> dict:
    """This machine, as recorded in a baseline (informational: never compared)."""
    from structexport.bench import machine
    m = machine()
    cpu = m["cpu"]
    return {"cpu": cpu["model"], "arch": cpu["machine"], "cores": cpu["cores"], "simd": cpu["simd"],
            "python": m["python"], "onnxruntime": m["onnxruntime"], "torch": m["torch"],
            "structexport": __version__}


# --------------------------------------------------------------------------- reference

class ReferenceWorkload:
    """A fixed dense conv stack under ONNX Runtime, timed interleaved with the models.

    Three 3x3 convolutions (32 -> 32 channels, 32x32, bias, ReLU), about 28 M
    multiply-accumulates, with weights from a fixed seed: the same kind of work as the
    models (MLAS convolutions, the same session options and thread count), so the clock,
    the SIMD width, the caches and the load of a shared machine scale both alike and
    ``structured latency / reference latency`` moves little from machine to machine or
    run to run. Change anything here and bump :attr:`ID`: a baseline recorded against
    another reference is not compared on ``latency_vs_reference``.
    """

    ID = "ort-conv3x3-c32-32x32-x3/v1"
    CHANNELS, SIZE, LAYERS = 32, 32, 3

    def __init__(self, threads: int = 1):
        import numpy as np
        import onnx
        from onnx import TensorProto, helper, numpy_helper

        from structexport.bench import _session
        rng = np.random.RandomState(20261123)
        c, s = self.CHANNELS, self.SIZE
        nodes, inits, prev = [], [], "x"
        for i in range(self.LAYERS):
            w = (rng.standard_normal((c, c, 3, 3)) * math.sqrt(2.0 / (9 * c))).astype(np.float32)
            b = (rng.standard_normal(c) * 0.01).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
            nodes.append(helper.make_node("Conv", [prev, f"w{i}", f"b{i}"], [f"c{i}"],
                                          kernel_shape=[3, 3], pads=[1, 1, 1, 1]))
            prev = f"y{i}" if i < self.LAYERS - 1 else "y"
            nodes.append(helper.make_node("Relu", [f"c{i}"], [prev]))
        graph = helper.make_graph(
            nodes, "structexport_regress_reference",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, s, s])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, s, s])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        onnx.checker.check_model(model)
        with tempfile.TemporaryDirectory(prefix="structexport-regress-ref-") as tmp:
            path = Path(tmp) / "reference.onnx"
            onnx.save(model, path)
            self._session = _session(path, threads)
        self._feed = {"x": rng.standard_normal((1, c, s, s)).astype(np.float32)}
        self.threads = threads

    # An ONNX Runtime session's two methods, as bench's interleaved loop uses them (its feed
    # is ignored: the reference has its own input).
    def get_inputs(self):
        from types import SimpleNamespace
        return [SimpleNamespace(name="reference")]

    def run(self, _outputs, _feed):
        return self._session.run(None, self._feed)


# --------------------------------------------------------------------------- baseline

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
    metrics: dict = field(default_factory=dict)
    measurement: dict = field(default_factory=dict)
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

    def same_measurement(self, other: "Entry") -> bool:
        """Whether ``other`` measures the same thing (``--update`` replaces it then)."""
        key = lambda e: (e.arch if not e.checkpoint else None, e.checkpoint, e.seed, e.target,  # noqa: E731
                         e.threads, e.batch, tuple(e.input_shape or ()),
                         tuple(sorted((k, v) for k, v in e.options.items() if v)))
        return key(self) == key(other)

    def to_json(self) -> dict:
        out = {"id": self.id, "arch": self.arch, "checkpoint": self.checkpoint, "seed": self.seed,
               "target": self.target, "threads": self.threads, "batch": self.batch,
               "input_shape": self.input_shape,
               "options": {"sumpool_realization": self.options.get("sumpool_realization"),
                           "autotune": bool(self.options.get("autotune"))},
               "repeat": self.repeat, "warmup": self.warmup}
        if self.tolerance:
            out["tolerance"] = dict(self.tolerance)
        out["metrics"] = dict(self.metrics)
        out["measurement"] = dict(self.measurement)
        return out


@dataclass
class Baseline:
    path: Path
    entries: list[Entry] = field(default_factory=list)
    machine: dict | None = None
    created: str | None = None
    updated: str | None = None
    extra: dict = field(default_factory=dict)   # unknown top-level keys, kept on rewrite

    @property
    def folder(self) -> Path:
        return self.path.resolve().parent

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "created": self.created, "updated": self.updated,
                "machine": self.machine,
                "reference": {"id": ReferenceWorkload.ID, "description": (ReferenceWorkload.__doc__ or "")
                              .strip().splitlines()[0]},
                **self.extra, "entries": [e.to_json() for e in self.entries]}


def _fix_hint(path: Path) -> str:
    return (f"fix the file, or recreate it with `structexport regress --update --baseline {path} "
            "--arch NAME --target TARGET`")


def _entry_error(path: Path, where: str, what: str, hint: str | None = None) -> RegressUsageError:
    return RegressUsageError(f"baseline {path}, {where}: {what}", hint or _fix_hint(path))


def _check_type(path, where, key, value, types, required=True):
    if value is None and not required:
        return
    if isinstance(value, bool) and bool not in types:
        types = ()
    if not isinstance(value, types):
        names = " or ".join(t.__name__ for t in types) if types else "a number"
        raise _entry_error(path, where, f"{key!r} must be {names}, not {json.dumps(value)}")


def _entry_from_json(path: Path, index: int, raw) -> Entry:
    where = f"entry {index}"
    if not isinstance(raw, dict):
        raise _entry_error(path, where, "not a JSON object")
    if raw.get("id"):
        where = f"entry {index} ({raw['id']!r})"
    known = set(Entry.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise _entry_error(path, where, f"unknown field(s) {', '.join(map(repr, unknown))}",
                           "see docs/regress.md for the baseline format")
    arch, ckpt = raw.get("arch"), raw.get("checkpoint")
    if not arch and not ckpt:
        raise _entry_error(path, where, "names neither 'arch' nor 'checkpoint'")
    _check_type(path, where, "arch", arch, (str,), required=False)
    _check_type(path, where, "checkpoint", ckpt, (str,), required=False)
    for key, default in (("seed", 0), ("threads", 1), ("batch", 1), ("repeat", DEFAULT_REPEAT),
                         ("warmup", DEFAULT_WARMUP)):
        _check_type(path, where, key, raw.get(key, default), (int,))
    if raw.get("threads", 1) < 1 or raw.get("batch", 1) < 1 or raw.get("repeat", DEFAULT_REPEAT) < 3 \
            or raw.get("warmup", DEFAULT_WARMUP) < 0:
        raise _entry_error(path, where, "threads and batch must be >= 1, repeat >= 3, warmup >= 0")
    _check_type(path, where, "target", raw.get("target", "ort-cpu"), (str,))
    shape = raw.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 4 and
                                  all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)):
        raise _entry_error(path, where, f"'input_shape' must be null or [N, C, H, W], not {json.dumps(shape)}")
    options = raw.get("options") or {}
    _check_type(path, where, "options", options, (dict,))
    for key, value in options.items():
        if key not in ENTRY_OPTIONS:
            raise _entry_error(path, where, f"unknown option {key!r} (known: {', '.join(ENTRY_OPTIONS)})")
        _check_type(path, where, f"options.{key}", value, ENTRY_OPTIONS[key])
    if options.get("sumpool_realization") not in (None, *SUMPOOL_REALIZATIONS):
        raise _entry_error(path, where, f"unknown sumpool_realization {options['sumpool_realization']!r} "
                           f"(one of {', '.join(SUMPOOL_REALIZATIONS)})")
    for key in ("metrics", "tolerance"):
        table = raw.get(key) or {}
        _check_type(path, where, key, table, (dict,))
        for name, value in table.items():
            if name not in METRICS:
                raise _entry_error(path, where, f"unknown metric {name!r} in {key!r} "
                                   f"(known: {', '.join(METRICS)})")
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise _entry_error(path, where, f"{key}.{name} must be a non-negative number, "
                                   f"not {json.dumps(value)}")
    measurement = raw.get("measurement") or {}
    _check_type(path, where, "measurement", measurement, (dict,))
    return Entry(arch=arch, checkpoint=ckpt, seed=raw.get("seed", 0), target=raw.get("target", "ort-cpu"),
                 threads=raw.get("threads", 1), batch=raw.get("batch", 1), input_shape=shape,
                 options={k: v for k, v in options.items() if v not in (None, False)},
                 repeat=raw.get("repeat", DEFAULT_REPEAT), warmup=raw.get("warmup", DEFAULT_WARMUP),
                 tolerance={k: v for k, v in (raw.get("tolerance") or {}).items() if v is not None},
                 metrics={k: v for k, v in (raw.get("metrics") or {}).items() if v is not None},
                 measurement=measurement, id=raw.get("id") or "")


def load_baseline(path: str | os.PathLike) -> Baseline:
    """Read and validate a baseline file; every problem is a :class:`RegressUsageError`."""
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
                                _fix_hint(path)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RegressUsageError(f"baseline {path} is not valid JSON (line {exc.lineno}, column "
                                f"{exc.colno}: {exc.msg})", _fix_hint(path)) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RegressUsageError(f"baseline {path} is not a structexport regress baseline "
                                f"(no \"format\": \"{FORMAT}\")", _fix_hint(path))
    if data.get("version") != VERSION:
        raise RegressUsageError(f"baseline {path} has schema version {json.dumps(data.get('version'))}, "
                                f"this structexport reads version {VERSION}", _fix_hint(path))
    entries = data.get("entries")
    if not isinstance(entries, list):
        raise RegressUsageError(f"baseline {path} has no \"entries\" list", _fix_hint(path))
    parsed = [_entry_from_json(path, i, raw) for i, raw in enumerate(entries)]
    seen: dict[str, int] = {}
    for i, e in enumerate(parsed):
        if e.id in seen:
            raise _entry_error(path, f"entry {i}", f"id {e.id!r} repeats entry {seen[e.id]}",
                               "give each entry its own id")
        seen[e.id] = i
    known_top = {"format", "version", "created", "updated", "machine", "reference", "entries"}
    machine = data.get("machine") if isinstance(data.get("machine"), dict) else None
    return Baseline(path, parsed, machine, data.get("created"), data.get("updated"),
                    {k: v for k, v in data.items() if k not in known_top})


def save_baseline(baseline: Baseline) -> None:
    """Write the baseline atomically (a temporary file beside it, then renamed)."""
    path = baseline.path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(baseline.to_json(), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(Exception):
            os.unlink(tmp)  # type: ignore[possibly-undefined]
        raise RegressUsageError(f"cannot write baseline {path} ({exc.strerror or exc})",
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
            raise _entry_error(baseline_path, where, exc.message,
                               f"{exc.hint}; {fix}" if exc.hint else fix) from None
    if entry.checkpoint and not resolve_checkpoint(baseline_path, entry).is_file():
        raise _entry_error(baseline_path, where, f"checkpoint {entry.checkpoint!r} not found at "
                           f"{resolve_checkpoint(baseline_path, entry)}", fix)
    if entry.target not in TARGETS or entry.target == "onnx":
        choices = ", ".join(t for t in TARGETS if t != "onnx")
        raise _entry_error(baseline_path, where, f"unknown target {entry.target!r}",
                           f"one of {choices}; {fix}")


def resolve_checkpoint(baseline_path: Path, entry: Entry) -> Path:
    ckpt = Path(entry.checkpoint)
    return ckpt if ckpt.is_absolute() else Path(baseline_path).resolve().parent / ckpt


# --------------------------------------------------------------------------- measurement

@dataclass
class Measurement:
    metrics: dict
    raw: dict
    seconds: float


_REFERENCES: dict[int, ReferenceWorkload] = {}


def reference_for(threads: int) -> ReferenceWorkload:
    if threads not in _REFERENCES:
        _REFERENCES[threads] = ReferenceWorkload(threads)
    return _REFERENCES[threads]


def measure_entry(baseline_path: Path, entry: Entry,
                  progress: Callable[[str], None] | None = None) -> Measurement:
    """Bench one entry and the reference workload alongside it; the ratios it yields."""
    from structexport.bench import BenchOptions, run_bench
    say = progress or (lambda _m: None)
    start = time.perf_counter()
    reference = reference_for(entry.threads)
    pass_options = {"threads": entry.threads, "autotune": bool(entry.options.get("autotune"))}
    if entry.options.get("sumpool_realization"):
        pass_options["sumpool_realization"] = entry.options["sumpool_realization"]
    shape = ",".join(map(str, entry.input_shape)) if entry.input_shape else None
    # The reference runs as a third workload in bench's interleaved loop.
    opts = BenchOptions(target=entry.target, threads=entry.threads, batch=entry.batch, input_shape=shape,
                        repeat=entry.repeat, warmup=entry.warmup, seed=entry.seed,
                        pass_options=pass_options, extra_workloads={"reference": reference})
    path = str(resolve_checkpoint(baseline_path, entry)) if entry.checkpoint else None
    result = run_bench(path, entry.arch, opts, progress=say)
    ref_stats, how = result["extra_latency_ms"]["reference"], "interleaved"
    s, d = result["latency_ms"], result["dense_latency_ms"]
    theoretical = result.get("speedup_theoretical")
    speedup = d[STATISTIC] / s[STATISTIC] if s[STATISTIC] else None
    metrics = {
        "speedup_measured": speedup,
        "realization_efficiency": speedup / theoretical if speedup and theoretical else None,
        "speedup_theoretical": theoretical,
        "latency_vs_reference": s[STATISTIC] / ref_stats[STATISTIC] if ref_stats[STATISTIC] else None,
    }
    metrics = {k: (float(v) if v is not None and math.isfinite(v) else None) for k, v in metrics.items()}
    raw = {"statistic": STATISTIC,
           "latency_ms": {k: round(s[k], 4) for k in ("min", "median")},
           "dense_latency_ms": {k: round(d[k], 4) for k in ("min", "median")},
           "reference_ms": {k: round(ref_stats[k], 4) for k in ("min", "median")},
           "median_ratios": {"speedup_measured": round(d["median"] / s["median"], 4),
                             "latency_vs_reference": round(s["median"] / ref_stats["median"], 4)},
           "reference": ReferenceWorkload.ID, "reference_timing": how, "runs": entry.repeat,
           "input_shape": result.get("input_shape"), "arch": result.get("arch"), "macs": result.get("macs"),
           "machine": machine_info(), "measured_at": _now()}
    return Measurement(metrics, raw, time.perf_counter() - start)


# --------------------------------------------------------------------------- judging

@dataclass
class MetricResult:
    metric: str
    before: float | None
    after: float | None
    tolerance: float
    status: str              # ok | improved | regression | skipped | error
    worse_by: float | None = None   # relative change for the worse (negative: better)
    first: float | None = None      # the first measurement, when the entry was re-measured
    note: str = ""

    @property
    def failed(self) -> bool:
        return self.status in ("regression", "error")

    def describe(self) -> str:
        m = METRICS[self.metric]
        if self.status == "error":
            return self.note
        if self.status == "skipped":
            return f"{self.metric} not compared: {self.note}"
        direction = "higher" if m.higher_is_better else "lower"
        change = f"{abs(self.worse_by) * 100:.1f}% {'worse' if self.worse_by > 0 else 'better'}"
        text = (f"{self.metric} {m.fmt(self.after)} vs baseline {m.fmt(self.before)}: {change} "
                f"({direction} is better, tolerance {self.tolerance * 100:g}%)")
        if self.first is not None:
            text += f"; re-measured, first measurement {m.fmt(self.first)}"
        return text


def worse_by(metric: str, before: float, after: float) -> float:
    """Relative change for the worse: > 0 worse, < 0 better (direction per metric)."""
    if before == 0:
        return 0.0 if after == 0 else (math.inf if not METRICS[metric].higher_is_better else -math.inf)
    change = (after - before) / before
    return -change if METRICS[metric].higher_is_better else change


def judge_metric(metric: str, before: float | None, after: float | None, tolerance: float,
                 note_if_missing: str = "") -> MetricResult:
    if before is None or after is None:
        why = note_if_missing or ("no baseline value" if before is None else "not measured")
        return MetricResult(metric, before, after, tolerance, "skipped", note=why)
    w = worse_by(metric, before, after)
    status = "regression" if w > tolerance + 1e-12 else "improved" if -w > tolerance + 1e-12 else "ok"
    return MetricResult(metric, before, after, tolerance, status, worse_by=w)


def _better(metric: str, a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return a if b is None else b
    return max(a, b) if METRICS[metric].higher_is_better else min(a, b)


@dataclass
class EntryResult:
    entry: Entry
    metrics: list[MetricResult] = field(default_factory=list)
    measured: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    seconds: float = 0.0
    remeasured: bool = False
    error: str | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None or any(m.failed for m in self.metrics)


@dataclass
class Report:
    baseline: Path
    mode: str                       # "check" | "update"
    entries: list[EntryResult]
    machine: dict
    baseline_machine: dict | None
    tolerance: float
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.mode == "check" and any(e.failed for e in self.entries)

    @property
    def exit_code(self) -> int:
        return EXIT_REGRESSION if self.failed else EXIT_PASS

    @property
    def same_machine(self) -> bool:
        b = self.baseline_machine or {}
        return bool(b) and (b.get("cpu"), b.get("cores")) == (self.machine.get("cpu"), self.machine.get("cores"))


Measure = Callable[[Path, Entry, Callable[[str], None] | None], Measurement]


def _tolerance_for(entry: Entry, metric: str, default: float) -> float:
    return float(entry.tolerance.get(metric, default))


def _judge_entry(entry: Entry, first: Measurement, second: Measurement | None,
                 tolerance: float) -> list[MetricResult]:
    results = []
    reference_differs = (entry.measurement.get("reference") not in (None, ReferenceWorkload.ID))
    for name in METRICS:
        before = entry.metrics.get(name)
        after = first.metrics.get(name)
        first_value = None
        if second is not None:
            first_value, after = after, _better(name, after, second.metrics.get(name))
        if name == "latency_vs_reference" and reference_differs:
            results.append(MetricResult(name, before, after, _tolerance_for(entry, name, tolerance), "skipped",
                                        note=f"baseline used reference {entry.measurement.get('reference')!r}, "
                                             f"this run {ReferenceWorkload.ID!r}"))
            continue
        r = judge_metric(name, before, after, _tolerance_for(entry, name, tolerance))
        if second is not None and first_value is not None and first_value != after:
            r.first = first_value
        results.append(r)
    return results


def _measure_or_fail(baseline_path: Path, entry: Entry, measure: Measure,
                     progress: Callable[[str], None] | None) -> Measurement | str:
    """A measurement, or the message of an error in the code under test (exit 1);
    usage and environment errors are raised as :class:`RegressUsageError` (exit 2)."""
    try:
        return measure(baseline_path, entry, progress)
    except RegressUsageError:
        raise
    except StructExportError as exc:
        if exc.exit_code in CODE_FAILURE_EXIT_CODES:
            return f"{entry.id}: {exc} (exit code {exc.exit_code} of the pipeline)"
        raise RegressUsageError(f"entry {entry.id!r} cannot be measured here: {exc.message}",
                                exc.hint or "fix the environment or the entry") from None
    except Exception as exc:  # the code under test crashed: a failure of that entry
        return f"{entry.id}: measuring raised {exc.__class__.__name__}: {exc}"


def run_regress(baseline_path: str | os.PathLike, tolerance: float = DEFAULT_TOLERANCE, retries: int = 1,
                progress: Callable[[str], None] | None = None, measure: Measure | None = None) -> Report:
    """Re-measure every entry of the baseline and judge its ratios (nothing is written).
    ``measure`` defaults to :func:`measure_entry`."""
    say = progress or (lambda _m: None)
    measure = measure or measure_entry
    start = time.perf_counter()
    baseline = load_baseline(baseline_path)
    path = baseline.path
    if not baseline.entries:
        raise RegressUsageError(f"baseline {path} has no entries",
                                f"add one with `structexport regress --update --baseline {path} "
                                "--arch NAME --target TARGET`")
    for i, entry in enumerate(baseline.entries):
        check_entry(path, entry, i)
        if not entry.metrics:
            raise _entry_error(path, f"entry {i} ({entry.id!r})", "has no recorded metrics",
                               f"record them with `structexport regress --update --baseline {path}`")
    results = []
    for entry in baseline.entries:
        say(f"{entry.id}: measuring")
        first = _measure_or_fail(path, entry, measure, lambda m, e=entry: say(f"{e.id}: {m}"))
        if isinstance(first, str):
            results.append(EntryResult(entry, [MetricResult(n, entry.metrics.get(n), None, tolerance, "error",
                                                            note=first) for n in METRICS], error=first))
            continue
        er = EntryResult(entry, _judge_entry(entry, first, None, tolerance), dict(first.metrics),
                         first.raw, first.seconds)
        attempt = 0
        while er.failed and attempt < retries:
            attempt += 1
            failing = "; ".join(m.describe() for m in er.metrics if m.failed)
            say(f"{entry.id}: re-measuring once ({failing})")
            second = _measure_or_fail(path, entry, measure, lambda m, e=entry: say(f"{e.id}: {m}"))
            if isinstance(second, str):
                er.error = second
                break
            er = EntryResult(entry, _judge_entry(entry, first, second, tolerance),
                             {n: _better(n, first.metrics.get(n), second.metrics.get(n)) for n in METRICS},
                             second.raw, first.seconds + second.seconds, remeasured=True)
            first = Measurement(er.measured, second.raw, er.seconds)
        results.append(er)
    return Report(path, "check", results, machine_info(), baseline.machine, tolerance,
                  time.perf_counter() - start)


def update_baseline(baseline_path: str | os.PathLike, new_entry: Entry | None = None,
                    tolerance: float = DEFAULT_TOLERANCE, progress: Callable[[str], None] | None = None,
                    measure: Measure | None = None) -> Report:
    """``new_entry``: measure it and add it (replacing an entry that measures the same
    thing), creating the file if needed. Without: re-measure and rewrite every entry.
    The file is written atomically, only once every measurement succeeded."""
    say = progress or (lambda _m: None)
    measure = measure or measure_entry
    start = time.perf_counter()
    path = Path(baseline_path)
    if new_entry is not None and not path.exists():
        baseline = Baseline(path, created=_now())
    elif new_entry is None and not path.exists():
        raise RegressUsageError(f"baseline {path} does not exist, nothing to update",
                                f"create it with `structexport regress --update --baseline {path} "
                                "--arch NAME --target TARGET`")
    else:
        baseline = load_baseline(path)
    if new_entry is not None:
        check_entry(path, new_entry)
        todo = [new_entry]
    else:
        if not baseline.entries:
            raise RegressUsageError(f"baseline {path} has no entries",
                                    "add one with --update --arch NAME --target TARGET")
        for i, entry in enumerate(baseline.entries):
            check_entry(path, entry, i)
        todo = list(baseline.entries)
    results = []
    for entry in todo:
        say(f"{entry.id}: measuring")
        m = _measure_or_fail(path, entry, measure, lambda msg, e=entry: say(f"{e.id}: {msg}"))
        if isinstance(m, str):
            raise RegressUsageError(f"cannot record {entry.id!r}: {m}",
                                    "fix the model or the entry; the baseline was left as it was")
        old = next((e for e in baseline.entries if e.same_measurement(entry) or e.id == entry.id), None)
        before = dict(old.metrics) if old else {}
        updated = copy.deepcopy(entry)
        updated.metrics = {k: (round(v, 6) if v is not None else None) for k, v in m.metrics.items()}
        updated.measurement = m.raw
        if new_entry is not None and old is not None:
            updated.tolerance = updated.tolerance or dict(old.tolerance)
            baseline.entries[baseline.entries.index(old)] = updated
        elif new_entry is not None:
            baseline.entries.append(updated)
        else:
            baseline.entries[baseline.entries.index(entry)] = updated
        er = EntryResult(updated, [MetricResult(n, before.get(n), updated.metrics.get(n), _tolerance_for(updated, n, tolerance),
                                                "recorded") for n in METRICS],
                         dict(updated.metrics), m.raw, m.seconds)
        for r in er.metrics:
            if r.before is not None and r.after is not None:
                r.worse_by = worse_by(r.metric, r.before, r.after)
        results.append(er)
    old_machine = baseline.machine
    baseline.machine = machine_info()
    baseline.updated = _now()
    baseline.created = baseline.created or baseline.updated
    save_baseline(baseline)
    return Report(path, "update", results, baseline.machine, old_machine, tolerance,
                  time.perf_counter() - start)


# --------------------------------------------------------------------------- reports

def _fmt_change(r: MetricResult) -> str:
    if r.worse_by is None:
        return ""
    if abs(r.worse_by) < 0.0005:
        return "0.0%"
    return f"{abs(r.worse_by) * 100:.1f}% {'worse' if r.worse_by > 0 else 'better'}"


def _machine_line(m: dict | None) -> str:
    if not m:
        return "unknown"
    return f"{m.get('cpu', '?')} ({m.get('arch', '?')}, {m.get('cores', '?')} cores), onnxruntime {m.get('onnxruntime', '?')}"


def raw_line(er: EntryResult) -> str:
    """The raw times behind an entry's ratios (informational: never compared)."""
    raw = er.raw

    def ms(key):
        v = raw.get(key)
        if isinstance(v, dict):
            return f"{v.get('min', float('nan')):.3f} (median {v.get('median', float('nan')):.3f})"
        return "?" if v is None else f"{v:.3f}"
    text = (f"structured {ms('latency_ms')} ms, dense {ms('dense_latency_ms')} ms, reference "
            f"{ms('reference_ms')} ms: fastest of {raw.get('runs', '?')} interleaved runs, reference "
            f"{raw.get('reference_timing', '?')}")
    if er.remeasured:
        text += "; re-measured once"
    return text + f"; {er.seconds:.1f} s"


def verdict(report: Report) -> str:
    if report.mode == "update":
        return f"baseline {report.baseline} updated ({len(report.entries)} entr{'y' if len(report.entries) == 1 else 'ies'})"
    failed = [e for e in report.entries if e.failed]
    if not failed:
        return f"PASS: {len(report.entries)} entr{'y' if len(report.entries) == 1 else 'ies'} within tolerance"
    return f"FAIL: {len(failed)} of {len(report.entries)} entries regressed ({', '.join(e.entry.id for e in failed)})"


def table_rows(report: Report) -> list[tuple]:
    """(entry, metric, before, after, change, tolerance, status) for every entry x metric."""
    rows = []
    for er in report.entries:
        for r in er.metrics:
            m = METRICS[r.metric]
            status = r.status.upper() if r.status in ("regression", "error") else r.status
            if r.status == "regression" and er.remeasured:
                status += " (re-measured)"
            elif r.status in ("ok", "improved") and er.remeasured and r.first is not None:
                status += " (after re-measuring)"
            rows.append((er.entry.id, r.metric + (" ↑" if m.higher_is_better else " ↓"),
                         m.fmt(r.before), m.fmt(r.after), _fmt_change(r), f"{r.tolerance * 100:g}%", status))
    return rows


def markdown(report: Report) -> str:
    lines = [f"## structexport regress: {verdict(report)}", ""]
    lines.append(f"Baseline `{report.baseline}`, made on {_machine_line(report.baseline_machine)}; "
                 f"this run on {_machine_line(report.machine)}. Ratios measured in this run are "
                 "compared, never raw times (↑ higher is better, ↓ lower is better).")
    lines.append("")
    lines.append("| entry | metric | baseline | measured | change | tolerance | status |")
    lines.append("|---|---|---|---|---|---|---|")
    for row in table_rows(report):
        cells = [c.replace("|", "\\|") for c in row]
        if cells[-1].startswith(("REGRESSION", "ERROR")):
            cells[-1] = f"**{cells[-1]}**"
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for er in report.entries:
        if er.error:
            lines.append(f"- `{er.entry.id}`: {er.error}")
        if er.raw:
            lines.append(f"- `{er.entry.id}`: {raw_line(er)}")
    lines.append("")
    return "\n".join(lines)


def junit_xml(report: Report) -> str:
    """One testcase per entry x metric; failures carry before, after and tolerance."""
    cases = [(er, r) for er in report.entries for r in er.metrics]
    suite = ET.Element("testsuite", {
        "name": "structexport regress", "tests": str(len(cases)),
        "failures": str(sum(r.status == "regression" for _, r in cases)),
        "errors": str(sum(r.status == "error" for _, r in cases)),
        "skipped": str(sum(r.status == "skipped" for _, r in cases)),
        "time": f"{report.seconds:.3f}", "timestamp": _now()})
    props = ET.SubElement(suite, "properties")
    for name, value in (("baseline", str(report.baseline)), ("mode", report.mode),
                        ("machine", _machine_line(report.machine)),
                        ("baseline_machine", _machine_line(report.baseline_machine)),
                        ("tolerance", f"{report.tolerance * 100:g}%"), ("reference", ReferenceWorkload.ID)):
        ET.SubElement(props, "property", {"name": name, "value": value})
    for er, r in cases:
        m = METRICS[r.metric]
        case = ET.SubElement(suite, "testcase", {
            "classname": f"regress.{er.entry.id}", "name": r.metric,
            "time": f"{er.seconds / max(1, len(er.metrics)):.3f}"})
        detail = (f"entry: {er.entry.id}\nmetric: {r.metric} ({m.description}; "
                  f"{'higher' if m.higher_is_better else 'lower'} is better)\n"
                  f"before: {r.before}\nafter: {r.after}\ntolerance: {r.tolerance * 100:g}%\n"
                  f"change: {_fmt_change(r)}\nre-measured: {'yes' if er.remeasured else 'no'}\n")
        if r.first is not None:
            detail += f"first measurement: {r.first}\n"
        if er.raw:
            detail += f"raw times (this run, informational): {raw_line(er)}\n"
        if r.status == "regression":
            el = ET.SubElement(case, "failure", {"type": "regression", "message": r.describe()})
            el.text = detail
        elif r.status == "error":
            el = ET.SubElement(case, "error", {"type": "error", "message": r.note})
            el.text = detail
        elif r.status == "skipped":
            ET.SubElement(case, "skipped", {"message": r.note})
        else:
            ET.SubElement(case, "system-out").text = detail
    root = ET.Element("testsuites", {k: suite.get(k) for k in ("tests", "failures", "errors", "time")})
    root.set("name", "structexport regress")
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def report_json(report: Report) -> dict:
    return {
        "baseline": str(report.baseline), "mode": report.mode, "passed": not report.failed,
        "exit_code": report.exit_code, "seconds": round(report.seconds, 3), "machine": report.machine,
        "baseline_machine": report.baseline_machine, "tolerance": report.tolerance,
        "entries": [{"id": er.entry.id, "failed": er.failed, "remeasured": er.remeasured, "error": er.error,
                     "seconds": round(er.seconds, 3), "raw": er.raw,
                     "metrics": [{"metric": r.metric, "before": r.before, "after": r.after,
                                  "tolerance": r.tolerance, "status": r.status, "worse_by": r.worse_by,
                                  "first": r.first} for r in er.metrics]} for er in report.entries]}


def write_text_atomic(path: str | os.PathLike, text: str, append: bool = False) -> None:
    path = Path(path)
    try:
        if append:
            with open(path, "a", encoding="utf-8") as f:
                f.write(text)
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise RegressUsageError(f"cannot write {path} ({exc.strerror or exc})",
                                "check the folder exists and is writable") from None
