"""The seam between the task-agnostic training loop and what a task knows.

The loop (``lmtune.train.loop``) batches, backs off on out-of-memory, keeps precision, processes, checkpoints,
the best evaluation and early stopping. Everything that depends on *what* is learned goes through a
:class:`Task`: reading the data, loading the model with its head, tokenising, the summed loss of a
micro-batch and the unit it is normalised by (examples for classification, target tokens for generation),
evaluation, the predictions written beside the model, saving, and the task's part of the run record.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch


class Task(Protocol):
    name: str
    """``classification`` or ``generation``: written into the run record, so evaluate/predict/report dispatch on it."""

    metrics: dict[str, bool]
    """The metrics this task reports: name -> higher is better."""

    default_metric: str
    """The metric that picks the best checkpoint when --metric is auto."""

    default_learning_rate: float
    """The peak learning rate when --lr is not given (docs/training.md gives the measurements behind it)."""

    def load_data(self, cfg: Any) -> Any:
        """Read and split the data (``cfg``: the RunConfig). The result has ``train``, ``val`` and ``summary``."""

    def describe_data(self, bundle: Any) -> str:
        """The ``data: ...`` line a run prints."""

    def load_model(self, cfg: Any, bundle: Any, resolved: Any) -> Any:
        """The model to train (a ``LoadedModel``), its head and method applied; refuses a max length it cannot take."""

    def encode(self, tokenizer: Any, bundle: Any, cfg: Any, cache_dir: str | None) -> tuple[Any, Any]:
        """Tokenised (train, validation) rows; each has ``lengths`` and ``len()``."""

    def loss_units(self, enc: Any, rows: list[int]) -> int:
        """What the loss of ``rows`` is normalised by: rows (classification) or target tokens (generation).
        Summed over a whole step batch, so the gradient is the same whatever the micro-batch size."""

    def loss_sum(self, model: Any, enc: Any, rows: list[int], pad_id: int, device: Any) -> tuple[torch.Tensor, int]:
        """The summed loss of ``rows`` (a scalar tensor with grad) and the real (unpadded) tokens in the batch."""

    def chance_loss(self, bundle: Any) -> float:
        """A floor for the divergence check's starting loss (classification: the loss of a uniform guess)."""

    def evaluate(self, model: Any, enc: Any, bundle: Any, batch_size: int, accelerator: Any, pad_id: int,
                 step: int, final: bool = True) -> tuple[dict[str, Any], Any]:
        """Metrics on the validation rows (``val_loss`` among them) and a payload for :meth:`write_predictions`;
        ``final``: the run's last evaluation (a task may compute costly metrics only then)."""

    def write_predictions(self, path: Path, bundle: Any, enc: Any, payload: Any) -> None:
        """The best evaluation's predictions on validation, one JSON object per row."""

    def save(self, model: Any, tokenizer: Any, out: Path, cfg: Any, train_enc: Any) -> None:
        """Write the output folder plain transformers loads."""

    def record(self, cfg: Any, bundle: Any, train_enc: Any, val_enc: Any) -> dict[str, Any]:
        """The task's own part of the run record (labels, templates, ...)."""
