"""Memory: sizes as users write them, the memory available to a run, and the peak a piece of work reaches.

The peak is measured the same way for a plan's calibration steps and for a search trial, so the two compare:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was allocated at the
  start (the CUDA context and the caching allocator's slack are not counted; the formula does not count them
  either).
* CPU (Linux): the process's resident-set high-water mark ``VmHWM`` from ``/proc/self/status``, reset at the
  start by writing ``5`` to ``/proc/self/clear_refs``, minus the resident set at the start. This is exact (the
  kernel keeps the mark on every page fault) where sampling the resident set from a thread misses short peaks,
  and ``resource.getrusage``'s ``ru_maxrss`` cannot be reset (it would report the largest thing the process ever
  did, e.g. an earlier, larger calibration). Freed heap that glibc keeps is handed back first (``malloc_trim``),
  so an earlier, larger piece of work does not hide in the start's resident set.
* Elsewhere (no ``clear_refs``): psutil samples the resident set every 5 ms from a thread; short peaks can be
  missed, so the figure is a lower bound.
"""

from __future__ import annotations

import ctypes
import os
import re
import threading
from pathlib import Path

from lmtune.errors import ConfigError

GIB = 1024**3
_UNITS = {"": None, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
          "g": GIB, "gb": 1000**3, "gib": GIB, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str, flag: str = "--memory-limit") -> int:
    """``20GiB``, ``512MiB``, ``1.5 GB``, ``20G`` (a bare K/M/G/T is binary) -> bytes; a unit is required."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS or _UNITS[unit] is None:
        raise ConfigError(f"{flag} must look like 20GiB, 512MiB or 1.5TB, got {text!r}")
    value = float(m.group(1)) * _UNITS[unit]
    if value < 1:
        raise ConfigError(f"{flag} must be more than zero, got {text!r}")
    return int(value)


def gib(n: float | int | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def available_bytes() -> tuple[int, str]:
    """Memory a run may still take, and where the figure comes from.

    CUDA: the GPU's free memory (``torch.cuda.mem_get_info``). CPU: the kernel's MemAvailable (psutil), or, in a
    container with a smaller memory limit (cgroup), what that limit leaves; the smaller of the two.
    """
    import torch

    if torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info()
        return int(free), f"free memory of {torch.cuda.get_device_name(0)}"
    import psutil

    avail, source = int(psutil.virtual_memory().available), "available RAM"
    cgroup = _cgroup_room()
    if cgroup is not None and cgroup < avail:
        return cgroup, "the container's memory limit"
    return avail, source


def _cgroup_room() -> int | None:
    """cgroup v2 (or v1) memory limit minus current usage, when a limit is set."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            raw = Path(limit_file).read_text().strip()
            if raw == "max" or int(raw) >= 2**60:
                return None
            return max(0, int(raw) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def _status_bytes(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def trim_heap() -> None:
    """Hand freed heap back to the system (glibc), so the resident set is what is in use."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_bytes("VmHWM") is not None
    except OSError:
        return False


class PeakMeter:
    """The peak memory a piece of work adds, measured as the module docstring says. Not reentrant (one process
    has one high-water mark).

        with PeakMeter() as meter:
            work()
        meter.peak_bytes   # bytes above the start
    """

    def __init__(self) -> None:
        self.peak_bytes: int | None = None
        self.method = ""
        self._start = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()
        self._sampled = 0

    def __enter__(self) -> PeakMeter:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start, self.method = torch.cuda.memory_allocated(), "cuda max_memory_allocated"
            return self
        import gc

        gc.collect()
        trim_heap()
        self._start = _status_bytes("VmRSS") or 0
        if _reset_hwm():
            self.method = "VmHWM (reset by clear_refs)"
            return self
        import psutil

        proc = psutil.Process()
        self._start = proc.memory_info().rss
        self._sampled = self._start
        self.method = "psutil RSS sampled every 5 ms (a lower bound)"

        def sample() -> None:
            while not self._stop.wait(0.005):
                self._sampled = max(self._sampled, proc.memory_info().rss)

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()
        return self

    def restart_peak(self) -> None:
        """Forget the peak so far (e.g. a model load's transient) but keep measuring from the same start."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        elif self._sampler is not None:
            import psutil
            self._sampled = psutil.Process().memory_info().rss
        else:
            _reset_hwm()

    def read(self) -> int:
        """Bytes above the start so far."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            return max(0, torch.cuda.max_memory_allocated() - self._start)
        if self._sampler is not None:
            return max(0, self._sampled - self._start)
        return max(0, (_status_bytes("VmHWM") or 0) - self._start)

    def __exit__(self, *exc) -> None:
        self.peak_bytes = self.read()
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join(timeout=1)


def machine() -> dict[str, object]:
    """What makes timings of this machine comparable: host, processor or GPU, threads, torch version."""
    import platform

    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "torch": torch.__version__}
