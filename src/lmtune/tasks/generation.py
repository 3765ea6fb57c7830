"""Generation: prompt -> completion with the checkpoint's own language-model head.

The loss is on completion (assistant) tokens and the end-of-sequence / end-of-turn token only (unless
--train-on-prompt), summed per micro-batch and divided by the target tokens of the whole global batch, as TRL's
completion-only loss and torchtune do. Evaluation: validation loss and perplexity over the target tokens, and,
on the validation prompts (or a seeded --eval-generate-rows sample of them), greedy batched decoding scored
against every reference of a prompt with exact match, token F1, ROUGE-L, BLEU and chrF (0-100).
"""

from __future__ import annotations

import inspect
import json
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune._io import atomic_write_text
from lmtune.generation_metrics import METRICS
from lmtune.tasks.classification import pad_multiple, save_model_folder

IGNORE = -100
TEXT_METRICS = ("exact_match", "token_f1", "rougeL", "bleu", "chrf")


class GenerationTask:
    name = "generation"
    metrics = METRICS
    # Validation loss needs no decoding, which costs far more than a loss pass on a CPU; see docs/generation.md.
    default_metric = "val_loss"
    # Twice classification's: on E2E and Multi30k (SmolLM2-135M, 400 pairs) a rate of 1e-4..2.5e-4 beat 5e-5 at the
    # same batch size and epochs in every search (docs/training.md). The loss is on the completion tokens only, a small signal to move a
    # model that already writes fluent text.
    default_learning_rate = 1e-4

    def __init__(self) -> None:
        self.cfg: Any = None
        self.tokenizer: Any = None
        self.stop_ids: list[int] = []
        self.max_new_tokens: int | None = None
        self.template: str | None = None

    # ---- data and model ------------------------------------------------------------------------------

    def load_data(self, cfg: Any) -> Any:
        from lmtune.data.generation import load_generation_data

        self.cfg = cfg
        return load_generation_data(cfg.data)

    def describe_data(self, bundle: Any) -> str:
        s = bundle.summary
        return (f"data: {s['rows']['train']} training pairs ({s['groups']['train']} prompts), {s['rows']['val']} "
                f"validation pairs ({s['groups']['val']} prompts, {s['val_source']}); format {s['format']}")

    def load_model(self, cfg: Any, bundle: Any, resolved: Any) -> Any:
        from lmtune.models.causal import load_causal_lm

        self.cfg = cfg
        loaded = load_causal_lm(cfg.model, resolved=resolved, max_length=cfg.train.max_length)
        self.tokenizer = loaded.tokenizer
        return loaded

    def encode(self, tokenizer: Any, bundle: Any, cfg: Any, cache_dir: str | None) -> tuple[Any, Any]:
        from lmtune.data.generation import _resolve_template, encode_generation, stop_token_ids
        from lmtune.decoding import default_max_new_tokens

        self.cfg, self.tokenizer = cfg, tokenizer
        opts = dict(chat_template=cfg.data.chat_template, train_on_prompt=cfg.train.train_on_prompt, cache_dir=cache_dir)
        train = encode_generation(tokenizer, bundle.train, cfg.train.max_length, **opts)
        val = encode_generation(tokenizer, bundle.val, cfg.train.max_length, **opts)
        self.template = _resolve_template(tokenizer, cfg.data.chat_template)
        self.stop_ids = stop_token_ids(tokenizer, cfg.data.chat_template)
        self.max_new_tokens = cfg.train.max_new_tokens or default_max_new_tokens(completion_lengths(train))
        return train, val

    # ---- loss ----------------------------------------------------------------------------------------

    def loss_units(self, enc: Any, rows: list[int]) -> int:
        return int(sum(enc.target_tokens[i] for i in rows))

    def loss_sum(self, model: Any, enc: Any, rows: list[int], pad_id: int, device: Any) -> tuple[torch.Tensor, int]:
        batch = _pad(enc, rows, pad_id, device)
        return batch_loss(model, batch), batch.tokens

    def chance_loss(self, bundle: Any) -> float:
        return 0.0  # a pretrained LM's first loss is already meaningful

    # ---- evaluation ----------------------------------------------------------------------------------

    def evaluate(self, model: Any, enc: Any, bundle: Any, batch_size: int, accelerator: Any, pad_id: int,
                 step: int, final: bool = True) -> tuple[dict[str, Any], Any]:
        loss_sum, tokens = _loss_over(model, enc, batch_size, pad_id, accelerator.device)
        val_loss = loss_sum / max(1, tokens)
        metrics: dict[str, Any] = {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}
        rows = self.cfg.train.eval_generate_rows
        if rows == 0 or (self.cfg.train.eval_generate == "final" and not final):
            return metrics, None
        t0 = time.perf_counter()
        scored = generate_and_score(accelerator.unwrap_model(model), self.tokenizer, bundle.val, enc, stop_ids=self.stop_ids,
                                    max_new_tokens=self.max_new_tokens, batch_size=batch_size, pad_id=pad_id,
                                    sample=rows, seed=self.cfg.data.split_seed)
        # What decoding cost, next to the whole evaluation's eval_s: the price of a text metric at every evaluation.
        metrics |= scored["metrics"] | {"generated_prompts": len(scored["examples"]),
                                        "generate_s": round(time.perf_counter() - t0, 3)}
        return metrics, scored["examples"]

    def write_predictions(self, path: Path, bundle: Any, enc: Any, payload: Any) -> None:
        if payload is None:
            return
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in payload))

    # ---- output --------------------------------------------------------------------------------------

    def save(self, model: Any, tokenizer: Any, out: Path, cfg: Any, train_enc: Any) -> None:
        from transformers import GenerationConfig

        from lmtune.models import to_plain_transformers

        if self.template is not None:
            tokenizer.chat_template = self.template  # pipeline() and apply_chat_template format prompts as lmtune did
        keep_adapter = cfg.model.method == "lora" and cfg.model.save_adapter
        final = model if keep_adapter else to_plain_transformers(model)
        base = final.get_base_model() if keep_adapter else final
        base.config.use_cache = True
        stops = list(dict.fromkeys(self.stop_ids))
        # What transformers' generate() and pipeline() read: stop where lmtune stops, greedy, as long as lmtune decodes.
        base.generation_config = GenerationConfig(
            eos_token_id=stops if len(stops) > 1 else stops[0], pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, max_new_tokens=self.max_new_tokens, do_sample=False)
        save_model_folder(final, tokenizer, out)
        if keep_adapter:
            base.generation_config.save_pretrained(out)

    def record(self, cfg: Any, bundle: Any, train_enc: Any, val_enc: Any) -> dict[str, Any]:
        def named(train_lines: list[int], val_lines: list[int]) -> dict[str, Any]:
            """How many rows, and the first 50 of their lines, per split."""
            return {split: {"count": len(lines), "lines": lines[:50]}
                    for split, lines in (("train", train_lines), ("val", val_lines))}

        return {
            "data": bundle.summary | {
                "max_length": cfg.train.max_length,
                "cut": named(train_enc.cut, val_enc.cut),
                "completion_too_long": named(train_enc.completion_too_long, val_enc.completion_too_long),
                "truncated": {"train": len(train_enc.cut), "val": len(val_enc.cut)},
                "token_lengths": {"train_prompt": [len(p) for p in train_enc.prompt_ids],
                                  "train_completion": completion_lengths(train_enc),
                                  "train": list(map(int, train_enc.lengths)), "val": list(map(int, val_enc.lengths))},
            },
            "generation": {"chat_template": "model" if self.template is not None and cfg.data.chat_template == "auto"
                           else cfg.data.chat_template if self.template is not None else "none",
                           "stop_token_ids": self.stop_ids, "max_new_tokens": self.max_new_tokens,
                           "train_on_prompt": cfg.train.train_on_prompt},
        }


def completion_lengths(enc: Any) -> list[int]:
    """Per row, the target tokens of its completion, the part after the prompt, and its end token: what decoding
    writes and --max-new-tokens must cover. Not ``target_tokens``: with --train-on-prompt those count the prompt
    too, and in a multi-turn chat the earlier assistant turns, which are part of the prompt at decoding."""
    return [int(np.count_nonzero(np.asarray(labels[len(prompt):], dtype=np.int64) != IGNORE))
            for labels, prompt in zip(enc.labels, enc.prompt_ids)]


@dataclass(frozen=True)
class TargetBatch:
    """Right-padded rows on the device, with where their targets are, worked out on the host.

    Finding the first target position or gathering the target logits with a boolean mask on the device needs a
    read back to the host (a GPU sync each); here the host already knows them from the encoded rows, and the
    whole batch travels in one (pinned, on a GPU) copy."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_rows: torch.Tensor
    """[targets]: the row of each target token, row-major order."""
    predictor_positions: torch.Tensor
    """[targets]: the position whose logits predict it (the target's position minus one)."""
    target_ids: torch.Tensor
    """[targets]: the target token ids."""
    first_predictor: int
    """``predictor_start`` of the rows: logits are needed from this position on."""
    tokens: int
    """Real (unpadded) tokens."""


def _pad(enc: Any, rows: list[int], pad_id: int, device: Any) -> TargetBatch:
    """``rows`` right-padded (to the device's multiple), with their target positions, in one host-to-device copy."""
    width = max(len(enc.input_ids[i]) for i in rows)
    multiple = pad_multiple(device)
    if multiple:
        width = -(-width // multiple) * multiple
    ids = torch.full((len(rows), width), int(pad_id), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    where, targets, firsts = [], [], []
    for r, i in enumerate(rows):
        k = len(enc.input_ids[i])
        ids[r, :k] = torch.as_tensor(enc.input_ids[i])
        mask[r, :k] = 1
        labels = np.asarray(enc.labels[i], dtype=np.int64)
        labelled = np.flatnonzero(labels != IGNORE)
        firsts.append(int(labelled[0]) if labelled.size else len(labels))  # first_target, from the same scan
        positions = labelled[labelled > 0]  # position 0 has no predictor
        where.append(positions)
        targets.append(labels[positions])
    target_rows = np.repeat(np.arange(len(rows), dtype=np.int64), [len(t) for t in where])
    target_pos = np.concatenate(where).astype(np.int64)
    host = torch.cat([ids.flatten(), mask.flatten(), torch.from_numpy(target_rows), torch.from_numpy(target_pos - 1),
                      torch.from_numpy(np.concatenate(targets))])
    dev = torch.device(device)
    on_device = (host.pin_memory().to(dev, non_blocking=True) if dev.type == "cuda" else host.to(dev))
    n, t = ids.numel(), len(target_pos)
    ids_d, mask_d, rows_d, predictors_d, targets_d = on_device.split([n, n, t, t, t])
    return TargetBatch(input_ids=ids_d.view(ids.shape), attention_mask=mask_d.view(ids.shape), target_rows=rows_d,
                       predictor_positions=predictors_d, target_ids=targets_d,
                       first_predictor=predictor_start(firsts), tokens=int(mask.sum()))


def batch_loss(model: Any, batch: TargetBatch) -> torch.Tensor:
    """Summed cross-entropy of the batch's target tokens.

    The LM head runs only from the earliest position that predicts a target (transformers' ``logits_to_keep``
    keeps the last k positions; with right padding they hold the completions): the positions before it only read
    the prompt, and their logits, [rows, positions, vocabulary], would be computed (the head is a fifth of a small
    model's forward FLOPs at a 50k vocabulary) and thrown away. Only the target positions then go through the fp32
    softmax: a full [rows, positions, vocabulary] fp32 copy would be the largest tensor of a step."""
    first = batch.first_predictor if batch.first_predictor > 0 and _keeps_logits(model) else 0
    kwargs = {"logits_to_keep": batch.input_ids.shape[1] - first} if first else {}
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs).logits
    picked = logits[batch.target_rows, batch.predictor_positions - first]
    return torch.nn.functional.cross_entropy(picked.float(), batch.target_ids, reduction="sum")


def first_target(labels: Any) -> int:
    """Index of a row's first target token (its length when it has none): ``batch_loss`` computes logits from
    the position before the earliest one of a batch."""
    return next((i for i, y in enumerate(labels) if int(y) != IGNORE), len(labels))


def predictor_start(first_targets: Iterable[int]) -> int:
    """The earliest position whose logits a batch needs, given its rows' ``first_target`` indices: the one
    before the earliest target (0 when a target starts a row). The one statement of the rule, for the batches
    ``batch_loss`` runs and for the plan's memory estimate of them."""
    return max(0, min(first_targets, default=1) - 1)


def logit_positions(first_targets: Iterable[int], width: int) -> int:
    """How many positions ``batch_loss`` computes logits for, in a batch of rows padded to ``width``."""
    return width - predictor_start(first_targets)


def _keeps_logits(model: Any) -> bool:
    """Whether the causal LM under any wrappers (DDP's ``module``, peft's base model) takes ``logits_to_keep``."""
    inner = model
    while hasattr(inner, "module") and isinstance(inner.module, torch.nn.Module):
        inner = inner.module
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    try:
        return "logits_to_keep" in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def _loss_over(model: Any, enc: Any, batch_size: int, pad_id: int, device: Any) -> tuple[float, int]:
    """Summed target-token loss and target tokens over every row of ``enc`` (longest batches first)."""
    from lmtune.data.batching import LengthGroupedSampler

    total, tokens = 0.0, 0
    for idx in LengthGroupedSampler(enc.lengths, batch_size, shuffle=False, group_by_length=True).batches(0):
        rows = [int(i) for i in idx]
        n = sum(enc.target_tokens[i] for i in rows)
        if not n:
            continue
        total += float(batch_loss(model, _pad(enc, rows, pad_id, device)))
        tokens += n
    return total, tokens


def generate_and_score(model: Any, tokenizer: Any, table: Any, enc: Any, *, stop_ids: list[int], max_new_tokens: int,
                       batch_size: int, pad_id: int, sample: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Decode one completion per prompt group of ``table`` (or a seeded sample of ``sample`` groups) and score it
    against all the group's references. Returns the corpus metrics and one row per prompt, best first."""
    from lmtune.decoding import decode, generate
    from lmtune.generation_metrics import example_scores, generation_metrics

    groups = list(table.groups().values())
    if sample is not None and sample < len(groups):
        pick = np.random.default_rng(seed).permutation(len(groups))[:sample]
        groups = [groups[int(g)] for g in sorted(pick)]
    prompts = [enc.prompt_ids[g[0]] for g in groups]
    out_ids = generate(model, prompts, pad_id=pad_id, stop_ids=stop_ids, max_new_tokens=max_new_tokens,
                       batch_size=batch_size)
    predictions = decode(tokenizer, out_ids)
    references = [[table.examples[i].completion for i in g] for g in groups]
    metrics = generation_metrics(predictions, references)
    per = example_scores(predictions, references)
    examples = [{"line": table.examples[g[0]].line, "prompt": table.examples[g[0]].prompt, "references": refs,
                 "prediction": pred, **{k: round(v, 4) for k, v in score.items()}}
                for g, refs, pred, score in zip(groups, references, predictions, per)]
    examples.sort(key=lambda r: -r.get("rougeL", 0.0))
    return {"metrics": metrics, "examples": examples}


# ---- a saved folder: evaluate and predict --------------------------------------------------------------------


class Generator:
    """A saved causal LM ready for evaluate/predict, with the settings it was trained with."""

    def __init__(self, model_dir: str, *, max_new_tokens: int | None = None):
        from transformers import AutoModelForCausalLM

        from lmtune.errors import ModelError
        from lmtune.models import load_tokenizer
        from lmtune.records import RECORD_FILE

        from lmtune._console import quiet_libraries

        quiet_libraries()
        path = Path(model_dir)
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ModelError(f"{model_dir}: not a model folder (no config.json); pass the --out folder of `lmtune train`")
        record_file = path / RECORD_FILE
        self.record = json.loads(record_file.read_text()) if record_file.is_file() else {}
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
        except Exception as e:
            raise ModelError(f"{model_dir}: cannot load model ({type(e).__name__}: {str(e).splitlines()[0]})") from e
        self.model.eval()
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.tokenizer = load_tokenizer(str(path))
        gen = self.record.get("generation") or {}
        cfg = self.record.get("config") or {}
        # "none" when training used no template: the saved tokenizer may still carry the base model's.
        self.chat_template = "none" if gen.get("chat_template") == "none" else "auto"
        self.data_cfg = cfg.get("data") or {}
        # Trained on chat rows (roles) without a template: a bare prompt is the user's turn, rendered as in training.
        self.chat_rows = (self.record.get("data") or {}).get("format") in ("openai-chat", "hf-conversational",
                                                                           "hf-prompt-completion")
        from lmtune.data.generation import stop_token_ids
        from lmtune.models.classifier import max_positions

        self.stop_ids = gen.get("stop_token_ids") or stop_token_ids(self.tokenizer, self.chat_template)
        saved_max = getattr(self.model.generation_config, "max_new_tokens", None)
        self.max_new_tokens = int(max_new_tokens or gen.get("max_new_tokens") or saved_max or 128)
        limit = max_positions(self.model.config) or 2048
        self.max_length = min(int((cfg.get("train") or {}).get("max_length") or limit), limit)

    def read(self, path: str, *, require_completion: bool, prompt_column: str | None = None,
             completion_column: str | None = None, prompt_template: str | None = None, empty_text: str = "error"):
        """Read a file with the training run's column settings unless given."""
        from lmtune.data.generation import read_generation_table

        d = self.data_cfg
        return read_generation_table(path, prompt_column=prompt_column or d.get("prompt_column"),
                                     completion_column=completion_column or d.get("completion_column"),
                                     prompt_template=prompt_template or d.get("prompt_template"),
                                     require_completion=require_completion, empty_text=empty_text)

    def encode(self, table: Any) -> Any:
        from dataclasses import replace

        from lmtune.data.generation import encode_generation

        if self.chat_rows:
            table = replace(table, examples=[replace(e, plain=False) for e in table.examples])

        # A prompt must leave room for the completion within the model's positions.
        return encode_generation(self.tokenizer, table, max(4, self.max_length), chat_template=self.chat_template)


def evaluate_generation(model_dir: str, data_file: str, *, batch_size: int = 16, output: str | None = None,
                        max_new_tokens: int | None = None, empty_text: str = "error", **columns: str | None) -> dict[str, Any]:
    """Loss, perplexity and the text metrics of a saved generation model on a file with references; every
    prediction is written beside its references (``<output stem>.predictions.jsonl``)."""
    from lmtune._io import atomic_write_json

    g = Generator(model_dir, max_new_tokens=max_new_tokens)
    table = g.read(data_file, require_completion=True, empty_text=empty_text, **columns)
    enc = g.encode(table)
    device = next(g.model.parameters()).device
    loss_sum, tokens = _loss_over(g.model, enc, batch_size, g.tokenizer.pad_token_id, device)
    scored = generate_and_score(g.model, g.tokenizer, table, enc, stop_ids=g.stop_ids, max_new_tokens=g.max_new_tokens,
                                batch_size=batch_size, pad_id=g.tokenizer.pad_token_id)
    val_loss = loss_sum / max(1, tokens)
    out = Path(output) if output else Path(model_dir) / "eval" / f"{Path(data_file).stem}.json"
    predictions = out.with_suffix(".predictions.jsonl")
    atomic_write_text(predictions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in scored["examples"]))
    result = {"task": "generation", "model_dir": str(model_dir), "data_file": str(data_file), "n": len(table),
              "prompts": len(scored["examples"]), "loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0)),
              **scored["metrics"], "max_new_tokens": g.max_new_tokens, "skipped": table.skipped,
              "cut": len(enc.cut), "predictions_file": str(predictions)}
    atomic_write_json(out, result)
    result["output"] = str(out)
    return result


def predict_generation(model_dir: str, data: Any, *, batch_size: int = 16, max_new_tokens: int | None = None,
                       empty_text: str = "error", **columns: str | None) -> list[dict[str, Any]]:
    """Completions for a file (any layout training reads; a completion, if present, is ignored), bare prompts (a
    list of strings, or a ``lmtune.data.Table`` of stdin lines, put through the training --prompt-template), or a
    GenTable (whose line numbers the rows keep)."""
    from lmtune.data import Table
    from lmtune.data.generation import GenExample, GenTable, Message
    from lmtune.decoding import decode, generate

    g = Generator(model_dir, max_new_tokens=max_new_tokens)
    if isinstance(data, GenTable):
        table = data
    elif isinstance(data, (list, Table)):  # bare prompts: a list, or stdin's lines (a Table keeps their numbers)
        where, texts, lines = ((data.path, data.texts, data.line_numbers) if isinstance(data, Table)
                               else ("<input>", data, range(1, len(data) + 1)))
        texts = fill_prompt_template(texts, columns.get("prompt_template") or g.data_cfg.get("prompt_template"), where)
        table = GenTable(where, [GenExample([Message("user", t)], line, True) for t, line in zip(texts, lines)],
                         "columns", None, None)
    else:
        table = g.read(data, require_completion=False, empty_text=empty_text, **columns)
    enc = g.encode(table)
    out_ids = generate(g.model, enc.prompt_ids, pad_id=g.tokenizer.pad_token_id, stop_ids=g.stop_ids,
                       max_new_tokens=g.max_new_tokens, batch_size=batch_size)
    return [{"line": ex.line, "prompt": ex.prompt, "completion": text}
            for ex, text in zip(table.examples, decode(g.tokenizer, out_ids))]


def fill_prompt_template(texts: list[str], template: str | None, where: str = "<input>") -> list[str]:
    """Bare prompts (stdin lines, a Python list) put through the --prompt-template the model was trained with (or
    the one given), so that they read as the training prompts did: each text fills the template's one field. A
    template over several columns cannot be filled from one text: that is an error naming them."""
    from lmtune.data.generation import template_fields
    from lmtune.errors import DataError

    if not template:
        return list(texts)
    fields = template_fields(where, template)
    if len(fields) != 1:
        raise DataError(f"{where}: --prompt-template {template!r} fills {len(fields)} columns ({', '.join(fields)}) and "
                        "a bare prompt is one text: pass a file with those columns instead of stdin or a list")
    try:
        return [template.format_map({fields[0]: t}) for t in texts]
    except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
        raise DataError(f"{where}: --prompt-template {template!r} cannot be filled with a prompt "
                        f"({type(e).__name__}: {e})") from None
