"""The dense reference of a structured model: the same network with every structured layer
replaced by its dense-equivalent kernel, so both compute the same outputs.

It is what a conversion is verified against and, exported beside the artifact as
``reference.onnx``, the dense counterpart that ``bench`` and ``profile`` time the artifact
against -- on any machine, without the source checkpoint.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from structexport.errors import StructExportError
from structexport.layers import CSGConv2d, SSCConv2d, StructuredConv2d, StructuredLinear

# Passes that do not touch a layer's structure: the reference gets them too, so that it
# differs from the artifact only where the structure does (batch norm folded alike).
NON_STRUCTURAL_PASSES = ("fold_batchnorm",)


class DenseReferenceError(StructExportError):
    exit_code, kind = 40, "reference-failed"


def dense_counterpart(model: nn.Module) -> nn.Module:
    """The same network with every structured layer replaced by its dense kernel."""
    from structexport.passes.infra import replace_module
    dense = copy.deepcopy(model).eval()
    for name, module in list(dense.named_modules()):
        if isinstance(module, (CSGConv2d, StructuredConv2d, StructuredLinear, SSCConv2d)):
            replace_module(dense, name, module.to_dense())
    for name in [n for n, _ in dense.named_children() if n == "generator"]:
        delattr(dense, name)
    return dense


def checked_dense_counterpart(source: nn.Module, example: torch.Tensor, arch: str) -> nn.Module:
    """:func:`dense_counterpart`, checked to reproduce ``source`` on ``example``."""
    dense = dense_counterpart(source)
    with torch.no_grad():
        ref, got = source(example), dense(example)
    if not torch.allclose(ref, got, atol=1e-4, rtol=1e-4):
        raise DenseReferenceError(f"the dense counterpart of {arch} does not reproduce it "
                             f"(max abs diff {float((ref - got).abs().max()):.3g})",
                             "report this: a structured layer's to_dense() is wrong")
    return dense


def dense_reference_module(source: nn.Module, example: torch.Tensor, arch: str, passes: list[str],
                           target: str) -> tuple[nn.Module, list[str]]:
    """The checked dense counterpart of ``source`` with those of ``passes`` that are not
    structural (batch norm folded as the structured model's is); (module, passes applied)."""
    from structexport.passes import PassContext, PassManager, select_passes
    dense = checked_dense_counterpart(source, example, arch)
    applied = [p for p in passes if p in NON_STRUCTURAL_PASSES]
    if applied:
        manager = PassManager(select_passes(applied), check_inputs=example)
        dense, _runs = manager.run(dense, PassContext(target, tuple(example.shape), {}))
    return dense.eval(), applied


def export_reference(source: nn.Module, example: torch.Tensor, arch: str, passes: list[str],
                     target: str, path: Path, dense: nn.Module | None = None) -> dict:
    """Export the checked dense counterpart of ``source`` to ``path`` (``dense``: one made
    already by :func:`dense_reference_module`), returns the export's info."""
    from structexport.export import export_onnx
    applied = [p for p in passes if p in NON_STRUCTURAL_PASSES]
    if dense is None:
        dense, applied = dense_reference_module(source, example, arch, passes, target)
    info = export_onnx(dense, example, path)
    info["passes"] = applied
    return info
