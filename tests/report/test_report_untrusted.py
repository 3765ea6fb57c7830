"""`lmtune report` treats every file in the folder as untrusted input.

Names read from study.json (best_dir, confirmation) are followed only inside the study folder; values of the
wrong JSON type are one-line errors or notes on the page, never tracebacks; nothing is read or written outside.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
from pathlib import Path

import pytest

from lmtune.errors import LmtuneError
from lmtune.report import write_report

from _report_fixtures import make_run, make_study


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (links not followed) with a hash of its bytes: the folder's fingerprint."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir():
            out[str(p.relative_to(folder)) + "/"] = ""
    return out


def _set_meta(study: Path, **fields) -> None:
    meta = json.loads((study / "study.json").read_text())
    meta.update(fields)
    (study / "study.json").write_text(json.dumps(meta))


@pytest.fixture
def outside(tmp_path) -> Path:
    """A folder beside the study that looks like a run folder, with a confirm.json: bait for a hostile study.json."""
    folder = make_run(tmp_path / "outside", with_eval=False, seed=5)
    (folder / "confirm.json").write_text(json.dumps({"metric": "accuracy", "seeds": [0, 1], "results": [
        {"trial": 0, "values": [0.123456, 0.123457], "mean": 0.1234565, "std": 0.0}]}))
    return folder


def _problems(page: str) -> list[str]:
    return re.findall(r'<div class="note warn">(.*?)</div>', page, re.S)


@pytest.mark.parametrize("best_dir", ["../outside", "ABSOLUTE", 5, ["best"], {"dir": "best"}, "best/../../outside"])
def test_best_dir_outside_the_study_is_ignored(tmp_path, outside, best_dir):
    study = make_study(tmp_path / "study", n_trials=4, best_run=False)
    _set_meta(study, best_dir=str(outside) if best_dir == "ABSOLUTE" else best_dir)
    before = _tree(tmp_path / "outside")
    out = write_report(str(study))
    assert _tree(tmp_path / "outside") == before  # nothing written outside: no report.html, no summary.md
    assert not (outside / "report.html").exists()
    page = Path(out).read_text()
    notes = [n for n in _problems(page) if "best_dir" in n]
    assert len(notes) == 1 and "\n" not in notes[0] and "ignored" in notes[0], notes
    if isinstance(best_dir, str):
        assert "outside" in notes[0] or "absolute" in notes[0]
    else:
        assert "should be a folder or file name (a string)" in notes[0]
    assert "Best trial: run report" in page and "Class balance per split" not in page  # the outside run is not read
    assert "- problem: study.json 'best_dir'" in (study / "summary.md").read_text()


def test_best_dir_symlink_out_of_the_study_is_ignored(tmp_path, outside):
    study = make_study(tmp_path / "study", n_trials=4, best_run=False)
    (study / "best").symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    page = Path(write_report(str(study))).read_text()
    assert _tree(outside) == before and not (outside / "report.html").exists()
    assert any("best_dir" in n and "points outside the folder" in n for n in _problems(page))


def test_confirmation_outside_the_study_is_not_read(tmp_path, outside):
    study = make_study(tmp_path / "study", n_trials=4, confirm=False, best_run=False)
    for name in ("../outside/confirm.json", str(outside / "confirm.json"), 3.5):
        _set_meta(study, confirmation=name)
        page = Path(write_report(str(study))).read_text()
        assert "0.1235" not in page and "No seed confirmation results" in page
        notes = [n for n in _problems(page) if "confirmation" in n]
        assert len(notes) == 1 and "ignored" in notes[0], notes
    (study / "confirm.json").symlink_to(outside / "confirm.json")
    _set_meta(study, confirmation="confirm.json")
    page = Path(write_report(str(study))).read_text()
    assert "0.1235" not in page and any("confirm" in n and "outside" in n for n in _problems(page))


def test_a_confirmation_name_inside_the_study_is_still_followed(tmp_path):
    study = make_study(tmp_path / "study", n_trials=5)
    (study / "extra").mkdir()
    (study / "confirm.json").rename(study / "extra" / "seeds.json")
    _set_meta(study, confirmation="extra/seeds.json", best_dir="./best")
    page = Path(write_report(str(study))).read_text()
    assert "Seed confirmation: accuracy over 3 seeds" in page
    assert (study / "best" / "report.html").exists() and 'href="best/report.html"' in page
    assert not _problems(page) or all("best_dir" not in n and "confirmation" not in n for n in _problems(page))


@pytest.mark.parametrize("fields, needle", [
    ({"storage": 5}, "'storage' should be a URL"),
    ({"storage": ["sqlite:///x.db"]}, "'storage' should be a URL"),
    ({"study_name": {"a": 1}}, "'study_name' should be a string"),
])
def test_wrong_types_of_required_fields_are_one_line_errors(tmp_path, fields, needle):
    study = make_study(tmp_path / "study", n_trials=2, confirm=False, best_run=False)
    _set_meta(study, **fields)
    with pytest.raises(LmtuneError) as err:
        write_report(str(study))
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not (study / "report.html").exists()


@pytest.mark.parametrize("content", ["[1, 2]", "42", '"text"', "null"])
def test_study_json_that_is_not_an_object(tmp_path, content):
    study = tmp_path / "s"
    study.mkdir()
    (study / "study.json").write_text(content)
    with pytest.raises(LmtuneError) as err:
        write_report(str(study))
    assert "\n" not in str(err.value)


def test_wrong_types_of_optional_fields_are_noted(tmp_path):
    study = make_study(tmp_path / "study", n_trials=4)
    _set_meta(study, metric=["accuracy"], direction=7)
    (study / "confirm.json").write_text(json.dumps({"metric": 1, "seeds": "0,1", "results": [
        5, {"trial": "x", "values": [0.5]}, {"trial": 1, "values": 0.5}, {"trial": 2, "values": [0.5, 0.6], "params": [1]}]}))
    page = Path(write_report(str(study))).read_text()
    notes = _problems(page)
    assert any("&#x27;metric&#x27;" in n and "not valid" in n for n in notes)
    assert any("&#x27;direction&#x27;" in n for n in notes)
    assert any("confirm.json" in n and "wrong type" in n for n in notes)
    assert "No seed confirmation results" in page
    (study / "confirm.json").write_text(json.dumps([1, 2, 3]))
    page = Path(write_report(str(study))).read_text()
    assert any("confirm.json should hold a JSON object" in n for n in _problems(page))


def test_wrong_types_in_the_best_run_record_are_noted(tmp_path):
    study = make_study(tmp_path / "study", n_trials=4)
    rec_path = study / "best" / "lmtune_run.json"
    rec = json.loads(rec_path.read_text())
    rec.update(history=5, data=[1, 2], best="x", labels="abc", timing=[], model=3, train_log=[1, {"step": 1}])
    rec["config"]["train"] = "lr=3"
    rec_path.write_text(json.dumps(rec))
    page = Path(write_report(str(study))).read_text()
    notes = _problems(page)
    for key in ("history", "data", "best", "labels", "timing", "model", "config.train"):
        assert any(f"&#x27;{key}&#x27; should be" in n for n in notes), key
    assert any("train_log" in n and "not objects" in n for n in notes)
    assert (study / "best" / "report.html").exists()


def test_a_run_record_full_of_wrong_types_gives_a_page(tmp_path):
    run = make_run(tmp_path / "r")
    rec = json.loads((run / "lmtune_run.json").read_text())
    rec["history"] = [{"step": "a", "epoch": [1], "accuracy": {"x": 1}, "val_loss": "nan"}]
    rec["best"] = {"confusion_matrix": [[1, "a"], 3], "per_class": {"neg": 5}, "accuracy": "high", "step": []}
    rec["data"] = {"rows": {"train": "many"}, "class_counts": {"train": [1, 2]}, "token_lengths": {"train": "x"},
                   "truncated": 5, "warnings": "w"}
    rec["steps"] = {"done": "x"}
    (run / "lmtune_run.json").write_text(json.dumps(rec))
    (run / "val_predictions.jsonl").write_text('[1]\n"x"\n{"label": ["a"], "predicted": 1, "confidence": "hi"}\n')
    (run / "eval").mkdir(exist_ok=True)
    (run / "eval" / "odd.json").write_text("[1, 2]")
    out = write_report(str(run))
    page = Path(out).read_text()
    assert "Configuration and environment" in page
    summary = (run / "summary.md").read_text()
    assert summary.startswith("# lmtune run: r")
    assert any("odd.json should hold a JSON object" in n for n in _problems(page))
    assert any("not JSON objects" in n for n in _problems(page))


def test_run_files_linking_outside_are_not_read(tmp_path, outside):
    run = make_run(tmp_path / "r", with_eval=False)
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"accuracy": 0.987654, "data_file": "SECRET-DATA", "n": 3}))
    (run / "eval").mkdir()
    (run / "eval" / "leak.json").symlink_to(secret)
    page = Path(write_report(str(run))).read_text()
    assert "SECRET-DATA" not in page and "0.9877" not in page
    assert any("eval/leak.json links outside the folder" in n for n in _problems(page))


def test_storage_naming_another_sqlite_file_is_never_written(tmp_path):
    """Optuna would add its tables to any SQLite file `storage` names; the report opens it read-only."""
    other = tmp_path / "elsewhere" / "app.db"
    other.parent.mkdir()
    con = sqlite3.connect(other)
    con.execute("create table users (name text)")
    con.commit()
    con.close()
    before = _tree(other.parent)
    study = make_study(tmp_path / "study", n_trials=2, confirm=False, best_run=False)
    _set_meta(study, storage=f"sqlite:///{other}")
    with pytest.raises(LmtuneError) as err:
        write_report(str(study))
    assert "\n" not in str(err.value) and "cannot read study storage" in str(err.value)
    assert _tree(other.parent) == before


def test_study_database_is_opened_read_only(tmp_path):
    study = make_study(tmp_path / "study", n_trials=4)
    db = study / "study.db"
    digest = hashlib.sha256(db.read_bytes()).hexdigest()
    write_report(str(study))
    assert hashlib.sha256(db.read_bytes()).hexdigest() == digest


def test_report_html_symlink_is_replaced_not_followed(tmp_path, outside):
    study = make_study(tmp_path / "study", n_trials=3, confirm=False)
    target = tmp_path / "victim.html"
    target.write_text("keep me")
    (study / "report.html").symlink_to(target)
    (study / "best" / "report.html").symlink_to(target)
    write_report(str(study))
    assert target.read_text() == "keep me"
    assert not (study / "report.html").is_symlink() and not (study / "best" / "report.html").is_symlink()


def test_cli_one_line_error_for_a_hostile_study_json(tmp_path, capsys):
    from lmtune.cli import main

    study = make_study(tmp_path / "study", n_trials=2, confirm=False, best_run=False)
    _set_meta(study, storage={"url": "sqlite:///x.db"})
    assert main(["report", str(study)]) == 2
    err = capsys.readouterr().err.strip()
    assert "error:" in err and "Traceback" not in err and len(err.splitlines()) == 1
    _set_meta(study, storage=f"sqlite:///{(study / 'study.db').resolve()}", best_dir="../../../../etc")
    assert main(["report", str(study)]) == 0
    assert "problem: study.json 'best_dir'" in capsys.readouterr().out


def test_leaderboard_gives_the_reason_of_every_pruned_and_failed_trial(tmp_path):
    import optuna
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState, create_trial

    study_dir = make_study(tmp_path / "study", n_trials=6, confirm=False, best_run=False)
    study = optuna.load_study(study_name="sst-small", storage=f"sqlite:///{study_dir / 'study.db'}")
    d = {"learning_rate": FloatDistribution(1e-5, 1e-3, log=True)}
    reasons = {
        "pruned": (TrialState.PRUNED, {"prune_reason": "accuracy 0.5012 at epoch 1.00"}, {1: 0.5}),
        "diverged": (TrialState.PRUNED, {"fail_reason": "diverged: training loss is nan at step 7; lower --lr"}, {1: 0.4}),
        "failed": (TrialState.FAIL, {"fail_reason": "ModelError: cannot load weights\nsecond line"}, {}),
    }
    for state, attrs, inter in reasons.values():
        study.add_trial(create_trial(state=state, params={"learning_rate": 1e-4}, distributions=d, user_attrs=attrs,
                                     intermediate_values=inter))
    page = Path(write_report(str(study_dir))).read_text()
    leader = page[page.index('id="leaderboard"'):page.index('id="optimisation-history"')]
    assert "pruned at step 1 (accuracy 0.5000): accuracy 0.5012 at epoch 1.00" in leader
    assert "pruned at step 1 (accuracy 0.4000): diverged: training loss is nan at step 7; lower --lr" in leader
    assert "ModelError: cannot load weights second line" in leader
    # the fixture's pruned trials without a recorded reason, and its failed trial, keep theirs
    assert "DivergenceError: validation loss is nan" in leader and "pruned at step" in leader


def test_fifo_named_confirm_json_does_not_block(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    study = make_study(tmp_path / "study", n_trials=3, confirm=False, best_run=False)
    os.mkfifo(study / "confirm.json")
    page = Path(write_report(str(study))).read_text()
    assert any("confirm.json is not a regular file" in n for n in _problems(page))
