"""The throughput benchmark's lmtune contender (``bench/worker.py``) times lmtune's own training steps by wrapping
the loop's forward/backward and optimizer: it must keep up with the loop it measures (it silently lost its hook
when the loop was cut into functions) and leave the loop as it found it."""

from __future__ import annotations

import csv

import pytest


@pytest.fixture
def sst2_like(tmp_path, monkeypatch):
    """A tiny SST-2-shaped folder where ``bench.common.data_dir`` looks for it."""
    folder = tmp_path / "data" / "sst2"
    folder.mkdir(parents=True)
    words = ["good", "bad", "fine", "awful", "great", "dull", "lovely", "poor"]
    for name, n in (("train.tsv", 40), ("validation.tsv", 16)):
        with open(folder / name, "w", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["sentence", "label"])
            for i in range(n):
                w.writerow([" ".join(words[(i + k) % len(words)] for k in range(2 + i % 5)), i % 2])
    monkeypatch.setenv("LMTUNE_DATA_DIR", str(tmp_path / "data"))
    return folder


def test_lmtune_contender_times_each_step_and_restores_the_loop(tiny_llama, sst2_like, tmp_path):
    import importlib

    import torch

    from bench.worker import run_lmtune

    loop = importlib.import_module("lmtune.train.loop")  # `lmtune.train` is the function

    torch.set_num_threads(1)
    before = (loop._forward_backward, loop._adamw)
    spec = {"data": "sst2", "rows": 40, "val_rows": 16, "steps": 5, "lr": 5e-5, "batch": 8, "max_length": 32,
            "seed": 0, "warmup_ratio": 0.0, "weight_decay": 0.0, "eval_batch": 16, "workdir": str(tmp_path / "w"),
            "model": tiny_llama}
    out = run_lmtune(spec)
    assert (loop._forward_backward, loop._adamw) == before
    assert out["steps_timed"] == 4  # 5 steps, the first a warm-up
    assert out["steps_per_epoch"] == 5 and out["train_rows"] == 40
    # 4 timed steps of 8 rows, each of 3 to 7 words (plus special tokens): tokens counted from the steps' rows
    assert 4 * 8 * 3 <= out["tokens_timed"] <= out["padded_tokens_timed"] <= 4 * 8 * 32
    assert 0 < out["fwd_bwd_share"] < 1 and 0 < out["optimizer_share"] < 1
    assert out["fwd_bwd_s_per_step"] + out["optimizer_s_per_step"] <= out["s_per_step"] * 1.05
    assert out["non_embedding_params"] > 0 and out["n_layers"] >= 1
