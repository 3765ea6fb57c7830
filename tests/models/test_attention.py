"""lmtune_eager attention: the same forward and gradients as transformers' eager attention, less kept for backward."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from lmtune.models.attention import NAME, register
from lmtune.models.classifier import attention_for


def _pair(dtype):
    register()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, num_labels=3)  # grouped-query attention: 2 heads per kv head
    cfg._attn_implementation = "eager"
    eager = LlamaForSequenceClassification(cfg).to(dtype)
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation(NAME)
    return eager, ours


@pytest.mark.parametrize("dtype,grad_tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_same_outputs_and_gradients_as_eager(dtype, grad_tol):
    eager, ours = _pair(dtype)
    assert ours.config._attn_implementation == NAME
    ids = torch.randint(1, 300, (3, 10))
    mask = torch.ones_like(ids)
    ids[0, 6:], mask[0, 6:] = 0, 0  # right padding, as lmtune batches are
    labels = torch.tensor([0, 1, 2])
    results = []
    for model in (eager, ours):
        logits = model(input_ids=ids, attention_mask=mask).logits
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (la, ga), (lb, gb) = results
    assert torch.equal(la, lb)  # the forward pass is the same computation
    for n in ga:
        scale = ga[n].abs().max().item() or 1.0
        assert (ga[n] - gb[n]).abs().max().item() <= grad_tol * scale, n  # bf16: recomputed from bf16 probabilities


def test_auto_picks_it_on_cpu_for_llama_style_models_only(monkeypatch, tiny_llama, tiny_gpt2):
    from lmtune.config import ModelConfig
    from lmtune.errors import ModelError
    from lmtune.models import load_classifier

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention_for("auto") == "eager"
    llama = load_classifier(ModelConfig(name=tiny_llama), ["neg", "pos"]).model
    assert llama.config._attn_implementation == NAME
    gpt2 = load_classifier(ModelConfig(name=tiny_gpt2), ["neg", "pos"]).model  # GPT-2 scales attention its own way
    assert gpt2.config._attn_implementation == "eager"
    with pytest.raises(ModelError, match="--attn-implementation lmtune_eager"):
        load_classifier(ModelConfig(name=tiny_gpt2, attn_implementation="lmtune_eager"), ["neg", "pos"])
    with pytest.raises(ModelError, match="^--attn-implementation bogus: not available"):
        load_classifier(ModelConfig(name=tiny_llama, attn_implementation="bogus"), ["neg", "pos"])
    sdpa = load_classifier(ModelConfig(name=tiny_llama, attn_implementation="sdpa"), ["neg", "pos"]).model
    assert sdpa.config._attn_implementation == "sdpa"


def test_saved_models_do_not_need_it(tmp_path):
    from transformers import AutoModelForSequenceClassification

    _, ours = _pair(torch.float32)
    ours.save_pretrained(tmp_path)
    assert NAME not in (tmp_path / "config.json").read_text()
    AutoModelForSequenceClassification.from_pretrained(tmp_path)  # plain transformers, default attention
