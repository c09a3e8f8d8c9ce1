"""`profile`: per-layer device profiles, their consistency, the reports and their rendering
in headless Chromium (installed by the test set-up when missing: Debian's `chromium`)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from structexport.analysis import layer_table
from structexport.cli import main
from structexport.costmodel import node_costs, totals
from structexport.profile import ProfileOptions, run_profile
from structexport.profiling.assemble import OUTSIDE, SCHEMA, UNMAPPED, validate
from structexport.profiling.layermap import call_layers
from structexport.profiling.render import FIGURES, render_html, render_markdown, write_reports

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "models" / "checkpoints" / "resnet20-csg-16x16x3x3-72.t7"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars"]


# ---------------------------------------------------------------------- Chromium set-up

def ensure_chromium() -> Path:
    """Debian's chromium: reused when /usr/bin/chromium is there, else installed with apt-get
    (needs root and apt; the CI machine is Debian bookworm as root)."""
    if CHROMIUM.exists():
        return CHROMIUM
    if not shutil.which("apt-get"):
        pytest.fail("chromium is not installed and there is no apt-get to install it "
                    "(install Debian's chromium package)", pytrace=False)
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        pytest.fail("chromium is not installed and installing it needs root "
                    "(run `sudo apt-get install -y chromium`)", pytrace=False)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    log = []
    for cmd in (install, ["apt-get", "update", "-q"], install):  # update only when needed
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        log.append(f"$ {' '.join(cmd)} -> {done.returncode}\n{done.stderr[-800:]}")
        if cmd is install and done.returncode == 0 and CHROMIUM.exists():
            return CHROMIUM
    pytest.fail("could not install chromium with apt-get:\n" + "\n".join(log), pytrace=False)


@pytest.fixture(scope="session")
def chromium() -> Path:
    return ensure_chromium()


def _chromium(binary: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile_dir = tmp / f"chromium-profile-{len(list(tmp.glob('chromium-profile-*')))}"
    return subprocess.run([str(binary), *CHROMIUM_FLAGS, f"--user-data-dir={profile_dir}", *args],
                          capture_output=True, text=True, timeout=180)


def assert_renders(binary: Path, html_path: Path, tmp: Path) -> None:
    """Screenshot not blank; every plot present in the DOM and decoded by the browser."""
    from PIL import Image
    shot = tmp / f"{html_path.stem}.png"
    done = _chromium(binary, tmp, f"--screenshot={shot}", "--window-size=1200,1800",
                     html_path.resolve().as_uri())
    assert shot.is_file(), done.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert img.shape[0] >= 1000 and img.shape[1] >= 1000
    assert img.std() > 20, "the screenshot is blank"
    assert (img < 200).mean() > 0.02, "the screenshot is (nearly) all white"
    dom = _chromium(binary, tmp, "--dump-dom", "--virtual-time-budget=5000",
                    html_path.resolve().as_uri()).stdout
    for fig_id in FIGURES:
        assert f'id="{fig_id}"' in dom, f"plot {fig_id} missing from the rendered page"
    widths = [int(w) for w in re.findall(r'data-natural-width="(\d+)"', dom)]
    assert len(widths) == len(FIGURES) and all(w > 100 for w in widths), widths
    assert f'data-plots-decoded="{len(FIGURES)}"' in dom


# ---------------------------------------------------------------------- reports

@pytest.fixture(scope="module")
def ort_report():
    """resnet20-struct-c2n2 (weights from a seed) on ONNX Runtime."""
    return run_profile(None, "resnet20-struct-c2n2",
                       ProfileOptions(target="ort-cpu", repeat=8, warmup=2))


@pytest.fixture(scope="module")
def tvm_outdir(tmp_path_factory):
    """The bundled fixture converted for tvm-llvm, then profiled through the CLI."""
    root = tmp_path_factory.mktemp("profile-tvm")
    runner = CliRunner()
    conv = runner.invoke(main, ["convert", str(FIXTURE), "--arch", "resnet20", "--target", "tvm-llvm",
                                "-o", str(root / "out")])
    assert conv.exit_code == 0, conv.output
    res = runner.invoke(main, ["profile", str(root / "out"), "--repeat", "6", "--warmup", "1",
                               "-o", str(root / "rep" / "report.html")])
    assert res.exit_code == 0, res.output
    return root, res.output


@pytest.fixture(scope="module")
def tvm_report(tvm_outdir):
    return json.loads((tvm_outdir[0] / "rep" / "report.json").read_text())


def _check_consistency(report: dict) -> None:
    assert validate(report) == []
    assert report["schema"] == SCHEMA
    rows = report["layers"]
    for which in ("structured", "dense"):
        t = report["totals"][which]
        # shares sum to 1, rows add up to the profiled run's total
        assert sum(r[f"{which}_share"] for r in rows) == pytest.approx(1.0, abs=1e-9)
        assert sum(r[f"{which}_ms"] for r in rows) == pytest.approx(t["profiled_ms"], rel=1e-9)
        assert t["kernels_ms"] + t["outside_ms"] == pytest.approx(t["profiled_ms"], rel=1e-9)
        # the kernels fit in the profiled run, and it is the unprofiled run plus the
        # profiler's overhead (loose: shared, noisy machines)
        assert 0 < t["kernels_ms"] <= t["profiled_ms"]
        assert t["outside_ms"] >= 0
        lat = t["latency_ms"]["median"]
        assert 0.5 * lat <= t["profiled_ms"] <= 3 * lat + 2.0, (t["profiled_ms"], lat)
        # every MAC is attributed, to a layer or to the unmapped row
        assert sum(r[f"{which}_macs"] for r in rows) == t["macs"]
    names = [r["layer"] for r in rows]
    assert len(names) == len(set(names))
    assert names[-1] == OUTSIDE
    for r in rows:
        if r["kind"] == "layer":
            assert r["dense_macs"] >= r["structured_macs"]
            if r["structured_macs"]:
                assert r["structured_gmacs"] == pytest.approx(
                    r["structured_macs"] / (r["structured_ms"] * 1e6))
                assert r["speedup_theoretical"] == pytest.approx(r["dense_macs"] / r["structured_macs"])
    peak = report["peak"]
    assert peak["label"] == "measured" and peak["gmacs"] > 0
    assert report["machine"]["cpu"]["model"]


def test_ort_report_is_consistent(ort_report):
    _check_consistency(ort_report)
    assert ort_report["target"] == "ort-cpu" and ort_report["input_shape"] == [1, 3, 32, 32]
    # nothing of resnet20's graph stays unmapped under ONNX Runtime
    assert ort_report["totals"]["structured"]["unmapped_ms"] == 0
    assert all(r["kind"] != "unmapped" for r in ort_report["layers"])


def test_ort_report_macs_equal_the_cost_model(ort_report):
    from structexport.models import build_model
    rows = {r["layer"]: r for r in ort_report["layers"]}
    t = ort_report["totals"]
    assert t["structured"]["macs"] == 9_355_904  # costmodel: node_costs of the converted graph
    assert t["dense"]["macs"] > t["structured"]["macs"]
    torch_layers = {r.name: r for r in layer_table(build_model("resnet20-struct-c2n2"), (1, 3, 32, 32))}
    for name, layer in torch_layers.items():
        assert rows[name]["structured_macs"] == layer.macs, name
    structured = [r for r in rows.values() if r["speedup_theoretical"] and r["speedup_theoretical"] > 1]
    assert len(structured) == 18  # every 3x3 conv after the stem
    assert ort_report["speedup_theoretical"] == pytest.approx(t["dense"]["macs"] / t["structured"]["macs"])


def test_tvm_report_maps_every_call_of_the_fixture(tvm_outdir, tvm_report):
    root, output = tvm_outdir
    _check_consistency(tvm_report)
    assert tvm_report["target"] == "tvm-llvm"
    assert tvm_report["arch"] == "resnet20-csg-16x16x3x3-72"
    assert "Relax VM" in tvm_report["runtime"]
    s = tvm_report["totals"]["structured"]
    assert s["calls"] > 40
    # the fixture maps completely; whatever did not would be its own row, never dropped
    assert s["unmapped_ms"] <= 0.05 * s["kernels_ms"]
    assert tvm_report["mapping"]["unmapped_ms_by_op"]["structured"] == {}
    layers = [r for r in tvm_report["layers"] if r["kind"] == "layer"]
    assert len(layers) == 20 and all(r["structured_ms"] > 0 and r["dense_ms"] > 0 for r in layers)
    # MACs per layer are the ONNX cost model's, same as ONNX Runtime's report would show
    onnx_macs = totals(node_costs(root / "out" / "model.onnx"))["macs"]
    assert s["macs"] == onnx_macs == sum(r["structured_macs"] for r in tvm_report["layers"])
    # the CLI says where the reports went and prints the table
    for name in ("report.html", "report.md", "report.json", "stage_3.2.conv_b", OUTSIDE):
        assert name in output


def test_reports_are_self_contained_and_carry_the_same_table(ort_report, tmp_path):
    paths = write_reports(ort_report, tmp_path / "r" / "prof.html")
    assert {k: p.name for k, p in paths.items()} == {"html": "prof.html", "markdown": "prof.md",
                                                     "json": "prof.json"}
    page = paths["html"].read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page
    assert page.count("<figure") == len(FIGURES)
    for fig_id, caption in FIGURES.items():
        assert re.search(rf'<figure id="{fig_id}"><img alt="[^"]+" src="data:image/png;base64,', page)
    md = paths["markdown"].read_text()
    again = json.loads(paths["json"].read_text())
    assert validate(again) == []
    for r in ort_report["layers"]:
        assert f"| {r['layer']} | {r['structured_ms']:.3f} | {r['dense_ms']:.3f} |" in md
        assert f"><td>{r['layer']}</td><td>{r['structured_ms']:.3f}</td>" in page
    assert render_markdown(again) == md


def test_html_renders_in_chromium(chromium, ort_report, tvm_outdir, tmp_path):
    html = tmp_path / "ort.html"
    html.write_text(render_html(ort_report))
    assert_renders(chromium, html, tmp_path)
    assert_renders(chromium, tvm_outdir[0] / "rep" / "report.html", tmp_path)


def test_call_layers_does_not_trust_shared_weights():
    """The exporter shares a sum-pool's box filter between layers of one shape, named after
    the first: each use belongs to the layer it feeds. A residual add follows its block's
    last conv, not the identity input."""
    box = "s.0.conv_a.pool.ones"
    calls = [
        {"op": "Conv", "weights": ["stem.weight"], "inputs": ["x"], "outputs": ["a"]},
        {"op": "Conv", "weights": [box], "inputs": ["a"], "outputs": ["b"]},
        {"op": "Conv", "weights": ["s.0.conv_a.conv.weight"], "inputs": ["b"], "outputs": ["c"]},
        {"op": "Conv", "weights": [box], "inputs": ["c"], "outputs": ["d"]},
        {"op": "Conv", "weights": ["s.0.conv_b.conv.weight"], "inputs": ["d"], "outputs": ["e"]},
        {"op": "Add", "weights": [], "inputs": ["a", "e"], "outputs": ["f"]},
    ]
    got = call_layers(calls, {"stem", "s.0.conv_a", "s.0.conv_b"})
    assert got == ["stem", "s.0.conv_a", "s.0.conv_a", "s.0.conv_b", "s.0.conv_b", "s.0.conv_b"]


def test_call_layers_follows_shortcuts_without_cycles():
    """A CIFAR shortcut (slice + concat) into a residual add: the add's first input is the
    shortcut, whose consumer is the add itself -- resolved through the other input."""
    calls = [
        {"op": "conv2d", "weights": ["s.0.conv_a.weight"], "inputs": ["x"], "outputs": ["a"]},
        {"op": "relu", "weights": [], "inputs": ["a"], "outputs": ["b"]},
        {"op": "conv2d", "weights": ["s.0.conv_b.weight"], "inputs": ["b"], "outputs": ["c"]},
        {"op": "strided_slice", "weights": [], "inputs": ["x"], "outputs": ["d"]},
        {"op": "concatenate", "weights": [], "inputs": ["d"], "outputs": ["e"]},
        {"op": "add", "weights": [], "inputs": ["e", "c"], "outputs": ["f"]},
        {"op": "mean", "weights": [], "inputs": ["f"], "outputs": ["g"]},
        {"op": "matmul", "weights": ["fc.weight"], "inputs": ["g"], "outputs": ["h"]},
        {"op": "reshape", "weights": [], "inputs": ["zz"], "outputs": ["q"]},
    ]
    got = call_layers(calls, {"s.0.conv_a", "s.0.conv_b", "fc"})
    assert got == ["s.0.conv_a", "s.0.conv_a", "s.0.conv_b", "s.0.conv_b", "s.0.conv_b",
                   "s.0.conv_b", "s.0.conv_b", "fc", None]


def test_remote_device_errors_are_clear(tmp_path):
    import socket
    with socket.socket() as sock:  # a free port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    res = CliRunner().invoke(main, ["profile", "--arch", "resnet20", "--target", "tvm-llvm",
                                    "--rpc", f"127.0.0.1:{port}", "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 42 and "cannot reach" in res.output, res.output
    res = CliRunner().invoke(main, ["profile", "--arch", "resnet20", "--rpc", "nonsense"])
    assert res.exit_code == 2 and "HOST:PORT" in res.output
    res = CliRunner().invoke(main, ["profile", "--arch", "resnet20", "--target", "tvm-arm"])
    assert res.exit_code == 40 and "--rpc" in res.output


def test_profile_on_an_rpc_device(tvm_outdir, host_rpc_server, tmp_path):
    """Through TVM's RPC, each PrimFunc call is timed on the device: every call mapped, the
    rows add up to the device's whole-run time, MACs as on the host."""
    root, _ = tvm_outdir
    _, rpc_server = host_rpc_server
    res = CliRunner().invoke(main, ["profile", str(root / "out"), "--rpc", rpc_server,
                                    "--repeat", "4", "--warmup", "1", "--no-peak",
                                    "-o", str(tmp_path / "remote.html")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "remote.json").read_text())
    assert validate(report) == []
    assert report["device"] == f"device at {rpc_server}"
    for which in ("structured", "dense"):
        t = report["totals"][which]
        assert sum(r[f"{which}_ms"] for r in report["layers"]) == pytest.approx(t["profiled_ms"])
        assert t["unmapped_ms"] == 0 and t["calls"] > 40
        assert t["kernels_ms"] == pytest.approx(t["profiled_ms"], rel=0.5)  # isolated vs whole run
    host = json.loads((root / "rep" / "report.json").read_text())
    assert [(r["layer"], r["structured_macs"]) for r in report["layers"]] == \
        [(r["layer"], r["structured_macs"]) for r in host["layers"]]


def test_nothing_to_profile_is_a_clear_error(tmp_path):
    res = CliRunner().invoke(main, ["profile", "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 40 and "nothing to profile" in res.output
    res = CliRunner().invoke(main, ["profile", str(tmp_path), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 11 and "manifest.json" in res.output
    res = CliRunner().invoke(main, ["profile", str(tmp_path / "nope.t7"), "--arch", "resnet20"])
    assert res.exit_code == 10


def test_unmapped_kernels_are_a_row_not_dropped(monkeypatch):
    """Kernels without a layer (here: every Relu and Add, by a crippled mapper) land in the
    (unmapped) row, listed by operator, and the totals still add up."""
    from structexport.profiling import layermap  # where the owner functions look it up
    real = layermap.call_layers

    def crippled(calls, layers, known=None):
        got = real(calls, layers, known)
        return [None if c["op"] in ("Relu", "Add") else g for c, g in zip(calls, got)]
    monkeypatch.setattr(layermap, "call_layers", crippled)
    report = run_profile(None, "resnet20", ProfileOptions(target="ort-cpu", repeat=4, warmup=1,
                                                          peak=False))
    rows = {r["layer"]: r for r in report["layers"]}
    assert rows[UNMAPPED]["kind"] == "unmapped" and rows[UNMAPPED]["structured_ms"] > 0
    # ONNX Runtime names a conv fused with its activation after the activation: Conv too
    assert set(report["mapping"]["unmapped_ms_by_op"]["structured"]) <= {"Relu", "Add", "Conv"}
    assert report["totals"]["structured"]["unmapped_ms"] == pytest.approx(rows[UNMAPPED]["structured_ms"])
    for which in ("structured", "dense"):
        assert sum(r[f"{which}_share"] for r in report["layers"]) == pytest.approx(1.0)
        assert sum(r[f"{which}_macs"] for r in report["layers"]) == report["totals"][which]["macs"]


@pytest.mark.slow
def test_resnet18_struct_report_for_ort_cpu_renders(chromium, tmp_path):
    report = run_profile(None, "resnet18-struct-c2n2", ProfileOptions(target="ort-cpu", repeat=20))
    _check_consistency(report)
    assert report["speedup_theoretical"] == pytest.approx(3.55, abs=0.01)
    paths = write_reports(report, tmp_path / "resnet18.html")
    assert_renders(chromium, paths["html"], tmp_path)
