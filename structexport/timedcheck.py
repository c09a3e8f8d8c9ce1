"""What ``bench``, ``profile`` and ``regress`` time is checked first: the very ONNX Runtime
session or TVM library they are about to time, run once on the package's stored inputs and
compared with its stored outputs (:meth:`~structexport.package.Package.check_timed`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from structexport.ortsession import ort_session, session_runner


def checked_sessions(package, paths: dict[str, Path], threads: int, say) -> dict:
    """ONNX Runtime sessions as they will be timed (all graph optimizations, ``threads``),
    each checked against ``package``'s stored outputs first. The dense reference is float32
    even in an fp16 package."""
    sessions = {}
    for name, path in paths.items():
        session = ort_session(path, threads)
        what = f"{path} under ONNX Runtime (ORT_ENABLE_ALL, {threads} thread{'s' * (threads > 1)})"
        say(f"check {what}")
        package.check_timed(session_runner(session), what,
                            None if Path(path).name == package.model_onnx.name else "fp32")
        sessions[name] = session
    return sessions


def checked_programs(package, paths: dict[str, Path], feed, threads: int, say) -> dict:
    """The package's runtime programs (ExecuTorch) as they will be timed (``threads``), each
    checked against ``package``'s stored outputs first (the one called ``structured``, or a
    base/candidate side, is the package's own; others are float32 dense counterparts);
    timers for :func:`structexport.timing.time_interleaved`."""
    from structexport.targets import get_target
    target = get_target(package.target, {})
    timers = {}
    for name, path in paths.items():
        what = f"{path} under {target.runtime(threads)}"
        say(f"check {what}")
        own = name in ("structured", "base", "candidate")
        package.check_timed(target.runner(path, threads), what, None if own else "fp32")
        timers[name] = target.timer(path, feed, threads)
    return timers


def checked_int8_program(package, path: Path, feed, threads: int, say):
    """The dense INT8 program (ExecuTorch) as it is timed, checked first against its
    fake-quantized graph's outputs stored at conversion."""
    from structexport.export import VerificationError, verify_arrays
    from structexport.targets import get_target
    target = get_target(package.target, {})
    inputs, _ = package.verification_arrays()
    expected = package.dense_int8_expected()
    tolerance = ((package.manifest.get("int8") or {}).get("dense_int8") or {}).get("tolerance") or {}
    if not expected or tolerance.get("atol") is None:
        from structexport.package import PackageIncompatibleError
        raise PackageIncompatibleError(f"{package.root} does not store the outputs its dense INT8 program "
                                       f"is checked against", "convert the model again with this structexport")
    what = f"{path} under {target.runtime(threads)}"
    say(f"check {what}")
    result = verify_arrays(target.runner(path, threads), inputs, expected, "int8", tolerance["atol"], 0.0,
                           runtime=what)
    if not result.passed:
        raise VerificationError(f"{what} does not compute what its quantized graph did: {result.summary()}",
                                "nothing was timed; convert the model again on this machine")
    return target.timer(path, feed, threads)


def checked_libraries(package, libs: dict, where: str, say) -> None:
    """TVM libraries loaded on their device (``structexport.rpc.LoadedLibrary``), each
    checked once against ``package``'s stored outputs before it is timed; the one called
    ``structured`` is the package's, the others are float32 builds of its reference."""
    for name, lib in libs.items():
        what = f"{lib.library} on {where}"
        say(f"check {what}")
        package.check_timed(lib.run, what, None if name == "structured" else "fp32")


def vm_runner(tvm, vm, device, extra_args=()):
    """``run(x) -> outputs`` of a Relax VM whose ``main`` takes the input, then ``extra_args``
    (weights passed as inputs, as profile's builds take them)."""
    def run(x):
        out = vm["main"](tvm.runtime.tensor(np.ascontiguousarray(x), device=device), *extra_args)
        return [out.numpy()] if hasattr(out, "numpy") else [o.numpy() for o in out]
    return run


def checked_int8_baseline(package: Package, threads: int, say):
    """The dense INT8 baseline's session as it is timed, checked first: its integer kernels
    against its own QDQ graph run as written, on the package's stored inputs."""
    from structexport.export import VerificationError, verify_arrays
    from structexport.ortsession import ort_session, session_runner
    from structexport.quantize import DENSE_INT8, output_tolerance
    path = package.root / DENSE_INT8
    if not path.is_file():
        from structexport.package import PackageIncompatibleError
        raise PackageIncompatibleError(f"{package.root} is an INT8 package without {DENSE_INT8}, its INT8 baseline",
                                       "convert the model again with this structexport")
    inputs, _ = package.verification_arrays()
    fake = session_runner(ort_session(path, 1, optimize=False))
    expected = {label: fake(x) for label, x in inputs.items()}
    session = ort_session(path, threads)
    what = f"{path} under ONNX Runtime (ORT_ENABLE_ALL, {threads} thread{'s' * (threads > 1)})"
    say(f"check {what}")
    result = verify_arrays(session_runner(session), inputs, expected, "int8",
                           output_tolerance(path, next(iter(expected.values()))), 0.0, runtime=what)
    if not result.passed:
        raise VerificationError(f"{what} does not compute what its QDQ graph says: {result.summary()}",
                                "nothing was timed; convert the model again on this machine")
    return session
