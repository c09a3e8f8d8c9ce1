"""``structexport regress``: the thin CLI over :mod:`structexport.regress`.

Exit codes are regress's own, whatever the error: 0 pass, 1 regression, 2 usage or
environment error (one ``error:`` line). The rest of the CLI's per-error exit codes
(``fail_cleanly``) are deliberately not used here.

The command is organised by mode: :func:`_check_mode` and :func:`_update_mode` each turn
the options into a :class:`~structexport.regress.judge.Report`, and :func:`_finish` prints
and writes any report the same way.
"""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import click
from click.core import ParameterSource
from rich.markup import escape
from rich.table import Table

from structexport.cli_common import device_options, err, out, sumpool_choice, trust_options
from structexport.errors import StructExportError
from structexport.regress.baseline import DEFAULT_REPEAT, DEFAULT_WARMUP, EXIT_USAGE, RegressUsageError

# Options that describe a new entry: only with --update and --arch/--checkpoint.
_ENTRY_OPTIONS = ("target", "threads", "batch", "input_shape", "seed", "sumpool_realization", "autotune",
                  "repeat", "warmup")


def _parse_shape(text: str) -> list[int]:
    try:
        shape = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        shape = []
    if len(shape) != 4 or any(v <= 0 for v in shape):
        raise RegressUsageError(f"bad --input-shape {text!r}", "write N,C,H,W, e.g. --input-shape 1,3,32,32")
    return shape


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--baseline", "baseline", type=click.Path(path_type=str),
              help="The baseline JSON file (docs/regress.md describes its format).")
@click.option("--against", nargs=2, type=click.Path(path_type=str), metavar="BASE CANDIDATE",
              help="A/B mode, the one for CI: time CANDIDATE against BASE (each an OUTDIR or a "
              "checkpoint, converted alike) interleaved on this machine and judge the "
              "candidate/base latency ratio, whole model and per layer.")
@click.option("--tolerance", default="10%", show_default=True,
              help="How much worse a ratio may get before it is a regression: 10% or 0.1.")
@click.option("--update", is_flag=True, help="Record this machine's class instead of judging: with "
              "--arch/--checkpoint add that entry or replace its results for this class (creating the "
              "file); alone, re-measure every entry and replace its results for this class. Other "
              "machine classes' results are kept.")
@click.option("--strict", is_flag=True, help="An entry without results for this machine's class is an "
              "error (exit 2) instead of being measured and shown unjudged.")
@click.option("--arch", help="With --update: the zoo architecture of the entry to add (weights from --seed).")
@click.option("--checkpoint", type=click.Path(path_type=str),
              help="With --update: a checkpoint for the entry (stored relative to the baseline file).")
@click.option("--target", default="ort-cpu", show_default=True, help="With --update or --against: the entry's target.")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 256),
              help="With --update or --against: intra-op threads of the entry.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1, 4096),
              help="With --update or --against: the entry's batch size.")
@click.option("--input-shape", help="With --update or --against: N,C,H,W (default: the model's own).")
@click.option("--seed", default=0, show_default=True, type=int, help="With --update or --against: weight and input seed.")
@click.option("--sumpool-realization", type=sumpool_choice(),
              help="With --update or --against: force one sum-pool realization for the entry.")
@click.option("--autotune", is_flag=True, help="With --update or --against: the entry autotunes sum-pool realizations.")
@click.option("--repeat", default=DEFAULT_REPEAT, show_default=True, type=click.IntRange(3, 100000),
              help="With --update or --against: interleaved timed runs per measurement of the entry.")
@click.option("--warmup", default=DEFAULT_WARMUP, show_default=True, type=click.IntRange(0, 10000),
              help="With --update or --against: warm-up runs of the entry.")
@click.option("--layer-tolerance", default="30%", show_default=True,
              help="With --against: how much slower a layer may get (layers under --min-layer-share "
              "of the base's time are shown, not judged).")
@click.option("--min-layer-share", default="3%", show_default=True,
              help="With --against: the smallest share of the base's kernel time a judged layer has.")
@click.option("--no-per-layer", is_flag=True, help="With --against: judge the whole model only.")
@device_options
@trust_options
@click.option("--retries", default=1, show_default=True, type=click.IntRange(0, 5),
              help="Re-measure a failing entry this many times before calling it a regression.")
@click.option("--junit", "junit_file", type=click.Path(path_type=str),
              help="Write JUnit XML: one testcase per entry and metric.")
@click.option("--markdown", "markdown_file", type=click.Path(path_type=str),
              help="Write a Markdown summary (default when $GITHUB_STEP_SUMMARY is set: appended there).")
@click.option("--json", "json_file", type=click.Path(path_type=str), help="Write the results as JSON.")
@click.pass_context
def regress(ctx, **opts):
    """Re-measure the models in a baseline and compare their ratios (measured speedup,
    realization efficiency, latency vs a reference workload timed alongside) with the
    ones recorded on this machine's class (CPU model, ISA extensions, threads). Exit 0
    pass, 1 regression, 2 usage or environment error.

    \b
    structexport regress --baseline benchmarks/baselines/ci.json --junit r.xml --markdown r.md
    structexport regress --update --baseline b.json --arch resnet20-struct-c2n2 --target ort-cpu
    structexport regress --update --baseline b.json      # record this machine's class for every entry
    structexport regress --against base-outdir/ candidate.safetensors --junit r.xml
    structexport regress --against base-arm/ cand-arm/ --rpc 10.0.0.7:9090   # timed on the device
    """
    try:
        code = _regress(ctx, opts)
    except StructExportError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
        sys.exit(EXIT_USAGE)
    except OSError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))} (check the paths and permissions)")
        sys.exit(EXIT_USAGE)
    sys.exit(code)


def _regress(ctx, opts: dict) -> int:
    from structexport import regress as rg
    tolerance = rg.parse_tolerance(opts["tolerance"])
    if opts["autotune"] and opts["sumpool_realization"]:
        raise RegressUsageError(f"--autotune and --sumpool-realization {opts['sumpool_realization']} both "
                                "choose the sum-pool realizations: a forced one is never measured",
                                "pass one of them")
    if opts["against"]:
        return _against_mode(ctx, opts, tolerance)
    if not opts["baseline"]:
        raise RegressUsageError("nothing to check", "pass --baseline FILE, or --against BASE CANDIDATE")
    device_flags = [f"--{n.replace('_', '-')}" for n in ("rpc", "tracker", "key", "rpc_timeout") if _given(ctx, n)]
    if device_flags:
        raise RegressUsageError(f"{', '.join(device_flags)} time{'s' if len(device_flags) == 1 else ''} "
                                "--against on a device; baseline files judge this machine's class",
                                "use them with --against BASE CANDIDATE, or leave them out")
    if opts["update"] and _given(ctx, "retries"):
        raise RegressUsageError("--retries re-measures a failing check; --update records, it judges nothing",
                                "leave --retries out with --update")
    _check_flags(ctx, opts)
    baseline = Path(opts["baseline"])
    with _progress() as progress:
        if opts["update"]:
            report = _update_mode(baseline, _new_entry(baseline, opts), tolerance, progress)
        else:
            report = _check_mode(baseline, tolerance, opts["retries"], opts["strict"], progress)
    return _finish(report, opts)


def _given(ctx, name: str) -> bool:
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)


def _against_mode(ctx, opts: dict, tolerance: float) -> int:
    """A/B: the candidate against the base, interleaved on this machine."""
    from structexport.regress import parse_tolerance
    from structexport.regress.ab import DEFAULT_REPEAT as AB_REPEAT
    from structexport.regress.ab import DEFAULT_WARMUP as AB_WARMUP
    from structexport.regress.ab import ABOptions, run_ab
    clashing = [flag for flag, given in (("--baseline", opts["baseline"]), ("--update", opts["update"]),
                                         ("--strict", opts["strict"]), ("--arch", opts["arch"]),
                                         ("--checkpoint", opts["checkpoint"])) if given]
    if clashing:
        raise RegressUsageError(f"--against compares two builds; {', '.join(clashing)} "
                                f"{'is' if len(clashing) == 1 else 'are'} for baseline files",
                                "leave them out, or drop --against")
    for side, path in zip(("BASE", "CANDIDATE"), opts["against"]):
        if not Path(path).exists():
            raise RegressUsageError(f"{side} {path} does not exist", "pass an OUTDIR or a checkpoint file")
    if _given(ctx, "seed"):
        raise RegressUsageError("--seed draws the weights of an --arch entry; BASE and CANDIDATE have their "
                                "own (and are timed on the base's stored verification input)",
                                "leave --seed out with --against")
    from structexport.regress.ab import timed_target
    timed = timed_target(opts["against"][0], opts["against"][1],
                          ABOptions(target=opts["target"] if _given(ctx, "target") else None))
    layer_flags = [f"--{n.replace('_', '-')}" for n in ("layer_tolerance", "min_layer_share") if _given(ctx, n)]
    if layer_flags and timed != "ort-cpu":
        raise RegressUsageError(f"{', '.join(layer_flags)} judge{'s' if len(layer_flags) == 1 else ''} layers "
                                f"from ONNX Runtime's profiler; on {timed} the whole model is judged",
                                "leave them out, or compare on --target ort-cpu")
    from structexport.rpc import parse_device
    device = parse_device(opts["rpc"], opts["tracker"], opts["key"], opts["rpc_timeout"])
    if _given(ctx, "rpc_timeout") and device is None:
        raise RegressUsageError("--rpc-timeout bounds an RPC session, and there is none without --rpc or "
                                "--tracker", "add --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
    pass_options = {"threads": opts["threads"]}
    if opts["sumpool_realization"]:
        pass_options["sumpool_realization"] = opts["sumpool_realization"]
    if opts["autotune"]:
        pass_options["autotune"] = True
    ab = ABOptions(target=opts["target"] if _given(ctx, "target") else None, threads=opts["threads"],
                   batch=opts["batch"], input_shape=opts["input_shape"], seed=opts["seed"],
                   repeat=opts["repeat"] if _given(ctx, "repeat") else AB_REPEAT,
                   warmup=opts["warmup"] if _given(ctx, "warmup") else AB_WARMUP,
                   tolerance=tolerance, layer_tolerance=parse_tolerance(opts["layer_tolerance"]),
                   min_layer_share=parse_tolerance(opts["min_layer_share"]),
                   per_layer=not opts["no_per_layer"], retries=opts["retries"], pass_options=pass_options,
                   target_options={"device": device} if device is not None else {},
                   trust_pickle=opts["trust_pickle"], allow_torchscript=opts["allow_torchscript"])
    with _progress() as progress:
        report = run_ab(opts["against"][0], opts["against"][1], ab, progress)
    return _finish_ab(report, opts)


def _finish_ab(report, opts: dict) -> int:
    from structexport.regress import ab
    from structexport.regress import append_report_file, write_report_file
    print_ab_report(report)
    md = ab.markdown(report)
    if opts["markdown_file"]:
        write_report_file(opts["markdown_file"], md)
    elif os.environ.get("GITHUB_STEP_SUMMARY"):
        append_report_file(os.environ["GITHUB_STEP_SUMMARY"], md + "\n")
    if opts["junit_file"]:
        write_report_file(opts["junit_file"], ab.junit_xml(report))
    if opts["json_file"]:
        import json
        write_report_file(opts["json_file"], json.dumps(ab.report_json(report), indent=2) + "\n")
    return report.exit_code


def print_ab_report(report) -> None:
    from structexport.regress import ab
    out.print(f"base {escape(report.base)}, candidate {escape(report.candidate)}: {escape(report.arch)} on "
              f"{escape(report.target)}, input {report.input_shape}, {report.threads} thread(s), timed "
              f"interleaved on {escape(report.where)}")
    if not report.error:
        table = Table(title=f"candidate / base ({ab.STATISTIC} of the interleaved runs); layer tolerance "
                      f"{report.layer_tolerance * 100:g}% for layers of at least "
                      f"{report.min_layer_share * 100:g}% of the base's time", title_justify="left")
        for col in ("what", "base ms", "candidate ms", "ratio", "share", "tolerance", "status"):
            table.add_column(col, justify="left" if col in ("what", "status") else "right")
        for row in ab.rows(report):
            status = row[-1]
            style = ("bold red" if status.startswith("SLOWER") else "cyan" if status == "faster"
                     else "green" if status == "ok" else "yellow")
            table.add_row(*map(escape, row[:-1]), f"[{style}]{escape(status)}[/]")
        out.print(table)
        out.print(f"median ratio {report.median_ratio:.2f}x (informational)"
                  + ("; re-measured" if report.remeasured else ""))
    for note in report.notes:
        out.print(escape(note))
    colour = "bold red" if report.failed else "bold green"
    out.print(f"[{colour}]{escape(ab.verdict_line(report))}[/] ({report.seconds:.1f} s)")


def _check_flags(ctx, opts: dict) -> None:
    """Options that do not go together, refused before anything is read or measured."""
    given = [name for name in _ENTRY_OPTIONS if _given(ctx, name)]
    ab_only = [f"--{n.replace('_', '-')}" for n in ("layer_tolerance", "min_layer_share", "no_per_layer")
               if _given(ctx, n)]
    if ab_only:
        raise RegressUsageError(f"{', '.join(ab_only)} belong{'s' if len(ab_only) == 1 else ''} to --against",
                                "add --against BASE CANDIDATE, or leave them out")
    if (opts["arch"] or opts["checkpoint"]) and not opts["update"]:
        raise RegressUsageError("--arch and --checkpoint name an entry to record",
                                "add --update, or leave them out to check the baseline")
    if given and not (opts["arch"] or opts["checkpoint"]):
        flags = ", ".join("--" + g.replace("_", "-") for g in given)
        raise RegressUsageError(f"{flags} only describe{'s' if len(given) == 1 else ''} a new entry",
                                "pass with --update and --arch NAME or --checkpoint PATH")
    if opts["strict"] and opts["update"]:
        raise RegressUsageError("--strict judges a check; --update records this machine's class",
                                "leave out --strict with --update")


@contextlib.contextmanager
def _progress():
    """A progress callback: measuring steps on stderr, the current one in a status line."""
    with err.status("regress", spinner="dots") as status:
        def progress(message: str) -> None:
            if message.endswith(": measuring") or "re-measuring" in message:
                err.print(escape(message))
            status.update(f"regress: {escape(message)}")
        yield progress


def _new_entry(baseline: Path, opts: dict):
    """The entry --update --arch/--checkpoint describes, or None (--update alone)."""
    from structexport.regress import Entry
    if not (opts["arch"] or opts["checkpoint"]):
        return None
    ckpt = None
    if opts["checkpoint"]:
        if not Path(opts["checkpoint"]).is_file():
            raise RegressUsageError(f"checkpoint {opts['checkpoint']} not found", "pass an existing checkpoint file")
        ckpt = os.path.relpath(Path(opts["checkpoint"]).resolve(), baseline.resolve().parent)
    options = {"sumpool_realization": opts["sumpool_realization"]} if opts["sumpool_realization"] else {}
    if opts["autotune"]:
        options["autotune"] = True
    return Entry(arch=opts["arch"], checkpoint=ckpt, seed=opts["seed"], target=opts["target"],
                 threads=opts["threads"], batch=opts["batch"],
                 input_shape=_parse_shape(opts["input_shape"]) if opts["input_shape"] else None,
                 options=options, repeat=opts["repeat"], warmup=opts["warmup"])


def _check_mode(baseline: Path, tolerance: float, retries: int, strict: bool, progress):
    from structexport.regress import run_regress
    return run_regress(baseline, tolerance, retries=retries, progress=progress, strict=strict)


def _update_mode(baseline: Path, entry, tolerance: float, progress):
    from structexport.regress import update_baseline
    return update_baseline(baseline, entry, tolerance, progress=progress)


def _finish(report, opts: dict) -> int:
    """Print the report, write the report files asked for; the exit code."""
    from structexport.regress import write_reports
    print_report(report)
    write_reports(report, junit_file=opts["junit_file"], markdown_file=opts["markdown_file"],
                  json_file=opts["json_file"])
    return report.exit_code


_STYLE = {"ok": "green", "improved": "cyan", "recorded": "cyan", "skipped": "yellow", "other": "yellow"}


def print_report(report) -> None:
    """A report on the console: machines and classes, the table, notes, the verdict."""
    from structexport import regress as rg
    for line in rg.header_lines(report):
        out.print(escape(line))
    unjudged = report.other_class_entries
    if unjudged and report.mode == "check":
        out.print(f"  [yellow]{len(unjudged)} of {len(report.entries)} entr"
                  f"{'y has' if len(unjudged) == 1 else 'ies have'} no results for this machine's class: "
                  "measured and shown beside the recorded class's values, not judged (a ratio measured on "
                  "one CPU is no threshold for another); add this class with "
                  f"`structexport regress --update --baseline {escape(str(report.baseline))}`[/]")
    title = ("recorded for this machine's class (before: its previous results)" if report.mode == "update"
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
    notes = dict(rg.class_notes(report))
    for er in report.entries:
        out.print(f"{escape(er.entry.id)}: {escape(notes[er.entry.id])}")
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
    colour = "bold red" if report.failed else "bold green"
    out.print(f"[{colour}]{escape(rg.verdict(report))}[/] ({report.seconds:.1f} s)")
