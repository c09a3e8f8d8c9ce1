"""One structure plan per model: what structure each layer has and what it becomes.

Both pipelines find or read the structure: the zoo's torch passes from the layer classes
(``decompose_structured``, ``realize_sumpool``, ``materialize_csg``, ``lower_ssc``), the ONNX
passes from the weights (``project_structured_weights``, ``decompose_structured_conv``,
``lower_sparse_conv``). :meth:`StructurePlan.from_runs` reads their per-layer records into
one plan, built once per conversion and stored in the manifest (``structure_plan``). Every
IR is then emitted from it:

- ONNX (``model.onnx``): the passes' own rewrite, which the plan records;
- ``torch.export`` programs (ExecuTorch, LiteRT): :mod:`structexport.plan_torch` writes the
  plan's decomposed layers into the torch module;
- TVM's fused operator (:func:`structexport.tvm_fused.fuse_structured_convs`): the plan's
  ``(c, n)`` per layer, matched to the composed graph's kernels by value
  (:meth:`StructurePlan.by_kernel`), instead of discovering the structure again.

Layer names are the weight's name without ``.weight`` (:func:`layer_of_weight`; a torch
module path for models exported from torch), the same in every pipeline.
"""
from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field

import numpy as np

from structexport.errors import StructExportError

PLAN_VERSION = 1

# What each form does at run time (the manifest's words)
STRUCTURED, DENSE = "structured", "dense"
ZOO_CLASS, DECLARED, DISCOVERED = "declared by the zoo class", "declared (--declare-structured)", \
    "discovered in the weights"


class PlanError(StructExportError):
    """A plan that does not fit the model it is applied to (a bug, not a user error)."""
    exit_code, kind = 1, "internal"


@dataclass
class PlannedLayer:
    layer: str
    kind: str                       # "structured conv", "structured linear", "csg", "block sparse"
    form: str = STRUCTURED          # STRUCTURED: rewritten; DENSE: kept as a plain conv
    origin: str = ""                # ZOO_CLASS, DECLARED, DISCOVERED
    C: int | None = None            # kernel C x N x N (input channels per group)
    N: int | None = None
    c: int | None = None            # coefficients c x n x n
    n: int | None = None
    residual: float | None = None   # relative distance of the given weight from its structure
    projected: bool = False         # the weight was moved onto its structure (--max-residual)
    realization: str | None = None  # how the ONNX graph computes it (sum-pool form, ...)
    reason: str | None = None       # why a structured layer is kept dense
    details: dict = field(default_factory=dict)

    @property
    def fused_structure(self) -> tuple[int, int] | None:
        """``(c, n)`` when TVM's fused operator should compute this layer, else None."""
        if self.kind == "structured conv" and self.form == STRUCTURED and self.c is not None:
            return self.c, self.n
        return None


@dataclass
class StructurePlan:
    layers: dict[str, PlannedLayer] = field(default_factory=dict)
    pipeline: str = ""              # "zoo (torch passes)" or "onnx passes"

    # ------------------------------------------------------------------ building
    @classmethod
    def from_runs(cls, runs, pipeline: str) -> "StructurePlan":
        """The plan the passes' records describe (``runs``: PassRun records or their dicts)."""
        plan = cls(pipeline=pipeline)
        for run in runs:
            run = run.to_dict() if hasattr(run, "to_dict") else run
            read = _READERS.get(run["name"])
            if read is None:
                continue
            for rec in run["records"]:
                read(plan, rec["layer"], rec["action"], rec.get("details") or {})
        return plan

    def _get(self, layer: str, kind: str) -> PlannedLayer:
        if layer not in self.layers:
            self.layers[layer] = PlannedLayer(layer, kind)
        return self.layers[layer]

    # ------------------------------------------------------------------ reading
    def decomposed(self) -> dict[str, PlannedLayer]:
        """The structured convs the plan rewrites (sum-pool + small conv)."""
        return {k: v for k, v in self.layers.items() if v.fused_structure is not None}

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for entry in self.layers.values():
            key = f"{entry.kind}: {entry.form}"
            out[key] = out.get(key, 0) + 1
        return out

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "pipeline": self.pipeline, "counts": self.counts(),
                "layers": [{k: v for k, v in asdict(e).items() if v not in (None, {}, "")}
                           for e in self.layers.values()]}

    @classmethod
    def from_dict(cls, data: dict | None) -> "StructurePlan | None":
        """The plan a manifest stores; None for a package written before plans existed."""
        if not data:
            return None
        if data.get("version") != PLAN_VERSION:
            raise PlanError(f"structure plan version {data.get('version')!r}, this structexport reads "
                            f"{PLAN_VERSION}", "convert the model again with this version")
        plan = cls(pipeline=data.get("pipeline", ""))
        for entry in data.get("layers", []):
            plan.layers[entry["layer"]] = PlannedLayer(**entry)
        return plan

    def by_kernel(self, weights: dict[str, np.ndarray]) -> dict[str, "KernelPlan"]:
        """``{kernel digest: KernelPlan}`` for every 4-D weight in ``weights`` (``{name:
        array}``, e.g. the composed graph's initializers): what a compiler that sees only
        constant values (TVM's Relax import) does with each conv it meets. Raises when a
        structured layer of the plan has no weight there."""
        kernels = {layer_of_weight(name): np.asarray(array) for name, array in weights.items()
                   if np.asarray(array).ndim == 4}
        out, missing = {}, [layer for layer in self.decomposed() if layer not in kernels]
        if missing:
            raise PlanError(f"{len(missing)} structured layer(s) of the plan have no weight in the composed "
                            f"graph ({', '.join(missing[:3])})",
                            "report this; --tvm-structured decomposed builds the decomposed graph instead")
        for layer, array in kernels.items():
            entry = self.layers.get(layer)
            out[kernel_digest(array)] = KernelPlan(layer, entry.fused_structure if entry else None,
                                                   _why_unfused(entry))
        return out


@dataclass(frozen=True)
class KernelPlan:
    """What the plan says of one conv kernel: its layer, ``(c, n)`` to fuse, or why not."""
    layer: str
    structure: tuple[int, int] | None
    reason: str | None = None


def _why_unfused(entry: PlannedLayer | None) -> str | None:
    if entry is None:
        return "no structure in the plan"
    if entry.fused_structure is not None:
        return None
    if entry.form == DENSE:
        return f"kept dense by the plan: {entry.reason}" if entry.reason else "kept dense by the plan"
    return f"{entry.kind} ({entry.realization}) in the plan"


def layer_of_weight(name: str) -> str:
    """The layer a weight belongs to: its name without ``.weight`` (``conv1.weight`` ->
    ``conv1``); a weight named otherwise (``onnx::Conv_38``) is its own layer."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def kernel_digest(array) -> str:
    """A name for a kernel's exact value (dtype, shape and bytes)."""
    array = np.ascontiguousarray(array)
    h = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
    h.update(array.tobytes())
    return h.hexdigest()[:24]


# ------------------------------------------------------------------ the passes' records

def _zoo_decomposed(plan, layer, action, d):
    if action != "decomposed":
        return
    structure = d.get("structure") or []
    kind = "structured linear" if len(structure) == 1 else "structured conv"
    entry = plan._get(layer, kind)
    entry.origin = DECLARED if d.get("source") == "declared dense conv" else ZOO_CLASS
    entry.c = structure[0] if structure else None
    entry.n = structure[1] if len(structure) > 1 else None
    entry.C, entry.N = d.get("C"), d.get("N")
    entry.residual, entry.projected = d.get("residual"), bool(d.get("residual"))


def _copy_decision(entry, d):
    """What decided the layer's form, from a record's details."""
    entry.details.update({k: d[k] for k in ("theoretical_speedup", "predicted_speedup", "chosen_by") if k in d})


def _block_sparse(plan, layer, action, d, origin):
    entry = plan._get(layer, "block sparse")
    entry.origin = origin
    if action == "lowered":
        entry.realization = "grouped convs"
    else:
        entry.form, entry.reason = DENSE, d.get("reason")


def _zoo_realized(plan, layer, action, d):
    owner = layer.rpartition(".")[0] if layer.endswith(".pool") else layer
    entry = plan.layers.get(owner)
    if entry is None:
        return
    if action == "kept dense":
        entry.form, entry.reason, entry.realization = DENSE, d.get("reason"), None
    else:
        entry.realization = d.get("realization")
    _copy_decision(entry, d)


def _csg(plan, layer, action, d):
    entry = plan._get(layer, "csg")
    entry.origin = ZOO_CLASS
    entry.realization = "precomputed kernel" if action == "materialized" else "codes at run time"


def _onnx_projected(plan, layer, action, d):
    entry = plan._get(layer, "structured conv")
    entry.projected, entry.residual = True, d.get("residual")
    entry.origin = DECLARED if d.get("declared") else DISCOVERED


def _onnx_decomposed(plan, layer, action, d):
    if action not in ("decomposed", "kept") or "c" not in d:
        return     # no structure found, or a conv the pass cannot take
    entry = plan._get(layer, "structured conv")
    entry.C, entry.N, entry.c, entry.n = d.get("C"), d.get("N"), d.get("c"), d.get("n")
    if not entry.projected:
        entry.residual = d.get("residual")
        entry.origin = DECLARED if d.get("declared") else DISCOVERED
    if action == "decomposed":
        entry.realization = d.get("realization")
    else:
        entry.form, entry.reason = DENSE, d.get("reason")
    _copy_decision(entry, d)


_READERS = {
    "decompose_structured": _zoo_decomposed,
    "realize_sumpool": _zoo_realized,
    "materialize_csg": _csg,
    "lower_ssc": lambda plan, layer, action, d: _block_sparse(plan, layer, action, d, ZOO_CLASS),
    "project_structured_weights": _onnx_projected,
    "decompose_structured_conv": _onnx_decomposed,
    "lower_sparse_conv": lambda plan, layer, action, d: _block_sparse(plan, layer, action, d, DISCOVERED),
}


def onnx_weights(model) -> dict[str, np.ndarray]:
    """``{initializer name: array}`` of an ONNX ModelProto (the weights the plan names)."""
    from onnx import numpy_helper
    return {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
