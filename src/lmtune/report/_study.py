"""The report of a hyperparameter study, read from ``study.json`` and the Optuna storage it names.

It answers: which trial won and by how much (leaderboard, history), did the search prune sensibly
(every learning curve on one chart), which settings mattered (importances, parallel coordinates,
learning rate x batch size), what each model costs (size vs metric vs time), and whether the winner is
real or seed noise (the confirmation runs with error bars). The best trial's run report is embedded.

Nothing here assumes a task or a direction: the metric's name and whether it is maximised come from
``study.json`` (``metric``, ``direction``), else from the Optuna storage (the study's ``metric`` user
attribute and its direction), so a classification study on accuracy and a generation study minimising
``val_loss`` read the same way, best first. The embedded run report is the one for the best trial's task.
"""

from __future__ import annotations

import json
import math
import statistics
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from lmtune.errors import StudyError
from lmtune.records import STUDY_FILE
from lmtune.report._answer import ANSWER_FILE, answer_section, bands_chart, read_answer
from lmtune.report._page import (BEST_COLOR, MUTED_COLOR, TRAIN_COLOR, Cell, Page, esc, fcount, fnum, fparam, log_ticks, metric_scale,
                                 num_cell, scale_color, style)
from lmtune.report._run import (RUN_RECORD, TEXT_METRICS, RunData, _finite, _json_type, add_run_sections, guarded,
                                higher_is_better, inside, load_run, read_record, resolve_name, safe_file)
from lmtune.tune.answer import DEFAULT_ATTR, FILL_ATTR, answer_lines, default_trial_line
from lmtune.tune.warm import WARM_ATTR


#: params drawn on a log axis when they span more than a factor of 10 (learning rate, weight decay, ...)
_LOG_HINTS = ("learning_rate", "lr", "weight_decay")


@dataclass
class StudyData:
    folder: Path
    meta: dict[str, Any]
    storage: str
    study: Any  # optuna.Study
    trials: list[Any]  # FrozenTrial
    confirm: dict[str, Any] | None = None
    refit: dict[str, Any] | None = None
    best_run: RunData | None = None
    best_run_dir: Path | None = None
    plan_check: dict[str, Any] | None = None
    answer: dict[str, Any] | None = None
    """answer.json as ``lmtune tune`` wrote it (read once: the answer section, the size view and summary.md show it)."""
    answer_problem: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def metric(self) -> str:
        """study.json's ``metric``, else the storage's (lmtune sets the study's ``metric`` user attribute)."""
        m = self.meta.get("metric") or _storage_attr(self.study, "metric")
        return m if isinstance(m, str) and m else "value"

    @property
    def maximize(self) -> bool:
        """study.json's ``direction``, else the storage's, else the metric's own (val_loss, perplexity: minimised)."""
        d = self.meta.get("direction") or _storage_direction(self.study)
        if d:
            return d == "maximize"
        return higher_is_better(self.metric)

    @property
    def better(self) -> str:
        """'higher is better' or 'lower is better', for captions and axis titles."""
        return "higher is better" if self.maximize else "lower is better"

    @property
    def name(self) -> str:
        return self.meta.get("study_name") or self.folder.resolve().name

    def by_state(self, state: str) -> list[Any]:
        return [t for t in self.trials if t.state.name == state]

    @property
    def complete(self) -> list[Any]:
        return [t for t in self.by_state("COMPLETE") if _finite(t.value)]

    @property
    def best(self) -> Any | None:
        c = self.complete
        if not c:
            return None
        return (max if self.maximize else min)(c, key=lambda t: t.value)

    @property
    def param_names(self) -> list[str]:
        names: list[str] = []
        for t in self.trials:
            for k in t.params:
                if k not in names:
                    names.append(k)
        return names


def load_study(folder: str | Path) -> StudyData:
    """Read a study folder. Every file in it is untrusted input: names read from ``study.json`` are followed
    only inside the folder, values of the wrong JSON type are errors (one line) or notes, and the study
    database is opened read-only."""
    import optuna

    folder = Path(folder)
    path = folder / STUDY_FILE
    if path.exists() and not inside(folder, path):
        raise StudyError(f"{path}: links outside the folder {folder.resolve()}; not read")
    meta = read_record(path, StudyError, "a study folder")
    if not isinstance(meta, dict):
        raise StudyError(f"{path}: expected a JSON object, not {_json_type(meta)}")
    if not meta.get("storage"):
        raise StudyError(f"{path}: no 'storage' URL")
    if not isinstance(meta["storage"], str):
        raise StudyError(f"{path}: 'storage' should be a URL (a string), not {_json_type(meta['storage'])}")
    if meta.get("study_name") is not None and not isinstance(meta["study_name"], str):
        raise StudyError(f"{path}: 'study_name' should be a string, not {_json_type(meta['study_name'])}")
    problems: list[str] = []
    for key, ok in (("metric", lambda v: isinstance(v, str)),
                    ("direction", lambda v: v in ("maximize", "minimize"))):
        if meta.get(key) is not None and not ok(meta[key]):
            shown = repr(meta[key]) if len(repr(meta[key])) <= 60 else repr(meta[key])[:57] + "..."
            problems.append(f"{STUDY_FILE}: '{key}' {shown} is not valid; ignored")
            meta.pop(key)
    storage, opened = _storage_url(meta["storage"], folder)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        rdb = _read_only_storage(opened)
        names = [s.study_name for s in optuna.get_all_study_summaries(rdb)] if not meta.get("study_name") else None
        study_name = meta.get("study_name") or (names[0] if names and len(names) == 1 else None)
        study = optuna.load_study(study_name=study_name, storage=rdb)
        trials = study.get_trials(deepcopy=False)
    except KeyError:
        raise StudyError(f"{path}: study {meta.get('study_name')!r} not found in {storage}") from None
    except Exception as e:  # sqlalchemy / driver errors: name the storage, one line
        msg = (str(e).splitlines() or [""])[0]
        raise StudyError(f"{path}: cannot read study storage {storage} ({type(e).__name__}: {msg})") from None
    stored = _storage_direction(study)
    if meta.get("direction") and stored in ("maximize", "minimize") and stored != meta["direction"]:
        problems.append(f"{STUDY_FILE}: 'direction' {meta['direction']} disagrees with the study storage (direction "
                        f"{stored}, the one its trials were optimised in); the storage's direction is used")
        meta.pop("direction")
    # Read the storage's metric and direction once (each property access would query it again).
    if not meta.get("direction") and stored in ("maximize", "minimize"):
        meta["direction"] = stored
    if not meta.get("metric") and isinstance(_storage_attr(study, "metric"), str):
        meta["metric"] = _storage_attr(study, "metric")
    data = StudyData(folder, meta, storage, study, list(trials), problems=problems)

    # Optional files named in study.json: followed only inside the study folder, read only as regular files.
    confirm_path, problem = resolve_name(folder, _or(meta.get("confirmation"), "confirm.json"), f"{STUDY_FILE} 'confirmation'")
    if problem:
        data.problems.append(problem + ", so no confirmation is shown")
    elif safe_file(folder, confirm_path, confirm_path.name, data.problems):
        try:
            raw = json.loads(confirm_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            data.problems.append(f"{confirm_path.name} is not valid JSON ({e}); confirmation not shown")
        else:
            data.confirm = _check_confirm(raw, confirm_path.name, data.problems)
    refit_path = folder / "refit.json"
    if refit_path.exists() and safe_file(folder, refit_path, refit_path.name, data.problems):
        try:
            raw = json.loads(refit_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
            data.problems.append(f"refit.json is not valid JSON ({e}); the refit is not shown")
        else:
            data.refit = _check_refit(raw, data.problems)
    data.plan_check = _read_plan_check(folder, data.problems)
    data.answer, data.answer_problem = read_answer(folder)
    best_dir, problem = resolve_name(folder, _or(meta.get("best_dir"), "best"), f"{STUDY_FILE} 'best_dir'")
    if problem:
        data.problems.append(problem + ", so the best trial's run report is not shown")
    elif (best_dir / RUN_RECORD).exists():
        try:
            data.best_run = load_run(best_dir, root=folder)
            data.best_run_dir = best_dir
        except Exception as e:
            msg = (str(e).splitlines() or [""])[0]
            data.problems.append(f"best trial's run folder {best_dir} could not be read ({msg})")
    return data


def _storage_direction(study: Any) -> str | None:
    """'maximize' / 'minimize' as the storage records it; None for a multi-objective or unreadable study."""
    try:
        return study.direction.name.lower()
    except Exception:  # optuna raises RuntimeError for multi-objective studies
        return None


def _storage_attr(study: Any, key: str) -> Any:
    try:
        return study.user_attrs.get(key)
    except Exception:
        return None


def _check_refit(raw: Any, problems: list[str]) -> dict[str, Any] | None:
    """refit.json, or None (with a note) when its fields are not what `lmtune tune` writes."""
    def number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    ok = (isinstance(raw, dict) and number(raw.get("search_value")) and number(raw.get("search_rows"))
          and number(raw.get("refit_rows")) and (raw.get("refit_value") is None or number(raw.get("refit_value")))
          and raw.get("kept") in ("refit", "search"))
    if not ok:
        problems.append("refit.json does not hold what lmtune tune writes; the refit is not shown")
        return None
    return raw


def _default_trial(sd: StudyData) -> Any | None:
    for t in sd.trials:
        if t.user_attrs.get(DEFAULT_ATTR) is True and t.state.name in ("COMPLETE", "PRUNED"):
            return t
    return None


def _handed_back_lines(sd: StudyData) -> list[str]:
    """Plain statements of what tuning bought and what best/ holds (for the page and summary.md)."""
    lines = []
    best, default = sd.best, _default_trial(sd)
    if default is not None and best is not None:
        if default.state.name == "COMPLETE" and default.value is not None:
            lines.append(default_trial_line(default.number, default.value, best.number, best.value, sd.metric, sd.maximize))
        else:
            lines.append(f"default configuration (trial #{default.number}) was pruned: below the median of the trials before it")
    r = sd.refit
    if r:
        refit_value = "diverged" if r.get("refit_value") is None else f"{r['refit_value']:.4f}"
        lines.append(f"refit: the winning configuration retrained on {int(r['refit_rows'])} rows scored {refit_value} on "
                     f"validation, against {r['search_value']:.4f} when trained on the search's {int(r['search_rows'])} "
                     f"rows; best/ holds the {'refit' if r['kept'] == 'refit' else 'search-trained'} model")
    return lines


def _handed_back(page: Page, sd: StudyData) -> None:
    lines = _handed_back_lines(sd)
    if not lines:
        page.note("No default-configuration trial and no refit in this study (--no-default-first, or the search saw every row).")
        return
    page.raw("<ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>")


def _or(value: Any, default: str) -> Any:
    """A field left out (null or "") means the default name; any other value is checked as given."""
    return default if value is None or value == "" else value


def _check_confirm(raw: Any, name: str, problems: list[str]) -> dict[str, Any] | None:
    """confirm.json with its fields of the wrong type dropped (one note for all of them)."""
    if not isinstance(raw, dict):
        problems.append(f"{name} should hold a JSON object, not {_json_type(raw)}; confirmation not shown")
        return None
    bad: list[str] = []
    conf = dict(raw)
    if conf.get("metric") is not None and not isinstance(conf["metric"], str):
        bad.append("'metric'")
        conf.pop("metric")
    if conf.get("seeds") is not None and not isinstance(conf["seeds"], list):
        bad.append("'seeds'")
        conf.pop("seeds")
    results = conf.get("results")
    if results is not None and not isinstance(results, list):
        bad.append("'results'")
        results = []
    kept = []
    for r in results or []:
        if not isinstance(r, dict) or not isinstance(r.get("values"), list) or \
                (r.get("params") is not None and not isinstance(r["params"], dict)) or \
                (r.get("trial") is not None and not (isinstance(r["trial"], int) and not isinstance(r["trial"], bool))):
            bad.append("an entry of 'results'")
            continue
        kept.append(r)
    conf["results"] = kept
    if bad:
        problems.append(f"{name}: {', '.join(dict.fromkeys(bad))} of the wrong type; ignored")
    return conf


def _read_only_storage(url: str) -> Any:
    """Optuna's RDB storage that never creates tables (a report must not write into a database it names)."""
    import inspect

    import optuna

    kwargs: dict[str, Any] = {}
    if "skip_table_creation" in inspect.signature(optuna.storages.RDBStorage.__init__).parameters:
        kwargs["skip_table_creation"] = True
    return optuna.storages.RDBStorage(url, **kwargs)


def _storage_url(url: str, folder: Path) -> tuple[str, str]:
    """The storage URL to show, and the one to open; a SQLite file that moved with its folder is found beside
    study.json.

    Never lets Optuna create an empty database for a mistyped path: a missing SQLite file is an error. A
    SQLite file is opened read-only (``mode=ro``): Optuna would otherwise add its tables to any SQLite file
    ``storage`` names. Another database URL (a shared PostgreSQL study) is opened as it is, without creating
    tables.
    """
    if not url.startswith("sqlite:///"):
        return url, url
    try:
        db = Path(unquote(url[len("sqlite:///"):].split("?")[0]))
        if not db.is_absolute():
            db = (folder / db) if (folder / db).exists() else db
        if not db.is_file():
            local = folder / db.name
            db = local if db.name and local.is_file() and inside(folder, local) else db
        if not db.is_file():
            raise StudyError(f"{folder / STUDY_FILE}: study database {db} does not exist")
        db = db.resolve()
    except (OSError, ValueError, RuntimeError) as e:
        raise StudyError(f"{folder / STUDY_FILE}: study database in {url!r} cannot be used ({type(e).__name__})") from None
    from sqlalchemy.engine import URL

    # SQLite's URI form (percent-encoded path), put in SQLAlchemy's URL by SQLAlchemy itself so it round-trips.
    ro = URL.create("sqlite", database=f"file:{quote(str(db))}", query={"mode": "ro", "uri": "true"})
    return f"sqlite:///{db}", ro.render_as_string(hide_password=False)


# ---- the page ------------------------------------------------------------------------------------

#: short axis names and units of the metrics lmtune selects by
_AXIS_NAMES = {"accuracy": ("validation accuracy", "0 to 1"), "macro_f1": ("validation macro-F1", "0 to 1"),
               "val_loss": ("validation loss", "nats"), "perplexity": ("validation perplexity", "")}


def axis_title(sd: StudyData, metric: str | None = None) -> str:
    """The metric's axis title with its unit and direction, so a minimised val_loss never reads as a score to raise."""
    metric = metric or sd.metric
    name, unit = _AXIS_NAMES.get(metric) or ((f"validation {TEXT_METRICS[metric]}", "0 to 100") if metric in TEXT_METRICS
                                             else (metric, ""))
    return f"{name} ({unit + ', ' if unit else ''}{sd.better})"


def add_study_sections(page: Page, sd: StudyData, best_link: str | None) -> None:
    for p in sd.problems:
        page.note(p, "warn")
    page.section("Overview")
    guarded(page, "The overview", _overview, page, sd)
    guarded(page, "The note on the winner", _winner_note, page, sd)
    page.section("The answer: what matters for this task")
    guarded(page, "The answer", answer_section, page, sd.answer, sd.answer_problem)

    page.section("Leaderboard")
    guarded(page, "The leaderboard", _leaderboard, page, sd)
    page.section("Optimisation history")
    guarded(page, "The optimisation history", _history_chart, page, sd)
    page.section("Learning curves")
    guarded(page, "The learning curves", _curves_chart, page, sd)
    page.section("Which settings mattered")
    guarded(page, "The parameter importances", _importances, page, sd)
    guarded(page, "The parallel coordinates", _parallel, page, sd)
    guarded(page, "The learning rate x batch size chart", _lr_batch, page, sd)
    page.section("Model size, metric and cost")
    guarded(page, "The cost chart", _cost_chart, page, sd)
    page.section("How good was the plan")
    guarded(page, "The plan check", _plan_check, page, sd)
    page.section("What tuning bought, and what best/ holds")
    guarded(page, "The default-vs-best comparison", _handed_back, page, sd)
    page.section("Is the winner real? Seed confirmation")
    guarded(page, "The seed confirmation", _confirmation, page, sd)
    page.section("Best trial: run report")
    if sd.best_run is None:
        page.note("The best trial's run folder (study.json 'best_dir') is not there yet; it is written when the study finishes.")
    else:
        if best_link:
            page.raw(f'<p>Also as its own page: <a href="{esc(best_link)}">{esc(best_link)}</a> (folder {esc(sd.best_run_dir)}).</p>')
        add_run_sections(page, sd.best_run, level=3)


def _overview(page: Page, sd: StudyData) -> None:
    counts = {s: len(sd.by_state(s)) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")}
    best = sd.best
    page.facts([
        ("study", sd.name),
        ("storage", sd.storage),
        ("task", sd.meta.get("task") if isinstance(sd.meta.get("task"), str) else None),
        ("objective", f"{'maximise' if sd.maximize else 'minimise'} {sd.metric} ({sd.better})"),
        ("trials", f"{len(sd.trials) - counts['WAITING']} run: "
                   + ", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v and k != "WAITING")
                   + (f"; {counts['WAITING']} queued, not run" if counts["WAITING"] else "")),
        ("best trial", f"#{best.number}: {sd.metric} {best.value:.4f}" if best else "none complete yet"),
        ("best parameters", ", ".join(f"{k}={fparam(v)}" for k, v in best.params.items()) if best else None),
        ("search space", json.dumps(sd.meta.get("space"), default=str) if sd.meta.get("space") else None),
    ])
    if counts["RUNNING"]:
        page.note(f"The study is still running ({counts['RUNNING']} trial(s) in progress): this is a snapshot. "
                  "Run `lmtune report` again for the final picture.", "warn")
    elif counts["WAITING"]:
        page.note(f"{counts['WAITING']} queued trial(s) were not run (the budget ran out or the search was stopped); "
                  "rerun the same `lmtune tune` command to run them.", "warn")
    if len(sd.complete) < 2:
        page.note(f"Only {len(sd.complete)} trial(s) completed, so comparisons between settings are not possible yet.", "warn")


def _winner_note(page: Page, sd: StudyData) -> None:
    c = sorted(sd.complete, key=lambda t: t.value, reverse=sd.maximize)
    if len(c) < 2:
        return
    gap = abs(c[0].value - c[1].value)
    text = (f"Trial #{c[0].number} leads trial #{c[1].number} by {gap:.4f} {sd.metric} in the search (one seed each).")
    res = _confirm_results(sd)
    if len(res) >= 2:
        a, b = sorted(res, key=lambda r: r["mean"], reverse=sd.maximize)[:2]
        spread = (a.get("std") or 0) + (b.get("std") or 0)
        if abs(a["mean"] - b["mean"]) <= spread:
            page.note(text + f" Over seeds, trial #{a['trial']} ({a['mean']:.4f} ± {a.get('std') or 0:.4f}) and trial "
                      f"#{b['trial']} ({b['mean']:.4f} ± {b.get('std') or 0:.4f}) overlap within one standard deviation: "
                      "the ranking between them is within seed noise.", "warn")
        else:
            page.note(text + f" Over seeds, trial #{a['trial']} ({a['mean']:.4f} ± {a.get('std') or 0:.4f}) stays ahead of "
                      f"trial #{b['trial']} ({b['mean']:.4f} ± {b.get('std') or 0:.4f}) by more than one standard deviation.", "good")
    elif not res:
        page.note(text + " No seed confirmation was run, so a gap this size may be seed noise.")


def _trial_seconds(t: Any) -> float | None:
    s = t.user_attrs.get("seconds")
    if _finite(s):
        return float(s)
    if t.datetime_start and t.datetime_complete:
        return (t.datetime_complete - t.datetime_start).total_seconds()
    return None


def _last_intermediate(t: Any) -> tuple[int, float] | None:
    iv = {k: v for k, v in t.intermediate_values.items() if _finite(v)}
    if not iv:
        return None
    step = max(iv)
    return step, iv[step]


def _leaderboard(page: Page, sd: StudyData) -> None:
    if not sd.trials:
        page.note("The study has no trials yet.")
        return
    params = sd.param_names
    order = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}
    sign = -1 if sd.maximize else 1
    trials = sorted(sd.trials, key=lambda t: (order.get(t.state.name, 5),
                                              sign * t.value if _finite(t.value) else 0, t.number))
    best = sd.best
    rows, highlight = [], set()
    for i, t in enumerate(trials):
        note = "; ".join(x for x in (_origin(t), _trial_note(t, sd.metric)) if x)
        rank = Cell(str(i + 1) if t.state.name == "COMPLETE" else "", i + 1 if t.state.name == "COMPLETE" else None, numeric=True)
        row = [rank, num_cell(t.number, 0), t.state.name.lower(), num_cell(t.value if _finite(t.value) else None, 4)]
        for p in params:
            v = t.params.get(p)
            row.append(Cell(esc(fparam(v)), v if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v) if v is not None else None,
                            numeric=isinstance(v, (int, float)) and not isinstance(v, bool)))
        secs = _trial_seconds(t)
        size = t.user_attrs.get("model_params_m")
        row += [num_cell(size, 1, text=(f"{size:.3g}" if size < 100 else f"{size:.1f}") if _finite(size) else ""), num_cell(secs, 1, text=f"{secs:.1f}" if secs is not None else ""),
                num_cell(t.user_attrs.get("epochs_done"), 2), num_cell(t.user_attrs.get("micro_batch_size_used"), 0),
                num_cell(t.user_attrs.get("threads"), 0), Cell(esc(note), css="wrap")]
        if best is not None and t.number == best.number:
            highlight.add(i)
        rows.append(row)
    cols = ["rank", "trial", "state", sd.metric] + params + \
           ["params (M)", "time (s)", "epochs run", "micro-batch", "threads", "note"]
    page.table(cols, rows, highlight=highlight, drop_empty=True,
               caption="Click a header to sort. The highlighted row is the best complete trial. "
                       f"{sd.metric} ({'higher' if sd.maximize else 'lower'} is better) is the trial's best evaluation; "
                       "time is the trial's wall-clock time; threads are the math threads its worker used; "
                       "the note says where a configuration came from when not from the sampler, and the reason of every pruned or failed trial.")


def _origin(t: Any) -> str:
    """Where a trial's configuration came from, when not from the sampler."""
    if t.user_attrs.get(DEFAULT_ATTR) is True:
        return "the default configuration"
    if t.user_attrs.get(FILL_ATTR):
        return _reason(t.user_attrs[FILL_ATTR])
    warm = t.user_attrs.get(WARM_ATTR)
    if isinstance(warm, dict):
        value = warm.get("value")
        score = f", {warm.get('metric')} {value:.4f}" if isinstance(value, (int, float)) else ""
        return _reason(f"warm start: trial {warm.get('trial')} of {warm.get('study')}{score}"
                       + (" (confirmed mean)" if warm.get("confirmed") else "") + " there")
    return ""


def _reason(v: Any) -> str:
    """A recorded reason as one line of at most 300 characters."""
    text = " ".join(str(v).split()) if v is not None else ""
    return text if len(text) <= 300 else text[:297] + "..."


def _trial_note(t: Any, metric: str) -> str:
    """Why a trial is not COMPLETE: where and why it was pruned (a diverged trial says so), why it failed."""
    state = t.state.name
    if state == "PRUNED":
        last = _last_intermediate(t)
        note = f"pruned at step {last[0]} ({metric} {last[1]:.4f})" if last else "pruned"
        # lmtune records 'diverged: ...' as fail_reason on a PRUNED trial; the pruner's reason as prune_reason.
        reason = _reason(t.user_attrs.get("fail_reason") or t.user_attrs.get("prune_reason"))
        return f"{note}: {reason}" if reason else note
    if state == "FAIL":
        if t.system_attrs.get("lmtune_surplus"):
            return "surplus slot, never run"
        return _reason(t.user_attrs.get("fail_reason")) or "failed (no reason recorded)"
    if state == "RUNNING":
        return "running"
    return ""


def _history_chart(page: Page, sd: StudyData) -> None:
    import plotly.graph_objects as go

    complete = sorted(sd.complete, key=lambda t: t.number)
    pruned = [(t, _last_intermediate(t)) for t in sd.by_state("PRUNED")]
    pruned = [(t, li) for t, li in pruned if li]
    if not complete and not pruned:
        page.note("No trial has reported a value yet.")
        return
    fig = go.Figure()
    if complete:
        fig.add_trace(go.Scatter(x=[t.number for t in complete], y=[t.value for t in complete], mode="markers",
                                 name="complete trial", marker={"size": 9, "color": TRAIN_COLOR},
                                 hovertemplate="trial #%{x}: %{y:.4f}<extra></extra>"))
        run_best, xs, ys = None, [], []
        for t in complete:
            if run_best is None or (t.value > run_best if sd.maximize else t.value < run_best):
                run_best = t.value
            xs.append(t.number)
            ys.append(run_best)
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"shape": "hv", "color": BEST_COLOR, "width": 2},
                                 name="best so far", hovertemplate="best after trial #%{x}: %{y:.4f}<extra></extra>"))
    if pruned:
        fig.add_trace(go.Scatter(x=[t.number for t, _ in pruned], y=[li[1] for _, li in pruned], mode="markers",
                                 name="pruned trial (last reported value)",
                                 marker={"symbol": "x", "size": 9, "color": MUTED_COLOR},
                                 customdata=[li[0] for _, li in pruned],
                                 hovertemplate="trial #%{x} pruned at step %{customdata}: %{y:.4f}<extra></extra>"))
    style(fig, f"{sd.metric} per trial, in the order trials ran", "trial number", axis_title(sd), legend=True)
    numbers = [t.number for t in sd.trials]
    fig.update_xaxes(range=[min(numbers) - 0.5, max(numbers) + 0.5], dtick=1 if len(numbers) <= 25 else None)
    fig.update_layout(legend={"orientation": "h", "y": -0.2, "x": 0})
    page.figure(fig, f"{sd.metric}: {sd.better}, so the best-so-far line only ever moves {'up' if sd.maximize else 'down'}. "
                     "A best-so-far line that flattens early means more trials would add little.")


def _curves_chart(page: Page, sd: StudyData) -> None:
    import plotly.graph_objects as go

    trials = [t for t in sd.trials if any(_finite(v) for v in t.intermediate_values.values())]
    if not trials:
        page.note("No trial has reported an intermediate value yet.")
        return
    # x in epochs when every trial's history maps steps to epochs: steps are not comparable across batch sizes.
    epoch_of: dict[int, dict[int, float]] = {}
    for t in trials:
        hist = t.user_attrs.get("history") or []
        m = {int(h["step"]): float(h["epoch"]) for h in hist if isinstance(h, dict) and _finite(h.get("step")) and _finite(h.get("epoch"))}
        if all(s in m for s in t.intermediate_values):
            epoch_of[t.number] = m
    use_epochs = len(epoch_of) == len(trials)
    best = sd.best
    fig = go.Figure()
    shown = set()
    styles = {
        "COMPLETE": ({"color": TRAIN_COLOR, "width": 1.5}, "complete trials", 0.75),
        "PRUNED": ({"color": MUTED_COLOR, "width": 1.2, "dash": "dot"}, "pruned trials (x = where pruned)", 0.8),
        "RUNNING": ({"color": "#17becf", "width": 1.5, "dash": "dash"}, "running trials", 0.9),
        "FAIL": ({"color": "#e377c2", "width": 1.2, "dash": "dashdot"}, "failed trials", 0.8),
    }
    for t in sorted(trials, key=lambda t: t.number):
        is_best = best is not None and t.number == best.number
        steps = sorted(s for s, v in t.intermediate_values.items() if _finite(v))
        xs = [epoch_of[t.number][s] for s in steps] if use_epochs else steps
        ys = [t.intermediate_values[s] for s in steps]
        line, group, opacity = styles.get(t.state.name, styles["FAIL"])
        if is_best:
            line, group, opacity = {"color": BEST_COLOR, "width": 3}, f"best trial (#{t.number})", 1.0
        params = "<br>".join(f"{k}={fparam(v)}" for k, v in t.params.items())
        markers = {"size": [5] * (len(xs) - 1) + [11 if t.state.name == "PRUNED" else 5],
                   "symbol": ["circle"] * (len(xs) - 1) + ["x" if t.state.name == "PRUNED" else "circle"]}
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers", line=line, opacity=opacity, marker=markers, name=group, legendgroup=group,
            showlegend=group not in shown,
            hovertemplate=f"trial #{t.number} ({t.state.name.lower()})<br>" + ("epoch" if use_epochs else "step")
                          + " %{x}<br>" + sd.metric + " %{y:.4f}<br>" + params + "<extra></extra>"))
        shown.add(group)
    shown_metric = sd.metric[len("val_"):] if sd.metric.startswith("val_") else sd.metric
    style(fig, f"Validation {shown_metric} at each evaluation, every trial", "epoch" if use_epochs else "optimizer step",
          axis_title(sd), height=460, legend=True)
    page.figure(fig, "Each line is one trial; the pruner stopped the grey dotted ones where they end (x). Hover a line for its settings. "
                     + ("The x axis is epochs, comparable across batch sizes." if use_epochs else
                        "The x axis is optimizer steps, which cover more data per step at larger batch sizes."))


def _numeric_values(sd: StudyData, name: str) -> bool:
    vals = [t.params[name] for t in sd.trials if name in t.params]
    return bool(vals) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)


def _is_log(sd: StudyData, name: str) -> bool:
    vals = [t.params[name] for t in sd.trials if name in t.params]
    if not _numeric_values(sd, name) or min(vals) <= 0:
        return False
    dist = None
    for t in sd.trials:
        if name in t.distributions:
            dist = t.distributions[name]
            break
    if dist is not None and getattr(dist, "log", False):
        return True
    return any(h in name for h in _LOG_HINTS) and max(vals) / min(vals) > 10


def _importances(page: Page, sd: StudyData) -> None:
    """The answer's importances (answer.json, drawn in the answer section) are the study's one computation; a study
    still running has no answer yet, so the same computation runs here on the trials finished so far."""
    from lmtune.tune.answer import MIN_TRIALS_FOR_IMPORTANCE, importance_bands

    complete = [t for t in sd.complete if isinstance(t.value, (int, float)) and math.isfinite(t.value)]
    varied = [p for p in sd.param_names if len({repr(t.params.get(p)) for t in complete if p in t.params}) > 1]
    if len(complete) < MIN_TRIALS_FOR_IMPORTANCE or not varied:
        page.note(f"Parameter importances need at least {MIN_TRIALS_FOR_IMPORTANCE} complete trials with different "
                  f"settings ({len(complete)} complete so far).")
        return
    if sd.answer is not None and sd.answer.get("importances"):
        page.note("The importances, with their bootstrap bands, are the answer's (above): one computation, the one "
                  "the terminal printed and importances.json holds.")
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bands = importance_bands("maximize" if sd.maximize else "minimize", complete, varied)
    if not bands:
        page.note("Parameter importances could not be computed from these trials (e.g. a parameter that only some "
                  "trials have, or no spread in the metric).")
        return
    bands_chart(page, {"importances": bands, "metric": sd.metric, "trials": {"complete": len(complete)}})
    page.note(f"Computed on the {len(complete)} trials finished so far, as the answer will be when the study ends.")


def _parallel(page: Page, sd: StudyData) -> None:
    """Parallel coordinates drawn with SVG lines (plotly's parcoords needs WebGL, which many remote browsers lack)."""
    import plotly.graph_objects as go

    complete = sd.complete
    params = [p for p in sd.param_names if any(p in t.params for t in complete)]
    if len(complete) < 2 or not params:
        page.note("Parallel coordinates need at least 2 complete trials.")
        return
    axes: list[dict[str, Any]] = []
    for p in params:
        vals = [t.params[p] for t in complete if p in t.params]
        if _numeric_values(sd, p):
            log = _is_log(sd, p)
            f = (lambda v: math.log10(v)) if log else (lambda v: float(v))
            lo, hi = min(f(v) for v in vals), max(f(v) for v in vals)
            span = (hi - lo) or 1.0
            ticks = sorted(set(vals))
            if len(ticks) > 6:
                ticks = [10 ** (lo + span * k / 4) if log else lo + span * k / 4 for k in range(5)]
            axes.append({"name": p + (" (log scale)" if log else ""), "pos": (lambda v, f=f, lo=lo, span=span, one=(hi == lo):
                                                                          0.5 if one else (f(v) - lo) / span),
                         "ticks": ticks})
        else:
            cats = sorted({str(v) for v in vals})
            n = len(cats)
            axes.append({"name": p, "pos": (lambda v, cats=cats, n=n: 0.5 if n == 1 else cats.index(str(v)) / (n - 1)),
                         "ticks": cats})
    values = [t.value for t in complete]
    vlo, vhi = min(values), max(values)
    vspan = (vhi - vlo) or 1.0
    axes.append({"name": sd.metric, "pos": lambda v: 0.5 if vhi == vlo else (v - vlo) / vspan,
                 "ticks": [vlo + vspan * k / 4 for k in range(5)] if vhi > vlo else [vlo]})
    colorscale = metric_scale(sd.maximize)
    fig = go.Figure()
    for t in sorted(complete, key=lambda t: t.value if sd.maximize else -t.value):  # best drawn last, on top
        xs, ys = [], []
        for i, ax in enumerate(axes[:-1]):
            if params[i] in t.params:
                xs.append(i)
                ys.append(ax["pos"](t.params[params[i]]))
        xs.append(len(axes) - 1)
        ys.append(axes[-1]["pos"](t.value))
        c = scale_color(colorscale, (t.value - vlo) / vspan if vhi > vlo else 1.0)
        settings = "<br>".join(f"{k}={fparam(v)}" for k, v in t.params.items())
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", line={"color": c, "width": 2.5}, marker={"size": 6, "color": c},
                                 showlegend=False, name=f"trial #{t.number}",
                                 hovertemplate=f"trial #{t.number}: {sd.metric} {t.value:.4f}<br>{settings}<extra></extra>"))
    # the colour bar (an invisible trace that carries the scale)
    fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
                             marker={"colorscale": colorscale, "cmin": vlo, "cmax": vhi, "color": [vlo], "showscale": True,
                                     "colorbar": {"title": {"text": sd.metric}, "thickness": 14}}))
    for i, ax in enumerate(axes):
        fig.add_shape(type="line", x0=i, x1=i, y0=0, y1=1, line={"color": "#444", "width": 1.5}, layer="below")
        for tv in ax["ticks"]:
            y = ax["pos"](tv)
            label = fparam(tv) if not isinstance(tv, str) else tv
            if i == len(axes) - 1:
                label = f"{tv:.4f}"
            fig.add_annotation(x=i, y=y, text=esc(label), showarrow=False, xanchor="right", xshift=-6, font={"size": 11, "color": "#333"},
                               bgcolor="rgba(255,255,255,0.75)")
            fig.add_shape(type="line", x0=i - 0.03, x1=i, y0=y, y1=y, line={"color": "#444", "width": 1})
    style(fig, f"Parallel coordinates: settings of the {len(complete)} complete trials, coloured by {sd.metric}",
          "setting (each vertical axis is one parameter; the last axis is the metric)", "", height=460, legend=False)
    fig.update_xaxes(tickmode="array", tickvals=list(range(len(axes))), ticktext=[ax["name"] for ax in axes],
                     range=[-0.45, len(axes) - 0.7], showgrid=False, showline=False, ticks="", zeroline=False)
    fig.update_yaxes(visible=False, range=[-0.06, 1.06])
    page.figure(fig, "Each line is one complete trial, darker for a better metric; follow the darkest lines to see which settings the best trials share. "
                     "Axes are scaled from the smallest to the largest value tried.")


def _lr_batch(page: Page, sd: StudyData) -> None:
    import plotly.graph_objects as go

    lr_key = next((k for k in ("learning_rate", "lr") if k in sd.param_names), None)
    bs_key = next((k for k in ("global_batch_size", "batch_size") if k in sd.param_names), None)
    if not lr_key or not bs_key:
        page.note("Learning rate x batch size: the study does not search both "
                  f"(searched: {', '.join(sd.param_names) or 'nothing'}).")
        return
    pts = [t for t in sd.complete if lr_key in t.params and bs_key in t.params]
    pruned = [(t, _last_intermediate(t)) for t in sd.by_state("PRUNED") if lr_key in t.params and bs_key in t.params]
    if not pts:
        page.note("Learning rate x batch size: no complete trial yet.")
        return
    fig = go.Figure()
    vals = [t.value for t in pts]
    fig.add_trace(go.Scatter(
        x=[t.params[lr_key] for t in pts], y=[t.params[bs_key] for t in pts], mode="markers", name="complete trial",
        marker={"size": 14, "color": vals, "colorscale": metric_scale(sd.maximize), "showscale": True,
                "line": {"width": 1, "color": "#333"}, "colorbar": {"title": {"text": sd.metric}, "thickness": 14}},
        customdata=[[t.number, t.value] for t in pts],
        hovertemplate="trial #%{customdata[0]}<br>" + lr_key + " %{x:.2e}<br>" + bs_key + " %{y}<br>" + sd.metric
                      + " %{customdata[1]:.4f}<extra></extra>"))
    if pruned:
        fig.add_trace(go.Scatter(
            x=[t.params[lr_key] for t, _ in pruned], y=[t.params[bs_key] for t, _ in pruned], mode="markers",
            name="pruned trial", marker={"size": 10, "symbol": "x-thin", "line": {"width": 2, "color": MUTED_COLOR}},
            customdata=[t.number for t, _ in pruned],
            hovertemplate="trial #%{customdata} (pruned)<br>" + lr_key + " %{x:.2e}<br>" + bs_key + " %{y}<extra></extra>"))
    best = sd.best
    if best is not None and lr_key in best.params and bs_key in best.params:
        fig.add_trace(go.Scatter(x=[best.params[lr_key]], y=[best.params[bs_key]], mode="markers", name=f"best (trial #{best.number})",
                                 marker={"size": 24, "symbol": "circle-open", "color": BEST_COLOR, "line": {"width": 3}},
                                 hoverinfo="skip"))
    style(fig, f"Learning rate x batch size, coloured by {sd.metric}", f"{lr_key} (log scale)",
          f"{bs_key} (examples per step)", height=440, legend=True)
    lrs = [t.params[lr_key] for t in pts] + [t.params[lr_key] for t, _ in pruned]
    if min(lrs) > 0:
        tv, tt = log_ticks(min(lrs), max(lrs))
        fig.update_xaxes(type="log", tickmode="array", tickvals=tv, ticktext=tt, minor={"showgrid": False})
    bss = sorted({t.params[bs_key] for t in pts} | {t.params[bs_key] for t, _ in pruned})
    if _numeric_values(sd, bs_key) and min(bss) > 0:
        fig.update_yaxes(type="log", tickmode="array", tickvals=bss, ticktext=[str(b) for b in bss])
    fig.update_layout(legend={"orientation": "h", "y": -0.22, "x": 0})
    page.figure(fig, "Larger batches usually want larger learning rates; a diagonal band of good colours shows that trade-off.")


def _cost_chart(page: Page, sd: StudyData) -> None:
    import plotly.graph_objects as go

    pts = [t for t in sd.complete if _trial_seconds(t) is not None]
    if not pts:
        page.note("No complete trial has a recorded time yet.")
        return

    def group(t: Any) -> str:
        size = t.user_attrs.get("model_params_m")
        model = t.params.get("model") or (sd.best_run.record.get("model", {}).get("requested") if sd.best_run else None)
        size_s = f"{fcount(size * 1e6)} params" if _finite(size) else "size unknown"
        return f"{model} ({size_s})" if model else size_s

    groups: dict[str, list[Any]] = {}
    for t in pts:
        groups.setdefault(group(t), []).append(t)
    fig = go.Figure()
    symbols = ["circle", "square", "diamond", "triangle-up", "star", "hexagon", "cross", "pentagon"]
    def size_key(kv: tuple[str, list[Any]]) -> float:
        size = kv[1][0].user_attrs.get("model_params_m")
        return float(size) if _finite(size) else 0.0

    for i, (g, ts) in enumerate(sorted(groups.items(), key=size_key)):
        fig.add_trace(go.Scatter(
            x=[_trial_seconds(t) for t in ts], y=[t.value for t in ts], mode="markers", name=g,
            marker={"size": 12, "symbol": symbols[i % len(symbols)], "line": {"width": 1, "color": "#333"}},
            customdata=[[t.number, t.user_attrs.get("epochs_done")] for t in ts],
            hovertemplate="trial #%{customdata[0]}<br>%{x:.1f} s<br>" + sd.metric + " %{y:.4f}<br>epochs %{customdata[1]}<extra>"
                          + esc(g) + "</extra>"))
    _frontier(fig, sd, pts)
    confirmed = _confirmed_points(fig, sd, pts)
    style(fig, f"{sd.metric} against the cost of a trial, by model size", "trial wall-clock time (seconds)",
          axis_title(sd), height=440, legend=True)
    fig.update_xaxes(rangemode="tozero")
    fig.update_layout(legend={"title": {"text": "model (size)"}})
    page.figure(fig, (f"Up and to the left is better: a higher {sd.metric} for less time." if sd.maximize else
                      f"Down and to the left is better: a lower {sd.metric} for less time.")
                + " Complete trials only; time includes evaluation. The dashed line is the quality-for-time frontier: "
                  f"the best {sd.metric} of any trial that took at most that long."
                + (" Open markers with bars: the seed confirmation's mean and standard deviation of a trial." if confirmed else ""))
    _size_verdict(page, sd)


def _frontier(fig: Any, sd: StudyData, pts: list[Any]) -> None:
    """The best value reached by any trial at most this long (a step line over every size)."""
    import plotly.graph_objects as go

    xs, ys, best = [], [], None
    for t in sorted(pts, key=_trial_seconds):
        if best is None or (t.value > best if sd.maximize else t.value < best):
            best = t.value
            xs.append(_trial_seconds(t))
            ys.append(best)
    if len(xs) < 2:
        return
    xs.append(max(_trial_seconds(t) for t in pts))  # carried to the costliest trial: nothing beyond it did better
    ys.append(best)
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line={"shape": "hv", "dash": "dash", "color": "#555", "width": 1.5},
                             name="frontier (best at this cost)", hoverinfo="skip"))


def _confirmed_points(fig: Any, sd: StudyData, pts: list[Any]) -> bool:
    import plotly.graph_objects as go

    seconds = {t.number: _trial_seconds(t) for t in pts}
    rows = [r for r in (sd.confirm or {}).get("results", []) if r.get("trial") in seconds
            and _finite(r.get("mean")) and _finite(r.get("std"))]
    if not rows:
        return False
    models = {t.number: t.params.get("model", "") for t in pts}
    fig.add_trace(go.Scatter(
        x=[seconds[r["trial"]] for r in rows], y=[r["mean"] for r in rows], mode="markers",
        name=f"confirmed mean ± std ({len(rows[0].get('values') or [])} seeds)",
        marker={"size": 14, "symbol": "circle-open", "color": "#111", "line": {"width": 2}},
        error_y={"type": "data", "array": [r["std"] for r in rows], "visible": True, "color": "#111"},
        customdata=[[r["trial"], models.get(r["trial"], ""), r["std"]] for r in rows],
        hovertemplate="trial #%{customdata[0]} %{customdata[1]}<br>" + sd.metric
                      + " %{y:.4f} ± %{customdata[2]:.4f}<extra>confirmed</extra>"))
    return True


def _size_verdict(page: Page, sd: StudyData) -> None:
    """Which size wins for the budget, as the study's answer (answer.json) says it: nothing recomputed here."""
    answer = sd.answer
    sizes = [s for s in (answer or {}).get("sizes", []) if isinstance(s, dict) and isinstance(s.get("model"), str)]
    if len(sizes) < 2:
        return
    names = [s["model"] for s in sizes]
    verdict = [st for st in answer.get("statements", []) if isinstance(st, str) and sum(n in st for n in names) >= 2]
    lines = []
    for s in sizes:
        confirmed = (f"confirmed {fnum(s['confirmed_mean'], 4)} ± {fnum(s.get('confirmed_std'), 4)}"
                     if _finite(s.get("confirmed_mean")) else "not confirmed on other seeds")
        per = f", {fnum(s['seconds_per_trial'], 0)} s per trial" if _finite(s.get("seconds_per_trial")) else ""
        fit = f", ~{s['trials_in_budget']} trials in the budget" if isinstance(s.get("trials_in_budget"), int) else ""
        lines.append(f"{s['model']}: best {fnum(s.get('best_value'), 4)} (trial {s.get('best_trial')}), {confirmed}{per}{fit}")
    page.raw("<ul>" + "".join(f"<li>{esc(x)}</li>" for x in lines + verdict) + "</ul>")


PLAN_CHECK = "plan_check.json"


def _read_plan_check(folder: Path, problems: list[str]) -> dict[str, Any] | None:
    """``plan_check.json`` (lmtune.tune.plan.PlanCheck), read like every file here: inside the folder, checked types."""
    path = folder / PLAN_CHECK
    if not path.exists() or not safe_file(folder, path, PLAN_CHECK, problems):
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        problems.append(f"{PLAN_CHECK} is not valid JSON ({e}); the plan check is not shown")
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("trials"), list):
        problems.append(f"{PLAN_CHECK}: expected an object with a 'trials' list; the plan check is not shown")
        return None
    raw["trials"] = [t for t in raw["trials"] if isinstance(t, dict)]
    return raw


def _pct(v: Any) -> Cell:
    return num_cell(v, 1, text=f"{v:+.0f}%" if _finite(v) else "")


def _plan_check(page: Page, sd: StudyData) -> None:
    """Predicted against actual seconds (and peak memory) per finished trial: how far to trust `lmtune plan`."""
    pc = sd.plan_check
    if not pc or not pc["trials"]:
        page.note("No plan check (plan_check.json): the search ran with --no-plan, or no trial has finished yet.")
        return
    trials = sorted(pc["trials"], key=lambda t: t.get("trial") if _finite(t.get("trial")) else 0)
    time_err = [abs(t["time_error_pct"]) for t in trials if _finite(t.get("time_error_pct"))]
    mem_err = [abs(t["memory_error_pct"]) for t in trials if _finite(t.get("memory_error_pct"))]
    page.facts([
        ("trials checked", str(len(trials))),
        ("time per trial", f"median |error| {statistics.median(time_err):.0f}% over {len(time_err)} trial(s)" if time_err else None),
        ("peak memory", f"median |error| {statistics.median(mem_err):.0f}% over {len(mem_err)} trial(s)" if mem_err else None),
    ])
    rows = []
    for t in trials:
        rows.append([num_cell(t.get("trial"), 0), str(t.get("state", "")), num_cell(t.get("predicted_ran_s"), 1),
                     num_cell(t.get("actual_s"), 1), _pct(t.get("time_error_pct")), num_cell(t.get("predicted_s"), 1),
                     num_cell(t.get("evaluations"), 0), num_cell(t.get("predicted_peak_gib"), 2), num_cell(t.get("peak_gib"), 2),
                     _pct(t.get("memory_error_pct"))])
    page.table(["trial", "state", "predicted s", "actual s", "time error", "predicted s (whole trial)", "evaluations",
                "predicted peak GiB", "measured peak GiB", "memory error"], rows, drop_empty=True,
               caption="The plan priced each trial before it ran (lmtune plan: a calibration of a few real steps on this "
                       "machine, and a memory formula). 'predicted s' is the prediction for what the trial ran (a pruned "
                       "trial stops early: its steps and evaluations so far); an error above 0 means the plan expected "
                       "more time or memory than the trial took. Peak memory is measured as the calibration measures it "
                       "(the resident-set high-water mark on a CPU, max_memory_allocated on a GPU).")


def _confirm_results(sd: StudyData) -> list[dict[str, Any]]:
    out = []
    for r in (sd.confirm or {}).get("results") or []:
        vals = [v for v in r.get("values") or [] if _finite(v)]
        if not isinstance(r, dict) or not vals:
            continue
        mean = r.get("mean") if _finite(r.get("mean")) else sum(vals) / len(vals)
        std = r.get("std") if _finite(r.get("std")) else (
            math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)
        out.append(dict(r, values=vals, mean=mean, std=std))
    return out


def _confirmation(page: Page, sd: StudyData) -> None:
    import plotly.graph_objects as go

    res = _confirm_results(sd)
    if not res:
        page.note("No seed confirmation results (confirm.json) yet: each trial's value comes from a single seed, so "
                  "small differences between the top trials may be noise.")
        return
    metric = (sd.confirm or {}).get("metric") or sd.metric
    seeds = (sd.confirm or {}).get("seeds") or []
    by_number = {t.number: t for t in sd.trials}
    labels = [f"trial #{r.get('trial')}" for r in res]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=labels, y=[r["mean"] for r in res], mode="markers", name="mean over seeds ± 1 std",
                             marker={"size": 14, "color": TRAIN_COLOR, "symbol": "line-ew-open", "line": {"width": 3, "color": TRAIN_COLOR}},
                             error_y={"type": "data", "array": [r["std"] for r in res], "visible": True, "thickness": 2, "width": 12},
                             hovertemplate="%{x}: mean %{y:.4f} ± %{error_y.array:.4f}<extra></extra>"))
    xs, ys, text = [], [], []
    for lab, r in zip(labels, res):
        for k, v in enumerate(r["values"]):
            xs.append(lab)
            ys.append(v)
            text.append(str(seeds[k]) if k < len(seeds) else str(k))
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="one seed", text=text,
                             marker={"size": 8, "color": "rgba(31,119,180,0.45)", "line": {"width": 1, "color": TRAIN_COLOR}},
                             hovertemplate="%{x}, seed %{text}: %{y:.4f}<extra></extra>"))
    sx, sy = [], []
    for lab, r in zip(labels, res):
        t = by_number.get(r.get("trial"))
        if t is not None and _finite(t.value):
            sx.append(lab)
            sy.append(t.value)
    if sx:
        fig.add_trace(go.Scatter(x=sx, y=sy, mode="markers", name="value found in the search",
                                 marker={"size": 12, "symbol": "diamond", "color": BEST_COLOR},
                                 hovertemplate="%{x}: %{y:.4f} in the search<extra></extra>"))
    style(fig, f"Seed confirmation: {metric} over {len(seeds) or max(len(r['values']) for r in res)} seeds per trial",
          "trial (settings re-run with different seeds)", axis_title(sd, metric), height=420, legend=True)
    fig.update_layout(legend={"orientation": "h", "y": -0.22, "x": 0})
    page.figure(fig, "Error bars are ± one standard deviation across seeds. A search value far "
                     f"{'above' if sd.maximize else 'below'} its seed mean ({sd.better}) is the "
                     "selection effect: the search kept the luckiest seed.")
    rows = []
    for r in res:
        t = by_number.get(r.get("trial"))
        rows.append([num_cell(r.get("trial"), 0),
                     Cell(esc(", ".join(f"{k}={fparam(v)}" for k, v in (r.get("params") or (t.params if t else {})).items())), css="wrap"),
                     num_cell(t.value if t is not None and _finite(t.value) else None, 4), num_cell(r["mean"], 4), num_cell(r["std"], 4, text=f"{r['std']:.4f}"),
                     Cell(esc(", ".join(f"{v:.4f}" for v in r["values"])), css="wrap")])
    page.table(["trial", "settings", f"{metric} in search", "mean over seeds", "std over seeds", "per seed"], rows)


# ---- summary -------------------------------------------------------------------------------------

def study_summary(sd: StudyData, html_path: str | None = None) -> str:
    lines = [f"# lmtune study: {sd.name}", ""]
    counts = {s: len(sd.by_state(s)) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    waiting = len(sd.by_state("WAITING"))
    lines.append(f"- objective: {'maximise' if sd.maximize else 'minimise'} {sd.metric} ({sd.better})"
                 + (f"; task {sd.meta['task']}" if isinstance(sd.meta.get("task"), str) else ""))
    lines.append(f"- trials: {sum(counts.values())} run ({', '.join(f'{v} {k.lower()}' for k, v in counts.items())})"
                 + (f"; {waiting} queued, not run" if waiting else ""))
    best = sd.best
    if best is None:
        lines.append("- best: no complete trial yet")
    else:
        lines.append(f"- best: trial #{best.number}, {sd.metric} {best.value:.4f} with "
                     + ", ".join(f"{k}={fparam(v)}" for k, v in best.params.items()))
    if counts["RUNNING"]:
        lines.append("- still running: this is a snapshot")
    res = _confirm_results(sd)
    for r in res:
        lines.append(f"- confirmed: trial #{r.get('trial')} {sd.metric} {r['mean']:.4f} ± {r['std']:.4f} over {len(r['values'])} seeds")
    lines += [f"- {line}" for line in _handed_back_lines(sd)]
    if sd.answer is not None:
        try:
            lines += ["", "## The answer", "", "```", *answer_lines(sd.answer), "```", ""]
        except (KeyError, TypeError, ValueError):
            lines.append(f"- problem: {ANSWER_FILE} could not be read as lmtune tune writes it")
    for p in sd.problems:
        lines.append(f"- problem: {p}")
    if html_path:
        lines.append(f"- report: {html_path}")
    lines.append(f"- dashboard: optuna-dashboard {sd.storage}")
    return "\n".join(lines) + "\n"
