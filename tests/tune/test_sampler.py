"""The samplers behind --sampler: which Optuna sampler each name builds, and a study run on the GP sampler."""

from __future__ import annotations

import json

import optuna
import pytest

from lmtune.cli import main
from lmtune.config import TuneConfig
from lmtune.tune.study import _sampler
from tests.tune.conftest import base_args, load, snapshot


@pytest.mark.parametrize("name, kind", [("tpe", optuna.samplers.TPESampler), ("gp", optuna.samplers.GPSampler),
                                        ("random", optuna.samplers.RandomSampler)])
def test_each_name_builds_its_sampler_seeded_per_trial(name, kind):
    tc = TuneConfig(sampler=name, sampler_seed=3)
    assert isinstance(_sampler(tc, 4), kind)
    # two trials of one study get different random draws; the same trial number the same draw
    space = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}

    def first_draw(trial_number):
        study = optuna.create_study(sampler=_sampler(tc, 4, trial_number))
        return study.ask(space).params["x"]

    assert first_draw(5) == first_draw(5) != first_draw(6)


def test_gp_sampler_models_the_complete_trials_after_its_start_up(tune_data, tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "gp"
    code = main(base_args(tune_data, tiny_llama, out, "--lr", "1e-4..3e-3:log", "--warmup-ratio", "0..0.1",
                          "--n-trials", "5", "--pruner", "none", "--sampler", "gp", "--sampler-seed", "7"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    log = captured.out + captured.err
    assert "sampler gp: the first 3 complete trials are its random start-up (a third of 5 trials, 3 to 10), " \
           "then it models the complete ones" in log
    meta = json.loads((out / "study.json").read_text())
    assert meta["sampler"] == "gp" and meta["startup_trials"] == 3 and meta["tpe_startup_trials"] is None
    trials = sorted(load(out).get_trials(), key=lambda t: t.number)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 5
    # Trial 0 is the defaults, 1-2 the random start-up (with trial 0, three complete trials); 3 and 4 were
    # proposed by the Gaussian process, which records its proposal on the trial.
    from_gp = [t.number for t in trials if any(k.startswith("gp:relative_params") for k in t.system_attrs)]
    assert from_gp == [3, 4]
    assert all(1e-4 <= t.params["learning_rate"] <= 3e-3 and 0 <= t.params["warmup_ratio"] <= 0.1 for t in trials)


def test_gp_same_seed_same_study(tune_data, tiny_llama, tmp_path, monkeypatch):
    """ENGINEERING.md §3 row 6 for the GP sampler: the same seed twice gives the same trials and values."""
    snaps = []
    for name in ("a", "b"):
        monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / f"cache-{name}"))
        out = tmp_path / name
        assert main(base_args(tune_data, tiny_llama, out, "--lr", "1e-4..3e-3:log", "--n-trials", "4",
                              "--pruner", "none", "--sampler", "gp", "--sampler-seed", "7")) == 0
        snaps.append(snapshot(load(out)))
    assert snaps[0] == snaps[1]
