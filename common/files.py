"""Writing a small file so that a crash leaves either the old or the new one, never half.

`write_atomically` writes a temporary file beside the target, fsyncs it, renames (or, with
`exclusive`, hard-links: never overwrites) it into place, then fsyncs the folder so the
new name itself is durable. Used for keys (common.keygen) and the participants changed at
run time (common.participants).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def load_json(text: str | bytes) -> Any:
    """`json.loads` that raises ValueError for every bad document: also one nested past
    the interpreter's recursion limit (`[[[[…` from a damaged or hostile file), which
    `json` reports as a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def updating(path: Path) -> Iterator[None]:
    """Hold an exclusive lock for a read-modify-write of `path` (on its folder, so no
    lock file is left beside it): two tools updating it at once would each write back
    what they read, and one change would be lost. Raises OSError."""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` to `fd` (os.write may take fewer). Raises OSError."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomically(path: Path, data: bytes, mode: int, *, exclusive: bool = False) -> None:
    """Put `data` at `path` with `mode` (whatever the umask). Raises OSError; with
    `exclusive`, FileExistsError if `path` exists (nothing is changed then)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)  # the umask may have taken bits off
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)
