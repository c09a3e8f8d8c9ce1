"""INT8 for the litert target: PT2E with litert-torch's own quantizer (``PT2EQuantizer``), on
the rewritten torch module, with the decisions of the executorch target
(:mod:`structexport.executorch_int8`, whose runtime-independent pieces it reuses: the rebase,
the composed dense layer, the layer key, the check data):

- the banded channel sums rebased (``DecomposedStructuredConv.rebase_channel_sums``);
- per layer, structured or its composed dense conv, whichever runs faster in INT8 under
  LiteRT/XNNPACK on this machine (timed per layer shape, cached per machine in
  ``$STRUCTEXPORT_CACHE/litert-int8-layers.json``);
- symmetric int8 weights per output channel, int8 activations calibrated on real images;
  the model's input and output are int8 (the runner quantizes and dequantizes);
- the integer model checked against its fake-quantized graph, gated on held-out images.

litert-torch 0.10.0 needs two things the ExecuTorch path does not: ``quant_config`` (without
it the q/dq pairs stay float ops and XNNPACK takes no integer conv), and every user of a
dequantize node given its own copy (:func:`duplicate_shared_dq`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from structexport.executorch_int8 import ProgramInt8, fake_outputs, output_atol, time_layer_forms
from structexport.litert_lower import convert_to_tflite


def layer_cache_path() -> Path:
    from structexport.fsutil import cache_root
    return cache_root() / "litert-int8-layers.json"


def duplicate_shared_dq(graph):
    """Every user of a dequantize node given its own copy (``meta`` included). litert-torch
    0.10.0's layout pass loses a shared dequantize's ``meta['val']`` when one user stays NCHW
    (``F.pad``) and another goes NHWC (the residual add): "Attempting to convert non-NHWC
    compatible node to NHWC"."""
    import torch
    dq = {torch.ops.quantized_decomposed.dequantize_per_tensor.default,
          torch.ops.quantized_decomposed.dequantize_per_channel.default}
    for node in list(graph.graph.nodes):
        if node.op == "call_function" and node.target in dq and len(node.users) > 1:
            for user in list(node.users)[1:]:
                with graph.graph.inserting_after(node):
                    twin = graph.graph.node_copy(node)
                    twin.meta = dict(node.meta)
                user.replace_input_with(node, twin)
    graph.graph.lint()
    graph.recompile()
    return graph


def quantize_pt2e(module, example, calibration: np.ndarray):
    """``module`` quantized by PT2E with litert-torch's quantizer (symmetric, per-channel
    weights), calibrated on ``calibration`` (N, C, H, W) in batches of ``example``'s size:
    (the fake-quantized graph, ready to convert; the quantizer, which the conversion needs)."""
    import torch

    from structexport.litert_runtime import quiet_litert, require_litert_converter
    require_litert_converter()
    with quiet_litert():
        from litert_torch.quantize import pt2e_quantizer
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    batch = example.shape[0]
    with torch.no_grad(), quiet_litert():
        if not isinstance(module, torch.fx.GraphModule):   # an exported program's module has no eval()
            module = module.eval()
        graph = torch.export.export(module, (example,)).module()
        quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
            pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(graph, quantizer)
        for start in range(0, len(calibration) - batch + 1, batch):
            prepared(torch.from_numpy(np.ascontiguousarray(calibration[start:start + batch])))
        fake = convert_pt2e(prepared, fold_quantize=False)   # as litert-torch's own tests do
    return duplicate_shared_dq(fake), quantizer


def quantized_program(module, example, calibration: np.ndarray, inputs: dict[str, np.ndarray],
                      path: Path, structured_layers: list[str] | None = None) -> tuple[ProgramInt8, dict]:
    """Quantize ``module``, convert it to ``path``; (its check data, its delegation report)."""
    fake, quantizer = quantize_pt2e(module, example, calibration)
    expected = fake_outputs(fake, inputs)
    report = convert_to_tflite(fake, example, path, structured_layers, quantizer=quantizer, names_from=module)
    return ProgramInt8(expected, output_atol(fake, next(iter(expected.values()))), fake), report


# ------------------------------------------------------------------ per-layer choice

def time_layer_int8(layer, in_shape, workdir: Path, threads: int = 1) -> dict[str, float]:
    """:func:`structexport.executorch_int8.time_layer_forms` under LiteRT/XNNPACK."""
    from structexport.litert_runtime import timer

    def build(module, example, calibration, path):
        fake, quantizer = quantize_pt2e(module, example, calibration)
        convert_to_tflite(fake, example, path, quantizer=quantizer)
    return time_layer_forms(layer, in_shape, workdir, build, ".tflite", timer, threads)
