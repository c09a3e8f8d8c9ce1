"""``structexport evaluate``: a thin click command over :mod:`structexport.evaluate`, and the
preprocessing options ``convert`` shares with it."""
from __future__ import annotations

from functools import wraps
from typing import NamedTuple

import click
from rich.markup import escape
from rich.table import Table

from structexport.cli_common import (LazyChoice, OptionRefusedError, check_source_flags, device_options,
                                     device_spec, err, fail_cleanly, given, out, source_kind, trust_options)


def _presets():
    from structexport.datasets import PRESETS
    return tuple(PRESETS)


def _floats(ctx, param, value):
    if value is None:
        return None
    try:
        values = tuple(float(v) for v in value.replace(" ", "").split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r}: give one number per channel, e.g. 0.485,0.456,0.406") from None
    return values


class PreprocessFlags(NamedTuple):
    """What the preprocessing options say: a preset (or None) and fields that override it."""
    preset: str | None
    changes: dict

    @property
    def given(self) -> bool:
        return self.preset is not None or any(v is not None for v in self.changes.values())

    def build(self, base=None):
        """The Preprocess they give on top of ``base`` (None when they give nothing and there
        is no base); a bad combination is a usage error (exit 2)."""
        from structexport.datasets import Preprocess
        start = Preprocess.preset(self.preset) if self.preset else base
        if start is None:
            if not self.given:
                return None
            start = Preprocess()
        try:
            return start.replace(**self.changes)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--preprocess/--scale/--mean/--std") from None


PREPROCESS_KEYS = {"pp_scale": "scale", "pp_mean": "mean", "pp_std": "std", "pp_layout": "layout",
                   "pp_resize": "resize", "pp_crop": "crop"}


def preprocess_options(fn):
    """--preprocess PRESET and --scale/--mean/--std/--layout/--resize/--crop, collapsed into
    one ``preprocess`` argument (a :class:`PreprocessFlags`)."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        preset = kwargs.pop("preprocess_preset")
        changes = {field: kwargs.pop(key) for key, field in PREPROCESS_KEYS.items()}
        if changes["layout"] is not None:
            changes["layout"] = changes["layout"].upper()
        kwargs["preprocess"] = PreprocessFlags(preset, changes)
        return fn(*args, **kwargs)
    for decorator in reversed([
        click.option("--preprocess", "preprocess_preset", type=LazyChoice(_presets),
                     help="Input preprocessing preset: cifar10 (scale 1/255, CIFAR-10 mean and std, "
                          "NCHW), imagenet (resize 256, centre crop 224, ImageNet mean and std), none "
                          "(float data that is the model's input already). The flags below override "
                          "its fields."),
        click.option("--scale", "pp_scale", type=float,
                     help="Multiplies integer pixels (uint8, image files) into floats (preset default 1/255)."),
        click.option("--mean", "pp_mean", callback=_floats, metavar="M0,M1,M2",
                     help="Per-channel mean subtracted after scaling."),
        click.option("--std", "pp_std", callback=_floats, metavar="S0,S1,S2",
                     help="Per-channel std divided by after the mean."),
        click.option("--layout", "pp_layout", type=click.Choice(["NCHW", "NHWC"], case_sensitive=False),
                     help="The model's input layout (default NCHW)."),
        click.option("--resize", "pp_resize", type=click.IntRange(1),
                     help="Resize the shorter image side to this many pixels (bilinear) first."),
        click.option("--crop", "pp_crop", type=click.IntRange(1),
                     help="Then a centred square crop of this size."),
    ]):
        wrapper = decorator(wrapper)
    return wrapper


@click.command()
@click.argument("path", type=click.Path(path_type=str))
@click.option("--data", required=True, type=click.Path(path_type=str),
              help="Labelled images: an .npz with images (uint8 N,H,W,C or float N,C,H,W) and labels, or "
                   "a folder with one subfolder of images per class (torchvision's ImageFolder layout).")
@preprocess_options
@click.option("--limit", type=click.IntRange(1), help="Evaluate the first N images only.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(1, 65536),
              help="Images preprocessed and run through the source model at once (artifacts run at "
                   "the batch they were exported with).")
@click.option("--artifact", "artifacts", multiple=True, metavar="FILE",
              help="Evaluate only this artifact (repeatable): model.onnx, model.optimized.onnx, "
                   "model.ort, model.so.")
@click.option("--no-source", is_flag=True, help="Leave the source model out (no agreement then).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 256),
              help="ONNX Runtime intra-op threads (deployed packages run with 1).")
@click.option("--arch", help="MODEL: zoo name of a checkpoint's architecture (as convert takes it).")
@click.option("--model", "model_spec", metavar="FILE.py:FUNC",
              help="MODEL (or a package's source): your own architecture for a state dict.")
@click.option("--input-shape", metavar="D0,D1,...", help="MODEL: fix its input shape, as convert does.")
@trust_options
@device_options
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=str),
              help="Also write the report as JSON here.")
@click.option("--markdown", "markdown_file", type=click.Path(dir_okay=False, path_type=str),
              help="Also write the table as Markdown here.")
@click.pass_context
@fail_cleanly
def evaluate(ctx, path, data, preprocess, limit, batch_size, artifacts, no_source, threads, arch,
             model_spec, input_shape, trust_pickle, allow_torchscript, rpc, tracker, key, rpc_timeout,
             json_file, markdown_file):
    """Top-1 and top-5 accuracy of PATH's source model and of every artifact its package ships
    that runs here (model.onnx, model.optimized.onnx, model.ort, a TVM model.so on this host or
    the --rpc/--tracker device), on the labelled images DATA; for each artifact its agreement
    with the source (the fraction of images with the same top-1 class) and the largest logit
    difference. PATH is a converted OUTDIR, or a model file (anything convert takes), which is
    converted for ort-cpu first.

    The preprocessing is the package's own (convert --preprocess) unless --preprocess or the
    flags override it. JSON keys: images, data {path, kind, form, images_in_data, classes, limit},
    preprocess, preprocess_from, model {path, kind, arch, target, precision, input_shape, source},
    num_classes, topk, source {runtime, top1, top5, correct_top1, correct_top5, seconds} or null
    with source_unavailable (why), artifacts.FILE {runtime, options, top1, top5, agreement,
    agreeing, max_logit_diff, disagreeing_images (the first 20), seconds}, skipped {FILE: why},
    machine, seconds. Accuracies and agreement are fractions (0-1)."""
    from pathlib import Path
    kind = source_kind(path, arch, model_spec)
    if kind == "package" or Path(path).is_dir():
        for flag, value in (("--arch", arch), ("--input-shape", input_shape)):
            if value:
                raise OptionRefusedError(f"{flag} is for a model file, converted first; {path} is a "
                                         "converted package, which records its own", f"leave {flag} out")
    else:
        check_source_flags(path, kind, arch, model_spec, trust_pickle, allow_torchscript)
    if given(ctx, "rpc_timeout") and not (rpc or tracker):
        raise OptionRefusedError("--rpc-timeout bounds an RPC session, and there is none without --rpc "
                                 "or --tracker", "add --rpc HOST:PORT or --tracker HOST:PORT --key KEY, "
                                 "or leave --rpc-timeout out")
    from structexport.evaluate import EvaluateOptions, markdown, notes, rows, runtimes, title
    from structexport.evaluate import evaluate as run_evaluate
    preset = preprocess.build() if preprocess.preset else None
    opts = EvaluateOptions(
        preprocess=preset, preprocess_changes={k: v for k, v in preprocess.changes.items() if v is not None},
        batch_size=batch_size, limit=limit, artifacts=list(artifacts) or None, source=not no_source,
        threads=threads, arch=arch, model_spec=model_spec, input_shape=input_shape,
        trust_pickle=trust_pickle, allow_torchscript=allow_torchscript,
        device=device_spec(rpc, tracker, key, rpc_timeout))
    with _Bar() as bar:
        report = run_evaluate(path, data, opts, progress=bar)
    if json_file:
        from structexport.fsutil import write_json_atomic
        write_json_atomic(json_file, report)
    if markdown_file:
        from structexport.fsutil import write_text_atomic
        write_text_atomic(markdown_file, markdown(report))
    head, body = rows(report, runtime=False)
    table = Table(title=title(report), title_justify="left")
    short = {"agreement %": "agree %", "max logit diff": "max diff", "seconds": "s"}   # fits 80 columns
    for col in head:
        table.add_column(short.get(col, col), justify="left" if col == "model" else "right", no_wrap=True)
    for cells in body:
        table.add_row(*map(escape, cells))
    out.print(table)
    if report["artifacts"] and report["source"]:
        out.print("agree: images with the source's top-1 class; max diff: largest logit difference "
                  "from the source", soft_wrap=True)
    for line in runtimes(report):
        out.print(f"  {escape(line)}", soft_wrap=True)
    for line in notes(report):
        out.print(f"[yellow]note:[/] {escape(line)}")
    if json_file or markdown_file:
        out.print("wrote " + ", ".join(p for p in (json_file, markdown_file) if p))


class _Bar:
    """evaluate's progress: a spinner with the stage, then one bar per model over the images."""

    def __enter__(self):
        from rich.progress import (BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)
        # the stage line is a spinner alone; each model's line a bar over the images
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 TextColumn("{task.fields[count]}"), TimeElapsedColumn(),
                                 TimeRemainingColumn(), console=err, transient=True,
                                 disable=not err.is_terminal)   # logs get the table, not bar frames
        self.progress.__enter__()
        self.stage_task = self.progress.add_task("evaluate", total=None, count="")
        self.tasks = {}
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    # structexport.evaluate.Progress
    def stage(self, message: str) -> None:
        self.progress.update(self.stage_task, description=f"evaluate: {escape(message)}")

    def start(self, labels, total: int) -> None:
        self.progress.update(self.stage_task, visible=False)
        width = max(len(label) for label in labels)
        self.total = total
        self.tasks = {label: self.progress.add_task(escape(label.ljust(width)), total=total,
                                                    count=f"0/{total:,} images") for label in labels}

    def advance(self, label: str, images: int) -> None:
        task = self.tasks[label]
        self.progress.advance(task, images)
        done = self.progress.tasks[task].completed
        self.progress.update(task, count=f"{int(done):,}/{self.total:,} images")
