"""Atomic file writes: a crash leaves either the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file (0o644 under the usual umask)."""
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without setting it (os.umask can only be read by changing it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (a temp file beside it, fsync, rename), with the usual file mode.

    A path that is a device or a pipe (``-o /dev/null``, a FIFO) is written into, never replaced: renaming over
    /dev/null as root would break it for the whole machine.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "is a folder, expected a file name", str(path))
    if path.exists() and not path.is_file():
        with open(path, "wb") as f:
            f.write(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # mkstemp makes 0600; a result file is as readable as any other
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """``numpy.savez`` written atomically: readers of a cache see the old file or the whole new one."""
    import io

    import numpy as np

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


class FolderLock:
    """An exclusive lock on an output folder while a run or a study worker writes it: a second ``lmtune train``
    into the same folder used to finish "successfully" and silently replace the first one's model.
    Advisory (``flock`` on ``.lmtune.lock``); released when the process ends, however it ends."""

    def __init__(self, folder: str | os.PathLike, flag: str = "--out"):
        self.folder, self.flag, self._fd = Path(folder), flag, None

    def __enter__(self) -> "FolderLock":
        import fcntl

        from lmtune.errors import ConfigError

        path = self.folder / ".lmtune.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise ConfigError(f"{self.flag} {self.folder}: in use by another lmtune process ({holder}); "
                              "wait for it, or choose another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def ensure_writable_dir(path: str | os.PathLike, flag: str) -> Path:
    """Create ``path`` (a folder) if needed and check a file can be written there, before any slow work:
    an --out that is a file, or on a read-only disk, used to be found only after the model had loaded."""
    from lmtune.errors import ConfigError

    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".lmtune-write-check-", dir=p)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None
    return p
