"""``regress``: latency regression checks for CI, judged by ratios measured in one run.

A *baseline* file (JSON, see docs/regress.md) lists entries -- a zoo architecture or a
checkpoint, a target, threads, input shape and the bench options that matter -- each with
the ratios recorded per *machine class* (CPU model, ISA extensions, threads).
:func:`run_regress` re-measures every entry with :func:`structexport.bench.run_bench` and
compares ratios only, never raw times; the hardware-dependent ratios only with the results
of this machine's class, ``speedup_theoretical`` with any class's.

The package:

- :mod:`~structexport.regress.baseline`: the file format, :class:`Entry`,
  :class:`Baseline`, machine classes, loading, validation and saving;
- :mod:`~structexport.regress.measure`: :class:`ReferenceWorkload` and
  :func:`measure_entry`;
- :mod:`~structexport.regress.judge`: tolerances, judging, :func:`run_regress`,
  :func:`update_baseline`, :class:`Report`;
- :mod:`~structexport.regress.reports`: table rows, Markdown, JUnit XML, JSON.
"""
from structexport.regress.baseline import (CROSS_CLASS_METRICS, DEFAULT_REPEAT, DEFAULT_WARMUP,
                                           ENTRY_OPTIONS, EXIT_PASS, EXIT_REGRESSION, EXIT_USAGE, FORMAT,
                                           METRICS, PER_CLASS_METRICS, READABLE_VERSIONS, VERSION, Baseline,
                                           ClassResult, Entry, Metric, RegressUsageError, check_entry,
                                           class_id, class_of_machine, load_baseline, machine_info,
                                           resolve_checkpoint, save_baseline, sumpool_realizations,
                                           this_class, utc_now)
from structexport.regress.judge import (CODE_FAILURE_EXIT_CODES, DEFAULT_TOLERANCE, OTHER_CLASS, EntryResult,
                                        MetricResult, Report, better, judge_entry, judge_metric,
                                        judged_against, load_checked, measure_or_fail, missing_class_error,
                                        parse_tolerance, run_regress, tolerance_for, update_baseline, worse_by)
from structexport.regress.measure import (STATISTIC, Measure, Measurement, ReferenceWorkload, measure_entry,
                                          reference_for)
from structexport.regress.reports import (append_report_file, class_line, class_notes, fmt_change,
                                          header_lines, junit_xml, machine_line, markdown, raw_line,
                                          report_json, table_rows, verdict, write_report_file, write_reports)

__all__ = [
    "CROSS_CLASS_METRICS", "DEFAULT_REPEAT", "DEFAULT_WARMUP", "ENTRY_OPTIONS", "EXIT_PASS",
    "EXIT_REGRESSION", "EXIT_USAGE", "FORMAT", "METRICS", "PER_CLASS_METRICS", "READABLE_VERSIONS",
    "VERSION", "Baseline", "ClassResult", "Entry", "Metric", "RegressUsageError", "check_entry",
    "class_id", "class_of_machine", "load_baseline", "machine_info", "resolve_checkpoint",
    "save_baseline", "sumpool_realizations", "this_class", "utc_now",
    "CODE_FAILURE_EXIT_CODES", "DEFAULT_TOLERANCE", "OTHER_CLASS", "EntryResult", "MetricResult",
    "Report", "better", "judge_entry", "judge_metric", "judged_against", "load_checked",
    "measure_or_fail", "missing_class_error", "parse_tolerance", "run_regress", "tolerance_for",
    "update_baseline", "worse_by",
    "STATISTIC", "Measure", "Measurement", "ReferenceWorkload", "measure_entry", "reference_for",
    "append_report_file", "class_line", "class_notes", "fmt_change", "header_lines", "junit_xml",
    "machine_line", "markdown", "raw_line", "report_json", "table_rows", "verdict",
    "write_report_file", "write_reports",
]
