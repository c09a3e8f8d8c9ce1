"""The published CSG checkpoints must compute what the reference implementation computes.

Every fixture in <repo>/../shared/fixtures/associativeconv is loaded by structexport
(``load_checkpoint(path, arch=<base name>)``) and its logits are compared with
``tests/reference_impl.py``, an independent functional implementation that works on the
raw stored state dict (no zoo model, no structexport code).  The bounds are the ones
the outside check holds the project to: relative error ``||a-b|| / ||b||`` at most 1e-4
for float32 files and 1e-3 for FP16 files, and identical argmax predictions.
"""
from __future__ import annotations

import math
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_impl as R  # noqa: E402

from structexport.loader import load_checkpoint  # noqa: E402

# The shared folder beside the clone (as in conftest.py); without it these tests fail.
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "associativeconv"

# file -> (base name given as --arch, full name the loader must infer, stored dtype)
CASES = {
    "resnet56.t7": ("resnet56", "resnet56", torch.float32),
    "resnet56-csg-12x12x3x3-72.t7": ("resnet56", "resnet56-csg-12x12x3x3-72", torch.float32),
    "resnet56-csg-16x16x3x3-128.t7": ("resnet56", "resnet56-csg-16x16x3x3-128", torch.float32),
    "resnet56-csg-16x16x3x3-128-fp16.t7": ("resnet56", "resnet56-csg-16x16x3x3-128",
                                           torch.float16),
    "resnet20-csg-16x16x3x3-72.t7": ("resnet20", "resnet20-csg-16x16x3x3-72", torch.float32),
    "densenet-bc-40-36-csg-12x12x3x3-72.t7": ("densenet-bc-40-36",
                                              "densenet-bc-40-36-csg-12x12x3x3-72", torch.float32),
    "densenet-bc-40-48-csg-12x12x3x3-72-fp16.t7": ("densenet-bc-40-48",
                                                   "densenet-bc-40-48-csg-12x12x3x3-72",
                                                   torch.float16),
    "shufflenetv2-0.5x.t7": ("shufflenetv2-0.5x", "shufflenetv2-0.5x", torch.float32),
    "shufflenetv2-0.5x-csg-16x16x1x1-16.t7": ("shufflenetv2-0.5x",
                                              "shufflenetv2-0.5x-csg-16x16x1x1-16", torch.float32),
}
FILES = sorted(CASES)

CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
CIFAR_STD = torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1)



def gaussian_inputs() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(8, 3, 32, 32)


def cifar_like_inputs() -> torch.Tensor:
    """Smooth images in [0, 1], normalised with the CIFAR-10 mean and std the reference
    training used, so activations have the scale the BN statistics were fitted to."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.rand(8, 3, 8, 8, generator=g)
    fine = 0.15 * torch.rand(8, 3, 32, 32, generator=g)
    img = (F.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False) + fine)
    return (img.clamp(0, 1) - CIFAR_MEAN) / CIFAR_STD


INPUTS = {"gaussian": gaussian_inputs, "cifar-like": cifar_like_inputs}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def tolerance(name: str) -> float:
    return 1e-3 if CASES[name][2] == torch.float16 else 1e-4


@lru_cache(maxsize=None)
def raw(name: str) -> dict:
    return R.raw_state(FIXTURES / name)


@lru_cache(maxsize=None)
def loaded(name: str):
    return load_checkpoint(FIXTURES / name, arch=CASES[name][0])


@lru_cache(maxsize=None)
def outputs(name: str) -> dict[str, dict[str, torch.Tensor]]:
    """Logits per input set: structexport (float32), reference in float32 and float64.
    Both input sets go through each network as one batch of 16."""
    x = torch.cat([INPUTS["gaussian"](), INPUTS["cifar-like"]()])
    model = loaded(name).model.eval()
    with torch.no_grad():
        ours = model(x)
    ref32 = R.forward(raw(name), x, torch.float32)
    ref64 = R.forward(raw(name), x, torch.float64)
    split = lambda t: {"gaussian": t[:8], "cifar-like": t[8:]}  # noqa: E731
    return {"structexport": split(ours), "ref32": split(ref32), "ref64": split(ref64)}


# ---------------------------------------------------------------------------- the reference itself

def test_every_fixture_is_covered():
    assert FIXTURES.is_dir(), f"checkpoint fixtures not found at {FIXTURES}"
    assert sorted(p.name for p in FIXTURES.glob("*.t7")) == FILES


@pytest.mark.parametrize("name", FILES)
def test_reference_reads_the_stored_layout(name):
    """The functional implementation finds what the README says each file holds."""
    state = raw(name)
    assert {str(t.dtype) for t in state.values() if t.is_floating_point()} == \
        {str(CASES[name][2])}
    full = CASES[name][1]
    if "-csg-" not in full:
        assert R.generator(state) is None
        return
    s0, s1, sh, sw = (int(v) for v in full.split("-csg-")[1].split("-")[0].split("x"))
    code = int(full.rsplit("-", 1)[1])
    k = 1 if name.startswith("shufflenet") else 3
    assert R.slice_shape(state, k, k) == (s0, s1, sh, sw, code)


def test_csg_kernel_is_a_row_major_reshape_then_crop():
    """Pin csg_kernel against explicit flat-index arithmetic on a small case with
    overhanging slices (out=5, in=7, slices 4x4x3x3)."""
    g = torch.Generator().manual_seed(0)
    s, kh, kw, nc, out_c, in_c = 4, 3, 3, 6, 5, 7
    rows, cols = math.ceil(out_c / s) * s, math.ceil(in_c / s) * s
    G = torch.randn(s * s * kh * kw, nc, generator=g, dtype=torch.float64)
    codes = torch.randn((rows // s) * (cols // s), nc, generator=g, dtype=torch.float64)
    flat = (codes @ G.t()).flatten()
    want = torch.empty(out_c, in_c, kh, kw, dtype=torch.float64)
    for o in range(out_c):
        for i in range(in_c):
            for h in range(kh):
                for w in range(kw):
                    want[o, i, h, w] = flat[((o * cols + i) * kh + h) * kw + w]
    assert torch.equal(R.csg_kernel(codes, G, out_c, in_c, kh, kw), want)


def test_fp16_overflow_channel_maps_to_its_bn_bias():
    """resnet56-csg-16x16x3x3-128-fp16.t7 stores one +Inf running variance (an FP16
    overflow); eval-mode BN then outputs exactly the channel's bias, and the logits of
    both implementations stay finite."""
    name = "resnet56-csg-16x16x3x3-128-fp16.t7"
    state = raw(name)
    infs = {k: int(torch.isinf(v).sum()) for k, v in state.items()
            if v.is_floating_point() and torch.isinf(v).any()}
    assert infs == {"stage_3.6.bn_a.running_var": 1}
    var = state["stage_3.6.bn_a.running_var"]
    assert bool((var[torch.isinf(var)] > 0).all())
    ch = int(torch.isinf(var).nonzero()[0, 0])
    s = R.cast_state(state, torch.float32)
    x = torch.randn(2, var.numel(), 4, 4, generator=torch.Generator().manual_seed(2)) * 50
    y = R.bn(s, "stage_3.6.bn_a", x)
    assert torch.equal(y[:, ch], torch.full_like(y[:, ch], float(s["stage_3.6.bn_a.bias"][ch])))
    assert torch.isfinite(y).all()
    for impl in ("structexport", "ref32", "ref64"):
        for which in INPUTS:
            assert torch.isfinite(outputs(name)[impl][which]).all(), (impl, which)


@pytest.mark.parametrize("name", FILES)
def test_reference_is_stable_across_precision(name):
    """float32 and float64 runs of the functional implementation agree far inside the
    bound, so the bound below measures structexport, not rounding."""
    out = outputs(name)
    for which in INPUTS:
        assert rel_err(out["ref32"][which], out["ref64"][which]) < 1e-5, which


def test_parity_check_detects_a_tiled_csg_layout():
    """Negative control: generating ResNet-20's kernels as a tiling of s0 x s1 blocks
    (the layout the README warns about) moves the logits far outside the bound, so the
    parity tests below can tell the layouts apart."""
    name = "resnet20-csg-16x16x3x3-72.t7"
    state = R.cast_state(raw(name), torch.float64)
    G = R.generator(state)
    tiled = dict(state)
    for key in [k for k in state if k.endswith(".code") or k.endswith(".code2")]:
        block = key.rsplit(".", 1)[0]
        cout = state[block + ".bn_a.weight"].shape[0]
        stage, index = block.split(".")
        cin = cout // 2 if (key.endswith(".code") and index == "0" and stage != "stage_1") \
            else cout
        s = math.isqrt(G.shape[0] // 9)
        nr, nc = math.ceil(cout / s), math.ceil(cin / s)
        blocks = (state[key] @ G.t()).reshape(nr, nc, s, s, 3, 3)
        kernel = blocks.permute(0, 2, 1, 3, 4, 5).reshape(nr * s, nc * s, 3, 3)[:cout, :cin]
        conv = block + (".conv_a" if key.endswith(".code") else ".conv_b")
        tiled[conv + ".weight"] = kernel
        del tiled[key]
    x = gaussian_inputs().double()
    with torch.no_grad():
        good = R.cifar_resnet(state | {R._G: G}, x)
        bad = R.cifar_resnet(tiled, x)
    assert rel_err(bad, good) > 1e-2
    assert rel_err(outputs(name)["ref64"]["gaussian"], good) < 1e-6


# ---------------------------------------------------------------------------- structexport vs reference

@pytest.mark.parametrize("name", FILES)
def test_loader_infers_the_published_variant(name):
    got = loaded(name)
    assert got.arch == CASES[name][1]
    assert got.stored_dtypes == [str(CASES[name][2]).replace("torch.", "")]
    assert all(p.dtype == torch.float32 for p in got.model.state_dict().values()
               if p.is_floating_point())


@pytest.mark.parametrize("which", sorted(INPUTS))
@pytest.mark.parametrize("name", FILES)
def test_structexport_matches_reference(name, which):
    out = outputs(name)
    ours, ref64, ref32 = out["structexport"][which], out["ref64"][which], out["ref32"][which]
    assert ours.shape == (8, 10) and ours.dtype == torch.float32
    assert torch.isfinite(ours).all()
    tol = tolerance(name)
    assert rel_err(ours, ref64) <= tol, f"{name} vs float64 reference: {rel_err(ours, ref64):.3g}"
    assert rel_err(ours, ref32) <= tol, f"{name} vs float32 reference: {rel_err(ours, ref32):.3g}"
    assert torch.equal(ours.argmax(1), ref64.argmax(1))
    assert torch.equal(ours.argmax(1), ref32.argmax(1))


@pytest.mark.parametrize("name", FILES)
def test_predictions_are_not_degenerate(name):
    """Guard against a comparison that passes because both sides are trivial (constant
    or near-zero logits): the CIFAR-like batch gets logits of real magnitude that vary
    between images."""
    ref = outputs(name)["ref64"]["cifar-like"]
    assert float(ref.abs().max()) > 1.0
    assert float((ref - ref.mean(0)).abs().max()) > 1e-2
