"""Issue 20: ``convert --precision int8`` -- the rebase pass (pattern before, gone after,
outputs match), quantized realizations against their float32 form on real CIFAR-10 images,
the accuracy gate, the INT8 package (verification data, timed-session checks, bench against
the dense INT8 baseline), refusals, and INT8 from every front end."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from click.testing import CliRunner

from structexport.cli import main
from structexport.convert import ConvertOptions, convert
from structexport.passes import ONNX, PassContext, PassManager
from structexport.passes.rebase_channel_sums_pass import RebaseChannelSumsPass, find_channel_sums
from structexport.models import build_model
from structexport.models.trained import trained_weights

HERE = Path(__file__).resolve().parent
SMALL = ["--calibration-count", "64", "--int8-gate-images", "200"]
ALL_STRUCTURED = ["--int8-layers", "structured"]     # no per-layer timing: the same graph on every CPU


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], terminal_width=250)


def structured_checkpoint() -> Path:
    return next(w for w in trained_weights() if w.name == "resnet20-struct-c2n2").path


def banded_graph(checkpoint, tmp_path) -> Path:
    out = tmp_path / "banded"
    convert(str(checkpoint), out, options=ConvertOptions(target="onnx",
                                                         pass_options={"sumpool_realization": "banded"}))
    return out / "model.onnx"


def cifar(cifar10_dir, which: str, count: int, offset: int = 0):
    from structexport.datasets import Preprocess
    with np.load(cifar10_dir / which) as d:
        images, labels = d["images"][offset:offset + count], d["labels"][offset:offset + count]
    return Preprocess.preset("cifar10").apply_uint8(images).astype(np.float32), labels.astype(np.int64)


# --------------------------------------------------------------------------- the pass

def test_rebase_channel_sums_three_ways(tmp_path):
    """Pattern before (18 banded channel sums of ResNet-20 C/2x2x2), gone after, outputs kept."""
    path = banded_graph(structured_checkpoint(), tmp_path)
    model = ir.from_proto(onnx.load(str(path)))
    assert len(find_channel_sums(model.graph)) == 18
    x = torch.randn(1, 3, 32, 32)
    out, runs = PassManager([RebaseChannelSumsPass()], check_inputs=x, model_kind=ONNX).run(model, PassContext())
    assert len(find_channel_sums(out.graph)) == 0
    assert runs[0].max_abs_diff < 1e-4 and len(runs[0].records) == 18
    first = runs[0].records[0]
    assert first.layer == "stage_1.0.conv_a.conv"
    assert first.details["channel_window"] == 9 and first.details["sum_scale"] == 3.0
    # each layer owns its weights now: band rows are one scaled sum, then +1/-1 pairs
    band = next(n for n in out.graph if n.name == first.details["nodes"][0]).inputs[1].const_value.numpy()
    assert band.shape == (8, 16, 1, 1)
    assert np.allclose(band[0, :9, 0, 0], 1 / 3) and np.all(band[0, 9:] == 0)
    assert sorted(band[3, :, 0, 0].tolist()) == [-1.0] + [0.0] * 14 + [1.0]


def test_rebase_channel_sums_grouped_conv():
    """A grouped structured conv (two groups): each group rebased on its own."""
    from structexport.export import export_onnx
    from structexport.layers.decomposed import decompose
    torch.manual_seed(0)
    layer = decompose(16, torch.randn(12, 4, 2, 2), None, 3, 1, 1, groups=2, realization="banded").eval()
    x = torch.randn(1, 16, 10, 10)
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.onnx"
        export_onnx(torch.nn.Sequential(layer), x, path)
        model = ir.from_proto(onnx.load(str(path)))
    assert [w[0] for *_, w in find_channel_sums(model.graph)] == [2]
    out, runs = PassManager([RebaseChannelSumsPass()], check_inputs=x, model_kind=ONNX).run(model, PassContext())
    assert runs[0].max_abs_diff < 1e-4 and runs[0].records[0].details["groups"] == 2
    assert not find_channel_sums(out.graph)


def test_rebased_bands_quantize_far_better_than_plain_bands(tmp_path, cifar10_dir):
    """On real images: the trained structured ResNet-20 quantized as plain bands loses about a
    seventh of its top-1 agreement with float32 (86% on 2,000 test images); rebased it keeps
    what the same kernels keep quantized as dense 3x3 convs (98%). Here: 300 test images."""
    from structexport.ortsession import ort_session, session_runner
    from structexport.quantize import agreement, layer_sqnr, quantize_qdq
    banded = banded_graph(structured_checkpoint(), tmp_path)
    model, runs = PassManager([RebaseChannelSumsPass()], check_inputs=torch.randn(1, 3, 32, 32),
                              model_kind=ONNX).run(ir.from_proto(onnx.load(str(banded))), PassContext())
    rebased = tmp_path / "rebased.onnx"
    rebased.write_bytes(ir.to_proto(model).SerializeToString())
    calib, _ = cifar(cifar10_dir, "train-25k.npz", 64)
    x, y = cifar(cifar10_dir, "test.npz", 300)
    results = {}
    for name, fp32 in (("banded", banded), ("rebased", rebased)):
        q = tmp_path / f"{name}.int8.onnx"
        quantize_qdq(fp32, q, calib, "minmax", [])
        ref, cand = (session_runner(ort_session(p, 1)) for p in (fp32, q))
        results[name] = agreement(lambda a: ref(a)[0], lambda a: cand(a)[0], x, y, 1)
        if name == "rebased":
            rows = layer_sqnr(fp32, q, calib[:16])
    assert results["rebased"]["agreement"] >= 0.96
    assert results["rebased"]["agreement"] >= results["banded"]["agreement"] + 0.05
    # every layer of the rebased form against its float32 form: the stem, 18 x (band, box,
    # small conv), the classifier
    assert len(rows) == 1 + 18 * 3 + 1 and all(r["quantized"] for r in rows)
    assert min(r["sqnr_db"] for r in rows) > 15.0


class PreActivation(torch.nn.Module):
    """A DenseNet's pattern: two conv outputs of very different ranges concatenated, then a
    batch norm no conv absorbs (it scales the small channels up), ReLU, conv."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.big, self.small = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(3, 4, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8).eval()
        self.out = torch.nn.Conv2d(8, 4, 1)
        with torch.no_grad():
            self.big.weight.mul_(100.0)
            self.small.weight.mul_(0.01)
            self.bn.weight.copy_(torch.tensor([0.01] * 4 + [100.0] * 4))

    def forward(self, x):
        return self.out(torch.relu(self.bn(torch.cat([self.big(x), self.small(x)], 1))))


def test_batch_norms_no_conv_absorbs_stay_in_float(tmp_path):
    """The batch norm and the concatenation it reads are kept in float32, so each conv's
    output is quantized with its own scale and the batch norm's gain meets no rounding: the
    INT8 output stays close to float32 although the two branches differ 10^4 in range."""
    from structexport.export import export_onnx
    from structexport.ortsession import ort_session, session_runner
    from structexport.quantize import float_islands, quantize_qdq
    net = PreActivation().eval()
    x = torch.randn(16, 3, 8, 8)
    fp32 = tmp_path / "pre.onnx"
    export_onnx(net, x[:1], fp32)
    islands = float_islands(fp32)
    ops = {n.name: n.op_type for n in onnx.load(str(fp32)).graph.node}
    assert sorted(ops[n] for n in islands) == ["BatchNormalization", "Concat"]
    q = tmp_path / "pre.int8.onnx"
    record = quantize_qdq(fp32, q, x.numpy(), "minmax", [])
    assert record["kept_fp32_always"] == islands and record["kept_fp32"] == []
    graph = onnx.load(str(q)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    bn = next(n for n in graph.node if n.op_type == "BatchNormalization")
    assert producer[bn.input[0]] == "Concat"                   # no QuantizeLinear in between
    cat = next(n for n in graph.node if n.op_type == "Concat")
    assert all(producer[i] == "DequantizeLinear" for i in cat.input)   # each branch its own scale
    ref, got = session_runner(ort_session(fp32, 1)), session_runner(ort_session(q, 1))
    for i in range(4):
        r, g = ref(x[i:i + 1].numpy())[0], got(x[i:i + 1].numpy())[0]
        assert np.abs(g - r).max() < 0.05 * np.abs(r).max()


# --------------------------------------------------------------------------- convert

@pytest.fixture(scope="module")
def int8_package(tmp_path_factory, cifar10_dir):
    out = tmp_path_factory.mktemp("int8") / "pkg"
    r = cli("convert", structured_checkpoint(), "--target", "ort-cpu", "--precision", "int8",
            "--calibration", cifar10_dir / "train-25k.npz", "--preprocess", "cifar10", *SMALL, *ALL_STRUCTURED,
            "-o", out)
    assert r.exit_code == 0, r.output
    return out, r.output


def test_int8_package_manifest_and_files(int8_package):
    out, output = int8_package
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "int8"
    q = m["int8"]
    assert q["calibration"]["calibration_images"] == 64 and q["calibration"]["gate_images"] == 200
    assert q["quantization"]["calibration_method"] == "minmax" and q["quantization"]["format"] == "QDQ"
    assert [rec["action"] for run in q["passes"] for rec in run["records"]] == ["rebased"] * 18
    assert q["layer_choice"] == {"policy": "structured", "layers": []}
    g = q["gate"]
    assert g["passed"] and g["images"] == 200 and g["agreement"] >= 0.95 and g["max_logit_diff"] > 0
    assert g["reference_top1"] > 0.75 and abs(g["int8_top1"] - g["reference_top1"]) <= 0.03
    assert q["dense_int8"]["gate"]["images"] == 200 and q["dense_int8"]["file"] == "reference.int8.onnx"
    assert all(r["sqnr_db"] is None or r["sqnr_db"] > 15 for r in q["layers"])
    assert {"model.onnx", "model.fp32.onnx", "reference.int8.onnx", "reference.onnx", "model.ort",
            "model.optimized.onnx", "verification.npz"} <= set(m["artifacts"])
    # the float32 model that was quantized is checked against the source at fp32's tolerance,
    # every shipped INT8 file against the fake-quantized graph at a few output steps
    records = {d["file"]: d for d in m["deployed_verification"]}
    assert records["model.fp32.onnx"]["passed"] and records["model.fp32.onnx"]["atol"] == 1e-4
    for f in ("model.onnx", "model.optimized.onnx", "model.ort"):
        assert records[f]["passed"] and records[f]["atol"] == pytest.approx(q["tolerance"]["atol"])
    assert 0 < q["tolerance"]["atol"] < 2
    kernels = q["kernels_on_images"]       # integer kernels against the QDQ graph, real images
    assert kernels["images"] == 64 and kernels["passed"] and kernels["max_abs_diff"] <= kernels["atol"]
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops and "CumSum" not in ops
    with np.load(out / "verification.npz") as d:
        assert any(k.startswith("int8/") for k in d.files) and any(k.startswith("output/") for k in d.files)
    assert "accuracy gate passed on 200 held-out images" in output
    assert "lowest per-layer SQNR" in output


def test_int8_package_checks_what_it_times(int8_package):
    """Package.check_timed on an INT8 package: the integer kernels against the stored
    fake-quantized outputs; a session that computes something else is refused (exit 32)."""
    from structexport.export import VerificationError
    from structexport.ortsession import ort_session, session_runner
    from structexport.package import Package
    out, _ = int8_package
    package = Package.load(out)
    run = session_runner(ort_session(out / "model.onnx", 1))
    package.check_timed(run, "model.onnx")
    package.check_timed(session_runner(ort_session(out / "reference.onnx", 1)), "reference.onnx", "fp32")
    with pytest.raises(VerificationError) as info:
        package.check_timed(lambda x: [o + 3.0 for o in run(x)], "shifted")
    assert info.value.exit_code == 32


def test_bench_int8_package_against_the_dense_int8_baseline(int8_package):
    out, _ = int8_package
    r = cli("bench", out, "--repeat", "5", "--warmup", "1", "--json", out.parent / "bench.json")
    assert r.exit_code == 0, r.output
    result = json.loads((out.parent / "bench.json").read_text())
    assert result["precision"] == "int8"
    s, q, d = (result[k]["median"] for k in ("latency_ms", "dense_int8_latency_ms", "dense_latency_ms"))
    assert result["speedup_measured"] == pytest.approx(q / s)
    assert result["speedup_over_dense_fp32"] == pytest.approx(d / s)
    assert result["macs"]["structured"] < result["macs"]["dense"]
    assert "dense INT8" in r.output and "structured INT8" in r.output
    # the structure's theory: convert's figure (sum-pools as additions), above the shipped
    # graph's (rebased bands count as multiplies)
    m = json.loads((out / "manifest.json").read_text())
    st = result["structure_theoretical"]
    assert st["speedup"] == pytest.approx(result["macs"]["dense"] / m["int8"]["structure_macs"])
    assert st["speedup"] == pytest.approx(m["dense"]["macs"] / m["after"]["macs"], rel=1e-3) and st["speedup"] > 4.0
    assert st["speedup"] > result["speedup_theoretical"]
    assert st["efficiency"] == pytest.approx(result["speedup_measured"] / st["speedup"])
    assert "against the structure's theory" in r.output
    r = cli("bench", out, "--target", "tvm-llvm", "--repeat", "3")
    assert r.exit_code != 0 and "INT8 package" in r.output
    # per layer against the dense INT8 baseline: ONNX Runtime's fused QLinearConv nodes
    # (node_Conv_N_token_M) are mapped back to every layer
    r = cli("bench", out, "--repeat", "3", "--warmup", "1", "--per-layer", "--json", out.parent / "pl.json")
    assert r.exit_code == 0, r.output
    result = json.loads((out.parent / "pl.json").read_text())
    rows = {e["layer"]: e for e in result["per_layer"]}
    convs = [name for name in rows if name.startswith("stage_")]
    assert len(convs) == 18 and all(rows[n]["structured_ms"] > 0 and rows[n]["dense_ms"] > 0 for n in convs)
    assert "QLinearConv" in result["per_op_ms"]["dense"]


def test_the_gate_refuses_and_writes_nothing(tmp_path, cifar10_dir):
    out = tmp_path / "gated"
    args = ["convert", structured_checkpoint(), "--target", "ort-cpu", "--precision", "int8",
            "--calibration", cifar10_dir / "train-25k.npz", "--preprocess", "cifar10",
            "--calibration-count", "32", "--int8-gate-images", "50", "--int8-max-logit-diff", "1e-6", *ALL_STRUCTURED,
            "-o", out]
    r = cli(*args)
    assert r.exit_code == 53, r.output
    assert "fails the accuracy gate on 50 held-out images" in r.output and "lowest SQNR" in r.output
    assert not out.exists() and not list(tmp_path.glob(".gated*"))
    r = cli(*args, "--force")
    assert r.exit_code == 0, r.output
    gate = json.loads((out / "manifest.json").read_text())["int8"]["gate"]
    assert gate["passed"] is False and "largest logit difference" in gate["failures"][0]


def test_keep_fp32_keeps_a_layer_in_float(tmp_path, cifar10_dir):
    out = tmp_path / "kept"
    r = cli("convert", structured_checkpoint(), "--target", "ort-cpu", "--precision", "int8",
            "--calibration", cifar10_dir / "train-25k.npz", "--preprocess", "cifar10",
            "--calibration-count", "32", "--int8-gate-images", "50", "--int8-min-agreement", "0",
            "--keep-fp32", "classifier", *ALL_STRUCTURED, "-o", out)     # the gate is not this test's subject
    assert r.exit_code == 0, r.output
    q = json.loads((out / "manifest.json").read_text())["int8"]
    assert q["quantization"]["kept_fp32"] == ["node_linear"] or len(q["quantization"]["kept_fp32"]) == 1
    row = next(r for r in q["layers"] if r["layer"] == "classifier")
    assert row["quantized"] is False
    graph = onnx.load(str(out / "model.onnx")).graph
    gemm = next(n for n in graph.node if n.op_type == "Gemm")
    assert gemm.input[1] in {i.name for i in graph.initializer}     # a float weight, no DequantizeLinear


def test_layers_slower_structured_ship_dense(tmp_path, cifar10_dir):
    """The default per-layer choice, its timings read from the cache (this machine's key, so
    the test does not depend on the CPU): the six 16-channel layers, timed slower structured
    than dense, are shipped as composed 3x3 convs; the other twelve stay structured and
    rebased; nothing is measured; the package is verified and gated as always."""
    from structexport.costmodel import tensor_shapes
    from structexport.passes.autotune import machine_key
    from structexport.passes.compose_dense_layers_pass import find_decomposed
    from structexport.quantize import layer_key
    model = ir.from_proto(onnx.load(str(banded_graph(structured_checkpoint(), tmp_path))))
    shapes = tensor_shapes(ir.to_proto(model))
    entries = {}
    for layer in find_decomposed(model.graph):
        slow = layer.layer.startswith("stage_1.")
        entries[layer_key(layer, shapes[layer.input.name])] = {"structured": 0.09 if slow else 0.03, "dense": 0.06}
    assert len(entries) == 5
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "int8-layers.json").write_text(json.dumps({machine_key("ort-cpu int8 qdq", 1): entries}))
    out = tmp_path / "pkg"
    r = CliRunner().invoke(main, [str(a) for a in (
        "convert", structured_checkpoint(), "--target", "ort-cpu", "--precision", "int8", "--calibration",
        cifar10_dir / "train-25k.npz", "--preprocess", "cifar10", "--calibration-count", "32",
        "--int8-gate-images", "50", "--int8-min-agreement", "0", "-o", out)],
        env={"STRUCTEXPORT_CACHE": str(cache)}, terminal_width=250)
    assert r.exit_code == 0, r.output
    q = json.loads((out / "manifest.json").read_text())["int8"]
    choice = q["layer_choice"]
    assert choice["policy"] == "measure" and choice["measured"] == 0 and choice["from_cache"] == 18
    dense = [row["layer"] for row in choice["layers"] if row["choice"] == "dense"]
    assert dense == [f"stage_1.{b}.conv_{c}" for b in range(3) for c in "ab"]
    actions = [(rec["action"], rec["layer"]) for run in q["passes"] for rec in run["records"]]
    assert [layer for action, layer in actions if action == "composed"] == dense
    assert sum(action == "rebased" for action, _ in actions) == 12
    said = " ".join(r.output.split())        # however the terminal wraps it
    assert "0 layer shape(s) timed now, 18 layer(s) from" in said
    assert "12 of 18 decomposed layers stay structured" in said
    fp32 = onnx.load(str(out / "model.fp32.onnx")).graph
    inits = {i.name: i for i in fp32.initializer}
    composed = [n for n in fp32.node if n.name.endswith("/dense")]
    assert [n.input[1] for n in composed] == [f"{layer}.weight" for layer in dense]
    assert all(list(inits[n.input[1]].dims) == [16, 16, 3, 3] for n in composed)
    # the SQNR rows name the composed layers after their source layer
    assert {row["layer"] for row in q["layers"]} >= set(dense)


def test_csg_and_ssc_models_quantize(tmp_path, cifar10_dir, fixtures_dir):
    """A published CSG checkpoint (kernels materialized from the shared generator, then
    quantized per output channel) and an SSC model (its sparse convs lowered to grouped
    convs, which stay grouped in the QDQ graph), each checked and gated as any other."""
    data = cifar10_dir / "train-25k.npz"
    csg = tmp_path / "csg"
    r = cli("convert", fixtures_dir / "resnet20-csg-16x16x3x3-72.t7", "--arch", "resnet20", "--target", "ort-cpu",
            "--precision", "int8", "--calibration", data, "--preprocess", "cifar10", "--calibration-count", "32",
            "--int8-gate-images", "100", "-o", csg)
    assert r.exit_code == 0, r.output
    m = json.loads((csg / "manifest.json").read_text())
    assert m["int8"]["gate"]["passed"] and m["int8"]["gate"]["agreement"] >= 0.97
    graph = onnx.load(str(csg / "model.onnx")).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert len(convs) == 19                                 # every conv quantized, CSG kernels as weights
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert all(n.input[0] in dequantized and n.input[1] in dequantized for n in convs)
    # SSC: random weights (no trained SSC checkpoint), so the gate is off and the integer-kernel
    # check is recorded, not enforced
    torch.save(build_model("resnet32x2-ssc-10", seed=1).state_dict(), tmp_path / "ssc.pt")
    ssc = tmp_path / "ssc"
    r = cli("convert", tmp_path / "ssc.pt", "--arch", "resnet32x2-ssc-10", "--target", "ort-cpu",
            "--precision", "int8", "--calibration", data, "--preprocess", "cifar10", "--calibration-count", "16",
            "--int8-gate-images", "20", "--int8-min-agreement", "0", "--force", "-o", ssc)
    assert r.exit_code == 0, r.output
    fp32 = onnx.load(str(ssc / "model.fp32.onnx")).graph
    grouped = [n.name for n in fp32.node if n.op_type == "Conv"
               and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    quantized = onnx.load(str(ssc / "model.onnx")).graph
    assert grouped and {n.name for n in quantized.node if n.op_type == "Conv"
                        and any(a.name == "group" and a.i > 1 for a in n.attribute)} == set(grouped)
    q = json.loads((ssc / "manifest.json").read_text())["int8"]
    assert {r["node"] for r in q["layers"] if r["quantized"]} >= set(grouped)


# --------------------------------------------------------------------------- refusals

def test_int8_refusals(tmp_path, cifar10_dir):
    ck, data = structured_checkpoint(), cifar10_dir / "train-25k.npz"
    base = ["convert", ck, "-o", tmp_path / "x"]
    cases = [
        ([*base, "--target", "ort-cpu", "--precision", "int8", "--preprocess", "cifar10"], 2, "needs calibration images"),
        ([*base, "--target", "ort-cpu", "--calibration", data, "--preprocess", "cifar10"], 2, "add --precision int8"),
        ([*base, "--target", "ort-cpu", "--calibration-count", "9"], 2, "--calibration-count"),
        ([*base, "--target", "tvm-llvm", "--precision", "int8", "--calibration", data, "--preprocess", "cifar10"],
         2, "TVM's Relax frontend has no INT8 conv"),
        ([*base, "--target", "onnx", "--precision", "int8", "--calibration", data, "--preprocess", "cifar10"],
         2, "built for ort-cpu"),
        ([*base, "--target", "ort-cpu", "--precision", "int8", "--calibration", data], 2, "add --preprocess"),
        ([*base, "--target", "ort-cpu", "--precision", "int8", "--calibration", data, "--preprocess", "cifar10",
          "--sumpool-realization", "cumsum"], 2, "no integer kernels"),
        ([*base, "--target", "ort-cpu", "--precision", "int8", "--calibration", data, "--preprocess", "cifar10",
          "--keep-fp32", "nothing*", *SMALL], 2, "names no layer of the model"),
    ]
    for args, code, text in cases:
        r = cli(*args)
        assert r.exit_code == code and text in r.output, (args, r.output)
        assert not (tmp_path / "x").exists()
    few = tmp_path / "few.npz"
    with np.load(data) as d:
        np.savez(few, images=d["images"][:20], labels=d["labels"][:20])
    r = cli(*base, "--target", "ort-cpu", "--precision", "int8", "--calibration", few, "--preprocess", "cifar10")
    assert r.exit_code == 52 and "756 images are needed" in r.output, r.output


# --------------------------------------------------------------------------- front ends

MODULE_SOURCE = (f"import sys\nsys.path.insert(0, {str(HERE)!r})\n"
                 "from test_decompose_structured_conv_pass import MyNet\n\n\ndef build():\n    return MyNet()\n")


@pytest.mark.parametrize("front_end", ["onnx", "pt2", "module"])
def test_int8_from_every_front_end(front_end, tmp_path, cifar10_dir):
    """A user's structured network (a grouped structured conv among its layers) as ONNX,
    torch.export and a state dict with --model: quantized, checked and gated like a zoo model."""
    sys.path.insert(0, str(HERE))
    from test_decompose_structured_conv_pass import save_four_forms, structured_net
    save_four_forms(structured_net(), torch.randn(1, 3, 32, 32), tmp_path, MODULE_SOURCE)
    source = {"onnx": [tmp_path / "mynet.onnx"], "pt2": [tmp_path / "mynet.pt2"],
              "module": [tmp_path / "mynet_sd.pt", "--model", f"{tmp_path}/mynet.py:build",
                         "--input-shape", "1,3,32,32"]}[front_end]
    out = tmp_path / "out"
    r = cli("convert", *source, "--target", "ort-cpu", "--precision", "int8", "--calibration",
            cifar10_dir / "train-25k.npz", "--preprocess", "cifar10", "--calibration-count", "32",
            "--int8-gate-images", "50", "--int8-min-agreement", "0", *ALL_STRUCTURED, "-o", out)
    assert r.exit_code == 0, r.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "int8" and m["int8"]["gate"]["images"] == 50
    rebased = [rec for run in m["int8"]["passes"] for rec in run["records"] if rec["action"] == "rebased"]
    assert any(rec["details"]["groups"] == 4 for rec in rebased)      # the grouped conv
    assert all(d["passed"] for d in m["deployed_verification"])


def test_regress_against_an_int8_package(int8_package):
    """regress times two INT8 packages interleaved, each session checked against its
    fake-quantized outputs first, and judges them per layer."""
    out, _ = int8_package
    r = cli("regress", "--against", out, out, "--repeat", "5", "--json", out.parent / "regress.json")
    assert r.exit_code == 0, r.output
    report = json.loads((out.parent / "regress.json").read_text())
    assert report["passed"] is True
    assert len([layer for layer in report["layers"] if layer["name"].startswith("stage_")]) == 18
