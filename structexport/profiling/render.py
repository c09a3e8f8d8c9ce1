"""The report rendered: terminal lines and table rows, Markdown, and a self-contained HTML
page with three matplotlib plots; :func:`write_reports` writes HTML, Markdown and JSON."""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from structexport.profiling.assemble import OUTSIDE, UNMAPPED
from structexport.profiling.options import ProfileError

FIGURES = {
    "fig-time": "Time per layer, dense vs structured",
    "fig-speedup": "Measured vs theoretical speedup per layer",
    "fig-throughput": "Achieved GMAC/s per layer against the machine's measured peak",
}


def _fmt(v, spec=".3f", none="") -> str:
    if v is None:
        return none
    return format(v, spec)


def table_rows(report: dict) -> tuple[list[str], list[list[str]]]:
    """The per-layer table as strings, shared by Markdown, HTML and the terminal."""
    int8 = is_int8(report)
    head = ["layer", "structured ms", "dense ms", "share (struct)", "MACs (struct)",
            "MACs (dense)", "GMAC/s (struct)", "GMAC/s (dense)", "measured", "theoretical",
            "efficiency"] + (["SQNR dB (min)"] if int8 else [])
    body = []
    for r in report["layers"]:
        body.append([r["layer"], _fmt(r["structured_ms"]), _fmt(r["dense_ms"]),
                     _fmt(r["structured_share"] * 100 if r["structured_share"] is not None else None, ".1f") + "%",
                     f"{r['structured_macs']:,}", f"{r['dense_macs']:,}",
                     _fmt(r["structured_gmacs"], ".2f"), _fmt(r["dense_gmacs"], ".2f"),
                     _fmt(r["speedup_measured"], ".2f", "") + ("x" if r["speedup_measured"] else ""),
                     _fmt(r["speedup_theoretical"], ".2f", "") + ("x" if r["speedup_theoretical"] else ""),
                     _fmt(r["efficiency"], ".2f")]
                    + ([_fmt(r.get("sqnr_db"), ".2f")] if int8 else []))
    return head, body


def is_int8(report: dict) -> bool:
    """A profile of an INT8 package (its dense side the dense INT8 baseline, SQNR per layer)."""
    return report.get("precision") == "int8"


def int8_lines(report: dict) -> list[str]:
    """What an INT8 report says beside the latency: its dense side and its weakest layers."""
    if not is_int8(report):
        return []
    info = report.get("int8") or {}
    dense = report.get("dense") or {}
    programs = report.get("programs") or {}
    structured = programs.get("structured") or "model.onnx"
    dense_file = programs.get("dense") or dense.get("onnx")
    lines = [f"INT8 package: structured INT8 ({structured}) against dense INT8: {dense_file}, "
             f"{dense.get('description')}"]
    low = info.get("lowest_sqnr") or []
    if low:
        lines.append(f"lowest SQNR ({len(low)} weakest layers; INT8 against float32 on the "
                     "calibration images, errors of earlier layers included): " + ", ".join(f"{x['layer']} {x['sqnr_db']:.2f} dB" for x in low))
    return lines


def summary_lines(report: dict) -> list[str]:
    t = report["totals"]
    s, d = t["structured"], t["dense"]
    peak = report["peak"]
    lines = [
        f"{report['arch']} on {report['target']} ({report['device']}), input "
        f"{'x'.join(map(str, report['input_shape']))}, {report['threads']} thread(s), "
        f"{report['repeat']} interleaved runs",
        f"runtime: {report['runtime']}; profiler: {report['profiler']}",
        f"latency (profiler off, median): structured {s['latency_ms']['median']:.3f} ms, dense "
        f"{d['latency_ms']['median']:.3f} ms; speedup measured {report['speedup_measured']:.2f}x, "
        f"theoretical {_fmt(report['speedup_theoretical'], '.2f', 'n/a')}x, efficiency "
        f"{_fmt(report['efficiency'], '.2f', 'n/a')}",
        (f"profiled run (profiler on, mean of the {s['runs_kept']} fastest): structured "
         if report["device"] == "this host" else
         "whole run on the device (median) vs its PrimFunc calls timed one by one: structured ")
        + f"{s['profiled_ms']:.3f} ms = kernels {s['kernels_ms']:.3f} + outside kernels "
        f"{s['outside_ms']:.3f} ms (unmapped kernels {s['unmapped_ms']:.3f} ms); dense "
        f"{d['profiled_ms']:.3f} ms = {d['kernels_ms']:.3f} + {d['outside_ms']:.3f} ms "
        f"(unmapped {d['unmapped_ms']:.3f} ms)",
        f"MACs: structured {s['macs']:,}, dense {d['macs']:,}",
    ] + int8_lines(report)
    if s.get("artifact_latency_ms"):
        lines.append(f"model.so itself (profiler off, median): {s['artifact_latency_ms']['median']:.3f} ms")
    if peak:
        lines.append(f"machine peak ({peak['label']}): {peak['gmacs']:.1f} GMAC/s, {peak['method']}")
    cpu = report["machine"].get("cpu", {})
    lines.append(f"machine: {cpu.get('model', '?')} ({cpu.get('machine', '?')}, {cpu.get('cores', '?')} "
                 f"cores, {' '.join(cpu.get('simd', []))}); onnxruntime {report['machine'].get('onnxruntime')}"
                 + (f", TVM {report['machine']['tvm']}" if report["machine"].get("tvm") else "")
                 + f", torch {report['machine'].get('torch')}")
    lines += [f"note: {n}" for n in report.get("notes", [])]
    return lines


def render_markdown(report: dict) -> str:
    head, body = table_rows(report)
    out = [f"# Profile: {report['arch']} on {report['target']}", ""]
    out += [f"- {line}" for line in summary_lines(report)]
    out += ["", "## Per layer", "", "| " + " | ".join(head) + " |",
            "|" + "---|" * len(head)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
    out += ["", f"`{UNMAPPED}`: kernels no source layer was found for; by operator: "
            + "; ".join(f"{w}: " + (", ".join(f"{op} {ms:.3f} ms" for op, ms in ops.items()) or "none")
                        for w, ops in report["mapping"]["unmapped_ms_by_op"].items()) + ".",
            f"`{OUTSIDE}`: {report['mapping']['outside']}.",
            "", f"Plots: {', '.join(FIGURES.values())} (in the HTML report).",
            f"Created {report['created']}; command: `{report['machine'].get('command', '')}`.", ""]
    return "\n".join(out)


def _plots(report: dict) -> dict[str, str]:
    """The three plots as base64 PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = report["layers"]
    names = [r["layer"] for r in rows]
    y = np.arange(len(rows))
    height = max(3.0, 0.28 * len(rows) + 1.2)
    figs = {}

    def png(fig) -> str:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=96)
        plt.close(fig)
        return base64.b64encode(buf.getvalue()).decode("ascii")

    fig, ax = plt.subplots(figsize=(9, height))
    ax.barh(y - 0.2, [r["dense_ms"] for r in rows], 0.4, label="dense", color="#9aa5b1")
    ax.barh(y + 0.2, [r["structured_ms"] for r in rows], 0.4, label="structured", color="#2f6fb0")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per run (profiled)")
    ax.set_title(FIGURES["fig-time"])
    ax.legend()
    figs["fig-time"] = png(fig)

    layer_rows = [r for r in rows if r["kind"] == "layer"]
    ly = np.arange(len(layer_rows))
    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.28 * len(layer_rows) + 1.2)))
    ax.barh(ly - 0.2, [r["speedup_theoretical"] or 0 for r in layer_rows], 0.4,
            label="theoretical (dense MACs / structured MACs)", color="#f0b44c")
    ax.barh(ly + 0.2, [r["speedup_measured"] or 0 for r in layer_rows], 0.4,
            label="measured (dense ms / structured ms)", color="#2f6fb0")
    ax.axvline(1.0, color="black", lw=0.8, ls="--")
    ax.set_yticks(ly, [r["layer"] for r in layer_rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over the dense counterpart (x)")
    ax.set_title(FIGURES["fig-speedup"])
    ax.legend(fontsize=8)
    figs["fig-speedup"] = png(fig)

    fig, ax = plt.subplots(figsize=(9, max(3.0, 0.28 * len(layer_rows) + 1.2)))
    ax.barh(ly - 0.2, [r["dense_gmacs"] or 0 for r in layer_rows], 0.4, label="dense", color="#9aa5b1")
    ax.barh(ly + 0.2, [r["structured_gmacs"] or 0 for r in layer_rows], 0.4, label="structured",
            color="#2f6fb0")
    peak = report.get("peak")
    if peak:
        ax.axvline(peak["gmacs"], color="#c0392b", lw=1.5,
                   label=f"machine peak, measured: {peak['gmacs']:.1f} GMAC/s")
    ax.set_yticks(ly, [r["layer"] for r in layer_rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("achieved GMAC/s (layer MACs / layer time)")
    ax.set_title(FIGURES["fig-throughput"])
    ax.legend(fontsize=8)
    figs["fig-throughput"] = png(fig)
    return figs


_CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#1d232a;background:#fff}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}table{border-collapse:collapse;font-size:12px}
td,th{border:1px solid #d0d7de;padding:3px 7px;text-align:right}td:first-child,th:first-child{text-align:left}
tr.unmapped td,tr.outside td{color:#6a737d;font-style:italic}figure{margin:18px 0}
figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#444}
ul.summary li{margin:3px 0;font-size:13px}code{background:#f3f4f6;padding:1px 3px}"""

_SCRIPT = """window.addEventListener('load', function () {
  var ok = 0;
  document.querySelectorAll('figure img').forEach(function (img) {
    img.setAttribute('data-natural-width', String(img.naturalWidth));
    if (img.complete && img.naturalWidth > 0) ok += 1;
  });
  document.body.setAttribute('data-plots-decoded', String(ok));
});"""


def render_html(report: dict) -> str:
    """A self-contained page: summary, the three plots (inline PNG), the per-layer table."""
    esc = html.escape
    head, body = table_rows(report)
    figs = _plots(report)
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>structexport profile: {esc(report['arch'])} on {esc(report['target'])}</title>",
             f"<style>{_CSS}</style></head>",
             f'<body data-plots="{len(figs)}">',
             f"<h1>Profile: {esc(report['arch'])} on {esc(report['target'])}</h1>",
             '<ul class="summary">' + "".join(f"<li>{esc(line)}</li>" for line in summary_lines(report))
             + "</ul>"]
    for fig_id, caption in FIGURES.items():
        parts.append(f'<figure id="{fig_id}"><img alt="{esc(caption)}" '
                     f'src="data:image/png;base64,{figs[fig_id]}"><figcaption>{esc(caption)}'
                     "</figcaption></figure>")
    parts.append("<h2>Per layer</h2><table><thead><tr>"
                 + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>")
    for r, cells in zip(report["layers"], body):
        ops = "; ".join(f"{w}: " + ", ".join(f"{op} {ms:.3f} ms" for op, ms in r.get(f"{w}_ops", {}).items())
                        for w in ("structured", "dense"))
        parts.append(f'<tr class="{r["kind"]}" title="{esc(ops)}">'
                     + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    parts.append("</tbody></table>")
    unm = report["mapping"]["unmapped_ms_by_op"]
    parts.append(f"<p><code>{esc(UNMAPPED)}</code>: kernels no source layer was found for: "
                 + esc("; ".join(f"{w}: " + (", ".join(f"{op} {ms:.3f} ms" for op, ms in ops.items())
                                               or "none") for w, ops in unm.items()))
                 + f". <code>{esc(OUTSIDE)}</code>: {esc(report['mapping']['outside'])}. "
                 f"Mapping: {esc(report['mapping']['rule'])}.</p>")
    parts.append(f"<p>Created {esc(report['created'])}; command: <code>"
                 f"{esc(report['machine'].get('command', ''))}</code>. Schema {esc(report['schema'])}.</p>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(parts)


def write_reports(report: dict, html_path: str | Path) -> dict[str, Path]:
    """Write ``html_path`` and, beside it, the same name with ``.md`` and ``.json``."""
    html_path = Path(html_path)
    if html_path.suffix.lower() not in (".html", ".htm"):
        html_path = html_path.with_name(html_path.name + ".html")
    try:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        paths = {"html": html_path, "markdown": html_path.with_suffix(".md"),
                 "json": html_path.with_suffix(".json")}
        paths["html"].write_text(render_html(report), encoding="utf-8")
        paths["markdown"].write_text(render_markdown(report), encoding="utf-8")
        paths["json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"cannot write the report at {html_path}: {exc.strerror or exc}",
                           "pass -o with a writable path") from None
    return paths
