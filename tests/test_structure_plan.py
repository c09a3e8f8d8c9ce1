"""The one structure plan: read from either pipeline's records, stored in the manifest,
and what TVM's fused operator builds from (matched to kernels by value, checked)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from structexport.cli import main
from structexport.structure_plan import (DECLARED, DENSE, DISCOVERED, STRUCTURED, ZOO_CLASS, PlanError,
                                         StructurePlan, kernel_digest)

from test_tvm_fused import TOL, run, structured_weight, two_conv_module, tvm_env  # noqa: F401  (fixture)


def zoo_runs():
    return [
        {"name": "decompose_structured", "records": [
            {"layer": "a", "action": "decomposed",
             "details": {"structure": [8, 2, 2], "C": 16, "N": 3, "residual": 0.0, "source": "structured conv (coeff mode)"}},
            {"layer": "b", "action": "decomposed",
             "details": {"structure": [8, 2, 2], "C": 16, "N": 3, "residual": 0.003, "source": "declared dense conv"}},
            {"layer": "fc", "action": "decomposed",
             "details": {"structure": [32], "residual": 0.0, "source": "structured linear"}}]},
        {"name": "realize_sumpool", "records": [
            {"layer": "a.pool", "action": "realized", "details": {"realization": "banded", "predicted_speedup": 1.5}},
            {"layer": "b.pool", "action": "kept dense", "details": {"reason": "predicted 0.9x"}},
            {"layer": "fc.pool", "action": "realized", "details": {"realization": "cumsum"}}]},
        {"name": "materialize_csg", "records": [{"layer": "g", "action": "materialized", "details": {}}]},
        {"name": "fold_batchnorm", "records": [{"layer": "bn", "action": "folded", "details": {}}]},
    ]


def onnx_runs():
    return [
        {"name": "project_structured_weights", "records": [
            {"layer": "p", "action": "projected", "details": {"c": 4, "n": 2, "residual": 0.004, "declared": False}}]},
        {"name": "decompose_structured_conv", "records": [
            {"layer": "p", "action": "decomposed",
             "details": {"c": 4, "n": 2, "C": 8, "N": 3, "residual": 0.0, "declared": False, "realization": "box"}},
            {"layer": "q", "action": "kept",
             "details": {"c": 4, "n": 2, "C": 8, "N": 3, "residual": 0.0, "declared": True,
                         "reason": "predicted 0.98x"}},
            {"layer": "r", "action": "dense", "details": {"c": 8, "n": 3, "C": 8, "N": 3, "residual": 0.0}},
            {"layer": "s", "action": "kept", "details": {"reason": "dilation 2"}}]},
        {"name": "lower_sparse_conv", "records": [{"layer": "t", "action": "lowered", "details": {}}]},
    ]


def test_the_zoo_records_make_one_plan():
    plan = StructurePlan.from_runs(zoo_runs(), "zoo")
    assert list(plan.layers) == ["a", "b", "fc", "g"]
    a, b, fc, g = (plan.layers[k] for k in ("a", "b", "fc", "g"))
    assert (a.kind, a.form, a.origin, a.C, a.N, a.c, a.n, a.realization) == \
        ("structured conv", STRUCTURED, ZOO_CLASS, 16, 3, 8, 2, "banded")
    assert a.details == {"predicted_speedup": 1.5} and not a.projected
    assert (b.form, b.origin, b.reason, b.realization, b.projected) == \
        (DENSE, DECLARED, "predicted 0.9x", None, True)
    assert (fc.kind, fc.c, fc.n, fc.realization) == ("structured linear", 32, None, "cumsum")
    assert (g.kind, g.realization) == ("csg", "precomputed kernel")
    # only a structured conv that stays structured is what a fused operator computes
    assert list(plan.decomposed()) == ["a"] and a.fused_structure == (8, 2)
    assert plan.counts() == {"structured conv: structured": 1, "structured conv: dense": 1,
                             "structured linear: structured": 1, "csg: structured": 1}


def test_the_onnx_records_make_one_plan():
    plan = StructurePlan.from_runs(onnx_runs(), "onnx passes")
    assert list(plan.layers) == ["p", "q", "t"]      # r has no structure, s no conv the pass takes
    p, q, t = plan.layers["p"], plan.layers["q"], plan.layers["t"]
    assert (p.origin, p.projected, p.residual, p.realization, p.fused_structure) == \
        (DISCOVERED, True, 0.004, "box", (4, 2))
    assert (q.form, q.origin, q.reason) == (DENSE, DECLARED, "predicted 0.98x")
    assert (t.kind, t.realization) == ("block sparse", "grouped convs")


def test_the_plan_survives_the_manifest_and_refuses_another_version():
    plan = StructurePlan.from_runs(zoo_runs(), "zoo")
    data = json.loads(json.dumps(plan.to_dict()))
    again = StructurePlan.from_dict(data)
    assert again.to_dict() == data and again.layers["a"] == plan.layers["a"]
    assert StructurePlan.from_dict(None) is None       # a package written before plans
    with pytest.raises(PlanError, match="structure plan version 99"):
        StructurePlan.from_dict(dict(data, version=99))


def test_kernels_are_matched_by_value_and_a_missing_weight_is_an_error():
    plan = StructurePlan.from_runs(onnx_runs(), "onnx")
    wp, wq = np.ones((2, 8, 3, 3), np.float32), np.zeros((2, 8, 3, 3), np.float32)
    by_kernel = plan.by_kernel({"p.weight": wp, "q.weight": wq, "p.bias": np.ones(2, np.float32)})
    assert by_kernel[kernel_digest(wp)].structure == (4, 2) and by_kernel[kernel_digest(wp)].layer == "p"
    assert by_kernel[kernel_digest(wq)].structure is None
    assert by_kernel[kernel_digest(wq)].reason == "kept dense by the plan: predicted 0.98x"
    assert len(by_kernel) == 2
    # the same values in another dtype are another kernel
    assert kernel_digest(wp) != kernel_digest(wp.astype(np.float16))
    with pytest.raises(PlanError, match=r"1 structured layer\(s\) of the plan have no weight .*\(p\)"):
        plan.by_kernel({"q.weight": wq})
    # a weight without ".weight" (a TorchScript export's "onnx::Conv_38") is its own layer
    traced = StructurePlan.from_runs([{"name": "decompose_structured_conv", "records": [
        {"layer": "onnx::Conv_38", "action": "decomposed", "details": {"c": 4, "n": 2, "C": 8, "N": 3}}]}], "onnx")
    assert traced.by_kernel({"onnx::Conv_38": wp})[kernel_digest(wp)].structure == (4, 2)


def two_structured_convs():
    """Relax module with two exactly structured convs (weights l1.weight, l2.weight)."""
    w1, w2 = structured_weight(8, 8, 3, 4, 2, seed=1), structured_weight(8, 8, 3, 4, 2, seed=2)
    return two_conv_module(w1, w2, ("l1.weight", "l2.weight")), w1, w2


def plan_of(**layers) -> StructurePlan:
    runs = [{"name": "decompose_structured_conv", "records": [
        {"layer": name, "action": action, "details": {"c": c, "n": n, "C": 8, "N": 3, "reason": "by the test"}}
        for name, (action, c, n) in layers.items()]}]
    return StructurePlan.from_runs(runs, "test")


def test_tvm_fuses_what_the_plan_says_not_what_it_discovers(tvm_env):
    tvm, target = tvm_env
    from structexport.tvm_fused import fuse_structured_convs
    mod, w1, w2 = two_structured_convs()
    _, discovered = fuse_structured_convs(mod)
    assert [r["fused"] for r in discovered] == [True, True]        # both are exactly structured
    plan = plan_of(l1=("decomposed", 4, 2), l2=("kept", 4, 2))
    fused, records = fuse_structured_convs(mod, plan=plan.by_kernel({"l1.weight": w1, "l2.weight": w2}))
    assert [(r["name"], r["fused"]) for r in records] == [("l1", True), ("l2", False)]
    assert records[0]["structure"] == [4, 2] and records[0]["macs_after"] == 8 * 4 * 4 * 64
    assert records[1]["reason"] == "kept dense by the plan: by the test"
    assert records[1]["macs_before"] == records[1]["macs_after"] == 8 * 8 * 9 * 64
    x = np.random.default_rng(4).standard_normal((1, 8, 8, 8)).astype(np.float32)
    xt = torch.from_numpy(x).double()
    ref = F.conv2d(F.conv2d(xt, torch.from_numpy(w1).double(), padding=1).relu(),
                   torch.from_numpy(w2).double(), padding=1).numpy()
    got = run(tvm, tvm.compile(fused, target=target), x)
    assert np.abs(got - ref).max() <= TOL * np.abs(ref).max()


def test_a_plan_that_does_not_fit_the_kernels_is_refused(tvm_env):
    from structexport.tvm_fused import fuse_structured_convs
    mod, w1, w2 = two_structured_convs()
    # the kernel is 4x2x2-structured, not 2x2x2: the plan is wrong, not the model
    wrong = plan_of(l1=("decomposed", 2, 2))
    with pytest.raises(PlanError, match=r"is .* from the structure plan's 2x2x2"):
        fuse_structured_convs(mod, plan=wrong.by_kernel({"l1.weight": w1, "l2.weight": w2}))
    # a planned layer whose kernel the module does not hold (another value under its name)
    stale = plan_of(l1=("decomposed", 4, 2)).by_kernel({"l1.weight": w1 + 1, "l2.weight": w2})
    with pytest.raises(PlanError, match=r"1 structured layer\(s\) of the plan were not found .*\(l1\)"):
        fuse_structured_convs(mod, plan=stale)


@pytest.mark.parametrize("source", ["zoo", "onnx"])
def test_convert_stores_the_plan_and_tvm_builds_from_it(source, repo_root, tmp_path, tvm_env):
    """Both pipelines: the manifest's plan, and the TVM library fusing exactly the plan's
    structured layers, by name."""
    from structexport.export import export_onnx
    from structexport.models import build_model
    out = tmp_path / "pkg"
    if source == "zoo":
        args = [str(repo_root / "models/checkpoints/trained/resnet20-struct-c2n2-sr-seed0.safetensors")]
    else:
        from structexport.layers.decomposed import recompose
        from structexport.passes import PassContext, PassManager, select_passes
        torch.manual_seed(0)
        model = build_model("resnet20-struct-c2n2").eval()
        # the zoo model as a dense ONNX file: its structure is only in the weights
        dense, _ = PassManager(select_passes(["decompose_structured"])).run(
            model, PassContext("ort-cpu", (1, 3, 32, 32), {}))
        export_onnx(recompose(dense), torch.randn(1, 3, 32, 32), tmp_path / "dense.onnx")
        args = [str(tmp_path / "dense.onnx")]
    r = CliRunner().invoke(main, ["convert", *args, "--target", "tvm-llvm", "-o", str(out)])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    plan = StructurePlan.from_dict(m["structure_plan"])
    assert len(plan.decomposed()) == 18
    assert {e.origin for e in plan.decomposed().values()} == {ZOO_CLASS if source == "zoo" else DISCOVERED}
    built = m["target_build"]["structured_convs"]
    assert built["structure_from"] == "the structure plan"
    fused = {row["name"]: row["structure"] for row in built["layers"] if row["fused"]}
    assert fused == {k: [e.c, e.n] for k, e in plan.decomposed().items()}
    assert m["deployed_verification"][0]["passed"]
