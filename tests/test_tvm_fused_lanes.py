"""The fused sum-pool kernel's vector chunk follows the TVM target it is built for
(structexport.tvm_fused.vector_lanes): 16 float32 lanes with AVX-512, 8 with AVX2, 4 for
aarch64 NEON and plain x86-64. The kernels are built (not run) for targets named
explicitly, so nothing here depends on this machine's CPU; the one run compiles for this
host and checks that every width gives the same, right outputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from structexport.layers.structured import compose_kernel, sum_pool

pytestmark = pytest.mark.filterwarnings("ignore:Field 'shape' of 'type' is required")

AVX512 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512"}
AVX2 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell"}
AVX2_MATTR = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mattr": ["+avx2", "+fma"]}
X86_64 = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}
AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
GRAVITON3 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "neoverse-v1",
             "mattr": ["+neon", "+sve", "+dotprod", "+fullfp16"]}

# 16 input channels of 30x30 padded by 1: rows of 32 values -- whole chunks at every width,
# and output rows of 30 (a short last chunk at every width)
B, CIN, H, W, O, C, N, c, n = 1, 16, 30, 30, 8, 16, 3, 8, 2


@pytest.fixture(scope="module")
def tvm():
    tvm = pytest.importorskip("tvm")
    pytest.importorskip("onnx")
    return tvm


def layer():
    """An ONNX model of one exactly structured 3x3 conv (c=8 of 16 channels, n=2), padding 1."""
    from onnx import TensorProto, helper, numpy_helper
    g = torch.Generator().manual_seed(0)
    w = compose_kernel(torch.randn(O, c, n, n, generator=g, dtype=torch.float64), C, N).float().numpy()
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [B, CIN, H, W])
    y = helper.make_tensor_value_info("output", TensorProto.FLOAT, None)
    node = helper.make_node("Conv", ["input", "w"], ["output"], pads=[1, 1, 1, 1], kernel_shape=[N, N])
    graph = helper.make_graph([node], "layer", [x], [y], [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), w


def vectorized_extents(func) -> list[int]:
    """The extent of every vectorized loop of a PrimFunc (read from its TVMScript)."""
    import re
    return [int(v) for v in re.findall(r"T\.vectorized\((?:T\.int64\()?(\d+)\)", func.script())]


def pool_function(fused):
    from structexport.tvm_fused import POOL
    (func,) = [f for g, f in fused.functions_items() if g.name_hint.startswith(POOL)]
    return func


@pytest.mark.parametrize("target,lanes", [(AVX512, 16), (AVX2, 8), (AVX2_MATTR, 8), (X86_64, 4),
                                          (AARCH64, 4), (GRAVITON3, 4)],
                         ids=["avx512", "avx2", "avx2-mattr", "x86-64", "aarch64", "graviton3"])
def test_pool_kernel_vectorizes_one_register_of_the_target(tvm, target, lanes):
    from tvm.relax.frontend.onnx import from_onnx

    from structexport.tvm_fused import fuse_structured_convs, vector_lanes
    assert vector_lanes(target) == lanes
    assert vector_lanes(target, "float64") == lanes // 2
    model, _ = layer()
    fused, records = fuse_structured_convs(from_onnx(model, keep_params_in_input=False), target=target)
    (rec,) = records
    assert rec["fused"] and rec["structure"] == [c, n] and rec["vector_lanes"] == lanes
    extents = vectorized_extents(pool_function(fused))
    # rows of the pool: a padding column (1 value), the input's 30 columns, a zero row of the
    # padded 32, the output's 31 (box 2): whole chunks of one register, then each row's tail
    assert max(extents) == lanes
    assert set(extents) == {lanes} | {w % lanes for w in (1, 30, 31, 32) if w % lanes}
    # and the kernel compiles for it (cross-compiled where it is not this host)
    tvm.compile(fused, target=tvm.target.Target(target))


def test_target_in_scope_and_default(tvm):
    """Without a target argument: the target in scope decides; with none, this host's CPU
    (whatever it is, the width is what vector_lanes says of it)."""
    from structexport.tvm_fused import llvm_host_target, sum_pool_kernel, vector_lanes
    from tvm import te
    x = te.placeholder((1, 4, 8, 40), "float32", "x")
    with tvm.target.Target(AVX2):
        assert vector_lanes() == 8
        assert max(vectorized_extents(te.create_prim_func([x, sum_pool_kernel(x, 4, 2, 1, (0, 0, 0, 0))]))) == 8
    with tvm.target.Target(AARCH64):
        assert vector_lanes() == 4
    from structexport.machine import llvm_host_cpu
    host = llvm_host_target() if llvm_host_cpu() else {"kind": "llvm"}
    assert vector_lanes() == vector_lanes(host) in (4, 8, 16)


def test_every_width_gives_the_same_right_outputs_on_this_host(tvm):
    """The pool kernel built with 4, 8 and 16 lanes, compiled for this host: bit-identical
    outputs (only the chunking differs), equal to the float64 sum-pool within float32
    rounding; and the whole fused layer compiled for this host against torch float64."""
    from tvm import te
    from tvm.relax.frontend.onnx import from_onnx

    from structexport.machine import llvm_host_cpu
    from structexport.tvm_fused import fuse_structured_convs, llvm_host_target, sum_pool_kernel
    host = tvm.target.Target(llvm_host_target() if llvm_host_cpu() else {"kind": "llvm"})
    G, Cg, cg, pads, box = 2, 8, 3, (1, 2, 1, 0), 2
    xn = np.random.default_rng(0).standard_normal((2, G * Cg, 7, 37)).astype(np.float32)
    outs = {}
    for lanes in (4, 8, 16):
        x = te.placeholder(xn.shape, "float32", "x")
        s = sum_pool_kernel(x, Cg, cg, G, pads, box=box, lanes=lanes)
        func = te.create_prim_func([x, s], "int64")
        assert max(vectorized_extents(func)) == lanes
        lib = tvm.compile(tvm.IRModule({"main": func}), target=host)
        out = tvm.runtime.tensor(np.full([int(v) for v in s.shape], np.nan, np.float32))
        lib["main"](tvm.runtime.tensor(xn), out)
        outs[lanes] = out.numpy()
    np.testing.assert_array_equal(outs[4], outs[8])
    np.testing.assert_array_equal(outs[4], outs[16])
    pt, pl, pb, pr = pads
    ref = sum_pool(F.pad(torch.from_numpy(xn).double(), (pl, pr, pt, pb)), G, (Cg - cg + 1, box, box), 0)
    np.testing.assert_allclose(outs[4], ref.numpy(), atol=1e-5, rtol=0)

    from tvm import relax
    model, w = layer()
    fused, records = fuse_structured_convs(from_onnx(model, keep_params_in_input=False), target=host)
    assert records[0]["fused"]
    xl = np.random.default_rng(1).standard_normal((B, CIN, H, W)).astype(np.float32)
    vm = relax.VirtualMachine(tvm.compile(fused, target=host), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(xl)).numpy()
    ref = F.conv2d(torch.from_numpy(xl).double(), torch.from_numpy(w).double(), padding=1).numpy()
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
