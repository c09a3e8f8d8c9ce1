"""MetaSchedule tuning for the TVM targets, with a database that makes converting again free.

Tasks (fused TIR functions) are extracted from the Relax module; a task whose workload
already has a record in the database for this target is not tuned again. The database is
one folder per target (``<tuning-db>/<target hash>/``, TVM's JSON workload and record
files), so records are keyed by workload (structural hash) and target; ``--tuning-db PATH``
shares one between machines and CI runs. Trials are measured on this host for host
targets, and over RPC (``--rpc`` / ``--tracker``, or the emulated device) for ARM.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from structexport.errors import TuningError

DEFAULT_DB = Path(os.environ.get("STRUCTEXPORT_CACHE", Path.home() / ".cache" / "structexport")) / "tvm-tuning"


@dataclass
class TuningResult:
    trials_requested: int
    trials_run: int
    tasks: int
    tasks_from_database: int
    database: str
    seconds: float
    measured_on: str

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def database_dir(root: str | Path | None, target: dict) -> Path:
    """``<root>/<first 16 hex of sha256(target JSON)>``, with the target written beside."""
    key = hashlib.sha256(json.dumps(target, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(root or DEFAULT_DB).expanduser() / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "target.json").write_text(json.dumps(target, sort_keys=True) + "\n")
    return folder


def _database(folder: Path):
    from tvm.s_tir import meta_schedule as ms
    try:
        return ms.database.JSONDatabase(path_workload=str(folder / "workloads.json"),
                                        path_tuning_record=str(folder / "records.json"),
                                        allow_missing=True)
    except Exception as exc:
        raise TuningError(f"the tuning database {folder} is unreadable: {str(exc).splitlines()[-1][:160]}",
                          "delete the folder, or pass another --tuning-db") from None


def _has_record(db, task) -> bool:
    mod = task.dispatched[0]
    return bool(db.has_workload(mod)) and db.query_tuning_record(mod, task.target, task.task_name) is not None


def export_aarch64(mod) -> str:
    """MetaSchedule builder export: a candidate cross-compiled for aarch64 (runs in a worker)."""
    from tvm.support import cc
    path = os.path.join(tempfile.mkdtemp(prefix="structexport-ms-"), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler("aarch64-linux-gnu-g++"))
    return path


DIRECT = "__structexport_direct__"


def create_rpc_session(rpc_config):
    """MetaSchedule runner session: a direct ``--rpc`` server, or the tracker's (in a worker)."""
    from tvm import rpc
    if rpc_config.tracker_key == DIRECT:
        return rpc.connect(rpc_config.tracker_host, rpc_config.tracker_port,
                           session_timeout=rpc_config.session_timeout_sec)
    return rpc_config.connect_server()


def _progress_callback(total: int, say: Callable[[str], None], count: dict):
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.s_tir.meta_schedule.utils import derived_object

    @derived_object
    class Progress(PyMeasureCallback):
        def __init__(self):
            self.start = time.perf_counter()

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            count["trials"] += len(measure_candidates)
            done = count["trials"]
            left = (time.perf_counter() - self.start) / done * max(total - done, 0) if done else 0
            say(f"tuning: {min(done, total)}/{total} trials, about {left:.0f} s left")
    return Progress()


def tune_and_compile(mod, target, target_dict: dict, trials: int, db_root: str | Path | None,
                     device=None, cross_compile: bool = False,
                     progress: Callable[[str], None] | None = None):
    """Tune ``mod``'s tasks missing from the database with ``trials`` trials in all, then
    compile with the database applied. Returns ``(executable, TuningResult)``."""
    from tvm.s_tir import meta_schedule as ms
    say = progress or (lambda _m: None)
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(logging.WARNING)
    start = time.perf_counter()
    folder = database_dir(db_root, target_dict)
    db = _database(folder)
    say("tuning: extracting tasks")
    tasks = [t for t in ms.relax_integration.extract_tasks(mod, target)
             if not t.mod.attrs.get("tirx.is_scheduled", False)]
    todo = [t for t in tasks if not _has_record(db, t)]
    measured_on = "this host"
    trials_run = 0
    if todo and trials > 0:
        if device is not None and getattr(device, "remote", False):
            runner = ms.runner.RPCRunner(
                rpc_config=ms.runner.RPCConfig(device.host, device.port, device.key or DIRECT,
                                               session_timeout_sec=int(device.session_timeout_s)),
                evaluator_config=ms.runner.EvaluatorConfig(number=1, repeat=1, min_repeat_ms=0),
                f_create_session=create_rpc_session)
            measured_on = device.describe()
        else:
            runner = ms.runner.LocalRunner(
                evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20))
        builder = ms.builder.LocalBuilder(f_export=export_aarch64) if cross_compile else "local"
        with tempfile.TemporaryDirectory(prefix="structexport-tune-") as work:
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(todo, work, seed=0)
            count = {"trials": 0}
            callbacks = (ms.measure_callback.MeasureCallback.create("default")
                         + [_progress_callback(trials, say, count)])
            try:
                ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work,
                              max_trials_global=trials, num_trials_per_iter=min(64, max(8, trials // max(len(todo), 1))),
                              builder=builder, runner=runner, database=db,
                              measure_callbacks=callbacks)
            except Exception as exc:
                raise TuningError(f"MetaSchedule tuning failed: {str(exc).strip().splitlines()[-1][:200]}",
                                  "run without --tune-trials to build untuned") from None
        trials_run = count["trials"]
    say("compiling with the tuning database")
    executable = ms.relax_integration.compile_relax(db, mod, target, params=None)
    return executable, TuningResult(trials, trials_run, len(tasks), len(tasks) - len(todo),
                                    str(folder), round(time.perf_counter() - start, 1), measured_on)
