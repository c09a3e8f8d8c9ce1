"""A converted package: the folder ``structexport convert`` writes, as one typed object.

A package is self-contained: it holds everything needed to verify, bench, profile or
regress it on any machine, without the checkpoint it came from:

- ``model.onnx``: the rewritten, verified model, and the target's artifacts beside it
  (``model.so`` for TVM, ``model.ort`` ...);
- ``reference.onnx``: the source model as exported -- every structured layer as its
  dense-equivalent kernel, the same non-structural passes applied -- which is what the
  artifact was verified against and the dense counterpart ``bench`` times it against;
- ``verification.npz``: the verification inputs and the source model's outputs on them;
- ``manifest.json``: what was done, with the source model's layer table.

:meth:`Package.load` validates the manifest once; commands read the typed fields instead
of ``manifest.json`` key by key. A missing, corrupt or incompatible package is one
:class:`~structexport.errors.StructExportError` with its exit code.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from structexport.errors import IsADirectoryCheckpointError, PathNotFoundError, StructExportError
from structexport.structure_plan import StructurePlan

MANIFEST = "manifest.json"
MODEL = "model.onnx"
REFERENCE = "reference.onnx"
VERIFICATION_DATA = "verification.npz"
COMPOSED = "composed.onnx"   # tvm-* with fused structured convs: the graph model.so is built from
# 1: the first manifests (source named by absolute path only); 2: self-contained packages.
MANIFEST_VERSION = 2
READABLE_VERSIONS = (1, 2)
# Keys every manifest has had since version 1 (kept for compatibility; tools read them).
REQUIRED_KEYS = ("source", "target", "precision", "input_shape", "passes", "before", "after",
                 "verification", "artifacts")


class PackageCorruptError(StructExportError):
    exit_code, kind = 38, "corrupt-package"


class PackageIncompatibleError(StructExportError):
    exit_code, kind = 39, "incompatible-package"


def is_package(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / MANIFEST).is_file()


def _corrupt(root: Path, what: str) -> PackageCorruptError:
    return PackageCorruptError(f"{root} is not a usable structexport package: {what}",
                               "convert the model again with `structexport convert`")


@dataclass
class Package:
    root: Path
    manifest: dict
    # verification.npz as read once: feed() and every check_timed() of a command share it
    # (inputs, the source's outputs, an INT8 package's fake-quantized outputs)
    _arrays: tuple | None = field(default=None, init=False, repr=False, compare=False)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, path: str | Path, check_hashes: bool = True) -> "Package":
        root = Path(path)
        if not root.exists():
            raise PathNotFoundError(f"{root} does not exist", "check the path")
        if not root.is_dir():
            raise PackageCorruptError(f"{root} is a file, not a package folder",
                                      "pass the folder `structexport convert -o` wrote")
        if not (root / MANIFEST).is_file():
            raise IsADirectoryCheckpointError(f"{root} is a folder without a {MANIFEST}",
                                              "pass a folder written by `structexport convert`, "
                                              "or a checkpoint file")
        try:
            manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise _corrupt(root, f"{MANIFEST} is not valid JSON ({type(exc).__name__})") from None
        if not isinstance(manifest, dict) or "structexport_manifest" not in manifest:
            raise _corrupt(root, f"{MANIFEST} is not a structexport manifest")
        version = manifest["structexport_manifest"]
        if version not in READABLE_VERSIONS:
            raise PackageIncompatibleError(
                f"{root} has manifest version {version!r}; this structexport reads "
                f"{', '.join(map(str, READABLE_VERSIONS))}",
                "convert the model again with this structexport, or use the one that wrote it")
        missing = [k for k in REQUIRED_KEYS if k not in manifest]
        if missing:
            raise _corrupt(root, f"{MANIFEST} lacks {', '.join(missing)}")
        if not isinstance(manifest["artifacts"], dict) or not isinstance(manifest["input_shape"], list):
            raise _corrupt(root, f"{MANIFEST} has malformed 'artifacts' or 'input_shape'")
        package = cls(root, manifest)
        package._check_files(check_hashes)
        return package

    def _check_files(self, check_hashes: bool) -> None:
        from structexport.loader import file_sha256
        for name, info in self.manifest["artifacts"].items():
            path = self.root / name
            if not path.is_file():
                raise _corrupt(self.root, f"{name} is missing")
            if not isinstance(info, dict):
                raise _corrupt(self.root, f"artifact {name!r} has no record")
            if "bytes" in info and path.stat().st_size != info["bytes"]:
                raise _corrupt(self.root, f"{name} has {path.stat().st_size:,} bytes, the manifest "
                               f"says {info['bytes']:,} (truncated or replaced)")
            if check_hashes and info.get("sha256") and file_sha256(path) != info["sha256"]:
                raise _corrupt(self.root, f"{name} does not match its SHA-256 in the manifest")

    # ------------------------------------------------------------------ typed fields
    @property
    def version(self) -> int:
        return int(self.manifest["structexport_manifest"])

    @property
    def target(self) -> str:
        return self.manifest["target"]

    @property
    def arch(self) -> str:
        return self.manifest["source"]["arch"]

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.manifest["input_shape"])

    @property
    def passes(self) -> list[str]:
        return [p["name"] for p in self.manifest["passes"]]

    @property
    def pass_options(self) -> dict:
        return dict(self.manifest.get("pass_options") or {})

    @property
    def model_onnx(self) -> Path:
        return self.root / MODEL

    @property
    def reference_onnx(self) -> Path | None:
        path = self.root / REFERENCE
        return path if REFERENCE in self.manifest["artifacts"] and path.is_file() else None

    @property
    def verification_data(self) -> Path | None:
        path = self.root / VERIFICATION_DATA
        return path if VERIFICATION_DATA in self.manifest["artifacts"] and path.is_file() else None

    @property
    def library(self) -> Path | None:
        """The TVM library, for TVM targets."""
        path = self.root / "model.so"
        return path if "model.so" in self.manifest["artifacts"] and path.is_file() else None

    def _artifact(self, name: str) -> Path | None:
        path = self.root / name
        return path if name in self.manifest["artifacts"] and path.is_file() else None

    def _program(self, role: str) -> Path | None:
        name = ((self.target_build or {}).get("programs") or {}).get(role)
        return self._artifact(name) if name else None

    @property
    def program(self) -> Path | None:
        """The runtime's program, for targets that lower torch (ExecuTorch's model.pte)."""
        return self._program("structured")

    @property
    def dense_program(self) -> Path | None:
        """The dense counterpart as the runtime's program (bench's baseline there)."""
        return self._program("dense")

    @property
    def dense_int8_program(self) -> Path | None:
        """An INT8 package's dense INT8 baseline as the runtime's program."""
        return self._program("dense_int8")

    @property
    def composed_onnx(self) -> Path | None:
        """The graph a fused TVM library was compiled from (structured convs as plain convs
        with their structured kernels): ``profile`` compiles it the same way."""
        path = self.root / COMPOSED
        return path if COMPOSED in self.manifest["artifacts"] and path.is_file() else None

    @property
    def structure_plan(self):
        """The model's structure plan (:class:`structexport.structure_plan.StructurePlan`),
        or None for a package written before plans existed."""
        return StructurePlan.from_dict(self.manifest.get("structure_plan"))

    @property
    def structured_mode(self) -> str | None:
        """How the TVM library compiles structured convs (``fused`` / ``decomposed``)."""
        return (self.target_build.get("structured_convs") or {}).get("mode")

    @property
    def target_build(self) -> dict:
        return dict(self.manifest.get("target_build") or {})

    @property
    def tvm_target(self) -> dict | None:
        return self.target_build.get("tvm_target")

    @property
    def tuning(self) -> dict | None:
        return self.target_build.get("tuning")

    @property
    def layers(self) -> list[dict]:
        """The source model's layer table (``analysis.LayerInfo`` as dicts)."""
        return list(self.manifest.get("source_layers") or [])

    @property
    def source_path(self) -> str | None:
        """Where the checkpoint was when converted (informational: it need not be there)."""
        return self.manifest["source"].get("path")

    @property
    def tolerances(self) -> tuple[float | None, float | None]:
        """(atol, rtol) the package was verified with."""
        v = self.manifest["verification"]
        return v.get("atol"), v.get("rtol")

    @property
    def source_checkpoint(self) -> Path | None:
        """The checkpoint it was converted from, where it still is and is the same file."""
        from structexport.loader import file_sha256
        source = self.manifest["source"]
        path = source.get("path")
        if not path or not Path(path).is_file():
            return None
        if source.get("sha256") and file_sha256(Path(path)) != source["sha256"]:
            return None
        return Path(path)

    @property
    def self_contained(self) -> bool:
        return (self.reference_onnx is not None and self.verification_data is not None
                and bool(self.layers))

    @property
    def macs(self) -> tuple[int, int]:
        """(before, after) MACs of the source model and the rewritten one."""
        return int(self.manifest["before"]["macs"]), int(self.manifest["after"]["macs"])

    def describe(self) -> str:
        return f"{self.root} ({self.arch}, {self.target}, input {list(self.input_shape)})"

    # ------------------------------------------------------------------ verification data
    def verification_arrays(self) -> tuple[dict[str, np.ndarray], dict[str, list[np.ndarray]]]:
        """(inputs by label, the source model's outputs on each) as stored at conversion."""
        if self._arrays is None:
            self._arrays = self._read_verification_arrays()
        return self._arrays[:2]

    def _read_verification_arrays(self) -> tuple[dict, dict, dict]:
        path = self.verification_data
        if path is None:
            raise PackageIncompatibleError(
                f"{self.root} holds no {VERIFICATION_DATA} (written by an older structexport)",
                "convert the model again with this structexport")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except Exception as exc:
            raise _corrupt(self.root, f"{VERIFICATION_DATA} cannot be read ({type(exc).__name__})") from None
        inputs, expected, int8 = {}, {}, {}
        self._dense_int8 = {}
        for key, arr in arrays.items():
            kind, _, rest = key.partition("/")
            if kind == "input":
                inputs[rest] = arr
            elif kind == "inputs":   # several inputs, by name, in the model's order
                label, _, name = rest.rpartition("/")
                inputs.setdefault(label, {})[name] = arr
            elif kind in ("output", "int8", "dense-int8"):
                label, _, index = rest.rpartition("/")
                table = {"output": expected, "int8": int8, "dense-int8": self._dense_int8}[kind]
                table.setdefault(label, []).append((int(index), arr))
        if not inputs or set(inputs) != set(expected) or (int8 and set(int8) != set(inputs)):
            raise _corrupt(self.root, f"{VERIFICATION_DATA} does not pair inputs with outputs")
        return inputs, *({k: [a for _, a in sorted(v)] for k, v in table.items()} for table in (expected, int8))

    def dense_int8_expected(self) -> dict[str, list[np.ndarray]]:
        """The dense INT8 baseline's fake-quantized outputs, where the package stores them."""
        self.verification_arrays()
        return {k: [a for _, a in sorted(v)] for k, v in self._dense_int8.items()}

    def check_timed(self, run, what: str, precision: str | None = None) -> None:
        """The very session or library a command is about to time, ``run(x) -> outputs``,
        still gives the stored outputs of the source on every stored input, within the
        package's tolerances (its dense reference at fp32's when ``precision`` says so);
        exit 32 otherwise. ``what`` names it (file, runtime, options) in the error."""
        from structexport.export import VerificationError, verify_arrays
        inputs, expected = self.verification_arrays()
        atol, rtol = self.tolerances
        precision = precision or self.precision
        if precision == "int8":
            # the integer kernels against the package's fake-quantized outputs
            expected = self._arrays[2]
            atol, rtol = self.manifest["int8"]["tolerance"]["atol"], 0.0
            if not expected:
                raise _corrupt(self.root, f"an INT8 package without INT8 outputs in {VERIFICATION_DATA}")
        elif self.precision == "int8":
            precision = "fp32"
        result = verify_arrays(run, inputs, expected, precision, atol, rtol, runtime=what)
        if not result.passed:
            raise VerificationError(f"{what} does not give the package's verified outputs: {result.summary()}",
                                    "nothing was timed; convert the model again on this machine")

    @property
    def inputs(self) -> list[dict]:
        """Every input (name, shape, dtype), as converted from a model from elsewhere; empty for
        a zoo model (one image input, ``input_shape``) and for packages written before."""
        return list(self.manifest.get("inputs") or [])

    def feed(self) -> np.ndarray | dict:
        """The first verification input (the one bench and profile time with): an array, or
        arrays by input name for a model with several inputs."""
        inputs, _ = self.verification_arrays()
        return inputs[sorted(inputs)[0]] if "random:0" not in inputs else inputs["random:0"]


def save_verification_arrays(path: Path, inputs: dict[str, np.ndarray],
                             expected: dict[str, list[np.ndarray]],
                             int8_expected: dict[str, list[np.ndarray]] | None = None,
                             dense_int8_expected: dict[str, list[np.ndarray]] | None = None) -> None:
    """``int8_expected``: an INT8 package's fake-quantized outputs, what its integer kernels
    are checked against (``int8/<label>/<index>``); ``dense_int8_expected``: the same for its
    dense INT8 baseline where that cannot be run as written at check time (an ExecuTorch
    program; ``dense-int8/<label>/<index>``)."""
    arrays = {}
    for label, x in inputs.items():
        if isinstance(x, dict):      # several inputs: one array per input name
            arrays.update({f"inputs/{label}/{name}": np.array(v, order="C") for name, v in x.items()})
        else:
            arrays[f"input/{label}"] = np.array(x, order="C")
    for prefix, table in (("output", expected), ("int8", int8_expected or {}),
                          ("dense-int8", dense_int8_expected or {})):
        for label, outs in table.items():
            for i, arr in enumerate(outs):
                arrays[f"{prefix}/{label}/{i}"] = np.array(arr, order="C")
    with open(path, "wb") as f:
        np.savez(f, **arrays)
