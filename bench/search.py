"""Item 3: search efficiency. ``lmtune tune`` (TPE + median pruning), ``lmtune tune --sampler random`` and
``Trainer.hyperparameter_search(backend="optuna")`` (best flags: bf16, group_by_length; TPE seed 0 + median
pruner), same search space, model, data and wall-clock budget, each in its own process, one after another.

Every evaluation is time-stamped from the start of the search (data loading included), so "time to reach
accuracy X" is the first evaluation whose validation accuracy is >= X.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, fmt, machine, machine_line, save

SPACE = {"learning_rate": (1e-5, 2e-4), "global_batch_size": (16, 32), "epochs": (1, 2), "warmup_ratio": (0.0, 0.1),
         "weight_decay": (0.0, 0.01, 0.1)}


def _lmtune(spec: dict[str, Any], sampler: str) -> dict[str, Any]:
    import lmtune
    from bench.common import data_config
    from lmtune.config import SearchConfig, TuneConfig

    t_start = time.time()
    evals: list[dict[str, Any]] = []
    pkg = importlib.import_module("lmtune.train")
    orig = pkg.train

    def train(cfg, *, on_evaluate=None, **kw):
        def hook(ev):
            evals.append({"t": time.time() - t_start, "accuracy": ev.metrics["accuracy"], "trial_dir": cfg.output_dir})
            if on_evaluate is not None:
                on_evaluate(ev)
        return orig(cfg, on_evaluate=hook, **kw)

    pkg.train = train
    lo, hi = SPACE["learning_rate"]
    search = SearchConfig(learning_rate=f"{lo}..{hi}:log", global_batch_size=",".join(map(str, SPACE["global_batch_size"])),
                          epochs="{}..{}".format(*SPACE["epochs"]), warmup_ratio="{}..{}".format(*SPACE["warmup_ratio"]),
                          weight_decay=",".join(map(str, SPACE["weight_decay"])))
    tc = TuneConfig(n_trials=None, budget=f"{spec['budget_s']}s", sampler=sampler, pruner="median", confirm_seeds=0,
                    evals_per_epoch=2)
    run = lmtune.RunConfig(data=data_config(spec["data"], spec["rows"], spec["val_rows"]),
                           train=lmtune.TrainConfig(max_length=spec["max_length"], eval_batch_size=32, progress=False),
                           output_dir=spec["workdir"] + "/study", report=False)
    res = lmtune.tune(run, search, tc)
    return {"evals": evals, "best_value": res.best_value, "best_params": res.best_params, "counts": res.counts,
            "seconds": time.time() - t_start}


def _trainer(spec: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import optuna
    import torch
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainingArguments)
    from transformers.utils import logging as hf_logging

    from bench.common import trainer_data

    t_start = time.time()
    hf_logging.set_verbosity_error()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    bundle, path, tok, n_labels, train_ds, val_ds = trainer_data(spec)

    def model_init(trial=None):
        m = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n_labels, dtype=torch.float32)
        m.config.pad_token_id = tok.pad_token_id
        m.config.use_cache = False
        return m

    evals: list[dict[str, Any]] = []

    def metrics(p):
        acc = float((np.argmax(p.predictions, -1) == p.label_ids).mean())
        evals.append({"t": time.time() - t_start, "accuracy": acc})
        return {"accuracy": acc}

    def hp_space(trial):
        lo, hi = SPACE["learning_rate"]
        bs = trial.suggest_categorical("per_device_train_batch_size", list(SPACE["global_batch_size"]))
        ep = trial.suggest_int("num_train_epochs", *SPACE["epochs"])
        return {"learning_rate": trial.suggest_float("learning_rate", lo, hi, log=True),
                "per_device_train_batch_size": bs, "num_train_epochs": ep,
                "warmup_steps": trial.suggest_float("warmup_steps", *SPACE["warmup_ratio"]),  # float < 1 = ratio
                "weight_decay": trial.suggest_categorical("weight_decay", list(SPACE["weight_decay"])),
                # two evaluations (pruning points) per epoch, like lmtune tune --evals-per-epoch 2
                "eval_steps": max(1, math.ceil(len(train_ds) / bs) // 2)}

    args = TrainingArguments(output_dir=spec["workdir"] + "/trainer", bf16=True, train_sampling_strategy="group_by_length",
                             per_device_eval_batch_size=32, eval_strategy="steps", eval_steps=10, warmup_steps=0.0,
                             save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                             seed=0)
    trainer = Trainer(model_init=model_init, args=args, train_dataset=train_ds, eval_dataset=val_ds,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=metrics)
    storage = f"sqlite:///{spec['workdir']}/hf.db"
    remaining = spec["budget_s"] - (time.time() - t_start)
    best = trainer.hyperparameter_search(
        hp_space=hp_space, compute_objective=lambda m: m["eval_accuracy"], n_trials=1000, direction="maximize",
        backend="optuna", timeout=max(1.0, remaining), study_name="hf", storage=storage,
        sampler=optuna.samplers.TPESampler(seed=0), pruner=optuna.pruners.MedianPruner())
    study = optuna.load_study(study_name="hf", storage=storage)
    states = [t.state.name.lower() for t in study.trials]
    counts = {s: states.count(s) for s in ("complete", "pruned", "fail", "running")}
    return {"evals": evals, "best_value": best.objective, "best_params": best.hyperparameters, "counts": counts,
            "seconds": time.time() - t_start}


def _first_time(evals: list[dict], target: float) -> float | None:
    for e in evals:
        if e["accuracy"] >= target - 1e-9:
            return e["t"]
    return None


def run(budget_s: float, data: str = "sst2", rows: int = 1000, val_rows: int = 400, max_length: int = 64,
        name: str | None = None) -> dict:
    spec = {"data": data, "rows": rows, "val_rows": val_rows, "max_length": max_length, "budget_s": budget_s}
    res: dict[str, Any] = {"benchmark": "search", "spec": spec, "space": {k: list(v) for k, v in SPACE.items()},
                           "machine": machine(), "contenders": {}}
    for who in ("lmtune-tpe", "trainer-optuna", "lmtune-random"):
        print(f"[search] {who}: budget {budget_s:.0f} s ...", flush=True)
        with tempfile.TemporaryDirectory(prefix="lmtune-search-") as tmp:
            out = Path(tmp) / "result.json"
            env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
            p = subprocess.run([sys.executable, "-m", "bench.search", json.dumps(spec | {"who": who, "workdir": tmp,
                                "result_file": str(out)})], cwd=ROOT, env=env, capture_output=True, text=True)
            if p.returncode != 0 or not out.is_file():
                sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
                raise RuntimeError(f"search contender {who} failed")
            r = json.loads(out.read_text())
        evals = r["evals"]
        r["best_eval_accuracy"] = max((e["accuracy"] for e in evals), default=None)
        res["contenders"][who] = r
        print(f"    best {fmt(r['best_eval_accuracy'], 4)}, counts {r['counts']}, {r['seconds']:.0f} s", flush=True)
    base = res["contenders"]["trainer-optuna"]
    target = base["best_eval_accuracy"]
    t_base = _first_time(base["evals"], target)
    for r in res["contenders"].values():
        r["time_to_baseline_best_s"] = _first_time(r["evals"], target) if target is not None else None
        r["time_fraction_of_baseline"] = (r["time_to_baseline_best_s"] / t_base
                                          if r["time_to_baseline_best_s"] is not None and t_base else None)
    save(name or f"search-{data}", res, markdown(res))
    return res


def markdown(res: dict) -> str:
    s = res["spec"]
    lines = [f"## Search efficiency: {s['data']}, {s['rows']} training rows, {s['val_rows']} validation rows, "
             f"max length {s['max_length']}, budget {s['budget_s']:.0f} s per contender", "",
             machine_line(res["machine"]), "",
             "Space (all contenders): " + "; ".join(f"{k} {v}" for k, v in res["space"].items())
             + " (learning rate log-uniform; Trainer: warmup as `warmup_steps` ratio, batch as `per_device_train_batch_size`). "
             "Two evaluations per epoch (pruning points). Times count from process start (data loading and model loads included). "
             "'best acc' is the best validation accuracy of any evaluation; 'time to baseline best' is the first evaluation "
             "reaching the Trainer search's best accuracy.", "",
             "| search | trials complete | pruned | best acc (any eval) | study best | time to baseline best s | fraction of baseline's time | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["contenders"].items():
        c = r["counts"]
        frac = r.get("time_fraction_of_baseline")
        lines.append(f"| {name} | {c.get('complete', 0)} | {c.get('pruned', 0)} | {fmt(r['best_eval_accuracy'], 4)} | "
                     f"{fmt(r['best_value'], 4)} | {fmt(r.get('time_to_baseline_best_s'), 0) if r.get('time_to_baseline_best_s') is not None else 'not reached'} | "
                     f"{fmt(frac, 2) if frac is not None else '-'} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    spec = json.loads(sys.argv[1])
    who = spec["who"]
    r = _trainer(spec) if who == "trainer-optuna" else _lmtune(spec, "random" if who == "lmtune-random" else "tpe")
    Path(spec["result_file"]).write_text(json.dumps(r, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
