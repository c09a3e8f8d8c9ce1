"""The ``structexport`` command: a thin layer over the importable API."""
from __future__ import annotations

import json
import sys
from functools import wraps

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from structexport import __version__
from structexport.errors import StructExportError

# Piped output (CI logs, files) gets a wide table instead of rich's 80-column default.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _fail_cleanly(fn):
    """Map the one user-facing error type to one line on stderr and its exit code."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except StructExportError as exc:
            err.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
            sys.exit(exc.exit_code)
    return wrapper


def _human(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", "-V", prog_name="structexport")
def main():
    """Export CNNs built from structured convolutions (structured convs, CSG, SSC) for edge
    deployment, and measure the speedup they really deliver."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
def doctor(as_json):
    """Versions of the toolchain, cross compiler and emulator, CPU model and SIMD features."""
    from structexport.doctor import collect
    info = collect()
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    table = Table(title=f"structexport {info['structexport']} (Python {info['python']})",
                  show_header=False)
    for name, ver in info["packages"].items():
        table.add_row(name, ver or "[red]not installed[/]")
    for name, ver in info["tools"].items():
        table.add_row(name, ver or "[yellow]not found[/]")
    cpu = info["cpu"]
    table.add_row("CPU", f"{cpu['model']} ({cpu['machine']}, {cpu['cores']} cores)")
    table.add_row("SIMD", " ".join(cpu["simd"]) or "none detected")
    out.print(table)


@main.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@_fail_cleanly
def zoo(name, as_json):
    """List the model zoo, or describe one model: params, MACs and input shape."""
    from structexport.analysis import summarize
    from structexport.models import ARCHITECTURES, build_model, input_shape, list_names, parse_name
    if not name:
        if as_json:
            click.echo(json.dumps(list_names(), indent=2))
            return
        table = Table(title="structexport zoo")
        table.add_column("name")
        table.add_column("input")
        table.add_column("description")
        for n in list_names():
            spec = parse_name(n)
            arch = ARCHITECTURES[spec.base]
            table.add_row(n, "x".join(map(str, arch.input_shape[1:])),
                          arch.description if spec.family == "dense" else f"  {spec.family} variant")
        out.print(table)
        out.print("Variants: -csg-S0xS1xSHxSW-K[-frozen], -bcsg-S0xS1xSHxSW-K, -ssc-T, "
                  "-struct-c2n2, -struct-c1n2")
        return
    spec = parse_name(name)
    summary = summarize(build_model(spec), input_shape(spec))
    info = {"name": spec.name, "family": spec.family, "params": summary["params"],
            "trainable_params": summary["trainable_params"], "macs": summary["macs"],
            "sumpool_adds": summary["sumpool_adds"], "input_shape": summary["input_shape"],
            "generator": summary["generator"]}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    table = Table(title=spec.name, show_header=False)
    for key in ("family", "params", "trainable_params", "macs", "sumpool_adds", "input_shape"):
        value = info[key]
        table.add_row(key, f"{value:,}" if isinstance(value, int) else str(value))
    if info["generator"]:
        table.add_row("generator", json.dumps(info["generator"]))
    out.print(table)


@main.command()
@click.argument("checkpoint", type=click.Path(dir_okay=True, path_type=str))
@click.option("--arch", help="Zoo name of the checkpoint's architecture (base name is enough; "
              "optional for structexport checkpoints).")
@click.option("--residual-structure", default="c2n2", show_default=True,
              type=click.Choice(["c2n2", "c1n2"]),
              help="Structure dense 3x3 weights are measured against (relative residual).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow arbitrary unpickling (runs code from the file: trusted files only).")
@click.option("--allow-torchscript", is_flag=True,
              help="Allow TorchScript archives (they carry code: trusted files only).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@_fail_cleanly
def inspect(checkpoint, arch, residual_structure, trust_pickle, allow_torchscript, as_json):
    """Load CHECKPOINT and show its layers: kind, shapes, structure, params, MACs."""
    from structexport.inspection import inspect_checkpoint, render_inspection
    report = inspect_checkpoint(checkpoint, arch, trust_pickle=trust_pickle,
                                allow_torchscript=allow_torchscript,
                                residual_structure=residual_structure)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        render_inspection(report, out)


if __name__ == "__main__":
    main()
