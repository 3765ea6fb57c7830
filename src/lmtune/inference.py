"""evaluate and predict: use a saved lmtune/transformers folder on new data."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune._io import atomic_write_json
from lmtune.errors import DataError, ModelError


@dataclass
class Classifier:
    """A saved model ready for inference, with the settings it was trained with."""

    path: Path
    model: Any
    tokenizer: Any
    labels: list[str]
    max_length: int
    record: dict[str, Any]
    autocast_dtype: torch.dtype | None

    @property
    def columns(self) -> dict[str, str | None]:
        data = self.record.get("data", {})
        return {"text_column": data.get("text_column"), "text_pair_column": data.get("text_pair_column"),
                "label_column": data.get("label_column")}


def task_of(model_dir: str) -> str:
    """``classification`` or ``generation``: what the run record says, else what the checkpoint's head is."""
    from lmtune.records import RECORD_FILE

    path = Path(model_dir)
    try:
        record = json.loads((path / RECORD_FILE).read_text()) if (path / RECORD_FILE).is_file() else {}
        config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    except (OSError, ValueError) as e:
        raise ModelError(f"{model_dir}: unreadable model folder ({type(e).__name__}: {e})") from None
    if isinstance(record, dict) and record.get("task") in ("classification", "generation"):
        return record["task"]
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = config.get("architectures") if isinstance(config, dict) else None
    if (architectures and any(str(a) in causal for a in architectures)) or (path / "adapter_config.json").is_file():
        return "generation"
    return "classification"


def load(model_dir: str, *, precision: str = "auto", max_length: int | None = None) -> Any:
    """Load a folder written by ``lmtune train`` (or any sequence-classification or causal-LM checkpoint): a
    :class:`Classifier`, or for a generation model (see :func:`task_of`) a
    :class:`lmtune.tasks.generation.Generator` (its ``model``, ``tokenizer``, stop ids and ``max_new_tokens``; in
    fp32, as lmtune decodes, with the training run's max length: ``precision`` and ``max_length`` are for
    classification)."""
    from transformers import AutoModelForSequenceClassification

    if task_of(model_dir) == "generation":
        from lmtune.tasks.generation import Generator

        # A sequence-classification class over a causal LM's folder would build a fresh, random head.
        return Generator(model_dir)

    from lmtune.models import load_tokenizer
    from lmtune.records import RECORD_FILE
    from lmtune._console import quiet_libraries
    from lmtune.train.precision import resolve_precision

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ModelError(f"{model_dir}: not a model folder (no config.json); pass the --out folder of `lmtune train`")
    record_file = path / RECORD_FILE
    record = json.loads(record_file.read_text()) if record_file.is_file() else {}
    quiet_libraries()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True)
    except Exception as e:
        raise ModelError(f"{model_dir}: cannot load model ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    model.eval()
    tokenizer = load_tokenizer(str(path))
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    mixed = resolve_precision(precision)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed)
    if torch.cuda.is_available():
        model.to("cuda")
    from lmtune.models.classifier import max_positions

    ml = max_length or record.get("config", {}).get("train", {}).get("max_length") or 512
    ml = min(int(ml), max_positions(model.config) or int(ml))  # a checkpoint from elsewhere may have fewer positions
    return Classifier(path, model, tokenizer, labels, int(ml), record, dtype)


def _logits(clf: Classifier, table, batch_size: int) -> tuple[np.ndarray, Any]:
    from lmtune.data.batching import encode
    from lmtune.tasks.classification import predict_logits

    enc = encode(clf.tokenizer, table, None, clf.max_length)
    device = next(clf.model.parameters()).device
    ctx = torch.autocast(device.type, dtype=clf.autocast_dtype) if clf.autocast_dtype else nullcontext()
    with ctx:
        logits = predict_logits(clf.model, enc, batch_size, clf.tokenizer.pad_token_id)
    return logits, enc


def evaluate(model_dir: str, data_file: str, *, text_column: str | None = None, text_pair_column: str | None = None,
             label_column: str | None = None, batch_size: int = 32, precision: str = "auto",
             output: str | None = None, empty_text: str = "error", missing_label: str = "error",
             generation_columns: dict[str, Any] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1, per-class report and confusion matrix of a saved model on a labelled file.

    Writes the result as JSON (default ``<model_dir>/eval/<file stem>.json``) and returns it.
    ``empty_text`` / ``missing_label``: ``"error"`` or ``"skip"`` (counted in the result's ``skipped``).
    A generation model (see :func:`task_of`) is scored with :func:`lmtune.tasks.generation.evaluate_generation`.
    """
    if task_of(model_dir) == "generation":
        from lmtune.tasks.generation import evaluate_generation

        return evaluate_generation(model_dir, data_file, batch_size=batch_size, output=output, empty_text=empty_text,
                                   **(generation_columns or {}))
    from lmtune.errors import LabelError
    from lmtune.train.metrics import classification_metrics

    clf = load(model_dir, precision=precision)
    table = _read(data_file, clf, require_labels=True, policies={"empty_text": empty_text, "missing_label": missing_label},
                  text_column=text_column, text_pair_column=text_pair_column, label_column=label_column)
    known = {name: i for i, name in enumerate(clf.labels)}
    unknown = sorted({lab for lab in table.labels if lab not in known})
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise LabelError(f"{data_file}: column '{table.label_column}': {len(unknown)} label(s) the model does not know: "
                         f"{shown}; the model knows {clf.labels}")
    _check_pairs(clf, table, data_file)
    y = np.asarray([known[lab] for lab in table.labels])
    logits, enc = _logits(clf, table, batch_size)
    result = classification_metrics(logits, y, clf.labels, detailed=True)
    result.pop("val_loss")
    result["loss"] = float(classification_metrics(logits, y, clf.labels)["val_loss"])
    result |= {"model_dir": str(model_dir), "data_file": str(data_file), "labels": clf.labels,
               "skipped": table.skipped, "truncated": enc.truncated, "max_length": clf.max_length}
    out = Path(output) if output else Path(model_dir) / "eval" / f"{Path(data_file).stem}.json"
    atomic_write_json(out, result)
    result["output"] = str(out)
    return result


def predict(model_dir: str, data: str | list[str] | Any, *, text_column: str | None = None,
            text_pair_column: str | None = None, batch_size: int = 32, precision: str = "auto",
            empty_text: str = "error", generation_columns: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Labels with probabilities for a file (CSV/TSV/JSONL/Parquet), a list of texts, or a :class:`~lmtune.data.Table`
    (whose line numbers the output rows keep). For a generation model: completions of prompts
    (:func:`lmtune.tasks.generation.predict_generation`)."""
    from lmtune.data import Table

    if task_of(model_dir) == "generation":
        from lmtune.tasks.generation import predict_generation

        return predict_generation(model_dir, data, batch_size=batch_size, empty_text=empty_text,
                                  **(generation_columns or {}))
    from lmtune.train.metrics import softmax

    clf = load(model_dir, precision=precision)
    if isinstance(data, Table):
        table = data
    elif isinstance(data, list):
        empty = [i + 1 for i, t in enumerate(data) if not t.strip()]
        if empty:
            raise DataError(f"input: text {empty[0]} is empty ({len(empty)} empty text(s) in all)")
        table = Table(path="<input>", texts=list(data), text_pairs=None, labels=None,
                      line_numbers=list(range(1, len(data) + 1)), text_column="text", text_pair_column=None,
                      label_column=None, skipped={})
    else:
        table = _read(data, clf, require_labels=False, policies={"empty_text": empty_text}, text_column=text_column,
                      text_pair_column=text_pair_column)
    _check_pairs(clf, table, table.path)
    logits, _ = _logits(clf, table, batch_size)
    probs = softmax(logits)
    rows = []
    for i in range(len(table)):
        k = int(probs[i].argmax())
        row: dict[str, Any] = {"line": table.line_numbers[i], "text": table.texts[i]}
        if table.text_pairs is not None:
            row["text_pair"] = table.text_pairs[i]
        row |= {"label": clf.labels[k], "probability": float(probs[i, k]),
                "probabilities": {clf.labels[j]: float(p) for j, p in enumerate(probs[i])}}
        rows.append(row)
    return rows


def _check_pairs(clf: Classifier, table: Any, source: str) -> None:
    """A model trained on sentence pairs must be given pairs: the first text alone gives confident nonsense."""
    pair = clf.columns.get("text_pair_column")
    if pair and table.text_pairs is None:
        raise DataError(f"{source}: this model was trained on text pairs ('{clf.columns.get('text_column')}' + "
                        f"'{pair}'); give a file with both columns (--text-column, --text-pair-column)")


def _read(path: str, clf: Classifier, *, require_labels: bool, policies: dict[str, str], **given: str | None):
    """Read ``path`` preferring the training run's column names; fall back to detection when absent."""
    from lmtune.data import read_table

    trained = {k: v for k, v in clf.columns.items() if k in given}
    preferred = {k: given[k] or trained.get(k) for k in given}
    try:
        return read_table(path, require_labels=require_labels, **policies, **preferred)
    except DataError:
        if preferred == given:
            raise
        return read_table(path, require_labels=require_labels, **policies, **given)
