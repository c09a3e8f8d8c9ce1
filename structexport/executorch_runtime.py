"""ExecuTorch on this host: load a ``.pte`` program, run it, time it.

ExecuTorch is an optional extra (``pip install 'structexport[executorch]'``); every entry
point checks for it first and names the install command when it is missing.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from pathlib import Path

import numpy as np

from structexport.errors import StructExportError

INSTALL_HINT = "install it with: pip install 'structexport[executorch]' (executorch 1.5)"


class ExecuTorchMissingError(StructExportError):
    exit_code, kind = 2, "usage"


class ExecuTorchRunError(StructExportError):
    exit_code, kind = 40, "executorch-failed"


def require_executorch() -> str:
    """ExecuTorch's version; a clear error (exit 2) when it is not installed."""
    try:
        from importlib.metadata import version
        with quiet_executorch():
            import executorch.runtime  # noqa: F401  (the runtime, not only the exporter)
        return version("executorch")
    except ImportError as exc:
        raise ExecuTorchMissingError(f"the executorch target needs ExecuTorch, which is not installed "
                                     f"({(str(exc).splitlines() or [''])[0][:120]})", INSTALL_HINT) from None


@contextlib.contextmanager
def quiet_executorch():
    """ExecuTorch and torchao log and warn on import and lowering (optional CUDA kernels not
    found, deprecations); keep the user's terminal ours."""
    from structexport.export import quiet
    loggers = [logging.getLogger(n) for n in ("torchao", "executorch", "torch._export", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with quiet():
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _native_stderr_muted():
    """The runtime's C++ logging writes to file descriptor 2 directly."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@functools.lru_cache(maxsize=None)
def _set_threads(threads: int) -> None:
    # XNNPACK's thread pool is process-wide: set once per thread count, before running.
    with quiet_executorch():
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    with _native_stderr_muted():
        _unsafe_reset_threadpool(threads)


def set_threads(threads: int) -> None:
    _set_threads.cache_clear()
    _set_threads(int(threads))


def load_method(path: Path, threads: int = 1, etdump: bool = False):
    """The ``forward`` method of the program at ``path`` (and the program, for ETDump)."""
    require_executorch()
    from executorch.runtime import Runtime
    set_threads(threads)
    try:
        if etdump:  # a non-zero debug buffer aborted after a few runs in executorch 1.5
            program = Runtime.get().load_program(Path(path), enable_etdump=True, debug_buffer_size=0)
        else:
            program = Runtime.get().load_program(Path(path))
        return program.load_method("forward"), program
    except Exception as exc:
        raise ExecuTorchRunError(f"ExecuTorch cannot load {path}: {(str(exc).splitlines() or [''])[0][:200]}",
                                 "convert the model again with --target executorch") from None


def _tensors(x) -> list:
    import torch
    if isinstance(x, dict):
        return [torch.from_numpy(np.ascontiguousarray(v)) for v in x.values()]
    return [torch.from_numpy(np.ascontiguousarray(x))]


def runner(path: Path, threads: int = 1):
    """``run(x) -> list of np.ndarray`` of the program at ``path`` (x: an array or a dict)."""
    method, _program = load_method(path, threads)

    def run(x):
        return [np.asarray(o.detach().numpy() if hasattr(o, "detach") else o)
                for o in method.execute(_tensors(x))]
    return run


def timer(path: Path, feed, threads: int = 1):
    """A timer for :func:`structexport.timing.time_interleaved`: seconds per run of the
    program at ``path`` on ``feed`` (the inputs converted once, outside the timing)."""
    method, _program = load_method(path, threads)
    args = _tensors(feed)

    def run_once() -> float:
        t = time.perf_counter()
        method.execute(args)
        return time.perf_counter() - t
    return run_once
