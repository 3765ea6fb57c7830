"""Hand-written run and study folders, shaped like what `lmtune train` / `lmtune tune` write.

They do not depend on the training code: the report reads only files, so files are all it needs.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

LABELS = ["neg", "neu", "pos"]
TEXTS = {
    "neg": ["the plot was dull and the acting awful", "a boring, ugly film", "terrible pacing, I left early"],
    "neu": ["it is a film about a family", "the film runs two hours", "released in spring, shot in Lyon"],
    "pos": ["a lovely, brilliant story", "great acting and a superb plot", "happy ending, nice music"],
}


def _history(n_evals: int, steps_per_epoch: int, seed: int = 0, final: float = 0.86) -> list[dict]:
    rng = random.Random(seed)
    out, best = [], None
    for k in range(1, n_evals + 1):
        step = k * steps_per_epoch // 2
        frac = k / n_evals
        acc = min(0.99, 0.36 + (final - 0.36) * (1 - math.exp(-4 * frac)) + rng.uniform(-0.01, 0.01))
        entry = {"step": step, "epoch": round(step / steps_per_epoch, 4), "train_loss": round(1.1 * math.exp(-2.2 * frac) + 0.05, 4),
                 "val_loss": round(1.1 * math.exp(-1.6 * frac) + 0.25 + 0.08 * max(0, frac - 0.7), 4),
                 "accuracy": round(acc, 4), "macro_f1": round(acc - 0.02, 4), "n": 120,
                 "lr": 3e-5 * (1 - frac), "elapsed_s": round(3.1 * step, 2)}
        entry["is_best"] = best is None or acc > best
        best = max(best or 0, acc)
        out.append(entry)
    return out


def make_run(folder: Path, *, with_eval: bool = True, seed: int = 0) -> Path:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    spe = 40
    history = _history(8, spe, seed)
    best = max(history, key=lambda h: h["accuracy"])
    cm = [[34, 4, 2], [5, 30, 5], [1, 4, 35]]
    per_class = {}
    for i, lab in enumerate(LABELS):
        tp = cm[i][i]
        pred = sum(cm[r][i] for r in range(3))
        sup = sum(cm[i])
        p, r = tp / pred, tp / sup
        per_class[lab] = {"precision": p, "recall": r, "f1-score": 2 * p * r / (p + r), "support": float(sup)}
    train_log = [{"step": s, "loss": round(1.15 * math.exp(-s / 90) + 0.05 + rng.uniform(-0.05, 0.05), 4),
                  "lr": 3e-5 * min(1.0, s / 16) * (1 - s / (4 * spe)), "elapsed_s": round(3.1 * s, 2)}
                 for s in range(5, 4 * spe + 1, 5)]
    lengths_train = [min(128, int(rng.lognormvariate(3.6, 0.6))) for _ in range(480)]
    lengths_val = [min(128, int(rng.lognormvariate(3.6, 0.6))) for _ in range(120)]
    record = {
        "format": "lmtune-run/1", "status": "completed",
        "config": {"data": {"train_file": "data/train.tsv", "val_file": "data/val.tsv", "text_column": "sentence",
                            "label_column": "label", "val_fraction": 0.1, "max_train_rows": None},
                   "model": {"name": "smollm2-135m", "method": "lora", "lora_rank": 8},
                   "train": {"learning_rate": 3e-5, "global_batch_size": 16, "micro_batch_size": 8, "epochs": 4,
                             "warmup_ratio": 0.1, "lr_schedule": "linear", "weight_decay": 0.01, "max_length": 128,
                             "seed": 0, "precision": "auto", "metric": "accuracy"},
                   "output_dir": str(folder)},
        "labels": LABELS, "label_map": {lab: i for i, lab in enumerate(LABELS)},
        "model": {"requested": "smollm2-135m", "resolved": "/cache/smollm2-135m", "source_kind": "folder",
                  "architecture": "LlamaForSequenceClassification", "total_params": 134_515_008,
                  "trainable_params": 921_600, "non_embedding_params": 106_200_000},
        "data": {"train_file": "data/train.tsv", "val_file": "data/val.tsv", "val_source": "file",
                 "rows": {"train": 480, "val": 120}, "rows_read": {"train": 483, "val": 120},
                 "skipped": {"empty_text": 3}, "class_counts": {"train": {"neg": 200, "neu": 120, "pos": 160},
                                                                "val": {"neg": 40, "neu": 40, "pos": 40}},
                 "text_column": "sentence", "text_pair_column": None, "label_column": "label",
                 "warnings": ["3 rows with empty text skipped (lines 17, 88, 301)"],
                 "truncated": {"train": sum(x >= 128 for x in lengths_train), "val": sum(x >= 128 for x in lengths_val)},
                 "token_lengths": {"train": lengths_train, "val": lengths_val}, "max_length": 128},
        "precision": "bf16", "num_processes": 1, "micro_batch_size_used": 8, "oom_events": [],
        "steps": {"total": 4 * spe, "done": 4 * spe}, "stopped_early": False,
        "best": dict(best, per_class=per_class, confusion_matrix=cm),
        "history": history, "train_log": train_log,
        "timing": {"train_seconds": 412.5, "eval_seconds": 38.2, "wall_seconds": 470.1, "train_tokens": 98000,
                   "padded_tokens": 120000, "train_tokens_per_s": 237.6},
        "machine": {"platform": "Linux", "processor": "x86_64", "torch_threads": 2, "cuda": None},
        "versions": {"python": "3.11", "lmtune": "0.1.0"}, "finished_at": "2025-01-01T12:00:00+0000",
    }
    (folder / "lmtune_run.json").write_text(json.dumps(record, indent=1))
    lines = []
    for i in range(120):
        label = LABELS[i % 3]
        wrong = i % 7 == 0
        pred = LABELS[(i + 1) % 3] if wrong else label
        conf = round(rng.uniform(0.4, 0.99), 4)
        probs = {lab: round((1 - conf) / 2, 4) for lab in LABELS} | {pred: conf}
        text = rng.choice(TEXTS[label]) + (" <b>not bold</b> </script>" if i == 0 else "")
        lines.append(json.dumps({"line": i + 2, "text": text, "label": label, "predicted": pred, "probability": conf,
                                 "probabilities": probs}))
    (folder / "val_predictions.jsonl").write_text("\n".join(lines) + "\n")
    (folder / "curve.csv").write_text("step,epoch,train_loss,val_loss,accuracy,macro_f1,lr,elapsed_s\n")
    if with_eval:
        (folder / "eval").mkdir(exist_ok=True)
        (folder / "eval" / "test.json").write_text(json.dumps({
            "accuracy": 0.81, "macro_f1": 0.80, "loss": 0.52, "n": 90, "labels": LABELS,
            "per_class": {lab: {"precision": 0.8, "recall": 0.82, "f1-score": 0.81, "support": 30.0} for lab in LABELS},
            "confusion_matrix": [[25, 3, 2], [4, 23, 3], [2, 3, 25]], "data_file": "data/test.tsv"}))
    return folder


def make_study(folder: Path, *, n_trials: int = 8, confirm: bool = True, best_run: bool = True, running: bool = False) -> Path:
    """An Optuna SQLite study like `lmtune tune` writes: complete, pruned and failed trials with user attrs."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{(folder / 'study.db').resolve()}"
    study = optuna.create_study(study_name="sst-small", storage=storage, direction="maximize")
    rng = random.Random(1)
    dists = {"model": CategoricalDistribution(["smollm2-135m", "tiny-gpt2"]),
             "learning_rate": FloatDistribution(1e-5, 1e-3, log=True),
             "global_batch_size": CategoricalDistribution([8, 16, 32]),
             "warmup_ratio": FloatDistribution(0.0, 0.2),
             "lora_rank": IntDistribution(4, 32, log=True)}
    for n in range(n_trials):
        params = {"model": ["smollm2-135m", "tiny-gpt2"][n % 2], "learning_rate": 10 ** rng.uniform(-5, -3),
                  "global_batch_size": [8, 16, 32][n % 3], "warmup_ratio": round(rng.uniform(0, 0.2), 3),
                  "lora_rank": [4, 8, 16, 32][n % 4]}
        big = params["model"] == "smollm2-135m"
        state = TrialState.COMPLETE
        if n in (2, 6):
            state = TrialState.PRUNED
        if n == 5:
            state = TrialState.FAIL
        if running and n == n_trials - 1:
            state = TrialState.RUNNING
        n_evals = {TrialState.PRUNED: 2, TrialState.FAIL: 1, TrialState.RUNNING: 3}.get(state, 6)
        final = (0.88 if big else 0.7) - abs(math.log10(params["learning_rate"]) + 4) * 0.08
        hist = _history(n_evals, 40 * 16 // params["global_batch_size"], seed=n, final=final)
        inter = {h["step"]: h["accuracy"] for h in hist}
        attrs = {"history": hist, "seconds": (300 if big else 60) * n_evals / 6 + rng.uniform(0, 20),
                 "model_params_m": 134.5 if big else 0.9, "micro_batch_size_used": 8,
                 "epochs_done": hist[-1]["epoch"]}
        if state == TrialState.FAIL:
            attrs["fail_reason"] = "DivergenceError: validation loss is nan at step 20; lower --lr (now 9.1e-04)"
        value = max(inter.values()) if state == TrialState.COMPLETE else None
        t = create_trial(state=state, value=value, params=params, distributions=dists, user_attrs=attrs,
                         intermediate_values=inter if state != TrialState.FAIL else {})
        study.add_trial(t)
    meta = {"study_name": "sst-small", "storage": storage, "metric": "accuracy", "direction": "maximize",
            "space": {"learning_rate": [1e-5, 1e-3, "log"], "global_batch_size": [8, 16, 32]}, "best_dir": "best",
            "confirmation": "confirm.json"}
    (folder / "study.json").write_text(json.dumps(meta, indent=1))
    complete = sorted([t for t in study.trials if t.state == TrialState.COMPLETE], key=lambda t: -t.value)
    if confirm and complete:
        results = []
        for t in complete[:3]:
            vals = [round(t.value - 0.02 + rng.uniform(-0.02, 0.01), 4) for _ in range(3)]
            mean = sum(vals) / 3
            std = (sum((v - mean) ** 2 for v in vals) / 2) ** 0.5
            results.append({"trial": t.number, "params": t.params, "values": vals, "mean": mean, "std": std})
        (folder / "confirm.json").write_text(json.dumps({"metric": "accuracy", "seeds": [0, 1, 2], "results": results}))
    if best_run:
        make_run(folder / "best", with_eval=False, seed=3)
    return folder


