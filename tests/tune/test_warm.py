"""--warm-start: a new study starts with the best configurations of a finished one, moved into its own space,
without the old scores entering the new study."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmtune.cli import main
from lmtune.config import RunConfig
from lmtune.report._study import _origin
from lmtune.tune.space import build_space
from lmtune.tune.warm import WARM_ATTR, SourceTrial, WarmSource, load_source, warm_configurations
from tests.tune.conftest import base_args, load, run


def _space(**declared):
    return build_space(declared, n_train_rows=500, params_m_of={"a": 100.0, "b": 300.0}, default_model="a",
                       default_method="full")


def test_values_are_moved_into_the_new_space():
    space = _space(model="a,b", learning_rate="1e-4..1e-3:log", global_batch_size="8,32", epochs="1..3")
    defaults = space.defaults(RunConfig(model=RunConfig().model.__class__(name="a")))
    moved = space.nearest({"model": "c", "learning_rate": 5e-3, "global_batch_size": 12, "epochs": 7,
                           "lora_rank": 16, "unknown": 1}, fallback=defaults)
    assert moved["model"] == "a"  # a size this search does not have: the default's
    assert moved["learning_rate"] == pytest.approx(1e-3)  # clipped to the top of the range
    assert moved["global_batch_size"] == 8  # the nearest choice on a log scale (12 is nearer 8 than 32)
    assert moved["epochs"] == 3
    assert moved["warmup_ratio"] == pytest.approx(defaults["warmup_ratio"])  # not in the source: the default's
    assert "lora_rank" not in moved and "unknown" not in moved  # full fine-tuning; not a dimension here


def test_the_first_distinct_configurations_are_taken_in_rank_order_and_repeats_dropped():
    space = _space(learning_rate="1e-4..1e-3:log", global_batch_size="8,16", epochs="1..2")
    defaults = {"learning_rate": 1e-4, "global_batch_size": 16, "epochs": 2, "warmup_ratio": 0.06, "weight_decay": 0.01}
    source = WarmSource(Path("elsewhere"), "accuracy", "classification", [
        SourceTrial(4, {"learning_rate": 3e-4, "global_batch_size": 8, "epochs": 2}, 0.80, True),
        SourceTrial(1, {"learning_rate": 2e-2, "global_batch_size": 8, "epochs": 2}, 0.90, False),
        SourceTrial(2, {"learning_rate": 5e-2, "global_batch_size": 8, "epochs": 2}, 0.89, False),  # = trial 1 once clipped
        SourceTrial(3, defaults, 0.88, False),  # the defaults, already queued
        SourceTrial(5, {"learning_rate": 2e-4, "global_batch_size": 16, "epochs": 1}, 0.70, False),
    ])
    chosen = warm_configurations(source, space, defaults, top=3, skip=[defaults])
    assert [s.number for _, s in chosen] == [4, 1, 5]  # the source's order (load_source ranks, tested below)
    assert chosen[1][0]["learning_rate"] == pytest.approx(1e-3)


def test_a_two_size_study_hands_on_its_best_trials_not_its_confirmed_runner_up():
    # bench/results/study-e2e-sizes confirmed the best trial of each size: SmolLM2's defaults (1.1469 over 3 seeds)
    # and Gemma's 1.2558; trial 3 (SmolLM2, 1.1468 on one seed) must come before Gemma's.
    source = load_source(Path(__file__).parents[2] / "bench" / "results" / "study-e2e-sizes")
    assert source.metric == "val_loss" and source.task == "generation"
    ranked = [(t.number, t.confirmed) for t in source.trials]
    assert ranked[:3] == [(3, False), (0, True), (9, False)] and ranked.index((1, True)) > 2


def test_a_new_study_starts_from_the_winners_of_another(tune_data, tiny_llama, tmp_path, capsys):
    first = tmp_path / "first"
    assert main(base_args(tune_data, tiny_llama, first, "--lr", "1e-4..1e-2:log", "--n-trials", "4",
                          "--pruner", "none")) == 0
    complete = sorted((t for t in load(first).get_trials() if t.state.name == "COMPLETE"), key=lambda t: t.number)
    ranked = sorted(complete, key=lambda t: -t.value)  # best first; ties keep trial order
    second = tmp_path / "second"
    capsys.readouterr()
    # A narrower range: the other study's learning rates are clipped into it.
    assert main(base_args(tune_data, tiny_llama, second, "--lr", "1e-3..1e-2:log", "--n-trials", "3",
                          "--pruner", "none", "--warm-start", str(first), "--warm-start-top", "2")) == 0
    log = capsys.readouterr().out
    assert "warm start: 2 configuration(s) of" in log and "queued after the defaults" in log
    trials = sorted(load(second).get_trials(), key=lambda t: t.number)
    assert trials[0].user_attrs.get("lmtune_default") is True
    warm = [t for t in trials if WARM_ATTR in t.user_attrs]
    assert [t.number for t in warm] == [1, 2]
    # The other study's default (lr 1e-4) clipped into 1e-3.. is this study's default, already trial 0.
    expected = [t.number for t in ranked if not t.user_attrs.get("lmtune_default")][:2]
    assert [t.user_attrs[WARM_ATTR]["trial"] for t in warm] == expected
    source = {t.number: t for t in complete}[expected[0]]
    origin = warm[0].user_attrs[WARM_ATTR]
    assert origin["value"] == pytest.approx(source.value) and origin["confirmed"] is False
    assert warm[0].params["learning_rate"] == pytest.approx(min(max(source.params["learning_rate"], 1e-3), 1e-2))
    assert warm[0].params["warmup_ratio"] == pytest.approx(source.params["warmup_ratio"])
    # Their scores here are their own, trained and measured in this study.
    assert all(t.state.name == "COMPLETE" and t.value is not None for t in warm)
    assert "warm start: trial" in _origin(warm[0]) and str(first) in _origin(warm[0])


def test_a_folder_that_is_not_a_study_is_one_line_and_exit_2(tune_data, tiny_llama, tmp_path):
    out = tmp_path / "s"
    r = run(base_args(tune_data, tiny_llama, out, "--n-trials", "1", "--warm-start", str(tmp_path / "nowhere")))
    assert r.returncode == 2
    lines = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and "error: --warm-start" in lines[0] and "no study.json there" in lines[0], r.stdout
    assert "Traceback" not in r.stdout
    assert not (out / "study.db").exists()  # nothing was started


def test_a_study_without_finished_trials_is_refused(tune_data, tiny_llama, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "study.json").write_text(json.dumps({"storage": f"sqlite:///{empty / 'study.db'}", "study_name": "lmtune"}))
    import optuna

    optuna.create_study(storage=f"sqlite:///{empty / 'study.db'}", study_name="lmtune", direction="maximize")
    r = run(base_args(tune_data, tiny_llama, tmp_path / "s", "--n-trials", "1", "--warm-start", str(empty)))
    assert r.returncode == 2 and "no finished trial" in r.stdout, r.stdout
