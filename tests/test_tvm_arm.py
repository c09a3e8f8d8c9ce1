"""tvm-arm end to end on the emulated aarch64 device (convert -> verify on the device -> bench),
RPC to a TVM server on this host (one code path with the local run), and the device and
toolchain errors: unreachable (42), lost mid-run (43), no cross compiler (44)."""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from structexport.cli import main

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "checkpoints" / "resnet20-csg-16x16x3x3-72.t7"
EM_AARCH64 = 183  # ELF e_machine of AArch64


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def elf_machine(path: Path) -> int:
    head = path.read_bytes()[:20]
    assert head[:4] == b"\x7fELF"
    return int.from_bytes(head[18:20], "little")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def arm56(tmp_path_factory, emulated_arm, fixtures_dir):
    """The issue's headline command: the resnet56 CSG fixture converted for tvm-arm and
    verified on the emulated device (found as the running one, no --rpc)."""
    out = tmp_path_factory.mktemp("arm") / "r56"
    res = cli("convert", fixtures_dir / "resnet56-csg-12x12x3x3-72.t7", "--arch", "resnet56",
              "--target", "tvm-arm", "-o", out, "--json")
    assert res.exit_code == 0, res.output
    return out, json.loads((out / "manifest.json").read_text())


def test_tvm_arm_library_is_aarch64_and_verified_on_the_emulated_device(arm56, emulated_arm):
    out, m = arm56
    assert elf_machine(out / "model.so") == EM_AARCH64
    assert json.loads((out / "tvm_target.json").read_text()) == {
        "kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}
    tv = m["target_verification"]
    assert tv["passed"] is True
    assert len(tv["checks"]) == 3 and all(c["passed"] for c in tv["checks"])
    assert tv["max_abs_diff"] <= tv["atol"] == 1e-4
    assert "emulated aarch64 device" in tv["runtime"]
    assert m["device"] == {"address": emulated_arm.address, "key": None, "emulated": True, "tracker": False}
    assert m["target_build"]["tuning"] is None


def test_fused_structured_convs_cross_compile_and_verify_on_the_emulated_device(emulated_arm, tmp_path):
    """The fused operator (the hand-scheduled sum-pool kernel and the small conv) built for
    aarch64 NEON and run on the emulated device against the PyTorch source."""
    struct = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines" / "resnet20-struct-c2n2.safetensors"
    res = cli("convert", struct, "--target", "tvm-arm", "-o", tmp_path / "o", "--json")
    assert res.exit_code == 0, res.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert elf_machine(tmp_path / "o" / "model.so") == EM_AARCH64
    sc = m["target_build"]["structured_convs"]
    assert sc["mode"] == "fused" and sc["fused"] == 18
    tv = m["target_verification"]
    assert tv["passed"] is True and tv["max_abs_diff"] <= 1e-4 and "emulated aarch64 device" in tv["runtime"]


def test_bench_over_rpc_reports_emulated_timings(arm56, emulated_arm, tmp_path):
    out, _ = arm56
    res = cli("bench", out, "--rpc", emulated_arm.address, "--repeat", 3, "--warmup", 1,
              "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    assert "emulated" in res.output and "not ARM latency" in " ".join(res.output.split())
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["target"] == "tvm-arm" and r["emulated"] is True
    assert r["device"]["address"] == emulated_arm.address
    assert r["latency_ms"]["runs"] == r["dense_latency_ms"]["runs"] == 3
    assert r["latency_ms"]["median"] > 0 and r["dense_latency_ms"]["median"] > 0
    # CSG kernels are materialized: the same MACs as the dense counterpart.
    assert r["macs"]["structured"] == r["macs"]["dense"] == 125_485_696
    assert r["speedup_theoretical"] == 1.0
    assert r["speedup_measured"] == pytest.approx(r["dense_latency_ms"]["median"] / r["latency_ms"]["median"])


def test_session_timeout_mid_run_keeps_the_artifact_and_exits_43(emulated_arm, tmp_path, fixtures_dir):
    out = tmp_path / "o"
    res = cli("convert", fixtures_dir / "resnet56-csg-12x12x3x3-72.t7", "--arch", "resnet56",
              "--target", "tvm-arm", "-o", out, "--rpc", emulated_arm.address, "--rpc-timeout", 2)
    assert res.exit_code == 43, res.output
    assert "stopped answering" in res.output and "--rpc-timeout" in res.output
    assert elf_machine(out / "model.so") == EM_AARCH64
    m = json.loads((out / "manifest.json").read_text())
    assert m["verification"]["passed"] is True
    assert m["target_verification"]["passed"] is None
    assert "stopped answering" in m["target_verification"]["skipped"]


def test_unreachable_device_exits_42_before_any_work(tmp_path):
    port = free_port()  # nothing listens there
    start = time.perf_counter()
    res = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "tvm-arm", "-o", tmp_path / "o",
              "--rpc", f"127.0.0.1:{port}")
    assert res.exit_code == 42, res.output
    assert f"cannot reach the device at 127.0.0.1:{port}" in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    assert time.perf_counter() - start < 20


def test_missing_cross_compiler_exits_44(tmp_path, monkeypatch):
    import targets.tvm_targets as tt
    import shutil as real_shutil
    monkeypatch.setattr(tt.shutil, "which", lambda name, *a, **k: None if "aarch64" in name
                        else real_shutil.which(name, *a, **k))
    res = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "tvm-arm", "-o", tmp_path / "o")
    assert res.exit_code == 44, res.output
    assert "aarch64-linux-gnu-g++ is not on PATH" in res.output
    assert "apt-get install g++-aarch64-linux-gnu" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("args, text", [
    (["--target", "tvm-arm", "--tvm-target", "{not json"], "--tvm-target is not JSON"),
    (["--target", "tvm-arm", "--tvm-target", "[1]"], "must be a JSON object"),
    (["--target", "tvm-llvm", "--tvm-preset", "rpi4"], "--tvm-preset applies to --target tvm-arm"),
    (["--target", "ort-cpu", "--rpc", "127.0.0.1:9"], "--rpc/--tracker is only for the TVM targets"),
    (["--target", "tvm-arm", "--rpc", "nohost"], "bad --rpc 'nohost'"),
    (["--target", "tvm-arm", "--tracker", "127.0.0.1:9"], "--tracker needs --key"),
])
def test_bad_target_options_are_one_line_usage_errors(tmp_path, args, text):
    res = cli("convert", BUNDLED, "--arch", "resnet20", "-o", tmp_path / "o", *args)
    assert res.exit_code == 2, res.output
    assert text in res.output and len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_presets_are_aarch64_targets_llvm_accepts():
    import tvm
    from structexport.targets import ARM_PRESETS
    assert {"rpi4", "rpi5", "jetson-orin-cpu", "graviton2", "graviton3"} <= set(ARM_PRESETS)
    for name, spec in ARM_PRESETS.items():
        target = tvm.target.Target(spec)
        assert target.attrs["mtriple"] == "aarch64-linux-gnu", name
        assert "+neon" in list(target.attrs["mattr"]), name
    assert str(tvm.target.Target(ARM_PRESETS["rpi4"]).attrs["mcpu"]) == "cortex-a72"


def test_preset_reaches_the_library(tmp_path, monkeypatch):
    out = tmp_path / "o"
    monkeypatch.setenv("STRUCTEXPORT_NO_EMULATOR", "1")  # build only: the device check is other tests'
    res = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "tvm-arm", "--tvm-preset", "rpi4",
              "-o", out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads((out / "tvm_target.json").read_text())["mcpu"] == "cortex-a72"
    assert elf_machine(out / "model.so") == EM_AARCH64
    m = json.loads((out / "manifest.json").read_text())
    assert m["target_verification"]["passed"] is None
    assert "no aarch64 device" in m["target_verification"]["skipped"]


# ---------------------------------------------------------------- RPC to a server on this host

@pytest.fixture(scope="module")
def llvm20(tmp_path_factory):
    out = tmp_path_factory.mktemp("llvm") / "r20"
    res = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "tvm-llvm", "-o", out)
    assert res.exit_code == 0, res.output
    return out


def test_rpc_and_local_runs_share_one_code_path_and_agree(llvm20, host_rpc_server):
    from structexport.rpc import DeviceSpec, LoadedLibrary, parse_device
    _, address = host_rpc_server
    spec = parse_device(address)
    assert spec == DeviceSpec("127.0.0.1", int(address.split(":")[1]))
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    local = LoadedLibrary(llvm20 / "model.so", None).run(x)[0]
    remote = LoadedLibrary(llvm20 / "model.so", spec).run(x)[0]
    np.testing.assert_allclose(remote, local, rtol=0, atol=1e-6)
    assert local.shape == (1, 10)


def test_device_that_dies_mid_run_raises_device_lost(llvm20, host_rpc_server):
    from structexport.errors import DeviceLostError
    from structexport.rpc import LoadedLibrary, parse_device
    proc, address = host_rpc_server
    lib = LoadedLibrary(llvm20 / "model.so", parse_device(address))
    x = np.zeros((1, 3, 32, 32), np.float32)
    assert lib.run(x)[0].shape == (1, 10)
    os.killpg(proc.pid, 9)
    proc.wait()
    with pytest.raises(DeviceLostError) as info:
        lib.run(x)
    assert info.value.exit_code == 43
    assert f"the device at {address} stopped answering during a run" in str(info.value)


def test_bench_tvm_llvm_over_rpc_times_both_models_on_the_server(llvm20, host_rpc_server, tmp_path):
    _, address = host_rpc_server
    res = cli("bench", llvm20, "--rpc", address, "--repeat", 5, "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["target"] == "tvm-llvm" and r["emulated"] is False
    assert r["device"]["address"] == address
    assert r["latency_ms"]["runs"] == 5 and r["latency_ms"]["median"] > 0


def test_tuning_for_arm_measures_over_rpc_on_the_device(emulated_arm, tmp_path):
    out = tmp_path / "o"
    res = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "tvm-arm", "-o", out,
              "--rpc", emulated_arm.address, "--tune-trials", 4, "--tuning-db", tmp_path / "db")
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    tu = m["target_build"]["tuning"]
    assert tu["measured_on"] == f"emulated aarch64 device at {emulated_arm.address}"
    assert tu["trials_run"] >= 4 and tu["trials_failed"] < tu["trials_run"]
    assert m["target_build"]["tvm_target"]["mtriple"] == "aarch64-linux-gnu"
    assert m["target_verification"]["passed"] is True
    assert elf_machine(out / "model.so") == EM_AARCH64
