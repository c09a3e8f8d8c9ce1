"""TorchScript archives (``torch.jit.save``): the module with its architecture, no
``--arch`` needed. They carry code that runs when loaded, so they are read only with
``--allow-torchscript`` (the loader's refusal, exit 15, without it)."""
from __future__ import annotations

import warnings
from pathlib import Path

from structexport import errors as E
from structexport.frontends.base import (Frontend, SourceModel, check_module_runs, first_line,
                                         forward_arguments, module_input_shape, named_input_specs,
                                         shape_text, zip_names)
from structexport.frontends.checkpoint import is_torchscript
from structexport.loader import file_sha256, read_checkpoint


class TorchScriptFrontend(Frontend):
    name = "torchscript"
    family = "torch"
    title = "a TorchScript archive"
    suffixes = (".pt", ".pth", ".ptl", ".torchscript", ".jit")

    def sniff(self, path: Path, head: bytes) -> bool:
        return is_torchscript(zip_names(path, head))

    def load(self, path: Path, *, input_shape=None, allow_torchscript: bool = False,
             input_shapes: dict | None = None, input_values: dict | None = None, **_) -> SourceModel:
        if not allow_torchscript:
            read_checkpoint(path, allow_torchscript=False)  # raises the loader's refusal (exit 15)
            raise E.UnsafeCheckpointError(  # a TorchScript archive the loader reads otherwise
                f"{path} is a TorchScript archive, which carries code that runs when loaded; "
                "refused by default", "pass --allow-torchscript only if you trust it")
        import torch
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise E.CorruptCheckpointError(f"{path} is a damaged TorchScript archive: "
                                           f"{first_line(exc)}", "copy or save it again") from None
        module.eval()
        name = getattr(module, "original_name", None) or path.stem
        notes = [f"TorchScript module {name} loaded with its code (--allow-torchscript)"]
        arguments = forward_arguments(module)
        if len(arguments) > 1:
            specs = named_input_specs(arguments, f"TorchScript module {name} in {path.name}", input_shape,
                                      input_shapes or {}, input_values or {})
            values = {k: v for k, v in (input_values or {}).items() if k in arguments}
            check_module_runs(module, specs, f"TorchScript module {name}", values)
            notes.append("inputs " + ", ".join(f"{s.name} {shape_text(s.shape)} {s.dtype}" for s in specs))
            return SourceModel(format="torchscript", path=str(path), sha256=file_sha256(path),
                               name=name, input_shape=specs[0].shape, module=module, notes=notes,
                               input_name=specs[0].name, inputs=specs, values=values)
        shape = input_shape if input_shape is not None else (input_shapes or {}).get(
            arguments[0][0] if arguments else "", None)
        if shape is None:
            carried = module_input_shape(module)
            if carried is None:
                raise E.InputDimensionError(
                    f"TorchScript module {name} in {path.name} does not say its input shape",
                    "pass --input-shape N,C,H,W (e.g. 1,3,224,224)")
            shape, attr = carried
            notes.append(f"input shape {shape_text(shape)} from the module's {attr!r}")
        check_module_runs(module, tuple(shape), f"TorchScript module {name}")
        return SourceModel(format="torchscript", path=str(path), sha256=file_sha256(path),
                           name=name, input_shape=tuple(shape), module=module, notes=notes)

