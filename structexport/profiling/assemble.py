"""The report: collected kernel times and the cost model's MACs per source layer, in the
typed dict of :data:`SCHEMA`, and :func:`validate` against it."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path

from structexport.costmodel import node_costs, totals
from structexport.machine import machine, package_version
from structexport.profiling.layermap import onnx_node_layers
from structexport.profiling.options import ProfileOptions

SCHEMA = "structexport-profile/1"
UNMAPPED = "(unmapped)"
OUTSIDE = "(outside kernels)"


def assemble(src: dict, target: str, dense_onnx: Path, measured: dict, peak: dict | None,
             opts: ProfileOptions) -> dict:
    order = list(src["layers"])
    layers = set(order)
    rows: dict[str, dict] = {}

    def row(name: str) -> dict:
        return rows.setdefault(name, {"layer": name, "kind": "layer" if name in layers else
                                      ("outside" if name == OUTSIDE else "unmapped"),
                                      "structured_ms": 0.0, "dense_ms": 0.0,
                                      "structured_macs": 0, "dense_macs": 0,
                                      "structured_ops": {}, "dense_ops": {}})
    for name in order:
        row(name)
    totals_out, unmapped_calls = {}, {}
    for which in ("structured", "dense"):
        m = measured["models"][which]
        owner = m["mapper"](layers)
        onnx_path = src["onnx"] if which == "structured" else dense_onnx
        kernels = 0.0
        lost: dict[str, float] = {}
        for call in m["calls"]:
            layer = owner(call) or UNMAPPED
            r = row(layer)
            r[f"{which}_ms"] += call["ms"]
            r[f"{which}_ops"][call["op"]] = r[f"{which}_ops"].get(call["op"], 0.0) + call["ms"]
            kernels += call["ms"]
            if layer == UNMAPPED:
                lost[call["op"]] = lost.get(call["op"], 0.0) + call["ms"]
        row(OUTSIDE)[f"{which}_ms"] += m["profiled_ms"] - kernels
        # MACs on the graph the cost model reads (an INT8 package: its float32 graphs)
        onnx_path = (src.get("macs_onnx") or {}).get(which) or onnx_path
        owners = onnx_node_layers(onnx_path, layers)
        costs = node_costs(onnx_path)
        macs_unmapped = 0
        for c in costs:
            layer = owners.get(c.name)
            if layer in layers:
                row(layer)[f"{which}_macs"] += c.macs
            else:
                macs_unmapped += c.macs
        if macs_unmapped:
            row(UNMAPPED)[f"{which}_macs"] += macs_unmapped
        t = totals(costs)
        totals_out[which] = {"latency_ms": measured["latency"][which], "profiled_ms": m["profiled_ms"],
                             "kernels_ms": kernels, "unmapped_ms": sum(lost.values()),
                             "outside_ms": m["profiled_ms"] - kernels, "runs_kept": m["runs_kept"],
                             "calls": len(m["calls"]), "macs": t["macs"], "adds": t["adds"]}
        if which == "structured" and "artifact" in measured["latency"]:
            totals_out[which]["artifact_latency_ms"] = measured["latency"]["artifact"]
        unmapped_calls[which] = dict(sorted(lost.items(), key=lambda kv: -kv[1]))
    peak_gmacs = peak["gmacs"] if peak else None
    int8 = src.get("int8")
    out_rows = []
    for name in order + [n for n in rows if n not in layers]:
        r = rows[name]
        if r["kind"] == "unmapped" and not (r["structured_ms"] or r["dense_ms"] or r["structured_macs"]
                                           or r["dense_macs"]):
            continue
        for which in ("structured", "dense"):
            total = totals_out[which]["profiled_ms"]
            r[f"{which}_share"] = r[f"{which}_ms"] / total if total else None
            ms, macs = r[f"{which}_ms"], r[f"{which}_macs"]
            r[f"{which}_gmacs"] = macs / (ms * 1e6) if ms > 0 and macs else None
        for which in ("structured", "dense"):
            r[f"{which}_ops"] = dict(sorted(r[f"{which}_ops"].items(), key=lambda kv: -kv[1]))
        s, d = r["structured_ms"], r["dense_ms"]
        r["speedup_measured"] = d / s if s > 0 and d > 0 else None
        r["speedup_theoretical"] = (r["dense_macs"] / r["structured_macs"]
                                    if r["structured_macs"] and r["kind"] == "layer" else None)
        r["efficiency"] = (r["speedup_measured"] / r["speedup_theoretical"]
                           if r["speedup_measured"] and r["speedup_theoretical"] else None)
        r["peak_fraction"] = (r["structured_gmacs"] / peak_gmacs
                              if r["structured_gmacs"] and peak_gmacs else None)
        if int8 is not None:
            r["sqnr_db"] = int8["sqnr"].get(name) if r["kind"] == "layer" else None
        out_rows.append(r)
    s_lat, d_lat = totals_out["structured"]["latency_ms"], totals_out["dense"]["latency_ms"]
    theo = (totals_out["dense"]["macs"] / totals_out["structured"]["macs"]
            if totals_out["structured"]["macs"] else None)
    meas = d_lat["median"] / s_lat["median"]
    notes = list(src.get("notes", []))
    over = [r["layer"] for r in out_rows if peak_gmacs and max(r["structured_gmacs"] or 0,
                                                              r["dense_gmacs"] or 0) > peak_gmacs]
    if over:
        notes.append(f"{len(over)} layer(s) ran above the measured peak ({', '.join(over[:5])}): "
                     "the peak was measured while the machine was busier, or the runtime "
                     "overlapped work across kernels")
    tuned = measured.get("tuning") if target.startswith("tvm") else None
    if tuned:
        notes.append("the package is tuned and its MetaSchedule database is on this machine: both "
                     "builds are compiled as model.so was (weights bound as constants, the "
                     "database applied; each constant a kernel reads is recognized among the "
                     "ONNX weights by its values, so that its call maps to that layer)"
                     + ("; model.so itself was profiled" if tuned.get("library_profiled") else
                        "; model.so made other calls than that build, which was profiled instead"))
    elif target.startswith("tvm") and src.get("fuse"):
        notes.append("the profiled structured TVM build is compiled as model.so was: from the "
                     "package's composed.onnx, its structured convs fused (one "
                     "structured_sum_pool kernel feeding the small conv), the same target and "
                     "pipeline; weights passed as inputs (named, so that each PrimFunc call can "
                     "be mapped to the layer whose weights it reads); multiply-adds are counted "
                     "on model.onnx, where the structure is explicit")
    elif target.startswith("tvm"):
        notes.append("the profiled TVM builds are compiled from the same model.onnx with the same "
                     "target and pipeline as model.so, weights passed as inputs (named, so that "
                     "each PrimFunc call can be mapped to the layer whose weights it reads)")
    precision = src.get("precision", "fp32")
    dense = {"onnx": Path(dense_onnx).name,
             "description": "the same network with the structured model's own dense-equivalent "
                            "kernels (the package's reference)"}
    int8_out = None
    if int8 is not None:
        dense = {"onnx": int8["dense"], "description": int8["dense_description"]}
        scored = sorted(((r["layer"], r["sqnr_db"]) for r in out_rows
                         if r["kind"] == "layer" and r.get("sqnr_db") is not None), key=lambda kv: kv[1])
        int8_out = {"dense": int8["dense"], "sqnr_source": int8["sqnr_source"],
                    "lowest_sqnr": [{"layer": n, "sqnr_db": v} for n, v in scored[:3]],
                    "gate": int8.get("gate"), "dense_int8": int8.get("dense_int8")}
        notes.append(f"dense: the dense model quantized the same way ({int8['dense']}, same "
                     "calibration, checked against its own QDQ graph before timing), the INT8 "
                     "baseline an INT8 user would otherwise ship; bench also times the dense "
                     "float32 reference")
        notes.append("MACs are counted on the float32 graphs that were quantized (model.fp32.onnx, "
                     "reference.onnx); the machine peak is a float32 MatMul's, which integer "
                     "kernels (VNNI, AMX) can exceed")
    mach = machine()
    if target.startswith("tvm"):
        mach["tvm"] = package_version("apache-tvm")
    report = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "arch": src["arch"], "target": target, "device": "this host",
        "source": {"checkpoint": src["checkpoint"], "outdir": src["outdir"]},
        "precision": precision, "dense": dense,
        "input_shape": list(src["shape"]), "threads": opts.threads, "repeat": opts.repeat,
        "warmup": opts.warmup, "runtime": measured["runtime"], "profiler": measured["profiler"],
        "totals": totals_out,
        "speedup_measured": meas, "speedup_theoretical": theo,
        "efficiency": meas / theo if theo else None,
        "peak": peak, "machine": mach, "notes": notes,
        "tuning": tuned,          # a tuned TVM package profiled with its database (else None)
        "layers": out_rows,
        "mapping": {
            "rule": "a kernel belongs to the source layer whose weights it reads (longest layer "
                    "name prefixing the weight's ONNX initializer name); data movement to the "
                    "layer it feeds; activations and residual adds to the layer they follow",
            "unmapped_ms_by_op": unmapped_calls,
            "outside": "profiled run total minus the sum of its kernels: executor or VM "
                       "interpreter, allocations and the profiler's own hooks",
        },
    }
    if int8_out is not None:
        report["int8"] = int8_out
    return report


LAYER_KEYS = {"layer": str, "kind": str, "structured_ms": float, "dense_ms": float,
              "structured_share": (float, type(None)), "dense_share": (float, type(None)),
              "structured_macs": int, "dense_macs": int,
              "structured_gmacs": (float, type(None)), "dense_gmacs": (float, type(None)),
              "speedup_measured": (float, type(None)), "speedup_theoretical": (float, type(None)),
              "efficiency": (float, type(None)), "peak_fraction": (float, type(None)),
              "structured_ops": dict, "dense_ops": dict}
TOP_KEYS = {"schema": str, "created": str, "arch": str, "target": str, "device": str,
            "source": dict, "input_shape": list, "threads": int, "repeat": int, "warmup": int,
            "runtime": str, "profiler": str, "totals": dict, "speedup_measured": float,
            "speedup_theoretical": (float, type(None)), "efficiency": (float, type(None)),
            "peak": (dict, type(None)), "machine": dict, "notes": list, "layers": list,
            "mapping": dict}


# Reports written before these keys existed lack them; when present, their types are checked.
OPTIONAL_TOP_KEYS = {"precision": str, "dense": dict, "int8": dict, "tuning": (dict, type(None))}


def validate(report: dict) -> list[str]:
    """What is wrong with ``report`` against :data:`SCHEMA` (empty when nothing). An INT8
    report (``precision`` ``int8``) also needs ``int8`` and every row's ``sqnr_db``."""
    problems = []
    for key, typ in OPTIONAL_TOP_KEYS.items():
        if key in report and not isinstance(report[key], typ):
            problems.append(f"{key}: {type(report[key]).__name__}")
    if report.get("precision") == "int8":
        if "int8" not in report:
            problems.append("missing int8")
        for i, r in enumerate(report.get("layers", [])):
            if "sqnr_db" not in r:
                problems.append(f"layers[{i}] missing sqnr_db")
            elif not isinstance(r["sqnr_db"], (int, float, type(None))) or isinstance(r["sqnr_db"], bool):
                problems.append(f"layers[{i}].sqnr_db: {type(r['sqnr_db']).__name__}")
    for key, typ in TOP_KEYS.items():
        if key not in report:
            problems.append(f"missing {key}")
        elif not isinstance(report[key], typ):
            problems.append(f"{key}: {type(report[key]).__name__}")
    if report.get("schema") != SCHEMA:
        problems.append(f"schema {report.get('schema')!r} != {SCHEMA!r}")
    for i, r in enumerate(report.get("layers", [])):
        for key, typ in LAYER_KEYS.items():
            if key not in r:
                problems.append(f"layers[{i}] missing {key}")
            elif not isinstance(r[key], typ) or (typ is float and isinstance(r[key], bool)):
                if not (typ is float and isinstance(r[key], int)):
                    problems.append(f"layers[{i}].{key}: {type(r[key]).__name__}")
    for which in ("structured", "dense"):
        t = report.get("totals", {}).get(which, {})
        for key in ("latency_ms", "profiled_ms", "kernels_ms", "unmapped_ms", "outside_ms", "macs"):
            if key not in t:
                problems.append(f"totals.{which} missing {key}")
    return problems

