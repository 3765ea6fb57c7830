"""The training recipe on tiny random models: learning, output folder, methods, evaluation cadence."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lmtune
from lmtune import DataConfig, ModelConfig, RunConfig, TrainConfig
from lmtune.errors import ConfigError, DivergenceError


def run_cfg(model: str, files: dict[str, str], out: Path, **train) -> RunConfig:
    defaults = dict(learning_rate=3e-3, global_batch_size=16, epochs=3, precision="fp32", progress=False, seed=0)
    defaults.update(train)
    return RunConfig(data=DataConfig(train_file=files["train"], val_file=files["val"]),
                     model=ModelConfig(name=model), train=TrainConfig(**defaults), output_dir=str(out), report=False)


def test_tiny_llama_learns_and_saves_a_plain_transformers_folder(tiny_llama, sentiment_files, tmp_path):
    from transformers import AutoModelForSequenceClassification, pipeline

    out = tmp_path / "run"
    result = lmtune.train(run_cfg(tiny_llama, sentiment_files, out))
    hist = result.history
    assert len(hist) == 3  # one evaluation per epoch
    assert hist[-1]["val_loss"] < hist[0]["val_loss"]
    assert result.best["accuracy"] >= 0.75, hist  # majority class is 0.5

    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "neg", 1: "pos"}
    assert model.config.pad_token_id is not None
    clf = pipeline("text-classification", model=str(out))
    preds = clf(["the film was good and lovely", "bad awful and dull"])
    assert {p["label"] for p in preds} <= {"neg", "pos"}

    record = json.loads((out / "lmtune_run.json").read_text())
    assert record["status"] == "completed" and record["labels"] == ["neg", "pos"]
    assert record["best"]["accuracy"] == result.best["accuracy"]
    assert record["versions"]["torch"] and record["versions"]["transformers"]
    assert len(record["data"]["token_lengths"]["train"]) == 160
    curve = (out / "curve.csv").read_text().strip().splitlines()
    assert curve[0].startswith("step,epoch,train_loss,val_loss,accuracy") and len(curve) == 1 + len(hist)
    preds = [json.loads(line) for line in (out / "val_predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 40 and set(preds[0]) >= {"line", "text", "label", "predicted", "probability"}
    assert not (out / "checkpoints").exists()  # resumable state is removed once the run is finished


def test_best_checkpoint_is_the_one_saved(tiny_llama, sentiment_files, tmp_path):
    """With a schedule that overshoots late, the saved model is the best evaluation, not the last."""
    out = tmp_path / "run"
    result = lmtune.train(run_cfg(tiny_llama, sentiment_files, out, eval_every_steps=3, epochs=2,
                                  learning_rate=2e-2, lr_schedule="constant", metric="val_loss"))
    losses = [h["val_loss"] for h in result.history]
    assert result.best["val_loss"] == min(losses)
    scored = lmtune.evaluate(str(out), sentiment_files["val"], precision="fp32")
    assert scored["loss"] == pytest.approx(min(losses), abs=1e-4)


def test_eval_every_steps_and_early_stopping(tiny_llama, sentiment_files, tmp_path):
    result = lmtune.train(run_cfg(tiny_llama, sentiment_files, tmp_path / "run", eval_every_steps=2, epochs=5,
                                  learning_rate=1e-6, early_stopping_patience=2, metric="accuracy"))
    steps = [h["step"] for h in result.history]
    assert steps[:3] == [2, 4, 6]
    assert result.record["stopped_early"] is True
    assert result.record["steps"]["done"] < result.record["steps"]["total"]


@pytest.mark.parametrize("method", ["head", "lora"])
def test_head_and_lora_methods_train_few_parameters_and_save_plain_folders(tiny_gpt2, sentiment_files, tmp_path, method):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / method
    cfg = run_cfg(tiny_gpt2, sentiment_files, out, epochs=1, learning_rate=1e-2)
    cfg.model.method = method
    result = lmtune.train(cfg)
    m = result.record["model"]
    assert m["trainable_params"] < m["total_params"] / 2
    if method == "head":
        assert m["trainable_params"] == 32 * 2  # score head: width x classes, no bias
    assert not list(out.glob("adapter_*"))  # LoRA is merged: plain transformers loads it
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.num_labels == 2


def test_text_pairs(tiny_llama, tmp_path):
    import random
    rng = random.Random(0)
    rows = ["sentence1\tsentence2\tlabel"]
    for i in range(120):
        a = rng.choice(["good", "bad"])
        b = a if i % 2 == 0 else ("bad" if a == "good" else "good")
        rows.append(f"the film was {a}\tit is {b}\t{'same' if a == b else 'different'}")
    (tmp_path / "pairs.tsv").write_text("\n".join(rows) + "\n")
    cfg = RunConfig(data=DataConfig(train_file=str(tmp_path / "pairs.tsv")), model=ModelConfig(name=tiny_llama),
                    train=TrainConfig(epochs=1, precision="fp32", progress=False), output_dir=str(tmp_path / "o"),
                    report=False)
    result = lmtune.train(cfg)
    assert result.record["data"]["text_pair_column"] == "sentence2"
    assert result.record["data"]["rows"] == {"train": 96, "val": 24}  # default --val-fraction 0.2, stratified
    predicted = lmtune.predict(str(tmp_path / "o"), str(tmp_path / "pairs.tsv"))
    assert len(predicted) == 120 and "text_pair" in predicted[0]
    # the first text alone gives confident nonsense: a file without the pair column is refused
    (tmp_path / "firsts.tsv").write_text("sentence1\n" + "\n".join(r.split("\t")[0] for r in rows[1:]) + "\n")
    with pytest.raises(lmtune.DataError, match="trained on text pairs"):
        lmtune.predict(str(tmp_path / "o"), str(tmp_path / "firsts.tsv"))


def test_nan_loss_stops_before_writing_a_model(tiny_llama, sentiment_files, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DivergenceError, match="lower --lr"):
        lmtune.train(run_cfg(tiny_llama, sentiment_files, out, learning_rate=1e6, max_grad_norm=None,
                             warmup_ratio=0.0))
    assert not (out / "model.safetensors").exists()
    assert not (out / "lmtune_run.json").exists()


def test_out_of_memory_halves_micro_batch_and_keeps_global_batch(tiny_llama, sentiment_files, tmp_path, monkeypatch):
    """ENGINEERING.md §3 row 11: simulate the allocator's error for micro-batches larger than 4."""
    from transformers import LlamaForSequenceClassification

    real_forward = LlamaForSequenceClassification.forward

    def forward(self, input_ids=None, **kw):
        if self.training and input_ids is not None and input_ids.shape[0] > 4:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")
        return real_forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(LlamaForSequenceClassification, "forward", forward)
    oom = lmtune.train(run_cfg(tiny_llama, sentiment_files, tmp_path / "oom", epochs=1))
    monkeypatch.setattr(LlamaForSequenceClassification, "forward", real_forward)
    ref = lmtune.train(run_cfg(tiny_llama, sentiment_files, tmp_path / "ref", epochs=1, micro_batch_size=4))
    assert oom.record["micro_batch_size_used"] == 4
    assert [e["micro_batch_size"] for e in oom.record["oom_events"]] == [8, 4]
    assert oom.record["steps"] == ref.record["steps"]  # same optimizer steps: global batch kept
    assert oom.best["val_loss"] == pytest.approx(ref.best["val_loss"], abs=1e-5)


def test_finished_output_dir_is_not_overwritten_by_accident(tiny_llama, sentiment_files, tmp_path):
    out = tmp_path / "run"
    lmtune.train(run_cfg(tiny_llama, sentiment_files, out, epochs=1))
    with pytest.raises(ConfigError, match="--overwrite"):
        lmtune.train(run_cfg(tiny_llama, sentiment_files, out, epochs=1))
    cfg = run_cfg(tiny_llama, sentiment_files, out, epochs=1)
    cfg.overwrite = True
    lmtune.train(cfg)


def test_evaluate_reports_per_class_and_writes_json(tiny_llama, sentiment_files, tmp_path):
    out = tmp_path / "run"
    lmtune.train(run_cfg(tiny_llama, sentiment_files, out, epochs=1))
    r = lmtune.evaluate(str(out), sentiment_files["test"])
    assert set(r["per_class"]) == {"neg", "pos"}
    assert np.asarray(r["confusion_matrix"]).sum() == 40
    saved = json.loads((out / "eval" / "test.json").read_text())
    assert saved["accuracy"] == r["accuracy"]
