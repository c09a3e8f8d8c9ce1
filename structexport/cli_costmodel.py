"""``structexport costmodel ...``: the layer cost model of this CPU (:mod:`structexport.layer_cost`).

``show`` prints the model conversions on this machine use and where it comes from; ``fit``
measures this CPU (:mod:`structexport.cost_fit`) and stores a model that every later
conversion on a machine with this CPU model uses. Exit codes: 0 success; 2 a bad option or
an unreadable model file.
"""
from __future__ import annotations

import json

import click
from rich.markup import escape

from structexport.cli_common import err, fail_cleanly, out


@click.group()
def costmodel():
    """The layer cost model that chooses each structured layer's form (and dense or not)."""


def _describe(model) -> dict:
    return {**model.to_dict(), "path": model.path, "note": model.note}


@costmodel.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print the model as JSON.")
@fail_cleanly
def show(as_json):
    """The cost model conversions on this machine use, and where it comes from."""
    from structexport.layer_cost import load_cost_model
    model = load_cost_model()
    if as_json:
        out.print_json(json.dumps(_describe(model)))
        return
    out.print(f"cost model of {escape(model.cpu)} ({', '.join(model.isa) or 'no SIMD flags'}, "
              f"{model.threads} thread(s))")
    out.print(f"  from: {escape(model.path or '?')}")
    out.print(f"  source: {escape(model.source)}")
    for k, v in model.coefficients.items():
        out.print(f"  {k:>14}: {v:.6g} ns")
    if model.fit:
        out.print(f"  fit: median error {model.fit.get('median_relative_error', 0):.1%}, "
                  f"{model.fit.get('choices_within_tolerance')}/{model.fit.get('layers')} layers "
                  "choose a form within 10% of the fastest measured")
    if model.note:
        err.print(f"note: {escape(model.note)}")


@costmodel.command("fit")
@click.option("--quick", is_flag=True, help="Three layer shapes instead of the full grid (a "
              "look, not a model to keep: write it with --out).")
@click.option("--repeat", type=click.IntRange(3, 1000), default=30, show_default=True,
              help="Interleaved runs per form and layer (medians are fitted).")
@click.option("--threads", type=click.IntRange(1, 256), default=1, show_default=True,
              help="ONNX Runtime intra-op threads while measuring.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False), default=None,
              help="Write the model here instead of this CPU's place in the cache.")
@click.option("--json", "as_json", is_flag=True, help="Print the fitted model and its fit as JSON.")
@fail_cleanly
def fit(quick, repeat, threads, out_path, as_json):
    """Measure every form of a grid of layer shapes under ONNX Runtime on this CPU, fit the
    cost model's coefficients to them and store it for this CPU model."""
    from structexport import cost_fit
    from structexport.errors import StructExportError
    from structexport.layer_cost import fitted_path
    if quick and out_path is None:
        raise click.UsageError("--quick measures three layer shapes, too few for the model "
                               "conversions use: pass --out PATH to write it elsewhere")
    grid = cost_fit.QUICK_GRID if quick else cost_fit.GRID
    err.print(f"measuring {len(grid)} layer shapes x 6 forms under ONNX Runtime, {threads} thread(s)")
    rows = cost_fit.measure_grid(grid, threads, repeat, progress=lambda m: err.print(f"  {escape(m)}"))
    model = cost_fit.fit_model(rows, threads)
    if model.fit["median_relative_error"] > 0.5:
        raise StructExportError(f"the fit predicts the measurements poorly (median error "
                                f"{model.fit['median_relative_error']:.0%}): the machine was probably "
                                "busy; nothing was written", "run it again on an idle machine, "
                                "or with a larger --repeat")
    path = model.save(out_path or fitted_path())
    model.path = str(path)
    if as_json:
        out.print_json(json.dumps({**_describe(model), "measurements": rows}))
        return
    f = model.fit
    out.print(f"wrote {escape(str(path))}")
    out.print(f"  median error {f['median_relative_error']:.1%}, worst {f['max_relative_error']:.1%}; "
              f"{f['choices_within_tolerance']}/{f['layers']} layers: the predicted fastest form is "
              f"within {f['tolerance']:.0%} of the measured fastest")
    for row in f["per_layer"]:
        if row["predicted_fastest"] != row["measured_fastest"]:
            out.print(f"  {escape(row['layer'])}: predicted {row['predicted_fastest']}, measured "
                      f"{row['measured_fastest']} ({row['lost']:+.0%})")
