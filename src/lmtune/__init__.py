"""lmtune: fine-tune GPT-style language models for text classification, and find the settings that work.

Public API (the same verbs as the CLI)::

    import lmtune
    cfg = lmtune.RunConfig(data=lmtune.DataConfig(train_file="train.tsv"), output_dir="runs/sst2")
    result = lmtune.train(cfg)
    lmtune.evaluate("runs/sst2", "test.tsv")
    lmtune.predict("runs/sst2", ["a gripping film"])
"""

from lmtune.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from lmtune.errors import (
    CheckpointError, ConfigError, DataError, DivergenceError, LabelError, LmtuneError, ModelError, SearchSpaceError,
    StudyError,
)
from lmtune.inference import evaluate, load, predict
from lmtune.train import EvalEvent, TrainResult, train

__all__ = [
    "CheckpointError", "ConfigError", "DataConfig", "DataError", "DivergenceError", "EvalEvent", "LabelError",
    "LmtuneError", "ModelConfig", "ModelError", "RunConfig", "SearchSpaceError", "StudyError", "TrainConfig",
    "TrainResult", "evaluate", "load", "predict", "train",
]
try:  # the search verb lives in its own package
    from lmtune.tune import tune  # noqa: F401
    __all__.append("tune")
except ImportError:
    pass
