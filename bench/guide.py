"""docs/key-parameters.md, written from our own studies (issue 11, point 4).

    python -m bench guide                 # rewrite docs/key-parameters.md from bench/results/*/guide.json
    python -m bench guide --check         # exit 1 when the page differs from what the studies say
    python -m bench guide --recompute     # first recompute each study's answer.json from its raw trials

Every number on the page is read from a study folder under ``bench/results`` that holds ``guide.json`` (what the
study is: data set, task, models, rows, the commands that made it, notes), the study's own ``answer.json`` (the
one computation ``lmtune tune`` ends with: importances with bootstrap bands, where the best trials lie, defaults
against tuned on the same seeds, per-size results, plain statements) and ``confirm.json``. Nothing on the page is
typed by hand except the text around the numbers; ``--check`` (run by the tests) fails when a study changed and
the page was not rewritten.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT

PAGE = ROOT / "docs" / "key-parameters.md"
# The data sets the guide must cover (issue 11); those without a study are named as missing on the page.
WANTED = ("SST-2", "TREC", "AG News", "E2E")


def load_studies(results: Path = RESULTS) -> list[dict[str, Any]]:
    studies = []
    for meta in sorted(results.glob("*/guide.json")):
        folder = meta.parent
        s = json.loads(meta.read_text())
        s["folder"] = folder.name
        s["answer"] = json.loads((folder / "answer.json").read_text())
        conf = folder / "confirm.json"
        s["confirm"] = json.loads(conf.read_text()) if conf.is_file() else None
        studies.append(s)
    return sorted(studies, key=lambda s: (WANTED.index(s["data"]) if s["data"] in WANTED else len(WANTED), s["folder"]))


def _num(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e-2 or abs(x) >= 1e4 else f"{x:.4g}"
    return str(x)


def _span(v: dict[str, Any]) -> str:
    if v["kind"] == "range":
        lo, hi = v["searched"]
        return f"{_num(lo)}..{_num(hi)}" + (" (log)" if v.get("log") else "")
    return ", ".join(_num(x) for x in v["searched"])


def _best(v: dict[str, Any]) -> str:
    if v["kind"] == "range" and v.get("best_range"):
        lo, hi = v["best_range"]
        return f"{_num(lo)}..{_num(hi)}"
    counts = v.get("best_counts") or {}
    return ", ".join(f"{k} x{n}" for k, n in counts.items() if n) or "-"


def _fmt_value(x: float | None, metric: str) -> str:
    if x is None:
        return "-"
    return f"{x:.4f}" if metric in ("accuracy", "macro_f1", "val_loss", "perplexity") else f"{x:.2f}"


def _gain(gain: float, answer: dict[str, Any]) -> str:
    """The gain in the metric's own sense, worded as lmtune tune words it."""
    from lmtune.tune.answer import gain_words

    return gain_words(gain, answer["metric"], answer.get("direction"))


VERDICT_WORDS = {"within": "within seed noise", "beyond": "beyond seed noise, on every seed",
                 "mixed": "not settled, the seeds disagree"}


def _verdict_words(d: dict[str, Any]) -> str:
    """The answer's verdict on tuned against the defaults, in the page's words."""
    from lmtune.tune.answer import verdict_name

    return VERDICT_WORDS[verdict_name(d)]


def settled_rank(b: dict[str, Any], bands: list[dict[str, Any]]) -> int:
    """1 + the number of parameters whose band lies wholly above this one's: parameters whose bands overlap
    share a rank, since the order of their medians is within the bootstrap's spread."""
    if b.get("high") is None:
        return bands.index(b) + 1
    return 1 + sum(1 for x in bands if x is not b and x.get("low") is not None and x["low"] > b["high"])


def study_section(s: dict[str, Any]) -> list[str]:
    a = s["answer"]
    metric = a["metric"]
    t = a["trials"]
    lines = [f"### {s['data']}: {s['title']}", "",
             f"{s['rows']} training rows, {s.get('val_rows', '?')} validation rows; {', '.join(s['models'])}; "
             f"metric `{metric}` ({a['direction']}); {t.get('complete', 0)} complete and {t.get('pruned', 0)} pruned "
             f"trials; sampler {s.get('sampler', 'tpe')}. Raw study: [bench/results/{s['folder']}](../bench/results/{s['folder']}/).",
             "", "```sh"] + s["commands"] + ["```", ""]
    lines += ["| parameter | importance (10..90 % over bootstrap resamples) | searched | best quarter of trials |",
              "|---|---|---|---|"]
    params = a["parameters"]
    ranked = [b["parameter"] for b in a["importances"]]
    for b in a["importances"]:
        v = params.get(b["parameter"])
        lines.append(f"| {b['parameter']} | {b['importance']:.2f} ({b['low']:.2f}..{b['high']:.2f}) | "
                     f"{_span(v) if v else '-'} | {_best(v) if v else '-'} |")
    for name, v in params.items():
        if name not in ranked:
            lines.append(f"| {name} | not ranked | {_span(v)} | {_best(v)} |")
    d = a.get("defaults_vs_tuned") or {}
    if d.get("default_mean") is not None and d.get("tuned_mean") is not None and d.get("noise") is not None:
        per_seed = "; per seed (tuned minus defaults, + is better): " + ", ".join(
            f"{g:+.4f}" for _, g in d["seed_gains"]) if d.get("seed_gains") else ""
        fresh = (f"; on the confirmation seeds alone {d['fresh_seed_gain']:+.4f}"
                 if d.get("fresh_seed_gain") is not None else "")
        lines += ["", f"Defaults against tuned, same seeds {d.get('seeds')}: defaults {_fmt_value(d['default_mean'], metric)} "
                      f"+- {_fmt_value(d.get('default_std'), metric)}, tuned (trial {d.get('tuned_trial')}) "
                      f"{_fmt_value(d['tuned_mean'], metric)} +- {_fmt_value(d.get('tuned_std'), metric)}: "
                      f"{_gain(d['gain'], a)}, seed noise {d['noise']:.4g}{per_seed}{fresh}: **{_verdict_words(d)}**."]
    if len(a.get("sizes") or []) > 1:
        lines += ["", "| model | complete | best | confirmed mean +- std | s per trial |", "|---|---|---|---|---|"]
        for z in a["sizes"]:
            confirmed = ("not confirmed" if z.get("confirmed_mean") is None else
                         f"{_fmt_value(z['confirmed_mean'], metric)} +- {_fmt_value(z.get('confirmed_std'), metric)}")
            seconds = z.get("seconds_per_trial")
            lines.append(f"| {z['model']} | {z['complete']} | {_fmt_value(z.get('best_value'), metric)} | {confirmed} | "
                         f"{'-' if seconds is None else round(seconds)} |")
    lines += ["", "What the study says (its `answer.json` statements, as `lmtune tune --show` prints them):", ""]
    lines += [f"- {x}" for x in a["statements"]]
    lines += [f"- {x}" for x in s.get("notes", [])]
    return lines + [""]


def across(studies: list[dict[str, Any]]) -> list[str]:
    """One row per parameter: its rank and importance band in every study."""
    names: list[str] = []
    for s in studies:
        names += [b["parameter"] for b in s["answer"]["importances"] if b["parameter"] not in names]
    head = "| parameter | " + " | ".join(f"{s['data']} ({s['folder']})" for s in studies) + " |"
    lines = [head, "|---|" + "---|" * len(studies)]
    for n in names:
        cells = []
        for s in studies:
            imps = s["answer"]["importances"]
            b = next((x for x in imps if x["parameter"] == n), None)
            cells.append(f"#{settled_rank(b, imps)}: {b['importance']:.2f} ({b['low']:.2f}..{b['high']:.2f})" if b else "not searched")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    from lmtune.tune.answer import defaults_spread

    gains = []
    for s in studies:
        d = s["answer"].get("defaults_vs_tuned") or {}
        if d.get("defaults_best"):  # no searched trial beat them: nothing was bought
            gains.append(f"{s['data']}: nothing, the defaults were the best trial ({defaults_spread(d)})")
        elif d.get("gain") is not None and d.get("noise") is not None:
            gains.append(f"{s['data']}: {_gain(d['gain'], s['answer'])} (seed noise {d['noise']:.4g}: "
                         f"{_verdict_words(d)})")
        elif d.get("gain") is not None:  # the budget left no room to run the defaults on the confirmation seeds
            gains.append(f"{s['data']}: {_gain(d['gain'], s['answer'])} against the defaults on the search seed, "
                         "one run each (the defaults were not confirmed: seed noise not measured, so not a conclusion)")
    return lines + ["", "Tuning against the documented defaults, on the same seeds: "
                    + ("; ".join(gains) or "not measured") + "."]


def _trial_span(studies: list[dict[str, Any]]) -> str:
    counts = sorted(s["answer"]["trials"].get("complete", 0) for s in studies) or [0]
    return f"{counts[0]}" if counts[0] == counts[-1] else f"{counts[0]} to {counts[-1]}"


def render(studies: list[dict[str, Any]]) -> str:
    covered = {s["data"] for s in studies}
    missing = [d for d in WANTED if d not in covered]
    lines = ["# Which parameters matter for my task? lmtune's own measurements", "",
             "<!-- Written by `python -m bench guide` from bench/results/*/guide.json and each study's answer.json; "
             "edit bench/guide.py, not this page. -->", "",
             "Our users are told \"fine-tune a GPT model for this task and tune it\" and ask which of model size, learning "
             "rate, batch size, epochs, warmup and weight decay to spend their search on, and over which values. This page "
             "answers with `lmtune tune` studies we ran on real data sets on a 2-core CPU: the same computation every study "
             "ends with (`answer.json`: fANOVA importances over 30 bootstrap resamples of the finished trials, the "
             "median with its 10..90 % band, where the best quarter of trials lies, the tuned best against the "
             "documented defaults on the same seeds), "
             "shown here per study and side by side. Read the bands before the numbers: a study of "
             f"{_trial_span(studies)} finished trials ranks parameters only roughly, and the studies say so themselves. "
             "A rank is 1 + the number of parameters whose band lies wholly above the parameter's own, so parameters "
             "whose bands overlap share a rank.", ""]
    coverage = [f"Studies so far: {', '.join(sorted(covered, key=lambda d: WANTED.index(d) if d in WANTED else 9))}."
                if studies else "No study yet."]
    if missing:
        coverage.append(f"Not yet studied: {', '.join(missing)}; until they are, nothing here generalises to them.")
    lines += ["**Coverage.** " + " ".join(coverage), ""]
    if len(studies) > 1:
        lines += ["## Side by side", "", "Rank and importance (band) of each parameter in each study:", ""] + across(studies) + [""]
    lines += ["## The studies", ""]
    for s in studies:
        lines += study_section(s)
    lines += ["## Reproducing", "", "Each study's commands are above; its folder holds `answer.json`, `confirm.json`, "
              "`leaderboard.csv` and the log. `python -m bench guide` rewrites this page from them; the tests check that "
              "the page and the studies agree.", ""]
    return "\n".join(lines)


def rebuild_study(folder: Path, answer: dict[str, Any]) -> Any:
    """An in-memory Optuna study of a stored study's trials, rebuilt from its ``leaderboard.csv`` (state, value,
    seconds and parameters of every trial, pruned ones included) and the searched ranges and choices its
    ``answer.json`` recorded, with the same trial numbers, the defaults' trial marked as ``lmtune tune`` marks it
    and the fixed model named: what ``compute_answer`` needs to recompute the whole answer."""
    import csv
    import math

    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState, create_trial

    from lmtune.tune.answer import DEFAULT_ATTR, quiet_study

    metric = answer["metric"]
    with (folder / "leaderboard.csv").open(newline="") as f:
        rows = {int(r["trial"]): r for r in csv.DictReader(f)}
    params = answer["parameters"]

    def parse(raw: str, like: list[Any]) -> Any:
        for x in like:  # a choice comes back as the type it was searched as
            if str(x) == raw:
                return x
        return int(raw) if all(isinstance(x, int) for x in like) else float(raw)

    def distribution(v: dict[str, Any]) -> Any:
        if v["kind"] == "choice":
            return CategoricalDistribution(tuple(v["searched"]))
        if all(isinstance(x, int) for x in v["searched"]):
            return IntDistribution(*v["searched"])
        return FloatDistribution(*v["searched"], log=bool(v.get("log")))

    dists = {name: distribution(v) for name, v in params.items()}
    default_trial = (answer.get("defaults_vs_tuned") or {}).get("default_trial")
    study = quiet_study(answer["direction"])
    study.set_user_attr("metric", metric)
    sizes = answer.get("sizes") or []
    if len(sizes) == 1:
        study.set_user_attr("space", {"model": sizes[0]["model"]})
    for number in range(max(rows, default=-1) + 1):
        r = rows.get(number)
        if r is None:  # a trial the leaderboard does not list keeps its number, as a failure
            study.add_trial(create_trial(state=TrialState.FAIL))
            continue
        values = {name: parse(r[name], v["searched"]) for name, v in params.items() if r.get(name) not in ("", None)}
        raw = r.get(metric)
        value = float(raw) if raw not in ("", None) else None
        state = TrialState[r["state"]]
        if state == TrialState.COMPLETE and (value is None or not math.isfinite(value)):
            state = TrialState.FAIL
        attrs: dict[str, Any] = {DEFAULT_ATTR: True} if number == default_trial else {}
        if r.get("seconds") not in ("", None):
            attrs["seconds"] = float(r["seconds"])
        study.add_trial(create_trial(params=values, distributions={n: dists[n] for n in values},
                                     value=value if state == TrialState.COMPLETE else None, state=state,
                                     user_attrs=attrs))
    return study


def study_trials(folder: Path, answer: dict[str, Any]) -> list[Any]:
    """The finished trials of a stored study, in trial order, as ``lmtune tune`` holds them."""
    from optuna.trial import TrialState

    return rebuild_study(folder, answer).get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def recomputed_answer(folder: Path, stored: dict[str, Any]) -> dict[str, Any]:
    """A stored study's whole answer, by lmtune's current code, from its raw trials (``leaderboard.csv``), its seed
    confirmation (``confirm.json``), its refit and its budget."""
    from lmtune.config import TuneConfig
    from lmtune.tune.answer import compute_answer, search_seconds

    conf, plan = folder / "confirm.json", folder / "plan.json"
    budget_s = stored.get("budget_s")
    # Studies kept without their plan.json: the budget less the default reserve (every such study's log shows 30 %
    # kept back); their calibration time is not known, so the count may still be a little high.
    search_s = (search_seconds(json.loads(plan.read_text())) if plan.is_file()
                else round(budget_s * (1 - TuneConfig().reserve_fraction), 1) if budget_s else None)
    return compute_answer(rebuild_study(folder, stored), confirmation=json.loads(conf.read_text()) if conf.is_file() else None,
                          refit=stored.get("refit"), budget_s=budget_s, search_s=search_s)


def recompute(results: Path = RESULTS) -> None:
    """Rewrite every study's answer.json with ``recomputed_answer``."""
    for meta in sorted(results.glob("*/guide.json")):
        path = meta.parent / "answer.json"
        new = recomputed_answer(meta.parent, json.loads(path.read_text()))
        path.write_text(json.dumps(new, indent=2) + "\n")
        print(f"recomputed {path} from {new['trials']['complete']} finished trials")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--check", action="store_true", help="exit 1 when docs/key-parameters.md is not what the studies say")
    p.add_argument("--recompute", action="store_true",
                   help="first recompute each study's answer from its leaderboard.csv and confirm.json with "
                        "lmtune's current code (answer.json is rewritten)")


def run(ns: argparse.Namespace) -> int:
    if ns.recompute:
        recompute()
    text = render(load_studies())
    if ns.check:
        same = PAGE.is_file() and PAGE.read_text() == text
        print("docs/key-parameters.md " + ("matches the studies" if same else "differs from the studies: run python -m bench guide"))
        return 0 if same else 1
    PAGE.write_text(text)
    print(f"wrote {PAGE}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench guide", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
