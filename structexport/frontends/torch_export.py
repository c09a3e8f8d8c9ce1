"""``torch.export`` archives (``torch.export.save`` -> ``.pt2``), read without running
anything from the file unless the user opts in (``--trust-pickle``).

What ``torch.export.load`` does in torch 2.13 (torch/export/__init__.py,
torch/export/pt2_archive/_package.py, torch/_export/serde/serialize.py, torch/export/_unlift.py)
------------------------------------------------------------------------------------------

The archive is a zip under one root folder (``<name>/``). ``load`` calls
``pt2_archive._package.load_pt2``; when that raises ``RuntimeError`` it logs the
traceback and falls back to the torch 2.7 layout (``serialized_*.json/.pt`` at the top).

Plain data, never executed:

- ``archive_format`` ("pt2"), ``archive_version``, ``byteorder``, ``.data/version``,
  ``extra/*`` (strings);
- ``data/weights/weight_N`` and ``data/constants/tensor_N`` with ``use_pickle: false`` in
  ``data/weights/<model>_weights_config.json`` / ``data/constants/<model>_constants_config.json``:
  raw tensor bytes, viewed with ``torch.as_strided`` from JSON tensor metadata.

Pickled:

- ``data/sample_inputs/<model>.pt`` (a torch.save zip): ``deserialize_torch_artifact``
  tries ``torch.load(weights_only=True)`` and, **if that fails, retries with
  ``weights_only=False``** -- full unpickling of whatever the file holds;
- weights and tensor constants with ``use_pickle: true`` (tensor subclasses): always
  ``torch.load(weights_only=False)``;
- ``data/constants/opaque_obj_N``: ``pickle.loads`` -- plain, unrestricted pickle;
- ``data/constants/custom_obj_N``: ``torch._C._pickle_load_obj`` (TorchBind objects,
  whose C++ ``__setstate__`` runs);
- the legacy ``data/weights/<model>.pt`` / ``data/constants/<model>.pt`` and the 2.7
  layout's ``serialized_state_dict.pt`` / ``serialized_constants.pt`` /
  ``serialized_example_inputs.pt``: ``deserialize_torch_artifact`` (weights-only, then the
  unrestricted fallback).

Code that runs without any pickle:

- ``models/<model>.json`` holds symbolic shapes as ``expr_str`` strings (e.g.
  ``"Symbol('s0', positive=True, integer=True)"``) that the deserializer hands to
  ``sympy.sympify`` -- which ``eval``\\ s the string;
- its ``guards_code`` strings (e.g. ``"L['x'].size()[3] == L['x'].size()[2]"``) are
  pasted into Python source and ``exec``\\ ed by ``ExportedProgram.module()``; the guard
  then runs on every call of the module;
- ``data/aotinductor/<model>/*.so``: ``load_pt2`` loads every AOTInductor model in the
  archive (``AOTIModelPackageLoader``, i.e. ``dlopen`` of native code), even when only the
  exported program is wanted.

Node targets are resolved by ``getattr`` on ``torch``/``operator``/``math`` only and must
be operator overloads, higher-order operators or symbolic-shape ops; nothing is imported by
name, and FX sanitizes node names before generating code.

How the safety promise is kept
------------------------------

The file is read once into memory; the same bytes are scanned, hashed and handed to
``torch.export.load`` (no swap between check and use). Without ``trust_pickle``:

1. every pickled member above is scanned statically for the globals it would import
   (``structexport.loader.pickle_globals``), then actually loaded with
   ``torch.load(weights_only=True)``: a payload that loads weights-only imports nothing
   else when torch loads it again (same bytes, same opcodes), so torch's fallback to
   ``weights_only=False`` is never reached and its ``weights_only=False`` loads of
   pickled tensors import nothing outside the allowlist either;
2. opaque and TorchBind objects and AOTInductor members are refused outright (they are
   code by design);
3. every ``expr_str`` must parse as a plain sympy expression (calls of sympy's and
   torch's symbolic functions, numbers, symbol names -- no attributes, subscripts,
   lambdas or other names), and every guard as a shape comparison (``L['x'].size()[i]``,
   numbers, arithmetic, comparisons, ``max``/``min``/``abs``/``int``/``math.floor``-like
   numeric functions -- the guard's namespace holds ``torch`` and Python's builtins, so no
   other name may appear).

Anything else is refused with :class:`~structexport.errors.UnsafeCheckpointError`
(exit 15) naming what would be imported or run, and the ``--trust-pickle`` flag.
"""
from __future__ import annotations

import ast
import hashlib
import io
import json
import logging
import re
import warnings
import zipfile
from pathlib import Path

from structexport import errors as E
from structexport.frontends.base import (Frontend, InputSpec, SourceModel, check_input_names,
                                         check_module_runs, first_line,
                                         shape_text, zip_names)
from structexport.loader import SAFE_GLOBAL, pickle_globals

_PT2_NAME = re.compile(r"(^|/)(archive_format|serialized_exported_program\.json)$|"
                       r"(^|/)models/[^/]+\.json$|(^|/)data/(weights/weight_\d+|sample_inputs/)")
_LEGACY_PICKLES = ("serialized_state_dict.pt", "serialized_constants.pt",
                   "serialized_example_inputs.pt")
_TRAINING_OPS = ("_native_batch_norm_legit_functional", "native_dropout")


def is_export_archive(names: list[str] | None) -> bool:
    return bool(names) and any(_PT2_NAME.search(n) for n in names)


# ---------------------------------------------------------------------------- the scan

class _Refusal(Exception):
    """What would run, and where: turned into one UnsafeCheckpointError."""


_SYMPY_CALLS = {
    "Symbol", "Dummy", "Integer", "Rational", "Float", "Add", "Mul", "Pow", "Mod", "Max",
    "Min", "Abs", "floor", "ceiling", "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge",
    "Equality", "Unequality", "StrictLessThan", "StrictGreaterThan", "LessThan",
    "GreaterThan", "And", "Or", "Not", "Xor", "Piecewise", "ExprCondPair", "Tuple",
    "Heaviside", "sign", "BooleanTrue", "BooleanFalse", "Half", "One", "Zero",
    "NegativeOne", "Infinity", "NegativeInfinity", "Trunc", "trunc",
    # torch.utils._sympy.functions (the deserializer's own table, and its opaque unary fns)
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt",
    "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv",
    "IntTrueDiv", "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "BitwiseFn_bitwise_and",
    "BitwiseFn_bitwise_or", "BitwiseFn_bitwise_xor",
}
_SYMPY_NAMES = {"oo", "zoo", "nan", "true", "false", "pi", "E", "S", "True", "False", "None"}
_SYMBOL_NAME = re.compile(r"^[a-z]+\d+$")
_SAFE_STRING = re.compile(r"^[A-Za-z0-9_.+\-]{0,64}$")
_ARITH = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitAnd,
          ast.BitOr, ast.BitXor, ast.LShift, ast.RShift)
_COMPARE = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def _one_expression(text, limit: int, forbidden: str):
    """The parsed expression, or why ``text`` is not one short one-line expression."""
    if not isinstance(text, str) or len(text) > limit or any(c in text for c in forbidden):
        return "not a one-line expression"
    try:
        return ast.parse(text, mode="eval")
    except SyntaxError:
        return "not a Python expression"


def check_sym_expr(text: str) -> str | None:
    """Why ``sympy.sympify(text)`` might do more than build an expression, or None."""
    tree = _one_expression(text, 100_000, "\n\r\\;")
    if isinstance(tree, str):
        return tree

    def bad(node) -> str | None:
        if isinstance(node, ast.Expression):
            return bad(node.body)
        if isinstance(node, ast.Constant):
            if type(node.value) in (int, float, bool) or node.value is None:
                return None
            if isinstance(node.value, str) and _SAFE_STRING.match(node.value):
                return None
            return f"constant {node.value!r}"
        if isinstance(node, ast.Name):
            ok = node.id in _SYMPY_NAMES or node.id in _SYMPY_CALLS or _SYMBOL_NAME.match(node.id) \
                or node.id.startswith("OpaqueUnaryFn_")
            return None if ok else f"name {node.id}"
        if isinstance(node, ast.Call):
            f = node.func
            if not (isinstance(f, ast.Name) and (f.id in _SYMPY_CALLS or f.id.startswith("OpaqueUnaryFn_"))):
                return f"call of {ast.unparse(f)}"
            for arg in node.args:
                if isinstance(arg, ast.Starred):
                    return "starred argument"
            for kw in node.keywords:
                if kw.arg is None:
                    return "** argument"
            return next(filter(None, (bad(a) for a in [*node.args, *(k.value for k in node.keywords)])), None)
        if isinstance(node, ast.BinOp) and isinstance(node.op, _ARITH):
            return bad(node.left) or bad(node.right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not, ast.Invert)):
            return bad(node.operand)
        if isinstance(node, ast.Compare) and all(isinstance(o, _COMPARE) for o in node.ops):
            return bad(node.left) or next(filter(None, map(bad, node.comparators)), None)
        if isinstance(node, ast.BoolOp):
            return next(filter(None, map(bad, node.values)), None)
        if isinstance(node, ast.Tuple):
            return next(filter(None, map(bad, node.elts)), None)
        return f"{type(node).__name__} {ast.unparse(node)[:60]!r}"

    return bad(tree)


_SIZE_METHODS = {"size", "stride", "storage_offset", "dim", "numel"}
_MATH_ATTRS = {"floor", "ceil", "trunc", "isnan", "isinf", "isfinite", "sqrt", "inf"}
# What the printer of torch's shape guards calls: builtins and the two helpers torch puts
# in the guard namespace. (That namespace also holds `torch` and `math`, and builtins
# are reachable from exec'ed code, so every other name is refused.)
_GUARD_CALLS = {"max", "min", "abs", "int", "float", "bool", "round",
                "IsNonOverlappingAndDenseIndicator", "cast_symbool_to_symint_guardless"}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def check_guard(text: str) -> str | None:
    """Why a guard string might do more than compare input sizes, or None.

    Guards are pasted into ``def _(*args): torch._assert(<guard>, "Guard failed: ...")``
    and exec'ed, so they must be one expression over ``L['name']...size()[i]``, numbers,
    arithmetic, comparisons and a few numeric functions."""
    tree = _one_expression(text, 10_000, "\n\r\\;\"#")
    if isinstance(tree, str):
        return tree

    def bad(node) -> str | None:
        if isinstance(node, ast.Expression):
            return bad(node.body)
        if isinstance(node, ast.Constant):
            return None if type(node.value) in (int, float, bool) or node.value is None \
                else f"constant {node.value!r}"
        if isinstance(node, ast.Name):
            return None if node.id in ("L", "inf") else f"name {node.id}"
        if isinstance(node, ast.Subscript):
            index = node.slice
            if isinstance(index, ast.Constant) and (type(index.value) is int or (
                    isinstance(index.value, str) and _IDENT.match(index.value))):
                return bad(node.value)
            return f"subscript {ast.unparse(node)[:60]!r}"
        if isinstance(node, ast.Attribute):
            if isinstance(node.value, ast.Name) and node.value.id == "math":
                return None if node.attr in _MATH_ATTRS else f"math.{node.attr}"
            return None if node.attr == "shape" else f"attribute .{node.attr}"
        if isinstance(node, ast.Call):
            f = node.func
            if any(isinstance(a, ast.Starred) for a in node.args) or node.keywords:
                return "keyword or starred argument"
            if isinstance(f, ast.Name) and f.id in _GUARD_CALLS:
                pass
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id == "math" \
                    and f.attr in _MATH_ATTRS:
                pass
            elif isinstance(f, ast.Attribute) and f.attr in _SIZE_METHODS:
                problem = bad(f.value)
                if problem:
                    return problem
            else:
                return f"call of {ast.unparse(f)[:60]}"
            return next(filter(None, map(bad, node.args)), None)
        if isinstance(node, ast.BinOp) and isinstance(node.op, _ARITH):
            return bad(node.left) or bad(node.right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
            return bad(node.operand)
        if isinstance(node, ast.Compare) and all(isinstance(o, _COMPARE) for o in node.ops):
            return bad(node.left) or next(filter(None, map(bad, node.comparators)), None)
        if isinstance(node, ast.BoolOp):
            return next(filter(None, map(bad, node.values)), None)
        return f"{type(node).__name__} {ast.unparse(node)[:60]!r}"

    return bad(tree)


def _walk_json(obj, found: dict[str, list]):
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "expr_str":
                found["expr"].append(value)
            elif key == "guards_code" and isinstance(value, list):
                found["guards"].extend(value)
            else:
                _walk_json(value, found)
    elif isinstance(obj, list):
        for value in obj:
            _walk_json(value, found)


def _payload_globals(data: bytes) -> list[str]:
    """Globals a pickled member would import: a torch.save zip (every ``.pkl`` in it) or
    a bare pickle."""
    if data.startswith(b"PK\x03\x04"):
        out = []
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            for name in inner.namelist():
                if name.endswith(".pkl"):
                    out += pickle_globals(inner.read(name))
        return out
    return pickle_globals(data)


def _weights_only_load(data: bytes):
    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def scan_archive(data: bytes, path: Path, trust_pickle: bool) -> list[str]:
    """Check a ``.pt2`` archive before ``torch.export.load`` sees it (see the module
    docstring). Returns notes; raises ExportArchiveError for a damaged archive and, unless
    ``trust_pickle``, UnsafeCheckpointError for anything that would run code."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
        infos = z.infolist()
    except Exception:
        raise _truncated(path) from None
    names = [i.filename for i in infos]
    if not is_export_archive(names):
        raise E.ExportArchiveError(f"{path} is a zip archive but not a torch.export archive "
                                   "(no models/*.json, archive_format or serialized program)",
                                   "save the program with torch.export.save")
    roots = {n.split("/", 1)[0] for n in names if "/" in n}
    root = roots.pop() + "/" if len(roots) == 1 and all("/" in n for n in names) else ""

    def read(name: str) -> bytes:
        try:
            return z.read(name)
        except Exception as exc:  # BadZipFile (CRC), zlib errors, EOF
            raise E.ExportArchiveError(f"{path} is damaged: member {name} is unreadable "
                                       f"({first_line(exc)})", "save or copy the archive again") from None

    rel = {n: n[len(root):] for n in names}
    notes: list[str] = []
    refusals: list[str] = []
    raw_payloads: set[str] = set()
    pickled: list[str] = []
    objects: list[str] = []

    programs = [n for n, r in rel.items() if re.fullmatch(r"models/[^/]+\.json", r)]
    programs += [n for n, r in rel.items() if r == "serialized_exported_program.json"]
    if not programs:
        raise E.ExportArchiveError(f"{path} holds no exported program (models/*.json)",
                                   "save the program with torch.export.save")
    for n, r in rel.items():
        m = re.fullmatch(r"data/(weights|constants)/[^/]+_(weights|constants)_config\.json", r)
        if not m:
            continue
        try:
            config = json.loads(read(n)).get("config", {})
        except (ValueError, AttributeError) as exc:
            raise E.ExportArchiveError(f"{path} is damaged: {r} is not valid JSON ({first_line(exc)})",
                                       "save or copy the archive again") from None
        for meta in config.values():
            member = f"{root}data/{m.group(1)}/{meta.get('path_name', '')}"
            if meta.get("path_name", "").startswith(("custom_obj_", "opaque_obj_")):
                objects.append(member)
            elif meta.get("use_pickle"):
                pickled.append(member)
            else:
                raw_payloads.add(member)

    for n, r in rel.items():
        if n.endswith("/") or n in raw_payloads or n in pickled or n in objects or \
                r.startswith("extra/"):  # extra files are read as text, never unpickled
            continue
        if r.startswith("data/aotinductor/"):
            refusals.append(f"AOTInductor native code ({r}) that torch.export.load loads with dlopen")
        elif re.fullmatch(r"data/constants/(custom_obj|opaque_obj)_\d+", r):
            objects.append(n)
        elif r.startswith("data/sample_inputs/") or r.endswith((".pt", ".pkl")) or r in _LEGACY_PICKLES:
            pickled.append(n)
        elif r.startswith(("data/weights/", "data/constants/")) and not r.endswith(".json"):
            # not in any config: torch never reads it, but a pickle here is suspicious
            head = read(n)[:4]
            if head[:1] == b"\x80" or head == b"PK\x03\x04":
                pickled.append(n)

    missing = [n for n in pickled + objects + sorted(raw_payloads) if n not in rel]
    if missing:
        raise E.ExportArchiveError(f"{path} is incomplete: member {missing[0][len(root):]} is "
                                   "missing", "save or copy the archive again")
    for n in objects:
        try:
            what = sorted({g for g in _payload_globals(read(n)) if not SAFE_GLOBAL.match(g)})
        except Exception:
            what = []
        kind = "TorchBind object" if "custom_obj_" in n else "pickled Python object"
        refusals.append(f"a {kind} ({rel[n]}{': ' + ', '.join(what[:3]) if what else ''})")
    for n in pickled:
        payload = read(n)
        try:
            unsafe = sorted({g for g in _payload_globals(payload) if not SAFE_GLOBAL.match(g)})
        except Exception as exc:
            raise E.ExportArchiveError(f"{path} is damaged: {rel[n]} is not a readable pickle "
                                       f"({first_line(exc)})", "save or copy the archive again") from None
        if unsafe:
            refusals.append(f"a pickle that imports {', '.join(unsafe[:3])} ({rel[n]})")
            continue
        try:
            _weights_only_load(payload)
        except Exception as exc:
            message = str(exc)
            if "weights_only" in message.lower() or "Unsupported global" in message or "GLOBAL" in message:
                found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", message)))
                refusals.append(f"a pickle that needs full unpickling ({rel[n]}"
                                f"{': ' + ', '.join(found[:3]) if found else ''})")
            else:
                raise E.ExportArchiveError(f"{path} is damaged: {rel[n]} does not load "
                                           f"({first_line(exc)})", "save or copy the archive again") from None

    for n in programs:
        try:
            program = json.loads(read(n))
        except ValueError as exc:
            raise E.ExportArchiveError(f"{path} is damaged: {rel[n]} is not valid JSON "
                                       f"({first_line(exc)})", "save or copy the archive again") from None
        found: dict[str, list] = {"expr": [], "guards": []}
        _walk_json(program, found)
        for text in found["expr"]:
            why = check_sym_expr(text)
            if why:
                refusals.append(f"a symbolic shape {str(text)[:60]!r} that sympy would evaluate as "
                                f"Python ({why})")
                break
        bad_guards = [(t, why) for t in found["guards"] for why in [check_guard(t)] if why]
        if bad_guards:
            text, why = bad_guards[0]
            refusals.append(f"a guard {str(text)[:60]!r} that module() would exec as Python ({why})")
        elif found["guards"]:
            notes.append(f"{len(found['guards'])} input guards checked: shape comparisons only")

    if refusals and not trust_pickle:
        more = f" (and {len(refusals) - 1} more)" if len(refusals) > 1 else ""
        raise E.UnsafeCheckpointError(
            f"{path} would run code when loaded: it holds {refusals[0]}{more}; refused by default",
            "pass --trust-pickle only if you trust where the file came from")
    if refusals:
        notes.append(f"--trust-pickle: loaded although it holds {refusals[0]}")
    if pickled:
        notes.append(f"{len(pickled)} pickled members checked: weights-only "
                     f"({', '.join(sorted(rel[n] for n in pickled))[:120]})")
    return notes


def _truncated(path: Path) -> E.ExportArchiveError:
    return E.ExportArchiveError(f"{path} is a truncated or damaged torch.export archive: its "
                                "zip directory is unreadable", "save or copy the archive again")


# ---------------------------------------------------------------------------- loading

class _Capture(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.errors: list[BaseException] = []

    def emit(self, record):
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


def _export_load(data: bytes, path: Path):
    import torch
    capture = _Capture()
    # torch.export.load logs the tracebacks it recovers from (and torch's log formatter
    # trips over some of them): keep them off the terminal, and keep the first error.
    tops = [logging.getLogger(n) for n in ("torch.export", "torch._export")]
    loggers = tops + [lg for n, lg in list(logging.root.manager.loggerDict.items())
                      if isinstance(lg, logging.Logger) and n.startswith(("torch.export.", "torch._export."))]
    saved = [(lg.propagate, lg.level, list(lg.handlers)) for lg in loggers]
    for lg in loggers:
        for h in list(lg.handlers):
            lg.removeHandler(h)
        lg.propagate = lg not in tops
    for lg in tops:
        lg.addHandler(capture)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(io.BytesIO(data))
    except (KeyboardInterrupt, E.StructExportError):
        raise
    except BaseException as exc:
        cause = capture.errors[0] if capture.errors else exc
        raise E.ExportArchiveError(f"torch.export.load cannot read {path}: {first_line(cause)}",
                                   "save it again with torch.export.save (from this torch "
                                   f"version, {torch.__version__})") from None
    finally:
        for lg, (propagate, level, handlers) in zip(loggers, saved):
            lg.removeHandler(capture)
            for h in handlers:
                lg.addHandler(h)
            lg.propagate = propagate
            lg.setLevel(level)


def _program_inputs(ep, input_shape, path: Path, notes: list[str], named: dict | None = None,
                    values: dict | None = None) -> list[InputSpec]:
    """Every tensor input of the program with its fixed shape and dtype: ``named`` shapes
    (``--input-shape NAME=...``), the shapes of ``values`` (``--inputs``), the bare
    ``input_shape`` for the first; else the program's own static sizes."""
    import torch
    named, values = dict(named or {}), dict(values or {})
    user_inputs = list(ep.graph_signature.user_inputs)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    tensors = []
    for candidate in user_inputs:
        node = placeholders.get(candidate)
        v = node.meta.get("val") if node is not None else None
        if isinstance(v, torch.Tensor):
            tensors.append((candidate, v))
    if not tensors:
        raise E.ExportArchiveError(f"{path}: the exported program takes no tensor input",
                                   "export the model with an example input tensor")
    check_input_names(named, [n for n, _ in tensors], "the program")
    try:
        args = ep.example_inputs[0] if ep.example_inputs else ()
    except Exception:
        args = ()
    several = len(tensors) > 1
    specs = []
    for index, (name, val) in enumerate(tensors):
        example = None
        if index < len(args) and isinstance(args[index], torch.Tensor):
            example = tuple(int(d) for d in args[index].shape)
        given = named.get(name)
        if given is None and name in values:
            given = tuple(values[name].shape)
        if given is None and index == 0:
            given = input_shape
        shape = _fix_program_input(ep, name, val, given, example, notes, several)
        specs.append(InputSpec(name, shape, str(val.dtype).removeprefix("torch.")))
    return specs


def _fix_program_input(ep, name, val, given, example, notes, several: bool) -> tuple[int, ...]:
    def flag(dims):
        shape = _suggest(dims, example)
        return (f"pass --input-shape {name}={shape} (one --input-shape NAME=SIZES per input)"
                if several else f"pass --input-shape {shape}")
    dims = []
    for axis, d in enumerate(val.shape):
        if isinstance(d, int):
            dims.append(d)
            continue
        rng = ep.range_constraints.get(d.node.expr) if hasattr(d, "node") else None
        low = _bound(rng.lower) if rng is not None else None
        high = _bound(rng.upper) if rng is not None else None
        dims.append((str(d), low, high))
    if given is not None:
        if len(given) != len(dims):
            raise E.InputDimensionError(
                f"input {name!r} has {len(dims)} dimensions, --input-shape gives {len(given)}",
                f"pass {len(dims)} sizes: " + flag(dims).removeprefix("pass "))
        for axis, (d, g) in enumerate(zip(dims, given)):
            if isinstance(d, int) and d != g:
                raise E.InputDimensionError(f"input {name!r} has dimension {axis} fixed to {d}, "
                                            f"--input-shape gives {g}", flag(dims))
            if isinstance(d, tuple) and ((d[1] is not None and g < d[1]) or (d[2] is not None and g > d[2])):
                raise E.InputDimensionError(
                    f"input {name!r} dimension {axis} ({d[0]}) must lie in {d[1]}..{d[2] or 'inf'}, "
                    f"--input-shape gives {g}", flag(dims))
        return tuple(given)
    dynamic = [a for a, d in enumerate(dims) if not isinstance(d, int)]
    if dynamic == [0] and (dims[0][1] or 0) <= 1 <= (dims[0][2] or 1):
        notes.append(f"input {name!r} has a dynamic batch dimension ({dims[0][0]}): fixed to 1 "
                     "(pass --input-shape to choose)")
        return (1, *dims[1:])
    if dynamic:
        d = dims[dynamic[-1] if dynamic[0] == 0 and len(dynamic) > 1 else dynamic[0]]
        axis = dims.index(d)
        span = f", {d[1]}..{d[2] if d[2] is not None else 'inf'}" if d[1] is not None else ""
        seen = f" (the example input was {shape_text(example)})" if example else ""
        raise E.InputDimensionError(
            f"input {name!r} has dimension {axis} dynamic ({d[0]}{span}){seen}", flag(dims))
    return tuple(dims)


def _bound(value) -> int | None:
    """A finite range bound as an int; None for (torch's or sympy's) infinity."""
    if "oo" in str(value):
        return None
    try:
        return int(value)
    except Exception:
        return None


def _suggest(dims, example) -> str:
    out = []
    for axis, d in enumerate(dims):
        if isinstance(d, int):
            out.append(d)
        elif axis == 0:
            out.append(1)
        elif example and axis < len(example):
            out.append(example[axis])
        else:
            out.append(d[1] or 224)
    return shape_text(out)


class TorchExportFrontend(Frontend):
    name = "torch-export"
    family = "torch-export"
    title = "a torch.export archive"
    suffixes = (".pt2",)

    def sniff(self, path: Path, head: bytes) -> bool:
        return is_export_archive(zip_names(path, head))

    def load(self, path: Path, *, input_shape=None, trust_pickle: bool = False,
             input_shapes: dict | None = None, input_values: dict | None = None, **_) -> SourceModel:
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        if not data.startswith(b"PK\x03\x04"):
            raise E.ExportArchiveError(f"{path} is not a torch.export archive (it starts with "
                                       f"{data[:8]!r}, not a zip header)",
                                       "pass a file written by torch.export.save")
        notes = scan_archive(data, path, trust_pickle)
        ep = _export_load(data, path)
        specs = _program_inputs(ep, input_shape, path, notes, input_shapes, input_values)
        name, shape = specs[0].name, specs[0].shape
        values = {k: v for k, v in (input_values or {}).items() if k in {s.name for s in specs}}
        try:
            module = ep.module()
        except Exception as exc:
            raise E.ExportArchiveError(f"{path}: ExportedProgram.module() fails: {first_line(exc)}",
                                       "save the program again with torch.export.save") from None
        # ep.module() refuses .eval(): its graph fixed train/eval behaviour at export time.
        for sub in module.modules():
            sub.training = False
        targets = {str(getattr(n.target, "__name__", n.target)) for n in ep.graph.nodes
                   if n.op == "call_function"}
        training = sorted(t for t in targets if any(op in t for op in _TRAINING_OPS))
        if training:
            notes.append(f"the program was exported in training mode ({', '.join(training)}): "
                         "batch norm and dropout behave as in training; export it from model.eval()")
        check_module_runs(module, specs if len(specs) > 1 else shape, f"the exported program in {path.name}",
                          values)
        notes.append(f"exported program: {sum(1 for n in ep.graph.nodes if n.op == 'call_function')} "
                     f"operator calls, {len(ep.state_dict)} weights; "
                     + ", ".join(f"input {s.name!r} {shape_text(s.shape)}" for s in specs))
        return SourceModel(format="torch-export", path=str(path), sha256=sha, name=path.stem,
                           input_shape=shape, module=module, notes=notes, input_name=name,
                           metadata={"weights": len(ep.state_dict), "constants": len(ep.constants)},
                           inputs=specs, values=values)
