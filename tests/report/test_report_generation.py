"""The report of a generation run (prompt -> completion) and of a study minimising val_loss.

A real run folder is written by `lmtune train` with the tiny random Llama (seconds): its validation file
holds a prompt with a <script> tag and a prompt long enough to be cut at --max-length 24.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

import pytest

from lmtune.cli import main
from lmtune.report import write_report

WORDS = ["good", "great", "bad", "film", "story", "plot", "nice", "dull"]
SCRIPT = "<script>alert(1)</script>"


def _rows(n: int, seed: int) -> list[dict[str, str]]:
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 3)))
        out.append({"prompt": f"repeat: {words}", "completion": f" {words}"})
    return out


def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def gen_data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("gen-data")
    val = _rows(10, 2)
    val[0]["prompt"] = f"repeat: {SCRIPT} good"
    val[1]["prompt"] = "repeat: " + " ".join(WORDS * 3) + " good"  # far over 24 tokens: its start is cut
    return {"train": _write_jsonl(root / "train.jsonl", _rows(40, 1)), "val": _write_jsonl(root / "val.jsonl", val)}


def _common(tiny_llama: str, gen_data: dict[str, str]) -> list[str]:
    return ["--model", tiny_llama, "--data", gen_data["train"], "--val-file", gen_data["val"], "--precision", "fp32",
            "--max-length", "24", "--max-new-tokens", "6"]


@pytest.fixture(scope="module")
def gen_run(tiny_llama, gen_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen-run") / "run"
    code = main(["train", *_common(tiny_llama, gen_data), "--epochs", "2", "--lr", "3e-3", "--batch-size", "8",
                 "--no-progress", "--no-report", "--out", str(out)])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def gen_study(tiny_llama, gen_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen-study") / "study"
    code = main(["tune", *_common(tiny_llama, gen_data), "--lr", "1e-3..1e-2:log", "--n-trials", "2", "--confirm-seeds", "0",
                 "--epochs", "1", "--batch-size", "16", "--metric", "val_loss", "--no-report", "--out", str(out)])
    assert code == 0
    return out


def _headings(page: str) -> list[str]:
    return [html.unescape(h) for h in re.findall(r"<h[2-4] id=\"[^\"]*\">([^<]*)</h[2-4]>", page)]


def _table_after(page: str, heading: str) -> str:
    start = page.index(f">{html.escape(heading)}</h")
    return page[start:page.index("</table>", start)]


def _cells(row: str) -> list[str]:
    return re.findall(r"<td[^>]*>(.*?)</td>", row, flags=re.S)


def _sort_values(row: str) -> list[str | None]:
    """Each cell's data-sort attribute (the raw number behind a formatted one), None where it has none."""
    return [m.group(1) if (m := re.search(r'data-sort="([^"]*)"', attrs)) else None
            for attrs in re.findall(r"<td([^>]*)>", row)]


def _body(page: str) -> str:
    """The page without its head (the inlined plotly.js holds every word there is)."""
    return page.split("</head>", 1)[1]


# ---- the run page ---------------------------------------------------------------------------------

def test_generation_run_page_has_its_sections(gen_run):
    page = Path(write_report(str(gen_run))).read_text()
    heads = _headings(page)
    for h in ("Overview", "Did it learn?", "Data", "Validation results (best checkpoint)", "Best validation examples",
              "Worst validation examples", "Configuration and environment"):
        assert h in heads, h
    for title in ("Loss per optimizer step", "Validation perplexity per evaluation", "Validation text metrics per evaluation",
                  "Prompt and completion length, training rows", "Row length (prompt + completion) per split",
                  "Per-prompt scores on validation"):
        assert title in page, title
    assert "max_length = 24" in page and "max_new_tokens = 6" in page
    assert "generation (prompt -&gt; completion)" in page
    # nothing of the classification page
    for absent in ("Most confidently wrong", "Class balance", "confusion matrix", "majority-class", "could not be drawn"):
        assert absent not in _body(page), absent


def test_generation_run_page_escapes_the_data(gen_run):
    page = Path(write_report(str(gen_run))).read_text()
    assert SCRIPT not in page and "alert(1)" in page
    assert html.escape(SCRIPT) in page  # shown as text, in the examples table
    # the only script elements are the page's own: plotly.js, one per chart, and the table sorting
    n_charts = page.count('data-chart="chart-')
    assert page.count("<script") == n_charts + 2


def test_generation_data_section_counts_the_cut_rows(gen_run):
    rec = json.loads((gen_run / "lmtune_run.json").read_text())
    assert rec["task"] == "generation" and rec["data"]["cut"]["val"]["count"] >= 1
    page = Path(write_report(str(gen_run))).read_text()
    data = _table_after(page, "Data")
    val_row = next(r for r in data.split("<tr>") if r.startswith("<td>val</td>"))
    n_val = rec["data"]["rows"]["val"]
    cut = rec["data"]["cut"]["val"]["count"]
    assert f"{cut} ({100 * cut / n_val:.1f}%)" in val_row
    assert ", ".join(str(x) for x in rec["data"]["cut"]["val"]["lines"]) in val_row  # lines of the data file


def test_generation_summary_speaks_generation(gen_run):
    write_report(str(gen_run))
    summary = (gen_run / "summary.md").read_text()
    rec = json.loads((gen_run / "lmtune_run.json").read_text())
    assert "perplexity" in summary and "- perplexity: " in summary
    assert "rows cut to max_length 24 tokens" in summary
    assert f"val {rec['data']['cut']['val']['count']} of {rec['data']['rows']['val']}" in summary
    assert "- best val_loss (selection metric, lower is better):" in summary
    assert "validation generations:" in summary
    for absent in ("class", "validation errors", "did it learn", "majority"):
        assert absent not in summary.lower(), absent


def test_examples_best_first_and_worst_first(gen_run, tmp_path):
    """With varied scores: the best table is ordered high to low, the worst low to high, none shown twice."""
    run = tmp_path / "run"
    shutil.copytree(gen_run, run)
    rows = []
    for i in range(30):
        score = float((i * 37) % 101)
        rows.append({"line": i + 2, "prompt": f"p{i} {SCRIPT}" if i == 5 else f"p{i}", "references": [f"ref {i}", "alt"],
                     "prediction": f"pred {i}" if i % 4 else "", "exact_match": 100.0 if score == 100 else 0.0,
                     "token_f1": score, "rougeL": score})
    (run / "val_predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    page = Path(write_report(str(run))).read_text()
    scores = sorted((r["rougeL"] for r in rows), reverse=True)

    def shown(heading: str) -> list[float]:
        table = _table_after(page, heading)
        return [float(_sort_values(r)[5]) for r in table.split("<tr>")[2:]]

    best, worst = shown("Best validation examples"), shown("Worst validation examples")
    assert best == scores[:10] and worst == scores[::-1][:10]
    assert SCRIPT not in page and "<em>(empty)</em>" in page and "[1] ref" in page
    assert "30 scored" in page


def test_odd_generation_values_become_notes(gen_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(gen_run, run)
    rec = json.loads((run / "lmtune_run.json").read_text())
    rec["data"]["cut"] = {"train": {"count": "many", "lines": "1,2"}, "val": 3}
    rec["data"]["token_lengths"] = {"train_prompt": ["x", 3], "train_completion": "abc", "val": [4, None]}
    rec["generation"] = {"max_new_tokens": "six"}
    rec["history"][0]["perplexity"] = "high"
    rec["best"]["rougeL"] = [1]
    (run / "lmtune_run.json").write_text(json.dumps(rec))
    (run / "val_predictions.jsonl").write_text('{"line": "a", "prompt": 5, "references": "one", "rougeL": "x"}\n[1]\n')
    page = Path(write_report(str(run))).read_text()
    assert "Validation examples" in page  # no usable score: the rows in file order, not best/worst
    assert "&#x27;generation.max_new_tokens&#x27;" not in page  # not a checked field: used only where it is a number
    assert (run / "summary.md").read_text().startswith("# lmtune run: run")


# ---- the study page -------------------------------------------------------------------------------

def _leaderboard(page: str) -> list[tuple[int, int, float]]:
    """(rank, trial, value) of the complete trials, in the order the leaderboard lists them."""
    out = []
    for r in _table_after(page, "Leaderboard").split("<tr")[2:]:
        cells = _cells(r)
        if "complete" in cells[2]:
            out.append((int(cells[0]), int(cells[1]), float(_sort_values(r)[3])))
    return out


def test_study_minimising_val_loss_reads_lower_is_better(gen_study):
    import optuna

    meta = json.loads((gen_study / "study.json").read_text())
    assert meta["metric"] == "val_loss" and meta["direction"] == "minimize" and meta["task"] == "generation"
    page = Path(write_report(str(gen_study))).read_text()
    study = optuna.load_study(study_name=meta["study_name"], storage=meta["storage"])
    values = {t.number: t.value for t in study.trials if t.state.name == "COMPLETE"}
    board = _leaderboard(page)
    assert [v for _, _, v in board] == sorted(values.values())  # lowest first
    assert board[0][1] == min(values, key=values.get) == study.best_trial.number
    assert "minimise val_loss (lower is better)" in page
    assert "validation loss (nats, lower is better)" in page  # chart axes
    assert "only ever moves down" in page
    summary = (gen_study / "summary.md").read_text()
    assert "- objective: minimise val_loss (lower is better); task generation" in summary
    assert f"best: trial #{study.best_trial.number}, val_loss {study.best_value:.4f}" in summary
    # the embedded best-trial report (and best/report.html) is the generation page
    assert "Validation perplexity per evaluation" in page and "Best validation examples" in page
    assert "Most confidently wrong" not in page and "accuracy" not in _body(page).split('id="best-trial-run-report"')[0]
    best_page = (gen_study / meta["best_dir"] / "report.html").read_text()
    assert "Worst validation examples" in best_page and SCRIPT not in best_page and SCRIPT not in page


def test_study_direction_comes_from_the_storage(gen_study, tmp_path):
    """Without metric/direction in study.json they come from the storage; a study.json that contradicts the
    storage is noted and the storage wins (it is the direction the trials were optimised in)."""
    study = tmp_path / "study"
    shutil.copytree(gen_study, study)
    meta = json.loads((study / "study.json").read_text())
    meta["storage"] = f"sqlite:///{study / 'study.db'}"
    for key in ("metric", "direction"):
        meta.pop(key)
    (study / "study.json").write_text(json.dumps(meta))
    page = Path(write_report(str(study))).read_text()
    assert "minimise val_loss (lower is better)" in page
    values = [v for _, _, v in _leaderboard(page)]
    assert values == sorted(values)

    meta["direction"] = "maximize"
    (study / "study.json").write_text(json.dumps(meta))
    page = Path(write_report(str(study))).read_text()
    assert "disagrees with the study storage" in page and "minimise val_loss" in page
    values = [v for _, _, v in _leaderboard(page)]
    assert values == sorted(values)
