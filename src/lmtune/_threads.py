"""Share this machine's cores among the ``lmtune tune`` workers running on it.

Left alone, every worker's math library takes every core, so two workers on one machine each run twice as
many threads as there are cores and both crawl (one trial took 572 s instead of 98 s). A worker registers
itself in a machine-wide, per-user registry (one small file per process in a private temp folder, removed
when the worker ends; files of dead processes are ignored and cleaned up) and, before each trial, sets
``torch.set_num_threads(max(1, cores // live workers))``. ``--threads-per-worker`` overrides the share; an
``OMP_NUM_THREADS`` set in the environment caps it.

Importing this module has no side effects; only :class:`TuneWorker` registers, and it sets torch's thread
count only in :meth:`TuneWorker.apply`, restoring the previous count when it exits.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ThreadShare", "TuneWorker", "available_cores", "live_workers", "plan", "register", "registry_dir",
           "share", "unregister"]


def registry_dir() -> Path:
    """The per-user registry folder of live tune workers on this machine (in the system temp folder)."""
    try:
        user = str(os.getuid())
    except AttributeError:  # Windows
        import getpass
        user = getpass.getuser()
    return Path(tempfile.gettempdir()) / f"lmtune-tune-workers-{user}"


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity, which respects taskset/cgroup cpusets), else all."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def share(cores: int, workers: int) -> int:
    """Threads per worker: the cores split evenly, at least one."""
    return max(1, int(cores) // max(1, int(workers)))


def _private_dir(directory: Path, create: bool) -> Path | None:
    """``directory`` if it is a real folder owned by this user (never follow another user's symlink in /tmp)."""
    try:
        if create:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(directory)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    if hasattr(os, "getuid") and st.st_uid != os.getuid():
        return None
    return directory


def _start_time(pid: int) -> str | None:
    """The process's start time (Linux: clock ticks since boot), to tell a live worker from a reused pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
        return raw.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: a reused pid, never one of our workers
        return False
    except OSError:
        return False
    return True


def register(directory: Path | None = None, pid: int | None = None) -> Path | None:
    """Record ``pid`` (default: this process) as a live tune worker; returns its file, or None if the
    registry cannot be used (then this worker counts only itself)."""
    d = _private_dir(Path(directory) if directory is not None else registry_dir(), create=True)
    if d is None:
        return None
    pid = os.getpid() if pid is None else int(pid)
    path = d / f"{pid}.json"
    body = json.dumps({"pid": pid, "start": _start_time(pid), "host": socket.gethostname()})
    tmp = d / f".{pid}.json.tmp"
    try:
        tmp.write_text(body)
        os.replace(tmp, path)
    except OSError:
        return None
    return path


def unregister(path: Path | None) -> None:
    if path is not None:
        try:
            path.unlink()
        except OSError:
            pass


def live_workers(directory: Path | None = None) -> int:
    """How many registered tune workers are alive on this machine (at least 1: the caller).

    A file whose process is gone, or whose pid now belongs to another process (its start time differs),
    is ignored and removed.
    """
    d = _private_dir(Path(directory) if directory is not None else registry_dir(), create=False)
    if d is None:
        return 1
    me = os.getpid()
    pids = {me} if (d / f"{me}.json").exists() else set()
    try:
        entries = list(d.iterdir())
    except OSError:
        return max(1, len(pids))
    for f in entries:
        if f.suffix != ".json" or not f.stem.isdigit():
            continue
        pid = int(f.stem)
        if pid in pids:
            continue
        try:
            info = json.loads(f.read_text())
            recorded = info.get("start") if isinstance(info, dict) else None
        except (OSError, ValueError):
            recorded = None
        live = _alive(pid)
        if live and recorded is not None:
            now = _start_time(pid)
            live = now is None or now == recorded
        if live:
            pids.add(pid)
        else:
            try:
                f.unlink()
            except OSError:
                pass
    return max(1, len(pids))


def _env_cap() -> int | None:
    """A positive integer OMP_NUM_THREADS from the environment: the user's own limit, honoured as a cap."""
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    try:
        n = int(raw)
    except ValueError:
        return None
    return n if n >= 1 else None


@dataclass(frozen=True)
class ThreadShare:
    """The math threads one worker uses, and why."""

    threads: int
    cores: int
    workers: int
    source: str  # "auto", "threads_per_worker" or "OMP_NUM_THREADS"

    def describe(self) -> str:
        s = f"threads: {self.threads} of {self.cores} core{'s' if self.cores != 1 else ''}"
        if self.source == "threads_per_worker":
            return s + " (--threads-per-worker)"
        s += f" ({self.workers} tune worker{'s' if self.workers != 1 else ''} on this machine"
        if self.source == "OMP_NUM_THREADS":
            s += f"; capped by OMP_NUM_THREADS={self.threads}"
        return s + ")"


def plan(threads_per_worker: int | None = None, directory: Path | None = None, cores: int | None = None) -> ThreadShare:
    """This worker's share now: ``threads_per_worker`` if given, else cores // live workers (capped by
    OMP_NUM_THREADS when that is set)."""
    cores = available_cores() if cores is None else max(1, int(cores))
    workers = live_workers(directory)
    if threads_per_worker is not None:
        return ThreadShare(max(1, int(threads_per_worker)), cores, workers, "threads_per_worker")
    n = share(cores, workers)
    cap = _env_cap()
    if cap is not None and cap < n:
        return ThreadShare(cap, cores, workers, "OMP_NUM_THREADS")
    return ThreadShare(n, cores, workers, "auto")


class TuneWorker:
    """Registered as a live tune worker while inside ``with``; :meth:`apply` sets this worker's share.

    On exit the registration is removed and torch's thread count is put back as it was on entry (``tune``
    may be called from Python, whose caller keeps its own setting).
    """

    def __init__(self, threads_per_worker: int | None = None, directory: Path | None = None):
        self.threads_per_worker = threads_per_worker
        self.directory = directory
        self.current: ThreadShare | None = None
        self._path: Path | None = None
        self._previous: int | None = None

    def __enter__(self) -> TuneWorker:
        import torch

        self._previous = torch.get_num_threads()
        self._path = register(self.directory)
        if self._path is not None:
            atexit.register(self._unregister)  # an exit that skips __exit__; a kill -9 leaves a stale file, ignored
        return self

    def apply(self) -> ThreadShare:
        """Recompute the share (workers come and go) and set torch's intra-op threads to it."""
        import torch

        self.current = plan(self.threads_per_worker, self.directory)
        if torch.get_num_threads() != self.current.threads:
            torch.set_num_threads(self.current.threads)
        return self.current

    def _unregister(self) -> None:
        unregister(self._path)
        self._path = None

    def __exit__(self, *exc) -> None:
        import torch

        self._unregister()
        atexit.unregister(self._unregister)
        if self._previous is not None and torch.get_num_threads() != self._previous:
            torch.set_num_threads(self._previous)
