"""MetaSchedule tuning for the TVM targets, with a database that makes converting again free.

Tasks (fused TIR functions) are extracted from the Relax module; a task whose workload
already has a record in the database for this target is not tuned again. The database is
one folder per target (``<tuning-db>/<target hash>/``, TVM's JSON workload and record
files), so records are keyed by workload (structural hash) and target; ``--tuning-db PATH``
shares one between machines and CI runs. Trials are measured on this host for host
targets, and over RPC (``--rpc`` / ``--tracker``, or the emulated device) for ARM.
"""
from __future__ import annotations

import contextlib
import contextvars
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
from structexport.fsutil import cache_root, write_text_atomic

# Named budgets, trials per task. On a CIFAR ResNet-20 (14 tasks, 1 thread, this project's
# Intel and AMD machines) MetaSchedule reached 1.5-1.6x ONNX Runtime's time at 16 trials
# per task and 1.00-1.10x at 64 (docs/benchmarks.md); a trial costs about 1 s on 2 cores.
TUNE_BUDGETS = {"quick": 16, "full": 64}


def default_db() -> Path:
    return cache_root() / "tvm-tuning"


@dataclass
class TuningBudget:
    """``total`` trials shared by the tasks as MetaSchedule's scheduler sees fit
    (``--tune-trials``), or ``per_task`` trials for every task (``--tune``)."""
    total: int = 0
    per_task: int = 0

    def __post_init__(self):
        if self.total and self.per_task:
            raise ValueError("a tuning budget is either in all or per task")

    def share(self, tasks: int) -> int:
        """Trials one task gets (what the index remembers it was given)."""
        return self.per_task or max(1, self.total // max(tasks, 1))

    def global_trials(self, todo: int) -> int:
        return self.per_task * todo if self.per_task else self.total

    def __bool__(self) -> bool:
        return bool(self.total or self.per_task)


@dataclass
class TuningResult:
    trials_requested: int
    trials_run: int
    tasks: int
    tasks_from_database: int
    database: str
    seconds: float
    measured_on: str
    trials_failed: int = 0
    trials_per_task: int | None = None     # --tune; None: --tune-trials in all
    # one per task: name, trials spent now, best latency (ms) in the database, from_database
    per_task: list = None
    weights_prepacked: bool = False   # schedules may read weights packed (CPU targets)
    seed: int = 0                     # MetaSchedule's random seed for the search

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# MetaSchedule's seed for tune_and_compile calls that name none: 0 unless set by tuning_seed
_SEED = contextvars.ContextVar("structexport_tuning_seed", default=0)


@contextlib.contextmanager
def tuning_seed(seed: int):
    """Tune with MetaSchedule seed ``seed`` within (the targets' builds name none; 0 by
    default): ``bench --tune-repeats`` tunes each repeat with its own seed."""
    token = _SEED.set(int(seed))
    try:
        yield
    finally:
        _SEED.reset(token)


def database_dir(root: str | Path | None, target: dict) -> Path:
    """``<root>/<first 16 hex of sha256(target JSON)>``, with the target written beside."""
    key = hashlib.sha256(json.dumps(target, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(root or default_db()).expanduser() / key
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "target.json").write_text(json.dumps(target, sort_keys=True) + "\n")
    return folder


def with_core_count(target: dict, device=None) -> dict:
    """MetaSchedule needs the device's core count in the target ("num-cores"): this host's
    physical cores when tuning here; a device over RPC without one in its preset is
    tuned as a single core (pass --tvm-target with "num-cores" to say otherwise)."""
    if "num-cores" in target or target.get("kind") != "llvm":
        return target
    if device is not None and getattr(device, "remote", False):
        cores = 1
    else:
        import psutil
        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    return {**target, "num-cores": int(cores)}


def _database(folder: Path):
    from tvm.s_tir import meta_schedule as ms
    try:
        return ms.database.JSONDatabase(path_workload=str(folder / "workloads.json"),
                                        path_tuning_record=str(folder / "records.json"),
                                        allow_missing=True)
    except Exception as exc:
        raise TuningError(f"the tuning database {folder} is unreadable: {str(exc).splitlines()[-1][:160]}",
                          "delete the folder, or pass another --tuning-db") from None


def preload_tvm_tensor_intrinsics() -> None:
    """Import MetaSchedule's tensor intrinsics quickly (also a builder/runner worker initializer).

    Each of their hundreds of TVMScript functions calls ``inspect.stack()``, which reads
    source context for every frame and walks all of ``sys.modules`` per frame; beside
    torch's thousands of modules that import took over a minute here, and in a worker it
    ran into MetaSchedule's 30 s build timeout so every candidate failed. Those functions
    use only the frames, so while importing the stack is taken without source lookups."""
    import inspect
    import sys

    def frames_only(context=1):
        frame, out = sys._getframe(1), []
        while frame is not None:
            out.append(inspect.FrameInfo(frame, frame.f_code.co_filename, frame.f_lineno,
                                         frame.f_code.co_name, None, None))
            frame = frame.f_back
        return out
    original = inspect.stack
    inspect.stack = frames_only
    try:
        import tvm.s_tir.tensor_intrin  # noqa: F401
    finally:
        inspect.stack = original


def _scheduled(task_mod) -> bool:
    """A task already scheduled by hand (the fused structured conv's sum-pool kernel): the
    mark is on its PrimFunc, not on the task's module."""
    if task_mod.attrs is not None and task_mod.attrs.get("tirx.is_scheduled", False):
        return True
    return any(f.attrs is not None and bool(f.attrs.get("tirx.is_scheduled", False))
               for f in task_mod.functions.values())


def quiet_meta_schedule_logger() -> None:
    """MetaSchedule logs every round at INFO: quiet unless STRUCTEXPORT_MS_LOG asks. It
    re-adds its logger's handlers by name on every run; handlers left from an earlier run
    in this process (or added by a host such as pytest) break that, and they point to an
    earlier run's deleted work folder anyway."""
    ms_logger = logging.getLogger("tvm.s_tir.meta_schedule")
    ms_logger.setLevel(int(os.environ.get("STRUCTEXPORT_MS_LOG", logging.WARNING)))
    for handler in list(ms_logger.handlers):
        ms_logger.removeHandler(handler)


def weight_prepack(target) -> bool:
    """Whether tuning may pre-pack weights for ``target``: MetaSchedule's layout rewrite
    (a kernel reads its constant weight in the tuned tile order) is a CPU postprocessor."""
    return target.kind.name == "llvm"


def tunable_tasks(mod, target, prepack: bool = False):
    """``(legalized module, its MetaSchedule tasks)``: legalized and fused as TVM's
    static_shape_tuning pipeline does, hand-scheduled kernels left out. ``prepack``
    marks each kernel's constant inputs layout-free (``AttachAttrLayoutFreeBuffers``), so
    that tuned schedules may read the weights in a packed layout; the workloads differ
    from unmarked ones, so the two never share database records."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms
    passes = [relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
              relax.pipeline.zero_pipeline()]
    if prepack:
        passes.append(relax.transform.AttachAttrLayoutFreeBuffers())
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
    return mod, [t for t in ms.relax_integration.extract_tasks(mod, target) if not _scheduled(t.mod)]


def compile_with_database(mod, target, db, prepack: bool):
    """``tvm.compile`` of ``mod`` (from :func:`tunable_tasks`) with ``db``'s schedules. With
    ``prepack``, each kernel whose schedule reads a weight in a packed layout is split into
    the packing and the compute (``SplitLayoutRewritePreproc``), and the packing of
    constant weights is done now (``FoldConstant``): the library holds packed weights and
    packs nothing per call."""
    import tvm
    from tvm import relax
    with target, db:
        mod = relax.transform.MetaScheduleApplyDatabase()(mod)
    if prepack:
        mod = tvm.transform.Sequential([relax.transform.SplitLayoutRewritePreproc(),
                                        relax.transform.FoldConstant()])(mod)
    return tvm.compile(mod, target=target)


def _task_key(task) -> str:
    import tvm_ffi
    return f"{tvm_ffi.structural_hash(task.dispatched[0]) & (2**64 - 1):016x}"


def _load_index(folder: Path) -> dict:
    """Tasks already given a tuning budget here: {structural hash: {name, trials}}, the
    trials being the task's share of the budget. A task that got no record within its
    budget (MetaSchedule spent it elsewhere) is not retried for an equal or smaller one."""
    try:
        return json.loads((folder / "tasks.json").read_text())
    except (OSError, ValueError):
        return {}


def _save_index(folder: Path, index: dict) -> None:
    write_text_atomic(folder / "tasks.json", json.dumps(index, indent=1, sort_keys=True) + "\n")


def _search_strategy(trials: int, tasks: int):
    """Evolutionary search sized to the budget: TVM's default population (512, 4 genetic
    rounds) costs tens of seconds per task and round before a single measurement, which
    swamps small budgets on a 2-core machine."""
    from tvm.s_tir import meta_schedule as ms
    per_task = max(1, trials // max(tasks, 1))
    return ms.search_strategy.EvolutionarySearch(
        population_size=min(512, max(32, 4 * per_task)), init_measured_ratio=0.2,
        init_min_unmeasured=min(50, max(8, per_task)), genetic_num_iters=2 if per_task < 64 else 4)


def export_aarch64(mod) -> str:
    """MetaSchedule builder export: a candidate cross-compiled for aarch64 (runs in a worker)."""
    from tvm.support import cc

    from structexport.emulated_arm import CROSS_COMPILER as CROSS_CXX
    path = os.path.join(tempfile.mkdtemp(prefix="structexport-ms-"), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler(CROSS_CXX))
    return path


DIRECT = "__structexport_direct__"


def create_rpc_session(rpc_config):
    """MetaSchedule runner session: a direct ``--rpc`` server, or the tracker's (in a worker)."""
    from tvm import rpc
    if rpc_config.tracker_key == DIRECT:
        return rpc.connect(rpc_config.tracker_host, rpc_config.tracker_port,
                           session_timeout=rpc_config.session_timeout_sec)
    return rpc_config.connect_server()


def alloc_arguments_from_host(session, device, args_info, alloc_repeat):
    """MetaSchedule runner arguments filled with random data on the host and copied over:
    a device with TVM's runtime-only library (the emulated one, many boards) has no
    ``tvm.contrib.random`` to fill them itself (runs in a worker)."""
    import numpy as np
    from tvm.s_tir.meta_schedule.runner.utils import alloc_argument_common
    rng = np.random.default_rng(0)

    def fill(tensor):
        data = rng.uniform(-1, 1, size=tuple(tensor.shape)).astype(str(tensor.dtype))
        tensor.copyfrom(data)
    return alloc_argument_common(fill, device, args_info, alloc_repeat)


def _best_ms(db, task) -> float | None:
    """The best measured latency of ``task`` in ``db`` (ms), None when it has no record."""
    mod = task.dispatched[0]
    try:
        if not db.has_workload(mod):
            return None
        records = db.get_top_k(db.commit_workload(mod), 1)
    except Exception:
        return None
    secs = [float(x) for r in records for x in (r.run_secs or [])]
    return round(1000 * min(secs), 4) if secs else None


def _progress_callback(total: int, say: Callable[[str], None], count: dict):
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    @derived_object
    class Progress(PyMeasureCallback):
        def __init__(self):
            self.start = time.perf_counter()

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            count["trials"] += len(measure_candidates)
            count.setdefault("by_task", {})
            count["by_task"][task_id] = count["by_task"].get(task_id, 0) + len(measure_candidates)
            for built, ran in zip(builder_results, runner_results):
                error = built.error_msg or (ran.error_msg if ran is not None else None)
                if error:
                    count["failed"] += 1
                    count.setdefault("first_error", str(error).strip().splitlines()[-1][:200])
            done = count["trials"]
            left = (time.perf_counter() - self.start) / done * max(total - done, 0) if done else 0
            say(f"tuning: {min(done, total)}/{total} trials, about {left:.0f} s left")
    return Progress()


def tune_and_compile(mod, target, target_dict: dict, budget: TuningBudget | int, db_root: str | Path | None,
                     device=None, cross_compile: bool = False,
                     progress: Callable[[str], None] | None = None, seed: int | None = None):
    """Tune ``mod``'s tasks missing from the database within ``budget`` (an int: trials in
    all), then compile with the database applied. Returns ``(executable, TuningResult)``.
    ``seed``: MetaSchedule's (None: :func:`tuning_seed`'s, else 0)."""
    seed = _SEED.get() if seed is None else int(seed)
    if isinstance(budget, int):
        budget = TuningBudget(total=budget)
    from tvm.s_tir import meta_schedule as ms
    say = progress or (lambda _m: None)
    quiet_meta_schedule_logger()
    start = time.perf_counter()
    folder = database_dir(db_root, target_dict)
    db = _database(folder)
    say("tuning: extracting tasks")
    preload_tvm_tensor_intrinsics()
    prepack = weight_prepack(target)
    mod, tasks = tunable_tasks(mod, target, prepack)
    index = _load_index(folder)
    share = budget.share(len(tasks))
    todo = [t for t in tasks if index.get(_task_key(t), {}).get("trials", -1) < share]
    trials = budget.global_trials(len(todo))
    measured_on = "this host"
    trials_run = failed = 0
    count = {"trials": 0, "failed": 0, "by_task": {}}
    if todo and trials > 0:
        if device is not None and getattr(device, "remote", False):
            runner = ms.runner.RPCRunner(
                rpc_config=ms.runner.RPCConfig(device.host, device.port, device.key or DIRECT,
                                               session_timeout_sec=int(device.session_timeout_s)),
                evaluator_config=ms.runner.EvaluatorConfig(number=1, repeat=1, min_repeat_ms=0),
                f_create_session=create_rpc_session, f_alloc_argument=alloc_arguments_from_host)
            measured_on = device.describe()
        else:
            runner = ms.runner.LocalRunner(
                evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20),
                initializer=preload_tvm_tensor_intrinsics)
        builder = ms.builder.LocalBuilder(f_export=export_aarch64 if cross_compile else None,
                                          initializer=preload_tvm_tensor_intrinsics, timeout_sec=120)
        with tempfile.TemporaryDirectory(prefix="structexport-tune-") as work:
            say(f"tuning: {len(todo)} of {len(tasks)} tasks not in the database, {trials} trials"
                + (f" ({budget.per_task} per task)" if budget.per_task else ""))
            contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                todo, work, strategy=_search_strategy(trials, len(todo)), seed=seed)
            callbacks = (ms.measure_callback.MeasureCallback.create("default")
                         + [_progress_callback(trials, say, count)])
            # Two rounds for a per-task budget of 64: the second batch is picked by the
            # cost model trained on the first, not drawn from the initial population
            # (measured on a 64@56 layer: 0.76 ms against 0.81 for one batch of 64).
            per_iter = (min(32, budget.per_task) if budget.per_task
                        else min(64, max(8, trials // max(len(todo), 1))))
            try:
                ms.tune_tasks(tasks=contexts, task_weights=weights, work_dir=work,
                              max_trials_global=trials, max_trials_per_task=budget.per_task or None,
                              num_trials_per_iter=per_iter,
                              builder=builder, runner=runner, database=db,
                              measure_callbacks=callbacks)
            except Exception as exc:
                raise TuningError(f"MetaSchedule tuning failed: {str(exc).strip().splitlines()[-1][:200]}",
                                  "run without --tune-trials to build untuned") from None
            finally:
                # The runner's worker processes outlive this call otherwise (seen as orphans
                # after a test run); the builder makes a pool per batch and closes it itself.
                pool = getattr(runner, "pool", None)
                if pool is not None:
                    pool.shutdown(wait=False)
        trials_run = count["trials"]
        if trials_run and count["failed"] == trials_run:
            raise TuningError(f"all {trials_run} MetaSchedule candidates failed to build or run: "
                              f"{count.get('first_error', 'no message')}",
                              "run without --tune-trials to build untuned")
        failed = count["failed"]
        index.update({_task_key(t): {"name": t.task_name, "trials": share} for t in todo})
        _save_index(folder, index)
    tuned_now = {id(t): count["by_task"].get(i, 0) for i, t in enumerate(todo)}
    per_task = [{"task": t.task_name, "trials": tuned_now.get(id(t), 0), "best_ms": _best_ms(db, t),
                 "from_database": id(t) not in tuned_now} for t in tasks]
    say("compiling with the tuning database")
    executable = compile_with_database(mod, target, db, prepack)
    return executable, TuningResult(budget.total or trials, trials_run, len(tasks), len(tasks) - len(todo),
                                    str(folder), round(time.perf_counter() - start, 1), measured_on,
                                    failed, budget.per_task or None, per_task, prepack, seed)
