"""lower_ssc: structured sparse convs become plain (grouped) convs that follow the real zeros.

An :class:`~structexport.layers.SSCConv2d` exported as it is runs as a dense conv: every
masked-out weight still costs a multiply. This pass rewrites each SSC layer from the
*actual* zero pattern of its effective kernel ``weight * mask`` -- where any weight that is
exactly zero counts as absent too -- and never from the assumed ``(p, g)`` reading (DESIGN.md
section 1.3: that reading is open to correction, and pruned or fine-tuned weights can be
zero in more places than the mask).

The effective kernel is split by (out, in) channel pair:

- the **K x K part**: pairs whose kernel has a non-zero tap off the centre;
- the **1 x 1 part**: pairs whose only non-zero tap is the centre.

For each part the bipartite out/in graph is cut into connected components, and the
components are packed into ``G`` equal bins (padding with zero-weight dummy channels when
the components differ in size; ``G`` is chosen to minimise multiplies, ``G = 1`` being a
dense conv over the part's active channels). A part becomes one grouped ``nn.Conv2d`` fed by
an ``index_select`` of the input channels and followed by an ``index_select`` back to the
layer's output order (both export to ONNX ``Gather``; identity permutations are left out).
When the components come in at most ``MAX_BRANCHES`` shapes and one grouped conv per shape
saves at least ``MIN_BRANCH_GAIN`` of that part's multiplies over the padded single conv
(e.g. ResNet-32x2's p=15 layers: residue classes of 2 and 3 channels), the part becomes
one grouped conv per shape, their outputs concatenated before the output gather.
Centre-only pairs that fall inside a K x K bin are already paid for there and stay in the
K x K conv; only the rest go to the 1 x 1 part.

The 1 x 1 part takes the centre tap ``c = K // 2``: output pixel ``h`` of a stride-``s``,
padding-``P`` conv reads input row ``h*s + c - P`` through that tap, so the 1 x 1 conv runs
at stride ``s`` on the input offset by ``c - P`` (zero-padded where that offset leaves the
input). With the usual ``P = K // 2`` and odd ``K`` the offset is zero and the 1 x 1 conv is
applied to the input directly.

The parts' outputs are summed and the bias is added once (inside a part's conv when that
part produces every output channel exactly once, otherwise as a separate add).

**When a layer stays dense** (option ``ssc_min_saving``, default 0.2): a layer is lowered
only when the lowering needs at most ``(1 - ssc_min_saving)`` of the dense conv's
multiplies per output pixel, i.e. it saves at least 20% by default. Otherwise -- and when
every weight is zero -- the layer becomes a plain ``nn.Conv2d`` holding the masked weight.
The extra gathers and the second conv cost memory traffic that a small saving does not
repay.

The pass rewrites the model it is given (the :class:`~.infra.PassManager` hands it a copy).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
import torch.nn as nn

from structexport.layers import SSCConv2d
from structexport.layers.common import dense_conv
from structexport.layers.lowered_ssc import GatheredConv, LoweredSSCConv

from .infra import LayerRecord, Pass, PassContext, PassError, PassResult, modules_of, replace_module

DEFAULT_MIN_SAVING = 0.2
# A part may become several grouped convs, one per component shape (see block_plans).
MAX_BRANCHES = 3
MIN_BRANCH_GAIN = 0.25


# --------------------------------------------------------------------------------------
# Block structure of a bipartite out/in pattern
# --------------------------------------------------------------------------------------

@dataclass
class BlockPlan:
    """``groups`` bins of ``out_per_group`` outputs and ``in_per_group`` inputs.

    ``out_slots``/``in_slots`` list, bin after bin, the original channel in each slot of the
    grouped conv, or -1 for a zero-weight dummy slot.
    """
    groups: int
    out_per_group: int
    in_per_group: int
    out_slots: torch.Tensor
    in_slots: torch.Tensor

    @property
    def macs(self) -> int:
        """Multiplies per output pixel per kernel tap."""
        return self.groups * self.out_per_group * self.in_per_group


def connected_components(adj: torch.Tensor) -> list[tuple[list[int], list[int]]]:
    """Connected components ``(outs, ins)`` of the bipartite graph ``adj`` (bool ``(O, I)``).

    Channels without any edge belong to no component.
    """
    O, I = adj.shape
    big = O + 1
    lab_out = torch.where(adj.any(1), torch.arange(O), torch.full((O,), big))
    lab_in = torch.full((I,), big)
    while True:  # label propagation: every node takes the smallest label it can reach
        new_in = torch.where(adj, lab_out[:, None], big).amin(0) if O else lab_in
        new_out = torch.minimum(lab_out, torch.where(adj, new_in[None, :], big).amin(1)) if I else lab_out
        if torch.equal(new_in, lab_in) and torch.equal(new_out, lab_out):
            break
        lab_in, lab_out = new_in, new_out
    comps = []
    for label in torch.unique(lab_out[lab_out < big]).tolist():
        comps.append(((lab_out == label).nonzero().flatten().tolist(),
                      (lab_in == label).nonzero().flatten().tolist()))
    return comps


def _candidate_group_counts(m: int) -> list[int]:
    divisors = {d for d in range(1, int(m ** 0.5) + 1) if m % d == 0}
    divisors |= {m // d for d in divisors}
    powers = {1 << k for k in range(m.bit_length()) if (1 << k) <= m}
    return sorted(divisors | powers | {1, m})


def pack_components(comps: list[tuple[list[int], list[int]]]) -> BlockPlan:
    """The cheapest packing of ``comps`` into equal bins of one grouped conv.

    For each candidate group count ``G`` (divisors of the component count, powers of two)
    components go, largest first, to the lightest bin; a bin's size is then padded up to
    the largest bin's. ``G = 1`` is a dense conv over the components' channels.
    """
    comps = sorted(comps, key=lambda c: (-(len(c[0]) + len(c[1])), c[0][0]))
    best = None
    for G in _candidate_group_counts(len(comps)):
        heap = [(0, b) for b in range(G)]
        bins: list[tuple[list[int], list[int]]] = [([], []) for _ in range(G)]
        for outs, ins in comps:
            _, b = heapq.heappop(heap)
            bins[b][0].extend(outs)
            bins[b][1].extend(ins)
            heapq.heappush(heap, (len(bins[b][0]) + len(bins[b][1]), b))
        og = max(len(o) for o, _ in bins)
        ig = max(len(i) for _, i in bins)
        if best is None or G * og * ig < best[0]:
            best = (G * og * ig, G, og, ig, bins)
    _, G, og, ig, bins = best
    bins = sorted((sorted(o), sorted(i)) for o, i in bins)
    out_slots = torch.tensor([c for o, _ in bins for c in o + [-1] * (og - len(o))], dtype=torch.long)
    in_slots = torch.tensor([c for _, i in bins for c in i + [-1] * (ig - len(i))], dtype=torch.long)
    return BlockPlan(G, og, ig, out_slots, in_slots)


def block_plans(adj: torch.Tensor, max_branches: int = MAX_BRANCHES,
                min_branch_gain: float = MIN_BRANCH_GAIN) -> list[BlockPlan]:
    """Grouped convs (one, or one per component shape) that cover ``adj``'s edges.

    One grouped conv pads every component to the largest bin. When the components come in
    a few (at most ``max_branches``) different shapes, one grouped conv per shape needs no
    padding; that is used when it saves at least ``min_branch_gain`` of the multiplies.
    Returns ``[]`` when ``adj`` has no edge.
    """
    comps = connected_components(adj)
    if not comps:
        return []
    single = [pack_components(comps)]
    shapes: dict[tuple[int, int], list] = {}
    for comp in comps:
        shapes.setdefault((len(comp[0]), len(comp[1])), []).append(comp)
    if 1 < len(shapes) <= max_branches:
        split = [pack_components(cs) for _, cs in sorted(shapes.items(), reverse=True)]
        if sum(p.macs for p in split) <= (1 - min_branch_gain) * single[0].macs:
            return split
    return single


def grouped_weight(kernel: torch.Tensor, plan: BlockPlan) -> torch.Tensor:
    """Weight ``(G*Og, Ig, k, k)`` of the grouped conv that ``plan`` makes of ``kernel``."""
    G, og, ig = plan.groups, plan.out_per_group, plan.in_per_group
    rows = plan.out_slots                                        # (G*Og,)
    cols = plan.in_slots.view(G, 1, ig).expand(G, og, ig).reshape(G * og, ig)
    valid = (rows[:, None] >= 0) & (cols >= 0)
    w = kernel[rows.clamp(min=0)[:, None], cols.clamp(min=0)]  # (G*Og, Ig, k, k)
    return torch.where(valid[:, :, None, None], w, torch.zeros((), dtype=w.dtype, device=w.device))


# --------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------
# Lowering one layer
# --------------------------------------------------------------------------------------

def effective_kernel(layer: SSCConv2d) -> torch.Tensor:
    """``weight * mask``, the kernel the layer really applies."""
    return layer.masked_weight().detach()


def _gathered(kernel: torch.Tensor, plan: BlockPlan, in_channels: int, stride: int,
              padding: int) -> GatheredConv:
    conv = dense_conv(grouped_weight(kernel, plan), None, stride, padding, groups=plan.groups)
    in_index = plan.in_slots.clamp(min=0)  # a dummy input slot reads channel 0 with zero weights
    if len(in_index) == in_channels and torch.equal(in_index, torch.arange(in_channels)):
        in_index = None
    return GatheredConv(conv, in_index, plan.out_slots.clone())


def lower_kernel(kernel: torch.Tensor, bias: torch.Tensor | None, stride: int, padding: int
                 ) -> tuple[LoweredSSCConv | None, dict]:
    """Lower the effective ``kernel`` (O, I, K, K); ``None`` when it has no non-zero at all."""
    O, I, K, _ = kernel.shape
    c = K // 2
    nz = kernel != 0
    off_centre = nz.clone()
    off_centre[:, :, c, c] = False
    spatial_pairs = off_centre.flatten(2).any(2)
    centre_only = nz[:, :, c, c] & ~spatial_pairs

    spatial_plans = block_plans(spatial_pairs)
    # Centre-only pairs inside a K x K bin are already paid for there.
    bin_out = torch.full((O,), -1, dtype=torch.long)
    bin_in = torch.full((I,), -2, dtype=torch.long)
    first = 0
    for plan in spatial_plans:
        so, si = plan.out_slots, plan.in_slots
        bin_out[so[so >= 0]] = first + (torch.arange(len(so)) // plan.out_per_group)[so >= 0]
        bin_in[si[si >= 0]] = first + (torch.arange(len(si)) // plan.in_per_group)[si >= 0]
        first += plan.groups
    pointwise_pairs = centre_only & (bin_out[:, None] != bin_in[None, :])
    pointwise_plans = block_plans(pointwise_pairs)
    info = {"nonzeros": int(nz.sum()), "spatial_pairs": int(spatial_pairs.sum()),
            "pointwise_pairs": int(pointwise_pairs.sum()),
            "groups": {"kxk": [p.groups for p in spatial_plans],
                       "1x1": [p.groups for p in pointwise_plans]}}
    if not spatial_plans and not pointwise_plans:
        return None, info
    centre = torch.where(pointwise_pairs, kernel[:, :, c, c], torch.zeros((), dtype=kernel.dtype))
    spatial = [_gathered(kernel, p, I, stride, padding) for p in spatial_plans]
    pointwise = [_gathered(centre[:, :, None, None], p, I, stride, 0) for p in pointwise_plans]
    return LoweredSSCConv(I, O, K, stride, padding, spatial, pointwise, bias), info


class LowerSSCPass(Pass):
    name = "lower_ssc"
    description = ("SSC layers become grouped K x K + 1 x 1 convs following the weights' real "
                   "zeros (dense when that saves less than ssc_min_saving of the multiplies)")

    def call(self, module: nn.Module, ctx: PassContext) -> PassResult:
        min_saving = float(ctx.option("ssc_min_saving", DEFAULT_MIN_SAVING))
        if not 0.0 <= min_saving < 1.0:
            raise PassError(f"ssc_min_saving must be in [0, 1), got {min_saving}")
        records = []
        for name, layer in modules_of(module, SSCConv2d):
            kernel = effective_kernel(layer)
            bias = None if layer.bias is None else layer.bias.detach()
            O, I, K, _ = kernel.shape
            dense_macs = O * I * K * K
            lowered, info = lower_kernel(kernel, bias, layer.stride, layer.padding)
            details = {"kernel": [O, I, K, K], "p": layer.p, "g": layer.g,
                       "dense_macs_per_pixel": dense_macs, "nonzeros": info["nonzeros"]}
            if lowered is None:
                replace_module(module, name, layer.to_dense())
                records.append(LayerRecord(name, "kept dense", {
                    **details, "lowered_macs_per_pixel": 0, "result_macs_per_pixel": dense_macs,
                    "groups": {"kxk": [], "1x1": []}, "reason": "every weight is zero"}))
                continue
            macs = lowered.macs_per_pixel()
            details.update(lowered_macs_per_pixel=macs, groups=info["groups"],
                           spatial_pairs=info["spatial_pairs"], pointwise_pairs=info["pointwise_pairs"])
            if macs > (1.0 - min_saving) * dense_macs:
                replace_module(module, name, layer.to_dense())
                records.append(LayerRecord(name, "kept dense", {
                    **details, "result_macs_per_pixel": dense_macs,
                    "reason": f"lowering saves {1 - macs / dense_macs:.1%} of the multiplies, "
                              f"less than ssc_min_saving={min_saving:g}"}))
            else:
                lowered.train(layer.training)
                replace_module(module, name, lowered)
                records.append(LayerRecord(name, "lowered", {**details, "result_macs_per_pixel": macs}))
        return PassResult(module, bool(records), records)

    def ensures(self, module: nn.Module, ctx: PassContext) -> None:
        left = [n for n, _ in modules_of(module, SSCConv2d)]
        if left:
            raise PassError(f"SSC layers remain after lowering: {', '.join(left[:3])}")
