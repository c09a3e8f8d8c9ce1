"""Apache TVM targets. Today: ``tvm-llvm`` (this host's CPU) and ``tvm-cuda`` (compiles on
any machine, runs and verifies where a CUDA GPU is), both untuned.

The verified ONNX model is imported with TVM's Relax ONNX frontend, compiled with
``tvm.compile`` and exported as a shared library; the library is then loaded back and run
on the same inputs as the ONNX verification, against the PyTorch source model.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from structexport.errors import StructExportError

from .base import Target


class TvmError(StructExportError):
    exit_code, kind = 41, "tvm-failed"


@contextlib.contextmanager
def _quiet_native_stderr():
    """TVM's C++ runtime logs warnings straight to file descriptor 2."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _tvm():
    try:
        import tvm
        from tvm import relax
    except Exception as exc:  # not installed, or a broken ffi pin
        raise TvmError(f"Apache TVM is not usable here: {type(exc).__name__}: {exc}",
                       "install it with pip install -e '.[tvm]' (make setup does)") from None
    return tvm, relax


class TvmLlvmTarget(Target):
    name = "tvm-llvm"
    description = "Apache TVM for this host's CPU (LLVM), untuned: model.so"
    library = "model.so"

    def tvm_target(self) -> dict:
        return {"kind": "llvm"}

    def _target(self, tvm):
        return tvm.target.Target(self.tvm_target())

    def write_artifacts(self, onnx_path: Path, outdir: Path) -> dict[str, str]:
        import onnx
        tvm, relax = _tvm()
        from tvm.relax.frontend.onnx import from_onnx
        try:
            with _quiet_native_stderr():
                mod = from_onnx(onnx.load(str(onnx_path)), keep_params_in_input=False)
                executable = tvm.compile(mod, target=self._target(tvm))
                executable.export_library(str(outdir / self.library))
        except Exception as exc:
            raise TvmError(f"TVM could not compile the model: {type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:200]}") from None
        (outdir / "tvm_target.json").write_text(json.dumps(self.tvm_target()) + "\n")
        return {self.library: f"TVM library for {json.dumps(self.tvm_target())} (untuned)",
                "tvm_target.json": "the TVM target the library was built for"}

    def _device(self, tvm):
        return tvm.cpu()

    def verify(self, outdir: Path, reference, inputs, precision, atol, rtol):
        from structexport.export import verify_runner
        tvm, relax = _tvm()
        device = self._device(tvm)
        if not device.exist:
            return f"not run: no {device} on this machine; the library runs where one is"
        with _quiet_native_stderr():
            vm = relax.VirtualMachine(tvm.runtime.load_module(str(outdir / self.library)), device)

        def run(x):
            out = vm["main"](tvm.runtime.tensor(x, device=device))
            return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
        return verify_runner(reference, run, inputs, precision, atol, rtol,
                             runtime=f"TVM VM, {self.library} on {device}")


class TvmCudaTarget(TvmLlvmTarget):
    name = "tvm-cuda"
    description = "Apache TVM for NVIDIA GPUs (CUDA, sm_80 by default), untuned: model.so"

    def tvm_target(self) -> dict:
        return {"kind": "cuda", "arch": "sm_80"}

    def _target(self, tvm):
        return tvm.target.Target(self.tvm_target(), host={"kind": "llvm"})

    def _device(self, tvm):
        return tvm.cuda(0)
