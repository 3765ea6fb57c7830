"""Does validation loss choose what ROUGE-L and BLEU would choose? (issue 9, point 4)

    python -m bench metric-choice                         # E2E, SmolLM2-135M, 10 random trials + seed confirmation (~1 h)
    python -m bench metric-choice --study DIR             # analyse a finished study again, train nothing
    python -m bench metric-choice --tiny                  # the code paths on a tiny random model (< 1 min)

Decoding every validation prompt at every evaluation costs far more than a loss pass on a CPU, so the default
objective of a generation search is ``val_loss``. This benchmark measures whether that choice loses anything a
user would notice. It runs one ``lmtune tune`` on E2E with ``--metric val_loss`` and **every** text metric
computed at every evaluation (``--eval-generate-rows`` left at all validation prompts), random sampling (diverse
trials rank better than a converging TPE), no pruning (every trial runs to its end, so every evaluation exists),
and the best trial and the default configuration confirmed on two more seeds. From the trials' evaluation
histories it reports:

- **checkpoints**: in how many trials the evaluation with the lowest validation loss is the one with the best
  ROUGE-L (BLEU), and how many points of ROUGE-L (BLEU) picking by loss gave up;
- **trials**: the rank correlation (Spearman) over trials between the best validation loss and the best ROUGE-L
  (BLEU), whether the trial a loss-driven search picks is the trial a ROUGE-L-driven search would pick, and the
  points given up, next to the **seed noise** of ROUGE-L and BLEU measured by the confirmation (the same
  configuration on three seeds);
- **cost**: the share of each trial's time spent decoding (``generate_s`` of each evaluation), i.e. what a text
  objective costs in trials per budget.

The lines "loss picks ... within seed noise" are computed from these numbers, never written by hand.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, data_dir, fmt, machine, machine_line, save, standalone

TEXT_METRICS = ("rougeL", "bleu")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=400, help="training pairs of each trial (default 400)")
    p.add_argument("--val-rows", type=int, default=300, help="validation pairs, whole inputs (default 300: 35 inputs of E2E)")
    p.add_argument("--trials", type=int, default=10)
    p.add_argument("--epochs", default="1..3")
    p.add_argument("--confirm-seeds", type=int, default=2)
    p.add_argument("--sampler-seed", type=int, default=0)
    p.add_argument("--study", help="a finished (or interrupted) study folder: resume it if unfinished, then analyse")
    p.add_argument("--name", help="result file name (default: metric-choice-e2e, or a temporary one with --tiny)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model on tiny data: checks the code paths only")


def _data_args(ns: argparse.Namespace, model: str, data: dict[str, Any]) -> list[str]:
    """Model, rows and columns: the same for the study's trials and for the re-runs of the picks."""
    return ["--model", model, "--data", data["train_file"], "--prompt-column", data["prompt_column"],
            "--completion-column", data["completion_column"], "--max-train-rows", str(ns.rows),
            "--max-val-rows", str(ns.val_rows), "--max-length", str(data["max_length"])]


def tune_command(ns: argparse.Namespace, study: Path, model: str, data: dict[str, Any]) -> list[str]:
    """The one lmtune tune that every number below comes from (kept in the results)."""
    cmd = [sys.executable, "-m", "lmtune", "tune", *_data_args(ns, model, data),
           "--epochs", ns.epochs, "--sampler", "random", "--sampler-seed", str(ns.sampler_seed), "--pruner", "none",
           "--n-trials", str(ns.trials), "--confirm-seeds", str(ns.confirm_seeds), "--confirm-top", "2",
           "--refit", "never", "--metric", "val_loss", "--eval-generate", "every", "--out", str(study)]
    if ns.tiny:
        cmd += ["--batch-size", "8", "--lr", "1e-3..1e-2:log", "--no-plan"]
    return cmd


# ---- analysis (pure: tested on hand-made histories) --------------------------------------------------------------

def _best_index(history: list[dict[str, Any]], metric: str) -> int:
    """The evaluation a run keeps when ``metric`` chooses: the first best, as lmtune's loop does."""
    values = [h[metric] for h in history]
    pick = min(values) if metric == "val_loss" else max(values)
    return values.index(pick)


def checkpoint_choice(trials: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Per trial: does the lowest validation loss fall on ``metric``'s best evaluation, and what did it give up?"""
    rows = []
    for t in trials:
        h = t["history"]
        by_loss, by_metric = _best_index(h, "val_loss"), _best_index(h, metric)
        rows.append({"trial": t["number"], "same": by_loss == by_metric, "lost": h[by_metric][metric] - h[by_loss][metric],
                     "evaluations": len(h)})
    lost = [r["lost"] for r in rows]
    return {"metric": metric, "trials": rows, "same": sum(r["same"] for r in rows), "of": len(rows),
            "mean_lost": statistics.fmean(lost) if lost else None, "max_lost": max(lost) if lost else None}


def _ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: list[float], b: list[float]) -> float | None:
    """Rank correlation, ties averaged (scipy.stats.spearmanr's value, without importing scipy for it)."""
    if len(a) < 3:
        return None
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else None


def trial_choice(trials: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """Over trials: does a loss-driven search hand back the trial a ``metric``-driven search would?

    A loss-driven search keeps each trial's lowest-loss checkpoint and hands back the trial with the lowest loss;
    what the user gets in ``metric`` is that checkpoint's score. A ``metric``-driven search keeps each trial's best
    ``metric`` evaluation."""
    loss = [min(h["val_loss"] for h in t["history"]) for t in trials]
    best_metric = [max(h[metric] for h in t["history"]) for t in trials]
    at_loss_ckpt = [t["history"][_best_index(t["history"], "val_loss")][metric] for t in trials]
    by_loss = min(range(len(trials)), key=lambda i: loss[i])
    by_metric = max(range(len(trials)), key=lambda i: best_metric[i])
    return {"metric": metric, "spearman": spearman([-x for x in loss], best_metric),
            "trial_by_loss": trials[by_loss]["number"], "trial_by_metric": trials[by_metric]["number"],
            "got": at_loss_ckpt[by_loss], "best": best_metric[by_metric], "lost": best_metric[by_metric] - at_loss_ckpt[by_loss],
            "rank_of_loss_pick": sorted(best_metric, reverse=True).index(best_metric[by_loss]) + 1,
            "spread": max(best_metric) - min(best_metric)}


def seed_noise(confirmation: dict[str, Any] | None, metric: str) -> dict[str, Any]:
    """The standard deviation of ``metric`` over the seeds of each confirmed configuration."""
    per = []
    for r in (confirmation or {}).get("results", []):
        xs = [m[metric] for m in r.get("metrics", []) if isinstance(m.get(metric), (int, float))]
        if len(xs) > 1:
            per.append({"trial": r["trial"], "values": xs, "std": statistics.stdev(xs)})
    return {"metric": metric, "configurations": per, "std": max((p["std"] for p in per), default=None)}


def decode_cost(trials: list[dict[str, Any]]) -> dict[str, Any]:
    """What decoding the validation prompts cost: its share of the trials' training + evaluation time."""
    decode = sum(h.get("generate_s", 0.0) for t in trials for h in t["history"])
    evaluation = sum(h.get("eval_s", 0.0) for t in trials for h in t["history"])
    total = sum(t["history"][-1]["elapsed_s"] for t in trials)
    return {"decode_s": decode, "eval_s": evaluation, "trial_s": total,
            "decode_share": decode / total if total else None, "eval_share": evaluation / total if total else None,
            "speedup_without_decoding": total / (total - decode) if total > decode else None}


def verdict(checkpoints: dict[str, Any], choice: dict[str, Any], noise: dict[str, Any]) -> str:
    """One computed line per text metric: is choosing by validation loss as good as choosing by this metric?"""
    m, std = choice["metric"], noise["std"]
    band = f"seed noise {std:.2f}" if std is not None else "seed noise not measured"
    within = std is not None and choice["lost"] <= std and (checkpoints["max_lost"] or 0.0) <= std
    rho = choice["spearman"]
    return (f"{m}: val_loss picked the same checkpoint in {checkpoints['same']}/{checkpoints['of']} trials "
            f"(at most {checkpoints['max_lost']:.2f} points lost) and trial {choice['trial_by_loss']} "
            f"(rank {choice['rank_of_loss_pick']} by {m}, {choice['lost']:.2f} points below the best trial, {choice['trial_by_metric']}); "
            f"rank correlation over trials {fmt(rho)}; {band}: "
            + ("**within seed noise**" if within else "**not within seed noise**" if std is not None else "**undecided**"))


def analyse(trials: list[dict[str, Any]], confirmation: dict[str, Any] | None) -> dict[str, Any]:
    done = [t for t in trials if t["history"] and all(m in t["history"][0] for m in TEXT_METRICS)]
    out: dict[str, Any] = {"trials": len(done), "cost": decode_cost(done), "metrics": {}}
    for m in TEXT_METRICS:
        ck, ch, nz = checkpoint_choice(done, m), trial_choice(done, m), seed_noise(confirmation, m)
        out["metrics"][m] = {"checkpoints": ck, "trials": ch, "seed_noise": nz, "verdict": verdict(ck, ch, nz)}
    out["val_loss_seed_noise"] = seed_noise(confirmation, "val_loss")
    return out


# ---- reading a study ---------------------------------------------------------------------------------------------

def load_trials(study_dir: Path) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    import optuna
    from optuna.trial import TrialState

    from lmtune.records import STUDY_FILE

    record = json.loads((study_dir / STUDY_FILE).read_text())
    study = optuna.load_study(study_name=record["study_name"], storage=record["storage"])
    trials = [{"number": t.number, "params": t.params, "value": t.value, "history": t.user_attrs.get("history", []),
               "seconds": t.user_attrs.get("seconds")}
              for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    conf_file = study_dir / "confirm.json"
    return trials, json.loads(conf_file.read_text()) if conf_file.is_file() else None


# ---- report ------------------------------------------------------------------------------------------------------

def markdown(res: dict[str, Any]) -> str:
    a = res["analysis"]
    c = a["cost"]
    lines = [f"## Does validation loss choose what ROUGE-L and BLEU would? {res['data']}, {res['model']}, "
             f"{a['trials']} trials", "", machine_line(res["machine"]), "",
             "Command (every number below comes from this one study):", "", "    " + " ".join(res["command"][2:]), "",
             "Random sampling, no pruning: every trial runs to its end with two evaluations per epoch; each evaluation "
             "computes the validation loss and decodes every validation prompt (greedy) for ROUGE-L and BLEU against all "
             "references. The study's objective is `val_loss`. Seed noise: the best trial and the default configuration "
             "re-run on two more seeds (`--confirm-seeds 2 --confirm-top 2`).", "",
             "| trial | lr | batch | epochs | warmup | wd | evals | best val loss (eval) | ROUGE-L there | best ROUGE-L (eval) "
             "| BLEU there | best BLEU (eval) | decode s / trial s |", "|" + "---|" * 13]
    for t in sorted(res["trials"], key=lambda t: min(h["val_loss"] for h in t["history"])):
        h, p = t["history"], t["params"]
        il, ir, ib = _best_index(h, "val_loss"), _best_index(h, "rougeL"), _best_index(h, "bleu")
        dec = sum(x.get("generate_s", 0.0) for x in h)
        lines.append(f"| {t['number']} | {p.get('learning_rate', 0):.2e} | {p.get('global_batch_size')} | {p.get('epochs')} "
                     f"| {fmt(p.get('warmup_ratio'), 3)} | {p.get('weight_decay')} | {len(h)} | {h[il]['val_loss']:.4f} ({il + 1}) "
                     f"| {h[il]['rougeL']:.2f} | {h[ir]['rougeL']:.2f} ({ir + 1}) | {h[il]['bleu']:.2f} "
                     f"| {h[ib]['bleu']:.2f} ({ib + 1}) | {dec:.0f} / {h[-1]['elapsed_s']:.0f} |")
    lines += ["", "Every evaluation (validation loss, ROUGE-L, BLEU):", ""]
    for t in sorted(res["trials"], key=lambda t: t["number"]):
        lines.append(f"- trial {t['number']}: " + "; ".join(
            f"{h['val_loss']:.4f} / {h['rougeL']:.2f} / {h['bleu']:.2f}" for h in t["history"]))
    lines += ["", "Seed noise (the same configuration on three seeds, each at its own best-loss evaluation):", ""]
    for m in ("val_loss", *TEXT_METRICS):
        nz = a["val_loss_seed_noise"] if m == "val_loss" else a["metrics"][m]["seed_noise"]
        for p in nz["configurations"]:
            lines.append(f"- {m}, trial {p['trial']}: " + ", ".join(f"{v:.4f}" if m == "val_loss" else f"{v:.2f}"
                                                                     for v in p["values"]) + f" (std {p['std']:.4f})")
    lines += ["", "The same configurations over seeds (the loss's pick, the defaults, and each text metric's pick; "
              "each seed scored at its lowest-loss evaluation, one evaluation per epoch):", "",
              "| trial | picked by | seeds | val loss | ROUGE-L | BLEU |", "|---|---|---|---|---|---|"]
    pickers: dict[int, list[str]] = {}
    for m in TEXT_METRICS:
        ch = a["metrics"][m]["trials"]
        for trial, who in ((ch["trial_by_loss"], "val_loss"), (ch["trial_by_metric"], m)):
            if who not in pickers.setdefault(trial, []):
                pickers[trial].append(who)
    for r in res.get("over_seeds", []):
        cell = {m: (f"{r[m]['mean']:.4f} +- {r[m]['std']:.4f}" if m == "val_loss" else f"{r[m]['mean']:.2f} +- {r[m]['std']:.2f}")
                if m in r else "-" for m in ("val_loss", *TEXT_METRICS)}
        who = ", ".join(pickers.get(r["trial"], [])) or ("defaults" if r["trial"] == 0 else "-")
        lines.append(f"| {r['trial']} | {who} | {r['seeds']} | {cell['val_loss']} | {cell['rougeL']} | {cell['bleu']} |")
    lines += ["", "### Result", ""] + [f"- {a['metrics'][m]['verdict']}" for m in TEXT_METRICS]
    lines += [f"- {x}" for x in seed_verdicts(res.get("over_seeds", []), a)]
    lines.append(f"- cost: decoding took {c['decode_s']:.0f} s of the trials' {c['trial_s']:.0f} s "
                 f"({100 * (c['decode_share'] or 0):.0f} %; all evaluation {100 * (c['eval_share'] or 0):.0f} %): "
                 f"without it the same budget runs {fmt(c['speedup_without_decoding'])}x the trials.")
    if res.get("tiny"):
        lines += ["", "**--tiny**: a tiny random model on tiny data, to check the code paths; the numbers mean nothing."]
    return "\n".join(lines)


def confirm_picks(ns: argparse.Namespace, trials: list[dict[str, Any]], confirmation: dict[str, Any] | None,
                  model: str, data: dict[str, Any], work: Path) -> dict[str, Any]:
    """The trial each text metric would hand back, when the study's confirmation did not already re-run it: the
    same configuration on the confirmation's extra seeds, scored the way the confirmation scores (one evaluation
    per epoch, the lowest-loss checkpoint, every metric of it). Then the loss's pick and each metric's pick are
    compared over the same seeds, which a single-seed ranking cannot do."""
    from lmtune.tune.space import flag

    done = {r["trial"] for r in (confirmation or {}).get("results", [])}
    seeds = (confirmation or {}).get("seeds", [0])[1:]
    picks = {trial_choice(trials, m)["trial_by_metric"] for m in TEXT_METRICS} - done
    out: dict[str, Any] = {}
    for number in sorted(picks):
        t = next(x for x in trials if x["number"] == number)
        every = [_metrics_of(t["history"][_best_index(t["history"], "val_loss")])]
        for seed in seeds:
            folder = work / f"pick-{number}-seed-{seed}"
            cmd = [sys.executable, "-m", "lmtune", "train", *_data_args(ns, model, data), "--metric", "val_loss",
                   "--eval-generate", "every", "--seed", str(seed), "--no-save-checkpoints",
                   "--no-report", "--no-progress", "--overwrite", "--out", str(folder)]
            for name, value in t["params"].items():
                cmd += [flag(name), str(value)]
            print("[metric-choice] confirming the pick: " + " ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, cwd=ROOT, check=True)
            every.append(_metrics_of(json.loads((folder / "lmtune_run.json").read_text())["best"]))
        out[str(number)] = {"trial": number, "params": t["params"], "seeds": [0, *seeds], "metrics": every}
    return out


def _metrics_of(entry: dict[str, Any]) -> dict[str, float]:
    return {k: entry[k] for k in ("val_loss", *TEXT_METRICS) if isinstance(entry.get(k), (int, float))}


def over_seeds(confirmation: dict[str, Any] | None, picks: dict[str, Any]) -> list[dict[str, Any]]:
    """Every configuration run on several seeds (the study's confirmation and the picks): mean and std per metric."""
    rows = [{"trial": r["trial"], "metrics": r.get("metrics", [])} for r in (confirmation or {}).get("results", [])]
    rows += [{"trial": p["trial"], "metrics": p["metrics"]} for p in picks.values()]
    out = []
    for r in rows:
        row: dict[str, Any] = {"trial": r["trial"], "seeds": len(r["metrics"])}
        for m in ("val_loss", *TEXT_METRICS):
            xs = [x[m] for x in r["metrics"] if m in x]
            if len(xs) > 1:
                row[m] = {"mean": statistics.fmean(xs), "std": statistics.stdev(xs), "values": xs}
        out.append(row)
    return out


def seed_verdicts(over: list[dict[str, Any]], a: dict[str, Any]) -> list[str]:
    """Over the same seeds: is the trial the loss picked worse in ROUGE-L (BLEU) than the trial ROUGE-L (BLEU) picked,
    by more than the larger of their seed standard deviations?"""
    by_trial = {r["trial"]: r for r in over}
    lines = []
    for m in TEXT_METRICS:
        ch = a["metrics"][m]["trials"]
        mine, theirs = by_trial.get(ch["trial_by_loss"], {}).get(m), by_trial.get(ch["trial_by_metric"], {}).get(m)
        if ch["trial_by_loss"] == ch["trial_by_metric"]:
            lines.append(f"{m} over seeds: the loss and {m} picked the same trial ({ch['trial_by_loss']}).")
        elif mine and theirs:
            gap, band = theirs["mean"] - mine["mean"], max(mine["std"], theirs["std"])
            lines.append(f"{m} over {len(mine['values'])} seeds: the loss's pick (trial {ch['trial_by_loss']}) "
                         f"{mine['mean']:.2f} +- {mine['std']:.2f}, {m}'s pick (trial {ch['trial_by_metric']}) "
                         f"{theirs['mean']:.2f} +- {theirs['std']:.2f}: {m}'s pick is {gap:+.2f} points, "
                         + ("**within seed noise**" if abs(gap) <= band else "**beyond seed noise**")
                         + f" (larger std {band:.2f}).")
    return lines


def run(ns: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="lmtune-metric-choice-"))
    if ns.tiny:
        from bench.search import build_tiny_model, write_tiny_generation

        (work / "data").mkdir()
        data = write_tiny_generation(work / "data") | {"max_length": 48}
        model = build_tiny_model(work / "model")
        ns.rows, ns.val_rows, ns.trials = min(ns.rows, 64), min(ns.val_rows, 24), min(ns.trials, 3)
        ns.confirm_seeds, ns.epochs = min(ns.confirm_seeds, 1), "1..2"
    else:
        data = {"train_file": str(data_dir() / "e2e_nlg" / "train.csv"), "prompt_column": "mr", "completion_column": "ref",
                "max_length": 128}
        model = "smollm2-135m-instruct"
    study = Path(ns.study) if ns.study else work / "study"
    cmd = tune_command(ns, study, model, data)
    finished = (study / "confirm.json").is_file()
    if not finished:  # a new study, or an interrupted one: lmtune tune resumes it
        print("[metric-choice] " + " ".join(cmd[2:]), flush=True)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if rc != 0:
            raise SystemExit(f"metric-choice: lmtune tune exited with {rc}")
    trials, confirmation = load_trials(study)
    picks_file = study / "metric_picks.json"  # kept beside the study, so --study analyses again without training
    if picks_file.is_file():
        picks = json.loads(picks_file.read_text())
    else:
        picks = confirm_picks(ns, trials, confirmation, model, data, work)
        picks_file.write_text(json.dumps(picks, indent=2))
    res = {"benchmark": "metric-choice", "data": "tiny pairs" if ns.tiny else "E2E (e2e_nlg/train.csv)",
           "model": "tiny random Llama" if ns.tiny else model, "tiny": ns.tiny, "command": cmd, "machine": machine(),
           "trials": trials, "confirmation": confirmation, "picks": picks, "over_seeds": over_seeds(confirmation, picks),
           "analysis": analyse(trials, confirmation),
           "wall_s": round(time.time() - t0, 1)}
    name = ns.name or (str(work / "metric-choice-tiny") if ns.tiny else "metric-choice-e2e")
    save(name, res, markdown(res))
    return res


def main(argv: list[str] | None = None) -> int:
    return standalone("python -m bench metric-choice", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
