"""The answer to the question a study is run for: which parameters matter for this task, and what values win?

Computed once, at the end of a study, from the study's trials, the seed confirmation (``confirm.json``) and the
refit (``refit.json``); stored as ``answer.json``, which ``lmtune tune --show`` reads back (a running study has none
yet). The terminal, ``summary.md``, ``report.html`` and ``importances.json`` all show this one computation, so they
cannot disagree (they did when the terminal and the report each ran fANOVA with a different seed).

What it holds:

* **importances with an uncertainty band**: fANOVA (seeded) over bootstrap resamples of the finished trials:
  the median as the importance, the 10th..90th percentile as its band (fANOVA on all trials is kept as
  ``all_trials``). With a handful of trials the bands are wide and overlap; the statements say so rather than
  rank noise.
* **where the best trials lie**: per parameter, the range (or the choices) of the best quarter of the finished
  trials against the range searched, and every trial's (value, metric) point for a metric-vs-parameter view.
* **tuned against the defaults**: the first trial runs lmtune's documented defaults; when the seed confirmation
  re-ran it with the best trial on the same seeds, the gain is a mean with a standard deviation, paired seed by
  seed, and called beyond seed noise only when it exceeds the seeds' spread and every seed agrees; the gain on
  the confirmation seeds alone is given too, since the search seed is where the winner was picked (which
  flatters it). Where the defaults ran once, the gain is on the search seed for both sides, and said to be so.
* **per model size**: best score, confirmed mean and standard deviation where confirmed, seconds per trial.
* **statements**: what can and cannot be concluded yet, in words.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

ANSWER_FILE = "answer.json"
DEFAULT_ATTR = "lmtune_default"
FILL_ATTR = "lmtune_fill"  # a trial drawn at random because the sampler's proposals did not fit the time left
REFIT_SKIPPED_ATTR = "lmtune_refit_skipped"
"""Study attribute: the refit that was due (the search trained on a sample) but did not fit in the budget left."""
MIN_TRIALS_FOR_IMPORTANCE = 3
"""fANOVA needs a few finished trials to fit its forest at all."""
FEW_TRIALS = 10
"""Below this many finished trials the importance ranking is called indicative only."""
BEST_SHARE = 0.25
"""The share of finished trials whose parameter values make 'the range where the best trials lie'."""


def search_seconds(plan: dict[str, Any] | None) -> float | None:
    """The seconds of a study's --budget that trials get, from its ``plan.json``: the budget less the plan's
    calibration (spent before the first trial) and what is kept back for confirmation and refit."""
    if not isinstance(plan, dict) or not _finite(plan.get("budget_s")):
        return None
    calibration = plan.get("calibration") if isinstance(plan.get("calibration"), dict) else {}
    spent = sum(float(v) for v in (plan.get("reserve_s"), calibration.get("seconds")) if _finite(v))
    return round(max(0.0, float(plan["budget_s"]) - spent), 1)


def compute_answer(study: optuna.Study, *, confirmation: dict[str, Any] | None = None,
                   refit: dict[str, Any] | None = None, budget_s: float | None = None,
                   search_s: float | None = None, n_bootstrap: int = 30, seed: int = 0) -> dict[str, Any]:
    """Everything the answer shows, as plain JSON-ready values (see the module docstring). ``budget_s``: the study's
    --budget; ``search_s``: the part of it trials get (``search_seconds``), to say how many trials of each size it
    buys (the whole budget where not known)."""
    metric = study.user_attrs.get("metric", "value")
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if _finite(t.value)]
    pruned = study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
    searched = _searched_parameters(done)
    answer: dict[str, Any] = {
        "metric": metric, "direction": "maximize" if maximize else "minimize",
        "trials": {"complete": len(done), "pruned": len(pruned)},
        "importances": importance_bands(study.direction, done, searched, n_bootstrap=n_bootstrap, seed=seed),
        "parameters": {name: _parameter_view(name, done, maximize) for name in searched},
        "defaults_vs_tuned": _defaults_vs_tuned(study, done, confirmation, maximize),
        "sizes": _sizes(study, done, confirmation, maximize, search_s if search_s is not None else budget_s),
        "budget_s": budget_s,
        "search_s": search_s,
        "refit": _refit_view(refit),
        "handed_back": _handed_back(study, done, maximize, refit),
    }
    answer["statements"] = statements(answer)
    return answer


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _searched_parameters(done: list[optuna.trial.FrozenTrial]) -> list[str]:
    """Parameters that took more than one value among the finished trials (a fixed one answers nothing)."""
    names = sorted({k for t in done for k in t.params})
    return [n for n in names if len({repr(t.params[n]) for t in done if n in t.params}) > 1]


def quiet_study(direction) -> optuna.Study:
    """An in-memory study, without Optuna's "A new study created in memory" line (one per bootstrap resample)."""
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return optuna.create_study(direction=direction)
    finally:
        optuna.logging.set_verbosity(verbosity)


def _importances(direction, trials: list[optuna.trial.FrozenTrial], names: list[str], seed: int) -> dict[str, float]:
    study = quiet_study(direction)
    study.add_trials(trials)
    params = [n for n in names if all(n in t.params for t in trials) and len({repr(t.params[n]) for t in trials}) > 1]
    if not params:
        return {}
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
    return {k: float(v) for k, v in optuna.importance.get_param_importances(study, evaluator=evaluator, params=params).items()}


def gain_words(gain: float, metric: str, direction: str | None) -> str:
    """What tuning changed, in the metric's own sense (``gain`` > 0 is better in either direction)."""
    if direction == "minimize":
        return f"lowered {metric} by {gain:.4f}" if gain >= 0 else f"raised {metric} by {-gain:.4f}"
    return f"bought {gain:+.4f} {metric}"


def default_trial_line(default_number: int, default_value: float, best_number: int, best_value: float, metric: str,
                       maximize: bool) -> str:
    """One line on the default configuration's trial against the best trial (terminal, summary.md, report).

    When the defaults are the best trial there is no gap to state: "+0.0000 better" read as if tuning had found
    something equal, where it found nothing better."""
    head = f"default configuration (trial #{default_number}): {metric} {default_value:.4f}"
    if default_number == best_number:
        return f"{head}; it is the best trial: the search found nothing better"
    gain = (best_value - default_value) * (1 if maximize else -1)
    return (f"{head}; the best trial (#{best_number}) is {gain:+.4f} {'better' if gain >= 0 else 'worse'} "
            "(one seed each: a gap within seed noise is not a gain; see the seed confirmation)")


def defaults_spread(d: dict[str, Any]) -> str:
    """The defaults' value over their confirmation seeds, or "one seed" where they were not confirmed."""
    if d.get("default_mean") is None:
        return "one seed"
    return f"{d['default_mean']:.4f} +- {d['default_std']:.4f} over {len(d.get('seeds') or [])} seeds"


def importance_bands(direction, done: list[optuna.trial.FrozenTrial], names: list[str], *, n_bootstrap: int = 30,
                     seed: int = 0) -> list[dict[str, Any]]:
    """fANOVA importance of each parameter over bootstrap resamples of the finished trials: the median is the
    importance and the 10th..90th percentile its band; ranked by the median. Empty below
    MIN_TRIALS_FOR_IMPORTANCE finished trials.

    Why the median and not fANOVA on all trials: with ten-odd trials a resample's repeated trials shift
    fANOVA's shares, so the all-trials value can lie outside its own band (E2E's learning rate read 0.46 with a
    band of 0.14..0.45). The median is inside its band by construction; ``all_trials`` keeps the other value.

    A parameter only some trials have (LoRA rank: only LoRA trials) is scored on resamples where every trial has
    it; a resample where it took one value gives it importance 0 (it explained nothing there)."""
    if len(done) < MIN_TRIALS_FOR_IMPORTANCE or not names:
        return []
    try:
        point = _importances(direction, done, names, seed)
    except Exception:  # e.g. every trial has the same value: nothing to attribute
        return []
    rng = random.Random(seed)
    samples: dict[str, list[float]] = {n: [] for n in point}
    for b in range(n_bootstrap):
        resample = [done[rng.randrange(len(done))] for _ in done]
        try:
            values = _importances(direction, resample, list(point), seed + 1 + b)
        except Exception:
            continue
        for n in point:
            if all(n in t.params for t in resample):
                samples[n].append(values.get(n, 0.0))
    out = []
    for name, value in point.items():
        s = sorted(samples[name])
        out.append({"parameter": name, "importance": round(_quantile(s, 0.5) if s else value, 4),
                    "low": round(_quantile(s, 0.1), 4) if s else None,
                    "high": round(_quantile(s, 0.9), 4) if s else None, "resamples": len(s),
                    "all_trials": round(value, 4)})
    return sorted(out, key=lambda b: -b["importance"])


def _quantile(sorted_values: list[float], q: float) -> float:
    if len(sorted_values) == 1:
        return sorted_values[0]
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _best_trials(done: list[optuna.trial.FrozenTrial], maximize: bool) -> list[optuna.trial.FrozenTrial]:
    """The best quarter (3 at least), with every trial tied with the last one in: which of two equal trials sorts
    first is an accident of trial order (AG News: trials 0 and 1 both 0.8967, and keeping one or the other
    changed the best batch sizes shown)."""
    ranked = sorted(done, key=lambda t: t.value, reverse=maximize)
    k = max(min(3, len(ranked)), math.ceil(BEST_SHARE * len(ranked)))
    while 0 < k < len(ranked) and ranked[k].value == ranked[k - 1].value:
        k += 1
    return ranked[:k]


def _parameter_view(name: str, done: list[optuna.trial.FrozenTrial], maximize: bool) -> dict[str, Any]:
    """Where the best trials lie for one parameter, against what was searched, and every (value, metric) point."""
    having = [t for t in done if name in t.params]
    best = _best_trials(having, maximize)
    dist = having[0].distributions.get(name) if having else None
    points = [[t.params[name], t.value, t.number] for t in sorted(having, key=lambda t: t.number)]
    if isinstance(dist, CategoricalDistribution) or not all(isinstance(t.params[name], (int, float)) for t in having):
        counts = {repr(c): 0 for c in (dist.choices if isinstance(dist, CategoricalDistribution) else [])}
        for t in best:
            counts[repr(t.params[name])] = counts.get(repr(t.params[name]), 0) + 1
        choices = list(dist.choices) if isinstance(dist, CategoricalDistribution) else sorted({t.params[name] for t in having}, key=repr)
        return {"kind": "choice", "searched": choices, "best_trials": len(best),
                "best_counts": {str(c): counts.get(repr(c), 0) for c in choices}, "points": points}
    values = [t.params[name] for t in best]
    low = getattr(dist, "low", min(t.params[name] for t in having))
    high = getattr(dist, "high", max(t.params[name] for t in having))
    return {"kind": "range", "log": bool(getattr(dist, "log", False)), "searched": [low, high], "best_trials": len(best),
            "best_range": [min(values), max(values)], "points": points}


def _confirmed(confirmation: dict[str, Any] | None) -> dict[int, dict[str, Any]]:
    out = {}
    for r in (confirmation or {}).get("results") or []:
        if isinstance(r, dict) and isinstance(r.get("trial"), int) and _finite(r.get("mean")):
            out[r["trial"]] = r
    return out


def _defaults_vs_tuned(study, done, confirmation, maximize: bool) -> dict[str, Any] | None:
    default = next((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get(DEFAULT_ATTR)), None)
    if default is None or not done:
        return None
    confirmed = _confirmed(confirmation)
    sign = 1.0 if maximize else -1.0
    best_single = max(done, key=lambda t: sign * t.value)
    # The tuned side is the searched configuration the confirmation found best on average, where one ran (the
    # defaults themselves may have the best mean: then tuning bought nothing, which is the answer).
    others = [r for n, r in confirmed.items() if n != default.number]
    tuned = max(others, key=lambda r: sign * r["mean"]) if others else None
    base = confirmed.get(default.number)
    view: dict[str, Any] = {"default_trial": default.number, "default_state": default.state.name,
                            "default_value": default.value if _finite(default.value) else None}
    # The defaults' mean can beat every confirmed searched trial (an E2E study over two sizes confirmed the best
    # trial of each: the defaults and a worse, larger model). Then the defaults are the answer, "tuning bought
    # nothing", with the runner-up named beside them, not a loss "beyond seed noise" measured against it.
    if tuned and base and sign * base["mean"] >= sign * tuned["mean"]:
        return view | {"tuned_trial": default.number, "tuned_value": base["mean"], "gain": 0.0, "defaults_best": True,
                       "default_mean": base["mean"], "default_std": base["std"], "seeds": base.get("seeds"),
                       "runner_up": {k: tuned.get(k) for k in ("trial", "mean", "std", "seeds")}}
    tuned_trial = tuned["trial"] if tuned else best_single.number
    view |= {"tuned_trial": tuned_trial, "tuned_value": tuned["mean"] if tuned else best_single.value}
    if default.state == TrialState.FAIL:
        view["default_reason"] = default.user_attrs.get("fail_reason")
    if tuned and base and tuned_trial != default.number:
        same_seeds = list(tuned.get("seeds") or []) == list(base.get("seeds") or [])
        gain = sign * (tuned["mean"] - base["mean"])
        noise = math.sqrt(tuned["std"] ** 2 + base["std"] ** 2)
        seed_gains = _seed_gains(tuned, base, sign)
        # The search seed is where the winner was picked among many trials, so its gain there is flattered; the
        # confirmation seeds are fresh draws for both sides.
        search_seed = (tuned.get("seeds") or [None])[0]
        fresh = [g for seed, g in seed_gains if seed != search_seed]
        verdict = verdict_of(gain, noise, seed_gains)
        view |= {"seeds": tuned.get("seeds"), "same_seeds": same_seeds,
                 "default_mean": base["mean"], "default_std": base["std"], "tuned_mean": tuned["mean"],
                 "tuned_std": tuned["std"], "gain": gain, "noise": noise, "seed_gains": seed_gains,
                 "search_seed": search_seed, "fresh_seed_gain": statistics.fmean(fresh) if fresh else None,
                 "verdict": verdict, "within_noise": verdict != "beyond"}
    elif view["default_value"] is not None:
        # One run of the defaults, on the search seed: the gain is measured on that seed for both sides (the tuned
        # trial's own search-seed value, not its confirmed mean, which would set three seeds against one).
        tuned_single = next((t for t in done if t.number == view["tuned_trial"]), best_single)
        view |= {"gain": sign * (tuned_single.value - view["default_value"]), "seeds": None, "within_noise": None,
                 "tuned_search_value": tuned_single.value}
        if tuned:
            view |= {"tuned_mean": tuned["mean"], "tuned_std": tuned["std"], "tuned_seeds": tuned.get("seeds")}
    # No searched trial beat the defaults: the answer is "tuning bought nothing", with the defaults' own seed
    # spread where they were confirmed, not "seed noise not measured".
    view["defaults_best"] = tuned is None and best_single.number == default.number
    if view["defaults_best"] and base:
        view |= {"default_mean": base["mean"], "default_std": base["std"], "seeds": base.get("seeds")}
    return view


def verdict_name(d: dict[str, Any]) -> str:
    """The verdict of a defaults-against-tuned view (answers stored before the verdict existed carry only
    ``within_noise``)."""
    return d.get("verdict") or ("within" if d.get("within_noise") else "beyond")


def _seed_gains(tuned: dict[str, Any], base: dict[str, Any], sign: float) -> list[list[float]]:
    """[seed, tuned minus defaults in the metric's good direction] for every seed both ran to a finite value."""
    base_by_seed = dict(zip(base.get("seeds") or [], base.get("values") or []))
    out = []
    for seed, value in zip(tuned.get("seeds") or [], tuned.get("values") or []):
        other = base_by_seed.get(seed)
        if _finite(value) and _finite(other):
            out.append([seed, sign * (value - other)])
    return out


def verdict_of(gain: float, noise: float, seed_gains: list[list[float]]) -> str:
    """``within``: the mean gain is no larger than the seeds' spread; ``beyond``: it is larger and every seed
    agrees on its sign; ``mixed``: larger on average, but some seed disagrees (SST-2: +0.037, +0.013, -0.003 is an
    average of +0.016 against a noise of 0.014, and the defaults won on one of three seeds: not a finding)."""
    if abs(gain) <= noise:
        return "within"
    # Without paired seeds (values not recorded) only the means can speak.
    return "beyond" if all(g * gain > 0 for _, g in seed_gains) else "mixed"


def _signed(values: list[list[float]]) -> str:
    return ", ".join(f"seed {int(seed)} {g:+.4f}" for seed, g in values)


def _sizes(study, done, confirmation, maximize: bool, budget_s: float | None = None) -> list[dict[str, Any]]:
    """Per model: trials, best single-seed value, its confirmed mean +- std where confirmed, seconds per trial, and
    how many trials of it the budget buys."""
    fixed = _fixed_model(study)
    groups: dict[str, list[optuna.trial.FrozenTrial]] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        groups.setdefault(str(t.params.get("model", fixed)), []).append(t)
    confirmed = _confirmed(confirmation)
    sign = 1.0 if maximize else -1.0
    out = []
    for model, trials in groups.items():
        complete = [t for t in trials if t.state == TrialState.COMPLETE and _finite(t.value)]
        seconds = [t.user_attrs["seconds"] for t in complete if _finite(t.user_attrs.get("seconds"))]
        best = max(complete, key=lambda t: sign * t.value) if complete else None
        conf = [confirmed[t.number] for t in complete if t.number in confirmed]
        best_conf = max(conf, key=lambda r: sign * r["mean"]) if conf else None
        out.append({"model": model, "complete": len(complete), "pruned": len(trials) - len(complete),
                    "best_trial": best.number if best else None, "best_value": best.value if best else None,
                    "confirmed_trial": best_conf["trial"] if best_conf else None,
                    "confirmed_mean": best_conf["mean"] if best_conf else None,
                    "confirmed_std": best_conf["std"] if best_conf else None,
                    "seconds_per_trial": statistics.median(seconds) if seconds else None,
                    "trials_in_budget": (int(budget_s // statistics.median(seconds))
                                         if budget_s and seconds and statistics.median(seconds) > 0 else None)})
    out.sort(key=lambda r: (r["best_value"] is None, -sign * (r["best_value"] or 0.0)))
    return out


def _fixed_model(study) -> str:
    space = study.user_attrs.get("space") or {}
    value = space.get("model") if isinstance(space, dict) else None
    return str(value) if value else "model"


def _refit_view(refit: dict[str, Any] | None) -> dict[str, Any] | None:
    if not isinstance(refit, dict):
        return None
    keys = ("search_rows", "refit_rows", "search_value", "refit_value", "kept")
    return {k: refit.get(k) for k in keys}


def _handed_back(study, done, maximize: bool, refit: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``best/`` holds: the trial, and whether it was trained on every training row."""
    if not done:
        return None
    sign = 1.0 if maximize else -1.0
    best = max(done, key=lambda t: sign * t.value)
    view: dict[str, Any] = {"trial": best.number, "value": best.value}
    if isinstance(refit, dict):
        view |= {"trained_on": "all rows" if refit.get("kept") == "refit" else "the search's sample",
                 "rows": refit.get("refit_rows") if refit.get("kept") == "refit" else refit.get("search_rows")}
    skipped = study.user_attrs.get(REFIT_SKIPPED_ATTR)
    if isinstance(skipped, dict) and refit is None:
        view |= {"trained_on": "the search's sample", "rows": skipped.get("search_rows"), "refit_skipped": skipped}
    return view


def _handed_back_statements(answer: dict[str, Any]) -> list[str]:
    """Where best/ is not what a reader would assume (the winner, trained on every row), say so and why."""
    h = answer.get("handed_back") or {}
    out = []
    skipped = h.get("refit_skipped")
    if skipped:
        out.append(f"best/ (trial #{h['trial']}) was trained on the search's {skipped.get('search_rows')} training rows, "
                   f"not all {skipped.get('all_rows')}: the refit on every row needs ~{skipped.get('needs_s', 0):.0f} s "
                   f"and {skipped.get('left_s', 0):.0f} s of the budget were left. For a model trained on every row, "
                   "run `lmtune train` with the best parameters on the whole file, or give a larger --budget.")
    d = answer.get("defaults_vs_tuned") or {}
    if d.get("defaults_best") and h and h.get("trial") != d.get("default_trial"):
        out.append(f"best/ holds trial #{h['trial']}, the best single-seed value ({h['value']:.4f}), not the defaults "
                   f"(trial #{d['default_trial']}), which did as well or better over the confirmation seeds "
                   f"({defaults_spread(d)}); `lmtune train` at the defaults makes their model.")
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def statements(answer: dict[str, Any]) -> list[str]:
    """What can and cannot be concluded yet, in plain words."""
    out: list[str] = []
    n = answer["trials"]["complete"]
    metric = answer["metric"]
    bands = answer["importances"]
    if n < MIN_TRIALS_FOR_IMPORTANCE:
        out.append(f"Only {n} finished trial(s): too few to say which parameters matter; give the search more "
                   "time (--budget) or trials.")
    elif bands:
        top = bands[0]
        if n < FEW_TRIALS:
            out.append(f"{n} finished trials: the importances are indicative only; their bands are wide.")
        if len(bands) > 1 and top["low"] is not None and bands[1]["high"] is not None and top["low"] < bands[1]["high"]:
            out.append(f"Which matters more, {top['parameter']} or {bands[1]['parameter']}, is not settled: their "
                       f"bootstrap bands overlap ({top['low']:.2f}..{top['high']:.2f} vs "
                       f"{bands[1]['low']:.2f}..{bands[1]['high']:.2f}).")
        elif top["low"] is not None:
            out.append(f"{top['parameter']} matters most (importance {top['importance']:.2f}, band "
                       f"{top['low']:.2f}..{top['high']:.2f}).")
        for b in bands:
            if b["high"] is not None and b["high"] < 0.05:
                out.append(f"{b['parameter']}: no sign that it matters here (importance below 0.05 in 9 of 10 resamples).")
    for name, view in answer["parameters"].items():
        if view["kind"] == "range":
            lo, hi = view["best_range"]
            slo, shi = view["searched"]
            if n < MIN_TRIALS_FOR_IMPORTANCE or not slo < shi:
                continue
            if lo <= slo and hi >= shi:
                out.append(f"{name}: the best trials span the whole searched range ({_fmt(slo)}..{_fmt(shi)}): "
                           "no narrower range is indicated.")
            elif lo <= slo or hi >= shi:
                out.append(f"{name}: the best trials reach the edge of the searched range ({_fmt(slo)}..{_fmt(shi)}); "
                           "the best value may lie outside it.")
    d = answer.get("defaults_vs_tuned")
    if d and d.get("within_noise") is not None and "default_mean" in d:
        out.append(_defaults_statement(d, metric, answer.get("direction")))
    elif d and d.get("defaults_best"):
        r = d.get("runner_up")
        beside = (f"; the best searched configuration confirmed, trial #{r['trial']}: {r['mean']:.4f} +- {r['std']:.4f}"
                  if r else "")
        out.append(f"The defaults were the best configuration of the {answer['trials']['complete']} finished trials"
                   f" ({defaults_spread(d)}{beside}): tuning bought nothing here.")
    elif d and d.get("default_state") == "FAIL":
        out.append(f"The defaults (trial #{d['default_trial']}) did not run ({d.get('default_reason') or 'failed'}): "
                   "what tuning bought over them is not measured.")
    elif d and d.get("gain") is not None:
        tuned = (f" (the tuned trial's mean over {len(d['tuned_seeds'])} seeds is {d['tuned_mean']:.4f} +- "
                 f"{d['tuned_std']:.4f}; the defaults ran once)" if d.get("tuned_mean") is not None else "")
        out.append(f"Tuning {gain_words(d['gain'], metric, answer.get('direction'))} over the defaults on the search "
                   f"seed, one run each{tuned}: seed noise not measured on the defaults, so this gain is not yet a "
                   "conclusion.")
    sizes = [s for s in answer["sizes"] if s["best_value"] is not None]
    if len(sizes) > 1:
        out.append(_size_verdict(sizes, metric, answer.get("budget_s"), answer.get("direction") != "minimize"))
    if not any(s.get("confirmed_mean") is not None for s in answer["sizes"]):
        out.append("No seed confirmation ran: every value is one seed, and seed noise is unmeasured.")
    return out + _handed_back_statements(answer)


def _defaults_statement(d: dict[str, Any], metric: str, direction: str | None) -> str:
    """Tuned against the defaults on the same seeds: the mean gain, the verdict, the gain per seed and on the fresh
    seeds alone."""
    head = (f"Tuning {gain_words(d['gain'], metric, direction)} over the defaults on the same seeds "
            f"({d['tuned_mean']:.4f} +- {d['tuned_std']:.4f} vs {d['default_mean']:.4f} +- {d['default_std']:.4f}, "
            f"seed noise {d['noise']:.4f})")
    verdict = verdict_name(d)
    seeds = d.get("seed_gains") or []
    if verdict == "within":
        text = f"{head}: within seed noise."
    elif verdict == "beyond":
        text = (f"{head}: beyond seed noise, on every seed ({_signed(seeds)}; tuned minus defaults, + is better)."
                if seeds else f"{head}: beyond seed noise.")
    else:
        against = [int(seed) for seed, g in seeds if g * d["gain"] <= 0]
        text = (f"{head}: not settled: larger than the seed noise on average, but seed{'s' if len(against) > 1 else ''} "
                f"{', '.join(map(str, against))} went the other way ({_signed(seeds)}; tuned minus defaults, + is better).")
    if d.get("fresh_seed_gain") is not None and any(seed == d.get("search_seed") for seed, _ in seeds):
        text += (f" On the confirmation seeds alone, without the search seed the winner was picked on (which "
                 f"flatters it): {d['fresh_seed_gain']:+.4f}.")
    return text


def _size_verdict(sizes: list[dict[str, Any]], metric: str, budget_s: float | None, maximize: bool = True) -> str:
    """Which size wins: on confirmed means where both were confirmed, else on the search seed's best of each (and
    said so; a confirmed mean is never set against another size's single seed); when the two are within seed
    noise, the cheaper one wins, since the budget buys more trials of it."""
    confirmed = all(s.get("confirmed_mean") is not None for s in sizes[:2])

    def score(s: dict[str, Any]) -> float:
        return s["confirmed_mean"] if confirmed else s["best_value"]

    sign = 1.0 if maximize else -1.0
    first, second = sorted(sizes[:2], key=lambda s: -sign * score(s))
    noise = math.sqrt((first.get("confirmed_std") or 0.0) ** 2 + (second.get("confirmed_std") or 0.0) ** 2)
    gap = abs(score(first) - score(second))
    cost = ""
    if budget_s:
        cost = " For this budget: " + ", ".join(f"{s['model']} ~{s['trials_in_budget']} trials"
                                                for s in sizes if s.get("trials_in_budget") is not None) + "."
    if confirmed and gap <= noise:
        cheaper = min((first, second), key=lambda s: s["seconds_per_trial"] or math.inf)
        return (f"{first['model']} and {second['model']} are within seed noise of each other ({gap:.4f} apart, "
                f"noise {noise:.4f}): {cheaper['model']} wins for the time, at {cheaper['seconds_per_trial'] or 0:.0f} "
                f"s per trial.{cost}")
    if not confirmed and gap == 0:
        return (f"{first['model']} and {second['model']} tie on the search seed ({score(first):.4f} each; one seed "
                f"each, so this is not yet a conclusion).{cost}")
    basis = "confirmed means" if confirmed else "the search seed, one run each, so this is not yet a conclusion"
    return (f"{first['model']} gave the best {metric} ({score(first):.4f} vs {score(second):.4f} for "
            f"{second['model']}; {basis}).{cost}")


def answer_lines(answer: dict[str, Any]) -> list[str]:
    """The answer as text lines, for the terminal and summary.md."""
    metric = answer["metric"]
    lines = [f"What matters for this task ({answer['trials']['complete']} finished trials, {metric}, "
             f"{answer['direction']}):"]
    for b in answer["importances"]:
        band = f" (band {b['low']:.2f}..{b['high']:.2f})" if b["low"] is not None else ""
        view = answer["parameters"].get(b["parameter"], {})
        lines.append(f"  {b['parameter']:<18} importance {b['importance']:.2f}{band}; {_where(view)}")
    for name, view in answer["parameters"].items():
        if name not in {b["parameter"] for b in answer["importances"]}:
            lines.append(f"  {name:<18} {_where(view)}")
    for s in answer["sizes"]:
        if s["best_value"] is None:
            continue
        conf = (f", confirmed {s['confirmed_mean']:.4f} +- {s['confirmed_std']:.4f}"
                if s["confirmed_mean"] is not None else "")
        secs = f", {s['seconds_per_trial']:.0f} s/trial" if s["seconds_per_trial"] else ""
        if s.get("trials_in_budget") is not None:
            secs += f" (~{s['trials_in_budget']} in the budget)"
        lines.append(f"  size {s['model']}: best {s['best_value']:.4f} (trial {s['best_trial']}){conf}{secs}")
    lines += [f"  - {s}" for s in answer["statements"]]
    return lines


def _where(view: dict[str, Any]) -> str:
    if not view:
        return ""
    if view["kind"] == "range":
        lo, hi = view["best_range"]
        return (f"best {view['best_trials']} trials at {_fmt(lo)}..{_fmt(hi)} "
                f"(searched {_fmt(view['searched'][0])}..{_fmt(view['searched'][1])})")
    counts = ", ".join(f"{k}: {v}" for k, v in view["best_counts"].items())
    return f"best {view['best_trials']} trials: {counts}"
