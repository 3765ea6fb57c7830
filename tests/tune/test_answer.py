"""The answer a study ends with, on synthetic studies whose truth is known: the learning rate decides the metric,
the batch size is noise; the defaults are trial 0."""

from __future__ import annotations

import math
import random
import statistics

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState, create_trial

from lmtune.tune.answer import (DEFAULT_ATTR, REFIT_SKIPPED_ATTR, answer_lines, compute_answer, default_trial_line,
                                importance_bands, search_seconds)

LR = FloatDistribution(1e-5, 1e-3, log=True)
BATCH = CategoricalDistribution((8, 16, 32))
MODEL = CategoricalDistribution(("small", "large"))


def accuracy(lr: float, batch: int, model: str, rng: random.Random) -> float:
    """Peaks at lr 1e-4 whatever the batch size; the large model is 0.02 better; noise 0.002."""
    return 0.9 - 0.05 * (math.log10(lr) + 4) ** 2 + (0.02 if model == "large" else 0.0) + rng.gauss(0, 0.002)


def synthetic_study(n: int, seed: int = 0, models: bool = False) -> optuna.Study:
    rng = random.Random(seed)
    study = optuna.create_study(direction="maximize")
    study.set_user_attr("metric", "accuracy")
    study.set_user_attr("space", {"model": "small"})
    for i in range(n):
        params = {"learning_rate": 10 ** rng.uniform(-5, -3), "global_batch_size": rng.choice([8, 16, 32])}
        dists = {"learning_rate": LR, "global_batch_size": BATCH}
        if i == 0:
            params = {"learning_rate": 5e-5, "global_batch_size": 16}
        if models:
            params["model"] = ["small", "large"][i % 2]
            dists["model"] = MODEL
        value = accuracy(params["learning_rate"], params["global_batch_size"], params.get("model", "small"), rng)
        study.add_trial(create_trial(params=params, distributions=dists, value=value, state=TrialState.COMPLETE,
                                     user_attrs={"seconds": 100.0 * (2 if params.get("model") == "large" else 1)}
                                     | ({DEFAULT_ATTR: True} if i == 0 else {})))
    return study


def test_the_parameter_that_decides_the_metric_ranks_first_with_a_band_clear_of_the_noise_parameter():
    answer = compute_answer(synthetic_study(40), n_bootstrap=20)
    bands = {b["parameter"]: b for b in answer["importances"]}
    assert answer["importances"][0]["parameter"] == "learning_rate"
    assert bands["learning_rate"]["low"] > bands["global_batch_size"]["high"]
    assert bands["learning_rate"]["low"] <= bands["learning_rate"]["importance"] <= bands["learning_rate"]["high"]
    lo, hi = answer["parameters"]["learning_rate"]["best_range"]
    assert lo < 1e-4 < hi and hi / lo < 10  # the best quarter sits around the true optimum
    assert "learning_rate matters most" in " ".join(answer["statements"])


def test_the_same_trials_give_the_same_answer():
    assert compute_answer(synthetic_study(12), n_bootstrap=10) == compute_answer(synthetic_study(12), n_bootstrap=10)


def test_few_trials_say_so_and_two_trials_give_no_ranking():
    few = compute_answer(synthetic_study(6), n_bootstrap=10)
    assert any("indicative only" in s for s in few["statements"])
    two = compute_answer(synthetic_study(2), n_bootstrap=10)
    assert two["importances"] == [] and any("too few" in s for s in two["statements"])
    assert any("No seed confirmation" in s for s in two["statements"])


def test_defaults_against_tuned_on_the_same_seeds_with_noise_called_out():
    study = synthetic_study(20)
    best = max(study.trials, key=lambda t: t.value)
    confirmation = {"most_reliable_trial": best.number, "results": [
        {"trial": best.number, "seeds": [0, 1, 2], "values": [0.90, 0.89, 0.91], "mean": 0.90, "std": 0.01},
        {"trial": 0, "seeds": [0, 1, 2], "values": [0.80, 0.81, 0.79], "mean": 0.80, "std": 0.01}]}
    d = compute_answer(study, confirmation=confirmation, n_bootstrap=5)["defaults_vs_tuned"]
    assert d["default_trial"] == 0 and d["same_seeds"] is True
    assert d["gain"] == pytest.approx(0.10) and d["within_noise"] is False
    close = {"most_reliable_trial": best.number, "results": [
        {"trial": best.number, "seeds": [0, 1, 2], "values": [0.9, 0.8, 0.85], "mean": 0.85, "std": 0.05},
        {"trial": 0, "seeds": [0, 1, 2], "values": [0.84, 0.83, 0.85], "mean": 0.84, "std": 0.01}]}
    d = compute_answer(study, confirmation=confirmation, n_bootstrap=5)["defaults_vs_tuned"]
    assert d["verdict"] == "beyond" and d["seed_gains"] == [[0, pytest.approx(0.10)], [1, pytest.approx(0.08)],
                                                             [2, pytest.approx(0.12)]]
    assert d["fresh_seed_gain"] == pytest.approx(0.10)  # seeds 1 and 2: the search seed picked the winner
    answer = compute_answer(study, confirmation=close, n_bootstrap=5)
    assert answer["defaults_vs_tuned"]["within_noise"] is True and answer["defaults_vs_tuned"]["verdict"] == "within"
    assert any("within seed noise" in s for s in answer["statements"])


def test_a_gain_beyond_the_noise_on_average_that_a_seed_contradicts_is_not_settled():
    # SST-2's study: +0.0156 against a noise of 0.0144 was called "beyond seed noise", yet the defaults won on
    # seed 2, and without the search seed (where trial 8 was picked among 20) the gain was +0.005.
    study = synthetic_study(20)
    best = max(study.trials, key=lambda t: t.value)
    tuned, defaults = [258 / 300, 255 / 300, 253 / 300], [247 / 300, 251 / 300, 254 / 300]  # its confirm.json
    confirmation = {"results": [
        {"trial": best.number, "seeds": [0, 1, 2], "values": tuned, "mean": statistics.fmean(tuned),
         "std": statistics.stdev(tuned)},
        {"trial": 0, "seeds": [0, 1, 2], "values": defaults, "mean": statistics.fmean(defaults),
         "std": statistics.stdev(defaults)}]}
    answer = compute_answer(study, confirmation=confirmation, n_bootstrap=3)
    d = answer["defaults_vs_tuned"]
    assert d["gain"] == pytest.approx(0.0156, abs=1e-4) and d["noise"] == pytest.approx(0.0144, abs=1e-4)
    assert d["verdict"] == "mixed" and d["within_noise"] is True
    assert d["fresh_seed_gain"] == pytest.approx(0.005, abs=1e-4)
    text = next(s for s in answer["statements"] if s.startswith("Tuning"))
    assert "not settled" in text and "seed 2 went the other way" in text and "beyond seed noise" not in text
    assert "seed 0 +0.0367, seed 1 +0.0133, seed 2 -0.0033" in text
    assert "On the confirmation seeds alone, without the search seed the winner was picked on" in text
    assert "+0.0050" in text


def test_a_confirmation_without_per_seed_values_is_judged_on_its_means():
    from lmtune.tune.answer import verdict_of

    assert verdict_of(0.05, 0.01, []) == "beyond" and verdict_of(0.005, 0.01, []) == "within"
    assert verdict_of(-0.05, 0.01, [[0, -0.04], [1, -0.06]]) == "beyond"  # the defaults better on every seed
    assert verdict_of(0.05, 0.01, [[0, 0.1], [1, 0.0]]) == "mixed"  # a tie on a seed is not agreement


def test_defaults_run_once_are_compared_on_their_seed_not_against_the_tuned_mean():
    # TREC's study: the tuned trial 0.93 on the search seed, 0.9244 over three; the defaults 0.8667 once. The gain
    # was stated as 0.0578 "one seed each", which set the three-seed mean against the defaults' single run.
    study = synthetic_study(20)
    best = max(study.trials, key=lambda t: t.value)
    default_value = study.trials[0].value
    confirmation = {"results": [{"trial": best.number, "seeds": [0, 1, 2], "values": [best.value, 0.5, 0.5],
                                 "mean": (best.value + 1.0) / 3, "std": 0.2}]}
    answer = compute_answer(study, confirmation=confirmation, n_bootstrap=3)
    d = answer["defaults_vs_tuned"]
    assert d["gain"] == pytest.approx(best.value - default_value) and d["within_noise"] is None
    assert d["tuned_mean"] == pytest.approx((best.value + 1.0) / 3) and d["tuned_seeds"] == [0, 1, 2]
    text = next(s for s in answer["statements"] if s.startswith("Tuning"))
    assert "on the search seed, one run each" in text and "mean over 3 seeds" in text and "not yet a conclusion" in text


def test_trials_tied_with_the_last_of_the_best_quarter_are_in_it():
    # AG News: trials 0 and 1 tied at 0.8967 at the quarter's edge; which one was shown depended on trial order.
    study = lr_study("maximize", "accuracy", [(5e-5, 0.90), (1e-4, 0.89), (2e-4, 0.88), (3e-4, 0.88), (1e-5, 0.80),
                                              (2e-5, 0.81), (4e-4, 0.70), (5e-4, 0.70)])
    view = compute_answer(study, n_bootstrap=3)["parameters"]["learning_rate"]
    assert view["best_trials"] == 4 and view["best_range"] == [5e-5, 3e-4]


def test_a_best_range_spanning_the_whole_searched_range_is_not_called_an_edge():
    wide = lr_study("maximize", "accuracy", [(1e-5, 0.90), (1e-3, 0.90), (1e-4, 0.89), (3e-4, 0.5), (2e-5, 0.5)])
    text = " ".join(compute_answer(wide, n_bootstrap=3)["statements"])
    assert "learning_rate: the best trials span the whole searched range" in text and "reach the edge" not in text
    edge = lr_study("maximize", "accuracy", [(1e-5, 0.90), (2e-5, 0.89), (3e-5, 0.88), (3e-4, 0.5), (1e-4, 0.5)])
    assert "learning_rate: the best trials reach the edge" in " ".join(compute_answer(edge, n_bootstrap=3)["statements"])


def lr_study(direction: str, metric: str, trials: list[tuple[float, float]]) -> optuna.Study:
    """A study over the learning rate alone from (learning rate, value) pairs; the first pair is the defaults."""
    study = optuna.create_study(direction=direction)
    study.set_user_attr("metric", metric)
    for i, (lr, value) in enumerate(trials):
        study.add_trial(create_trial(params={"learning_rate": lr}, distributions={"learning_rate": LR}, value=value,
                                     user_attrs={DEFAULT_ATTR: True} if i == 0 else {}))
    return study


def test_minimised_metric_counts_a_lower_value_as_a_gain():
    study = lr_study("minimize", "val_loss", [(5e-5, 2.0), (1e-4, 1.5), (3e-4, 1.7), (1e-5, 2.5)])
    answer = compute_answer(study, n_bootstrap=5)
    assert answer["defaults_vs_tuned"]["tuned_value"] == 1.5 and answer["defaults_vs_tuned"]["gain"] == pytest.approx(0.5)
    assert answer["parameters"]["learning_rate"]["best_range"] == [5e-5, 3e-4]  # the best 3 of 4: losses 1.5, 1.7, 2.0


def test_per_size_best_cost_and_lines():
    answer = compute_answer(synthetic_study(24, models=True), n_bootstrap=5)
    sizes = {s["model"]: s for s in answer["sizes"]}
    assert answer["sizes"][0]["model"] == "large"
    assert sizes["large"]["seconds_per_trial"] == 200.0 and sizes["small"]["seconds_per_trial"] == 100.0
    text = "\n".join(answer_lines(answer))
    assert "size large: best" in text and "learning_rate" in text


def test_confirmation_covers_the_winner_every_size_and_the_defaults():
    from lmtune.tune.study import trials_to_confirm

    study = synthetic_study(12, models=True)  # trial 0 (the defaults) is "small"; "large" trials score higher
    values = sorted(study.trials, key=lambda t: t.value, reverse=True)
    best_small = next(t for t in values if t.params["model"] == "small")
    chosen = trials_to_confirm(study, 3)
    assert chosen[0].number == values[0].number and values[0].params["model"] == "large"
    assert chosen[1].number == best_small.number  # the best of the other size
    assert 0 in [t.number for t in chosen]  # the defaults, on the same seeds
    assert [t.number for t in trials_to_confirm(study, 1)] == [values[0].number]
    assert len({t.number for t in trials_to_confirm(study, 12)}) == 12


def test_the_size_verdict_weighs_confirmed_means_noise_and_cost():
    study = synthetic_study(24, models=True)
    best = {m: max((t for t in study.trials if t.params["model"] == m), key=lambda t: t.value) for m in ("small", "large")}
    close = {"results": [
        {"trial": best["large"].number, "seeds": [0, 1], "values": [0.90, 0.86], "mean": 0.88, "std": 0.03},
        {"trial": best["small"].number, "seeds": [0, 1], "values": [0.88, 0.86], "mean": 0.87, "std": 0.01}]}
    answer = compute_answer(study, confirmation=close, budget_s=1800, n_bootstrap=3)
    verdict = next(s for s in answer["statements"] if "within seed noise of each other" in s)
    assert "small wins for the time" in verdict and "small ~18 trials" in verdict and "large ~9 trials" in verdict
    apart = {"results": [dict(close["results"][0], values=[0.95, 0.95], mean=0.95, std=0.001),
                         dict(close["results"][1], std=0.001)]}
    verdict = next(s for s in compute_answer(study, confirmation=apart, n_bootstrap=3)["statements"]
                   if s.startswith("large gave"))
    assert "confirmed means" in verdict and "0.9500 vs 0.8700" in verdict


def test_what_tuning_changed_is_said_in_the_metrics_own_sense():
    from lmtune.tune.answer import gain_words

    assert gain_words(0.0156, "accuracy", "maximize") == "bought +0.0156 accuracy"
    assert gain_words(0.0328, "val_loss", "minimize") == "lowered val_loss by 0.0328"  # was "bought +0.0328 val_loss"
    assert gain_words(-0.01, "val_loss", "minimize") == "raised val_loss by 0.0100"


def test_every_importance_lies_inside_its_own_band_with_few_trials():
    # With ten-odd trials fANOVA on all trials can fall outside its bootstrap band (E2E's learning rate read 0.46,
    # band 0.14..0.45); the importance shown is the resamples' median, which cannot. Here: five parameters, ten
    # trials, the metric driven by p0 plus noise.
    dists = {f"p{k}": FloatDistribution(0, 1) for k in range(5)}
    outside = 0
    for seed in range(6):
        rng = random.Random(seed)
        trials = []
        for _ in range(10):
            params = {k: rng.random() for k in dists}
            trials.append(create_trial(params=params, distributions=dists, value=params["p0"] + rng.gauss(0, 0.3),
                                       state=TrialState.COMPLETE))
        bands = importance_bands("maximize", trials, list(dists), n_bootstrap=15)
        assert [b["importance"] for b in bands] == sorted((b["importance"] for b in bands), reverse=True)
        for b in bands:
            assert b["low"] <= b["importance"] <= b["high"], b
            outside += not (b["low"] <= b["all_trials"] <= b["high"])
    assert outside  # the all-trials value does leave its band on these studies: the check above is not idle


def test_a_size_confirmed_alone_is_compared_on_single_seeds_not_on_its_mean():
    # AG News study: smollm2 (the defaults, trial 0) 0.8967 on the search seed, confirmed 0.8878; gemma 0.8967 on
    # one seed. Comparing smollm2's mean with gemma's single seed named the lower number the winner.
    study = synthetic_study(24, models=True)
    best = {m: max((t for t in study.trials if t.params["model"] == m), key=lambda t: t.value) for m in ("small", "large")}
    only_small = {"results": [{"trial": best["small"].number, "seeds": [0, 1, 2], "values": [0.5, 0.5, 0.5],
                               "mean": 0.5, "std": 0.0}]}
    verdict = next(s for s in compute_answer(study, confirmation=only_small, n_bootstrap=3)["statements"]
                   if "gave the best" in s or " tie " in s)
    assert verdict.startswith("large gave the best") and "search seed" in verdict
    assert f"{best['large'].value:.4f} vs {best['small'].value:.4f}" in verdict


def test_defaults_that_win_the_search_say_tuning_bought_nothing_with_their_seed_spread():
    study = lr_study("maximize", "accuracy", [(5e-5, 0.90), (1e-4, 0.88), (3e-4, 0.85), (1e-5, 0.80)])
    confirmation = {"results": [{"trial": 0, "seeds": [0, 1, 2], "values": [0.90, 0.88, 0.89], "mean": 0.89, "std": 0.01}]}
    answer = compute_answer(study, confirmation=confirmation, n_bootstrap=3)
    assert answer["defaults_vs_tuned"]["defaults_best"] is True
    text = " ".join(answer["statements"])
    assert "The defaults were the best configuration of the 4 finished trials (0.8900 +- 0.0100 over 3 seeds)" in text
    assert "not measured" not in text
    assert "(one seed)" in " ".join(compute_answer(study, n_bootstrap=3)["statements"])


def test_defaults_whose_mean_beats_every_confirmed_trial_are_the_answer_not_a_loss_against_the_runner_up():
    # E2E over two sizes (2026-11-28): the defaults (trial 0) won, and the confirmation took the best trial of each
    # size, the other a worse, larger model. The answer said "Tuning raised val_loss by 0.1089 over the defaults ...
    # beyond seed noise": the runner-up set against the defaults as if it were what tuning found.
    study = lr_study("minimize", "val_loss", [(1e-4, 1.1454), (1.2e-5, 1.2570), (1.5e-4, 1.1468), (2e-5, 1.4254)])
    confirmation = {"results": [
        {"trial": 0, "seeds": [0, 1, 2], "values": [1.1454, 1.1525, 1.1430], "mean": 1.1469669, "std": 0.0049},
        {"trial": 1, "seeds": [0, 1, 2], "values": [1.2570, 1.2532, 1.2572], "mean": 1.2558, "std": 0.0022}]}
    answer = compute_answer(study, confirmation=confirmation, n_bootstrap=3)
    d = answer["defaults_vs_tuned"]
    assert d["defaults_best"] is True and d["gain"] == 0.0 and d["runner_up"]["trial"] == 1
    text = " ".join(answer["statements"])
    assert "Tuning raised" not in text and "beyond seed noise" not in text
    assert ("The defaults were the best configuration of the 4 finished trials (1.1470 +- 0.0049 over 3 seeds; the best "
            "searched configuration confirmed, trial #1: 1.2558 +- 0.0022): tuning bought nothing here.") in text
    # a searched trial that beat the defaults on the search seed but not on the mean: still the defaults' answer
    confirmation["results"][1] = {"trial": 2, "seeds": [0, 1, 2], "values": [1.1468, 1.1560, 1.1500], "mean": 1.1509,
                                  "std": 0.0047}
    answer = compute_answer(study, confirmation=confirmation, n_bootstrap=3)
    assert answer["defaults_vs_tuned"]["defaults_best"] is True and "trial #2: 1.1509" in " ".join(answer["statements"])
    # and one whose mean beats them is the tuned side, as before
    confirmation["results"][1] = dict(confirmation["results"][1], mean=1.1300, values=[1.13, 1.13, 1.13], std=0.0)
    d = compute_answer(study, confirmation=confirmation, n_bootstrap=3)["defaults_vs_tuned"]
    assert d["defaults_best"] is False and d["tuned_trial"] == 2 and d["gain"] == pytest.approx(1.1469669 - 1.13)


def test_the_default_trial_line_claims_no_gap_when_the_defaults_are_the_best_trial():
    won = default_trial_line(0, 0.8875, 0, 0.8875, "accuracy", maximize=True)
    assert won == "default configuration (trial #0): accuracy 0.8875; it is the best trial: the search found nothing better"
    beaten = default_trial_line(0, 0.85, 7, 0.87, "accuracy", maximize=True)
    assert "the best trial (#7) is +0.0200 better" in beaten
    # a minimised metric: the best trial's lower loss is the gain
    assert "the best trial (#3) is +0.1000 better" in default_trial_line(0, 1.4, 3, 1.3, "val_loss", maximize=False)


def test_a_refit_skipped_for_the_budget_is_said_with_its_rows_and_seconds():
    study = synthetic_study(12)
    assert not any("best/" in line for line in compute_answer(study)["statements"])
    study.set_user_attr(REFIT_SKIPPED_ATTR, {"search_rows": 800, "all_rows": 2000, "left_s": 310.0, "needs_s": 5449.0})
    answer = compute_answer(study)
    said = [line for line in answer["statements"] if line.startswith("best/")]
    assert len(said) == 1
    assert "800 training rows, not all 2000" in said[0] and "~5449 s" in said[0] and "310 s" in said[0]
    assert answer["handed_back"]["trained_on"] == "the search's sample" and answer["handed_back"]["rows"] == 800
    # A refit that ran answers for itself: nothing skipped to say.
    refit = {"search_rows": 800, "refit_rows": 2000, "search_value": 0.9, "refit_value": 0.91, "kept": "refit"}
    ran = compute_answer(study, refit=refit)
    assert not any(line.startswith("best/") for line in ran["statements"])
    assert ran["handed_back"] == {"trial": study.best_trial.number, "value": study.best_value,
                                  "trained_on": "all rows", "rows": 2000}


def test_best_dir_holding_a_single_seed_winner_that_the_defaults_match_is_said():
    study = synthetic_study(12)
    best = study.best_trial.number
    assert best != 0
    confirmation = {"results": [{"trial": best, "mean": 0.880, "std": 0.004, "seeds": [0, 1, 2],
                                 "values": [study.best_value, 0.872, 0.870]},
                                {"trial": 0, "mean": 0.886, "std": 0.003, "seeds": [0, 1, 2],
                                 "values": [0.884, 0.885, 0.889]}]}
    answer = compute_answer(study, confirmation=confirmation)
    said = [line for line in answer["statements"] if line.startswith("best/")]
    assert len(said) == 1 and f"trial #{best}" in said[0] and "not the defaults (trial #0)" in said[0]
    assert "0.8860 +- 0.0030 over 3 seeds" in said[0]


def test_the_trials_a_budget_buys_leave_out_the_calibration_and_the_reserve():
    study = synthetic_study(12, models=True)  # small trials take 100 s, large 200 s
    plan = {"budget_s": 2400.0, "reserve_s": 720.0, "calibration": {"seconds": 480.0}}
    assert search_seconds(plan) == 1200.0 and search_seconds(None) is None and search_seconds({"budget_s": None}) is None
    whole = {s["model"]: s["trials_in_budget"] for s in compute_answer(study, budget_s=2400.0)["sizes"]}
    net = {s["model"]: s["trials_in_budget"] for s in compute_answer(study, budget_s=2400.0,
                                                                     search_s=search_seconds(plan))["sizes"]}
    assert whole == {"small": 24, "large": 12} and net == {"small": 12, "large": 6}
