"""bench/tpe_replay.py: the replay of a search benchmark's TPE proposals is faithful, and says so when it is not."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from bench import tpe_replay
from bench.__main__ import main as bench_main

STORED = Path(__file__).resolve().parents[2] / "bench" / "results" / "search-e2e-seed0-median-of-one.json"


@pytest.fixture(scope="module")
def stored():
    return json.loads(STORED.read_text())


def test_lmtunes_sampler_reproduces_every_proposal_of_the_stored_e2e_search(stored):
    # The result file was written by lmtune's TPE (start-up 3, seed 0) during the benchmark; if the sampler or
    # its per-trial seeding changes, this stored search no longer describes the code and the test says so.
    rep = tpe_replay.replay(stored, "lmtune-tpe", draws=1, modes=("recorded",))
    assert rep["startup"] == 3 and rep["sampler_seed"] == 0
    assert [r["trial"] for r in rep["rows"]] == list(range(3, 13))
    assert rep["faithful"], [r for r in rep["rows"] if not r["replayed"]]
    # what the benchmark recorded: trials 6, 9, 10 and 11 at 1 epoch, after 2-epoch trials were pruned
    assert [r["trial"] for r in rep["rows"] if r["proposed_epochs"] == 1] == [6, 9, 10, 11]
    assert [r["pruned_before"] for r in rep["rows"]] == [0, 1, 2, 3, 3, 4, 5, 5, 5, 5]


def test_a_changed_trial_makes_the_replay_unfaithful_and_the_command_fail(stored, tmp_path, capsys):
    changed = copy.deepcopy(stored)
    run = next(r for r in changed["runs"] if r["who"] == "lmtune-tpe")
    run["trials"]["4"]["learning_rate"] *= 1.5  # 2.45e-5 -> 3.68e-5
    rep = tpe_replay.replay(changed, "lmtune-tpe", draws=1, modes=("recorded",))
    assert not rep["faithful"]
    # trials 3 and 4 saw no changed history: 3 still matches; 4 is the trial whose record was changed
    assert [r["replayed"] for r in rep["rows"]][:2] == [True, False]
    path = tmp_path / "changed.json"
    path.write_text(json.dumps(changed))
    assert bench_main(["tpe-replay", str(path), "--draws", "1", "--modes", "recorded"]) == 1
    assert "does NOT reproduce every recorded proposal" in capsys.readouterr().out


def test_each_mode_shows_the_sampler_the_history_it_names(stored):
    trials, dists, _, _, minimize = tpe_replay.load(stored, "lmtune-tpe")
    history = trials[:9]  # trials 0..8: 4 finished, 5 pruned
    assert sum(t.finished for t in history) == 4
    recorded = tpe_replay._study(history, dists, minimize, "recorded")
    assert [t.state.name for t in recorded.trials].count("PRUNED") == 5
    assert recorded.best_trial.number == 0 and recorded.best_value == pytest.approx(1.2087, abs=1e-4)
    hidden = tpe_replay._study(history, dists, minimize, "without-pruned")
    assert len(hidden.trials) == 4 and {t.state.name for t in hidden.trials} == {"COMPLETE"}
    shown = tpe_replay._study(history, dists, minimize, "pruned-as-finished")
    assert len(shown.trials) == 9 and {t.state.name for t in shown.trials} == {"COMPLETE"}
    # a pruned trial shown as finished is scored by its best evaluation (trial 3: 1.3456, 1.2460, 1.2151)
    assert shown.trials[3].value == pytest.approx(1.2151, abs=1e-4)


def test_the_table_and_json_are_written_where_asked(stored, tmp_path, capsys):
    out = tmp_path / "replay.md"
    assert bench_main(["tpe-replay", str(STORED), "--draws", "2", "--modes", "recorded,without-pruned",
                       "--out", str(out)]) == 0
    text = out.read_text()
    assert "reproduces every recorded proposal" in text
    assert "| 6 | 3 | 3 | 1 epoch | same |" in text
    numbers = json.loads(out.with_suffix(".json").read_text())
    assert set(numbers["rows"][0]["share_fewest_epochs"]) == {"recorded", "without-pruned"}
    assert all(0.0 <= r["share_fewest_epochs"]["recorded"] <= 1.0 for r in numbers["rows"])
    assert all(2e-5 <= r["median_learning_rate"]["without-pruned"] <= 5e-4 for r in numbers["rows"])
    assert capsys.readouterr().out == text


@pytest.mark.parametrize("args, message", [
    (["--modes", "recorded,bogus"], "--modes bogus: not one of"),
    (["--draws", "0"], "--draws 0: must be at least 1"),
])
def test_bad_flags_are_one_line_errors_with_exit_code_2(args, message, capsys):
    assert bench_main(["tpe-replay", str(STORED), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_an_unreadable_result_file_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert bench_main(["tpe-replay", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tpe-replay: {bad}:") and len(err.splitlines()) == 1


@pytest.mark.parametrize("contender, message", [
    ("lmtune-random", "--contender lmtune-random: only lmtune-tpe's proposals come from TPE alone"),
])
def test_a_contender_the_result_lacks_is_a_one_line_error(contender, message, capsys):
    assert bench_main(["tpe-replay", str(STORED), "--contender", contender]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tpe-replay: {STORED}: {message}"


def test_a_result_without_the_contender_is_a_one_line_error(stored, tmp_path, capsys):
    other = copy.deepcopy(stored)
    other["runs"] = [r for r in other["runs"] if r["who"] != "lmtune-tpe"]
    path = tmp_path / "no-tpe.json"
    path.write_text(json.dumps(other))
    assert bench_main(["tpe-replay", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (f"tpe-replay: {path}: --contender lmtune-tpe: no run of it in the "
                                               "result (runs: lmtune-random, trainer-optuna)")


def test_a_json_file_that_is_no_search_result_is_a_one_line_error(tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"benchmark": "throughput"}))
    assert bench_main(["tpe-replay", str(other)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"tpe-replay: {other}: not a search benchmark result (no 'runs')"


def test_a_recorded_value_outside_the_recorded_space_is_a_one_line_error(stored, tmp_path, capsys):
    changed = copy.deepcopy(stored)
    next(r for r in changed["runs"] if r["who"] == "lmtune-tpe")["trials"]["1"]["learning_rate"] = 0.01
    path = tmp_path / "outside.json"
    path.write_text(json.dumps(changed))
    assert bench_main(["tpe-replay", str(path), "--draws", "1", "--modes", "recorded"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"tpe-replay: {path}: The value 0.01 of parameter 'learning_rate'") and "\n" not in err
