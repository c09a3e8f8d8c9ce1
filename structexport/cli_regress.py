"""``structexport regress``: the thin CLI over :mod:`structexport.regress`.

Exit codes are regress's own, whatever the error: 0 pass, 1 regression, 2 usage or
environment error (one ``error:`` line). The rest of the CLI's per-error exit codes
(``_fail_cleanly``) are deliberately not used here.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource
from rich.markup import escape
from rich.table import Table

from structexport.cli_common import err, out
from structexport.errors import StructExportError

# Options that describe a new entry: only with --update and --arch/--checkpoint.
_ENTRY_OPTIONS = ("target", "threads", "batch", "input_shape", "seed", "sumpool_realization", "autotune",
                  "repeat", "warmup")


def _usage(message: str, hint: str | None = None):
    from structexport.regress import RegressUsageError
    return RegressUsageError(message, hint)


def _parse_shape(text: str) -> list[int]:
    try:
        shape = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        shape = []
    if len(shape) != 4 or any(v <= 0 for v in shape):
        raise _usage(f"bad --input-shape {text!r}", "write N,C,H,W, e.g. --input-shape 1,3,32,32")
    return shape


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--baseline", "baseline", required=True, type=click.Path(path_type=str),
              help="The baseline JSON file (docs/regress.md describes its format).")
@click.option("--tolerance", default="10%", show_default=True,
              help="How much worse a ratio may get before it is a regression: 10% or 0.1.")
@click.option("--update", is_flag=True, help="Record instead of judging: with --arch/--checkpoint add or "
              "replace that entry (creating the file); alone, re-measure and rewrite every entry.")
@click.option("--arch", help="With --update: the zoo architecture of the entry to add (weights from --seed).")
@click.option("--checkpoint", type=click.Path(path_type=str),
              help="With --update: a checkpoint for the entry (stored relative to the baseline file).")
@click.option("--target", default="ort-cpu", show_default=True, help="With --update: the entry's target.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 256),
              help="With --update: intra-op threads of the entry.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1, 4096),
              help="With --update: the entry's batch size.")
@click.option("--input-shape", help="With --update: N,C,H,W (default: the model's own).")
@click.option("--seed", default=0, show_default=True, type=int, help="With --update: weight and input seed.")
@click.option("--sumpool-realization", type=click.Choice(["cumsum", "banded", "box", "avgpool3d"]),
              help="With --update: force one sum-pool realization for the entry.")
@click.option("--autotune", is_flag=True, help="With --update: the entry autotunes sum-pool realizations.")
@click.option("--repeat", default=500, show_default=True, type=click.IntRange(3, 100000),
              help="With --update: interleaved timed runs per measurement of the entry.")
@click.option("--warmup", default=30, show_default=True, type=click.IntRange(0, 10000),
              help="With --update: warm-up runs of the entry.")
@click.option("--retries", default=1, show_default=True, type=click.IntRange(0, 5),
              help="Re-measure a failing entry this many times before calling it a regression.")
@click.option("--junit", "junit_file", type=click.Path(path_type=str),
              help="Write JUnit XML: one testcase per entry and metric.")
@click.option("--markdown", "markdown_file", type=click.Path(path_type=str),
              help="Write a Markdown summary (default when $GITHUB_STEP_SUMMARY is set: appended there).")
@click.option("--json", "json_file", type=click.Path(path_type=str), help="Write the results as JSON.")
@click.pass_context
def regress(ctx, baseline, tolerance, update, arch, checkpoint, target, threads, batch, input_shape, seed,
            sumpool_realization, autotune, repeat, warmup, retries, junit_file, markdown_file, json_file):
    """Re-measure the models in a baseline and compare their ratios (measured speedup,
    realization efficiency, latency vs a reference workload timed alongside) with the
    recorded ones. Exit 0 pass, 1 regression, 2 usage or environment error.

    \b
    structexport regress --baseline benchmarks/baselines/ci.json --junit r.xml --markdown r.md
    structexport regress --update --baseline b.json --arch resnet20-struct-c2n2 --target ort-cpu
    structexport regress --update --baseline b.json      # re-measure and rewrite every entry
    """
    try:
        code = _regress(ctx, baseline, tolerance, update, arch, checkpoint, target, threads, batch,
                        input_shape, seed, sumpool_realization, autotune, repeat, warmup, retries,
                        junit_file, markdown_file, json_file)
    except StructExportError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
        sys.exit(2)
    except OSError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))} (check the paths and permissions)")
        sys.exit(2)
    sys.exit(code)


def _regress(ctx, baseline, tolerance, update, arch, checkpoint, target, threads, batch, input_shape, seed,
             sumpool_realization, autotune, repeat, warmup, retries, junit_file, markdown_file, json_file):
    from structexport import regress as rg
    tol = rg.parse_tolerance(tolerance)
    given = [name for name in _ENTRY_OPTIONS
             if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)]
    if (arch or checkpoint) and not update:
        raise _usage("--arch and --checkpoint name an entry to record",
                     "add --update, or leave them out to check the baseline")
    if given and not (arch or checkpoint):
        flags = ", ".join("--" + g.replace("_", "-") for g in given)
        raise _usage(f"{flags} only describe{'s' if len(given) == 1 else ''} a new entry",
                     "pass with --update and --arch NAME or --checkpoint PATH")
    baseline_path = Path(baseline)

    def progress(message: str) -> None:
        if message.endswith(": measuring") or "re-measuring" in message:
            err.print(escape(message))
        status.update(f"regress: {escape(message)}")

    with err.status("regress", spinner="dots") as status:
        if update:
            entry = None
            if arch or checkpoint:
                ckpt = None
                if checkpoint:
                    if not Path(checkpoint).is_file():
                        raise _usage(f"checkpoint {checkpoint} not found", "pass an existing checkpoint file")
                    ckpt = os.path.relpath(Path(checkpoint).resolve(), baseline_path.resolve().parent)
                options = {"sumpool_realization": sumpool_realization} if sumpool_realization else {}
                if autotune:
                    options["autotune"] = True
                entry = rg.Entry(arch=arch, checkpoint=ckpt, seed=seed, target=target, threads=threads,
                                 batch=batch, input_shape=_parse_shape(input_shape) if input_shape else None,
                                 options=options, repeat=repeat, warmup=warmup)
            report = rg.update_baseline(baseline_path, entry, tol, progress=progress)
        else:
            report = rg.run_regress(baseline_path, tol, retries=retries, progress=progress)

    _print_report(report)
    md = rg.markdown(report)
    if markdown_file:
        rg.write_text_atomic(markdown_file, md)
    elif os.environ.get("GITHUB_STEP_SUMMARY"):
        rg.write_text_atomic(os.environ["GITHUB_STEP_SUMMARY"], md + "\n", append=True)
    if junit_file:
        rg.write_text_atomic(junit_file, rg.junit_xml(report))
    if json_file:
        rg.write_text_atomic(json_file, json.dumps(rg.report_json(report), indent=2) + "\n")
    return report.exit_code


_STYLE = {"ok": "green", "improved": "cyan", "recorded": "cyan", "skipped": "yellow"}


def _print_report(report) -> None:
    from structexport import regress as rg
    this, then = report.machine, report.baseline_machine
    out.print(f"baseline {report.baseline}: " + (f"made on {rg._machine_line(then)}" if then else "new"))
    out.print(f"this run: {rg._machine_line(this)}"
              + ("" if report.same_machine or not then else
                 "  [yellow](another machine: judged by ratios measured in this run, never raw times)[/]"))
    title = ("recorded (before: the previous baseline)" if report.mode == "update"
             else f"before (baseline) / after (this run), tolerance {report.tolerance * 100:g}% unless the entry sets one")
    table = Table(title=title, title_justify="left")
    for col in ("entry", "metric", "baseline", "measured", "change", "tolerance", "status"):
        table.add_column(col, justify="left" if col in ("entry", "metric", "status") else "right")
    last = None
    for row in rg.table_rows(report):
        status = row[-1]
        key = status.split(" ")[0].lower()
        style = "bold red" if key in ("regression", "error") else _STYLE.get(key, "")
        table.add_row(escape(row[0]) if row[0] != last else "", *map(escape, row[1:-1]),
                      f"[{style}]{escape(status)}[/]" if style else escape(status))
        last = row[0]
    out.print(table)
    for er in report.entries:
        if er.error:
            out.print(f"[bold red]{escape(er.error)}[/]")
        if er.raw:
            out.print(f"{escape(er.entry.id)}: {escape(rg.raw_line(er))}")
        for r in er.metrics:
            if r.failed and r.status == "regression":
                out.print(f"  [red]regression:[/] {escape(r.describe())}")
    improved = [f"{er.entry.id} {r.metric}" for er in report.entries for r in er.metrics if r.status == "improved"]
    if improved and report.mode == "check":
        out.print(f"[cyan]improved beyond the tolerance:[/] {escape(', '.join(improved))} (record it with "
                  f"`structexport regress --update --baseline {escape(str(report.baseline))}`)")
    verdict = rg.verdict(report)
    colour = "bold red" if report.failed else "bold green"
    out.print(f"[{colour}]{escape(verdict)}[/] ({report.seconds:.1f} s)")
