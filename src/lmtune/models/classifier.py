"""Build a sequence classifier from a causal-LM checkpoint: pad token, head, and training method."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from lmtune.config import ModelConfig
from lmtune.errors import ModelError
from lmtune.models.source import ResolvedModel, resolve


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: Any
    resolved: ResolvedModel
    total_params: int
    trainable_params: int
    non_embedding_params: int
    """Parameters outside the token/position embeddings: the N in the ~6*N*tokens FLOPs estimate."""


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def load_tokenizer(path: str, trust_remote_code: bool = False, requested: str | None = None) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise ModelError(f"--model {requested or path}: cannot load tokenizer ({_one_line(e)})") from e
    set_pad_token(tok)
    return tok


def set_pad_token(tokenizer: Any) -> None:
    """GPT-style tokenizers often lack a pad token; reuse EOS (or UNK) so no embedding must be added.

    Padding goes on the right: the classifier pools the last non-pad token, and right padding keeps
    position ids of real tokens identical to an unpadded forward pass.
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    tokenizer.padding_side = "right"


# Architectures whose eager attention is exactly Llama's (grouped-query, additive mask, softmax in fp32), so
# that lmtune_eager computes the same thing. Others (GPT-2's layer-scaled attention, Gemma's soft-capping, ...)
# train with their own eager attention.
LMTUNE_EAGER_TYPES = frozenset({"llama", "mistral", "qwen2"})


def attention_for(requested: str) -> str | None:
    """The attention kernel to load with (None: the model's default); see :func:`finish_attention`.

    ``auto`` takes eager attention on CPUs: PyTorch's fused CPU SDPA kernel is fine forward but slow
    backward; on SmolLM2-135M, batch 16, its backward took 0.48 s at 12 tokens (eager 0.31 s) and 2.35 s
    at 128 tokens (eager 1.65 s), with the same forward time (measured here, torch 2.13, 2 cores).
    """
    if requested == "auto":
        return None if torch.cuda.is_available() else "eager"
    return "eager" if requested == "lmtune_eager" else requested


def finish_attention(model: torch.nn.Module, requested: str) -> None:
    """Switch a Llama-style model loaded with eager attention to ``lmtune_eager`` (same forward, a backward that
    keeps less: :mod:`lmtune.models.attention`) where ``requested`` is ``lmtune_eager``, or ``auto`` on a CPU."""
    wants = requested == "lmtune_eager" or (requested == "auto" and not torch.cuda.is_available())
    if not wants:
        return
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LMTUNE_EAGER_TYPES:
        if requested == "lmtune_eager":
            raise ModelError(f"--attn-implementation lmtune_eager: supports {', '.join(sorted(LMTUNE_EAGER_TYPES))} "
                             f"models, not {model_type}; use eager or sdpa")
        return
    from lmtune.models.attention import register
    model.set_attn_implementation(register())


def max_positions(config: Any) -> int | None:
    """The longest sequence a checkpoint's position embeddings cover (None where it does not say)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_max_length(cfg: ModelConfig, max_length: int, resolved: ResolvedModel | None = None) -> None:
    """Refuse a --max-length beyond the model's positions before any weight is loaded (it used to train until
    an IndexError in the position embedding)."""
    from transformers import AutoConfig

    resolved = resolved or resolve(cfg.name, cfg.cache_dir)
    try:
        config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:
        raise ModelError(f"--model {cfg.name}: cannot read its config ({_one_line(e)})") from e
    limit = max_positions(config)
    if limit is not None and max_length > limit:
        raise ModelError(f"--max-length {max_length} exceeds the {limit} positions of --model {cfg.name}; "
                         f"use --max-length {limit} or less")


def load_weights(auto_class: Any, cfg: ModelConfig, resolved: ResolvedModel, head: str, **kwargs: Any) -> torch.nn.Module:
    """``auto_class.from_pretrained`` in fp32 from safetensors only, with lmtune's attention choice; every failure is a
    one-line ModelError naming the flag. ``head`` names what the task needs, for the error of an architecture without it."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "score.weight MISSING, newly initialized" report is expected here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = auto_class.from_pretrained(
                resolved.path,
                dtype=torch.float32,
                trust_remote_code=cfg.trust_remote_code,
                use_safetensors=True,  # never unpickle weights (a .bin can run code when loaded)
                **({"attn_implementation": attn} if (attn := attention_for(cfg.attn_implementation)) else {}),
                **kwargs,
            )
    except ValueError as e:
        if "Unrecognized configuration class" in str(e) or "does not support" in str(e):
            raise ModelError(f"--model {cfg.name}: this architecture has no {head} in transformers ({_one_line(e)})") from e
        if "attn_implementation" in str(e):
            raise ModelError(f"--attn-implementation {cfg.attn_implementation}: not available for --model {cfg.name} "
                             f"({_one_line(e)})") from e
        raise ModelError(f"--model {cfg.name}: cannot load ({_one_line(e)})") from e
    except OSError as e:
        raise ModelError(
            f"--model {cfg.name}: not found locally and the hub could not provide it ({_one_line(e)}); "
            "see `lmtune models` for what works offline"
        ) from e
    except Exception as e:  # a truncated safetensors file, a config that does not match its weights, ...
        raise ModelError(f"--model {cfg.name}: cannot load its weights ({_one_line(e)})") from e
    finally:
        hf_logging.set_verbosity(verbosity)
    return model


def load_classifier(
    cfg: ModelConfig,
    labels: list[str],
    *,
    resolved: ResolvedModel | None = None,
    tokenizer: Any | None = None,
    max_length: int | None = None,
) -> LoadedModel:
    """Load ``cfg.name`` as ``AutoModelForSequenceClassification`` with ``len(labels)`` outputs.

    Weights load in fp32; the loop applies the precision (autocast, or a bf16 copy with fp32 masters).
    With ``max_length``, a length beyond the model's positions is refused before the weights load.
    """
    from transformers import AutoModelForSequenceClassification

    resolved = resolved or resolve(cfg.name, cfg.cache_dir)
    if max_length is not None:
        check_max_length(cfg, max_length, resolved)
    tokenizer = tokenizer or load_tokenizer(resolved.path, cfg.trust_remote_code, cfg.name)
    model, info = load_weights(AutoModelForSequenceClassification, cfg, resolved, "sequence-classification head",
                               num_labels=len(labels), id2label=dict(enumerate(labels)),
                               label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True,
                               output_loading_info=True)
    zero_new_head(model, info)
    finish_attention(model, cfg.attn_implementation)
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    # The classifier never generates; a KV cache only costs memory during training.
    model.config.use_cache = False

    non_embedding = count_non_embedding(model)
    model = apply_method(model, cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return LoadedModel(model, tokenizer, resolved, total, trainable, non_embedding)


def zero_new_head(model: torch.nn.Module, loading_info: dict[str, Any]) -> None:
    """Start a newly created classification head at zero, so every class starts at probability 1/K.

    transformers draws a new head from N(0, initializer_range); its logits are that times the last hidden state,
    whose scale differs by architecture: Gemma 3 270M's final hidden states have norms ~90 with a large shared
    direction, so the fresh head starts at logits of -4.6 vs -1.2 on every SST-2 sentence (a first loss up to ~3.5
    for the wrong class; SmolLM2-135M: ~1.5 vs 0.4). At zero the first loss is ln K on every model, and the head's
    first gradient (hidden state x (p - y)) is non-zero, so nothing is lost. A head that came with the checkpoint
    (an lmtune or transformers classifier trained before) is kept as it is.
    """
    fresh = {str(k) for k in loading_info.get("missing_keys", ())}
    fresh |= {str(k[0] if isinstance(k, (tuple, list)) else k) for k in loading_info.get("mismatched_keys", ())}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in head_parameter_names(model):
            if name in fresh:
                params[name].zero_()


def count_non_embedding(model: torch.nn.Module) -> int:
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in emb_ids)


def head_parameter_names(model: torch.nn.Module) -> set[str]:
    """Parameters outside the pretrained body, i.e. the freshly initialised classification head."""
    prefix = getattr(model, "base_model_prefix", "") + "."
    return {n for n, _ in model.named_parameters() if not n.startswith(prefix)}


def apply_method(model: torch.nn.Module, cfg: ModelConfig, task_type: str = "SEQ_CLS") -> torch.nn.Module:
    """Freeze what the method does not train; LoRA wraps the model in peft (``task_type``: SEQ_CLS or CAUSAL_LM)."""
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if cfg.method == "head":
        head = head_parameter_names(model)
        if not head:
            raise ModelError(f"--method head: cannot find the classification head of {type(model).__name__}")
        for n, p in model.named_parameters():
            p.requires_grad_(n in head)
        return model
    from peft import LoraConfig, TaskType, get_peft_model

    lora = LoraConfig(
        task_type=getattr(TaskType, task_type),
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
    )
    logging.getLogger("peft").setLevel(logging.ERROR)
    return get_peft_model(model, lora)


def to_plain_transformers(model: torch.nn.Module) -> torch.nn.Module:
    """Merge LoRA adapters so the saved folder loads with plain transformers (no peft needed)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
