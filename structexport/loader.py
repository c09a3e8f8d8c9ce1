"""Load a user's checkpoint into a zoo model, safely and exactly.

Reading is weights-only by default: a pickle that would import anything beyond tensors
and plain containers is refused with the flag that allows it (``--trust-pickle``), and
TorchScript archives (which carry code) need ``--allow-torchscript``.

Variant details (CSG slice shape and code size, DenseNet growth rate, structured
``c``/``n``) are inferred from tensor shapes. The shared CSG generator is found by its
role -- a bias-free 2-D weight whose columns match the code vectors -- not by its name,
and its copies must be identical.
"""
from __future__ import annotations

import difflib
import hashlib
import io
import itertools
import json
import math
import os
import pickletools
import re
import struct
import warnings
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from structexport import errors as E
from structexport.fsutil import write_bytes_atomic
from structexport.models.zoo import (ARCHITECTURES, ModelSpec, build_model, csg_site_names,
                                     parse_name)

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "module",
                "model_ema", "ema", "weights", "params")
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
FORMAT_KEY = "structexport_format"
FORMAT_VERSION = "1"


@dataclass
class LoadedCheckpoint:
    model: nn.Module
    arch: str
    path: str
    sha256: str
    source_format: str            # torch-zip | torch-legacy | safetensors | structexport | torchscript
    wrapper_key: str | None = None
    stored_dtypes: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- reading

def check_path(path: Path) -> None:
    if not path.exists():
        raise E.PathNotFoundError(f"no such file: {path}")
    if path.is_dir():
        raise E.IsADirectoryCheckpointError(f"{path} is a directory, not a checkpoint file",
                                            "pass the checkpoint file inside it")
    if path.stat().st_size == 0:
        raise E.EmptyFileError(f"{path} is empty (0 bytes)",
                               "the file was probably not written completely; save it again")


def is_safetensors(head: bytes) -> bool:
    """An 8-byte little-endian header length, then a JSON object (it may be truncated)."""
    if len(head) < 10:
        return False
    n = struct.unpack("<Q", head[:8])[0]
    return 2 <= n <= 100_000_000 and head[8:10] in (b'{"', b"{}")


def pickle_globals(data: bytes) -> list[str]:
    """Names a pickle would import, found by a static scan (nothing is executed)."""
    found, strings = [], []
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name == "GLOBAL":
            found.append(str(arg).replace(" ", "."))
        elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
            found.append(f"{strings[-2]}.{strings[-1]}")
        elif isinstance(arg, str):
            strings.append(arg)
    return found


SAFE_GLOBAL = re.compile(r"^(torch\.|collections\.OrderedDict|builtins\.(set|frozenset|bytearray|slice|complex)|"
                          r"_codecs\.encode|numpy\.(core\.)?multiarray\._reconstruct|numpy\.dtype|numpy\.ndarray)")


def unsafe_refusal(path: Path, names: list[str]) -> E.UnsafeCheckpointError:
    shown = ", ".join(sorted(set(names))[:3])
    return E.UnsafeCheckpointError(
        f"{path} needs arbitrary unpickling to load (it imports {shown}); refused by default",
        "pass --trust-pickle only if you trust where the file came from")


def _numpy_data_globals() -> list:
    """NumPy scalars and arrays are data, not code: training scripts often store
    ``acc``/``epoch`` as NumPy values beside the weights. Anything they hold that needs
    another import is still refused."""
    import numpy as np
    core = getattr(np, "_core", None) or np.core
    names = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    names += [getattr(np.dtypes, n) for n in dir(getattr(np, "dtypes", object())) if n.endswith("DType")]
    return names


def _torch_load(path: Path, trust_pickle: bool, is_zip: bool):
    try:
        with warnings.catch_warnings(), torch.serialization.safe_globals(_numpy_data_globals()):
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except (E.StructExportError, KeyboardInterrupt):
        raise
    except BaseException as exc:  # torch raises many types on damaged input
        message = str(exc)
        unsafe = re.findall(r"GLOBAL ([\w.]+)", message)
        if unsafe and not trust_pickle:
            raise unsafe_refusal(path, unsafe) from None
        if "Unsupported operand" in message and not trust_pickle and not is_zip:
            try:
                names = [n for n in pickle_globals(path.read_bytes()) if not SAFE_GLOBAL.match(n)]
            except Exception:
                names = []
            if names:
                raise unsafe_refusal(path, names) from None
        if isinstance(exc, (EOFError, struct.error)) or "EOF" in message or "central directory" in message:
            raise E.CorruptCheckpointError(f"{path} is truncated: the data ends early",
                                           "copy or download the file again") from None
        raise E.CorruptCheckpointError(
            f"{path} is corrupt: {type(exc).__name__}: {message.splitlines()[0][:160] if message else 'unreadable'}",
            "copy or download the file again") from None


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    try:
        tensors = {}
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        return tensors, meta
    except Exception as exc:
        raise E.CorruptCheckpointError(f"{path} is a truncated or corrupt safetensors file: "
                                       f"{str(exc)[:160]}", "copy or save the file again") from None


def read_checkpoint(path: str | os.PathLike, trust_pickle: bool = False,
                    allow_torchscript: bool = False) -> tuple[object, str, dict]:
    """Read a file into a Python object, safely. Returns ``(object, format, metadata)``."""
    path = Path(path)
    check_path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if is_safetensors(head):
        if struct.unpack("<Q", head[:8])[0] > size - 8:
            raise E.CorruptCheckpointError(f"{path} is truncated: its safetensors header ends early",
                                           "copy or save the file again")
        tensors, meta = _read_safetensors(path)
        fmt = "structexport" if meta.get(FORMAT_KEY) else "safetensors"
        return tensors, fmt, meta
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except Exception:  # BadZipFile, NotImplementedError for odd versions, ...
            raise E.CorruptCheckpointError(f"{path} is truncated or corrupt: its zip archive is "
                                           "unreadable", "copy or download the file again") from None
        if any(n.endswith("constants.pkl") or "/code/" in n for n in names):
            if not allow_torchscript:
                raise E.UnsafeCheckpointError(
                    f"{path} is a TorchScript archive, which carries code that runs when loaded; "
                    "refused by default", "pass --allow-torchscript only if you trust it")
            try:
                with warnings.catch_warnings():  # torch.jit.load's deprecation notice
                    warnings.simplefilter("ignore", DeprecationWarning)
                    module = torch.jit.load(str(path), map_location="cpu")
            except Exception as exc:
                raise E.CorruptCheckpointError(f"{path} is a damaged TorchScript archive: "
                                               f"{str(exc).splitlines()[0][:160]}") from None
            return module.state_dict(), "torchscript", {}
        return _torch_load(path, trust_pickle, is_zip=True), "torch-zip", {}
    if head[:1] == b"\x80":
        return _torch_load(path, trust_pickle, is_zip=False), "torch-legacy", {}
    raise E.NotACheckpointError(
        f"{path} is not a checkpoint: not a PyTorch, safetensors or structexport file "
        f"(it starts with {head[:8]!r})", "pass a file written by torch.save or safetensors")


# ---------------------------------------------------------------------------- unwrapping

def _is_tensor_dict(obj) -> bool:
    return isinstance(obj, dict) and len(obj) > 0 and any(isinstance(v, torch.Tensor) for v in obj.values())


def _plain_scalar(value):
    """A JSON-friendly scalar for training metadata (``acc``, ``epoch``), else None."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    if hasattr(value, "item") and getattr(value, "size", None) == 1:  # NumPy scalars
        return value.item()
    if isinstance(value, (bool, int, float, str)):
        return value
    return None


def unwrap_state_dict(obj, path: Path) -> tuple[dict[str, torch.Tensor], str | None, dict]:
    """Find the state dict in a training checkpoint; returns ``(state, wrapper key, extras)``."""
    if isinstance(obj, nn.Module):
        return obj.state_dict(), None, {}
    if not isinstance(obj, dict):
        raise E.NotACheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict",
                                    "pass a file saved from model.state_dict()")
    if _is_tensor_dict(obj) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return dict(obj), None, {}
    candidates = [k for k in WRAPPER_KEYS if k in obj] + [k for k in obj if k not in WRAPPER_KEYS]
    for key in candidates:
        value = obj[key]
        if isinstance(value, nn.Module):
            value = value.state_dict()
        if _is_tensor_dict(value):
            extras = {str(k): _plain_scalar(v) for k, v in obj.items()
                      if k != key and _plain_scalar(v) is not None}
            return {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}, key, extras
    if _is_tensor_dict(obj):
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}, None, {}
    raise E.NotACheckpointError(f"{path} holds a dict without tensors (keys: "
                                f"{', '.join(map(str, list(obj)[:5]))})",
                                "pass a file saved from model.state_dict()")


def strip_prefixes(state: dict[str, torch.Tensor]) -> tuple[dict, list[str]]:
    stripped = []
    changed = True
    while changed and state:
        changed = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                stripped.append(prefix)
                changed = True
    return state, stripped


def check_finite(state: dict[str, torch.Tensor], path: Path) -> list[str]:
    """Refuse NaN anywhere and Inf in weights. An Inf batch-norm running variance (an FP16
    overflow in published checkpoints) is kept: it maps that channel to its BN bias, exactly
    as the source framework computes it. Returns notes about such tensors."""
    bad, notes = [], []
    for key, t in state.items():
        if t.is_floating_point():
            nan, inf = int(torch.isnan(t).sum()), int(torch.isinf(t).sum())
            if inf and not nan and key.endswith("running_var") and bool((t[torch.isinf(t)] > 0).all()):
                notes.append(f"{key} has {inf} +Inf (an FP16 overflow): that channel's BN output "
                             "is its bias, as in the source framework")
            elif nan or inf:
                what = " and ".join(s for s in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if s)
                bad.append(f"{key} ({what})")
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise E.NonFiniteWeightsError(f"{path} has non-finite weights in {len(bad)} tensors: "
                                      f"{', '.join(bad[:5])}{more}",
                                      "the training run diverged; use an earlier checkpoint")
    return notes


# ---------------------------------------------------------------------------- CSG roles

def _leaf(key: str) -> tuple[str, str]:
    module, _, leaf = key.rpartition(".")
    return module, leaf


def find_csg_tensors(state: dict[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """``(generator keys, code keys)`` identified by role and shape.

    Codes are 2-D tensors a block holds directly (not a module's ``weight``/``bias``);
    the generator is a bias-free 2-D ``weight`` whose columns equal the code size.
    """
    modules_with_bias = {_leaf(k)[0] for k in state if _leaf(k)[1] == "bias"}
    codes = [k for k, t in state.items() if t.dim() == 2 and t.is_floating_point()
             and _leaf(k)[1] not in ("weight", "bias") and not _leaf(k)[1].startswith("running")]
    if not codes:
        return [], []
    code_sizes = {state[k].shape[1] for k in codes}
    generators = [k for k, t in state.items() if t.dim() == 2 and _leaf(k)[1] == "weight"
                  and _leaf(k)[0] not in modules_with_bias and t.shape[1] in code_sizes]
    return generators, codes


def canonicalize_csg(state: dict, spec_base: str, path: Path) -> tuple[dict, list[str]]:
    """Collapse generator copies to ``generator.weight`` and name codes as the zoo does."""
    generators, codes = find_csg_tensors(state)
    if not generators:
        return state, []
    notes = []
    first = state[generators[0]]
    for key in generators[1:]:
        other = state[key]
        if other.shape != first.shape or not torch.equal(other, first):
            diff = (float((other.float() - first.float()).abs().max())
                    if other.shape == first.shape else "shape " + str(list(other.shape)))
            raise E.GeneratorMismatchError(
                f"{path}: copies of the shared CSG generator differ ({generators[0]} vs {key}, "
                f"max difference {diff})", "the checkpoint is inconsistent; re-export it from training")
    if len(generators) > 1:
        notes.append(f"shared CSG generator stored {len(generators)} times; the copies are "
                     f"identical, kept one")
    out = {k: v for k, v in state.items() if k not in generators}
    out["generator.weight"] = first
    names = ARCHITECTURES[spec_base].csg_code_names
    for key in codes:
        module, leaf = _leaf(key)
        if module.rpartition(".")[2] in names.values():
            continue  # already the zoo's own name: <conv>.code
        if leaf in names:
            new = ".".join(p for p in (module, names[leaf], "code") if p)
            out[new] = out.pop(key)
    return out, notes


def _infer_slice(generator: torch.Tensor, codes: dict[str, torch.Tensor], model: nn.Module,
                 base: str) -> tuple[int, int, int, int]:
    """The slice shape that yields every layer's number of code vectors."""
    P = generator.shape[0]
    sites = {n: model.get_submodule(n) for n in csg_site_names(model, ARCHITECTURES[base])}
    rows = {}
    for key, t in codes.items():
        site = key[: -len(".code")]
        if site in sites:
            rows[site] = t.shape[0]
    if not rows:
        raise E.ArchitectureMismatchError(f"CSG codes do not sit where {base} has CSG layers",
                                          "check --arch")
    kh = max(sites[s].kernel_size[0] for s in rows)
    kw = max(sites[s].kernel_size[1] for s in rows)
    divisors = [d for d in range(1, P + 1) if P % d == 0]
    fits = []
    for sh, sw in itertools.product(divisors, repeat=2):
        if sh < kh or sw < kw or P % (sh * sw):
            continue
        rest = P // (sh * sw)
        for s0 in (d for d in divisors if rest % d == 0):
            s1 = rest // s0
            if all(math.ceil(sites[s].out_channels / s0) * math.ceil(sites[s].in_channels / s1) == n
                   for s, n in rows.items()):
                fits.append((s0, s1, sh, sw))
    if not fits:
        raise E.ShapeMismatchError(
            f"no CSG slice shape with {P} weights gives the stored number of codes for {base}",
            "check --arch")
    # Prefer the kernel's own spatial size, then square slices.
    return min(fits, key=lambda f: ((f[2], f[3]) != (kh, kw), abs(f[0] - f[1]), f))


# ---------------------------------------------------------------------------- matching

def _pattern(key: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.)", "N", key)


def grouped_keys(keys: list[str], limit: int = 4) -> str:
    counts = Counter(_pattern(k) for k in keys)
    parts = [f"{p} x{n}" if n > 1 else p for p, n in counts.most_common(limit)]
    if len(counts) > limit:
        parts.append(f"... {len(counts) - limit} more kinds")
    return ", ".join(parts)


def key_mismatch(expected: dict, state: dict) -> tuple[list, list, list]:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [(k, list(expected[k].shape), list(state[k].shape)) for k in expected
              if k in state and tuple(expected[k].shape) != tuple(state[k].shape)]
    return missing, unexpected, shapes


# A state dict that fits no zoo name may be the user's own model: name both ways to load it
# (bench and profile take no --model: they take the OUTDIR such a convert writes).
OWN_MODEL = "--model FILE.py:FUNC to convert or inspect it as your own nn.Module"
ARCH_OR_MODEL_HINT = f"pass --arch NAME for a zoo model (see `structexport zoo`), or {OWN_MODEL}"
CHECK_ARCH_HINT = f"check --arch (see `structexport zoo`), or pass {OWN_MODEL}"


def mismatch_error(arch: str, missing, unexpected, shapes, expected_keys,
                   hint: str | None = None) -> E.StructExportError:
    """The grouped, nearest-name error for a state dict that does not fit ``arch`` (a zoo
    name, or any label for a user's model); ``hint`` replaces the ``--arch`` advice."""
    if not missing and not unexpected and shapes:
        key, exp, got = shapes[0]
        more = f" (and {len(shapes) - 1} more tensors)" if len(shapes) > 1 else ""
        return E.ShapeMismatchError(f"shape mismatch for {arch} in layer {key}: expected {exp}, "
                                    f"got {got}{more}", hint or CHECK_ARCH_HINT)
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({grouped_keys(missing)})")
    if unexpected:
        near = difflib.get_close_matches(unexpected[0], expected_keys, n=1, cutoff=0.4)
        nearest = f"; nearest to {unexpected[0]} is {near[0]}" if near else ""
        parts.append(f"{len(unexpected)} unexpected keys ({grouped_keys(unexpected)}{nearest})")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches (first: {shapes[0][0]} expected "
                     f"{shapes[0][1]}, got {shapes[0][2]})")
    return E.ArchitectureMismatchError(f"checkpoint does not match {arch}: " + "; ".join(parts),
                                       hint or CHECK_ARCH_HINT)


def _candidates(spec: ModelSpec, state: dict, path: Path) -> list[tuple[ModelSpec, dict, list]]:
    """Zoo specs the checkpoint may be, each with the state dict renamed for it."""
    bases = [spec.base] + sorted(b for b in ARCHITECTURES if b != spec.base and
                                 _family(b) == _family(spec.base) and _family(b) is not None)
    out = []
    for base in bases:
        s, notes = canonicalize_csg(state, base, path)
        if spec.family != "dense":
            out.append((ModelSpec(base, spec.family, spec.slice_shape, spec.code_size,
                                  spec.frozen, spec.ticket, spec.struct), s, notes))
            continue
        if "generator.weight" in s:
            codes = {k: v for k, v in s.items() if k.endswith(".code")}
            gen = s["generator.weight"]
            try:
                slice_shape = _infer_slice(gen, codes, build_model(base), base)
            except E.StructExportError:
                out.append((ModelSpec(base), s, notes))
                continue
            binary = bool(torch.all(gen.float().abs() == 0.5))
            family = "bcsg" if binary else "csg"
            inferred = ModelSpec(base, family, slice_shape, gen.shape[1])
            out.append((inferred, s, notes + [f"inferred {inferred.name} from tensor shapes "
                                             f"(generator {list(gen.shape)})"]))
        elif any(k.endswith(".alpha") for k in s):
            out += [(ModelSpec(base, "struct", struct=w), s,
                     [f"inferred structured variant {base}-struct-{w} from coefficient shapes"])
                    for w in ("c2n2", "c1n2")]
        else:
            out.append((ModelSpec(base), s, []))
    return out


def _family(base: str) -> str | None:
    """Architectures that differ only in a width read off the weights (DenseNet growth)."""
    m = re.match(r"^(densenet-bc-\d+)-\d+$", base)
    return m.group(1) if m else None


def load_state_into_model(state: dict, spec: ModelSpec, path: Path, seed: int = 0
                          ) -> tuple[nn.Module, ModelSpec, list[str]]:
    best = None
    for cand, s, notes in _candidates(spec, state, path):
        model = build_model(cand, seed)
        expected = model.state_dict()
        missing, unexpected, shapes = key_mismatch(expected, s)
        score = len(missing) + len(unexpected) + len(shapes)
        if best is None or score < best[0]:
            best = (score, cand, model, s, notes, (missing, unexpected, shapes), expected)
        if score == 0:
            break
    score, cand, model, s, notes, problems, expected = best
    if score:
        raise mismatch_error(spec.name if spec.base == cand.base else cand.name, *problems,
                              list(expected))
    if cand.base != spec.base:
        notes.append(f"growth rate read from the weights: this is {cand.base}, not {spec.base}")
    converted = {k: v.to(expected[k].dtype) if v.is_floating_point() else v for k, v in s.items()}
    model.load_state_dict(converted, strict=True)
    _check_ssc_zero_pattern(model, cand)
    return model.eval(), cand, notes


def _check_ssc_zero_pattern(model: nn.Module, spec: ModelSpec) -> None:
    """The SSC mask is a working reading of (p, g): weights it would drop must be zero,
    or the model would silently compute something else than the source."""
    from structexport.layers import SSCConv2d
    off = [(name, int((m.weight.detach() * ~m.mask).count_nonzero()), m.p, m.g)
           for name, m in model.named_modules() if isinstance(m, SSCConv2d)]
    off = [o for o in off if o[1]]
    if off:
        name, count, p, g = off[0]
        raise E.ArchitectureMismatchError(
            f"{len(off)} SSC layers of {spec.name} hold non-zero weights outside their (p, g) "
            f"mask (first: {name}, {count} weights outside p={p} g={g}): the checkpoint follows "
            "another sparsity pattern", f"load it as the dense --arch {spec.base} to keep every weight")


# ---------------------------------------------------------------------------- entry point

def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike, arch: str | None = None, trust_pickle: bool = False,
                    allow_torchscript: bool = False) -> LoadedCheckpoint:
    """Read ``path`` and load it into the zoo model ``arch`` (optional for structexport files)."""
    path = Path(path)
    obj, fmt, meta = read_checkpoint(path, trust_pickle, allow_torchscript)
    state, wrapper, extras = unwrap_state_dict(obj, path) if fmt not in ("safetensors", "structexport") \
        else (obj, None, {})
    notes = []
    if wrapper:
        notes.append(f"state dict taken from the training checkpoint's {wrapper!r} entry")
    state, stripped = strip_prefixes(state)
    if stripped:
        notes.append(f"stripped key prefix {' and '.join(repr(p) for p in stripped)}")
    if not state:
        raise E.NotACheckpointError(f"{path} holds no tensors")
    stored = sorted({str(t.dtype).replace("torch.", "") for t in state.values() if t.is_floating_point()})
    notes += check_finite(state, path)

    saved_name = meta.get("model")
    if arch is None and saved_name is None:
        raise E.UnknownArchitectureError(f"{path} does not say which architecture it holds",
                                         ARCH_OR_MODEL_HINT)
    spec = parse_name(arch or saved_name)
    if saved_name and arch and parse_name(saved_name).base == spec.base and spec.family == "dense":
        spec = parse_name(saved_name)  # the file's own full variant name refines a base name
    model, spec, more = load_state_into_model(state, spec, path)
    notes += more
    low = [d for d in stored if d in ("float16", "bfloat16")]
    if low:
        notes.append(f"weights stored in {', '.join(low)}; upcast to float32 for computation")
    return LoadedCheckpoint(model, spec.name, str(path), file_sha256(path), fmt, wrapper, stored,
                            {**extras, **{k: v for k, v in meta.items() if k != FORMAT_KEY}}, notes)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, name: str | None = None,
                    extra: dict | None = None, storage_dtype: torch.dtype | None = None) -> Path:
    """Write the project's own format: safetensors weights plus the zoo name, atomically.

    ``storage_dtype=torch.float16`` stores floating tensors in FP16 (the CSG paper pairs
    CSG with FP16 storage); a tensor that would overflow FP16 stays in its own dtype.
    """
    path = Path(path)
    name = name or getattr(model, "structexport_name", None)
    if not name:
        raise ValueError("pass name=: the model does not carry a zoo name")
    parse_name(name)
    meta = {FORMAT_KEY: FORMAT_VERSION, "model": name, "config": json.dumps(extra or {})}
    state = {}
    for key, value in model.state_dict().items():
        value = value.detach().contiguous()
        if storage_dtype is not None and value.is_floating_point():
            cast = value.to(storage_dtype)
            if torch.isfinite(cast).sum() == torch.isfinite(value).sum():
                value = cast
        state[key] = value
    from safetensors.torch import save
    write_bytes_atomic(path, save(state, metadata=meta))
    return path
