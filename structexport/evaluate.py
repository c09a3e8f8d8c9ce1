"""``evaluate``: the accuracy of a converted package on labelled images, source and artifacts.

:func:`evaluate` takes a package (OUTDIR) or a model file (converted first into a temporary
package for ``ort-cpu``, as ``convert`` would) and DATA (:mod:`structexport.datasets`), and
runs, batch by batch over the same preprocessed images:

- the **source** model, as ``convert`` loads it (a zoo checkpoint into its zoo model with the
  architecture recorded in the manifest, anything else through its front end), batched in
  torch (an ONNX source under ONNX Runtime with its optimizations off). When the source file
  is gone or changed, or cannot be loaded, it is left out with the reason;
- **every artifact** the package ships that can run here, as it is deployed: ``model.onnx``
  (ONNX Runtime, ``ORT_ENABLE_ALL``), ``model.optimized.onnx`` (optimizations off: optimized
  at conversion), ``model.ort`` (ORT format, ``ORT_ENABLE_EXTENDED``) and a TVM ``model.so``
  on this host or on the ``--rpc``/``--tracker`` device. Artifacts are exported at a fixed
  batch (the manifest's ``input_shape``), so they run batch-of-one at a time.

For each: top-1 and top-5 accuracy against the labels; for each artifact, its agreement
with the source (the fraction of images whose top-1 class is the source's) and the largest
absolute difference of a logit.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from structexport.datasets import (DataClassCountError, Dataset, Preprocess, open_dataset)
from structexport.errors import StructExportError
from structexport.package import Package, is_package

TOPK = 5
# Artifacts evaluate runs, in this order (reference.onnx and composed.onnx are not deployed).
# An INT8 package also ships the float32 model it quantized and the dense INT8 baseline:
# evaluated beside it, they show what INT8 costs and what the dense model would have lost.
ARTIFACTS = ("model.onnx", "model.optimized.onnx", "model.ort", "model.so", "model.fp32.onnx",
             "reference.int8.onnx")


def _programs(package: Package) -> list[str]:
    """A program target's files worth evaluating (ExecuTorch's model.pte, its INT8 baseline)."""
    return [p.name for p in (package.program, package.dense_int8_program) if p is not None]
# How each ONNX Runtime file is deployed (as targets/onnx_targets.py's deployments()).
ORT_CONFIG = {"model.onnx": ("ORT_ENABLE_ALL", False),
              "model.optimized.onnx": ("ORT_DISABLE_ALL", False),
              "model.ort": ("ORT_ENABLE_EXTENDED", True),
              "model.fp32.onnx": ("ORT_ENABLE_ALL", False),
              "reference.int8.onnx": ("ORT_ENABLE_ALL", False)}


class EvaluateUsageError(StructExportError):
    """An evaluate run that cannot take effect as asked (no preprocessing, flags for
    something the package lacks)."""
    exit_code, kind = 2, "usage"


@dataclass
class EvaluateOptions:
    # The preprocessing; None: the package's stored one (``convert --preprocess``).
    # ``preprocess_changes`` (scale, mean, std, layout, resize, crop) override fields of
    # whichever it is (of the defaults, Preprocess(), when there is none).
    preprocess: Preprocess | None = None
    preprocess_changes: dict = field(default_factory=dict)
    batch_size: int = 256
    limit: int | None = None              # the first N images only
    artifacts: list[str] | None = None    # only these files (None: every one that runs here)
    source: bool = True                   # evaluate the source model too
    threads: int = 1                      # ONNX Runtime intra-op threads (deployed: 1)
    # A model file: converted for ort-cpu first, with the flags convert takes.
    arch: str | None = None
    model_spec: str | None = None
    input_shape: str | None = None
    trust_pickle: bool = False
    allow_torchscript: bool = False
    # Where a TVM library runs: a structexport.rpc.DeviceSpec (--rpc/--tracker), else here.
    device: object | None = None


class Progress:
    """What :func:`evaluate` reports while it runs (the CLI draws a progress bar)."""

    def stage(self, message: str) -> None:
        pass

    def start(self, labels: list[str], total: int) -> None:
        """The models that will run, each over ``total`` images."""

    def advance(self, label: str, images: int) -> None:
        pass


@dataclass
class _Runner:
    label: str                  # "source" or the artifact's file name
    runtime: str
    run: Callable[[np.ndarray], np.ndarray]     # preprocessed batch -> logits (B, classes)
    options: dict = field(default_factory=dict)
    close: Callable[[], None] = lambda: None


class _Tally:
    def __init__(self, k: int):
        self.k = k
        self.count = self.top1 = self.topk = self.agree = 0
        self.compared = 0
        self.max_diff = 0.0
        self.seconds = 0.0
        self.disagreeing: list[int] = []

    def add(self, logits: np.ndarray, labels: np.ndarray, start: int, source: np.ndarray | None) -> None:
        pred = logits.argmax(axis=1)
        self.count += len(labels)
        self.top1 += int((pred == labels).sum())
        k = min(self.k, logits.shape[1])
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        self.topk += int((top == labels[:, None]).any(axis=1).sum())
        if source is not None:
            same = pred == source.argmax(axis=1)
            self.compared += len(labels)
            self.agree += int(same.sum())
            if len(self.disagreeing) < 20:
                self.disagreeing += [start + int(i) for i in np.flatnonzero(~same)][:20 - len(self.disagreeing)]
            if logits.size:
                self.max_diff = max(self.max_diff, float(np.abs(logits - source).max()))

    def to_dict(self, runner: _Runner, with_source: bool) -> dict:
        out = {"runtime": runner.runtime, **({"options": runner.options} if runner.options else {}),
               "images": self.count,
               "top1": self.top1 / self.count if self.count else None,
               "top5": self.topk / self.count if self.count else None,
               "correct_top1": self.top1, "correct_top5": self.topk,
               "seconds": round(self.seconds, 3)}
        if self.k != TOPK:
            out["topk"] = self.k
        if with_source:     # an artifact: null without a source to agree with
            out.update({"agreement": self.agree / self.compared if self.compared else None,
                        "agreeing": self.agree if self.compared else None,
                        "max_logit_diff": self.max_diff if self.compared else None,
                        "disagreeing_images": self.disagreeing if self.compared else None})
        return out


# --------------------------------------------------------------------------- runners

def _fixed_batches(run_fixed: Callable[[np.ndarray], np.ndarray], batch: int, dtype) -> Callable:
    """A model exported at a fixed ``batch`` run over any number of images: chunks of
    ``batch``, the last one padded with zeros (its padding's outputs dropped)."""
    def run(x: np.ndarray) -> np.ndarray:
        x = x.astype(dtype, copy=False)
        outs = []
        for start in range(0, len(x), batch):
            chunk = x[start:start + batch]
            n = len(chunk)
            if n < batch:
                chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
            outs.append(np.asarray(run_fixed(np.ascontiguousarray(chunk)), dtype=np.float32)[:n])
        return np.concatenate(outs) if outs else np.zeros((0, 0), np.float32)
    return run


def _logits(outputs) -> np.ndarray:
    """The first output of a model run, as (B, classes) float32."""
    first = outputs[0] if isinstance(outputs, (list, tuple)) else outputs
    if hasattr(first, "detach"):
        first = first.detach().float().numpy()
    first = np.asarray(first, dtype=np.float32)
    return first.reshape(first.shape[0], -1)


def _torch_runner(module, label: str, runtime: str, threads: int = 1) -> _Runner:
    """A torch module run batched with ``threads`` intra-op threads (torch's default of one
    per core spins against any other load on a shared machine: many times slower)."""
    import torch
    module = module.eval().float()

    def run(x: np.ndarray) -> np.ndarray:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with torch.no_grad():
                return _logits(module(torch.from_numpy(x)))
        finally:
            torch.set_num_threads(before)
    return _Runner(label, f"{runtime}, {threads} thread{'s' * (threads > 1)}", run)


def _ort_runner(path_or_bytes, label: str, level: str, ort_format: bool, threads: int) -> _Runner:
    from structexport.ortsession import ort_session, session_options
    session = ort_session(path_or_bytes, threads, level=level, ort_format=ort_format)
    spec = session.get_inputs()[0]
    dtype = np.float16 if spec.type == "tensor(float16)" else np.float32
    dim = spec.shape[0] if spec.shape else None
    batch = dim if isinstance(dim, int) and dim > 0 else None

    def run_fixed(x):
        return _logits(session.run(None, {spec.name: x}))
    options = session_options(threads, level, ort_format)
    runtime = (f"ONNX Runtime {options['runtime'].split()[-1]}, {level}"
               f"{', ORT format' if ort_format else ''}, {threads} thread{'s' * (threads > 1)}")
    run = _fixed_batches(run_fixed, batch, dtype) if batch else (lambda x: run_fixed(x.astype(dtype)))
    return _Runner(label, runtime, run, options)


def _source_runner(package: Package, opts: EvaluateOptions, say) -> tuple[_Runner | None, str | None]:
    """The source model as convert loads it, or (None, why not)."""
    if not opts.source:
        return None, "not evaluated (asked to leave the source out)"
    ckpt = package.source_checkpoint
    recorded = package.source_path
    if ckpt is None:
        if not recorded:
            return None, "the package records no source file"
        if Path(recorded).is_file():
            return None, f"the source {recorded} has changed since the conversion (its SHA-256 differs)"
        return None, f"the source {recorded} is not there any more"
    source = package.manifest["source"]
    say(f"load the source {ckpt}")
    try:
        if source.get("family") != "discovered":
            import torch

            from structexport.loader import load_checkpoint
            loaded = load_checkpoint(ckpt, package.arch, trust_pickle=opts.trust_pickle,
                                     allow_torchscript=opts.allow_torchscript)
            return _torch_runner(loaded.model, "source",
                                 f"torch {torch.__version__.split('+')[0]}, {loaded.arch} with the "
                                 "checkpoint's weights", opts.threads), None
        from structexport.frontends import load_source
        loaded = load_source(ckpt, model_spec=opts.model_spec, input_shape=tuple(package.input_shape),
                             trust_pickle=opts.trust_pickle, allow_torchscript=opts.allow_torchscript)
        if loaded.several_inputs:
            return None, "the source takes several inputs"
        if loaded.onnx is not None:
            runner = _ort_runner(loaded.onnx.SerializeToString(), "source", "ORT_DISABLE_ALL", False,
                                 opts.threads)
            runner.runtime = f"{runner.runtime.split(',')[0]}, the source ONNX file, optimizations off"
            return runner, None
        import torch
        runner = _torch_runner(loaded.module, "source",
                               f"torch {torch.__version__.split('+')[0]}, the source module ({loaded.format})",
                               opts.threads)
        batched = runner.run
        try:     # a module may take only its fixed batch: then one batch at a time
            batched(np.zeros((2,) + tuple(package.input_shape[1:]), np.float32))
        except Exception:
            runner.run = _fixed_batches(batched, package.input_shape[0], np.float32)
        return runner, None
    except StructExportError as exc:
        return None, f"the source {ckpt} cannot be loaded: {exc}"


def _tvm_runner(package: Package, opts: EvaluateOptions, say) -> tuple[_Runner | None, str | None]:
    library = package.library
    target = package.target
    device = opts.device
    if device is None:
        if target == "tvm-arm":
            return None, ("an aarch64 library runs on a device: pass --rpc HOST:PORT or --tracker "
                          "HOST:PORT --key KEY")
        if target == "tvm-llvm":
            from structexport.machine import llvm_host_cpu
            built_for, host = (package.tvm_target or {}).get("mcpu"), llvm_host_cpu()
            if built_for and host and built_for != host:
                return None, (f"built for the CPU {built_for}, this host is {host} (pass --rpc or "
                              "--tracker to run it on a device of its kind)")
    try:
        import tvm  # noqa: F401
    except Exception as exc:    # TVM is an optional extra
        return None, f"TVM is not usable here ({type(exc).__name__}: {str(exc)[:100]})"
    kind = "cuda" if target == "tvm-cuda" else "cpu"
    if device is None and kind == "cuda":
        import tvm
        if not tvm.cuda(0).exist:
            return None, "no CUDA device here"
    from structexport.rpc import DeviceSpec, LoadedLibrary
    spec = device or DeviceSpec()
    say(f"load {library} (native code) on {spec.describe()}")
    lib = LoadedLibrary(library, spec, kind, progress=say)
    dtype = np.float16 if package.precision == "fp16" else np.float32
    run = _fixed_batches(lambda x: _logits(lib.run(x)), package.input_shape[0], dtype)
    where = spec.describe() if spec.remote else f"this host ({kind})"
    return _Runner("model.so", f"TVM VM on {where}", run, {"device": where}), None


def _program_runner(package: Package, name: str, opts: EvaluateOptions, say) -> tuple[_Runner | None, str | None]:
    """A program target's file under its runtime's Python bindings (ExecuTorch with XNNPACK)."""
    from structexport.targets import get_target
    target = get_target(package.target, {})
    try:
        target.preflight()           # the runtime is an optional extra
        runtime = target.runtime(opts.threads)
    except StructExportError as exc:
        return None, exc.message
    say(f"open {name} under {runtime}")
    run = target.runner(package.root / name, opts.threads)
    fixed = _fixed_batches(lambda x: _logits(run(x)), package.input_shape[0], np.float32)
    return _Runner(name, runtime, fixed, {"threads": opts.threads}), None


def _select_artifacts(package: Package, opts: EvaluateOptions) -> list[str]:
    """The artifacts a run evaluates (checked before anything is loaded)."""
    shipped = [name for name in ARTIFACTS if name in package.manifest["artifacts"]] + _programs(package)
    wanted = opts.artifacts
    if wanted:
        unknown = [w for w in wanted if w not in shipped]
        if unknown:
            raise EvaluateUsageError(f"{package.root} ships no {', '.join(unknown)} to evaluate (it ships "
                                     f"{', '.join(shipped)})", "name one of those with --artifact")
        shipped = [name for name in shipped if name in wanted]
    if opts.device is not None and "model.so" not in shipped:
        raise EvaluateUsageError(f"--rpc/--tracker run a TVM library on a device, and {package.root} has "
                                 "none to run", "leave --rpc/--tracker out")
    return shipped


def _artifact_runners(package: Package, names: list[str], opts: EvaluateOptions,
                      say) -> tuple[list[_Runner], dict]:
    runners, skipped = [], {}
    for name in names:
        if name == "model.so":
            runner, why = _tvm_runner(package, opts, say)
        elif name in _programs(package):
            runner, why = _program_runner(package, name, opts, say)
        else:
            level, ort_format = ORT_CONFIG[name]
            say(f"open {name} under ONNX Runtime ({level})")
            try:
                runner, why = _ort_runner(package.root / name, name, level, ort_format, opts.threads), None
            except Exception as exc:   # e.g. an optimized graph for another CPU's kernels
                runner, why = None, (f"ONNX Runtime cannot load it here: "
                                     f"{(str(exc).splitlines() or [''])[0][:160]}")
        if runner is None:
            skipped[name] = why
        else:
            runners.append(runner)
    return runners, skipped


def _num_classes(package: Package) -> int | None:
    """The model's class count: the last dimension of its first output, as the graph says."""
    import onnx
    model = onnx.load(str(package.model_onnx), load_external_data=False)
    output = model.graph.output[0]
    dims = [d.dim_value if d.HasField("dim_value") else None for d in output.type.tensor_type.shape.dim]
    if len(dims) != 2:
        raise DataClassCountError(f"{package.model_onnx}'s first output {output.name!r} has shape "
                                  f"{['?' if d is None else d for d in dims]}; evaluate takes classifiers "
                                  "whose first output is [N, classes] logits",
                                  "evaluate an image classifier")
    return dims[1]


# --------------------------------------------------------------------------- the driver

def _changed(base: Preprocess, changes: dict) -> Preprocess:
    try:
        return base.replace(**changes)
    except ValueError as exc:
        raise EvaluateUsageError(f"bad preprocessing: {exc}") from None


def given_preprocess(opts: EvaluateOptions) -> Preprocess | None:
    """The preprocessing the options give on their own (None: they give none)."""
    if opts.preprocess is not None:
        return _changed(opts.preprocess, opts.preprocess_changes)
    if any(v is not None for v in opts.preprocess_changes.values()):
        return _changed(Preprocess(), opts.preprocess_changes)
    return None


def resolve_preprocess(package: Package, opts: EvaluateOptions) -> tuple[Preprocess, str]:
    """The preprocessing a run uses, and where it came from: "options", "package", or
    "package+options" (the stored one with fields overridden)."""
    stored = package.manifest.get("preprocess")
    if opts.preprocess is None and stored:
        base = Preprocess.from_dict(stored)
        changed = _changed(base, opts.preprocess_changes)
        return changed, "package" if changed == base else "package+options"
    given = given_preprocess(opts)
    if given is not None:
        return given, "options"
    raise EvaluateUsageError(f"{package.root} records no preprocessing, and none was given",
                             "pass --preprocess cifar10|imagenet (or --scale/--mean/--std), or convert "
                             "it with --preprocess")


@contextlib.contextmanager
def _package_for(path: str | Path, opts: EvaluateOptions, say):
    """A package for ``path``: the OUTDIR itself, or the model file converted for ort-cpu into
    a temporary package (removed at the end)."""
    path = Path(path)
    if is_package(path) or path.is_dir() or not path.exists():
        yield Package.load(path), "package"
        return
    preprocess = given_preprocess(opts)
    if preprocess is None:
        raise EvaluateUsageError(f"{path} is a model file, which records no preprocessing",
                                 "pass --preprocess cifar10|imagenet (or --scale/--mean/--std)")
    from structexport.convert import ConvertOptions, convert
    with tempfile.TemporaryDirectory(prefix="structexport-evaluate-") as tmp:
        say(f"convert {path} for ort-cpu")
        result = convert(str(path), Path(tmp) / "package", opts.arch, ConvertOptions(
            target="ort-cpu", input_shape=[opts.input_shape] if opts.input_shape else None,
            trust_pickle=opts.trust_pickle, allow_torchscript=opts.allow_torchscript,
            model_spec=opts.model_spec, preprocess=preprocess.to_dict()),
            progress=lambda stage: say(f"convert: {stage}"))
        if not result.verified:
            from structexport.export import VerificationError
            raise VerificationError(f"{path} converted for ort-cpu does not reproduce the source",
                                    "run `structexport convert` on it to see the differences")
        yield Package.load(result.outdir, check_hashes=False), "model file"


def evaluate(path: str | Path, data: str | Path | Dataset, options: EvaluateOptions | None = None,
             progress: Progress | None = None) -> dict:
    """Top-1/top-5 accuracy of ``path``'s source model and of every artifact its package
    ships that runs here, on ``data``; for each artifact its agreement with the source and
    the largest logit difference. Returns the report (see ``structexport evaluate --help``)."""
    opts = options or EvaluateOptions()
    report_to = progress or Progress()
    say = report_to.stage
    t0 = time.perf_counter()
    dataset = data if isinstance(data, Dataset) else open_dataset(data)
    if opts.limit is not None and opts.limit < 1:
        raise EvaluateUsageError(f"--limit {opts.limit}: evaluate at least one image", "give 1 or more")
    with contextlib.ExitStack() as stack:
        package, kind = stack.enter_context(_package_for(path, opts, say))
        preprocess, preprocess_from = resolve_preprocess(package, opts)
        if len(package.inputs) > 1:
            raise EvaluateUsageError(f"{package.root} takes several inputs "
                                     f"({', '.join(i['name'] for i in package.inputs)}); evaluate runs "
                                     "image classifiers with one image input")
        num_classes = _num_classes(package)
        dataset.check_for(preprocess, package.input_shape, num_classes, opts.limit)
        k = min(TOPK, num_classes or TOPK)
        names = _select_artifacts(package, opts)
        source, source_reason = _source_runner(package, opts, say)
        artifacts, skipped = _artifact_runners(package, names, opts, say)
        runners = ([source] if source else []) + artifacts
        if not runners:
            raise EvaluateUsageError(f"nothing of {package.root} can run here: "
                                     + "; ".join(f"{n}: {why}" for n, why in skipped.items()))
        total = min(len(dataset), opts.limit) if opts.limit else len(dataset)
        tallies = {r.label: _Tally(k) for r in runners}
        report_to.start([r.label for r in runners], total)
        for batch in dataset.batches(preprocess, opts.batch_size, opts.limit):
            reference = None
            for runner in runners:
                t = time.perf_counter()
                logits = runner.run(batch.x)
                tallies[runner.label].seconds += time.perf_counter() - t
                if num_classes is None:    # the graph leaves it symbolic: the first run says
                    num_classes = logits.shape[1]
                    dataset.check_for(preprocess, package.input_shape, num_classes, opts.limit)
                if logits.shape[1] != num_classes:
                    raise DataClassCountError(f"{runner.label} gives {logits.shape[1]} outputs per image, "
                                              f"{package.model_onnx.name} {num_classes}")
                if runner is source:
                    reference = logits
                tallies[runner.label].add(logits, batch.labels, batch.start,
                                          reference if runner is not source else None)
                report_to.advance(runner.label, len(batch.labels))
        for runner in runners:
            runner.close()
    from structexport.machine import machine
    m = machine()
    return {
        "images": total,
        "data": {"path": str(dataset.path), "kind": dataset.kind, "form": getattr(dataset, "form", None),
                 "images_in_data": len(dataset), "classes": dataset.classes, "limit": opts.limit},
        "preprocess": preprocess.to_dict(), "preprocess_from": preprocess_from,
        "model": {"path": str(path), "kind": kind, "arch": package.arch, "target": package.target,
                  "precision": package.precision, "input_shape": list(package.input_shape),
                  "source": package.source_path},
        "num_classes": num_classes, "topk": k,
        "source": tallies["source"].to_dict(source, False) if source else None,
        "source_unavailable": source_reason,
        "artifacts": {r.label: tallies[r.label].to_dict(r, True) for r in artifacts},
        "skipped": skipped,
        "machine": {"cpu": m["cpu"]["model"], "cores": m["cpu"]["cores"]},
        "seconds": round(time.perf_counter() - t0, 3),
    }


# --------------------------------------------------------------------------- reports

def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def rows(report: dict, runtime: bool = True) -> tuple[list[str], list[list[str]]]:
    """The table ``evaluate`` prints (and writes as Markdown): one row per model (the runtime
    column last; ``runtime=False`` leaves it out, see :func:`runtimes`)."""
    head = ["model", "top-1 %", "top-5 %" if report["topk"] == TOPK else f"top-{report['topk']} %",
            "agreement %", "max logit diff", "seconds", "runtime"]
    body = []
    if report["source"]:
        s = report["source"]
        body.append(["source", _pct(s["top1"]), _pct(s["top5"]), "", "", f"{s['seconds']:.1f}", s["runtime"]])
    for name, a in report["artifacts"].items():
        diff = a.get("max_logit_diff")
        body.append([name, _pct(a["top1"]), _pct(a["top5"]), _pct(a.get("agreement")),
                     "-" if diff is None else f"{diff:.3g}", f"{a['seconds']:.1f}", a["runtime"]])
    if not runtime:
        return head[:-1], [row[:-1] for row in body]
    return head, body


def runtimes(report: dict) -> list[str]:
    """``model: runtime`` for each model in the table."""
    out = [f"source: {report['source']['runtime']}"] if report["source"] else []
    return out + [f"{name}: {a['runtime']}" for name, a in report["artifacts"].items()]


def notes(report: dict) -> list[str]:
    out = []
    if report["source"] is None:
        out.append(f"source not evaluated: {report['source_unavailable']}")
    for name, why in report["skipped"].items():
        out.append(f"{name} not evaluated: {why}")
    return out


def title(report: dict) -> str:
    d, m = report["data"], report["model"]
    pp = Preprocess.from_dict(report["preprocess"]).describe()
    return (f"{m['arch']} ({m['target']}, {m['precision']}) on {report['images']:,} images of {d['path']}, "
            f"preprocessing {pp}")


def markdown(report: dict) -> str:
    head, body = rows(report)
    lines = [f"# evaluate: {report['model']['path']}", "", title(report) + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in body]
    lines += [""] + [f"- {n}" for n in notes(report)]
    return "\n".join(lines).rstrip() + "\n"
