"""Hyperparameter search with Optuna: space, trials, storage, confirmation."""

from lmtune.tune.space import SearchSpace, build_space, default_learning_rate, parse_dimension
from lmtune.tune.study import TuneResult, leaderboard, show, tune

__all__ = ["SearchSpace", "TuneResult", "build_space", "default_learning_rate", "leaderboard", "parse_dimension", "show", "tune"]
