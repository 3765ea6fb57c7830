"""The training recipe, evaluation metrics and checkpoints."""

from lmtune.errors import Interrupted
from lmtune.train.loop import EvalEvent, Resources, TrainResult, train
from lmtune.train.precision import resolve_precision

__all__ = ["EvalEvent", "Interrupted", "Resources", "TrainResult", "resolve_precision", "train"]
