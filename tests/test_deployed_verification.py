"""Issue 18: what ships is what was verified.

- every file an ``ort-cpu`` package ships is run, before anything is written, in the
  configuration it is deployed in (ONNX Runtime's optimized session, the optimized model,
  the ``.ort`` file), and the manifest records the options and differences of each;
- an ONNX source is verified against the file as given, not against onnxsim's rewrite of it,
  and a torch source against the module itself;
- ``bench`` and ``profile`` check the very session they time before timing it;
- several converts into one new OUTDIR at once all succeed.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from structexport.cli import main
from structexport.convert import ConvertOptions, convert_onnx
from structexport.errors import StructExportError
from structexport.ortsession import ort_session
from structexport.package import Package

REPO = Path(__file__).resolve().parents[1]
CKPT = REPO / "models" / "checkpoints" / "resnet20-csg-16x16x3x3-72.t7"


def conv_bn_model(path: Path, seed: int = 0) -> Path:
    """Conv -> BatchNormalization -> Relu -> GlobalAveragePool -> Flatten -> Gemm, with batch
    statistics far from 0/1, so that onnxsim's folding of the batch norm into the conv changes
    the last bits of the outputs."""
    rng = np.random.default_rng(seed)
    c = 8
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b"),
        numpy_helper.from_array((rng.random(c) * 3 + 0.1).astype(np.float32), "gamma"),
        numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "beta"),
        numpy_helper.from_array((rng.standard_normal(c) * 5).astype(np.float32), "mean"),
        numpy_helper.from_array((rng.random(c) * 7 + 0.3).astype(np.float32), "var"),
        numpy_helper.from_array(rng.standard_normal((10, c)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(nodes, "convbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def ort_package(tmp_path_factory):
    out = tmp_path_factory.mktemp("deployed") / "pkg"
    r = CliRunner().invoke(main, ["convert", str(CKPT), "--arch", "resnet20", "--target", "ort-cpu",
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    return Package.load(out)


def _max_diff(run, inputs, expected) -> float:
    return max(float(np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)).max())
               for label, x in inputs.items() for g, w in zip(run(x), expected[label]))


def test_every_shipped_file_is_verified_as_deployed(ort_package):
    records = ort_package.manifest["deployed_verification"]
    configs = {(r["file"], r["options"]["graph_optimization_level"]) for r in records}
    assert configs == {("model.onnx", "ORT_DISABLE_ALL"), ("model.onnx", "ORT_ENABLE_ALL"),
                       ("model.optimized.onnx", "ORT_DISABLE_ALL"), ("model.ort", "ORT_ENABLE_EXTENDED")}
    inputs, expected = ort_package.verification_arrays()
    for r in records:
        assert r["passed"] is True and r["checks"] == len(inputs)
        assert r["options"]["intra_op_num_threads"] == 1 and r["options"]["provider"] == "CPUExecutionProvider"
        assert r["atol"] == 1e-4 and r["rtol"] == 1e-4
    # the recorded difference is the one these files give, run as recorded
    ort_record = next(r for r in records if r["file"] == "model.ort")
    assert ort_record["options"]["model_format"] == "ORT"
    session = ort_session(ort_package.root / "model.ort", 1, level="ORT_ENABLE_EXTENDED", ort_format=True)
    name = session.get_inputs()[0].name
    measured = _max_diff(lambda x: session.run(None, {name: x}), inputs, expected)
    assert ort_record["max_abs_diff"] == pytest.approx(measured, rel=1e-6, abs=1e-12)


def test_a_deployed_file_that_disagrees_writes_nothing(tmp_path, monkeypatch):
    """A shipped file whose deployed session gives other outputs fails convert (exit 32),
    with the file and the configuration named, and nothing is written; --force keeps it and
    records the failure."""
    from structexport.targets.onnx_targets import OrtCpuTarget, ort_deployment
    real = OrtCpuTarget.deployments

    def skewed(self):
        out = real(self)
        broken = ort_deployment("model.ort", "ORT_ENABLE_EXTENDED", ort_format=True)
        opener = broken.open
        broken.open = lambda path: (lambda x, run=opener(path): [o + 1e-2 for o in run(x)])
        return [d for d in out if d.file != "model.ort"] + [broken]
    monkeypatch.setattr(OrtCpuTarget, "deployments", skewed)
    out = tmp_path / "new" / "pkg"
    r = CliRunner().invoke(main, ["convert", str(CKPT), "--arch", "resnet20", "--target", "ort-cpu", "-o", str(out)])
    assert r.exit_code == 32, r.output
    assert "model.ort as deployed" in r.output and "ORT_ENABLE_EXTENDED" in r.output
    assert not out.exists() and not out.parent.exists()
    r = CliRunner().invoke(main, ["convert", str(CKPT), "--arch", "resnet20", "--target", "ort-cpu", "-o", str(out),
                                  "--force"])
    assert r.exit_code == 0, r.output
    records = json.loads((out / "manifest.json").read_text())["deployed_verification"]
    bad = [r for r in records if not r["passed"]]
    assert [(b["file"], b["options"]["graph_optimization_level"]) for b in bad] == [("model.ort", "ORT_ENABLE_EXTENDED")]
    assert bad[0]["max_abs_diff"] == pytest.approx(1e-2, rel=1e-2)


def test_an_onnx_source_is_verified_against_the_file_as_given(tmp_path):
    """onnxsim folds the batch norm into the conv, which moves the last bits: the package's
    expected outputs are the original file's (ONNX Runtime, optimizations off), and the
    verification's max abs diff is the artifact's real distance from that file, not 0."""
    src = conv_bn_model(tmp_path / "convbn.onnx")
    r = CliRunner().invoke(main, ["convert", str(src), "--target", "ort-cpu", "-o", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    package = Package.load(tmp_path / "p")
    inputs, expected = package.verification_arrays()
    original = ort_session(src, optimize=False)
    for label, x in inputs.items():
        assert np.array_equal(expected[label][0], original.run(None, {"x": x})[0].astype(np.float32))
    artifact = ort_session(package.model_onnx, optimize=False)
    distance = _max_diff(lambda x: artifact.run(None, {artifact.get_inputs()[0].name: x}), inputs, expected)
    assert distance > 0       # the rewrite did change the last bits
    m = package.manifest
    assert m["verification"]["max_abs_diff"] == pytest.approx(distance, rel=1e-6)
    assert m["verified_against"].startswith("the source ONNX file as given")
    # reference.onnx (bench's dense counterpart, the folded graph) is checked against the file too
    assert m["reference"]["verification"]["passed"] is True
    assert m["reference"]["verification"]["max_abs_diff"] > 0
    assert "constants folded" in m["artifacts"]["reference.onnx"]["description"]


def test_a_torch_source_is_verified_against_the_module(tmp_path):
    """A torch module converted through ONNX: the expected outputs are the module's own."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 4)).eval()
    with torch.no_grad():
        net[1].running_mean.normal_(0, 3)
        net[1].running_var.uniform_(0.5, 4)
    from structexport.frontends.base import SourceModel
    from structexport.convert import convert_source
    source = SourceModel("module", "net.py", "0" * 64, "net", (1, 3, 16, 16), module=net)
    result = convert_source(source, tmp_path / "p", ConvertOptions(target="onnx"))
    assert result.manifest["verified_against"] == "the source torch module"
    inputs, expected = Package.load(tmp_path / "p").verification_arrays()
    for label, x in inputs.items():
        with torch.no_grad():
            want = net(torch.from_numpy(x)).double().numpy().astype(np.float32)
        assert np.array_equal(expected[label][0], want)


def test_bench_checks_the_session_it_times(ort_package, monkeypatch):
    """A timed session that does not give the package's outputs (here: ONNX Runtime's
    optimized session made to drift) stops bench before any timing, naming the session."""
    import structexport.timedcheck as timedcheck

    class Drifting:
        def __init__(self, session):
            self.session = session

        def get_inputs(self):
            return self.session.get_inputs()

        def run(self, names, feed):
            return [o + 1.0 for o in self.session.run(names, feed)]
    real = timedcheck.ort_session
    monkeypatch.setattr(timedcheck, "ort_session", lambda path, threads: Drifting(real(path, threads)))
    timed = []
    monkeypatch.setattr("structexport.bench.time_interleaved", lambda *a, **k: timed.append(a) or {})
    r = CliRunner().invoke(main, ["bench", str(ort_package.root), "--repeat", "3", "--warmup", "0"])
    assert r.exit_code == 32, r.output
    assert "model.onnx under ONNX Runtime (ORT_ENABLE_ALL, 1 thread)" in r.output
    assert "does not give the package's verified outputs" in r.output and not timed


def test_profile_checks_the_session_it_times(ort_package, monkeypatch, tmp_path):
    import structexport.timedcheck as timedcheck
    real = timedcheck.session_runner
    monkeypatch.setattr(timedcheck, "session_runner",
                        lambda s: (lambda x, run=real(s): [o * 1.5 for o in run(x)]))
    r = CliRunner().invoke(main, ["profile", str(ort_package.root), "--repeat", "3", "--warmup", "0",
                                  "--no-peak", "-o", str(tmp_path / "p.html")])
    assert r.exit_code == 32, r.output
    assert "ORT_ENABLE_ALL" in r.output and not (tmp_path / "p.html").exists()


def test_concurrent_converts_into_a_new_folder_all_succeed(tmp_path):
    """Three converts started together with -o into a folder whose parents do not exist yet:
    every one exits 0 and the folder holds one whole, loadable package."""
    src = conv_bn_model(tmp_path / "m.onnx")
    out = tmp_path / "a" / "b" / "pkg"
    procs = [subprocess.Popen([sys.executable, "-m", "structexport", "convert", str(src), "--target", "onnx",
                               "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0, 0], results
    assert not any("Traceback" in err for _, err in results)
    Package.load(out)   # hashes and sizes match the manifest
    assert sorted(p.name for p in out.parent.iterdir()) == ["pkg"]   # no staging folders left


def test_regress_checks_the_sessions_it_times(ort_package, monkeypatch, tmp_path):
    """regress --against: each side's timed session is checked against its own package
    first; a drifting one stops the A/B check before timing, naming the session."""
    import structexport.timedcheck as timedcheck
    real = timedcheck.session_runner
    monkeypatch.setattr(timedcheck, "session_runner",
                        lambda s: (lambda x, run=real(s): [o - 0.5 for o in run(x)]))
    timed = []
    monkeypatch.setattr("structexport.timing.time_interleaved", lambda *a, **k: timed.append(a) or {})
    r = CliRunner().invoke(main, ["regress", "--against", str(ort_package.root), str(ort_package.root),
                                  "--repeat", "3", "--warmup", "0"])
    assert r.exit_code == 1 and not timed, r.output     # a failure of the packages, not of the run
    assert "model.onnx under ONNX Runtime (ORT_ENABLE_ALL, 1 thread)" in r.output
    assert "does not give the package's verified outputs" in r.output
