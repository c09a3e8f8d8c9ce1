"""The ``litert`` target: a LiteRT (TFLite) model (``model.tflite``) with the XNNPACK delegate.

It converts the rewritten torch module (the same structure plan as ``model.onnx``: sum-pools
as banded 1x1 convs and depthwise convs of ones, the form XNNPACK delegates and the fastest
measured there too) with litert-torch, and its dense counterpart the same way
(``reference.tflite``, what ``bench`` times it against). What XNNPACK does not take runs on
LiteRT's builtin kernels: the build records every such op, the layers it belongs to and the
share of multiply-accumulates delegated. The INT8 form is PT2E with litert-torch's quantizer,
with the decisions of the executorch target (docs/litert.md).
"""
from __future__ import annotations

from pathlib import Path

from structexport.executorch_lower import structured_layer_names
from structexport.litert_lower import LiteRTExportError, convert_to_tflite

from .base import Deployment, ProgramTarget

PROGRAM = "model.tflite"
DENSE_PROGRAM = "reference.tflite"
DENSE_INT8_PROGRAM = "reference.int8.tflite"


class LiteRTTarget(ProgramTarget):
    name = "litert"
    description = ("LiteRT (TFLite) model (model.tflite) with the XNNPACK delegate, for phones and boards; "
                   "reference.tflite is its dense counterpart")
    folds_batchnorm = False
    # The sum-pool form XNNPACK delegates and runs fastest on LiteRT too (2.78x over the dense
    # 3x3 conv for one C/2x2x2 layer): a banded 1x1 conv over channels, a depthwise conv of ones.
    sumpool_realization = "banded"
    programs = {"structured": PROGRAM, "dense": DENSE_PROGRAM, "dense_int8": DENSE_INT8_PROGRAM}

    def runtime(self, threads: int = 1) -> str:
        from structexport.litert_runtime import require_litert
        return f"LiteRT {require_litert()}, XNNPACK, {threads} thread{'s' * (threads > 1)}"

    def runner(self, path: Path, threads: int = 1):
        from structexport.litert_runtime import runner
        return runner(path, threads)

    def timer(self, path: Path, feed, threads: int = 1):
        from structexport.litert_runtime import timer
        return timer(path, feed, threads)

    def preflight(self) -> None:
        from structexport.litert_runtime import require_litert
        require_litert()

    def write_artifacts(self, onnx_path: Path, outdir: Path) -> dict[str, str]:
        from structexport.litert_runtime import require_litert, require_litert_converter
        say = self.options.get("progress") or (lambda _m: None)
        module, dense, example = (self.options.get(k) for k in ("torch_module", "dense_module", "example"))
        if module is None or dense is None:
            raise LiteRTExportError("the litert target converts torch modules, and none was given",
                                    "convert a PyTorch model (zoo checkpoint) for --target litert")
        self.int8 = None
        self.build_info = {"runtime": "litert", "litert": require_litert(), "litert_torch": require_litert_converter(),
                           "delegate": "XNNPACK", "programs": dict(self.programs)}
        say("convert the dense counterpart to LiteRT (litert-torch)")
        dense_report = convert_to_tflite(dense, example, outdir / DENSE_PROGRAM)
        self.build_info["dense_delegation"] = _brief(dense_report)
        written = {DENSE_PROGRAM: "the dense counterpart as a LiteRT model, XNNPACK delegate: "
                                  "bench's baseline on this runtime"}
        if self.options.get("int8") is not None:
            written.update(self._write_int8(module, dense, example, outdir, say))
            return written
        self.build_info["programs"].pop("dense_int8")
        say("convert to LiteRT (litert-torch)")
        self.build_info["delegation"] = convert_to_tflite(module, example, outdir / PROGRAM,
                                                          structured_layer_names(module))
        written[PROGRAM] = "LiteRT model, XNNPACK delegate (structured layers as delegated convs)"
        return written

    def _write_int8(self, module, dense, example, outdir: Path, say) -> dict[str, str]:
        """PT2E with litert-torch's quantizer: the per-layer choice, the rebase, calibration,
        the integer model against its fake-quantized graph (by deployments()), the gate, and
        the dense model quantized the same way."""
        import tempfile

        from structexport.executorch_int8 import int8_module
        from structexport.litert_int8 import choose_dense_layers, gate, quantized_program
        from structexport.quantize import OUTPUT_STEPS, Int8GateError, Int8Result
        sets, opts = self.options["int8"]
        inputs, source = self.options["inputs"], self.options["source"]
        with tempfile.TemporaryDirectory(prefix="structexport-litert-layers-") as tmp:
            dense_layers, choice = choose_dense_layers(module, example, opts.layer_choice, Path(tmp), say,
                                                       Path(opts.layer_cache) if opts.layer_cache else None)
        quantizable, rebased = int8_module(module, dense_layers)
        if choice["layers"]:
            kept = sum(r["choice"] == "structured" for r in choice["layers"])
            say(f"int8: {kept} of {len(choice['layers'])} decomposed layers stay structured ({opts.layer_choice})")
        say(f"int8: calibrate ({len(sets.calibration)} images) and quantize with litert-torch's quantizer (PT2E)")
        program, report = quantized_program(quantizable, example, sets.calibration, inputs, outdir / PROGRAM,
                                            structured_layer_names(quantizable))
        self.build_info["delegation"] = report
        say("int8: quantize the dense counterpart the same way")
        dense_program, dense_int8_report = quantized_program(dense, example, sets.calibration, inputs,
                                                             outdir / DENSE_INT8_PROGRAM)
        self.build_info["dense_int8_delegation"] = _brief(dense_int8_report)
        say(f"int8: accuracy gate on {len(sets.gate)} held-out images")
        result = gate(source, outdir / PROGRAM, sets, opts, f"{PROGRAM} under LiteRT, XNNPACK")
        dense_gate = gate(source, outdir / DENSE_INT8_PROGRAM, sets, opts, f"{DENSE_INT8_PROGRAM} under LiteRT")
        if result["failures"] and not self.options.get("force"):
            raise Int8GateError(f"the INT8 model fails the accuracy gate on {result['images']} held-out images: "
                                + "; ".join(result["failures"]),
                                "nothing was written. Calibrate on more images, keep every layer structured or "
                                "dense (--int8-layers), lower --int8-min-agreement, or pass --force")
        self._int8_checks = {PROGRAM: program, DENSE_INT8_PROGRAM: dense_program}
        record = {"calibration": sets.description,
                  "quantization": {"tool": "PT2E (torchao) with litert-torch's PT2EQuantizer",
                                   "weights": "int8, symmetric, per output channel",
                                   "activations": "int8, per tensor, calibrated (min/max observers)",
                                   "io": "int8 input and output; the runner quantizes the input and "
                                         "dequantizes the output with the model's scales"},
                  "layer_choice": choice, "rebased": rebased, "composed_dense": sorted(dense_layers),
                  "tolerance": {"atol": program.atol, "rtol": 0.0, "output_steps": OUTPUT_STEPS,
                                "note": f"{PROGRAM} under LiteRT against its fake-quantized graph in torch"},
                  "gate": result, "options": opts.to_dict(),
                  "dense_int8": {"file": DENSE_INT8_PROGRAM, "gate": dense_gate,
                                 "tolerance": {"atol": dense_program.atol, "rtol": 0.0}}}
        self.int8 = Int8Result(program.expected, program.atol, record)
        self.int8.dense_expected = dense_program.expected    # bench checks reference.int8.tflite with it
        return {PROGRAM: "INT8 LiteRT model, XNNPACK delegate (PT2E, litert-torch's quantizer), checked "
                         "against its fake-quantized graph and gated on held-out images",
                DENSE_INT8_PROGRAM: "the dense counterpart quantized the same way, same calibration: the INT8 "
                                    "baseline on this runtime"}

    def deployments(self) -> list[Deployment]:
        from structexport.litert_runtime import require_litert, runner
        options = {"runtime": f"LiteRT {require_litert()}, XNNPACK", "threads": 1,
                   "graph_optimization_level": "XNNPACK delegate"}
        dense = Deployment(DENSE_PROGRAM, dict(options, note="the dense counterpart, bench's baseline"),
                           lambda path: runner(path, 1), precision="fp32")
        if self.int8 is None:
            return [Deployment(PROGRAM, options, lambda path: runner(path, 1)), dense]
        checks = self._int8_checks
        return [Deployment(name, dict(options, note="integer kernels against the fake-quantized graph"),
                           lambda path: runner(path, 1), expected=checks[name].expected, atol=checks[name].atol,
                           rtol=0.0, precision="int8")
                for name in (PROGRAM, DENSE_INT8_PROGRAM)] + [dense]


def _brief(report: dict) -> dict:
    return {k: report[k] for k in ("delegated_ops", "portable_ops", "macs_delegated_share", "portable")}
