"""Pass infrastructure: small named rewrites of a model, and a manager that runs them.

A pass checks its preconditions (:meth:`Pass.requires`), rewrites the model
(:meth:`Pass.call`), checks its postconditions (:meth:`Pass.ensures`) and returns a
:class:`PassResult`: the model, whether it changed, and one record per layer it touched.

Passes rewrite at the level of ``nn.Module``s: every structured layer is a module, so
replacing modules keeps the source model's layer names for per-layer records and for
mapping profiles back, and the rewritten model stays an ordinary eager model that the
ONNX exporter traces. Graph-shaped questions (which BN follows which conv) use a
``torch.fx`` trace read-only.

The same contract serves passes over ONNX graphs (``ir = "onnx"``, an ``onnx_ir.Model``:
for models that arrive as ONNX, or any model exported to it), which the manager copies,
runs and checks through :class:`ModelKind` (:data:`ONNX`).

The :class:`PassManager` orders passes, times each one, can compare the model's outputs
after each pass with the outputs before the first, and on failure names the failing pass
and the passes that ran before it.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from structexport.errors import StructExportError


class PassError(StructExportError):
    """A pass refused its input or broke its promise; names the pass and those before it."""
    exit_code, kind = 30, "pass-failed"


class PassOptionError(StructExportError):
    """A pass or pass option the model's path cannot honour: refused, never ignored."""
    exit_code, kind = 2, "usage"


@dataclass
class PassContext:
    """What passes may read: the target, the example input shape and user options."""
    target: str = "onnx"
    input_shape: tuple[int, ...] = (1, 3, 32, 32)
    options: dict = field(default_factory=dict)

    def option(self, key: str, default=None):
        return self.options.get(key, default)


@dataclass
class LayerRecord:
    layer: str
    action: str
    details: dict = field(default_factory=dict)


@dataclass
class PassResult:
    module: nn.Module
    modified: bool
    records: list[LayerRecord] = field(default_factory=list)


@dataclass
class PassRun:
    name: str
    modified: bool
    seconds: float
    records: list[LayerRecord]
    max_abs_diff: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ModelKind:
    """What a pass manager needs to know of the IR its passes rewrite: how to copy a
    model (passes rewrite in place), to settle it after a pass, and to run it on an input
    (the output check after every pass)."""
    name: str
    copy: Callable
    settle: Callable
    run: Callable


def _run_torch(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module(x)


TORCH = ModelKind("torch", lambda m: copy.deepcopy(m).eval(), lambda m: m.eval(), _run_torch)


def _copy_onnx(model):
    import onnx_ir as ir
    return ir.from_proto(ir.to_proto(model))


def _run_onnx(model, x) -> torch.Tensor:
    """The graph under ONNX Runtime with its optimizations off (what the pass wrote, run as
    written), on one input: a tensor, or arrays by input name for a model with several."""
    import onnx_ir as ir

    from structexport.ortsession import ort_session, session_runner
    session = ort_session(ir.to_proto(model).SerializeToString(), optimize=False)
    return torch.from_numpy(session_runner(session)(x if isinstance(x, dict) else x.numpy())[0])


ONNX = ModelKind("onnx", _copy_onnx, lambda m: m, _run_onnx)


class Pass:
    """Base class. Subclasses set ``name`` and ``description`` and implement :meth:`call`;
    ``ir`` says what they rewrite: ``"torch"`` (an ``nn.Module``) or ``"onnx"`` (an
    ``onnx_ir.Model``)."""
    name = ""
    description = ""
    ir = "torch"
    # A pass that moves the outputs on purpose (projecting weights onto a structure they
    # only approximately have): the manager checks the passes after it against its output.
    changes_outputs = False

    def requires(self, module: nn.Module, ctx: PassContext) -> None:
        """Raise :class:`PassError` when the model cannot take this pass."""

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def ensures(self, module: nn.Module, ctx: PassContext) -> None:
        """Raise :class:`PassError` when the rewrite left what it should have removed."""

    def __call__(self, module: nn.Module, ctx: PassContext) -> PassResult:
        self.requires(module, ctx)
        result = self.call(module, ctx)
        self.ensures(result.module, ctx)
        return result


def replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` is."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def modules_of(root: nn.Module, kinds) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in root.named_modules() if isinstance(m, kinds)]


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


class PassManager:
    """Runs passes in order on a copy of the model.

    ``check_inputs``: example inputs; when given, the outputs after every pass are compared
    with the source model's, and a pass whose outputs move by more than ``atol + rtol *
    |reference|`` fails, named with the passes before it.
    """

    def __init__(self, passes: list[Pass], check_inputs: torch.Tensor | None = None,
                 atol: float = 1e-4, rtol: float = 1e-4,
                 progress: Callable[[str], None] | None = None, model_kind: ModelKind | None = None):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"a pass appears twice: {names}")
        self.kind = model_kind or TORCH
        wrong = [p.name for p in passes if p.ir != self.kind.name]
        if wrong:
            raise ValueError(f"passes {wrong} rewrite another IR than {self.kind.name}")
        self.passes, self.check_inputs = passes, check_inputs
        self.atol, self.rtol, self.progress = atol, rtol, progress

    def run(self, module, ctx: PassContext) -> tuple[object, list[PassRun]]:
        kind = self.kind
        module = kind.copy(module)
        self.reference_model = None      # set by a pass that changes the outputs on purpose
        reference = None
        if self.check_inputs is not None:
            reference = kind.run(module, self.check_inputs)
        runs: list[PassRun] = []
        for p in self.passes:
            if self.progress:
                self.progress(p.name)
            before = [r.name for r in runs]
            start = time.perf_counter()
            try:
                result = p(module, ctx)
            except PassError as exc:
                raise PassError(f"pass {p.name} failed: {exc.message}"
                                + (f" (after {', '.join(before)})" if before else ""),
                                exc.hint) from None
            except StructExportError:
                raise
            except Exception as exc:
                first_line = (str(exc).splitlines() or [""])[0][:200]
                raise PassError(f"pass {p.name} crashed: {type(exc).__name__}: {first_line}"
                                + (f" (after {', '.join(before)})" if before else ""),
                                "rerun with --skip-pass " + p.name + " to convert without it") from exc
            module = kind.settle(result.module)
            run = PassRun(p.name, result.modified, time.perf_counter() - start, result.records)
            if p.changes_outputs and result.modified:
                # Deliberately moves the outputs (approximate structure, projected weights):
                # what follows is checked against the model as this pass left it.
                self.reference_model = kind.copy(module)
                if reference is not None:
                    out = kind.run(module, self.check_inputs)
                    run.max_abs_diff = max_abs_diff(out, reference)
                    reference = out
                runs.append(run)
                continue
            if reference is not None:
                out = kind.run(module, self.check_inputs)
                run.max_abs_diff = max_abs_diff(out, reference)
                bound = self.atol + self.rtol * float(reference.abs().max())
                if out.shape != reference.shape or not run.max_abs_diff <= bound:
                    raise PassError(
                        f"pass {p.name} changed the model's outputs: max abs difference "
                        f"{run.max_abs_diff:.3g} > {bound:.3g}"
                        + (f" (after {', '.join(before)})" if before else ""),
                        f"rerun with --skip-pass {p.name} to convert without it")
            runs.append(run)
        return module, runs
