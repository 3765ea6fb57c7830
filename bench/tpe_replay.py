"""Why did the search propose that? lmtune-tpe's sampler decisions replayed from a search benchmark's result file.

    python -m bench tpe-replay bench/results/search-e2e-seed0-median-of-one.json
    python -m bench tpe-replay RESULT.json --contender lmtune-tpe --draws 200 --out replay.md

A search benchmark (``python -m bench search``) records every trial's parameters and every evaluation, which is
all the sampler saw: the study before trial k is the trials 0..k-1 with their evaluations (the median pruner's
intermediate values) and their states (finished when a trial reported all of its evaluations, pruned otherwise).
This rebuilds that study for each k, asks lmtune's own sampler (``lmtune.tune.study._sampler``: TPE after the
recorded start-up, seeded per trial) for trial k, and checks the answer is the recorded trial: the replay is
faithful only if every proposal matches. Then, for each k, the same history is shown to the sampler in other
ways, each asked ``--draws`` times with other seeds, and the share of proposals at the fewest epochs is printed:

* ``recorded``: the history as it ran (lmtune's TPE);
* ``pruned-as-finished``: each pruned trial shown as finished at its best evaluation (is the pruning the cause?);
* ``without-pruned``: the pruned trials hidden (are the trials TPE counts as bad the cause?);
* ``gp``: lmtune's ``--sampler gp`` (Optuna's ``GPSampler``; it reads complete trials only) on the recorded history.

It measures what the sampler would propose, not what the proposals would score: that needs a search run.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODES = ("recorded", "pruned-as-finished", "without-pruned", "gp")


class ReplayError(ValueError):
    """The result file cannot be replayed (no such contender, several seeds, not a search result)."""


@dataclass(frozen=True)
class Recorded:
    """One trial of the benchmark's run: what the sampler proposed and what it later saw of it."""

    number: int
    params: dict[str, Any]
    evaluations: tuple[float, ...]
    finished: bool


def distributions(space: dict[str, list]) -> dict[str, Any]:
    """The Optuna distributions lmtune searches for the benchmark's space, taken from lmtune's own space code."""
    from bench.search import lmtune_search_config
    from lmtune.tune.answer import quiet_study
    from lmtune.tune.space import SearchSpace, parse_dimension

    config = lmtune_search_config(space)
    dims = {name: parse_dimension(name, getattr(config, name)) for name in space}
    trial = quiet_study("minimize").ask()
    SearchSpace(dims).sample(trial)
    return dict(trial.distributions)


def load(result: dict[str, Any], contender: str) -> tuple[list[Recorded], dict[str, Any], int, int, bool]:
    """The contender's trials in order, the distributions, its TPE start-up, sampler seed, and whether it minimised."""
    if contender != "lmtune-tpe":  # lmtune-warm's first trials are queued, not sampled; the others run no TPE
        raise ReplayError(f"--contender {contender}: only lmtune-tpe's proposals come from TPE alone")
    runs = [r for r in result["runs"] if r["who"] == contender]
    if not runs:
        raise ReplayError(f"--contender {contender}: no run of it in the result (runs: "
                          f"{', '.join(sorted({r['who'] for r in result['runs']}))})")
    if len(runs) > 1:
        raise ReplayError(f"--contender {contender}: {len(runs)} runs of it (one per sampler seed); replay a "
                          "one-seed result (--seeds N --name ...)")
    run = runs[0]
    settings = result["settings"]
    dists = distributions(settings["space"])
    per_trial: dict[int, list[float]] = collections.defaultdict(list)
    for e in run["evals"]:
        per_trial[int(e["trial"])].append(float(e["value"]))
    evals_per_epoch = int(settings["evals_per_epoch"])
    trials = []
    for key in sorted(run["trials"], key=int):
        params = {name: run["trials"][key][name] for name in dists}
        evaluations = tuple(per_trial[int(key)])
        trials.append(Recorded(int(key), params, evaluations, len(evaluations) == evals_per_epoch * int(params["epochs"])))
    return trials, dists, int(run["tpe_startup_trials"]), int(run["seed"]), not settings["maximize"]


def _study(history: list[Recorded], dists: dict[str, Any], minimize: bool, mode: str):
    from optuna.trial import TrialState, create_trial

    from lmtune.tune.answer import quiet_study

    study = quiet_study("minimize" if minimize else "maximize")
    best = min if minimize else max
    for t in history:
        if not t.evaluations or (mode == "without-pruned" and not t.finished):
            continue
        finished = t.finished or mode == "pruned-as-finished"
        # Optuna's TPE ranks a finished trial by its value and a pruned one by its last reported step; lmtune's
        # objective is a trial's best evaluation, and steps are numbered from 1 (lmtune.tune.study on_evaluate).
        study.add_trial(create_trial(
            params=t.params, distributions=dists, value=best(t.evaluations) if finished else None,
            intermediate_values={i + 1: v for i, v in enumerate(t.evaluations)},
            state=TrialState.COMPLETE if finished else TrialState.PRUNED))
    return study


def propose(history: list[Recorded], dists: dict[str, Any], minimize: bool, mode: str, sampler_seed: int,
            startup: int, trial_number: int | None) -> dict[str, Any]:
    """What lmtune's sampler (TPE, or ``--sampler gp`` for mode gp; seeded for ``trial_number``) proposes after
    ``history``."""
    from lmtune.config import TuneConfig
    from lmtune.tune.study import _sampler

    study = _study(history, dists, minimize, mode)
    tc = TuneConfig(sampler="gp" if mode == "gp" else "tpe", sampler_seed=sampler_seed)
    study.sampler = _sampler(tc, startup, trial_number)
    return study.ask(dists).params


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(abs(a[k] - b[k]) <= 1e-9 * max(1.0, abs(b[k])) if isinstance(b[k], float) else a[k] == b[k] for k in b)


def replay(result: dict[str, Any], contender: str = "lmtune-tpe", draws: int = 200,
           modes: tuple[str, ...] = MODES) -> dict[str, Any]:
    """The faithfulness check and, per trial after the start-up, the share of proposals at the fewest epochs."""
    import optuna

    trials, dists, startup, seed, minimize = load(result, contender)
    fewest = dists["epochs"].low
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for k in range(startup, len(trials)):
            history = trials[:k]
            again = propose(history, dists, minimize, "recorded", seed, startup, k)
            shares, lrs = {}, {}
            for mode in modes:
                n = draws if mode != "gp" else max(1, draws // 10)  # GP's proposal hardly depends on the seed
                picks = [propose(history, dists, minimize, mode, 10_000 + i, startup, None) for i in range(n)]
                shares[mode] = sum(p["epochs"] == fewest for p in picks) / n
                lrs[mode] = statistics.median(p["learning_rate"] for p in picks)
            rows.append({"trial": k, "finished_before": sum(t.finished for t in history),
                         "pruned_before": sum(not t.finished for t in history),
                         "proposed_epochs": trials[k].params["epochs"], "replayed": _same(again, trials[k].params),
                         "share_fewest_epochs": shares, "median_learning_rate": lrs})
    return {"contender": contender, "startup": startup, "sampler_seed": seed, "fewest_epochs": fewest,
            "draws": draws, "faithful": all(r["replayed"] for r in rows), "rows": rows}


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def markdown(rep: dict[str, Any], source: str) -> str:
    modes = list(rep["rows"][0]["share_fewest_epochs"]) if rep["rows"] else []
    lines = [f"TPE replay of {rep['contender']} in {source} (start-up {rep['startup']}, sampler seed "
             f"{rep['sampler_seed']}): the replay {'reproduces every' if rep['faithful'] else 'does NOT reproduce every'}"
             f" recorded proposal.", "",
             f"Per trial and way of showing the sampler its history: the share of its proposals at "
             f"{_epochs(rep['fewest_epochs'])}, and their median learning rate; {rep['draws']} draws per cell (gp: "
             f"{max(1, rep['draws'] // 10)}):", "",
             "| trial | finished before | pruned before | proposed | replayed | " + " | ".join(modes) + " |",
             "|---:|---:|---:|---:|:--|" + "---:|" * len(modes)]
    for r in rep["rows"]:
        lines.append(f"| {r['trial']} | {r['finished_before']} | {r['pruned_before']} | {_epochs(r['proposed_epochs'])} | "
                     f"{'same' if r['replayed'] else 'DIFFERENT'} | "
                     + " | ".join(f"{r['share_fewest_epochs'][m]:.2f}, {r['median_learning_rate'][m]:.2g}"
                                  for m in modes) + " |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("result", help="a search benchmark's result JSON (one sampler seed)")
    p.add_argument("--contender", default="lmtune-tpe", help="the run to replay (only lmtune-tpe is TPE alone)")
    p.add_argument("--draws", type=int, default=200, help="proposals per trial and mode (GP: a tenth)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated, of: " + ", ".join(MODES))
    p.add_argument("--out", help="also write the table here (markdown) and the numbers beside it (.json)")


def run(args: argparse.Namespace) -> int:
    path = Path(args.result)
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"tpe-replay: {path}: {e}", file=sys.stderr)
        return 2
    modes = tuple(m for m in args.modes.split(",") if m)
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.draws < 1:
        print(f"tpe-replay: --modes {','.join(unknown)}: not one of {', '.join(MODES)}" if unknown
              else f"tpe-replay: --draws {args.draws}: must be at least 1", file=sys.stderr)
        return 2
    try:
        rep = replay(result, args.contender, args.draws, modes)
    except ReplayError as e:
        print(f"tpe-replay: {path}: {e}", file=sys.stderr)
        return 2
    except (KeyError, TypeError) as e:
        print(f"tpe-replay: {path}: not a search benchmark result (no {e})", file=sys.stderr)
        return 2
    except ValueError as e:  # Optuna: a recorded value outside the recorded space
        print(f"tpe-replay: {path}: {e}", file=sys.stderr)
        return 2
    text = markdown(rep, str(path))
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(rep, indent=1) + "\n")
    return 0 if rep["faithful"] else 1
