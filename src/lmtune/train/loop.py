"""The fine-tuning recipe, the same for every task: setup -> train (evaluate, checkpoint) -> save.
Read it top to bottom: :func:`train` calls one function per job, and the state a checkpoint restores is one
typed object (:class:`TrainState`). What depends on the task (data, head, loss, metrics, saving) goes through
:class:`lmtune.tasks.Task`.

Batches: the sampler yields *step batches* of ``global_batch_size`` examples grouped by length. Each
process takes its share of a step batch and splits it into micro-batches; the loss of each micro-batch is
its summed loss divided by the loss units (rows for classification, target tokens for generation) of the
whole step batch (times the number of processes, which DDP divides out again), so the gradient is the mean
over the global batch whatever the micro-batch size. That is what lets an out-of-memory error halve the
micro-batch and retry the same step without changing the optimisation.

Two things stop a run as diverged, before anything is saved: a loss or gradient that is not finite, and
a training loss that climbs far above where the run started (see :func:`_check_divergence`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtune import _signals as signals
from lmtune._console import log, progress, quiet_libraries
from lmtune._io import FolderLock, atomic_write_json, atomic_write_text, ensure_writable_dir, same_file
from lmtune.config import RunConfig
from lmtune.data.batching import LengthGroupedSampler
from lmtune.errors import CheckpointError, ConfigError, DivergenceError, Interrupted
from lmtune.records import RECORD_FILE, STUDY_FILE
from lmtune.train import checkpoint as ckpt
from lmtune.train.metrics import format_metrics
from lmtune.train.precision import MASTER, MasterWeights, resolve_precision

__all__ = ["EvalEvent", "Interrupted", "RECORD_FILE", "Resources", "TrainResult", "TrainState", "train"]
# The divergence rule (see _check_divergence): the mean training loss of the last DIVERGENCE_WINDOW optimizer
# steps against --divergence-factor x the run's starting loss, judged from step DIVERGENCE_FIRST_CHECK on.
DIVERGENCE_WINDOW = 10
DIVERGENCE_FIRST_CHECK = 4


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


def _stop_requested_handler(signum, frame) -> None:
    # The second signal (or a held one's retry copy): at once, unless inside a database call (a search's).
    if signals.stop_requested() or signals.holding():
        signals.interrupt(signum, frame)
        return
    signals.request_stop(signum)


@dataclass
class TrainState:
    """Everything a checkpoint must restore besides weights, optimizer, scheduler and RNG (its state.json)."""

    config: dict[str, Any]
    micro_batch_size: int
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    train_log: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    evals_without_improvement: int = 0
    train_tokens: int = 0
    padded_tokens: int = 0
    running_loss: float = 0.0
    running_n: int = 0
    """Loss units (rows, or target tokens) summed into ``running_loss`` since the last evaluation."""
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    recent_losses: list[float] = field(default_factory=list)
    loss_reference: float | None = None
    warnings: list[str] = field(default_factory=list)
    oom_events: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "TrainState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class _Session:
    """The live objects of one run, built once by :func:`_setup` and read by the functions of the loop."""

    cfg: RunConfig
    task: Any
    out: Path
    accelerator: Any
    model: Any
    tokenizer: Any
    loaded: Any
    bundle: Any
    train_enc: Any
    val_enc: Any
    optimizer: Any
    scheduler: Any
    master: MasterWeights | None
    mixed: str
    sampler: LengthGroupedSampler
    steps_per_epoch: int
    total_steps: int
    say: Callable[[str], None]
    eval_batch_size: int
    best_in_memory: dict[str, Any] = field(default_factory=dict)

    @property
    def tc(self):
        return self.cfg.train

    @property
    def ckpt_root(self) -> Path:
        return self.out / "checkpoints"

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def trainable(self, copy: bool = False) -> dict[str, torch.Tensor]:
        """The weights being trained, at full precision (the fp32 masters under bf16-master)."""
        if self.master:
            return self.master.state(copy=copy)
        return ckpt.trainable_state(self.accelerator.unwrap_model(self.model), copy=copy)


def train(cfg: RunConfig, *, on_evaluate: Callable[[EvalEvent], None] | None = None,
          resources: Resources | None = None, quiet: bool = False) -> TrainResult:
    """Fine-tune ``cfg.model`` on ``cfg.data`` and write a transformers folder to ``cfg.output_dir``.

    ``on_evaluate`` sees every evaluation and may raise to stop the run (a search prunes this way);
    ``quiet`` moves the per-run log lines to debug level (a search prints one line per trial instead).
    """
    from lmtune.tasks import resolve_task

    t_start = time.time()
    say = log.debug if quiet else log.info
    task, cfg = resolve_task(cfg)
    # One lock per run: the processes of one distributed run share --out, so only the first one (torchrun's RANK 0) locks.
    out_dir = ensure_writable_dir(cfg.output_dir, "--out")
    with FolderLock(out_dir) if int(os.environ.get("RANK", "0") or 0) == 0 else nullcontext():
        resume_from, finished = _prepare_output(cfg, say)
        if finished is not None:
            return finished
        s = _setup(cfg, task, resources, say)
        st = _initial_state(s, resume_from)
        stopped_early = _train_loop(s, st, on_evaluate)
        return _finish(s, st, stopped_early, t_start)


# ---- setup -----------------------------------------------------------------------------------------------


def _prepare_output(cfg: RunConfig, say) -> tuple[dict[str, Any] | None, TrainResult | None]:
    """Check the output folder; with --resume, the newest whole checkpoint (or the finished run itself)."""
    out = Path(cfg.output_dir)
    ckpt_root, record_path = out / "checkpoints", out / RECORD_FILE
    model_dir = Path(os.path.expanduser(cfg.model.name))
    if model_dir.is_dir() and same_file(model_dir, out):
        raise ConfigError(f"--out {out} is the folder of --model: training would overwrite the weights it starts from")
    if (out / STUDY_FILE).is_file():
        raise ConfigError(f"--out {out} holds a study (lmtune tune); a run needs its own folder")
    if record_path.is_file() and not (cfg.overwrite or cfg.resume):
        raise ConfigError(f"--output-dir {out} already holds a finished run; pass --overwrite to replace it")
    if not record_path.is_file() and not cfg.resume and not cfg.overwrite and (
            (out / "config.json").is_file() or any(out.glob("*.safetensors"))):
        raise ConfigError(f"--out {out} holds a model that lmtune did not write; pass --overwrite to replace it")
    if not cfg.resume:
        if ckpt_root.exists():
            shutil.rmtree(ckpt_root)
        return None, None
    resume_from = ckpt.latest_checkpoint(ckpt_root)
    if resume_from is None and record_path.is_file():
        record = json.loads(record_path.read_text())
        say(f"--resume: {out} already holds a finished run; nothing to do")
        return None, TrainResult(str(out), record["best"], record["history"], record)
    if resume_from is None:
        say(f"--resume: no usable checkpoint in {ckpt_root}; starting from the beginning")
    elif resume_from["state"].get("config") != _resumable_config(cfg):
        raise CheckpointError(f"{resume_from['path']}: written by a run with a different configuration; "
                              "resume with the same flags, or drop --resume")
    return resume_from, None


def _accelerator(cfg: RunConfig) -> tuple[Any, str]:
    """A fresh accelerate state and the precision this run computes in."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    # accelerate keeps its state per process; a second run in the same process (a search, a notebook, the Python
    # API) may use another precision, so start from a clean state. The process group, if any, lives in
    # PartialState and is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    n_procs = PartialState(cpu=not torch.cuda.is_available()).num_processes
    master_ok = cfg.model.method == "full" and n_procs == 1
    if cfg.train.precision == MASTER and not master_ok:
        raise ConfigError(f"--precision {MASTER} needs --method full and one process (got --method {cfg.model.method}, "
                          f"{n_procs} process(es)); use --precision bf16")
    mixed = resolve_precision(cfg.train.precision, master_ok=master_ok)
    # bf16-master computes in a bf16 model itself: no autocast on top.
    accelerator = Accelerator(mixed_precision="no" if mixed == MASTER else mixed, cpu=not torch.cuda.is_available())
    return accelerator, mixed


def _setup(cfg: RunConfig, task: Any, resources: Resources | None, say) -> _Session:
    """Data, model, tokenised rows, batches, optimizer and schedule."""
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    from lmtune.models import cache_root, resolve

    tc = cfg.train
    accelerator, mixed = _accelerator(cfg)
    set_seed(tc.seed)
    quiet_libraries()
    main = accelerator.is_main_process

    bundle = resources.data_bundle if resources and resources.data_bundle is not None else task.load_data(cfg)
    if main:
        say(task.describe_data(bundle) + _skipped_note(bundle.summary))
        for w in bundle.summary.get("warnings", []):
            log.warning(f"warning: {w}")
    loaded = task.load_model(cfg, bundle, resolve(cfg.model.name, cfg.model.cache_dir))
    tok_cache = (resources.tokenized_cache_dir if resources and resources.tokenized_cache_dir
                 else str(cache_root(cfg.model.cache_dir) / "tokenized"))
    train_enc, val_enc = task.encode(loaded.tokenizer, bundle, cfg, tok_cache)

    world = accelerator.num_processes
    micro = _micro_batch_size(tc, world)
    sampler = LengthGroupedSampler(train_enc.lengths, tc.global_batch_size, shuffle=True, seed=tc.seed,
                                   group_by_length=tc.group_by_length)
    steps_per_epoch = len(sampler.batches(0))
    total_steps = steps_per_epoch * tc.epochs if tc.max_steps is None else min(steps_per_epoch * tc.epochs, tc.max_steps)

    model = loaded.model
    master = MasterWeights(model) if mixed == MASTER else None  # casts the model to bf16
    optimizer = _adamw(_param_groups(master.by_name() if master else
                                     {n: p for n, p in model.named_parameters() if p.requires_grad}, tc.weight_decay),
                       tc.learning_rate)
    scheduler = get_scheduler(tc.lr_schedule, optimizer, num_warmup_steps=int(round(tc.warmup_ratio * total_steps)),
                              num_training_steps=total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if main:
        say(f"model: {cfg.model.name} ({_millions(loaded.total_params)} parameters, "
            f"{_millions(loaded.trainable_params)} trainable, method {cfg.model.method}); precision "
            f"{'fp32' if mixed == 'no' else mixed}; {world} process(es); "
            f"batch {tc.global_batch_size} = micro {micro} x {world} process(es) x accumulation")
        too_long = getattr(train_enc, "completion_too_long", None) or []
        say(f"steps: {steps_per_epoch} per epoch, {total_steps} in all; max length {tc.max_length} "
            f"({train_enc.truncated} of {len(train_enc)} training rows cut"
            + (f"; {len(too_long)} lost the end of their completion and their end token, e.g. line"
               f"{'s' if len(too_long) > 1 else ''} {', '.join(map(str, too_long[:5]))}: raise --max-length"
               if too_long else "") + ")")
    return _Session(cfg, task, Path(cfg.output_dir), accelerator, model, loaded.tokenizer, loaded, bundle, train_enc,
                    val_enc, optimizer, scheduler, master, mixed, sampler, steps_per_epoch, total_steps, say,
                    tc.eval_batch_size or 2 * micro)


def _micro_batch_size(tc: Any, world: int) -> int:
    """Examples per forward pass on one process: --micro-batch-size, at most this process's share of the batch."""
    share = math.ceil(tc.global_batch_size / world)
    return min(tc.micro_batch_size or share, share)


def _param_groups(params: dict[str, torch.Tensor], weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not biases or norm weights)."""
    decay, no_decay = [], []
    for n, p in params.items():
        (no_decay if p.ndim < 2 or "norm" in n.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _initial_state(s: _Session, resume_from: dict[str, Any] | None) -> TrainState:
    """A fresh state, or the resumed checkpoint's (weights, optimizer, schedule and RNG loaded too)."""
    st = TrainState(config=_resumable_config(s.cfg), micro_batch_size=_micro_batch_size(s.tc, s.world))
    if resume_from is None:
        return st
    ckpt.load_trainable_state(s.accelerator.unwrap_model(s.model), resume_from["trainable.safetensors"], str(resume_from["path"]))
    if s.master:  # the fp32 weights of the checkpoint, not their bf16 rounding in the model
        s.master.load(resume_from["trainable.safetensors"])
    s.optimizer.load_state_dict(resume_from["optimizer.pt"])
    s.scheduler.load_state_dict(resume_from["scheduler.pt"])
    ckpt.set_rng_state(resume_from["rng.pt"])
    st = TrainState.from_json(resume_from["state"])
    if s.main:
        s.say(f"resumed from {resume_from['path']} (step {st.global_step}, epoch {st.epoch + 1})")
    if s.tc.save_checkpoints:
        # checkpoints/best is verified like the step checkpoints: a corrupt one would otherwise only fail at the
        # very end of the run. Every process settles st.best alike from what it reads; once all have read, the
        # main process rewrites the folder to match.
        weights, problem = _settle_best(s.ckpt_root, st, s.out, s.main)
        s.accelerator.wait_for_everyone()
        if s.main and problem and weights is not None:
            ckpt.write_folder_atomically(s.ckpt_root / "best", {"trainable.safetensors": weights},
                                         {"step": st.best["step"], "metrics": st.best})
        elif s.main and st.best is None:  # no evaluation counts yet: a best folder here is from a lost one
            shutil.rmtree(s.ckpt_root / "best", ignore_errors=True)
            (s.out / "val_predictions.jsonl").unlink(missing_ok=True)
    return st


# ---- train -----------------------------------------------------------------------------------------------


def _train_loop(s: _Session, st: TrainState, on_evaluate) -> bool:
    """Step through the epochs, evaluating and checkpointing; returns whether early stopping ended it."""
    tc = s.tc
    s.out.mkdir(parents=True, exist_ok=True)
    s.model.train()
    stopped_early = False
    bar = progress(s.total_steps, "training", tc.progress and s.main, initial=st.global_step)
    fault_step = int(os.environ.get("LMTUNE_FAULT_KILL_AT_STEP", "0") or 0)  # reliability tests: a real kill -9
    with _stop_signals(s.main or s.world == 1):
        try:
            while st.global_step < s.total_steps and not stopped_early:
                epoch = st.epoch
                step_batches = s.sampler.batches(epoch)
                # Until the epoch-end evaluation advances st.epoch: the next epoch draws its own order (the inner loop
                # used to carry on with this epoch's batches, so every epoch after the first replayed the first's).
                while st.epoch == epoch and st.step_in_epoch < len(step_batches) and st.global_step < s.total_steps:
                    if signals.stop_requested():
                        _save_state(s, st)
                        where = (f"checkpoint written to {s.ckpt_root}; rerun with --resume to continue"
                                 if tc.save_checkpoints else "no checkpoint (checkpoints are off)")
                        raise Interrupted(f"{signals.take_stop_request()}: stopped at step {st.global_step}; {where}")
                    _optimizer_step(s, st, step_batches[st.step_in_epoch], step_batches[0])
                    bar.update(1)
                    if st.global_step % tc.log_every_steps == 0:
                        st.train_log.append({"step": st.global_step, "loss": st.running_loss / st.running_n,
                                             "lr": s.scheduler.get_last_lr()[0], "elapsed_s": round(st.train_seconds, 3)})
                        bar.set_postfix(loss=f"{st.running_loss / st.running_n:.4f}")
                    epoch_end = st.step_in_epoch >= len(step_batches) or st.global_step >= s.total_steps
                    # Counted within the epoch, so an interval that does not divide the epoch never puts an extra
                    # evaluation right before the epoch-end one.
                    if epoch_end or (tc.eval_every_steps and st.step_in_epoch % tc.eval_every_steps == 0):
                        train_loss = st.running_loss / st.running_n if st.running_n else None
                        st.running_loss, st.running_n = 0.0, 0
                        if epoch_end:
                            st.epoch, st.step_in_epoch = st.epoch + 1, 0
                        stopped_early = _evaluate_and_keep(s, st, train_loss, on_evaluate)
                        if stopped_early:
                            break
                    elif tc.checkpoint_every_steps and st.global_step % tc.checkpoint_every_steps == 0:
                        _save_state(s, st)
                    if fault_step and st.global_step == fault_step:
                        os.kill(os.getpid(), signal.SIGKILL)
        finally:
            bar.close()
    return stopped_early


@contextmanager
def _stop_signals(install: bool):
    """SIGINT/SIGTERM ask the loop to stop after the current step (a second one stops at once). A request the
    loop had no step left to act on outlives it: see ``lmtune._signals.stop_requested``."""
    signals.take_stop_request()  # one left by an earlier run in this process is not this run's
    old = signals.install(_stop_requested_handler) if install else {}
    try:
        yield
    finally:
        signals.restore(old)


def _optimizer_step(s: _Session, st: TrainState, step_batch: list[int], first_batch: list[int]) -> None:
    """One optimizer step over a global step batch: this process's share, micro-batches, divergence checks."""
    tc, world = s.tc, s.world
    t0 = time.time()
    if world > 1 and len(step_batch) < world:  # every process must take part in each step
        step_batch = step_batch + first_batch[: world - len(step_batch)]
    share = [int(i) for i in np.array_split(np.asarray(step_batch), world)[s.accelerator.process_index]]
    # The loss is normalised by the units (rows, or target tokens) of the whole global step batch, so the gradient
    # does not depend on how the batch is cut into micro-batches or processes.
    units = s.task.loss_units(s.train_enc, step_batch)
    loss_sum = _forward_backward(s, st, share, units)
    if world > 1:  # one process: no round trip through the device (on a GPU it is a sync per step)
        loss_sum = s.accelerator.reduce(torch.tensor(loss_sum, device=s.accelerator.device), "sum").item()
    step_loss = loss_sum / max(1, units)
    grad_norm = s.master.grad_norm() if s.master else _clip(s.accelerator, s.model, tc.max_grad_norm)
    if not math.isfinite(step_loss) or not math.isfinite(grad_norm):
        raise DivergenceError(
            f"training loss became {step_loss} (gradient norm {grad_norm}) at step {st.global_step + 1}; "
            f"the run was stopped before saving; lower --lr (now {tc.learning_rate:g})")
    _check_divergence(st, step_loss, tc, chance_loss=s.task.chance_loss(s.bundle))
    if s.master:
        s.master.step(s.optimizer, grad_norm, tc.max_grad_norm)
    else:
        s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    st.global_step += 1
    st.step_in_epoch += 1
    st.train_seconds += time.time() - t0
    st.running_loss += loss_sum
    st.running_n += units


def _forward_backward(s: _Session, st: TrainState, share: list[int], units: int) -> float:
    """Forward/backward over this process's share of one step batch; halves the micro-batch on OOM and retries."""
    world, device = s.world, s.accelerator.device
    while True:
        try:
            chunks = _micro_batches(share, st.micro_batch_size) or [[]]
            loss_sum = 0.0
            for j, idx in enumerate(chunks):
                sync = j == len(chunks) - 1
                with nullcontext() if sync or world == 1 else s.accelerator.no_sync(s.model):
                    if not idx:  # a process with nothing to do still joins the gradient all-reduce
                        dummy = sum((p * 0.0).sum() for p in s.model.parameters() if p.requires_grad)
                        s.accelerator.backward(dummy)
                        continue
                    summed, tokens, padded = _task_loss(s, idx, device)
                    s.accelerator.backward(summed * (world / max(1, units)))
                    if s.master is not None and not sync:
                        s.master.fold()  # sum micro-batch gradients in fp32, not bf16
                    loss_sum += summed.item()
                    st.train_tokens += tokens
                    st.padded_tokens += padded
            return loss_sum
        except torch.OutOfMemoryError:
            if st.micro_batch_size <= 1 or world > 1:
                raise
            s.optimizer.zero_grad(set_to_none=True)
            if s.master is not None:
                s.master.zero_grad()
            st.micro_batch_size = max(1, st.micro_batch_size // 2)
            st.oom_events.append({"step": st.global_step + 1, "micro_batch_size": st.micro_batch_size})
            if s.main:
                log.warning(f"out of memory: micro-batch lowered to {st.micro_batch_size}; "
                            "gradient accumulation keeps the global batch")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def _task_loss(s: _Session, idx: list[int], device) -> tuple[torch.Tensor, int, int]:
    """(summed loss, real tokens, padded tokens) of one micro-batch."""
    summed, tokens = s.task.loss_sum(s.model, s.train_enc, idx, s.pad_id, device)
    padded = len(idx) * max(s.train_enc.lengths[i] for i in idx)
    return summed, tokens, padded


def _evaluate(s: _Session, st: TrainState) -> tuple[dict[str, Any], Any]:
    """The task's metrics on validation; halves the evaluation batch on out-of-memory."""
    t0 = time.time()
    s.model.eval()
    try:
        while True:
            try:
                return s.task.evaluate(s.model, s.val_enc, s.bundle, s.eval_batch_size, s.accelerator, s.pad_id,
                                       st.global_step, final=st.global_step >= s.total_steps)
            except torch.OutOfMemoryError:
                if s.eval_batch_size <= 1 or s.world > 1:
                    raise
                s.eval_batch_size //= 2  # evaluation holds no gradients, but long texts can still not fit
                st.oom_events.append({"step": st.global_step, "eval_batch_size": s.eval_batch_size})
                log.warning(f"out of memory in evaluation: evaluation batch lowered to {s.eval_batch_size}")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
    finally:
        s.model.train()
        st.eval_seconds += time.time() - t0


_DETAILS = ("per_class", "confusion_matrix", "n")


def _evaluate_and_keep(s: _Session, st: TrainState, train_loss: float | None, on_evaluate) -> bool:
    """Evaluate, record, keep the best weights, checkpoint; returns True to stop early."""
    tc = s.tc
    eval_seconds_before = st.eval_seconds
    metrics, payload = _evaluate(s, st)
    entry = {"step": st.global_step, "epoch": round(st.global_step / s.steps_per_epoch, 4), "train_loss": train_loss,
             **{k: v for k, v in metrics.items() if k not in _DETAILS}, "lr": s.scheduler.get_last_lr()[0],
             "elapsed_s": round(st.train_seconds + st.eval_seconds, 3),
             "eval_s": round(st.eval_seconds - eval_seconds_before, 3)}
    if not math.isfinite(metrics["val_loss"]):
        raise DivergenceError(f"validation loss is {metrics['val_loss']} at step {st.global_step}; "
                              f"lower --lr (now {tc.learning_rate:g})")
    value = metrics[tc.metric]
    improved = st.best is None or (value > st.best[tc.metric] if tc.higher_is_better else value < st.best[tc.metric])
    st.history.append(entry | {"is_best": improved})
    if improved:
        st.best = dict(entry) | {k: metrics[k] for k in ("per_class", "confusion_matrix") if k in metrics}
        st.evals_without_improvement = 0
        if s.main and not tc.save_checkpoints:  # a search trial: no resume, so the best weights need not survive the process
            s.best_in_memory.pop("weights", None)  # free the previous best before copying the new one
            if st.global_step < s.total_steps:
                s.best_in_memory["weights"] = s.trainable(copy=True)
            # else: the last evaluation is the best, and the weights in the model are those weights;
            # a copy would only add a full set of weights (~0.5 GB per 135M parameters) to the peak.
    else:
        st.evals_without_improvement += 1
    if s.main:
        s.say(f"epoch {entry['epoch']:.2f}  step {entry['step']}/{s.total_steps}  {format_metrics(entry)}"
              + ("  (best)" if improved else ""))
    _save_state(s, st)
    if improved and s.main:
        if tc.save_checkpoints:
            # After the step checkpoint: a crash in between leaves a best folder one evaluation behind the
            # newest checkpoint, which a resume rebuilds from that checkpoint (the same weights).
            ckpt.write_folder_atomically(s.ckpt_root / "best", {"trainable.safetensors": s.trainable()},
                                         {"step": st.global_step, "metrics": st.best})
        s.task.write_predictions(s.out / "val_predictions.jsonl", s.bundle, s.val_enc, payload)
    if on_evaluate is not None:
        on_evaluate(EvalEvent(st.global_step, entry["epoch"], s.total_steps, entry, improved, st.micro_batch_size))
    patience = tc.early_stopping_patience
    if patience is not None and st.evals_without_improvement >= patience:
        if s.main:
            s.say(f"early stopping: {tc.metric} did not improve in {patience} evaluation(s)")
        return True
    return False


def _save_state(s: _Session, st: TrainState) -> None:
    if not s.tc.save_checkpoints:
        return
    if s.main:
        ckpt.save_checkpoint(s.ckpt_root, st.global_step, s.trainable(), s.optimizer, s.scheduler, st.to_json())
    s.accelerator.wait_for_everyone()


# ---- save ------------------------------------------------------------------------------------------------


def _finish(s: _Session, st: TrainState, stopped_early: bool, t_start: float) -> TrainResult:
    """Put the best weights back, save the folder and the record, drop the checkpoints."""
    record_path = s.out / RECORD_FILE
    record = None
    if s.main:
        unwrapped = s.accelerator.unwrap_model(s.model)
        if s.master:
            s.master.restore_fp32(unwrapped)  # the saved folder holds the fp32 weights, as the user's checkpoint did
        if s.best_in_memory:
            ckpt.load_trainable_state(unwrapped, s.best_in_memory.pop("weights"), "best weights")
        elif s.tc.save_checkpoints and st.best is not None:
            # Verified and, if broken, settled as on --resume: a broken best folder must not cost the run.
            weights, _ = _settle_best(s.ckpt_root, st, s.out, s.main)
            if weights is not None:
                ckpt.load_trainable_state(unwrapped, weights, str(s.ckpt_root / "best"))
            elif st.history and st.history[-1]["step"] == st.global_step:
                st.best = _as_best(st.history[-1])  # the weights in the model are those of the last evaluation
        s.task.save(unwrapped, s.tokenizer, s.out, s.cfg, s.train_enc)
        record = _record(s, st, stopped_early, t_start)
        atomic_write_json(record_path, record)
        _write_curve(s.out / "curve.csv", st.history)
        shutil.rmtree(s.ckpt_root, ignore_errors=True)
        if st.best is not None:
            s.say(f"best: step {st.best['step']}  {format_metrics(st.best)}")
        s.say(f"saved: {s.out}")
    s.accelerator.wait_for_everyone()
    if record is None:
        record = json.loads(record_path.read_text())
    return TrainResult(str(s.out), record["best"], record["history"], record)


def _check_divergence(st: TrainState, step_loss: float, tc, chance_loss: float) -> None:
    """Stop a run whose training loss explodes without becoming NaN (a learning rate far too high).

    Such a run would otherwise finish "successfully" at chance accuracy and save that model, and a
    search would count it as a COMPLETE trial. The rule: from step 4 on, the mean loss of the last 10
    optimizer steps must not exceed ``divergence_factor`` x the starting loss: the first step's loss
    (measured before any update, so a learning rate that explodes at once cannot inflate it), and at
    least ``chance_loss``, the loss of guessing uniformly (so one easy first batch cannot set the line
    low). Ten steps absorb the spikes of a healthy run. The losses live in ``st``, so --resume keeps
    the reference of the original run.
    """
    st.recent_losses = recent = (st.recent_losses + [step_loss])[-DIVERGENCE_WINDOW:]
    step = st.global_step + 1  # the optimizer step this loss belongs to
    if st.loss_reference is None:
        st.loss_reference = max(step_loss, chance_loss)
    factor, reference = tc.divergence_factor, st.loss_reference
    if not factor or step < DIVERGENCE_FIRST_CHECK:
        return
    mean = sum(recent) / len(recent)
    if mean > factor * reference:
        raise DivergenceError(
            f"training loss diverged: its mean over the last {len(recent)} steps is {mean:.4g}, over {factor:g} x "
            f"the starting loss {reference:.4g}, at step {step}; the run was stopped before saving; "
            f"lower --lr (now {tc.learning_rate:g}), or turn this check off with --divergence-factor 0")


def _settle_best(ckpt_root: Path, st: TrainState, out: Path,
                 main: bool) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The weights of ``st.best`` from ``checkpoints/best``, verified like a step checkpoint.

    Returns ``(weights, problem)``; ``problem`` is None when the folder loads and holds the best step.
    Otherwise ``st.best`` is settled honestly: the same best if a surviving step checkpoint holds its
    weights; else the newest evaluation whose weights survive in a step checkpoint; else none, and the
    next evaluation becomes the best. ``weights`` are then those of the (new) best, to rewrite the folder
    with, or None. The problem is logged once (main process) and kept in the run record's warnings.
    Reads checkpoints only, so every process can run it and reach the same state.
    """
    best = st.best
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
        st.best, st.evals_without_improvement = None, 0
        for entry in reversed(st.history):
            source = ckpt.step_weights(ckpt_root, entry["step"]) if entry["step"] <= st.global_step else None
            if source is not None:
                st.best = _as_best(entry)
                st.evals_without_improvement = sum(h["step"] > entry["step"] for h in st.history)
                weights, outcome = source["trainable.safetensors"], (
                    f"the weights of the best evaluation (step {best['step']}) are lost, so the best is now "
                    f"step {entry['step']}, the newest evaluation whose weights survive")
                break
        if main:  # the saved predictions were those of the lost best
            (out / "val_predictions.jsonl").unlink(missing_ok=True)
    problem = f"unusable best checkpoint: {why}; {outcome}"
    st.warnings.append(problem)
    if main:
        log.warning(f"warning: {problem}")
    return weights, problem


def _as_best(entry: dict[str, Any]) -> dict[str, Any]:
    """A history entry as ``st.best`` (without the per-class metrics, which only the best keeps)."""
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


def _clip(accelerator, model, max_norm: float | None) -> float:
    params = [p for p in model.parameters() if p.requires_grad]
    if max_norm:
        return float(accelerator.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0


def _write_curve(path: Path, history: list[dict[str, Any]]) -> None:
    """The evaluations as a CSV table: step, epoch, losses, the task's metrics, learning rate, time."""
    metrics = [k for k in dict.fromkeys(k for h in history for k in h)
               if k not in ("step", "epoch", "train_loss", "val_loss", "lr", "elapsed_s", "is_best")]
    cols = ["step", "epoch", "train_loss", "val_loss", *metrics, "lr", "elapsed_s"]
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


def _record(s: _Session, st: TrainState, stopped_early: bool, t_start: float) -> dict[str, Any]:
    import platform

    cfg, loaded, tokens = s.cfg, s.loaded, st.train_tokens
    return {
        "format": "lmtune-run/1",
        "status": "completed",
        "task": s.task.name,
        "config": cfg.to_dict(),
        "model": {"requested": cfg.model.name, "resolved": loaded.resolved.path, "source_kind": loaded.resolved.kind,
                  "architecture": type(loaded.model).__name__, "total_params": loaded.total_params,
                  "trainable_params": loaded.trainable_params, "non_embedding_params": loaded.non_embedding_params},
        **s.task.record(cfg, s.bundle, s.train_enc, s.val_enc),
        "precision": "fp32" if s.mixed == "no" else s.mixed,
        "num_processes": s.world,
        "micro_batch_size_used": st.micro_batch_size,
        "oom_events": st.oom_events,
        "steps": {"total": s.total_steps, "done": st.global_step},
        "stopped_early": stopped_early,
        "warnings": st.warnings,
        "best": st.best,
        "history": st.history,
        "train_log": st.train_log,
        "timing": {"train_seconds": round(st.train_seconds, 3), "eval_seconds": round(st.eval_seconds, 3),
                   "wall_seconds": round(time.time() - t_start, 3), "train_tokens": tokens, "padded_tokens": st.padded_tokens,
                   "train_tokens_per_s": round(tokens / st.train_seconds, 1) if st.train_seconds else None},
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "versions": library_versions(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
