"""The default median pruner: what it may judge a trial against (no training: Optuna trials built by hand)."""

from __future__ import annotations

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from lmtune.config import TuneConfig
from lmtune.tune.study import _pruner

LR = {"learning_rate": FloatDistribution(1e-5, 1e-3, log=True)}


def finished(curve: list[float]) -> optuna.trial.FrozenTrial:
    """A finished trial whose evaluations 1..n gave these validation losses."""
    return create_trial(params={"learning_rate": 1e-4}, distributions=LR, value=min(curve), state=TrialState.COMPLETE,
                        intermediate_values={k + 1: v for k, v in enumerate(curve)})


def judged(earlier: list[list[float]], running: list[float]) -> bool:
    """Would the default pruner stop a running trial after these evaluations, given these earlier trials?"""
    study = optuna.create_study(direction="minimize", pruner=_pruner(TuneConfig()))
    for curve in earlier:
        study.add_trial(finished(curve))
    trial = study.ask()
    for step, value in enumerate(running, start=1):
        trial.report(value, step)
    return bool(trial.should_prune())


# Two-epoch E2E curves of the 2026-11-28 search benchmark: the defaults (lr 1e-4, batch 16) and a trial of lr 1.2e-4,
# batch 8 that ended at 1.1924, the best value of the earlier run of that benchmark.
DEFAULTS = [1.3451, 1.2443, 1.2148, 1.2087]
WINNER_SO_FAR = [1.3028, 1.2529, 1.2170]
ONE_EPOCH = [[1.3165, 1.2568], [1.3448, 1.2888]]


def test_a_trial_is_not_pruned_on_the_median_of_one_other_trial():
    # At its third evaluation only the defaults had got that far: 0.0022 behind them is no evidence.
    assert judged([DEFAULTS] + ONE_EPOCH, WINNER_SO_FAR) is False


def test_a_trial_behind_two_others_at_the_same_point_is_pruned():
    other = [1.33, 1.25, 1.2100, 1.2050]
    assert judged([DEFAULTS, other] + ONE_EPOCH, WINNER_SO_FAR) is True
    assert judged([DEFAULTS, other] + ONE_EPOCH, [1.3028, 1.2529, 1.2000]) is False  # ahead of the median


def test_the_first_evaluation_is_never_judged_and_pruning_waits_for_two_finished_trials():
    assert judged([DEFAULTS, DEFAULTS], [9.9]) is False  # warm-up noise
    assert judged([DEFAULTS], [1.40, 9.9]) is False  # one finished trial: no median yet
    assert judged([DEFAULTS, DEFAULTS], [1.40, 9.9]) is True
