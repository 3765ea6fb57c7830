"""The cost of a search, known before it runs: ``lmtune plan`` (and the table ``lmtune tune`` prints first).

For every *shape* of the search space -- model x method x global batch x micro-batch x max length -- the plan
gives the parameters (total, trainable), the peak memory of a trial, the seconds per optimizer step, per
evaluation and per trial, how many trials of it fit ``--budget``, and whether it fits in memory at all.
Shapes that do not fit are listed before the search and never trained: a trial that samples one is failed at
once with the reason (see ``lmtune.tune.study``).

Time comes from a calibration on the user's own rows and machine (:mod:`lmtune.train.probe`: a few real
optimizer steps through the training loop, one evaluation batch, the model load, the save), cached per
machine (host, processor or GPU, torch threads and version), model (resolved path and a hash of its config),
method, precision, batch, micro-batch, length bucket (the padded width rounded up to a power of two) and task,
in ``<lmtune cache>/plan/``: a second plan of the same search is instant. The calibration fits seconds per
step as ``a + b x padded tokens of the step`` (through a longest and a median batch), and a trial is priced
with the padded tokens of the very batches it will run (the length-grouped sampler on the tokenised rows):

    trial seconds = load + save + epochs x (sum over the epoch's steps of (a + b x tokens)
                                            + evaluations per epoch x evaluation seconds)

Memory is a formula, checked against what the calibration measured (bytes; P = all parameters,
T = trainable ones, L = matmul weights; h hidden size, I MLP width, kv key/value width, a heads, s padded
width, n rows of the longest micro-batch, V vocabulary, t its loss tokens, ℓ layers; d = 4 in fp32, else 2):

    weights       fp32: 4P            bf16/fp16 autocast: 4P + 2L (16-bit weight copies kept for backward)
                  bf16-master: 2P + 4T (bf16 model + fp32 masters)
    gradients     4T (fp32, autocast); 2T (bf16-master; + 4T fp32 sums when the step accumulates micro-batches,
                  + its fp32 chunk buffer, 4 x max(8M, largest tensor), in the optimizer step only)
    optimizer     8T (AdamW's two fp32 moments)
    activations   ℓ x n x s x (d x (8h + 2kv + 4I) + norms + attention)     (4I -> 5I for a plain GELU MLP)
                  norms = 4h (bf16-master) or 12h (autocast: the residual stream and norms stay fp32);
                  attention = d x a x s (lmtune_eager keeps the probabilities), (4 + d) x a x s (eager), 0 (SDPA)
    backward      n x s x (d x (4h + 4I) + 2d x a x s): one layer's temporaries while backward works on it
    logits        generation: d x n x k x V + (8 + d) x t x V (the logits, the loss's fp32 copy and log-softmax),
                  k = the positions from the first one that predicts a target to the end (s with --train-on-prompt)
    evaluation    the evaluation batch's (2 x micro) logits and one layer's hidden states, no gradients
    best weights  4T on a CPU: a search trial keeps the best evaluation's weights in host memory
    CPU only      32 MiB (the runtime: oneDNN scratch, thread pools) + 15% of activations and backward (the heap
                  keeps holes where freed activations were: 10-30% measured)

    peak = weights + optimizer + max(gradients' + activations + backward + logits, evaluation) + best weights

where gradients' is all the gradients on a CPU (freed activation pages stay with the process as gradients take
new ones) and half of them on a GPU (the caching allocator hands freed activation blocks to the gradients as
backward moves down the layers).

The counts of the activation term come from the tensors a Llama-style decoder layer keeps for backward (the
residual input and two norm outputs per norm, q, k, v, the attention output, the MLP's gate, up, activation and
product). The measured peak (:mod:`lmtune._memory`: the resident-set high-water mark on CPUs,
``max_memory_allocated`` on GPUs) is shown beside the formula; where a shape was calibrated its measurement
decides whether it fits.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lmtune._console import log
from lmtune._io import atomic_write_json
from lmtune._memory import GIB, PeakMeter, available_bytes, device_kind, gib, machine
from lmtune.errors import ConfigError, LmtuneError

__all__ = ["CHECK_FILE", "PLAN_FILE", "Plan", "PlanCheck", "Prediction", "Row", "Shape", "make_plan", "memory_terms", "plan"]

PLAN_FILE = "plan.json"
CHECK_FILE = "plan_check.json"
CACHE_VERSION = 4  # 4: generation computes logits only from the first target position (faster steps, smaller peak)
CPU_RUNTIME_BYTES = 32 * 1024**2
"""What a CPU process adds once it trains, besides tensors (oneDNN scratch, thread pools, the autograd graph's
objects): measured ~20-30 MiB on a 3M-parameter model; a GPU's max_memory_allocated counts tensors only."""
CPU_HEAP_SLACK = 0.15
# Decoder layers with a gated MLP (gate, up, down): their MLP keeps four I-sized tensors for backward.
_GATED = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text",
                    "phi3", "olmo", "olmo2", "granite", "cohere", "starcoder2", "stablelm"})


# ---- the space as shapes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    model: str
    method: str
    global_batch_size: int
    micro_batch_size: int
    max_length: int

    def key(self) -> str:
        return f"{self.model}|{self.method}|{self.global_batch_size}|{self.micro_batch_size}|{self.max_length}"


def _values(space: Any, name: str, fallback: Any) -> list[Any]:
    """The values of a dimension a plan prices: every choice, or the two ends of an integer range."""
    dim = space.dims.get(name)
    if dim is None:
        return [fallback]
    if dim.kind in ("fixed", "choice"):
        return list(dim.choices)
    return sorted({int(dim.low), int(dim.high)})


def micro_batch(run: Any, global_batch: int) -> int:
    """The micro-batch a trial with this global batch uses (as the search sets it)."""
    return min(run.train.micro_batch_size or global_batch, global_batch)


def shapes(space: Any, run: Any) -> list[Shape]:
    out = []
    for model in _values(space, "model", run.model.name):
        for method in _values(space, "method", run.model.method):
            for g in _values(space, "global_batch_size", run.train.global_batch_size):
                for length in _values(space, "max_length", run.train.max_length):
                    out.append(Shape(str(model), str(method), int(g), micro_batch(run, int(g)), int(length)))
    return out


def _epochs(space: Any, run: Any) -> tuple[int, int, float]:
    """(fewest, most, mean) epochs a trial of the space runs."""
    dim = space.dims.get("epochs")
    if dim is None:
        return run.train.epochs, run.train.epochs, float(run.train.epochs)
    if dim.kind in ("fixed", "choice"):
        values = [int(v) for v in dim.choices]
        return min(values), max(values), statistics.fmean(values)
    return int(dim.low), int(dim.high), (dim.low + dim.high) / 2


def evaluations_per_epoch(steps_per_epoch: int, eval_every_steps: int | None) -> int:
    """Evaluations the training loop runs in an epoch: at its end, and every ``eval_every_steps`` steps within it."""
    every = eval_every_steps
    return sum(1 for k in range(1, steps_per_epoch + 1) if k == steps_per_epoch or (every and k % every == 0))


# ---- the architecture and its parameters -----------------------------------------------------------------


@dataclass(frozen=True)
class Arch:
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated: bool
    attention_dropout: float

    @classmethod
    def of(cls, config: Any) -> Arch:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config

        def first(*names: str, default: Any = None) -> Any:
            for n in names:
                v = getattr(text, n, None)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and v:
                    return v
            return default

        hidden = int(first("hidden_size", "n_embd", "d_model", "dim", default=768))
        heads = int(first("num_attention_heads", "n_head", "num_heads", default=12))
        model_type = str(getattr(text, "model_type", "") or getattr(config, "model_type", ""))
        return cls(model_type=model_type, hidden=hidden,
                   layers=int(first("num_hidden_layers", "n_layer", "num_layers", default=12)), heads=heads,
                   kv_heads=int(first("num_key_value_heads", default=heads)),
                   head_dim=int(first("head_dim", default=hidden // max(1, heads))),
                   intermediate=int(first("intermediate_size", "n_inner", "ffn_dim", default=4 * hidden)),
                   vocab=int(first("vocab_size", default=50257)), gated=model_type in _GATED,
                   attention_dropout=float(first("attention_dropout", "attn_pdrop", "attention_probs_dropout_prob",
                                                 default=0.0)))


@dataclass(frozen=True)
class Counts:
    total: int
    trainable: int
    matmul: int
    """Parameters in linear layers: what autocast casts to 16 bits in every forward pass."""
    largest: int
    """The largest trainable tensor (bf16-master's gradient buffer holds at least this)."""


def count_params(config: Any, *, task: str, n_labels: int, model_cfg: Any) -> Counts:
    """Parameters of the model a trial builds (head and method applied, LoRA via peft), on the meta device: no
    weights are loaded or allocated."""
    import logging
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from lmtune.models.classifier import apply_method

    hf_log = logging.getLogger("transformers")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)  # "some weights were not initialised": nothing is, on the meta device
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = copy.deepcopy(config)
            if task == "classification":
                cfg.num_labels = n_labels
                model = AutoModelForSequenceClassification.from_config(cfg)
            else:
                model = AutoModelForCausalLM.from_config(cfg)
            model = apply_method(model, model_cfg, task_type="SEQ_CLS" if task == "classification" else "CAUSAL_LM")
    finally:
        hf_log.setLevel(level)
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return Counts(sum(p.numel() for p in params), sum(p.numel() for p in trainable), matmul,
                  max((p.numel() for p in trainable), default=0))


def attention_kind(requested: str, arch: Arch, cuda: bool) -> str:
    """The attention a trial trains with (as lmtune.models chooses it): lmtune_eager, eager or sdpa-like."""
    from lmtune.models.classifier import LMTUNE_EAGER_TYPES

    if requested == "lmtune_eager" or (requested == "auto" and not cuda):
        return "lmtune_eager" if arch.model_type in LMTUNE_EAGER_TYPES else "eager"
    if requested == "auto":
        return "sdpa"
    return requested


# ---- the memory formula ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """The largest forward pass of a run: rows of its longest micro-batch, their padded width, their loss tokens."""

    rows: int
    width: int
    target_tokens: int = 0
    logit_positions: int | None = None
    """Positions whose logits are computed (generation: from the first that predicts a target); None: all ``width``."""


def memory_terms(arch: Arch, counts: Counts, *, mode: str, attention: str, task: str, train: Batch, evaluation: Batch,
                 accumulate: bool, keep_best: bool, cuda: bool = False) -> dict[str, int]:
    """The formula of the module docstring, term by term (bytes); ``peak`` is the sum that matters.

    ``mode`` is the precision a run computes in: ``no`` (fp32), ``bf16`` / ``fp16`` (autocast) or ``bf16-master``.
    """
    from lmtune.train.precision import MASTER, MasterWeights

    p, t = counts.total, counts.trainable
    d = 4 if mode == "no" else 2
    buffer = 0  # bf16-master's fp32 gradient chunk: allocated in the optimizer step, once activations are freed
    if mode == MASTER:
        weights = 2 * p + 4 * t
        grads = 2 * t + (4 * t if accumulate else 0)
        buffer = 4 * min(t, max(MasterWeights.CHUNK_NUMEL, counts.largest))
    elif mode == "no":
        weights, grads = 4 * p, 4 * t
    else:
        weights, grads = 4 * p + 2 * counts.matmul, 4 * t
    h, kv = arch.hidden, arch.kv_heads * arch.head_dim
    mlp = (4 if arch.gated else 5) * arch.intermediate
    norms = 0 if mode == "no" else (4 * h if mode == MASTER else 12 * h)

    def per_token(width: int) -> float:
        if attention == "lmtune_eager":
            att = d * arch.heads * width
        elif attention == "eager":
            att = (4 + d) * arch.heads * width + (1 + d) * arch.heads * width * (arch.attention_dropout > 0)
        else:  # SDPA / flash kernels keep O(width) per token, already in the h terms
            att = 0
        return d * (8 * h + 2 * kv + mlp) + norms + att

    activations = int(arch.layers * train.rows * train.width * per_token(train.width))
    # Backward works through one layer at a time with its own temporaries on top of what is kept: the gradients of
    # the MLP's four I-wide tensors and of the hidden states, and of the attention probabilities.
    backward = int(train.rows * train.width * (d * (4 * h + 4 * arch.intermediate) + 2 * d * arch.heads * train.width))
    logits = eval_logits = 0
    if task == "generation":
        logits = d * train.rows * (train.logit_positions or train.width) * arch.vocab + (8 + d) * train.target_tokens * arch.vocab
        eval_logits = (d * evaluation.rows * (evaluation.logit_positions or evaluation.width) * arch.vocab
                       + (8 + d) * evaluation.target_tokens * arch.vocab)
    # No gradients at evaluation; the hidden states of one layer at a time (the MLP is the widest).
    eval_peak = eval_logits + d * evaluation.rows * evaluation.width * (2 * h + 2 * arch.intermediate)
    optimizer = 8 * t
    # The best evaluation's weights are kept on the CPU (lmtune.train.checkpoint.trainable_state): host memory.
    best = 4 * t if keep_best and not cuda else 0
    # A CPU's heap keeps holes where freed activation buffers were (glibc serves tensors below 32 MB from its heap):
    # the resident set ran 10-30% above the live activations in measurements on 3M- and 135M-parameter models.
    allocator = 0 if cuda else int(CPU_HEAP_SLACK * (activations + backward))
    runtime = 0 if cuda else CPU_RUNTIME_BYTES
    # Backward frees each layer's activations as it allocates that layer's gradients. On a GPU the caching allocator
    # hands the freed blocks straight to the gradients (max_memory_allocated counts live tensors): about half the
    # gradients coexist with the activations at the peak (measured: H100, SmolLM2-135M, within 3% on generation). On a
    # CPU the activations' pages stay with the process as the gradients take new ones: all of them count.
    overlap = grads // 2 if cuda else grads
    train_peak = max(overlap + activations + backward + allocator + logits, grads + buffer)
    peak = runtime + weights + optimizer + max(train_peak, eval_peak) + best
    return {"runtime": runtime, "weights": weights, "optimizer": optimizer, "gradients": grads + buffer,
            "activations": activations, "backward": backward, "allocator": allocator, "logits": logits,
            "evaluation": eval_peak, "best_weights": best, "training_peak": runtime + weights + optimizer + train_peak,
            "peak": peak}


# ---- the rows of a task at a max length -------------------------------------------------------------------


@dataclass
class _Rows:
    """Token counts of the training and validation rows at one max length (what batches and the formula need)."""

    train_lengths: list[int]
    train_targets: list[int] | None
    val_lengths: list[int]
    val_targets: list[int] | None = None
    train_first_targets: list[int] | None = None
    """Generation: each row's first target index (``lmtune.tasks.generation.first_target``)."""
    val_first_targets: list[int] | None = None
    val_prompt_lengths: list[int] | None = None
    decode_groups: list[list[int]] = field(default_factory=list)
    max_new_tokens: int | None = None

    def longest(self, micro: int, targets: bool = True) -> Batch:
        order = sorted(range(len(self.train_lengths)), key=lambda i: (-self.train_lengths[i], i))[:micro]
        return self._batch(order, self.train_lengths, self.train_targets if targets else None, self.train_first_targets)

    def longest_eval(self, size: int) -> Batch:
        order = sorted(range(len(self.val_lengths)), key=lambda i: (-self.val_lengths[i], i))[:size]
        if not order:
            return Batch(0, 0)
        return self._batch(order, self.val_lengths, self.val_targets, self.val_first_targets)

    @staticmethod
    def _batch(order: list[int], lengths: list[int], targets: list[int] | None, firsts: list[int] | None) -> Batch:
        from lmtune.tasks.generation import logit_positions

        width = max(lengths[i] for i in order)
        if targets is None:
            return Batch(len(order), width)
        positions = logit_positions([firsts[i] for i in order], width) if firsts is not None else None
        return Batch(len(order), width, sum(targets[i] for i in order), positions)


def _encode_rows(task: Any, tokenizer: Any, bundle: Any, cfg: Any, cache_dir: str) -> _Rows:
    import numpy as np

    train, val = task.encode(tokenizer, bundle, cfg, cache_dir)
    rows = _Rows([int(x) for x in train.lengths], None, [int(x) for x in val.lengths])
    if task.name == "generation":
        rows.train_targets = [int(x) for x in train.target_tokens]
        rows.val_targets = [int(x) for x in val.target_tokens]
        from lmtune.tasks.generation import first_target

        rows.train_first_targets = [first_target(y) for y in train.labels]
        rows.val_first_targets = [first_target(y) for y in val.labels]
        rows.val_prompt_lengths = [len(p) for p in val.prompt_ids]
        rows.max_new_tokens = task.max_new_tokens
        groups = list(bundle.val.groups().values())
        sample = cfg.train.eval_generate_rows
        if sample == 0:
            groups = []
        elif sample is not None and sample < len(groups):  # the sample generate_and_score decodes
            pick = np.random.default_rng(cfg.data.split_seed).permutation(len(groups))[:sample]
            groups = [groups[int(g)] for g in sorted(pick)]
        rows.decode_groups = groups
    return rows


# ---- time from a calibration -----------------------------------------------------------------------------


def linear_fit(points: list[dict[str, Any]]) -> tuple[float, float]:
    """(a, b) of seconds = a + b x padded tokens, through the median time of each kind of batch."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for p in points:
        by_kind.setdefault(p["kind"], []).append(p)
    pts = sorted((statistics.median(q["padded_tokens"] for q in ps), statistics.median(q["seconds"] for q in ps))
                 for ps in by_kind.values())
    if not pts:
        return 0.0, 0.0
    (x2, y2), (x1, y1) = pts[0], pts[-1]
    if x1 - x2 < 0.1 * x1:  # one size of batch: price by tokens alone
        return 0.0, statistics.fmean(y for _, y in pts) / max(1.0, statistics.fmean(x for x, _ in pts))
    b = (y1 - y2) / (x1 - x2)
    if b < 0:  # the longer batch was not slower (noise): a constant
        return statistics.fmean((y1, y2)), 0.0
    a = y2 - b * x2
    if a < 0:
        return 0.0, y1 / x1
    return a, b


def _decode_seconds(rows: _Rows, probe: dict[str, Any] | None, batch_size: int) -> float:
    """Greedy decoding of the evaluation's prompt groups: a prefill per batch plus a step per new token, each new-token
    count the batch's longest expected completion (the mean reference length of a group, within max_new_tokens)."""
    from lmtune.decoding import plan_batches

    if not probe or not rows.decode_groups or rows.val_prompt_lengths is None or rows.val_targets is None:
        return 0.0
    per_token = max(0.0, (probe["last_s"] - probe["first_s"]) / max(1, probe["new_tokens"] - 1)) / max(1, probe["prompts"])
    prefill_per_token = probe["first_s"] / max(1, probe["prompts"] * probe["prompt_width"])
    lengths = [rows.val_prompt_lengths[g[0]] for g in rows.decode_groups]
    expected = [min(rows.max_new_tokens or 10**9, round(statistics.fmean(rows.val_targets[i] for i in g)))
                for g in rows.decode_groups]
    # Scoring the decoded text costs about the same per prompt whatever the batch.
    total = probe.get("metrics_s", 0.0) * len(rows.decode_groups) / max(1, probe["prompts"])
    for b in plan_batches(lengths, batch_size):
        width = max(lengths[i] for i in b)
        new = max(expected[i] for i in b)
        total += prefill_per_token * len(b) * width + per_token * len(b) * max(0, new - 1)
    return total


# ---- the plan --------------------------------------------------------------------------------------------


@dataclass
class Row:
    shape: Shape
    precision: str | None
    total_params: int | None = None
    trainable_params: int | None = None
    memory: dict[str, int] = field(default_factory=dict)
    measured_peak: int | None = None
    """The calibration's measured training peak, plus the best weights a trial keeps (comparable with a trial's peak)."""
    fits: bool = True
    reason: str | None = None
    calibration: str = "not run"
    """measured | cached | not run (and why) | failed: ..."""
    steps_per_epoch: int = 0
    evals_per_epoch: int = 0
    step_s: float | None = None
    """Mean seconds per optimizer step over an epoch's batches."""
    eval_s: float | None = None
    """Seconds per evaluation without decoding (the loss pass)."""
    decode_s: float = 0.0
    """Seconds to decode the validation prompts once (generation)."""
    decode_final_only: bool = False
    """Decoding happens at a trial's final evaluation only (--eval-generate final), not at every evaluation."""
    fixed_s: float | None = None
    """Model load, set-up and the save at the end: paid once per trial."""
    trials_in_budget: int | None = None
    fit: dict[str, float] = field(default_factory=dict)
    """The calibration's fits: step_a, step_b, eval_a, eval_b (seconds, seconds per padded token)."""

    @property
    def evaluation_s(self) -> float | None:
        """What one evaluation during training costs: the loss pass, and decoding unless only the final one decodes."""
        return None if self.eval_s is None else self.eval_s + (0.0 if self.decode_final_only else self.decode_s)

    @property
    def peak(self) -> int | None:
        """The peak a trial is expected to reach: measured where calibrated, else the formula."""
        return self.measured_peak if self.measured_peak is not None else self.memory.get("peak")

    def trial_seconds(self, epochs: float, max_steps: int | None = None) -> float | None:
        if self.step_s is None or self.eval_s is None or self.fixed_s is None:
            return None
        steps = self.steps_per_epoch * epochs
        share = min(1.0, max_steps / steps) if max_steps and steps else 1.0
        evals = share * epochs * self.evals_per_epoch
        decodes = 1.0 if self.decode_final_only else evals
        return self.fixed_s + share * epochs * self.steps_per_epoch * self.step_s + evals * self.eval_s + decodes * self.decode_s

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = asdict(self.shape)
        d["peak_bytes"] = self.peak
        return d


@dataclass
class Prediction:
    fits: bool
    reason: str | None
    seconds: float | None
    peak_bytes: int | None
    row: Row | None

    def attrs(self) -> dict[str, Any]:
        """What a trial records at its start, so its prediction can be checked against what it took."""
        r = self.row
        if r is None or r.step_s is None or self.seconds is None:
            return {}
        return {"plan_seconds": round(self.seconds, 2),
                "plan_peak_gib": round(self.peak_bytes / GIB, 3) if self.peak_bytes else None,
                "plan": {"fixed_s": round(r.fixed_s or 0.0, 3), "step_s": round(r.step_s, 4), "eval_s": round(r.eval_s or 0.0, 3),
                         "decode_s": round(r.decode_s, 3), "decode_final_only": r.decode_final_only,
                         "steps_per_epoch": r.steps_per_epoch, "evals_per_epoch": r.evals_per_epoch}}


@dataclass
class Plan:
    machine: dict[str, Any]
    device: str
    memory_limit: int
    limit_source: str
    budget_s: float | None
    epochs: tuple[int, int, float]
    rows: list[Row]
    calibration_s: float = 0.0
    calibrated: int = 0
    cached: int = 0
    reserve_s: float | None = None
    trials_in_budget: int | None = None
    max_steps: int | None = None
    notes: list[str] = field(default_factory=list)

    def row_for(self, params: dict[str, Any], run: Any) -> Row | None:
        """The row of a trial's parameters; a value inside a searched range (not one of the rows) takes the nearest
        row at or above it (the dearer one), else the largest."""
        g = int(params.get("global_batch_size", run.train.global_batch_size))
        length = int(params.get("max_length", run.train.max_length))
        same = [r for r in self.rows if r.shape.model == str(params.get("model", run.model.name))
                and r.shape.method == str(params.get("method", run.model.method))]
        if not same:
            return None
        exact = [r for r in same if r.shape.global_batch_size == g and r.shape.max_length == length]
        if exact:
            return exact[0]
        above = [r for r in same if r.shape.global_batch_size >= g and r.shape.max_length >= length]
        pool = above or same
        return min(pool, key=lambda r: (r.shape.global_batch_size, r.shape.max_length)) if above else \
            max(pool, key=lambda r: (r.shape.global_batch_size, r.shape.max_length))

    def predict(self, params: dict[str, Any], run: Any) -> Prediction:
        row = self.row_for(params, run)
        if row is None:
            return Prediction(True, None, None, None, None)
        epochs = int(params.get("epochs", run.train.epochs))
        return Prediction(row.fits, row.reason, row.trial_seconds(epochs, self.max_steps), row.peak, row)

    def to_json(self) -> dict[str, Any]:
        return {"format": "lmtune-plan/1", "machine": self.machine, "device": self.device,
                "memory_limit_bytes": self.memory_limit, "memory_limit_source": self.limit_source,
                "budget_s": self.budget_s, "epochs": {"min": self.epochs[0], "max": self.epochs[1], "mean": self.epochs[2]},
                "reserve_s": self.reserve_s, "trials_in_budget": self.trials_in_budget,
                "calibration": {"seconds": round(self.calibration_s, 2), "calibrated": self.calibrated, "cached": self.cached},
                "notes": self.notes, "rows": [r.to_json() for r in self.rows]}

    def lines(self) -> list[str]:
        """The table (one row per shape) and its footnotes, as printed."""
        lo, hi, _ = self.epochs
        ep = f"{lo}" if lo == hi else f"{lo}..{hi}"
        head = (f"{'model':<24} {'method':<6} {'batch':>5} {'micro':>5} {'maxlen':>6} {'params M (train)':>17} "
                f"{'peak GiB':>8} {'measured':>8} {'s/step':>7} {'s/eval':>7} {f's/trial ({ep} ep)':>17} "
                f"{'trials':>6}  fits")
        out = [head]
        for r in self.rows:
            s = r.shape
            params = "-" if r.total_params is None else f"{r.total_params / 1e6:.1f} ({_m(r.trainable_params)})"
            t_lo, t_hi = r.trial_seconds(lo, self.max_steps), r.trial_seconds(hi, self.max_steps)
            trial = "-" if t_lo is None else (f"{t_lo:.0f}" if lo == hi else f"{t_lo:.0f}..{t_hi:.0f}")
            out.append(f"{_short(s.model, 24):<24} {s.method:<6} {s.global_batch_size:>5} {s.micro_batch_size:>5} "
                       f"{s.max_length:>6} {params:>17} {gib(r.memory.get('peak')):>8} {gib(r.measured_peak):>8} "
                       f"{_sec(r.step_s):>7} {_sec(r.evaluation_s):>7} {trial:>17} "
                       f"{'-' if r.trials_in_budget is None else r.trials_in_budget:>6}  "
                       + ("yes" if r.fits else f"NO: {r.reason}"))
        return out

    def summary(self) -> list[str]:
        fit = [r for r in self.rows if r.fits]
        lines = [f"memory limit {gib(self.memory_limit)} GiB ({self.limit_source}); "
                 f"{len(fit)} of {len(self.rows)} configuration(s) fit"
                 + (f"; {len(self.rows) - len(fit)} will not be trained" if len(fit) < len(self.rows) else "")]
        if self.budget_s is not None and self.trials_in_budget is not None:
            lines.append(f"budget {self.budget_s:.0f} s: about {self.trials_in_budget} trial(s) of the mean "
                         f"{self.epochs[2]:g} epochs fit (fewer if larger settings are drawn more often, more when "
                         f"trials are pruned), with ~{self.reserve_s or 0:.0f} s kept for confirmation and refit")
        lines.append(f"calibration: {self.calibrated} configuration(s) measured, {self.cached} from the cache, "
                     f"{self.calibration_s:.1f} s")
        return lines + self.notes


def _m(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f}" if n >= 1e5 else f"{n / 1e6:.3f}"


def _sec(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.0f}"


def _short(text: str, n: int) -> str:
    return text if len(text) <= n else "..." + text[-(n - 3):]


# ---- the calibration cache -------------------------------------------------------------------------------


class _Cache:
    """Calibrations of one machine: ``<cache>/plan/<machine hash>/``, one JSON file per calibrated configuration
    (named by its key), so workers calibrating at the same time never overwrite each other's entries."""

    def __init__(self, root: Path, machine_info: dict[str, Any]):
        digest = hashlib.sha256(json.dumps(machine_info, sort_keys=True).encode()).hexdigest()[:16]
        self.path = root / digest
        self.machine = machine_info

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            value = json.loads((self.path / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def put(self, key: str, value: dict[str, Any]) -> None:
        try:
            if not (self.path / "machine.json").is_file():
                atomic_write_json(self.path / "machine.json", self.machine)
            atomic_write_json(self.path / f"{key}.json", value)
        except OSError as e:  # an unwritable cache costs a recalibration next time, not the plan
            log.warning(f"warning: plan cache not written ({self.path}: {e.strerror or e})")


def _key(**parts: Any) -> str:
    return hashlib.sha256(json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _bucket(width: int) -> int:
    return 1 << max(3, math.ceil(math.log2(max(1, width))))


# ---- making the plan -------------------------------------------------------------------------------------


@dataclass
class _Model:
    """What a plan knows of one model: its source, architecture, tokenizer and its rows at each max length."""

    name: str
    resolved: Any
    config: Any
    arch: Arch
    tokenizer: Any
    ident: str
    rows: dict[int, _Rows] = field(default_factory=dict)


def _load_model_info(name: str, run: Any) -> _Model:
    from transformers import AutoConfig

    from lmtune.errors import ModelError
    from lmtune.models import load_tokenizer, resolve

    resolved = resolve(name, run.model.cache_dir)
    try:
        config = AutoConfig.from_pretrained(resolved.path, trust_remote_code=run.model.trust_remote_code)
    except Exception as e:
        raise ModelError(f"--model {name}: cannot read its config ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    tokenizer = load_tokenizer(resolved.path, run.model.trust_remote_code, name)
    ident = resolved.path + "#" + hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16]
    return _Model(name, resolved, config, Arch.of(config), tokenizer, ident)


def _memory_limit(tc: Any) -> tuple[int, str]:
    if tc.memory_limit is not None:
        return tc.memory_limit_bytes, "--memory-limit"
    return available_bytes()


def make_plan(run: Any, space: Any, tc: Any, *, task: Any, bundle: Any, scratch: Path, calibrate: bool = True) -> Plan:
    """Price every shape of ``space`` (see the module docstring); logs the table. ``run`` is the study's base
    RunConfig with a concrete task; ``scratch`` a folder the calibration may write to (removed after)."""
    import torch

    from lmtune.models import cache_root
    from lmtune.train.precision import MASTER, resolve_precision
    from lmtune.tune.study import _apply

    t0 = time.time()
    limit, source = _memory_limit(tc)
    info = machine()
    cache = _Cache(cache_root(run.model.cache_dir) / "plan", info)
    tok_cache = str(cache_root(run.model.cache_dir) / "tokenized")
    cuda = torch.cuda.is_available()
    n_train = len(bundle.train)
    n_labels = len(bundle.label_map.labels) if hasattr(bundle, "label_map") else 0
    epochs = _epochs(space, run)
    rank_dim = space.dims.get("lora_rank")
    lora_rank = int(max(_values(space, "lora_rank", run.model.lora_rank))) if rank_dim is not None else run.model.lora_rank
    plan = Plan(info, device_kind(), limit, source, tc.budget_seconds, epochs, [], max_steps=run.train.max_steps)

    models: dict[str, _Model] = {}
    counts: dict[tuple[str, str], Counts | None] = {}
    used: list[dict[str, Any]] = []  # the calibrations this plan rests on
    for shape in shapes(space, run):
        m = models.get(shape.model) or models.setdefault(shape.model, _load_model_info(shape.model, run))
        cfg = _apply(run, {"model": shape.model, "method": shape.method, "global_batch_size": shape.global_batch_size,
                           "max_length": shape.max_length, "lora_rank": lora_rank}, scratch, tc.evals_per_epoch, n_train)
        if shape.max_length not in m.rows:
            m.rows[shape.max_length] = _encode_rows(task, m.tokenizer, bundle, cfg, tok_cache)
        rows = m.rows[shape.max_length]
        if (shape.model, shape.method) not in counts:
            try:
                counts[(shape.model, shape.method)] = count_params(m.config, task=task.name, n_labels=n_labels, model_cfg=cfg.model)
            except Exception as e:  # an architecture the meta build does not take: the calibration still counts
                log.debug(f"plan: parameters of {shape.model} not counted on the meta device ({type(e).__name__}: {e})")
                counts[(shape.model, shape.method)] = None
        c = counts[(shape.model, shape.method)]
        problem = None
        if cfg.train.precision == MASTER and shape.method != "full":
            problem = f"--precision {MASTER} needs --method full"
        if task.name == "generation" and shape.method == "head":
            problem = "--method head trains a classification head only"
        mode = resolve_precision(cfg.train.precision, master_ok=shape.method == "full")
        row = Row(shape, "fp32" if mode == "no" else mode)
        plan.rows.append(row)
        if problem:
            row.fits, row.reason, row.calibration = False, problem, "not run: invalid"
            continue
        attention = attention_kind(cfg.model.attn_implementation, m.arch, cuda)
        eval_size = cfg.train.eval_batch_size or 2 * shape.micro_batch_size
        peak_batch, eval_batch = rows.longest(shape.micro_batch_size, not cfg.train.train_on_prompt), rows.longest_eval(eval_size)
        if cfg.train.train_on_prompt:
            peak_batch = Batch(peak_batch.rows, peak_batch.width, peak_batch.rows * peak_batch.width)

        def formula(batch: Batch, cnt: Counts) -> dict[str, int]:
            return memory_terms(m.arch, cnt, mode=mode, attention=attention, task=task.name, train=batch,
                                evaluation=eval_batch, accumulate=shape.global_batch_size > shape.micro_batch_size,
                                keep_best=True, cuda=cuda)

        if c is not None:
            row.total_params, row.trainable_params = c.total, c.trainable
            row.memory = formula(peak_batch, c)
            if row.memory["peak"] > limit:
                row.fits, row.calibration = False, "not run: over the memory limit"
                row.reason = f"needs ~{gib(row.memory['peak'])} GiB, limit {gib(limit)} GiB"
                continue
        if not calibrate:
            continue
        key = _key(machine=info, model=m.ident, method=shape.method, lora_rank=lora_rank if shape.method == "lora" else None,
                   precision=cfg.train.precision, mode=mode, attention=attention, task=task.name,
                   batch=shape.global_batch_size, micro=shape.micro_batch_size, bucket=_bucket(peak_batch.width),
                   eval_batch=eval_size, decode=task.name == "generation" and cfg.train.eval_generate_rows != 0)
        save_key = _key(machine=info, model=m.ident, method=shape.method, precision=cfg.train.precision, what="save")
        entry = cache.get(key)
        if entry is not None:
            row.calibration = "cached"
            plan.cached += 1
        else:
            from lmtune.train.probe import probe

            need_save = cache.get(save_key) is None
            log.info(f"plan: calibrating {shape.model} {shape.method} batch {shape.global_batch_size} (micro "
                     f"{shape.micro_batch_size}) max length {shape.max_length} ...")
            try:
                result = probe(cfg, bundle=bundle, tokenized_cache_dir=tok_cache, scratch=scratch / "probe",
                               measure_save=need_save)
            except (torch.OutOfMemoryError, MemoryError) as e:
                row.fits, row.calibration = False, "failed: out of memory"
                row.reason = f"out of memory in calibration ({type(e).__name__})"
                continue
            except LmtuneError:
                raise
            entry = result.to_json()
            cache.put(key, entry)
            if result.save_s is not None:
                cache.put(save_key, {"save_s": result.save_s})
            row.calibration = "measured"
            plan.calibrated += 1
        used.append(entry)
        _apply_calibration(row, entry, rows, cfg, shape, m, task, formula, c, limit, cuda)
        saved = (cache.get(save_key) or {}).get("save_s")
        if saved is None:  # no save measured for this model (an older cache): fp32 weights written at ~500 MB/s
            saved = 4 * (row.total_params or 0) / 500e6
        if row.fixed_s is not None:
            row.fixed_s += saved
    _budget(plan, tc, bundle, n_train)
    _warm_imports(task)
    busy = _busy(used, plan, cache)
    if busy:
        plan.notes.append(busy)
    heap = heap_note(task.name, plan.device)
    if heap:
        plan.notes.append(heap)
    if task.name == "generation" and any(m.rows and next(iter(m.rows.values())).decode_groups for m in models.values()):
        plan.notes.append("decoding time assumes completions as long as the references; a model that does not stop "
                          "yet decodes up to --max-new-tokens per evaluation (early evaluations can take longer)")
        if run.train.eval_generate == "final":
            plan.notes.append("s/eval is the loss pass: each trial decodes the validation prompts once, at its final "
                              "evaluation (--eval-generate final), and s/trial counts that once")
    shutil.rmtree(scratch, ignore_errors=True)
    plan.calibration_s = time.time() - t0
    fitting = [r for r in plan.rows if r.fits]
    if not fitting:
        smallest = min(plan.rows, key=lambda r: r.peak or 0)
        raise ConfigError(f"no configuration of the search space fits in memory ({gib(limit)} GiB, {source}); the "
                          f"smallest needs ~{gib(smallest.peak)} GiB ({smallest.shape.model}, batch "
                          f"{smallest.shape.global_batch_size}, max length {smallest.shape.max_length}); lower "
                          "--batch-size, --micro-batch-size or --max-length, or raise --memory-limit")
    return plan


def _busy(entries: list[dict[str, Any]], plan: Plan, cache: _Cache) -> str | None:
    """A warning when a calibration ran beside other work (timings then hold only while that load lasts): CPU
    threads that share cores with other work wait for each other, and steps slow down many times over, not in
    proportion. The load average counts the calibration's own threads too, so the other work is what is left
    after them: a core's worth or more is other work."""
    cores = plan.machine.get("cores") or 1
    others = []
    for e in entries:
        extra = e.get("extra") or {}
        load, threads = extra.get("load_average"), extra.get("threads")
        if isinstance(load, (int, float)):
            others.append(load - min(threads if isinstance(threads, int) else cores, cores))
    worst = max(others, default=None)
    if plan.device == "cpu" and worst is not None and worst >= 1.0:
        return (f"warning: a calibration ran beside other work (load average ~{worst:.1f} above its own threads, on "
                f"{cores} cores); its times hold only while that much other work runs (delete the plan cache to "
                f"calibrate again when the machine is quiet: {cache.path})")
    return None


def heap_note(task: str, device: str) -> str | None:
    """What the peak column does not hold for generation on a CPU (measured, not modelled).

    The calibration measures a few steps of two batch shapes. A generation trial runs batches of many widths, each
    with a large logits tensor; glibc then raises its mmap threshold (up to 32 MiB) and serves the activations from
    its heap, whose holes grow with every new shape. In a study of SmolLM2-135M on E2E (10 trials of 1..3 epochs)
    the resident peak was a median 30% above the prediction (13-42%); in a 2-trial check at one epoch, 5% at batch
    16 and 34% at batch 8 (bench/results/plan-memory-cpu-e2e/). With the threshold fixed the same trials peaked
    10-14% below the prediction, but ran 40-60% longer (page faults), so lmtune does not fix it for the user.
    """
    if task != "generation" or device != "cpu":
        return None
    return ("peak GiB on a CPU is measured over a few steps: batches of many lengths fragment the C heap over a "
            "whole generation trial, and its resident peak was measured up to ~40% higher (median 30% in a "
            "SmolLM2-135M E2E study); keep that much room below --memory-limit, or set "
            "MALLOC_MMAP_THRESHOLD_=131072 in the environment (peaks within the prediction, trials 40-60% slower)")


def _warm_imports(task: Any) -> None:
    """Import (by calling once) what an evaluation scores with, so a search's first trial does not pay the import's
    seconds and memory (the calibration does this too, but a cached plan runs no calibration)."""
    import numpy as np

    import torch

    if torch.cuda.is_available():  # the CUDA context and cuBLAS handles, so the first trial starts as the rest do
        x = torch.ones(8, 8, device="cuda", requires_grad=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = (x @ x).float().sum()
        y.backward()
        torch.cuda.synchronize()
    if task.name == "generation":
        from lmtune.generation_metrics import example_scores, generation_metrics

        generation_metrics(["a b"], [["a b c"]])
        example_scores(["a b"], [["a b c"]])
    else:
        from lmtune.train.metrics import classification_metrics

        classification_metrics(np.array([[0.0, 1.0], [1.0, 0.0]]), np.array([1, 0]), ["a", "b"], detailed=True)


def _apply_calibration(row: Row, entry: dict[str, Any], rows: _Rows, cfg: Any, shape: Shape, m: _Model, task: Any,
                       formula, counts: Counts | None, limit: int, cuda: bool) -> None:
    """Fill a row's measured memory and times from a calibration (fresh or cached)."""
    from lmtune.data.batching import LengthGroupedSampler
    from lmtune.train.probe import ProbeResult, padded_tokens

    p = ProbeResult.from_json(entry)
    if counts is None:  # no meta count: the calibration's model counted them
        counts = Counts(p.total_params, p.trainable_params, p.total_params, 0)
        row.total_params, row.trainable_params = p.total_params, p.trainable_params
        row.memory = formula(rows.longest(shape.micro_batch_size), counts)
    if p.oom_events:
        row.fits = False
        row.reason = (f"out of memory at micro-batch {shape.micro_batch_size} in calibration; fits with "
                      f"--micro-batch-size {p.micro_batch_size}")
    if p.peak_bytes is not None:
        # The measurement was on the calibration's longest batch; today's data may be a little longer or shorter
        # within the same length bucket: move it by what the formula says that difference costs.
        then = formula(Batch(p.peak_rows, p.peak_width, p.peak_target_tokens, p.peak_logit_positions), counts)["training_peak"]
        now = row.memory["training_peak"]
        row.measured_peak = int(p.peak_bytes + (now - then) + row.memory["best_weights"])
        if row.fits and row.measured_peak > limit:
            row.fits = False
            row.reason = f"measured ~{gib(row.measured_peak)} GiB, limit {gib(limit)} GiB"
    multiple = 8 if cuda else None
    a, b = linear_fit(p.steps)
    ea, eb = linear_fit(p.eval_batches)
    row.fit = {"step_a": a, "step_b": b, "eval_a": ea, "eval_b": eb}
    lengths = rows.train_lengths
    batches = LengthGroupedSampler(lengths, shape.global_batch_size, shuffle=True, seed=cfg.train.seed,
                                   group_by_length=cfg.train.group_by_length).batches(0)
    row.steps_per_epoch = len(batches)
    row.evals_per_epoch = evaluations_per_epoch(len(batches), cfg.train.eval_every_steps)
    tokens = [padded_tokens(lengths, [int(i) for i in bt], shape.micro_batch_size, multiple) for bt in batches]
    row.step_s = (a * len(tokens) + b * sum(tokens)) / max(1, len(tokens))
    eval_size = p.eval_batch_size
    val_batches = LengthGroupedSampler(rows.val_lengths, eval_size, shuffle=False, group_by_length=True).batches(0)
    eval_tokens = [padded_tokens(rows.val_lengths, [int(i) for i in bt], eval_size, multiple) for bt in val_batches]
    row.eval_s = p.eval_fixed_s + ea * len(eval_tokens) + eb * sum(eval_tokens) + p.copy_s
    row.decode_s = _decode_seconds(rows, p.decode, eval_size)
    row.decode_final_only = cfg.train.eval_generate == "final"
    row.fixed_s = p.setup_s


def _budget(plan: Plan, tc: Any, bundle: Any, n_train: int) -> None:
    """Trials of each row, and of the mean fitting row, that fit the budget after what is kept for the end."""
    from lmtune.tune.study import _refit_rows

    if plan.budget_s is None:
        return
    refit = _refit_rows(bundle, tc)
    scale = (tc.confirm_top * tc.confirm_seeds) + ((refit / n_train) if refit else 0.0)
    mean_epochs = plan.epochs[2]

    def count(trial_s: float) -> tuple[int, float]:
        reserve = min(tc.reserve_fraction * plan.budget_s, scale * trial_s)
        return max(0, int((plan.budget_s - reserve) // max(trial_s, 1e-9))), reserve

    for r in plan.rows:
        t = r.trial_seconds(mean_epochs, plan.max_steps)
        if r.fits and t is not None:
            r.trials_in_budget = count(t)[0]
    times = [r.trial_seconds(mean_epochs, plan.max_steps) for r in plan.rows if r.fits]
    times = [t for t in times if t is not None]
    if times:
        plan.trials_in_budget, plan.reserve_s = count(statistics.fmean(times))


def log_plan(plan: Plan) -> None:
    log.info("plan: what each configuration of the search costs on this machine")
    for line in plan.lines():
        log.info(line)
    for line in plan.summary():
        log.info(line)


def plan(run: Any, search: Any = None, tc: Any = None, *, calibrate: bool = True) -> Plan:
    """``lmtune plan``: the plan of the search ``lmtune tune`` would run with the same settings; written to
    ``<output_dir>/plan.json`` and logged as a table."""
    from lmtune._io import ensure_writable_dir
    from lmtune._threads import TuneWorker
    from lmtune.config import SearchConfig, TuneConfig
    from lmtune.tasks import resolve_task
    from lmtune.tune.study import _params_m
    from lmtune.tune.space import build_space

    search = search or SearchConfig()
    tc = tc or TuneConfig()
    from lmtune.tune.study import resolve_eval_generate

    task, run = resolve_task(run)
    run = resolve_eval_generate(task.name, run)  # what the trials of lmtune tune decode, and when
    # The calibration runs with the threads a tune worker started now would get, so its timings are a trial's.
    with TuneWorker(tc.threads_per_worker) as worker:
        worker.apply()
        bundle = task.load_data(run)
        declared = search.declared()
        model_names = [x.strip() for x in (declared.get("model") or run.model.name).split(",")]
        space = build_space(declared, n_train_rows=len(bundle.train), params_m_of={x: _params_m(x) for x in model_names},
                            default_model=run.model.name, default_method=run.model.method)
        out = ensure_writable_dir(run.output_dir, "--out")
        result = make_plan(run, space, tc, task=task, bundle=bundle, scratch=out / ".plan-scratch", calibrate=calibrate)
    log_plan(result)
    atomic_write_json(out / PLAN_FILE, result.to_json())
    log.info(f"written: {out / PLAN_FILE}")
    return result


# ---- after the trials: how good was the plan --------------------------------------------------------------


class PlanCheck:
    """Predicted against actual time (and peak memory) per finished trial, kept in ``<out>/plan_check.json``."""

    def __init__(self, out: Path):
        self.path = out / CHECK_FILE
        try:
            self.rows: dict[str, Any] = {str(r["trial"]): r for r in json.loads(self.path.read_text()).get("trials", [])}
        except (OSError, ValueError, AttributeError, KeyError, TypeError):
            self.rows = {}

    def record(self, trial: Any, peak_bytes: int | None, peak_method: str) -> dict[str, Any] | None:
        """One finished trial (an Optuna FrozenTrial with lmtune's user attributes); None when it has no prediction."""
        a = trial.user_attrs
        comp, actual = a.get("plan"), a.get("seconds")
        if not comp or actual is None:
            return None
        history = a.get("history") or []
        steps = max((h.get("step", 0) for h in history), default=0)
        diverged = bool(a.get("fail_reason"))
        decoded = sum(1 for h in history if "generate_s" in h) if comp.get("decode_final_only") else len(history)
        predicted_ran = comp["fixed_s"] + steps * comp["step_s"] + len(history) * comp["eval_s"] + decoded * comp.get("decode_s", 0.0)
        row = {"trial": trial.number, "state": trial.state.name, "params": dict(trial.params),
               "predicted_s": a.get("plan_seconds"), "predicted_ran_s": round(predicted_ran, 2), "actual_s": actual,
               "steps": steps, "evaluations": len(history),
               "time_error_pct": None if diverged or not actual else round(100 * (predicted_ran - actual) / actual, 1),
               "predicted_peak_gib": a.get("plan_peak_gib"),
               "peak_gib": None if peak_bytes is None else round(peak_bytes / GIB, 3), "peak_method": peak_method}
        if row["predicted_peak_gib"] and row["peak_gib"]:
            row["memory_error_pct"] = round(100 * (row["predicted_peak_gib"] - row["peak_gib"]) / row["peak_gib"], 1)
        self.rows[str(trial.number)] = row
        return row

    def summary(self) -> dict[str, Any]:
        rows = list(self.rows.values())
        t = [abs(r["time_error_pct"]) for r in rows if r.get("time_error_pct") is not None]
        mem = [abs(r["memory_error_pct"]) for r in rows if r.get("memory_error_pct") is not None]
        return {"trials": len(rows), "median_abs_time_error_pct": round(statistics.median(t), 1) if t else None,
                "median_abs_memory_error_pct": round(statistics.median(mem), 1) if mem else None}

    def write(self) -> None:
        rows = sorted(self.rows.values(), key=lambda r: r["trial"])
        atomic_write_json(self.path, {"format": "lmtune-plan-check/1", "summary": self.summary(), "trials": rows})

    def line(self) -> str | None:
        s = self.summary()
        if s["median_abs_time_error_pct"] is None:
            return None
        mem = s["median_abs_memory_error_pct"]
        return (f"plan check: predicted trial time off by a median {s['median_abs_time_error_pct']:.0f}% over "
                f"{s['trials']} trial(s)" + (f", peak memory by {mem:.0f}%" if mem is not None else "")
                + f" ({self.path.name})")


def watch() -> PeakMeter:
    """The meter a trial runs under (the same measurement as the calibration's)."""
    return PeakMeter()
