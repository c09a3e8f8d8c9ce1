"""MetaSchedule tuning for tvm-llvm: a tuned library verifies, converting again takes every
task from the database (no trials), and bench builds the dense counterpart with the same
budget. Budgets are tiny (8 trials: one task) to keep the tier fast; the figures for real
budgets are in docs/benchmarks.md."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from structexport.cli import main

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "models" / "checkpoints" / "resnet20-csg-16x16x3x3-72.t7"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("tune")
    db, out = root / "db", root / "r20"
    res = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "tvm-llvm", "-o", out,
              "--tune-trials", 8, "--tuning-db", db)
    assert res.exit_code == 0, res.output
    return db, out, json.loads((out / "manifest.json").read_text())


def test_tuned_library_verifies_and_records_its_tuning(tuned):
    db, out, m = tuned
    tu = m["target_build"]["tuning"]
    assert tu["trials_requested"] == 8
    assert tu["trials_run"] >= 8 and tu["trials_failed"] < tu["trials_run"]
    assert tu["tasks"] >= 10 and tu["tasks_from_database"] == 0
    assert Path(tu["database"]).parent == db
    from structexport.machine import llvm_host_cpu
    assert m["target_build"]["tvm_target"] == {"kind": "llvm", "mcpu": llvm_host_cpu(),
                                               "num-cores": m["target_build"]["tvm_target"]["num-cores"]}
    assert tu["trials_per_task"] is None and len(tu["per_task"]) == tu["tasks"]
    assert tu["weights_prepacked"] is True    # a CPU target: schedules may pack weights
    records = (Path(tu["database"]) / "records.json").read_text().strip().splitlines()
    assert len(records) >= 1
    assert m["target_verification"]["passed"] is True
    assert m["target_verification"]["max_abs_diff"] <= 1e-4
    assert "tuned" in m["artifacts"]["model.so"]["description"]


def test_converting_again_takes_every_task_from_the_database(tuned, tmp_path):
    db, _, first = tuned
    res = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "tvm-llvm", "-o", tmp_path / "again",
              "--tune-trials", 8, "--tuning-db", db, "--json")
    assert res.exit_code == 0, res.output
    tu = json.loads((tmp_path / "again" / "manifest.json").read_text())["target_build"]["tuning"]
    assert tu["trials_run"] == 0
    assert tu["tasks_from_database"] == tu["tasks"] == first["target_build"]["tuning"]["tasks"]
    assert tu["database"] == first["target_build"]["tuning"]["database"]


def test_bench_of_a_tuned_library_builds_the_dense_one_with_the_same_budget(tuned, tmp_path):
    db, out, m = tuned
    res = cli("bench", out, "--repeat", 3, "--warmup", 1, "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["target"] == "tvm-llvm" and r["device"]["address"] == "local"
    assert r["latency_ms"]["runs"] == 3 and r["latency_ms"]["median"] > 0
    dense = r["dense_target_build"]
    assert dense["tvm_target"] == m["target_build"]["tvm_target"]
    assert dense["tuning"]["trials_requested"] == 8
    assert Path(dense["tuning"]["database"]).parent == db


def test_tuning_for_arm_without_a_device_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTEXPORT_NO_EMULATOR", "1")
    res = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "tvm-arm", "-o", tmp_path / "o",
              "--tune-trials", 8, "--tuning-db", tmp_path / "db")
    assert res.exit_code == 46, res.output
    assert "tuning for tvm-arm measures on an aarch64 device" in res.output
    assert not (tmp_path / "o").exists()


def test_unreadable_tuning_database_is_exit_46(tmp_path):
    from structexport.tuning import _database, database_dir
    folder = database_dir(tmp_path, {"kind": "llvm"})
    (folder / "records.json").write_text("{not json\n")
    (folder / "workloads.json").write_text("{not json\n")
    from structexport.errors import TuningError
    with pytest.raises(TuningError) as info:
        _database(folder)
    assert info.value.exit_code == 46 and "unreadable" in str(info.value)


def test_tune_budgets_are_named_or_counted_and_exclusive(tmp_path):
    res = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "tvm-llvm", "-o", tmp_path / "o",
              "--tune", "forever")
    assert res.exit_code == 2 and "'forever' is not a budget: give quick, full or a number" in res.output
    res = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "tvm-llvm", "-o", tmp_path / "o",
              "--tune", "quick", "--tune-trials", 8)
    assert res.exit_code == 2 and "--tune and --tune-trials both set a tuning budget" in res.output
    assert not (tmp_path / "o").exists()
    from structexport.tuning import TUNE_BUDGETS, TuningBudget
    assert TUNE_BUDGETS == {"quick": 16, "full": 64}
    assert TuningBudget(per_task=4).global_trials(14) == 56 and TuningBudget(per_task=4).share(14) == 4
    assert TuningBudget(total=64).global_trials(3) == 64 and TuningBudget(total=64).share(14) == 4


@pytest.mark.slow   # 130 s of tuning: the default tier keeps CI under its 30 minutes
def test_a_per_task_budget_reaches_every_task_and_is_reported(tmp_path):
    """--tune 1: every task gets its own trial (MetaSchedule's scheduler is not left to
    spend the budget on a few), each reported with its best latency; converting again
    takes every task from the database."""
    db = tmp_path / "db"
    res = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "tvm-llvm", "-o", tmp_path / "a",
              "--tune", 1, "--tuning-db", db)
    assert res.exit_code == 0, res.output
    tu = json.loads((tmp_path / "a" / "manifest.json").read_text())["target_build"]["tuning"]
    assert tu["trials_per_task"] == 1 and tu["tasks"] >= 10
    rows = tu["per_task"]
    assert len(rows) == tu["tasks"] and not any(r["from_database"] for r in rows)
    assert all(r["trials"] == 1 for r in rows), rows          # one each: none skipped, none doubled
    assert sum(r["trials"] for r in rows) == tu["trials_run"]
    assert sum(r["best_ms"] is not None for r in rows) >= tu["tasks"] - tu["trials_failed"]
    assert "tuning (1 per task)" in res.output and "tuning tasks" in res.output
    again = cli("convert", BUNDLED, "--arch", "resnet20", "--target", "tvm-llvm", "-o", tmp_path / "b",
                "--tune", 1, "--tuning-db", db)
    assert again.exit_code == 0, again.output
    tu2 = json.loads((tmp_path / "b" / "manifest.json").read_text())["target_build"]["tuning"]
    assert tu2["trials_run"] == 0 and all(r["from_database"] and r["trials"] == 0 for r in tu2["per_task"])
    assert [r["best_ms"] for r in tu2["per_task"]] == [r["best_ms"] for r in rows]


def test_a_library_for_another_cpu_is_built_again_for_this_one(tuned, tmp_path):
    """A tvm-llvm library names its CPU (mcpu); on a host of another CPU family it may not
    even load, so bench converts again from the source instead of running it."""
    import shutil
    _, out, m = tuned
    copy = tmp_path / "pkg"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target_build"]["tvm_target"]["mcpu"] = "some-other-cpu"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    res = cli("bench", copy, "--repeat", 3, "--warmup", 1, "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    notes = json.loads((tmp_path / "b.json").read_text())["workload"]["notes"]
    assert any("built for some-other-cpu" in n for n in notes), notes
