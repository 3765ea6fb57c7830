"""bench/metric_choice.py (`python -m bench metric-choice`): the numbers behind generation's default objective.

The pure functions on hand-made evaluation histories whose answer is known, then one --tiny run end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import metric_choice as mc
from bench.__main__ import main as bench_main


def _trial(number: int, evals: list[tuple[float, float, float]], decode_s: float = 1.0, eval_s: float = 2.0) -> dict:
    history, elapsed = [], 0.0
    for loss, rouge, bleu in evals:
        elapsed += 10.0 + eval_s
        history.append({"step": len(history) + 1, "val_loss": loss, "rougeL": rouge, "bleu": bleu, "generate_s": decode_s,
                        "eval_s": eval_s, "elapsed_s": elapsed})
    return {"number": number, "params": {}, "history": history}


TRIALS = [
    _trial(0, [(1.5, 50.0, 40.0), (1.3, 55.0, 46.0), (1.2, 56.0, 45.0)]),   # loss and ROUGE-L agree; BLEU peaks earlier
    _trial(1, [(1.4, 52.0, 41.0), (1.1, 58.0, 48.0)]),                     # the best trial by every metric
    _trial(2, [(1.6, 45.0, 35.0), (1.25, 60.0, 47.0), (1.15, 57.0, 49.0)]),  # ROUGE-L's best evaluation is not the loss's
]


def test_checkpoints_picked_by_loss_and_what_they_gave_up():
    rouge = mc.checkpoint_choice(TRIALS, "rougeL")
    assert [r["same"] for r in rouge["trials"]] == [True, True, False]
    assert rouge["same"] == 2 and rouge["of"] == 3
    assert rouge["max_lost"] == pytest.approx(3.0)  # trial 2: 60 at evaluation 2, 57 at the lowest loss
    bleu = mc.checkpoint_choice(TRIALS, "bleu")
    assert [r["same"] for r in bleu["trials"]] == [False, True, True]
    assert bleu["max_lost"] == pytest.approx(1.0)


def test_the_trial_a_loss_driven_search_hands_back():
    rouge = mc.trial_choice(TRIALS, "rougeL")
    assert rouge["trial_by_loss"] == 1 and rouge["trial_by_metric"] == 2  # trial 2 has the single best ROUGE-L (60)
    assert rouge["got"] == 58.0 and rouge["lost"] == pytest.approx(2.0) and rouge["rank_of_loss_pick"] == 2
    assert rouge["spread"] == pytest.approx(4.0)
    bleu = mc.trial_choice(TRIALS, "bleu")
    assert bleu["trial_by_loss"] == 1 and bleu["trial_by_metric"] == 2 and bleu["lost"] == pytest.approx(1.0)


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [1.0, 2.0, 2.0, 4.0, 5.0], [3.0, 1.0, 4.0, 4.0, 9.0]
    assert mc.spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)
    assert mc.spearman([1.0, 2.0], [2.0, 1.0]) is None  # two points rank nothing


def test_the_verdict_is_computed_against_seed_noise():
    conf = {"results": [{"trial": 1, "metrics": [{"rougeL": 58.0, "bleu": 48.0}, {"rougeL": 55.0, "bleu": 47.5},
                                                 {"rougeL": 57.0, "bleu": 48.5}]}]}
    a = mc.analyse(TRIALS, conf)
    noise = a["metrics"]["rougeL"]["seed_noise"]
    assert noise["std"] == pytest.approx(1.5275, abs=1e-3)
    # ROUGE-L: 2.0 points lost over trials and 3.0 at a checkpoint, both above a seed std of 1.53.
    assert "**not within seed noise**" in a["metrics"]["rougeL"]["verdict"]
    # BLEU: 1.0 point lost at a checkpoint and over trials, above its seed std of 0.5.
    assert "**not within seed noise**" in a["metrics"]["bleu"]["verdict"]
    loud = {"results": [{"trial": 1, "metrics": [{"rougeL": 58.0, "bleu": 48.0}, {"rougeL": 52.0, "bleu": 45.0}]}]}
    assert "**within seed noise**" in mc.analyse(TRIALS, loud)["metrics"]["rougeL"]["verdict"]
    assert "**undecided**" in mc.analyse(TRIALS, None)["metrics"]["rougeL"]["verdict"]


def test_decoding_cost_is_a_share_of_the_trials_time():
    cost = mc.decode_cost(TRIALS)
    assert cost["decode_s"] == 8.0 and cost["trial_s"] == pytest.approx(3 * 12 + 2 * 12 + 3 * 12)
    assert cost["speedup_without_decoding"] == pytest.approx(96 / 88)


def test_a_tiny_run_reports_every_trial_and_the_verdicts(tmp_path: Path):
    name = tmp_path / "mc"
    assert bench_main(["metric-choice", "--tiny", "--name", str(name)]) == 0
    res = json.loads(Path(str(name) + ".json").read_text())
    md = Path(str(name) + ".md").read_text()
    assert res["analysis"]["trials"] == len(res["trials"]) >= 2
    assert all({"rougeL", "bleu", "generate_s", "eval_s"} <= h.keys() for t in res["trials"] for h in t["history"])
    assert res["confirmation"]["results"] and all(len(r["metrics"]) == 2 for r in res["confirmation"]["results"])
    for m in ("rougeL", "bleu"):
        assert res["analysis"]["metrics"][m]["verdict"] in md
    assert "--metric val_loss" in md and "decoding took" in md


def test_the_picks_are_compared_over_the_same_seeds():
    conf = {"seeds": [0, 1, 2], "results": [{"trial": 1, "metrics": [{"val_loss": 1.1, "rougeL": 58.0, "bleu": 48.0},
                                                                     {"val_loss": 1.12, "rougeL": 56.0, "bleu": 47.0},
                                                                     {"val_loss": 1.11, "rougeL": 57.0, "bleu": 47.5}]}]}
    picks = {"2": {"trial": 2, "metrics": [{"val_loss": 1.15, "rougeL": 60.0, "bleu": 49.0},
                                           {"val_loss": 1.16, "rougeL": 55.0, "bleu": 49.5},
                                           {"val_loss": 1.17, "rougeL": 56.0, "bleu": 48.5}]}}
    over = mc.over_seeds(conf, picks)
    assert [r["trial"] for r in over] == [1, 2] and over[1]["rougeL"]["mean"] == 57.0
    lines = mc.seed_verdicts(over, mc.analyse(TRIALS, conf))
    assert "rougeL over 3 seeds: the loss's pick (trial 1) 57.00 +- 1.00, rougeL's pick (trial 2) 57.00 +- 2.65" in lines[0]
    assert "**within seed noise**" in lines[0]
    assert "bleu's pick (trial 2) 49.00 +- 0.50" in lines[1] and "+1.50 points, **beyond seed noise**" in lines[1]
