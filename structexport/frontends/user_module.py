"""A state dict of the user's own ``nn.Module``: ``--model path/to/file.py:build`` or
``--model package.module:build``, where ``build()`` returns the module.

A file inside a package (folders with ``__init__.py``) is imported as part of it, under a
name unique to its path, so that its relative imports (``from .layers import X``) resolve;
what the import added from the user's folders is dropped from ``sys.modules`` again.

Importing the named file runs it -- that is the user's choice, they named it. The
checkpoint itself is still read weights-only through the loader (``read_checkpoint``,
``unwrap_state_dict``, ``strip_prefixes``) and matched strictly, with the loader's
grouped, nearest-name error (exit 16 for keys, 17 for shapes).
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

from structexport import errors as E
from structexport.frontends.base import (Frontend, SourceModel, check_module_runs, first_line,
                                         forward_arguments, named_input_specs,
                                         module_input_shape, shape_text)
from structexport.frontends.checkpoint import looks_like_torch_file
from structexport.loader import (check_finite, file_sha256, key_mismatch, mismatch_error,
                                 read_checkpoint, strip_prefixes, unwrap_state_dict)

DEFAULT_FUNCTION = "build"


def _split_spec(spec: str) -> tuple[str, str]:
    target, sep, func = spec.strip().rpartition(":")
    if not sep or not func.isidentifier():  # no function named (or a Windows drive colon)
        return spec.strip(), DEFAULT_FUNCTION
    return target, func


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_file(target: str, func: str):
    file = Path(target).expanduser()
    if not file.is_file():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise E.ModelSpecError(f"--model file {target} {what}",
                               "pass --model path/to/file.py:build (the file that defines your model)")
    resolved = file.resolve()
    tag = hashlib.sha1(str(resolved).encode()).hexdigest()[:10]
    root = package_root(resolved.parent)
    # a name unique to the path: no clash with an installed or earlier module of that name
    alias = f"structexport_user_{_identifier(root.name if root else resolved.stem)}_{tag}"
    # the file's folder, so it can import its siblings; a package's parent folder, so its
    # absolute imports of itself resolve
    folders = [resolved.parent] + ([root.parent] if root is not None else [])
    for name in [n for n in sys.modules if n.split(".")[0] == alias]:
        del sys.modules[name]   # a module imported from this path before: import it afresh
    before = set(sys.modules)
    added = [str(f) for f in folders if str(f) not in sys.path]
    sys.path[:0] = added
    try:
        module = (_exec_lone_file(target, resolved, alias) if root is None
                  else _import_from_package(target, resolved, root, alias))
    except (KeyboardInterrupt, E.StructExportError):
        raise
    except BaseException as exc:  # SyntaxError, ImportError, SystemExit from argparse, ...
        _forget_user_modules(before, folders, alias, keep_alias=False)
        raise _import_error(target, resolved, root, alias, func, exc) from None
    finally:
        for folder in added:
            try:
                sys.path.remove(folder)
            except ValueError:
                pass
    _forget_user_modules(before, folders, alias, keep_alias=True)
    return module, file.name


def package_root(folder: Path) -> Path | None:
    """The outermost of the folders holding ``__init__.py`` that contain ``folder`` (the
    package a module file belongs to), or None for a file outside any package."""
    root = None
    while (folder / "__init__.py").is_file():
        root = folder
        if folder.parent == folder:
            break
        folder = folder.parent
    return root


def _exec_lone_file(target: str, resolved: Path, alias: str):
    module_spec = importlib.util.spec_from_file_location(alias, resolved)
    if module_spec is None or module_spec.loader is None:
        raise E.ModelSpecError(f"--model file {target} cannot be imported as Python",
                               "pass a .py file: --model path/to/file.py:build")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[alias] = module  # dataclasses, pickling and torch.export look modules up here
    module_spec.loader.exec_module(module)
    return module


def _import_from_package(target: str, resolved: Path, root: Path, alias: str):
    """The module as part of its package, so that its relative imports resolve: the
    package root imported under ``alias``, then the module by its dotted name below it."""
    parts = list(resolved.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    bad = [p for p in parts if not p.isidentifier()]
    if bad:
        raise E.ModelSpecError(f"--model file {target} cannot be imported from its package "
                               f"{root}: {bad[0]!r} is not a Python name",
                               "rename it to a Python identifier")
    module_spec = importlib.util.spec_from_file_location(alias, root / "__init__.py",
                                                         submodule_search_locations=[str(root)])
    package = importlib.util.module_from_spec(module_spec)
    sys.modules[alias] = package
    module_spec.loader.exec_module(package)
    return importlib.import_module(".".join([alias, *parts]))


def _identifier(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)


def _forget_user_modules(before: set, folders: list[Path], alias: str, keep_alias: bool) -> None:
    """Drop from sys.modules what this import added from the user's folders (siblings, the
    package under its own name), so that a later --model with a same-named module imports
    its own; the module itself stays under its alias unless the import failed."""
    for name in set(sys.modules) - before:
        top = name.split(".")[0]
        if top == alias:
            if not keep_alias:
                sys.modules.pop(name, None)
        elif top not in before and _top_in(sys.modules.get(top), folders):
            sys.modules.pop(name, None)


def _top_in(top, folders: list[Path]) -> bool:
    """Whether a top-level module sits directly in one of ``folders``."""
    file = getattr(top, "__file__", None)
    if file:
        path = Path(file)
        places = [path.parent.parent if path.name == "__init__.py" else path.parent]
    else:   # a namespace package
        places = [Path(p).parent for p in getattr(top, "__path__", [])]
    return any(p in folders for p in places)


def _relative_level(file: Path) -> int:
    """How many folders up the file's relative imports reach (1 for ``from .x``)."""
    try:
        tree = ast.parse(file.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return 1
    return max([n.level for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)] + [1])


def _import_error(target: str, resolved: Path, root: Path | None, alias: str, func: str,
                  exc: BaseException) -> E.ModelSpecError:
    """The one-line error of a failed import; for relative imports that reach outside any
    package, exactly the --model and PYTHONPATH that import the file inside its package."""
    text = first_line(exc).replace(alias, root.name if root is not None else resolved.stem)
    what = f"importing --model file {target} failed: {text}"
    if not (isinstance(exc, ImportError) and "relative import" in str(exc)):
        return E.ModelSpecError(what, "fix that error in the file (it must import without arguments)")
    level = _relative_level(resolved)
    top = resolved.parents[min(level, len(resolved.parents)) - 1]   # the outermost package
    if root is not None and top.is_relative_to(root):
        top = root.parent   # the import that reaches out is in another module of the package
    chain = [resolved.parent, *resolved.parent.parents]
    missing = [str(f) for f in chain[:chain.index(top) + 1] if not (f / "__init__.py").is_file()]
    fix = f"add an empty __init__.py to {' and '.join(missing)}"
    dotted = ".".join(resolved.relative_to(top.parent).with_suffix("").parts)
    if all(p.isidentifier() for p in dotted.split(".")) and top.parent != top:
        # a folder without __init__.py imports as a namespace package (PEP 420)
        fix = f"pass --model {dotted}:{func} with PYTHONPATH={top.parent}, or {fix}"
    return E.ModelSpecError(what, f"its relative imports need {top} to be a package: {fix}")


def _import_module(target: str, spec: str):
    if not target or not all(p.isidentifier() for p in target.split(".")):
        raise E.ModelSpecError(f"--model {spec!r} is neither FILE.py:FUNCTION nor package.module:FUNCTION",
                               "pass --model path/to/file.py:build or --model mypackage.models:build")
    try:
        return importlib.import_module(target), target
    except KeyboardInterrupt:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and (target == exc.name or target.startswith(exc.name + ".")):
            raise E.ModelSpecError(f"--model module {target} is not importable: no module named "
                                   f"{exc.name!r}", "check the module path, or install it / "
                                   "add its folder to PYTHONPATH") from None
        raise E.ModelSpecError(f"importing --model module {target} failed: {first_line(exc)}",
                               "install what it imports, or fix the module") from None
    except BaseException as exc:
        raise E.ModelSpecError(f"importing --model module {target} failed: {first_line(exc)}",
                               "fix that error in the module") from None


def _callables(module) -> list[str]:
    out = []
    for key, value in vars(module).items():
        if key.startswith("_") or not callable(value):
            continue
        if getattr(value, "__module__", None) == module.__name__ or inspect.isfunction(value):
            out.append(key)
    return sorted(out)


def resolve_model_spec(spec: str):
    """``(build function, label)`` for ``FILE.py:FUNC`` or ``package.module:FUNC``."""
    target, func = _split_spec(spec)
    module, where = _import_file(target, func) if _is_file_spec(target) else _import_module(target, spec)
    fn = getattr(module, func, None)
    if fn is None or not callable(fn):
        found = _callables(module)
        listing = f"it defines {', '.join(found[:8])}" + (" ..." if len(found) > 8 else "") \
            if found else "it defines no public callables"
        raise E.ModelSpecError(f"{where} has no {'callable ' if fn is not None else ''}function "
                               f"{func!r}; {listing}", f"pass --model {target}:NAME with the "
                               "function that returns your nn.Module")
    return fn, f"{where}:{func}"


def build_module(spec: str):
    """Import ``spec``, call its function, return ``(module, label)``."""
    import torch.nn as nn
    fn, label = resolve_model_spec(spec)
    try:
        model = fn()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:
        raise E.ModelBuildError(f"{label}() raised {first_line(exc)}",
                                "fix it so that it returns the nn.Module the checkpoint was saved from") from None
    if not isinstance(model, nn.Module):
        raise E.ModelBuildError(f"{label}() returned a {type(model).__name__}, not a torch.nn.Module",
                                "return the model instance, e.g. `return MyNet()`")
    return model, label


def _best_keys(state: dict, expected: dict) -> tuple[dict, list[str]]:
    """The state dict as stored, or with its wrapper prefixes stripped: whichever fits."""
    stripped, prefixes = strip_prefixes(state)
    if not prefixes:
        return state, []

    def misfit(s):
        missing, unexpected, shapes = key_mismatch(expected, s)
        return len(missing) + len(unexpected) + len(shapes)

    return (stripped, prefixes) if misfit(stripped) <= misfit(state) else (state, [])


class UserModuleFrontend(Frontend):
    name = "module"
    family = "torch"
    title = "a PyTorch checkpoint"
    suffixes = (".pt", ".pth", ".t7", ".tar", ".ckpt", ".bin", ".safetensors", ".pkl")

    def sniff(self, path: Path, head: bytes) -> bool:
        return looks_like_torch_file(path, head)

    def load(self, path: Path, *, model_spec: str | None = None, input_shape=None,
             trust_pickle: bool = False, allow_torchscript: bool = False,
             input_shapes: dict | None = None, input_values: dict | None = None, **_) -> SourceModel:
        if not model_spec:
            raise E.ModelSpecError("a state dict of your own model needs --model",
                                   "pass --model path/to/file.py:build")
        model, label = build_module(model_spec)
        cls = type(model).__name__
        notes: list[str] = [f"model built by {label}() ({cls})"]
        obj, fmt, meta = read_checkpoint(path, trust_pickle, allow_torchscript)
        if fmt in ("safetensors", "structexport"):
            state, wrapper = obj, None
        else:
            state, wrapper, _extras = unwrap_state_dict(obj, path)
        if wrapper:
            notes.append(f"state dict taken from the training checkpoint's {wrapper!r} entry")
        expected = model.state_dict()
        state, stripped = _best_keys(state, expected)
        if stripped:
            notes.append(f"stripped key prefix {' and '.join(repr(p) for p in stripped)}")
        if not state:
            raise E.NotACheckpointError(f"{path} holds no tensors")
        notes += check_finite(state, path)
        missing, unexpected, shapes = key_mismatch(expected, state)
        if missing or unexpected or shapes:
            raise mismatch_error(f"{cls} built by {label}()", missing, unexpected, shapes,
                                 list(expected), hint=f"check that {label}() builds the model "
                                 "this checkpoint was saved from")
        converted = {k: v.to(expected[k].dtype) if v.is_floating_point() and expected[k].is_floating_point()
                     else v for k, v in state.items()}
        model.load_state_dict(converted, strict=True)
        model.eval()
        low = sorted({str(t.dtype).replace("torch.", "") for t in state.values()
                      if t.is_floating_point()} & {"float16", "bfloat16"})
        if low:
            notes.append(f"weights stored in {', '.join(low)}; cast to the model's own dtypes")
        arguments = forward_arguments(model)
        if len(arguments) > 1:
            specs = named_input_specs(arguments, f"{cls}.forward ({label})", input_shape,
                                      input_shapes or {}, input_values or {})
            values = {k: v for k, v in (input_values or {}).items() if k in dict(arguments)}
            check_module_runs(model, specs, f"{cls} ({label})", values)
            notes.append("inputs " + ", ".join(f"{s.name} {shape_text(s.shape)} {s.dtype}" for s in specs))
            return SourceModel(format="module", path=str(path), sha256=file_sha256(path), name=cls,
                               input_shape=specs[0].shape, module=model, notes=notes,
                               input_name=specs[0].name, inputs=specs, values=values,
                               metadata={"model_spec": model_spec, "source_format": fmt,
                                         "wrapper_key": wrapper, **{k: v for k, v in meta.items()}})
        shape = input_shape if input_shape is not None else (input_shapes or {}).get(
            arguments[0][0] if arguments else "", None)
        if shape is None:
            carried = module_input_shape(model)
            if carried is None:
                raise E.InputDimensionError(
                    f"{cls} ({label}) does not say its input shape",
                    "pass --input-shape N,C,H,W (e.g. 1,3,224,224), or give the module an "
                    "`input_shape` attribute")
            shape, attr = carried
            notes.append(f"input shape {shape_text(shape)} from the module's {attr!r}")
        check_module_runs(model, shape, f"{cls} ({label})")
        return SourceModel(format="module", path=str(path), sha256=file_sha256(path), name=cls,
                           input_shape=tuple(shape), module=model, notes=notes,
                           metadata={"model_spec": model_spec, "source_format": fmt,
                                     "wrapper_key": wrapper, **{k: v for k, v in meta.items()}})
