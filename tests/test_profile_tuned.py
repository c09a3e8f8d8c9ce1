"""`profile` of a tuned TVM library: the profiled build is compiled as model.so was (weights
bound as constants, the package's MetaSchedule database applied), so its kernels are the
tuned ones, and model.so itself is what gets timed, its calls mapped to layers by that build.

The fast tests make their database by hand: each task's first MetaSchedule design-space
candidate with the postprocessors applied (weights read pre-packed, as tuning does), committed
as a record without measuring anything -- a database of real schedules in about a second.
The slow test tunes the bundled fixture for real (8 trials) and profiles it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from structexport.cli import main

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "checkpoints" / "resnet20-csg-16x16x3x3-72.t7"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def tiny_onnx(path: Path) -> Path:
    """Conv + bias + ReLU, then a Gemm whose weight TVM transposes (folded at compile time)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype("float32"), "conv.weight"),
             numpy_helper.from_array(rng.standard_normal(8).astype("float32"), "conv.bias"),
             numpy_helper.from_array(rng.standard_normal((10, 512)).astype("float32"), "fc.weight")]
    nodes = [helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "fc.weight"], ["y"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def hand_made_database(onnx_path: Path, root: Path, target_dict: dict) -> tuple[Path, list[str]]:
    """A database with a record for every compute task of ``onnx_path`` (tasks that are
    only data movement get none), and the index that tells convert they are tuned (so
    convert --tune-trials takes them from the database and runs no trial). Returns the
    database folder and the names of the tasks with a record."""
    import onnx
    import tvm
    import tvm_ffi
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.s_tir import meta_schedule as ms

    from structexport.tuning import database_dir, preload_tvm_tensor_intrinsics, tunable_tasks
    preload_tvm_tensor_intrinsics()
    target = tvm.target.Target(target_dict)
    _, tasks = tunable_tasks(from_onnx(onnx.load(str(onnx_path)), keep_params_in_input=False), target,
                             prepack=True)
    folder = database_dir(root, target_dict)
    db = ms.database.JSONDatabase(path_workload=str(folder / "workloads.json"),
                                  path_tuning_record=str(folder / "records.json"), allow_missing=True)
    index, recorded = {}, []
    for task in tasks:
        workload = task.dispatched[0]
        index[f"{tvm_ffi.structural_hash(workload) & (2**64 - 1):016x}"] = {"name": task.task_name,
                                                                          "trials": 10**6}
        if not any(op in task.task_name for op in ("conv2d", "matmul")):
            continue
        ctx = ms.TuneContext(mod=workload, target=target, space_generator="post-order-apply",
                             search_strategy="evolutionary", task_name=task.task_name, rand_state=1)
        sch = ctx.space_generator.generate_design_space(workload)[0]
        for postproc in ctx.space_generator.postprocs:
            assert postproc.apply(sch), postproc
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(workload), [1e-5], target,
            ms.arg_info.ArgInfo.from_prim_func(workload["main"])))
        recorded.append(task.task_name)
    (folder / "tasks.json").write_text(json.dumps(index))
    return folder, recorded


def library_calls(executable_or_path, feed) -> list[str]:
    """The PrimFunc calls one run of a Relax VM executable (or a library file) makes."""
    import tvm
    from tvm import relax
    lib = (tvm.runtime.load_module(str(executable_or_path)) if isinstance(executable_or_path, Path)
           else executable_or_path)
    vm = relax.VirtualMachine(lib, tvm.cpu())
    seen: list[str] = []
    vm.set_instrument(lambda func, symbol, before, ret, *a: (before and not symbol.startswith("vm.")
                                                            and seen.append(symbol)) or 0)
    vm["main"](tvm.runtime.tensor(feed))
    return seen


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuned-tiny")
    target_dict = {"kind": "llvm", "num-cores": 1}
    path = tiny_onnx(root / "tiny.onnx")
    folder, recorded = hand_made_database(path, root / "db", target_dict)
    return path, folder, recorded, target_dict


def test_the_profiled_build_is_the_tuned_one(tiny):
    """tuned_program compiles what tune_and_compile compiles (the same PrimFunc calls, the
    database's pre-packed kernels), and maps every call's constants to the ONNX weights by
    value -- a weight pre-packed or transposed included. With weights as inputs (the untuned
    profiled build) no record applies."""
    import onnx
    import tvm
    from tvm.relax.frontend.onnx import from_onnx
    from tvm.s_tir import meta_schedule as ms

    from structexport.profiling.tvm_host import tuned_program, tvm_program
    from structexport.tuning import compile_with_database, tunable_tasks
    path, folder, recorded, target_dict = tiny
    before = {f: (folder / f).read_bytes() for f in ("workloads.json", "records.json")}
    p = tuned_program(path, target_dict, folder)
    assert {f: (folder / f).read_bytes() for f in before} == before   # read from a copy
    assert p["tuning"] == {"database": str(folder), "tasks": 3, "scheduled": len(recorded),
                           "prepacked": 2}
    assert sorted(recorded) == ["fused_conv2d_add_relu1", "matmul1"]
    symbols = [c["symbol"] for c in p["calls"]]
    assert symbols == ["fused_conv2d_add_relu1_prepacked", "matmul1_prepacked"]
    assert [c["weights"] for c in p["calls"]] == [["conv.weight", "conv.bias"], ["fc.weight"]]
    assert p["weights"] == []
    # what the target's build (tune_and_compile) compiles from the same database
    target = tvm.target.Target(target_dict)
    mod, _ = tunable_tasks(from_onnx(onnx.load(str(path)), keep_params_in_input=False), target, prepack=True)
    db = ms.database.JSONDatabase(path_workload=str(folder / "workloads.json"),
                                  path_tuning_record=str(folder / "records.json"), allow_missing=False)
    feed = np.random.default_rng(1).standard_normal((1, 4, 8, 8)).astype("float32")
    assert library_calls(compile_with_database(mod, target, db, True), feed) == symbols
    assert library_calls(p["executable"], feed) == symbols
    # weights as inputs: other workloads, no record applies (what profile did before)
    untuned = tvm_program(path, target_dict)
    assert not any(c["symbol"].endswith("_prepacked") for c in untuned["calls"])


def test_profile_of_a_tuned_package_times_model_so_itself(tiny, tmp_path):
    """convert --tune-trials with every task already in the database (no trial runs), then
    profile: the structured side is model.so itself, the calls it makes are the tuned
    build's, every kernel maps to its layer, and model.so's latency is the profiled
    library's."""
    path, folder, recorded, _ = tiny
    from structexport.machine import llvm_host_cpu
    from structexport.tuning import database_dir, with_core_count
    host = with_core_count({"kind": "llvm", "mcpu": llvm_host_cpu()} if llvm_host_cpu() else {"kind": "llvm"})
    db_root = tmp_path / "db"
    own_folder, own_recorded = hand_made_database(path, db_root, host)
    assert own_folder == database_dir(db_root, host)
    out = tmp_path / "pkg"
    res = cli("convert", path, "--target", "tvm-llvm", "-o", out, "--tune-trials", 8, "--tuning-db", db_root)
    assert res.exit_code == 0, res.output
    tu = json.loads((out / "manifest.json").read_text())["target_build"]["tuning"]
    assert tu["trials_run"] == 0 and tu["tasks_from_database"] == tu["tasks"] == 3
    assert sum(r["best_ms"] is not None for r in tu["per_task"]) == len(own_recorded) == 2
    res = cli("profile", out, "--repeat", 4, "--warmup", 1, "--no-peak", "-o", tmp_path / "r.html")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert "structured: model.so itself" in report["runtime"], report["runtime"]
    assert f"database {own_folder} applied: 2 of 3 tasks scheduled from it" in report["runtime"]
    assert "dense: compiled the same way with the same database (2 of 3 tasks" in report["runtime"]
    assert any("on this host the profiled structured build is model.so itself" in n for n in report["notes"]), report["notes"]
    assert not any("per-layer times are the untuned kernels" in n for n in report["notes"])
    assert any("both builds are compiled as model.so was" in n and "model.so itself was profiled" in n
               for n in report["notes"]), report["notes"]
    assert not any("weights passed as inputs" in n for n in report["notes"])
    assert report["tuning"]["library_profiled"] is True and report["tuning"]["database"] == str(own_folder)
    s = report["totals"]["structured"]
    assert s["artifact_latency_ms"] == s["latency_ms"]    # one library, timed once
    assert s["calls"] == 2 and s["unmapped_ms"] == 0
    rows = {r["layer"]: r for r in report["layers"]}
    assert set(rows["conv"]["structured_ops"]) == {"fused_conv2d_add_relu1_prepacked"}
    assert set(rows["fc"]["structured_ops"]) == {"matmul1_prepacked"}
    assert sum(r["structured_ms"] for r in report["layers"]) == pytest.approx(s["profiled_ms"], rel=1e-9)


def test_a_library_that_makes_other_calls_than_its_rebuild_is_not_mapped_by_it(tiny, tmp_path):
    """The database lost its records since model.so was built: the rebuild calls other
    (untuned) PrimFuncs, so model.so's calls cannot take its weights; the build compiled
    with the database as it is now is profiled, and the runtime line says why."""
    from structexport.machine import llvm_host_cpu
    from structexport.tuning import with_core_count
    path = tiny[0]
    host = with_core_count({"kind": "llvm", "mcpu": llvm_host_cpu()} if llvm_host_cpu() else {"kind": "llvm"})
    db_root = tmp_path / "db"
    folder, _ = hand_made_database(path, db_root, host)
    out = tmp_path / "pkg"
    res = cli("convert", path, "--target", "tvm-llvm", "-o", out, "--tune-trials", 8, "--tuning-db", db_root)
    assert res.exit_code == 0, res.output
    (folder / "records.json").write_text("")
    res = cli("profile", out, "--repeat", 3, "--warmup", 1, "--no-peak", "-o", tmp_path / "r.html")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert ("structured: a build compiled as model.so was (model.so made other calls: 2 against the "
            "build's 2, first different #0;") in report["runtime"], report["runtime"]
    assert "applied: 0 of 3 tasks scheduled from it" in report["runtime"]
    s = report["totals"]["structured"]
    assert s["artifact_latency_ms"] != s["latency_ms"]    # model.so timed beside the build
    assert {op for r in report["layers"] for op in r["structured_ops"]} == {"fused_conv2d_add_relu1", "matmul1"}


def test_a_tuned_package_without_its_database_says_its_profile_is_untuned(tiny, tmp_path):
    """The database a package names is gone (another machine): the profiled builds are the
    untuned ones, and the report says so."""
    from structexport.machine import llvm_host_cpu
    from structexport.tuning import with_core_count
    path = tiny[0]
    host = with_core_count({"kind": "llvm", "mcpu": llvm_host_cpu()} if llvm_host_cpu() else {"kind": "llvm"})
    db_root = tmp_path / "db"
    hand_made_database(path, db_root, host)
    out = tmp_path / "pkg"
    res = cli("convert", path, "--target", "tvm-llvm", "-o", out, "--tune-trials", 8, "--tuning-db", db_root)
    assert res.exit_code == 0, res.output
    import shutil
    shutil.rmtree(db_root)
    res = cli("profile", out, "--repeat", 3, "--warmup", 1, "--no-peak", "-o", tmp_path / "r.html")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert "(untuned, default pipeline" in report["runtime"]
    assert any("its tuning database is not on this machine: the profiled builds are untuned" in n
               for n in report["notes"]), report["notes"]


@pytest.mark.slow
def test_profile_of_a_tuned_library_adds_up_to_its_latency(tmp_path):
    """The issue's test: the bundled fixture tuned for real (8 trials), profiled. The
    profiled structured library is model.so (its latency is the artifact's), the tasks
    scheduled from the database are those the tuning recorded, and the per-layer rows add
    up to the profiled run of model.so itself (no untuned kernels in the table)."""
    db, out = tmp_path / "db", tmp_path / "r20"
    res = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "tvm-llvm", "-o", out,
              "--tune-trials", 8, "--tuning-db", db)
    assert res.exit_code == 0, res.output
    tu = json.loads((out / "manifest.json").read_text())["target_build"]["tuning"]
    with_record = sum(r["best_ms"] is not None for r in tu["per_task"])
    assert with_record >= 1
    res = cli("profile", out, "--repeat", 10, "--warmup", 2, "--no-peak", "-o", tmp_path / "r.html")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert "structured: model.so itself" in report["runtime"], report["runtime"]
    assert f"applied: {with_record} of {tu['tasks']} tasks scheduled from it" in report["runtime"]
    s = report["totals"]["structured"]
    assert s["artifact_latency_ms"] == s["latency_ms"]
    assert s["unmapped_ms"] == 0
    layers = [r for r in report["layers"] if r["kind"] == "layer"]
    assert all(r["structured_ms"] > 0 for r in layers)
    # the prepacked (tuned) kernels are model.so's, each mapped to a layer
    ops = {op for r in layers for op in r["structured_ops"]}
    assert any(op.endswith("_prepacked") for op in ops), ops
    assert sum(r["structured_ms"] for r in report["layers"]) == pytest.approx(s["profiled_ms"], rel=1e-9)


def test_a_fused_small_conv_with_the_residual_add_maps_to_its_own_layer(tmp_path):
    """A stride-2 residual block as ResNet-18 has, compiled as a tuned model.so is: the
    second structured conv's small conv is fused with the residual add, whose other input is
    the shortcut's 1x1 conv, run just before it. The small conv reads coefficients the fusion
    made (no ONNX weight): it is placed by its pool's weight, so its time is ``block.conv2``'s,
    not the shortcut's (which took it, and showed ResNet-18's downsample convs at 0.24x)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from test_tvm_fused import structured_weight

    from structexport.profiling.layermap import tvm_owner
    from structexport.profiling.tvm_host import tuned_program

    down = np.random.default_rng(2).standard_normal((16, 8, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(structured_weight(16, 8, 3, 4, 2, seed=0), "block.conv1.weight"),
             numpy_helper.from_array(structured_weight(16, 16, 3, 8, 2, seed=1), "block.conv2.weight"),
             numpy_helper.from_array(down, "block.down.weight")]
    nodes = [helper.make_node("Conv", ["x", "block.conv1.weight"], ["a"], pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "block.conv2.weight"], ["b"], pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "block.down.weight"], ["d"], strides=[2, 2]),
             helper.make_node("Add", ["b", "d"], ["s"]),
             helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "block.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    db = tmp_path / "db"   # no records: the tuning pipeline's fusion, default schedules
    db.mkdir()
    for name in ("workloads.json", "records.json"):
        (db / name).write_text("")

    program = tuned_program(path, {"kind": "llvm", "num-cores": 1}, db, fuse=True)
    assert program["fused_convs"] == 2
    calls = program["calls"]
    owner = tvm_owner(calls, {"block.conv1", "block.conv2", "block.down"})
    by_layer: dict[str, list[str]] = {}
    for k, c in enumerate(calls):
        by_layer.setdefault(owner({"name": f"{c['symbol']}#{k}"}), []).append(c["symbol"])
    assert sorted(by_layer) == ["block.conv1", "block.conv2", "block.down"], by_layer
    # the shortcut: its 1x1 conv alone; block.conv2: its pool and its small conv with the add
    assert len(by_layer["block.down"]) == 1 and "add" not in by_layer["block.down"][0], by_layer
    assert sum(s.startswith("structured_sum_pool") for s in by_layer["block.conv2"]) == 1, by_layer
    assert any("conv2d" in s and "add" in s for s in by_layer["block.conv2"]), by_layer
