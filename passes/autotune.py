"""Measured choice of a sum-pool realization, cached per target, machine and layer shape.

For each decomposed layer the candidate realizations are exported as a one-layer ONNX
model (sum-pool + small conv) and timed under ONNX Runtime, interleaved; the fastest
wins. The layer is timed as it sits in a network: between two identity depthwise 1x1
convs, so that a realization ONNX Runtime keeps in its blocked layout (convs, 2-D pools)
is not charged the layout changes in and out that a lone layer pays, and one whose
element-wise channel sum leaves that layout is. Results are kept in a JSON cache so
converting again does not measure again.
The key holds everything the timing depends on: target, ONNX Runtime version, CPU model,
threads, and the layer's channels, window, padding, groups, small-conv shape and input size.

:class:`Tuner` is the one entry point of both pass families: ``realize_sumpool`` (zoo
models, torch modules) and ``decompose_structured_conv`` (models outside the zoo, ONNX
graphs, whose layer is rebuilt as the same torch sum-pool + small conv to be timed): a
layer of one shape is measured once per machine, whichever path met it first.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from structexport.fsutil import cache_root, write_text_atomic
from structexport.layer_cost import MIN_SPEEDUP
from structexport.layers.decomposed import DecomposedStructuredConv
from structexport.layers.sumpool import MEASURABLE_REALIZATIONS as CANDIDATES
from structexport.ortsession import ort_session
from structexport.timing import time_interleaved


# The one sum-pool form a program target's XNNPACK delegate runs whole: the banded convs.
# Its other forms fall out of the delegate or run slowly there (a padded average pool that
# counts the padding is refused by ExecuTorch's partitioner, running sums are portable
# kernels, a channel average pool over a reshaped view ran at 0.52x of dense: DESIGN.md
# section 6), so on those targets --autotune weighs the banded form against the dense conv.
PROGRAM_CANDIDATES = ("banded",)


def default_cache_path() -> Path:
    return cache_root() / "sumpool-autotune.json"


def machine_key(target: str, threads: int) -> str:
    import onnxruntime as ort

    from structexport.machine import cpu_info
    # "in network": the timing context (entries timed as lone layers, before, are not reused)
    return f"{target}|ort {ort.__version__}|{cpu_info()['model']}|threads {threads}|in network"


def program_machine_key(target: str, runtime, threads: int) -> str:
    """:func:`machine_key` for a program target: its runtime and version instead of ONNX Runtime's."""
    from structexport.machine import cpu_info
    return (f"{target}|{runtime.runtime_name} {runtime.runtime_version()}|{cpu_info()['model']}"
            f"|threads {threads}|in network")


def layer_key(layer: nn.Module, pool, size: tuple[int, int]) -> str:
    conv = getattr(layer, "conv", None)
    conv_shape = "x".join(map(str, conv.weight.shape)) + f"/s{conv.stride[0]}" if conv is not None else "-"
    return (f"C{pool.channels} w{'x'.join(map(str, pool.window))} p{pool.padding} g{pool.groups} "
            f"conv {conv_shape} in {size[0]}x{size[1]}")


class AutotuneCache:
    def __init__(self, path: Path | None = None):
        self.path = Path(path) if path else default_cache_path()
        try:
            self.data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        except (OSError, ValueError):
            self.data = {}  # a damaged cache is rebuilt, never trusted
        if not isinstance(self.data, dict) or not all(isinstance(v, dict) for v in self.data.values()):
            self.data = {}

    def get(self, machine: str, layer: str) -> dict | None:
        return self.data.get(machine, {}).get(layer)

    def put(self, machine: str, layer: str, entry: dict) -> None:
        self.data.setdefault(machine, {})[layer] = entry

    def save(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True))


class InNetwork(nn.Module):
    """``layer`` between identity depthwise 1x1 convs: ONNX Runtime's blocked layout flows in
    and out of it as from the convs around it in a network. The same for every candidate."""

    def __init__(self, layer: nn.Module, channels: int, out_channels: int, dtype=torch.float32):
        super().__init__()
        self.before = nn.Conv2d(channels, channels, 1, groups=channels, bias=False, dtype=dtype)
        self.layer = layer
        self.after = nn.Conv2d(out_channels, out_channels, 1, groups=out_channels, bias=False, dtype=dtype)
        with torch.no_grad():
            self.before.weight.fill_(1.0)
            self.after.weight.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.layer(self.before(x)))


def in_network(layer: nn.Module, x: torch.Tensor) -> nn.Module:
    """``layer`` wrapped in :class:`InNetwork` where its input and output are images (the
    layer itself is not changed)."""
    with torch.no_grad():
        y = layer(x)
    if x.dim() != 4 or y.dim() != 4:
        return layer
    return InNetwork(layer, x.shape[1], y.shape[1], x.dtype)


def dense_form(layer: nn.Module) -> nn.Module | None:
    """The dense conv a decomposed layer composes to (None for a lone sum-pool)."""
    from structexport.layers.decomposed import composed_conv
    if not isinstance(layer, DecomposedStructuredConv):
        return None
    return composed_conv(layer)


def _time_forms(layer: nn.Module, pool, x: torch.Tensor, build, feed, repeat: int, dense: bool,
                candidates: tuple[str, ...]) -> dict[str, float]:
    """Median ms of ``layer`` (in a network) with each realization of ``pool`` in
    ``candidates`` and, with ``dense``, of its dense conv, timed interleaved. ``build(module,
    stem)`` writes the module (a path ``stem`` in a temporary folder) and returns a workload
    :func:`~structexport.timing.time_interleaved` times on ``feed``."""
    original = pool.realization
    composed = dense_form(layer) if dense else None
    workloads = {}
    with tempfile.TemporaryDirectory(prefix="structexport-autotune-") as tmp:
        try:
            for cand in candidates:
                pool.realization = cand
                workloads[cand] = build(in_network(layer, x), Path(tmp) / cand)
        finally:
            pool.realization = original
        if composed is not None:
            workloads["dense"] = build(in_network(composed, x), Path(tmp) / "dense")
        stats = time_interleaved(workloads, feed, repeat, warmup=5)
    return {name: stats[name]["median"] for name in workloads}


def measure(layer: nn.Module, pool, in_shape: tuple[int, ...], threads: int = 1,
            repeat: int = 30, dense: bool = False,
            candidates: tuple[str, ...] = CANDIDATES) -> dict[str, float]:
    """Median milliseconds of ``layer`` (in a network, :class:`InNetwork`) with each
    realization of ``pool`` in ``candidates``, and with ``dense`` of the dense conv it
    composes to (``"dense"``), all timed interleaved under ONNX Runtime."""
    from structexport.export import export_onnx
    param = next(layer.parameters(), None)  # a lone SumPool has buffers only
    x = torch.randn(in_shape, dtype=param.dtype if param is not None else torch.float32)

    def build(module, stem):
        export_onnx(module, x.float(), stem.with_suffix(".onnx"), simplify=False)
        return ort_session(stem.with_suffix(".onnx"), threads)
    return _time_forms(layer, pool, x, build, x.float().numpy(), repeat, dense, candidates)


def measure_program(layer: nn.Module, pool, in_shape: tuple[int, ...], runtime, threads: int = 1,
                    repeat: int = 30, dense: bool = False,
                    candidates: tuple[str, ...] = PROGRAM_CANDIDATES) -> dict[str, float]:
    """:func:`measure` under a program target's runtime (``runtime``: the ExecuTorch or LiteRT
    target, which lowers a torch module to its program and times it)."""
    x = torch.randn(in_shape)
    suffix = Path(next(iter(runtime.programs.values()))).suffix

    def build(module, stem):
        runtime.lower(module, x, stem.with_suffix(suffix))
        return runtime.timer(stem.with_suffix(suffix), x.numpy(), threads)
    return _time_forms(layer, pool, x, build, None, repeat, dense, candidates)


class Tuner:
    """``--autotune``: time the candidates per layer shape, once per machine (cached in
    ``ctx.options["tuning_cache"]``, default :func:`default_cache_path`). Counts what it
    measured and what it read from the cache (:meth:`summary`)."""

    def __init__(self, ctx):
        self.cache = AutotuneCache(ctx.option("tuning_cache"))
        self.threads = int(ctx.option("threads", 1) or 1)
        # a program target (ExecuTorch, LiteRT) times its own programs, which convert hands
        # over in the context (the passes do not import the targets)
        self.runtime = ctx.option("program_runtime")
        self.machine = (program_machine_key(ctx.target, self.runtime, self.threads) if self.runtime is not None
                        else machine_key(ctx.target, self.threads))
        self.measured = self.from_cache = 0

    @property
    def weighs_dense(self) -> bool:
        """Whether the dense conv is always among the candidates: on a program target, where
        the banded form is the only structured one, the choice is that form or dense."""
        return self.runtime is not None

    def choose_layer(self, layer: nn.Module, pool, size, batch: int,
                     dense: bool = False) -> tuple[str, dict, bool]:
        """(the fastest realization -- or ``"dense"`` when ``dense`` asks to time the dense
        conv too and it wins --, every candidate's median ms, whether they came from the
        cache) for ``layer`` (a sum-pool + small conv, or a lone sum-pool) at an input ``size``."""
        if self.runtime is not None and not isinstance(layer, DecomposedStructuredConv):
            return PROGRAM_CANDIDATES[0], {}, False   # a lone sum-pool: one form, no dense conv to weigh
        key = layer_key(layer, pool, size)
        entry = self.cache.get(self.machine, key)
        dense = dense and isinstance(layer, DecomposedStructuredConv)   # a lone sum-pool has no dense conv
        # an entry measured without the dense conv does not answer whether to keep it dense
        cached = entry is not None and (not dense or entry.get("with_dense", "dense" in entry.get("ms", {})))
        if not cached:
            shape = (batch, pool.channels, *size)
            times = (measure_program(layer, pool, shape, self.runtime, self.threads, dense=dense)
                     if self.runtime is not None else measure(layer, pool, shape, self.threads, dense=dense))
            entry = {"ms": times, "with_dense": dense}
            self.cache.put(self.machine, key, entry)
            self.measured += 1
        else:
            self.from_cache += 1
        times = entry["ms"]
        choice = min((k for k in times if k != "dense"), key=times.get)
        if dense and "dense" in times and times["dense"] < times[choice] * MIN_SPEEDUP:
            choice = "dense"
        return choice, times, cached

    def choose(self, module: nn.Module, name: str, pool, size, batch: int, dense: bool = False):
        """As :meth:`choose_layer` for the sum-pool ``name`` of a torch model (timed with the
        small conv it feeds, when it has one)."""
        parent_name = name.rpartition(".")[0]
        parent = module.get_submodule(parent_name) if parent_name else None
        layer = parent if getattr(parent, "pool", None) is pool else pool
        return self.choose_layer(layer, pool, size, batch, dense)

    def save(self) -> None:
        if self.measured:
            self.cache.save()

    def summary(self) -> dict:
        return {"cache": str(self.cache.path), "machine": self.machine,
                "layers_measured": self.measured, "layers_from_cache": self.from_cache}
