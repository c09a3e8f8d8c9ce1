"""The one user-facing error type, with one exit code per failure class.

Every error is one line that says what is wrong and, where there is one, what fixes it.
The CLI prints ``error: <message>`` and exits with :attr:`StructExportError.exit_code`.
"""
from __future__ import annotations


class StructExportError(Exception):
    exit_code = 1
    kind = "error"

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class PathNotFoundError(StructExportError):
    exit_code, kind = 10, "missing-path"


class IsADirectoryCheckpointError(StructExportError):
    exit_code, kind = 11, "is-a-directory"


class EmptyFileError(StructExportError):
    exit_code, kind = 12, "empty-file"


class NotACheckpointError(StructExportError):
    exit_code, kind = 13, "not-a-checkpoint"


class CorruptCheckpointError(StructExportError):
    exit_code, kind = 14, "corrupt-checkpoint"


class UnsafeCheckpointError(StructExportError):
    exit_code, kind = 15, "unsafe-checkpoint"


class ArchitectureMismatchError(StructExportError):
    exit_code, kind = 16, "architecture-mismatch"


class ShapeMismatchError(StructExportError):
    exit_code, kind = 17, "shape-mismatch"


class NonFiniteWeightsError(StructExportError):
    exit_code, kind = 18, "non-finite-weights"


class UnknownArchitectureError(StructExportError):
    exit_code, kind = 19, "unknown-architecture"


class GeneratorMismatchError(StructExportError):
    exit_code, kind = 20, "generator-mismatch"


# Model sources other than zoo checkpoints (structexport.frontends).
class InvalidOnnxModelError(StructExportError):
    """Truncated or garbage bytes, a model onnx.checker rejects, or one ONNX Runtime
    cannot load for a reason other than a missing operator."""
    exit_code, kind = 21, "invalid-onnx-model"


class OnnxExternalDataError(StructExportError):
    """An external-data file of an ONNX model is missing, truncated or outside its folder."""
    exit_code, kind = 22, "onnx-external-data"


class OnnxOperatorUnsupportedError(StructExportError):
    """An operator (or operator/type pair) ONNX Runtime has no implementation for."""
    exit_code, kind = 23, "onnx-operator-unsupported"


class InputDimensionError(StructExportError):
    """An input dimension that is unknown and not given by --input-shape, or an
    --input-shape the model's own fixed dimensions (or the model itself) reject."""
    exit_code, kind = 24, "input-dimension"


class ExportArchiveError(StructExportError):
    """A truncated or invalid torch.export (.pt2) archive."""
    exit_code, kind = 25, "invalid-export-archive"


class ModelSpecError(StructExportError):
    """--model FILE.py:FUNC or package.module:FUNC: file or function not found, or the
    import failed."""
    exit_code, kind = 26, "model-spec"


class ModelBuildError(StructExportError):
    """The --model function raised, or returned something that is not an nn.Module."""
    exit_code, kind = 27, "model-build"


class UnsupportedOnnxOpsetError(StructExportError):
    """An ONNX model whose default-domain opset is older than 11."""
    exit_code, kind = 28, "onnx-opset"


# Devices and toolchains (TVM targets, RPC, the emulated aarch64 device).
class DeviceUnreachableError(StructExportError):
    exit_code, kind = 42, "device-unreachable"


class DeviceLostError(StructExportError):
    """The device answered, then died or stopped answering mid-run."""
    exit_code, kind = 43, "device-lost"


class CrossCompilerMissingError(StructExportError):
    exit_code, kind = 44, "cross-compiler-missing"


class EmulatorError(StructExportError):
    """The emulated aarch64 device cannot be installed or started."""
    exit_code, kind = 45, "emulator-failed"


class TuningError(StructExportError):
    exit_code, kind = 46, "tuning-failed"


ALL_ERRORS = [PathNotFoundError, IsADirectoryCheckpointError, EmptyFileError, NotACheckpointError,
              CorruptCheckpointError, UnsafeCheckpointError, ArchitectureMismatchError,
              ShapeMismatchError, NonFiniteWeightsError, UnknownArchitectureError,
              GeneratorMismatchError, InvalidOnnxModelError, OnnxExternalDataError,
              OnnxOperatorUnsupportedError, InputDimensionError, ExportArchiveError,
              ModelSpecError, ModelBuildError, UnsupportedOnnxOpsetError, DeviceUnreachableError,
              DeviceLostError, CrossCompilerMissingError, EmulatorError, TuningError]
