"""The report of one training run, read from its output folder.

It answers, in this order: did it learn (curves against a majority-class baseline), what data went in
(rows, class balance, token lengths against ``max_length``), how good is the best checkpoint (confusion
matrix, per-class scores on validation and any ``lmtune evaluate`` result), and where it fails (the
most confidently wrong validation examples).

A generation run (``"task": "generation"`` in the record: prompt -> completion) gets its own page with the
same questions: loss and perplexity curves, the text metrics over evaluations, prompt and completion token
lengths against ``max_length`` with the cut rows counted, and the best and worst validation generations.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtune.errors import DataError
from lmtune.records import RECORD_FILE as RUN_RECORD
from lmtune.report._page import (BEST_COLOR, MUTED_COLOR, TEST_COLOR, TRAIN_COLOR, VAL_COLOR, Cell, Page, esc, fcount, fnum,
                                 fparam, num_cell, style)

METRIC_TITLES = {
    "accuracy": "accuracy (fraction correct)",
    "macro_f1": "macro-F1 (0 to 1)",
    "val_loss": "validation loss (cross-entropy, nats)",
    "perplexity": "validation perplexity (exp of the loss per completion token)",
    "exact_match": "exact match (% of prompts, 0 to 100)",
    "token_f1": "token F1 (0 to 100)",
    "rougeL": "ROUGE-L (0 to 100)",
    "bleu": "BLEU (0 to 100)",
    "chrf": "chrF (0 to 100)",
}
#: the text metrics of a generation run (0 to 100, higher is better), in the order the page shows them
TEXT_METRICS = {"exact_match": "exact match", "token_f1": "token F1", "rougeL": "ROUGE-L", "bleu": "BLEU", "chrf": "chrF"}
#: metrics where lower is better; every other metric is maximised
LOWER_IS_BETTER = ("val_loss", "perplexity", "loss")
N_WRONG_EXAMPLES = 10
N_GEN_EXAMPLES = 10


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


@dataclass
class RunData:
    folder: Path
    record: dict[str, Any]
    predictions: list[dict[str, Any]] | None = None
    evals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    #: the generations of a generation evaluation (eval/NAME.predictions.jsonl), by NAME
    eval_predictions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [str(x) for x in self.record.get("labels") or []]

    @property
    def task(self) -> str:
        """``classification`` or ``generation``: the record's ``task`` (runs before generation existed have none)."""
        task = self.record.get("task") or ((self.record.get("config") or {}).get("data") or {}).get("task")
        return task if isinstance(task, str) and task != "auto" else "classification"

    @property
    def generation(self) -> bool:
        return self.task == "generation"

    @property
    def metric(self) -> str:
        m = ((self.record.get("config") or {}).get("train") or {}).get("metric")
        return m if isinstance(m, str) and m and m != "auto" else ("val_loss" if self.generation else "accuracy")

    @property
    def name(self) -> str:
        return self.folder.resolve().name


def read_record(path: Path, error: type[Exception], kind: str) -> Any:
    """The JSON in ``path``; a missing or unreadable file is one ``error`` line naming it."""
    if path.exists() and not path.is_file():  # a folder or a FIFO named like the record: never block on it
        raise error(f"{path}: not a regular file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path.parent}: not {kind} (no {path.name})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except (OSError, ValueError) as e:
        raise error(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


# ---- untrusted folders ---------------------------------------------------------------------------
# Everything in a run or study folder is input, possibly written by someone else: a name read from a file
# must stay inside the folder (resolved: no '..', no absolute path, no symlink out), every file read must be
# a regular file inside it, and a value of the wrong JSON type becomes a note on the page, never a traceback.

def inside(root: Path, path: Path) -> bool:
    """Whether ``path`` resolves (symlinks followed) to ``root`` or below it."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, ValueError, RuntimeError):  # a symlink loop, a NUL byte
        return False


def resolve_name(root: Path, name: Any, what: str) -> tuple[Path | None, str | None]:
    """The path a file names (``what``, e.g. "study.json 'best_dir'"), resolved, if it stays strictly inside ``root``.

    Returns (path, None), or (None, a one-line problem) for a non-string, an absolute path, or a path that
    leaves ``root`` (by '..' or through a symlink).
    """
    shown = repr(name) if len(repr(name)) <= 120 else repr(name)[:117] + "..."
    if not isinstance(name, str) or not name.strip():
        return None, f"{what} should be a folder or file name (a string), not {shown}; ignored"
    try:
        rel = Path(name)
        if rel.is_absolute() or rel.drive:
            return None, f"{what} {shown} is an absolute path; only names inside the folder are followed; ignored"
        base = Path(root).resolve()
        target = (base / rel).resolve()
    except (OSError, ValueError, RuntimeError) as e:
        return None, f"{what} {shown} cannot be resolved ({type(e).__name__}); ignored"
    if target == base or not target.is_relative_to(base):
        return None, f"{what} {shown} points outside the folder {base}; ignored"
    return target, None


def safe_file(root: Path, path: Path, shown: str, problems: list[str]) -> bool:
    """Whether ``path`` may be read: it exists, is a regular file and resolves inside ``root``.
    A file that exists but may not be read adds a problem."""
    try:
        if not path.exists():
            return False
        if not inside(root, path):
            problems.append(f"{shown} links outside the folder; not read")
            return False
        if not path.is_file():
            problems.append(f"{shown} is not a regular file; not read")
            return False
    except OSError as e:
        problems.append(f"{shown} cannot be read ({type(e).__name__}); skipped")
        return False
    return True


#: the expected JSON type of each top-level field of lmtune_run.json that the report reads
_RECORD_TYPES: dict[str, type | tuple[type, ...]] = {
    "config": dict, "model": dict, "best": dict, "timing": dict, "steps": dict, "data": dict, "label_map": dict,
    "labels": list, "history": list, "train_log": list, "oom_events": list,
    "status": str, "precision": str, "finished_at": str, "task": str, "generation": dict,
}
_NESTED_TYPES: dict[str, dict[str, type | tuple[type, ...]]] = {
    "config": {"train": dict, "model": dict, "data": dict},
    "data": {"rows": dict, "rows_read": dict, "truncated": dict, "skipped": dict, "class_counts": dict,
             "token_lengths": dict, "warnings": list, "groups": dict, "cut": dict, "completion_too_long": dict},
    "best": {"per_class": dict, "confusion_matrix": list},
}
_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string"}


def _json_type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def check_record(record: dict[str, Any], file: str, problems: list[str]) -> dict[str, Any]:
    """Drop fields of the wrong JSON type (noting each, one line) so the page never trips on them."""
    def check(d: dict[str, Any], types: dict[str, Any], prefix: str) -> None:
        for key, typ in types.items():
            if key in d and d[key] is not None and not isinstance(d[key], typ):
                problems.append(f"{file}: '{prefix}{key}' should be {_TYPE_NAMES.get(typ, typ)}, not {_json_type(d[key])}; ignored")
                del d[key]

    check(record, _RECORD_TYPES, "")
    for key, types in _NESTED_TYPES.items():
        if isinstance(record.get(key), dict):
            check(record[key], types, f"{key}.")
    for key in ("history", "train_log"):
        items = record.get(key)
        if isinstance(items, list) and not all(isinstance(h, dict) for h in items):
            problems.append(f"{file}: '{key}' has entries that are not objects; those are ignored")
            record[key] = [h for h in items if isinstance(h, dict)]
    return record


def guarded(page: Page, what: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    """Draw one part of a page; a value of an unexpected type or shape in the files becomes a note, not a traceback."""
    try:
        fn(*args, **kwargs)
    except (TypeError, AttributeError, KeyError, ValueError, IndexError, ZeroDivisionError, OverflowError) as e:
        msg = (str(e).splitlines() or [""])[0][:200]
        page.note(f"{what} could not be drawn: a value in the folder's files has an unexpected type or shape "
                  f"({type(e).__name__}: {msg}).", "warn")


def load_run(folder: str | Path, root: str | Path | None = None) -> RunData:
    """Read a run folder; a missing optional file becomes a note on the page, a bad record an error.

    Files are read only if they resolve inside ``root`` (default: the run folder itself).
    """
    folder = Path(folder)
    root = Path(root) if root is not None else folder
    path = folder / RUN_RECORD
    if path.exists() and not inside(root, path):
        raise DataError(f"{path}: links outside the folder {Path(root).resolve()}; not read")
    record = read_record(path, DataError, "a run folder")
    if not isinstance(record, dict):
        raise DataError(f"{path}: expected a JSON object, not {_json_type(record)}")
    run = RunData(folder, record)
    check_record(record, RUN_RECORD, run.problems)
    if not record.get("history"):
        curve = folder / "curve.csv"
        run.record["history"] = _read_curve(curve) if safe_file(root, curve, curve.name, run.problems) else []
    pred_path = folder / "val_predictions.jsonl"
    if safe_file(root, pred_path, pred_path.name, run.problems):
        run.predictions = _read_jsonl(pred_path, pred_path.name, run.problems)
    eval_dir = folder / "eval"
    if eval_dir.is_dir() and inside(root, eval_dir):
        for p in sorted(eval_dir.glob("*.json")):
            if not safe_file(root, p, f"eval/{p.name}", run.problems):
                continue
            try:
                ev = json.loads(p.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError, OSError):
                run.problems.append(f"eval/{p.name} is not valid JSON; skipped")
                continue
            if isinstance(ev, dict):
                run.evals.append((p.stem, ev))
                # A generation evaluation writes its generations beside it; the name is derived here, never
                # taken from the file ('predictions_file' is an absolute path on the machine that wrote it).
                gen_path = eval_dir / f"{p.stem}.predictions.jsonl"
                if ev.get("task") == "generation" and safe_file(root, gen_path, f"eval/{gen_path.name}", run.problems):
                    rows = _read_jsonl(gen_path, f"eval/{gen_path.name}", run.problems)
                    if rows is not None:
                        run.eval_predictions[p.stem] = rows
            else:
                run.problems.append(f"eval/{p.name} should hold a JSON object, not {_json_type(ev)}; skipped")
    elif eval_dir.is_dir():
        run.problems.append("eval/ links outside the folder; not read")
    return run


def _read_jsonl(path: Path, shown: str, problems: list[str]) -> list[dict[str, Any]] | None:
    """The JSON objects of a .jsonl file, one per line; a bad line is a note, an unreadable file None."""
    rows, bad = [], []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{shown} cannot be read ({type(e).__name__}); no examples shown")
        return None
    # JSON lines end at "\n" only: str.splitlines would also break inside a text holding U+2028 or a form feed.
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            p = json.loads(line)
        except json.JSONDecodeError:
            problems.append(f"{shown} line {i} is not valid JSON; skipped")
            continue
        if isinstance(p, dict):
            rows.append(p)
        else:
            bad.append(i)
    if bad:
        problems.append(f"{shown}: {len(bad)} line(s) are not JSON objects (first: line {bad[0]}); skipped")
    return rows


def _read_curve(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                out.append({k: _num(v) for k, v in row.items() if isinstance(k, str) and isinstance(v, (str, type(None)))})
    except (OSError, UnicodeDecodeError, csv.Error):
        return out
    return out


def _num(v: str | None) -> Any:
    if v in (None, ""):
        return None
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def majority_baseline(run: RunData) -> tuple[str, float] | None:
    """The validation accuracy of always predicting the most frequent training class."""
    counts = ((run.record.get("data") or {}).get("class_counts") or {})
    train, val = counts.get("train") or {}, counts.get("val") or {}
    if not train or not val or not sum(val.values()):
        return None
    top = max(train, key=lambda k: train[k])
    return top, val.get(top, 0) / sum(val.values())


# ---- the page ------------------------------------------------------------------------------------

def add_run_sections(page: Page, run: RunData, level: int = 2) -> None:
    sub = level + 1
    rec = run.record
    status = rec.get("status")
    if status and status != "completed":
        page.note(f"This run's status is '{status}': the numbers below are from the part that finished.", "warn")
    for p in run.problems:
        page.note(p, "warn")

    if run.generation:
        _generation_sections(page, run, level)
    else:
        _classification_sections(page, run, level)

    for name, ev in run.evals:
        source = ev.get("data_file") or name
        page.section(f"Evaluation: {Path(str(source)).name}", level)
        if run.generation or ev.get("task") == "generation":
            guarded(page, f"The evaluation {name}", _gen_evaluation, page, run, name, ev, source, sub)
        else:
            guarded(page, f"The evaluation {name}", _evaluation, page, run, ev, source)

    page.section("Configuration and environment", level)
    page.details("full configuration (config section of lmtune_run.json)", json.dumps(rec.get("config") or {}, indent=2, default=str))
    if rec.get("generation"):
        page.details("generation settings (generation section of lmtune_run.json)", json.dumps(rec["generation"], indent=2, default=str))
    page.details("machine and library versions", json.dumps({"machine": rec.get("machine"), "versions": rec.get("versions")},
                                                            indent=2, default=str))


def _classification_sections(page: Page, run: RunData, level: int) -> None:
    sub = level + 1
    page.section("Overview", level)
    guarded(page, "The overview", lambda: page.facts(_overview_facts(run)))
    guarded(page, "The verdict against the majority-class baseline", _verdict, page, run)

    page.section("Did it learn?", level)
    guarded(page, "The loss chart", _loss_chart, page, run)
    guarded(page, "The metric chart", _metric_chart, page, run)
    guarded(page, "The learning-rate chart", _lr_chart, page, run)

    page.section("Data", level)
    guarded(page, "The data section", _data_section, page, run, sub)

    page.section("Validation results (best checkpoint)", level)
    guarded(page, "The validation results", _validation_results, page, run)
    page.section("Most confidently wrong validation examples", sub)
    guarded(page, "The table of wrong examples", _wrong_examples, page, run)


def _validation_results(page: Page, run: RunData) -> None:
    best = run.record.get("best") or {}
    if best.get("confusion_matrix") and run.labels:
        n = best.get("n")
        _confusion(page, best["confusion_matrix"], run.labels,
                   f"Validation confusion matrix at step {best.get('step')}" + (f" ({n} rows)" if n else ""))
    elif run.predictions:
        cm = _confusion_from_predictions(run.predictions, run.labels)
        _confusion(page, cm, run.labels, f"Validation confusion matrix ({len(run.predictions)} rows)")
    else:
        page.note("No confusion matrix recorded for validation.")
    if best.get("per_class"):
        _per_class(page, best["per_class"], "validation")
    _confidence_chart(page, run)


def _evaluation(page: Page, run: RunData, ev: dict[str, Any], source: Any) -> None:
    page.facts([("data file", source), ("rows", ev.get("n")),
                ("accuracy", fnum(ev.get("accuracy"))), ("macro-F1", fnum(ev.get("macro_f1"))),
                ("loss (cross-entropy, nats)", fnum(ev.get("loss")))])
    labels = [str(x) for x in ev.get("labels") or run.labels]
    if ev.get("confusion_matrix") and labels:
        _confusion(page, ev["confusion_matrix"], labels, f"Confusion matrix on {Path(str(source)).name}"
                   + (f" ({ev.get('n')} rows)" if ev.get("n") else ""))
    if ev.get("per_class"):
        _per_class(page, ev["per_class"], Path(str(source)).name)


def _overview_facts(run: RunData) -> list[tuple[str, Any]]:
    rec = run.record
    cfg = rec.get("config") or {}
    tc, mc = cfg.get("train") or {}, cfg.get("model") or {}
    model = rec.get("model") or {}
    best = rec.get("best") or {}
    timing = rec.get("timing") or {}
    steps = rec.get("steps") or {}
    metric = run.metric
    facts: list[tuple[str, Any]] = [
        ("run folder", str(run.folder)),
        ("status", rec.get("status")),
        ("model", model.get("requested") or mc.get("name")),
        ("architecture", model.get("architecture")),
        ("parameters", _params_text(model)),
        ("method", mc.get("method") + (f" (rank {mc.get('lora_rank')})" if mc.get("method") == "lora" and mc.get("lora_rank") else "")
         if mc.get("method") else None),
        ("task", "generation (prompt -> completion)" if run.generation else None),
        ("labels", ", ".join(run.labels)),
        ("decoding", _decoding_text(rec.get("generation") or {}) if run.generation else None),
        ("learning rate", fparam(tc.get("learning_rate")) + (f", {tc.get('lr_schedule')} schedule" if tc.get("lr_schedule") else "")
         + (f", warmup {fparam(tc.get('warmup_ratio'))} of steps" if tc.get("warmup_ratio") is not None else "")
         if tc.get("learning_rate") is not None else None),
        ("batch size", _batch_text(tc, rec)),
        ("epochs", tc.get("epochs")),
        ("max length", f"{tc.get('max_length')} tokens" if tc.get("max_length") else None),
        ("precision", rec.get("precision") or tc.get("precision")),
        ("seed", tc.get("seed")),
        ("steps", f"{steps.get('done')} of {steps.get('total')}" + (" (stopped early)" if rec.get("stopped_early") else "")
         if steps else None),
        ("selection metric", f"{metric} ({'higher' if higher_is_better(metric) else 'lower'} is better)" if run.generation else metric),
        ("best checkpoint", f"step {best.get('step')} (epoch {fnum(best.get('epoch'), 2)}): " + _scores_text(run, best)
         if best else None),
        ("time", _time_text(timing)),
        ("finished", rec.get("finished_at")),
    ]
    if rec.get("oom_events"):
        facts.append(("out-of-memory events", f"{len(rec['oom_events'])}; micro-batch reduced to {rec.get('micro_batch_size_used')}"))
    return facts


def _params_text(model: dict[str, Any]) -> str | None:
    total, trainable = model.get("total_params"), model.get("trainable_params")
    if not total:
        return None
    s = f"{fcount(total)} total"
    if trainable is not None:
        s += f", {fcount(trainable)} trainable ({100 * trainable / total:.1f}%)"
    return s


def _batch_text(tc: dict[str, Any], rec: dict[str, Any]) -> str | None:
    g = tc.get("global_batch_size")
    if not g:
        return None
    micro = rec.get("micro_batch_size_used") or tc.get("micro_batch_size")
    procs = rec.get("num_processes") or 1
    s = f"{g} examples per optimizer step"
    if micro:
        accum = max(1, round(g / (micro * procs)))
        s += f" (micro-batch {micro} x {procs} process{'es' if procs > 1 else ''} x {accum} accumulation)"
    return s


def _time_text(timing: dict[str, Any]) -> str | None:
    if not timing:
        return None
    parts = []
    if _finite(timing.get("wall_seconds")):
        parts.append(f"{timing['wall_seconds']:.1f} s wall")
    if _finite(timing.get("train_seconds")):
        parts.append(f"{timing['train_seconds']:.1f} s training")
    if _finite(timing.get("eval_seconds")):
        parts.append(f"{timing['eval_seconds']:.1f} s evaluation")
    if _finite(timing.get("train_tokens_per_s")):
        parts.append(f"{timing['train_tokens_per_s']:,.0f} training tokens/s")
    return ", ".join(parts) or None


def _verdict(page: Page, run: RunData) -> None:
    """One sentence on whether the model beats the trivial baseline, so nobody reads 0.9 as good on 90/10 data."""
    best = run.record.get("best") or {}
    base = majority_baseline(run)
    acc = best.get("accuracy")
    if base is None or not _finite(acc):
        return
    label, base_acc = base
    gain = acc - base_acc
    text = (f"Best validation accuracy {acc:.4f} against {base_acc:.4f} for always predicting the most frequent "
            f"training class ('{label}').")
    if gain <= 0.01:
        page.note(text + " The model has not learned more than the class balance.", "warn")
    else:
        page.note(text + f" That is {100 * gain:.1f} points above the baseline.", "good")


def _epoch_lines(fig: Any, history: list[dict[str, Any]], max_step: float) -> None:
    """Dotted vertical lines at epoch boundaries, so the x axis (optimizer steps) also reads in epochs."""
    spe = None
    for h in history:
        if _finite(h.get("epoch")) and h["epoch"] > 0 and _finite(h.get("step")) and h["step"] > 0:
            spe = h["step"] / h["epoch"]
    if not spe or not max_step:
        return
    k = 1
    while k * spe <= max_step * 1.0001 and k <= 50:
        fig.add_vline(x=k * spe, line={"dash": "dot", "color": "#aaa", "width": 1},
                      annotation_text=f"epoch {k}", annotation_position="top left",
                      annotation_font={"size": 11, "color": "#777"})
        k += 1


def _best_line(fig: Any, best: dict[str, Any]) -> None:
    if _finite(best.get("step")):
        fig.add_vline(x=best["step"], line={"dash": "dash", "color": BEST_COLOR, "width": 1.5},
                      annotation_text="best checkpoint", annotation_position="bottom left",
                      annotation_font={"size": 11, "color": BEST_COLOR})


def _loss_chart(page: Page, run: RunData) -> None:
    import plotly.graph_objects as go

    rec = run.record
    history = rec.get("history") or []
    tlog = [t for t in rec.get("train_log") or [] if _finite(t.get("loss")) and _finite(t.get("step"))]
    fig = go.Figure()
    if tlog:
        fig.add_trace(go.Scatter(x=[t["step"] for t in tlog], y=[t["loss"] for t in tlog], mode="lines",
                                 name="training loss (mean over logging interval)", line={"color": TRAIN_COLOR}))
    else:
        pts = [h for h in history if _finite(h.get("train_loss"))]
        if pts:
            fig.add_trace(go.Scatter(x=[h["step"] for h in pts], y=[h["train_loss"] for h in pts], mode="lines+markers",
                                     name="training loss (mean since previous evaluation)", line={"color": TRAIN_COLOR}))
    vpts = [h for h in history if _finite(h.get("val_loss"))]
    if vpts:
        fig.add_trace(go.Scatter(x=[h["step"] for h in vpts], y=[h["val_loss"] for h in vpts], mode="lines+markers",
                                 name="validation loss", line={"color": VAL_COLOR}))
    if not fig.data:
        page.note("No loss values were recorded for this run.")
        return
    max_step = max([t["step"] for t in tlog] + [h["step"] for h in vpts if _finite(h.get("step"))] or [0])
    _epoch_lines(fig, history, max_step)
    _best_line(fig, rec.get("best") or {})
    style(fig, "Loss per optimizer step", "optimizer step", "loss (cross-entropy, nats)", legend=True)
    fig.update_layout(legend={"orientation": "h", "y": -0.2, "x": 0})
    page.figure(fig, "Lower is better. Training loss falling while validation loss rises means overfitting; "
                     "both flat means the model is not learning (try a larger learning rate).")


def _metric_chart(page: Page, run: RunData) -> None:
    import plotly.graph_objects as go

    rec = run.record
    history = rec.get("history") or []
    fig = go.Figure()
    colours = {"accuracy": VAL_COLOR, "macro_f1": "#9467bd"}
    for key, name in (("accuracy", "validation accuracy"), ("macro_f1", "validation macro-F1")):
        pts = [h for h in history if _finite(h.get(key)) and _finite(h.get("step"))]
        if pts:
            fig.add_trace(go.Scatter(x=[h["step"] for h in pts], y=[h[key] for h in pts], mode="lines+markers", name=name,
                                     line={"color": colours[key]},
                                     customdata=[h.get("epoch") for h in pts],
                                     hovertemplate="step %{x}<br>epoch %{customdata}<br>" + name + " %{y:.4f}<extra></extra>"))
    if not fig.data:
        page.note("No validation metrics were recorded (no evaluation ran).")
        return
    base = majority_baseline(run)
    if base:
        fig.add_hline(y=base[1], line={"dash": "dash", "color": MUTED_COLOR},
                      annotation_text=f"majority-class accuracy {base[1]:.3f} (always '{base[0]}')",
                      annotation_position="top left", annotation_font={"size": 11, "color": "#555"})
    max_step = max(h["step"] for h in history if _finite(h.get("step")))
    _epoch_lines(fig, history, max_step)
    _best_line(fig, rec.get("best") or {})
    style(fig, f"Validation metrics per evaluation ({len(history)} evaluations)", "optimizer step",
          "score (0 to 1, higher is better)", legend=True)
    fig.update_yaxes(range=[0, 1.04])
    fig.update_layout(legend={"orientation": "h", "y": -0.2, "x": 0})
    page.figure(fig, f"The best checkpoint (kept and reported everywhere below) is chosen by {run.metric}.")


def _lr_chart(page: Page, run: RunData) -> None:
    import plotly.graph_objects as go

    rec = run.record
    pts = [t for t in rec.get("train_log") or [] if _finite(t.get("lr")) and _finite(t.get("step"))]
    if not pts:
        pts = [h for h in rec.get("history") or [] if _finite(h.get("lr")) and _finite(h.get("step"))]
    if len(pts) < 2:
        return
    fig = go.Figure(go.Scatter(x=[t["step"] for t in pts], y=[t["lr"] for t in pts], mode="lines",
                               name="learning rate", line={"color": "#8c564b"}))
    style(fig, "Learning-rate schedule", "optimizer step", "learning rate (per step)", height=300)
    fig.update_yaxes(exponentformat="e", rangemode="tozero")
    page.figure(fig)


def _data_section(page: Page, run: RunData, level: int) -> None:
    import plotly.graph_objects as go

    data = run.record.get("data") or {}
    rows, rows_read = data.get("rows") or {}, data.get("rows_read") or {}
    truncated = data.get("truncated") or {}
    splits = [s for s in ("train", "val") if s in rows or s in rows_read]
    val_source = {"file": "separate file", "split": "split off the training file"}.get(data.get("val_source"), data.get("val_source"))
    page.facts([("training file", data.get("train_file")),
                ("validation", (data.get("val_file") or "") + (f" ({val_source})" if val_source else "")),
                ("columns", ", ".join(f"{k.replace('_column', '')}={data[k]}" for k in ("text_column", "text_pair_column", "label_column") if data.get(k)))])
    if splits:
        skipped = {k: v for k, v in (data.get("skipped") or {}).items() if v}
        table = []
        for s in splits:
            n = rows.get(s)
            t = truncated.get(s)
            table.append([s, num_cell(rows_read.get(s), 0), num_cell(n, 0),
                          num_cell(t, 0, text=f"{t} ({100 * t / n:.1f}%)" if _finite(t) and n else fnum(t))])
        page.table(["split", "rows read", "rows used", f"truncated to max length ({data.get('max_length')} tokens)"], table,
                   sortable=False, caption=("skipped rows: " + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in skipped.items()))
                   if skipped else "")
    for w in data.get("warnings") or []:
        page.note(str(w), "warn")

    counts = data.get("class_counts") or {}
    if counts:
        labels = run.labels or sorted({k for c in counts.values() for k in c})
        fig = go.Figure()
        colours = {"train": TRAIN_COLOR, "val": VAL_COLOR}
        for s, c in counts.items():
            total = sum(c.values()) or 1
            fig.add_trace(go.Bar(x=labels, y=[c.get(lab, 0) for lab in labels], name=f"{s} ({total} rows)",
                                 marker_color=colours.get(s, TEST_COLOR),
                                 text=[f"{100 * c.get(lab, 0) / total:.0f}%" for lab in labels], textposition="outside",
                                 hovertemplate="%{x}: %{y} rows (%{text} of " + s + ")<extra></extra>"))
        style(fig, "Class balance per split", "label", "rows (examples)", height=360, legend=True)
        fig.update_layout(barmode="group")
        fig.update_yaxes(rangemode="tozero")
        page.figure(fig, "Percentages are of each split's rows. A class far rarer than the rest is where macro-F1 and accuracy part ways.")

    lengths = data.get("token_lengths") or {}
    max_len = data.get("max_length")
    if any(lengths.get(s) for s in lengths):
        fig = go.Figure()
        colours = {"train": TRAIN_COLOR, "val": VAL_COLOR}
        longest = max((max(v) for v in lengths.values() if v), default=1)
        top = max(longest, max_len or 0)
        size = max(1, math.ceil(top / 50))
        for s, v in lengths.items():
            if not v:
                continue
            fig.add_trace(go.Histogram(x=v, name=f"{s} ({len(v)} rows)", histnorm="percent", opacity=0.6,
                                       marker_color=colours.get(s, TEST_COLOR),
                                       xbins={"start": 0, "end": top + size, "size": size},
                                       hovertemplate="%{x} tokens: %{y:.1f}% of rows<extra>" + s + "</extra>"))
        title = "Token length per example"
        if max_len:
            rates = []
            for s in lengths:
                n, t = len(lengths.get(s) or []) or rows.get(s), truncated.get(s)
                if _finite(t) and n:
                    rates.append(f"{s} {100 * t / n:.1f}%")
            fig.add_vline(x=max_len, line={"dash": "dash", "color": BEST_COLOR, "width": 2},
                          annotation_text=f"max_length = {max_len}" + (f"<br>truncated: {', '.join(rates)}" if rates else ""),
                          annotation_position="top left", annotation_font={"size": 12, "color": BEST_COLOR})
            if rates:
                title += f" (truncated at {max_len}: {', '.join(rates)})"
        style(fig, title, "length (tokens, after tokenisation)", "% of rows in split", height=380, legend=True)
        fig.update_layout(barmode="overlay", bargap=0.02)
        fig.update_xaxes(range=[0, top * 1.06 + size])
        capped = bool(max_len) and longest <= max_len
        page.figure(fig, ("Lengths are counted after truncation, so examples longer than max_length pile up in the bar at the line. "
                          if capped else "Lengths are counted before truncation: everything right of the line is cut. ")
                    + "A high truncation rate means the model does not see the end of many texts.")


def _confusion_from_predictions(preds: list[dict[str, Any]], labels: list[str]) -> list[list[int]]:
    idx = {lab: i for i, lab in enumerate(labels)}
    cm = [[0] * len(labels) for _ in labels]
    for p in preds:
        i, j = idx.get(str(p.get("label"))), idx.get(str(p.get("predicted")))
        if i is not None and j is not None:
            cm[i][j] += 1
    return cm


def _confusion(page: Page, cm: list[list[Any]], labels: list[str], title: str) -> None:
    import plotly.graph_objects as go

    k = len(labels)
    if len(cm) != k or any(len(r) != k for r in cm):
        page.note(f"{title}: the matrix does not match the {k} labels; not drawn.", "warn")
        return
    row_tot = [sum(r) or 1 for r in cm]
    frac = [[cm[i][j] / row_tot[i] for j in range(k)] for i in range(k)]
    text = [[f"{cm[i][j]}<br>({100 * frac[i][j]:.0f}%)" for j in range(k)] for i in range(k)]
    fig = go.Figure(go.Heatmap(
        z=frac, x=labels, y=labels, text=text, texttemplate="%{text}" if k <= 20 else "", colorscale="Blues", zmin=0, zmax=1,
        colorbar={"title": {"text": "share of<br>true class"}, "tickformat": ".0%"},
        customdata=cm, hovertemplate="true %{y}, predicted %{x}: %{customdata} rows (%{z:.1%} of true %{y})<extra></extra>"))
    size = min(640, 180 + 60 * k)
    style(fig, title, "predicted label", "true label", height=size + 40, legend=False)
    fig.update_yaxes(autorange="reversed", type="category")
    fig.update_xaxes(type="category", side="bottom")
    fig.update_layout(width=None, margin={"l": 110})
    page.figure(fig, "Each cell: rows with that true label (row) predicted as that label (column), and the share of the "
                     "true class. The diagonal is correct.")


def _per_class(page: Page, per_class: dict[str, Any], split: str) -> None:
    import plotly.graph_objects as go

    labels = list(per_class)
    rows = []
    for lab in labels:
        m = per_class[lab] or {}
        rows.append([lab, num_cell(m.get("precision"), 3), num_cell(m.get("recall"), 3), num_cell(m.get("f1-score"), 3),
                     num_cell(m.get("support"), 0)])
    page.table(["label", "precision", "recall", "F1", "support (rows)"], rows,
               caption=f"Per-class scores on {split}; click a header to sort.")
    fig = go.Figure()
    for key, name, colour in (("precision", "precision", TRAIN_COLOR), ("recall", "recall", VAL_COLOR), ("f1-score", "F1", TEST_COLOR)):
        fig.add_trace(go.Bar(x=labels, y=[(per_class[lab] or {}).get(key) for lab in labels], name=name, marker_color=colour,
                             hovertemplate="%{x}: " + name + " %{y:.3f}<extra></extra>"))
    style(fig, f"Precision, recall and F1 per class ({split})", "label", "score (0 to 1)", height=340, legend=True)
    fig.update_layout(barmode="group")
    fig.update_yaxes(range=[0, 1.05])
    page.figure(fig)


def _probability(p: dict[str, Any]) -> Any:
    """The predicted label's probability: ``probability`` (as `lmtune predict` names it); runs written before
    0.2 called it ``confidence``."""
    return p.get("probability", p.get("confidence"))


def _confidence_chart(page: Page, run: RunData) -> None:
    import plotly.graph_objects as go

    preds = [p | {"confidence": _probability(p)} for p in run.predictions or [] if _finite(_probability(p))]
    if not preds:
        return
    right = [p["confidence"] for p in preds if str(p.get("label")) == str(p.get("predicted"))]
    wrong = [p["confidence"] for p in preds if str(p.get("label")) != str(p.get("predicted"))]
    fig = go.Figure()
    lo = 1.0 / max(2, len(run.labels) or 2)
    bins = {"start": 0, "end": 1.0001, "size": 0.05}
    fig.add_trace(go.Histogram(x=right, name=f"correct ({len(right)})", marker_color=TEST_COLOR, xbins=bins,
                               hovertemplate="confidence %{x}: %{y} rows<extra>correct</extra>"))
    fig.add_trace(go.Histogram(x=wrong, name=f"wrong ({len(wrong)})", marker_color=BEST_COLOR, xbins=bins,
                               hovertemplate="confidence %{x}: %{y} rows<extra>wrong</extra>"))
    style(fig, f"Confidence of validation predictions ({len(wrong)} of {len(preds)} wrong, "
               f"{100 * len(wrong) / len(preds):.1f}%)", "probability of the predicted label", "rows (examples)",
          height=340, legend=True)
    fig.update_layout(barmode="stack", bargap=0.05)
    fig.update_xaxes(range=[min(lo, min(right + wrong)) - 0.02, 1.02])
    page.figure(fig, "Wrong answers at high confidence are the ones to read first (table below).")


def _wrong_examples(page: Page, run: RunData) -> None:
    if run.predictions is None:
        page.note("val_predictions.jsonl is missing, so no examples can be shown.")
        return
    wrong = [p for p in run.predictions if str(p.get("label")) != str(p.get("predicted"))]
    if not wrong:
        page.note(f"The best checkpoint gets all {len(run.predictions)} validation rows right.", "good")
        return
    wrong.sort(key=lambda p: -(_probability(p) or 0))
    has_pair = any("text_pair" in p for p in wrong)
    rows = []
    for p in wrong[:N_WRONG_EXAMPLES]:
        text = str(p.get("text", ""))
        text = text if len(text) <= 400 else text[:400] + " ..."
        row = [num_cell(p.get("line"), 0), Cell(esc(text), css="text")]
        if has_pair:
            pair = str(p.get("text_pair") or "")
            row.append(Cell(esc(pair if len(pair) <= 300 else pair[:300] + " ..."), css="text"))
        probs = p.get("probabilities") or {}
        row += [p.get("label"), p.get("predicted"), num_cell(_probability(p), 3),
                num_cell(probs.get(str(p.get("label"))), 3)]
        rows.append(row)
    cols = ["line in file", "text"] + (["text pair"] if has_pair else []) + ["true label", "predicted", "confidence",
                                                                           "p(true label)"]
    page.table(cols, rows, caption=f"The {len(rows)} most confident mistakes of {len(wrong)} "
                                   f"(of {len(run.predictions)} validation rows). 'line in file' is the data file's line number.")


# ---- generation runs ------------------------------------------------------------------------------

def _generation_sections(page: Page, run: RunData, level: int) -> None:
    sub = level + 1
    page.section("Overview", level)
    guarded(page, "The overview", lambda: page.facts(_overview_facts(run)))
    guarded(page, "The verdict on perplexity", _gen_verdict, page, run)

    page.section("Did it learn?", level)
    guarded(page, "The loss chart", _loss_chart, page, run)
    guarded(page, "The perplexity chart", _perplexity_chart, page, run)
    guarded(page, "The text-metric chart", _text_metric_chart, page, run)
    guarded(page, "The learning-rate chart", _lr_chart, page, run)

    page.section("Data", level)
    guarded(page, "The data section", _gen_data_section, page, run)

    page.section("Validation results (best checkpoint)", level)
    guarded(page, "The validation results", _gen_validation_results, page, run)
    guarded(page, "The tables of validation examples", _gen_examples, page, run.predictions, "val_predictions.jsonl",
            "validation", sub)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _fmt_metric(key: str, v: Any) -> str:
    """A metric value: 2 decimals on the 0-100 text metrics and perplexity, 4 on losses and 0-1 scores."""
    if _finite(v) and (key in TEXT_METRICS or key == "perplexity"):
        return f"{v:.2f}"
    return fnum(v)


def _score_keys(run: RunData) -> tuple[str, ...]:
    return ("val_loss", "perplexity", *TEXT_METRICS) if run.generation else ("accuracy", "macro_f1", "val_loss")


def _scores_text(run: RunData, d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_fmt_metric(k, d[k])}" for k in _score_keys(run) if _finite(d.get(k)))


def _decoding_text(gen: dict[str, Any]) -> str | None:
    if not gen:
        return None
    parts = []
    if gen.get("max_new_tokens") is not None:
        parts.append(f"greedy, up to {gen['max_new_tokens']} new tokens")
    if isinstance(gen.get("stop_token_ids"), list) and gen["stop_token_ids"]:
        parts.append("stops at token " + ", ".join(str(t) for t in gen["stop_token_ids"][:8]))
    if gen.get("chat_template") is not None:
        parts.append(f"chat template: {gen['chat_template']}")
    if gen.get("train_on_prompt") is not None:
        parts.append("trained on prompt and completion" if gen["train_on_prompt"] else "trained on completion tokens only")
    return "; ".join(parts) or None


def _perplexities(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Evaluations with a perplexity (from ``val_loss`` when a record has none)."""
    out = []
    for h in history:
        if not _finite(h.get("step")):
            continue
        if _finite(h.get("perplexity")):
            out.append({"step": h["step"], "epoch": h.get("epoch"), "perplexity": h["perplexity"]})
        elif _finite(h.get("val_loss")):
            out.append({"step": h["step"], "epoch": h.get("epoch"), "perplexity": math.exp(min(h["val_loss"], 50.0))})
    return out


def _has_text_metrics(d: dict[str, Any]) -> bool:
    return any(_finite(d.get(k)) for k in TEXT_METRICS)


def _prediction_text(p: dict[str, Any]) -> str:
    v = p.get("prediction")
    return "" if v is None else str(v)


def _gen_verdict(page: Page, run: RunData) -> None:
    """Did the loss fall, and do the generations share anything with the references: the two things to read first."""
    rec = run.record
    history = rec.get("history") or []
    best = rec.get("best") or {}
    pp = [h["perplexity"] for h in _perplexities(history)]
    if len(pp) >= 2:
        first, low, last = pp[0], min(pp), pp[-1]
        text = (f"Validation perplexity {first:.2f} at the first evaluation, {low:.2f} at its lowest, {last:.2f} at the last "
                f"({len(pp)} evaluations).")
        if low < first * 0.98:
            page.note(text + f" It fell by {100 * (1 - low / first):.0f}%: the model finds the reference completions "
                             "less surprising as it trains.", "good")
        else:
            page.note(text + " It did not fall after the first evaluation: the model has stopped learning, or never "
                             "started (try a larger learning rate or more epochs).", "warn")
    if history and not any(_has_text_metrics(h) for h in history):
        page.note("No text metrics were recorded: generation at evaluation was off (--eval-generate-rows 0), so loss and "
                  "perplexity are all this run measures.")
        return
    if _has_text_metrics(best) and all(not best.get(k) for k in TEXT_METRICS if _finite(best.get(k))):
        empty = sum(1 for p in run.predictions or [] if not _prediction_text(p).strip())
        page.note("Every text metric of the best checkpoint is 0: its generations share nothing with the references"
                  + (f" ({empty} of {len(run.predictions or [])} validation generations are empty)" if empty else "")
                  + ". Read the examples below.", "warn")


def _perplexity_chart(page: Page, run: RunData) -> None:
    import plotly.graph_objects as go

    rec = run.record
    history = rec.get("history") or []
    pts = _perplexities(history)
    if not pts:
        page.note("No validation perplexity was recorded (no evaluation ran).")
        return
    fig = go.Figure(go.Scatter(x=[h["step"] for h in pts], y=[h["perplexity"] for h in pts], mode="lines+markers",
                               name="validation perplexity", line={"color": VAL_COLOR},
                               customdata=[h.get("epoch") for h in pts],
                               hovertemplate="step %{x}<br>epoch %{customdata}<br>perplexity %{y:.2f}<extra></extra>"))
    _epoch_lines(fig, history, max(h["step"] for h in pts))
    _best_line(fig, rec.get("best") or {})
    style(fig, f"Validation perplexity per evaluation ({_plural(len(pts), 'evaluation')})", "optimizer step",
          "perplexity (exp of the loss per completion token; lower is better)", height=380, legend=False)
    vals = [h["perplexity"] for h in pts]
    if min(vals) > 0 and max(vals) / min(vals) > 10:
        tv, tt = _log_ticks(min(vals), max(vals))
        fig.update_yaxes(type="log", tickmode="array", tickvals=tv, ticktext=tt)
    page.figure(fig, "Perplexity is exp(validation loss): roughly how many tokens the model hesitates between at each "
                     "completion token. 1 is a perfect fit; a model that guesses uniformly scores its vocabulary size.")


def _log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    from lmtune.report._page import log_ticks

    vals, _ = log_ticks(lo, hi)
    return vals, [f"{v:g}" for v in vals]


def _text_metric_chart(page: Page, run: RunData) -> None:
    import plotly.graph_objects as go

    rec = run.record
    history = rec.get("history") or []
    colours = {"exact_match": "#2ca02c", "token_f1": TRAIN_COLOR, "rougeL": VAL_COLOR, "bleu": "#9467bd", "chrf": "#8c564b"}
    fig = go.Figure()
    for key, name in TEXT_METRICS.items():
        pts = [h for h in history if _finite(h.get(key)) and _finite(h.get("step"))]
        if pts:
            fig.add_trace(go.Scatter(x=[h["step"] for h in pts], y=[h[key] for h in pts], mode="lines+markers", name=name,
                                     line={"color": colours[key], "width": 3 if key == run.metric else 2},
                                     customdata=[h.get("epoch") for h in pts],
                                     hovertemplate="step %{x}<br>epoch %{customdata}<br>" + name + " %{y:.2f}<extra></extra>"))
    if not fig.data:
        page.note("No text metrics were recorded (generation at evaluation was off: --eval-generate-rows 0).")
        return
    steps = [h["step"] for h in history if _finite(h.get("step"))]
    _epoch_lines(fig, history, max(steps))
    _best_line(fig, rec.get("best") or {})
    prompts = [h.get("generated_prompts") for h in history if _finite(h.get("generated_prompts"))]
    val_prompts = ((rec.get("data") or {}).get("groups") or {}).get("val")
    on = (f", {prompts[-1]} prompts generated" + (f" of {val_prompts}" if _finite(val_prompts) and val_prompts != prompts[-1] else "")
          if prompts else "")
    style(fig, f"Validation text metrics per evaluation ({_plural(len(steps), 'evaluation')}{on})", "optimizer step",
          "score (0 to 100, higher is better)", legend=True)
    top = max(max(t.y) for t in fig.data)
    fig.update_yaxes(range=[0, min(104, max(10, top * 1.15))])
    fig.update_layout(legend={"orientation": "h", "y": -0.2, "x": 0})
    direction = "higher" if higher_is_better(run.metric) else "lower"
    page.figure(fig, "Each prompt's greedy generation is scored against its reference completions (the best reference "
                     "counts). Exact match, token F1 and ROUGE-L are averaged over prompts; BLEU and chrF are corpus-level. "
                     f"The best checkpoint is chosen by {run.metric} ({direction} is better).")


def _split_count(d: Any, split: str) -> tuple[Any, list[Any]]:
    """(count, first lines) of one split of ``cut`` / ``completion_too_long`` ({count, lines}, or a bare count)."""
    v = (d or {}).get(split) if isinstance(d, dict) else None
    if isinstance(v, dict):
        lines = v.get("lines")
        return v.get("count"), lines if isinstance(lines, list) else []
    return v, []


def _cut_rate(n: Any, total: Any) -> str:
    if not _finite(n):
        return fnum(n)
    return f"{n} ({100 * n / total:.1f}%)" if _finite(total) and total else str(n)


def _gen_data_section(page: Page, run: RunData) -> None:
    import plotly.graph_objects as go

    rec = run.record
    data = rec.get("data") or {}
    gen = rec.get("generation") or {}
    rows, groups = data.get("rows") or {}, data.get("groups") or {}
    cut, too_long = data.get("cut") or {}, data.get("completion_too_long") or {}
    max_len = data.get("max_length")
    splits = [s for s in ("train", "val") if s in rows or s in groups]
    val_source = {"file": "separate file", "split": "split off the training file"}.get(data.get("val_source"), data.get("val_source"))
    page.facts([("training file", data.get("train_file")),
                ("validation", (data.get("val_file") or "") + (f" ({val_source})" if val_source else "")),
                ("format", data.get("format")),
                ("columns", ", ".join(f"{k.replace('_column', '')}={data[k]}" for k in ("prompt_column", "completion_column")
                                      if data.get(k))),
                ("prompt template", data.get("prompt_template")),
                ("chat template", gen.get("chat_template")),
                ("max length", f"{max_len} tokens (prompt + completion)" if max_len else None)])
    if splits:
        table = []
        for s in splits:
            n = rows.get(s)
            c, c_lines = _split_count(cut, s)
            t, t_lines = _split_count(too_long, s)
            shown = sorted({int(x) for x in c_lines + t_lines if isinstance(x, int) and not isinstance(x, bool)})
            table.append([s, num_cell(n, 0), num_cell(groups.get(s), 0), num_cell(c, 0, text=_cut_rate(c, n)),
                          num_cell(t, 0, text=_cut_rate(t, n)),
                          Cell(esc(", ".join(str(x) for x in shown[:12]) + (" ..." if len(shown) > 12 else "")), css="wrap")])
        skipped = {f"{s} {k.replace('_', ' ')}": v for s, d in (data.get("skipped") or {}).items() if isinstance(d, dict)
                   for k, v in d.items() if v}
        page.table(["split", "rows (prompt/completion pairs)", "distinct prompts",
                    f"prompt start cut (row > {max_len} tokens)", "completion too long (end cut, no end token)",
                    "lines cut (data file)"], table, sortable=False,
                   caption="A row longer than max_length loses the start of its prompt; the completion stays whole. When the "
                           "completion alone does not fit, its end is cut too and the model never sees the end token: it "
                           "does not learn to stop on that row."
                           + (" Skipped rows: " + ", ".join(f"{k}: {v}" for k, v in skipped.items()) + "." if skipped else ""))
    for w in data.get("warnings") or []:
        page.note(str(w), "warn")

    lengths = data.get("token_lengths") or {}
    prompt_l = [v for v in lengths.get("train_prompt") or [] if _finite(v)]
    comp_l = [v for v in lengths.get("train_completion") or [] if _finite(v)]
    c_train, _ = _split_count(cut, "train")
    t_train, _ = _split_count(too_long, "train")
    if prompt_l or comp_l:
        fig = go.Figure()
        top = max(prompt_l + comp_l + [max_len or 0, 1])
        size = max(1, math.ceil(top / 50))
        for v, name, colour in ((prompt_l, "prompt", TRAIN_COLOR), (comp_l, "completion (with its end token)", TEST_COLOR)):
            if v:
                fig.add_trace(go.Histogram(x=v, name=f"{name} ({len(v)} rows)", opacity=0.6, marker_color=colour,
                                           xbins={"start": 0, "end": top + size, "size": size},
                                           hovertemplate="%{x} tokens: %{y} rows<extra>" + name + "</extra>"))
        marks = []
        if _finite(c_train):
            marks.append(f"{c_train} {'row' if c_train == 1 else 'rows'} lost the prompt start")
        if _finite(t_train):
            marks.append(f"{t_train} {'completion' if t_train == 1 else 'completions'} too long")
        if max_len:
            fig.add_vline(x=max_len, line={"dash": "dash", "color": BEST_COLOR, "width": 2},
                          annotation_text=f"max_length = {max_len}" + (f"<br>{'<br>'.join(marks)}" if marks else ""),
                          annotation_position="top left", annotation_font={"size": 12, "color": BEST_COLOR})
        mnt = gen.get("max_new_tokens")
        if _finite(mnt) and comp_l:
            longer = sum(1 for v in comp_l if v > mnt)
            fig.add_vline(x=mnt, line={"dash": "dot", "color": MUTED_COLOR, "width": 2},
                          annotation_text=f"max_new_tokens = {mnt}" + (f"<br>{longer} completions longer" if longer else ""),
                          annotation_position="top right", annotation_font={"size": 11, "color": "#555"})
        title = "Prompt and completion length, training rows"
        if marks and max_len:
            title += f" (cut at {max_len}, of {len(prompt_l) or rows.get('train')}: {', '.join(marks)})"
        style(fig, title, "length (tokens, after tokenisation)", "rows (examples)", height=380, legend=True)
        fig.update_layout(barmode="overlay", bargap=0.02)
        fig.update_xaxes(range=[0, top * 1.06 + size])
        page.figure(fig, "Lengths are counted after cutting to max_length. A completion longer than max_new_tokens cannot be "
                         "generated whole at evaluation, which caps every text metric on those prompts.")

    totals = {s: [v for v in lengths.get(s) or [] if _finite(v)] for s in ("train", "val")}
    if any(totals.values()):
        fig = go.Figure()
        colours = {"train": TRAIN_COLOR, "val": VAL_COLOR}
        top = max([max(v) for v in totals.values() if v] + [max_len or 0])
        size = max(1, math.ceil(top / 50))
        rates = []
        for s, v in totals.items():
            if not v:
                continue
            fig.add_trace(go.Histogram(x=v, name=f"{s} ({len(v)} rows)", histnorm="percent", opacity=0.6,
                                       marker_color=colours[s], xbins={"start": 0, "end": top + size, "size": size},
                                       hovertemplate="%{x} tokens: %{y:.1f}% of rows<extra>" + s + "</extra>"))
            c, _ = _split_count(cut, s)
            if _finite(c):
                rates.append(f"{s} {c} ({100 * c / len(v):.1f}%)")
        title = "Row length (prompt + completion) per split"
        if max_len:
            fig.add_vline(x=max_len, line={"dash": "dash", "color": BEST_COLOR, "width": 2},
                          annotation_text=f"max_length = {max_len}" + (f"<br>cut: {', '.join(rates)}" if rates else ""),
                          annotation_position="top left", annotation_font={"size": 12, "color": BEST_COLOR})
            if rates:
                title += f" (rows cut at {max_len}: {', '.join(rates)})"
        style(fig, title, "length (tokens, after tokenisation)", "% of rows in split", height=360, legend=True)
        fig.update_layout(barmode="overlay", bargap=0.02)
        fig.update_xaxes(range=[0, top * 1.06 + size])
        page.figure(fig, "Rows longer than max_length are cut to it, so they pile up in the bar at the line. A high cut rate "
                         "means the model often does not see the start of the prompt.")


def _gen_validation_results(page: Page, run: RunData) -> None:
    import plotly.graph_objects as go

    best = run.record.get("best") or {}
    if best:
        page.facts([("checkpoint", f"step {best.get('step')} (epoch {fnum(best.get('epoch'), 2)})")]
                   + [(METRIC_TITLES.get(k, k), _fmt_metric(k, best.get(k))) for k in _score_keys(run) if _finite(best.get(k))]
                   + [("prompts generated", best.get("generated_prompts"))])
    else:
        page.note("No best checkpoint was recorded (no evaluation ran).")
    preds = run.predictions or []
    fig = go.Figure()
    for key, colour in (("rougeL", VAL_COLOR), ("token_f1", TRAIN_COLOR)):
        v = [p[key] for p in preds if _finite(p.get(key))]
        if v:
            fig.add_trace(go.Histogram(x=v, name=f"{TEXT_METRICS[key]} ({len(v)} prompts)", opacity=0.6, marker_color=colour,
                                       xbins={"start": 0, "end": 100.001, "size": 5},
                                       hovertemplate="%{x}: %{y} prompts<extra>" + TEXT_METRICS[key] + "</extra>"))
    if not fig.data:
        return
    exact = sum(1 for p in preds if _finite(p.get("exact_match")) and p["exact_match"] >= 100)
    empty = sum(1 for p in preds if not _prediction_text(p).strip())
    style(fig, f"Per-prompt scores on validation ({len(preds)} prompts, {exact} exact matches, {empty} empty generations)",
          "score of the prompt's generation (0 to 100, best reference)", "prompts", height=340, legend=True)
    fig.update_layout(barmode="overlay", bargap=0.05)
    fig.update_xaxes(range=[-2, 102])
    page.figure(fig, "A pile at 0 is prompts where the generation shares no word with any reference; the tables below "
                     "show the best and worst.")


def _chat_prompt(text: str) -> str:
    """A chat prompt as val_predictions.jsonl stores it (JSON [[role, content], ...]) as 'role: content' lines."""
    if not text.startswith("[["):
        return text
    try:
        turns = json.loads(text)
    except ValueError:
        return text
    if isinstance(turns, list) and turns and all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t)
                                                 for t in turns):
        return "\n".join(f"{role}: {content}" for role, content in turns)
    return text


def _clip(text: str, n: int, keep_end: bool = False) -> str:
    if len(text) <= n:
        return text
    return "... " + text[-n:] if keep_end else text[:n] + " ..."


def _example_row(p: dict[str, Any], rank: int) -> list[Any]:
    refs = p.get("references")
    refs = [str(r) for r in refs] if isinstance(refs, list) else ([] if refs is None else [str(refs)])
    ref_text = refs[0] if len(refs) == 1 else "\n".join(f"[{i}] {_clip(r, 200)}" for i, r in enumerate(refs, 1))
    pred = _prediction_text(p)
    return [num_cell(rank, 0), num_cell(p.get("line"), 0),
            Cell(esc(_clip(_chat_prompt(str(p.get("prompt", ""))), 400, keep_end=True)), css="text"),
            Cell(esc(_clip(ref_text, 400)), css="text"),
            Cell(esc(_clip(pred, 400)) if pred.strip() else "<em>(empty)</em>", css="text"),
            num_cell(p.get("rougeL"), 1), num_cell(p.get("token_f1"), 1), num_cell(p.get("exact_match"), 0)]


def _gen_examples(page: Page, preds: list[dict[str, Any]] | None, source: str, split: str, level: int) -> None:
    """The best and the worst generations of a split, by ROUGE-L (token F1 or exact match when a file lacks it)."""
    if preds is None:
        page.note(f"{source} is missing, so no examples can be shown.")
        return
    if not preds:
        page.note(f"{source} holds no generations (generation at evaluation was off, or no prompt was scored).")
        return
    key = next((k for k in ("rougeL", "token_f1", "exact_match") if any(_finite(p.get(k)) for p in preds)), None)
    cols = ["rank", "line in file", "prompt", "references", "prediction", "ROUGE-L", "token F1", "exact match"]
    if key is None:
        page.section(f"{split.capitalize()} examples", level)
        page.table(cols, [_example_row(p, i + 1) for i, p in enumerate(preds[:N_GEN_EXAMPLES])],
                   caption=f"The first {min(N_GEN_EXAMPLES, len(preds))} of {len(preds)} rows of {source}; they carry no "
                           "per-prompt score, so they are not ordered best to worst.")
        return
    name = TEXT_METRICS[key]
    scored = sorted((p for p in preds if _finite(p.get(key))),
                    key=lambda p: (-p[key], p["line"] if _finite(p.get("line")) else math.inf))
    k = min(N_GEN_EXAMPLES, math.ceil(len(scored) / 2))
    best, worst = scored[:k], scored[k:][-N_GEN_EXAMPLES:][::-1]
    n = len(scored)
    tie = len({p[key] for p in scored}) == 1
    page.section(f"Best {split} examples", level)
    page.table(cols, [_example_row(p, i + 1) for i, p in enumerate(best)],
               caption=f"The {len(best)} {split} prompts with the highest {name} of {n} scored, best first. Scores are 0 to 100 "
                       "against the best reference; 'line in file' is the data file's line number; a long prompt shows its end."
                       + (f" Every prompt scores {name} {fnum(scored[0][key], 1)}, so this order is the file's." if tie else ""))
    page.section(f"Worst {split} examples", level)
    if not worst:
        page.note("The only scored prompt is in the table above.")
        return
    page.table(cols, [_example_row(p, n - i) for i, p in enumerate(worst)],
               caption=f"The {len(worst)} {split} prompts with the lowest {name} of {n} scored, worst first: where the model "
                       "fails. An empty prediction means it emitted its stop token at once.")


def _gen_evaluation(page: Page, run: RunData, name: str, ev: dict[str, Any], source: Any, level: int) -> None:
    page.facts([("data file", source), ("rows", ev.get("n")), ("prompts", ev.get("prompts")),
                ("loss (cross-entropy per completion token, nats)", fnum(ev.get("loss"))),
                ("perplexity", _fmt_metric("perplexity", ev.get("perplexity")))]
               + [(METRIC_TITLES[k], _fmt_metric(k, ev.get(k))) for k in TEXT_METRICS if _finite(ev.get(k))]
               + [("max new tokens", ev.get("max_new_tokens")),
                  ("rows cut to max length", ev.get("cut"))])
    if name in run.eval_predictions:
        _gen_examples(page, run.eval_predictions[name], f"eval/{name}.predictions.jsonl", Path(str(source)).name, level)


def _generation_summary_lines(run: RunData) -> list[str]:
    rec = run.record
    data = rec.get("data") or {}
    best = rec.get("best") or {}
    history = rec.get("history") or []
    lines = []
    rows, groups = data.get("rows") or {}, data.get("groups") or {}
    if rows:
        lines.append(f"- data: {', '.join(f'{v} {k}' for k, v in rows.items())} prompt/completion pairs"
                     + (f" ({', '.join(f'{v} {k}' for k, v in groups.items())} distinct prompts)" if groups else "")
                     + (f", format {data['format']}" if data.get("format") else ""))
    cut, too_long = data.get("cut") or {}, data.get("completion_too_long") or {}
    if cut or too_long:
        def counts(d: Any) -> tuple[str, bool]:
            parts, any_cut = [], False
            for s in ("train", "val"):
                c, _ = _split_count(d, s)
                if _finite(c):
                    n = rows.get(s)
                    any_cut = any_cut or c > 0
                    parts.append(f"{s} {c}" + (f" of {n} ({100 * c / n:.1f}%)" if _finite(n) and n else ""))
            return ", ".join(parts) or "?", any_cut
        (c_text, c_any), (t_text, t_any) = counts(cut), counts(too_long)
        if c_any or t_any:
            lines.append(f"- rows cut to max_length {data.get('max_length')} tokens (start of the prompt dropped): {c_text}; "
                         f"completions too long (end cut, no end token): {t_text}")
        else:
            lines.append(f"- rows cut to max_length {data.get('max_length')} tokens: none")
    if best:
        metric = run.metric
        direction = "higher" if higher_is_better(metric) else "lower"
        where = f"step {best.get('step')} (epoch {fnum(best.get('epoch'), 2)})"
        if _finite(best.get(metric)):
            lines.append(f"- best {metric} (selection metric, {direction} is better): {_fmt_metric(metric, best[metric])} at {where}")
        else:
            lines.append(f"- best checkpoint: {where}, chosen by {metric} ({direction} is better)")
        others = ", ".join(f"{k} {_fmt_metric(k, best[k])}" for k in _score_keys(run) if k != metric and _finite(best.get(k)))
        if others:
            lines.append(f"- best checkpoint's other scores: {others}")
    pp = [h["perplexity"] for h in _perplexities(history)]
    if len(pp) >= 2:
        lines.append(f"- perplexity: {pp[0]:.2f} at first evaluation, {min(pp):.2f} lowest, {pp[-1]:.2f} at last")
    elif pp:
        lines.append(f"- perplexity: {pp[0]:.2f} (one evaluation)")
    vl = [h["val_loss"] for h in history if _finite(h.get("val_loss"))]
    if len(vl) >= 2:
        lines.append(f"- validation loss: {vl[0]:.4f} at first evaluation, {min(vl):.4f} lowest, {vl[-1]:.4f} at last")
    if history and not any(_has_text_metrics(h) for h in history):
        lines.append("- text metrics: not computed (generation at evaluation was off)")
    preds = run.predictions or []
    scored = [p["rougeL"] for p in preds if _finite(p.get("rougeL"))]
    if preds:
        exact = sum(1 for p in preds if _finite(p.get("exact_match")) and p["exact_match"] >= 100)
        empty = sum(1 for p in preds if not _prediction_text(p).strip())
        lines.append(f"- validation generations: {_plural(len(preds), 'prompt')}, {exact} exact matches, {empty} empty"
                     + (f"; ROUGE-L per prompt from {min(scored):.1f} (worst) to {max(scored):.1f} (best)" if scored else ""))
    for name_, ev in run.evals:
        scores = ", ".join(f"{k} {_fmt_metric(k, ev[k])}" for k in ("perplexity", *TEXT_METRICS) if _finite(ev.get(k)))
        lines.append(f"- {Path(str(ev.get('data_file') or name_)).name}: {scores or 'no scores'} ({ev.get('n', '?')} rows)")
    return lines


# ---- summary -------------------------------------------------------------------------------------

def run_summary(run: RunData, html_path: str | None = None) -> str:
    rec = run.record
    model = rec.get("model") or {}
    mc = ((rec.get("config") or {}).get("model") or {})
    data = rec.get("data") or {}
    best = rec.get("best") or {}
    history = rec.get("history") or []
    lines = [f"# lmtune run: {run.name}", ""]
    name = model.get("requested") or mc.get("name") or "?"
    params = f", {fcount(model['total_params'])} params" if model.get("total_params") else ""
    lines.append(f"- model: {name} ({mc.get('method', '?')}{params}), status {rec.get('status', '?')}")
    if run.generation:
        lines += _generation_summary_lines(run)
        for p in run.problems:
            lines.append(f"- problem: {p}")
        if html_path:
            lines.append(f"- report: {html_path}")
        return "\n".join(lines) + "\n"
    rows = data.get("rows") or {}
    if rows:
        trunc = data.get("truncated") or {}
        tr = "; ".join(f"{s} {trunc[s]} ({100 * trunc[s] / rows[s]:.1f}%)" for s in trunc if rows.get(s) and _finite(trunc[s]))
        lines.append(f"- data: {', '.join(f'{v} {k}' for k, v in rows.items())} rows, {len(run.labels)} classes"
                     + (f"; truncated at {data.get('max_length')} tokens: {tr}" if tr else ""))
    if best:
        scores = ", ".join(f"{k} {best[k]:.4f}" for k in ("accuracy", "macro_f1", "val_loss") if _finite(best.get(k)))
        lines.append(f"- best checkpoint: step {best.get('step')} (epoch {fnum(best.get('epoch'), 2)}): {scores}")
    base = majority_baseline(run)
    if base and _finite(best.get("accuracy")):
        verdict = "learned" if best["accuracy"] - base[1] > 0.01 else "NOT better than the class balance"
        lines.append(f"- did it learn: {verdict} (majority-class accuracy {base[1]:.4f})")
    vl = [h["val_loss"] for h in history if _finite(h.get("val_loss"))]
    if len(vl) >= 2:
        lines.append(f"- validation loss: {vl[0]:.4f} at first evaluation, {min(vl):.4f} lowest, {vl[-1]:.4f} at last")
    pc = best.get("per_class") or {}
    if pc:
        worst = min(pc, key=lambda k: (pc[k] or {}).get("f1-score", 1.0))
        lines.append(f"- weakest class: {worst} (F1 {(pc[worst] or {}).get('f1-score', float('nan')):.3f})")
    for name_, ev in run.evals:
        lines.append(f"- {Path(str(ev.get('data_file') or name_)).name}: accuracy {fnum(ev.get('accuracy'))}, "
                     f"macro-F1 {fnum(ev.get('macro_f1'))} ({ev.get('n', '?')} rows)")
    if run.predictions:
        wrong = sum(1 for p in run.predictions if str(p.get("label")) != str(p.get("predicted")))
        lines.append(f"- validation errors: {wrong} of {len(run.predictions)}")
    for p in run.problems:
        lines.append(f"- problem: {p}")
    if html_path:
        lines.append(f"- report: {html_path}")
    return "\n".join(lines) + "\n"
