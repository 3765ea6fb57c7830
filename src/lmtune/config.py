"""Configuration: the one source of truth.

Each field's docstring (the string literal under it) is its ``--help`` text; CLI flags and YAML keys are
generated from these dataclasses (see :mod:`lmtune._fields`). Validation happens at construction and
names the flag a user would type, so a bad value fails before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, get_args, get_origin

from lmtune.errors import ConfigError

Method = Literal["full", "lora", "head"]
Precision = Literal["auto", "fp32", "bf16", "bf16-master", "fp16"]
Schedule = Literal["linear", "cosine", "constant"]
EvalGenerate = Literal["auto", "every", "final"]
LOSS_METRICS = ("val_loss", "perplexity")
Metric = Literal["auto", "accuracy", "macro_f1", "val_loss", "perplexity", "exact_match", "token_f1", "rougeL", "bleu", "chrf"]
Task = Literal["auto", "classification", "generation"]


# The flag a user types for a field, where it has a short alias (kept in step with _fields.FLAG_ALIASES).
_SHORT_FLAGS = {"learning_rate": "--lr", "global_batch_size": "--batch-size", "train_file": "--data",
                "output_dir": "--out", "name": "--model"}


def _flag(name: str) -> str:
    return _SHORT_FLAGS.get(name, "--" + name.replace("_", "-"))


def describe(value: Any) -> str:
    """A value as a user reads it in an error: ``the string "false"``, ``the number 1.5``, ``true``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'the string "{value}"'
    if isinstance(value, (int, float)):
        return f"the number {value!r}"
    if value is None:
        return "nothing (null)"
    return {"list": "a list", "dict": "a mapping", "tuple": "a list"}.get(type(value).__name__, type(value).__name__)


def _fail(obj: Any, name: str, msg: str, value: Any) -> None:
    detail = f"{msg}, got {describe(value)}"
    key = f"{obj._section}.{name}" if obj._section else name
    raise ConfigError(f"{_flag(name)} {detail}", key=key, detail=detail)


def _check(obj: Any, cond: bool, name: str, msg: str, value: Any) -> None:
    if not cond:
        _fail(obj, name, msg, value)


_KIND = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}


def _coerce(obj: Any, name: str, tp: Any, value: Any) -> Any:
    """``value`` checked against the field's declared type ``tp``; ints become floats where a float is declared.

    Wherever a value comes from (a flag, YAML, the Python API), a wrong type is a one-line error naming the
    field: YAML's ``"false"`` is a non-empty string, and a check like ``if cfg.trust_remote_code`` would take it
    for true.
    """
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None and len(args) < len(get_args(tp)):
            return None
        tp = args[0] if len(args) == 1 else tp
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if not isinstance(value, str) or value not in choices:
            _fail(obj, name, "must be one of " + ", ".join(map(str, choices)), value)
        return value
    if tp is bool:
        if not isinstance(value, bool):
            _fail(obj, name, "must be true or false", value)
        return value
    if tp is int:
        if isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            _fail(obj, name, "must be a whole number", value)
        return value
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            _fail(obj, name, "must be a number", value)
        if not math.isfinite(value):
            _fail(obj, name, "must be a finite number", value)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            _fail(obj, name, "must be text", value)
        return value
    return value


def _check_types(obj: Any) -> None:
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                _fail(obj, f.name, f"must be a {tp.__name__} (a mapping of its keys)", value)
            continue
        setattr(obj, f.name, _coerce(obj, f.name, tp, value))


MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_LENGTH_LIMIT = 1_048_576


@dataclass
class DataConfig:
    """Where the training data is and how to read it."""

    _section: ClassVar[str] = "data"

    train_file: str = ""
    """Training data: CSV, TSV, JSONL or Parquet with a header, or OpenAI fine-tuning JSONL (alias: --data)."""
    task: Task = "auto"
    """classification (text -> label) or generation (prompt -> completion); auto: generation for chat/prompt-completion data, else classification."""
    val_file: str | None = None
    """Validation data in the same layout. Without it, a stratified --val-fraction of --train-file is held out."""
    text_column: str | None = None
    """Column holding the text; detected when obvious (text, sentence, ...)."""
    text_pair_column: str | None = None
    """Second text column for sentence-pair tasks (e.g. premise/hypothesis)."""
    label_column: str | None = None
    """Column holding the label; detected when obvious (label, category, ...)."""
    prompt_column: str | None = None
    """Generation: column holding the prompt; detected when obvious (prompt, input, source, question, instruction+input)."""
    completion_column: str | None = None
    """Generation: column holding the completion; detected when obvious (completion, output, target, answer)."""
    prompt_template: str | None = None
    """Generation: build the prompt from columns, e.g. 'Translate to German: {en}'."""
    chat_template: str = "auto"
    """Generation: auto (the model's chat template when it has one, else plain prompt + completion), none, or a Jinja template FILE."""
    val_fraction: float = 0.2
    """Fraction of --train-file held out (stratified, seeded) when --val-file is not given."""
    max_train_rows: int | None = None
    """Use at most this many training rows (stratified sample, seeded); the rest are not used."""
    max_val_rows: int | None = None
    """Use at most this many validation rows (stratified sample, seeded)."""
    split_seed: int = 42
    """Seed of the validation split and row sampling; separate from --seed so trials share one split."""
    empty_text: Literal["error", "skip"] = "error"
    """What to do with rows whose text is empty: stop with an error naming the line, or skip and count them."""
    missing_label: Literal["error", "skip"] = "error"
    """What to do with rows whose label is empty: stop with an error naming the line, or skip and count them."""

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self, 0.0 < self.val_fraction < 1.0, "val_fraction", "must be between 0 and 1 (exclusive)", self.val_fraction)
        for name in ("max_train_rows", "max_val_rows"):
            value = getattr(self, name)
            _check(self, value is None or value >= 2, name, "must be >= 2", value)
        _check(self, 0 <= self.split_seed <= MAX_SEED, "split_seed", f"must be between 0 and {MAX_SEED}", self.split_seed)


@dataclass
class ModelConfig:
    """Which checkpoint to fine-tune and how."""

    _section: ClassVar[str] = "model"

    name: str = "smollm2-135m-instruct"
    """An alias (see `lmtune models`), a hub id, a local folder, or a .gguf file (alias: --model)."""
    method: Method = "full"
    """full: train every weight; lora: low-rank adapters (peft) plus the head; head: frozen body, train the head only."""
    lora_rank: int = 16
    """LoRA rank r (only with --method lora)."""
    lora_alpha: float = 32.0
    """LoRA scaling alpha (only with --method lora); the update is scaled by alpha / rank."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA branch (only with --method lora)."""
    save_adapter: bool = False
    """With --method lora on a generation task: save the peft adapter folder instead of merging it into the weights."""
    trust_remote_code: bool = False
    """Allow a checkpoint to run its own Python code. Off unless you trust its author."""
    cache_dir: str | None = None
    """Where converted checkpoints (e.g. GGUF -> safetensors) are cached; default ~/.cache/lmtune (env LMTUNE_CACHE)."""
    attn_implementation: str = "auto"
    """Attention kernel for training: auto (lmtune_eager on CPUs, whose fused SDPA backward is slow: eager attention that keeps less for backward; the model's default on GPUs), eager, sdpa, flash_attention_2, ..."""

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self, bool(self.name), "model", "must name a checkpoint", self.name)
        _check(self, self.lora_rank >= 1, "lora_rank", "must be >= 1", self.lora_rank)
        _check(self, self.lora_alpha > 0, "lora_alpha", "must be > 0", self.lora_alpha)
        _check(self, 0.0 <= self.lora_dropout < 1.0, "lora_dropout", "must be in [0, 1)", self.lora_dropout)


@dataclass
class TrainConfig:
    """The optimisation: the key parameters and the ones around them."""

    _section: ClassVar[str] = "train"

    learning_rate: float | None = None
    """Peak learning rate of AdamW (alias: --lr); default by task: 5e-5 for classification, 1e-4 for generation."""
    global_batch_size: int = 16
    """Examples per optimizer step, summed over gradient accumulation and processes (alias: --batch-size)."""
    micro_batch_size: int | None = None
    """Examples per forward pass on one process; default = the global batch. Lowered automatically on out-of-memory."""
    epochs: int = 3
    """Passes over the training data."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (overrides --epochs when reached first)."""
    warmup_ratio: float = 0.06
    """Fraction of all optimizer steps spent warming the learning rate up from 0."""
    lr_schedule: Schedule = "linear"
    """Learning-rate decay after warmup: linear, cosine or constant."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to biases and norm weights)."""
    max_length: int = 128
    """Longest tokenised input; longer texts are truncated and the truncation rate is reported."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm to this value; 0 or none disables clipping."""
    seed: int = 0
    """Seed of initialisation, shuffling and dropout."""
    divergence_factor: float | None = 5.0
    """Stop the run as diverged when the mean training loss of the last 10 steps exceeds this multiple of its starting loss (the first step's loss, at least that of guessing uniformly): a loss that explodes without becoming NaN; 0 or none disables."""
    precision: Precision = "auto"
    """bf16: autocast over fp32 weights; bf16-master: a bf16 model with fp32 master weights in the optimizer (one process, --method full; no per-pass weight casts); auto: bf16-master on CPUs with AVX512-BF16/AMX for a one-process full fine-tune, else bf16 where the hardware runs it well (CUDA, those CPUs), else fp32; or fp32, fp16."""
    eval_every_steps: int | None = None
    """Evaluate every N optimizer steps as well as at the end of each epoch (default: each epoch only)."""
    eval_batch_size: int | None = None
    """Examples per evaluation forward pass (default: 2 x micro batch)."""
    metric: Metric = "auto"
    """Metric that picks the best checkpoint, early stopping and a search's objective: accuracy, macro_f1, val_loss (classification); val_loss, perplexity, exact_match, token_f1, rougeL, bleu, chrf (generation); auto: accuracy, or val_loss for generation."""
    train_on_prompt: bool = False
    """Generation: put the loss on the prompt tokens too (default: only on the completion and end-of-sequence tokens)."""
    max_new_tokens: int | None = None
    """Generation: longest completion generated at evaluation (default: from the training completions' lengths)."""
    eval_generate_rows: int | None = None
    """Generation: decode a seeded sample of this many validation prompts at each evaluation for the text metrics (default: all; 0: loss and perplexity only)."""
    eval_generate: EvalGenerate = "auto"
    """Generation: at which evaluations the validation prompts are decoded for the text metrics (the loss is computed at every one): every, or final (the run's last evaluation only; needs a loss --metric); auto: every in lmtune train, final in the trials of a search whose objective is val_loss or perplexity (why: measured on E2E in docs/generation.md)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without improvement of --metric (default: never)."""
    group_by_length: bool = True
    """Batch texts of similar length together (less padding); batches are still shuffled."""
    save_checkpoints: bool = True
    """Write resumable checkpoints (after each evaluation); a search turns this off and retries a killed trial instead."""
    checkpoint_every_steps: int | None = None
    """Also write a resumable checkpoint every N optimizer steps (one is always written after each evaluation)."""
    log_every_steps: int = 10
    """Record the training loss every N optimizer steps."""
    progress: bool = True
    """Show progress bars."""

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self, self.learning_rate is None or self.learning_rate > 0, "learning_rate", "must be > 0", self.learning_rate)
        _check(self, self.global_batch_size >= 1, "global_batch_size", "must be >= 1", self.global_batch_size)
        _check(self, self.micro_batch_size is None or self.micro_batch_size >= 1, "micro_batch_size", "must be >= 1", self.micro_batch_size)
        _check(self, self.epochs >= 1, "epochs", "must be >= 1", self.epochs)
        _check(self, self.max_steps is None or self.max_steps >= 1, "max_steps", "must be >= 1", self.max_steps)
        _check(self, 0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", "must be in [0, 1)", self.warmup_ratio)
        _check(self, self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _check(self, 8 <= self.max_length <= MAX_LENGTH_LIMIT, "max_length", f"must be between 8 and {MAX_LENGTH_LIMIT}",
               self.max_length)
        _check(self, 0 <= self.seed <= MAX_SEED, "seed", f"must be between 0 and {MAX_SEED}", self.seed)
        _check(self, self.max_grad_norm is None or self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0", self.max_grad_norm)
        _check(self, self.eval_every_steps is None or self.eval_every_steps >= 1, "eval_every_steps", "must be >= 1", self.eval_every_steps)
        _check(self, self.eval_batch_size is None or self.eval_batch_size >= 1, "eval_batch_size", "must be >= 1", self.eval_batch_size)
        _check(self, self.early_stopping_patience is None or self.early_stopping_patience >= 1, "early_stopping_patience", "must be >= 1", self.early_stopping_patience)
        _check(self, self.checkpoint_every_steps is None or self.checkpoint_every_steps >= 1, "checkpoint_every_steps", "must be >= 1", self.checkpoint_every_steps)
        _check(self, self.divergence_factor is None or self.divergence_factor == 0 or self.divergence_factor > 1,
               "divergence_factor", "must be > 1 (or 0/none to disable)", self.divergence_factor)
        _check(self, self.max_new_tokens is None or self.max_new_tokens >= 1, "max_new_tokens", "must be >= 1", self.max_new_tokens)
        _check(self, self.eval_generate_rows is None or self.eval_generate_rows >= 0, "eval_generate_rows", "must be >= 0",
               self.eval_generate_rows)
        _check(self, self.log_every_steps >= 1, "log_every_steps", "must be >= 1", self.log_every_steps)
        if self.eval_generate == "final" and self.metric not in ("auto", *LOSS_METRICS):
            raise ConfigError(f"--eval-generate final decodes only at the last evaluation, so --metric {self.metric} could "
                              "not choose the best checkpoint; use --eval-generate every, or --metric val_loss")
        if self.micro_batch_size is not None and self.micro_batch_size > self.global_batch_size:
            raise ConfigError(
                f"--micro-batch-size ({self.micro_batch_size}) must not exceed --batch-size ({self.global_batch_size})"
            )

    @property
    def higher_is_better(self) -> bool:
        return self.metric not in LOSS_METRICS


@dataclass
class RunConfig:
    """One fine-tuning run: data + model + optimisation + where to write."""

    _section: ClassVar[str] = ""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "runs/latest"
    """Folder for the model, the run record and checkpoints (alias: --out)."""
    resume: bool = False
    """Continue an interrupted run from the newest whole checkpoint in --output-dir."""
    overwrite: bool = False
    """Allow writing into an --output-dir that already holds a finished run."""
    report: bool = True
    """Write report.html into the output folder at the end."""

    def __post_init__(self) -> None:
        _check_types(self)
        _check(self, bool(self.output_dir.strip()), "output_dir", "must name a folder", self.output_dir)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunConfig":
        """Build from nested plain values (YAML, JSON); every key and value is checked, naming the key."""
        d = dict(mapping(d, "the configuration"))
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown config keys: {sorted(unknown)}; known: {sorted(known)}")
        return cls(
            data=_sub(DataConfig, d.pop("data", {}), "data"),
            model=_sub(ModelConfig, d.pop("model", {}), "model"),
            train=_sub(TrainConfig, d.pop("train", {}), "train"),
            **d,
        )


def mapping(d: Any, what: str) -> dict[str, Any]:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise ConfigError(f"{what} must be a mapping of keys, got {describe(d)}", key=what,
                          detail=f"must be a mapping of keys, got {describe(d)}")
    return d


def _sub(cls: type, d: Any, section: str) -> Any:
    d = dict(mapping(d, section))
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ConfigError(f"unknown keys in section '{section}': {unknown}; known: {sorted(known)}")
    return cls(**d)


@dataclass
class SearchConfig:
    """What a search varies. Each field takes a declaration: '1e-5..1e-3:log' (float range, log scale),
    '1..4' (integer range), '8,16,32' (choices) or one value (fixed). Undeclared ones get the default
    rules derived from model size and training rows (docs/tuning.md)."""

    _section: ClassVar[str] = "search"

    model: str | None = None
    """Checkpoints to compare (the size dimension), e.g. 'smollm2-135m-instruct,pythia-70m' (default: smollm2-135m-instruct)."""
    method: str | None = None
    """Training methods to compare, e.g. 'full,lora' (default: full)."""
    learning_rate: str | None = None
    """Peak learning rate, e.g. '1e-5..1e-3:log' (alias: --lr; default from model size and method)."""
    global_batch_size: str | None = None
    """Global batch size, e.g. '8,16,32' (alias: --batch-size; default from the number of training rows)."""
    epochs: str | None = None
    """Epochs, e.g. '1..4' (default from the number of training rows)."""
    warmup_ratio: str | None = None
    """Warmup fraction, e.g. '0..0.1' (default 0..0.1)."""
    weight_decay: str | None = None
    """AdamW weight decay, e.g. '0,0.01,0.1' (default those three)."""
    max_length: str | None = None
    """Max sequence length, e.g. '64,128' (default: fixed, from --max-length)."""
    lr_schedule: str | None = None
    """Learning-rate schedules, e.g. 'linear,cosine' (default: fixed, from --lr-schedule)."""
    lora_rank: str | None = None
    """LoRA rank r, only in trials with method lora, e.g. '8,16,32' (default those three)."""
    lora_alpha: str | None = None
    """LoRA alpha, only in trials with method lora, e.g. '16,32,64' (default those three)."""

    def declared(self) -> dict[str, str]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class TuneConfig:
    """How a search runs: trials, time, storage, pruning, confirmation."""

    _section: ClassVar[str] = "tune"

    n_trials: int | None = 20
    """Finished trials to run (complete + pruned; failed ones are retried). Shared by all workers of a study; 0 or none: no limit (use --budget)."""
    budget: str | None = None
    """Wall-clock budget for this worker, e.g. 30m, 2h, 90s (a bare number is seconds); no new trial starts when the rest would not fit."""
    storage: str | None = None
    """Optuna storage URL; default SQLite in --out (study.db). A PostgreSQL URL lets many workers share one study."""
    study_name: str = "lmtune"
    """Name of the study inside the storage."""
    sampler: Literal["tpe", "gp", "random"] = "tpe"
    """tpe (seeded, multivariate TPE), gp (Gaussian-process Bayesian optimisation: models the finished trials' values) or random search."""
    pruner: Literal["median", "hyperband", "asha", "none"] = "median"
    """Stops bad trials early from their evaluations: median, hyperband, asha (successive halving) or none."""
    sampler_seed: int = 0
    """Seed of the sampler (the training seed is --seed)."""
    evals_per_epoch: int = 2
    """Evaluations (and pruning decisions) per epoch in each trial."""
    confirm_seeds: int = 2
    """Re-run the top trials on this many extra seeds and report mean and standard deviation; 0 disables."""
    confirm_top: int = 3
    """How many of the best trials to confirm on extra seeds (with --budget: as many as fit the time the search leaves)."""
    default_first: bool = True
    """Run the documented default configuration (what `lmtune train` does without flags, clipped into the space) as the first trial: the baseline that tuning is measured against."""
    warm_start: str | None = None
    """Folder of a finished study of a similar task (another `lmtune tune --out`): its best configurations (by score, a confirmed trial by its mean over seeds) are run right after the defaults, moved into this search space; their old scores are never mixed into this study."""
    warm_start_top: int = 3
    """How many of the --warm-start study's best distinct configurations to run first."""
    refit: Literal["auto", "always", "never"] = "auto"
    """Retrain the winning configuration on all training rows before saving it as best/: auto does so when the search trained on a sample (--max-train-rows); best/ is the retrained model unless it scores worse on validation than the search-trained one by more than the validation noise."""
    refit_rows: int | None = None
    """Training rows of the refit (stratified sample, seeded); default: all training rows."""
    reserve_fraction: float = 0.3
    """With --budget: the largest share of it kept for confirmation and refit after the search; they are sized to fit, never the search to them."""
    heartbeat_interval: int = 10
    """Seconds between a running trial's heartbeats (RDB storages)."""
    grace_period: int = 40
    """A RUNNING trial without a heartbeat for this many seconds is failed and retried."""
    threads_per_worker: int | None = None
    """Math threads of this worker; default: this machine's cores shared evenly among the `lmtune tune` workers running on it (rechecked before each trial)."""
    plan: bool = True
    """Before the search, print what each configuration costs (parameters, peak memory, seconds per step and per trial, trials that fit --budget) from a short calibration cached per machine (see `lmtune plan`), and never train a configuration that would not fit in memory; --no-plan skips it."""
    memory_limit: str | None = None
    """Memory a trial may use, e.g. 20GiB or 512MiB: configurations the plan expects to need more are reported and not trained (default: the memory available when the search starts: free RAM, or free GPU memory)."""
    show: bool = False
    """Print the state of the study (running or finished) and exit."""

    def __post_init__(self) -> None:
        if isinstance(self.budget, (int, float)) and not isinstance(self.budget, bool):
            self.budget = f"{self.budget:g}"  # YAML `budget: 600`: seconds, as `--budget 600` is
        _check_types(self)
        if self.n_trials == 0:
            self.n_trials = None
        _check(self, self.n_trials is None or self.n_trials >= 1, "n_trials", "must be >= 1", self.n_trials)
        _check(self, bool(self.study_name.strip()), "study_name", "must name the study", self.study_name)
        _check(self, 0 <= self.sampler_seed <= MAX_SEED, "sampler_seed", f"must be between 0 and {MAX_SEED}", self.sampler_seed)
        _check(self, self.evals_per_epoch >= 1, "evals_per_epoch", "must be >= 1", self.evals_per_epoch)
        _check(self, self.confirm_seeds >= 0, "confirm_seeds", "must be >= 0", self.confirm_seeds)
        _check(self, self.refit_rows is None or self.refit_rows >= 2, "refit_rows", "must be >= 2", self.refit_rows)
        _check(self, 0.0 <= self.reserve_fraction < 1.0, "reserve_fraction", "must be in [0, 1)", self.reserve_fraction)
        _check(self, self.confirm_top >= 1, "confirm_top", "must be >= 1", self.confirm_top)
        _check(self, self.warm_start_top >= 1, "warm_start_top", "must be >= 1", self.warm_start_top)
        _check(self, self.threads_per_worker is None or self.threads_per_worker >= 1, "threads_per_worker", "must be >= 1", self.threads_per_worker)
        _check(self, self.heartbeat_interval >= 1, "heartbeat_interval", "must be >= 1", self.heartbeat_interval)
        _check(self, self.grace_period > self.heartbeat_interval, "grace_period", "must exceed --heartbeat-interval", self.grace_period)
        if self.budget is not None:
            self.budget_seconds  # validates
        if self.memory_limit is not None:
            self.memory_limit_bytes  # validates
        if self.n_trials is None and self.budget is None and not self.show:
            raise ConfigError("--n-trials none needs a --budget, or the search would never end")

    @property
    def memory_limit_bytes(self) -> int | None:
        if self.memory_limit is None:
            return None
        from lmtune._memory import parse_size
        return parse_size(self.memory_limit, "--memory-limit")

    @property
    def budget_seconds(self) -> float | None:
        if self.budget is None:
            return None
        import re
        m = re.fullmatch(r"\s*(-?\d+(?:\.\d+)?)\s*([smhd]?)\s*", str(self.budget))
        if not m:
            raise ConfigError(f"--budget must look like 90s, 30m, 2h or 1d, got {self.budget!r}")
        if float(m.group(1)) <= 0:
            raise ConfigError(f"--budget must be more than zero, got {self.budget!r}")
        return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
