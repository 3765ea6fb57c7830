"""The training recipe, evaluation metrics and checkpoints."""

from lmtune.train.loop import EvalEvent, Interrupted, Resources, TrainResult, predict_logits, resolve_precision, train

__all__ = ["EvalEvent", "Interrupted", "Resources", "TrainResult", "predict_logits", "resolve_precision", "train"]
