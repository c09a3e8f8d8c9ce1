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

import copy
from pathlib import Path

import numpy as np

from structexport.executorch_int8 import (CALIBRATION_FOR_TIMING, LAYER_TIMING_REPEAT, ProgramInt8, composed,
                                          fake_outputs, layer_key, output_atol)
from structexport.litert_lower import convert_to_tflite
from structexport.quantize import agreement, gate_failures, logits_function


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
        graph = torch.export.export(module.eval(), (example,)).module()
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

def layer_input_shapes(module, names: list[str], example) -> dict[str, tuple[int, ...]]:
    """The input shape of each named submodule on ``example``."""
    import torch
    shapes, hooks = {}, []
    modules = dict(module.named_modules())
    for name in names:
        hooks.append(modules[name].register_forward_pre_hook(
            lambda _m, args, name=name: shapes.__setitem__(name, tuple(args[0].shape))))
    try:
        with torch.no_grad():
            module(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def time_layer_int8(layer, in_shape, workdir: Path, threads: int = 1) -> dict[str, float]:
    """One layer alone, structured (rebased) and as its dense conv, each quantized and
    converted to LiteRT, timed interleaved under XNNPACK: medians in ms."""
    import torch

    from structexport.litert_runtime import timer
    from structexport.timing import time_interleaved
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(in_shape, generator=gen)
    calibration = torch.randn((CALIBRATION_FOR_TIMING, *in_shape[1:]), generator=gen).numpy()
    structured = copy.deepcopy(layer)
    structured.rebase_channel_sums()
    timers = {}
    for form, module in (("structured", structured), ("dense", composed(layer))):
        path = workdir / f"layer-{form}.tflite"
        fake, quantizer = quantize_pt2e(module, example, calibration)
        convert_to_tflite(fake, example, path, quantizer=quantizer)
        timers[form] = timer(path, example.numpy(), threads)
    stats = time_interleaved(timers, None, LAYER_TIMING_REPEAT, 3)
    return {form: stats[form]["median"] for form in timers}


def choose_dense_layers(module, example, policy: str, workdir: Path, say,
                        cache_path: Path | None = None, threads: int = 1) -> tuple[dict[str, str], dict]:
    """Which decomposed layers of ``module`` to ship dense in INT8 on LiteRT: ``{name: why}``
    and the manifest's record (as the executorch target's choice, timed under LiteRT)."""
    from structexport.layers.decomposed import DecomposedStructuredConv
    from structexport.litert_runtime import require_litert_converter
    from structexport.passes.autotune import AutotuneCache, machine_key
    names = [n for n, m in module.named_modules() if isinstance(m, DecomposedStructuredConv)]
    record = {"policy": policy, "layers": []}
    if policy == "structured" or not names:
        return {}, record
    modules = dict(module.named_modules())
    shapes = layer_input_shapes(module, names, example)
    cache = AutotuneCache(cache_path or layer_cache_path())
    machine = machine_key(f"litert-torch {require_litert_converter()} int8 xnnpack", threads)
    record.update({"cache": str(cache.path), "machine": machine})
    dense, measured, from_cache = {}, 0, 0
    for name in names:
        key = layer_key(modules[name], shapes[name])
        ms = cache.get(machine, key)
        cached = isinstance(ms, dict) and all(isinstance(ms.get(k), (int, float)) and ms[k] > 0
                                              for k in ("structured", "dense"))
        from_cache += cached
        if not cached:
            say(f"int8: time {name} structured and dense under LiteRT ({key})")
            ms = time_layer_int8(modules[name], shapes[name], workdir, threads)
            cache.put(machine, key, ms)
            measured += 1
        faster = ms["structured"] < ms["dense"]
        record["layers"].append({"layer": name, "choice": "structured" if faster else "dense",
                                 "structured_ms": ms["structured"], "dense_ms": ms["dense"],
                                 "speedup": round(ms["dense"] / ms["structured"], 3), "cached": cached,
                                 "key": key})
        if not faster:
            dense[name] = (f"INT8 {ms['structured']:.4f} ms structured, {ms['dense']:.4f} ms dense"
                           + (" (cached)" if cached else ""))
    if measured:
        cache.save()
    record.update({"measured": measured, "from_cache": from_cache})
    return dense, record


def gate(source, program_path: Path, sets, opts, shipped: str) -> dict:
    """Top-1 agreement of the INT8 model with the float32 source on the held-out images."""
    from structexport.litert_runtime import runner
    run = runner(program_path)
    result = agreement(logits_function(source), lambda x: run(x)[0], sets.gate, sets.gate_labels, 1)
    failures = gate_failures(result, opts)
    result.update({"against": "the float32 source", "shipped": shipped,
                   "min_agreement": opts.min_agreement, "max_logit_diff_allowed": opts.max_logit_diff,
                   "passed": not failures, "failures": failures})
    return result
