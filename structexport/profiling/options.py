"""What the profile driver and its collectors share: the options of a run and its error."""
from __future__ import annotations

from dataclasses import dataclass

from structexport.errors import StructExportError


class ProfileError(StructExportError):
    exit_code, kind = 40, "profile-failed"


@dataclass
class ProfileOptions:
    target: str | None = None        # None: the OUTDIR's target (ort-cpu for checkpoints)
    threads: int = 1
    batch: int = 1
    input_shape: tuple[int, ...] | None = None
    repeat: int = 50                  # profiled runs of each model (interleaved)
    warmup: int = 5
    seed: int = 0
    peak: bool = True                 # measure the machine's GEMM peak
    rpc: str | None = None
    tracker: str | None = None
    key: str | None = None
    rpc_timeout: float | None = None   # seconds an RPC session may last (None: the default)
    trust_pickle: bool = False        # the loader's trust flags, for checkpoints
    allow_torchscript: bool = False

