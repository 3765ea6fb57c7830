"""bench/guide.py (`python -m bench guide`): docs/key-parameters.md is what the raw studies say."""

from __future__ import annotations

import json
from pathlib import Path

from bench import guide


def test_the_page_in_the_repository_matches_the_studies_in_bench_results():
    assert guide.main(["--check"]) == 0, "run: python -m bench guide"


def _study(folder: Path, data: str, gain: float, noise: float) -> None:
    folder.mkdir(parents=True)
    (folder / "guide.json").write_text(json.dumps({
        "data": data, "title": "t", "task": "classification", "rows": 100, "val_rows": 50, "models": ["m"],
        "commands": ["lmtune tune --data x.csv"], "notes": ["a note"]}))
    (folder / "answer.json").write_text(json.dumps({
        "metric": "accuracy", "direction": "maximize", "trials": {"complete": 9, "pruned": 3},
        "importances": [{"parameter": "learning_rate", "importance": 0.71, "low": 0.52, "high": 0.88},
                        {"parameter": "epochs", "importance": 0.12, "low": 0.01, "high": 0.30}],
        "parameters": {"learning_rate": {"kind": "range", "log": True, "searched": [1e-5, 1e-3], "best_range": [2e-4, 5e-4]},
                       "epochs": {"kind": "range", "log": False, "searched": [1, 3], "best_range": [2, 3]},
                       "weight_decay": {"kind": "choice", "searched": [0.0, 0.1], "best_counts": {"0.0": 1, "0.1": 2}}},
        "defaults_vs_tuned": {"seeds": [0, 1, 2], "default_mean": 0.80, "default_std": 0.01, "tuned_trial": 4,
                              "tuned_mean": 0.80 + gain, "tuned_std": 0.01, "gain": gain, "noise": noise,
                              "within_noise": gain <= noise},
        "sizes": [], "statements": ["a statement"]}))


def test_every_number_on_the_page_comes_from_the_study(tmp_path: Path):
    _study(tmp_path / "a", "TREC", gain=0.05, noise=0.01)
    _study(tmp_path / "b", "SST-2", gain=0.005, noise=0.01)
    studies = guide.load_studies(tmp_path)
    assert [s["data"] for s in studies] == ["SST-2", "TREC"]  # in the guide's order, not the folders'
    page = guide.render(studies)
    assert "| learning_rate | 0.71 (0.52..0.88) | 1e-05..0.001 (log) | 0.0002..0.0005 |" in page
    assert "| weight_decay | not ranked | 0, 0.1 | 0.0 x1, 0.1 x2 |" in page
    assert "bought +0.0500 accuracy, seed noise 0.01: **beyond seed noise, on every seed**" in page
    assert "bought +0.0050 accuracy, seed noise 0.01: **within seed noise**" in page
    assert "Not yet studied: AG News, E2E" in page
    assert "| learning_rate | #1: 0.71 (0.52..0.88) | #1: 0.71 (0.52..0.88) |" in page  # side by side
    assert "- a statement" in page and "- a note" in page


def test_the_trials_rebuilt_from_a_stored_study_are_the_trials_its_answer_was_computed_from():
    # `--recompute` reads leaderboard.csv: each parameter's (value, metric) pairs must be the answer's own points.
    from bench.common import RESULTS

    metas = sorted(RESULTS.glob("*/guide.json"))
    assert metas
    for meta in metas:
        answer = json.loads((meta.parent / "answer.json").read_text())
        trials = guide.study_trials(meta.parent, answer)
        assert len(trials) == answer["trials"]["complete"], meta.parent.name
        for name, view in answer["parameters"].items():
            rebuilt = sorted((t.params[name], round(t.value, 9)) for t in trials if name in t.params)
            stored = sorted((p[0], round(p[1], 9)) for p in view["points"])
            assert rebuilt == stored, (meta.parent.name, name)


def test_a_study_whose_defaults_were_not_confirmed_says_so_instead_of_dropping_out(tmp_path: Path):
    _study(tmp_path / "a", "TREC", gain=0.05, noise=0.01)
    _study(tmp_path / "b", "SST-2", gain=0.005, noise=0.01)  # the side-by-side summary needs two studies
    answer = json.loads((tmp_path / "a" / "answer.json").read_text())
    # What a tight budget leaves: the best trial confirmed, the defaults on their search seed only.
    answer["defaults_vs_tuned"] = {"default_trial": 0, "default_value": 0.86, "tuned_trial": 5, "tuned_value": 0.92,
                                   "gain": 0.06, "seeds": None, "within_noise": None}
    answer["sizes"] = [{"model": "big", "complete": 4, "best_value": 0.93, "confirmed_mean": 0.9244,
                        "confirmed_std": 0.0096, "seconds_per_trial": 171.14499999999998},
                       {"model": "small", "complete": 3, "best_value": 0.89, "confirmed_mean": None,
                        "confirmed_std": None, "seconds_per_trial": 66.86}]
    (tmp_path / "a" / "answer.json").write_text(json.dumps(answer))
    page = guide.render(guide.load_studies(tmp_path))
    assert ("TREC: bought +0.0600 accuracy against the defaults on the search seed, one run each (the defaults were "
            "not confirmed: seed noise not measured, so not a conclusion)") in page
    assert "| big | 4 | 0.9300 | 0.9244 +- 0.0096 | 171 |" in page
    assert "| small | 3 | 0.8900 | not confirmed | 67 |" in page


def test_a_study_whose_defaults_won_says_tuning_bought_nothing(tmp_path: Path):
    _study(tmp_path / "a", "AG News", gain=0.0, noise=0.01)
    _study(tmp_path / "b", "SST-2", gain=0.005, noise=0.01)
    answer = json.loads((tmp_path / "a" / "answer.json").read_text())
    answer["defaults_vs_tuned"] = {"default_trial": 0, "default_value": 0.8967, "tuned_trial": 0, "tuned_value": 0.8967,
                                   "gain": 0.0, "seeds": [0, 1, 2], "within_noise": None, "defaults_best": True,
                                   "default_mean": 0.8878, "default_std": 0.0084}
    (tmp_path / "a" / "answer.json").write_text(json.dumps(answer))
    page = guide.render(guide.load_studies(tmp_path))
    assert "AG News: nothing, the defaults were the best trial (0.8878 +- 0.0084 over 3 seeds)" in page
    assert "AG News: bought" not in page
    assert "**Coverage.** Studies so far: SST-2, AG News. Not yet studied: TREC, E2E;" in page


def test_a_gain_the_seeds_disagree_on_is_shown_as_not_settled_with_its_seeds(tmp_path: Path):
    _study(tmp_path / "a", "SST-2", gain=0.0156, noise=0.0144)
    _study(tmp_path / "b", "TREC", gain=0.005, noise=0.01)
    answer = json.loads((tmp_path / "a" / "answer.json").read_text())
    answer["defaults_vs_tuned"] |= {"seed_gains": [[0, 0.0367], [1, 0.0133], [2, -0.0033]], "search_seed": 0,
                                    "fresh_seed_gain": 0.005, "verdict": "mixed", "within_noise": True}
    (tmp_path / "a" / "answer.json").write_text(json.dumps(answer))
    page = guide.render(guide.load_studies(tmp_path))
    assert ("per seed (tuned minus defaults, + is better): +0.0367, +0.0133, -0.0033; on the confirmation seeds alone "
            "+0.0050: **not settled, the seeds disagree**") in page
    assert "SST-2: bought +0.0156 accuracy (seed noise 0.0144: not settled, the seeds disagree)" in page


def test_parameters_whose_bands_overlap_share_a_rank():
    bands = [{"parameter": "a", "importance": 0.5, "low": 0.4, "high": 0.6},
             {"parameter": "b", "importance": 0.3, "low": 0.2, "high": 0.45},  # overlaps a: a tie for first
             {"parameter": "c", "importance": 0.1, "low": 0.0, "high": 0.15}]  # a and b lie wholly above it
    assert [guide.settled_rank(b, bands) for b in bands] == [1, 1, 3]


def test_every_stored_answer_is_what_the_current_code_computes_from_its_raw_trials():
    # answer.json is written once, at the end of a study; when lmtune's answer code changes, `python -m bench guide
    # --recompute` must rewrite it, or the guide shows conclusions the code no longer draws.
    from bench.common import RESULTS

    for meta in sorted(RESULTS.glob("*/guide.json")):
        stored = json.loads((meta.parent / "answer.json").read_text())
        fresh = guide.recomputed_answer(meta.parent, stored)
        assert json.loads(json.dumps(fresh)) == stored, f"{meta.parent.name}: run python -m bench guide --recompute"
