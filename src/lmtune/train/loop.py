"""The fine-tuning recipe: setup -> train (evaluate, checkpoint) -> save. Read it top to bottom.

Batches: the sampler yields *step batches* of ``global_batch_size`` examples grouped by length. Each
process takes its share of a step batch and splits it into micro-batches; the loss of each
micro-batch is the sum of its per-example losses divided by the examples in the whole step (times
the number of processes, which DDP divides out again), so the gradient is the mean over the global
batch whatever the micro-batch size. That is what lets an out-of-memory error halve the
micro-batch and retry the same step without changing the optimisation.

Two things stop a run as diverged, before anything is saved: a loss or gradient that is not finite, and
a training loss that climbs far above where the run started (see :func:`_check_divergence`).
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune._console import log, progress
from lmtune._io import atomic_write_json, atomic_write_text, ensure_writable_dir
from lmtune.config import RunConfig
from lmtune.errors import CheckpointError, ConfigError, DivergenceError, LmtuneError
from lmtune.train import checkpoint as ckpt
from lmtune.data.batching import LengthGroupedSampler, collate
from lmtune.train.metrics import classification_metrics, format_metrics, softmax
from lmtune.train.precision import MASTER, MasterWeights, resolve_precision

RECORD_FILE = "lmtune_run.json"
# The divergence rule (see _check_divergence): the mean training loss of the last DIVERGENCE_WINDOW optimizer
# steps against --divergence-factor x the run's starting loss, judged from step DIVERGENCE_FIRST_CHECK on.
DIVERGENCE_WINDOW = 10
DIVERGENCE_FIRST_CHECK = 4


class Interrupted(LmtuneError):
    """SIGINT/SIGTERM arrived; a checkpoint of the last finished step was written."""


@dataclass
class EvalEvent:
    """What an ``on_evaluate`` callback sees after each evaluation. It may raise to stop the run."""

    step: int
    epoch: float
    total_steps: int
    metrics: dict[str, Any]
    is_best: bool
    micro_batch_size: int


@dataclass
class TrainResult:
    output_dir: str
    best: dict[str, Any]
    """Metrics of the best evaluation, with its step and epoch."""
    history: list[dict[str, Any]]
    record: dict[str, Any] = field(repr=False)


@dataclass
class Resources:
    """Things a search reuses across trials (tokenised data, resolved models). Optional for one run."""

    tokenized_cache_dir: str | None = None
    data_bundle: Any = None


def _micro_batches(indices: list[int], micro: int) -> list[list[int]]:
    return [indices[i : i + micro] for i in range(0, len(indices), micro)]


def _stop_requested_handler(flag: dict[str, Any]) -> Callable:
    def handler(signum, frame):  # noqa: ARG001
        if flag.get("stop"):
            raise KeyboardInterrupt
        flag["stop"] = signal.Signals(signum).name
    return handler


def train(cfg: RunConfig, *, on_evaluate: Callable[[EvalEvent], None] | None = None,
          resources: Resources | None = None, quiet: bool = False) -> TrainResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` and write a transformers folder to ``cfg.output_dir``.

    ``on_evaluate`` sees every evaluation and may raise to stop the run (a search prunes this way);
    ``quiet`` moves the per-run log lines to debug level (a search prints one line per trial instead).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import get_scheduler
    from transformers.utils import logging as hf_logging

    from lmtune.data import load_data
    from lmtune.data.batching import encode
    from lmtune.models import cache_root, load_classifier, resolve, to_plain_transformers

    t_start = time.time()
    say = log.debug if quiet else log.info
    tc, out = cfg.train, Path(cfg.output_dir)
    ckpt_root = out / "checkpoints"
    record_path = out / RECORD_FILE

    # ---- setup -----------------------------------------------------------------------------------
    ensure_writable_dir(out, "--out")
    if out.exists() and record_path.is_file() and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"--output-dir {out} already holds a finished run; pass --overwrite to replace it")
    resume_from = None
    if cfg.resume:
        resume_from = ckpt.latest_checkpoint(ckpt_root)
        if resume_from is None and record_path.is_file():
            import json
            record = json.loads(record_path.read_text())
            say(f"--resume: {out} already holds a finished run; nothing to do")
            return TrainResult(str(out), record["best"], record["history"], record)
        if resume_from is None:
            say(f"--resume: no usable checkpoint in {ckpt_root}; starting from the beginning")
        elif resume_from["state"].get("config") != _resumable_config(cfg):
            raise CheckpointError(
                f"{resume_from['path']}: written by a run with a different configuration; "
                "resume with the same flags, or drop --resume"
            )
    elif ckpt_root.exists():
        shutil.rmtree(ckpt_root)

    # accelerate keeps its state per process; a second run in the same process (a search, a notebook,
    # the Python API) may use another precision, so start from a clean state. The process group, if
    # any, lives in PartialState and is kept.
    from accelerate.state import AcceleratorState, PartialState
    AcceleratorState._reset_state(reset_partial_state=False)
    n_procs = PartialState(cpu=not torch.cuda.is_available()).num_processes
    master_ok = cfg.model.method == "full" and n_procs == 1
    if tc.precision == MASTER and not master_ok:
        raise ConfigError(f"--precision {MASTER} needs --method full and one process (got --method {cfg.model.method}, "
                          f"{n_procs} process(es)); use --precision bf16")
    mixed = resolve_precision(tc.precision, master_ok=master_ok)
    # bf16-master computes in a bf16 model itself: no autocast on top.
    accelerator = Accelerator(mixed_precision="no" if mixed == MASTER else mixed, cpu=not torch.cuda.is_available())
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
    show = tc.progress and main
    set_seed(tc.seed)
    hf_logging.disable_progress_bar()
    try:  # save_pretrained's "Writing model shards" bar comes from huggingface_hub
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()
    except ImportError:
        pass

    bundle = (resources.data_bundle if resources and resources.data_bundle is not None else load_data(cfg.data))
    labels = bundle.label_map.labels
    if main:
        s = bundle.summary
        say(f"data: {s['rows']['train']} training rows, {s['rows']['val']} validation rows "
                 f"({s['val_source']}), {len(labels)} classes" + _skipped_note(s))
        for w in s.get("warnings", []):
            log.warning(f"warning: {w}")

    resolved = resolve(cfg.model.name, cfg.model.cache_dir)
    loaded = load_classifier(cfg.model, labels, resolved=resolved, max_length=tc.max_length)
    model, tokenizer = loaded.model, loaded.tokenizer
    tok_cache = (resources.tokenized_cache_dir if resources and resources.tokenized_cache_dir
                 else str(cache_root(cfg.model.cache_dir) / "tokenized"))
    train_enc = encode(tokenizer, bundle.train, bundle.train_ids, tc.max_length, cache_dir=tok_cache)
    val_enc = encode(tokenizer, bundle.val, bundle.val_ids, tc.max_length, cache_dir=tok_cache)
    pad_id = tokenizer.pad_token_id

    micro = min(tc.micro_batch_size or math.ceil(tc.global_batch_size / world), math.ceil(tc.global_batch_size / world))
    sampler = LengthGroupedSampler(train_enc.lengths, tc.global_batch_size, shuffle=True, seed=tc.seed,
                                   group_by_length=tc.group_by_length)
    steps_per_epoch = len(sampler.batches(0))
    total_steps = steps_per_epoch * tc.epochs
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)

    master = MasterWeights(model) if mixed == MASTER else None  # casts the model to bf16
    updated = master.by_name() if master else {n: p for n, p in model.named_parameters() if p.requires_grad}
    decay, no_decay = [], []
    for n, p in updated.items():
        (no_decay if p.ndim < 2 or "norm" in n.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = _adamw(groups, tc.learning_rate)
    scheduler = get_scheduler(tc.lr_schedule, optimizer, num_warmup_steps=int(round(tc.warmup_ratio * total_steps)),
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    if main:
        say(f"model: {cfg.model.name} ({_millions(loaded.total_params)} parameters, "
                 f"{_millions(loaded.trainable_params)} trainable, method {cfg.model.method}); precision "
                 f"{'fp32' if mixed == 'no' else mixed}; {world} process(es); "
                 f"batch {tc.global_batch_size} = micro {micro} x {world} process(es) x accumulation")
        say(f"steps: {steps_per_epoch} per epoch, {total_steps} in all; max length {tc.max_length} "
                 f"({train_enc.truncated} of {len(train_enc)} training texts truncated)")

    # ---- state (fresh or resumed) ----------------------------------------------------------------
    st: dict[str, Any] = {
        "global_step": 0, "epoch": 0, "step_in_epoch": 0, "history": [], "train_log": [],
        "best": None, "evals_without_improvement": 0, "micro_batch_size": micro,
        "train_tokens": 0, "padded_tokens": 0, "running_loss": 0.0, "running_n": 0, "train_seconds": 0.0, "eval_seconds": 0.0,
        "recent_losses": [], "loss_reference": None, "warnings": [], "config": _resumable_config(cfg),
    }
    if resume_from is not None:
        ckpt.load_trainable_state(accelerator.unwrap_model(model), resume_from["trainable.safetensors"], str(resume_from["path"]))
        if master:  # the fp32 weights of the checkpoint, not their bf16 rounding in the model
            master.load(resume_from["trainable.safetensors"])
        optimizer.load_state_dict(resume_from["optimizer.pt"])
        scheduler.load_state_dict(resume_from["scheduler.pt"])
        ckpt.set_rng_state(resume_from["rng.pt"])
        st.update(resume_from["state"])
        micro = st["micro_batch_size"]
        if main:
            say(f"resumed from {resume_from['path']} (step {st['global_step']}, epoch {st['epoch'] + 1})")
    if cfg.resume and tc.save_checkpoints:
        # checkpoints/best is verified like the step checkpoints: a corrupt one would otherwise only fail
        # at the very end of the run. Every process settles st["best"] alike from what it reads; once all
        # have read, the main process rewrites the folder to match.
        weights, problem = _settle_best(ckpt_root, st, out, main)
        accelerator.wait_for_everyone()
        if main and problem and weights is not None:
            ckpt.write_folder_atomically(ckpt_root / "best", {"trainable.safetensors": weights},
                                         {"step": st["best"]["step"], "metrics": st["best"]})
        elif main and st["best"] is None:  # no evaluation counts yet: a best folder here is from a lost one
            shutil.rmtree(ckpt_root / "best", ignore_errors=True)
            (out / "val_predictions.jsonl").unlink(missing_ok=True)

    stop = {"stop": None}
    old_handlers = {}
    if main or world == 1:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old_handlers[sig] = signal.signal(sig, _stop_requested_handler(stop))
            except ValueError:  # not the main thread (e.g. a search running trials in threads)
                pass

    eval_batch = {"size": tc.eval_batch_size or 2 * micro}

    def evaluate_now() -> dict[str, Any]:
        t0 = time.time()
        while True:
            try:
                logits = predict_logits(model, val_enc, eval_batch["size"], pad_id, accelerator)
                break
            except torch.OutOfMemoryError:
                if eval_batch["size"] <= 1 or world > 1:
                    raise
                eval_batch["size"] //= 2  # evaluation holds no gradients, but long texts can still not fit
                st.setdefault("oom_events", []).append({"step": st["global_step"], "eval_batch_size": eval_batch["size"]})
                log.warning(f"out of memory in evaluation: evaluation batch lowered to {eval_batch['size']}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        st["eval_seconds"] += time.time() - t0
        return classification_metrics(logits, np.asarray(val_enc.labels), labels, detailed=True) | {"_logits": logits}

    best_in_memory: dict[str, Any] = {}

    def trainable_now(copy: bool = False) -> dict[str, torch.Tensor]:
        """The weights being trained, at full precision (the fp32 masters under bf16-master)."""
        return master.state(copy=copy) if master else ckpt.trainable_state(accelerator.unwrap_model(model), copy=copy)

    def save_state() -> None:
        if not tc.save_checkpoints:
            return
        if main:
            ckpt.save_checkpoint(ckpt_root, st["global_step"], trainable_now(), optimizer, scheduler, st)
        accelerator.wait_for_everyone()

    def after_eval(metrics: dict[str, Any], train_loss: float | None) -> bool:
        """Record an evaluation, keep the best weights, checkpoint; returns True to stop early."""
        logits = metrics.pop("_logits")
        entry = {"step": st["global_step"], "epoch": round(st["global_step"] / steps_per_epoch, 4),
                 "train_loss": train_loss, **{k: v for k, v in metrics.items() if k not in ("per_class", "confusion_matrix")},
                 "lr": scheduler.get_last_lr()[0], "elapsed_s": round(st["train_seconds"] + st["eval_seconds"], 3)}
        value = metrics[tc.metric]
        if not math.isfinite(metrics["val_loss"]):
            raise DivergenceError(f"validation loss is {metrics['val_loss']} at step {st['global_step']}; "
                                  f"lower --lr (now {tc.learning_rate:g})")
        best = st["best"]
        improved = best is None or (value > best[tc.metric] if tc.higher_is_better else value < best[tc.metric])
        st["history"].append(entry | {"is_best": improved})
        if improved:
            st["best"] = dict(entry) | {"per_class": metrics["per_class"], "confusion_matrix": metrics["confusion_matrix"]}
            st["evals_without_improvement"] = 0
            if main and not tc.save_checkpoints:  # a search trial: no resume, so the best weights need not survive the process
                best_in_memory.pop("weights", None)  # free the previous best before copying the new one
                if st["global_step"] < total_steps:
                    best_in_memory["weights"] = trainable_now(copy=True)
                # else: the last evaluation is the best, and the weights in the model are those weights;
                # a copy would only add a full set of weights (~0.5 GB per 135M parameters) to the peak.
        else:
            st["evals_without_improvement"] += 1
        if main:
            say(f"epoch {entry['epoch']:.2f}  step {entry['step']}/{total_steps}  {format_metrics(entry)}"
                     + ("  (best)" if improved else ""))
        save_state()
        if improved and main:
            if tc.save_checkpoints:
                # After the step checkpoint: a crash in between leaves a best folder one evaluation behind the
                # newest checkpoint, which a resume rebuilds from that checkpoint (the same weights).
                ckpt.write_folder_atomically(ckpt_root / "best", {"trainable.safetensors": trainable_now()},
                                             {"step": st["global_step"], "metrics": st["best"]})
            _write_predictions(out / "val_predictions.jsonl", bundle.val, val_enc.labels, softmax(logits), labels)
        if on_evaluate is not None:
            on_evaluate(EvalEvent(st["global_step"], entry["epoch"], total_steps, entry, improved, micro))
        patience = tc.early_stopping_patience
        if patience is not None and st["evals_without_improvement"] >= patience:
            if main:
                say(f"early stopping: {tc.metric} did not improve in {patience} evaluation(s)")
            return True
        return False

    # ---- train -----------------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    model.train()
    stopped_early = False
    bar = progress(total_steps, "training", show, initial=st["global_step"])
    fault_step = int(os.environ.get("LMTUNE_FAULT_KILL_AT_STEP", "0") or 0)  # reliability tests: a real kill -9
    try:
        while st["global_step"] < total_steps and not stopped_early:
            epoch = st["epoch"]
            step_batches = sampler.batches(epoch)
            while st["step_in_epoch"] < len(step_batches) and st["global_step"] < total_steps:
                if stop["stop"]:
                    save_state()
                    where = (f"checkpoint written to {ckpt_root}; rerun with --resume to continue"
                             if tc.save_checkpoints else "no checkpoint (checkpoints are off)")
                    raise Interrupted(f"{stop['stop']}: stopped at step {st['global_step']}; {where}")
                t0 = time.time()
                step_batch = step_batches[st["step_in_epoch"]]
                if world > 1 and len(step_batch) < world:  # every process must take part in each step
                    step_batch = step_batch + step_batches[0][: world - len(step_batch)]
                share = [int(i) for i in np.array_split(np.asarray(step_batch), world)[rank]]
                n_step = len(step_batch)
                loss_sum, micro = _train_step(model, optimizer, accelerator, train_enc, share, n_step, world,
                                              micro, pad_id, st, main, master)
                loss_sum = accelerator.reduce(torch.tensor(loss_sum, device=device), "sum").item()
                step_loss = loss_sum / n_step
                grad_norm = master.grad_norm() if master else _clip(accelerator, model, tc.max_grad_norm)
                if not math.isfinite(step_loss) or not math.isfinite(grad_norm):
                    raise DivergenceError(
                        f"training loss became {step_loss} (gradient norm {grad_norm}) at step {st['global_step'] + 1}; "
                        f"the run was stopped before saving; lower --lr (now {tc.learning_rate:g})")
                _check_divergence(st, step_loss, tc, chance_loss=math.log(max(2, len(labels))))
                if master:
                    master.step(optimizer, grad_norm, tc.max_grad_norm)
                else:
                    optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                st["global_step"] += 1
                st["step_in_epoch"] += 1
                st["train_seconds"] += time.time() - t0
                st["running_loss"] += loss_sum
                st["running_n"] += n_step
                bar.update(1)
                if st["global_step"] % tc.log_every_steps == 0:
                    st["train_log"].append({"step": st["global_step"], "loss": st["running_loss"] / st["running_n"],
                                            "lr": scheduler.get_last_lr()[0], "elapsed_s": round(st["train_seconds"], 3)})
                    bar.set_postfix(loss=f"{st['running_loss'] / st['running_n']:.4f}")
                epoch_end = st["step_in_epoch"] >= len(step_batches) or st["global_step"] >= total_steps
                # Counted within the epoch, so an interval that does not divide the epoch never puts an extra
                # evaluation right before the epoch-end one.
                if epoch_end or (tc.eval_every_steps and st["step_in_epoch"] % tc.eval_every_steps == 0):
                    train_loss = st["running_loss"] / st["running_n"] if st["running_n"] else None
                    st["running_loss"], st["running_n"] = 0.0, 0
                    if epoch_end:
                        st["epoch"], st["step_in_epoch"] = epoch + 1, 0
                    model.eval()
                    stopped_early = after_eval(evaluate_now(), train_loss)
                    model.train()
                    if stopped_early:
                        break
                elif tc.checkpoint_every_steps and st["global_step"] % tc.checkpoint_every_steps == 0:
                    save_state()
                if fault_step and st["global_step"] == fault_step:
                    os.kill(os.getpid(), signal.SIGKILL)
    finally:
        bar.close()
        for sig, handler in old_handlers.items():
            signal.signal(sig, handler)

    # ---- save ------------------------------------------------------------------------------------
    best_folder = ckpt_root / "best"
    record = None
    if main:
        unwrapped = accelerator.unwrap_model(model)
        if master:
            master.restore_fp32(unwrapped)  # the saved folder holds the fp32 weights, as the user's checkpoint did
        if best_in_memory:
            ckpt.load_trainable_state(unwrapped, best_in_memory.pop("weights"), "best weights")
        elif tc.save_checkpoints and st["best"] is not None:
            # Verified and, if broken, settled as on --resume: a broken best folder must not cost the run.
            weights, _ = _settle_best(ckpt_root, st, out, main)
            if weights is not None:
                ckpt.load_trainable_state(unwrapped, weights, str(best_folder))
            elif st["history"] and st["history"][-1]["step"] == st["global_step"]:
                st["best"] = _as_best(st["history"][-1])  # the weights in the model are those of the last evaluation
        final = to_plain_transformers(unwrapped)
        final.config.use_cache = True
        save_model_folder(final, tokenizer, out)
        record = _record(cfg, st, bundle, loaded, mixed, micro, world, train_enc, val_enc, stopped_early, t_start, total_steps)
        atomic_write_json(record_path, record)
        _write_curve(out / "curve.csv", st["history"])
        shutil.rmtree(ckpt_root, ignore_errors=True)
        if st["best"] is not None:
            say(f"best: step {st['best']['step']}  {format_metrics(st['best'])}")
        say(f"saved: {out}")
    accelerator.wait_for_everyone()
    if record is None:
        import json
        record = json.loads(record_path.read_text())
    return TrainResult(str(out), record["best"], record["history"], record)


def _check_divergence(st: dict[str, Any], step_loss: float, tc, chance_loss: float) -> None:
    """Stop a run whose training loss explodes without becoming NaN (a learning rate far too high).

    Such a run would otherwise finish "successfully" at chance accuracy and save that model, and a
    search would count it as a COMPLETE trial. The rule: from step 4 on, the mean loss of the last 10
    optimizer steps must not exceed ``divergence_factor`` x the starting loss: the first step's loss
    (measured before any update, so a learning rate that explodes at once cannot inflate it), and at
    least ``chance_loss``, the loss of guessing uniformly (so one easy first batch cannot set the line
    low). Ten steps absorb the spikes of a healthy run. The losses live in ``st``, so --resume keeps
    the reference of the original run.
    """
    recent = st["recent_losses"] = (st["recent_losses"] + [step_loss])[-DIVERGENCE_WINDOW:]
    step = st["global_step"] + 1  # the optimizer step this loss belongs to
    if st["loss_reference"] is None:
        st["loss_reference"] = max(step_loss, chance_loss)
    factor, reference = tc.divergence_factor, st["loss_reference"]
    if not factor or step < DIVERGENCE_FIRST_CHECK:
        return
    mean = sum(recent) / len(recent)
    if mean > factor * reference:
        raise DivergenceError(
            f"training loss diverged: its mean over the last {len(recent)} steps is {mean:.4g}, over {factor:g} x "
            f"the starting loss {reference:.4g}, at step {step}; the run was stopped before saving; "
            f"lower --lr (now {tc.learning_rate:g}), or turn this check off with --divergence-factor 0")


def _settle_best(ckpt_root: Path, st: dict[str, Any], out: Path,
                 main: bool) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The weights of ``st["best"]`` from ``checkpoints/best``, verified like a step checkpoint.

    Returns ``(weights, problem)``; ``problem`` is None when the folder loads and holds the best step.
    Otherwise ``st["best"]`` is settled honestly: the same best if a surviving step checkpoint holds its
    weights; else the newest evaluation whose weights survive in a step checkpoint; else none, and the
    next evaluation becomes the best. ``weights`` are then those of the (new) best, to rewrite the folder
    with, or None. The problem is logged once (main process) and kept in the run record's warnings.
    Reads checkpoints only, so every process can run it and reach the same ``st``.
    """
    best = st["best"]
    if best is None:
        return None, None
    folder = ckpt_root / "best"
    try:
        found = ckpt.read_weights(folder)
        if found["state"].get("step") == best["step"]:
            return found["trainable.safetensors"], None
        why = f"{folder} holds step {found['state'].get('step')}, not the best step {best['step']}"
    except CheckpointError as e:
        why = str(e)
    weights, outcome = None, (f"the weights of the best evaluation (step {best['step']}) are lost and no evaluated "
                              "checkpoint survives, so the next evaluation becomes the best")
    source = ckpt.step_weights(ckpt_root, best["step"])
    if source is not None:
        weights, outcome = source["trainable.safetensors"], f"rebuilt it from {source['path'].name} (the same weights)"
    else:
        st["best"], st["evals_without_improvement"] = None, 0
        for entry in reversed(st["history"]):
            source = ckpt.step_weights(ckpt_root, entry["step"]) if entry["step"] <= st["global_step"] else None
            if source is not None:
                st["best"] = _as_best(entry)
                st["evals_without_improvement"] = sum(h["step"] > entry["step"] for h in st["history"])
                weights, outcome = source["trainable.safetensors"], (
                    f"the weights of the best evaluation (step {best['step']}) are lost, so the best is now "
                    f"step {entry['step']}, the newest evaluation whose weights survive")
                break
        if main:  # the saved predictions were those of the lost best
            (out / "val_predictions.jsonl").unlink(missing_ok=True)
    problem = f"unusable best checkpoint: {why}; {outcome}"
    st["warnings"].append(problem)
    if main:
        log.warning(f"warning: {problem}")
    return weights, problem


def _as_best(entry: dict[str, Any]) -> dict[str, Any]:
    """A history entry as ``st["best"]`` (without the per-class metrics, which only the best keeps)."""
    return {k: v for k, v in entry.items() if k != "is_best"}


def _millions(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.Optimizer:
    # The fused kernel updates all parameters in one pass; on 12-token batches the optimizer step is a
    # large share of the step time, so this is worth having where the build supports it.
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, lr=lr, foreach=True)


def _train_step(model, optimizer, accelerator, enc, share, n_step, world, micro, pad_id, st, main, master=None):
    """Forward/backward over this process's share of one step batch; halves ``micro`` on OOM and retries."""
    while True:
        try:
            chunks = _micro_batches(share, micro) or [[]]
            loss_sum = 0.0
            for j, idx in enumerate(chunks):
                sync = j == len(chunks) - 1
                ctx = nullcontext() if sync or world == 1 else accelerator.no_sync(model)
                with ctx:
                    if not idx:  # a process with nothing to do still joins the gradient all-reduce
                        dummy = sum((p * 0.0).sum() for p in model.parameters() if p.requires_grad)
                        accelerator.backward(dummy)
                        continue
                    batch = _batch(enc, idx, pad_id, accelerator.device)
                    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    per_example = torch.nn.functional.cross_entropy(logits.float(), batch["labels"], reduction="sum")
                    accelerator.backward(per_example * (world / n_step))
                    if master is not None and not sync:
                        master.fold()  # sum micro-batch gradients in fp32, not bf16
                    loss_sum += per_example.item()
                    st["train_tokens"] += int(batch["attention_mask"].sum())
                    st["padded_tokens"] += int(batch["input_ids"].numel())
            return loss_sum, micro
        except torch.OutOfMemoryError:
            if micro <= 1 or world > 1:
                raise
            optimizer.zero_grad(set_to_none=True)
            if master is not None:
                master.zero_grad()
            micro = max(1, micro // 2)
            st["micro_batch_size"] = micro
            st.setdefault("oom_events", []).append({"step": st["global_step"] + 1, "micro_batch_size": micro})
            if main:
                log.warning(f"out of memory: micro-batch lowered to {micro}; gradient accumulation keeps the global batch")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _batch(enc, idx: list[int], pad_id: int, device) -> dict[str, torch.Tensor]:
    items = [(enc.input_ids[i], enc.labels[i] if enc.labels is not None else None) for i in idx]
    return {k: v.to(device) for k, v in collate(items, pad_id, pad_to_multiple_of=_pad_multiple(device)).items()}


def _pad_multiple(device) -> int | None:
    """Round padded lengths to a multiple of 8 only on GPUs (tensor cores); on CPUs it only adds tokens
    (~20% more on 12-token SST-2 phrases)."""
    return 8 if torch.device(device).type == "cuda" else None


def _clip(accelerator, model, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    if max_norm:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


@torch.inference_mode()
def predict_logits(model, enc, batch_size: int, pad_id: int, accelerator=None) -> np.ndarray:
    """Logits for every row of ``enc`` in its original order; longest batches first, sharded over processes."""
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    world = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    batches = LengthGroupedSampler(enc.lengths, batch_size, shuffle=False, group_by_length=True).batches(0)
    mine = []
    for idx in batches[rank::world]:
        items = [(enc.input_ids[i], None) for i in idx]
        b = collate(items, pad_id, pad_to_multiple_of=_pad_multiple(device))
        logits = model(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device)).logits
        mine.append((list(idx), logits.float().cpu().numpy()))
    if world > 1:
        from accelerate.utils import gather_object
        gathered = gather_object(mine)
    else:
        gathered = mine
    n_labels = gathered[0][1].shape[-1] if gathered else 0
    out = np.zeros((len(enc), n_labels), dtype=np.float32)
    for idx, logits in gathered:
        out[idx] = logits
    return out


def save_model_folder(model, tokenizer, out: Path) -> None:
    """``save_pretrained`` into a temp folder, then move each file into ``out`` (no half-written model)."""
    tmp = out / ".model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


def _write_predictions(path: Path, table, label_ids, probs: np.ndarray, labels: list[str]) -> None:
    import json
    lines = []
    for i in range(len(table)):
        pred = int(probs[i].argmax())
        row = {"line": table.line_numbers[i], "text": table.texts[i]}
        if table.text_pairs is not None:
            row["text_pair"] = table.text_pairs[i]
        row |= {"label": labels[label_ids[i]], "predicted": labels[pred], "confidence": round(float(probs[i, pred]), 6),
                "probabilities": {labels[k]: round(float(p), 6) for k, p in enumerate(probs[i])}}
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write_text(path, "\n".join(lines) + "\n")


def _write_curve(path: Path, history: list[dict[str, Any]]) -> None:
    cols = ["step", "epoch", "train_loss", "val_loss", "accuracy", "macro_f1", "lr", "elapsed_s"]
    rows = [",".join(cols)] + [",".join("" if h.get(c) is None else str(h.get(c)) for c in cols) for h in history]
    atomic_write_text(path, "\n".join(rows) + "\n")


def _skipped_note(summary: dict[str, Any]) -> str:
    parts = [f"{split} {why.replace('_', ' ')} {n}" for split, counts in (summary.get("skipped") or {}).items()
             for why, n in (counts or {}).items() if n]
    return f"; skipped rows: {', '.join(parts)}" if parts else ""


def _resumable_config(cfg: RunConfig) -> dict[str, Any]:
    """The part of the config a checkpoint must match (not output/resume flags or progress display)."""
    d = cfg.to_dict()
    for k in ("output_dir", "resume", "overwrite", "report"):
        d.pop(k, None)
    d["train"].pop("progress", None)
    return d


def library_versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform
    out = {"python": platform.python_version()}
    for name in ("lmtune", "torch", "transformers", "accelerate", "peft", "optuna", "tokenizers", "scikit-learn", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return out


def _record(cfg, st, bundle, loaded, mixed, micro, world, train_enc, val_enc, stopped_early, t_start, total_steps) -> dict[str, Any]:
    import platform
    tokens = st["train_tokens"]
    return {
        "format": "lmtune-run/1",
        "status": "completed",
        "config": cfg.to_dict(),
        "labels": bundle.label_map.labels,
        "label_map": bundle.label_map.to_json(),
        "model": {"requested": cfg.model.name, "resolved": loaded.resolved.path, "source_kind": loaded.resolved.kind,
                  "architecture": type(loaded.model).__name__, "total_params": loaded.total_params,
                  "trainable_params": loaded.trainable_params, "non_embedding_params": loaded.non_embedding_params},
        "data": bundle.summary | {"truncated": {"train": train_enc.truncated, "val": val_enc.truncated},
                                  "token_lengths": {"train": list(map(int, train_enc.lengths)), "val": list(map(int, val_enc.lengths))},
                                  "max_length": cfg.train.max_length},
        "precision": "fp32" if mixed == "no" else mixed,
        "num_processes": world,
        "micro_batch_size_used": micro,
        "oom_events": st.get("oom_events", []),
        "steps": {"total": total_steps, "done": st["global_step"]},
        "stopped_early": stopped_early,
        "warnings": st["warnings"],
        "best": st["best"],
        "history": st["history"],
        "train_log": st["train_log"],
        "timing": {"train_seconds": round(st["train_seconds"], 3), "eval_seconds": round(st["eval_seconds"], 3),
                   "wall_seconds": round(time.time() - t_start, 3), "train_tokens": tokens, "padded_tokens": st["padded_tokens"],
                   "train_tokens_per_s": round(tokens / st["train_seconds"], 1) if st["train_seconds"] else None},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": library_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
