"""The report of one training run, read from its output folder.

It answers, in this order: did it learn (curves against a majority-class baseline), what data went in
(rows, class balance, token lengths against ``max_length``), how good is the best checkpoint (confusion
matrix, per-class scores on validation and any ``lmtune evaluate`` result), and where it fails (the
most confidently wrong validation examples).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmtune.errors import DataError
from lmtune.report._page import (BEST_COLOR, MUTED_COLOR, TEST_COLOR, TRAIN_COLOR, VAL_COLOR, Cell, Page, esc, fcount, fnum,
                                 fparam, num_cell, style)

RUN_RECORD = "lmtune_run.json"

METRIC_TITLES = {
    "accuracy": "accuracy (fraction correct)",
    "macro_f1": "macro-F1 (0 to 1)",
    "val_loss": "validation loss (cross-entropy, nats)",
}
N_WRONG_EXAMPLES = 10


@dataclass
class RunData:
    folder: Path
    record: dict[str, Any]
    predictions: list[dict[str, Any]] | None = None
    evals: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        return [str(x) for x in self.record.get("labels") or []]

    @property
    def metric(self) -> str:
        return ((self.record.get("config") or {}).get("train") or {}).get("metric") or "accuracy"

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
    "status": str, "precision": str, "finished_at": str,
}
_NESTED_TYPES: dict[str, dict[str, type | tuple[type, ...]]] = {
    "config": {"train": dict, "model": dict, "data": dict},
    "data": {"rows": dict, "rows_read": dict, "truncated": dict, "skipped": dict, "class_counts": dict,
             "token_lengths": dict, "warnings": list},
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
        preds, bad = [], []
        try:
            text = pred_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            run.problems.append(f"{pred_path.name} cannot be read ({type(e).__name__}); no examples shown")
            text = None
        for i, line in enumerate((text or "").splitlines(), 1):
            if not line.strip():
                continue
            try:
                p = json.loads(line)
            except json.JSONDecodeError:
                run.problems.append(f"{pred_path.name} line {i} is not valid JSON; skipped")
                continue
            if isinstance(p, dict):
                preds.append(p)
            else:
                bad.append(i)
        if bad:
            run.problems.append(f"{pred_path.name}: {len(bad)} line(s) are not JSON objects (first: line {bad[0]}); skipped")
        run.predictions = preds if text is not None else None
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
            else:
                run.problems.append(f"eval/{p.name} should hold a JSON object, not {_json_type(ev)}; skipped")
    elif eval_dir.is_dir():
        run.problems.append("eval/ links outside the folder; not read")
    return run


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

    for name, ev in run.evals:
        source = ev.get("data_file") or name
        page.section(f"Evaluation: {Path(str(source)).name}", level)
        guarded(page, f"The evaluation {name}", _evaluation, page, run, ev, source)

    page.section("Configuration and environment", level)
    page.details("full configuration (config section of lmtune_run.json)", json.dumps(rec.get("config") or {}, indent=2, default=str))
    page.details("machine and library versions", json.dumps({"machine": rec.get("machine"), "versions": rec.get("versions")},
                                                            indent=2, default=str))


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
        ("labels", ", ".join(run.labels)),
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
        ("selection metric", metric),
        ("best checkpoint", f"step {best.get('step')} (epoch {fnum(best.get('epoch'), 2)}): "
         + ", ".join(f"{k} {fnum(best.get(k))}" for k in ("accuracy", "macro_f1", "val_loss") if _finite(best.get(k)))
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


def _confidence_chart(page: Page, run: RunData) -> None:
    import plotly.graph_objects as go

    preds = [p for p in run.predictions or [] if _finite(p.get("confidence"))]
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
    wrong.sort(key=lambda p: -(p.get("confidence") or 0))
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
        row += [p.get("label"), p.get("predicted"), num_cell(p.get("confidence"), 3),
                num_cell(probs.get(str(p.get("label"))), 3)]
        rows.append(row)
    cols = ["line in file", "text"] + (["text pair"] if has_pair else []) + ["true label", "predicted", "confidence",
                                                                           "p(true label)"]
    page.table(cols, rows, caption=f"The {len(rows)} most confident mistakes of {len(wrong)} "
                                   f"(of {len(run.predictions)} validation rows). 'line in file' is the data file's line number.")


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
