"""Gemma 3's differences from Llama, on a tiny random Gemma-3-shaped model: tied embeddings that must stay tied
through training and saving, sliding-window attention under padding, no chat template, and a classification
head whose fresh start does not depend on the hidden states' scale."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lmtune
from lmtune.config import ModelConfig
from lmtune.models.classifier import load_classifier
from lmtune.records import RECORD_FILE

from tests.tasks.conftest import generation_files  # noqa: F401  (a fixture shared with the task suite)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (tests/conftest.py)."""


def _config(model: str, files: dict[str, str], out, method: str = "full", **train) -> lmtune.RunConfig:
    settings = dict(learning_rate=3e-3, global_batch_size=16, epochs=1, precision="fp32", progress=False,
                    max_length=48) | train
    return lmtune.RunConfig(data=lmtune.DataConfig(train_file=files["train"], val_file=files["val"]),
                            model=lmtune.ModelConfig(name=model, method=method), train=lmtune.TrainConfig(**settings),
                            output_dir=str(out), report=False)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_generation_keeps_the_output_layer_tied_to_the_embedding(method, tiny_gemma3, generation_files, tmp_path):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    lmtune.train(_config(tiny_gemma3, generation_files, out, method=method, epochs=2))
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.tie_word_embeddings is True
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    base = AutoModelForCausalLM.from_pretrained(tiny_gemma3)
    # Training moved the shared matrix (full) or at least the body (LoRA, merged): the folder is the trained model.
    changed = [n for n, p in loaded.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not any(k.startswith("lm_head") for k in f.keys())  # one copy of the 262k x d matrix, not two
    assert json.loads((out / RECORD_FILE).read_text())["generation"]["chat_template"] == "none"


def test_sliding_window_attention_gives_the_same_answer_padded_or_not(tiny_gemma3):
    """Rows longer than the 4-token window, batched with right padding: each row's logits are its unpadded ones."""
    lm = load_classifier(ModelConfig(name=tiny_gemma3, attn_implementation="auto"), ["neg", "pos"])
    model = lm.model.eval()
    with torch.no_grad():
        for p in model.score.parameters():
            p.normal_(0, 0.5)  # the fresh head is zero; a random one makes the comparison mean something
    texts = ["the film was really quite a good story and plot", "bad", "it is so very boring and the plot was dull"]
    batch = lm.tokenizer(texts, return_tensors="pt", padding=True)
    assert batch["input_ids"].shape[1] > 4 * 2
    with torch.no_grad():
        together = model(**batch).logits
        alone = torch.cat([model(**lm.tokenizer([t], return_tensors="pt")).logits for t in texts])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


def test_a_fresh_head_starts_at_chance_and_a_trained_head_is_kept(tiny_gemma3, sentiment_files, tmp_path):
    fresh = load_classifier(ModelConfig(name=tiny_gemma3), ["neg", "pos"])
    assert all(float(p.abs().sum()) == 0.0 for p in fresh.model.score.parameters())
    out = tmp_path / "run"
    result = lmtune.train(_config(tiny_gemma3, sentiment_files, out, epochs=2))
    assert result.history[-1]["val_loss"] < math.log(2)  # it learned from the zero start
    again = load_classifier(ModelConfig(name=str(out)), ["neg", "pos"])
    from transformers import AutoModelForSequenceClassification

    saved = AutoModelForSequenceClassification.from_pretrained(out)
    torch.testing.assert_close(again.model.score.weight, saved.score.weight)
    assert float(again.model.score.weight.abs().sum()) > 0
