"""``structexport profile``: a thin click command over :mod:`structexport.profile` and
:mod:`structexport.profiling.render`."""
from __future__ import annotations

import click
from rich.markup import escape
from rich.table import Table

from structexport.cli_common import (OptionRefusedError, check_measure_flags, device_options, err,
                                     fail_cleanly, given, out, trust_options)


@click.command()
@click.argument("path", required=False, type=click.Path(path_type=str))
@click.option("--arch", help="Zoo name; without PATH, weights are drawn from --seed.")
@click.option("--target", type=click.Choice(["ort-cpu", "tvm-llvm", "tvm-arm", "executorch", "litert"]),
              help="Runtime to profile on (default: the OUTDIR's target; ort-cpu for a "
              "checkpoint); tvm-arm only on a device (--rpc/--tracker); executorch and litert "
              "profile their programs (ETDump, LiteRT's C profiler).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1, 256))
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1, 4096))
@click.option("--input-shape", help="N,C,H,W (the batch is taken from --batch).")
@click.option("--repeat", default=50, show_default=True, type=click.IntRange(3, 100000),
              help="Interleaved runs of each model, timed and then profiled.")
@click.option("--warmup", default=5, show_default=True, type=click.IntRange(0, 10000))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--no-peak", is_flag=True, help="Do not measure the machine's GEMM peak.")
@device_options
@trust_options
@click.option("-o", "--output", "output", default="report.html", show_default=True,
              type=click.Path(dir_okay=False, path_type=str),
              help="HTML report; the Markdown and JSON reports are written beside it "
              "(same name, .md and .json).")
@click.pass_context
@fail_cleanly
def profile(ctx, path, arch, target, threads, batch, input_shape, repeat, warmup, seed, no_peak,
            rpc, tracker, key, rpc_timeout, trust_pickle, allow_torchscript, output):
    """Per-layer times of PATH (a converted OUTDIR or a checkpoint) or --arch NAME beside its
    dense reference, from the runtime's profiler: HTML report with plots, Markdown, JSON. An
    OUTDIR holds its own reference: its source checkpoint is not needed."""
    check_measure_flags(ctx, "profile", path, arch, trust_pickle, allow_torchscript)
    if given(ctx, "rpc_timeout") and not (rpc or tracker):
        raise OptionRefusedError("--rpc-timeout bounds an RPC session, and there is none without "
                                 "--rpc or --tracker", "add --rpc HOST:PORT or --tracker HOST:PORT "
                                 "--key KEY, or leave --rpc-timeout out")
    from structexport.profile import ProfileOptions, run_profile
    from structexport.profiling.render import summary_lines, table_rows, write_reports
    opts = ProfileOptions(target=target, threads=threads, batch=batch, input_shape=input_shape,
                          repeat=repeat, warmup=warmup, seed=seed, peak=not no_peak,
                          rpc=rpc, tracker=tracker, key=key, rpc_timeout=rpc_timeout,
                          trust_pickle=trust_pickle, allow_torchscript=allow_torchscript)
    with err.status("profile", spinner="dots") as status:
        report = run_profile(path, arch, opts, progress=lambda m: status.update(f"profile: {m}"))
        status.update("profile: render")
        paths = write_reports(report, output)
    head, body = table_rows(report)
    table = Table(title=f"per layer: {report['arch']} on {report['target']}", title_justify="left")
    for col in head:
        table.add_column(col, justify="left" if col == "layer" else "right")
    for cells in body:
        table.add_row(*map(escape, cells))
    out.print(table)
    for line in summary_lines(report):
        out.print(line, markup=False)
    out.print(f"wrote {paths['html']}, {paths['markdown']}, {paths['json']} "
              f"({report['seconds']:.0f} s)")
