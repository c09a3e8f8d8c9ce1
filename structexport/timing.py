"""One interleaved timer for every workload the project times.

A workload is anything that implements :class:`Timer` -- ``time_once()`` runs it once and
returns the seconds that took, however the runtime measures it: an ONNX Runtime session
(:class:`OrtTimer`), a TVM library timed on its device, the regress reference workload.
:func:`time_interleaved` runs every workload once per repeat, the order alternating, so
the drifts of a shared, noisy machine hit all of them alike.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Timer(Protocol):
    def time_once(self) -> float:
        """Run the workload once; seconds it took."""


class OrtTimer:
    """An ONNX Runtime session fed one fixed input, timed by the wall clock."""

    def __init__(self, session, feed: np.ndarray | dict):
        self.session = session
        self.feed = feed if isinstance(feed, dict) else {session.get_inputs()[0].name: feed}

    def time_once(self) -> float:
        start = time.perf_counter()
        self.session.run(None, self.feed)
        return time.perf_counter() - start


class FunctionTimer:
    """A function that returns the seconds of one run (e.g. TVM's time evaluator)."""

    def __init__(self, fn: Callable[[], float]):
        self.fn = fn

    def time_once(self) -> float:
        return self.fn()


def as_timer(workload, feed: np.ndarray | None = None) -> Timer:
    """A :class:`Timer` for ``workload``: a Timer as it is, an ONNX Runtime session fed
    ``feed``, or a function returning seconds per run."""
    if isinstance(workload, Timer):
        return workload
    if callable(getattr(workload, "run", None)) and callable(getattr(workload, "get_inputs", None)):
        if feed is None:
            raise ValueError("an ONNX Runtime session needs an input to be timed")
        return OrtTimer(workload, feed)
    if callable(workload):
        return FunctionTimer(workload)
    raise TypeError(f"cannot time {type(workload).__name__}: not a Timer, session or function")


def stats(times_s: list[float]) -> dict:
    """Milliseconds: median, 10th/90th percentiles, fastest, mean, number of runs."""
    ms = sorted(t * 1e3 for t in times_s)
    q = lambda p: ms[min(len(ms) - 1, int(p * (len(ms) - 1) + 0.5))]  # noqa: E731
    return {"median": statistics.median(ms), "p10": q(0.10), "p90": q(0.90), "min": ms[0],
            "mean": statistics.fmean(ms), "runs": len(ms)}


def time_interleaved(workloads: dict[str, object], feed: np.ndarray | None, repeat: int,
                     warmup: int, keep_runs: bool = False) -> dict[str, dict]:
    """Each repeat runs every workload once, the order alternating (A B C, then C B A).
    Returns :func:`stats` per workload; ``keep_runs`` adds the raw seconds under ``"times"``."""
    names = list(workloads)
    timers = {n: as_timer(w, feed) for n, w in workloads.items()}
    for _ in range(warmup):
        for n in names:
            timers[n].time_once()
    times = {n: [] for n in names}
    for i in range(repeat):
        for n in (names if i % 2 == 0 else names[::-1]):
            times[n].append(timers[n].time_once())
    out = {n: stats(t) for n, t in times.items()}
    if keep_runs:
        for n in names:
            out[n]["times"] = times[n]
    return out
