"""Run the lmtune CLI with every phase of a trial wrapped: which phase raises VmHWM, by how much."""
import sys, functools, collections, atexit
from pathlib import Path

def status(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0

raised = collections.defaultdict(int)   # phase -> bytes VmHWM rose during it
calls = collections.Counter()
events = []

def wrap(mod, name, label):
    fn = getattr(mod, name)
    @functools.wraps(fn)
    def inner(*a, **k):
        before = status("VmHWM")
        rss0 = status("VmRSS")
        try:
            return fn(*a, **k)
        finally:
            after = status("VmHWM")
            raised[label] += after - before
            calls[label] += 1
            if after > before:
                events.append((label, calls[label], rss0 / 2**20, after / 2**20))
    setattr(mod, name, inner)

import importlib; loop = importlib.import_module("lmtune.train.loop")
import lmtune.decoding as decoding
import lmtune.tasks.generation as gen
probe = importlib.import_module("lmtune.train.probe")
wrap(loop, "_setup", "setup(load)")
wrap(loop, "_optimizer_step", "optimizer_step")
wrap(loop, "_evaluate", "evaluate(all)")
wrap(loop, "_finish", "finish(save)")
wrap(decoding, "generate", "decode")
if hasattr(gen, "generate"):
    wrap(gen, "generate", "decode")
wrap(probe, "probe", "plan probe")

@atexit.register
def show():
    print("\n== VmHWM rises by phase (MiB) ==", file=sys.stderr)
    for k, v in raised.items():
        print(f"{k:16s} calls {calls[k]:4d} raised {v/2**20:8.1f}", file=sys.stderr)
    print("events (phase, call#, rss before MiB, hwm after MiB):", file=sys.stderr)
    for e in events:
        print("  %-16s %4d %8.1f %8.1f" % e, file=sys.stderr)

from lmtune.cli import main
sys.exit(main(sys.argv[1:]))
