"""A/B regression checks: a candidate against a base, timed interleaved on this machine.

``structexport regress --against BASE CANDIDATE``: each side is a converted package
(OUTDIR) or a checkpoint, converted here with the same options. Both run in one process,
interleaved, on this machine, so the CPU model, its clock and its load cancel out of the
candidate/base ratio -- the verdict is on that ratio alone:

- **whole model**: the candidate's fastest run over the base's (the fastest run is what
  the machine's other load did not disturb; medians are reported beside it);
- **per layer** (ONNX Runtime): each source layer's kernel time under ONNX Runtime's
  profiler, both models profiled interleaved, layers mapped by the weights they read. A
  layer is judged when it takes at least ``min_layer_share`` of the base's kernel time:
  smaller ones are too noisy to judge. The layers that got slower are named.

A failing verdict is re-measured (``retries``) and, for each ratio, the better of the
measurements is kept: a re-measurement can clear noise, never invent a regression.
"""
from __future__ import annotations

import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from structexport.errors import StructExportError
from structexport.regress.baseline import EXIT_PASS, EXIT_REGRESSION, RegressUsageError, machine_info, utc_now
from structexport.regress.judge import CODE_FAILURE_EXIT_CODES
from structexport.regress.measure import STATISTIC
from structexport.regress.reports import junit_document, machine_line

DEFAULT_REPEAT = 300
DEFAULT_WARMUP = 30
DEFAULT_LAYER_TOLERANCE = 0.30
DEFAULT_MIN_LAYER_SHARE = 0.03
PROFILED_RUNS = 100
AB_TARGETS = ("ort-cpu", "tvm-llvm", "tvm-arm", "tvm-cuda", "executorch", "litert")


@dataclass
class ABOptions:
    target: str | None = None            # None: the packages' target (ort-cpu for checkpoints)
    threads: int = 1
    batch: int = 1
    input_shape: str | tuple | None = None
    seed: int = 0
    repeat: int = DEFAULT_REPEAT
    warmup: int = DEFAULT_WARMUP
    tolerance: float = 0.10
    layer_tolerance: float = DEFAULT_LAYER_TOLERANCE
    min_layer_share: float = DEFAULT_MIN_LAYER_SHARE
    per_layer: bool = True
    retries: int = 1
    pass_options: dict = field(default_factory=dict)
    target_options: dict = field(default_factory=dict)
    trust_pickle: bool = False
    allow_torchscript: bool = False


@dataclass
class Verdict:
    """One judged ratio: the whole model, or one layer."""
    name: str
    base_ms: float
    candidate_ms: float
    tolerance: float | None              # None: not judged (too small a share)
    share: float | None = None           # of the base's kernel time (layers)
    first_ratio: float | None = None     # the first measurement, when re-measured

    @property
    def ratio(self) -> float:
        return self.candidate_ms / self.base_ms if self.base_ms > 0 else float("inf")

    @property
    def status(self) -> str:
        if self.tolerance is None:
            return "not judged"
        if self.ratio > 1 + self.tolerance + 1e-12:
            return "slower"
        if self.ratio < 1 - self.tolerance - 1e-12:
            return "faster"
        return "ok"

    @property
    def failed(self) -> bool:
        return self.status == "slower"

    def describe(self) -> str:
        text = (f"{self.name}: candidate {self.candidate_ms:.3f} ms vs base {self.base_ms:.3f} ms, "
                f"{self.ratio:.2f}x")
        if self.tolerance is not None:
            text += f" (tolerance {self.tolerance * 100:g}%)"
        if self.first_ratio is not None:
            text += f"; re-measured, first {self.first_ratio:.2f}x"
        return text


@dataclass
class ABReport:
    base: str
    candidate: str
    target: str
    arch: str
    input_shape: list[int]
    threads: int
    whole: Verdict
    median_ratio: float
    layers: list[Verdict]
    machine: dict
    tolerance: float
    layer_tolerance: float
    min_layer_share: float
    remeasured: bool = False
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None             # the candidate no longer converts: a failure
    device: dict | None = None           # timed on a device over RPC (DeviceSpec.to_dict), else None
    device_text: str | None = None       # that device in words (DeviceSpec.describe)

    @property
    def where(self) -> str:
        """Where both were timed, in words."""
        return self.device_text if self.device_text else machine_line(self.machine)

    @property
    def slower_layers(self) -> list[Verdict]:
        return [v for v in self.layers if v.failed]

    @property
    def failed(self) -> bool:
        return self.error is not None or self.whole.failed or bool(self.slower_layers)

    @property
    def exit_code(self) -> int:
        return EXIT_REGRESSION if self.failed else EXIT_PASS


# --------------------------------------------------------------------------- resolving

def _workload_options(opts: ABOptions, like=None):
    """The conversion options; ``like`` (a package) gives the defaults, so a checkpoint is
    converted the way the other side's package was."""
    from structexport.workload import WorkloadOptions
    target, shape, passes = opts.target, opts.input_shape, dict(opts.pass_options)
    batch = opts.batch
    if like is not None:
        target = target or like.target
        shape = shape or tuple(like.input_shape)
        batch = like.input_shape[0] if opts.batch == 1 and not opts.input_shape else batch
        passes = {**like.pass_options, **{k: v for k, v in passes.items() if v not in (None, False)}}
    return WorkloadOptions(target=target, input_shape=shape, batch=batch, seed=opts.seed,
                           pass_options=passes, target_options=opts.target_options,
                           trust_pickle=opts.trust_pickle, allow_torchscript=opts.allow_torchscript,
                           need="artifact", command="compare")


def _resolve_pair(base: str, candidate: str, opts: ABOptions, work: Path, say):
    from structexport.package import Package, is_package
    from structexport.workload import resolve_workload
    packages = {side: Package.load(p) if is_package(p) else None
                for side, p in (("base", base), ("candidate", candidate))}
    # A checkpoint is converted like the other side's package (a base from a previous
    # release, kept in the repository, decides how the candidate is built); a package is
    # taken as it is.
    like = {"base": None if packages["base"] else packages["candidate"],
            "candidate": None if packages["candidate"] else packages["base"]}
    out = {}
    for side, path in (("base", base), ("candidate", candidate)):
        say(f"{side}: {path}")
        out[side] = resolve_workload(path, None, _workload_options(opts, like[side]), work / side,
                                     lambda m, s=side: say(f"{s}: {m}"))
    b, c = out["base"].package, out["candidate"].package
    if b.arch != c.arch or [layer["name"] for layer in b.layers] != [layer["name"] for layer in c.layers]:
        raise RegressUsageError(f"BASE ({b.arch}) and CANDIDATE ({c.arch}) are not the same model",
                                "compare two builds of one model (--against BASE CANDIDATE)")
    if b.input_shape != c.input_shape:
        raise RegressUsageError(f"BASE takes input {list(b.input_shape)}, CANDIDATE {list(c.input_shape)}",
                                "convert both for one --input-shape")
    if out["base"].target != out["candidate"].target:
        raise RegressUsageError(f"BASE is for {out['base'].target}, CANDIDATE for {out['candidate'].target}",
                                "pass --target to convert both for one target")
    return out["base"], out["candidate"]


# --------------------------------------------------------------------------- measuring

@dataclass
class _Measured:
    latency: dict                     # side -> timing.stats
    layer_ms: dict                    # side -> {layer: ms}


def _ort_layer_times(paths: dict[str, Path], layers: list[str], feed, threads: int, work: Path
                     ) -> dict[str, dict[str, float]]:
    from structexport.profiling.layermap import ort_owner
    from structexport.profiling.ort import ort_profile
    prof = ort_profile(paths, feed, threads, PROFILED_RUNS, 10, optimized_dir=work)
    out = {}
    for side, path in paths.items():
        owner = ort_owner(path, work / f"{side}.optimized.onnx", set(layers))
        per: dict[str, float] = {}
        for node, ms in prof[side]["node_ms"].items():
            layer = owner({"name": node}) or "(unmapped)"
            per[layer] = per.get(layer, 0.0) + ms
        out[side] = per
    return out


def _timers(base, candidate, target: str, opts: ABOptions, feed, say=lambda _m: None):
    """Timers of both sides: ORT sessions, or both TVM libraries in one device session; each
    checked against its own package's stored outputs before it is timed."""
    from structexport.timedcheck import checked_sessions
    sides = (("base", base), ("candidate", candidate))
    if target == "ort-cpu":
        timers = {}
        for side, w in sides:
            timers.update(checked_sessions(w.package, {side: w.package.model_onnx}, opts.threads, say))
        return timers, None
    from structexport.targets import is_program_target
    if is_program_target(target):
        from structexport.timedcheck import checked_programs
        timers = {}
        for side, w in sides:
            timers.update(checked_programs(w.package, {side: w.package.program}, feed, opts.threads, say))
        return timers, None
    from structexport.rpc import DeviceSpec, LoadedLibrary, open_session, set_threads
    from structexport.targets import get_target
    spec = opts.target_options.get("device") or DeviceSpec()
    kind = get_target(target, {}).device_kind
    session = open_session(spec)
    set_threads(spec, session, opts.threads)
    libs = {}
    for side, w in sides:
        # A TVM library is native code: loading it runs it with this user's privileges
        say(f"load {w.package.library} (native code) on the {spec.describe()}")
        libs[side] = LoadedLibrary(w.package.library, spec, kind, session=session)
        what = f"{w.package.library} on the {spec.describe()}"
        say(f"check {what}")
        w.package.check_timed(libs[side].run, what)
    return {side: lib.timer(feed) for side, lib in libs.items()}, spec


def _measure(base, candidate, target: str, opts: ABOptions, work: Path, say) -> _Measured:
    from structexport.timing import time_interleaved
    feed = base.package.feed()
    timers, spec = _timers(base, candidate, target, opts, feed, say)
    where = f" on the {spec.describe()}" if spec is not None and spec.remote else ""
    say(f"timing base and candidate ({opts.repeat} interleaved runs{where})")
    latency = time_interleaved(timers, feed, opts.repeat, opts.warmup)
    layer_ms = {}
    if opts.per_layer and target == "ort-cpu":
        say(f"profiling base and candidate ({PROFILED_RUNS} interleaved runs, per layer)")
        layer_ms = _ort_layer_times({"base": base.package.model_onnx,
                                     "candidate": candidate.package.model_onnx},
                                    [layer["name"] for layer in base.package.layers], feed,
                                    opts.threads, work)
    return _Measured(latency, layer_ms)


def _verdicts(m: _Measured, opts: ABOptions) -> tuple[Verdict, list[Verdict]]:
    whole = Verdict("whole model", m.latency["base"][STATISTIC], m.latency["candidate"][STATISTIC],
                    opts.tolerance)
    layers = []
    if m.layer_ms:
        base, cand = m.layer_ms["base"], m.layer_ms["candidate"]
        total = sum(base.values()) or 1.0
        for name in sorted(set(base) | set(cand), key=lambda n: -base.get(n, 0.0)):
            share = base.get(name, 0.0) / total
            judged = share >= opts.min_layer_share and name != "(unmapped)"
            layers.append(Verdict(name, base.get(name, 0.0), cand.get(name, 0.0),
                                  opts.layer_tolerance if judged else None, share))
    return whole, layers


def _better(first: Verdict, second: Verdict) -> Verdict:
    """The measurement with the lower candidate/base ratio, remembering the first."""
    best = second if second.ratio < first.ratio else first
    return Verdict(best.name, best.base_ms, best.candidate_ms, best.tolerance, best.share,
                   first_ratio=first.ratio)


def _package_target(path: str) -> str | None:
    from structexport.package import Package, is_package
    try:
        return Package.load(path).target if is_package(path) else None
    except StructExportError:
        return None


def timed_target(base: str, candidate: str, opts: ABOptions) -> str:
    """The target both sides will be timed on: --target, else a package's, else ort-cpu."""
    return opts.target or _package_target(base) or _package_target(candidate) or "ort-cpu"


def run_ab(base: str, candidate: str, opts: ABOptions,
           progress: Callable[[str], None] | None = None) -> ABReport:
    """Convert what needs converting, time both interleaved, judge the ratios. TVM targets
    are timed on one device session for the whole run: ``target_options["device"]``
    (``--rpc``/``--tracker``), else the target's default (this host; for tvm-arm the
    emulated aarch64 device, started for the run when it is not running)."""
    import dataclasses
    say = progress or (lambda _m: None)
    target_name = timed_target(base, candidate, opts)
    device = opts.target_options.get("device")
    if device is not None and not target_name.startswith("tvm"):
        raise RegressUsageError(f"--rpc/--tracker time TVM libraries on a device; this check times "
                                f"{target_name} on this machine",
                                "pass --target tvm-arm (or tvm-llvm), or leave --rpc/--tracker out")
    if not target_name.startswith("tvm") or target_name not in AB_TARGETS:
        return _run_ab(base, candidate, opts, say)
    from structexport.targets import get_target
    try:
        target = get_target(target_name, dict(opts.target_options, progress=say))
        target.preflight()
    except RegressUsageError:
        raise
    except StructExportError as exc:
        raise RegressUsageError(f"cannot time {target_name}: {exc.message}", exc.hint or
                                "check --target and the device options") from None
    with target.device_scope(say) as scoped:
        if isinstance(scoped, str):
            raise RegressUsageError(f"cannot time {target_name} here: {scoped.removeprefix('not run: ')}",
                                    "pass --rpc HOST:PORT or --tracker HOST:PORT --key KEY")
        if scoped is not None:
            opts = dataclasses.replace(opts, target_options=dict(opts.target_options, device=scoped))
        return _run_ab(base, candidate, opts, say)


def _run_ab(base: str, candidate: str, opts: ABOptions, say) -> ABReport:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="structexport-regress-ab-") as tmp:
        work = Path(tmp)
        for side in ("base", "candidate"):
            (work / side).mkdir()
        try:
            b, c = _resolve_pair(base, candidate, opts, work, say)
        except RegressUsageError:
            raise
        except StructExportError as exc:
            if exc.exit_code in CODE_FAILURE_EXIT_CODES:  # the candidate's code broke: exit 1
                return _error_report(base, candidate, opts, f"{exc} (exit code {exc.exit_code} of the "
                                     "pipeline)", time.perf_counter() - start)
            raise RegressUsageError(f"cannot compare: {exc.message}", exc.hint or "check BASE and CANDIDATE") from None
        target = b.target
        if target not in AB_TARGETS:
            raise RegressUsageError(f"regress --against times {', '.join(AB_TARGETS)}, not {target!r}",
                                    "pass --target ort-cpu")
        from structexport.targets import is_program_target
        if is_program_target(target) and (b.package.program is None or c.package.program is None):
            raise RegressUsageError(f"a {target} package without its program", "convert it for the target again")
        if target.startswith("tvm") and (b.package.library is None or c.package.library is None):
            raise RegressUsageError(f"a {target} package without its library", "convert it for the target again")
        try:
            first = _measure(b, c, target, opts, work, say)
        except StructExportError as exc:
            if exc.exit_code in CODE_FAILURE_EXIT_CODES:  # a timed session gives other outputs: exit 1
                return _error_report(base, candidate, opts, f"{exc} (exit code {exc.exit_code} of the "
                                     "pipeline)", time.perf_counter() - start)
            raise
        whole, layers = _verdicts(first, opts)
        remeasured = False
        attempt = 0
        while (whole.failed or any(v.failed for v in layers)) and attempt < opts.retries:
            attempt += 1
            failing = [v for v in [whole, *layers] if v.failed]
            say(f"re-measuring ({failing[0].describe()}" + (f" and {len(failing) - 1} more" if len(failing) > 1 else "") + ")")
            again_whole, again_layers = _verdicts(_measure(b, c, target, opts, work, say), opts)
            whole = _better(whole, again_whole)
            by_name = {v.name: v for v in again_layers}
            layers = [_better(v, by_name[v.name]) if v.name in by_name else v for v in layers]
            remeasured = True
        notes = [f"base: {b.label}" + (f" ({'; '.join(b.notes)})" if b.notes else ""),
                 f"candidate: {c.label}" + (f" ({'; '.join(c.notes)})" if c.notes else "")]
        if opts.per_layer and target != "ort-cpu":
            notes.append(f"per-layer verdicts are for ort-cpu; on {target} the whole model is judged")
        device = opts.target_options.get("device") if target != "ort-cpu" else None
        remote = device is not None and getattr(device, "remote", False)
        if remote and getattr(device, "emulated", False):
            notes.append("timed on the emulated aarch64 device (qemu user mode): the ratio is judged "
                         "as on any device, but the times are not ARM latency")
        return ABReport(base, candidate, target, b.arch, list(b.shape), opts.threads, whole,
                        first.latency["candidate"]["median"] / first.latency["base"]["median"],
                        layers, machine_info(), opts.tolerance, opts.layer_tolerance,
                        opts.min_layer_share, remeasured, notes, time.perf_counter() - start,
                        device=device.to_dict() if remote else None,
                        device_text=device.describe() if remote else None)


def _error_report(base, candidate, opts: ABOptions, error: str, seconds: float) -> ABReport:
    nothing = Verdict("whole model", 0.0, 0.0, opts.tolerance)
    return ABReport(base, candidate, opts.target or "?", "?", [], opts.threads, nothing, float("nan"),
                    [], machine_info(), opts.tolerance, opts.layer_tolerance, opts.min_layer_share,
                    error=error, seconds=seconds)


# --------------------------------------------------------------------------- reports

def verdict_line(report: ABReport) -> str:
    if report.error:
        return f"FAIL: the candidate cannot be measured: {report.error}"
    w = report.whole
    head = f"candidate/base {w.ratio:.2f}x ({STATISTIC} of {report.threads}-thread runs)"
    if not report.failed:
        judged = sum(v.tolerance is not None for v in report.layers)
        layers = (f"; none of {judged} judged layers slower than {report.layer_tolerance * 100:g}%"
                  if judged else "")
        return f"PASS: {head}, within {report.tolerance * 100:g}%{layers}"
    parts = []
    if w.failed:
        parts.append(f"the whole model is {w.ratio:.2f}x the base's time (tolerance {report.tolerance * 100:g}%)")
    slow = report.slower_layers
    if slow:
        parts.append(f"{len(slow)} layer(s) slower: " + ", ".join(f"{v.name} {v.ratio:.2f}x" for v in slow))
    return "FAIL: " + "; ".join(parts)


def rows(report: ABReport) -> list[tuple]:
    """(what, base ms, candidate ms, ratio, share, tolerance, status) per verdict."""
    out = []
    for v in [report.whole, *report.layers]:
        status = v.status + (" (re-measured)" if v.first_ratio is not None and v.failed else "")
        out.append((v.name, f"{v.base_ms:.3f}", f"{v.candidate_ms:.3f}", f"{v.ratio:.2f}x",
                    "" if v.share is None else f"{v.share * 100:.1f}%",
                    "-" if v.tolerance is None else f"{v.tolerance * 100:g}%",
                    status.upper() if v.failed else status))
    return out


def markdown(report: ABReport) -> str:
    lines = [f"## structexport regress --against: {verdict_line(report)}", "",
             f"Base `{report.base}`, candidate `{report.candidate}`: {report.arch} on {report.target}, "
             f"input {report.input_shape}, timed interleaved on {report.where}. "
             "Only the candidate/base ratio is judged (the CPU cancels out).", ""]
    if not report.error:
        lines += ["| what | base ms | candidate ms | ratio | share | tolerance | status |",
                  "|---|---|---|---|---|---|---|"]
        for row in rows(report):
            cells = list(row)
            if cells[-1].startswith("SLOWER"):
                cells[-1] = f"**{cells[-1]}**"
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        lines += ["", f"Median ratio {report.median_ratio:.2f}x (informational)."]
    lines += [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def junit_xml(report: ABReport) -> str:
    cases = [] if report.error else [report.whole, *report.layers]
    suite = ET.Element("testsuite", {
        "name": "structexport regress --against", "tests": str(max(1, len(cases))),
        "failures": str(sum(v.failed for v in cases)), "errors": "1" if report.error else "0",
        "skipped": str(sum(v.tolerance is None for v in cases)), "time": f"{report.seconds:.3f}",
        "timestamp": utc_now()})
    props = ET.SubElement(suite, "properties")
    for name, value in (("base", report.base), ("candidate", report.candidate),
                        ("target", report.target), ("machine", machine_line(report.machine)),
                        *((("device", report.where),) if report.device else ()),
                        ("tolerance", f"{report.tolerance * 100:g}%"),
                        ("layer_tolerance", f"{report.layer_tolerance * 100:g}%")):
        ET.SubElement(props, "property", {"name": name, "value": value})
    if report.error:
        case = ET.SubElement(suite, "testcase", {"classname": "regress.ab", "name": "candidate"})
        ET.SubElement(case, "error", {"type": "error", "message": report.error})
    for v in cases:
        case = ET.SubElement(suite, "testcase", {"classname": "regress.ab", "name": v.name,
                                                 "time": "0"})
        text = (f"base: {v.base_ms:.4f} ms\ncandidate: {v.candidate_ms:.4f} ms\nratio: {v.ratio:.4f}\n"
                f"tolerance: {'not judged' if v.tolerance is None else f'{v.tolerance * 100:g}%'}\n")
        if v.first_ratio is not None:
            text += f"first measurement: {v.first_ratio:.4f}\n"
        if v.failed:
            ET.SubElement(case, "failure", {"type": "regression", "message": v.describe()}).text = text
        elif v.tolerance is None:
            ET.SubElement(case, "skipped", {"message": f"{v.share * 100:.1f}% of the base's time: too "
                                            "small to judge"})
        else:
            ET.SubElement(case, "system-out").text = text
    return junit_document(suite)


def report_json(report: ABReport) -> dict:
    def v(x: Verdict) -> dict:
        return {"name": x.name, "base_ms": x.base_ms, "candidate_ms": x.candidate_ms,
                "ratio": x.ratio, "share": x.share, "tolerance": x.tolerance, "status": x.status,
                "first_ratio": x.first_ratio}
    return {"mode": "against", "base": report.base, "candidate": report.candidate,
            "target": report.target, "arch": report.arch, "input_shape": report.input_shape,
            "threads": report.threads, "passed": not report.failed, "exit_code": report.exit_code,
            "statistic": STATISTIC, "whole": None if report.error else v(report.whole),
            "median_ratio": report.median_ratio, "layers": [v(x) for x in report.layers],
            "tolerance": report.tolerance, "layer_tolerance": report.layer_tolerance,
            "min_layer_share": report.min_layer_share, "remeasured": report.remeasured,
            "machine": report.machine, "device": report.device, "notes": report.notes,
            "error": report.error,
            "seconds": round(report.seconds, 3)}
