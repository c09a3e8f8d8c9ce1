"""INT8 for the executorch target: PT2E with XNNPACK's own quantizer, on the rewritten torch
module, with the same decisions as ONNX Runtime's INT8 stage (docs/int8.md):

- the banded channel sums rebased (``DecomposedStructuredConv.rebase_channel_sums``): one
  sum scaled by ``1 / sqrt(kc)`` and differences of two channels, exact in int8;
- per layer, structured or its composed dense conv, whichever runs faster in INT8 under
  ExecuTorch/XNNPACK on this machine (timed per layer shape, cached per machine);
- symmetric int8 weights per output channel, int8 activations calibrated on real images;
- the integer program checked against its fake-quantized graph, gated on held-out images
  against the float32 source, and the dense model quantized the same way as the baseline.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from structexport.executorch_lower import lower_to_pte
from structexport.quantize import OUTPUT_STEPS, agreement, gate_failures, logits_function, valid_timing

LAYER_TIMING_REPEAT = 30
CALIBRATION_FOR_TIMING = 4     # random inputs: a layer's speed does not depend on its ranges


@dataclass
class ProgramInt8:
    """A quantized program's check data: outputs of its fake-quantized graph on the
    verification inputs, and the tolerance its integer kernels are held to."""
    expected: dict
    atol: float
    fake: object                # the fake-quantized torch graph


def layer_cache_path() -> Path:
    from structexport.fsutil import cache_root
    return cache_root() / "executorch-int8-layers.json"


def quantize_pt2e(module, example, calibration: np.ndarray):
    """``module`` quantized by PT2E with XNNPACK's quantizer (symmetric, per-channel weights),
    calibrated on ``calibration`` (N, C, H, W) one image at a time (the program's batch is
    ``example``'s): the fake-quantized graph, ready to lower."""
    import torch

    from structexport.executorch_runtime import quiet_executorch
    with quiet_executorch():
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
            XNNPACKQuantizer, get_symmetric_quantization_config)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    batch = example.shape[0]
    if not isinstance(module, torch.fx.GraphModule):   # an exported program's module has no eval()
        module = module.eval()
    with torch.no_grad(), quiet_executorch():
        graph = torch.export.export(module, (example,)).module()
        quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
        prepared = prepare_pt2e(graph, quantizer)
        for start in range(0, len(calibration) - batch + 1, batch):
            prepared(torch.from_numpy(np.ascontiguousarray(calibration[start:start + batch])))
        return convert_pt2e(prepared)


def output_atol(fake, expected: list[np.ndarray]) -> float:
    """``OUTPUT_STEPS`` quantization steps of the outputs: the scale of the dequantize that
    produces each one; 5% of the largest value where none does."""
    output = next(n for n in fake.graph.nodes if n.op == "output")
    produced = output.args[0]
    produced = list(produced) if isinstance(produced, (list, tuple)) else [produced]
    steps = []
    for node, ref in zip(produced, expected):
        name = str(getattr(node, "target", ""))
        scale = node.args[1] if "dequantize" in name and len(node.args) > 1 else None
        steps.append(OUTPUT_STEPS * float(scale) if isinstance(scale, (int, float))
                     else 0.05 * float(np.max(np.abs(ref))))
    return max(steps)


def fake_outputs(fake, inputs: dict[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    import torch
    out = {}
    with torch.no_grad():
        for label, x in inputs.items():
            y = fake(torch.from_numpy(np.ascontiguousarray(x)))
            y = y if isinstance(y, (list, tuple)) else [y]
            out[label] = [np.asarray(t.float().numpy(), np.float32) for t in y]
    return out


def quantized_program(module, example, calibration: np.ndarray, inputs: dict[str, np.ndarray],
                      path: Path, structured_layers: list[str] | None = None) -> tuple[ProgramInt8, dict]:
    """Quantize ``module``, lower it to ``path``; (its check data, its delegation report)."""
    fake = quantize_pt2e(module, example, calibration)
    expected = fake_outputs(fake, inputs)
    report = lower_to_pte(fake, example, path, structured_layers)
    return ProgramInt8(expected, output_atol(fake, next(iter(expected.values()))), fake), report


# ------------------------------------------------------------------ per-layer choice

def layer_inputs(module, names: list[str], example) -> dict[str, tuple[int, ...]]:
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


def composed(layer):
    """A decomposed structured conv as its dense conv (same outputs in float)."""
    import torch.nn as nn

    from structexport.layers.decomposed import recompose
    return recompose(nn.Sequential(copy.deepcopy(layer)))[0]


def layer_key(layer, in_shape) -> str:
    pool, conv = layer.pool, layer.conv
    return (f"in{list(in_shape)} window{list(pool.window)} pad{pool.padding} groups{pool.groups} "
            f"out{conv.out_channels} n{conv.kernel_size[0]} stride{conv.stride[0]}")


def time_layer_forms(layer, in_shape, workdir: Path, build, suffix: str, timer, threads: int = 1) -> dict[str, float]:
    """One layer alone, structured (rebased) and as its dense conv, each quantized and built
    for a runtime (``build(module, example, calibration, path)``; the runtime's ``timer``),
    timed interleaved: medians in ms."""
    import torch

    from structexport.timing import time_interleaved
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(in_shape, generator=gen)
    calibration = torch.randn((CALIBRATION_FOR_TIMING, *in_shape[1:]), generator=gen).numpy()
    structured = copy.deepcopy(layer)
    structured.rebase_channel_sums()
    timers = {}
    for form, module in (("structured", structured), ("dense", composed(layer))):
        path = workdir / f"layer-{form}{suffix}"
        build(module, example, calibration, path)
        timers[form] = timer(path, example.numpy(), threads)
    stats = time_interleaved(timers, None, LAYER_TIMING_REPEAT, 3)
    return {form: stats[form]["median"] for form in timers}


def time_layer_int8(layer, in_shape, workdir: Path, threads: int = 1) -> dict[str, float]:
    """:func:`time_layer_forms` under ExecuTorch/XNNPACK."""
    from structexport.executorch_runtime import timer
    return time_layer_forms(layer, in_shape, workdir,
                            lambda m, x, cal, path: lower_to_pte(quantize_pt2e(m, x, cal), x, path),
                            ".pte", timer, threads)


def choose_dense_layers(module, example, policy: str, say, *, time_layer, machine_label: str,
                        cache_path: Path, runtime: str, threads: int = 1) -> tuple[dict[str, str], dict]:
    """Which decomposed layers of ``module`` to ship dense in INT8 on a program target's
    runtime: ``{name: why}`` and the manifest's record (as
    :func:`structexport.quantize.choose_dense_layers` for ONNX Runtime). ``time_layer(layer,
    input shape)`` times one layer structured and dense on ``runtime``; its medians are cached
    in ``cache_path`` per machine (``machine_label`` and this CPU) and layer shape."""
    from structexport.layers.decomposed import DecomposedStructuredConv
    from structexport.passes.autotune import AutotuneCache, machine_key
    names = [n for n, m in module.named_modules() if isinstance(m, DecomposedStructuredConv)]
    record = {"policy": policy, "layers": []}
    if policy == "structured" or not names:
        return {}, record
    modules = dict(module.named_modules())
    shapes = layer_inputs(module, names, example)
    cache = AutotuneCache(cache_path)
    machine = machine_key(machine_label, threads)
    record.update({"cache": str(cache.path), "machine": machine})
    dense, measured, from_cache = {}, 0, 0
    for name in names:
        key = layer_key(modules[name], shapes[name])
        ms = cache.get(machine, key)
        cached = valid_timing(ms)
        from_cache += cached
        if not cached:
            say(f"int8: time {name} structured and dense under {runtime} ({key})")
            ms = time_layer(modules[name], shapes[name])
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


def int8_module(module, dense_layers: dict[str, str]):
    """A copy of ``module`` with ``dense_layers`` composed and every other banded structured
    layer rebased; the names rebased."""
    from structexport.layers.decomposed import DecomposedStructuredConv
    from structexport.passes.infra import replace_module
    out = copy.deepcopy(module)
    for name in dense_layers:
        replace_module(out, name, composed(dict(out.named_modules())[name]))
    return out, [n for n, m in out.named_modules()
                 if isinstance(m, DecomposedStructuredConv) and m.rebase_channel_sums()]


def gate(run, source, sets, opts, shipped: str) -> dict:
    """Top-1 agreement of an INT8 program (``run(x) -> outputs``) with the float32 source on
    the held-out images."""
    result = agreement(logits_function(source), lambda x: run(x)[0], sets.gate, sets.gate_labels, 1)
    failures = gate_failures(result, opts)
    result.update({"against": "the float32 source", "shipped": shipped,
                   "min_agreement": opts.min_agreement, "max_logit_diff_allowed": opts.max_logit_diff,
                   "passed": not failures, "failures": failures})
    return result
