"""A few real optimizer steps of one configuration, timed and measured: what ``lmtune plan`` calibrates on.

Everything runs through the training loop's own functions (``_setup``, ``_optimizer_step``, the task's
``evaluate`` and ``save``), on the user's rows, so a probe costs what a trial costs per step, at the same
precision, attention kernel, micro-batching and thread count. What it measures:

* set-up: loading the model, applying the method, building the optimizer (tokenised rows come from the
  cache, as they do for every trial after the first);
* optimizer steps on real rows: the longest rows first (the memory peak of a run is its longest batch), then
  rows of median length, alternating; a linear fit of seconds against padded tokens of the step, through these
  two points, prices any batch of the run; the first step is a warm-up (it allocates the optimizer state) and
  is not timed;
* the peak memory of those steps above the memory before set-up (:class:`lmtune._memory.PeakMeter`);
* the evaluation forward pass on the longest and a median validation batch (the same linear fit), and for
  generation with text metrics, greedy decoding of one batch for 1 and for ``DECODE_TOKENS`` new tokens
  (prefill and per-token cost);
* copying the trainable weights (a search keeps the best evaluation's weights in memory) and, when asked,
  saving the output folder.

The model is thrown away afterwards; nothing is written outside ``scratch``.
"""

from __future__ import annotations

import copy
import gc
import logging
import os
import shutil
import statistics
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmtune._console import log
from lmtune._memory import PeakMeter, trim_heap

__all__ = ["DECODE_TOKENS", "ProbeResult", "padded_tokens", "probe"]

DECODE_TOKENS = 8
"""New tokens of the longer timed decoding call (the shorter one makes 1)."""


@dataclass
class ProbeResult:
    setup_s: float
    steps: list[dict[str, Any]]
    """Timed optimizer steps: seconds, padded tokens, rows, kind (longest | median)."""
    peak_bytes: int | None
    peak_method: str
    peak_rows: int
    """Rows of the longest micro-batch (where the peak is)."""
    peak_width: int
    """Its padded width in tokens."""
    peak_target_tokens: int
    """Its loss tokens (generation: what the logits' loss is taken over)."""
    eval_batches: list[dict[str, Any]]
    """Timed evaluation batches: seconds, padded tokens, rows."""
    eval_fixed_s: float
    """What an evaluation costs besides its forward passes (metrics), once per evaluation."""
    eval_batch_size: int
    micro_batch_size: int
    """The micro-batch at the end (lower than asked if a step ran out of memory)."""
    oom_events: list[dict[str, Any]]
    decode: dict[str, Any] | None
    """Generation with text metrics: seconds for 1 and for DECODE_TOKENS new tokens on ``prompts`` prompts."""
    copy_s: float
    save_s: float | None
    precision: str
    total_params: int
    trainable_params: int
    seconds: float = 0.0
    """Wall-clock time the probe itself took."""
    extra: dict[str, Any] = field(default_factory=dict)
    peak_logit_positions: int | None = None
    """Positions of the longest micro-batch whose logits the loss computed (generation: from the first that
    predicts a target, ``lmtune.tasks.generation.batch_loss``); None: all ``peak_width``."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ProbeResult:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def padded_tokens(lengths: Any, rows: list[int], micro: int, multiple: int | None = None) -> int:
    """Tokens a step's forward passes see: each micro-batch padded to its longest row (rounded up to ``multiple``)."""
    total = 0
    for i in range(0, len(rows), micro):
        chunk = rows[i : i + micro]
        width = max(int(lengths[r]) for r in chunk)
        if multiple:
            width = -(-width // multiple) * multiple
        total += len(chunk) * width
    return total


def _subset(enc: Any, rows: list[int]) -> Any:
    """The encoded rows ``rows`` of ``enc`` (classification's Encoded or generation's GenEncoded)."""
    per_row = ("input_ids", "labels", "prompt_ids", "target_tokens", "lengths")
    changes = {name: [getattr(enc, name)[i] for i in rows] for name in per_row
               if name in enc.__dataclass_fields__ and getattr(enc, name) is not None}
    if "truncated" in enc.__dataclass_fields__:
        changes["truncated"] = 0
    for name in ("cut", "completion_too_long"):
        if name in enc.__dataclass_fields__:
            changes[name] = []
    return type(enc)(**{**{f: getattr(enc, f) for f in enc.__dataclass_fields__}, **changes})


@contextmanager
def _quiet():
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _load_average() -> float | None:
    """The machine's 1-minute load average when the probe ends: timings taken while other work competes for the
    cores do not hold once it stops (and the other way round)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _logit_positions(enc: Any, rows: list[int]) -> int:
    from lmtune.tasks.generation import first_target, logit_positions

    return logit_positions([first_target(enc.labels[i]) for i in rows], max(len(enc.input_ids[i]) for i in rows))


def _timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _median_window(order: list[int], size: int) -> list[int]:
    """``size`` rows around the median of ``order`` (rows sorted by length)."""
    start = max(0, min(len(order) - size, len(order) // 2 - size // 2))
    return order[start : start + size]


def probe(cfg: Any, *, bundle: Any, tokenized_cache_dir: str, scratch: Path, warmup: int = 1, repeats: int = 2,
          measure_save: bool = False) -> ProbeResult:
    """Time and measure ``cfg`` (a RunConfig as a trial runs it) for a few steps; see the module docstring."""
    from lmtune.models import load_tokenizer, resolve
    from lmtune.tasks import resolve_task
    from lmtune.tasks.classification import pad_multiple
    from lmtune.train import loop
    from lmtune.train.loop import Resources

    t_start = time.perf_counter()
    scratch.mkdir(parents=True, exist_ok=True)
    task, cfg = resolve_task(copy.deepcopy(cfg))
    decode_rows = cfg.train.eval_generate_rows
    cfg.train.eval_generate_rows = 0  # the loss pass is timed here; decoding is timed on its own below
    cfg.train.divergence_factor = None  # a few steps on chosen rows are not a run to judge
    cfg.train.save_checkpoints = False
    cfg.train.progress = False
    cfg.output_dir = str(scratch)
    # Warm the tokenisation cache first, so the timed set-up is what every trial after the first pays.
    resolved = resolve(cfg.model.name, cfg.model.cache_dir)
    task.encode(load_tokenizer(resolved.path, cfg.model.trust_remote_code, cfg.model.name), bundle, cfg, tokenized_cache_dir)
    resources = Resources(tokenized_cache_dir=tokenized_cache_dir, data_bundle=bundle)

    s = None
    meter = PeakMeter()
    try:
        with meter:
            t0 = time.perf_counter()
            with _quiet():  # the data's warnings were shown when it was read; a trial repeats them, a probe need not
                s = loop._setup(cfg, task, resources, log.debug)
            setup_s = time.perf_counter() - t0
            st = loop._initial_state(s, None)
            meter.restart_peak()  # the load's transient is not the training peak
            lengths = s.train_enc.lengths
            order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
            size = min(cfg.train.global_batch_size, len(order))
            longest, median = order[:size], _median_window(order, size)
            multiple = pad_multiple(s.accelerator.device)
            steps = []
            # Each kind of batch once untimed first: its first step allocates the optimizer state, and on a GPU a
            # new shape's first step picks its kernels.
            schedule = [("longest", longest), ("median", median)] * (warmup + repeats)
            warmup *= 2
            for n, (kind, rows) in enumerate(schedule):
                micro = st.micro_batch_size
                seconds = _timed(lambda: loop._optimizer_step(s, st, rows, rows))
                if n >= warmup:
                    steps.append({"kind": kind, "seconds": seconds, "rows": len(rows),
                                  "padded_tokens": padded_tokens(lengths, rows, micro, multiple)})
        peak_rows = longest[: st.micro_batch_size]
        eval_batches, eval_fixed_s = _time_eval(s, st, multiple)
        decode = _time_decode(s, st) if task.name == "generation" and decode_rows != 0 else None
        copy_s = _timed(lambda: s.trainable(copy=True))
        save_s = _time_save(s, scratch) if measure_save else None
        return ProbeResult(
            setup_s=setup_s, steps=steps, peak_bytes=meter.peak_bytes, peak_method=meter.method,
            peak_rows=len(peak_rows), peak_width=max(int(lengths[i]) for i in peak_rows),
            peak_target_tokens=int(task.loss_units(s.train_enc, peak_rows)) if task.name == "generation" else 0,
            peak_logit_positions=_logit_positions(s.train_enc, peak_rows) if task.name == "generation" else None,
            eval_batches=eval_batches, eval_fixed_s=eval_fixed_s, eval_batch_size=s.eval_batch_size, micro_batch_size=st.micro_batch_size,
            oom_events=list(st.oom_events), decode=decode, copy_s=copy_s, save_s=save_s,
            precision="fp32" if s.mixed == "no" else s.mixed, total_params=s.loaded.total_params,
            trainable_params=s.loaded.trainable_params, seconds=time.perf_counter() - t_start,
            extra={"load_average": _load_average(), "cores": os.cpu_count(), "threads": torch.get_num_threads()})
    finally:
        del s
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        trim_heap()
        shutil.rmtree(scratch, ignore_errors=True)


def _time_eval(s: Any, st: Any, multiple: int | None) -> tuple[list[dict[str, Any]], float]:
    """The task's evaluation of one longest and one median validation batch, and of both together, twice each after
    a warm-up. Returns the per-batch times (with the evaluation's fixed cost taken out) and that fixed cost: what an
    evaluation pays once whatever its size (the metrics: sklearn's report takes ~0.2 s), as t(A) + t(B) - t(A+B)."""
    from lmtune.data.batching import LengthGroupedSampler

    lengths = s.val_enc.lengths
    batches = LengthGroupedSampler(lengths, s.eval_batch_size, shuffle=False, group_by_length=True).batches(0)
    if not batches:
        return [], 0.0
    longest, median = [int(i) for i in batches[0]], [int(i) for i in batches[len(batches) // 2]]
    picks = [("longest", longest), ("median", median)]
    if median != longest:
        picks.append(("both", longest + median))
    times: dict[str, list[float]] = {}
    s.model.eval()
    try:
        for n, (kind, rows) in enumerate([picks[0]] + picks * 2):
            sub = _subset(s.val_enc, rows)
            seconds = _timed(lambda: s.task.evaluate(s.model, sub, s.bundle, s.eval_batch_size, s.accelerator, s.pad_id,
                                                     st.global_step))
            if n:
                times.setdefault(kind, []).append(seconds)
    finally:
        s.model.train()
    med = {k: statistics.median(v) for k, v in times.items()}
    fixed = max(0.0, min(med["longest"], med["median"], med["longest"] + med["median"] - med["both"])) if "both" in med else 0.0
    out = [{"kind": kind, "seconds": max(0.0, t - fixed), "rows": len(rows),
            "padded_tokens": padded_tokens(lengths, rows, len(rows), multiple)}
           for kind, rows in picks if kind != "both" for t in times[kind]]
    return out, fixed


def _time_decode(s: Any, st: Any) -> dict[str, Any]:
    """Greedy decoding of a median batch of validation prompts for 1 and for DECODE_TOKENS new tokens (no stop
    token, so every call makes exactly that many)."""
    from lmtune.data.batching import LengthGroupedSampler
    from lmtune.decoding import generate

    prompts = s.val_enc.prompt_ids
    batches = LengthGroupedSampler([len(p) for p in prompts], s.eval_batch_size, shuffle=False).batches(0)
    rows = [int(i) for i in batches[len(batches) // 2]]
    batch = [prompts[i] for i in rows]
    model = s.accelerator.unwrap_model(s.model)

    def run(n: int) -> None:
        generate(model, batch, pad_id=s.pad_id, stop_ids=[], max_new_tokens=n, batch_size=len(batch))

    run(1)  # warm-up
    first = statistics.median(_timed(lambda: run(1)) for _ in range(2))
    last = statistics.median(_timed(lambda: run(DECODE_TOKENS)) for _ in range(2))
    return {"prompts": len(batch), "prompt_width": max(len(p) for p in batch), "first_s": first,
            "last_s": last, "new_tokens": DECODE_TOKENS, "metrics_s": _time_metrics(s, rows)}


def _time_metrics(s: Any, rows: list[int]) -> float:
    """Scoring decoded text against references (ROUGE, BLEU, chrF, per example too) for ``rows``' prompts, after a
    first call that imports the metric libraries (which would otherwise land in a search's first trial)."""
    from lmtune.generation_metrics import example_scores, generation_metrics

    refs = [[s.bundle.val.examples[i].completion] for i in rows]
    preds = [r[0][: max(1, len(r[0]) // 2)] for r in refs]  # a partial match: every metric has work to do

    def score() -> None:
        generation_metrics(preds, refs)
        example_scores(preds, refs)

    score()
    return _timed(score)


def _time_save(s: Any, scratch: Path) -> float:
    """Write the output folder as a trial's end does (fp32 weights back, LoRA merged), into a temporary folder."""
    target = Path(tempfile.mkdtemp(prefix="save-", dir=scratch))

    def save() -> None:
        unwrapped = s.accelerator.unwrap_model(s.model)
        if s.master:
            s.master.restore_fp32(unwrapped)
        s.task.save(unwrapped, s.tokenizer, target, s.cfg, s.train_enc)

    try:
        return _timed(save)
    finally:
        shutil.rmtree(target, ignore_errors=True)
