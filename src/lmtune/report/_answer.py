"""The study's answer (``answer.json``, computed once by ``lmtune tune``) on the report page: what matters for this
task with its uncertainty, where the best trials lie, per-parameter metric views, sizes, and what cannot be
concluded yet. Nothing is recomputed here, so the page says what the terminal said."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lmtune.report._page import TRAIN_COLOR, Page, esc, fnum, fparam, style
from lmtune.tune.answer import ANSWER_FILE


def read_answer(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """answer.json, or None with a note when absent, a link, or not what `lmtune tune` writes."""
    path = folder / ANSWER_FILE
    if not path.is_file():
        return None, None
    if path.is_symlink():
        return None, f"{ANSWER_FILE} is a symbolic link; not followed"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"{ANSWER_FILE} is not valid JSON ({e}); the answer is not shown"
    need = {"metric": str, "importances": list, "parameters": dict, "sizes": list, "statements": list}
    if not isinstance(data, dict) or any(not isinstance(data.get(k), t) for k, t in need.items()):
        return None, f"{ANSWER_FILE} does not hold what lmtune tune writes; the answer is not shown"
    return data, None


def answer_section(page: Page, answer: dict[str, Any] | None, problem: str | None) -> None:
    """The section, from what ``read_answer`` returned."""
    if answer is None:
        page.note(problem or "No answer yet (answer.json is written when the study finishes).",
                  "warn" if problem else "info")
        return
    page.raw("<ul>" + "".join(f"<li>{esc(s)}</li>" for s in answer["statements"] if isinstance(s, str)) + "</ul>")
    bands_chart(page, answer)
    _parameter_table(page, answer)
    _sizes_table(page, answer)
    for name, view in answer["parameters"].items():
        if isinstance(view, dict) and isinstance(view.get("points"), list) and view["points"]:
            _points_chart(page, answer, name, view)


def bands_chart(page: Page, answer: dict[str, Any]) -> None:
    import plotly.graph_objects as go

    bands = [b for b in answer["importances"] if isinstance(b, dict) and isinstance(b.get("importance"), (int, float))]
    if not bands:
        return
    names = [b["parameter"] for b in bands][::-1]
    values = [b["importance"] for b in bands][::-1]
    plus = [max(0.0, (b["high"] if b.get("high") is not None else b["importance"]) - b["importance"]) for b in bands][::-1]
    minus = [max(0.0, b["importance"] - (b["low"] if b.get("low") is not None else b["importance"])) for b in bands][::-1]
    fig = go.Figure(go.Bar(x=values, y=names, orientation="h", marker_color=TRAIN_COLOR,
                           error_x={"type": "data", "symmetric": False, "array": plus, "arrayminus": minus},
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    style(fig, f"Importance for {answer['metric']}, with its 10th..90th percentile over bootstrap resamples",
          "importance (fANOVA share of explained variance)", "parameter", height=max(260, 90 + 38 * len(names)),
          legend=False)
    fig.update_layout(margin={"l": 140})
    page.figure(fig, f"fANOVA on the {answer['trials']['complete']} finished trials (seeded), and the band it moves in "
                     "when the trials are resampled: overlapping bands mean the ranking is not settled.")


def _parameter_table(page: Page, answer: dict[str, Any]) -> None:
    bands = {b.get("parameter"): b for b in answer["importances"] if isinstance(b, dict)}
    rows = []
    for name, view in answer["parameters"].items():
        if not isinstance(view, dict):
            continue
        b = bands.get(name, {})
        band = (f"{b['low']:.2f}..{b['high']:.2f}" if isinstance(b.get("low"), (int, float))
                and isinstance(b.get("high"), (int, float)) else "")
        if view.get("kind") == "range":
            best = "..".join(fparam(v) for v in view.get("best_range") or [])
            searched = "..".join(fparam(v) for v in view.get("searched") or [])
        else:
            best = ", ".join(f"{k}: {v}" for k, v in (view.get("best_counts") or {}).items())
            searched = ", ".join(fparam(v) for v in view.get("searched") or [])
        rows.append([name, b.get("importance", ""), band, best, searched, view.get("best_trials", "")])
    if rows:
        page.table(["parameter", "importance", "band (10..90 %)", "where the best trials lie", "searched",
                    "best trials counted"], rows, caption="The best trials are the best quarter of the finished ones "
                                                          "(at least 3).")


def _sizes_table(page: Page, answer: dict[str, Any]) -> None:
    rows = []
    for s in answer["sizes"]:
        if not isinstance(s, dict):
            continue
        conf = (f"{fnum(s['confirmed_mean'])} ± {fnum(s['confirmed_std'])} (trial {s.get('confirmed_trial')})"
                if isinstance(s.get("confirmed_mean"), (int, float)) else "not confirmed")
        rows.append([s.get("model", ""), s.get("complete", ""), s.get("pruned", ""), s.get("best_value", ""),
                     conf, s.get("seconds_per_trial", ""), s.get("trials_in_budget", "")])
    if rows:
        page.table(["model", "complete", "pruned", f"best {answer['metric']} (one seed)", "confirmed mean ± std",
                    "seconds per trial (median)", "trials the budget buys"], rows, drop_empty=True)


def _points_chart(page: Page, answer: dict[str, Any], name: str, view: dict[str, Any]) -> None:
    import plotly.graph_objects as go

    pts = [p for p in view["points"] if isinstance(p, list) and len(p) == 3 and isinstance(p[1], (int, float))]
    if len(pts) < 2:
        return
    log = bool(view.get("log")) and all(isinstance(p[0], (int, float)) and p[0] > 0 for p in pts)
    maximize = answer.get("direction") == "maximize"
    ranked = sorted(pts, key=lambda p: p[1], reverse=maximize)
    best = {p[2] for p in ranked[: max(min(3, len(ranked)), math.ceil(0.25 * len(ranked)))]}
    fig = go.Figure()
    for label, group, color in (("other trials", [p for p in pts if p[2] not in best], "#9aa5b1"),
                                ("best quarter", [p for p in pts if p[2] in best], TRAIN_COLOR)):
        if group:
            fig.add_trace(go.Scatter(x=[p[0] if not isinstance(p[0], str) else str(p[0]) for p in group],
                                     y=[p[1] for p in group], mode="markers", name=label,
                                     marker={"size": 9, "color": color},
                                     text=[f"trial {p[2]}" for p in group],
                                     hovertemplate="%{text}: " + esc(name) + "=%{x}, %{y:.4f}<extra></extra>"))
    style(fig, f"{answer['metric']} against {name}", name + (" (log scale)" if log else ""), answer["metric"],
          height=320)
    if log:
        fig.update_xaxes(type="log")
    page.figure(fig, f"Each finished trial's {answer['metric']} against its {name}; the best quarter highlighted.")
