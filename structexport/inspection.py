"""``structexport inspect``: what a checkpoint holds, layer by layer."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

import torch.nn as nn

from structexport.analysis import count_params, generator_info, layer_table
from structexport.layers import StructuredConv2d, structured_residual
from structexport.loader import load_checkpoint
from structexport.models import ARCHITECTURES, input_shape, parse_name


def _residual_structure(conv: nn.Conv2d, which: str) -> tuple[int, int] | None:
    """``(c, n)`` the zoo's struct variant would use for this dense conv, or None."""
    if conv.kernel_size != (3, 3):
        return None
    C = conv.in_channels // conv.groups
    return (max(1, C // 2) if which == "c2n2" else C), 2


def inspect_checkpoint(path: str, arch: str | None = None, trust_pickle: bool = False,
                       allow_torchscript: bool = False, residual_structure: str = "c2n2") -> dict:
    loaded = load_checkpoint(path, arch, trust_pickle=trust_pickle,
                             allow_torchscript=allow_torchscript)
    model, spec = loaded.model, parse_name(loaded.arch)
    shape = input_shape(spec)
    rows = layer_table(model, shape)
    stem = ARCHITECTURES[spec.base].stem
    modules = dict(model.named_modules())
    for row in rows:
        module = modules[row.name]
        if isinstance(module, StructuredConv2d) and module.mode == "dense":
            row.residual = module.decompose()[1]
        elif type(module) is nn.Conv2d and row.name != stem:
            density = float(module.weight.count_nonzero()) / module.weight.numel()
            if density < 0.999:  # e.g. weights pruned to a structured-sparse pattern
                row.structure = (row.structure + " " if row.structure else "") + f"density {density:.3f}"
            cn = _residual_structure(module, residual_structure)
            if cn:
                row.residual = structured_residual(module.weight, *cn)
                row.structure = (row.structure + " " if row.structure else "") + \
                    f"vs {cn[0]}x{cn[1]}x{cn[1]}"
    params, trainable = count_params(model)
    return {
        "checkpoint": {"path": loaded.path, "sha256": loaded.sha256, "format": loaded.source_format,
                       "wrapper_key": loaded.wrapper_key, "stored_dtypes": loaded.stored_dtypes,
                       "metadata": loaded.metadata},
        "arch": loaded.arch,
        "input_shape": list(shape),
        "notes": loaded.notes,
        "generator": generator_info(model),
        "layers": [r.to_dict() for r in rows],
        "totals": {"params": params, "trainable_params": trainable,
                   "layer_params": sum(r.params for r in rows),
                   "macs": sum(r.macs for r in rows), "sumpool_adds": sum(r.adds for r in rows),
                   "layers": len(rows),
                   "by_kind": {k: sum(1 for r in rows if r.kind == k)
                               for k in sorted({r.kind for r in rows})}},
    }


def render_inspection(report: dict, console: Console) -> None:
    ck = report["checkpoint"]
    console.print(f"[bold]{ck['path']}[/]  {ck['format']}"
                  + (f", state dict under {ck['wrapper_key']!r}" if ck["wrapper_key"] else "")
                  + f", stored {'/'.join(ck['stored_dtypes'])}, sha256 {ck['sha256'][:12]}")
    console.print(f"architecture [bold]{report['arch']}[/], input {report['input_shape']}")
    for note in report["notes"]:
        console.print(f"  - {note}")
    if report["generator"]:
        g = report["generator"]
        console.print(f"  CSG generator: slice {g['slice_shape']}, code size {g['code_size']}, "
                      f"{g['params']:,} weights, {g['mode']}")
    table = Table(show_lines=False)
    for col, kw in (("layer", {}), ("kind", {}), ("weight shape", {}), ("structure", {}),
                    ("params", {"justify": "right"}), ("MACs", {"justify": "right"}),
                    ("residual", {"justify": "right"})):
        table.add_column(col, **kw)
    for r in report["layers"]:
        table.add_row(r["name"], r["kind"], "x".join(map(str, r["weight_shape"])), r["structure"],
                      f"{r['params']:,}", f"{r['macs']:,}",
                      "" if r["residual"] is None else f"{r['residual']:.4f}")
    t = report["totals"]
    table.add_section()
    kinds = ", ".join(f"{n} {k}" for k, n in t["by_kind"].items())
    table.add_row(f"total ({t['layers']} layers: {kinds})", "", "", "",
                  f"{t['layer_params']:,}", f"{t['macs']:,}", "")
    console.print(table)
    console.print(f"params {t['params']:,} (trainable {t['trainable_params']:,}; the table counts "
                  f"conv and linear layers, the total adds norms and the shared generator), "
                  f"MACs {t['macs']:,}" + (f", sum-pool additions {t['sumpool_adds']:,}"
                                            if t["sumpool_adds"] else ""))
