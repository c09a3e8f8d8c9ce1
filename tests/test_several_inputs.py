"""Issue 18: models with several inputs, of any dtype.

- a real recurrent model someone else trained and published: Silero VAD (the ``silero-vad``
  package, in the test extra), inputs ``input [1, 512]`` float, ``state [2, 1, 128]`` float
  and ``sr``, an int64 scalar; its ONNX form converts for ort-cpu, verified, and benches;
  its TorchScript form is refused with one line that says why and what to convert instead;
- a model of our own with two image inputs of different sizes converts from all four forms
  (ONNX, ``.pt2``, state dict + ``--model``, TorchScript), verified against the source;
- ``--input-shape NAME=SIZES`` (repeatable) and ``--inputs FILE.npz`` named after the inputs,
  with errors that name the input and the flag that fixes it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

from structexport.cli import main
from structexport.package import Package


def silero_file(name: str) -> Path:
    import silero_vad
    path = Path(os.path.dirname(silero_vad.__file__)) / "data" / name
    assert path.is_file(), f"silero-vad no longer ships {name}"
    return path


VAD_ONNX = "silero_vad_16k_op15.onnx"


def vad_inputs(path: Path, sr: int = 16000) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, input=(rng.standard_normal((1, 512)) * 0.1).astype(np.float32),
             state=np.zeros((2, 1, 128), np.float32), sr=np.array(sr, np.int64))
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def vad_package(tmp_path_factory):
    root = tmp_path_factory.mktemp("vad")
    inputs = vad_inputs(root / "vad.npz")
    r = invoke("convert", silero_file(VAD_ONNX), "--inputs", inputs, "--target", "ort-cpu", "-o", root / "pkg")
    assert r.exit_code == 0, r.output
    return Package.load(root / "pkg"), inputs


def test_the_recurrent_model_converts_verified_from_its_onnx_form(vad_package):
    package, inputs = vad_package
    m = package.manifest
    assert m["inputs"] == [{"name": "input", "shape": [1, 512], "dtype": "float32"},
                           {"name": "state", "shape": [2, 1, 128], "dtype": "float32"},
                           {"name": "sr", "shape": [], "dtype": "int64"}]
    assert m["verification"]["passed"] is True
    # every sample runs all three inputs; the integer scalar keeps the user's value
    samples, expected = package.verification_arrays()
    assert sorted(samples) == ["random:0", "random:1", "random:2", "user:inputs"]
    for label, sample in samples.items():
        assert list(sample) == ["input", "state", "sr"]
        assert sample["sr"].dtype == np.int64 and int(sample["sr"]) == 16000
        assert len(expected[label]) == 2            # the speech probability and the new state
    assert not np.array_equal(samples["random:0"]["state"], samples["random:1"]["state"])
    # the user's sample is the user's arrays, and the expected outputs are the original file's
    user = dict(np.load(inputs))
    for name in ("input", "state"):
        assert np.array_equal(samples["user:inputs"][name], user[name])
    from structexport.ortsession import ort_session
    original = ort_session(silero_file(VAD_ONNX), optimize=False)
    got = original.run(None, samples["user:inputs"])
    for g, w in zip(got, expected["user:inputs"]):
        assert np.array_equal(np.asarray(g, np.float32), w)
    # every shipped file was verified as deployed, on all four samples
    assert all(r["passed"] and r["checks"] == 8 for r in m["deployed_verification"])


def test_the_recurrent_model_benches(vad_package, tmp_path):
    package, _ = vad_package
    r = invoke("bench", package.root, "--repeat", "5", "--warmup", "1", "--json", tmp_path / "b.json")
    assert r.exit_code == 0, r.output
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["latency_ms"]["runs"] == 5 and result["dense_latency_ms"]["runs"] == 5
    assert result["latency_ms"]["median"] > 0


def test_unknown_dimensions_name_the_input_and_the_flag(tmp_path):
    r = invoke("convert", silero_file(VAD_ONNX), "--target", "ort-cpu", "-o", tmp_path / "p")
    assert r.exit_code == 24, r.output
    assert "input 'input'" in r.output and "--input-shape input=" in r.output and "--inputs FILE.npz" in r.output
    assert not (tmp_path / "p").exists()


def test_a_named_dimension_fixed_once_is_fixed_in_every_input(tmp_path):
    """``state [2, batch, 128]`` shares ``batch`` with ``input [batch, sequence]``: giving the
    first input's shape fixes the state's batch too."""
    r = invoke("convert", silero_file(VAD_ONNX), "--input-shape", "input=1,512", "--target", "onnx",
               "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert [i["shape"] for i in m["inputs"]] == [[1, 512], [2, 1, 128], []]


def test_shapes_by_name_convert_and_the_integer_input_is_reported(tmp_path):
    """Every shape given by name and no values: the integer scalar runs as zeros, said in
    the output and in the manifest."""
    r = invoke("convert", silero_file(VAD_ONNX), "--input-shape", "input=1,512", "--input-shape", "state=2,1,128",
               "--target", "onnx", "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert [i["shape"] for i in m["inputs"]] == [[1, 512], [2, 1, 128], []]
    assert m["input_notes"] == ["integer input 'sr' has no values: zeros used (pass --inputs FILE.npz with "
                                "an array named 'sr')"]
    assert "integer input 'sr' has no values" in r.output


def test_bad_input_flags_say_what_fixes_them(tmp_path):
    vad = silero_file(VAD_ONNX)
    r = invoke("convert", vad, "--input-shape", "audio=1,512", "-o", tmp_path / "p")
    assert r.exit_code == 24 and "'audio', which the model does not take (its inputs: input, state, sr)" in r.output
    r = invoke("convert", vad, "--input-shape", "1,512", "--input-shape", "1,2", "-o", tmp_path / "p")
    assert r.exit_code == 24 and "two shapes without input names" in r.output
    np.savez(tmp_path / "bad.npz", input=np.zeros((1, 512), np.float32), state=np.zeros((2, 1, 128), np.float32),
             sr=np.array(16000.0, np.float32))
    r = invoke("convert", vad, "--inputs", tmp_path / "bad.npz", "-o", tmp_path / "p")
    assert r.exit_code == 37 and "array 'sr' is float32, the model's input 'sr' is int64" in r.output
    np.savez(tmp_path / "extra.npz", input=np.zeros((1, 512), np.float32), state=np.zeros((2, 1, 128), np.float32),
             sr=np.array(16000), mic=np.zeros(3, np.float32))
    r = invoke("convert", vad, "--inputs", tmp_path / "extra.npz", "-o", tmp_path / "p")
    assert r.exit_code == 37 and "'mic', which the model does not take" in r.output
    r = invoke("convert", vad, "--inputs", vad_inputs(tmp_path / "ok.npz"), "--target", "tvm-llvm", "-o", tmp_path / "p")
    assert r.exit_code == 2 and "tvm-llvm converts models with one float input" in r.output
    assert "--target ort-cpu" in r.output
    assert not (tmp_path / "p").exists()


def test_the_torchscript_form_is_refused_with_the_reason(tmp_path):
    """The package's TorchScript model takes ``sr`` as a Python int, which no ONNX export can
    take as an input: one line that says so and names the form to convert instead."""
    r = invoke("convert", silero_file("silero_vad.jit"), "--allow-torchscript", "--inputs",
               vad_inputs(tmp_path / "v.npz"), "-o", tmp_path / "p")
    assert r.exit_code == 24, r.output
    assert "takes sr: int, which an ONNX export cannot take as an input" in r.output
    assert "convert the model's ONNX form instead" in r.output


# ------------------------------------------------------------------------ two image inputs

class TwoImages(nn.Module):
    """Two images of different sizes, each through its own conv, joined in one head."""

    def __init__(self):
        super().__init__()
        self.left_conv = nn.Conv2d(3, 8, 3, padding=1)
        self.right_conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(16, 5)

    def forward(self, left, right):
        a = torch.relu(self.left_conv(left)).mean((2, 3))
        b = torch.relu(self.right_conv(right)).mean((2, 3))
        return self.head(torch.cat([a, b], 1))


MODULE_SOURCE = "from test_several_inputs import TwoImages\n\n\ndef build():\n    return TwoImages()\n"
LEFT, RIGHT = (1, 3, 16, 16), (1, 3, 24, 24)
SHAPES = ["--input-shape", "left=1,3,16,16", "--input-shape", "right=1,3,24,24"]


@pytest.fixture(scope="module")
def two_image_forms(tmp_path_factory):
    root = tmp_path_factory.mktemp("two")
    torch.manual_seed(0)
    net = TwoImages().eval()
    example = (torch.randn(LEFT), torch.randn(RIGHT))
    torch.onnx.export(net, example, dynamo=True, opset_version=18,
                      input_names=["left", "right"]).save(str(root / "two.onnx"))
    torch.export.save(torch.export.export(net, example), str(root / "two.pt2"))
    torch.save(net.state_dict(), root / "two_sd.pt")
    (root / "two.py").write_text(MODULE_SOURCE)
    torch.jit.save(torch.jit.trace(net, example), str(root / "two_ts.pt"))
    return root, net


FORMS = {
    "onnx": ["two.onnx"],
    "torch-export": ["two.pt2"],
    "module": ["two_sd.pt", "--model", "{root}/two.py:build", *SHAPES],
    "torchscript": ["two_ts.pt", "--allow-torchscript", *SHAPES],
}


@pytest.mark.parametrize("form", list(FORMS))
def test_two_image_inputs_convert_from_every_form(two_image_forms, form, tmp_path, monkeypatch):
    root, net = two_image_forms
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    args = [a.format(root=root) for a in FORMS[form]]
    r = invoke("convert", root / args[0], *args[1:], "--target", "ort-cpu", "-o", tmp_path / "p")
    assert r.exit_code == 0, (form, r.output)
    package = Package.load(tmp_path / "p")
    m = package.manifest
    assert m["source"]["format"] == form and m["verification"]["passed"] is True
    assert [(i["name"], tuple(i["shape"])) for i in m["inputs"]] == [("left", LEFT), ("right", RIGHT)]
    samples, expected = package.verification_arrays()
    for label, sample in samples.items():      # verified against the source module itself
        with torch.no_grad():
            want = net(torch.from_numpy(sample["left"]), torch.from_numpy(sample["right"]))
        np.testing.assert_allclose(expected[label][0], want.numpy(), rtol=1e-5, atol=1e-6)
    r = invoke("bench", tmp_path / "p", "--repeat", "3", "--warmup", "0")
    assert r.exit_code == 0, r.output


def test_two_image_inputs_take_the_users_arrays(two_image_forms, tmp_path):
    """``--inputs`` arrays named after the inputs fix their shapes (no --input-shape needed
    for the state dict) and are verified as one more sample."""
    root, net = two_image_forms
    import sys
    sys.path.insert(0, str(Path(__file__).parent))
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "pair.npz", left=rng.standard_normal(LEFT).astype(np.float32),
             right=rng.standard_normal(RIGHT).astype(np.float32))
    r = invoke("convert", root / "two_sd.pt", "--model", f"{root}/two.py:build", "--inputs", tmp_path / "pair.npz",
               "--target", "onnx", "-o", tmp_path / "p")
    assert r.exit_code == 0, r.output
    samples, _ = Package.load(tmp_path / "p").verification_arrays()
    user = dict(np.load(tmp_path / "pair.npz"))
    assert all(np.array_equal(samples["user:inputs"][k], user[k]) for k in ("left", "right"))


def test_an_onnx_graph_with_two_inputs_keeps_their_order(two_image_forms):
    root, _ = two_image_forms
    names = [i.name for i in onnx.load(str(root / "two.onnx")).graph.input]
    assert names == ["left", "right"]
