"""Batched greedy decoding, for evaluating and running generation models.

:func:`generate` sorts the prompts by length (longest first, as :class:`~lmtune.data.LengthGroupedSampler`
does for evaluation), left-pads each batch (:func:`~lmtune.data.collate`), decodes greedily with a KV
cache through transformers' ``model.generate`` and puts the completions back in the caller's order.
The output of a prompt does not depend on its batch: batched decoding equals one prompt at a time.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from lmtune.data.batching import LengthGroupedSampler, collate, restore_order

__all__ = ["generate", "decode", "default_max_new_tokens", "plan_batches", "padding_tokens"]


def plan_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The batches :func:`generate` uses: original indices, sorted by length (longest first), ``batch_size`` each."""
    return LengthGroupedSampler(lengths, batch_size, shuffle=False).batches()


def padding_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """How many pad tokens left-padding ``batches`` to their longest prompt adds."""
    total = 0
    for b in batches:
        ls = [int(lengths[i]) for i in b]
        total += max(ls) * len(ls) - sum(ls)
    return total


@contextlib.contextmanager
def _plain_generation_config(model: torch.nn.Module) -> Iterator[None]:
    """Hide the checkpoint's generation defaults (sampling, temperature, repetition penalty, forced or
    suppressed tokens, static caches, ...) for the duration of a call: ``generate`` fills every setting
    it is not given from ``model.generation_config``. A PEFT wrapper copies its own ``generation_config``
    onto the base model in ``generate``, so every module that carries one gets a clean config.
    """
    from transformers import GenerationConfig

    saved: list[tuple[torch.nn.Module, Any]] = []
    for m in model.modules():
        if "generation_config" in vars(m):
            saved.append((m, vars(m)["generation_config"]))
    for m, _ in saved:
        m.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for m, old in saved:
            m.generation_config = old


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _cut(row: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[:i]
    return row


def generate(
    model: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    pad_id: int,
    stop_ids: Sequence[int],
    max_new_tokens: int,
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """Greedy completions of ``prompt_ids``: the new tokens of each prompt, in the order given.

    Each completion ends before the first token in ``stop_ids`` (the stop token is not returned) or after
    ``max_new_tokens`` tokens; padding is never returned. Prompts are batched by length, left-padded with
    ``pad_id`` (masked out, so its value does not matter), and decoded with a KV cache even when the model's
    config says ``use_cache=False`` (training sets that). The checkpoint's own generation defaults
    (sampling, penalties, ...) are ignored: this is plain greedy decoding.

    The caller keeps ``len(prompt) + max_new_tokens`` within the model's positions (cut prompts from the
    left before calling): nothing is truncated here. ``device`` defaults to the model's (its first
    parameter's); the model is put in eval mode and its train/eval mode restored afterwards.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = [[int(t) for t in p] for p in prompt_ids]
    if not prompts:
        return []
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"{len(empty)} empty prompts (first: row {empty[0]}): decoding needs at least one token")
    stops = sorted({int(t) for t in stop_ids})
    device = torch.device(device) if device is not None else _model_device(model)

    batches = plan_batches([len(p) for p in prompts], batch_size)
    outputs: list[list[int]] = []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), _plain_generation_config(model):
            for b in batches:
                items = [(prompts[i], None) for i in b]
                enc = collate(items, pad_token_id=pad_id, padding_side="left", pad_to_multiple_of=None)
                input_ids = enc["input_ids"].to(device)
                mask = enc["attention_mask"].to(device)
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,  # transformers derives the position ids from it: left padding is exact
                    do_sample=False,
                    num_beams=1,
                    use_cache=True,  # overrides config.use_cache=False
                    max_new_tokens=int(max_new_tokens),
                    eos_token_id=stops or None,
                    pad_token_id=int(pad_id),
                    return_dict_in_generate=False,
                )
                new = out[:, input_ids.shape[1] :].tolist()
                # a finished row is filled with pad_id to the batch's end: cutting at the first stop drops it
                outputs.extend(_cut(row, set(stops)) for row in new)
    finally:
        model.train(was_training)
    return restore_order(outputs, batches)


def decode(tokenizer: Any, token_ids: Sequence[Sequence[int]]) -> list[str]:
    """Token ids -> text, special tokens dropped and whitespace stripped.

    No ``clean_up_tokenization_spaces``: GPT-style (byte-level / SentencePiece) tokenizers decode exactly
    what the model wrote, and the metrics should see that.
    """
    if not token_ids:
        return []
    texts = tokenizer.batch_decode([list(map(int, t)) for t in token_ids], skip_special_tokens=True,
                                   clean_up_tokenization_spaces=False)  # fmt: skip
    return [t.strip() for t in texts]


def default_max_new_tokens(completion_lengths: Sequence[int], *, cap: int = 1024) -> int:
    """A decoding budget from the lengths (in tokens) of the training completions.

    Rule: ``ceil(1.5 * p99) + 1``, where ``p99`` is the 99th percentile of the lengths (an observed length,
    numpy's ``method="higher"``); the 1.5 leaves room for completions a little longer than the training ones
    while a rare outlier does not set the budget, the +1 for a stop token whether or not the lengths count
    it. Clamped to ``[1, cap]``: a model that never emits its stop token costs at most ``cap`` steps per batch.
    """
    if len(completion_lengths) == 0:
        raise ValueError("no completion lengths")
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    lengths = np.asarray(completion_lengths, dtype=np.int64)
    if (lengths < 0).any():
        raise ValueError("negative completion length")
    p99 = int(np.percentile(lengths, 99, method="higher"))
    return max(1, min(cap, math.ceil(1.5 * p99) + 1))
