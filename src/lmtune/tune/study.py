"""The search: an Optuna study whose trials call the same ``train`` entry point as ``lmtune train``.

Reliability design (ENGINEERING.md §3):

* Every study is persistent (SQLite in the output folder, or any RDB URL). Rerunning the command resumes it.
* ``--n-trials`` is enforced with *slots*: the worker that creates the study enqueues N empty WAITING
  trials, and workers only run trials they pop from that queue (popping is an atomic state change in the
  storage). So any number of workers finish exactly N trials, none twice.
* A running trial sends heartbeats; a trial whose worker died (no heartbeat for ``grace_period``, or a
  dead process on this host) is marked FAIL and re-enqueued with the same parameters by Optuna's
  ``RetryFailedTrialCallback``.
* A diverging trial (NaN loss) is PRUNED with its reason recorded, never COMPLETE; SIGINT/SIGTERM fail
  the running trial, re-enqueue it and exit.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import threading
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from lmtune import _signals as signals
from lmtune._console import log
from lmtune._io import atomic_write_json, atomic_write_text, ensure_writable_dir
from lmtune.config import LOSS_METRICS, Metric, RunConfig, SearchConfig, TuneConfig
from lmtune.errors import ConfigError, DivergenceError, Interrupted, LmtuneError, ModelError, StudyError
from lmtune.records import RECORD_FILE, STUDY_FILE
from lmtune.tune.answer import (ANSWER_FILE, DEFAULT_ATTR, FILL_ATTR, REFIT_SKIPPED_ATTR, answer_lines, compute_answer,
                               default_trial_line, search_seconds)
from lmtune.tune.space import SEARCHABLE, SearchSpace, build_space
from lmtune.tune.warm import WARM_ATTR, load_source, warm_configurations

# Reliability tests: a real kill -9 of this worker at its k-th evaluation (counted over all its trials).
_FAULT_ENV = "LMTUNE_FAULT_KILL_AFTER_EVALS"
_evals_seen = 0
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
REFIT_FILE = "refit.json"


@dataclass
class TuneResult:
    output_dir: str
    study_name: str
    storage: str
    best_params: dict[str, Any] | None
    best_value: float | None
    best_trial: int | None
    best_dir: str | None
    counts: dict[str, int]
    confirmation: dict[str, Any] | None = None
    importances: dict[str, float] = field(default_factory=dict)
    refit: dict[str, Any] | None = None
    """What the refit on all training rows gave (``refit.json``), when one ran."""


def default_storage(out: Path) -> str:
    return f"sqlite:///{(out / 'study.db').resolve()}"


def open_storage(url: str, tc: TuneConfig) -> optuna.storages.BaseStorage:
    if url.startswith("sqlite"):
        Path(url.split("///", 1)[-1]).parent.mkdir(parents=True, exist_ok=True)
        # Workers on one machine share the file; wait for its lock instead of failing at once.
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    import sqlalchemy.exc

    for attempt in range(6):
        try:
            return optuna.storages.RDBStorage(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=tc.heartbeat_interval,
                grace_period=tc.grace_period,
                **_stale_callback_kwarg(),
            )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError) as e:
            # Workers started together on a fresh PostgreSQL database race to create Optuna's tables; the
            # losers see "duplicate key ... pg_type" or "relation already exists". The tables exist now: retry.
            if attempt == 5:
                raise StudyError(f"--storage {redact(url)}: cannot open ({type(e).__name__}: {str(e).splitlines()[0]})") from e
            time.sleep(0.5 + random.random())
        except Exception as e:
            raise StudyError(f"--storage {redact(url)}: cannot open ({type(e).__name__}: {str(e).splitlines()[0]})") from e
    raise AssertionError("unreachable")


def _stale_callback_kwarg() -> dict[str, Any]:
    import inspect
    params = inspect.signature(optuna.storages.RDBStorage.__init__).parameters
    name = "heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback" in params else "failed_trial_callback"
    return {name: _retry()}


def _retry():
    """Re-enqueue a failed trial with the same parameters (Optuna 5 name, older fallback)."""
    cls = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    return cls(max_retry=3)


def redact(url: str) -> str:
    """Hide a password in a storage URL before printing it."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':')[0]}:***@{host}" if ":" in cred else url
    return url


def startup_trials(n_trials: int | None, expected_trials: int | None) -> int:
    """TPE's random start-up: a third of the trials the search will run, 3 to 10.

    Optuna's 10 suits searches of hundreds of trials; ours are tens. The count is ``--n-trials``, or with a
    budget the trials the plan expects it to fit, whichever is smaller; 30 when neither is known. Before, a budget
    alone always meant 10, so a 30-minute search that fitted 11 trials was a random search but for its last trial.
    """
    known = [n for n in (n_trials, expected_trials) if n]
    return max(3, min(10, (min(known) if known else 30) // 3))


def _sampler(tc: TuneConfig, startup: int, trial_number: int | None = None) -> optuna.samplers.BaseSampler:
    """The seeded sampler (TPE after ``startup`` random trials); with ``trial_number``, seeded for that trial.

    One sampler seeded once would give every worker of a shared study the same random stream, so three
    workers started together proposed the same three configurations. Seeding from (seed, trial number)
    keeps a sequential search reproducible and gives each trial its own draw whichever worker runs it.
    """
    seed = tc.sampler_seed if trial_number is None else (tc.sampler_seed * 1_000_003 + trial_number) % 2**32
    if tc.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if tc.sampler == "gp":
        # A Gaussian process fitted to the finished trials' values, not TPE's split into one "good" and the rest
        # "bad": with Optuna's gamma a study of fewer than 11 finished trials has one good trial, so a near-identical
        # second-best counts against the best one's neighbourhood (bench/tpe_replay.py on the E2E search benchmark).
        # It reads complete trials only (pruned ones are not modelled) and spreads running trials by q-batch EI.
        # LoRA rank and alpha, conditional, are drawn at random (independent sampling), without a warning per trial.
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=startup, warn_independent_sampling=False)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True,
                                      group=True, constant_liar=True)


def _pruner(tc: TuneConfig) -> optuna.pruners.BasePruner:
    if tc.pruner == "none":
        return optuna.pruners.NopPruner()
    if tc.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    if tc.pruner == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    # Median: after two finished trials, stop a trial whose evaluation is worse than the median of
    # earlier trials at the same point; its first evaluation is never judged (warm-up noise).
    # Reported steps start at 1 (see on_evaluate), and Optuna judges every step >= n_warmup_steps, so
    # n_warmup_steps=2 is what leaves the first evaluation alone.
    # n_min_trials=2: the median of one trial is that trial's own single-seed value. In the E2E search benchmark
    # (2026-11-28, seed 0) a trial 0.0021 behind the defaults at its third of four evaluations, the only finished
    # trial that had reached that point, was pruned; its identical run on the earlier code went on to 1.1924, the
    # best value of that whole benchmark. Later evaluations, where fewer trials have arrived, are judged once two
    # have.
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2, interval_steps=1, n_min_trials=2)


def _params_m(name: str) -> float:
    """Model size in millions of parameters, for the default learning rate and the size axis."""
    from lmtune.models.aliases import ALIASES

    alias = ALIASES.get(name.lower())
    if alias is not None:
        return alias.params_m
    try:
        from lmtune.models import resolve
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(resolve(name).path)
        d = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", 768)
        n_layer = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", 12)
        vocab = getattr(cfg, "vocab_size", 50000)
        inter = getattr(cfg, "intermediate_size", None) or 4 * d
        return (n_layer * (4 * d * d + 2 * d * inter) + vocab * d) / 1e6
    except Exception:
        return 125.0


class _Heartbeat:
    """Records a heartbeat for a RUNNING trial every ``interval`` seconds from a daemon thread."""

    def __init__(self, storage, trial_id: int, interval: int):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(storage, trial_id, interval), daemon=True)

    def _run(self, storage, trial_id: int, interval: int) -> None:
        while not self._stop.is_set():
            try:
                storage.record_heartbeat(trial_id)
            except Exception:  # a transient database error must not kill the trial
                pass
            self._stop.wait(interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def _fail_dead_local_trials(study: optuna.Study) -> None:
    """Fail RUNNING trials owned by a dead process on this host now, instead of after the grace period."""
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.system_attrs.get("lmtune_worker") or {}
        if owner.get("host") != host or not owner.get("pid") or owner.get("pid") == os.getpid():
            continue
        try:
            os.kill(int(owner["pid"]), 0)
            continue  # still alive
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        try:
            if study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                log.info(f"trial {t.number}: its worker (pid {owner['pid']}) is gone; marked FAIL and re-queued")
                _retry()(study, study._storage.get_trial(t._trial_id))
        except Exception:
            pass


def _counts(study: optuna.Study) -> dict[str, int]:
    out = {s.name.lower(): 0 for s in TrialState} | {"surplus": 0, "unfit": 0, "over_budget": 0}
    marks = ((_SURPLUS, "surplus"), (_UNFIT, "unfit"), (_OVER_BUDGET, "over_budget"))
    for t in study.get_trials(deepcopy=False):
        kind = next((k for attr, k in marks if t.system_attrs.get(attr)), t.state.name.lower())
        out[kind] += 1
    return out


_SURPLUS = "lmtune_surplus"


def _is_surplus(study: optuna.Study, number: int, n_trials: int) -> bool:
    """Whether a just-popped slot lies beyond the first ``n_trials`` live (not FAIL) trials.

    Two workers topping up slots at once can enqueue too many. Every worker applies this one rule: a
    trial may run only if fewer than ``n_trials`` live trials have lower numbers. Trials only ever leave
    the live set (FAIL) and new trials get higher numbers, so at most ``n_trials`` trials are ever allowed
    to run and finish, whatever the interleaving.
    """
    live_before = sum(1 for t in study.get_trials(deepcopy=False)
                      if t.number < number and t.state != TrialState.FAIL)
    return live_before >= n_trials


def _drop_surplus(study: optuna.Study, trial_id: int) -> None:
    """Retire a surplus slot without running it (FAIL, marked, never retried, hidden from the leaderboard)."""
    study._storage.set_trial_system_attr(trial_id, _SURPLUS, True)
    study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)


def _ensure_slots(study: optuna.Study, n_trials: int) -> None:
    """Top up WAITING slots so finished + running + waiting == n_trials."""
    c = _counts(study)
    have = c["complete"] + c["pruned"] + c["running"] + c["waiting"]
    for _ in range(max(0, n_trials - have)):
        study.enqueue_trial({}, user_attrs={"lmtune_slot": True}, skip_if_exists=False)


def _apply(base: RunConfig, params: dict[str, Any], trial_dir: Path, evals_per_epoch: int, n_train: int) -> RunConfig:
    cfg = copy.deepcopy(base)
    for name, value in params.items():
        section, fld, typ = SEARCHABLE[name]
        setattr(getattr(cfg, section), fld, typ(value))
    cfg.model.__post_init__()
    cfg.train.micro_batch_size = min(cfg.train.micro_batch_size or cfg.train.global_batch_size, cfg.train.global_batch_size)
    cfg.train.__post_init__()
    steps_per_epoch = math.ceil(n_train / cfg.train.global_batch_size)
    # ceil: exactly evals_per_epoch evaluations per epoch (the last one at the epoch's end).
    cfg.train.eval_every_steps = max(1, math.ceil(steps_per_epoch / evals_per_epoch)) if evals_per_epoch > 1 else None
    cfg.train.save_checkpoints = False
    cfg.train.progress = False
    cfg.output_dir = str(trial_dir)
    cfg.overwrite = True
    cfg.resume = False
    cfg.report = False
    return cfg


def resolve_eval_generate(task: str, run: RunConfig) -> RunConfig:
    """``--eval-generate auto`` in a search: a loss objective needs no decoding to choose checkpoints and trials, so
    each trial decodes the validation prompts at its final evaluation only, which keeps the text metrics in the
    leaderboard for a fraction of the time (bench/results/metric-choice-e2e.md)."""
    if task != "generation" or run.train.eval_generate != "auto":
        return run
    run = copy.deepcopy(run)
    run.train.eval_generate = "final" if run.train.metric in LOSS_METRICS else "every"
    if run.train.eval_generate == "final" and run.train.eval_generate_rows != 0:
        log.info(f"generation: each trial decodes the validation prompts at its final evaluation only (the objective "
                 f"is {run.train.metric}); --eval-generate every decodes at every evaluation")
    return run


def _data_signature(run: RunConfig) -> dict[str, Any]:
    """What makes trials comparable: the same rows, split and task (file paths as given, and their sizes)."""
    d = run.data
    sizes = {k: os.path.getsize(p) if p and os.path.isfile(p) else None for k, p in (("train_size", d.train_file),
                                                                                      ("val_size", d.val_file))}
    return {"task": d.task, "train_file": d.train_file, "val_file": d.val_file, "max_train_rows": d.max_train_rows,
            "max_val_rows": d.max_val_rows, "val_fraction": d.val_fraction, "split_seed": d.split_seed,
            "text_column": d.text_column, "label_column": d.label_column, "prompt_column": d.prompt_column,
            "completion_column": d.completion_column, "prompt_template": d.prompt_template} | sizes


def _longest(dim, fixed: int) -> int:
    """The longest --max-length a trial can get."""
    if dim is None:
        return fixed
    if dim.kind in ("float", "int"):
        return int(dim.high)
    return max(int(c) for c in dim.choices)


def tune(run: RunConfig, search: SearchConfig | None = None, tc: TuneConfig | None = None) -> TuneResult:
    """Search the key parameters with Optuna; keep the best model in ``<output_dir>/best``.

    While it runs, this worker is registered as a live tune worker of this machine and uses its share of the
    cores for math threads (``tc.threads_per_worker`` overrides, see ``lmtune._threads``); torch's previous
    thread count is restored when it returns.
    """
    from lmtune._threads import TuneWorker

    tc = tc or TuneConfig()
    out = Path(run.output_dir)
    if (out / RECORD_FILE).is_file() and not (out / STUDY_FILE).is_file():
        raise ConfigError(f"--out {out} holds a training run (lmtune train); a study needs its own folder")
    with TuneWorker(tc.threads_per_worker) as worker, warnings.catch_warnings():
        # fail_stale_trials and heartbeats are marked experimental; the warning would repeat before every trial.
        # Filtered here, not at import: importing lmtune must not change the process's warning filters.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        # lmtune prints one line per trial and a leaderboard; Optuna's own per-trial INFO lines would repeat them.
        # Put back on return, like the warning filter: a caller's Optuna logging is the caller's.
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            worker.apply()  # data loading and tokenisation already use the share
            return _tune(run, search, tc, worker)
        finally:
            optuna.logging.set_verbosity(verbosity)


def _trial_limit_text(n_trials: int | None, budget: str | None) -> str:
    """The start line's trial count. With a budget the count is only a cap (the plan's line says how many trials
    the budget is expected to fit), so it must not read as a promise."""
    trials = "no trial limit" if not n_trials else (f"at most {n_trials} trials" if budget else f"{n_trials} trials")
    return trials + (f"; budget {budget}" if budget else "")


def _tune(run: RunConfig, search: SearchConfig | None, tc: TuneConfig, worker) -> TuneResult:
    from lmtune.models import cache_root, check_max_length, resolve
    from lmtune.tasks import resolve_task
    from lmtune.train import Resources, train

    search = search or SearchConfig()
    out = ensure_writable_dir(run.output_dir, "--out")
    url = tc.storage or default_storage(out)
    t_start = time.time()
    budget = tc.budget_seconds

    task, run = resolve_task(run)  # a concrete task and metric, so every trial and the study agree
    run = resolve_eval_generate(task.name, run)
    bundle = task.load_data(run)
    n_train = len(bundle.train)
    declared = search.declared()
    model_names = [m.strip() for m in (declared.get("model") or run.model.name).split(",")]
    params_m_of = {m: _params_m(m) for m in model_names}

    def space_for(rows: int) -> SearchSpace:
        """The space on ``rows`` training rows: the default epochs and batch sizes depend on them."""
        return build_space(declared, n_train_rows=rows, params_m_of=params_m_of, default_model=run.model.name,
                           default_method=run.model.method)

    space = space_for(n_train)
    longest = _longest(space.dims.get("max_length"), run.train.max_length)
    for name in model_names:  # fail before the study starts, not in every trial
        check_max_length(dataclasses.replace(run.model, name=name), longest, resolve(name, run.model.cache_dir))
    warm = load_source(tc.warm_start) if tc.warm_start else None  # a bad folder fails before anything is written
    if warm is not None and warm.task and warm.task != task.name:
        log.warning(f"--warm-start {tc.warm_start} is a {warm.task} study and this one is {task.name}: only the "
                    "settings both spaces share carry over, and what won there may not win here")
    plan = _make_plan(run, space, tc, task, bundle, out)
    plan_check = None
    if plan is not None:
        from lmtune.tune.plan import PlanCheck
        plan_check = PlanCheck(out)
    expected_trials = None if plan is None else plan.trials_in_budget  # None without a budget
    startup = startup_trials(tc.n_trials, expected_trials)
    direction = "maximize" if run.train.higher_is_better else "minimize"
    meta = {"study_name": tc.study_name, "storage": url, "task": task.name, "metric": run.train.metric, "direction": direction,
            "space": space.describe(), "space_json": space.to_json(), "best_dir": "best", "confirmation": "confirm.json",
            "n_trials": tc.n_trials, "data": run.data.__dict__, "base_config": run.to_dict(),
            "plan": "plan.json" if plan is not None else None,
            "sampler": tc.sampler, "startup_trials": startup if tc.sampler != "random" else None,
            "tpe_startup_trials": startup if tc.sampler == "tpe" else None}

    storage = open_storage(url, tc)
    created = False
    try:
        study = optuna.create_study(storage=storage, study_name=tc.study_name, direction=direction,
                                    sampler=_sampler(tc, startup), pruner=_pruner(tc), load_if_exists=False)
        created = True
        study.set_user_attr("data", _data_signature(run))
        study.set_user_attr("space", space.describe())
        study.set_user_attr("metric", run.train.metric)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(storage=storage, study_name=tc.study_name, sampler=_sampler(tc, startup),
                                  pruner=_pruner(tc))
        stored = study.user_attrs.get("space")
        if stored is not None and stored != space.describe():
            raise StudyError(f"study '{tc.study_name}' in {redact(url)} was created with another search space "
                             f"({stored}); use the same flags, another --out, or another --study-name")
        if study.direction.name.lower() != direction:
            raise StudyError(f"study '{tc.study_name}' optimises in the other direction; --metric must match")
        stored_data = study.user_attrs.get("data")
        if stored_data is not None and stored_data != _data_signature(run):
            changed = sorted(k for k in set(stored_data) | set(_data_signature(run))
                             if stored_data.get(k) != _data_signature(run).get(k))
            raise StudyError(f"study '{tc.study_name}' in {redact(url)} was run on other data ({', '.join(changed)} "
                             "differ); trials on different data cannot be compared: use the same data flags, "
                             "another --out, or another --study-name")
    if tc.n_trials is not None:
        if not created:
            # The creating worker may still be enqueueing its slots; topping up now would add too many.
            deadline = time.time() + 30
            while "n_trials" not in study.user_attrs and time.time() < deadline:
                time.sleep(0.5)
        if created:
            _enqueue_first(study, space, run, tc, warm)
        if created or study.user_attrs.get("n_trials") != tc.n_trials:
            _ensure_slots(study, tc.n_trials)
            study.set_user_attr("n_trials", tc.n_trials)
    elif created:
        _enqueue_first(study, space, run, tc, warm)
    trial_seconds: list[float] = [t.user_attrs["seconds"] for t in study.get_trials(deepcopy=False, states=FINISHED)
                                  if "seconds" in t.user_attrs]
    if budget is not None and plan is not None and not trial_seconds:
        from lmtune.tune.plan import _epochs

        refusal = no_trial_fits(plan, budget, time.time() - t_start, n_train, len(bundle.val), tc.reserve_fraction,
                                None if declared.get("epochs") is not None else lambda rows: _epochs(space_for(rows), run)[2])
        if refusal is not None:
            if created:  # nothing ran: leave no study behind, so a rerun with other data flags starts clean
                optuna.delete_study(study_name=tc.study_name, storage=storage)
            raise ConfigError(refusal)
    atomic_write_json(out / STUDY_FILE, meta)
    if warm is not None and not created:
        log.info("warm start: ignored, the study is resumed (its first trials were queued when it was created)")
    c = _counts(study)
    log.info(f"study '{tc.study_name}' in {redact(url)}: {'created' if created else 'resumed'}; "
             f"{c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed so far")
    log.info("search space: " + "; ".join(f"{k} {v}" for k, v in space.describe().items()))
    log.info(f"data: {n_train} training rows, {len(bundle.val)} validation rows; metric {run.train.metric}; "
             f"pruner {tc.pruner}; {_trial_limit_text(tc.n_trials, tc.budget)}")
    if tc.sampler != "random":
        modelled = "finished" if tc.sampler == "tpe" else "complete"  # Optuna's GPSampler leaves pruned trials out
        log.info(f"sampler {tc.sampler}: the first {startup} {modelled} trials are its random start-up (a third of "
                 + (f"the ~{expected_trials} trials the plan expects the budget to fit" if expected_trials
                    and (tc.n_trials is None or expected_trials < tc.n_trials) else
                    f"{tc.n_trials} trials" if tc.n_trials else "30 trials, the budget's trials being unknown")
                 + f", 3 to 10), then it models the {modelled} ones")
    threads = worker.apply()
    log.info(threads.describe())

    resources = Resources(tokenized_cache_dir=str(cache_root(run.model.cache_dir) / "tokenized"), data_bundle=bundle)
    refit_rows = _refit_rows(bundle, tc)
    finish = _FinishPlan(tc, budget, refit_scale=(refit_rows / n_train) if refit_rows else 0.0)
    if budget is not None:
        log.info(finish.outlook(study, trial_seconds, time.time() - t_start))
    consecutive_errors = unfit_in_a_row = over_budget_in_a_row = 0
    shortest = None if plan is None else _cheapest_seconds(plan)  # the plan is fixed: its shortest trial too
    current: list[optuna.Trial] = []  # the trial this worker holds (RUNNING), if any
    old_handlers = _raise_on_signals()
    try:
        while True:
            optuna.storages.fail_stale_trials(study)
            _fail_dead_local_trials(study)
            c = _counts(study)
            if tc.n_trials is not None and c["complete"] + c["pruned"] >= tc.n_trials:
                break
            seconds_left, scale = None, 1.0
            if budget is not None:
                elapsed = time.time() - t_start
                typical = statistics.median(trial_seconds) if trial_seconds else 0.0
                reserve = finish.reserve(study, trial_seconds)
                seconds_left = budget - elapsed - reserve
                scale = 1.0 if plan is None else _plan_scale(study)
                if elapsed + typical + reserve > budget and (trial_seconds or elapsed > budget):
                    log.info(f"budget: {elapsed:.0f} s used of {budget:.0f} s; a typical trial takes {typical:.0f} s"
                             + (f"; ~{reserve:.0f} s kept for confirmation and refit" if reserve else "") + "; no new trial")
                    break
                if shortest is not None and shortest * scale > seconds_left:
                    log.info(f"budget: {elapsed:.0f} s used of {budget:.0f} s; by the plan not even the shortest "
                             f"configuration (~{shortest * scale:.0f} s) finishes in what is left"
                             + (f" with ~{reserve:.0f} s kept for confirmation and refit" if reserve else "") + "; no new trial")
                    break
                if over_budget_in_a_row >= _MAX_OVER_BUDGET_IN_A_ROW:
                    log.info(f"budget: the last {over_budget_in_a_row} configurations drawn would not finish in the "
                             f"{seconds_left:.0f} s left; no new trial")
                    break
            trial_id = study._pop_waiting_trial_id()
            if trial_id is None:
                if tc.n_trials is None:
                    trial_id = study._storage.create_new_trial(study._study_id)
                elif c["running"] > 0:
                    time.sleep(min(5.0, tc.heartbeat_interval))  # another worker's trial may die and come back
                    continue
                else:
                    _ensure_slots(study, tc.n_trials)  # a trial whose retries ran out frees its slot
                    continue
            number = study._storage.get_trial_number_from_id(trial_id)
            # TPE and GP know nothing of time: near the end of a budget they can keep proposing configurations the
            # time left cannot finish (the E2E search benchmark: 20 two-epoch proposals in a row with 265 s left,
            # where a one-epoch trial took ~130 s, and a seventh of the budget went unused). After a few, a random
            # draw from the same space finds one that fits if the space has one.
            fill = (tc.sampler != "random" and over_budget_in_a_row >= _SAMPLER_OVER_BUDGET_TRIES
                    and not study._storage.get_trial_system_attrs(trial_id).get("fixed_params"))  # not a queued configuration
            study.sampler = _sampler(dataclasses.replace(tc, sampler="random") if fill else tc, startup, number)
            trial = optuna.Trial(study, trial_id)
            if tc.n_trials is not None and _is_surplus(study, trial.number, tc.n_trials):
                _drop_surplus(study, trial_id)
                continue
            current[:] = [trial]
            study._storage.set_trial_system_attr(trial_id, "lmtune_worker", {"host": socket.gethostname(), "pid": os.getpid()})
            now = worker.apply()  # workers come and go: recheck the share before each trial
            if now != threads:
                log.info(f"trial {trial.number}: {now.describe()}")
                threads = now
            trial.set_user_attr("threads", now.threads)
            if plan is not None:
                verdict = _admit(plan, study, trial, space, run, seconds_left, scale)
                if verdict != "run":
                    current.clear()
                    over_budget_in_a_row = over_budget_in_a_row + 1 if verdict == "over_budget" else 0
                    unfit_in_a_row = unfit_in_a_row + 1 if verdict == "unfit" else 0
                    if unfit_in_a_row >= _MAX_UNFIT_IN_A_ROW:
                        raise StudyError(f"the sampler proposed {unfit_in_a_row} configurations in a row that would not fit "
                                         "in memory; narrow the search space (see the plan above) or raise --memory-limit")
                    continue
            if fill:
                reason = (f"drawn at random: the last {over_budget_in_a_row} configurations drawn would not finish "
                          f"in the {seconds_left:.0f} s left")
                trial.set_user_attr(FILL_ATTR, reason)
                log.info(f"trial {trial.number}: {reason}")
            unfit_in_a_row = over_budget_in_a_row = 0
            t0 = time.time()
            with _Heartbeat(study._storage, trial_id, tc.heartbeat_interval), _trial_meter(plan) as meter:
                state = _run_trial(study, trial, space, run, tc, out, n_train, resources, train)
            current.clear()
            asked = signals.take_stop_request()
            if asked:  # it came after the trial's last step (its last evaluation, a prune): the trial is recorded
                raise Interrupted(f"{asked} during trial {trial.number}, which finished {state.name} and is kept")
            consecutive_errors = 0 if state != TrialState.FAIL else consecutive_errors + 1
            if state in FINISHED:
                trial_seconds.append(time.time() - t0)
                _check_plan(plan_check, study, trial_id, meter)
                if budget is not None and len(trial_seconds) == 1:
                    log.info(finish.outlook(study, trial_seconds, time.time() - t_start))
            if consecutive_errors >= 3:
                raise StudyError("three trials in a row failed with errors (see above); stopping the search")
            _print_leaderboard(study, run.train.metric, every=5)
            gc.collect()
    except (Interrupted, KeyboardInterrupt) as e:
        # SIGINT/SIGTERM anywhere in the loop (loading a model, between trials, in a training step): the
        # trial this worker holds is failed and re-queued with the same parameters, never left RUNNING.
        where = f" ({e})" if isinstance(e, Interrupted) and not current else ""
        signals.take_stop_request()  # acted on here
        if current:
            with signals.deferred():  # a second Ctrl-C must not stop the re-queue half way
                _fail_and_requeue(study, current[0], f"interrupted ({e or type(e).__name__})")
            where = f"; trial {current[0].number} re-queued"
        raise Interrupted(f"search interrupted{where}; rerun the same command to resume") from None
    finally:
        signals.restore(old_handlers)

    # What the search left of the budget, read before the seconds of bookkeeping below (importances, choosing
    # the worker that finishes) so that they do not eat the time kept for confirmation and refit.
    left = None if budget is None else budget - (time.time() - t_start)
    result = summarize(study, out, run.train.metric)
    # The search is over for this worker: its trial slots are used up or its budget is. With --n-trials none a
    # budget ends it; the last worker to stop (none of the study's trials still running) runs what follows.
    search_over = tc.n_trials is not None or _counts(study)["running"] == 0
    if result.best_trial is not None and search_over and _is_leader(study):
        top, seeds, do_refit, note = finish.fit(study, trial_seconds, left, refit_rows is not None)
        if note:
            log.info(note)
        if refit_rows is not None:  # when skipped, the answer says best/ holds a model of the sample, and why
            study.set_user_attr(REFIT_SKIPPED_ATTR, None if do_refit else {
                "search_rows": n_train, "all_rows": refit_rows, "left_s": round(max(0.0, left or 0.0), 1),
                "needs_s": round(finish.wanted(study, trial_seconds)[1], 1)})
        if seeds:
            sized = dataclasses.replace(tc, confirm_top=top, confirm_seeds=seeds)
            result.confirmation = confirm(study, space, run, sized, out, n_train, resources, train, worker=worker)
        if do_refit:
            worker.apply()
            result.refit = refit(study, space, run, tc, out, n_train, refit_rows, resources, train,
                                 confirmation=result.confirmation)
        study.set_user_attr("finish_done", True)
    _write_outputs(study, out, run.train.metric, result)
    if plan_check is not None and plan_check.line():
        log.info(plan_check.line())
    return result


# ---- the plan: what each configuration costs, known before the search (lmtune.tune.plan) ----------------

_UNFIT = "lmtune_unfit"
_MAX_UNFIT_IN_A_ROW = 50
_OVER_BUDGET = "lmtune_over_budget"
_MAX_OVER_BUDGET_IN_A_ROW = 20
"""Draws in a row that would not finish in the budget left, after which the search stops rather than draw on."""
_SAMPLER_OVER_BUDGET_TRIES = 5
"""Draws in a row that would not finish in the budget left, after which TPE's or GP's are replaced by random ones."""


def _make_plan(run: RunConfig, space: SearchSpace, tc: TuneConfig, task, bundle, out: Path):
    """The plan of this search (calibrated once per machine, then cached), printed and kept as ``plan.json``;
    None with --no-plan."""
    if not tc.plan:
        return None
    from lmtune.tune.plan import PLAN_FILE, log_plan, make_plan

    plan = make_plan(run, space, tc, task=task, bundle=bundle, scratch=out / ".plan-scratch")
    log_plan(plan)
    atomic_write_json(out / PLAN_FILE, plan.to_json())
    return plan


def _admit(plan, study, trial, space: SearchSpace, run: RunConfig, seconds_left: float | None = None,
           scale: float = 1.0) -> str:
    """Whether a trial runs, by the plan: "run", "unfit" (its configuration would not fit in memory) or
    "over_budget" (by the plan, corrected by ``scale``, it would not finish in the ``seconds_left`` of the budget).
    One that does not run is failed now, before any training, with the reason, and is not counted as finished
    (its slot runs again with new parameters); one that runs records the plan's prediction, which the plan check
    compares with what the trial took."""
    params = space.complete(space.sample(trial))  # the trial's own draw: _run_trial gets the same values back
    prediction = plan.predict(params, run)
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
    if not prediction.fits:
        trial.set_user_attr("fail_reason", f"not run: would not fit in memory ({prediction.reason})")
        study._storage.set_trial_system_attr(trial._trial_id, _UNFIT, True)
        study.tell(trial, state=TrialState.FAIL)
        log.info(f"trial {trial.number}: not run, {shown} would not fit in memory ({prediction.reason})")
        return "unfit"
    expected = None if prediction.seconds is None else prediction.seconds * scale
    if seconds_left is not None and expected is not None and expected > seconds_left:
        why = (f"would not finish in the budget: ~{expected:.0f} s by the plan"
               + (f" (x{scale:.2f}, as this machine's finished trials ran)" if scale != 1.0 else "")
               + f", {max(0.0, seconds_left):.0f} s of it left")
        trial.set_user_attr("fail_reason", f"not run: {why}")
        study._storage.set_trial_system_attr(trial._trial_id, _OVER_BUDGET, True)
        study.tell(trial, state=TrialState.FAIL)
        default = (" (the documented defaults: the answer has no defaults to compare tuning against)"
                   if trial.user_attrs.get(DEFAULT_ATTR) else "")
        log.info(f"trial {trial.number}: not run, {shown} {why}{default}")
        return "over_budget"
    for key, value in prediction.attrs().items():
        trial.set_user_attr(key, value)
    return "run"


def _plan_scale(study) -> float:
    """How long this study's finished trials took against what the plan predicted for them (the median ratio over
    complete trials; 1.0 before any): the plan's prediction, corrected by this machine's measurements as they come
    (the plan's time error per trial: a median of 17 %, up to ~40 %, in bench/results/plan-check-cpu)."""
    ratios = [t.user_attrs["seconds"] / t.user_attrs["plan_seconds"]
              for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
              if t.user_attrs.get("seconds") and t.user_attrs.get("plan_seconds")]
    return statistics.median(ratios) if ratios else 1.0


def _cheapest_seconds(plan) -> float | None:
    """By the plan, the shortest trial the space holds: the cheapest shape that fits, at the fewest epochs."""
    lo_epochs = plan.epochs[0]
    times = [r.trial_seconds(lo_epochs, plan.max_steps) for r in plan.rows if r.fits]
    times = [t for t in times if t is not None]
    return min(times) if times else None


def _trial_meter(plan):
    """The peak-memory meter a trial runs under when there is a plan to check (the calibration's measurement)."""
    if plan is None:
        return contextlib.nullcontext()
    from lmtune.tune.plan import watch
    return watch()


def _check_plan(check, study, trial_id: int, meter) -> None:
    """Keep the finished trial's predicted and actual time and peak memory in plan_check.json."""
    if check is None or meter is None:
        return
    if check.record(study._storage.get_trial(trial_id), meter.peak_bytes, meter.method) is not None:
        check.write()


def _raise_on_signals() -> dict[int, Any]:
    """SIGINT and SIGTERM raise KeyboardInterrupt in the main thread while the search runs (never inside a
    database call, which would leave its connection locked).

    Without this, SIGTERM (the default action: die at once) would leave the trial RUNNING until its
    heartbeat goes stale. ``train`` installs its own handler during training (stop after the step) and
    puts this one back when it returns.
    """
    return signals.install(signals.interrupt)  # held while a database call runs: see lmtune._signals


def _fail_and_requeue(study, trial, reason: str) -> None:
    try:
        study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        study.tell(trial, state=TrialState.FAIL)
        _retry()(study, study._storage.get_trial(trial._trial_id))
    except Exception:
        pass


def _run_trial(study, trial, space: SearchSpace, run: RunConfig, tc: TuneConfig, out: Path, n_train: int,
               resources, train_fn) -> TrialState:
    params = space.complete(space.sample(trial))
    trial_dir = out / "trials" / f"trial-{trial.number:04d}"
    cfg = _apply(run, params, trial_dir, tc.evals_per_epoch, n_train)
    metric = run.train.metric
    history: list[dict[str, Any]] = []
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
    log.info(f"trial {trial.number}: {shown}")
    t0 = time.time()

    def on_evaluate(ev) -> None:
        history.append({k: v for k, v in ev.metrics.items() if k not in ("lr", "is_best")})
        trial.set_user_attr("history", history)
        # Evaluation k happens at k / evals_per_epoch epochs in every trial, whatever its batch size, so
        # pruners compare trials at the same fraction of training.
        step = max(1, round(ev.epoch * tc.evals_per_epoch))
        _fault_hook()
        trial.report(ev.metrics[metric], step)
        # Pruning at the last evaluation saves no compute and would throw away a finished result.
        if ev.step < ev.total_steps and trial.should_prune():
            raise optuna.TrialPruned(f"{metric} {ev.metrics[metric]:.4f} at epoch {ev.epoch:.2f}")

    trial.set_user_attr("model_params_m", _params_m(cfg.model.name))
    state = TrialState.FAIL
    try:
        result = train_fn(cfg, on_evaluate=on_evaluate, resources=resources, quiet=True)
        value = result.best[metric]
        trial.set_user_attr("micro_batch_size_used", result.record.get("micro_batch_size_used"))
        trial.set_user_attr("oom_events", result.record.get("oom_events", []))
        trial.set_user_attr("epochs_done", result.record["steps"]["done"] / max(1, math.ceil(n_train / cfg.train.global_batch_size)))
        trial.set_user_attr("best_step", result.best["step"])
        trial.set_user_attr("seconds", round(time.time() - t0, 2))
        trial.set_user_attr("train_tokens_per_s", result.record["timing"].get("train_tokens_per_s"))
        study.tell(trial, value)
        state = TrialState.COMPLETE
        log.info(f"trial {trial.number}: COMPLETE {metric} {value:.4f} ({time.time() - t0:.0f} s)")
    except optuna.TrialPruned as e:
        trial.set_user_attr("seconds", round(time.time() - t0, 2))
        trial.set_user_attr("prune_reason", str(e))
        study.tell(trial, state=TrialState.PRUNED)
        state = TrialState.PRUNED
        log.info(f"trial {trial.number}: PRUNED ({e}; {time.time() - t0:.0f} s)")
    except DivergenceError as e:
        # A diverging learning rate is a real, bad result: PRUNED tells the sampler so, and it is never COMPLETE.
        trial.set_user_attr("seconds", round(time.time() - t0, 2))
        trial.set_user_attr("fail_reason", f"diverged: {e}")
        study.tell(trial, state=TrialState.PRUNED)
        state = TrialState.PRUNED
        log.info(f"trial {trial.number}: PRUNED, diverged ({e})")
    except (ModelError, ConfigError) as e:
        trial.set_user_attr("fail_reason", str(e))
        study.tell(trial, state=TrialState.FAIL)
        log.warning(f"trial {trial.number}: FAIL ({e})")
        raise
    except LmtuneError as e:
        if isinstance(e, Interrupted):
            raise
        trial.set_user_attr("fail_reason", str(e))
        study.tell(trial, state=TrialState.FAIL)
        log.warning(f"trial {trial.number}: FAIL ({e})")
    except Exception as e:  # one broken trial must not end a long study; three in a row do
        trial.set_user_attr("fail_reason", f"{type(e).__name__}: {e}")
        study.tell(trial, state=TrialState.FAIL)
        log.warning(f"trial {trial.number}: FAIL ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    finally:
        _keep_if_best(study, trial, trial_dir, out, state)
    return state


def _enqueue_first(study, space: SearchSpace, run: RunConfig, tc: TuneConfig, warm) -> None:
    """The first slots of a new study. The documented default configuration first: users want to know how the
    defaults do, and it is the baseline that says what tuning bought. Then, with --warm-start, the best
    configurations of the other study (lmtune.tune.warm), so the region that won there is measured here early."""
    defaults = space.defaults(run)
    if tc.default_first:
        study.enqueue_trial(defaults, user_attrs={"lmtune_slot": True, DEFAULT_ATTR: True}, skip_if_exists=False)
    if warm is None:
        return
    room = tc.warm_start_top if tc.n_trials is None else min(tc.warm_start_top, tc.n_trials - int(tc.default_first))
    chosen = warm_configurations(warm, space, defaults, max(0, room), skip=[defaults] if tc.default_first else [])
    for params, source in chosen:
        origin = {"study": str(warm.folder), "trial": source.number, "metric": warm.metric, "value": source.value,
                  "confirmed": source.confirmed}
        study.enqueue_trial(params, user_attrs={"lmtune_slot": True, WARM_ATTR: origin}, skip_if_exists=False)
    log.info(f"warm start: {len(chosen)} configuration(s) of {warm.folder} ("
             + ", ".join(f"trial {s.number}: {warm.metric} {s.value:.4f}{' confirmed' if s.confirmed else ''}" for _, s in chosen)
             + ") queued" + (" after the defaults" if tc.default_first else ""))


def _refit_rows(bundle, tc: TuneConfig) -> int | None:
    """Rows a refit would train on, or None when no refit is due (the search already saw every row)."""
    if tc.refit == "never":
        return None
    available = (bundle.summary.get("rows_before_sampling") or {}).get("train", len(bundle.train))
    rows = min(available, tc.refit_rows) if tc.refit_rows else available
    if tc.refit == "always" or rows > len(bundle.train):
        return rows
    return None


def _duration(seconds: float) -> str:
    """30 s, 12 min, 2.5 h: how a budget is read."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


SEARCH_TRIALS = 6
"""Trials a budget should buy at least, for the suggestions when it buys none (TPE's start-up is 3..10)."""


def no_trial_fits(plan, budget: float, elapsed: float, n_train: int, n_val: int, reserve_fraction: float,
                  mean_epochs_for: typing.Callable[[int], float] | None = None) -> str | None:
    """The one-line refusal when, by the plan, not even the cheapest configuration of the space finishes one trial in
    what is left of the budget (None when one does): a search that cannot finish a trial would overrun the budget by
    that trial's length, or end with nothing. It says what would fit: a sample of the rows, or a larger budget.

    ``mean_epochs_for(rows)``: the mean epochs the space would draw on that many training rows (the default epochs
    grow as the rows shrink); None when they do not depend on the rows (declared with --epochs)."""
    lo_epochs, _, mean_epochs = plan.epochs
    cheapest, left = _cheapest_seconds(plan), budget - elapsed
    if cheapest is None or cheapest <= left:
        return None
    fit = [r for r in plan.rows if r.fits and r.trial_seconds(lo_epochs, plan.max_steps) is not None]

    def typical(share: float) -> float:
        """A typical trial (every shape, the mean epochs the sampler draws) on ``share`` of the training and
        validation rows: training and evaluation scale with their rows, the model load and the save do not."""
        epochs = mean_epochs_for(int(n_train * share)) if mean_epochs_for else mean_epochs
        return statistics.fmean(r.fixed_s + share * (r.trial_seconds(epochs, plan.max_steps) - r.fixed_s) for r in fit)

    # On a rerun the calibration is cached, so the whole budget is the search's.
    per_trial = budget * (1 - reserve_fraction) / SEARCH_TRIALS
    share = next((f for f in (0.99 ** k for k in range(1, 1000)) if typical(f) <= per_trial), 0.0)  # 1 % steps
    train_rows, val_rows = _two_digits(int(n_train * share)), _two_digits(int(n_val * share))
    sample = ""
    # Fewer than ~100 rows to train or to score on, and a search measures noise: then only the budget is suggested.
    if train_rows >= 100 and min(val_rows, n_val) >= 100:
        sample = (f"search on a sample with --max-train-rows {train_rows}"
                  + (f" --max-val-rows {val_rows}" if val_rows < n_val else "")
                  + " (the winner is refit on all training rows where the budget allows), or ")
    calibrated = f"; the plan's calibration ({plan.calibration_s:.0f} s of it) is cached" if plan.calibrated else ""
    enough = typical(1.0) * SEARCH_TRIALS / (1 - reserve_fraction)
    if enough <= budget:  # the calibration took what the trials needed; a rerun skips it
        advice = "rerun the same command: the whole budget then goes to the search"
    else:
        advice = f"{sample}give --budget {_duration(enough)} for about {SEARCH_TRIALS} trials"
    return (f"--budget {_duration(budget)} fits no trial: by the plan above one trial on the {n_train} training rows "
            f"takes at least ~{_duration(cheapest)} here (its cheapest configuration) and {_duration(max(0.0, left))} "
            f"of the budget are left{calibrated}; {advice}")


def _two_digits(n: int) -> int:
    """``n`` rounded down to two significant digits (12,345 -> 12,000): a suggestion, not a measurement."""
    return n - n % 10 ** max(0, len(str(n)) - 2)


class _FinishPlan:
    """Sizes the work after the search (seed confirmation, refit) to a budget, never the budget to it.

    At most ``reserve_fraction`` of the budget is held back for it while trials run; what is left at the end
    decides how much of it runs: the refit first (it is the model handed back), then as many confirmation
    runs as fit (fewer top trials first, then fewer seeds).
    """

    def __init__(self, tc: TuneConfig, budget: float | None, refit_scale: float):
        self.tc, self.budget, self.refit_scale = tc, budget, refit_scale

    @staticmethod
    def _run_seconds(study, trial_seconds: list[float]) -> float:
        """A full (unpruned) trial's time: what one confirmation run costs."""
        done = [t.user_attrs["seconds"] for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if "seconds" in t.user_attrs]
        pool = done or trial_seconds
        return statistics.median(pool) if pool else 0.0

    def wanted(self, study, trial_seconds: list[float]) -> tuple[float, float]:
        """(confirmation seconds, refit seconds) the full plan would take."""
        run = self._run_seconds(study, trial_seconds)
        confirm = run * self.tc.confirm_seeds * self.tc.confirm_top
        return confirm, run * self.refit_scale

    def reserve(self, study, trial_seconds: list[float]) -> float:
        assert self.budget is not None
        return min(sum(self.wanted(study, trial_seconds)), self.tc.reserve_fraction * self.budget)

    def outlook(self, study, trial_seconds: list[float], elapsed: float) -> str:
        """The line that says what the budget is expected to buy."""
        assert self.budget is not None
        if not trial_seconds:
            return (f"budget {self.budget:.0f} s: the first trial sizes the search; up to "
                    f"{self.tc.reserve_fraction:.0%} of the budget is kept for confirmation and refit")
        typical = statistics.median(trial_seconds)
        reserve = self.reserve(study, trial_seconds)
        more = max(0, int((self.budget - elapsed - reserve) // max(typical, 1e-9)))
        return (f"budget: a trial takes ~{typical:.0f} s; about {more} more trial(s) fit in the budget, "
                f"with ~{reserve:.0f} s kept for confirmation and refit")

    def fit(self, study, trial_seconds: list[float], left: float | None,
            refit_due: bool) -> tuple[int, int, bool, str | None]:
        """(top trials, extra seeds, refit?, a note) that fit in ``left`` seconds (None: no budget)."""
        tc = self.tc
        top, seeds = tc.confirm_top, tc.confirm_seeds
        if left is None:
            return top, seeds, refit_due, None
        run = self._run_seconds(study, trial_seconds)
        refit_cost = run * self.refit_scale if refit_due else 0.0
        notes = []
        do_refit = refit_due and refit_cost <= left
        if refit_due and not do_refit:
            notes.append(f"refit skipped: it needs ~{refit_cost:.0f} s and {max(0, left):.0f} s of the budget are left")
        room = left - (refit_cost if do_refit else 0.0)
        while seeds and top * seeds * run > room:
            if top > 1:
                top -= 1
            else:
                seeds -= 1
        if (top, seeds) != (tc.confirm_top, tc.confirm_seeds) and tc.confirm_seeds:
            notes.append(f"confirmation sized to the budget: top {top} trial(s) on {seeds} extra seed(s)"
                         if seeds else "confirmation skipped: no run of ~{:.0f} s fits the {:.0f} s left".format(run, max(0, room)))
        return top, seeds, do_refit, ("budget: " + "; ".join(notes)) if notes else None


def refit(study, space: SearchSpace, run: RunConfig, tc: TuneConfig, out: Path, n_search_rows: int, rows: int,
          resources, train_fn, confirmation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Retrain the best trial's configuration on ``rows`` training rows (the same epochs, so more steps) and keep
    whichever of it and the search-trained model scores better on the same validation rows as ``best/``."""
    from lmtune.train import Resources

    best = study.best_trial
    metric = run.train.metric
    maximize = study.direction.name == "MAXIMIZE"
    params = space.complete(best.params)
    cfg = _apply(run, params, out / "refit", 1, rows)
    cfg.data.max_train_rows = rows
    cfg.train.eval_every_steps = None
    log.info(f"refit: trial {best.number}'s configuration on {rows} training rows (the search used {n_search_rows})")
    t0 = time.time()
    record: dict[str, Any] = {"trial": best.number, "params": params, "metric": metric, "search_rows": n_search_rows,
                              "refit_rows": rows, "search_value": best.value}
    try:
        # Its own data bundle (more rows); the tokenisation cache is shared.
        r = train_fn(cfg, resources=Resources(tokenized_cache_dir=resources.tokenized_cache_dir), quiet=True)
        value = r.best[metric]
        noise, why = _validation_noise(confirmation, best, metric, r.record)
        # The same configuration on more rows is expected to be at least as good, and the search-trained value is
        # the best of many trials on these validation rows (selected, so optimistic): the refit model is handed
        # back unless it is worse by more than the validation noise.
        shortfall = (best.value - value) if maximize else (value - best.value)
        keep_refit = shortfall <= noise
        record |= {"refit_value": value, "seconds": round(time.time() - t0, 2), "noise": noise, "noise_from": why,
                   "kept": "refit" if keep_refit else "search"}
        if keep_refit:
            atomic_write_json(out / "refit" / "trial.json", {"trial": best.number, "params": params, "value": value,
                                                             "refit_rows": rows})
            _swap_into(out / "refit", out / "best")
            log.info(f"refit: {metric} {value:.4f} on validation (search-trained: {best.value:.4f}; noise ±{noise:.4f}, "
                     f"{why}); best/ is the model trained on all {rows} rows")
        else:
            log.info(f"refit: {metric} {value:.4f} on validation, below the search-trained {best.value:.4f} by more than "
                     f"the noise (±{noise:.4f}, {why}); best/ keeps the search-trained model")
    except DivergenceError as e:
        record |= {"refit_value": None, "kept": "search", "error": f"diverged: {e}"}
        log.warning(f"refit diverged ({e}); best/ keeps the search-trained model")
    finally:
        shutil.rmtree(out / "refit", ignore_errors=True)
    default = _default_trial(study)
    if default is not None:
        record["default_trial"] = {"trial": default.number, "value": default.value, "state": default.state.name}
    atomic_write_json(out / REFIT_FILE, record)
    return record


def _validation_noise(confirmation: dict[str, Any] | None, best, metric: str,
                      refit_record: dict[str, Any]) -> tuple[float, str]:
    """How far apart two equally good models' validation scores can lie: the seed confirmation's standard deviation
    of this trial when it ran (``confirm``'s result), else for a proportion (accuracy, macro-F1) twice its binomial
    standard error on the validation rows (a 95% band), else 0 (no basis: the better score wins)."""
    std = next((r["std"] for r in (confirmation or {}).get("results", []) if r.get("trial") == best.number), None)
    if isinstance(std, (int, float)) and math.isfinite(std) and std > 0:
        return float(std), "the seed confirmation's standard deviation"
    n_val = ((refit_record.get("data") or {}).get("rows") or {}).get("val")
    if metric in ("accuracy", "macro_f1") and isinstance(n_val, int) and n_val > 0 and 0 <= best.value <= 1:
        return 2 * math.sqrt(best.value * (1 - best.value) / n_val), f"2 standard errors on {n_val} validation rows"
    return 0.0, "no noise estimate for this metric"


def _default_trial(study):
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(DEFAULT_ATTR) and t.state in FINISHED:
            return t
    return None


def _swap_into(source: Path, target: Path) -> None:
    """Replace folder ``target`` by ``source`` (old one moved aside first, so one of them is always whole)."""
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(source, target)
    shutil.rmtree(old, ignore_errors=True)


def _fault_hook() -> None:
    global _evals_seen
    _evals_seen += 1
    k = int(os.environ.get(_FAULT_ENV, "0") or 0)
    if k and _evals_seen >= k:
        os.kill(os.getpid(), signal.SIGKILL)


def _keep_if_best(study, trial, trial_dir: Path, out: Path, state: TrialState) -> None:
    """Keep the best trial's model as ``<out>/best`` (atomic swap); delete every other trial folder."""
    try:
        best = study.best_trial
    except ValueError:
        best = None
    if state == TrialState.COMPLETE and best is not None and best.number == trial.number and trial_dir.is_dir():
        atomic_write_json(trial_dir / "trial.json", {"trial": trial.number, "params": best.params, "value": best.value})
        _swap_into(trial_dir, out / "best")
    else:
        shutil.rmtree(trial_dir, ignore_errors=True)


def _is_leader(study) -> bool:
    """Among workers finishing together, exactly one runs the confirmation and refit (the last to write wins)."""
    me = f"{socket.gethostname()}:{os.getpid()}"
    if study.user_attrs.get("confirmation_done") or study.user_attrs.get("finish_done"):
        return False
    study.set_user_attr("confirmation_owner", me)
    time.sleep(1.0)
    return optuna.load_study(study_name=study.study_name, storage=study._storage).user_attrs.get("confirmation_owner") == me


def trials_to_confirm(study, slots: int) -> list:
    """Which finished trials the seed confirmation re-runs, ``slots`` at most: the best trial first; then, while
    slots are left, the best trial of every other model size (so each size gets a confirmed mean), the default
    configuration (so the defaults and the winner are compared on the same seeds), and the next best trials."""
    maximize = study.direction.name == "MAXIMIZE"
    done = sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.value,
                  reverse=maximize)
    if not done or slots < 1:
        return []
    chosen = [done[0]]
    sizes_seen = {done[0].params.get("model")}
    for t in done[1:]:
        if len(chosen) >= slots:
            break
        if t.params.get("model") not in sizes_seen:
            chosen.append(t)
            sizes_seen.add(t.params.get("model"))
    default = _default_trial(study)
    if default is not None and default.state == TrialState.COMPLETE and default not in chosen and len(chosen) < slots:
        chosen.append(default)
    for t in done:
        if len(chosen) >= slots:
            break
        if t not in chosen:
            chosen.append(t)
    return chosen


_METRIC_NAMES = frozenset(typing.get_args(Metric)) - {"auto"}


def _metrics_only(entry: dict[str, Any]) -> dict[str, float]:
    """The metric values of one evaluation (no step, timing or learning rate)."""
    return {k: v for k, v in entry.items() if k in _METRIC_NAMES and isinstance(v, (int, float))}


def _trial_best_metrics(t) -> dict[str, float]:
    """Every metric of the evaluation that gave a finished trial its value."""
    step = t.user_attrs.get("best_step")
    return next((_metrics_only(h) for h in t.user_attrs.get("history", []) if h.get("step") == step), {})


def confirm(study, space, run: RunConfig, tc: TuneConfig, out: Path, n_train: int, resources, train_fn,
            worker=None) -> dict[str, Any]:
    """Re-run the top trials with extra seeds: is the winner real or noise?

    ``worker`` (a ``lmtune._threads.TuneWorker``) re-applies this worker's share of the cores before each run.
    """
    metric = run.train.metric
    top = trials_to_confirm(study, tc.confirm_top)
    seeds = [run.train.seed + k for k in range(1, tc.confirm_seeds + 1)]
    log.info(f"confirming {len(top)} trial(s) ({', '.join(f'#{t.number}' for t in top)}) on seeds {seeds} "
             f"(plus the search seed {run.train.seed})")
    results = []
    for t in top:
        values = [t.value]
        every_metric = [_trial_best_metrics(t)]  # the other metrics of the same evaluations: their seed noise too
        for seed in seeds:
            cfg = _apply(run, space.complete(t.params), out / "confirm" / f"trial-{t.number:04d}-seed-{seed}", 1, n_train)
            cfg.train.seed = seed
            cfg.train.eval_every_steps = None
            if worker is not None:
                worker.apply()
            try:
                r = train_fn(cfg, resources=resources, quiet=True)
                values.append(r.best[metric])
                every_metric.append(_metrics_only(r.best))
            except DivergenceError as e:
                log.warning(f"confirmation of trial {t.number} with seed {seed} diverged: {e}")
                values.append(float("nan"))
                every_metric.append({})
            finally:
                shutil.rmtree(cfg.output_dir, ignore_errors=True)
        finite = [v for v in values if math.isfinite(v)]
        mean = statistics.fmean(finite) if finite else float("nan")
        std = statistics.stdev(finite) if len(finite) > 1 else 0.0
        results.append({"trial": t.number, "params": t.params, "seeds": [run.train.seed] + seeds, "values": values,
                        "mean": mean, "std": std, "metrics": every_metric})
        log.info(f"trial {t.number}: {metric} {mean:.4f} +- {std:.4f} over {len(finite)} seeds ({_fmt_values(values)})")
    shutil.rmtree(out / "confirm", ignore_errors=True)
    conf = {"metric": metric, "seeds": [run.train.seed] + seeds, "results": results}
    best_mean = max(results, key=lambda r: r["mean"] if study.direction.name == "MAXIMIZE" else -r["mean"])
    conf["most_reliable_trial"] = best_mean["trial"]
    if best_mean["trial"] != top[0].number:
        log.info(f"note: trial {best_mean['trial']} has the best mean over seeds; trial {top[0].number}'s lead was within seed noise")
    study.set_user_attr("confirmation_done", True)
    atomic_write_json(out / "confirm.json", conf)
    return conf


def summarize(study, out: Path, metric: str) -> TuneResult:
    counts = _counts(study)
    try:
        best = study.best_trial
    except ValueError:
        best = None
    storage_url = json.loads((out / STUDY_FILE).read_text())["storage"] if (out / STUDY_FILE).is_file() else ""
    result = TuneResult(str(out), study.study_name, storage_url, best.params if best else None,
                        best.value if best else None, best.number if best else None,
                        str(out / "best") if best and (out / "best").is_dir() else None, counts)
    return result


def _write_outputs(study, out: Path, metric: str, result: TuneResult) -> None:
    rows = leaderboard(study)
    cols = ["trial", "state", metric, "seconds"] + sorted({k for r in rows for k in r["params"]})
    lines = [",".join(cols)]
    for r in rows:
        lines.append(",".join(str(r.get(c, r["params"].get(c, ""))) if r.get(c, r["params"].get(c)) is not None else "" for c in cols))
    atomic_write_text(out / "leaderboard.csv", "\n".join(lines) + "\n")
    answer = _write_answer(study, out, result)
    # The answer's importances (bootstrap medians), not a second fANOVA: a separate run on all trials gave other
    # numbers for the same parameter (E2E's learning rate 0.46 against the answer's 0.33), and the report drew both.
    result.importances = {b["parameter"]: b["importance"] for b in answer["importances"]}
    atomic_write_json(out / "importances.json", result.importances)
    log.info("")
    _print_leaderboard(study, metric, every=1, top=10)
    if result.best_trial is not None:
        log.info(f"best: trial {result.best_trial}  {metric} {result.best_value:.4f}  "
                 + ", ".join(f"{k}={_fmt(v)}" for k, v in (result.best_params or {}).items()))
        if result.best_dir:
            log.info(f"best model: {result.best_dir}  (lmtune evaluate {result.best_dir} --data TEST_FILE)")
    default = _default_trial(study)
    if default is not None and default.value is not None and result.best_value is not None:
        log.info(default_trial_line(default.number, default.value, result.best_trial, result.best_value, metric,
                                    study.direction.name == "MAXIMIZE"))
    if result.refit:
        r = result.refit
        value = "diverged" if r.get("refit_value") is None else f"{r['refit_value']:.4f}"
        log.info(f"refit on {r['refit_rows']} rows: {metric} {value} (search-trained on {r['search_rows']} rows: "
                 f"{r['search_value']:.4f}); best/ holds the {r['kept']}-trained model")
    for line in answer_lines(answer):
        log.info(line)
    c = result.counts
    log.info(f"trials: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed, {c['running']} running"
             + (f"; {c['unfit']} not run (would not fit in memory)" if c["unfit"] else "")
             + (f"; {c['over_budget']} not run (would not finish in the budget)" if c["over_budget"] else ""))


def _write_answer(study, out: Path, result: TuneResult) -> dict[str, Any]:
    """The answer (lmtune.tune.answer), computed once and stored as answer.json for summary.md, the report and --show."""
    def stored(name: str) -> Any:
        """A JSON file the study wrote, or None when absent or unreadable."""
        try:
            return json.loads((out / name).read_text()) if (out / name).is_file() else None
        except ValueError:
            return None

    confirmation = stored("confirm.json")
    refit_record = result.refit or stored(REFIT_FILE)  # read back on a rerun of a finished study, or another worker
    if not isinstance(refit_record, dict) or refit_record.get("trial") != result.best_trial:
        refit_record = None  # a refit of an earlier best trial says nothing of what best/ holds now
    plan = stored("plan.json")
    budget_s = plan.get("budget_s") if isinstance(plan, dict) else None
    answer = compute_answer(study, confirmation=confirmation, refit=refit_record,
                            budget_s=budget_s if isinstance(budget_s, (int, float)) else None,
                            search_s=search_seconds(plan))
    atomic_write_json(out / ANSWER_FILE, answer)
    return answer


def _best_intermediate(t, maximize: bool) -> float | None:
    """An unfinished trial's best evaluation so far, in the study's direction (val_loss is minimised)."""
    values = [v for v in t.intermediate_values.values() if v is not None and math.isfinite(v)]
    if not values:
        return None
    return max(values) if maximize else min(values)


def leaderboard(study) -> list[dict[str, Any]]:
    metric = study.user_attrs.get("metric", "value")
    maximize = study.direction.name == "MAXIMIZE"
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.WAITING or t.system_attrs.get(_SURPLUS):
            continue
        value = t.value if t.state == TrialState.COMPLETE else _best_intermediate(t, maximize)
        rows.append({"trial": t.number, "state": t.state.name, metric: value, "seconds": t.user_attrs.get("seconds"),
                     "params": dict(t.params), "reason": t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason")})
    order = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "FAIL": 3}

    def rank(r: dict[str, Any]) -> tuple[int, int, float]:
        v = r[metric]
        return order.get(r["state"], 4), v is None, 0.0 if v is None else (-v if maximize else v)

    rows.sort(key=rank)
    return rows


def _print_leaderboard(study, metric: str, every: int = 1, top: int = 5) -> None:
    rows = leaderboard(study)
    finished = sum(1 for r in rows if r["state"] in ("COMPLETE", "PRUNED"))
    if not rows or finished % every:
        return
    names = sorted({k for r in rows for k in r["params"]})
    head = f"{'trial':>5}  {'state':<8} {metric:>9} {'sec':>6}  " + "  ".join(f"{n[:14]:>14}" for n in names)
    log.info(f"leaderboard ({finished} finished):")
    log.info(head)
    for r in rows[:top]:
        v = r[metric]
        log.info(f"{r['trial']:>5}  {r['state']:<8} {('%.4f' % v) if v is not None else '-':>9} "
                 f"{('%.0f' % r['seconds']) if r['seconds'] else '-':>6}  "
                 + "  ".join(f"{_fmt(r['params'].get(n, '-')):>14}" for n in names))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _fmt_values(values: list[float]) -> str:
    return ", ".join(f"{v:.4f}" for v in values)


def show(out: str | None, storage: str | None, study_name: str) -> str:
    """A text summary of a study, running or finished, read from its storage."""
    meta = {}
    if out and (Path(out) / STUDY_FILE).is_file():
        meta = json.loads((Path(out) / STUDY_FILE).read_text())
    url = storage or meta.get("storage")
    if not url:
        raise StudyError(f"--out {out}: no {STUDY_FILE} here; pass --storage URL and --study-name")
    name = meta.get("study_name", study_name) if not storage else study_name
    try:
        study = optuna.load_study(study_name=name, storage=url)
    except KeyError:
        raise StudyError(f"no study named '{name}' in {redact(url)}") from None
    c = _counts(study)
    metric = study.user_attrs.get("metric", "value")
    lines = [f"study '{name}' in {redact(url)}",
             f"trials: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed, {c['running']} running, {c['waiting']} waiting",
             "search space: " + "; ".join(f"{k} {v}" for k, v in (study.user_attrs.get("space") or {}).items())]
    rows = leaderboard(study)
    names = sorted({k for r in rows for k in r["params"]})
    lines.append(f"{'trial':>5}  {'state':<8} {metric:>9} {'sec':>6}  " + "  ".join(f"{n[:14]:>14}" for n in names))
    for r in rows:
        v = r[metric]
        lines.append(f"{r['trial']:>5}  {r['state']:<8} {('%.4f' % v) if v is not None else '-':>9} "
                     f"{('%.0f' % r['seconds']) if r['seconds'] else '-':>6}  "
                     + "  ".join(f"{_fmt(r['params'].get(n, '-')):>14}" for n in names)
                     + (f"  ({r['reason'][:60]})" if r["reason"] and r["state"] != "COMPLETE" else ""))
    try:
        b = study.best_trial
        lines.append(f"best: trial {b.number} {metric} {b.value:.4f}")
    except ValueError:
        lines.append("best: none yet")
    answer_path = Path(out) / ANSWER_FILE if out else None
    if answer_path is not None and answer_path.is_file():
        try:
            lines += [""] + answer_lines(json.loads(answer_path.read_text()))
        except (ValueError, KeyError, TypeError):
            lines.append(f"({ANSWER_FILE} is unreadable; rerun the study command to write it again)")
    return "\n".join(lines)
