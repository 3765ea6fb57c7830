"""Checkpoints and resume: kill -9, corrupt checkpoints, SIGTERM (ENGINEERING.md §3 rows 3, 4, 5)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file


def train_cmd(model: str, files: dict[str, str], out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lmtune", "train", "--model", model, "--data", files["train"], "--val-file", files["val"],
            "--lr", "3e-3", "--batch-size", "16", "--epochs", "3", "--eval-every-steps", "4", "--precision", "fp32",
            "--checkpoint-every-steps", "2", "--no-progress", "--no-report", "--out", str(out), *extra]


def env(**extra: str) -> dict[str, str]:
    e = dict(os.environ)
    e.update(extra)
    return e


def weights_equal(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)


def metrics(folder: Path) -> list[dict]:
    rec = json.loads((folder / "lmtune_run.json").read_text())
    return [{k: h[k] for k in ("step", "train_loss", "val_loss", "accuracy", "macro_f1")} for h in rec["history"]]


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, sentiment_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("resume") / "full"
    subprocess.run(train_cmd(tiny_llama, sentiment_files, out), check=True, capture_output=True, timeout=300)
    return out


def test_kill9_then_resume_equals_uninterrupted_run(tiny_llama, sentiment_files, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    p = subprocess.run(train_cmd(tiny_llama, sentiment_files, out), env=env(LMTUNE_FAULT_KILL_AT_STEP="7"),
                       capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    assert not (out / "lmtune_run.json").exists()
    assert (out / "checkpoints" / "step-0000006" / "state.json").is_file()
    p = subprocess.run(train_cmd(tiny_llama, sentiment_files, out, "--resume"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "resumed from" in p.stdout
    assert metrics(out) == metrics(uninterrupted)
    assert weights_equal(out, uninterrupted)


def test_truncated_checkpoint_falls_back_to_the_previous_one(tiny_llama, sentiment_files, tmp_path, uninterrupted):
    out = tmp_path / "corrupt"
    subprocess.run(train_cmd(tiny_llama, sentiment_files, out), env=env(LMTUNE_FAULT_KILL_AT_STEP="7"),
                   capture_output=True, timeout=300)
    newest = out / "checkpoints" / "step-0000006" / "trainable.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # a crash mid-write, as seen by the next run
    # a half-written checkpoint folder (no state.json) must never be taken for whole either
    (out / "checkpoints" / "step-0000007.tmp").mkdir()
    p = subprocess.run(train_cmd(tiny_llama, sentiment_files, out, "--resume"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "skipping" in p.stdout and "step-0000006" in p.stdout
    assert "resumed from" in p.stdout and "step-0000004" in p.stdout
    assert metrics(out) == metrics(uninterrupted)
    assert weights_equal(out, uninterrupted)


def test_explicit_corrupt_checkpoint_is_named(tmp_path):
    from lmtune.errors import CheckpointError
    from lmtune.train.checkpoint import read_checkpoint

    folder = tmp_path / "step-0000001"
    folder.mkdir()
    (folder / "state.json").write_text("{}")
    (folder / "trainable.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="trainable.safetensors"):
        read_checkpoint(folder)


def test_resume_with_other_settings_is_refused(tiny_llama, sentiment_files, tmp_path):
    out = tmp_path / "x"
    subprocess.run(train_cmd(tiny_llama, sentiment_files, out), env=env(LMTUNE_FAULT_KILL_AT_STEP="3"),
                   capture_output=True, timeout=300)
    cmd = train_cmd(tiny_llama, sentiment_files, out, "--resume")
    cmd[cmd.index("--lr") + 1] = "1e-3"
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2
    assert "different configuration" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_a_checkpoint(tiny_llama, sentiment_files, tmp_path, sig):
    out = tmp_path / "sig"
    cmd = train_cmd(tiny_llama, sentiment_files, out)
    cmd[cmd.index("--epochs") + 1] = "400"
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoints").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    t0 = time.time()
    p.send_signal(sig)
    _, err = p.communicate(timeout=30)
    assert time.time() - t0 < 10
    assert p.returncode == 130, err
    assert "rerun with --resume" in err and "Traceback" not in err
    assert any((c / "state.json").is_file() for c in (out / "checkpoints").glob("step-*"))
