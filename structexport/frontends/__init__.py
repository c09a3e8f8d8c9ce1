"""Every input the toolchain takes, turned into one :class:`SourceModel`.

One front end per input format (the design of TVM's tvmc frontends): each has a
``name``, the ``suffixes`` its files usually carry, ``sniff(path, head_bytes)`` that
recognises a file by its content, and ``load(...)``. :func:`load_source` picks the front
end from the file's content first; a suffix that disagrees is overruled, with a note.

============  =====================================================  =======================
format        file                                                   needs
============  =====================================================  =======================
onnx          ``torch.onnx.export``, tf2onnx, paddle2onnx, ... (.onnx) ``input_shape`` for
                                                                     unknown dimensions
torch-export  ``torch.export.save`` (.pt2)                           ``trust_pickle`` only
                                                                     if it would run code
module        a state dict of the user's own ``nn.Module``           ``model_spec``
torchscript   ``torch.jit.save``                                     ``allow_torchscript``
checkpoint    a state dict of a zoo model (``load_checkpoint``)      ``arch`` (or the
                                                                     project's own format)
============  =====================================================  =======================
"""
from __future__ import annotations

import os
from pathlib import Path

from structexport import errors as E
from structexport.frontends.base import (HEAD_BYTES, Frontend, SourceModel, parse_input_shape,
                                         parse_input_shapes)
from structexport.frontends.checkpoint import CheckpointFrontend
from structexport.frontends.onnx_model import OnnxFrontend
from structexport.frontends.torch_export import TorchExportFrontend
from structexport.frontends.torchscript import TorchScriptFrontend
from structexport.frontends.user_module import UserModuleFrontend
from structexport.loader import check_path

ONNX = OnnxFrontend()
TORCH_EXPORT = TorchExportFrontend()
TORCHSCRIPT = TorchScriptFrontend()
MODULE = UserModuleFrontend()
CHECKPOINT = CheckpointFrontend()
# Sniffed in this order: the most specific content first (a .pt2 and a TorchScript file
# are zips, as is a torch.save checkpoint).
FRONTENDS: tuple[Frontend, ...] = (ONNX, TORCH_EXPORT, TORCHSCRIPT, MODULE, CHECKPOINT)

__all__ = ["FRONTENDS", "Frontend", "SourceModel", "detect_frontend", "frontend_for_suffix",
           "load_source"]


def detect_frontend(path: str | os.PathLike, head: bytes | None = None) -> Frontend | None:
    """The front end whose content test the file passes (for torch files: CHECKPOINT),
    or None."""
    path = Path(path)
    if head is None:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    for frontend in FRONTENDS:
        if frontend is not MODULE and frontend.sniff(path, head):
            return frontend
    return None


def frontend_for_suffix(path: str | os.PathLike) -> Frontend | None:
    suffix = Path(path).suffix.lower()
    for frontend in (ONNX, TORCH_EXPORT, CHECKPOINT):
        if suffix in frontend.suffixes:
            return frontend
    return None


def load_source(path: str | os.PathLike, *, model_spec: str | None = None, arch: str | None = None,
                input_shape=None, input_shapes: dict | None = None, input_values: dict | None = None,
                trust_pickle: bool = False, allow_torchscript: bool = False) -> SourceModel:
    """Load any supported model file into a :class:`SourceModel`.

    ``model_spec`` (``--model FILE.py:FUNC`` / ``package.module:FUNC``) names the user's own
    module for a state dict; ``arch`` a zoo architecture; ``input_shape`` (``--input-shape``)
    fixes dynamic dimensions (of the first input; ``input_shapes`` of inputs by name, and
    ``input_values`` their values, for the front ends of models with several inputs).
    ``trust_pickle`` / ``allow_torchscript`` are the loader's
    opt-ins to run code from the file.
    """
    path = Path(path)
    check_path(path)
    if input_shapes is None:    # the flag's text, bare and NAME=SIZES alike
        shape, input_shapes = parse_input_shapes(input_shape)
    else:
        shape = parse_input_shape(input_shape)
    if model_spec and arch:
        raise E.ModelSpecError("--arch and --model both name the architecture",
                               "pass --arch NAME for a zoo model or --model FILE.py:build for your own, not both")
    with open(path, "rb") as f:
        head = f.read(HEAD_BYTES)
    content = detect_frontend(path, head)
    by_suffix = frontend_for_suffix(path)
    notes: list[str] = []
    if content is None:
        if by_suffix is None:
            raise E.NotACheckpointError(
                f"{path} is not a model file structexport reads: not ONNX, a torch.export archive, "
                f"TorchScript, a PyTorch checkpoint or safetensors (it starts with {head[:8]!r})",
                "pass a file written by torch.onnx.export, torch.export.save, torch.jit.save, "
                "torch.save or safetensors")
        frontend = by_suffix  # unrecognised content: the suffix's front end names the damage
    else:
        frontend = content
        if by_suffix is not None and by_suffix.family != content.family:
            notes.append(f"{path.name} is named like {by_suffix.title} ({path.suffix!r}) but its "
                         f"content is {content.title}: read as {content.title}")
    if frontend.family == "torch":
        if arch:
            if frontend is TORCHSCRIPT:
                notes.append("TorchScript archive read as a checkpoint of the zoo model --arch "
                             f"{arch} (its weights; drop --arch to use its own code)")
            frontend = CHECKPOINT
        elif model_spec:
            if frontend is TORCHSCRIPT:
                notes.append(f"TorchScript archive read as a state dict of --model {model_spec}")
            frontend = MODULE
    elif arch or model_spec:
        flag = f"--arch {arch}" if arch else f"--model {model_spec}"
        notes.append(f"{flag} ignored: {frontend.title} carries its own architecture")
    source = frontend.load(path, model_spec=model_spec, arch=arch, input_shape=shape,
                           input_shapes=input_shapes, input_values=input_values,
                           trust_pickle=trust_pickle, allow_torchscript=allow_torchscript)
    source.notes[:0] = notes
    return source


def is_zoo_checkpoint(path, arch: str | None = None, model_spec: str | None = None) -> bool:
    """Whether the zoo's loader takes the file (a state dict of a zoo architecture, or a
    TorchScript archive read into one with ``--arch``) rather than a front end for models
    from anywhere; by content, as ``convert`` decides. Unreadable paths go to the loader,
    whose errors name the problem precisely (missing, empty, a directory, ...)."""
    if model_spec:
        return False
    try:
        frontend = detect_frontend(path) or frontend_for_suffix(path)
    except (E.StructExportError, OSError):
        return True
    if frontend is None:
        return True
    return frontend.name == "checkpoint" or (frontend.name == "torchscript" and arch is not None)
