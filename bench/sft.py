"""Generation fine-tuning: lmtune vs TRL's ``SFTTrainer`` on E2E, and lmtune's decoding vs a plain generate loop.

    python -m bench sft                  # modest: 400 E2E pairs, batch 16, 1 epoch (25 steps), 2 repeats, 50 test inputs
    python -m bench sft --reference      # the issue's reference setting: 1,000 pairs, 100 test inputs
    python -m bench sft --contenders lmtune,sft-best,sft-padding-free,sft-default   # every TRL variant
    python -m bench sft _pool NAME A.json B.json   # quality over the training seeds of several runs (--seed N)
    python -m bench.sft --rows 48 --steps 3 --val-rows 16 --test-inputs 4 --repeats 1 --name /tmp/sft-smoke   # smoke

Part 1, training. The same model (the offline alias ``smollm2-135m-instruct``), the same rows (drawn once with
lmtune's sampler from ``e2e_nlg/train.csv``, written to CSV files every contender reads), the same chat-template
formatting, hyperparameters (lr, batch, warmup 6 %, linear decay, weight decay 0.01, clip 1.0, seed 0) and steps.
Each contender trains in its own fresh process (``python -m bench.sft _worker SPEC``), contenders alternate which
goes first from one repeat to the next:

* ``lmtune``: ``lmtune.train`` at its defaults (precision auto, length-grouped batches, completion-only loss),
  loss-only evaluation at the end (``eval_generate_rows=0``);
* ``sft-best``: ``trl.SFTTrainer`` with a conversational prompt/completion dataset (TRL applies the model's chat
  template), ``bf16=True`` where the CPU computes bf16 natively (AVX512-BF16 or AMX; elsewhere bf16 is emulated
  and slower than fp32, so fp32: the same rule as lmtune's ``--precision auto``), ``completion_only_loss=True``,
  ``train_sampling_strategy="group_by_length"``,
  ``gradient_checkpointing=False`` (SFTConfig turns it on by default; off is faster on CPU), ``max_length``;
* ``sft-padding-free`` (ablation): as ``sft-best`` with ``padding_free=True`` instead of length grouping (TRL
  requires ``max_length=None`` then; transformers builds block-diagonal masks from ``position_ids`` for SDPA);
* ``sft-default`` (ablation): SFTConfig's defaults (bf16, gradient checkpointing, completion-only loss for a
  prompt/completion dataset, random batches) with the same hyperparameters;
* ``lmtune-autocast`` (ablation): ``lmtune`` with ``precision="bf16"`` (autocast over fp32 weights: the residual
  stream and norms stay fp32, as in TRL's bf16) instead of auto's ``bf16-master`` (a bf16 model with fp32 master
  weights): whether a quality difference to TRL comes from the precision. It is compared like a TRL contender.
* ``lmtune-mega4`` (ablation): ``lmtune`` with transformers' mega-batch rule (``get_length_grouped_indices``: 50
  batches, or fewer so that the rows make at least four mega-batches) instead of lmtune's 50 batches whatever the
  data size. On 400 rows in batches of 16, lmtune's one mega-batch is the whole epoch, so every batch is a slice of
  one global length order (on E2E, mostly one number of attributes), where TRL's batches mix rows from a random
  96: whether that batch composition is what separates lmtune's quality from TRL's. Compared like a TRL contender.
* ``lmtune-trlorder`` (ablation): ``lmtune`` with transformers' whole batch order (``get_length_grouped_indices``,
  as TRL's ``group_by_length`` sampler uses it): at least four mega-batches, each sorted longest first and kept in
  that order, so an epoch is a few runs of batches from long to short, where lmtune shuffles the batches after
  grouping. ``lmtune-mega4`` matched the composition and left BLEU where it was; this matches the order too.
* ``lmtune-sdpa`` (ablation): ``lmtune`` with SDPA attention, as TRL trains, instead of ``lmtune_eager`` (which
  keeps the attention probabilities in bf16 and runs the softmax backward on them): with the same seed it sees the
  same batches as ``lmtune``, so it isolates the attention kernel's numerics. Over six seeds TRL's validation loss
  was 0.009 lower (Welch p 0.01) while precision, batch composition and order were each ruled out; on seeds 0 and 1
  this ablation matched lmtune's validation loss within 0.0004, so the kernel is ruled out as well.
* ``sft-lmtunelabels`` (ablation): ``sft-best`` with TRL's labels cut to lmtune's: every target after the row's last
  end-of-turn token (on SmolLM2 the newline the chat template writes after ``<|im_end|>``, 3 % of TRL's targets)
  set to -100, in the training and the evaluation rows. That newline is the one remaining difference between what
  the two train on (the token check of every run shows identical input ids). On seeds 0 and 1 it moved TRL's
  validation loss by +0.0003 and +0.0005 (1.3275, 1.3352 against sft-best's 1.3272, 1.3347), a twentieth of the
  gap to lmtune: the newline is ruled out too.
* ``lmtune-trlbatches`` (ablation): ``lmtune`` trained on the very batches ``sft-best`` drew with the same seed, in its
  order (TRL's sampler draws from the global torch RNG, so its indices are recorded as it yields them, and checked
  against the padded width of every batch the model was fed); ``sft-best`` runs first in each repeat. On seed 0 (an
  AVX2-only EPYC, TRL in fp32) it reached sft-best's validation loss, 1.3196 against 1.3197 (lmtune: 1.3258).
* ``sft-lmtunerows`` (ablation): ``sft-best`` trained and evaluated on lmtune's tokenised rows (the over-long rows cut
  at the prompt's start, as lmtune cuts them, and no target after the end-of-turn token), TRL's batches: 1.3196 on
  seed 0, with test outputs identical to ``lmtune-trlbatches``'. Same batches, same model: the gap is the batches.

Per process: s/step (median over steps 2..S, step 1 is the warm-up; a step is the time between two optimizer-step
ends, data loading included), tokens/s (target tokens and all non-pad tokens, counted from what the model was fed),
time per epoch = median s/step x steps per epoch + the contender's own validation-loss pass (measured), peak RSS
(``ru_maxrss``) right after that pass. Then, after the peak is read, the saved model is scored by the *same lmtune
code* for every contender: validation loss per completion token (``lmtune.tasks.generation._loss_over`` over
lmtune's encoding of the held-out rows) and test metrics (``Generator`` + ``generate_and_score``, the code path of
``lmtune.evaluate``, with ``max_length``, ``max_new_tokens`` and the stop ids pinned to the same values for every
model) on N test inputs, each scored against all its references.

Part 2, decoding. The lmtune model of the last repeat, fp32, the N test prompts, batch 16, the same
``max_new_tokens`` and stop ids, greedy: ``lmtune.decoding.generate`` (prompts sorted by length, left-padded, KV
cache) against a plain loop of ``model.generate`` over the prompts in file order (``apply_chat_template`` + the
tokenizer with left padding, as a transformers user writes it), each in a fresh process, alternating; a warm-up call
first; outputs compared prompt by prompt.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "smollm2-135m-instruct"
CONTENDERS = ("lmtune", "sft-best")
ALL_CONTENDERS = ("lmtune", "sft-best", "sft-padding-free", "sft-default", "lmtune-autocast", "lmtune-mega4",
                  "lmtune-trlorder", "lmtune-sdpa", "sft-lmtunelabels", "lmtune-trlbatches", "sft-lmtunerows")
SFT_FLAGS = {
    "lmtune-autocast": "lmtune.train defaults but --precision bf16 (autocast over fp32 weights, as TRL trains)",
    "lmtune-mega4": "lmtune.train defaults but length groups over at least 4 mega-batches (transformers' rule)",
    "lmtune-trlorder": "lmtune.train defaults but transformers' length-grouped batch order (descending runs, no shuffle)",
    "lmtune-sdpa": "lmtune.train defaults but SDPA attention (TRL's), not lmtune_eager (bf16 softmax backward)",
    "lmtune-trlbatches": "lmtune.train defaults but the very batches sft-best drew with the same seed, in its order",
    "sft-lmtunerows": "as sft-best, but trained and evaluated on lmtune's tokenised rows (over-long rows cut at the "
                      "prompt's start, no target after the end-of-turn token)",
    "sft-best": "bf16 (native bf16 CPUs; fp32 elsewhere), completion-only loss, group_by_length, no gradient checkpointing",
    "sft-lmtunelabels": "as sft-best, but no target after the end-of-turn token (lmtune's labels: the newline after "
                        "<|im_end|> masked)",
    "sft-padding-free": "bf16 (native bf16 CPUs; fp32 elsewhere), completion-only loss, padding_free (max_length=None), "
                        "no gradient checkpointing",
    "sft-default": "SFTConfig defaults: bf16, completion-only loss, gradient checkpointing, random batches",
}
REFERENCE = {"rows": 1000, "test_inputs": 100}
TRL_REFERENCE = ("Issue 9's reference measurement (another run, not this machine's numbers): TRL 1.16 SFTTrainer (bf16, "
                 "completion-only loss, batch 16, lr 5e-5, 1,000 E2E pairs, one epoch) 7.0 s/step, 440 s, 5.3 GB peak, "
                 "BLEU 54.3, ROUGE-L 59.3 on 100 test inputs; a plain bf16 PyTorch loop on the same batches 2.6 s/step.")


# ---- helpers shared by the orchestrator, the workers and the test -----------------------------------------------


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _median(xs: list[Any]) -> float | None:
    xs = [x for x in xs if x is not None]
    return float(statistics.median(xs)) if xs else None


def _fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def read_pairs(path: str) -> Any:
    """A prompt -> completion CSV with columns ``mr`` and ``ref`` as lmtune reads it (a GenTable)."""
    from lmtune.data.generation import read_generation_table
    return read_generation_table(path, prompt_column="mr", completion_column="ref")


def write_pairs(path: Path, table: Any) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["mr", "ref"])
        for e in table.examples:
            w.writerow([e.messages[0].content, e.completion])


def sft_dataset(table: Any) -> Any:
    """The rows in TRL's conversational prompt/completion format (TRL applies the model's chat template)."""
    from datasets import Dataset
    return Dataset.from_list([{"prompt": [{"role": "user", "content": e.messages[0].content}],
                               "completion": [{"role": "assistant", "content": e.completion}]} for e in table.examples])


def sft_config(spec: dict[str, Any], variant: str, output_dir: str) -> Any:
    """SFTConfig of a TRL contender: the common hyperparameters plus the variant's flags."""
    from trl import SFTConfig

    from lmtune.train.precision import native_bf16_cpu

    steps = spec["steps"]
    kw: dict[str, Any] = dict(
        output_dir=output_dir, per_device_train_batch_size=spec["batch"], per_device_eval_batch_size=spec["eval_batch"],
        learning_rate=spec["lr"], max_steps=steps, warmup_steps=int(round(spec["warmup_ratio"] * steps)),
        weight_decay=spec["weight_decay"], lr_scheduler_type="linear", max_grad_norm=1.0, seed=spec["seed"],
        report_to="none", save_strategy="no", logging_strategy="no", eval_strategy="no", disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0, max_length=spec["max_length"], completion_only_loss=True, bf16=True)
    best_precision = dict(bf16=native_bf16_cpu())  # TRL's fastest precision on this CPU, as lmtune's auto picks its own
    if variant in ("sft-best", "sft-lmtunelabels", "sft-lmtunerows"):
        kw |= dict(train_sampling_strategy="group_by_length", gradient_checkpointing=False, **best_precision)
    elif variant == "sft-padding-free":
        kw |= dict(padding_free=True, max_length=None, gradient_checkpointing=False, **best_precision)
    elif variant != "sft-default":
        raise ValueError(f"unknown TRL contender {variant}")
    return SFTConfig(**kw)


def labels_end_at_turn_end(dataset: Any, end_ids: list[int]) -> Any:
    """TRL's prepared rows with every label after a row's last end-of-turn token set to -100 (lmtune's labels)."""
    ends = set(end_ids)

    def cut(row: dict[str, Any]) -> dict[str, Any]:
        ids, labels = row["input_ids"], list(row["labels"])
        last = max((j for j, t in enumerate(ids) if t in ends), default=None)
        if last is not None:
            labels[last + 1:] = [-100] * (len(labels) - last - 1)
        return {"labels": labels}

    return dataset.map(cut)


def with_rows(dataset: Any, enc: Any) -> Any:
    """TRL's prepared rows replaced by lmtune's encoding of the same rows (input ids and labels, row for row)."""
    if len(dataset) != len(enc):
        raise ValueError(f"TRL kept {len(dataset)} rows, lmtune encoded {len(enc)}: the rows cannot be matched")
    return dataset.map(lambda row, i: {"input_ids": list(enc.input_ids[i]), "labels": list(enc.labels[i])},
                       with_indices=True)


class RecordingSampler:
    """A sampler that yields what ``inner`` yields and records it: ``epochs[k]`` holds the indices of the k-th pass
    (TRL's exact order; its length-grouped sampler draws from the global torch RNG, so it cannot be recomputed)."""

    def __init__(self, inner: Any, epochs: list[list[int]]):
        self.inner, self.epochs = inner, epochs

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        self.epochs.append([])
        for i in self.inner:
            self.epochs[-1].append(int(i))
            yield i


def epoch_batches(epochs: list[list[int]], batch_size: int) -> list[list[int]]:
    """The batches a data loader without drop_last cuts from recorded epochs, in order (a short batch ends each epoch)."""
    return [e[k: k + batch_size] for e in epochs for k in range(0, len(e), batch_size)]


def compare_tokens(trl_rows: list[tuple[list[int], list[int]]], enc: Any, tokenizer: Any) -> dict[str, Any]:
    """How TRL's prepared rows (input ids, labels) differ from lmtune's encoding of the same rows."""
    same_ids = same_labels = 0
    extra: dict[str, int] = {}
    trl_targets = lm_targets = 0
    examples: list[dict[str, Any]] = []
    for i, (ids, labels) in enumerate(trl_rows):
        lid, llab = enc.input_ids[i], enc.labels[i]
        same_ids += list(ids) == list(lid)
        same_labels += list(labels) == list(llab)
        trl_targets += sum(1 for y in labels if y != -100)
        lm_targets += sum(1 for y in llab if y != -100)
        if list(ids) == list(lid):
            for t, a, b in zip(ids, labels, llab):
                if a != b:
                    key = repr(tokenizer.decode([t])) + (" (TRL only)" if b == -100 else " (lmtune only)")
                    extra[key] = extra.get(key, 0) + 1
        elif len(examples) < 3:
            examples.append({"row": i, "trl_len": len(ids), "lmtune_len": len(lid),
                             "first_diff": next((j for j, (x, y) in enumerate(zip(ids, lid)) if x != y),
                                                min(len(ids), len(lid)))})
    return {"rows": len(trl_rows), "identical_input_ids": same_ids, "identical_labels": same_labels,
            "target_tokens_trl": trl_targets, "target_tokens_lmtune": lm_targets,
            "label_differences_on_identical_rows": extra, "differing_rows": examples}


# ---- the orchestrator ---------------------------------------------------------------------------------------------


def settings(ns: argparse.Namespace) -> dict[str, Any]:
    rows = ns.rows if ns.rows is not None else (REFERENCE["rows"] if ns.reference else 400)
    test_inputs = ns.test_inputs if ns.test_inputs is not None else (REFERENCE["test_inputs"] if ns.reference else 50)
    steps = ns.steps if ns.steps is not None else math.ceil(rows / ns.batch)
    return {"rows": rows, "val_rows": ns.val_rows, "test_inputs": test_inputs, "batch": ns.batch, "lr": ns.lr,
            "steps": steps, "epoch_steps": math.ceil(rows / ns.batch), "max_length": ns.max_length,
            "warmup_ratio": 0.06, "weight_decay": 0.01, "seed": getattr(ns, "seed", 0), "eval_batch": ns.batch,
            "decode_batch": ns.batch, "repeats": ns.repeats, "threads": ns.threads, "model": MODEL,
            "reference": bool(ns.reference), "skip_scores": bool(getattr(ns, "skip_scores", False)),
            "seed_per_repeat": bool(getattr(ns, "seed_per_repeat", False))}


def prepare(s: dict[str, Any], work: Path, data_dir: Path) -> dict[str, Any]:
    """Draw the rows once and write them where every contender reads them; count what tokenising gives."""
    import numpy as np

    from lmtune.config import DataConfig
    from lmtune.data.generation import encode_generation, load_generation_data, stop_token_ids
    from lmtune.decoding import default_max_new_tokens
    from lmtune.models import load_tokenizer, resolve

    e2e = data_dir / "e2e_nlg"
    bundle = load_generation_data(DataConfig(train_file=str(e2e / "train.csv"), prompt_column="mr",
                                             completion_column="ref", max_train_rows=s["rows"],
                                             max_val_rows=s["val_rows"], split_seed=42))
    test = read_pairs(str(e2e / "test.csv"))
    groups = list(test.groups().values())
    pick = sorted(int(g) for g in np.random.default_rng(42).permutation(len(groups))[: s["test_inputs"]])
    test = test.subset([i for g in pick for i in groups[g]])
    files = {"train_csv": work / "train.csv", "val_csv": work / "val.csv", "test_csv": work / "test.csv"}
    write_pairs(files["train_csv"], bundle.train)
    write_pairs(files["val_csv"], bundle.val)
    write_pairs(files["test_csv"], test)
    path = resolve(MODEL).path
    tok = load_tokenizer(path)
    enc = encode_generation(tok, read_pairs(str(files["train_csv"])), s["max_length"])
    val_enc = encode_generation(tok, read_pairs(str(files["val_csv"])), s["max_length"])
    return {**{k: str(v) for k, v in files.items()}, "model_path": path,
            "max_new_tokens": default_max_new_tokens([int(n) for n in enc.target_tokens]),
            "stop_ids": stop_token_ids(tok, "auto"),
            "data": {"train_rows": len(bundle.train), "train_inputs": len(bundle.train.groups()),
                     "val_rows": len(bundle.val), "val_inputs": len(bundle.val.groups()),
                     "test_rows": len(test), "test_inputs": len(test.groups()),
                     "train_tokens": int(sum(enc.lengths)), "train_target_tokens": int(sum(enc.target_tokens)),
                     "train_rows_over_max_length": len(enc.cut) + len(enc.completion_too_long),
                     "val_rows_over_max_length": len(val_enc.cut) + len(val_enc.completion_too_long),
                     "train_row_tokens_max": int(max(enc.lengths)),
                     "train_row_tokens_median": float(np.median(enc.lengths))}}


def run_worker(spec: dict[str, Any], work: Path, label: str, timeout: float = 7200) -> dict[str, Any]:
    """One contender in a fresh process (fair peak RSS, nothing cached in memory); its result."""
    wd = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=work))
    spec = dict(spec, workdir=str(wd), result_file=str(wd / "result.json"))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    if spec.get("threads"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(spec["threads"])
    t0 = time.time()
    with open(wd / "log.txt", "w") as log:
        p = subprocess.run([sys.executable, "-m", "bench.sft", "_worker", json.dumps(spec)], cwd=ROOT, env=env,
                           stdout=log, stderr=subprocess.STDOUT, timeout=timeout)
    out = wd / "result.json"
    if p.returncode != 0 or not out.is_file():
        sys.stderr.write((wd / "log.txt").read_text()[-6000:])
        raise RuntimeError(f"worker {label} failed (exit {p.returncode}); log {wd / 'log.txt'}")
    r = json.loads(out.read_text())
    r["process_wall_s"] = round(time.time() - t0, 2)
    return r


TRAIN_METRICS = ("median_s_per_step", "mean_s_per_step", "train_epoch_s", "val_pass_s", "epoch_s", "median_cpu_s_per_step",
                 "epoch_cpu_s", "target_tokens_per_s",
                 "tokens_per_s", "padding_share", "peak_rss_mb", "val_loss", "own_val_loss", "test_loss", "test_bleu",
                 "test_rougeL", "test_chrf", "test_token_f1", "test_exact_match", "mean_test_completion_tokens")


def run(ns: argparse.Namespace) -> dict[str, Any]:
    from bench.common import data_dir, machine

    s = settings(ns)
    contenders = tuple(c for c in ns.contenders.split(",") if c)
    bad = [c for c in contenders if c not in ALL_CONTENDERS]
    if bad:
        raise SystemExit(f"unknown contender(s) {bad}; known: {', '.join(ALL_CONTENDERS)}")
    if "lmtune-trlbatches" in contenders and s["steps"] > s["epoch_steps"]:  # lmtune asks its sampler once per epoch
        raise SystemExit(f"lmtune-trlbatches replays one epoch of TRL's batches: --steps {s['steps']} is more than an "
                         f"epoch ({s['epoch_steps']} steps)")
    if ns.threads:
        import torch
        torch.set_num_threads(ns.threads)
    m = machine()
    t_start = time.time()
    work = Path(tempfile.mkdtemp(prefix="lmtune-sft-bench-"))
    try:
        prep = prepare(s, work, data_dir())
        d = prep["data"]
        print(f"[sft] {d['train_rows']} training pairs ({d['train_inputs']} inputs), {d['val_rows']} validation pairs "
              f"({d['val_inputs']} inputs), {d['test_inputs']} test inputs ({d['test_rows']} references); "
              f"{s['steps']} steps; max_new_tokens {prep['max_new_tokens']}", flush=True)
        base = {k: s[k] for k in ("batch", "lr", "steps", "max_length", "warmup_ratio", "weight_decay", "seed",
                                   "eval_batch", "threads", "model", "skip_scores")} | {k: v for k, v in prep.items() if k != "data"}
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
        keep = work / "decode-model"
        for rep in range(s["repeats"]):
            order = contenders if rep % 2 == 0 else tuple(reversed(contenders))
            if "lmtune-trlbatches" in order:  # it trains on the batches sft-best drew with the same seed: after it
                rest = [c for c in order if c != "lmtune-trlbatches"]
                at = rest.index("sft-best") + 1 if "sft-best" in rest else len(rest)
                order = tuple(rest[:at] + ["lmtune-trlbatches"] + rest[at:])
            for c in order:
                print(f"[sft] repeat {rep + 1}/{s['repeats']}: {c} ...", flush=True)
                last_lmtune = c == "lmtune" and rep == s["repeats"] - 1
                seed = s["seed"] + rep if s["seed_per_repeat"] else s["seed"]
                extra = {}
                if c == "lmtune-trlbatches":
                    drawn = [r for r in runs.get("sft-best", []) if r.get("seed") == seed]
                    if not drawn:
                        raise SystemExit("lmtune-trlbatches trains on sft-best's batches: add sft-best to --contenders")
                    if not drawn[-1].get("train_batches_match_fed"):
                        raise SystemExit("lmtune-trlbatches: sft-best's recorded batches do not match what its model was fed")
                    extra["trl_batches"] = drawn[-1]["train_batches"]
                r = run_worker(base | extra | {"contender": c, "seed": seed, "keep_model": str(keep) if last_lmtune else None},
                               work, c)
                r["seed"] = seed
                runs[c].append(r)
                print(f"    {_fmt(r['median_s_per_step'])} s/step, epoch {_fmt(r['epoch_s'], 1)} s, "
                      f"{_fmt(r['target_tokens_per_s'], 0)} target tok/s, peak RSS {_fmt(r['peak_rss_mb'], 0)} MB, "
                      f"val loss {_fmt(r.get('val_loss'), 4)}, test BLEU {_fmt(r.get('test_bleu'))} ROUGE-L {_fmt(r.get('test_rougeL'))}",
                      flush=True)
        decode = None
        if not ns.skip_decode and keep.is_dir():
            decode = run_decode(base, work, keep, s["repeats"], s["decode_batch"])
        from bench.baselines import nearest_neighbour_baseline
        floor = nearest_neighbour_baseline(prep["train_csv"], prep["test_csv"], prompt_column="mr", completion_column="ref")
    finally:
        if ns.keep_work:
            print(f"[sft] work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    med = {c: {k: _median([r.get(k) for r in rs]) for k in TRAIN_METRICS} for c, rs in runs.items()}
    ratios = {}
    if "lmtune" in med:
        L = med["lmtune"]
        for c in contenders:
            if c == "lmtune":
                continue
            B = med[c]
            ratios[c] = {"epoch_speedup": B["epoch_s"] / L["epoch_s"],
                         "train_epoch_speedup": B["train_epoch_s"] / L["train_epoch_s"],
                         "step_speedup": B["median_s_per_step"] / L["median_s_per_step"],
                         "cpu_epoch_speedup": _ratio(B["epoch_cpu_s"], L["epoch_cpu_s"]),
                         "cpu_step_speedup": _ratio(B["median_cpu_s_per_step"], L["median_cpu_s_per_step"]),
                         "memory_ratio": L["peak_rss_mb"] / B["peak_rss_mb"],
                         "val_loss_diff": _diff(L["val_loss"], B["val_loss"]),
                         "bleu_diff": _diff(L["test_bleu"], B["test_bleu"]),
                         "rougeL_diff": _diff(L["test_rougeL"], B["test_rougeL"]),
                         "per_repeat_epoch_speedup": [b["epoch_s"] / a["epoch_s"] for a, b in zip(runs["lmtune"], runs[c])],
                         "quality_over_seeds": quality_over_seeds(runs["lmtune"], runs[c]) if s["seed_per_repeat"] else None}
    result = {"benchmark": "generation-vs-sft", "settings": s, "data": prep["data"],
              "max_new_tokens": prep["max_new_tokens"], "stop_ids": prep["stop_ids"], "machine": m,
              "libraries": _versions(), "medians": med, "ratios_lmtune_vs": ratios, "runs": runs,
              "decode": decode, "nearest_neighbour_floor": floor, "seconds": round(time.time() - t_start, 1),
              "load_avg_at_end": os.getloadavg(), "note": ns.note, "revision": _revision()}
    _save(ns.name, result, markdown(result))
    return result


QUALITY = (("val_loss", False), ("test_bleu", True), ("test_rougeL", True))


def quality_over_seeds(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and standard deviation over training seeds of each quality measure, and whether lmtune is equal or
    better: its mean is better, or worse by less than the larger of the two seed standard deviations."""
    out: dict[str, Any] = {}
    for key, higher_is_better in QUALITY:
        a = [r[key] for r in ours if isinstance(r.get(key), (int, float))]
        b = [r[key] for r in theirs if isinstance(r.get(key), (int, float))]
        if len(a) < 2 or len(b) < 2:
            continue
        ma, mb, sa, sb = statistics.fmean(a), statistics.fmean(b), statistics.stdev(a), statistics.stdev(b)
        worse_by = (mb - ma) if higher_is_better else (ma - mb)
        out[key] = {"lmtune_mean": ma, "lmtune_std": sa, "other_mean": mb, "other_std": sb, "n": min(len(a), len(b)),
                    "equal_or_better": worse_by <= max(sa, sb), "welch_p": _welch_p(a, b)}
    return out


def _welch_p(a: list[float], b: list[float]) -> float | None:
    """Two-sided p-value of Welch's t-test (unequal variances): how often seed noise alone would give a gap as
    large as this one. With three seeds a side it is a weak test; it says how far from settled the gap is."""
    from scipy.stats import ttest_ind

    if statistics.stdev(a) == 0 and statistics.stdev(b) == 0:
        return None
    return float(ttest_ind(a, b, equal_var=False).pvalue)


# Settings that must agree for runs to be pooled over seeds (the seed itself and the repeat count may differ).
POOL_SETTINGS = ("rows", "val_rows", "test_inputs", "batch", "lr", "steps", "max_length", "warmup_ratio",
                 "weight_decay", "model")


def pool_seeds(results: list[dict[str, Any]], sources: list[str]) -> dict[str, Any]:
    """Pool the per-seed quality of several runs of one setting (e.g. seeds 0-2, then --seed 3 for 3-5).

    Quality only: each run's speed ratios belong to its own machine and load, so they are not pooled. A seed
    measured in two runs is kept once (training is deterministic per seed on one build; a disagreement is
    recorded, not hidden)."""
    first = results[0]["settings"]
    for src, res in zip(sources[1:], results[1:]):
        differ = [k for k in POOL_SETTINGS if res["settings"].get(k) != first.get(k)]
        if differ:
            raise ValueError(f"{src}: settings differ from {sources[0]} in {', '.join(differ)}; only seeds may differ")
    by_seed: dict[str, dict[int, dict[str, Any]]] = {}
    repeated = []
    for src, res in zip(sources, results):
        for c, rs in res["runs"].items():
            for r in rs:
                if r.get("seed") is None:
                    raise ValueError(f"{src}: a {c} run has no seed (made before --seed-per-repeat recorded it)")
                seen = by_seed.setdefault(c, {}).get(r["seed"])
                if seen is None:
                    by_seed[c][r["seed"]] = r | {"source": src}
                else:
                    repeated.append({"contender": c, "seed": r["seed"], "sources": [seen["source"], src],
                                     "same_quality": all(seen.get(k) == r.get(k) for k, _ in QUALITY)})
    runs = {c: [v[k] for k in sorted(v)] for c, v in by_seed.items()}
    if "lmtune" not in runs:
        raise ValueError("no lmtune runs to compare")
    return {"benchmark": "generation-vs-sft-pooled", "settings": {k: first.get(k) for k in POOL_SETTINGS},
            "sources": sources, "machines": [res["machine"] for res in results], "runs": runs, "repeated_seeds": repeated,
            "quality_over_seeds": {c: _paired_quality(runs["lmtune"], rs) for c, rs in runs.items() if c != "lmtune"}}


def _paired_quality(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any]:
    """quality_over_seeds on the seeds both sides ran: an ablation measured on three seeds is set against lmtune's
    same three, not against all six."""
    common = {r["seed"] for r in ours} & {r["seed"] for r in theirs}
    return quality_over_seeds([r for r in ours if r["seed"] in common], [r for r in theirs if r["seed"] in common])


def quality_table(q: dict[str, Any], other: str) -> list[str]:
    """The seed comparison as a markdown table (the legend first)."""
    lines = ["Mean +- std over training seeds; **equal or better**: lmtune's mean is better, or worse by less than the "
             "larger seed std; Welch p: two-sided t-test, unequal variances (small p: a gap seed noise rarely gives).", "",
             f"| measure | lmtune | {other} | equal or better | Welch p |", "|---|---|---|---|---|"]
    for key, v in q.items():
        nd = 4 if key == "val_loss" else 2
        lines.append(f"| {key} ({v['n']} seeds) | {v['lmtune_mean']:.{nd}f} +- {v['lmtune_std']:.{nd}f} "
                     f"| {v['other_mean']:.{nd}f} +- {v['other_std']:.{nd}f} | {'yes' if v['equal_or_better'] else '**no**'} "
                     f"| {_fmt(v.get('welch_p'), 3)} |")
    return lines


def pooled_markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    seeds = sorted({r["seed"] for rs in res["runs"].values() for r in rs})
    lines = [f"## Generation quality over training seeds: lmtune vs TRL SFTTrainer, E2E, {s['rows']} training pairs, "
             f"batch {s['batch']}, {s['steps']} steps, lr {s['lr']:g}, {s['test_inputs']} test inputs", "",
             f"Pooled from {', '.join(f'`{Path(x).name}`' for x in res['sources'])} (`python -m bench sft _pool`): "
             f"training seeds {', '.join(map(str, seeds))}. Quality only; each file has its own speed ratios.", ""]
    names = list(res["runs"])
    lines += ["| seed | " + " | ".join(f"{c} val loss | {c} BLEU | {c} ROUGE-L" for c in names) + " |",
              "|---|" + "---|---|---|" * len(names)]
    for seed in seeds:
        cells = []
        for c in names:
            r = next((r for r in res["runs"][c] if r["seed"] == seed), {})
            cells += [_fmt(r.get("val_loss"), 4), _fmt(r.get("test_bleu")), _fmt(r.get("test_rougeL"))]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    for c, q in res["quality_over_seeds"].items():
        lines += ["", f"lmtune vs {c}:", ""] + quality_table(q, c)
    if res["repeated_seeds"]:
        same = sum(r["same_quality"] for r in res["repeated_seeds"])
        lines += ["", f"Seeds measured in more than one file: {len(res['repeated_seeds'])} (kept once); identical quality "
                  f"in {same} of them."]
    return "\n".join(lines)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _signed(x: float | None, nd: int = 2) -> str:
    return "-" if x is None else f"{x:+.{nd}f}"


def run_decode(base: dict[str, Any], work: Path, model_dir: Path, repeats: int, batch: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"decode-lmtune": [], "decode-plain": []}
    for rep in range(repeats):
        order = ("decode-lmtune", "decode-plain") if rep % 2 == 0 else ("decode-plain", "decode-lmtune")
        for c in order:
            print(f"[sft] decoding repeat {rep + 1}/{repeats}: {c} ...", flush=True)
            r = run_worker(base | {"contender": c, "model_dir": str(model_dir), "decode_batch": batch}, work, c)
            runs[c].append(r)
            print(f"    {_fmt(r['seconds'], 1)} s, {_fmt(r['new_tokens_per_s'], 0)} new tok/s", flush=True)
    a, b = runs["decode-lmtune"][0], runs["decode-plain"][0]
    same_prompts = a.pop("prompt_ids") == b.pop("prompt_ids")
    for rs in runs.values():
        for r in rs[1:]:
            r.pop("prompt_ids", None)
    texts_a, texts_b = a.pop("texts"), b.pop("texts")
    for rs in runs.values():
        for r in rs:
            r.pop("texts", None)
    same = sum(x == y for x, y in zip(texts_a, texts_b))
    med = {c: {k: _median([r[k] for r in rs]) for k in ("seconds", "new_tokens_per_s", "positions_per_s", "padding_share")}
           for c, rs in runs.items()}
    return {"runs": runs, "medians": med, "identical_prompt_ids": same_prompts, "identical_outputs": same,
            "prompts": len(texts_a), "speedup": med["decode-plain"]["seconds"] / med["decode-lmtune"]["seconds"],
            "differing_examples": [{"lmtune": x, "plain": y} for x, y in zip(texts_a, texts_b) if x != y][:5]}


def _revision() -> str | None:
    """The git commit the run's code came from (``LMTUNE_BENCH_REVISION`` when run from a copy), "+dirty" if changed."""
    if os.environ.get("LMTUNE_BENCH_REVISION"):
        return os.environ["LMTUNE_BENCH_REVISION"]
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {}
    for p in ("torch", "transformers", "trl", "accelerate", "datasets", "lmtune"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    return out


def _save(name: str, result: dict[str, Any], text: str) -> None:
    path = Path(name) if ("/" in name or name.startswith(".")) else ROOT / "bench" / "results" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    path.with_suffix(".md").write_text(text.rstrip() + "\n")
    print(text)
    print(f"\nwrote {path.with_suffix('.json')} and {path.with_suffix('.md')}")


def markdown(res: dict[str, Any]) -> str:
    from bench.common import machine_line

    s, d, med, rat = res["settings"], res["data"], res["medians"], res["ratios_lmtune_vs"]
    lm = (res["runs"].get("lmtune") or [{}])[0]
    lines = [f"## Generation fine-tuning: lmtune vs TRL SFTTrainer, E2E, {d['train_rows']} training pairs, batch {s['batch']}, "
             f"{s['steps']} steps (one epoch = {s['epoch_steps']}), lr {s['lr']:g}, max length {s['max_length']}, "
             f"median of {s['repeats']} repeat(s)", "",
             machine_line(res["machine"]) + " " + ", ".join(f"{k} {v}" for k, v in res["libraries"].items()) + ".", ""]
    if res.get("note"):
        lines += [res["note"], ""]
    lines += [f"Data: {d['train_rows']} pairs over {d['train_inputs']} inputs drawn from `e2e_nlg/train.csv` (lmtune's "
              f"sampler, seed 42), {d['val_rows']} held-out validation pairs ({d['val_inputs']} inputs, never trained on), "
              f"{d['test_inputs']} test inputs ({d['test_rows']} references) from `e2e_nlg/test.csv` (seeded sample). "
              f"{d['train_rows_over_max_length']} training rows exceed {s['max_length']} tokens. Model `{s['model']}` "
              f"(SmolLM2-135M-Instruct), ChatML template for every contender. Precision: "
              + ", ".join(f"{c} {(rs or [{}])[0].get('precision', '?')}" for c, rs in res["runs"].items()) + ".",
              "",
              "Time per epoch = median s/step (warm-up step excluded) x steps per epoch + the contender's own "
              "validation-loss pass. Peak RSS = `ru_maxrss` of the contender's fresh process after that pass. "
              "Validation loss (per completion token) and the test scores come from the same lmtune code for every "
              f"saved model (fp32, greedy, max_new_tokens {res['max_new_tokens']}, stop ids {res['stop_ids']}).", "",
              "| contender | flags | s/step | epoch s (train + val pass) | target tok/s | all tok/s | padding share | peak RSS MB "
              "| val loss | test BLEU | test ROUGE-L | test chrF |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, m in med.items():
        flags = SFT_FLAGS.get(c, f"lmtune.train defaults ({lm.get('precision', '?')}, {lm.get('attn', '?')} attention)")
        lines.append(f"| {c} | {flags} | {_fmt(m['median_s_per_step'], 3)} | {_fmt(m['epoch_s'], 1)} "
                     f"({_fmt(m['train_epoch_s'], 1)} + {_fmt(m['val_pass_s'], 1)}) | {_fmt(m['target_tokens_per_s'], 0)} | "
                     f"{_fmt(m['tokens_per_s'], 0)} | {_fmt(m['padding_share'], 3)} | {_fmt(m['peak_rss_mb'], 0)} | "
                     f"{_fmt(m['val_loss'], 4)} | {_fmt(m['test_bleu'])} | {_fmt(m['test_rougeL'])} | {_fmt(m['test_chrf'])} |")
    per = ["", "Per repeat (in run order within each repeat):", "",
           "| contender | repeat | s/step | epoch s | peak RSS MB | val loss | test BLEU | test ROUGE-L |", "|---|---|---|---|---|---|---|---|"]
    for c, rs in res["runs"].items():
        for i, r in enumerate(rs):
            per.append(f"| {c} | {i + 1} | {_fmt(r['median_s_per_step'], 3)} | {_fmt(r['epoch_s'], 1)} | {_fmt(r['peak_rss_mb'], 0)} | "
                       f"{_fmt(r.get('val_loss'), 4)} | {_fmt(r.get('test_bleu'))} | {_fmt(r.get('test_rougeL'))} |")
    lines += per
    if rat:
        lines += ["", "Ratios, lmtune vs each TRL contender (speed-up > 1 and memory ratio < 1 favour lmtune):", "",
                  "| baseline | epoch speed-up (train + val pass) | train-only speed-up | step speed-up | per-repeat epoch speed-ups "
                  "| memory lmtune/TRL | val loss diff | BLEU diff | ROUGE-L diff |", "|---|---|---|---|---|---|---|---|---|"]
        for c, r in rat.items():
            lines.append(f"| {c} | {_fmt(r['epoch_speedup'])}x | {_fmt(r['train_epoch_speedup'])}x | {_fmt(r['step_speedup'])}x | "
                         f"{', '.join(_fmt(x) for x in r['per_repeat_epoch_speedup'])} | {_fmt(r['memory_ratio'])} | "
                         f"{_signed(r['val_loss_diff'], 4)} | {_signed(r['bleu_diff'])} | {_signed(r['rougeL_diff'])} |")
        if "sft-best" in rat:
            r = rat["sft-best"]
            goal = r["epoch_speedup"] >= 3.0
            lines += ["", f"Goal (>= 3x faster per epoch than SFTTrainer's best CPU flags at equal or better BLEU/ROUGE-L, "
                      f"peak memory below its): speed **{'met' if goal else 'not met'}** ({_fmt(r['epoch_speedup'])}x), "
                      f"memory **{'met' if r['memory_ratio'] < 1 else 'not met'}** (ratio {_fmt(r['memory_ratio'])}); "
                      f"quality, lmtune minus TRL: BLEU {_signed(r['bleu_diff'])}, ROUGE-L {_signed(r['rougeL_diff'])}, "
                      f"validation loss {_signed(r['val_loss_diff'], 4)} ({d['test_inputs']} test inputs, "
                      + ("medians over the repeats' seeds)." if r.get("quality_over_seeds") else
                         "one training seed: the spread across seeds was not measured).")]
            q = r.get("quality_over_seeds")
            if q:
                lines += ["", f"Quality over training seeds (repeat k trains with seed {s['seed']}+k-1):", ""]
                lines += quality_table(q, "SFTTrainer")
    tc = next((r.get("token_check") for rs in res["runs"].values() for r in rs if r.get("token_check")), None)
    if tc:
        diffs = ", ".join(f"{k}: {v}" for k, v in tc["label_differences_on_identical_rows"].items()) or "none"
        lines += ["", f"Token sequences: TRL's prepared rows vs lmtune's encoding of the same rows: identical input ids in "
                  f"{tc['identical_input_ids']}/{tc['rows']} rows, identical labels in {tc['identical_labels']}/{tc['rows']}; "
                  f"target tokens TRL {tc['target_tokens_trl']}, lmtune {tc['target_tokens_lmtune']}; label differences on "
                  f"rows with identical ids: {diffs}. Rows over max length: TRL keeps their start (cuts the completion's "
                  "end), lmtune keeps the completion and cuts the prompt's start."]
    f = res.get("nearest_neighbour_floor")
    if f:
        lines += ["", f"Nearest-neighbour floor on the same training rows and test inputs: BLEU {_fmt(f['test_bleu'])}, "
                  f"ROUGE-L {_fmt(f['test_rougeL'])}, chrF {_fmt(f['test_chrf'])}."]
    dec = res.get("decode")
    if dec:
        dm = dec["medians"]
        lines += ["", f"### Decoding: lmtune.decoding.generate vs a plain model.generate loop ({dec['prompts']} test prompts, "
                  f"batch {s['decode_batch']}, greedy, max_new_tokens {res['max_new_tokens']}, fp32, KV cache in both)", "",
                  "| contender | seconds | new tokens/s | positions/s (incl. padding) | padding share of positions |", "|---|---|---|---|---|"]
        for c, m in dm.items():
            lines.append(f"| {c} | {_fmt(m['seconds'], 2)} | {_fmt(m['new_tokens_per_s'], 1)} | {_fmt(m['positions_per_s'], 0)} | "
                         f"{_fmt(m['padding_share'], 3)} |")
        lines += ["", f"Speed-up of lmtune's decoding: {_fmt(dec['speedup'])}x. Identical prompt ids: "
                  f"{dec['identical_prompt_ids']}; identical greedy outputs: {dec['identical_outputs']}/{dec['prompts']}."]
        if dec.get("rerun"):
            lines += ["", f"(Decoding rerun on its own at {dec['rerun']['at']} UTC with `python -m bench.sft _decode`, load "
                      f"average at its end {tuple(round(x, 2) for x in dec['rerun']['load_avg_at_end'])}: the first pass "
                      "encoded lmtune's prompts together with their references, which cut "
                      f"{d.get('test_inputs_prompt_cut', 'some')} of them; both sides now get the prompts alone, as "
                      "`lmtune predict` encodes them.)"]
    ab = res.get("ablation")
    if ab:
        lines += ["", ablation_markdown(ab)]
    lines += ["", TRL_REFERENCE, "",
              f"Load average at start {tuple(round(x, 2) for x in res['machine']['load_avg_at_start'])}, at end "
              f"{tuple(round(x, 2) for x in res['load_avg_at_end'])}; whole run {res['seconds']:.0f} s."]
    return "\n".join(lines)


def ablation_markdown(ab: dict[str, Any]) -> str:
    """A shorter run's table (speed and memory; ``--skip-scores``), embedded in the main result as ``ablation``."""
    s, med, rat = ab["settings"], ab["medians"], ab["ratios_lmtune_vs"]
    lines = [f"### Ablation: TRL's other CPU settings ({s['steps']} steps of the same {ab['data']['train_rows']} pairs, "
             f"median of {s['repeats']} repeat(s), speed and memory only; epoch s = median s/step x {s['epoch_steps']} + "
             "the validation-loss pass)", "",
             f"Separate run right after the main one; load average at start "
             f"{tuple(round(x, 2) for x in ab['machine']['load_avg_at_start'])}, at end "
             f"{tuple(round(x, 2) for x in ab['load_avg_at_end'])}.", "",
             "CPU s = `time.process_time()` of the contender's process (one torch thread each): what the work cost, "
             "much less sensitive than wall time to what else runs on the machine.", "",
             "| contender | flags | s/step | CPU s/step | epoch s | epoch CPU s | target tok/s | padding share | peak RSS MB "
             "| lmtune epoch speed-up (wall) | (CPU) | memory lmtune/TRL |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, m in med.items():
        r = rat.get(c, {})
        lines.append(f"| {c} | {SFT_FLAGS.get(c, 'lmtune.train defaults')} | {_fmt(m['median_s_per_step'], 3)} | "
                     f"{_fmt(m.get('median_cpu_s_per_step'), 3)} | {_fmt(m['epoch_s'], 1)} | {_fmt(m.get('epoch_cpu_s'), 1)} | "
                     f"{_fmt(m['target_tokens_per_s'], 1)} | {_fmt(m['padding_share'], 3)} | {_fmt(m['peak_rss_mb'], 0)} | "
                     f"{_fmt(r.get('epoch_speedup')) + 'x' if r else '-'} | "
                     f"{_fmt(r.get('cpu_epoch_speedup')) + 'x' if r.get('cpu_epoch_speedup') else '-'} | "
                     f"{_fmt(r.get('memory_ratio')) if r else '-'} |")
    return "\n".join(lines)


# ---- the workers (one fresh process each) -----------------------------------------------------------------------


def _step_stats(starts: list[float], ends: list[float], tokens: list[int], targets: list[int], padded: list[int],
                steps_per_epoch: int, cpu_starts: list[float], cpu_ends: list[float]) -> dict[str, Any]:
    """Wall and CPU (``time.process_time``, all threads of the process) seconds per step, tokens/s, padding."""
    cpu = [cpu_ends[0] - cpu_starts[0]] + [b - a for a, b in zip(cpu_ends, cpu_ends[1:])]
    med_cpu = statistics.median(cpu[1:]) if cpu[1:] else cpu[0]
    times = [ends[0] - starts[0]] + [b - a for a, b in zip(ends, ends[1:])]
    st, tk, tg, pd = times[1:], tokens[1:], targets[1:], padded[1:]
    med = statistics.median(st) if st else times[0]
    return {"steps": len(times), "warmup_step_s": times[0], "median_s_per_step": med,
            "mean_s_per_step": sum(st) / len(st) if st else None, "step_times": [round(t, 4) for t in times],
            "tokens_per_s": sum(tk) / sum(st) if st else None, "target_tokens_per_s": sum(tg) / sum(st) if st else None,
            "padding_share": 1 - sum(tk) / sum(pd) if sum(pd) else None, "train_tokens": int(sum(tokens)),
            "train_target_tokens": int(sum(targets)), "steps_per_epoch": steps_per_epoch,
            "train_epoch_s": med * steps_per_epoch, "median_cpu_s_per_step": med_cpu,
            "cpu_step_times": [round(t, 4) for t in cpu], "train_epoch_cpu_s": med_cpu * steps_per_epoch}


def transformers_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, drop_last: bool = False) -> list[list[int]]:
    """One epoch's batches in the order transformers' ``group_by_length`` sampler (TRL's) yields them."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = get_length_grouped_indices(lengths, batch_size, generator=g)
    out = [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
    if drop_last and out and len(out[-1]) < batch_size:
        out.pop()
    return out


def _replace_training_batches(rule: Any) -> None:
    """In this worker process only: lmtune's shuffled, length-grouped training batches come from ``rule(sampler,
    epoch)`` instead; evaluation batches (unshuffled) stay lmtune's."""
    from lmtune.data.batching import LengthGroupedSampler
    lmtune_batches = LengthGroupedSampler.batches

    def batches(self, epoch=None):
        if not (self.shuffle and self.group_by_length):
            return lmtune_batches(self, epoch)
        return rule(self, epoch)

    LengthGroupedSampler.batches = batches


def _train_lmtune(spec: dict[str, Any]) -> tuple[dict[str, Any], str]:
    import importlib

    import lmtune
    from lmtune.tasks.generation import GenerationTask

    loop = importlib.import_module("lmtune.train.loop")
    counts = {"tokens": 0, "targets": 0, "padded": 0}
    starts: list[float] = []
    ends: list[float] = []
    cpu_starts: list[float] = []
    cpu_ends: list[float] = []
    val_cpu: list[float] = []
    per_step: dict[str, list[int]] = {"tokens": [], "targets": [], "padded": []}
    orig_step, orig_loss, orig_eval = loop._optimizer_step, GenerationTask.loss_sum, loop._evaluate

    def loss_sum(self, model, enc, rows, pad_id, device):
        out = orig_loss(self, model, enc, rows, pad_id, device)
        lens = [enc.lengths[i] for i in rows]
        counts["tokens"] += sum(lens)
        counts["targets"] += sum(enc.target_tokens[i] for i in rows)
        counts["padded"] += len(lens) * max(lens)
        return out

    def optimizer_step(*a, **k):
        if not starts:
            starts.append(time.perf_counter())
            cpu_starts.append(time.process_time())
        before = dict(counts)
        r = orig_step(*a, **k)
        ends.append(time.perf_counter())
        cpu_ends.append(time.process_time())
        for key in per_step:
            per_step[key].append(counts[key] - before[key])
        return r

    orig_load = GenerationTask.load_model
    attn: list[str] = []

    def load_model(self, *a, **k):
        loaded = orig_load(self, *a, **k)
        attn.append(str(getattr(loaded.model.config, "_attn_implementation", "?")))
        return loaded

    def evaluate(*a, **k):
        c0 = time.process_time()
        r = orig_eval(*a, **k)
        val_cpu.append(time.process_time() - c0)
        return r

    loop._optimizer_step, GenerationTask.loss_sum, GenerationTask.load_model = optimizer_step, loss_sum, load_model
    loop._evaluate = evaluate
    rss: list[float] = []

    def on_eval(ev):
        rss.append(_rss_mb())

    out_dir = spec["workdir"] + "/model"
    cfg = lmtune.RunConfig(
        data=lmtune.DataConfig(train_file=spec["train_csv"], val_file=spec["val_csv"], task="generation",
                               prompt_column="mr", completion_column="ref"),
        model=lmtune.ModelConfig(name=spec["model"],
                                 attn_implementation="sdpa" if spec["contender"] == "lmtune-sdpa" else "auto"),
        train=lmtune.TrainConfig(learning_rate=spec["lr"], global_batch_size=spec["batch"], epochs=1, max_steps=spec["steps"],
                                 warmup_ratio=spec["warmup_ratio"], weight_decay=spec["weight_decay"],
                                 max_length=spec["max_length"], seed=spec["seed"], eval_batch_size=spec["eval_batch"],
                                 eval_generate_rows=0, max_new_tokens=spec["max_new_tokens"], log_every_steps=1,
                                 progress=False, save_checkpoints=False,
                                 precision="bf16" if spec["contender"] == "lmtune-autocast" else "auto"),
        output_dir=out_dir, overwrite=True, report=False)
    if spec["contender"] == "lmtune-mega4":
        from lmtune.data.batching import LengthGroupedSampler
        lmtune_init = LengthGroupedSampler.__init__

        def transformers_rule(self, lengths, batch_size, **kw):  # this worker process only
            kw.setdefault("mega_batch_factor", max(1, min(50, len(lengths) // (batch_size * 4))))
            lmtune_init(self, lengths, batch_size, **kw)

        LengthGroupedSampler.__init__ = transformers_rule
    if spec["contender"] == "lmtune-trlorder":
        _replace_training_batches(lambda smp, epoch: transformers_batches(
            smp.lengths.tolist(), smp.batch_size, smp.seed, smp.epoch if epoch is None else epoch, smp.drop_last))
    fed: list[list[int]] = []
    trl_batches = [[int(i) for i in b] for b in spec.get("trl_batches") or []]
    if spec["contender"] == "lmtune-trlbatches":
        _replace_training_batches(lambda smp, epoch: trl_batches)  # the batches sft-best drew, in its order
        step_rows = loop._optimizer_step

        def record_rows(s_, st, step_batch, first_batch):
            fed.append([int(i) for i in step_batch])
            return step_rows(s_, st, step_batch, first_batch)

        loop._optimizer_step = record_rows
    t0 = time.time()
    res = lmtune.train(cfg, on_evaluate=on_eval, quiet=True)
    rec = res.record
    out = _step_stats(starts, ends, per_step["tokens"], per_step["targets"], per_step["padded"],
                      math.ceil(rec["data"]["rows"]["train"] / spec["batch"]), cpu_starts, cpu_ends)
    out["val_pass_cpu_s"] = val_cpu[-1] if val_cpu else None
    out |= {"precision": rec.get("precision"), "attn": attn[-1] if attn else None,
            "val_pass_s": rec["timing"]["eval_seconds"], "own_val_loss": rec["history"][-1]["val_loss"],
            "peak_rss_mb": rss[-1] if rss else _rss_mb(), "train_call_s": time.time() - t0,
            "train_rows": rec["data"]["rows"]["train"]}
    if spec["contender"] == "lmtune-trlbatches":
        out["batches_match_trl"] = fed == trl_batches and len(fed) == spec["steps"]
    return out, out_dir


def _train_sft(spec: dict[str, Any], variant: str) -> tuple[dict[str, Any], str]:
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging
    from trl import SFTTrainer

    from lmtune.data.generation import encode_generation, stop_token_ids
    from lmtune.models import load_tokenizer

    hf_logging.set_verbosity_error()
    train_table, val_table = read_pairs(spec["train_csv"]), read_pairs(spec["val_csv"])
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    args = sft_config(spec, variant, spec["workdir"] + "/trl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = SFTTrainer(model=spec["model_path"], args=args, train_dataset=sft_dataset(train_table),
                             eval_dataset=sft_dataset(val_table), processing_class=tok)
    if variant == "sft-lmtunelabels":
        end_ids = stop_token_ids(tok, "auto")
        trainer.train_dataset = labels_end_at_turn_end(trainer.train_dataset, end_ids)
        trainer.eval_dataset = labels_end_at_turn_end(trainer.eval_dataset, end_ids)
    lm_tok = load_tokenizer(spec["model_path"])
    lm_enc = encode_generation(lm_tok, train_table, spec["max_length"])
    if variant == "sft-lmtunerows":
        trainer.train_dataset = with_rows(trainer.train_dataset, lm_enc)
        trainer.eval_dataset = with_rows(trainer.eval_dataset, encode_generation(lm_tok, val_table, spec["max_length"]))
    ds = trainer.train_dataset
    epochs: list[list[int]] = []  # the training indices the sampler yields, per pass
    if args.train_sampling_strategy == "group_by_length":  # accelerate swaps a plain RandomSampler for its own: keep it
        make_sampler = trainer._get_train_sampler
        trainer._get_train_sampler = lambda *a, **k: RecordingSampler(make_sampler(*a, **k), epochs)
    token_check = compare_tokens(list(zip(ds["input_ids"], ds["labels"])), lm_enc, tok)

    counts = {"tokens": 0, "targets": 0, "padded": 0}
    batch_widths: list[int] = []  # the padded width of every training batch the model was fed
    model = trainer.model

    def pre_hook(module, args_, kwargs):
        if module.training:
            ids, mask, labels = kwargs.get("input_ids"), kwargs.get("attention_mask"), kwargs.get("labels")
            counts["padded"] += int(ids.numel())
            batch_widths.append(int(ids.shape[1]))
            counts["tokens"] += int(mask.sum()) if mask is not None else int(ids.numel())
            if labels is not None:
                counts["targets"] += int((labels != -100).sum())

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    starts: list[float] = []
    ends: list[float] = []
    cpu_starts: list[float] = []
    cpu_ends: list[float] = []
    per_step: dict[str, list[int]] = {"tokens": [], "targets": [], "padded": []}

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            if not starts:
                starts.append(time.perf_counter())
                cpu_starts.append(time.process_time())
                self.c = dict(counts)

        def on_step_end(self, a, state, control, **kw):
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())
            for key in per_step:
                per_step[key].append(counts[key] - self.c[key])
            self.c = dict(counts)

    trainer.add_callback(Timer())
    t0 = time.time()
    trainer.train()
    t1, c1 = time.time(), time.process_time()
    ev = trainer.evaluate()
    val_pass, val_cpu = time.time() - t1, time.process_time() - c1
    peak = _rss_mb()
    out = _step_stats(starts, ends, per_step["tokens"], per_step["targets"], per_step["padded"],
                      math.ceil(len(train_table) / spec["batch"]), cpu_starts, cpu_ends)
    out["val_pass_cpu_s"] = val_cpu
    out_dir = spec["workdir"] + "/model"
    trainer.save_model(out_dir)
    out |= {"precision": "bf16 autocast" if args.bf16 else "fp32", "attn": model.config._attn_implementation,
            "val_pass_s": val_pass, "own_val_loss": ev.get("eval_loss"), "peak_rss_mb": peak,
            "train_call_s": t1 - t0, "train_rows": len(ds), "token_check": token_check,
            "gradient_checkpointing": bool(args.gradient_checkpointing), "optim": str(args.optim),
            "torch_threads": torch.get_num_threads()}
    if epochs:
        batches = epoch_batches(epochs, spec["batch"])[: spec["steps"]]
        out["train_batches"] = batches
        # The recording is what the model was fed if each batch's padded width is its longest recorded row.
        widths = [max(len(ds[i]["input_ids"]) for i in b) for b in batches]
        out["train_batches_match_fed"] = len(batches) == spec["steps"] and widths == batch_widths[: len(widths)]
    return out, out_dir


def _score_saved(spec: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """Validation loss and test metrics of a saved model, by lmtune's own evaluation code, settings pinned."""
    from lmtune.tasks.generation import Generator, _loss_over, generate_and_score

    g = Generator(model_dir, max_new_tokens=spec["max_new_tokens"])
    g.max_length, g.stop_ids, g.chat_template = spec["max_length"], list(spec["stop_ids"]), "auto"
    device = next(g.model.parameters()).device
    pad = g.tokenizer.pad_token_id
    out: dict[str, Any] = {}
    t0 = time.time()
    venc = g.encode(g.read(spec["val_csv"], require_completion=True, prompt_column="mr", completion_column="ref"))
    vsum, vtok = _loss_over(g.model, venc, spec["eval_batch"], pad, device)
    out |= {"val_loss": vsum / max(1, vtok), "val_target_tokens": vtok}
    test = g.read(spec["test_csv"], require_completion=True, prompt_column="mr", completion_column="ref")
    tenc = g.encode(test)
    tsum, ttok = _loss_over(g.model, tenc, spec["eval_batch"], pad, device)
    t1 = time.time()
    scored = generate_and_score(g.model, g.tokenizer, test, tenc, stop_ids=g.stop_ids, max_new_tokens=g.max_new_tokens,
                                batch_size=spec["eval_batch"], pad_id=pad)
    out |= {"test_loss": tsum / max(1, ttok), **{f"test_{k}": v for k, v in scored["metrics"].items()},
            "test_generate_s": time.time() - t1, "score_s": time.time() - t0,
            "mean_test_completion_tokens": statistics.mean(len(g.tokenizer(e["prediction"], add_special_tokens=False)["input_ids"])
                                                           for e in scored["examples"]),
            "test_examples": scored["examples"][:3]}
    return out


def _decode(spec: dict[str, Any], plain: bool) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    table = read_pairs(spec["test_csv"])
    firsts = [g[0] for g in table.groups().values()]
    n, batch, new = len(firsts), spec["decode_batch"], spec["max_new_tokens"]
    stops = list(spec["stop_ids"])
    if plain:
        tok = AutoTokenizer.from_pretrained(spec["model_dir"])
        tok.padding_side = "left"
        model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32).eval()
        texts = [tok.apply_chat_template([{"role": "user", "content": table.examples[i].messages[0].content}],
                                         add_generation_prompt=True, tokenize=False) for i in firsts]
        prompt_ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]

        def one(lo: int, hi: int, max_new: int) -> tuple[list[list[int]], int]:
            enc = tok(texts[lo:hi], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                                     pad_token_id=tok.pad_token_id)
            return out[:, enc["input_ids"].shape[1]:].tolist(), int(out.numel())

        def everything(max_new: int, k: int | None = None) -> tuple[list[list[int]], int]:
            rows, positions = [], 0
            for lo in range(0, k or n, batch):
                r, p = one(lo, min(lo + batch, k or n), max_new)
                rows += r
                positions += p
            return rows, positions

        everything(2, k=min(n, batch))  # warm-up
        t0 = time.perf_counter()
        rows, positions = everything(new)
        secs = time.perf_counter() - t0
        outs = [_cut(r, set(stops)) for r in rows]
        texts_out = [t.strip() for t in tok.batch_decode(outs, skip_special_tokens=True, clean_up_tokenization_spaces=False)]
    else:
        from lmtune.decoding import decode, generate, plan_batches
        from lmtune.tasks.generation import Generator

        from dataclasses import replace

        from lmtune.data.generation import GenExample

        g = Generator(spec["model_dir"], max_new_tokens=new)
        # The prompts alone, as `lmtune predict` encodes them: encoded with its reference, a prompt whose row is
        # longer than max_length would lose its start (lmtune's evaluation does that; see the report).
        prompts = replace(table, examples=[GenExample(table.examples[i].messages[:1], table.examples[i].line, True)
                                           for i in firsts])
        prompt_ids = g.encode(prompts).prompt_ids
        pad = g.tokenizer.pad_token_id
        generate(g.model, prompt_ids[:batch], pad_id=pad, stop_ids=stops, max_new_tokens=2, batch_size=batch)  # warm-up
        t0 = time.perf_counter()
        outs = generate(g.model, prompt_ids, pad_id=pad, stop_ids=stops, max_new_tokens=new, batch_size=batch)
        secs = time.perf_counter() - t0
        texts_out = decode(g.tokenizer, outs)
        # positions computed: each batch runs to its longest completion (+1 for a stop token) over its longest prompt
        positions = 0
        for b in plan_batches([len(p) for p in prompt_ids], batch):
            steps = min(new, max(len(outs[i]) + 1 for i in b))
            positions += len(b) * (max(len(prompt_ids[i]) for i in b) + steps)
    new_tokens = sum(min(new, len(o) + 1) for o in outs)  # completion + its stop token
    real = sum(len(p) for p in prompt_ids) + new_tokens
    return {"seconds": secs, "prompts": n, "new_tokens": new_tokens, "new_tokens_per_s": new_tokens / secs,
            "positions": positions, "positions_per_s": positions / secs, "padding_share": 1 - real / positions,
            "texts": texts_out, "prompt_ids": [list(map(int, p)) for p in prompt_ids], "peak_rss_mb": _rss_mb(),
            "torch_threads": torch.get_num_threads()}


def _cut(row: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[:i]
    return row


def worker_main(spec: dict[str, Any]) -> int:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    c = spec["contender"]
    if c.startswith("decode-"):
        out = _decode(spec, plain=c == "decode-plain")
    else:
        torch.manual_seed(spec["seed"])
        out, model_dir = _train_lmtune(spec) if c.startswith("lmtune") else _train_sft(spec, c)
        out["epoch_s"] = out["train_epoch_s"] + out["val_pass_s"]
        out["epoch_cpu_s"] = out["train_epoch_cpu_s"] + out["val_pass_cpu_s"]
        if not spec.get("skip_scores"):
            out |= _score_saved(spec, model_dir)
        if spec.get("keep_model"):
            shutil.copytree(model_dir, spec["keep_model"])
    out["contender"] = c
    out["torch_threads"] = torch.get_num_threads()
    Path(spec["result_file"]).write_text(json.dumps(out, default=str))
    return 0


# ---- command line -------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, help="training pairs (default 400; --reference 1000)")
    p.add_argument("--test-inputs", type=int, help="test inputs scored, each with all its references (default 50; --reference 100)")
    p.add_argument("--reference", action="store_true", help="the issue's reference setting: 1,000 pairs, 100 test inputs")
    p.add_argument("--val-rows", type=int, default=200, help="held-out validation pairs (whole inputs; default 200)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--steps", type=int, help="training steps (default one epoch: ceil(rows / batch))")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0,
                   help="training seed (with --seed-per-repeat the first: repeat k trains with seed SEED+k-1); a second "
                        "run with --seed 3 adds seeds to a first one's, pooled by `python -m bench sft _pool`")
    p.add_argument("--seed-per-repeat", action="store_true",
                   help="repeat k trains every contender with seed SEED+k-1: the quality comparison gets a seed "
                        "spread (default: seed SEED in every repeat, which repeats the same run)")
    p.add_argument("--threads", type=int, help="torch threads in every contender (default torch's); 1 on a busy machine")
    p.add_argument("--contenders", default=",".join(CONTENDERS), help=f"comma-separated, from {', '.join(ALL_CONTENDERS)}")
    p.add_argument("--skip-decode", action="store_true", help="no decoding comparison")
    p.add_argument("--skip-scores", action="store_true", help="no validation loss / test scores of the saved models (speed only)")
    p.add_argument("--keep-work", action="store_true", help="keep the work folder (data, logs, models)")
    p.add_argument("--note", help="a line for the report (e.g. what else ran on the machine)")
    p.add_argument("--name", default="generation-vs-sft",
                   help="result name under bench/results, or a path (the .json/.md suffixes are added)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        return worker_main(json.loads(argv[1]))
    if argv[:1] == ["_merge"]:  # embed a shorter ablation run (its .json) into a main result, then re-render
        path = Path(argv[1])
        res = json.loads(path.read_text())
        res["ablation"] = json.loads(Path(argv[2]).read_text())
        path.write_text(json.dumps(res, indent=2, default=str) + "\n")
        path.with_suffix(".md").write_text(markdown(res).rstrip() + "\n")
        return 0
    if argv[:1] == ["_decode"]:  # rerun the decoding part into a result: _decode RESULT.json WORK_FOLDER [REPEATS]
        path, work = Path(argv[1]), Path(argv[2])
        res = json.loads(path.read_text())
        st = res["settings"]
        base = {"test_csv": str(work / "test.csv"), "max_new_tokens": res["max_new_tokens"], "stop_ids": res["stop_ids"],
                "threads": st["threads"], "seed": st["seed"]}
        res["decode"] = run_decode(base, work, work / "decode-model", int(argv[3]) if len(argv) > 3 else st["repeats"],
                                   st["decode_batch"])
        res["decode"]["rerun"] = {"at": time.strftime("%Y-%m-%d %H:%M"), "load_avg_at_end": os.getloadavg()}
        path.write_text(json.dumps(res, indent=2, default=str) + "\n")
        path.with_suffix(".md").write_text(markdown(res).rstrip() + "\n")
        return 0
    if argv[:1] == ["_pool"]:  # _pool OUT_NAME RESULT.json RESULT.json ...: quality over the seeds of several runs
        sources = argv[2:]
        try:
            pooled = pool_seeds([json.loads(Path(x).read_text()) for x in sources], sources)
        except (OSError, ValueError, KeyError) as exc:
            print(f"python -m bench sft _pool: {exc}", file=sys.stderr)
            return 2
        _save(argv[1], pooled, pooled_markdown(pooled))
        return 0
    if argv[:1] == ["_render"]:  # rebuild a result's .md (after a change to the report), and its seed statistics
        path = Path(argv[1])
        res = json.loads(path.read_text())
        if res["settings"].get("seed_per_repeat") and "lmtune" in res["runs"]:
            for c, r in res["ratios_lmtune_vs"].items():
                r["quality_over_seeds"] = quality_over_seeds(res["runs"]["lmtune"], res["runs"][c])
            path.write_text(json.dumps(res, indent=2, default=str) + "\n")
        path.with_suffix(".md").write_text(markdown(res).rstrip() + "\n")
        return 0
    from bench.common import standalone

    return standalone("python -m bench sft", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
