"""``bench --tune-repeats N``: N fresh tunings (own database, MetaSchedule seed 0..N-1) of
the structured and the dense TVM library, each pair timed interleaved, reported with the
median, min and max speedup. The default tier checks the refusals and the summary's
arithmetic; the slow tier runs two tiny tunings (4 trials) end to end."""
from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from structexport.bench import BenchOptions, BenchUsageError, run_bench, tune_repeats_summary
from structexport.cli import main

ARCH = "resnet20-struct-c2n2"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_repeats_without_a_tvm_target_are_refused():
    res = cli("bench", "--arch", ARCH, "--tune-repeats", 3)
    assert res.exit_code == 2, res.output
    assert "--tune-repeats 3 repeats the TVM targets' MetaSchedule tuning, and --target ort-cpu is not tuned" in res.output
    assert "use it with --target tvm-llvm" in res.output and "--tune quick|full|N" in res.output


def test_repeats_without_a_tuning_budget_are_refused():
    res = cli("bench", "--arch", ARCH, "--target", "tvm-llvm", "--tune-repeats", 2)
    assert res.exit_code == 2, res.output
    assert "--tune-repeats 2 repeats the tuning, and this run has no tuning budget" in res.output
    assert "add --tune quick|full|N or --tune-trials N" in res.output


def test_refused_through_the_api_before_any_work(tmp_path):
    with pytest.raises(BenchUsageError) as info:
        run_bench(None, ARCH, BenchOptions(target="tvm-llvm", tune_repeats=2,
                                           target_options={"tuning_db": str(tmp_path / "db")}))
    assert info.value.exit_code == 2 and "no tuning budget" in str(info.value)
    assert not (tmp_path / "db").exists()
    res = cli("bench", "--arch", ARCH, "--tune-repeats", 0)
    assert res.exit_code == 2 and "--tune-repeats" in res.output


def stats(median: float) -> dict:
    return {"median": median, "p10": median * 0.9, "p90": median * 1.1, "runs": 5}


def test_summary_medians_and_reported_repeat():
    # speedups 2.0, 4.0, 3.0: median 3.0 (repeat 3), min 2.0, max 4.0
    runs = [{"repeat": k, "seed": k - 1, "database": f"db/repeat-{k}",
             "stats": {"structured": stats(s), "dense": stats(d)}}
            for k, s, d in ((1, 1.0, 2.0), (2, 0.5, 2.0), (3, 1.0, 3.0))]
    out = tune_repeats_summary(runs, theoretical=4.0)
    assert out["count"] == 3 and out["seeds"] == [0, 1, 2]
    assert [r["speedup_measured"] for r in out["repeats"]] == [2.0, 4.0, 3.0]
    assert out["speedup_measured"] == {"median": 3.0, "min": 2.0, "max": 4.0}
    assert out["realization_efficiency"] == {"median": 0.75, "min": 0.5, "max": 1.0}
    assert [r["realization_efficiency"] for r in out["repeats"]] == [0.5, 1.0, 0.75]
    assert out["reported_repeat"] == 3
    assert [r["database"] for r in out["repeats"]] == ["db/repeat-1", "db/repeat-2", "db/repeat-3"]
    assert out["repeats"][1]["latency_ms"]["median"] == 0.5 and out["repeats"][1]["dense_latency_ms"]["median"] == 2.0
    # an even count: the median of the two middle ones; the lower middle stands for the run
    two = tune_repeats_summary(runs[:2], theoretical=None)
    assert two["speedup_measured"]["median"] == 3.0 and two["reported_repeat"] == 1
    assert two["realization_efficiency"] is None
    assert all(r["realization_efficiency"] is None for r in two["repeats"])


@pytest.mark.slow
def test_two_fresh_tunings_end_to_end(tmp_path):
    pytest.importorskip("tvm")
    db = tmp_path / "db"
    res = cli("bench", "--arch", ARCH, "--target", "tvm-llvm", "--tune-trials", 4, "--tuning-db", db,
              "--tune-repeats", 2, "--repeat", 3, "--warmup", 1, "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    r = json.loads((tmp_path / "b.json").read_text())
    t = r["tune_repeats"]
    assert t["count"] == 2 and t["seeds"] == [0, 1] and len(t["repeats"]) == 2
    dbs = [Path(rep["database"]) for rep in t["repeats"]]
    assert len(set(dbs)) == 2 and all(d.parent.parent.parent == db and d.is_dir() for d in dbs)
    speedups = [rep["speedup_measured"] for rep in t["repeats"]]
    for rep, seed in zip(t["repeats"], (0, 1)):
        assert rep["speedup_measured"] == rep["dense_latency_ms"]["median"] / rep["latency_ms"]["median"]
        assert rep["latency_ms"]["runs"] == rep["dense_latency_ms"]["runs"] == 3
        for side in ("structured", "dense"):
            tuning = rep["tuning"][side]
            # each repeat tuned afresh, in its own database, with its own seed
            assert tuning["seed"] == seed and Path(tuning["database"]).parent == Path(rep["database"])
            assert tuning["trials_requested"] == 4 and tuning["trials_run"] >= 1
        assert rep["tuning"]["structured"]["tasks_from_database"] == 0
    assert t["speedup_measured"]["median"] == statistics.median(speedups) == r["speedup_measured"]
    assert t["speedup_measured"]["min"] == min(speedups) and t["speedup_measured"]["max"] == max(speedups)
    theory = r["speedup_theoretical"]
    assert t["realization_efficiency"]["median"] == pytest.approx(statistics.median(speedups) / theory)
    assert r["realization_efficiency"] == t["realization_efficiency"]["median"]
    reported = t["repeats"][t["reported_repeat"] - 1]
    assert r["latency_ms"] == reported["latency_ms"] and r["dense_latency_ms"] == reported["dense_latency_ms"]
    assert r["dense_target_build"]["tuning"]["seed"] == reported["seed"]
    # terminal: one progress line per repeat, the per-repeat table and the spread
    assert "tuning repeat 1/2 (seed 0)" in res.output and "tuning repeat 2/2 (seed 1)" in res.output
    assert "(median of 2 tunings)" in res.output
    assert f"speedup median {statistics.median(speedups):.2f}x, min {min(speedups):.2f}x" in res.output
