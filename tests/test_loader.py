"""Tests for structexport.loader and `structexport inspect` on good, bad and hostile files.

Every failure is a :class:`StructExportError` subclass with its own exit code; the CLI
prints exactly one ``error: ...`` line on stderr and exits with that code. Good files
load strictly, into models whose outputs equal the source model's.
"""
from __future__ import annotations

import argparse
import builtins
import hashlib
import json
import os
import pickle
import random
import re
import struct
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from structexport import errors as E
from structexport.cli import main
from structexport.loader import LoadedCheckpoint, load_checkpoint, save_checkpoint
from structexport.models import build_model

# The shared folder beside the clone (as in conftest.py); tests that need it fail, never
# skip, when it is missing.
FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "associativeconv"
VENV_BIN = Path(sys.executable).parent

# fixture -> (base name, full variant name the loader must infer, stored dtype)
FIXTURE_CASES = {
    "resnet56.t7": ("resnet56", "resnet56", "float32"),
    "resnet56-csg-12x12x3x3-72.t7": ("resnet56", "resnet56-csg-12x12x3x3-72", "float32"),
    "resnet56-csg-16x16x3x3-128.t7": ("resnet56", "resnet56-csg-16x16x3x3-128", "float32"),
    "resnet56-csg-16x16x3x3-128-fp16.t7": ("resnet56", "resnet56-csg-16x16x3x3-128", "float16"),
    "resnet20-csg-16x16x3x3-72.t7": ("resnet20", "resnet20-csg-16x16x3x3-72", "float32"),
    "densenet-bc-40-36-csg-12x12x3x3-72.t7": ("densenet-bc-40-36",
                                              "densenet-bc-40-36-csg-12x12x3x3-72", "float32"),
    "densenet-bc-40-48-csg-12x12x3x3-72-fp16.t7": ("densenet-bc-40-48",
                                                   "densenet-bc-40-48-csg-12x12x3x3-72", "float16"),
    "shufflenetv2-0.5x.t7": ("shufflenetv2-0.5x", "shufflenetv2-0.5x", "float32"),
    "shufflenetv2-0.5x-csg-16x16x1x1-16.t7": ("shufflenetv2-0.5x",
                                              "shufflenetv2-0.5x-csg-16x16x1x1-16", "float32"),
}
CSG_FIXTURES = [n for n, c in FIXTURE_CASES.items() if "-csg-" in c[1]]
FP16_FIXTURES = [n for n, c in FIXTURE_CASES.items() if c[2] == "float16"]
SMALL_FIXTURE = "resnet20-csg-16x16x3x3-72.t7"



# ---------------------------------------------------------------------------- helpers

def inputs(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(123))


def source_model(name: str = "resnet20", seed: int = 7) -> torch.nn.Module:
    """A zoo model whose every tensor (BN statistics included) differs from the loader's
    own freshly built one, so a loader that drops any tensor changes the outputs."""
    model = build_model(name, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.copy_(0.1 * torch.randn(mod.num_features, generator=g))
                mod.running_var.copy_(0.5 + torch.rand(mod.num_features, generator=g))
                mod.weight.copy_(1 + 0.1 * torch.randn(mod.num_features, generator=g))
                mod.bias.copy_(0.1 * torch.randn(mod.num_features, generator=g))
                mod.num_batches_tracked.fill_(seed)
    return model.eval()


def outputs(model: torch.nn.Module, x: torch.Tensor | None = None) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(inputs() if x is None else x)


def assert_same_model(loaded: torch.nn.Module, source: torch.nn.Module) -> None:
    a, b = loaded.state_dict(), source.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(outputs(loaded), outputs(source))


def load_error(cls: type[E.StructExportError], path, **kw) -> str:
    """Load ``path``, expect exactly ``cls``; return its one-line message."""
    with pytest.raises(E.StructExportError) as info:
        load_checkpoint(path, **kw)
    assert type(info.value) is cls, f"{type(info.value).__name__}: {info.value}"
    text = str(info.value)
    assert "\n" not in text and text.strip() == text and text
    return text


def inspect_cli(*args: str):
    return CliRunner().invoke(main, ["inspect", *map(str, args)])


def assert_cli_error(result, code: int, *fragments: str) -> str:
    """One line ``error: ...`` on stderr, nothing on stdout, exit code ``code``."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and result.stderr.endswith("\n"), result.stderr
    assert lines[0].startswith("error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@lru_cache(maxsize=None)
def raw_fixture(name: str) -> dict:
    return torch.load(FIXTURES / name, map_location="cpu", weights_only=True)


@lru_cache(maxsize=None)
def loaded_fixture(name: str, arch: str | None = None) -> LoadedCheckpoint:
    return load_checkpoint(FIXTURES / name, arch=arch or FIXTURE_CASES[name][0])


# ---------------------------------------------------------------------------- error classes

def test_error_classes_have_distinct_documented_exit_codes():
    codes = {cls.__name__: cls.exit_code for cls in E.ALL_ERRORS}
    assert codes == {
        "PathNotFoundError": 10, "IsADirectoryCheckpointError": 11, "EmptyFileError": 12,
        "NotACheckpointError": 13, "CorruptCheckpointError": 14, "UnsafeCheckpointError": 15,
        "ArchitectureMismatchError": 16, "ShapeMismatchError": 17, "NonFiniteWeightsError": 18,
        "UnknownArchitectureError": 19, "GeneratorMismatchError": 20,
        "DeviceUnreachableError": 42, "DeviceLostError": 43, "CrossCompilerMissingError": 44,
        "EmulatorError": 45, "TuningError": 46, "InvalidOnnxModelError": 21, "OnnxExternalDataError": 22,
        "OnnxOperatorUnsupportedError": 23, "InputDimensionError": 24, "ExportArchiveError": 25,
        "ModelSpecError": 26, "ModelBuildError": 27, "UnsupportedOnnxOpsetError": 28}
    assert all(issubclass(cls, E.StructExportError) for cls in E.ALL_ERRORS)
    assert str(E.CorruptCheckpointError("bad", "fix it")) == "bad (fix it)"
    assert str(E.CorruptCheckpointError("bad")) == "bad"


# ---------------------------------------------------------------------------- unreadable paths

def test_missing_path(tmp_path):
    path = tmp_path / "nope.pt"
    assert load_error(E.PathNotFoundError, path, arch="resnet20") == f"no such file: {path}"
    assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 10, f"no such file: {path}")


def test_missing_path_from_a_real_process(tmp_path):
    """The installed console script, not only the in-process runner: one stderr line."""
    path = tmp_path / "nope.pt"
    script = VENV_BIN / "structexport"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "structexport.cli"]
    proc = subprocess.run([*command, "inspect", str(path), "--arch", "resnet20"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 10
    assert proc.stdout == ""
    assert proc.stderr == f"error: no such file: {path}\n"


def test_directory(tmp_path):
    msg = load_error(E.IsADirectoryCheckpointError, tmp_path, arch="resnet20")
    assert msg == f"{tmp_path} is a directory, not a checkpoint file (pass the checkpoint file inside it)"
    assert_cli_error(inspect_cli(tmp_path, "--arch", "resnet20"), 11, "is a directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    msg = load_error(E.EmptyFileError, path, arch="resnet20")
    assert msg.startswith(f"{path} is empty (0 bytes)")
    assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 12, "is empty (0 bytes)")


@pytest.mark.parametrize("content", [
    b"GARBAGE" + random.Random(0).randbytes(4096),
    b"hello world, this is a text file\n",
    b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200),          # a JPEG header
    b"\x00" * 1000,
], ids=["random", "text", "jpeg", "zeros"])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "blob.bin"
    path.write_bytes(content)
    msg = load_error(E.NotACheckpointError, path, arch="resnet20")
    assert msg.startswith(f"{path} is not a checkpoint: not a PyTorch, safetensors or "
                          f"structexport file (it starts with {content[:8]!r})")
    assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 13, "is not a checkpoint")


@pytest.mark.parametrize("obj, words", [
    (torch.zeros(3), "holds a Tensor, not a state dict"),
    ({}, "holds a dict without tensors"),
    ([torch.zeros(3)], "holds a list, not a state dict"),
], ids=["tensor", "empty-dict", "list"])
def test_torch_file_without_a_state_dict(tmp_path, obj, words):
    path = tmp_path / "x.pt"
    torch.save(obj, path)
    assert words in load_error(E.NotACheckpointError, path, arch="resnet20")
    assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 13, words)


def _says_truncated_or_corrupt(msg: str) -> bool:
    return bool(re.search(r"\b(truncated|corrupt)\b", msg))


@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.3, 0.5, 0.99, "minus-one-byte"])
def test_truncated_fixture(tmp_path, fraction):
    data = (FIXTURES / SMALL_FIXTURE).read_bytes()
    n = len(data) - 1 if fraction == "minus-one-byte" else int(len(data) * fraction)
    path = tmp_path / "cut.t7"
    path.write_bytes(data[:n])
    msg = load_error(E.CorruptCheckpointError, path, arch="resnet20")
    assert msg.startswith(str(path)) and _says_truncated_or_corrupt(msg), msg
    line = assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 14)
    assert _says_truncated_or_corrupt(line)


def test_truncated_fp16_fixture(tmp_path):
    data = (FIXTURES / "densenet-bc-40-48-csg-12x12x3x3-72-fp16.t7").read_bytes()
    path = tmp_path / "cut.t7"
    path.write_bytes(data[: len(data) // 2])
    msg = load_error(E.CorruptCheckpointError, path, arch="densenet-bc-40-48")
    assert "truncated" in msg


@pytest.mark.parametrize("fraction", [0.001, 0.3, 0.99, "minus-one-byte"])
def test_truncated_zip_torch_save(tmp_path, fraction):
    full = tmp_path / "full.pt"
    torch.save(source_model().state_dict(), full)
    data = full.read_bytes()
    assert data[:4] == b"PK\x03\x04"
    n = len(data) - 1 if fraction == "minus-one-byte" else int(len(data) * fraction)
    path = tmp_path / "cut.pt"
    path.write_bytes(data[:n])
    msg = load_error(E.CorruptCheckpointError, path, arch="resnet20")
    assert _says_truncated_or_corrupt(msg), msg
    assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 14, "truncated or corrupt")


@pytest.mark.parametrize("fraction", [0.3, 0.99])
def test_truncated_structexport_file_after_its_header(tmp_path, fraction):
    full = save_checkpoint(source_model(), tmp_path / "full.safetensors")
    data = full.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: int(len(data) * fraction)])
    load_error(E.CorruptCheckpointError, path)
    assert_cli_error(inspect_cli(path), 14)


def test_truncated_structexport_file_inside_its_header(tmp_path):
    full = save_checkpoint(source_model(), tmp_path / "full.safetensors")
    data = full.read_bytes()
    header = struct.unpack("<Q", data[:8])[0]
    cut = int(len(data) * 0.001)
    assert 8 < cut < 8 + header
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[:cut])
    msg = load_error(E.CorruptCheckpointError, path)
    assert _says_truncated_or_corrupt(msg)


def test_truncated_structexport_file_message_says_truncated(tmp_path):
    full = save_checkpoint(source_model(), tmp_path / "full.safetensors")
    data = full.read_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(data[: len(data) // 2])
    assert _says_truncated_or_corrupt(load_error(E.CorruptCheckpointError, path))


def _zip_with_extract_version(tmp_path, version: int) -> Path:
    """A valid torch.save zip whose first central-directory entry claims it needs zip
    version ``version`` (x10) to extract."""
    path = tmp_path / "v.pt"
    torch.save({"conv_1_3x3.weight": torch.zeros(16, 3, 3, 3)}, path)
    data = bytearray(path.read_bytes())
    at = data.find(b"PK\x01\x02")
    assert at > 0
    data[at + 6: at + 8] = struct.pack("<H", version)
    path.write_bytes(bytes(data))
    return path


def test_zip_with_unsupported_extract_version_is_corrupt(tmp_path):
    path = _zip_with_extract_version(tmp_path, 64)
    msg = load_error(E.CorruptCheckpointError, path, arch="resnet20")
    assert _says_truncated_or_corrupt(msg)
    assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 14)


# ---------------------------------------------------------------------------- fuzzing

def _mutate(data: bytes, rng: random.Random) -> bytes:
    """One seeded mutation, aimed mostly at the structural bytes at both ends."""
    b = bytearray(data)

    def pos() -> int:
        r = rng.random()
        if r < 0.4:
            return rng.randrange(min(len(b), 600))
        if r < 0.7:
            return len(b) - 1 - rng.randrange(min(len(b), 600))
        return rng.randrange(len(b))

    op = rng.choice(("flip", "insert", "delete", "overwrite"))
    if op == "flip":
        p = pos()
        b[p] ^= 1 << rng.randrange(8)
    elif op == "insert":
        p = pos()
        b[p:p] = rng.randbytes(rng.randint(1, 8))
    elif op == "delete":
        p = pos()
        del b[p:p + rng.randint(1, 8)]
    else:
        for _ in range(rng.randint(2, 6)):
            b[pos()] = rng.randrange(256)
    return bytes(b)


_TINY = {"conv_1_3x3.weight": torch.randn(16, 3, 3, 3, generator=torch.Generator().manual_seed(0)),
         "bn_1.running_var": torch.rand(16, generator=torch.Generator().manual_seed(1)),
         "bn_1.num_batches_tracked": torch.tensor(5)}


def _fuzz_source(tmp_path: Path, fmt: str) -> tuple[bytes, dict]:
    path = tmp_path / f"src-{fmt}"
    if fmt == "torch-legacy":
        torch.save({"net": _TINY, "acc": 90.0}, path, _use_new_zipfile_serialization=False)
    elif fmt == "torch-zip":
        torch.save({"net": _TINY, "acc": 90.0}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file
        save_file(_TINY, str(path))
    else:  # the project's own format, of a whole resnet20: many mutants load
        save_checkpoint(source_model(), path)
        return path.read_bytes(), {}
    return path.read_bytes(), {"arch": "resnet20"}


def _fuzz(tmp_path: Path, fmt: str, cases: int, seed: int):
    data, kw = _fuzz_source(tmp_path, fmt)
    rng = random.Random(seed)
    path = tmp_path / "mutant"
    loaded, refused, foreign = 0, 0, []
    for i in range(cases):
        path.write_bytes(_mutate(data, rng))
        try:
            result = load_checkpoint(path, **kw)
        except E.StructExportError as exc:
            refused += 1
            assert 10 <= exc.exit_code <= 20
            assert "\n" not in str(exc), (i, str(exc))
        except BaseException as exc:  # noqa: BLE001 -- the point of the test
            foreign.append((i, type(exc).__name__, str(exc)[:120]))
        else:
            loaded += 1
            assert isinstance(result, LoadedCheckpoint)
    return loaded, refused, foreign


FUZZ_CASES = {"torch-legacy": 300, "safetensors": 300, "structexport": 150, "torch-zip": 400}


@pytest.mark.parametrize("fmt", ["torch-legacy", "safetensors", "structexport"])
def test_fuzzed_checkpoints_load_or_raise_structexport_errors(tmp_path, fmt):
    loaded, refused, foreign = _fuzz(tmp_path, fmt, FUZZ_CASES[fmt], seed=1234)
    assert foreign == []
    assert loaded + refused == FUZZ_CASES[fmt]
    assert refused > 0
    if fmt == "structexport":
        assert loaded > 0     # flips inside tensor data leave a loadable file


def test_fuzzed_zip_checkpoints_load_or_raise_structexport_errors(tmp_path):
    loaded, refused, foreign = _fuzz(tmp_path, "torch-zip", FUZZ_CASES["torch-zip"], seed=1234)
    assert foreign == []


# ---------------------------------------------------------------------------- hostile pickles

def _payloads(marker: Path):
    class SystemPayload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class ExecPayload:
        def __reduce__(self):
            return (builtins.exec, (f"open({str(marker)!r}, 'w').write('pwned')",))

    return {"os.system": SystemPayload, "builtins.exec": ExecPayload}


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_code_running_pickle_is_refused(tmp_path, payload, protocol):
    marker = tmp_path / "MARKER"
    cls = _payloads(marker)[payload]
    bare = tmp_path / "bare.pkl"
    bare.write_bytes(pickle.dumps(cls(), protocol=protocol))
    wrapped = tmp_path / "wrapped.pkl"
    wrapped.write_bytes(pickle.dumps({"state_dict": {"fc.weight": torch.zeros(2, 2)},
                                      "hook": cls()}, protocol=protocol))
    for path in (bare, wrapped):
        msg = load_error(E.UnsafeCheckpointError, path, arch="resnet20")
        assert "--trust-pickle" in msg and "refused by default" in msg
        assert not marker.exists()
        assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 15, "--trust-pickle")
        assert not marker.exists()
    # the bare payload's message names the callable it would import
    assert re.search(r"\b(system|exec)\b", load_error(E.UnsafeCheckpointError, bare,
                                                      arch="resnet20"))


@pytest.mark.parametrize("payload", ["os.system", "builtins.exec"])
@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_code_running_torch_save_is_refused(tmp_path, payload, zipped):
    marker = tmp_path / "MARKER"
    cls = _payloads(marker)[payload]
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": source_model().state_dict(), "extra": cls()}, path,
               _use_new_zipfile_serialization=zipped)
    assert (path.read_bytes()[:4] == b"PK\x03\x04") == zipped
    msg = load_error(E.UnsafeCheckpointError, path, arch="resnet20")
    assert "--trust-pickle" in msg
    assert re.search(r"\b(system|exec)\b", msg), msg
    assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 15, "--trust-pickle")
    assert not marker.exists()


def test_trust_pickle_loads_a_checkpoint_with_plain_python_objects(tmp_path):
    """A training checkpoint that stores its argparse namespace: refused by default,
    loaded exactly with --trust-pickle."""
    src = source_model()
    path = tmp_path / "train.pt"
    torch.save({"state_dict": src.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)
    msg = load_error(E.UnsafeCheckpointError, path, arch="resnet20")
    assert "argparse.Namespace" in msg and "--trust-pickle" in msg
    got = load_checkpoint(path, arch="resnet20", trust_pickle=True)
    assert got.wrapper_key == "state_dict"
    assert_same_model(got.model, src)
    result = inspect_cli(path, "--arch", "resnet20", "--trust-pickle", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["checkpoint"]["wrapper_key"] == "state_dict"


def test_pickled_module_object_needs_trust_pickle(tmp_path):
    src = source_model()
    path = tmp_path / "whole-model.pt"
    torch.save({"model": src}, path)
    msg = load_error(E.UnsafeCheckpointError, path, arch="resnet20")
    assert "CifarResNet" in msg
    got = load_checkpoint(path, arch="resnet20", trust_pickle=True)
    assert got.wrapper_key == "model"
    assert_same_model(got.model, src)


# ---------------------------------------------------------------------------- TorchScript

@pytest.fixture(scope="module")
def torchscript_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("torchscript")
    traced_src = source_model("resnet20")
    scripted_src = source_model("shufflenetv2-0.5x")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(traced_src, inputs()).save(str(d / "traced.pt"))
        torch.jit.script(scripted_src).save(str(d / "scripted.pt"))
    return {"traced": (d / "traced.pt", "resnet20", traced_src),
            "scripted": (d / "scripted.pt", "shufflenetv2-0.5x", scripted_src)}


@pytest.mark.parametrize("kind", ["traced", "scripted"])
def test_torchscript_refused_by_default(torchscript_files, kind):
    path, arch, _ = torchscript_files[kind]
    msg = load_error(E.UnsafeCheckpointError, path, arch=arch)
    assert "TorchScript" in msg and "--allow-torchscript" in msg
    assert_cli_error(inspect_cli(path, "--arch", arch), 15, "--allow-torchscript")
    # trusting pickles is not trusting code archives
    load_error(E.UnsafeCheckpointError, path, arch=arch, trust_pickle=True)


@pytest.mark.parametrize("kind", ["traced", "scripted"])
def test_torchscript_loads_when_allowed(torchscript_files, kind):
    path, arch, src = torchscript_files[kind]
    got = load_checkpoint(path, arch=arch, allow_torchscript=True)
    assert got.source_format == "torchscript" and got.arch == arch
    assert_same_model(got.model, src)
    result = inspect_cli(path, "--arch", arch, "--allow-torchscript", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["checkpoint"]["format"] == "torchscript"


# ---------------------------------------------------------------------------- good layouts

def test_plain_state_dict(tmp_path):
    src = source_model()
    path = tmp_path / "plain.pt"
    torch.save(src.state_dict(), path)
    got = load_checkpoint(path, arch="resnet20")
    assert (got.arch, got.source_format, got.wrapper_key) == ("resnet20", "torch-zip", None)
    assert got.stored_dtypes == ["float32"] and got.notes == [] and got.metadata == {}
    assert got.path == str(path)
    assert got.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert_same_model(got.model, src)


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model", "net"])
def test_training_checkpoint_wrappers(tmp_path, key):
    src = source_model()
    path = tmp_path / "train.pt"
    torch.save({"epoch": 7, "best_acc": 91.5, key: src.state_dict(),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}},
               path)
    got = load_checkpoint(path, arch="resnet20")
    assert got.wrapper_key == key
    assert got.notes == [f"state dict taken from the training checkpoint's {key!r} entry"]
    assert got.metadata == {"epoch": 7, "best_acc": 91.5}
    assert_same_model(got.model, src)
    result = inspect_cli(path, "--arch", "resnet20", "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["checkpoint"]["wrapper_key"] == key


def test_data_parallel_prefix(tmp_path):
    src = source_model()
    path = tmp_path / "dp.pt"
    state = torch.nn.DataParallel(src).state_dict()
    assert all(k.startswith("module.") for k in state)
    torch.save({"net": state, "acc": 90.1, "epoch": 3}, path)
    got = load_checkpoint(path, arch="resnet20")
    assert got.wrapper_key == "net"
    assert "stripped key prefix 'module.'" in got.notes
    assert_same_model(got.model, src)


def test_legacy_serialization(tmp_path):
    src = source_model()
    path = tmp_path / "legacy.pt"
    torch.save(src.state_dict(), path, _use_new_zipfile_serialization=False)
    assert path.read_bytes()[:1] == b"\x80"
    got = load_checkpoint(path, arch="resnet20")
    assert got.source_format == "torch-legacy"
    assert_same_model(got.model, src)


def test_plain_safetensors(tmp_path):
    from safetensors.torch import save_file
    src = source_model()
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    got = load_checkpoint(path, arch="resnet20")
    assert got.source_format == "safetensors" and got.arch == "resnet20"
    assert_same_model(got.model, src)
    # a plain safetensors file does not name its architecture
    msg = load_error(E.UnknownArchitectureError, path)
    assert "--arch" in msg


@pytest.mark.parametrize("name", ["resnet20", "densenet-bc-40-36", "shufflenetv2-0.5x",
                                  "densenet-bc-40-36-csg-12x12x3x3-72",
                                  "shufflenetv2-0.5x-csg-16x16x1x1-16",
                                  "densenet-bc-40-36-bcsg-12x12x3x3-72"])
def test_structexport_format_round_trip_without_arch(tmp_path, name):
    src = source_model(name)
    path = save_checkpoint(src, tmp_path / "weird-name.bin")
    got = load_checkpoint(path)
    assert got.arch == name and got.source_format == "structexport"
    assert got.metadata["model"] == name
    assert_same_model(got.model, src)
    result = inspect_cli(path, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["arch"] == name


@pytest.mark.parametrize("name", ["resnet20-csg-16x16x3x3-72", "resnet20-bcsg-16x16x3x3-1024"])
def test_structexport_format_round_trip_of_resnet_csg(tmp_path, name):
    src = source_model(name)
    got = load_checkpoint(save_checkpoint(src, tmp_path / "m.safetensors"))
    assert got.arch == name
    assert_same_model(got.model, src)


def test_fixture_resaved_in_structexport_format(tmp_path):
    first = loaded_fixture(SMALL_FIXTURE)
    got = load_checkpoint(save_checkpoint(first.model, tmp_path / "m.safetensors"))
    assert got.arch == first.arch
    assert_same_model(got.model, first.model)


@pytest.mark.parametrize("name", ["densenet-bc-40-36-csg-12x12x3x3-72.t7",
                                  "shufflenetv2-0.5x-csg-16x16x1x1-16.t7", "resnet56.t7"])
def test_fixture_resaved_in_structexport_format_non_resnet_csg(tmp_path, name):
    first = loaded_fixture(name)
    got = load_checkpoint(save_checkpoint(first.model, tmp_path / "m.safetensors"))
    assert got.arch == first.arch
    assert_same_model(got.model, first.model)


# ---------------------------------------------------------------------------- wrong files for the arch

def test_resnet56_weights_as_resnet20():
    raw_keys = {k[len("module."):] for k in raw_fixture("resnet56.t7")["net"]}
    extra = raw_keys - set(build_model("resnet20").state_dict())
    assert len(extra) == 216                                # 18 blocks x 12 tensors
    msg = load_error(E.ArchitectureMismatchError, FIXTURES / "resnet56.t7", arch="resnet20")
    assert msg.startswith("checkpoint does not match resnet20: 216 unexpected keys (")
    assert "missing" not in msg
    assert "stage_1.N.conv_a.weight x6" in msg                # grouped: stage_1.3 .. stage_1.8
    assert "nearest to stage_1.3.conv_a.weight is stage_1.2.conv_a.weight" in msg
    assert_cli_error(inspect_cli(FIXTURES / "resnet56.t7", "--arch", "resnet20"), 16,
                     "216 unexpected keys", "nearest to")


def test_densenet_weights_as_resnet20():
    name = "densenet-bc-40-36-csg-12x12x3x3-72.t7"
    raw_keys = [k[len("module."):] for k in raw_fixture(name)["net"]]
    copies = [k for k in raw_keys if k.endswith("CLG.weight")]
    n_missing = len(build_model("resnet20").state_dict())
    n_unexpected = len(raw_keys) - len(copies) + 1           # generator copies counted once
    assert (n_missing, n_unexpected) == (116, 237)
    msg = load_error(E.ArchitectureMismatchError, FIXTURES / name, arch="resnet20")
    assert msg.startswith(f"checkpoint does not match resnet20: {n_missing} missing keys (")
    assert f"; {n_unexpected} unexpected keys (" in msg
    assert "stage_1.N.conv_a.weight x3" in msg and "dense1.N.bn1.weight x6" in msg
    assert "nearest to conv1.weight is conv_1_3x3.weight" in msg
    assert_cli_error(inspect_cli(FIXTURES / name, "--arch", "resnet20"), 16,
                     "116 missing keys", "237 unexpected keys")


def test_dense_weights_for_a_csg_name():
    msg = load_error(E.ArchitectureMismatchError, FIXTURES / "resnet56.t7",
                     arch="resnet56-csg-16x16x3x3-128")
    assert "54 unexpected keys" in msg and "stage_1.N.conv_a.weight x9" in msg
    assert "missing keys" in msg and "stage_1.N.conv_a.code x9" in msg


def test_csg_weights_for_another_csg_variant():
    msg = load_error(E.ShapeMismatchError, FIXTURES / "resnet56-csg-16x16x3x3-128.t7",
                     arch="resnet56-csg-12x12x3x3-72")
    assert msg.startswith("shape mismatch for resnet56-csg-12x12x3x3-72 in layer "
                          "stage_1.0.conv_a.code: expected [4, 72], got [1, 128]")


@pytest.mark.parametrize("key, shape, expected", [
    ("stage_2.1.conv_a.weight", (32, 32, 5, 5), [32, 32, 3, 3]),
    ("classifier.weight", (100, 64), [10, 64]),
    ("bn_1.running_mean", (17,), [16]),
])
def test_one_tensor_of_another_shape(tmp_path, key, shape, expected):
    state = source_model().state_dict()
    state[key] = torch.randn(*shape)
    path = tmp_path / "bad-shape.pt"
    torch.save(state, path)
    msg = load_error(E.ShapeMismatchError, path, arch="resnet20")
    assert msg.startswith(f"shape mismatch for resnet20 in layer {key}: expected {expected}, "
                          f"got {list(shape)}")
    assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 17, key, str(expected),
                     str(list(shape)))


@pytest.mark.parametrize("key, value, what", [
    ("stage_1.0.conv_a.weight", float("nan"), "1 NaN"),
    ("classifier.bias", float("inf"), "1 Inf"),
    ("bn_1.running_mean", float("-inf"), "1 Inf"),
    ("stage_3.2.bn_b.running_var", float("nan"), "1 NaN"),
    ("stage_3.2.bn_b.running_var", float("-inf"), "1 Inf"),
])
def test_non_finite_weights(tmp_path, key, value, what):
    state = {k: v.clone() for k, v in source_model().state_dict().items()}
    state[key].view(-1)[3] = value
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    msg = load_error(E.NonFiniteWeightsError, path, arch="resnet20")
    assert f"non-finite weights in 1 tensors: {key} ({what})" in msg
    assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 18, key)


def test_non_finite_weights_in_several_tensors(tmp_path):
    state = {k: v.clone() for k, v in source_model().state_dict().items()}
    keys = ["conv_1_3x3.weight", "stage_2.0.conv_b.weight", "classifier.weight"]
    for k in keys:
        state[k].view(-1)[:2] = float("nan")
    path = tmp_path / "diverged.pt"
    torch.save(state, path)
    msg = load_error(E.NonFiniteWeightsError, path, arch="resnet20")
    assert "non-finite weights in 3 tensors:" in msg
    assert all(f"{k} (2 NaN)" in msg for k in keys)


def test_positive_inf_running_var_is_kept_with_a_note(tmp_path):
    """The published FP16 file's case: +Inf running variance is an FP16 overflow, kept."""
    src = source_model()
    with torch.no_grad():
        src.stage_3[2].bn_b.running_var[5] = float("inf")
    path = tmp_path / "overflow.pt"
    torch.save(src.state_dict(), path)
    got = load_checkpoint(path, arch="resnet20")
    assert any(n.startswith("stage_3.2.bn_b.running_var has 1 +Inf") for n in got.notes)
    assert torch.isinf(got.model.stage_3[2].bn_b.running_var[5])
    assert torch.equal(outputs(got.model), outputs(src))
    assert torch.isfinite(outputs(got.model)).all()


def test_nan_in_an_fp16_fixture_tensor(tmp_path):
    obj = dict(raw_fixture("resnet56-csg-16x16x3x3-128-fp16.t7"))
    net = dict(obj["net"])
    net["module.stage_2.3.code2"] = net["module.stage_2.3.code2"].clone()
    net["module.stage_2.3.code2"][0, 0] = float("nan")
    path = tmp_path / "nan.t7"
    torch.save({**obj, "net": net}, path)
    msg = load_error(E.NonFiniteWeightsError, path, arch="resnet56")
    assert "stage_2.3.code2 (1 NaN)" in msg


@pytest.mark.parametrize("arch, suggestion", [
    ("resnet21", "resnet20"),
    ("resnet-20", "resnet20"),
    ("densnet-bc-40-36", "densenet-bc-40-36"),
    ("ShuffleNetV2-0.5", "shufflenetv2-0.5x"),
])
def test_unknown_arch(tmp_path, arch, suggestion):
    path = tmp_path / "m.pt"
    torch.save(source_model().state_dict(), path)
    msg = load_error(E.UnknownArchitectureError, path, arch=arch)
    assert msg.startswith(f"unknown architecture {arch!r} (did you mean ")
    assert suggestion in msg.split("did you mean ", 1)[1].rstrip("?)").split(", ")
    assert_cli_error(inspect_cli(path, "--arch", arch), 19, f"unknown architecture {arch!r}",
                     suggestion)


def test_unknown_arch_without_a_close_name(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(source_model().state_dict(), path)
    msg = load_error(E.UnknownArchitectureError, path, arch="totally-unknown")
    assert msg == "unknown architecture 'totally-unknown' (run `structexport zoo` to list them)"


def test_generator_copies_that_differ(tmp_path):
    obj = raw_fixture(SMALL_FIXTURE)
    net = dict(obj["net"])
    key = "module.stage_2.1.CLG.weight"
    net[key] = net[key].clone()
    net[key][5, 3] += 1e-3
    path = tmp_path / "inconsistent.t7"
    torch.save({**obj, "net": net}, path)
    msg = load_error(E.GeneratorMismatchError, path, arch="resnet20")
    assert "copies of the shared CSG generator differ (CLG.weight vs stage_2.1.CLG.weight" in msg
    diff = float(re.search(r"max difference ([0-9.e-]+)", msg).group(1))
    assert diff == pytest.approx(1e-3, rel=1e-3)
    assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 20, "stage_2.1.CLG.weight")


def test_generator_copy_of_another_shape(tmp_path):
    obj = raw_fixture(SMALL_FIXTURE)
    net = dict(obj["net"])
    net["module.stage_1.2.CLG.weight"] = net["module.CLG.weight"][:1296].clone()
    path = tmp_path / "inconsistent.t7"
    torch.save({**obj, "net": net}, path)
    msg = load_error(E.GeneratorMismatchError, path, arch="resnet20")
    assert "stage_1.2.CLG.weight" in msg and "shape [1296, 72]" in msg


# ---------------------------------------------------------------------------- inference from shapes

def _renamed_generator_file(tmp_path: Path, name: str) -> Path:
    obj = raw_fixture(name)
    net = {re.sub(r"(^|\.)(CLG|CSG)\.weight$", r"\1foo.weight", k): v
           for k, v in obj["net"].items()}
    assert not any("CLG" in k or "CSG" in k for k in net)
    assert sum(k.endswith("foo.weight") for k in net) >= 1
    path = tmp_path / "checkpoint_final"
    torch.save({**obj, "net": net}, path)
    return path


@pytest.mark.parametrize("name", CSG_FIXTURES)
def test_generator_found_by_role_not_name(tmp_path, name):
    path = _renamed_generator_file(tmp_path, name)
    base, full, _ = FIXTURE_CASES[name]
    got = load_checkpoint(path, arch=base)
    assert got.arch == full
    assert_same_model(got.model, loaded_fixture(name).model)


def test_resnet56_csg_12x12_inferred_from_shapes():
    got = loaded_fixture("resnet56-csg-12x12x3x3-72.t7")
    assert got.arch == "resnet56-csg-12x12x3x3-72"
    assert got.model.generator.slice_shape == (12, 12, 3, 3)
    assert got.model.generator.code_size == 72
    assert tuple(got.model.generator.weight.shape) == (1296, 72)
    # conv_a of stage_3.0: 32 -> 64 channels: ceil(64/12) * ceil(32/12) = 18 slices
    assert tuple(got.model.stage_3[0].conv_a.code.shape) == (18, 72)
    assert "inferred resnet56-csg-12x12x3x3-72 from tensor shapes (generator [1296, 72])" \
        in got.notes


def test_densenet_growth_rate_read_from_shapes():
    name = "densenet-bc-40-48-csg-12x12x3x3-72-fp16.t7"
    got = loaded_fixture(name, "densenet-bc-40-36")
    assert got.arch == "densenet-bc-40-48-csg-12x12x3x3-72"
    assert "growth rate read from the weights: this is densenet-bc-40-48, not " \
           "densenet-bc-40-36" in got.notes
    assert got.model.linear.in_features == 528
    assert_same_model(got.model, loaded_fixture(name).model)


# ---------------------------------------------------------------------------- FP16 fixtures

@pytest.mark.parametrize("name", FP16_FIXTURES)
def test_fp16_fixture_is_upcast(name):
    got = loaded_fixture(name)
    assert got.stored_dtypes == ["float16"]
    assert "weights stored in float16; upcast to float32 for computation" in got.notes
    params = dict(got.model.named_parameters())
    assert params and all(p.dtype == torch.float32 for p in params.values())
    raw = raw_fixture(name)["net"]
    top = next(k for k in raw if re.fullmatch(r"module\.(CLG|CSG)\.weight", k))
    assert raw[top].dtype == torch.float16
    assert torch.equal(got.model.generator.weight, raw[top].float())


# ---------------------------------------------------------------------------- every fixture, strictly

def _zoo_key(raw_key: str, base: str) -> str | None:
    """Where a raw reference key lands in the zoo model (None: a generator copy)."""
    key = raw_key[len("module."):]
    module, _, leaf = key.rpartition(".")
    if re.fullmatch(r"(CLG|CSG)\.weight", key):
        return "generator.weight"
    if leaf == "weight" and module.rpartition(".")[2] in ("CLG", "CSG"):
        return None
    if leaf in ("code", "code2") and not key.endswith(".weight"):
        if base.startswith("resnet"):
            return f"{module}.{'conv_a' if leaf == 'code' else 'conv_b'}.code"
        return ".".join(p for p in (module, "conv2", "code") if p)
    return key


@pytest.mark.parametrize("name", sorted(FIXTURE_CASES))
def test_every_fixture_loads_strictly_from_its_base_name(name):
    base, full, dtype = FIXTURE_CASES[name]
    got = loaded_fixture(name)
    assert got.arch == full
    assert (got.source_format, got.wrapper_key) == ("torch-legacy", "net")
    assert got.stored_dtypes == [dtype]
    assert set(got.metadata) == {"acc", "epoch"}
    assert got.sha256 == hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest()
    state = got.model.state_dict()
    assert set(state) == set(build_model(full).state_dict())     # strict: same key set
    raw = raw_fixture(name)["net"]
    mapped = {}
    for k, v in raw.items():
        target = _zoo_key(k, base)
        if target is not None:
            assert target not in mapped, target
            mapped[target] = v
    assert set(mapped) == set(state)                              # nothing missing, nothing extra
    for k, v in mapped.items():
        want = v.float() if v.is_floating_point() else v
        assert torch.equal(state[k], want), k
    assert torch.isfinite(outputs(got.model)).all()


@pytest.mark.parametrize("name", sorted(FIXTURE_CASES))
def test_inspect_cli_on_every_fixture(name):
    base, full, dtype = FIXTURE_CASES[name]
    result = inspect_cli(FIXTURES / name, "--arch", base, "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["arch"] == full
    assert report["checkpoint"]["format"] == "torch-legacy"
    assert report["checkpoint"]["wrapper_key"] == "net"
    assert report["checkpoint"]["stored_dtypes"] == [dtype]
    assert report["checkpoint"]["sha256"] == loaded_fixture(name).sha256


# ---------------------------------------------------------------------------- CLI message rendering

def test_cli_error_with_closing_tag_in_path(tmp_path):
    path = tmp_path / "ckpt[/x].pt"
    assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 10, f"no such file: {path}")


def test_cli_error_keeps_brackets_in_path(tmp_path):
    path = tmp_path / "ckpt[red].pt"
    assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 10, f"no such file: {path}")


def test_cli_error_quoting_file_bytes_with_markup(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"[/]not a checkpoint at all\n")
    assert_cli_error(inspect_cli(path, "--arch", "resnet20"), 13, "is not a checkpoint")


# ---------------------------------------------------------------------------- NumPy metadata, SSC

def test_numpy_training_metadata_loads_weights_only(tmp_path):
    """NumPy scalars and arrays beside the weights are data: no --trust-pickle needed."""
    import numpy as np
    source = source_model()
    path = tmp_path / "np.pt"
    torch.save({"state_dict": source.state_dict(), "best_acc": np.float64(91.25),
                "epoch": np.int64(7), "history": np.zeros(3), "lr": torch.tensor(0.1)}, path)
    loaded = load_checkpoint(path, arch="resnet20")
    assert loaded.wrapper_key == "state_dict"
    assert loaded.metadata == {"best_acc": 91.25, "epoch": 7, "lr": pytest.approx(0.1)}
    assert type(loaded.metadata["epoch"]) is int
    assert_same_model(loaded.model, source)
    json.dumps(loaded.metadata)  # inspect --json must be able to print it


def test_numpy_object_arrays_still_cannot_smuggle_code(tmp_path):
    import numpy as np
    marker = tmp_path / "pwned"
    payload = _payloads(marker)["os.system"]
    arr = np.empty(1, dtype=object)
    arr[0] = payload()
    path = tmp_path / "np-evil.pt"
    torch.save({"state_dict": source_model().state_dict(), "extra": arr}, path)
    msg = load_error(E.UnsafeCheckpointError, path, arch="resnet20")
    assert "--trust-pickle" in msg and not marker.exists()


def test_ssc_checkpoint_round_trip_and_foreign_sparsity_is_refused(tmp_path):
    ssc = build_model("resnet32x2-ssc-10", seed=3)
    path = tmp_path / "ssc.pt"
    torch.save(ssc.state_dict(), path)
    loaded = load_checkpoint(path, arch="resnet32x2-ssc-10")
    assert_same_model(loaded.model, ssc)
    # dense weights cannot be read as SSC: the mask would silently drop them
    dense_path = tmp_path / "dense.pt"
    torch.save(build_model("resnet32x2").state_dict(), dense_path)
    msg = load_error(E.ArchitectureMismatchError, dense_path, arch="resnet32x2-ssc-10")
    assert "outside their (p, g) mask" in msg and "--arch resnet32x2" in msg
    # ... and the SSC weights load as the dense base model, where inspect shows their density
    report = json.loads(inspect_cli(str(path), "--arch", "resnet32x2", "--json").output)
    assert report["arch"] == "resnet32x2"
    row = next(r for r in report["layers"] if r["name"] == "stage_1.0.conv_a")
    mask_density = float(ssc.stage_1[0].conv_a.mask.float().mean())
    assert f"density {mask_density:.3f}" in row["structure"]


def test_fp16_storage_halves_the_file_and_keeps_outputs(tmp_path):
    source = load_checkpoint(FIXTURES / "resnet56-csg-16x16x3x3-128.t7", arch="resnet56").model
    full = save_checkpoint(source, tmp_path / "fp32.safetensors")
    half = save_checkpoint(source, tmp_path / "fp16.safetensors", storage_dtype=torch.float16)
    ratio = half.stat().st_size / full.stat().st_size
    assert 0.45 < ratio < 0.55, ratio
    loaded = load_checkpoint(half)  # the name comes from the file
    assert loaded.arch == "resnet56-csg-16x16x3x3-128"
    assert loaded.stored_dtypes == ["float16"] or "float16" in loaded.stored_dtypes
    assert any("upcast to float32" in n for n in loaded.notes)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    x = inputs(4)
    with torch.no_grad():
        ref, got = source(x), loaded.model(x)
    assert float((got - ref).norm() / ref.norm()) < 1e-2


def test_fp16_storage_keeps_values_that_would_overflow(tmp_path):
    model = build_model("resnet20")
    model.bn_1.running_var[0] = 1e6  # beyond FP16's range
    path = save_checkpoint(model, tmp_path / "m.safetensors", storage_dtype=torch.float16)
    loaded = load_checkpoint(path)
    assert float(loaded.model.bn_1.running_var[0]) == 1e6
    assert loaded.model.conv_1_3x3.weight.dtype == torch.float32
