"""Converting a torch module to a LiteRT ``.tflite`` with litert-torch, float32 or (a PT2E
graph quantized by litert-torch's quantizer) INT8, and the report of what XNNPACK takes."""
from __future__ import annotations

from pathlib import Path

from structexport.errors import StructExportError


class LiteRTExportError(StructExportError):
    exit_code, kind = 31, "export-failed"


def _contiguous(module):
    """Weights built as views (the decomposed layers' bands) converted contiguous."""
    import torch
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            if not tensor.is_contiguous():
                tensor.data = tensor.data.contiguous()
    return module


def convert_to_tflite(module, example, path: Path, structured_layers: list[str] | None = None,
                      quantizer=None, names_from=None) -> dict:
    """``module`` converted by litert-torch and written to ``path``; its delegation report.
    ``quantizer``: the PT2E quantizer ``module`` (a quantized graph) was prepared with, so that
    litert-torch writes integer kernels (without it the q/dq pairs stay float ops).
    ``names_from``: the torch module whose layer names the report uses (``module`` itself
    unless it is a graph traced from it)."""
    import torch

    from structexport.litert_runtime import delegation_report, quiet_litert, require_litert_converter
    require_litert_converter()
    with quiet_litert():
        import litert_torch
    if not isinstance(module, torch.fx.GraphModule):   # a PT2E-quantized graph has no eval()
        module = _contiguous(module.eval())
    kwargs = {}
    if quantizer is not None:
        from litert_torch.quantize.quant_config import QuantConfig
        kwargs["quant_config"] = QuantConfig(pt2e_quantizer=quantizer)
    try:
        with torch.no_grad(), quiet_litert():
            edge = litert_torch.convert(module, (example,), **kwargs)
            edge.export(str(path))
    except StructExportError:
        raise
    except Exception as exc:
        raise LiteRTExportError(f"litert-torch could not convert the model: "
                                f"{(str(exc).splitlines() or [''])[0][:240]}",
                                "report this with the model; --target ort-cpu takes it meanwhile") from None
    return delegation_report(path, structured_layers, names_from if names_from is not None else
                             (None if isinstance(module, torch.fx.GraphModule) else module))
