"""Messages and counts that mislead (issue 18, point 6).

- a state dict that is not a zoo model is told of both ``--arch NAME`` and ``--model
  FILE.py:FUNC``, without ``--arch`` and with a wrong one;
- ``--model path/to/pkg/sub/module.py:Class`` imports the module inside its package, so
  its relative imports resolve, and leaves nothing behind in ``sys.path``/``sys.modules``;
  a relative import outside any package names the exact ``--model`` to pass instead;
- a dense model's own pooling (MaxPool, AveragePool, global pooling) and element-wise
  Subs are not sum-pool additions, in ``inspect --json``, in ``convert``'s manifest and in
  the cost model; the sum-pools structexport emits still are;
- ``inspect``'s total row counts every conv and linear layer ("0 of 6 structured"),
  not only the structured ones ("0 of 0 structured").
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

from structexport.cli import main
from structexport.costmodel import node_costs, totals
from structexport.onnx_sumpool import GraphBuilder, emit_sumpool


def run(*args, **kw):
    return CliRunner().invoke(main, [str(a) for a in args], **kw)


def one_error_line(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------------------- a user's own net

class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))


class TinyNet(nn.Module):
    """The layout of the package's ``TinyNet`` below (same state-dict keys)."""

    def __init__(self, width=8):
        super().__init__()
        self.a = Block(3, width)
        self.b = Block(width, width)
        self.fc = nn.Linear(width, 10)

    def forward(self, x):
        return self.fc(self.b(self.a(x)).mean((2, 3)))


LAYERS_PY = '''import torch
import torch.nn as nn


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))
'''

TINY_PY = '''import torch.nn as nn

from ..layers import Block
from .head import Head

WIDTH = {width}


class TinyNet(nn.Module):
    input_shape = (1, 3, 16, 16)

    def __init__(self):
        super().__init__()
        self.a = Block(3, WIDTH)
        self.b = Block(WIDTH, WIDTH)
        self.fc = Head(WIDTH)

    def forward(self, x):
        return self.fc(self.b(self.a(x)).mean((2, 3)))
'''

HEAD_PY = '''import torch.nn as nn


class Head(nn.Linear):
    def __init__(self, width):
        super().__init__(width, 10)
'''


def write_package(root: Path, width: int = 8) -> Path:
    """``root/mypkg/{layers.py, models/{tiny.py, head.py}}``: tiny.py imports relatively,
    from its own folder and from the package above; returns tiny.py."""
    pkg = root / "mypkg"
    (pkg / "models").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "layers.py").write_text(LAYERS_PY)
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "tiny.py").write_text(TINY_PY.format(width=width))
    (pkg / "models" / "head.py").write_text(HEAD_PY)
    return pkg / "models" / "tiny.py"


def state_dict_file(path: Path, width: int = 8) -> Path:
    torch.manual_seed(width)
    torch.save(TinyNet(width).state_dict(), path)
    return path


# ---------------------------------------------------------------------------- --arch / --model hints

def test_a_state_dict_without_arch_is_told_of_arch_and_model(tmp_path):
    sd = state_dict_file(tmp_path / "sd.pt")
    for args in (["inspect", sd], ["convert", sd, "--target", "onnx", "-o", tmp_path / "out"]):
        line = one_error_line(run(*args), 19)
        assert line.startswith(f"error: {sd} does not say which architecture it holds (")
        assert "pass --arch NAME for a zoo model (see `structexport zoo`)" in line
        assert "--model FILE.py:FUNC to convert or inspect it as your own nn.Module" in line
    assert not (tmp_path / "out").exists()


def test_a_state_dict_with_a_wrong_arch_is_told_of_model_too(tmp_path):
    sd = state_dict_file(tmp_path / "sd.pt")
    line = one_error_line(run("inspect", sd, "--arch", "resnet20"), 16)
    assert line.startswith("error: checkpoint does not match resnet20: ")
    assert line.endswith("(check --arch (see `structexport zoo`), or pass --model FILE.py:FUNC "
                         "to convert or inspect it as your own nn.Module)")


# ---------------------------------------------------------------------------- --model in a package

def test_model_file_inside_a_package_with_relative_imports(tmp_path):
    tiny = write_package(tmp_path / "proj")
    sd = state_dict_file(tmp_path / "sd.pt")
    path_before, modules_before = list(sys.path), set(sys.modules)
    result = run("inspect", sd, "--model", f"{tiny}:TinyNet", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["source"]["format"] == "module" and report["source"]["name"] == "TinyNet"
    assert report["input_shape"] == [1, 3, 16, 16]
    assert [(r["name"], r["weight_shape"]) for r in report["layers"]] == [
        ("a.conv", [8, 3, 3, 3]), ("b.conv", [8, 8, 3, 3]), ("fc", [10, 8])]
    assert f"model built by tiny.py:TinyNet() (TinyNet)" in report["notes"]
    # nothing left behind: the folders leave sys.path, the package's own name sys.modules
    assert sys.path == path_before
    assert not any(n == "mypkg" or n.startswith("mypkg.") for n in set(sys.modules) - modules_before)


def test_two_packages_of_the_same_name_each_import_their_own(tmp_path):
    from structexport.frontends import load_source
    for width in (8, 16):
        tiny = write_package(tmp_path / f"proj{width}", width)
        sd = state_dict_file(tmp_path / f"sd{width}.pt", width)
        source = load_source(sd, model_spec=f"{tiny}:TinyNet")
        assert source.module.a.conv.weight.shape == (width, 3, 3, 3)
        x = torch.randn(1, 3, 16, 16)
        twin = TinyNet(width).eval()
        twin.load_state_dict(torch.load(sd))
        with torch.no_grad():
            assert torch.equal(source.module(x), twin(x))


def test_relative_import_outside_a_package_names_what_to_pass(tmp_path, monkeypatch):
    folder = tmp_path / "netdir"          # no __init__.py: not a package
    folder.mkdir()
    (folder / "layers.py").write_text(LAYERS_PY)
    (folder / "tiny.py").write_text(TINY_PY.format(width=8).replace("from ..layers", "from .layers")
                                    .replace("from .head import Head", "from torch.nn import Linear")
                                    .replace("Head(WIDTH)", "Linear(WIDTH, 10)"))
    sd = state_dict_file(tmp_path / "sd.pt")
    line = one_error_line(run("inspect", sd, "--model", f"{folder / 'tiny.py'}:TinyNet"), 26)
    assert line == (f"error: importing --model file {folder / 'tiny.py'} failed: ImportError: "
                    "attempted relative import with no known parent package (its relative imports "
                    f"need {folder} to be a package: pass --model netdir.tiny:TinyNet with "
                    f"PYTHONPATH={tmp_path}, or add an empty __init__.py to {folder})")
    # and what it names works: the module path with PYTHONPATH ...
    monkeypatch.syspath_prepend(str(tmp_path))
    result = run("inspect", sd, "--model", "netdir.tiny:TinyNet", "--json")
    for name in [n for n in sys.modules if n.split(".")[0] == "netdir"]:
        del sys.modules[name]   # imported under its own name: not this test's to keep
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["layers"]) == 3
    # ... or the file, once its folder is a package
    (folder / "__init__.py").write_text("")
    result = run("inspect", sd, "--model", f"{folder / 'tiny.py'}:TinyNet", "--json")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------------------- pooling is not a sum-pool

class PoolNet(nn.Module):
    """A dense CNN with the pooling detectors and classifiers have: max pooling, a
    stride-1 3x3 average pool, a strided one, a Sub of two activations, global pooling."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.c4 = nn.Conv2d(8, 8, 1)
        self.c5 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = F.max_pool2d(torch.relu(self.c1(x)), 2)                          # 8x8x8
        x = F.avg_pool2d(torch.relu(self.c2(x)), 3, stride=1, padding=1)     # 512 x 8 additions
        x = torch.relu(self.c3(x))
        x = x - torch.relu(self.c4(x))
        x = F.avg_pool2d(torch.relu(self.c5(x)), 2)                          # 128 x 3
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))               # 128 - 8

# 8x8x8 values of a 3x3 window, 8x4x4 of a 2x2 window, 8 sums of 4x4 values
POOL_ADDS = 512 * 8 + 128 * 3 + (128 - 8)


@pytest.fixture(scope="module")
def pool_net_onnx(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("poolnet") / "poolnet.onnx"
    torch.onnx.export(PoolNet().eval(), (torch.randn(1, 3, 16, 16),), dynamo=True,
                      opset_version=18).save(str(path))
    return path


def test_a_dense_models_pooling_is_no_sum_pool_in_the_cost_model(pool_net_onnx):
    t = totals(node_costs(pool_net_onnx))
    assert (t["adds"], t["pool_adds"]) == (0, POOL_ADDS)


def test_inspect_counts_no_sum_pool_additions_and_the_pooling_apart(pool_net_onnx):
    result = run("inspect", pool_net_onnx, "--json")
    assert result.exit_code == 0, result.output
    t = json.loads(result.stdout)["totals"]
    assert (t["sumpool_adds"], t["pool_adds"]) == (0, POOL_ADDS)
    assert (t["layers"], t["by_op"], t["structured"], t["decomposed"]) == (
        6, {"conv2d": 5, "linear": 1}, 0, 0)


def test_convert_manifest_counts_no_sum_pool_additions(pool_net_onnx, tmp_path):
    out = tmp_path / "out"
    result = run("convert", pool_net_onnx, "--target", "ort-cpu", "-o", out)
    assert result.exit_code == 0, result.output
    m = json.loads((out / "manifest.json").read_text())
    assert [m[k]["sumpool_adds"] for k in ("before", "dense", "after")] == [0, 0, 0]


def test_inspect_total_row_counts_every_conv_and_linear_layer(pool_net_onnx):
    result = run("inspect", pool_net_onnx, terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "total (6 layers: 5 conv, 1 linear)" in result.stdout
    assert "0 of 6 structured, 0 decomposed" in result.stdout
    assert "of 0 structured" not in result.stdout
    assert f"average pooling additions {POOL_ADDS:,} (the model's own pooling, not sum-pools)" \
        in result.stdout
    assert "sum-pool additions" not in result.stdout


def emitted_then_pooled(realization: str) -> Path:
    """structexport's sum-pool (8 channels, window 5x2x2, padding 1, 7x7) as the ONNX
    emitter writes it, then an ordinary 2x2 average pool of its 4x8x8 output."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 8, 7, 7]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": 18}, name="g")
    anchor = ir.node("Identity", [x], num_outputs=1, name="anchor")
    graph.append(anchor)
    b = GraphBuilder(graph, anchor, "layer")
    pooled = emit_sumpool(b, anchor.outputs[0], (1, 8, 7, 7), 1, (5, 2, 2), 1, realization, np.float32)
    for node in b.nodes:
        graph.append(node)
    pool = ir.node("AveragePool", [pooled], attributes={"kernel_shape": [2, 2], "strides": [2, 2]},
                   name="ordinary_pool", num_outputs=1)
    graph.append(pool)
    out = pool.outputs[0]
    out.name, out.type, out.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape([1, 4, 4, 4])
    graph.outputs.append(out)
    proto = ir.to_proto(ir.Model(graph, ir_version=9))
    onnx.checker.check_model(proto)
    return proto


# the emitted sum-pool's additions, as the cost model has always counted them
SUMPOOL_ADDS = {"cumsum": 1627, "banded": 1552, "box": 1307, "pool2d": 1552, "avgpool3d": 4864}


@pytest.mark.parametrize("realization", sorted(SUMPOOL_ADDS))
def test_emitted_sum_pools_still_count_and_a_pool_after_them_does_not(tmp_path, realization):
    path = tmp_path / "m.onnx"
    path.write_bytes(emitted_then_pooled(realization).SerializeToString())
    t = totals(node_costs(path))
    assert (t["adds"], t["pool_adds"], t["macs"]) == (SUMPOOL_ADDS[realization], 64 * 3, 0)
