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
    assert m["target_build"]["tvm_target"] == {"kind": "llvm", "num-cores": m["target_build"]["tvm_target"]["num-cores"]}
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
