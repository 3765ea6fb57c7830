"""Two processes on CPU (gloo) under `accelerate launch`: same optimisation as one process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.skipif(shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists(),
                    reason="accelerate CLI not installed")
def test_two_processes_match_one(tiny_llama, sentiment_files, tmp_path):
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).with_name("accelerate"))
    common = ["--model", tiny_llama, "--data", sentiment_files["train"], "--val-file", sentiment_files["val"],
              "--lr", "3e-3", "--batch-size", "16", "--epochs", "2", "--precision", "fp32", "--no-progress", "--no-report"]
    # `--multi_gpu` is accelerate's name for "start N processes with torchrun"; without a GPU they use gloo.
    two = subprocess.run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                          "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "lmtune", "train", *common,
                          "--out", str(tmp_path / "two")], capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, "-m", "lmtune", "train", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    r2 = json.loads((tmp_path / "two" / "lmtune_run.json").read_text())
    r1 = json.loads((tmp_path / "one" / "lmtune_run.json").read_text())
    assert r2["num_processes"] == 2 and r1["num_processes"] == 1
    assert r2["steps"] == r1["steps"]  # the global batch is split across processes, not doubled
    for a, b in zip(r1["history"], r2["history"]):
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=2e-3)
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=0.05)
