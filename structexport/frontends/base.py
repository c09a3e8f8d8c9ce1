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

    def example_input(self, seed: int = 0):
        """A seeded standard-normal float32 tensor of :attr:`input_shape`."""
        import torch
        return torch.randn(self.input_shape, generator=torch.Generator().manual_seed(seed))


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


def check_module_runs(module, shape: tuple[int, ...], label: str) -> None:
    """Run the module once on a random input of ``shape``; a failure is the shape's fault
    (or the model's), reported on one line."""
    import torch
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            module(x)
    except (KeyboardInterrupt, E.StructExportError):
        raise
    except BaseException as exc:
        raise E.InputDimensionError(
            f"{label} cannot run on an input of shape {shape_text(shape)}: {first_line(exc)}",
            "pass the --input-shape the model was built for") from None


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
