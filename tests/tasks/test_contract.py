"""One contract, every task: the same checks run against classification and generation (and on Llama-, GPT-2- and
Gemma-3-shaped tiny models), so the loop's promises hold whatever is learned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import lmtune
from lmtune.cli import main

TASKS = ["classification", "generation"]
ARCHS = ["tiny_llama", "tiny_gpt2", "tiny_gemma3"]


def files_for(task: str, sentiment_files, generation_files) -> dict[str, str]:
    return sentiment_files if task == "classification" else generation_files


def run_config(task: str, model: str, files: dict[str, str], out: Path, **train) -> lmtune.RunConfig:
    settings = dict(learning_rate=3e-3, global_batch_size=16, epochs=2, precision="fp32", progress=False,
                    max_length=48) | train
    return lmtune.RunConfig(data=lmtune.DataConfig(train_file=files["train"], val_file=files["val"]),
                            model=lmtune.ModelConfig(name=model), train=lmtune.TrainConfig(**settings),
                            output_dir=str(out), report=False)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (tests/conftest.py)."""


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("task", TASKS)
def test_it_learns_and_saves_a_folder_plain_transformers_loads(task, arch, request, sentiment_files, generation_files,
                                                                tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    model = request.getfixturevalue(arch)
    result = lmtune.train(run_config(task, model, files_for(task, sentiment_files, generation_files), tmp_path / "run",
                                     epochs=3))
    assert result.record["task"] == task  # detected from the data: no --task given
    losses = [h["val_loss"] for h in result.history]
    assert losses[-1] < losses[0], losses
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    loaded = auto.from_pretrained(tmp_path / "run")
    assert type(loaded).__name__.endswith("ForSequenceClassification") == (task == "classification")
    assert lmtune.inference.task_of(str(tmp_path / "run")) == task
    assert (tmp_path / "run" / "val_predictions.jsonl").is_file() and (tmp_path / "run" / "curve.csv").is_file()


@pytest.mark.parametrize("task", TASKS)
def test_halving_the_micro_batch_gives_the_same_optimisation(task, tiny_llama, sentiment_files, generation_files, tmp_path):
    """The loss of a micro-batch is divided by the units (rows, or target tokens) of the whole global batch, so
    cutting a step into 1 or 8 micro-batches gives the same gradient: what out-of-memory back-off relies on."""
    files = files_for(task, sentiment_files, generation_files)
    whole = lmtune.train(run_config(task, tiny_llama, files, tmp_path / "a", epochs=1, micro_batch_size=16))
    parts = lmtune.train(run_config(task, tiny_llama, files, tmp_path / "b", epochs=1, micro_batch_size=2))
    assert [h["val_loss"] for h in parts.history] == pytest.approx([h["val_loss"] for h in whole.history], rel=1e-5)
    assert parts.record["micro_batch_size_used"] == 2


@pytest.mark.parametrize("task", TASKS)
def test_evaluate_and_predict_dispatch_on_the_record(task, tiny_llama, sentiment_files, generation_files, tmp_path, capsys):
    files = files_for(task, sentiment_files, generation_files)
    out = tmp_path / "run"
    lmtune.train(run_config(task, tiny_llama, files, out, epochs=1))
    result = lmtune.evaluate(str(out), files["test"])
    assert result["n"] == (40 if task == "classification" else 16)
    assert ("accuracy" in result) == (task == "classification") and ("bleu" in result) == (task == "generation")
    rows = lmtune.predict(str(out), files["test"])
    first_lines = [2, 3] if task == "classification" else [1, 2]  # a TSV header is line 1; JSON lines have none
    assert len(rows) == result["n"] and [r["line"] for r in rows][:2] == first_lines
    assert ("label" in rows[0]) == (task == "classification") and ("completion" in rows[0]) == (task == "generation")


@pytest.mark.parametrize("task,bad,needle", [
    ("classification", "text\tlabel\ngood film\tpos\n\tneg\n", "empty text"),
    ("generation", '{"messages": [{"role": "user", "content": "hi"}]}\n', "assistant"),
])
def test_bad_input_is_one_line_and_trains_nothing(task, bad, needle, tiny_llama, tmp_path, capsys):
    data = tmp_path / ("bad.tsv" if task == "classification" else "bad.jsonl")
    data.write_text(bad)
    code = main(["train", "--model", tiny_llama, "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err and str(data) in err, err
    assert not (tmp_path / "o" / "model.safetensors").exists()


@pytest.mark.parametrize("task", TASKS)
def test_a_metric_of_the_other_task_is_refused(task, tiny_llama, sentiment_files, generation_files, tmp_path, capsys):
    files = files_for(task, sentiment_files, generation_files)
    other = "bleu" if task == "classification" else "accuracy"
    code = main(["train", "--model", tiny_llama, "--data", files["train"], "--metric", other, "--out", str(tmp_path / "o")])
    assert code == 2 and f"--metric {other} is not a {task} metric" in capsys.readouterr().err


@pytest.mark.parametrize("task", TASKS)
def test_a_search_runs_on_every_task(task, tiny_llama, sentiment_files, generation_files, tmp_path):
    files = files_for(task, sentiment_files, generation_files)
    out = tmp_path / "study"
    code = main(["tune", "--model", tiny_llama, "--data", files["train"], "--val-file", files["val"], "--out", str(out),
                 "--n-trials", "2", "--epochs", "1", "--batch-size", "16", "--max-length", "48", "--lr", "1e-3..5e-3:log",
                 "--confirm-seeds", "0", "--no-report"])
    assert code == 0
    meta = json.loads((out / "study.json").read_text())
    assert meta["task"] == task
    assert meta["direction"] == ("maximize" if task == "classification" else "minimize")
    assert json.loads((out / "best" / "lmtune_run.json").read_text())["task"] == task


@pytest.mark.parametrize("task, default_lr", [("classification", 5e-5), ("generation", 1e-4)])
def test_without_lr_the_task_default_is_trained_with_and_recorded(task, default_lr, tiny_llama, sentiment_files,
                                                                  generation_files, tmp_path):
    """Generation's default is twice classification's (docs/training.md: on E2E and Multi30k 5e-5 was among the
    worst rates searched); the record and the optimizer both hold the resolved value, an explicit --lr wins."""
    files = files_for(task, sentiment_files, generation_files)
    for lr, want in ((None, default_lr), (3e-4, 3e-4)):
        out = tmp_path / f"lr-{lr}"
        result = lmtune.train(run_config(task, tiny_llama, files, out, learning_rate=lr, epochs=1, max_steps=2,
                                         lr_schedule="constant", warmup_ratio=0.0))
        record = json.loads((out / "lmtune_run.json").read_text())
        assert record["config"]["train"]["learning_rate"] == pytest.approx(want)
        assert result.history[-1]["lr"] == pytest.approx(want)


@pytest.mark.parametrize("task", TASKS)
def test_bf16_master_learns_and_saves_fp32_weights(task, tiny_llama, sentiment_files, generation_files, tmp_path):
    """The CPU default (bf16 model, fp32 masters) on every task: it learns, and the saved weights are the fp32
    masters, not bf16 values widened."""
    import torch
    from safetensors.torch import load_file

    out = tmp_path / "run"
    result = lmtune.train(run_config(task, tiny_llama, files_for(task, sentiment_files, generation_files), out,
                                     precision="bf16-master", epochs=2, micro_batch_size=8))
    assert result.record["precision"] == "bf16-master"
    losses = [h["val_loss"] for h in result.history]
    assert losses[-1] < losses[0], losses
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in weights.values())
