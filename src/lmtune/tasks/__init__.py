"""Tasks: what is learned (classification: text -> label; generation: prompt -> completion), behind one seam."""

from __future__ import annotations

import copy
import os
from typing import Any

from lmtune.errors import ConfigError
from lmtune.tasks.base import Task

TASKS = ("classification", "generation")


def get_task(name: str) -> Task:
    if name == "classification":
        from lmtune.tasks.classification import ClassificationTask
        return ClassificationTask()
    if name == "generation":
        from lmtune.tasks.generation import GenerationTask
        return GenerationTask()
    raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {name!r}")


def detect_task(data: Any) -> str:
    """``generation`` when the flags or the file say prompt -> completion (chat messages, prompt/completion-like
    columns), else ``classification``."""
    if data.prompt_column or data.completion_column or data.prompt_template:
        return "generation"
    if data.text_column or data.label_column or data.text_pair_column:
        return "classification"
    if not data.train_file or not os.path.isfile(data.train_file):
        return "classification"  # reading the file reports what is wrong with it
    from lmtune.data.generation import looks_like_generation

    return "generation" if looks_like_generation(data.train_file) else "classification"


def resolve_task(cfg: Any) -> tuple[Task, Any]:
    """The task of a RunConfig (detected when ``--task auto``) and a copy of it whose ``data.task`` and
    ``train.metric`` and ``train.learning_rate`` are concrete, so the run record says what ran."""
    name = cfg.data.task if cfg.data.task != "auto" else detect_task(cfg.data)
    task = get_task(name)
    metric = cfg.train.metric
    if metric == "auto":
        metric = task.default_metric
    elif metric not in task.metrics:
        raise ConfigError(f"--metric {metric} is not a {name} metric; choose one of {', '.join(task.metrics)}")
    resolved = copy.deepcopy(cfg)
    resolved.data.task = name
    resolved.train.metric = metric
    if resolved.train.learning_rate is None:
        resolved.train.learning_rate = task.default_learning_rate
    return task, resolved


__all__ = ["TASKS", "Task", "detect_task", "get_task", "resolve_task"]
