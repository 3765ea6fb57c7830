"""Search efficiency (issue 11 point 5): lmtune's search against ``Trainer.hyperparameter_search(backend="optuna")``
and against lmtune's own random search, same space, same data, same wall-clock budget.

    python -m bench search --data sst2 --budget 30m --seeds 0,1            # SST-2 (classification, accuracy)
    python -m bench search --data e2e_nlg --budget 30m --seeds 0,1         # E2E (generation, validation loss)
    python -m bench search --data sst2 --warm-start OTHER_STUDY           # adds lmtune-warm (lmtune tune --warm-start)
    python -m bench search --tiny --budget 10s                             # the code paths on a tiny random model (~1 min)
    python -m bench search --data sst2 --seeds 1 --name search-sst2-seed1   # one seed per session, then:
    python -m bench search --merge bench/results/search-sst2-seed0.json bench/results/search-sst2-seed1.json --name search-sst2

Contenders (each runs once per sampler seed, each run in its own fresh process, one after another, the order of
the contenders reversed from one seed to the next; ``--tiny`` and ``--same-process`` run them in this process):

* ``lmtune-tpe``: ``lmtune.tune`` at its defaults (seeded multivariate TPE, median pruner, the default
  configuration as the first trial, the memory/time plan, 2 evaluations per epoch), ``--n-trials none
  --budget B``, the sampler seed as ``TuneConfig.sampler_seed``. Its own seed confirmation and refit are off
  (``confirm_seeds=0``, ``refit="never"``): the benchmark confirms every contender the same way after its budget.
  Generation: ``eval_generate_rows=0`` (the objective is the validation loss, which needs no decoding).
* ``lmtune-random``: the same with ``sampler="random"``.
* ``lmtune-gp`` (opt-in, ``--contenders``): the same with ``sampler="gp"`` (Optuna's ``GPSampler``, the same start-up).
* ``lmtune-warm`` (with ``--warm-start STUDY``): the same as lmtune-tpe with ``TuneConfig.warm_start``.
* ``trainer-optuna`` (the baseline): ``transformers.Trainer`` with ``model_init`` and its best CPU flags (bf16 where
  the CPU has native bf16, fp32 elsewhere, ``train_sampling_strategy="group_by_length"``, evaluation batch 32),
  ``hyperparameter_search(backend="optuna",
  sampler=TPESampler(seed=SEED), pruner=MedianPruner(), timeout=B)``, evaluation every half epoch.
  Generation: the same Trainer on the same token sequences (lmtune's encoding: chat template, labels -100 on the
  prompt tokens, i.e. a completion-only loss), ``DataCollatorForSeq2Seq``; the objective is the validation loss
  per completion token over the whole validation set, computed from per-row loss sums, exactly lmtune's
  ``val_loss``. TRL's ``SFTTrainer`` takes no ``model_init``, so ``hyperparameter_search`` cannot run on it.

Same space (``SPACES``), same rows (lmtune's loader and split), same model, same objective for everyone:
validation accuracy (classification, higher is better) or validation loss (generation, lower is better) of each
evaluation. Every evaluation is time-stamped from the start of the contender's process (imports, data loading,
model loads and lmtune's plan included; each lmtune run starts with an empty lmtune cache, so it pays its plan's
calibration and its tokenisation every time). Only evaluations within the budget count; a trial still running when
the budget ends is stopped (Trainer: at its next step; lmtune: at its next evaluation).

Per contender x seed: the time-stamped evaluations, the best-so-far curve, the final best (the best evaluation
within the budget), and, after the budget (not counted), a confirmed mean: the final best's configuration
retrained with the contender's own trainer (lmtune: ``lmtune.train`` with the trial's exact RunConfig; Trainer:
``Trainer.train`` with the trial's hyperparameters) on ``--confirm-seeds`` extra training seeds (1, 2, ...), the
same objective (best evaluation of the run), mean and std over the search's seed (0) and those. Then the time each
needs to reach the baseline's final best (baseline: trainer-optuna with the same sampler seed), as a fraction of
the baseline's own time, per seed and the median over seeds, and the goal: lmtune reaches the baseline's best in at
most 1/3 of its time and ends at least as good.

Writes ``bench/results/search-DATA.{json,md,html}`` (``--name``): every evaluation, the machine, load averages,
the exact command; the HTML is a self-contained plotly plot of the best-so-far curves (and a PNG when kaleido is
installed).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import random
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import RESULTS, ROOT, data_dir, fmt, machine, machine_line, save

MODEL = "smollm2-135m-instruct"
BASELINE = "trainer-optuna"
CONTENDERS = ("lmtune-tpe", "lmtune-random", "trainer-optuna")
ALL_CONTENDERS = CONTENDERS + ("lmtune-warm", "lmtune-gp")
GOAL_CONTENDERS = ("lmtune-tpe", "lmtune-warm", "lmtune-gp")  # "lmtune" in the goal; lmtune-random is the control
SAMPLER_OF = {"lmtune-random": "random", "lmtune-gp": "gp"}  # the other lmtune contenders run TPE
GOAL_TIME_FRACTION = 1 / 3
EVALS_PER_EPOCH = 2
EVAL_BATCH = 32
SEARCH_TRAIN_SEED = 0
# Random start-up trials before TPE models anything: Optuna's TPESampler default (trainer-optuna's), and lmtune's
# with a budget alone in results written before lmtune recorded its own (study.json's tpe_startup_trials).
TPE_STARTUP_TRIALS = 10
LMTUNE_TRIAL_KEYS = ("learning_rate", "global_batch_size", "epochs", "warmup_ratio", "weight_decay", "eval_every_steps")

SPACE = {"learning_rate": (1e-5, 2e-4), "global_batch_size": (16, 32), "epochs": (1, 2), "warmup_ratio": (0.0, 0.1),
         "weight_decay": (0.0, 0.01, 0.1)}
SPACES = {
    "classification": SPACE,
    # SFT of a 135M model: higher rates than a classification head's, smaller batches (400 rows = 25-50 steps).
    "generation": {"learning_rate": (2e-5, 5e-4), "global_batch_size": (8, 16), "epochs": (1, 2),
                   "warmup_ratio": (0.0, 0.1), "weight_decay": (0.0, 0.01, 0.1)},
}
DATASETS = {
    "sst2": {"task": "classification", "metric": "accuracy", "rows": 1000, "val_rows": 400, "max_length": 64,
             "tiny": {"rows": 96, "val_rows": 32, "max_length": 32}},
    "e2e_nlg": {"task": "generation", "metric": "val_loss", "rows": 400, "val_rows": 200, "max_length": 128,
                "tiny": {"rows": 64, "val_rows": 24, "max_length": 48}},
}
TINY_BUDGET_S = 10.0
# lmtune's first evaluation came at 4.6 s of a tiny run on a 2-core AVX2 machine (study set-up, cold caches):
# with 5 s, a loaded machine left a contender with no evaluation at all.
METRIC_TEXT = {"accuracy": "validation accuracy (higher is better)",
               "val_loss": "validation loss per completion token (lower is better)"}


# ---- settings ---------------------------------------------------------------------------------------------------


def parse_seconds(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"expected e.g. 90s, 30m, 1h, got {text!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def settings(budget_s: float | None, data: str = "sst2", rows: int | None = None, val_rows: int | None = None,
             max_length: int | None = None, *, seeds: tuple[int, ...] = (0,), contenders: tuple[str, ...] = CONTENDERS,
             confirm_seeds: int = 0, threads: int | None = None, warm_start: str | None = None, warm_start_top: int = 3,
             tiny: bool = False) -> dict[str, Any]:
    """Everything a run depends on, defaults resolved, checked before anything is trained."""
    from lmtune.train.precision import native_bf16_cpu

    if data not in DATASETS:
        raise SystemExit(f"--data {data}: choose one of {', '.join(DATASETS)}")
    d = DATASETS[data]
    sizes = d["tiny"] if tiny else d
    contenders = tuple(dict.fromkeys(c for c in contenders if c))
    if warm_start and "lmtune-warm" not in contenders:
        contenders += ("lmtune-warm",)
    bad = [c for c in contenders if c not in ALL_CONTENDERS]
    if bad:
        raise SystemExit(f"unknown contender(s) {bad}; known: {', '.join(ALL_CONTENDERS)}")
    if "lmtune-warm" in contenders and not warm_start:
        raise SystemExit("lmtune-warm needs --warm-start STUDY_FOLDER (the --out folder of an earlier lmtune tune)")
    if not seeds:
        raise SystemExit("--seeds: give at least one sampler seed, e.g. 0,1")
    return {"data": data, "task": d["task"], "metric": d["metric"], "maximize": d["metric"] != "val_loss",
            "rows": rows or sizes["rows"], "val_rows": val_rows or sizes["val_rows"],
            "max_length": max_length or sizes["max_length"],
            "budget_s": float(budget_s if budget_s is not None else (TINY_BUDGET_S if tiny else 1800.0)),
            "seeds": [int(x) for x in seeds], "contenders": list(contenders), "confirm_seeds": int(confirm_seeds),
            "threads": threads, "warm_start": str(Path(warm_start).resolve()) if warm_start else None,
            "warm_start_top": warm_start_top, "tiny": tiny, "trainer_bf16": native_bf16_cpu(),
            "space": {k: list(v) for k, v in SPACES[d["task"]].items()},
            "evals_per_epoch": EVALS_PER_EPOCH, "eval_batch": EVAL_BATCH, "search_train_seed": SEARCH_TRAIN_SEED,
            "model": "tiny random Llama (2 layers, width 32)" if tiny else MODEL}


def command_line(s: dict[str, Any], name: str | None) -> str:
    """The command that reruns this benchmark with the same settings."""
    args = ["python", "-m", "bench", "search", "--data", s["data"], "--budget", f"{s['budget_s']:g}s",
            "--seeds", ",".join(map(str, s["seeds"])), "--contenders", ",".join(s["contenders"]),
            "--confirm-seeds", str(s["confirm_seeds"]), "--rows", str(s["rows"]), "--val-rows", str(s["val_rows"]),
            "--max-length", str(s["max_length"])]
    if s["threads"]:
        args += ["--threads", str(s["threads"])]
    if s["warm_start"]:
        args += ["--warm-start", s["warm_start"], "--warm-start-top", str(s["warm_start_top"])]
    if s["tiny"]:
        args.append("--tiny")
    if name:
        args += ["--name", name]
    return shlex.join(args)


# ---- data and model -------------------------------------------------------------------------------------------------


def real_assets(s: dict[str, Any]) -> dict[str, Any]:
    """The shared data files and the model folder (the offline alias resolved once, outside every budget)."""
    from lmtune.models import resolve

    base = data_dir()
    if s["data"] == "sst2":
        files = {"train_file": str(base / "sst2" / "train.tsv"), "val_file": str(base / "sst2" / "validation.tsv"),
                 "text_column": "sentence", "label_column": "label", "task": "classification"}
    else:
        # No validation file: lmtune's own split holds out 20 % of the inputs (whole groups of references).
        files = {"train_file": str(base / "e2e_nlg" / "train.csv"), "val_file": None, "prompt_column": "mr",
                 "completion_column": "ref", "task": "generation"}
    return {"model_path": resolve(MODEL).path, "data_files": files}


_POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy", "nice", "brilliant"]
_NEGATIVE = ["bad", "awful", "poor", "sad", "boring", "terrible", "ugly", "dull"]
_FILLER = ["the", "film", "was", "really", "quite", "a", "story", "and", "plot", "acting", "very", "it", "is", "so"]
_NAMES = ["Aromi", "Bibimbap", "Cotto", "Zizzi", "Giraffe", "Wildwood", "Strada", "Alimentum"]
_FOODS = ["Chinese", "French", "Indian", "Italian", "English"]
_AREAS = ["riverside", "city centre"]


def _tiny_sentence(rng: random.Random, positive: bool) -> str:
    words = [rng.choice(_FILLER) for _ in range(rng.randint(2, 8))]
    words.insert(rng.randint(0, len(words)), rng.choice(_POSITIVE if positive else _NEGATIVE))
    return " ".join(words)


def write_tiny_classification(folder: Path) -> dict[str, Any]:
    """SST-2's layout (sentence, label 0/1; train and validation files); the label is one word's polarity."""
    rng = random.Random(0)
    for name, n in (("train.tsv", 160), ("validation.tsv", 48)):
        rows = [(_tiny_sentence(rng, i % 2 == 1), i % 2) for i in range(n)]
        (folder / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows), encoding="utf-8")
    return {"train_file": str(folder / "train.tsv"), "val_file": str(folder / "validation.tsv"),
            "text_column": "sentence", "label_column": "label", "task": "classification"}


def _tiny_pairs() -> list[tuple[str, str]]:
    pairs = []
    for n in _NAMES:
        for f in _FOODS:
            for a in _AREAS:
                mr = f"name[{n}], food[{f}], area[{a}]"
                pairs += [(mr, f"{n} serves {f} food in the {a}."), (mr, f"In the {a}, {n} offers {f} food.")]
    return pairs


def write_tiny_generation(folder: Path) -> dict[str, Any]:
    """E2E's layout (mr, ref; two references per input, one file: lmtune holds out whole inputs)."""
    import csv

    with open(folder / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["mr", "ref"])
        w.writerows(_tiny_pairs())
    return {"train_file": str(folder / "train.csv"), "val_file": None, "prompt_column": "mr", "completion_column": "ref",
            "task": "generation"}


def build_tiny_model(folder: Path) -> str:
    """A 2-layer, width-32 random Llama with a byte-level BPE tokenizer trained on the tiny data's words (offline)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [_tiny_sentence(rng, rng.random() < 0.5) for _ in range(300)] + [a + " " + b for a, b in _tiny_pairs()]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return str(folder)


def tiny_assets(s: dict[str, Any], folder: Path) -> dict[str, Any]:
    data = folder / "data"
    data.mkdir(parents=True, exist_ok=True)
    files = write_tiny_classification(data) if s["task"] == "classification" else write_tiny_generation(data)
    return {"model_path": build_tiny_model(folder / "model"), "data_files": files}


def data_config(spec: dict[str, Any]):
    from lmtune.config import DataConfig
    return DataConfig(**spec["data_files"], max_train_rows=spec["rows"], max_val_rows=spec["val_rows"])


def eval_every_steps(n_train: int, batch: int) -> int:
    """Steps between evaluations for EVALS_PER_EPOCH per epoch, as lmtune.tune.study._apply computes them."""
    return max(1, math.ceil(math.ceil(n_train / batch) / EVALS_PER_EPOCH))


# ---- lmtune contenders ------------------------------------------------------------------------------------------------


def _trial_number(output_dir: str) -> int | None:
    m = re.fullmatch(r"trial-(\d+)", Path(output_dir).name)
    return int(m.group(1)) if m else None


def lmtune_search_config(space: dict[str, list]):
    from lmtune.config import SearchConfig
    lo, hi = space["learning_rate"]
    return SearchConfig(learning_rate=f"{lo:g}..{hi:g}:log", global_batch_size=",".join(map(str, space["global_batch_size"])),
                        epochs="{}..{}".format(*space["epochs"]), warmup_ratio="{:g}..{:g}".format(*space["warmup_ratio"]),
                        weight_decay=",".join(f"{x:g}" for x in space["weight_decay"]))


def lmtune_run_config(spec: dict[str, Any], output_dir: str):
    import lmtune
    extra = {"eval_generate_rows": 0} if spec["task"] == "generation" else {}
    return lmtune.RunConfig(data=data_config(spec), model=lmtune.ModelConfig(name=spec["model_path"]),
                            train=lmtune.TrainConfig(max_length=spec["max_length"], eval_batch_size=EVAL_BATCH,
                                                     metric=spec["metric"], seed=SEARCH_TRAIN_SEED, progress=False, **extra),
                            output_dir=output_dir, report=False)


def search_lmtune(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    """``lmtune.tune`` for the rest of the budget; every evaluation time-stamped, every trial's RunConfig kept."""
    import optuna

    import lmtune
    from lmtune.config import TuneConfig

    evals: list[dict[str, Any]] = []
    trials: dict[str, Any] = {}  # trial number -> its hyperparameters (the report)
    configs: dict[str, Any] = {}  # trial number -> its whole RunConfig (the confirmation)
    metric, budget_s = spec["metric"], spec["budget_s"]
    pkg = importlib.import_module("lmtune.train")  # the module whose `train` lmtune.tune calls for each trial
    original = pkg.train

    def train(cfg, *, on_evaluate=None, **kw):
        number = _trial_number(cfg.output_dir)
        if number is None:
            return original(cfg, on_evaluate=on_evaluate, **kw)
        configs[str(number)] = cfg.to_dict()
        trials[str(number)] = {k: getattr(cfg.train, k) for k in LMTUNE_TRIAL_KEYS}

        def hook(ev):
            now = time.time() - t0
            evals.append({"t_s": round(now, 3), "value": float(ev.metrics[metric]), "trial": number})
            if on_evaluate is not None:
                on_evaluate(ev)  # lmtune's own pruning
            if now > budget_s and ev.step < ev.total_steps:
                raise optuna.TrialPruned("past the benchmark's budget")  # nothing after the budget counts
        return original(cfg, on_evaluate=hook, **kw)

    sampler = SAMPLER_OF.get(spec["who"], "tpe")
    warm = spec["warm_start"] if spec["who"] == "lmtune-warm" else None
    pkg.train = train
    try:
        left = max(1.0, budget_s - (time.time() - t0))
        tc = TuneConfig(n_trials=None, budget=f"{left:.1f}s", sampler=sampler, sampler_seed=spec["seed"], pruner="median",
                        evals_per_epoch=EVALS_PER_EPOCH, confirm_seeds=0, refit="never", warm_start=warm,
                        warm_start_top=spec["warm_start_top"], threads_per_worker=spec["threads"])
        res = lmtune.tune(lmtune_run_config(spec, spec["workdir"] + "/study"), lmtune_search_config(spec["space"]), tc)
    finally:
        pkg.train = original
    meta = json.loads((Path(res.output_dir) / "study.json").read_text())
    return {"evals": evals, "trials": trials, "configs": configs, "counts": res.counts,
            "study_best_value": res.best_value, "study_best_trial": res.best_trial,
            "sampler": sampler, "tpe_startup_trials": meta.get("startup_trials", meta.get("tpe_startup_trials"))}


def confirm_lmtune(spec: dict[str, Any], trial_config: dict[str, Any], seed: int) -> float:
    """The trial's exact RunConfig (its evaluation schedule included) with another training seed."""
    from lmtune.config import RunConfig
    from lmtune.train import train

    cfg = RunConfig.from_dict(copy.deepcopy(trial_config))
    cfg.train.seed = seed
    cfg.output_dir = f"{spec['workdir']}/confirm-seed-{seed}"
    cfg.overwrite = True
    try:
        return float(train(cfg, quiet=True).best[spec["metric"]])
    finally:
        shutil.rmtree(cfg.output_dir, ignore_errors=True)


# ---- Trainer contender -------------------------------------------------------------------------------------------------


def trainer_rows(spec: dict[str, Any]) -> dict[str, Any]:
    """lmtune's rows (its loader, sampler and split), tokenised for a Trainer: classification as a Trainer user
    does it (the tokenizer, truncation); generation as lmtune encodes it (chat template, -100 on prompt tokens)."""
    from lmtune.models import load_tokenizer

    tok = load_tokenizer(spec["model_path"])
    if spec["task"] == "classification":
        from lmtune.data import load_data

        bundle = load_data(data_config(spec))

        def encode(texts, ids):
            enc = tok(list(texts), truncation=True, max_length=spec["max_length"])
            return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": int(ids[i])}
                    for i in range(len(ids))]

        return {"tokenizer": tok, "num_labels": len(bundle.label_map.labels),
                "train": encode(bundle.train.texts, bundle.train_ids), "val": encode(bundle.val.texts, bundle.val_ids)}
    from lmtune.data.generation import encode_generation, load_generation_data

    bundle = load_generation_data(data_config(spec))

    def rows(table):
        enc = encode_generation(tok, table, spec["max_length"])
        return [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
                for ids, labels in zip(enc.input_ids, enc.labels)]

    return {"tokenizer": tok, "num_labels": None, "train": rows(bundle.train), "val": rows(bundle.val)}


def loss_sums_per_row(logits, labels):
    """(rows, 2): each row's summed next-token loss over its labelled positions and their count (what lmtune's
    validation loss adds up), so the objective is loss per completion token over the whole validation set."""
    import torch
    import torch.nn.functional as F

    shift_logits, shift_labels = logits[:, :-1, :], labels[:, 1:]
    keep = shift_labels != -100
    losses = F.cross_entropy(shift_logits[keep].float(), shift_labels[keep], reduction="none")
    sums = torch.zeros(labels.shape[0], dtype=torch.float32, device=logits.device)
    sums.index_add_(0, keep.nonzero()[:, 0], losses)
    return torch.stack([sums, keep.sum(1).float()], dim=1)


def trainer_objective(spec: dict[str, Any], prediction) -> float:
    import numpy as np
    p = prediction.predictions
    if spec["task"] == "classification":
        return float((np.argmax(p, -1) == prediction.label_ids).mean())
    return float(p[:, 0].sum() / max(1.0, p[:, 1].sum()))


def trainer_hyperparameters(space: dict[str, list], trial, n_train: int) -> dict[str, Any]:
    """The shared space in TrainingArguments' names (warmup as a `warmup_steps` ratio, batch per device)."""
    lo, hi = space["learning_rate"]
    batch = trial.suggest_categorical("per_device_train_batch_size", list(space["global_batch_size"]))
    return {"learning_rate": trial.suggest_float("learning_rate", lo, hi, log=True),
            "per_device_train_batch_size": batch,
            "num_train_epochs": trial.suggest_int("num_train_epochs", *space["epochs"]),
            "warmup_steps": trial.suggest_float("warmup_steps", *space["warmup_ratio"]),  # float < 1: a ratio
            "weight_decay": trial.suggest_categorical("weight_decay", list(space["weight_decay"])),
            "eval_steps": eval_every_steps(n_train, batch)}


def build_trainer(spec: dict[str, Any], rows: dict[str, Any], output_dir: str, on_value, seed: int = SEARCH_TRAIN_SEED,
                  callbacks: list | None = None, **hyper: Any):
    """A Trainer with ``model_init`` and the best CPU flags; ``on_value(v)`` sees each evaluation's objective."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, DataCollatorForSeq2Seq,
                              DataCollatorWithPadding, Trainer, TrainingArguments)
    from transformers.trainer_callback import PrinterCallback

    tok, classification = rows["tokenizer"], spec["task"] == "classification"

    def model_init(trial=None):
        if classification:
            m = AutoModelForSequenceClassification.from_pretrained(spec["model_path"], num_labels=rows["num_labels"],
                                                                   dtype=torch.float32)
            m.config.pad_token_id = tok.pad_token_id
        else:
            m = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
        m.config.use_cache = False
        return m

    def metrics(prediction):
        value = trainer_objective(spec, prediction)
        on_value(value)
        return {spec["metric"]: value}

    from lmtune.train.precision import native_bf16_cpu

    # bf16 only where the CPU computes it natively; elsewhere it is emulated and slower than fp32.
    args = TrainingArguments(output_dir=output_dir, bf16=native_bf16_cpu(), train_sampling_strategy="group_by_length",
                             per_device_eval_batch_size=EVAL_BATCH, eval_strategy="steps",
                             eval_steps=hyper.pop("eval_steps", 10), warmup_steps=hyper.pop("warmup_steps", 0.0),
                             save_strategy="no", logging_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                             seed=seed, **hyper)
    collator = DataCollatorWithPadding(tok) if classification else DataCollatorForSeq2Seq(tok, label_pad_token_id=-100)
    trainer = Trainer(model_init=model_init, args=args, train_dataset=rows["train"], eval_dataset=rows["val"],
                      data_collator=collator, compute_metrics=metrics, callbacks=callbacks,
                      preprocess_logits_for_metrics=None if classification else loss_sums_per_row)
    trainer.remove_callback(PrinterCallback)  # no metrics dict printed after every evaluation
    return trainer


def search_trainer(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    """``Trainer.hyperparameter_search(backend="optuna")`` for the rest of the budget, TPE seeded with the sampler seed."""
    import optuna
    from transformers import TrainerCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = trainer_rows(spec)
    evals: list[dict[str, Any]] = []
    trials: dict[str, Any] = {}
    current: dict[str, int] = {}
    budget_s = spec["budget_s"]

    class StopAtBudget(TrainerCallback):
        """Nothing after the budget counts: end the running trial at its next step instead of running it out."""

        def on_step_end(self, args, state, control, **kw):
            if time.time() - t0 > budget_s:
                control.should_training_stop = True

    def on_value(value):
        evals.append({"t_s": round(time.time() - t0, 3), "value": value, "trial": current.get("trial")})

    def hp_space(trial):
        params = trainer_hyperparameters(spec["space"], trial, len(rows["train"]))
        current["trial"] = trial.number
        trials[str(trial.number)] = dict(params)
        return params

    trainer = build_trainer(spec, rows, spec["workdir"] + "/trainer", on_value, callbacks=[StopAtBudget()])
    storage = f"sqlite:///{spec['workdir']}/hf.db"
    best = trainer.hyperparameter_search(
        hp_space=hp_space, compute_objective=lambda m: m[f"eval_{spec['metric']}"], n_trials=10_000,
        direction="maximize" if spec["maximize"] else "minimize", backend="optuna",
        timeout=max(1.0, budget_s - (time.time() - t0)), study_name="hf", storage=storage,
        sampler=optuna.samplers.TPESampler(seed=spec["seed"]), pruner=optuna.pruners.MedianPruner())
    study = optuna.load_study(study_name="hf", storage=storage)
    states = [t.state.name.lower() for t in study.trials]
    counts = {s: states.count(s) for s in ("complete", "pruned", "fail", "running")}
    return {"evals": evals, "trials": trials, "counts": counts, "study_best_value": best.objective,
            "study_best_trial": int(best.run_id)}


def confirm_trainer(spec: dict[str, Any], hyper: dict[str, Any], seed: int) -> float:
    """A plain ``Trainer.train`` with the trial's hyperparameters and another seed; its best evaluation."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    values: list[float] = []
    trainer = build_trainer(spec, trainer_rows(spec), f"{spec['workdir']}/confirm-seed-{seed}", values.append, seed=seed,
                            **dict(hyper))
    trainer.train()
    if not values:  # no evaluation during training (a run shorter than one evaluation interval)
        trainer.evaluate()
    return max(values) if spec["maximize"] else min(values)


# ---- one contender x seed: search, then confirmation -----------------------------------------------------------------


def confirm(spec: dict[str, Any], best: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The final best's configuration on ``confirm_seeds`` extra training seeds; its search value is the first."""
    t0 = time.time()
    extra = [SEARCH_TRAIN_SEED + k for k in range(1, spec["confirm_seeds"] + 1)]
    retrain = confirm_trainer if spec["who"] == BASELINE else confirm_lmtune
    values = [best["value"]] + [retrain(spec, config, seed) for seed in extra]
    return {"trial": best["trial"], "seeds": [SEARCH_TRAIN_SEED] + extra, "values": values, **mean_std(values),
            "seconds": round(time.time() - t0, 1)}


def run_contender(spec: dict[str, Any], t0: float) -> dict[str, Any]:
    """One contender with one sampler seed: the search (timed from ``t0``), then the confirmation (not timed)."""
    if spec.get("threads"):
        import torch
        torch.set_num_threads(int(spec["threads"]))
    search = search_trainer if spec["who"] == BASELINE else search_lmtune
    r = search(spec, t0)
    r["search_wall_s"] = round(time.time() - t0, 2)
    configs = r.pop("configs", None) or r["trials"]  # lmtune: whole RunConfigs; Trainer: its hyperparameters
    best = final_best(r["evals"], spec["maximize"], spec["budget_s"])
    r["confirmation"] = confirm(spec, best, configs[str(best["trial"])]) if best and spec["confirm_seeds"] else None
    return r


def run_in_fresh_process(spec: dict[str, Any]) -> dict[str, Any]:
    """A fresh process: no module, cache or allocator state carried over from another contender."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               LMTUNE_CACHE=spec["workdir"] + "/lmtune-cache")
    out = Path(spec["result_file"])
    p = subprocess.run([sys.executable, "-m", "bench.search", "_worker", json.dumps(spec)], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    (Path(spec["workdir"]) / "log.txt").write_text(p.stdout + p.stderr)
    if p.returncode != 0 or not out.is_file():
        return {"error": f"exit {p.returncode}", "log_tail": (p.stdout[-2000:] + p.stderr[-4000:])}
    return json.loads(out.read_text())


def run_in_this_process(spec: dict[str, Any]) -> dict[str, Any]:
    """This process (--same-process, --tiny): faster for tiny runs, not for measurements."""
    old = os.environ.get("LMTUNE_CACHE")
    os.environ["LMTUNE_CACHE"] = spec["workdir"] + "/lmtune-cache"
    try:
        return run_contender(spec, time.time())
    except Exception:
        return {"error": "exception", "log_tail": traceback.format_exc()[-4000:]}
    finally:
        if old is None:
            os.environ.pop("LMTUNE_CACHE", None)
        else:
            os.environ["LMTUNE_CACHE"] = old


# ---- analysis (pure functions of the evaluations) ----------------------------------------------------------------------


def is_better(a: float, b: float, maximize: bool) -> bool:
    return a > b if maximize else a < b


def reaches(value: float, target: float, maximize: bool, tol: float = 1e-9) -> bool:
    return value >= target - tol if maximize else value <= target + tol


def within_budget(evals: list[dict[str, Any]], budget_s: float) -> list[dict[str, Any]]:
    return sorted((e for e in evals if e["t_s"] <= budget_s and math.isfinite(e["value"])), key=lambda e: e["t_s"])


def best_so_far_curve(evals: list[dict[str, Any]], maximize: bool, budget_s: float) -> list[dict[str, float]]:
    """One point per evaluation within the budget: its time and the best value seen up to then."""
    curve: list[dict[str, float]] = []
    best = None
    for e in within_budget(evals, budget_s):
        if best is None or is_better(e["value"], best, maximize):
            best = e["value"]
        curve.append({"t_s": e["t_s"], "best": best})
    return curve


def final_best(evals: list[dict[str, Any]], maximize: bool, budget_s: float) -> dict[str, Any] | None:
    """The best evaluation within the budget (the earliest of equals), with its time and trial."""
    best = None
    for e in within_budget(evals, budget_s):
        if best is None or is_better(e["value"], best["value"], maximize):
            best = e
    return dict(best) if best else None


def first_time_reaching(evals: list[dict[str, Any]], target: float | None, maximize: bool, budget_s: float) -> float | None:
    """Seconds to the first evaluation within the budget at least as good as ``target``; None if none is."""
    if target is None:
        return None
    return next((e["t_s"] for e in within_budget(evals, budget_s) if reaches(e["value"], target, maximize)), None)


def mean_std(values: list[float]) -> dict[str, float | None]:
    """Mean and sample standard deviation of the finite values (a diverged seed is NaN and left out)."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return {"mean": statistics.fmean(finite) if finite else None,
            "std": statistics.stdev(finite) if len(finite) > 1 else (0.0 if finite else None)}


def median_or_none(values: list[float | None]) -> float | None:
    """Median with None as +infinity (a seed that never got there); None when the median itself is infinite."""
    if not values:
        return None
    m = statistics.median([math.inf if v is None else v for v in values])
    return None if math.isinf(m) else m


def startup_of(r: dict[str, Any]) -> int:
    """The random start-up trials of a run's model-based sampler (TPE, or lmtune-gp's GP): as its study recorded
    it (lmtune), else Optuna's TPE default (the baseline, and lmtune results written before lmtune recorded it, when
    a budget alone always meant 10)."""
    return r.get("tpe_startup_trials") or TPE_STARTUP_TRIALS


def startup_text(runs: list[dict[str, Any]]) -> str:
    """The report's line on how many random trials each TPE ran before it modelled anything."""
    counts: dict[str, list[str]] = {}
    for r in runs:
        if r["who"] != "lmtune-random" and not r.get("error"):
            counts.setdefault(r["who"], []).append(f"{startup_of(r)} (seed {r['seed']})")
    return (("TPE (lmtune-gp: the GP, counting complete trials only)" if "lmtune-gp" in counts else "TPE")
            + " models nothing before its random start-up trials have finished: "
            + "; ".join(f"{who} {', '.join(v)}" for who, v in counts.items()) + ".") if counts else ""


def describe_run(r: dict[str, Any], s: dict[str, Any]) -> None:
    """The per-run numbers that need no baseline: curve, final best, evaluations in and past the budget."""
    evals = r.get("evals") or []
    r["curve"] = best_so_far_curve(evals, s["maximize"], s["budget_s"])
    r["final_best"] = final_best(evals, s["maximize"], s["budget_s"])
    r["evals_within_budget"] = len(r["curve"])
    r["evals_after_budget"] = len(evals) - len(r["curve"])
    c = r.get("counts") or {}
    r["finished_trials"] = c.get("complete", 0) + c.get("pruned", 0)


def compare_with_baseline(runs: list[dict[str, Any]], s: dict[str, Any]) -> None:
    """Each run's time to the final best of the baseline with the same sampler seed, and that as a fraction of
    the baseline's own time to it (its first evaluation at its final best)."""
    for seed in s["seeds"]:
        base = next((r for r in runs if r["who"] == BASELINE and r["seed"] == seed and not r.get("error")), None)
        target = base["final_best"]["value"] if base and base.get("final_best") else None
        t_base = first_time_reaching(base["evals"], target, s["maximize"], s["budget_s"]) if target is not None else None
        for r in runs:
            if r["seed"] != seed or r.get("error"):
                continue
            t = first_time_reaching(r["evals"], target, s["maximize"], s["budget_s"])
            r["baseline_best"] = target
            r["time_to_baseline_best_s"] = t
            r["fraction_of_baseline_time"] = t / t_base if t is not None and t_base else None


def quality_value(r: dict[str, Any]) -> float | None:
    """What "ends at least as good" compares: the confirmed mean when there is one, else the final best."""
    conf = r.get("confirmation")
    if conf and conf.get("mean") is not None:
        return conf["mean"]
    return (r.get("final_best") or {}).get("value")


def summarize(runs: list[dict[str, Any]], s: dict[str, Any]) -> dict[str, Any]:
    """Per contender, over the sampler seeds: who reached the baseline's best, the medians, the confirmed means."""
    out = {}
    for who in s["contenders"]:
        rs = [r for r in runs if r["who"] == who and not r.get("error")]
        if not rs:
            continue
        fractions = [r.get("fraction_of_baseline_time") for r in rs]
        times = [r.get("time_to_baseline_best_s") for r in rs]
        finals = [v for v in ((r.get("final_best") or {}).get("value") for r in rs) if v is not None]
        confirmed = [v for v in ((r.get("confirmation") or {}).get("mean") for r in rs) if v is not None]
        out[who] = {"seeds": [r["seed"] for r in rs], "fractions": fractions, "median_fraction": median_or_none(fractions),
                    "reached": sum(f is not None for f in times), "times_to_baseline_best_s": times,
                    "median_time_to_baseline_best_s": median_or_none(times), "final_bests": finals,
                    "median_final_best": statistics.median(finals) if finals else None, "confirmed_means": confirmed,
                    "mean_confirmed_mean": statistics.fmean(confirmed) if confirmed else None}
    return out


def goals(runs: list[dict[str, Any]], s: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's goal for each lmtune contender run here: the median over seeds of its time to the baseline's
    best, as a fraction of the baseline's, is at most 1/3, and the median over seeds of its difference to the
    baseline (confirmed means where both have one, else final bests; positive = better) is at least 0."""
    out = []
    sign = 1 if s["maximize"] else -1
    for who in GOAL_CONTENDERS:
        if who not in s["contenders"]:
            continue
        per_seed = []
        for seed in s["seeds"]:
            lm = next((r for r in runs if r["who"] == who and r["seed"] == seed and not r.get("error")), None)
            base = next((r for r in runs if r["who"] == BASELINE and r["seed"] == seed and not r.get("error")), None)
            if lm is None or base is None:
                continue
            both_confirmed = bool(lm.get("confirmation") and base.get("confirmation"))
            a = quality_value(lm) if both_confirmed else (lm.get("final_best") or {}).get("value")
            b = quality_value(base) if both_confirmed else (base.get("final_best") or {}).get("value")
            per_seed.append({"seed": seed, "fraction": lm.get("fraction_of_baseline_time"), "value": a, "baseline_value": b,
                             "basis": "confirmed mean" if both_confirmed else "final best",
                             "difference": None if a is None or b is None else sign * (a - b)})
        if not per_seed:
            continue
        fraction = median_or_none([p["fraction"] for p in per_seed])
        diffs = [p["difference"] for p in per_seed]
        difference = statistics.median(diffs) if diffs and all(d is not None for d in diffs) else None
        time_met = fraction is not None and fraction <= GOAL_TIME_FRACTION + 1e-12
        quality_met = difference is not None and difference >= -1e-12
        out.append({"contender": who, "per_seed": per_seed, "median_fraction": fraction, "median_difference": difference,
                    "time_met": time_met, "quality_met": quality_met, "met": time_met and quality_met})
    return out


# ---- outputs -------------------------------------------------------------------------------------------------------------


def output_base(name: str) -> Path:
    """``name`` under bench/results, or a path (folders created); the .json/.md/.html suffixes are added."""
    base = Path(name) if (os.path.isabs(name) or "/" in name) else RESULTS / name
    base = base.resolve()
    base.parent.mkdir(parents=True, exist_ok=True)
    return base


def trace_name(who: str, seed: int) -> str:
    return f"{who} seed {seed}"


def write_plot(res: dict[str, Any], base: Path) -> dict[str, Any]:
    """Best-so-far over wall time, one line per contender x seed: an HTML file that loads the plotly.min.js beside
    it (one copy for every page in the folder instead of 4.7 MB inlined in each: the results folder travels to the
    GPU machine within a 64 MiB limit), and a PNG only where kaleido is already installed."""
    import plotly.graph_objects as go

    s = res["settings"]
    palette = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e"]
    colour = {who: palette[i % len(palette)] for i, who in enumerate(s["contenders"])}
    dashes = ["solid", "dash", "dot", "dashdot", "longdash"]
    fig = go.Figure()
    for r in res["runs"]:
        curve = r.get("curve") or []
        xs, ys = [p["t_s"] for p in curve], [p["best"] for p in curve]
        if curve:  # held flat to the end of the budget
            xs, ys = xs + [s["budget_s"]], ys + [ys[-1]]
        dash = dashes[s["seeds"].index(r["seed"]) % len(dashes)] if r["seed"] in s["seeds"] else "solid"
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", line_shape="hv", name=trace_name(r["who"], r["seed"]),
                                 line={"color": colour.get(r["who"]), "dash": dash}, marker={"size": 4}))
    for r in res["runs"]:
        if r["who"] == BASELINE and r.get("final_best"):
            fig.add_hline(y=r["final_best"]["value"], line_dash="dot", line_color="grey",
                          annotation_text=f"baseline's final best, seed {r['seed']}", annotation_position="bottom right")
    fig.update_layout(title=f"Best-so-far {METRIC_TEXT[s['metric']]}: {s['data']}, budget {s['budget_s']:g} s per search",
                      xaxis_title="wall time since the contender's process started (s)",
                      yaxis_title=METRIC_TEXT[s["metric"]], template="plotly_white", legend_title="contender, sampler seed")
    html = Path(str(base) + ".html")
    fig.write_html(str(html), include_plotlyjs="directory", full_html=True)
    out: dict[str, Any] = {"html": html.name, "png": None}
    try:
        importlib.import_module("kaleido")
    except ImportError:
        out["png_note"] = "no PNG: kaleido is not installed"
        return out
    try:
        png = Path(str(base) + ".png")
        fig.write_image(str(png), width=1100, height=650)
        out["png"] = png.name
    except Exception as e:  # kaleido present but without a browser to render with
        out["png_note"] = f"no PNG: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return out


def _value(x: float | None, metric: str) -> str:
    return fmt(x, 4) if x is not None else "-"


def _seconds_text(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.0f}"


TRAINER_NAMES = {"per_device_train_batch_size": "global_batch_size", "num_train_epochs": "epochs",
                 "warmup_steps": "warmup_ratio"}


def final_configurations(runs: list[dict[str, Any]]) -> list[str]:
    """Markdown rows: each run's final best configuration, in the space's names."""
    keys = ("learning_rate", "global_batch_size", "epochs", "warmup_ratio", "weight_decay")
    out = ["", "Final best configurations (the trial of each final best):", "",
           "| contender | sampler seed | trial | " + " | ".join(keys) + " |", "|---|---|---|" + "---|" * len(keys)]
    for r in runs:
        best = r.get("final_best")
        if r.get("error") or not best:
            continue
        params = {TRAINER_NAMES.get(k, k): v for k, v in (r.get("trials") or {}).get(str(best["trial"]), {}).items()}
        out.append(f"| {r['who']} | {r['seed']} | {best['trial']} | "
                   + " | ".join(f"{params[k]:.3g}" if isinstance(params.get(k), float) else str(params.get(k, "-"))
                                for k in keys) + " |")
    return out


def _machine_text(machine: dict[str, Any], load_end: list[float] | None) -> str:
    return machine_line(machine) + (f" Load average at end {tuple(round(x, 2) for x in load_end)}." if load_end else "")


def markdown(res: dict[str, Any]) -> str:
    s, metric = res["settings"], res["settings"]["metric"]
    lines = [f"## Search efficiency: {s['data']} ({s['task']}), {s['rows']} training rows, {s['val_rows']} validation rows, "
             f"max length {s['max_length']}; budget {s['budget_s']:g} s per search; sampler seeds "
             f"{', '.join(map(str, s['seeds']))}", ""]
    if s["tiny"]:
        lines += ["**--tiny**: a tiny random model on tiny data, to check the code paths; the numbers mean nothing.", ""]
    if res.get("merged_from"):
        lines += [f"Merged from {len(res['merged_from'])} runs (`python -m bench search --merge`), each on its own "
                  "machine time; every seed's comparison comes from one run:", ""]
        for part in res["merged_from"]:
            lines.append(f"- `{Path(part['file']).name}`: sampler seed(s) {', '.join(map(str, part['seeds']))}, started "
                         f"{part.get('started', '?')}, {fmt(part.get('seconds'), 0)} s, revision {part.get('revision') or '?'}. "
                         + _machine_text(part["machine"], part.get("load_avg_at_end")))
        lines.append("")
    else:
        lines += [_machine_text(res["machine"], res.get("load_avg_at_end")),
                  f"Started {res.get('started', '?')}, {fmt(res.get('seconds'), 0)} s in all; revision {res.get('revision') or '?'}.", ""]
    if res.get("note"):
        lines += [res["note"], ""]
    lines += [f"Rerun: `{res['command']}`", "",
              f"Objective (every contender): {METRIC_TEXT[metric]} of each evaluation, {EVALS_PER_EPOCH} per epoch, "
              f"evaluation batch {EVAL_BATCH}; model {s['model']}. Space (every contender): "
              + "; ".join(f"{k} {v}" for k, v in s["space"].items())
              + " (learning rate log-uniform; Trainer: warmup as a `warmup_steps` ratio, batch as "
              "`per_device_train_batch_size`). Times count from the contender's process start (imports, data, model "
              "loads, lmtune's plan from an empty cache included); only evaluations within the budget count. "
              f"Training seed {SEARCH_TRAIN_SEED} in every search; "
              + (f"confirmation: the final best's configuration retrained on {s['confirm_seeds']} extra training seed(s) "
                 "by the contender's own trainer after the budget (not counted in it), mean ± sample std over the "
                 "search's seed and those." if s["confirm_seeds"] else "no confirmation (--confirm-seeds 0)."), "",
              "Contenders: `lmtune-tpe` = `lmtune.tune` (seeded multivariate TPE, median pruner, defaults first, plan; "
              "its own confirmation and refit off" + (", `eval_generate_rows=0`" if s["task"] == "generation" else "")
              + "); `lmtune-random` = the same with random sampling; "
              + ("`lmtune-gp` = the same with Optuna's GPSampler; " if "lmtune-gp" in s["contenders"] else "")
              + ("`lmtune-warm` = lmtune-tpe with `--warm-start " + str(s["warm_start"]) + "`; " if s["warm_start"] else "")
              + "`trainer-optuna` (baseline) = `Trainer.hyperparameter_search(backend=\"optuna\")`, "
              + ("bf16" if s.get("trainer_bf16", True) else "fp32 (no native bf16 on that CPU)") + ", group_by_length, "
              "TPESampler(seed=sampler seed), MedianPruner"
              + (", lmtune's token sequences (completion-only labels), validation loss per completion token from per-row "
                 "loss sums (TRL's SFTTrainer has no `model_init`, so no `hyperparameter_search`)" if s["task"] == "generation" else "")
              + ". " + startup_text(res["runs"]), "",
              "| contender | sampler seed | trials complete / pruned / failed | past TPE start-up | evaluations (after budget) "
              "| final best | at s | confirmed mean ± std (values) | time to baseline's best s | fraction of baseline's time "
              "| search wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        if r.get("error"):
            lines.append(f"| {r['who']} | {r['seed']} | failed: {r['error']} | | | | | | | | |")
            continue
        c, fb, conf = r.get("counts") or {}, r.get("final_best") or {}, r.get("confirmation")
        conf_text = (f"{_value(conf['mean'], metric)} ± {_value(conf['std'], metric)} ("
                     + ", ".join(_value(v, metric) for v in conf["values"]) + ")") if conf else "-"
        modelled = c.get("complete", 0) if r["who"] == "lmtune-gp" else r["finished_trials"]  # GPSampler: complete only
        past = ("yes" if modelled > startup_of(r) else "no") if r["who"] != "lmtune-random" else "(random)"
        lines.append(f"| {r['who']} | {r['seed']} | {c.get('complete', 0)} / {c.get('pruned', 0)} / {c.get('fail', 0)} | {past} | "
                     f"{r['evals_within_budget']} ({r['evals_after_budget']}) | {_value(fb.get('value'), metric)} | "
                     f"{fmt(fb.get('t_s'), 0)} | {conf_text} | {_seconds_text(r.get('time_to_baseline_best_s'))} | "
                     f"{fmt(r.get('fraction_of_baseline_time'), 2)} | {fmt(r.get('search_wall_s'), 0)} |")
    lines += final_configurations(res["runs"])
    summary = res.get("summary") or {}
    if summary:
        lines += ["", "Over the sampler seeds:", "",
                  "| contender | reached the baseline's best | median time to it s | median fraction of baseline's time "
                  "| median final best | mean of confirmed means |", "|---|---|---|---|---|---|"]
        for who, v in summary.items():
            lines.append(f"| {who} | {v['reached']}/{len(v['seeds'])} seeds | {_seconds_text(v['median_time_to_baseline_best_s'])} | "
                         f"{fmt(v['median_fraction'], 2)} | {_value(v['median_final_best'], metric)} | "
                         f"{_value(v['mean_confirmed_mean'], metric)} |")
    lines.append("")
    for g in res.get("goals") or []:
        per = "; ".join(f"seed {p['seed']}: {fmt(p['fraction'], 2) if p['fraction'] is not None else 'not reached'}, "
                        f"{p['basis']} {_value(p['value'], metric)} vs {_value(p['baseline_value'], metric)}" for p in g["per_seed"])
        lines.append(f"Goal (lmtune reaches the baseline's best in at most 1/3 of its time and ends at least as good), "
                     f"{g['contender']}: **{'met' if g['met'] else 'not met'}**. Time: median fraction of the baseline's "
                     f"time {fmt(g['median_fraction'], 2) if g['median_fraction'] is not None else 'not reached'} "
                     f"(needs <= {GOAL_TIME_FRACTION:.2f}: {'met' if g['time_met'] else 'not met'}); quality: median "
                     f"difference to the baseline {('%+.4f' % g['median_difference']) if g['median_difference'] is not None else '-'} "
                     f"(better = positive; needs >= 0: {'met' if g['quality_met'] else 'not met'}). Per seed: {per}.")
    if not res.get("goals"):
        lines.append("Goal (lmtune reaches the baseline's best in at most 1/3 of its time and ends at least as good): "
                     "not evaluated (needs lmtune-tpe or lmtune-warm and trainer-optuna).")
    plot = res.get("plot") or {}
    if plot.get("html"):
        lines += ["", f"Best-so-far curves: [{plot['html']}]({plot['html']})"
                  + (f", ![best so far]({plot['png']})" if plot.get("png") else f" ({plot.get('png_note', 'no PNG')})") + "."]
    return "\n".join(lines)


def finish_analysis(res: dict[str, Any]) -> None:
    s = res["settings"]
    for r in res["runs"]:
        if not r.get("error"):
            describe_run(r, s)
    compare_with_baseline(res["runs"], s)
    res["summary"] = summarize(res["runs"], s)
    res["goals"] = goals(res["runs"], s)


# ---- the benchmark ---------------------------------------------------------------------------------------------------------


def run(budget_s: float | None = None, data: str = "sst2", rows: int | None = None, val_rows: int | None = None,
        max_length: int | None = None, name: str | None = None, *, seeds: tuple[int, ...] = (0,),
        contenders: tuple[str, ...] = CONTENDERS, confirm_seeds: int = 0, threads: int | None = None,
        warm_start: str | None = None, warm_start_top: int = 3, tiny: bool = False, same_process: bool | None = None,
        keep_work: bool = False, note: str | None = None) -> dict[str, Any]:
    """Every contender once per sampler seed; writes NAME.json, NAME.md and NAME.html. The defaults here (one seed,
    no confirmation) keep `python -m bench all` short; `python -m bench search` defaults to seeds 0,1 and 2
    confirmation seeds."""
    from bench.sft import _revision

    s = settings(budget_s, data, rows, val_rows, max_length, seeds=tuple(seeds), contenders=tuple(contenders),
                 confirm_seeds=confirm_seeds, threads=threads, warm_start=warm_start, warm_start_top=warm_start_top,
                 tiny=tiny)
    name = name or (str(Path(tempfile.gettempdir()) / "lmtune-bench-search" / f"search-{data}-tiny") if tiny else f"search-{data}")
    base = output_base(name)
    here = tiny if same_process is None else same_process
    t_start = time.time()
    res: dict[str, Any] = {"benchmark": "search", "settings": s, "command": command_line(s, name), "revision": _revision(),
                           "started": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(), "note": note,
                           "same_process": here, "runs": []}
    work = Path(tempfile.mkdtemp(prefix="lmtune-search-"))
    try:
        assets = tiny_assets(s, work / "assets") if tiny else real_assets(s)
        res["model_path"], res["data_files"] = assets["model_path"], assets["data_files"]
        for i, seed in enumerate(s["seeds"]):
            order = s["contenders"] if i % 2 == 0 else list(reversed(s["contenders"]))
            for who in order:
                print(f"[search] sampler seed {seed}: {who}, budget {s['budget_s']:g} s ...", flush=True)
                folder = work / f"{who}-seed-{seed}"
                folder.mkdir()
                spec = {k: s[k] for k in ("task", "metric", "maximize", "rows", "val_rows", "max_length", "budget_s",
                                          "space", "confirm_seeds", "threads", "warm_start", "warm_start_top")}
                spec |= {"who": who, "seed": seed, "workdir": str(folder), "result_file": str(folder / "result.json"), **assets}
                r = (run_in_this_process if here else run_in_fresh_process)(spec)
                r |= {"who": who, "seed": seed}
                res["runs"].append(r)
                finish_analysis(res)
                Path(str(base) + ".json.tmp").write_text(json.dumps(res, indent=1, default=str))  # survives a crash
                _progress_line(r, s)
    finally:
        if keep_work:
            print(f"[search] work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = round(time.time() - t_start, 1)
    res["load_avg_at_end"] = os.getloadavg()
    finish_analysis(res)
    res["plot"] = write_plot(res, base)
    save(str(base), res, markdown(res))
    Path(str(base) + ".json.tmp").unlink(missing_ok=True)
    print(f"plot: {Path(str(base) + '.html')}")
    return res


def merge(paths: list[str], name: str) -> dict[str, Any]:
    """One result from runs of the same settings on different sampler seeds, e.g. one seed per session (a 30-minute
    budget costs 1.5-2 h per seed on 2 cores). Each seed's comparison stays inside the run that made it (one
    machine, contenders alternating, each against the baseline of its own seed); the medians over seeds, the goal
    and the plot are recomputed over the union. Settings that decide what is compared must be equal, the
    baseline's precision (``trainer_bf16``, a property of the machine) included; seeds may not repeat."""
    if len(paths) < 2:
        raise SystemExit("--merge: give at least two result files of `python -m bench search`")
    parts = []
    for p in paths:
        try:
            res = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"--merge {p}: cannot read it as JSON ({e})") from None
        if res.get("benchmark") != "search" or "settings" not in res:
            raise SystemExit(f"--merge {p}: not a result of `python -m bench search`")
        parts.append(res)
    first = parts[0]["settings"]
    for p, res in zip(paths[1:], parts[1:]):
        differ = sorted(k for k in set(first) | set(res["settings"]) if k != "seeds" and first.get(k) != res["settings"].get(k))
        if differ:
            raise SystemExit(f"--merge {p}: its settings differ from {paths[0]} in {', '.join(differ)}; "
                             "only the sampler seeds may differ")
    seeds = [seed for res in parts for seed in res["settings"]["seeds"]]
    repeated = sorted({x for x in seeds if seeds.count(x) > 1})
    if repeated:
        raise SystemExit(f"--merge: sampler seed(s) {', '.join(map(str, repeated))} appear in more than one file")
    s = dict(first) | {"seeds": seeds}
    base = output_base(name)
    res = {"benchmark": "search", "settings": s, "command": command_line(s, name), "revision": parts[0].get("revision"),
           "started": parts[0].get("started"), "machine": parts[0]["machine"],
           "note": " / ".join(r["note"] for r in parts if r.get("note")) or None, "same_process": parts[0].get("same_process"),
           "model_path": parts[0].get("model_path"), "data_files": parts[0].get("data_files"),
           "runs": [copy.deepcopy(r) for part in parts for r in part["runs"]],
           "seconds": sum(r.get("seconds") or 0 for r in parts), "load_avg_at_end": None,
           "merged_from": [{"file": str(p), "seeds": r["settings"]["seeds"], "machine": r["machine"],
                            "revision": r.get("revision"), "started": r.get("started"), "seconds": r.get("seconds"),
                            "load_avg_at_end": r.get("load_avg_at_end"), "command": r.get("command")}
                           for p, r in zip(paths, parts)]}
    finish_analysis(res)
    res["plot"] = write_plot(res, base)
    save(str(base), res, markdown(res))
    return res


def _progress_line(r: dict[str, Any], s: dict[str, Any]) -> None:
    if r.get("error"):
        print(f"    FAILED ({r['error']}):\n{r.get('log_tail', '')}", flush=True)
        return
    fb, conf, c = r.get("final_best") or {}, r.get("confirmation"), r.get("counts") or {}
    print(f"    final best {_value(fb.get('value'), s['metric'])} at {fmt(fb.get('t_s'), 0)} s; trials {c.get('complete', 0)} "
          f"complete, {c.get('pruned', 0)} pruned; {r['evals_within_budget']} evaluations in the budget"
          + (f"; confirmed {_value(conf['mean'], s['metric'])} ± {_value(conf['std'], s['metric'])}" if conf else "")
          + f"; search {fmt(r.get('search_wall_s'), 0)} s", flush=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="sst2", choices=sorted(DATASETS), help="sst2 (classification) or e2e_nlg (generation)")
    p.add_argument("--budget", type=parse_seconds, help="wall clock per search (contender x seed), e.g. 30m (default 30m; --tiny 10s)")
    p.add_argument("--seeds", default="0,1", help="sampler seeds, comma-separated; every contender runs once per seed (default 0,1)")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated, from {', '.join(ALL_CONTENDERS)}")
    p.add_argument("--confirm-seeds", type=int, default=2,
                   help="extra training seeds the final best is retrained on, after the budget (default 2; 0: none)")
    p.add_argument("--rows", type=int, help="training rows (default sst2 1000, e2e_nlg 400)")
    p.add_argument("--val-rows", type=int, help="validation rows (default sst2 400, e2e_nlg 200: whole inputs)")
    p.add_argument("--max-length", type=int, help="default sst2 64, e2e_nlg 128")
    p.add_argument("--threads", type=int, help="torch threads in every contender (default: torch's / lmtune's own share)")
    p.add_argument("--warm-start", help="a finished lmtune study folder: adds the lmtune-warm contender")
    p.add_argument("--warm-start-top", type=int, default=3, help="configurations lmtune-warm takes from it (default 3)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model and tiny data: the code paths in under a minute")
    p.add_argument("--same-process", action="store_true", help="run the contenders in this process (default with --tiny only)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (every study, logs)")
    p.add_argument("--note", help="a line for the report (e.g. what else ran on the machine)")
    p.add_argument("--name", help="result name under bench/results, or a path (default search-DATA; --tiny: in the temp folder)")
    p.add_argument("--merge", nargs="+", metavar="RESULT_JSON",
                   help="no run: merge the result files of runs that differ only in their sampler seeds into --name")


def run_from_args(ns: argparse.Namespace) -> int:
    if ns.merge:
        if not ns.name:
            raise SystemExit("--merge needs --name (where the merged result goes)")
        merge(ns.merge, ns.name)
        return 0
    seeds = tuple(int(x) for x in str(ns.seeds).split(",") if x.strip())
    res = run(ns.budget, data=ns.data, rows=ns.rows, val_rows=ns.val_rows, max_length=ns.max_length, name=ns.name,
              seeds=seeds, contenders=tuple(ns.contenders.split(",")), confirm_seeds=ns.confirm_seeds, threads=ns.threads,
              warm_start=ns.warm_start, warm_start_top=ns.warm_start_top, tiny=ns.tiny,
              same_process=True if ns.same_process else None, keep_work=ns.keep_work, note=ns.note)
    return 1 if any(r.get("error") for r in res["runs"]) else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:  # one contender x seed in this fresh process
        t0 = time.time()
        spec = json.loads(argv[1])
        r = run_contender(spec, t0)
        Path(spec["result_file"]).write_text(json.dumps(r, default=str))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
