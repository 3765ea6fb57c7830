"""write_report on hand-written run and study folders: files, offline-ness, summary, errors, CLI."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from lmtune.errors import LmtuneError
from lmtune.report import write_report

from _report_fixtures import make_run, make_study

EXTERNAL = re.compile(r"<(?:script|link|img|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", re.I)


def _assert_offline(page: str) -> None:
    assert not EXTERNAL.search(page), EXTERNAL.search(page).group(0)
    assert "@import" not in page and "url(http" not in page
    assert page.count("<script>") >= 2  # plotly.js inline, then figures and the sort script
    assert page.count("Plotly.newPlot") >= 1


def test_run_report(run_dir: Path, caplog):
    with caplog.at_level(logging.INFO, logger="lmtune"):
        out = write_report(str(run_dir))
    assert out == str(run_dir / "report.html")
    page = Path(out).read_text()
    _assert_offline(page)
    assert page.count("window.PlotlyConfig") <= 1 and page.count("plotly.js v") == 1  # plotly.js inlined once
    for needle in ("Loss per optimizer step", "Validation metrics per evaluation", "Class balance per split",
                   "max_length = 128", "Validation confusion matrix", "Most confidently wrong",
                   "Confusion matrix on test.tsv", "majority-class accuracy"):
        assert needle in page, needle
    # user text is escaped in tables, never live markup
    assert "&lt;b&gt;not bold&lt;/b&gt; &lt;/script&gt;" in page
    summary = (run_dir / "summary.md").read_text()
    assert summary.startswith("# lmtune run: run")
    assert "best checkpoint: step" in summary and "accuracy 0.8" in summary
    assert "test.tsv: accuracy 0.8100" in summary
    assert "did it learn: learned" in summary
    assert summary.strip() in caplog.text  # the summary goes to the log, nothing is printed
    assert (run_dir / "report.html").stat().st_mode & 0o044  # readable by others: reports get shared


def test_run_report_without_optional_files(tmp_path):
    run = make_run(tmp_path / "r", with_eval=False)
    (run / "val_predictions.jsonl").unlink()
    rec = json.loads((run / "lmtune_run.json").read_text())
    for key in ("train_log", "best", "timing"):
        rec.pop(key)
    rec["data"].pop("token_lengths")
    (run / "lmtune_run.json").write_text(json.dumps(rec))
    page = Path(write_report(str(run))).read_text()
    assert "val_predictions.jsonl is missing" in page
    assert "Loss per optimizer step" in page  # from the history's train_loss and val_loss


def test_output_option_writes_summary_beside_it(run_dir: Path, tmp_path):
    out = write_report(str(run_dir), str(tmp_path / "elsewhere" / "r.html"))
    assert Path(out).exists() and (tmp_path / "elsewhere" / "summary.md").exists()


def test_study_report(study_dir: Path):
    out = write_report(str(study_dir))
    page = Path(out).read_text()
    _assert_offline(page)
    for needle in ("Leaderboard", "Optimisation history", "every trial", "Parallel coordinates", "Importance for", "finished so far",
                   "Learning rate x batch size", "against the cost of a trial", "Seed confirmation",
                   "Best trial: run report", 'href="best/report.html"', "optuna-dashboard sqlite:///",
                   "DivergenceError: validation loss is nan", "pruned at step"):
        assert needle in page, needle
    assert (study_dir / "best" / "report.html").exists()
    summary = (study_dir / "summary.md").read_text()
    assert summary.startswith("# lmtune study: sst-small")
    assert "trials: 8 run (5 complete, 2 pruned, 1 fail, 0 running)" in summary
    assert re.search(r"best: trial #\d+, accuracy 0\.\d{4} with model=", summary)
    assert "confirmed: trial #" in summary and "over 3 seeds" in summary
    assert "dashboard: optuna-dashboard sqlite:///" in summary


def test_study_leaderboard_sorted_best_first(study_dir: Path):
    import optuna

    page = Path(write_report(str(study_dir))).read_text()
    study = optuna.load_study(study_name="sst-small", storage=f"sqlite:///{study_dir / 'study.db'}")
    leader = page[page.index('id="leaderboard"'):page.index('id="optimisation-history"')]
    first_row = re.search(r'<tr class="highlight">.*?</tr>', leader, re.S).group(0)
    assert f">{study.best_trial.value:.4f}<" in first_row
    assert leader.index('class="highlight"') < leader.index(">pruned<")


def test_study_still_running_without_confirmation_or_best(tmp_path):
    sd = make_study(tmp_path / "s", n_trials=3, confirm=False, best_run=False, running=True)
    page = Path(write_report(str(sd))).read_text()
    assert "still running" in page
    assert "No seed confirmation results" in page
    assert "not there yet" in page


@pytest.mark.parametrize("n", [0, 1])
def test_study_with_too_few_trials(tmp_path, n):
    sd = make_study(tmp_path / "s", n_trials=n, confirm=False, best_run=False)
    page = Path(write_report(str(sd))).read_text()
    assert "Parameter importances need at least 3 complete trials" in page
    assert "Parallel coordinates need at least 2 complete trials" in page
    summary = (sd / "summary.md").read_text()
    assert f"trials: {n}" in summary


def test_moved_study_folder_finds_its_database(study_dir: Path, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(study_dir, moved)
    shutil.rmtree(study_dir)
    assert Path(write_report(str(moved))).exists()


@pytest.mark.parametrize("case", ["empty", "missing", "bad-json", "no-db", "wrong-name"])
def test_error_for_a_path_that_is_neither(tmp_path, case):
    target = tmp_path / "x"
    if case != "missing":
        target.mkdir()
    if case == "bad-json":
        (target / "lmtune_run.json").write_text("{not json")
    if case == "no-db":
        (target / "study.json").write_text(json.dumps({"study_name": "s", "storage": f"sqlite:///{target / 'nope.db'}"}))
    if case == "wrong-name":
        make_study(target, n_trials=1, confirm=False, best_run=False)
        meta = json.loads((target / "study.json").read_text())
        (target / "study.json").write_text(json.dumps(meta | {"study_name": "other"}))
    with pytest.raises(LmtuneError) as err:
        write_report(str(target))
    assert "\n" not in str(err.value)
    assert not (target / "report.html").exists()
    if case == "no-db":
        assert not (target / "nope.db").exists()  # never creates an empty study database


def test_cli_subcommand(run_dir: Path, capsys):
    from lmtune.cli import main

    assert main(["report", str(run_dir), "--output", str(run_dir / "r2.html")]) == 0
    assert (run_dir / "r2.html").exists()
    assert "# lmtune run: run" in capsys.readouterr().out
    assert main(["report", str(run_dir / "nope")]) == 2
    assert "error:" in capsys.readouterr().err


def test_minimised_study_with_dynamic_space_and_no_user_attrs(tmp_path):
    """A study lmtune did not annotate: unknown params, a conditional param, no user attributes, val_loss."""
    import optuna

    folder = tmp_path / "m"
    folder.mkdir()
    storage = f"sqlite:///{folder / 'study.db'}"
    study = optuna.create_study(study_name="m", storage=storage, direction="minimize")

    def objective(trial):
        lr = trial.suggest_float("lr_other", 1e-5, 1e-2, log=True)
        if trial.suggest_categorical("optim", ["adam", "sgd"]) == "sgd":
            trial.suggest_int("momentum_pct", 0, 99)
        for step in range(1, 4):
            trial.report(abs(lr - 1e-3) * 100 + 1 / step, step)
        return abs(lr - 1e-3) * 100 + 0.3

    study.optimize(objective, n_trials=6)
    (folder / "study.json").write_text(json.dumps({"study_name": "m", "storage": storage, "metric": "val_loss",
                                                   "direction": "minimize"}))
    page = Path(write_report(str(folder))).read_text()
    assert "minimise val_loss" in page
    assert "Learning rate x batch size: the study does not search both" in page
    assert "momentum_pct" in page
    assert f"best: trial #{study.best_trial.number}, val_loss {study.best_value:.4f}" in (folder / "summary.md").read_text()


def test_size_view_draws_the_frontier_the_confirmed_means_and_the_verdict(study_dir: Path):
    """Issue 10: metric against cost per size, the quality-for-time frontier, and which size wins for the budget
    with its confirmed mean and standard deviation (as the study's answer.json says it)."""
    import optuna

    verdict = ("smollm2-135m and tiny-gpt2 are within seed noise of each other (0.0100 apart, noise 0.0150): "
               "tiny-gpt2 wins for the time, at 12 s per trial.")
    sizes = [{"model": "smollm2-135m", "best_value": 0.87, "best_trial": 0, "confirmed_mean": 0.8512,
              "confirmed_std": 0.0084, "seconds_per_trial": 300.0, "trials_in_budget": 6},
             {"model": "tiny-gpt2", "best_value": 0.7, "best_trial": 1, "confirmed_mean": None,
              "seconds_per_trial": 12.0, "trials_in_budget": 150}]
    (study_dir / "answer.json").write_text(json.dumps({"metric": "accuracy", "importances": [], "parameters": {},
                                                       "sizes": sizes, "statements": [verdict, "another statement"]}))
    page = Path(write_report(str(study_dir))).read_text()
    section = page[page.index('id="model-size--metric-and-cost"'):page.index('id="how-good-was-the-plan"')]
    assert "frontier (best at this cost)" in section and "confirmed mean \\u00b1 std (3 seeds)" in section  # JSON-escaped
    assert "smollm2-135m: best 0.8700 (trial 0), confirmed 0.8512 ± 0.0084, 300 s per trial, ~6 trials in the budget" in section
    assert "tiny-gpt2: best 0.7000 (trial 1), not confirmed on other seeds" in section
    assert verdict in section and "another statement" not in section
    # The frontier: the best value of any trial at most that long, rising to the study's best.
    start = section.index('"name":"frontier (best at this cost)"')
    ys = json.loads("[" + re.search(r'"y":\[([^\]]*)\]', section[start:]).group(1) + "]")
    study = optuna.load_study(study_name="sst-small", storage=f"sqlite:///{study_dir / 'study.db'}")
    assert ys == sorted(ys) and ys[-1] == pytest.approx(study.best_value)


def test_a_finished_studys_importances_are_drawn_once_from_its_answer(study_dir: Path):
    """One computation: with answer.json the section points to the answer's chart, and the page has that one chart;
    without it (a running study) the same computation runs on the trials so far (test_study_report)."""
    import optuna

    from lmtune.tune.answer import compute_answer

    storage = f"sqlite:///{(study_dir / 'study.db').resolve()}"
    study = optuna.load_study(study_name="sst-small", storage=storage)
    answer = compute_answer(study)
    assert answer["importances"]
    (study_dir / "answer.json").write_text(json.dumps(answer))
    page = Path(write_report(str(study_dir))).read_text()
    assert "importances.json holds" in page and "finished so far" not in page
    assert page.count("with its 10th..90th percentile over bootstrap resamples") == 1
