"""Classification metrics from logits, via scikit-learn."""

from __future__ import annotations

from typing import Any

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(labels)), labels].mean())


def classification_metrics(logits: np.ndarray, labels: np.ndarray, label_names: list[str], *, detailed: bool = False) -> dict[str, Any]:
    """Loss, accuracy and macro-F1; with ``detailed`` also the per-class report and confusion matrix."""
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    preds = logits.argmax(axis=-1)
    ids = list(range(len(label_names)))
    out: dict[str, Any] = {
        "val_loss": cross_entropy(logits, labels),
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, labels=ids, average="macro", zero_division=0)),
        "n": int(len(labels)),
    }
    if detailed:
        report = classification_report(labels, preds, labels=ids, target_names=label_names, output_dict=True, zero_division=0)
        out["per_class"] = {name: {k: float(v) for k, v in report[name].items()} for name in label_names}
        out["confusion_matrix"] = confusion_matrix(labels, preds, labels=ids).tolist()
    return out


_SHOWN = ("train_loss", "val_loss", "accuracy", "macro_f1", "perplexity", "exact_match", "token_f1", "rougeL", "bleu", "chrf")


def format_metrics(m: dict[str, Any]) -> str:
    """One line of the metrics a run prints after each evaluation (those present: the task decides)."""
    parts = []
    for key in _SHOWN:
        if key in m and m[key] is not None:
            v = m[key]
            parts.append(f"{key} {v:.2f}" if key in ("perplexity", "exact_match", "token_f1", "rougeL", "bleu", "chrf")
                         else f"{key} {v:.4f}")
    return "  ".join(parts)
