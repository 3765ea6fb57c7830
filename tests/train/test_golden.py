"""Golden losses of a tiny seeded classification run (torchtune's recipe tests do the same): refactors of the
loop (the task seam, generation) must not move classification results. Pinned on lmtune 0.1's loop before the
generation task was cut out of it; fp32 on CPU."""

from __future__ import annotations

import pytest

from tests.conftest import write_sentiment_splits

GOLDEN = {
    "full": {
        "train": [0.751397, 0.723949, 0.709418, 0.666706, 0.693544, 0.750165, 0.730217, 0.697851, 0.465938, 0.431569,
                  0.413741, 0.386693, 0.436417, 0.486246, 0.458887, 0.446157],
        "val": [0.72199, 0.682997, 0.653435, 0.639695],
    },
    "lora": {
        "train": [0.751397, 0.723949, 0.714729, 0.689011, 0.706362, 0.724061, 0.717188, 0.707107, 0.55812, 0.536323,
                  0.535529, 0.502338, 0.567514, 0.589573, 0.578825, 0.574155],
        "val": [0.717568, 0.713977, 0.727468, 0.736986],
    },
}


@pytest.mark.parametrize("method", sorted(GOLDEN))
def test_classification_losses_do_not_move(method, tiny_llama, tmp_path):
    import torch

    import lmtune

    files = write_sentiment_splits(tmp_path / "data", 64)
    cfg = lmtune.RunConfig(
        data=lmtune.DataConfig(train_file=files["train"], val_file=files["val"]),
        model=lmtune.ModelConfig(name=tiny_llama, method=method),
        train=lmtune.TrainConfig(learning_rate=3e-3, global_batch_size=8, micro_batch_size=4, epochs=2, precision="fp32",
                                 progress=False, log_every_steps=1, eval_every_steps=4),
        output_dir=str(tmp_path / "run"), report=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the numbers were taken with one thread; more threads may reorder float sums
    try:
        result = lmtune.train(cfg)
    finally:
        torch.set_num_threads(threads)
    train = [x["loss"] for x in result.record["train_log"]]
    val = [h["val_loss"] for h in result.history]
    assert train == pytest.approx(GOLDEN[method]["train"], rel=2e-5, abs=2e-6)
    assert val == pytest.approx(GOLDEN[method]["val"], rel=2e-5, abs=2e-6)
