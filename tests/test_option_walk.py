"""Issue 18, "no silent flags": every option of ``convert``, ``bench``, ``profile`` and
``regress`` either takes effect for each front end it is given with (zoo checkpoint, ONNX,
torch.export, state dict + --model, TorchScript) -- seen in a manifest field, an output or
a written file -- or is refused with exit 2 and a one-line ``error:`` saying why and what to
use instead. Refusals are checked before anything is loaded, so most cases here cost no
conversion; the effects share one conversion per front end and option group."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from structexport.cli import main

HERE = Path(__file__).resolve().parent
ZOO = "resnet20-struct-c2n2"
MODULE_SOURCE = (f"import sys\nsys.path.insert(0, {str(HERE)!r})\n"
                 "from test_decompose_structured_conv_pass import MyNet\n\n\ndef build():\n    return MyNet()\n")


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The five front ends' files, tiny: a zoo checkpoint (and a pickled one that needs
    --trust-pickle), and the user network of issue 11 as ONNX, .pt2, state dict and TorchScript."""
    sys.path.insert(0, str(HERE))
    from test_decompose_structured_conv_pass import save_four_forms, structured_net

    from structexport.loader import save_checkpoint
    from structexport.models import build_model
    root = tmp_path_factory.mktemp("walk")
    save_four_forms(structured_net(), torch.randn(1, 3, 32, 32), root, MODULE_SOURCE)
    model = build_model(ZOO, 0)
    save_checkpoint(model, root / "zoo.safetensors")
    import argparse
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, root / "zoo_pickled.pt")
    np.savez(root / "inputs.npz", mine=np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32))
    return root


def front_end_args(root: Path) -> dict[str, list[str]]:
    return {
        "zoo": [root / "zoo.safetensors"],
        "onnx": [root / "mynet.onnx"],
        "pt2": [root / "mynet.pt2"],
        "module": [root / "mynet_sd.pt", "--model", f"{root}/mynet.py:build", "--input-shape", "1,3,32,32"],
        "torchscript": [root / "mynet_ts.pt", "--allow-torchscript", "--input-shape", "1,3,32,32"],
    }


FRONT_ENDS = ["zoo", "onnx", "pt2", "module", "torchscript"]
NOT_ZOO = FRONT_ENDS[1:]


def refused(r, *needles):
    """Exit 2 with one ``error:`` line holding every needle (the why and the instead)."""
    assert r.exit_code == 2, r.output
    lines = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --------------------------------------------------------------------------- convert: refused

# (options, the front ends that refuse them, text of the refusal). Every case exits 2 before
# anything is converted.
CONVERT_REFUSALS = [
    (["--passes", "realize_sumpool"], NOT_ZOO, ["realize_sumpool", "zoo checkpoints", "decompose_structured_conv"]),
    (["--skip-pass", "materialize_csg"], NOT_ZOO, ["--skip-pass materialize_csg", "never run"]),
    (["--passes", "decompose_structured_conv"], ["zoo"], ["outside the zoo", "realize_sumpool"]),
    (["--skip-pass", "lower_sparse_conv"], ["zoo"], ["--skip-pass lower_sparse_conv", "never run"]),
    (["--tuning-cache", "{tmp}/t.json"], FRONT_ENDS, ["--tuning-cache", "add --autotune"]),
    (["--autotune", "--sumpool-realization", "box"], FRONT_ENDS, ["--autotune and --sumpool-realization box"]),
    (["--autotune", "--skip-pass", "realize_sumpool"], ["zoo"], ["--autotune is read by realize_sumpool"]),
    (["--autotune", "--skip-pass", "decompose_structured_conv"], NOT_ZOO,
     ["--autotune is read by decompose_structured_conv"]),
    (["--sumpool-realization", "box", "--passes", "materialize_csg"], ["zoo"], ["--sumpool-realization is read by"]),
    (["--declare-structured", "c*=c2n2", "--passes", "lower_sparse_conv"], NOT_ZOO,
     ["--declare-structured is read by"]),
    (["--max-residual", "0.5"], ["zoo"], ["--max-residual", "--declare-structured"]),
    (["--precision", "fp16"], NOT_ZOO, ["--precision fp16", "leave --precision out"]),
    (["--arch", "resnet20"], ["onnx", "pt2"], ["--arch", "carries its own"]),
    (["--model", "x.py:build"], ["onnx", "pt2"], ["--model", "carries its own"]),
    (["--allow-torchscript"], ["zoo", "onnx", "pt2", "module"], ["--allow-torchscript", "leave --allow-torchscript out"]),
    (["--trust-pickle"], ["onnx"], ["--trust-pickle", "no pickle"]),
    (["--tuning-db", "{tmp}/db", "--target", "tvm-llvm"], FRONT_ENDS, ["--tuning-db", "--tune"]),
    (["--tvm-preset", "rpi4", "--tvm-target", '{"kind": "llvm"}', "--target", "tvm-arm"], FRONT_ENDS,
     ["--tvm-target overrides --tvm-preset"]),
    (["--rpc-timeout", "30", "--target", "tvm-llvm"], FRONT_ENDS, ["--rpc-timeout", "--rpc"]),
    # TVM-only options on ONNX targets: refused by the target (as before)
    (["--tvm-structured", "fused"], FRONT_ENDS, ["only for the TVM targets"]),
    (["--rpc", "127.0.0.1:9"], FRONT_ENDS, ["only for the TVM targets"]),
]


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_convert_refuses_what_would_do_nothing(models, tmp_path, front_end):
    args = front_end_args(models)[front_end]
    checked = 0
    for options, refusing, needles in CONVERT_REFUSALS:
        if front_end not in refusing:
            continue
        options = [o.replace("{tmp}", str(tmp_path)) for o in options]
        extra = [a for a in args[1:] if not (a == "--allow-torchscript" and "--allow-torchscript" in options)]
        r = cli("convert", args[0], *extra, *options, "-o", tmp_path / "o")
        refused(r, *needles)
        assert not (tmp_path / "o").exists() and not (tmp_path / "t.json").exists()
        checked += 1
    assert checked >= 8


# --------------------------------------------------------------------------- convert: effects

@pytest.fixture()
def fake_measure(monkeypatch):
    """--autotune's timings, made up (pool2d fastest) and counted: the choice and the cache
    are what is checked, not this machine's speed."""
    from structexport.passes import autotune as at
    calls = []

    def measure(layer, pool, in_shape, threads=1, repeat=30, dense=False):
        calls.append(tuple(in_shape))
        return {"cumsum": 3.0, "banded": 2.0, "box": 1.5, "pool2d": 1.0}
    monkeypatch.setattr(at, "measure", measure)
    return calls


def decomposed(manifest) -> dict:
    """{layer: details} of every decomposed layer (either pipeline)."""
    out = {}
    for run in manifest["passes"]:
        for rec in run["records"]:
            if rec["action"] in ("decomposed", "realized"):
                out.setdefault(rec["layer"], {}).update(rec["details"])
    return out


def realizations(manifest) -> dict:
    return {layer: d["realization"] for layer, d in decomposed(manifest).items() if "realization" in d}


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_convert_autotune_and_its_cache_take_effect(models, tmp_path, front_end, fake_measure):
    """--autotune measures each layer shape once (the ONNX path too) and --tuning-cache is
    the file it keeps; the manifest records what was measured and chosen."""
    args = front_end_args(models)[front_end]
    cache = tmp_path / "tune.json"
    r = cli("convert", *args, "--target", "ort-cpu", "--autotune", "--tuning-cache", cache,
            "--inputs", models / "inputs.npz", "--atol", "1e-3", "--rtol", "2e-3", "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    chosen = realizations(m)
    assert chosen and set(chosen.values()) == {"pool2d"}                     # the fastest measured
    assert {d["chosen_by"] for d in decomposed(m).values() if "realization" in d} == {"measurement"}
    assert m["pass_options"]["autotune"] is True
    assert 0 < len(fake_measure) <= len(chosen)                              # one per distinct shape
    entries = next(iter(json.loads(cache.read_text()).values()))
    assert len(entries) == len(fake_measure)
    # --inputs, --atol, --rtol
    assert any(c["input"].startswith("user:") for c in m["verification"]["checks"])
    assert (m["verification"]["atol"], m["verification"]["rtol"]) == (1e-3, 2e-3)
    assert (tmp_path / "o" / "model.ort").is_file()                           # --target ort-cpu
    # a second conversion reads the cache: nothing measured again
    measured = len(fake_measure)
    r = cli("convert", *args, "--target", "ort-cpu", "--autotune", "--tuning-cache", cache, "-o", tmp_path / "o2",
            "--json")
    assert r.exit_code == 0, r.output
    assert len(fake_measure) == measured
    assert all(d["cached"] for d in decomposed(json.loads(r.stdout)).values() if "measured_ms" in d)


def test_autotune_cache_is_shared_by_the_zoo_and_the_onnx_path(models, tmp_path, fake_measure):
    """The zoo model's layers measured on the zoo path are not measured again when the same
    network arrives as ONNX (its dense reference.onnx): one Tuner, one cache, one key."""
    cache = tmp_path / "tune.json"
    r = cli("convert", models / "zoo.safetensors", "--autotune", "--tuning-cache", cache, "-o", tmp_path / "z")
    assert r.exit_code == 0, r.output
    measured = len(fake_measure)
    r = cli("convert", tmp_path / "z" / "reference.onnx", "--autotune", "--tuning-cache", cache,
            "-o", tmp_path / "x", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    tuned = [d for d in decomposed(m).values() if d.get("chosen_by") == "measurement"]
    assert len(tuned) >= 10 and all(d["cached"] for d in tuned)
    assert len(fake_measure) == measured


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_convert_pass_options_take_effect(models, tmp_path, front_end):
    """--sumpool-realization (every realization the CLI offers, avgpool3d too), --passes,
    --keep-csg-codes and --target onnx."""
    args = front_end_args(models)[front_end]
    first = "decompose_structured" if front_end == "zoo" else "decompose_structured_conv"
    r = cli("convert", *args, "--target", "onnx", "--sumpool-realization", "avgpool3d", "--passes",
            f"{first},{'realize_sumpool' if front_end == 'zoo' else 'lower_sparse_conv'}",
            "--keep-csg-codes", "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert [p["name"] for p in m["passes"]] == (["decompose_structured", "realize_sumpool"] if front_end == "zoo"
                                                else ["decompose_structured_conv", "lower_sparse_conv"])
    assert set(realizations(m).values()) == {"avgpool3d"}
    import onnx
    ops = {n.op_type for n in onnx.load(str(tmp_path / "o" / "model.onnx")).graph.node}
    assert "AveragePool" in ops and "CumSum" not in ops
    assert m["verification"]["passed"] is True
    assert m["pass_options"]["keep_csg_codes"] is True and m["target"] == "onnx"


@pytest.mark.parametrize("front_end", FRONT_ENDS)
def test_convert_declared_structure_max_residual_and_force_take_effect(models, tmp_path, front_end):
    """--declare-structured with --max-residual (the limit it is judged by) and --force."""
    args = front_end_args(models)[front_end]
    layer = "conv_1_3x3" if front_end == "zoo" else "dense"
    # --force: a failing verification still writes the package, recorded as failed
    r = cli("convert", *args, "--atol", "0", "--rtol", "0", "--force", "-o", tmp_path / "f")
    assert r.exit_code == 32, r.output
    assert json.loads((tmp_path / "f" / "manifest.json").read_text())["verification"]["passed"] is False
    refused(cli("convert", *args, "--declare-structured", "nosuchlayer*=c2n2", "-o", tmp_path / "o"),
            "'nosuchlayer*'", "matches no conv", "conv_1_3x3" if front_end == "zoo" else "stem")
    r = cli("convert", *args, "--declare-structured", f"{layer}=c2n2", "-o", tmp_path / "o")
    assert r.exit_code == 30 and "too far from their structure" in r.output, r.output   # the default limit
    r = cli("convert", *args, "--declare-structured", f"{layer}=c2n2", "--max-residual", "100",
            "-o", tmp_path / "o", "--json")
    if front_end == "zoo":
        # within the raised limit the random stem is projected, and the torch passes' output
        # check then stops the conversion: the limit took effect
        assert r.exit_code == 30 and "pass decompose_structured changed the model's outputs" in r.output
        return
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    declared = {rec["layer"]: rec["details"] for run in m["passes"] for rec in run["records"]
                if rec["details"].get("source") == "declared dense conv" or rec["details"].get("declared")}
    assert layer in declared, m["passes"]
    assert m["pass_options"]["max_residual"] == 100


def test_trust_pickle_and_fp16_take_effect_on_zoo_checkpoints_and_are_refused_on_onnx(models, tmp_path):
    r = cli("convert", models / "zoo_pickled.pt", "--arch", ZOO, "-o", tmp_path / "o")
    assert r.exit_code == 15 and "--trust-pickle" in r.output
    r = cli("convert", models / "zoo_pickled.pt", "--arch", ZOO, "--trust-pickle", "--precision", "fp16",
            "-o", tmp_path / "o", "--json")
    assert r.exit_code == 0, r.output
    m = json.loads(r.stdout)
    assert m["source"]["arch"] == ZOO and m["precision"] == "fp16" and m["verification"]["atol"] == 2e-2
    # an ONNX model holds no pickle and is converted at fp32: both refused, not ignored
    refused(cli("convert", models / "mynet.onnx", "--trust-pickle", "-o", tmp_path / "x"), "no pickle")
    refused(cli("convert", models / "mynet.onnx", "--precision", "fp16", "-o", tmp_path / "x"), "at fp32")


# --------------------------------------------------------------------------- bench / profile

@pytest.fixture(scope="module")
def package(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "zoo"
    r = cli("convert", models / "zoo.safetensors", "--target", "ort-cpu", "-o", out)
    assert r.exit_code == 0, r.output
    return out


BENCH_REFUSALS = [
    # (args after the path, who refuses: "package" and/or front ends, needles)
    (["--seed", "3"], ["package", *FRONT_ENDS], ["--seed", "leave --seed out"]),
    (["--arch", ZOO], ["package"], ["--arch", "converted package"]),
    (["--arch", "resnet20"], ["onnx", "pt2"], ["--arch", "carries its own"]),
    (["--tuning-cache", "{tmp}/t.json"], ["package", *FRONT_ENDS], ["--tuning-cache", "add --autotune"]),
    (["--autotune", "--sumpool-realization", "box"], ["package", *FRONT_ENDS], ["both choose"]),
    (["--per-layer", "--target", "tvm-llvm"], ["package", *FRONT_ENDS], ["--per-layer", "profile"]),
    (["--compare-ort"], ["package", *FRONT_ENDS], ["--compare-ort", "tvm-llvm"]),
    (["--tune-repeats", "2"], ["package", *FRONT_ENDS], ["--tune-repeats", "--target tvm-llvm"]),
    (["--tuning-db", "{tmp}/db", "--target", "tvm-llvm"], ["package", *FRONT_ENDS], ["--tuning-db"]),
    (["--rpc-timeout", "30", "--target", "tvm-llvm"], ["package", *FRONT_ENDS], ["--rpc-timeout"]),
    (["--allow-torchscript"], ["zoo", "onnx", "pt2"], ["--allow-torchscript"]),
    (["--trust-pickle"], ["onnx"], ["--trust-pickle"]),
]


@pytest.mark.parametrize("command", ["bench", "profile"])
@pytest.mark.parametrize("what", ["package", "zoo", "onnx", "pt2", "torchscript"])
def test_bench_and_profile_refuse_what_would_do_nothing(models, package, tmp_path, command, what):
    path = package if what == "package" else front_end_args(models)[what][0]
    own = ["--allow-torchscript", "--input-shape", "1,3,32,32"] if what == "torchscript" else []
    checked = 0
    for options, refusing, needles in BENCH_REFUSALS:
        if what not in refusing:
            continue
        if command == "profile" and not set(options) & {"--seed", "--arch", "--allow-torchscript",
                                                          "--trust-pickle", "--rpc-timeout"}:
            continue   # bench-only options
        options = [o.replace("{tmp}", str(tmp_path)) for o in options]
        extra = [a for a in own if not (a == "--allow-torchscript" and a in options)]
        r = cli(command, path, *extra, *options, *(["-o", tmp_path / "r.html"] if command == "profile" else []))
        refused(r, *needles)
        checked += 1
    assert checked >= 1


def test_bench_options_take_effect(models, package, tmp_path, fake_measure):
    """--threads, --repeat, --warmup, --per-layer, --json, --seed (with --arch), --batch and
    --autotune reach a model from outside the zoo (its ONNX conversion), as a zoo one."""
    out = tmp_path / "b.json"
    r = cli("bench", package, "--threads", "2", "--repeat", "4", "--warmup", "1", "--per-layer", "--json", out)
    assert r.exit_code == 0, r.output
    b = json.loads(out.read_text())
    assert (b["threads"], b["repeat"], b["warmup"]) == (2, 4, 1) and b["per_layer"]
    r = cli("bench", "--arch", ZOO, "--seed", "5", "--repeat", "3", "--warmup", "0", "--batch", "2", "--json", out)
    assert r.exit_code == 0, r.output
    b = json.loads(out.read_text())
    assert b["input_shape"][0] == 2 and "seed 5" in b["workload"]["label"]
    cache = tmp_path / "t.json"
    r = cli("bench", models / "mynet.onnx", "--autotune", "--tuning-cache", cache, "--repeat", "3",
            "--warmup", "0", "--json", out)
    assert r.exit_code == 0, r.output
    assert fake_measure and cache.is_file()          # measured for the ONNX model, and cached
    # a fixed batch dimension cannot take --batch: refused, not ignored
    refused(cli("bench", models / "mynet.onnx", "--batch", "2", "--repeat", "3"), "--batch 2", "fixed")


# --------------------------------------------------------------------------- regress

def test_regress_refuses_what_would_do_nothing(package, tmp_path):
    base = [package, package]
    refused(cli("regress", "--against", *base, "--seed", "1"), "--seed", "leave --seed out")
    refused(cli("regress", "--against", *base, "--autotune", "--sumpool-realization", "box"), "both choose")
    refused(cli("regress", "--against", *base, "--rpc", "127.0.0.1:9"), "--rpc/--tracker", "ort-cpu")
    refused(cli("regress", "--against", *base, "--rpc-timeout", "5"), "--rpc-timeout")
    refused(cli("regress", "--against", *base, "--target", "tvm-llvm", "--min-layer-share", "5%"),
            "--min-layer-share", "whole model")
    refused(cli("regress", "--baseline", tmp_path / "b.json", "--tracker", "127.0.0.1:9", "--key", "k"),
            "--tracker, --key", "--against")
    refused(cli("regress", "--update", "--baseline", tmp_path / "b.json", "--retries", "2"), "--retries")
    r = cli("regress", "--against", *base, "--repeat", "5", "--warmup", "1", "--no-per-layer",
            "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["layers"] == [] and report["device"] is None


def test_regress_against_times_a_tvm_pair_over_rpc(package, tmp_path, host_rpc_server):
    """--rpc: base and candidate are timed interleaved on the device (here TVM's RPC server on
    this host), with the same verdict, reports and exit code as on the host."""
    _proc, address = host_rpc_server
    r = cli("convert", package / "reference.onnx", "--target", "tvm-llvm", "-o", tmp_path / "tl")
    assert r.exit_code == 0, r.output
    pair = [tmp_path / "tl", tmp_path / "tl"]
    r = cli("regress", "--against", *pair, "--rpc", address, "--repeat", "10", "--warmup", "2",
            "--json", tmp_path / "r.json", "--markdown", tmp_path / "r.md", "--junit", tmp_path / "r.xml")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target"] == "tvm-llvm" and report["device"]["address"] == address
    assert report["passed"] is True and report["whole"]["status"] == "ok"
    assert f"timed interleaved on device at {address}" in (tmp_path / "r.md").read_text()
    assert f'name="device" value="device at {address}"' in (tmp_path / "r.xml").read_text()
    # an unreachable device is an environment error: exit 2, one line
    r = cli("regress", "--against", *pair, "--rpc", "127.0.0.1:9", "--repeat", "3")
    refused(r, "127.0.0.1:9")


def test_regress_against_a_tvm_arm_pair_on_the_emulated_device(emulated_arm, package, tmp_path):
    """The tvm-arm pair is converted and timed on the emulated aarch64 device (--rpc to it),
    judged as on the host (a copy of the base passes), the report naming the device."""
    address = emulated_arm.address
    r = cli("convert", package / "reference.onnx", "--target", "tvm-arm", "--rpc", address, "-o", tmp_path / "arm")
    assert r.exit_code == 0, r.output
    r = cli("regress", "--against", tmp_path / "arm", tmp_path / "arm", "--rpc", address, "--repeat", "10",
            "--warmup", "2", "--retries", "2", "--json", tmp_path / "r.json")
    assert r.exit_code == 0, r.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target"] == "tvm-arm" and report["device"]["emulated"] is True
    assert any("emulated aarch64" in n for n in report["notes"])
