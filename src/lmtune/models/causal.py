"""Load a causal LM for generation (prompt -> completion): the checkpoint's own language-model head."""

from __future__ import annotations

from typing import Any

from lmtune.config import ModelConfig
from lmtune.errors import ConfigError
from lmtune.models.classifier import (LoadedModel, apply_method, check_max_length, count_non_embedding, finish_attention,
                                      load_tokenizer, load_weights)
from lmtune.models.source import ResolvedModel, resolve


def load_causal_lm(cfg: ModelConfig, *, resolved: ResolvedModel | None = None, tokenizer: Any | None = None,
                   max_length: int | None = None) -> LoadedModel:
    """``AutoModelForCausalLM`` in fp32 with the training method applied (full, or LoRA on every linear layer
    but the output head). A pad token is set (EOS reused) without adding an embedding."""
    from transformers import AutoModelForCausalLM

    if cfg.method == "head":
        raise ConfigError("--method head trains a classification head only; a generation task trains full or lora")
    resolved = resolved or resolve(cfg.name, cfg.cache_dir)
    if max_length is not None:
        check_max_length(cfg, max_length, resolved)
    tokenizer = tokenizer or load_tokenizer(resolved.path, cfg.trust_remote_code, cfg.name)
    model = load_weights(AutoModelForCausalLM, cfg, resolved, "causal-LM head")
    finish_attention(model, cfg.attn_implementation)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    # Training never decodes step by step: a KV cache would only cost memory. Decoding turns it back on.
    model.config.use_cache = False
    non_embedding = count_non_embedding(model)
    model = apply_method(model, cfg, task_type="CAUSAL_LM")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoadedModel(model, tokenizer, resolved, total, trainable, non_embedding)
