"""Checkpoints of the zoo: delegated unchanged to :func:`structexport.loader.load_checkpoint`
(``--arch NAME``, or the project's own format, which names its model)."""
from __future__ import annotations

from pathlib import Path

from structexport.frontends.base import Frontend, SourceModel, zip_names
from structexport.loader import is_safetensors, load_checkpoint


def is_torchscript(names: list[str] | None) -> bool:
    """The loader's own test: TorchScript archives hold ``constants.pkl`` or ``code/``."""
    return bool(names) and any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def looks_like_torch_file(path: Path, head: bytes) -> bool:
    """A torch.save zip (``data.pkl``), a legacy pickle, or safetensors -- not TorchScript
    and not a torch.export archive."""
    if is_safetensors(head) or head[:1] == b"\x80":
        return True
    names = zip_names(path, head)
    return bool(names) and not is_torchscript(names) and any(n.endswith("data.pkl") for n in names)


class CheckpointFrontend(Frontend):
    name = "checkpoint"
    family = "torch"
    title = "a PyTorch checkpoint"
    suffixes = (".pt", ".pth", ".t7", ".tar", ".ckpt", ".bin", ".safetensors", ".pkl")

    def sniff(self, path: Path, head: bytes) -> bool:
        return looks_like_torch_file(path, head)

    def load(self, path: Path, *, arch: str | None = None, input_shape=None,
             trust_pickle: bool = False, allow_torchscript: bool = False, **_) -> SourceModel:
        from structexport.models import input_shape as zoo_input_shape
        # the loader's errors name both --arch NAME and --model FILE.py:FUNC
        loaded = load_checkpoint(path, arch, trust_pickle=trust_pickle,
                                 allow_torchscript=allow_torchscript)
        shape = tuple(input_shape) if input_shape is not None else tuple(zoo_input_shape(loaded.arch))
        return SourceModel(format="checkpoint", path=loaded.path, sha256=loaded.sha256,
                           name=loaded.arch, input_shape=shape, module=loaded.model,
                           notes=list(loaded.notes), checkpoint=loaded,
                           metadata={"source_format": loaded.source_format,
                                     "wrapper_key": loaded.wrapper_key, **loaded.metadata})
