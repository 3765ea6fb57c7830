"""Each `lmtune tune` worker takes its share of the machine's cores (lmtune._threads), not all of them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmtune import _threads
from lmtune._threads import ThreadShare, TuneWorker, available_cores, live_workers, plan, register, share
from tests.tune.conftest import ROOT, base_args, load


@pytest.fixture
def sleeper():
    """A live process that is not this one: a second 'worker'."""
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield p.pid
    p.kill()
    p.wait()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("cores, workers, expected", [(16, 1, 16), (16, 2, 8), (16, 3, 5), (2, 2, 1), (2, 3, 1),
                                                      (1, 1, 1), (8, 0, 8)])
def test_share_is_cores_divided_by_workers(cores, workers, expected):
    assert share(cores, workers) == expected


def test_available_cores_follows_the_affinity():
    if hasattr(os, "sched_getaffinity"):
        assert available_cores() == len(os.sched_getaffinity(0))
    else:
        assert available_cores() == (os.cpu_count() or 1)


def test_registry_counts_live_workers_and_ignores_dead_ones(tmp_path, sleeper):
    reg = tmp_path / "reg"
    assert live_workers(reg) == 1  # no registry yet: this worker alone
    mine = register(reg)
    assert mine == reg / f"{os.getpid()}.json" and mine.exists()
    assert live_workers(reg) == 1
    register(reg, pid=sleeper)
    assert live_workers(reg) == 2
    dead = _dead_pid()
    register(reg, pid=dead)
    (reg / "notes.txt").write_text("not a worker")
    (reg / "abc.json").write_text("{}")
    assert live_workers(reg) == 2
    assert not (reg / f"{dead}.json").exists()  # a stale entry is cleaned up
    # a pid that is alive but was reused by another process (its start time differs) is not a worker
    if _threads._start_time(sleeper) is not None:
        (reg / f"{sleeper}.json").write_text(json.dumps({"pid": sleeper, "start": "1"}))
        assert live_workers(reg) == 1
    _threads.unregister(mine)
    assert not mine.exists()


def test_registry_is_private_and_another_users_folder_is_not_used(tmp_path):
    reg = tmp_path / "reg"
    register(reg)
    assert (reg.stat().st_mode & 0o777) == 0o700
    link = tmp_path / "link"
    link.symlink_to(reg, target_is_directory=True)
    assert register(link) is None and live_workers(link) == 1  # a symlinked folder is never trusted


def test_plan_auto_override_and_omp_cap(tmp_path, sleeper, monkeypatch):
    reg = tmp_path / "reg"
    register(reg)
    register(reg, pid=sleeper)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert plan(None, reg, cores=16) == ThreadShare(8, 16, 2, "auto")
    assert plan(None, reg, cores=3) == ThreadShare(1, 3, 2, "auto")
    assert plan(3, reg, cores=16) == ThreadShare(3, 16, 2, "threads_per_worker")  # the override wins
    assert plan(32, reg, cores=16).threads == 32
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert plan(None, reg, cores=16) == ThreadShare(2, 16, 2, "OMP_NUM_THREADS")
    assert plan(None, reg, cores=2).source == "auto"  # a cap above the share changes nothing
    assert plan(5, reg, cores=16).threads == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert plan(None, reg, cores=16).threads == 8


def test_describe():
    assert ThreadShare(1, 2, 2, "auto").describe() == "threads: 1 of 2 cores (2 tune workers on this machine)"
    assert ThreadShare(8, 8, 1, "auto").describe() == "threads: 8 of 8 cores (1 tune worker on this machine)"
    assert ThreadShare(3, 16, 2, "threads_per_worker").describe() == "threads: 3 of 16 cores (--threads-per-worker)"
    assert "capped by OMP_NUM_THREADS=2" in ThreadShare(2, 16, 1, "OMP_NUM_THREADS").describe()


def test_worker_sets_threads_and_restores_them(tmp_path, sleeper, monkeypatch):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    reg = tmp_path / "reg"
    register(reg, pid=sleeper)
    torch.set_num_threads(1)
    with TuneWorker(None, reg) as w:
        assert (reg / f"{os.getpid()}.json").exists()
        got = w.apply()
        assert got.workers == 2 and got.threads == max(1, available_cores() // 2)
        assert torch.get_num_threads() == got.threads
        w.threads_per_worker = 3
        assert w.apply().threads == 3 and torch.get_num_threads() == 3
    assert torch.get_num_threads() == 1  # put back as it was
    assert not (reg / f"{os.getpid()}.json").exists()


def test_import_has_no_side_effects(tmp_path):
    code = ("import torch; n = torch.get_num_threads(); import lmtune._threads, lmtune.tune.study; "
            "assert torch.get_num_threads() == n; import os; print(os.listdir(os.environ['TMPDIR']))")
    env = dict(os.environ, TMPDIR=str(tmp_path), PYTHONPATH=str(ROOT / "src"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lmtune-tune-workers" not in out.stdout


def _start_line(text: str) -> str:
    lines = [ln for ln in text.splitlines() if "threads:" in ln and "cores" in ln]
    assert lines, text
    return lines[0]


def test_study_start_line_and_trial_attr_show_the_share(tune_data, tiny_llama, tmp_path, monkeypatch, capsys, sleeper):
    """A real one-trial study beside a second registered worker: each gets half of the cores."""
    import torch

    from lmtune.cli import main

    reg = tmp_path / "reg"
    monkeypatch.setattr(_threads, "registry_dir", lambda: reg)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    register(reg, pid=sleeper)
    cores = available_cores()
    expected = max(1, cores // 2)
    assert torch.get_num_threads() == 1  # tests/tune/conftest.py
    out = tmp_path / "s"
    assert main(base_args(tune_data, tiny_llama, out, "--n-trials", "1", "--epochs", "1")) == 0
    text = capsys.readouterr().out
    line = _start_line(text)
    assert f"threads: {expected} of {cores} cores (2 tune workers on this machine)" in line
    assert text.index("data: ") < text.index(line)  # with the study's start lines, before the first trial
    assert text.index(line) < text.index("trial 0:")
    trial = load(out).trials[0]
    assert trial.user_attrs["threads"] == expected
    assert torch.get_num_threads() == 1  # restored when tune() returned
    assert not (reg / f"{os.getpid()}.json").exists() and (reg / f"{sleeper}.json").exists()

    out2 = tmp_path / "s2"
    assert main(base_args(tune_data, tiny_llama, out2, "--n-trials", "1", "--epochs", "1", "--threads-per-worker", "1")) == 0
    line = _start_line(capsys.readouterr().out)
    assert re.search(rf"threads: 1 of {cores} cores? \(--threads-per-worker\)", line), line
    assert load(out2).trials[0].user_attrs["threads"] == 1
