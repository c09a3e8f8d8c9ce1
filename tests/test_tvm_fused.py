"""The fused structured-conv operator for TVM (structexport/tvm_fused.py).

Each layer is a plain ONNX Conv whose weight is composed from random coefficients (so it
is exactly structured), imported into Relax as the TVM targets import models, rewritten by
``fuse_structured_convs`` and compiled for this host's CPU. It is checked against

* the unfused path: the same Relax module compiled as it is (its plain conv2d), and
* torch float64 (``F.conv2d`` of the same float32 weight and input in double).

Tolerance: float32 against float64, ``max |fused - ref| <= 1e-4 * max |ref|`` (the output's
scale; the sums involved have at most a few hundred terms, so rounding is ~1e-6 of it).
The slow tier tunes one fused layer with MetaSchedule and runs every tuned candidate.
"""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from structexport.layers.structured import compose_kernel, sum_pool

TOL = 1e-4  # relative to the output's scale (max |ref|)
pytestmark = pytest.mark.filterwarnings("ignore:Field 'shape' of 'type' is required")


@pytest.fixture(scope="module")
def tvm_env():
    tvm = pytest.importorskip("tvm")
    pytest.importorskip("onnx")
    from structexport.tvm_fused import llvm_host_target
    return tvm, tvm.target.Target(llvm_host_target())


def conv_model(B, Cin, H, W, O, N, groups, stride, pads, weight, bias=None, relu=True):
    """An ONNX model: one Conv (optional bias), then optionally a ReLU."""
    from onnx import TensorProto, helper, numpy_helper
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [B, Cin, H, W])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, None)
    pt, pl, pb, pr = pads
    inputs = ["input", "w"] + (["b"] if bias is not None else [])
    nodes = [helper.make_node("Conv", inputs, ["conv" if relu else "output"], pads=[pt, pl, pb, pr],
                              strides=[stride, stride], group=groups, kernel_shape=[N, N])]
    if relu:
        nodes.append(helper.make_node("Relu", ["conv"], ["output"]))
    inits = [numpy_helper.from_array(weight, "w")]
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "b"))
    graph = helper.make_graph(nodes, "layer", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def structured_weight(O, C, N, c, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    alpha = torch.randn(O, c, n, n, generator=g, dtype=torch.float64)
    return compose_kernel(alpha, C, N).float().numpy()


def run(tvm, executable, x):
    from tvm import relax
    vm = relax.VirtualMachine(executable, tvm.cpu())
    return vm["main"](tvm.runtime.tensor(x)).numpy()


def bare(task_name: str) -> str:
    """A task's name without the digits TVM appends to a copied function's name."""
    return task_name.rstrip("0123456789")


def reference(x, w, bias, stride, pads, groups, relu):
    pt, pl, pb, pr = pads
    xt = F.pad(torch.from_numpy(x).double(), (pl, pr, pt, pb))
    out = F.conv2d(xt, torch.from_numpy(w).double(),
                   None if bias is None else torch.from_numpy(bias).double(), stride, 0, 1, groups)
    return (out.relu() if relu else out).numpy()


def calls(mod):
    """(op name or call_tir callee, weight shape for conv2d) of every call in ``main``."""
    from tvm import relax
    out = []

    def visit(expr):
        if isinstance(expr, relax.Call):
            name = getattr(expr.op, "name", None)
            if name == "relax.call_tir":
                out.append(("call_tir", expr.args[0].name_hint))
            elif name == "relax.nn.conv2d":
                out.append(("conv2d", tuple(int(s) for s in expr.args[1].ty.shape),
                            tuple(int(p) for p in expr.attrs.padding)))
            else:
                out.append((name, None))
    relax.analysis.post_order_visit(mod["main"], visit)
    return out


def tuning_layer():
    """The layer the tuning tests tune (16@14x14, C/2x2x2 on a 3x3, bias and ReLU), fused:
    ``(fused module, a one-core host target, an input, its float64 reference)``."""
    from tvm.relax.frontend.onnx import from_onnx

    from structexport.tvm_fused import fuse_structured_convs, llvm_host_target
    B, Cin, H, W, O, C, N, c, n, stride, pads, groups = (1, 16, 14, 14, 16, 16, 3, 8, 2, 1, (1, 1, 1, 1), 1)
    w = structured_weight(O, C, N, c, n)
    b = np.random.default_rng(0).standard_normal(O).astype(np.float32)
    mod = from_onnx(conv_model(B, Cin, H, W, O, N, groups, stride, pads, w, b), keep_params_in_input=False)
    fused, records = fuse_structured_convs(mod)
    assert records[0]["fused"]
    target = llvm_host_target(**{"num-cores": 1})
    x = np.random.default_rng(1).standard_normal((B, Cin, H, W)).astype(np.float32)
    return fused, target, x, reference(x, w, b, stride, pads, groups, True)


def fuse_and_compare(tvm_env, B, Cin, H, W, O, C, N, c, n, stride, pads, groups, *, bias=True,
                     relu=True, box_in_conv=False, shift=0.0, seed=0, min_saving=0.2):
    """Build the layer, fuse it, compile both; return (records, fused module, errors)."""
    tvm, target = tvm_env
    from tvm.relax.frontend.onnx import from_onnx

    from structexport.tvm_fused import fuse_structured_convs
    w = structured_weight(O, C, N, c, n, seed)
    b = np.random.default_rng(seed).standard_normal(O).astype(np.float32) if bias else None
    mod = from_onnx(conv_model(B, Cin, H, W, O, N, groups, stride, pads, w, b, relu),
                    keep_params_in_input=False)
    fused, records = fuse_structured_convs(mod, box_in_conv=box_in_conv, min_saving=min_saving)
    x = (np.random.default_rng(seed + 1).standard_normal((B, Cin, H, W)) + shift).astype(np.float32)
    ref = reference(x, w, b, stride, pads, groups, relu)
    got = run(tvm, tvm.compile(fused, target=target), x)
    plain = run(tvm, tvm.compile(mod, target=target), x)
    assert got.shape == ref.shape == plain.shape
    scale = float(np.abs(ref).max())
    assert scale > 0
    return records, fused, {"vs_float64": float(np.abs(got - ref).max()) / scale,
                            "vs_unfused": float(np.abs(got - plain).max()) / scale,
                            "unfused_vs_float64": float(np.abs(plain - ref).max()) / scale}


# B, Cin, H, W, O, C (per group), N, c, n, stride, pads (t, l, b, r), groups
CASES = {
    "3x3-c2n2-s1-p1": (1, 8, 9, 9, 6, 8, 3, 4, 2, 1, (1, 1, 1, 1), 1),
    "3x3-c2n2-s2-p1": (1, 8, 10, 10, 8, 8, 3, 4, 2, 2, (1, 1, 1, 1), 1),
    "3x3-c2n2-s1-p0": (1, 8, 9, 9, 8, 8, 3, 4, 2, 1, (0, 0, 0, 0), 1),
    "5x5-c3n3-s1-p2": (1, 6, 8, 8, 4, 6, 5, 3, 3, 1, (2, 2, 2, 2), 1),
    "5x5-c2n2-s2-p2-odd": (1, 4, 11, 9, 3, 4, 5, 2, 2, 2, (2, 2, 2, 2), 1),
    "groups2": (1, 8, 9, 9, 6, 4, 3, 2, 2, 1, (1, 1, 1, 1), 2),
    "groups2-s2-p2-batch2": (2, 8, 13, 11, 4, 4, 3, 2, 1, 2, (2, 2, 2, 2), 2),
    "depthwise": (1, 6, 9, 9, 6, 1, 3, 1, 2, 1, (1, 1, 1, 1), 6),
    "depthwise-x2-s2": (1, 4, 10, 9, 8, 1, 3, 1, 2, 2, (1, 1, 1, 1), 4),
    "channel-only": (1, 8, 9, 9, 5, 8, 3, 3, 3, 1, (1, 1, 1, 1), 1),
    "spatial-only": (1, 4, 9, 9, 5, 4, 3, 4, 2, 1, (1, 1, 1, 1), 1),
    "1x1": (1, 16, 7, 7, 8, 16, 1, 8, 1, 1, (0, 0, 0, 0), 1),
    "1x1-s2-odd": (1, 16, 9, 7, 8, 16, 1, 5, 1, 2, (0, 0, 0, 0), 1),
    "1x1-groups4": (1, 16, 5, 5, 8, 4, 1, 2, 1, 1, (0, 0, 0, 0), 4),
    "odd-hw-s2": (1, 8, 11, 7, 6, 8, 3, 4, 2, 2, (1, 1, 1, 1), 1),
    "batch2": (2, 8, 9, 9, 6, 8, 3, 4, 2, 1, (1, 1, 1, 1), 1),
    "asymmetric-pads": (1, 8, 9, 10, 6, 8, 3, 4, 2, 1, (0, 1, 2, 1), 1),
    "c1-whole-channel-window": (1, 12, 6, 6, 4, 12, 3, 1, 2, 1, (1, 1, 1, 1), 1),
}


@pytest.mark.parametrize("box_in_conv", [False, True], ids=["pool+conv2d", "box-in-conv"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fused_matches_unfused_and_float64(tvm_env, case, box_in_conv):
    B, Cin, H, W, O, C, N, c, n, stride, pads, groups = CASES[case]
    records, _, err = fuse_and_compare(tvm_env, B, Cin, H, W, O, C, N, c, n, stride, pads,
                                       groups, box_in_conv=box_in_conv)
    (rec,) = records
    assert rec["fused"], rec.get("reason")
    assert rec["structure"] == [c, n]
    assert rec["residual"] <= 1e-5
    Ho, Wo = rec["output_shape"][2:]
    assert rec["macs_before"] == B * O * C * N * N * Ho * Wo
    assert rec["macs_after"] == B * O * c * n * n * Ho * Wo
    assert err["unfused_vs_float64"] <= TOL, err   # the reference path itself
    assert err["vs_float64"] <= TOL, err
    assert err["vs_unfused"] <= TOL, err


def test_rewrite_replaces_the_dense_conv(tvm_env):
    from structexport.tvm_fused import POOL
    records, fused, _ = fuse_and_compare(tvm_env, *CASES["3x3-c2n2-s1-p1"])
    ops = calls(fused)
    convs = [op for op in ops if op[0] == "conv2d"]
    # the dense 6x8x3x3 conv is gone; what is left is the small conv of alpha, unpadded
    assert convs == [("conv2d", (6, 4, 2, 2), (0, 0, 0, 0))], ops
    assert ("call_tir", POOL) in ops, ops
    func = fused[fused.get_global_var(POOL)]
    assert bool(func.attrs["tirx.is_scheduled"])   # MetaSchedule must leave it alone
    assert ("relax.add", None) in ops and ("relax.nn.relu", None) in ops   # left to Relax
    assert records[0]["kernels"] == [POOL, "relax.nn.conv2d"]


def test_box_in_conv_leaves_no_conv2d(tvm_env):
    from structexport.tvm_fused import BOX_CONV, POOL
    _, fused, _ = fuse_and_compare(tvm_env, *CASES["3x3-c2n2-s1-p1"], box_in_conv=True)
    ops = calls(fused)
    assert not [op for op in ops if op[0] == "conv2d"], ops
    assert ("call_tir", POOL) in ops and ("call_tir", BOX_CONV) in ops, ops


def test_bias_and_relu_fuse_into_the_conv(tvm_env):
    """FuseOps puts the bias-add and ReLU into the small conv's kernel, as for a dense conv."""
    tvm, target = tvm_env
    from tvm import relax
    _, fused, _ = fuse_and_compare(tvm_env, *CASES["3x3-c2n2-s1-p1"])
    with target:
        lowered = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(),
                                            relax.transform.CanonicalizeBindings(),
                                            relax.pipeline.zero_pipeline()])(fused)
    names = {gv.name_hint for gv in lowered.get_global_vars()}
    assert "structured_sum_pool" in names, names
    assert any("conv2d" in n and "add" in n and "relu" in n for n in names), names


def test_only_cpu_targets_are_rewritten(tvm_env):
    """The pool kernel is a CPU loop nest: for a CUDA target nothing is rewritten (every
    conv recorded as kept, with the reason); an aarch64 llvm target compiles."""
    tvm, _ = tvm_env
    from tvm.relax.frontend.onnx import from_onnx

    from structexport.tvm_fused import POOL, fuse_structured_convs
    w = structured_weight(6, 8, 3, 4, 2)
    mod = from_onnx(conv_model(1, 8, 9, 9, 6, 3, 1, 1, (1, 1, 1, 1), w), keep_params_in_input=False)
    same, records = fuse_structured_convs(mod, target={"kind": "cuda", "arch": "sm_80"})
    assert same is mod
    assert [(r["fused"], r["weight_shape"]) for r in records] == [(False, [6, 8, 3, 3])]
    assert "not cuda" in records[0]["reason"]
    arm = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    fused, records = fuse_structured_convs(mod, target=arm)
    assert records[0]["fused"] and ("call_tir", POOL) in calls(fused)
    tvm.compile(fused, target=tvm.target.Target(arm))   # cross-compiles (not run here)


def test_no_bias_no_relu(tvm_env):
    records, _, err = fuse_and_compare(tvm_env, *CASES["groups2"], bias=False, relu=False)
    assert records[0]["fused"]
    assert max(err.values()) <= TOL, err


def test_precision_long_channel_window_large_mean(tvm_env):
    """c = C-1 on 256 channels (window 2) and c = 1 (window 256), inputs with mean 50: a
    prefix sum over all channels would lose digits here; the restarted running sum keeps
    the error at float32 rounding of the window's own sum."""
    for c in (255, 1):
        records, _, err = fuse_and_compare(tvm_env, 1, 256, 6, 6, 4, 256, 3, c, 2, 1, (1, 1, 1, 1), 1,
                                           relu=False, shift=50.0)
        assert records[0]["structure"] == [c, 2]
        assert err["vs_float64"] <= 1e-5, (c, err)


def test_unstructured_weights_are_left_alone(tvm_env):
    tvm, target = tvm_env
    from tvm.relax.frontend.onnx import from_onnx

    from structexport.tvm_fused import POOL, fuse_structured_convs
    w = np.random.default_rng(0).standard_normal((6, 8, 3, 3)).astype(np.float32)
    mod = from_onnx(conv_model(1, 8, 9, 9, 6, 3, 1, 1, (1, 1, 1, 1), w), keep_params_in_input=False)
    fused, records = fuse_structured_convs(mod)
    (rec,) = records
    assert not rec["fused"] and "no exact structure" in rec["reason"]
    assert rec["structure"] == [8, 3] and rec["macs_after"] == rec["macs_before"]
    ops = calls(fused)
    assert [op for op in ops if op[0] == "conv2d"] == [("conv2d", (6, 8, 3, 3), (1, 1, 1, 1))]
    assert ("call_tir", POOL) not in ops
    x = np.random.default_rng(1).standard_normal((1, 8, 9, 9)).astype(np.float32)
    np.testing.assert_array_equal(run(tvm, tvm.compile(fused, target=target), x),
                                  run(tvm, tvm.compile(mod, target=target), x))


def test_nearly_structured_weights_need_a_looser_residual(tvm_env):
    """A structured weight plus 1e-3 noise is not exact: kept by default, projected (and
    reported with its residual) under max_residual=1e-2."""
    from tvm.relax.frontend.onnx import from_onnx

    from structexport.tvm_fused import fuse_structured_convs
    w = structured_weight(6, 8, 3, 4, 2)
    w = w + 1e-3 * np.abs(w).max() * np.random.default_rng(0).standard_normal(w.shape).astype(np.float32)
    mod = from_onnx(conv_model(1, 8, 9, 9, 6, 3, 1, 1, (1, 1, 1, 1), w), keep_params_in_input=False)
    _, exact = fuse_structured_convs(mod)
    assert not exact[0]["fused"]
    _, loose = fuse_structured_convs(mod, max_residual=1e-2)
    assert loose[0]["fused"] and loose[0]["structure"] == [4, 2]
    assert 1e-5 < loose[0]["residual"] <= 1e-2


def test_small_savings_are_left_alone(tvm_env):
    """c = C-1, n = N saves 1/8 of the multiplies: below min_saving (0.2) it stays dense;
    with min_saving=0 it is fused and still right."""
    from tvm.relax.frontend.onnx import from_onnx

    from structexport.tvm_fused import fuse_structured_convs
    w = structured_weight(6, 8, 3, 7, 3)
    mod = from_onnx(conv_model(1, 8, 9, 9, 6, 3, 1, 1, (1, 1, 1, 1), w), keep_params_in_input=False)
    _, records = fuse_structured_convs(mod)
    assert not records[0]["fused"] and "saves only 12%" in records[0]["reason"], records[0]
    assert records[0]["structure"] == [7, 3]
    _, records = fuse_structured_convs(mod, min_saving=0.0)
    assert records[0]["fused"]
    records, _, err = fuse_and_compare(tvm_env, 1, 8, 9, 9, 6, 8, 3, 7, 3, 1, (1, 1, 1, 1), 1,
                                       min_saving=0.0)
    assert records[0]["fused"] and max(err.values()) <= TOL, err


def two_conv_module(w1, w2, names=("w1", "w2")):
    """Relax module (weights as constants) of conv(w1) -> ReLU -> conv(w2) on a 1x8x8x8
    input, both 3x3 with padding 1; ``names``: the weights' initializer names."""
    from onnx import TensorProto, helper, numpy_helper
    from tvm.relax.frontend.onnx import from_onnx
    nodes = [helper.make_node("Conv", ["input", names[0]], ["a"], pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", names[1]], ["output"], pads=[1, 1, 1, 1], kernel_shape=[3, 3])]
    graph = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [helper.make_tensor_value_info("output", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w1, names[0]), numpy_helper.from_array(w2, names[1])])
    return from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                     keep_params_in_input=False)


def test_two_layers_one_structured(tvm_env):
    """A model with a structured conv, a ReLU and an unstructured conv: one record each,
    only the first rewritten, the whole model still right."""
    tvm, target = tvm_env
    from structexport.tvm_fused import fuse_structured_convs
    w1 = structured_weight(8, 8, 3, 4, 2)
    w2 = np.random.default_rng(3).standard_normal((4, 8, 3, 3)).astype(np.float32)
    mod = two_conv_module(w1, w2)
    fused, records = fuse_structured_convs(mod)
    assert [r["fused"] for r in records] == [True, False]
    x = np.random.default_rng(4).standard_normal((1, 8, 8, 8)).astype(np.float32)
    xt = torch.from_numpy(x).double()
    ref = F.conv2d(F.conv2d(xt, torch.from_numpy(w1).double(), padding=1).relu(),
                   torch.from_numpy(w2).double(), padding=1).numpy()
    got = run(tvm, tvm.compile(fused, target=target), x)
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()


@pytest.mark.parametrize("restart,block_rows", [(None, 8), (1, 3), (3, 1), (1000, 100)])
def test_sum_pool_kernel_against_torch(tvm_env, restart, block_rows):
    """The pool kernel alone (all of its paths: restarts, row blocks with a short last
    block, zero border rows and columns, groups) against structured.sum_pool in float64."""
    tvm, target = tvm_env
    from tvm import te

    from structexport.tvm_fused import sum_pool_kernel
    B, G, C, c, H, W, pads, box = 2, 2, 9, 4, 7, 10, (2, 1, 1, 3), 2
    x = te.placeholder((B, G * C, H, W), "float32", "x")
    s = sum_pool_kernel(x, C, c, G, pads, box=box, restart=restart, block_rows=block_rows)
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([x, s], "int64")}), target=target)
    xn = np.random.default_rng(0).standard_normal((B, G * C, H, W)).astype(np.float32)
    out = tvm.runtime.tensor(np.full([int(v) for v in s.shape], np.nan, np.float32))
    lib["main"](tvm.runtime.tensor(xn), out)
    pt, pl, pb, pr = pads
    ref = sum_pool(F.pad(torch.from_numpy(xn).double(), (pl, pr, pt, pb)), G, (C - c + 1, box, box), 0)
    assert out.numpy().shape == tuple(ref.shape)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), atol=1e-5, rtol=0)


def test_module_imports_and_plans_without_tvm():
    """Test collection and planning must not need TVM."""
    code = ("import sys; sys.modules['tvm'] = None\n"
            "import numpy as np, torch\n"
            "import structexport.tvm_fused as f\n"
            "from structexport.layers.structured import compose_kernel\n"
            "w = compose_kernel(torch.randn(4, 2, 2, 2, dtype=torch.float64), 4, 3).float().numpy()\n"
            "r = f.plan_conv((1, 4, 8, 8), w, (1, 1), (1, 1, 1, 1), 1)\n"
            "assert r['fused'] and r['structure'] == [2, 2], r\n"
            "assert r['macs_after'] * 4.5 == r['macs_before'], r\n"
            "print('ok')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=False)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


@pytest.mark.slow
def test_metaschedule_tuned_fused_layer_is_right_for_every_candidate(tvm_env, tmp_path):
    """Tune one fused layer (8 trials for its one tunable task, the small conv with its
    bias-add and ReLU; the pool is not tuned), then run *every* measured candidate
    against its untuned build, and the tuned model against torch float64."""
    tvm, _ = tvm_env
    from structexport.tvm_fused import check_tuned_candidates, tune
    fused, target, x, ref = tuning_layer()
    executable, db, tasks, tuned = tune(fused, target, 8, str(tmp_path))
    # the pool is not tuned; prepacking (on for CPUs) renames the marked kernel ``...relu1``
    assert [t.task_name for t in tasks] == tuned and [bare(t) for t in tuned] == ["fused_conv2d_add_relu"]
    candidates = check_tuned_candidates(db, target, tasks=tasks)
    measured = [cand for cand in candidates if cand["seconds"] is not None]
    assert len(measured) >= 4, candidates
    assert {cand["task"] for cand in candidates} == set(tuned)
    # every candidate that ran while tuning builds, runs and is right
    assert all(cand["ok"] for cand in measured), [cand for cand in candidates if not cand["ok"]]
    assert not [cand for cand in candidates if cand["ok"] is False], candidates
    got = run(tvm, executable, x)
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()


@pytest.mark.parametrize("case", ["3x3-c2n2-s1-p1", "5x5-c2n2-s2-p2-odd", "groups2-s2-p2-batch2",
                                  "1x1-s2-odd"])
def test_fused_is_right_built_for_avx2(tvm_env, case):
    """The pool kernel's rows are vectorized in chunks of one AVX-512 register; built for an
    AVX2-only CPU (``haswell``: what the AMD EPYC class has) LLVM splits them, and the
    results must not change. Runs wherever AVX2 runs (both CPU classes CI meets)."""
    from structexport.machine import cpu_info
    if "avx2" not in cpu_info().get("simd", []):
        pytest.skip("this CPU cannot run AVX2 code")
    tvm, _ = tvm_env
    B, Cin, H, W, O, C, N, c, n, stride, pads, groups = CASES[case]
    records, _, err = fuse_and_compare((tvm, tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})),
                                       B, Cin, H, W, O, C, N, c, n, stride, pads, groups)
    assert records[0]["fused"] and err["vs_float64"] <= TOL and err["vs_unfused"] <= TOL, err


def test_tuned_weights_are_prepacked_once_at_compile_time(tvm_env, tmp_path):
    """Tuned for a CPU, a kernel's schedule may read its constant weight in a packed
    (tiled) layout: the library then calls the ``_prepacked`` kernel on weights packed at
    compile time (no ``_weight_prepack`` call left to run), and its output is still right.
    Without prepacking the same tuning leaves the kernel reading the weight as it is."""
    tvm, _ = tvm_env
    from structexport.tvm_fused import tune
    fused, target, x, ref = tuning_layer()
    for prepack in (False, True):
        executable, _, _, tuned = tune(fused, target, 4, str(tmp_path / str(prepack)), prepack=prepack)
        assert [bare(t) for t in tuned] == ["fused_conv2d_add_relu"]
        called = [line.split()[1] for line in executable.as_text().splitlines()
                  if line.strip().startswith("call ")]
        packed = [name for name in called if name.endswith("_prepacked")]
        assert not [name for name in called if name.endswith("_weight_prepack")], called
        assert len(packed) == (1 if prepack else 0), called
        assert any(name.startswith("structured_sum_pool") for name in called), called
        got = run(tvm, executable, x)
        assert np.abs(got - ref).max() <= TOL * np.abs(ref).max(), prepack
