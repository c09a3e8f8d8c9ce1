"""Tests for structexport.frontends: every input format into one SourceModel.

A model of the user's own (not from the zoo: a small CNN with two residual units, defined
here) is saved the four ways PyTorch users save models -- ONNX, ``.pt2``, a state dict
with ``--model``, TorchScript -- and each loads to a SourceModel whose outputs equal the
original module's. Every bad input gives its own error class, exit code and one-line
message naming the fix. Hostile ``.pt2`` archives are refused before anything in them
runs, and the same archives show, under ``trust_pickle``, that their payloads are live.
"""
from __future__ import annotations

import inspect
import io
import json
import os
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper

from structexport import errors as E
from structexport.frontends import (CHECKPOINT, FRONTENDS, ONNX, TORCH_EXPORT, detect_frontend,
                                    load_source)
from structexport.frontends.base import SourceModel
from structexport.frontends.torch_export import check_guard, check_sym_expr
from structexport.loader import LoadedCheckpoint, save_checkpoint
from structexport.models import build_model

SHAPE = (1, 3, 16, 16)
TOL = 1e-5


# ---------------------------------------------------------------------------- the user's model

class ResUnit(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class MyNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.unit1 = ResUnit(8)
        self.unit2 = ResUnit(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        x = self.unit2(self.unit1(self.stem(x)))
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def mynet_source(extra: str = "") -> str:
    return ("import torch\nimport torch.nn as nn\n\n\n" + inspect.getsource(ResUnit) + "\n\n"
            + inspect.getsource(MyNet) + "\n\ndef build():\n    return MyNet()\n" + extra)


def trained_net(seed: int = 3) -> MyNet:
    """Every tensor (BN statistics included) differs from a fresh MyNet's."""
    torch.manual_seed(seed)
    net = MyNet()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1 + 0.2 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.1 * torch.randn(m.num_features, generator=g))
    return net.eval()


def rand(shape=SHAPE, seed=11) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def torch_out(module, x) -> np.ndarray:
    with torch.no_grad():
        return module(x).numpy()


def ort_out(source: SourceModel, x: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort
    session = ort.InferenceSession(source.onnx.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {source.input_name: x.numpy()})[0]


def max_diff(a, b) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def expect(cls, fn, *needles):
    """``fn()`` raises exactly ``cls``; its message is one line, no traceback, and holds
    every needle."""
    with pytest.raises(E.StructExportError) as info:
        fn()
    err = info.value
    assert type(err) is cls, f"{type(err).__name__} ({err.exit_code}): {err}"
    text = str(err)
    assert "\n" not in text and "Traceback" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return err


def all_dims_fixed(model: onnx.ModelProto) -> bool:
    vis = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    return all(d.HasField("dim_value") and d.dim_value > 0
               for vi in vis for d in vi.type.tensor_type.shape.dim)


def export_onnx(module, path: Path, **kw) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (rand(),), str(path), **kw)
    return path


def rewrite_zip(src: Path, dst: Path, change, add: dict | None = None) -> Path:
    """Copy a zip, member by member through ``change(name, data) -> bytes | None``."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zo:
        for info in zi.infolist():
            data = change(info.filename, zi.read(info.filename))
            if data is not None:
                zo.writestr(info.filename, data)
        for name, data in (add or {}).items():
            zo.writestr(name, data)
    return dst


@pytest.fixture(scope="module")
def net():
    return trained_net()


@pytest.fixture(scope="module")
def files(tmp_path_factory, net):
    """The model saved the four ways, once for the whole module."""
    root = tmp_path_factory.mktemp("saved")
    out = {"root": root}
    out["dynamo"] = export_onnx(net, root / "dynamo.onnx", dynamo=True)
    out["legacy11"] = export_onnx(net, root / "legacy11.onnx", dynamo=False, opset_version=11)
    out["legacy13"] = export_onnx(net, root / "legacy13.onnx", dynamo=False, opset_version=13)
    out["dynamic"] = export_onnx(net, root / "dynamic.onnx", dynamo=False, opset_version=13,
                                 input_names=["x"], output_names=["y"],
                                 dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"},
                                               "y": {0: "batch"}})
    out["batch_only"] = export_onnx(net, root / "batch_only.onnx", dynamo=False, opset_version=13,
                                    input_names=["x"], dynamic_axes={"x": {0: "N"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(net, (rand(),))
        torch.export.save(ep, str(root / "net.pt2"))
        h = torch.export.Dim("h", min=8, max=64)
        ep = torch.export.export(net, (rand(),), dynamic_shapes={"x": {2: h, 3: h}})
        torch.export.save(ep, str(root / "dynamic.pt2"))
        torch.jit.save(torch.jit.trace(net, rand()), str(root / "net.ts.pt"))
    out["pt2"], out["dynamic_pt2"], out["torchscript"] = \
        root / "net.pt2", root / "dynamic.pt2", root / "net.ts.pt"
    torch.save(net.state_dict(), root / "net.pth")
    out["state"] = root / "net.pth"
    (root / "mynet.py").write_text(mynet_source())
    out["mynet"] = root / "mynet.py"
    return out


# ---------------------------------------------------------------------------- the error table

def test_new_error_classes_have_their_own_codes():
    codes = {cls.__name__: cls.exit_code for cls in E.ALL_ERRORS}
    assert {k: codes[k] for k in (
        "InvalidOnnxModelError", "OnnxExternalDataError", "OnnxOperatorUnsupportedError",
        "InputDimensionError", "ExportArchiveError", "ModelSpecError", "ModelBuildError",
        "UnsupportedOnnxOpsetError")} == {
        "InvalidOnnxModelError": 21, "OnnxExternalDataError": 22,
        "OnnxOperatorUnsupportedError": 23, "InputDimensionError": 24, "ExportArchiveError": 25,
        "ModelSpecError": 26, "ModelBuildError": 27, "UnsupportedOnnxOpsetError": 28}
    assert len(set(codes.values())) == len(codes), "exit codes must be distinct"
    assert codes["UnsafeCheckpointError"] == 15 and codes["ArchitectureMismatchError"] == 16
    assert all(issubclass(c, E.StructExportError) for c in E.ALL_ERRORS)
    assert len({c.kind for c in E.ALL_ERRORS}) == len(E.ALL_ERRORS)


def test_frontends_have_names_suffixes_and_sniff():
    assert [f.name for f in FRONTENDS] == ["onnx", "torch-export", "torchscript", "module", "checkpoint"]
    assert ONNX.suffixes == (".onnx",) and TORCH_EXPORT.suffixes == (".pt2",)
    assert all(callable(f.sniff) and callable(f.load) for f in FRONTENDS)


def test_paths_that_are_not_files(tmp_path):
    expect(E.PathNotFoundError, lambda: load_source(tmp_path / "nope.onnx"), "nope.onnx")
    expect(E.IsADirectoryCheckpointError, lambda: load_source(tmp_path))
    (tmp_path / "empty.onnx").write_bytes(b"")
    expect(E.EmptyFileError, lambda: load_source(tmp_path / "empty.onnx"), "empty")
    (tmp_path / "junk").write_bytes(b"hello, world: not a model at all")
    expect(E.NotACheckpointError, lambda: load_source(tmp_path / "junk"), "not ONNX", "torch.export")


# ---------------------------------------------------------------------------- ONNX

@pytest.mark.parametrize("key", ["dynamo", "legacy11", "legacy13"])
def test_onnx_exports_load_and_match_the_module(files, net, key):
    source = load_source(files[key])
    assert source.format == "onnx" and source.module is None and source.checkpoint is None
    assert isinstance(source.onnx, onnx.ModelProto)
    assert source.input_shape == SHAPE
    assert source.sha256 and len(source.sha256) == 64
    assert all_dims_fixed(source.onnx)
    assert source.metadata["opset"] == {"legacy11": 11, "legacy13": 13}.get(key, source.metadata["opset"])
    x = rand(seed=5)
    assert max_diff(ort_out(source, x), torch_out(net, x)) <= TOL


def test_onnx_dynamic_axes_need_input_shape(files, net):
    err = expect(E.InputDimensionError, lambda: load_source(files["dynamic"]),
                 "input 'x' (declared [batch, 3, height, width])", "'height'", "unknown",
                 "--input-shape with the size the model was trained at", "e.g. 1,3,224,224")
    assert err.exit_code == 24
    source = load_source(files["dynamic"], input_shape=(2, 3, 24, 24))
    assert source.input_shape == (2, 3, 24, 24)
    assert all_dims_fixed(source.onnx)
    out = source.onnx.graph.output[0].type.tensor_type.shape
    assert [d.dim_value for d in out.dim] == [2, 10]
    x = rand((2, 3, 24, 24))
    assert max_diff(ort_out(source, x), torch_out(net, x)) <= TOL
    # the flag's own text is accepted; a size that contradicts a fixed dimension is not
    assert load_source(files["dynamic"], input_shape="1,3,20,20").input_shape == (1, 3, 20, 20)
    expect(E.InputDimensionError, lambda: load_source(files["dynamic"], input_shape=(1, 4, 20, 20)),
           "dimension 1 fixed to 3", "gives 4")
    expect(E.InputDimensionError, lambda: load_source(files["dynamic"], input_shape=(3, 20, 20)),
           "4 dimensions", "gives 3")


def test_onnx_symbolic_batch_alone_defaults_to_one(files):
    source = load_source(files["batch_only"])
    assert source.input_shape == SHAPE
    assert any("batch" in n and "fixed to 1" in n for n in source.notes), source.notes
    assert all_dims_fixed(source.onnx)


def test_onnx_external_data_is_loaded_and_a_missing_file_named(tmp_path, files, net):
    model = onnx.load(str(files["legacy13"]))
    onnx.save_model(model, str(tmp_path / "ext.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    assert (tmp_path / "w.bin").stat().st_size > 1000
    source = load_source(tmp_path / "ext.onnx")
    assert source.metadata["external_data"] == ["w.bin"]
    assert not any(t.data_location == TensorProto.EXTERNAL for t in source.onnx.graph.initializer)
    x = rand(seed=2)
    assert max_diff(ort_out(source, x), torch_out(net, x)) <= TOL
    # truncated data file, then a missing one
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "w.bin").write_bytes(data[: len(data) // 2])
    expect(E.OnnxExternalDataError, lambda: load_source(tmp_path / "ext.onnx"), "w.bin", "truncated")
    (tmp_path / "w.bin").unlink()
    err = expect(E.OnnxExternalDataError, lambda: load_source(tmp_path / "ext.onnx"),
                 "'w.bin'", "missing", "copy w.bin next to ext.onnx")
    assert err.exit_code == 22


def test_onnx_external_data_outside_the_folder_is_refused(tmp_path, files):
    model = onnx.load(str(files["legacy13"]))
    (tmp_path / "sub").mkdir()
    onnx.save_model(model, str(tmp_path / "sub" / "m.onnx"), save_as_external_data=True,
                    all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    model = onnx.load(str(tmp_path / "sub" / "m.onnx"), load_external_data=False)
    (tmp_path / "sub" / "w.bin").rename(tmp_path / "w.bin")
    for t in model.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    (tmp_path / "sub" / "m.onnx").write_bytes(model.SerializeToString())
    expect(E.OnnxExternalDataError, lambda: load_source(tmp_path / "sub" / "m.onnx"),
           "'../w.bin'", "not a file beside the model")


def _constant_node_model() -> tuple[onnx.ModelProto, nn.Conv2d]:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).eval()
    w = helper.make_tensor("W", TensorProto.FLOAT, list(conv.weight.shape),
                           conv.weight.detach().numpy().ravel().tolist())
    b = helper.make_tensor("B", TensorProto.FLOAT, [4], conv.bias.detach().numpy().tolist())
    nodes = [helper.make_node("Constant", [], ["w"], value=w),
             helper.make_node("Constant", [], ["b"], value=b),
             helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    graph = helper.make_graph(nodes, "constants", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, "h", "w"])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), conv


def test_onnx_weights_in_constant_nodes(tmp_path):
    model, conv = _constant_node_model()
    onnx.save(model, str(tmp_path / "const.onnx"))
    source = load_source(tmp_path / "const.onnx")
    assert source.input_shape == (1, 3, 8, 8)
    assert [n.op_type for n in source.onnx.graph.node] == ["Constant", "Constant", "Conv", "Relu"]
    assert len(source.onnx.graph.initializer) == 0
    assert [d.dim_value for d in source.onnx.graph.output[0].type.tensor_type.shape.dim] == [1, 4, 8, 8]
    x = rand((1, 3, 8, 8))
    assert max_diff(ort_out(source, x), torch_out(lambda t: torch.relu(conv(t)), x)) <= TOL


def test_onnx_truncated_and_garbage_files(tmp_path, files):
    data = files["legacy13"].read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) * 2 // 3])
    err = expect(E.InvalidOnnxModelError, lambda: load_source(tmp_path / "cut.onnx"), "cut.onnx")
    assert err.exit_code == 21
    (tmp_path / "garbage.onnx").write_bytes(np.random.default_rng(0).bytes(4096))
    expect(E.InvalidOnnxModelError, lambda: load_source(tmp_path / "garbage.onnx"), "garbage.onnx")
    # a truncated file keeps its ONNX head, so even under another name it is read as ONNX
    (tmp_path / "cut.bin").write_bytes(data[: len(data) * 2 // 3])
    expect(E.InvalidOnnxModelError, lambda: load_source(tmp_path / "cut.bin"))


def test_onnx_operator_onnx_runtime_lacks(tmp_path):
    graph = helper.make_graph([helper.make_node("MyOp", ["x"], ["y"], domain="com.example")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(tmp_path / "custom.onnx"))
    err = expect(E.OnnxOperatorUnsupportedError, lambda: load_source(tmp_path / "custom.onnx"),
                 "MyOp", "'com.example'", "ONNX Runtime")
    assert err.exit_code == 23
    # a standard operator with no kernel for its type: ORT's NOT_IMPLEMENTED
    graph = helper.make_graph([helper.make_node("Tan", ["x"], ["y"], name="tan0")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [2, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2, 2])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "tan.onnx"))
    expect(E.OnnxOperatorUnsupportedError, lambda: load_source(tmp_path / "tan.onnx"),
           "Tan", "float64", "no implementation")


def test_onnx_opset_older_than_11(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.save(model, str(tmp_path / "old.onnx"))
    err = expect(E.UnsupportedOnnxOpsetError, lambda: load_source(tmp_path / "old.onnx"),
                 "opset 9", "opset_version>=11")
    assert err.exit_code == 28


def test_content_decides_over_the_suffix(tmp_path, files, net):
    onnx_as_pt = tmp_path / "model.pt"
    onnx_as_pt.write_bytes(files["legacy13"].read_bytes())
    source = load_source(onnx_as_pt)
    assert source.format == "onnx"
    assert any("'.pt'" in n and "read as an ONNX model" in n for n in source.notes), source.notes
    pt2_as_bin = tmp_path / "program.bin"
    pt2_as_bin.write_bytes(files["pt2"].read_bytes())
    source = load_source(pt2_as_bin)
    assert source.format == "torch-export"
    assert any("'.bin'" in n and "torch.export archive" in n for n in source.notes), source.notes
    x = rand(seed=8)
    assert max_diff(torch_out(source.module, x), torch_out(net, x)) <= 1e-6
    assert detect_frontend(files["state"]) is CHECKPOINT
    source = load_source(files["legacy13"], arch="resnet20")
    assert source.format == "onnx" and any("--arch resnet20 ignored" in n for n in source.notes)


# ---------------------------------------------------------------------------- torch.export

def test_pt2_loads_and_matches_the_module(files, net):
    source = load_source(files["pt2"])
    assert source.format == "torch-export" and source.onnx is None
    assert source.input_shape == SHAPE and source.input_name == "x"
    assert not source.module.training
    x = rand(seed=9)
    assert max_diff(torch_out(source.module, x), torch_out(net, x)) <= 1e-6
    assert any("weights-only" in n for n in source.notes), source.notes


def test_pt2_dynamic_dimensions_need_input_shape(files, net):
    expect(E.InputDimensionError, lambda: load_source(files["dynamic_pt2"]),
           "input 'x'", "dimension 2 dynamic", "8..64", "--input-shape 1,3,16,16")
    source = load_source(files["dynamic_pt2"], input_shape=(1, 3, 32, 32))
    assert source.input_shape == (1, 3, 32, 32)
    x = rand((1, 3, 32, 32))
    assert max_diff(torch_out(source.module, x), torch_out(net, x)) <= 1e-6
    expect(E.InputDimensionError, lambda: load_source(files["dynamic_pt2"], input_shape=(1, 3, 128, 128)),
           "must lie in 8..64")
    expect(E.InputDimensionError, lambda: load_source(files["dynamic_pt2"], input_shape=(1, 3, 32, 16)),
           "cannot run", "Guard failed")


def test_pt2_truncated_is_its_own_error(tmp_path, files):
    data = files["pt2"].read_bytes()
    for name in ("cut.pt2", "cut.bin"):
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        err = expect(E.ExportArchiveError, lambda name=name: load_source(tmp_path / name), "truncated")
        assert err.exit_code == 25 and "data.pkl" not in str(err)
    (tmp_path / "garbage.pt2").write_bytes(b"\x00garbage" * 100)
    expect(E.ExportArchiveError, lambda: load_source(tmp_path / "garbage.pt2"), "not a torch.export archive")


class _MakeDir:
    """A pickle payload that would create a folder: visible proof that it ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pt2_pickle_outside_the_allowlist_is_refused_before_it_runs(tmp_path, files):
    marker = tmp_path / "pwned"

    def evil_inputs(name, data):
        if "/data/sample_inputs/" in name:
            buf = io.BytesIO()
            torch.save(((rand(),), {"extra": _MakeDir(marker)}), buf)
            return buf.getvalue()
        return data

    evil = rewrite_zip(files["pt2"], tmp_path / "evil.pt2", evil_inputs)
    err = expect(E.UnsafeCheckpointError, lambda: load_source(evil),
                 "mkdir", "data/sample_inputs/model.pt", "--trust-pickle")
    assert err.exit_code == 15
    assert not marker.exists()
    # the payload is live: torch.export.load's own fallback to weights_only=False runs it
    with pytest.raises(E.StructExportError):
        load_source(evil, trust_pickle=True)
    assert marker.is_dir()


def test_pt2_expressions_and_guards_that_would_run_code_are_refused(tmp_path, files):
    marker = tmp_path / "pwned"
    call = f"__import__('os').mkdir({str(marker)!r})"

    def evil_expr(name, data):
        if name.endswith("models/model.json"):
            return data.replace(b"Symbol('s0', positive=True, integer=True)", call.encode(), 1)
        return data

    def evil_guard(name, data):
        if name.endswith("models/model.json"):
            program = json.loads(data)
            program["guards_code"] = [f"{call} is None"]
            return json.dumps(program).encode()
        return data

    for change, needle in ((evil_expr, "sympy would evaluate"), (evil_guard, "would exec")):
        evil = rewrite_zip(files["dynamic_pt2"], tmp_path / "evil.pt2", change)
        expect(E.UnsafeCheckpointError, lambda evil=evil: load_source(evil, input_shape=(1, 3, 32, 32)),
               needle, "__import__", "--trust-pickle")
        assert not marker.exists()
        try:  # trusted, the string is evaluated: the refusal guarded something real
            load_source(evil, input_shape=(1, 3, 32, 32), trust_pickle=True)
        except E.StructExportError:
            pass
        assert marker.is_dir()
        marker.rmdir()


def test_pt2_native_code_and_pickled_objects_are_refused(tmp_path, files):
    root = zipfile.ZipFile(files["pt2"]).namelist()[0].split("/")[0]
    aoti = rewrite_zip(files["pt2"], tmp_path / "aoti.pt2", lambda n, d: d,
                       add={f"{root}/data/aotinductor/model/model.so": b"\x7fELF..."})
    expect(E.UnsafeCheckpointError, lambda: load_source(aoti), "AOTInductor", "dlopen")
    opaque = rewrite_zip(files["pt2"], tmp_path / "opaque.pt2", lambda n, d: d,
                         add={f"{root}/data/constants/opaque_obj_0": b"\x80\x04N."})
    expect(E.UnsafeCheckpointError, lambda: load_source(opaque), "pickled Python object")


def test_the_expression_and_guard_checks_accept_what_torch_writes():
    for ok in ("Symbol('s0', positive=True, integer=True)",
               "Mul(Integer(8), Pow(Symbol('s0', positive=True, integer=True), Integer(2)))",
               "s0 + s1", "FloorDiv(s0, 2)", "Max(1, s77)", "Float('1.5', precision=53)"):
        assert check_sym_expr(ok) is None, ok
    for bad in ("__import__('os').system('id')", "s0.__class__", "(lambda: 1)()", "[s0][0]",
                "Symbol('a\\nb')", "eval('1')", "open('/etc/passwd')"):
        assert check_sym_expr(bad) is not None, bad
    for ok in ("L['x'].size()[3] == L['x'].size()[2]", "2 <= L['x'].size()[0]",
               "L['x'].size()[2] % 2 == 0", "max(1, L['x'].size()[0]) <= 64",
               "math.floor(L['x'].size()[2] / 2) >= 4"):
        assert check_guard(ok) is None, ok
    for bad in ("__import__('os').mkdir('x') is None", "torch.load('f') is None",
                "L['x'].__class__", "eval('1') == 1", "L['x'].size()[0] == 1, print(1)",
                "open('f').read() == ''", "math.__dict__ is None", "L['x'].size()[0] == 1\nimport os"):
        assert check_guard(bad) is not None, bad


# ---------------------------------------------------------------------------- --model

def test_state_dict_with_model_spec_file_matches(files, net):
    source = load_source(files["state"], model_spec=f"{files['mynet']}:build", input_shape=SHAPE)
    assert source.format == "module" and source.name == "MyNet" and source.onnx is None
    assert source.input_shape == SHAPE and not source.module.training
    x = rand(seed=4)
    assert max_diff(torch_out(source.module, x), torch_out(net, x)) <= 1e-6
    assert source.metadata["model_spec"] == f"{files['mynet']}:build"


def test_model_spec_as_package_module(files, net, monkeypatch):
    monkeypatch.syspath_prepend(str(files["root"]))
    sys.modules.pop("mynet", None)
    source = load_source(files["state"], model_spec="mynet:build", input_shape=SHAPE)
    x = rand(seed=6)
    assert max_diff(torch_out(source.module, x), torch_out(net, x)) <= 1e-6
    sys.modules.pop("mynet", None)


def test_training_checkpoint_with_prefixes_and_carried_input_shape(tmp_path, net):
    (tmp_path / "carry.py").write_text(mynet_source(
        "\n\ndef build_sized():\n    m = MyNet()\n    m.input_shape = (2, 3, 12, 12)\n    return m\n"))
    ckpt = {"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}, "epoch": 7}
    torch.save(ckpt, tmp_path / "train.pt")
    source = load_source(tmp_path / "train.pt", model_spec=f"{tmp_path / 'carry.py'}:build_sized")
    assert source.input_shape == (2, 3, 12, 12)
    assert any("'state_dict'" in n for n in source.notes) and any("'module.'" in n for n in source.notes)
    x = rand((2, 3, 12, 12))
    assert max_diff(torch_out(source.module, x), torch_out(net, x)) <= 1e-6


def test_model_spec_errors(tmp_path, files):
    state = files["state"]
    err = expect(E.ModelSpecError, lambda: load_source(state, model_spec=f"{tmp_path}/none.py:build",
                                                        input_shape=SHAPE), "none.py", "does not exist", "--model")
    assert err.exit_code == 26
    expect(E.ModelSpecError, lambda: load_source(state, model_spec="no_such_pkg_xyz.models:build",
                                                 input_shape=SHAPE), "no_such_pkg_xyz", "PYTHONPATH")
    (tmp_path / "broken.py").write_text("import torch\nraise ValueError('bad config value')\n")
    expect(E.ModelSpecError, lambda: load_source(state, model_spec=f"{tmp_path / 'broken.py'}:build",
                                                 input_shape=SHAPE), "ValueError: bad config value")
    (tmp_path / "syntax.py").write_text("def build(:\n")
    expect(E.ModelSpecError, lambda: load_source(state, model_spec=f"{tmp_path / 'syntax.py'}:build"),
           "SyntaxError")
    expect(E.ModelSpecError, lambda: load_source(state, model_spec=f"{files['mynet']}:make_model",
                                                 input_shape=SHAPE),
           "no function 'make_model'", "MyNet", "build", ":NAME")
    (tmp_path / "builds.py").write_text(mynet_source(
        "\n\ndef fails():\n    raise RuntimeError('no GPU here')\n\n\ndef gives_dict():\n    return {}\n"))
    err = expect(E.ModelBuildError, lambda: load_source(state, model_spec=f"{tmp_path / 'builds.py'}:fails",
                                                        input_shape=SHAPE), "fails()", "RuntimeError: no GPU here")
    assert err.exit_code == 27
    expect(E.ModelBuildError, lambda: load_source(state, model_spec=f"{tmp_path / 'builds.py'}:gives_dict",
                                                  input_shape=SHAPE), "returned a dict", "nn.Module")
    expect(E.ModelSpecError, lambda: load_source(state, model_spec=f"{files['mynet']}:build", arch="resnet20"),
           "not both")


def test_model_spec_key_and_shape_mismatch(tmp_path, files):
    (tmp_path / "other.py").write_text(mynet_source(
        "\n\nclass Wider(MyNet):\n    def __init__(self):\n        super().__init__()\n"
        "        self.extra = nn.Conv2d(8, 8, 1)\n\n\ndef wider():\n    return Wider()\n\n\n"
        "def five():\n    return MyNet(classes=5)\n"))
    err = expect(E.ArchitectureMismatchError,
                 lambda: load_source(files["state"], model_spec=f"{tmp_path / 'other.py'}:wider", input_shape=SHAPE),
                 "does not match Wider", "2 missing keys", "extra.weight", "other.py:wider()")
    assert err.exit_code == 16
    err = expect(E.ShapeMismatchError,
                 lambda: load_source(files["state"], model_spec=f"{tmp_path / 'other.py'}:five", input_shape=SHAPE),
                 "head.weight", "expected [5, 8]", "got [10, 8]")
    assert err.exit_code == 17
    # renamed keys: the nearest expected name is shown
    renamed = {k.replace("unit1.", "block1."): v for k, v in trained_net().state_dict().items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    expect(E.ArchitectureMismatchError,
           lambda: load_source(tmp_path / "renamed.pt", model_spec=f"{files['mynet']}:build", input_shape=SHAPE),
           "unexpected keys", "nearest to block1.", "unit1.")


def test_model_spec_needs_an_input_shape_the_module_takes(files):
    spec = f"{files['mynet']}:build"
    err = expect(E.InputDimensionError, lambda: load_source(files["state"], model_spec=spec),
                 "MyNet", "does not say its input shape", "--input-shape")
    assert err.exit_code == 24
    expect(E.InputDimensionError, lambda: load_source(files["state"], model_spec=spec, input_shape=(1, 1, 16, 16)),
           "cannot run on an input of shape 1,1,16,16", "--input-shape")


def test_model_spec_checkpoint_is_still_read_weights_only(tmp_path, files, net):
    torch.save(net, tmp_path / "whole.pt")  # the pickled module: needs arbitrary unpickling
    expect(E.UnsafeCheckpointError, lambda: load_source(tmp_path / "whole.pt", model_spec=f"{files['mynet']}:build",
                                                        input_shape=SHAPE), "--trust-pickle")


# ---------------------------------------------------------------------------- TorchScript

def test_torchscript_needs_allow_torchscript_then_loads(files, net):
    expect(E.UnsafeCheckpointError, lambda: load_source(files["torchscript"], input_shape=SHAPE),
           "TorchScript", "--allow-torchscript")
    expect(E.InputDimensionError, lambda: load_source(files["torchscript"], allow_torchscript=True),
           "--input-shape")
    source = load_source(files["torchscript"], allow_torchscript=True, input_shape=SHAPE)
    assert source.format == "torchscript" and source.name == "MyNet"
    x = rand(seed=12)
    assert max_diff(torch_out(source.module, x), torch_out(net, x)) <= 1e-6


# ---------------------------------------------------------------------------- the zoo

def test_zoo_checkpoints_go_through_load_checkpoint(tmp_path):
    model = build_model("resnet20", seed=1)
    save_checkpoint(model, tmp_path / "r20.safetensors", name="resnet20")
    source = load_source(tmp_path / "r20.safetensors")
    assert source.format == "checkpoint" and source.name == "resnet20"
    assert isinstance(source.checkpoint, LoadedCheckpoint)
    assert source.module is source.checkpoint.model and source.input_shape == (1, 3, 32, 32)
    x = torch.randn(1, 3, 32, 32)
    assert max_diff(torch_out(source.module, x), torch_out(model.eval(), x)) <= 1e-6
    torch.save(model.state_dict(), tmp_path / "r20.pt")
    assert load_source(tmp_path / "r20.pt", arch="resnet20").name == "resnet20"
    expect(E.UnknownArchitectureError, lambda: load_source(tmp_path / "r20.pt"), "--arch", "--model")
