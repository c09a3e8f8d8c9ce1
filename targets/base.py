"""One interface for every target: what the target needs from the passes, what it writes
beside the verified ``model.onnx``, the device it verifies on, and how it checks its own
artifact."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from structexport.errors import StructExportError


class TargetOptionError(StructExportError):
    exit_code, kind = 2, "usage"


# Options only the TVM targets understand (the CLI flag that sets each).
TVM_ONLY_OPTIONS = {"tvm_target": "--tvm-target", "tvm_preset": "--tvm-preset",
                    "device": "--rpc/--tracker", "tune_trials": "--tune-trials",
                    "tune_per_task": "--tune", "tvm_structured": "--tvm-structured",
                    "tuning_db": "--tuning-db"}


@dataclass
class Deployment:
    """A shipped file and the runtime configuration it is deployed -- and timed -- in:
    ``convert`` runs it so before anything is written, and the manifest records
    ``options`` with the differences found."""
    file: str
    options: dict
    open: Callable[[Path], Callable]   # the file's path -> run(x) -> list of outputs
    # What it is checked against when not the source's outputs at the run's tolerances (an
    # INT8 program: its fake-quantized graph's outputs, a few output steps)
    expected: dict | None = None
    atol: float | None = None
    rtol: float | None = None
    precision: str | None = None


class Target:
    name = ""
    description = ""
    # Whether the target's runtime folds batch norm into convs itself.
    folds_batchnorm = False
    build_info: dict = {}

    def configure(self, options: dict) -> "Target":
        """A copy of this target set up with per-run options (TVM targets take some)."""
        given = [flag for key, flag in TVM_ONLY_OPTIONS.items() if options.get(key)]
        if given:
            raise TargetOptionError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} only for the "
                                    f"TVM targets, not {self.name}",
                                    "use --target tvm-llvm, tvm-arm or tvm-cuda")
        return self

    def preflight(self) -> None:
        """Cheap checks before any work (toolchain present, device reachable)."""

    def default_passes(self) -> list[str]:
        from structexport.passes import PIPELINE
        return [p for p in PIPELINE if not (p == "fold_batchnorm" and self.folds_batchnorm)]

    @contextlib.contextmanager
    def device_scope(self, progress=None):
        """The device the artifact is verified on for this run (None: this host)."""
        yield None

    def write_artifacts(self, onnx_path: Path, outdir: Path) -> dict[str, str]:
        """Write target-specific files into ``outdir``; returns {file name: what it is}."""
        return {}

    def deployments(self) -> list[Deployment]:
        """The files this target ships beyond the portable check of ``model.onnx`` (ONNX
        Runtime, optimizations off), each in the configuration it runs in."""
        return []

    def verify(self, outdir: Path, reference, inputs, precision, atol, rtol):
        """Run the target's own artifact against the source model (a ``Verification``); a
        string says why it could not run here (no such device); None when the ONNX
        verification already covers what the target runs."""
        return None


class ProgramTarget(Target):
    """A target whose runtime loads a program lowered from the rewritten torch module (an
    ExecuTorch ``.pte``, a LiteRT ``.tflite``). ``convert`` hands it, in ``options``, the
    rewritten module (``torch_module``), its dense counterpart (``dense_module``), the
    ``example`` input, the ``source`` module, the verification ``inputs`` and, for INT8,
    ``int8`` = (calibration sets, Int8Options); it sets ``self.int8`` (an ``Int8Result`` with
    ``dense_expected``) when it quantized. ``bench``, ``evaluate`` and ``regress`` run its
    files through :meth:`runner` and :meth:`timer`; the manifest's ``target_build.programs``
    names them."""
    wants_torch_modules = True
    # The sum-pool form the runtime's delegate runs fastest (None: the cost model chooses)
    sumpool_realization: str | None = None
    # File names: the structured program, its dense counterpart (float32), the dense INT8 baseline
    programs = {"structured": "", "dense": "", "dense_int8": ""}

    def __init__(self, options: dict | None = None):
        self.options = dict(options or {})
        self.build_info = {}
        self.int8 = None

    def configure(self, options: dict) -> "ProgramTarget":
        super().configure(options)
        return type(self)({k: v for k, v in options.items() if k == "progress"})

    def runtime(self, threads: int = 1) -> str:
        """The runtime and its settings, as reports name them."""
        raise NotImplementedError

    def runner(self, path: Path, threads: int = 1) -> Callable:
        """``run(x) -> list of outputs`` of the program at ``path``."""
        raise NotImplementedError

    def timer(self, path: Path, feed, threads: int = 1) -> Callable[[], float]:
        """Seconds per run of the program at ``path`` on ``feed`` (for ``time_interleaved``)."""
        raise NotImplementedError
