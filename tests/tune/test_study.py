"""A real small study through the CLI: pruning, the best model, outputs, --show, resume, budget, caches."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import pytest

from lmtune.cli import main
from tests.tune.conftest import base_args, load, snapshot

N = 6


@pytest.fixture(scope="module")
def finished_study(tune_data, tiny_llama, tmp_path_factory):
    """Six trials, median pruning on; an absurdly low learning rate (1e-8: the model stays at chance) is
    certain to be pruned once two trials have completed. Sampler seed 1 draws 3e-3, 3e-3, 1e-8 for the
    first three (random start-up) trials, so a 1e-8 trial meets a median it cannot reach."""
    out = tmp_path_factory.mktemp("study") / "s"
    cache = out.parent / "cache"
    mp = pytest.MonkeyPatch()
    mp.setenv("LMTUNE_CACHE", str(cache))
    args = base_args(tune_data, tiny_llama, out, "--lr", "3e-3,1e-8", "--n-trials", str(N), "--pruner", "median",
                     "--weight-decay", "0.01", "--sampler-seed", "1")
    try:
        code = main(args)
    finally:
        mp.undo()
    return {"out": out, "cache": cache, "args": args, "code": code}


def test_small_study_prunes_and_finishes_exactly_n(finished_study):
    assert finished_study["code"] == 0
    study = load(finished_study["out"])
    states = [t.state.name for t in study.get_trials()]
    assert states.count("COMPLETE") + states.count("PRUNED") == N
    assert states.count("PRUNED") >= 1, states
    assert "RUNNING" not in states and "WAITING" not in states
    pruned = [t for t in study.get_trials() if t.state.name == "PRUNED"]
    assert any(t.params["learning_rate"] == 1e-8 for t in pruned)
    for t in pruned:
        assert t.user_attrs.get("prune_reason"), "a pruned trial says why"
        # never judged on its first evaluation (median pruner warm-up), stopped before the last
        assert min(t.intermediate_values) == 1 and 2 <= max(t.intermediate_values) < 4
    for t in study.get_trials(states=[__import__("optuna").trial.TrialState.COMPLETE]):
        # every evaluation reported: 2 epochs x 2 evaluations per epoch
        assert sorted(t.intermediate_values) == [1, 2, 3, 4]
        assert t.user_attrs["micro_batch_size_used"] == 16 and t.user_attrs["history"]


def test_best_model_is_a_normal_transformers_folder(finished_study, tune_data, capsys):
    from transformers import AutoModelForSequenceClassification

    best = finished_study["out"] / "best"
    study = load(finished_study["out"])
    model = AutoModelForSequenceClassification.from_pretrained(best)
    assert model.config.num_labels == 2
    trial = json.loads((best / "trial.json").read_text())
    assert trial["trial"] == study.best_trial.number and trial["value"] == study.best_value
    assert main(["evaluate", str(best), "--data", tune_data["test"]]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert not (finished_study["out"] / "trials").exists() or not any((finished_study["out"] / "trials").iterdir())


def test_outputs_leaderboard_importances_study_json(finished_study):
    out = finished_study["out"]
    rows = list(csv.DictReader((out / "leaderboard.csv").open()))
    assert len(rows) == N and {r["state"] for r in rows} == {"COMPLETE", "PRUNED"}
    assert rows[0]["state"] == "COMPLETE" and float(rows[0]["accuracy"]) == load(out).best_value
    assert "learning_rate" in rows[0]
    # One computation: importances.json holds the answer's bootstrap medians, not a second fANOVA of its own.
    importances = json.loads((out / "importances.json").read_text())
    answer = json.loads((out / "answer.json").read_text())
    assert importances == {b["parameter"]: b["importance"] for b in answer["importances"]}
    meta = json.loads((out / "study.json").read_text())
    assert meta["n_trials"] == N and meta["metric"] == "accuracy" and meta["direction"] == "maximize"
    assert meta["space"]["learning_rate"] == "0.003,1e-08" and meta["storage"].startswith("sqlite:///")


def test_show_prints_the_state(finished_study, capsys):
    assert main(["tune", "--out", str(finished_study["out"]), "--show"]) == 0
    text = capsys.readouterr().out
    assert f"trials: " in text and "pruned" in text and "best: trial" in text
    assert text.count("COMPLETE") + text.count("PRUNED") == N


def test_rerun_after_completion_runs_no_new_trial(finished_study, tmp_path, monkeypatch):
    study = load(finished_study["out"])
    before = snapshot(study)
    monkeypatch.setenv("LMTUNE_CACHE", str(finished_study["cache"]))
    assert main(finished_study["args"]) == 0
    assert snapshot(load(finished_study["out"])) == before
    assert len(load(finished_study["out"]).get_trials()) == len(study.get_trials())


def test_tokenised_once_per_tokenizer_length_and_split(finished_study):
    files = sorted((finished_study["cache"] / "tokenized").glob("*"))
    # one tokenizer, one max length, two splits (train, val) -- whatever the number of trials
    assert len(files) == 2, files


def test_max_length_dimension_tokenises_once_per_length(tune_data, tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    args = base_args(tune_data, tiny_llama, tmp_path / "s", "--max-length", "16,32", "--lr", "3e-3", "--n-trials", "4",
                     "--pruner", "none", "--epochs", "1")
    assert main(args) == 0
    lengths = {t.params.get("max_length") for t in load(tmp_path / "s").get_trials()}
    files = list((tmp_path / "cache" / "tokenized").glob("*"))
    assert len(files) == 2 * len(lengths), (files, lengths)


def test_budget_stops_starting_trials(tune_data, tiny_llama, tmp_path):
    t0 = time.time()
    code = main(base_args(tune_data, tiny_llama, tmp_path / "s", "--lr", "1e-3..3e-3:log", "--budget", "15s",
                          "--n-trials", "100", "--pruner", "none"))
    wall = time.time() - t0
    assert code == 0
    study = load(tmp_path / "s")
    states = [t.state.name for t in study.get_trials()]
    assert 1 <= states.count("COMPLETE") < 100
    assert "RUNNING" not in states
    assert wall < 15 + 20, f"the budget of 15 s was overrun: {wall:.0f} s"
    assert (tmp_path / "s" / "best").is_dir() and (tmp_path / "s" / "leaderboard.csv").is_file()
