"""What every front end returns (:class:`SourceModel`), the front-end interface, and the
helpers they share (input shapes, one-line exception text, zip listings)."""
from __future__ import annotations

import re
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from structexport import errors as E

if TYPE_CHECKING:  # imported for annotations only: importing frontends stays light
    import onnx as onnx_lib
    import torch.nn as nn

    from structexport.loader import LoadedCheckpoint

HEAD_BYTES = 1 << 16
FORMATS = ("onnx", "torch-export", "module", "torchscript", "checkpoint")


@dataclass
class InputSpec:
    """One input of a model: its name, fixed shape and NumPy dtype name."""
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def is_float(self) -> bool:
        import numpy as np
        return bool(np.issubdtype(np.dtype(self.dtype), np.floating))

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class SourceModel:
    """One loaded model, whatever file it came from.

    ``onnx`` is set for ONNX sources (every input and output dimension fixed, external
    data loaded, shapes inferred); ``module`` for torch sources (eval mode); ``checkpoint``
    for zoo checkpoints (the loader's :class:`LoadedCheckpoint`, unchanged).
    """
    format: str                              # onnx | torch-export | module | torchscript | checkpoint
    path: str
    sha256: str
    name: str
    input_shape: tuple[int, ...]             # fixed, N,C,H,W for image models
    onnx: "onnx_lib.ModelProto | None" = None
    module: "nn.Module | None" = None
    notes: list[str] = field(default_factory=list)
    checkpoint: "LoadedCheckpoint | None" = None
    input_name: str | None = None            # the graph input (ONNX) or argument (torch) name
    metadata: dict = field(default_factory=dict)
    # Every input in order, for models with more than one (or one that is not float);
    # empty: one float input of input_shape. ``values``: arrays the user gave (--inputs).
    inputs: list[InputSpec] = field(default_factory=list)
    values: dict = field(default_factory=dict)

    @property
    def several_inputs(self) -> bool:
        return len(self.inputs) > 1 or any(not spec.is_float for spec in self.inputs)

    def example_input(self, seed: int = 0):
        """A seeded standard-normal float32 tensor of :attr:`input_shape`."""
        import torch
        return torch.randn(self.input_shape, generator=torch.Generator().manual_seed(seed))

    def example_inputs(self, seed: int = 0) -> tuple:
        """One tensor per input, in order: the user's values where given (--inputs), else
        seeded standard-normal floats, and zeros for integer inputs."""
        if not self.inputs:
            return (self.example_input(seed),)
        return tuple(example_arrays(self.inputs, self.values, seed, as_tensors=True).values())


def example_arrays(inputs: list[InputSpec], values: dict, seed: int, as_tensors: bool = False) -> dict:
    """``{name: array}`` for every input: ``values`` where given, seeded standard-normal
    floats, zeros for the integer inputs with no value."""
    import numpy as np
    import torch
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for spec in inputs:
        if spec.name in values:
            arr = np.asarray(values[spec.name]).astype(spec.dtype, copy=False)
        elif spec.is_float:
            arr = torch.randn(spec.shape, generator=gen).numpy().astype(spec.dtype)
        else:
            arr = np.zeros(spec.shape, dtype=spec.dtype)
        out[spec.name] = torch.from_numpy(np.array(arr, order="C")) if as_tensors else arr
    return out


class Frontend:
    """One input format (the design of TVM's tvmc frontends).

    ``sniff`` recognises the file by its content (``head`` is its first bytes); ``load``
    turns it into a :class:`SourceModel`. ``family`` groups front ends that read the same
    kind of file (``module``, ``checkpoint`` and ``torchscript`` are all torch files), so
    a suffix of the same family never counts as disagreeing with the content.
    """
    name: str = ""
    family: str = ""
    title: str = ""
    suffixes: tuple[str, ...] = ()

    def sniff(self, path: Path, head: bytes) -> bool:
        raise NotImplementedError

    def load(self, path: Path, *, model_spec: str | None = None, arch: str | None = None,
             input_shape: tuple[int, ...] | None = None, trust_pickle: bool = False,
             allow_torchscript: bool = False) -> SourceModel:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<frontend {self.name}>"


# ---------------------------------------------------------------------------- helpers

def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` -- never a traceback."""
    text = str(exc).strip()
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    line = line if len(line) <= limit else line[: limit - 3] + "..."
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def shape_text(shape) -> str:
    return ",".join(str(d) for d in shape)


def parse_input_shape(shape) -> tuple[int, ...] | None:
    """``None``, a sequence of positive ints, or the flag's text ``"1,3,224,224"``."""
    if shape is None:
        return None
    if isinstance(shape, str):
        parts = [p for p in re.split(r"[,x\s]+", shape.strip()) if p]
        try:
            shape = [int(p) for p in parts]
        except ValueError:
            shape = None
    try:
        out = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        out = ()
    if not out or any(d <= 0 for d in out):
        raise E.InputDimensionError(f"bad input shape {shape!r}: need positive sizes",
                                    "write --input-shape like 1,3,224,224")
    return out


def parse_input_shapes(given) -> tuple[tuple[int, ...] | None, dict[str, tuple[int, ...]]]:
    """``--input-shape``, repeatable: ``NAME=D0,D1,...`` fixes the input called NAME, a bare
    ``D0,D1,...`` the first input. Returns (the bare shape or None, shapes by name)."""
    if given is None or isinstance(given, (str, tuple, list)) and not given:
        return None, {}
    items = [given] if isinstance(given, str) or not isinstance(given[0], str) else list(given)
    bare, named = None, {}
    for item in items:
        if isinstance(item, str) and "=" in item:
            name, _, dims = item.partition("=")
            name = name.strip()
            if not name:
                raise E.InputDimensionError(f"bad --input-shape {item!r}: no input name before '='",
                                            "write --input-shape NAME=1,3,224,224")
            if name in named:
                raise E.InputDimensionError(f"--input-shape gives input {name!r} twice",
                                            "pass one --input-shape NAME=SIZES per input")
            named[name] = parse_input_shape(dims)
        else:
            if bare is not None:
                raise E.InputDimensionError("--input-shape gives two shapes without input names",
                                            "name them: --input-shape NAME=SIZES for each input")
            bare = parse_input_shape(item)
    return bare, named


def forward_arguments(module) -> list[tuple[str, str]]:
    """``(name, type)`` of each input ``forward`` requires: from a TorchScript schema
    (``Tensor``, ``int``, ...), else from the Python signature (type ``"?"``); empty when
    neither can be read."""
    import inspect
    try:
        return [(a.name, str(a.type)) for a in module.forward.schema.arguments][1:]
    except Exception:
        pass
    try:
        params = inspect.signature(module.forward).parameters.values()
    except (TypeError, ValueError):
        return []
    return [(p.name, "?") for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]


def check_input_names(named: dict, names: list[str], owner: str) -> None:
    """Every ``--input-shape NAME=...`` names an input of ``owner``."""
    unknown = sorted(set(named) - set(names))
    if unknown:
        raise E.InputDimensionError(f"--input-shape names {', '.join(map(repr, unknown))}, which "
                                    f"{owner} does not take (its inputs: {', '.join(names)})",
                                    "name one of its inputs, or give the first one's shape bare")


def named_input_specs(arguments: list[tuple[str, str]], owner: str, input_shape, named: dict,
                      values: dict) -> list[InputSpec]:
    """The inputs of a module whose ``forward`` takes several: each shape from
    ``--input-shape NAME=...``, from its array in ``--inputs`` (which also gives its dtype),
    or, for the first, the bare ``--input-shape``. Arguments that are not tensors (a
    TorchScript ``int``) are refused: an ONNX export cannot take them as inputs."""
    import numpy as np
    check_input_names(named, [a for a, _ in arguments], owner)
    for arg, kind in arguments:
        if kind not in ("?", "Tensor", "Optional[Tensor]"):
            raise E.InputDimensionError(
                f"{owner} takes {arg}: {kind}, which an ONNX export cannot take as an input "
                "(structexport converts modules whose arguments are tensors)",
                "convert the model's ONNX form instead, or wrap it in a module that takes a tensor")
    specs = []
    for index, (arg, kind) in enumerate(arguments):
        if arg in values:
            shape, dtype = tuple(np.shape(values[arg])), np.asarray(values[arg]).dtype.name
        else:
            shape, dtype = named.get(arg) or (input_shape if index == 0 else None), "float32"
        if shape is None:
            raise E.InputDimensionError(
                f"{owner} does not say the shape of its input {arg!r}",
                f"pass --input-shape {arg}=SIZES for each input (e.g. {arg}=1,3,224,224), or, for "
                "convert, their values in --inputs FILE.npz")
        specs.append(InputSpec(arg, tuple(shape), dtype))
    return specs


def module_input_shape(module) -> tuple[tuple[int, ...], str] | None:
    """An input shape the module carries: ``input_shape``, ``example_input`` or
    ``example_input_array`` (PyTorch Lightning's name). Returns ``(shape, attribute)``."""
    import torch
    for attr in ("input_shape", "example_input", "example_input_array"):
        try:
            value = getattr(module, attr, None)
        except Exception:
            value = None
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
            value = value[0]
        if isinstance(value, torch.Tensor):
            return tuple(int(d) for d in value.shape), attr
        if isinstance(value, (tuple, list, torch.Size)) and value and \
                all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in value):
            return tuple(value), attr
    return None


def check_module_runs(module, shape, label: str, values: dict | None = None) -> None:
    """Run the module once on a random input of ``shape`` -- or, for a module with several
    inputs, on :func:`example_arrays` of ``shape``, a list of :class:`InputSpec` -- a
    failure is the shape's fault (or the model's), reported on one line."""
    import torch
    if shape and isinstance(shape[0], InputSpec):
        args = tuple(example_arrays(list(shape), values or {}, 0, as_tensors=True).values())
        text = "inputs " + ", ".join(f"{s.name} {shape_text(s.shape)}" for s in shape)
    else:
        args, text = (torch.randn(shape, generator=torch.Generator().manual_seed(0)),), f"an input of shape {shape_text(shape)}"
    try:
        with torch.no_grad():
            module(*args)
    except (KeyboardInterrupt, E.StructExportError):
        raise
    except BaseException as exc:
        several = len(args) > 1
        raise E.InputDimensionError(
            f"{label} cannot run on {text}: {first_line(exc)}",
            "pass the --input-shape NAME=SIZES of each input (or, for convert, their values in --inputs FILE.npz)"
            if several else "pass the --input-shape the model was built for") from None


def zip_names(path: Path, head: bytes) -> list[str] | None:
    """Entry names of a zip file: from its central directory, or, for a truncated file,
    from the local file headers in ``head``. ``None`` when it is not a zip at all."""
    if not head.startswith(b"PK\x03\x04"):
        return None
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except Exception:
        pass
    names, pos = [], 0
    while pos + 30 <= len(head) and head[pos:pos + 4] == b"PK\x03\x04":
        flags, csize, nlen, xlen = (struct.unpack_from("<H", head, pos + 6)[0],
                                    struct.unpack_from("<I", head, pos + 18)[0],
                                    *struct.unpack_from("<HH", head, pos + 26))
        name = head[pos + 30: pos + 30 + nlen]
        if len(name) < nlen:
            break
        names.append(name.decode("utf-8", "replace"))
        if flags & 0x08 or csize == 0xFFFFFFFF:  # sizes follow the data: cannot skip ahead
            break
        pos += 30 + nlen + xlen + csize
    return names
