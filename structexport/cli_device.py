"""``structexport device ...``: install, start, stop and query the emulated aarch64 device.

Exit codes: 0 success; 45 the emulated device cannot be installed or started (one
``error:`` line); ``status`` exits 3 when no emulated device is running (its JSON or text is
printed all the same); ``stop`` exits 0 whether or not one was running, and says which.
"""
from __future__ import annotations

import json
import sys
import time

import click
from rich.markup import escape

from structexport.cli_common import err, fail_cleanly, out

NOT_RUNNING_EXIT = 3
PROGRAM_NOTE = ("note: this device is emulated (qemu user mode on this machine): it proves the program "
                "loads and computes correctly on aarch64; its timings are not ARM latency")
EMULATED_NOTE = ("note: this device is emulated (qemu user mode on this machine): it proves a "
                 "library loads and computes correctly on aarch64; its timings are not ARM latency")


def _with_progress(title: str, fn):
    """Run ``fn(progress)`` under a rich spinner; each step is also printed as a line."""
    t0 = time.monotonic()
    with err.status(title, spinner="dots") as status:
        seen = set()

        def progress(message: str) -> None:
            status.update(f"{title}: {escape(message)}")
            key = message.split(" (")[0]
            if key not in seen:
                seen.add(key)
                err.print(f"  {escape(message)}")
        result = fn(progress)
    return result, time.monotonic() - t0


@click.group()
def device():
    """The emulated aarch64 device: TVM's RPC server under qemu user mode on this machine."""


@device.command("setup-emulated-arm")
@click.option("--force", is_flag=True, help="Reinstall the rootfs and wheels even if complete.")
@click.option("--programs", is_flag=True, help="Also install the aarch64 LiteRT and ExecuTorch runtimes "
              "(verify-emulated installs them on first use).")
@fail_cleanly
def setup_emulated_arm(force, programs):
    """Install qemu-user-static, debootstrap, the aarch64 cross compiler, an arm64 Debian
    rootfs and the aarch64 TVM wheels (about 600 MB in the cache; reuses what is there)."""
    from structexport import emulated_arm
    path, seconds = _with_progress("setting up the emulated aarch64 device",
                                   lambda p: emulated_arm.ensure_installed(p, force=force))
    info = emulated_arm.install_info() or {}
    versions = info.get("versions", {})
    err.print(f"installed in {path} ({seconds:.0f} s): python {versions.get('python')}, "
              f"apache-tvm {versions.get('tvm')}, apache-tvm-ffi {versions.get('tvm_ffi')}, "
              f"numpy {versions.get('numpy')}; {sum(info.get('size_mb', {}).values()):.0f} MB")
    if programs:
        from structexport import emulated_programs
        _with_progress("installing the aarch64 LiteRT and ExecuTorch runtimes",
                       lambda p: emulated_programs.ensure_programs_installed(p, force=force))
    click.echo(str(path))


@device.command("verify-emulated")
@click.argument("package", type=click.Path(exists=True, file_okay=False))
@click.option("--runs", default=10, show_default=True, type=click.IntRange(1),
              help="Timed runs on the device after the check (emulated timings).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(1),
              help="Threads of the runtime on the device.")
@click.option("--timeout", default=900.0, show_default=True, type=click.FloatRange(1),
              help="Seconds the emulated run may take.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@fail_cleanly
def verify_emulated(package, runs, threads, timeout, as_json):
    """Run a litert or executorch package's program (model.tflite, model.pte) on the emulated
    aarch64 device under the aarch64 build of its runtime, compare it with the package's stored
    outputs within its tolerances, and time it there (emulated: not ARM latency). Installs the
    aarch64 runtime on first use. Exit 32 when the outputs differ."""
    from structexport.emulated_programs import verify_on_emulated_arm
    from structexport.export import VerificationError
    result, _seconds = _with_progress(
        "verifying on the emulated aarch64 device",
        lambda p: verify_on_emulated_arm(package, runs=runs, threads=threads, timeout=timeout, progress=p))
    timing = result["timing"]
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        out.print(f"{result['program']} on {escape(result['runtime'])}: {escape(result['summary'])}")
        out.print(f"emulated time per run: median {timing['median_ms']:.1f} ms (min {timing['min_ms']:.1f} ms, "
                  f"{timing['runs']} runs, {timing['threads']} thread(s)); not ARM latency")
    err.print(PROGRAM_NOTE)
    if not result["passed"]:
        raise VerificationError(f"{result['program']} does not give the package's verified outputs on the "
                                f"emulated aarch64 device: {result['summary']}",
                                "compare with `structexport bench` on the host; an aarch64 kernel differs")


@device.command("start-emulated-arm")
@click.option("--port", type=click.IntRange(1, 65535), help="Port to listen on (default: a free one).")
@click.option("--timeout", default=180.0, show_default=True, type=click.FloatRange(1),
              help="Seconds to wait for a working RPC session.")
@fail_cleanly
def start_emulated_arm(port, timeout):
    """Start the emulated aarch64 device, detached; print its address (127.0.0.1:PORT) last.
    If one already runs, print its address."""
    from structexport import emulated_arm
    dev, seconds = _with_progress("starting the emulated aarch64 device",
                                  lambda p: emulated_arm.start(port, timeout, p))
    err.print(f"emulated aarch64 device running, pid {dev.pid} (up after {seconds:.0f} s; "
              f"log {dev.log_path}); stop it with `structexport device stop`")
    err.print(EMULATED_NOTE)
    click.echo(dev.address)


@device.command()
@fail_cleanly
def stop():
    """Stop the emulated aarch64 device (exit 0 also when none was running)."""
    from structexport import emulated_arm
    if emulated_arm.stop():
        err.print("stopped the emulated aarch64 device")
    else:
        err.print("no emulated aarch64 device is running (nothing to stop)")


@device.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@fail_cleanly
def status(as_json):
    """Whether the emulated aarch64 device runs, and where (exit 3 when it does not)."""
    from structexport import emulated_arm
    dev = emulated_arm.running()
    report = {"running": dev is not None, "emulated": True,
              "installed": emulated_arm.is_installed(), "cache": str(emulated_arm.cache_dir())}
    if dev:
        report.update(dev.to_dict())
        report["uptime_s"] = round(time.time() - dev.started_at, 1)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    elif dev:
        out.print(f"emulated aarch64 device running at {dev.address} (pid {dev.pid}, up "
                  f"{report['uptime_s']:.0f} s); timings from it are emulated, not ARM latency")
    else:
        hint = ("start it with `structexport device start-emulated-arm`" if report["installed"]
                else "install it with `structexport device setup-emulated-arm`")
        out.print(f"no emulated aarch64 device is running ({hint})")
    if not dev:
        sys.exit(NOT_RUNNING_EXIT)
