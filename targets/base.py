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
    names them.

    The artifacts, the INT8 stage and the deployed checks are the same for every runtime;
    a subclass says how its runtime lowers, quantizes, runs and times (the methods below
    that raise ``NotImplementedError``)."""
    wants_torch_modules = True
    folds_batchnorm = False
    # The sum-pool form the runtime's delegate runs fastest (None: the cost model chooses)
    sumpool_realization: str | None = None
    # File names: the structured program, its dense counterpart (float32), the dense INT8 baseline
    programs = {"structured": "", "dense": "", "dense_int8": ""}
    runtime_name = ""           # "ExecuTorch"
    program_noun = "program"    # what the runtime calls its file
    lowering = ""               # how the progress line names lowering: "lower to ExecuTorch (XNNPACK)"
    quantizer_name = ""         # "XNNPACK's quantizer"
    quantization_notes: dict = {}   # more of the manifest's int8.quantization
    export_error: type = StructExportError

    def __init__(self, options: dict | None = None):
        self.options = dict(options or {})
        self.build_info = {}
        self.int8 = None
        self._int8_checks = {}

    def configure(self, options: dict) -> "ProgramTarget":
        super().configure(options)
        return type(self)({k: v for k, v in options.items() if k == "progress"})

    # ------------------------------------------------------------------ the runtime's part
    def runtime_version(self) -> str:
        """The runtime's version (a clear error naming the extra when it is missing)."""
        raise NotImplementedError

    def runtime(self, threads: int = 1) -> str:
        """The runtime and its settings, as reports name them."""
        return f"{self.runtime_name} {self.runtime_version()}, XNNPACK, {threads} thread{'s' * (threads > 1)}"

    def preflight(self) -> None:
        self.runtime_version()

    def runner(self, path: Path, threads: int = 1) -> Callable:
        """``run(x) -> list of outputs`` of the program at ``path``."""
        raise NotImplementedError

    def timer(self, path: Path, feed, threads: int = 1) -> Callable[[], float]:
        """Seconds per run of the program at ``path`` on ``feed`` (for ``time_interleaved``)."""
        raise NotImplementedError

    def versions(self) -> dict:
        """The runtime's versions, for ``target_build``."""
        raise NotImplementedError

    def lower(self, module, example, path: Path, structured_layers: list[str] | None = None) -> dict:
        """``module`` lowered (float32) to ``path``; its delegation report."""
        raise NotImplementedError

    def quantized_program(self, module, example, calibration, inputs: dict, path: Path,
                          structured_layers: list[str] | None = None):
        """``module`` quantized with the runtime's quantizer and lowered to ``path``:
        (``structexport.executorch_int8.ProgramInt8``, delegation report)."""
        raise NotImplementedError

    def time_layer_int8(self, layer, in_shape, workdir: Path, threads: int = 1) -> dict[str, float]:
        """One decomposed layer alone, structured and dense, quantized and timed: medians in ms."""
        raise NotImplementedError

    def int8_layer_cache(self) -> Path:
        raise NotImplementedError

    def int8_machine_label(self) -> str:
        """What the per-layer INT8 timings are keyed by besides the CPU (runtime, version)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the shared part
    def write_artifacts(self, onnx_path: Path, outdir: Path) -> dict[str, str]:
        from structexport.executorch_lower import structured_layer_names
        say = self.options.get("progress") or (lambda _m: None)
        module, dense, example = (self.options.get(k) for k in ("torch_module", "dense_module", "example"))
        if module is None or dense is None:
            raise self.export_error(f"the {self.name} target lowers torch modules, and none was given",
                                    f"convert a PyTorch model (zoo checkpoint) for --target {self.name}")
        structured, dense_file, _ = self.programs.values()
        self.int8 = None
        self.build_info = {**self.versions(), "delegate": "XNNPACK", "programs": dict(self.programs)}
        say(f"{self.lowering}: the dense counterpart")
        self.build_info["dense_delegation"] = brief(self.lower(dense, example, outdir / dense_file))
        written = {dense_file: f"the dense counterpart as a {self.runtime_name} {self.program_noun}, XNNPACK "
                               "delegate: bench's baseline on this runtime"}
        if self.options.get("int8") is not None:
            written.update(self._write_int8(module, dense, example, outdir, say))
            return written
        self.build_info["programs"].pop("dense_int8")
        say(self.lowering)
        self.build_info["delegation"] = self.lower(module, example, outdir / structured,
                                                   structured_layer_names(module))
        written[structured] = (f"{self.runtime_name} {self.program_noun}, XNNPACK delegate (structured layers "
                               "as delegated convs)")
        return written

    def _write_int8(self, module, dense, example, outdir: Path, say) -> dict[str, str]:
        """The runtime's PT2E quantizer: the per-layer choice, the rebase, calibration, the
        integer program against its fake-quantized graph (by deployments()), the gate, and
        the dense model quantized the same way."""
        import tempfile

        from structexport.executorch_int8 import choose_dense_layers, gate, int8_module
        from structexport.executorch_lower import structured_layer_names
        from structexport.quantize import OUTPUT_STEPS, Int8GateError, Int8Result
        sets, opts = self.options["int8"]
        inputs, source = self.options["inputs"], self.options["source"]
        structured, _, dense_int8 = self.programs.values()
        with tempfile.TemporaryDirectory(prefix=f"structexport-{self.name}-layers-") as tmp:
            dense_layers, choice = choose_dense_layers(
                module, example, opts.layer_choice, say,
                time_layer=lambda layer, shape: self.time_layer_int8(layer, shape, Path(tmp)),
                machine_label=self.int8_machine_label(),
                cache_path=Path(opts.layer_cache) if opts.layer_cache else self.int8_layer_cache(),
                runtime=self.runtime_name)
        quantizable, rebased = int8_module(module, dense_layers)
        if choice["layers"]:
            kept = sum(r["choice"] == "structured" for r in choice["layers"])
            say(f"int8: {kept} of {len(choice['layers'])} decomposed layers stay structured ({opts.layer_choice})")
        say(f"int8: calibrate ({len(sets.calibration)} images) and quantize with {self.quantizer_name} (PT2E)")
        program, report = self.quantized_program(quantizable, example, sets.calibration, inputs,
                                                 outdir / structured, structured_layer_names(quantizable))
        self.build_info["delegation"] = report
        say("int8: quantize the dense counterpart the same way")
        dense_program, dense_report = self.quantized_program(dense, example, sets.calibration, inputs,
                                                             outdir / dense_int8)
        self.build_info["dense_int8_delegation"] = brief(dense_report)
        say(f"int8: accuracy gate on {len(sets.gate)} held-out images")
        result = gate(self.runner(outdir / structured), source, sets, opts,
                      f"{structured} under {self.runtime_name}, XNNPACK")
        dense_gate = gate(self.runner(outdir / dense_int8), source, sets, opts,
                          f"{dense_int8} under {self.runtime_name}")
        if result["failures"] and not self.options.get("force"):
            raise Int8GateError(f"the INT8 {self.program_noun} fails the accuracy gate on {result['images']} "
                                "held-out images: " + "; ".join(result["failures"]),
                                "nothing was written. Calibrate on more images, keep every layer structured or "
                                "dense (--int8-layers), lower --int8-min-agreement, or pass --force")
        self._int8_checks = {structured: program, dense_int8: dense_program}
        record = {"calibration": sets.description,
                  "quantization": {"tool": f"PT2E (torchao) with {self.quantizer_name}",
                                   "weights": "int8, symmetric, per output channel",
                                   "activations": "int8, per tensor, calibrated (min/max observers)",
                                   **self.quantization_notes},
                  "layer_choice": choice, "rebased": rebased, "composed_dense": sorted(dense_layers),
                  "tolerance": {"atol": program.atol, "rtol": 0.0, "output_steps": OUTPUT_STEPS,
                                "note": f"{structured} under {self.runtime_name} against its fake-quantized "
                                        "graph in torch"},
                  "gate": result, "options": opts.to_dict(),
                  "dense_int8": {"file": dense_int8, "gate": dense_gate,
                                 "tolerance": {"atol": dense_program.atol, "rtol": 0.0}}}
        self.int8 = Int8Result(program.expected, program.atol, record)
        self.int8.dense_expected = dense_program.expected    # bench checks the dense INT8 baseline with it
        return {structured: f"INT8 {self.runtime_name} {self.program_noun}, XNNPACK delegate (PT2E, "
                            f"{self.quantizer_name}), checked against its fake-quantized graph and gated on "
                            "held-out images",
                dense_int8: "the dense counterpart quantized the same way, same calibration: the INT8 "
                            "baseline on this runtime"}

    def deployments(self) -> list[Deployment]:
        structured, dense_file, dense_int8 = self.programs.values()
        options = {"runtime": f"{self.runtime_name} {self.runtime_version()}, XNNPACK", "threads": 1,
                   "graph_optimization_level": "XNNPACK delegate"}
        run = lambda path: self.runner(path, 1)   # noqa: E731
        dense = Deployment(dense_file, dict(options, note="the dense counterpart, bench's baseline"), run,
                           precision="fp32")
        if self.int8 is None:
            return [Deployment(structured, options, run), dense]
        checks = self._int8_checks
        return [Deployment(name, dict(options, note="integer kernels against the fake-quantized graph"), run,
                           expected=checks[name].expected, atol=checks[name].atol, rtol=0.0, precision="int8")
                for name in (structured, dense_int8)] + [dense]


def brief(report: dict) -> dict:
    """A delegation report without the per-layer detail (for the dense counterparts)."""
    return {k: report[k] for k in ("delegated_ops", "portable_ops", "macs_delegated_share", "portable")}
