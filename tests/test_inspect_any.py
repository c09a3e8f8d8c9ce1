"""`structexport inspect` on every front end: a user's own CNN, with exactly structured
kernels in some convs and random weights elsewhere, saved as ONNX, as a torch.export
archive (.pt2), as a state dict with --model FILE.py:build and as TorchScript, reports the
structure discovered in the weights, the same totals in all four forms, and the
theoretical speedup before/after MACs; approximately structured weights need a looser
--max-residual; a garbage file is one error line; zoo checkpoints keep their report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from structexport.cli import main
from structexport.costmodel import node_costs, totals
from structexport.layer_cost import MIN_SPEEDUP
from structexport.layers.structured import compose_kernel

# Layers whose kernels are composed from coefficients: (c, n) of the c x n x n structure.
STRUCTURE = {"c1": (8, 2), "grouped": (4, 2), "pointwise": (16, 1)}
APPROX = ("approx", (16, 2))     # structured, plus 1e-3 relative noise
SHAPE = (1, 3, 32, 32)


class MyNet(nn.Module):
    """A user's own CNN: a stem with batch norm, a C/2x2x2 16->16 conv, a strided grouped
    conv, a 1x1 conv, an approximately structured conv, a random one and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.c1 = nn.Conv2d(16, 16, 3, 1, 1)
        self.grouped = nn.Conv2d(16, 32, 3, 2, 1, groups=2)
        self.pointwise = nn.Conv2d(32, 32, 1)
        self.approx = nn.Conv2d(32, 32, 3, 1, 1, bias=False)
        self.dense = nn.Conv2d(32, 32, 3, 1, 1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = torch.relu(self.c1(x)) + x
        x = torch.relu(self.grouped(x))
        x = torch.relu(self.pointwise(x)) + x
        x = torch.relu(self.approx(x))
        x = torch.relu(self.dense(x))
        return self.fc(x.mean((2, 3)))


def my_net() -> MyNet:
    torch.manual_seed(0)
    net = MyNet()
    with torch.no_grad():
        for name, (c, n) in [*STRUCTURE.items(), APPROX]:
            conv = getattr(net, name)
            O, C, N, _ = conv.weight.shape
            conv.weight.copy_(compose_kernel(torch.randn(O, c, n, n) * 0.2, C, N))
        w = net.approx.weight
        noise = torch.randn_like(w)
        w.add_(noise * (1e-3 * w.norm() / noise.norm()))
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net.eval()


MODULE_SOURCE = "from test_inspect_any import MyNet\n\n\ndef build():\n    return MyNet()\n"

FORMS = {
    "onnx": ["mynet.onnx"],
    "torch-export": ["mynet.pt2"],
    "module": ["mynet_sd.pt", "--model", "{root}/mynet.py:build", "--input-shape", "1,3,32,32"],
    "torchscript": ["mynet_ts.pt", "--allow-torchscript", "--input-shape", "1,3,32,32"],
}


def inspect(*args):
    return CliRunner().invoke(main, ["inspect", *map(str, args)])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    here = str(Path(__file__).parent)
    if here not in sys.path:       # mynet.py imports MyNet from this file
        sys.path.insert(0, here)
    root = tmp_path_factory.mktemp("inspect-any")
    from test_decompose_structured_conv_pass import save_four_forms
    return save_four_forms(my_net(), torch.randn(SHAPE), root, MODULE_SOURCE)


def run_form(root: Path, form: str, *extra: str) -> dict:
    args = [a.format(root=root) for a in FORMS[form]]
    result = inspect(root / args[0], *args[1:], *extra, "--json")
    assert result.exit_code == 0, (form, result.output)
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def reports(saved):
    return {form: run_form(saved, form) for form in FORMS}


@pytest.mark.parametrize("form", list(FORMS))
def test_each_form_reports_the_structure_in_the_weights(reports, form):
    report = reports[form]
    assert report["source"]["format"] == form
    assert report["input_shape"] == list(SHAPE)
    assert report["max_residual"] == 1e-5 and report["min_saving"] == 0.2
    layers = {r["name"]: r for r in report["layers"]}
    for name, (c, n) in STRUCTURE.items():
        row = layers[name]
        assert (row["c"], row["n"]) == (c, n), row
        assert row["structure"] == f"{c}x{n}x{n}" and row["structured"] and row["residual"] < 1e-6
        # decomposed unless this CPU's cost model (the tests': tests/cost_model.json) predicts
        # it under 1.05x faster than the dense conv, as convert decides on ort-cpu
        assert row["decompose"] == (row["predicted_speedup"] >= MIN_SPEEDUP), row
        assert row["reason"] is None if row["decompose"] else row["reason"].startswith("kept dense: predicted")
    # everything else -- the stem (TorchScript's exporter folds the batch norm into it and
    # renames its weight), the approximately structured conv, the random conv, the
    # classifier -- is dense at the default (exact) tolerance
    for name, row in layers.items():
        if name not in STRUCTURE:
            assert row["structure"] == "dense" and not row["structured"] and not row["decompose"], row
            assert (row["c"], row["n"]) == (row["C"], row["N"])
            assert row["params_after"] == row["params_before"] and row["macs_after"] == row["macs_before"]
    assert layers["approx"]["reason"] == "dense" and layers["dense"]["reason"] == "dense"
    assert layers["fc"]["op"] == "linear" and "linear" in layers["fc"]["reason"]
    assert len(layers) == 7


def test_layer_fields_and_costs(reports):
    layers = {r["name"]: r for r in reports["onnx"]["layers"]}
    c1, grouped, pw = layers["c1"], layers["grouped"], layers["pointwise"]
    assert c1["weight_shape"] == [16, 16, 3, 3] and (c1["C"], c1["N"]) == (16, 3)
    assert c1["groups"] == 1 and c1["stride"] == 1 and c1["op"] == "conv2d"
    assert c1["macs_before"] == 16 * 32 * 32 * 16 * 9 and c1["macs_after"] == 16 * 32 * 32 * 8 * 4
    assert c1["params_before"] == 16 * 16 * 9 + 16 and c1["params_after"] == 16 * 8 * 4 + 16
    # the grouped conv: 2 groups of 8 channels, stride 2, 16x16 output
    assert grouped["groups"] == 2 and grouped["stride"] == 2 and (grouped["C"], grouped["N"]) == (8, 3)
    assert grouped["macs_before"] == 32 * 16 * 16 * 8 * 9 and grouped["macs_after"] == 32 * 16 * 16 * 4 * 4
    assert pw["macs_after"] * 2 == pw["macs_before"] and (pw["C"], pw["N"]) == (32, 1)
    # sum-pool additions are counted apart, for decomposed layers only
    assert all((r["sumpool_adds"] > 0) == r["decompose"] for r in layers.values())


def test_the_same_totals_in_every_form_and_the_theoretical_speedup(reports, saved):
    t = reports["onnx"]["totals"]
    for form, report in reports.items():
        assert report["totals"] == t, form
    assert (t["layers"], t["structured"], t["decomposed"]) == (7, 3, 3)
    assert t["speedup_theoretical"] == pytest.approx(t["macs_before"] / t["macs_after"])
    assert t["speedup_theoretical"] > 1.2
    assert t["macs_before"] - t["macs_after"] == sum(r["macs_before"] - r["macs_after"]
                                                     for r in reports["onnx"]["layers"])
    assert t["params_after"] < t["params_before"]
    # before = what the cost model counts on the source graph (convert's "before")
    assert t["macs_before"] == totals(node_costs(saved / "mynet.onnx"))["macs"]
    assert t["other_macs"] == 0


def test_approximately_structured_layer_needs_a_looser_max_residual(saved, reports):
    report = run_form(saved, "onnx", "--max-residual", "0.01")
    assert report["max_residual"] == 0.01
    row = next(r for r in report["layers"] if r["name"] == APPROX[0])
    assert (row["c"], row["n"]) == APPROX[1] and row["structured"] and row["decompose"]
    assert 3e-4 < row["residual"] < 1.5e-3, row["residual"]
    assert report["totals"]["decomposed"] == 4
    assert report["totals"]["macs_after"] < reports["onnx"]["totals"]["macs_after"]


def test_human_output_is_a_table(saved):
    result = CliRunner().invoke(main, ["inspect", str(saved / "mynet.pt2")], terminal_width=200)
    assert result.exit_code == 0, result.output
    for fragment in ("c1", "8x2x2 of 16x3x3", "no: dense", "theoretical speedup", "decompose"):
        assert fragment in result.stdout, fragment


def test_garbage_onnx_is_one_error_line(tmp_path):
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"this is not a protobuf \x00\xff" * 40)
    result = inspect(path, "--json")
    assert result.exit_code == 21, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "broken.onnx" in lines[0], lines


def test_zoo_checkpoint_shows_the_discovered_structure_of_dense_3x3_convs(tmp_path):
    from structexport.models import build_model
    model = build_model("resnet20", seed=0)
    conv = model.stage_1[0].conv_a
    with torch.no_grad():
        O, C, N, _ = conv.weight.shape
        conv.weight.copy_(compose_kernel(torch.randn(O, C // 2, 2, 2), C, N))
    path = tmp_path / "r20.pt"
    torch.save(model.state_dict(), path)
    result = inspect(path, "--arch", "resnet20", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["arch"] == "resnet20" and report["checkpoint"]["format"] == "torch-zip"
    layers = {r["name"]: r for r in report["layers"]}
    found = layers["stage_1.0.conv_a"]["discovered"]
    assert (found["c"], found["n"], found["structured"]) == (C // 2, 2, True)
    assert layers["stage_1.0.conv_a"]["residual"] < 1e-6       # vs C/2x2x2, as before
    assert layers["stage_1.0.conv_b"]["discovered"]["structured"] is False
    assert all(r["discovered"] is None for r in report["layers"] if r["op"] == "linear")
