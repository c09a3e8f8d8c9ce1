"""ONNX models from any exporter (torch's dynamo and TorchScript-based exporters,
tf2onnx, paddle2onnx, ...), opset 11 and newer.

The file is parsed with ``onnx`` (external data is read from beside the model, and only
from there), checked with ``onnx.checker``, its dynamic input dimensions are fixed from
``--input-shape`` (a symbolic batch dimension alone defaults to 1), shapes are inferred,
and the model is run once under ONNX Runtime with graph optimizations off. The graph is
not rewritten: weights in initializers and in ``Constant`` nodes both stay where they are;
only the dimensions of inputs, outputs and value infos are fixed.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from structexport import errors as E
from structexport.frontends.base import (Frontend, InputSpec, SourceModel, check_input_names, first_line,
                                         shape_text)

MIN_OPSET = 11
# ModelProto's fields and their protobuf wire types (0 varint, 2 length-delimited).
_MODEL_FIELDS = {1: 0, 2: 2, 3: 2, 4: 2, 5: 0, 6: 2, 7: 2, 8: 2, 14: 2, 20: 2, 25: 2}
_STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft", "ai.onnx.training",
                     "ai.onnx.preview.training")


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    value = shift = 0
    while pos < len(data) and shift < 64:
        b = data[pos]
        value |= (b & 0x7F) << shift
        pos += 1
        if not b & 0x80:
            return value, pos
        shift += 7
    return None


def looks_like_onnx(head: bytes, size: int) -> bool:
    """A serialized ModelProto: ``ir_version`` first (protobuf writes fields in number
    order), then only ModelProto fields with the right wire types and plausible lengths."""
    if len(head) < 4 or head[0] != 0x08:
        return False
    pos, fields = 0, 0
    while pos < len(head):
        tag = _varint(head, pos)
        if tag is None:
            break
        key, pos = tag
        number, wire = key >> 3, key & 7
        if _MODEL_FIELDS.get(number) != wire:
            return False
        if wire == 0:
            value = _varint(head, pos)
            if value is None:
                break
            if number == 1 and not 1 <= value[0] <= 64:
                return False
            pos = value[1]
        else:
            length = _varint(head, pos)
            if length is None:
                break
            if length[1] + length[0] > size:  # runs past the end: truncated, if ONNX at all
                return fields >= 2
            pos = length[1] + length[0]
        fields += 1
    return fields >= 2 or (fields == 1 and size == len(head))


# ---------------------------------------------------------------------------- tensors

def _all_tensors(graph):
    """Every TensorProto of a graph: initializers, Constant-node and other attributes,
    sparse initializers, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values
                yield attr.sparse_tensor.indices
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for g in attr.graphs:
                yield from _all_tensors(g)


def _load_external_data(model, path: Path, notes: list[str]) -> list[str]:
    """Check then load every external-data reference; returns the files read."""
    from onnx import external_data_helper as xdh
    base = path.parent.resolve()
    refs = {}
    for tensor in _all_tensors(model.graph):
        if not xdh.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        end = int(info.get("offset") or 0) + int(info.get("length") or 0)
        refs.setdefault(location, []).append((tensor.name, end))
    for location, tensors in refs.items():
        target = (base / location).resolve() if location else base
        if not location or Path(location).is_absolute() or ".." in Path(location).parts or \
                (base not in target.parents):
            raise E.OnnxExternalDataError(
                f"{path} keeps tensor {tensors[0][0]} in {location!r}, which is not a file "
                f"beside the model", "re-save the model with its external data next to it")
        if not target.is_file():
            raise E.OnnxExternalDataError(
                f"{path} keeps {len(tensors)} tensors (first: {tensors[0][0]}) in external "
                f"data file {location!r}, which is missing from {base}",
                f"copy {location} next to {path.name}")
        size = target.stat().st_size
        short = [(n, end) for n, end in tensors if end > size]
        if short:
            raise E.OnnxExternalDataError(
                f"external data file {location!r} of {path.name} is truncated: tensor "
                f"{short[0][0]} needs {short[0][1]} bytes, the file has {size}",
                f"copy {location} again")
    if refs:
        try:
            xdh.load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise E.OnnxExternalDataError(f"cannot read the external data of {path}: "
                                          f"{first_line(exc)}", "copy the model's data files again") from None
        notes.append(f"external data loaded from {', '.join(sorted(refs))} "
                     f"({sum(len(t) for t in refs.values())} tensors)")
    return sorted(refs)


# ---------------------------------------------------------------------------- dimensions

def _dims(value_info) -> list:
    """Each dimension as an int (fixed), a str (symbolic) or None (unknown)."""
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return []
    out = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        elif d.HasField("dim_param") and d.dim_param:
            out.append(d.dim_param)
        else:
            out.append(None)
    return out


def _suggestion(dims: list) -> str:
    fill = [d if isinstance(d, int) else (1 if i == 0 else 224) for i, d in enumerate(dims)]
    return shape_text(fill)


def _dim_label(dims: list, axis: int) -> str:
    d = dims[axis]
    return f"{d!r} (axis {axis})" if isinstance(d, str) and d != "?" else f"{axis} (no size or name)"


def _given_shapes(inputs, input_shape, named: dict, values: dict) -> dict[str, tuple[int, ...]]:
    """The shape each input is given: ``--input-shape NAME=...``, the shape of its array in
    ``--inputs``, or the bare ``--input-shape`` for the first input."""
    names = [vi.name for vi in inputs]
    check_input_names(named, names, "the model")
    ranks = {vi.name: len(_dims(vi)) for vi in inputs}
    given = {n: tuple(np_shape) for n, np_shape in ((n, getattr(values.get(n), "shape", None))
                                                     for n in names)
             if np_shape is not None and len(np_shape) == ranks[n]}
    given.update(named)
    if input_shape is not None and names[0] not in named:
        given[names[0]] = tuple(input_shape)
    return given


def _flag_for(name: str, dims: list, several: bool, unknown: bool = False) -> str:
    """How to give the shape of input ``name``."""
    if not several:
        sizes = " with the size the model was trained at for each unknown dimension, e.g." if unknown else ""
        return f"pass --input-shape{sizes} {_suggestion(dims)}"
    sizes = " with the size the model was trained at for each unknown dimension" if unknown else ""
    return (f"pass --input-shape {name}={_suggestion(dims)}{sizes} (one --input-shape NAME=SIZES per "
            f"input), or, for convert, its values in --inputs FILE.npz as an array named {name!r}")


def _fix_inputs(model, inputs, input_shape, notes, named: dict | None = None,
                values: dict | None = None) -> tuple[list[tuple[int, ...]], bool]:
    """Fix every dimension of the real inputs. Returns their shapes and whether any
    dimension came from a given shape or a default (so a failure may be the shape's). A
    symbolic dimension one given input fixes (``batch``) is fixed alike in the others."""
    given_shapes = _given_shapes(inputs, input_shape, named or {}, values or {})
    several = len(inputs) > 1
    symbols: dict[str, int] = {}
    for vi in inputs:
        if vi.name in given_shapes:
            for d, g in zip(_dims(vi), given_shapes[vi.name]):
                if isinstance(d, str) and d:
                    symbols.setdefault(d, g)
    shapes, chosen = [], False
    for index, vi in enumerate(inputs):
        dims = _dims(vi)
        given = given_shapes.get(vi.name)
        if not vi.type.tensor_type.HasField("shape"):
            if given is not None:
                dims = [None] * len(given)
            else:
                raise E.InputDimensionError(f"input {vi.name!r} has no shape at all",
                                            _flag_for(vi.name, [1, 3, 224, 224], several))
        if given is not None:
            if len(given) != len(dims):
                raise E.InputDimensionError(
                    f"input {vi.name!r} has {len(dims)} dimensions, --input-shape gives "
                    f"{len(given)} ({shape_text(given)})",
                    f"pass {len(dims)} sizes: " + _flag_for(vi.name, dims, several).removeprefix("pass "))
            for axis, (d, g) in enumerate(zip(dims, given)):
                if isinstance(d, int) and d != g:
                    raise E.InputDimensionError(
                        f"input {vi.name!r} has dimension {axis} fixed to {d}, --input-shape "
                        f"gives {g}", _flag_for(vi.name, dims, several))
            fixed = list(given)
            if any(not isinstance(d, int) for d in dims):
                chosen = True
        else:
            dims = [symbols.get(d, d) if isinstance(d, str) else d for d in dims]
            unknown = [a for a, d in enumerate(dims) if not isinstance(d, int)]
            if unknown == [0]:
                fixed = [1] + dims[1:]
                chosen = True
                notes.append(f"input {vi.name!r} has a symbolic batch dimension "
                             f"{_dim_label(dims, 0)}: fixed to 1 (pass --input-shape to choose)")
            elif unknown:
                axis = unknown[0] if unknown[0] != 0 else unknown[1]
                declared = "[" + ", ".join(str(d) if isinstance(d, int) else (d or "?") for d in dims) + "]"
                raise E.InputDimensionError(
                    f"input {vi.name!r} (declared {declared}) has dimension {_dim_label(dims, axis)} "
                    f"unknown",
                    _flag_for(vi.name, dims, several, unknown=True))
            else:
                fixed = dims
        shape_proto = vi.type.tensor_type.shape
        del shape_proto.dim[:]
        for size in fixed:
            shape_proto.dim.add().dim_value = size
        shapes.append(tuple(fixed))
    return shapes, chosen


def _clear_symbolic(value_infos) -> None:
    for vi in value_infos:
        t = vi.type.tensor_type
        if t.HasField("shape"):
            for d in t.shape.dim:
                if not (d.HasField("dim_value") and d.dim_value > 0):
                    d.Clear()


def _all_fixed(vi) -> bool:
    t = vi.type.tensor_type
    return t.HasField("shape") and all(isinstance(d, int) for d in _dims(vi))


# ---------------------------------------------------------------------------- ORT

_ORT_NO_KERNEL = re.compile(r"Could not find an implementation for (\w+)\((\d+)\) node with name '([^']*)'")
_ORT_NO_OP = re.compile(r"([\w.]*):(\w+)\((-?\d+)\) is not a registered function/op")
_NO_SCHEMA = re.compile(r"No Op registered for (\w+) with domain_version of (\d+)")


def _operator_error(path: Path, model, message: str) -> E.StructExportError | None:
    m = _ORT_NO_KERNEL.search(message)
    if m:
        op, version, node = m.groups()
        types = ""
        for n in model.graph.node:
            if n.op_type == op and (not node or n.name == node):
                types = _input_types(model, n)
                break
        return E.OnnxOperatorUnsupportedError(
            f"{path} uses operator {op} (opset {version}{', ' + types if types else ''}"
            f"{', node ' + repr(node) if node else ''}), which ONNX Runtime has no "
            "implementation for", "re-export without that operator or with other input types")
    m = _ORT_NO_OP.search(message)
    if m:
        domain, op, _ = m.groups()
        return E.OnnxOperatorUnsupportedError(
            f"{path} uses operator {op} of domain {domain!r}, which ONNX Runtime does not know",
            "re-export with standard ONNX operators (or register the custom op library)")
    m = _NO_SCHEMA.search(message)
    if m:
        op, version = m.groups()
        return E.OnnxOperatorUnsupportedError(
            f"{path} uses operator {op}, which opset {version} of ONNX does not define",
            "re-export the model; check the operator's name and the opset")
    if "NOT_IMPLEMENTED" in message:
        return E.OnnxOperatorUnsupportedError(
            f"ONNX Runtime cannot run {path}: {message.splitlines()[0][:200]}",
            "re-export with operators ONNX Runtime implements")
    return None


def _input_types(model, node) -> str:
    from onnx import helper
    types = {vi.name: vi.type.tensor_type.elem_type
             for vi in list(model.graph.input) + list(model.graph.value_info)}
    names = [helper.tensor_dtype_to_np_dtype(types[i]).name for i in node.input if types.get(i)]
    return f"input type {names[0]}" if names else ""


def _random_feed(vi, shape, seed, values: dict | None = None):
    import numpy as np
    from onnx import helper
    dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
    if values and vi.name in values:
        return np.asarray(values[vi.name]).astype(dtype, copy=False)
    rng = np.random.default_rng(seed)
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    return np.zeros(shape, dtype=dtype)


def _run_under_ort(path: Path, model, inputs, shapes, chosen: bool, values: dict | None = None):
    from structexport.ortsession import ort_session
    try:
        session = ort_session(model.SerializeToString(), optimize=False)
    except Exception as exc:
        message = str(exc)
        err = _operator_error(path, model, message)
        if err is not None:
            raise err from None
        if chosen and ("ShapeInferenceError" in message or "shape" in message.lower()):
            raise E.InputDimensionError(
                f"{path} does not fit input shape {shape_text(shapes[0])}: {first_line(exc)}",
                "pass the --input-shape the model was exported for") from None
        raise E.InvalidOnnxModelError(f"ONNX Runtime cannot load {path}: {first_line(exc)}",
                                      "re-export the model") from None
    feeds = {vi.name: _random_feed(vi, shape, i, values) for i, (vi, shape) in enumerate(zip(inputs, shapes))}
    try:
        return session.run(None, feeds)
    except Exception as exc:
        err = _operator_error(path, model, str(exc))
        if err is not None:
            raise err from None
        if chosen:
            raise E.InputDimensionError(
                f"{path} does not run on input shape {shape_text(shapes[0])}: {first_line(exc)}",
                "pass the --input-shape the model was exported for") from None
        raise E.InvalidOnnxModelError(f"{path} fails under ONNX Runtime: {first_line(exc)}",
                                      "re-export the model") from None


# ---------------------------------------------------------------------------- front end

class OnnxFrontend(Frontend):
    name = "onnx"
    family = "onnx"
    title = "an ONNX model"
    suffixes = (".onnx",)

    def sniff(self, path: Path, head: bytes) -> bool:
        try:
            size = path.stat().st_size
        except OSError:
            size = len(head)
        return looks_like_onnx(head, size)

    def load(self, path: Path, *, input_shape=None, input_shapes: dict | None = None,
             input_values: dict | None = None, **_) -> SourceModel:
        import onnx
        notes: list[str] = []
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        try:
            model = onnx.load_model_from_string(data)
        except Exception as exc:
            raise E.InvalidOnnxModelError(
                f"{path} is not a readable ONNX model: it is truncated or not ONNX "
                f"({first_line(exc)})", "export or copy the model again") from None
        if not model.ir_version or not model.HasField("graph") or not model.graph.node:
            raise E.InvalidOnnxModelError(f"{path} holds no ONNX graph (truncated, or not an "
                                          "ONNX model)", "export or copy the model again")
        opsets = {(o.domain or "ai.onnx"): o.version for o in model.opset_import}
        opset = opsets.get("ai.onnx")
        if opset is not None and opset < MIN_OPSET:
            raise E.UnsupportedOnnxOpsetError(
                f"{path} uses ONNX opset {opset}; structexport reads opset {MIN_OPSET} and newer",
                f"re-export with opset_version>={MIN_OPSET}, or convert it with "
                "onnx.version_converter.convert_version(model, 13)")
        external = _load_external_data(model, path, notes)
        self._check(model, path)

        initializers = {t.name for t in model.graph.initializer}
        inputs = [vi for vi in model.graph.input if vi.name not in initializers]
        if not inputs:
            raise E.InvalidOnnxModelError(f"{path} has no graph inputs", "export the model with its input")
        shapes, chosen = _fix_inputs(model, inputs, input_shape, notes, input_shapes, input_values)
        _clear_symbolic(list(model.graph.output) + list(model.graph.value_info))
        try:
            model = onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True,
                                                      data_prop=True)
        except Exception as exc:
            if chosen:
                raise E.InputDimensionError(
                    f"{path} does not fit input shape {shape_text(shapes[0])}: {first_line(exc)}",
                    "pass the --input-shape the model was exported for") from None
            raise E.InvalidOnnxModelError(f"shape inference fails on {path}: {first_line(exc)}",
                                          "re-export the model") from None
        inputs = [vi for vi in model.graph.input if vi.name not in initializers]
        outputs = _run_under_ort(path, model, inputs, shapes, chosen, input_values)
        for vi, value in zip(model.graph.output, outputs):
            if not _all_fixed(vi) and hasattr(value, "shape"):
                shape_proto = vi.type.tensor_type.shape
                del shape_proto.dim[:]
                for size in value.shape:
                    shape_proto.dim.add().dim_value = int(size)
        unfixed = [vi for vi in model.graph.value_info if not _all_fixed(vi)]
        if unfixed:
            keep = [vi for vi in model.graph.value_info if _all_fixed(vi)]
            del model.graph.value_info[:]
            model.graph.value_info.extend(keep)
            notes.append(f"dropped {len(unfixed)} intermediate value infos whose shapes could "
                         f"not be inferred (first: {unfixed[0].name})")
        constants = sum(1 for n in model.graph.node if n.op_type == "Constant")
        custom = sorted({f"{n.domain}:{n.op_type}" for n in model.graph.node
                         if n.domain not in _STANDARD_DOMAINS})
        notes.append(f"ONNX opset {opset}, producer {model.producer_name or 'unknown'} "
                     f"{model.producer_version}".rstrip() +
                     f"; {len(model.graph.initializer)} initializers, {constants} Constant nodes; "
                     f"runs under ONNX Runtime (optimizations off) on input "
                     f"{shape_text(shapes[0])}")
        from onnx import helper
        specs = [InputSpec(vi.name, tuple(shape),
                           helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type).name)
                 for vi, shape in zip(inputs, shapes)]
        return SourceModel(
            format="onnx", path=str(path), sha256=sha, name=path.stem,
            input_shape=shapes[0], onnx=model, notes=notes, input_name=inputs[0].name,
            inputs=specs, values={k: v for k, v in (input_values or {}).items()
                                  if k in {spec.name for spec in specs}},
            metadata={"opset": opset, "opsets": opsets, "ir_version": model.ir_version,
                      "producer": model.producer_name, "producer_version": model.producer_version,
                      "inputs": {vi.name: list(s) for vi, s in zip(inputs, shapes)},
                      "outputs": [vi.name for vi in model.graph.output],
                      "external_data": external, "custom_ops": custom})

    @staticmethod
    def _check(model, path: Path) -> None:
        import onnx
        try:
            if model.ByteSize() < 2**31 - 1:
                onnx.checker.check_model(model)
            else:  # the in-memory checker stops at protobuf's 2 GB limit
                onnx.checker.check_model(os.fspath(path))
        except Exception as exc:
            err = _operator_error(path, model, str(exc))
            if err is not None:
                raise err from None
            raise E.InvalidOnnxModelError(f"onnx.checker rejects {path}: {first_line(exc)}",
                                          "re-export the model") from None
