"""What a search hands back: the default configuration as its first trial, a budget that buys a search (the
confirmation and refit sized to it, not it to them), a refit on all training rows, and minimised metrics."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import optuna
import pytest

from lmtune.cli import main
from lmtune.config import DataConfig, RunConfig, TuneConfig
from lmtune.tasks import resolve_task
from lmtune.tune.space import build_space
from lmtune.tune.study import _FinishPlan, leaderboard
from tests.tune.conftest import base_args, load


def test_defaults_are_projected_into_the_space():
    space = build_space({"learning_rate": "1e-4..1e-3:log", "global_batch_size": "8,32", "epochs": "1..2",
                         "method": "full,lora"}, n_train_rows=500, params_m_of={"m": 100.0}, default_model="m",
                         default_method="full")
    # lmtune train's classification defaults: lr 5e-5, batch 16, epochs 3, warmup 0.06, wd 0.01
    d = space.defaults(resolve_task(RunConfig(data=DataConfig(task="classification")))[1])
    assert d["learning_rate"] == pytest.approx(1e-4)  # clipped into the range
    assert d["global_batch_size"] in (8, 32)  # the nearest choice (16 is as near to both on a log scale)
    assert d["epochs"] == 2 and d["warmup_ratio"] == pytest.approx(0.06) and d["weight_decay"] == 0.01
    assert d["method"] == "full" and "lora_rank" not in d  # LoRA settings only for a lora default


def test_first_trial_is_the_default_configuration(tune_data, tiny_llama, tmp_path, capsys):
    out = tmp_path / "s"
    code = main(base_args(tune_data, tiny_llama, out, "--lr", "1e-4..1e-2:log", "--n-trials", "2", "--pruner", "none"))
    assert code == 0
    study = load(out)
    first = min(study.get_trials(), key=lambda t: t.number)
    assert first.user_attrs.get("lmtune_default") is True
    assert first.params["learning_rate"] == pytest.approx(1e-4)  # lmtune train's 5e-5, clipped into the range
    assert first.params["warmup_ratio"] == pytest.approx(0.06) and first.params["weight_decay"] == 0.01
    out_text = capsys.readouterr().out
    assert "default configuration (trial #0)" in out_text
    if study.best_trial.number == 0:  # the defaults won: no "+0.0000 better" gap is claimed
        assert "it is the best trial" in out_text and "+0.0000" not in out_text
    else:
        assert f"the best trial (#{study.best_trial.number}) is +" in out_text


def _study_with(seconds: list[float]):
    study = optuna.create_study()
    for s in seconds:
        study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"seconds": s}))
    return study


def test_a_budget_buys_a_search_not_a_confirmation():
    """The case a user met: a 211 s first trial and a 20-minute budget. The old rule kept 2 seeds x top 3 x 211 s
    = 1,266 s for confirmation, more than the whole budget, so no second trial started."""
    tc = TuneConfig(budget="20m", confirm_seeds=2, confirm_top=3)
    plan = _FinishPlan(tc, 1200.0, refit_scale=0.0)
    study = _study_with([211.0])
    reserve = plan.reserve(study, [211.0])
    assert reserve == pytest.approx(0.3 * 1200)  # capped: at most reserve_fraction of the budget
    assert 211 + 211 + reserve < 1200  # so a second trial starts (and a third)
    assert "about 2 more trial(s) fit" in plan.outlook(study, [211.0], elapsed=211.0)
    # At the end, what is left decides: 400 s fit one run, so the top trial on one seed.
    top, seeds, refit, note = plan.fit(study, [211.0], left=400.0, refit_due=False)
    assert (top, seeds, refit) == (1, 1, False) and "top 1 trial(s) on 1 extra seed(s)" in note
    assert plan.fit(study, [211.0], left=100.0, refit_due=False)[:2] == (1, 0)
    assert plan.fit(study, [211.0], left=None, refit_due=True) == (3, 2, True, None)  # no budget: as asked


def test_refit_comes_before_confirmation_and_is_skipped_when_it_cannot_fit():
    tc = TuneConfig(budget="10m", confirm_seeds=2, confirm_top=3)
    plan = _FinishPlan(tc, 600.0, refit_scale=2.0)  # the refit trains on twice the rows
    study = _study_with([100.0])
    top, seeds, refit, note = plan.fit(study, [100.0], left=350.0, refit_due=True)
    assert refit and (top, seeds) == (1, 1)  # 200 s refit, then one 100 s confirmation run
    top, seeds, refit, note = plan.fit(study, [100.0], left=150.0, refit_due=True)
    assert not refit and "refit skipped: it needs ~200 s" in note and (top, seeds) == (1, 1)


def test_refit_on_all_rows_after_a_search_on_a_sample(tune_data, tiny_llama, tmp_path):
    out = tmp_path / "s"
    code = main(base_args(tune_data, tiny_llama, out, "--lr", "3e-3", "--n-trials", "2", "--pruner", "none",
                          "--max-train-rows", "60"))
    assert code == 0
    refit = json.loads((out / "refit.json").read_text())
    assert refit["search_rows"] == 60 and refit["refit_rows"] == 120  # every training row
    assert refit["kept"] in ("refit", "search") and math.isfinite(refit["refit_value"])
    assert refit["default_trial"]["trial"] == 0
    trial = json.loads((out / "best" / "trial.json").read_text())
    record = json.loads((out / "best" / "lmtune_run.json").read_text())
    # The model trained on every row is handed back unless it is worse by more than the validation noise (here
    # twice the binomial standard error of the accuracy on the 40 validation rows).
    p = refit["search_value"]
    assert refit["noise"] == pytest.approx(2 * math.sqrt(p * (1 - p) / 40)) and "40 validation rows" in refit["noise_from"]
    if refit["kept"] == "refit":
        assert trial["refit_rows"] == 120 and record["data"]["rows"]["train"] == 120
        assert refit["refit_value"] >= refit["search_value"] - refit["noise"]
    else:
        assert record["data"]["rows"]["train"] == 60 and refit["refit_value"] < refit["search_value"] - refit["noise"]
    assert not (out / "refit").exists()
    from lmtune.report import write_report  # the answer is said in the report and summary.md too

    html = (out / "report.html")
    write_report(str(out))
    summary = (out / "summary.md").read_text()
    assert "refit: the winning configuration retrained on 120 rows" in summary and "default configuration (trial #0)" in summary
    assert "What tuning bought, and what best/ holds" in html.read_text()
    # a rerun of the finished study does not refit again
    before = (out / "refit.json").stat().st_mtime_ns
    assert main(base_args(tune_data, tiny_llama, out, "--lr", "3e-3", "--n-trials", "2", "--pruner", "none",
                          "--max-train-rows", "60")) == 0
    assert (out / "refit.json").stat().st_mtime_ns == before
    # ... and its answer still says what best/ holds (the rerun reads refit.json; it used to drop the refit)
    handed = json.loads((out / "answer.json").read_text())["handed_back"]
    assert handed["trial"] == refit["trial"] and handed["rows"] == (120 if refit["kept"] == "refit" else 60)


def test_no_refit_when_the_search_saw_every_row(tune_data, tiny_llama, tmp_path):
    out = tmp_path / "s"
    assert main(base_args(tune_data, tiny_llama, out, "--lr", "3e-3", "--n-trials", "1")) == 0
    assert not (out / "refit.json").exists()


def test_leaderboard_ranks_unfinished_trials_in_the_study_direction():
    study = optuna.create_study(direction="minimize")
    study.set_user_attr("metric", "val_loss")
    study.add_trial(optuna.trial.create_trial(value=0.40))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, intermediate_values={1: 0.9, 2: 0.6}))
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED, intermediate_values={1: 0.0}))
    rows = leaderboard(study)
    pruned = {r["trial"]: r["val_loss"] for r in rows if r["state"] == "PRUNED"}
    assert pruned == {1: 0.6, 2: 0.0}  # the lowest loss so far, not the highest
    assert [r["trial"] for r in rows] == [0, 2, 1]  # 0.0 is a value, not "missing"


def test_the_answer_is_one_computation_shown_everywhere(tune_data, tiny_llama, tmp_path, capsys):
    """A small study with seed confirmation: the defaults are confirmed on the winner's seeds, answer.json holds the
    computation, and the terminal, --show, summary.md and report.html all show it."""
    out = tmp_path / "s"
    args = base_args(tune_data, tiny_llama, out, "--lr", "1e-4..1e-2:log", "--n-trials", "4", "--pruner", "none",
                     "--sampler-seed", "3")
    args[args.index("--confirm-seeds") + 1] = "1"
    assert main(args + ["--confirm-top", "2"]) == 0
    terminal = capsys.readouterr().out
    answer = json.loads((out / "answer.json").read_text())
    results = json.loads((out / "confirm.json").read_text())["results"]
    confirmed = {r["trial"] for r in results}
    assert 0 in confirmed  # the default configuration, on the same seeds as the best trial
    for r in results:  # every metric of every seed, the objective's values among them (the seed noise of each metric)
        assert [m["accuracy"] for m in r["metrics"]] == r["values"]
        assert all({"val_loss", "macro_f1"} <= m.keys() and "step" not in m for m in r["metrics"])
    d = answer["defaults_vs_tuned"]
    assert d["default_trial"] == 0 and d["same_seeds"] is True and d["seeds"] == [0, 1]
    bands = {b["parameter"]: b for b in answer["importances"]}
    assert "learning_rate" in bands and all(b["low"] <= b["high"] for b in bands.values())
    assert answer["parameters"]["learning_rate"]["searched"] == [1e-4, 1e-2]
    assert any("indicative only" in s for s in answer["statements"])  # 4 trials: said out loud
    assert "What matters for this task (4 finished trials" in terminal
    assert main(["tune", "--out", str(out), "--show"]) == 0
    assert "What matters for this task (4 finished trials" in capsys.readouterr().out
    from lmtune.report import write_report

    write_report(str(out))
    assert "What matters for this task" in (out / "summary.md").read_text()
    html = (out / "report.html").read_text()
    assert "The answer: what matters for this task" in html and answer["statements"][0][:40] in html


def test_a_budget_only_search_confirms_with_the_time_it_kept(tune_data, tiny_llama, tmp_path, capsys):
    """--n-trials none: the budget ends the search, and the share of it held back for confirmation is spent on it
    (before, the reserve was kept while trials ran and then never used)."""
    out = tmp_path / "s"
    code = main(base_args(tune_data, tiny_llama, out, "--lr", "1e-4..1e-2:log", "--n-trials", "none", "--budget", "15s",
                          "--confirm-seeds", "2", "--confirm-top", "3", "--pruner", "none"))
    assert code == 0
    log = capsys.readouterr().out
    assert (out / "confirm.json").is_file(), log[-2500:]
    conf = json.loads((out / "confirm.json").read_text())
    # Sized to what the budget left (tiny trials: ~6 runs were held back), at least the best trial on one more seed.
    assert conf["results"] and len(conf["results"][0]["values"]) >= 2
    assert "confirming" in log


def test_refit_noise_is_the_confirmed_std_else_the_binomial_band():
    from lmtune.tune.study import _validation_noise

    best = SimpleNamespace(number=4, value=0.9)
    record = {"data": {"rows": {"val": 400}}}
    confirmation = {"results": [{"trial": 2, "std": 0.05}, {"trial": 4, "std": 0.012}]}
    assert _validation_noise(confirmation, best, "accuracy", record)[0] == pytest.approx(0.012)
    noise, why = _validation_noise(None, best, "accuracy", record)
    assert noise == pytest.approx(2 * math.sqrt(0.9 * 0.1 / 400)) and "400 validation rows" in why
    assert _validation_noise({"results": [{"trial": 4, "std": 0.0}]}, best, "accuracy", record)[0] == pytest.approx(noise)
    assert _validation_noise(None, SimpleNamespace(number=4, value=1.3), "val_loss", record)[0] == 0.0


def test_the_start_line_calls_the_trial_count_a_cap_under_a_budget():
    from lmtune.tune.study import _trial_limit_text

    assert _trial_limit_text(20, "25m") == "at most 20 trials; budget 25m"  # the plan line says how many fit
    assert _trial_limit_text(20, None) == "20 trials"
    assert _trial_limit_text(None, "25m") == "no trial limit; budget 25m"
