"""Judging: tolerances, one metric against its baseline value, a whole baseline
(:func:`run_regress`) and recording one (:func:`update_baseline`).

Ratios are compared, never raw times. The hardware-dependent ones
(:data:`~structexport.regress.baseline.PER_CLASS_METRICS`) are judged only against the
results recorded on this machine's class; ``speedup_theoretical`` (MAC counts) against any
class's. An entry with no results for this machine's class is still measured and shown
beside the other classes' values, status ``other class``, and never fails the run (with
``strict``: a usage error before anything is measured).

Each metric has a direction; only a change for the worse beyond the tolerance counts. A
failing entry is re-measured (``retries``) and a metric fails only if it fails every time.
Usage and environment errors raise :class:`RegressUsageError` (exit code 2).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from structexport.errors import StructExportError
from structexport.regress.baseline import (EXIT_PASS, EXIT_REGRESSION, METRICS, Baseline, ClassResult, Entry,
                                           RegressUsageError, check_entry, class_id, entry_error,
                                           load_baseline, machine_info, save_baseline, this_class, utc_now)
from structexport.regress.measure import Measure, Measurement, ReferenceWorkload, measure_entry

DEFAULT_TOLERANCE = 0.10
# Errors raised while measuring that mean the code under test broke (a pass, the export
# or the verification failed): the entry fails (exit 1). Every other error is a usage or
# environment error (exit 2).
CODE_FAILURE_EXIT_CODES = {30, 31, 32}
OTHER_CLASS = "other class"


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


# --------------------------------------------------------------------------- one metric

@dataclass
class MetricResult:
    metric: str
    before: float | None
    after: float | None
    tolerance: float
    status: str              # ok | improved | regression | skipped | error | recorded | other class
    worse_by: float | None = None   # relative change for the worse (negative: better)
    first: float | None = None      # the first measurement, when the entry was re-measured
    note: str = ""
    baseline_class: str | None = None   # the class whose recorded value ``before`` is

    @property
    def failed(self) -> bool:
        return self.status in ("regression", "error")

    def describe(self) -> str:
        m = METRICS[self.metric]
        if self.status == "error":
            return self.note
        if self.status == "skipped":
            return f"{self.metric} not compared: {self.note}"
        if self.status == OTHER_CLASS:
            return (f"{self.metric} {m.fmt(self.after)} here, {m.fmt(self.before)} recorded on another "
                    f"machine class: not judged ({self.note})")
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


def better(metric: str, a: float | None, b: float | None) -> float | None:
    """The better of two measurements of ``metric`` (either may be missing)."""
    if a is None or b is None:
        return a if b is None else b
    return max(a, b) if METRICS[metric].higher_is_better else min(a, b)


def tolerance_for(entry: Entry, metric: str, default: float) -> float:
    return float(entry.tolerance.get(metric, default))


# --------------------------------------------------------------------------- results

@dataclass
class EntryResult:
    entry: Entry
    metrics: list[MetricResult] = field(default_factory=list)
    measured: dict = field(default_factory=dict)
    raw: dict = field(default_factory=dict)
    seconds: float = 0.0
    remeasured: bool = False
    error: str | None = None
    class_id: str = ""                  # this run's machine class for the entry
    machine_class: dict = field(default_factory=dict)
    recorded_classes: list[str] = field(default_factory=list)   # the entry's classes in the baseline

    @property
    def failed(self) -> bool:
        return self.error is not None or any(m.failed for m in self.metrics)

    @property
    def other_class(self) -> bool:
        """No results for this machine's class: its per-class ratios were shown, not judged."""
        return self.class_id not in self.recorded_classes


@dataclass
class Report:
    baseline: Path
    mode: str                       # "check" | "update"
    entries: list[EntryResult]
    machine: dict                   # this machine (machine_info)
    baseline_machine: dict | None   # the machine of the baseline's latest --update
    tolerance: float
    seconds: float = 0.0
    # Every machine class with results in the baseline (after the update, in update mode):
    # class id -> the first entry's results for it (machine_class, the machine that recorded it).
    classes: dict[str, ClassResult] = field(default_factory=dict)
    strict: bool = False

    @property
    def failed(self) -> bool:
        return self.mode == "check" and any(e.failed for e in self.entries)

    @property
    def exit_code(self) -> int:
        return EXIT_REGRESSION if self.failed else EXIT_PASS

    @property
    def other_class_entries(self) -> list[EntryResult]:
        return [e for e in self.entries if e.other_class]

    @property
    def machine_classes(self) -> list[str]:
        """This run's classes (one per thread count of the entries), in order."""
        return list(dict.fromkeys(e.class_id for e in self.entries))


# --------------------------------------------------------------------------- judging an entry

def judged_against(entry: Entry, cid: str, metric: str) -> ClassResult | None:
    """The recorded results a metric of ``entry`` is compared with on class ``cid``: that
    class's for a per-class metric; for a cross-class one, that class's when it has a value,
    else the first class that has one. None: nothing to compare with."""
    own = entry.results.get(cid)
    if METRICS[metric].per_class:
        return own
    if own is not None and own.metrics.get(metric) is not None:
        return own
    return next((r for r in entry.results.values() if r.metrics.get(metric) is not None), own)


def judge_entry(entry: Entry, cid: str, first: Measurement, second: Measurement | None,
                tolerance: float) -> list[MetricResult]:
    """Every metric of one entry measured on class ``cid`` (``second``: a re-measurement,
    of which each metric keeps the better value)."""
    results = []
    for name, metric in METRICS.items():
        tol = tolerance_for(entry, name, tolerance)
        after, first_value = first.metrics.get(name), None
        if second is not None:
            first_value, after = after, better(name, after, second.metrics.get(name))
        source = judged_against(entry, cid, name)
        if source is None and metric.per_class and entry.results:
            other = next(iter(entry.results.values()))
            results.append(MetricResult(
                name, other.metrics.get(name), after, tol, OTHER_CLASS, baseline_class=other.id,
                note=f"recorded on {', '.join(map(repr, entry.results))}, not on this machine's class {cid!r}"))
            continue
        before = source.metrics.get(name) if source is not None else None
        reference = (source.measurement.get("reference") if source is not None else None)
        if name == "latency_vs_reference" and reference not in (None, ReferenceWorkload.ID):
            results.append(MetricResult(name, before, after, tol, "skipped", baseline_class=source.id,
                                        note=f"baseline used reference {reference!r}, "
                                             f"this run {ReferenceWorkload.ID!r}"))
            continue
        r = judge_metric(name, before, after, tol)
        r.baseline_class = source.id if source is not None else None
        if second is not None and first_value is not None and first_value != after:
            r.first = first_value
        results.append(r)
    return results


def measure_or_fail(baseline_path: Path, entry: Entry, measure: Measure,
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


def check_entry_judged(path: Path, entry: Entry, tolerance: float, retries: int, measure: Measure,
                       say: Callable[[str], None]) -> EntryResult:
    """Measure one entry (re-measuring a failure up to ``retries`` times) and judge it."""
    cls = this_class(entry.threads)
    cid = class_id(cls)
    where = dict(class_id=cid, machine_class=cls, recorded_classes=list(entry.results))
    say(f"{entry.id}: measuring")
    progress = lambda m, e=entry: say(f"{e.id}: {m}")  # noqa: E731
    first = measure_or_fail(path, entry, measure, progress)
    if isinstance(first, str):
        return EntryResult(entry, [MetricResult(n, None, None, tolerance, "error", note=first)
                                   for n in METRICS], error=first, **where)
    er = EntryResult(entry, judge_entry(entry, cid, first, None, tolerance), dict(first.metrics),
                     first.raw, first.seconds, **where)
    attempt = 0
    while er.failed and attempt < retries:
        attempt += 1
        failing = "; ".join(m.describe() for m in er.metrics if m.failed)
        say(f"{entry.id}: re-measuring once ({failing})")
        second = measure_or_fail(path, entry, measure, progress)
        if isinstance(second, str):
            er.error = second
            break
        er = EntryResult(entry, judge_entry(entry, cid, first, second, tolerance),
                         {n: better(n, first.metrics.get(n), second.metrics.get(n)) for n in METRICS},
                         second.raw, er.seconds + second.seconds, remeasured=True, **where)
        first = Measurement(er.measured, second.raw, er.seconds)
    return er


# --------------------------------------------------------------------------- a whole baseline

def load_checked(baseline_path: str | os.PathLike) -> Baseline:
    """Load a baseline to check and validate what can be without measuring: it has entries,
    each names a model, checkpoint and target that exist here and has recorded results."""
    baseline = load_baseline(baseline_path)
    path = baseline.path
    if not baseline.entries:
        raise RegressUsageError(f"baseline {path} has no entries",
                                f"add one with `structexport regress --update --baseline {path} "
                                "--arch NAME --target TARGET`")
    for i, entry in enumerate(baseline.entries):
        check_entry(path, entry, i)
        if not any(r.metrics for r in entry.results.values()):
            raise entry_error(path, f"entry {i} ({entry.id!r})", "has no recorded metrics",
                              f"record them with `structexport regress --update --baseline {path}`")
    return baseline


def missing_class_error(baseline: Baseline) -> RegressUsageError | None:
    """With ``--strict``: the error for entries without results for this machine's class."""
    missing = [(e, class_id(this_class(e.threads))) for e in baseline.entries]
    missing = [(e, cid) for e, cid in missing if cid not in e.results]
    if not missing:
        return None
    entry, cid = missing[0]
    more = f" and {len(missing) - 1} more entr{'y' if len(missing) == 2 else 'ies'}" if len(missing) > 1 else ""
    return RegressUsageError(
        f"--strict: baseline {baseline.path} has no results for this machine's class {cid!r} in entry "
        f"{entry.id!r}{more} (recorded on: {', '.join(map(repr, entry.results))})",
        f"record them with `structexport regress --update --baseline {baseline.path}`")


def run_regress(baseline_path: str | os.PathLike, tolerance: float = DEFAULT_TOLERANCE, retries: int = 1,
                progress: Callable[[str], None] | None = None, measure: Measure | None = None,
                strict: bool = False) -> Report:
    """Re-measure every entry of the baseline and judge its ratios (nothing is written).
    ``measure`` defaults to :func:`~structexport.regress.measure.measure_entry`; ``strict``:
    an entry without results for this machine's class is a usage error (raised before
    anything is measured) instead of being shown unjudged."""
    say = progress or (lambda _m: None)
    measure = measure or measure_entry
    start = time.perf_counter()
    baseline = load_checked(baseline_path)
    if strict and (error := missing_class_error(baseline)) is not None:
        raise error
    results = [check_entry_judged(baseline.path, e, tolerance, retries, measure, say) for e in baseline.entries]
    return Report(baseline.path, "check", results, machine_info(), baseline.machine, tolerance,
                  time.perf_counter() - start, baseline.classes(), strict)


def _matching(baseline: Baseline, entry: Entry) -> Entry | None:
    return next((e for e in baseline.entries if e.same_measurement(entry) or e.id == entry.id), None)


def update_baseline(baseline_path: str | os.PathLike, new_entry: Entry | None = None,
                    tolerance: float = DEFAULT_TOLERANCE, progress: Callable[[str], None] | None = None,
                    measure: Measure | None = None) -> Report:
    """Record this machine's class results. ``new_entry``: measure it and add it, or, where
    an entry measures the same thing, replace that entry's results for this class (its
    other classes' results kept); creates the file if needed. Without: re-measure every
    entry and replace its results for this class, keeping the other classes'. The file is
    written (as version 2) atomically, only once every measurement succeeded."""
    say = progress or (lambda _m: None)
    measure = measure or measure_entry
    start = time.perf_counter()
    path = Path(baseline_path)
    if new_entry is not None and not path.exists():
        baseline = Baseline(path, created=utc_now())
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
        cls = this_class(entry.threads)
        cid = class_id(cls)
        say(f"{entry.id}: measuring")
        m = measure_or_fail(path, entry, measure, lambda msg, e=entry: say(f"{e.id}: {msg}"))
        if isinstance(m, str):
            raise RegressUsageError(f"cannot record {entry.id!r}: {m}",
                                    "fix the model or the entry; the baseline was left as it was")
        recorded = ClassResult(cls, {k: (round(v, 6) if v is not None else None) for k, v in m.metrics.items()},
                               m.raw, utc_now())
        old = _matching(baseline, entry) if new_entry is not None else entry
        if old is not None and old.same_measurement(entry):
            # The same measurement: this class's results replaced, the other classes' kept.
            base = Entry(**{**vars(entry), "id": old.id, "results": dict(old.results),
                            "tolerance": dict(entry.tolerance or old.tolerance)})
        else:
            base = entry   # new, or an id reused for another measurement (old results dropped)
        updated = base.with_result(recorded)
        if old is not None:
            baseline.entries[baseline.entries.index(old)] = updated
        else:
            baseline.entries.append(updated)
        before = old.results[cid].metrics if old is not None and cid in old.results and old.same_measurement(entry) \
            else {}
        er = EntryResult(updated, [], dict(recorded.metrics), m.raw, m.seconds, class_id=cid,
                         machine_class=cls, recorded_classes=list(updated.results))
        for n in METRICS:
            r = MetricResult(n, before.get(n), recorded.metrics.get(n), tolerance_for(updated, n, tolerance),
                             "recorded", baseline_class=cid if n in before else None)
            if r.before is not None and r.after is not None:
                r.worse_by = worse_by(n, r.before, r.after)
            er.metrics.append(r)
        results.append(er)
    old_machine = baseline.machine
    baseline.machine = machine_info()
    baseline.reference = ReferenceWorkload.info()
    baseline.updated = utc_now()
    baseline.created = baseline.created or baseline.updated
    save_baseline(baseline)
    return Report(path, "update", results, baseline.machine, old_machine, tolerance,
                  time.perf_counter() - start, baseline.classes())
