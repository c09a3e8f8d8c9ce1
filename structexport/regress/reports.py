"""What a :class:`~structexport.regress.judge.Report` looks like: table rows, the
verdict, the machine and class lines, Markdown, JUnit XML, JSON, and writing them.

Plain text only; the console rendering (rich) is the CLI's, built from these pieces.
"""
from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from typing import Mapping

from structexport.fsutil import write_text_atomic
from structexport.regress.baseline import METRICS, ClassResult, RegressUsageError, utc_now
from structexport.regress.judge import OTHER_CLASS, EntryResult, MetricResult, Report
from structexport.regress.measure import ReferenceWorkload


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def fmt_change(r: MetricResult) -> str:
    if r.worse_by is None:
        return ""
    if abs(r.worse_by) < 0.0005:
        return "0.0%"
    return f"{abs(r.worse_by) * 100:.1f}% {'worse' if r.worse_by > 0 else 'better'}"


def machine_line(m: dict | None) -> str:
    """A recorded machine (:func:`~structexport.regress.baseline.machine_info`) in one line."""
    if not m:
        return "unknown"
    return f"{m.get('cpu', '?')} ({m.get('arch', '?')}, {m.get('cores', '?')} cores), onnxruntime {m.get('onnxruntime', '?')}"


def class_line(cid: str, result: ClassResult | None = None) -> str:
    """A machine class id, with the machine that recorded it where the baseline says."""
    machine = result.machine if result is not None else None
    return f"{cid} (recorded on {machine_line(machine)})" if machine else cid


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
        text += "; re-measured"
    return text + f"; {er.seconds:.1f} s"


def verdict(report: Report) -> str:
    n = len(report.entries)
    if report.mode == "update":
        return f"baseline {report.baseline} updated ({_entries(n)})"
    failed = [e for e in report.entries if e.failed]
    if failed:
        return f"FAIL: {len(failed)} of {n} entries regressed ({', '.join(e.entry.id for e in failed)})"
    unjudged = len(report.other_class_entries)
    if not unjudged:
        return f"PASS: {_entries(n)} within tolerance"
    return (f"PASS: {_entries(n)} within tolerance; {unjudged} of {n} judged only on "
            "speedup_theoretical (no results for this machine's class)")


def class_notes(report: Report) -> list[tuple[str, str]]:
    """(entry id, note) on the machine class each entry was judged on or recorded for."""
    notes = []
    for er in report.entries:
        others = [c for c in er.recorded_classes if c != er.class_id]
        if report.mode == "update":
            text = f"recorded for machine class {er.class_id!r}"
            if others:
                text += f"; kept the results of {', '.join(map(repr, others))}"
        elif er.other_class:
            text = (f"no results for this machine's class {er.class_id!r} (recorded on "
                    f"{', '.join(map(repr, others)) or 'no class'}): its ratios are shown beside the "
                    "recorded ones, not judged (speedup_theoretical still is); add this class with "
                    f"`structexport regress --update --baseline {report.baseline}`")
        else:
            text = f"judged against machine class {er.class_id!r}"
        notes.append((er.entry.id, text))
    return notes


def header_lines(report: Report) -> list[str]:
    """The baseline's machine classes and this run's machine, one fact a line."""
    lines = [f"baseline {report.baseline}: " + (f"last updated on {machine_line(report.baseline_machine)}"
                                                 if report.baseline_machine else "new")]
    this = set(report.machine_classes)
    for cid, result in report.classes.items():
        lines.append(f"  machine class {class_line(cid, result)}" + ("  <- this machine's" if cid in this else ""))
    lines.append(f"this run: {machine_line(report.machine)}; machine class "
                 f"{'; '.join(report.machine_classes) or '-'}")
    return lines


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
            elif r.status == OTHER_CLASS:
                status += ", not judged"
            rows.append((er.entry.id, r.metric + (" ↑" if m.higher_is_better else " ↓"),
                         m.fmt(r.before), m.fmt(r.after), fmt_change(r), f"{r.tolerance * 100:g}%", status))
    return rows


def markdown(report: Report) -> str:
    lines = [f"## structexport regress: {verdict(report)}", ""]
    this = report.machine_classes
    lines.append(f"Baseline `{report.baseline}`, last updated on {machine_line(report.baseline_machine)}; "
                 f"this run on {machine_line(report.machine)}, machine class "
                 f"{', '.join(f'`{c}`' for c in this) or '-'}. Ratios measured in this run are compared, "
                 "never raw times (↑ higher is better, ↓ lower is better); the hardware-dependent ones only "
                 "with results recorded on this machine's class, `speedup_theoretical` (MAC counts) with "
                 "any class's.")
    lines.append("")
    if report.classes:
        lines.append("Machine classes in the baseline:")
        lines.append("")
        for cid, result in report.classes.items():
            machine = result.machine
            lines.append(f"- `{cid}`" + (f": {machine_line(machine)}" if machine else "")
                         + (" (this machine's)" if cid in this else ""))
        lines.append("")
    lines.append("| entry | metric | baseline | measured | change | tolerance | status |")
    lines.append("|---|---|---|---|---|---|---|")
    for row in table_rows(report):
        cells = [c.replace("|", "\\|") for c in row]
        if cells[-1].startswith(("REGRESSION", "ERROR")):
            cells[-1] = f"**{cells[-1]}**"
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    notes = dict(class_notes(report))
    for er in report.entries:
        lines.append(f"- `{er.entry.id}`: {notes[er.entry.id]}")
        if er.error:
            lines.append(f"- `{er.entry.id}`: {er.error}")
        if er.raw:
            lines.append(f"- `{er.entry.id}`: {raw_line(er)}")
    lines.append("")
    return "\n".join(lines)


def junit_xml(report: Report) -> str:
    """One testcase per entry x metric; failures carry before, after and tolerance; a
    metric not judged on this machine's class is skipped."""
    cases = [(er, r) for er in report.entries for r in er.metrics]
    suite = ET.Element("testsuite", {
        "name": "structexport regress", "tests": str(len(cases)),
        "failures": str(sum(r.status == "regression" for _, r in cases)),
        "errors": str(sum(r.status == "error" for _, r in cases)),
        "skipped": str(sum(r.status in ("skipped", OTHER_CLASS) for _, r in cases)),
        "time": f"{report.seconds:.3f}", "timestamp": utc_now()})
    props = ET.SubElement(suite, "properties")
    for name, value in (("baseline", str(report.baseline)), ("mode", report.mode),
                        ("machine", machine_line(report.machine)),
                        ("machine_class", "; ".join(report.machine_classes)),
                        ("baseline_machine", machine_line(report.baseline_machine)),
                        ("baseline_classes", "; ".join(report.classes)),
                        ("tolerance", f"{report.tolerance * 100:g}%"), ("reference", ReferenceWorkload.ID)):
        ET.SubElement(props, "property", {"name": name, "value": value})
    notes = dict(class_notes(report))
    for er, r in cases:
        m = METRICS[r.metric]
        case = ET.SubElement(suite, "testcase", {
            "classname": f"regress.{er.entry.id}", "name": r.metric,
            "time": f"{er.seconds / max(1, len(er.metrics)):.3f}"})
        detail = (f"entry: {er.entry.id}\nmetric: {r.metric} ({m.description}; "
                  f"{'higher' if m.higher_is_better else 'lower'} is better)\n"
                  f"machine class (this run): {er.class_id}\n"
                  f"baseline class: {r.baseline_class or 'none'}\n"
                  f"before: {r.before}\nafter: {r.after}\ntolerance: {r.tolerance * 100:g}%\n"
                  f"change: {fmt_change(r)}\nre-measured: {'yes' if er.remeasured else 'no'}\n"
                  f"class: {notes[er.entry.id]}\n")
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
        elif r.status in ("skipped", OTHER_CLASS):
            ET.SubElement(case, "skipped", {"message": r.describe()}).text = detail
        else:
            ET.SubElement(case, "system-out").text = detail
    return junit_document(suite)


def junit_document(suite: ET.Element) -> str:
    """One ``testsuite`` wrapped in ``testsuites`` (its totals copied up), as XML text."""
    root = ET.Element("testsuites", {k: suite.get(k) for k in ("tests", "failures", "errors", "time")})
    root.set("name", suite.get("name"))
    root.append(suite)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def report_json(report: Report) -> dict:
    return {
        "baseline": str(report.baseline), "mode": report.mode, "passed": not report.failed,
        "exit_code": report.exit_code, "seconds": round(report.seconds, 3), "machine": report.machine,
        "machine_classes": report.machine_classes, "baseline_machine": report.baseline_machine,
        "baseline_classes": {cid: {"machine_class": r.machine_class, "machine": r.machine}
                             for cid, r in report.classes.items()},
        "tolerance": report.tolerance, "strict": report.strict,
        "entries": [{"id": er.entry.id, "failed": er.failed, "remeasured": er.remeasured, "error": er.error,
                     "machine_class": er.machine_class, "class_id": er.class_id,
                     "judged_on_this_class": not er.other_class, "recorded_classes": er.recorded_classes,
                     "seconds": round(er.seconds, 3), "raw": er.raw,
                     "metrics": [{"metric": r.metric, "before": r.before, "after": r.after,
                                  "baseline_class": r.baseline_class, "tolerance": r.tolerance,
                                  "status": r.status, "worse_by": r.worse_by, "first": r.first,
                                  "note": r.note} for r in er.metrics]} for er in report.entries]}


# --------------------------------------------------------------------------- writing

def write_report_file(path: str | os.PathLike, text: str) -> None:
    """Write a report whole (atomically); a failure is a :class:`RegressUsageError`."""
    try:
        write_text_atomic(path, text)
    except OSError as exc:
        raise RegressUsageError(f"cannot write {path} ({exc.strerror or exc})",
                                "check the folder exists and is writable") from None


def append_report_file(path: str | os.PathLike, text: str) -> None:
    """Append to a file another program owns and reads afterwards ($GITHUB_STEP_SUMMARY)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as exc:
        raise RegressUsageError(f"cannot write {path} ({exc.strerror or exc})",
                                "check the folder exists and is writable") from None


def write_reports(report: Report, junit_file: str | None = None, markdown_file: str | None = None,
                  json_file: str | None = None, environ: Mapping[str, str] | None = None) -> None:
    """The report files a run asked for. Markdown without ``markdown_file`` is appended to
    ``$GITHUB_STEP_SUMMARY`` when that is set (GitHub Actions)."""
    environ = os.environ if environ is None else environ
    md = markdown(report)
    if markdown_file:
        write_report_file(markdown_file, md)
    elif environ.get("GITHUB_STEP_SUMMARY"):
        append_report_file(environ["GITHUB_STEP_SUMMARY"], md + "\n")
    if junit_file:
        write_report_file(junit_file, junit_xml(report))
    if json_file:
        write_report_file(json_file, json.dumps(report_json(report), indent=2) + "\n")
