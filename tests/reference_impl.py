"""An independent, purely functional re-implementation of the reference networks.

It works directly on the raw state dict stored in the published fixtures (the
``'net'`` entry of ``torch.load(weights_only=True)``, ``module.`` prefix stripped):
no zoo model, no structexport code.  Layer widths, depths, growth rates, CSG slice
shapes and code sizes are all read off the tensors.  Written from the facts in
DESIGN.md section 1.2 and the fixtures' README:

- CSG kernel: ``reshape(codes @ G.T, (ceil(out/s)*s, ceil(in/s)*s, kh, kw))[:out, :in]``
  with ``G`` of shape ``(s*s*kh*kw, code_size)`` (square slices whose spatial size is
  the kernel's own);
- batch norm in eval mode with the running statistics, eps 1e-5 (an ``+Inf`` running
  variance maps the channel to its bias, as ``F.batch_norm`` computes it).

This is a test helper, not a test module.
"""
from __future__ import annotations

import math
import re
from pathlib import Path

import torch
import torch.nn.functional as F

BN_EPS = 1e-5
_G = "<generator>"   # where forward() puts the checked generator for the layers to use
GENERATOR_NAMES = ("CLG.weight", "CSG.weight")   # the names the reference code used


# ---------------------------------------------------------------------------- state dicts

def raw_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The fixture's state dict exactly as stored (dtype kept), ``module.`` stripped."""
    obj = torch.load(path, map_location="cpu", weights_only=True)
    net = obj["net"]
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in net.items()}


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every floating-point tensor converted to ``dtype`` (integer counters kept)."""
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}


def generator(state: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The network-level CSG generator ``G`` (``(prod(slice), code_size)``), or None.

    Every per-block copy must equal the network-level one.
    """
    top = [state[n] for n in GENERATOR_NAMES if n in state]
    if not top:
        return None
    assert len(top) == 1, "both generator names at the top level"
    G = top[0]
    for key, t in state.items():
        if ".".join(key.split(".")[-2:]) in GENERATOR_NAMES:
            assert torch.equal(t, G), f"generator copy {key} differs from the top-level one"
    return G


def csg_kernel(codes: torch.Tensor, G: torch.Tensor, out_c: int, in_c: int,
               kh: int, kw: int) -> torch.Tensor:
    """Dense kernel ``(out_c, in_c, kh, kw)`` of one CSG layer."""
    P, code_size = G.shape
    assert codes.shape[1] == code_size, (codes.shape, G.shape)
    assert P % (kh * kw) == 0, (P, kh, kw)
    s = math.isqrt(P // (kh * kw))
    assert s * s * kh * kw == P, f"generator rows {P} are not a square {kh}x{kw} slice"
    rows, cols = -(-out_c // s) * s, -(-in_c // s) * s
    assert codes.shape[0] == (rows // s) * (cols // s), (codes.shape, out_c, in_c, s)
    slices = codes @ G.t()                                   # (num_slices, s*s*kh*kw)
    return slices.reshape(rows, cols, kh, kw)[:out_c, :in_c]


def slice_shape(state: dict[str, torch.Tensor], kh: int, kw: int) -> tuple[int, int, int, int, int]:
    """``(s0, s1, sh, sw, code_size)`` of a fixture's generator for ``kh x kw`` kernels."""
    G = generator(state)
    s = math.isqrt(G.shape[0] // (kh * kw))
    return s, s, kh, kw, G.shape[1]


# ---------------------------------------------------------------------------- building blocks

def bn(state: dict, prefix: str, x: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(x, state[prefix + ".running_mean"], state[prefix + ".running_var"],
                        state[prefix + ".weight"], state[prefix + ".bias"],
                        training=False, momentum=0.0, eps=BN_EPS)


def _conv_weight(state: dict, module: str, code_key: str | None, out_c: int, in_c: int,
                 k: int) -> torch.Tensor:
    """A conv's kernel: stored densely under ``module.weight`` or generated from codes."""
    if module + ".weight" in state:
        return state[module + ".weight"]
    assert code_key is not None and code_key in state, f"neither {module}.weight nor {code_key}"
    return csg_kernel(state[code_key], state[_G], out_c, in_c, k, k)


def _indices(state: dict, prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return sorted({int(m.group(1)) for k in state for m in [pat.match(k)] if m})


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


# ---------------------------------------------------------------------------- networks

def cifar_resnet(state: dict, x: torch.Tensor) -> torch.Tensor:
    """ResNet-20/56 of the reference code (option-A shortcuts)."""
    x = F.relu(bn(state, "bn_1", F.conv2d(x, state["conv_1_3x3.weight"], padding=1)))
    for s in (1, 2, 3):
        for i in _indices(state, f"stage_{s}"):
            p = f"stage_{s}.{i}."
            stride = 2 if (s > 1 and i == 0) else 1
            cin, cout = x.shape[1], state[p + "bn_a.weight"].shape[0]
            wa = _conv_weight(state, p + "conv_a", p + "code", cout, cin, 3)
            wb = _conv_weight(state, p + "conv_b", p + "code2", cout, cout, 3)
            out = F.relu(bn(state, p + "bn_a", F.conv2d(x, wa, stride=stride, padding=1)))
            out = bn(state, p + "bn_b", F.conv2d(out, wb, padding=1))
            if stride != 1 or cin != cout:
                sc = x[:, :, ::stride, ::stride]
                sc = torch.cat([sc, sc.new_zeros(sc.shape[0], cout - cin, *sc.shape[2:])], 1)
            else:
                sc = x
            x = F.relu(sc + out)
    x = F.avg_pool2d(x, 8)
    return F.linear(x.flatten(1), state["classifier.weight"], state["classifier.bias"])


def densenet_bc(state: dict, x: torch.Tensor) -> torch.Tensor:
    """DenseNet-BC (L=40) of the reference code; the growth rate is read off bn2."""
    out = F.conv2d(x, state["conv1.weight"], padding=1)
    for d in (1, 2, 3):
        for i in _indices(state, f"dense{d}"):
            p = f"dense{d}.{i}."
            width = state[p + "bn2.weight"].shape[0]            # 4 * growth rate
            growth = width // 4
            h = F.conv2d(F.relu(bn(state, p + "bn1", out)), state[p + "conv1.weight"])
            w2 = _conv_weight(state, p + "conv2", p + "code2", growth, width, 3)
            h = F.conv2d(F.relu(bn(state, p + "bn2", h)), w2, padding=1)
            out = torch.cat([h, out], 1)
        t = F.relu(bn(state, f"trans{d}.bn", out))
        if d < 3:
            out = F.avg_pool2d(F.conv2d(t, state[f"trans{d}.conv.weight"]), 2)
        else:
            out = F.avg_pool2d(t, 8)
    return F.linear(out.flatten(1), state["linear.weight"], state["linear.bias"])


def _depthwise(x: torch.Tensor, w: torch.Tensor, stride: int) -> torch.Tensor:
    assert w.shape[1] == 1 and w.shape[0] == x.shape[1]
    return F.conv2d(x, w, stride=stride, padding=1, groups=x.shape[1])


def shufflenetv2(state: dict, x: torch.Tensor) -> torch.Tensor:
    """ShuffleNetV2 (CIFAR) of the reference code; CSG only on the head's 1x1 conv."""
    out = F.relu(bn(state, "bn1", F.conv2d(x, state["conv1.weight"], padding=1)))
    for layer in (1, 2, 3):
        for i in _indices(state, f"layer{layer}"):
            p = f"layer{layer}.{i}."
            if p + "conv4.weight" in state:                      # down-sampling block
                left = bn(state, p + "bn1", _depthwise(out, state[p + "conv1.weight"], 2))
                left = F.relu(bn(state, p + "bn2", F.conv2d(left, state[p + "conv2.weight"])))
                right = F.relu(bn(state, p + "bn3", F.conv2d(out, state[p + "conv3.weight"])))
                right = bn(state, p + "bn4", _depthwise(right, state[p + "conv4.weight"], 2))
                right = F.relu(bn(state, p + "bn5", F.conv2d(right, state[p + "conv5.weight"])))
                out = channel_shuffle(torch.cat([left, right], 1))
            else:                                                # basic block
                c = out.shape[1] // 2
                x1, x2 = out[:, :c], out[:, c:]
                h = F.relu(bn(state, p + "bn1", F.conv2d(x2, state[p + "conv1.weight"])))
                h = bn(state, p + "bn2", _depthwise(h, state[p + "conv2.weight"], 1))
                h = F.relu(bn(state, p + "bn3", F.conv2d(h, state[p + "conv3.weight"])))
                out = channel_shuffle(torch.cat([x1, h], 1))
    cout = state["bn2.weight"].shape[0]
    w2 = _conv_weight(state, "conv2", "code2", cout, out.shape[1], 1)
    out = F.relu(bn(state, "bn2", F.conv2d(out, w2)))
    out = F.avg_pool2d(out, 4)
    return F.linear(out.flatten(1), state["linear.weight"], state["linear.bias"])


NETWORKS = {"resnet": cifar_resnet, "densenet": densenet_bc, "shufflenetv2": shufflenetv2}


def family(state: dict) -> str:
    """Which network a raw reference state dict holds, from its key names."""
    if "conv_1_3x3.weight" in state:
        return "resnet"
    if "trans1.bn.weight" in state:
        return "densenet"
    if "layer1.0.conv4.weight" in state:
        return "shufflenetv2"
    raise ValueError("not a reference CIFAR ResNet, DenseNet-BC or ShuffleNetV2 state dict")


@torch.no_grad()
def forward(state: dict[str, torch.Tensor], x: torch.Tensor, dtype: torch.dtype = torch.float32
            ) -> torch.Tensor:
    """Logits of the reference network held in ``state`` for images ``x`` (N, 3, 32, 32),
    computed in ``dtype`` (every stored tensor is upcast to it first)."""
    s = cast_state(state, dtype)
    G = generator(s)
    if G is not None:
        s[_G] = G
    return NETWORKS[family(s)](s, x.to(dtype))
