"""Text classification: a label map, a sequence-classification head on the causal LM, cross-entropy per row,
accuracy and macro-F1."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune._io import atomic_write_text

# name -> higher is better
METRICS = {"accuracy": True, "macro_f1": True, "val_loss": False}


def pad_multiple(device: Any) -> int | None:
    """Round padded lengths to a multiple of 8 only on GPUs (tensor cores); on CPUs it only adds tokens
    (~20% more on 12-token SST-2 phrases)."""
    return 8 if torch.device(device).type == "cuda" else None


class ClassificationTask:
    name = "classification"
    metrics = METRICS
    default_metric = "accuracy"
    default_learning_rate = 5e-5

    def load_data(self, cfg: Any) -> Any:
        from lmtune.data import load_data

        return load_data(cfg.data)

    def describe_data(self, bundle: Any) -> str:
        s = bundle.summary
        return (f"data: {s['rows']['train']} training rows, {s['rows']['val']} validation rows ({s['val_source']}), "
                f"{len(bundle.label_map.labels)} classes")

    def load_model(self, cfg: Any, bundle: Any, resolved: Any) -> Any:
        from lmtune.models import load_classifier

        return load_classifier(cfg.model, bundle.label_map.labels, resolved=resolved, max_length=cfg.train.max_length)

    def encode(self, tokenizer: Any, bundle: Any, cfg: Any, cache_dir: str | None) -> tuple[Any, Any]:
        from lmtune.data.batching import encode

        n = cfg.train.max_length
        return (encode(tokenizer, bundle.train, bundle.train_ids, n, cache_dir=cache_dir),
                encode(tokenizer, bundle.val, bundle.val_ids, n, cache_dir=cache_dir))

    def loss_units(self, enc: Any, rows: list[int]) -> int:
        return len(rows)

    def loss_sum(self, model: Any, enc: Any, rows: list[int], pad_id: int, device: Any) -> tuple[torch.Tensor, int]:
        from lmtune.data.batching import collate

        batch = collate([(enc.input_ids[i], enc.labels[i]) for i in rows], pad_id, pad_to_multiple_of=pad_multiple(device))
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        return loss, int(batch["attention_mask"].sum())

    def chance_loss(self, bundle: Any) -> float:
        return math.log(max(2, len(bundle.label_map.labels)))

    def evaluate(self, model: Any, enc: Any, bundle: Any, batch_size: int, accelerator: Any, pad_id: int,
                 step: int, final: bool = True) -> tuple[dict[str, Any], Any]:
        from lmtune.train.metrics import classification_metrics

        logits = predict_logits(model, enc, batch_size, pad_id, accelerator)
        return classification_metrics(logits, np.asarray(enc.labels), bundle.label_map.labels, detailed=True), logits

    def write_predictions(self, path: Path, bundle: Any, enc: Any, payload: Any) -> None:
        from lmtune.train.metrics import softmax

        write_predictions(path, bundle.val, enc.labels, softmax(payload), bundle.label_map.labels)

    def save(self, model: Any, tokenizer: Any, out: Path, cfg: Any, train_enc: Any) -> None:
        from lmtune.models import to_plain_transformers

        final = to_plain_transformers(model)
        final.config.use_cache = True
        save_model_folder(final, tokenizer, out)

    def record(self, cfg: Any, bundle: Any, train_enc: Any, val_enc: Any) -> dict[str, Any]:
        return {"labels": bundle.label_map.labels, "label_map": bundle.label_map.to_json(),
                "data": bundle.summary | {"truncated": {"train": train_enc.truncated, "val": val_enc.truncated},
                                          "token_lengths": {"train": list(map(int, train_enc.lengths)),
                                                            "val": list(map(int, val_enc.lengths))},
                                          "max_length": cfg.train.max_length}}


@torch.inference_mode()
def predict_logits(model: Any, enc: Any, batch_size: int, pad_id: int, accelerator: Any = None) -> np.ndarray:
    """Logits for every row of ``enc`` in its original order; longest batches first, sharded over processes."""
    from lmtune.data.batching import LengthGroupedSampler, collate

    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    batches = LengthGroupedSampler(enc.lengths, batch_size, shuffle=False, group_by_length=True).batches(0)
    mine = []
    for idx in batches[rank::world]:
        b = collate([(enc.input_ids[i], None) for i in idx], pad_id, pad_to_multiple_of=pad_multiple(device))
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        mine.append((list(idx), logits.float().cpu().numpy()))
    if world > 1:
        from accelerate.utils import gather_object
        gathered = gather_object(mine)
    else:
        gathered = mine
    n_labels = gathered[0][1].shape[-1] if gathered else 0
    out = np.zeros((len(enc), n_labels), dtype=np.float32)
    for idx, logits in gathered:
        out[idx] = logits
    return out


def save_model_folder(model: Any, tokenizer: Any, out: Path) -> None:
    """``save_pretrained`` into a temp folder, then move each file into ``out`` (no half-written model)."""
    import os
    import shutil

    tmp = out / ".model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    from lmtune._io import file_mode

    for f in tmp.iterdir():
        if f.is_file():
            os.chmod(f, file_mode())  # safetensors writes 0600; the folder is meant to be shared and loaded
        os.replace(f, out / f.name)
    tmp.rmdir()


def write_predictions(path: Path, table: Any, label_ids: Any, probs: np.ndarray, labels: list[str]) -> None:
    """One JSON object per validation row: its text, true and predicted label, ``probability`` of the prediction
    (the name ``lmtune predict`` uses) and every class probability."""
    lines = []
    for i in range(len(table)):
        pred = int(probs[i].argmax())
        row = {"line": table.line_numbers[i], "text": table.texts[i]}
        if table.text_pairs is not None:
            row["text_pair"] = table.text_pairs[i]
        row |= {"label": labels[label_ids[i]], "predicted": labels[pred], "probability": round(float(probs[i, pred]), 6),
                "probabilities": {labels[k]: round(float(p), 6) for k, p in enumerate(probs[i])}}
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")
