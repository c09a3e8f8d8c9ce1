"""ONNX export and verification against the PyTorch source model.

Export: torch's dynamo exporter at opset 18, simplified with onnxsim, checked with
``onnx.checker``. Verification (after Optimum's and onnxsim's checks): run the ONNX model
under ONNX Runtime with its graph optimizations *off* on several random inputs and on the
user's own, and compare each output with the source model's -- shapes first, then values
-- collecting every failure with its max absolute and relative difference and the
tolerance.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from structexport.errors import StructExportError
from structexport.ortsession import ort_session

OPSET = 18
# Elementwise |got - want| <= atol + rtol * |want|, per precision (overridable).
TOLERANCES = {"fp32": {"atol": 1e-4, "rtol": 1e-4}, "fp16": {"atol": 2e-2, "rtol": 2e-2},
              # INT8 files are checked against their own fake-quantized graph, at a few of its
              # output quantization steps (computed per model: structexport.quantize)
              "int8": {"atol": 0.0, "rtol": 0.0}}


class ExportError(StructExportError):
    exit_code, kind = 31, "export-failed"


class VerificationError(StructExportError):
    exit_code, kind = 32, "verification-failed"


@contextlib.contextmanager
def quiet():
    """The exporter prints progress and warnings of its own; keep the user's terminal ours."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def quiet_export_legacy(model: nn.Module, example, path: Path, opset: int = 17,
                        input_names: list[str] | None = None) -> None:
    """The TorchScript-based exporter, for modules dynamo cannot trace (TorchScript archives).
    ``example``: one tensor, or a tuple of one per input (named ``input_names``)."""
    args = example if isinstance(example, tuple) else (example,)
    try:
        with quiet(), torch.no_grad():
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset,
                              input_names=input_names)
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}",
                          "export the model to ONNX yourself and convert the .onnx file") from None


def source_to_onnx(source, progress=None):
    """A front end's torch source exported to ONNX at its fixed input shape (dynamo;
    TorchScript, which dynamo cannot trace, by the TorchScript-based exporter)."""
    import tempfile

    import onnx
    if progress:
        progress("export to ONNX")
    several = source.several_inputs
    example = source.example_inputs(0) if several else source.example_input(0)
    names = [spec.name for spec in source.inputs] if several else None
    with tempfile.TemporaryDirectory(prefix="structexport-export-") as tmp:
        path = Path(tmp) / "source.onnx"
        if source.format == "torchscript":
            quiet_export_legacy(source.module, example, path, input_names=names)
        else:
            export_onnx(source.module, example, path, input_names=names)
        return onnx.load(str(path))


def export_onnx(model: nn.Module, example, path: Path, simplify: bool = True,
                fold_constants: bool = True, input_names: list[str] | None = None) -> dict:
    """Export ``model`` to ``path``; returns what was done (opset, simplification, op counts).
    ``example``: one tensor (the graph input is called ``input``), or a tuple of one per
    input, named ``input_names``."""
    args = example if isinstance(example, tuple) else (example,)
    input_names = input_names or ["input"]
    import onnx
    try:   # a torch.export program's module refuses eval(): it is fixed at export time
        model = model.eval()
    except NotImplementedError:
        pass
    try:
        with quiet(), torch.no_grad():
            program = torch.onnx.export(model, args, dynamo=True, opset_version=OPSET,
                                        input_names=input_names,
                                        output_names=["output"] if len(args) == 1 else None)
            program.save(str(path))
    except Exception as exc:
        raise ExportError(f"ONNX export failed: {type(exc).__name__}: "
                          f"{(str(exc).splitlines() or [''])[0][:200]}") from exc
    info = {"opset": OPSET, "exporter": "torch.onnx dynamo", "simplified": False}
    if simplify:
        import onnxsim
        try:
            with quiet():
                simplified, ok = onnxsim.simplify(onnx.load(str(path)),
                                                  skip_constant_folding=not fold_constants)
        except Exception as exc:  # keep the unsimplified model, say why
            info["simplify_error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
        else:
            if ok:
                onnx.save(simplified, str(path))
                info["simplified"] = True
            else:
                info["simplify_error"] = "onnxsim's own check failed; kept the unsimplified model"
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"onnx.checker rejected the exported model: {str(exc).splitlines()[0][:200]}") from exc
    graph = onnx.load(str(path)).graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    info["ops"] = dict(sorted(ops.items()))
    return info


@dataclass
class OutputCheck:
    input: str
    output: str
    shape_ok: bool
    expected_shape: list[int]
    got_shape: list[int]
    max_abs_diff: float | None = None
    max_rel_diff: float | None = None
    atol: float = 0.0
    rtol: float = 0.0
    passed: bool = False


@dataclass
class Verification:
    passed: bool
    precision: str
    atol: float
    rtol: float
    runtime: str
    checks: list[OutputCheck] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((c.max_abs_diff or 0.0 for c in self.checks), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((c.max_rel_diff or 0.0 for c in self.checks), default=0.0)

    def failures(self) -> list[OutputCheck]:
        return [c for c in self.checks if not c.passed]

    def summary(self) -> str:
        bad = self.failures()
        if not bad:
            return (f"{len(self.checks)} output checks passed (max abs diff {self.max_abs_diff:.3g}, "
                    f"max rel diff {self.max_rel_diff:.3g}; atol {self.atol:g}, rtol {self.rtol:g})")
        parts = []
        for c in bad[:3]:
            if not c.shape_ok:
                parts.append(f"{c.input}/{c.output}: shape {c.got_shape} != {c.expected_shape}")
            else:
                parts.append(f"{c.input}/{c.output}: max abs diff {c.max_abs_diff:.3g}, "
                             f"max rel diff {c.max_rel_diff:.3g}")
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return (f"{len(bad)} of {len(self.checks)} output checks failed ({'; '.join(parts)}{more}; "
                f"atol {self.atol:g}, rtol {self.rtol:g})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["max_abs_diff"], d["max_rel_diff"] = self.max_abs_diff, self.max_rel_diff
        return d


def reference_outputs(reference: nn.Module, inputs: dict[str, torch.Tensor]
                      ) -> dict[str, list[np.ndarray]]:
    """The source model's outputs on every input (float64 where the model is). The
    reference is a torch module, or a function of a float32 array returning arrays (an ONNX
    source under ONNX Runtime)."""
    out = {}
    for label, x in inputs.items():
        if isinstance(x, dict):      # several inputs, by name
            if not isinstance(reference, nn.Module):
                out[label] = [np.asarray(o, dtype=np.float64) for o in reference(x)]
                continue
            with torch.no_grad():
                want = reference(*(torch.from_numpy(np.array(v, order="C")) for v in x.values()))
        elif not isinstance(reference, nn.Module):
            out[label] = [np.asarray(o, dtype=np.float64) for o in reference(x.numpy().astype(np.float32))]
            continue
        else:
            param = next(iter(reference.parameters()), None)
            with torch.no_grad():
                want = reference(x.to(param.dtype) if param is not None and param.is_floating_point() else x)
        wants = [want] if isinstance(want, torch.Tensor) else _flatten_outputs(want)
        out[label] = [w.detach().double().numpy() for w in wants]
    return out


def _flatten_outputs(outputs) -> list:
    """A module's outputs as a flat list of tensors, in the order ONNX export lists them."""
    flat = []
    for o in outputs:
        flat.extend([o] if isinstance(o, torch.Tensor) else _flatten_outputs(o))
    return flat


def cast_sample(x, np_dtype):
    """A sample (one array, or arrays by input name) with its floating arrays cast to ``np_dtype``."""
    if isinstance(x, dict):
        return {k: (np.asarray(v).astype(np_dtype) if np.issubdtype(np.asarray(v).dtype, np.floating)
                    else np.asarray(v)) for k, v in x.items()}
    return np.asarray(x).astype(np_dtype)


def sample_shape(x) -> str:
    if isinstance(x, dict):
        return ", ".join(f"{k} {list(np.shape(v))}" for k, v in x.items())
    return str(list(np.shape(x)))


def verify_runner(reference: nn.Module, run, inputs: dict[str, torch.Tensor], precision: str = "fp32",
                  atol: float | None = None, rtol: float | None = None,
                  runtime: str = "onnxruntime (graph optimizations off)") -> Verification:
    """Compare ``run(x: np.ndarray) -> list[np.ndarray]`` with ``reference`` on every input:
    per output, shapes first, then values; every failure is kept."""
    return verify_arrays(run, {k: v if isinstance(v, dict) else v.numpy() for k, v in inputs.items()},
                         reference_outputs(reference, inputs), precision, atol, rtol, runtime)


def verify_arrays(run, inputs: dict[str, np.ndarray], expected: dict[str, list[np.ndarray]],
                  precision: str = "fp32", atol: float | None = None, rtol: float | None = None,
                  runtime: str = "onnxruntime (graph optimizations off)") -> Verification:
    """Compare ``run(x) -> list[np.ndarray]`` with the ``expected`` outputs of every input
    (a package's stored verification data, or a source model's outputs)."""
    tol = TOLERANCES[precision]
    atol = tol["atol"] if atol is None else atol
    rtol = tol["rtol"] if rtol is None else rtol
    np_dtype = np.float16 if precision == "fp16" else np.float32
    result = Verification(True, precision, atol, rtol, runtime)
    for label, x in inputs.items():
        wants = expected[label]
        try:
            gots = run(cast_sample(x, np_dtype))
        except StructExportError:  # e.g. the device was lost: its own error and exit code
            raise
        except Exception as exc:
            raise VerificationError(f"{runtime} could not run the model on input {label} "
                                    f"{sample_shape(x)}: {(str(exc).splitlines() or [''])[0][:200]}",
                                    "check --input-shape and the --inputs file") from None
        for i, (w, g) in enumerate(zip(wants, gots)):
            w = np.asarray(w, dtype=np.float64)
            g = np.asarray(g, dtype=np.float64)
            check = OutputCheck(label, f"output{i}" if len(wants) > 1 else "output",
                                list(w.shape) == list(g.shape), list(w.shape), list(g.shape),
                                atol=atol, rtol=rtol)
            if check.shape_ok:
                diff = np.abs(g - w)
                check.max_abs_diff = float(diff.max()) if diff.size else 0.0
                check.max_rel_diff = float((diff / np.maximum(np.abs(w), 1e-12)).max()) if diff.size else 0.0
                check.passed = bool(np.all(diff <= atol + rtol * np.abs(w)))
            result.checks.append(check)
            result.passed &= check.passed
        if len(gots) != len(wants):
            result.passed = False
            result.checks.append(OutputCheck(label, f"{len(gots)} outputs", False,
                                             [len(wants)], [len(gots)]))
    return result


def onnx_runner(onnx_path: Path):
    """``run(x) -> outputs`` of an ONNX model under ONNX Runtime, graph optimizations off."""
    from structexport.ortsession import session_runner
    return session_runner(ort_session(onnx_path, optimize=False))


def verify_onnx(reference: nn.Module, onnx_path: Path, inputs: dict[str, torch.Tensor],
                precision: str = "fp32", atol: float | None = None, rtol: float | None = None
                ) -> Verification:
    """Compare ONNX Runtime (optimizations off) with ``reference`` (float32 or float64)."""
    return verify_runner(reference, onnx_runner(onnx_path), inputs, precision, atol, rtol)
