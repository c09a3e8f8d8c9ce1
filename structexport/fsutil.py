"""Files written whole or not at all, and the one cache folder.

Atomic writes go to a uniquely named temporary file beside the target (``mkstemp``), then
``os.replace``: concurrent writers never share a temporary file, and a reader sees the old
file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        else:  # mkstemp makes it private; a written file should get the usual permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), mode)


def write_json_atomic(path: str | os.PathLike, data, indent: int | None = 2, **kwargs) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=indent, **kwargs) + "\n")


def cache_root() -> Path:
    """``$STRUCTEXPORT_CACHE``, else ``$XDG_CACHE_HOME/structexport``, else
    ``~/.cache/structexport``; read on every call, so a change of the variable counts."""
    env = os.environ.get("STRUCTEXPORT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "structexport"
