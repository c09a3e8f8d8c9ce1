"""Tests for structexport.layers.sumpool: every realization of SumPool is the sum-pool of
DESIGN.md section 1.1, and each exports to the ONNX operators section 2 says it should."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from structexport.layers.structured import box_window, sum_pool
from structexport.layers.sumpool import REALIZATIONS, SumPool

DT = torch.float64


def rand(*shape, seed=0, dtype=DT):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def brute_sum_pool(x, groups, window, padding):
    """Independent loop reference: zero-pad, then sum each (kc, kh, kw) box per group."""
    kc, kh, kw = window
    if padding:
        x = torch.nn.functional.pad(x, (padding,) * 4)
    B, C, H, W = x.shape
    cg = C // groups
    co = cg - kc + 1
    out = torch.zeros(B, groups * co, H - kh + 1, W - kw + 1, dtype=x.dtype)
    for g, a, i, j in itertools.product(range(groups), range(co), range(H - kh + 1),
                                        range(W - kw + 1)):
        block = x[:, g * cg + a:g * cg + a + kc, i:i + kh, j:j + kw]
        out[:, g * co + a, i, j] = block.sum(dim=(1, 2, 3))
    return out


# (channels, groups, window, padding, batch, H, W)
CASES = [
    (8, 1, (5, 2, 2), 1, 2, 7, 7),        # 3x3 conv at C/2 x 2 x 2
    (8, 1, (1, 2, 2), 1, 1, 5, 6),        # c1n2: kc = 1
    (6, 6, (1, 2, 2), 1, 2, 5, 5),        # depthwise: one channel per group
    (6, 6, (1, 1, 1), 0, 1, 3, 4),        # depthwise, nothing to sum
    (12, 3, (3, 2, 2), 0, 1, 5, 7),       # grouped
    (6, 2, (3, 1, 1), 0, 1, 4, 3),        # kc = channels per group, kh = kw = 1
    (16, 1, (9, 1, 1), 0, 2, 4, 4),       # 1x1 conv at C/2
    (10, 1, (10, 1, 1), 0, 3, 1, 1),      # linear layer at c = 1
    (7, 1, (4, 3, 3), 2, 1, 9, 5),        # odd everything, padding 2, 5x5 kernel at n = 3
    (9, 3, (2, 3, 1), 1, 1, 5, 4),        # non-square spatial window
    (4, 1, (2, 2, 2), 0, 1, 2, 2),        # window as large as the input: 1x1 output
    (5, 1, (3, 3, 3), 1, 1, 1, 1),        # 1x1 input, padding makes the window fit
    (6, 2, (3, 1, 1), 2, 1, 3, 4),        # padding but no spatial window: zeros only
    (10, 5, (2, 2, 3), 1, 2, 6, 3),       # grouped, kw = 3 > kh, pads inside the pool
    (8, 1, (8, 4, 4), 1, 1, 5, 7),        # padding below half the window, kc = all channels
]


def case_id(case):
    C, g, w, p, b, H, W = case
    return f"C{C}g{g}w{'x'.join(map(str, w))}p{p}b{b}_{H}x{W}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_reference_sum_pool_matches_loops(case):
    """The reference the realizations are compared with is itself right."""
    C, g, w, p, b, H, W = case
    x = rand(b, C, H, W, seed=1)
    assert torch.allclose(sum_pool(x, g, w, p), brute_sum_pool(x, g, w, p), atol=1e-10, rtol=0)


@pytest.mark.parametrize("realization", REALIZATIONS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_realization_equals_reference(case, realization):
    C, g, w, p, b, H, W = case
    pool = SumPool(C, w, p, g, realization).double()
    x = rand(b, C, H, W, seed=2)
    out = pool(x)
    expected = sum_pool(x, g, w, p)
    assert out.dtype == DT
    assert out.shape == (b, pool.out_channels, H + 2 * p - w[1] + 1, W + 2 * p - w[2] + 1)
    assert pool.out_channels == g * (C // g - w[0] + 1)
    assert (out - expected).abs().max().item() <= 1e-10


@pytest.mark.parametrize("case", CASES[:5], ids=case_id)
def test_switching_realization_on_one_module(case):
    """The setter rebuilds the realization's buffers: switching back and forth stays exact."""
    C, g, w, p, b, H, W = case
    pool = SumPool(C, w, p, g, "avgpool3d")
    x = rand(b, C, H, W, seed=3)
    expected = sum_pool(x, g, w, p)
    for r in REALIZATIONS + tuple(reversed(REALIZATIONS)):
        pool.realization = r
        assert pool.realization == r
        assert (pool(x) - expected).abs().max().item() <= 1e-10, r
        # realization buffers are derived, never saved: the state dict does not depend on it
        assert list(pool.state_dict()) == []


def test_float32_realizations_agree():
    x = rand(2, 8, 9, 9, seed=4, dtype=torch.float32)
    expected = sum_pool(x.double(), 2, (3, 2, 2), 1)
    for r in REALIZATIONS:
        out = SumPool(8, (3, 2, 2), 1, 2, r)(x)
        assert out.dtype == torch.float32
        assert torch.allclose(out.double(), expected, atol=1e-4, rtol=1e-5), r


@pytest.mark.parametrize("bad", ["naive", "AvgPool3d", "", "cumsum "])
def test_setter_rejects_unknown_realization(bad):
    pool = SumPool(8, (5, 2, 2), 1, 1, "banded")
    with pytest.raises(ValueError) as exc:
        pool.realization = bad
    message = str(exc.value)
    assert repr(bad) in message
    for name in REALIZATIONS:
        assert name in message
    assert pool.realization == "banded"  # left as it was
    x = rand(1, 8, 4, 4, seed=5)
    assert (pool.double()(x) - sum_pool(x, 1, (5, 2, 2), 1)).abs().max().item() <= 1e-10


def test_constructor_rejects_unknown_realization_and_bad_shapes():
    with pytest.raises(ValueError, match="avgpool3d"):
        SumPool(8, (5, 2, 2), 1, 1, "fft")
    with pytest.raises(ValueError, match="groups"):
        SumPool(8, (1, 2, 2), 1, 3)
    with pytest.raises(ValueError, match="exceeds"):
        SumPool(8, (5, 2, 2), 1, 2)


# ---------------------------------------------------------------- additions, by hand

def test_additions_by_hand_dense():
    # 8 channels, window 4x2x2, padding 1, 5x5 input: padded 7x7, pooled 5 x 6 x 6 = 180 values.
    pool = SumPool(8, (4, 2, 2), padding=1)
    assert pool.out_channels == 5
    naive = 180 * (4 * 2 * 2 - 1)                 # 2700
    counts = {"avgpool3d": naive, "banded": naive,
              "box": 2 * 180 + 180 * (2 * 2 - 1),   # 360 channel + 540 spatial = 900
              "cumsum": 2 * 180 + 2 * 180 * 2}      # 360 channel + 720 spatial = 1080
    assert counts == {"avgpool3d": 2700, "banded": 2700, "box": 900, "cumsum": 1080}
    for r, expected in counts.items():
        pool.realization = r
        assert pool.additions(5, 5) == expected, r


def test_additions_by_hand_depthwise_and_channel_only():
    # depthwise, 4 channels, window 1x2x2, padding 1, 3x3 input: 4 x 4 x 4 = 64 values
    dw = SumPool(4, (1, 2, 2), padding=1, groups=4)
    expected = {"avgpool3d": 64 * 3, "banded": 64 * 3, "box": 64 * 3, "cumsum": 2 * 64 * 2}
    for r, n in expected.items():
        dw.realization = r
        assert dw.additions(3, 3) == n, r
    # linear layer, 10 features at c = 5: window 6x1x1, 5 values on a 1x1 input
    lin = SumPool(10, (6, 1, 1))
    expected = {"avgpool3d": 25, "banded": 25, "box": 10, "cumsum": 10}
    for r, n in expected.items():
        lin.realization = r
        assert lin.additions(1, 1) == n, r
    # nothing to sum: 0 additions whatever the form
    none = SumPool(3, (1, 1, 1), groups=3)
    for r in REALIZATIONS:
        none.realization = r
        assert none.additions(4, 4) == 0, r


def test_additions_running_sums_beat_naive_on_resnet_layer():
    window = box_window(64, 3, 32, 2)
    pool = SumPool(64, window, 1)
    counts = {}
    for r in REALIZATIONS:
        pool.realization = r
        counts[r] = pool.additions(56, 56)
    values = 32 * 57 * 57
    assert counts["avgpool3d"] == values * (33 * 4 - 1)
    assert counts["cumsum"] == values * 6
    assert counts["cumsum"] < counts["avgpool3d"] / 20


# ---------------------------------------------------------------- ONNX export

ONNX_SHAPES = {
    "dense": (8, 1, (5, 2, 2), 1, 7, 7),
    "grouped": (12, 3, (3, 2, 2), 1, 5, 6),
    "wide_pad": (7, 1, (4, 3, 3), 2, 9, 5),   # padding 2 > half of 3: an explicit Pad
}


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)
            for g in attr.graphs:
                yield from _all_nodes(g)


def _model_nodes(model):
    nodes = list(_all_nodes(model.graph))
    for fn in model.functions:
        nodes += list(fn.node)
    return nodes


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(shape, realization) -> (module, input, onnx path); each exported at most once."""
    cache = {}
    folder = tmp_path_factory.mktemp("sumpool_onnx")

    def get(shape_name, realization):
        key = (shape_name, realization)
        if key not in cache:
            C, g, w, p, H, W = ONNX_SHAPES[shape_name]
            module = SumPool(C, w, p, g, realization).eval()
            x = rand(1, C, H, W, seed=7, dtype=torch.float32)
            path = folder / f"{shape_name}-{realization}.onnx"
            torch.onnx.export(module, (x,), dynamo=True, opset_version=18).save(str(path))
            cache[key] = (module, x, path)
        return cache[key]
    return get


@pytest.mark.parametrize("realization", REALIZATIONS)
@pytest.mark.parametrize("shape_name", list(ONNX_SHAPES))
def test_onnx_export_runs_and_matches(exported, shape_name, realization):
    import onnx
    import onnxruntime as ort

    module, x, path = exported(shape_name, realization)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        want = module(x).numpy()
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-4
    C, g, w, p, H, W = ONNX_SHAPES[shape_name]
    reference = sum_pool(x.double(), g, w, p).numpy()
    assert np.abs(got - reference).max() <= 1e-4

    pools = [n for n in _model_nodes(model) if n.op_type == "AveragePool"]
    ops = {n.op_type for n in _model_nodes(model)}
    if realization == "avgpool3d":
        assert pools, "the avgpool3d realization must export an AveragePool node"
        kernels = [list(a.ints) for n in pools for a in n.attribute if a.name == "kernel_shape"]
        assert kernels and all(len(k) == 3 for k in kernels)
        assert list(w) in kernels
    elif realization == "pool2d":
        assert_pool2d_graph(model, w, p)
    else:
        assert pools == [], f"{realization} exported AveragePool nodes"
        if realization == "cumsum":
            assert "CumSum" in ops and "Conv" not in ops
        elif realization == "banded":
            assert "Conv" in ops and "CumSum" not in ops
        else:  # box
            assert {"CumSum", "Conv"} <= ops


def _attrs(node):
    import onnx
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _constant_values(model):
    """Every constant of the graph (initializers and Constant nodes) as a numpy array."""
    from onnx import numpy_helper
    values = [numpy_helper.to_array(i) for i in model.graph.initializer]
    for n in _model_nodes(model):
        if n.op_type == "Constant":
            values += [numpy_helper.to_array(a.t) for a in n.attribute if a.name == "value"]
    return values


def assert_pool2d_graph(model, window, padding):
    """The pool2d form: 2-D AveragePools only (no CumSum, no Conv, no 3-D pool), a (kc, 1)
    channel pool, a (kh, kw) spatial pool whose padded zeros count, one Mul by the volume."""
    kc, kh, kw = window
    nodes = _model_nodes(model)
    ops = [n.op_type for n in nodes]
    assert "CumSum" not in ops and "Conv" not in ops
    pools = [_attrs(n) for n in nodes if n.op_type == "AveragePool"]
    kernels = [list(a["kernel_shape"]) for a in pools]
    assert sorted(kernels) == sorted(k for k in ([kc, 1], [kh, kw]) if k[0] * k[1] > 1)
    assert all(len(k) == 2 for k in kernels)
    for a in pools:
        assert a.get("count_include_pad", 0) == 1 or not any(a.get("pads", [0]))
        assert not a.get("ceil_mode", 0)
    spatial = [a for a in pools if list(a["kernel_shape"]) == [kh, kw]]
    inside = padding and padding <= kh // 2 and padding <= kw // 2
    assert spatial[0].get("pads", [0] * 4) == [padding if inside else 0] * 4
    assert ("Pad" in ops) == bool(padding and not inside)
    # AveragePool is a mean: the sum needs the explicit scale (divisor_override exports a mean)
    muls = [n for n in nodes if n.op_type == "Mul"]
    assert len(muls) == 1
    scales = [float(v) for v in _constant_values(model) if v.size == 1]
    assert float(kc * kh * kw) in scales


@pytest.mark.parametrize("shape_name", list(ONNX_SHAPES))
def test_pool2d_onnx_matches_with_ort_optimizations(exported, shape_name):
    """ONNX Runtime rewrites 2-D pools to its blocked-layout (NCHWc) kernels when all
    optimizations are on: the sums must survive that (pads counted as zeros)."""
    from structexport.ortsession import ort_session
    module, x, path = exported(shape_name, "pool2d")
    C, g, w, p, H, W = ONNX_SHAPES[shape_name]
    reference = sum_pool(x.double(), g, w, p).numpy()
    for optimize in (True, False):
        session = ort_session(path, optimize=optimize)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert got.shape == reference.shape
        assert np.abs(got - reference).max() <= 1e-4 * max(1.0, np.abs(reference).max())


def test_pool2d_is_not_a_mean():
    """The export hazard of DESIGN.md section 5: a sum-pool that came out as a mean would be
    off by the window's volume. Ones in, the window's volume out (away from the border)."""
    pool = SumPool(8, (5, 2, 2), 1, 1, "pool2d")
    out = pool(torch.ones(1, 8, 6, 6, dtype=DT))
    assert out.shape == (1, 4, 7, 7)
    assert torch.all(out[:, :, 1:-1, 1:-1] == 20.0)
    assert torch.all(out[:, :, 0, 0] == 5.0)  # a corner: one real pixel, three padded zeros


def test_pool2d_additions_by_hand():
    # 8 channels, window 4x2x2, padding 1, 5x5 input: the channel pool gives 5 x 5 x 5 = 125
    # values of 3 additions each, the spatial pool 5 x 6 x 6 = 180 values of 3 additions each.
    pool = SumPool(8, (4, 2, 2), padding=1, realization="pool2d")
    assert pool.additions(5, 5) == 125 * 3 + 180 * 3 == 915
    assert SumPool(10, (6, 1, 1), realization="pool2d").additions(1, 1) == 5 * 5
    assert SumPool(4, (1, 2, 2), 1, 4, "pool2d").additions(3, 3) == 64 * 3
