"""bench/search.py (`python -m bench search`): what a user reads in its report, checked on --tiny runs.

Two --tiny runs (a 2-layer random Llama, tiny data, contenders in this process), each shared by the tests of its
task: classification with two sampler seeds and three contenders, generation with one seed and the
lmtune-tpe / trainer-optuna pair. Then the pure functions behind the time-to-baseline and the goal line, on
hand-made evaluations.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import statistics
from pathlib import Path

import pytest

from bench import search
from bench.__main__ import main as bench_main

CLS_CONTENDERS = ("lmtune-tpe", "lmtune-random", "trainer-optuna")
GEN_CONTENDERS = ("lmtune-tpe", "trainer-optuna")
GOAL = "Goal (lmtune reaches the baseline's best in at most 1/3 of its time and ends at least as good), lmtune-tpe: **"


def _tiny_run(folder: Path, data: str, seeds: str, contenders: tuple[str, ...]) -> tuple[int, Path, dict]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run fastest on one thread; the machine is shared
    base = folder / f"search-{data}-tiny"
    try:
        rc = bench_main(["search", "--tiny", "--data", data, "--seeds", seeds, "--contenders", ",".join(contenders),
                         "--budget", "10s", "--confirm-seeds", "1", "--name", str(base)])
    finally:
        torch.set_num_threads(threads)
    return rc, base, json.loads(Path(str(base) + ".json").read_text())


@pytest.fixture(scope="module")
def classification(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("search-cls"), "sst2", "0,1", CLS_CONTENDERS)


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("search-gen"), "e2e_nlg", "0", GEN_CONTENDERS)


@pytest.fixture(params=["classification", "generation"])
def tiny(request):
    return request.getfixturevalue(request.param)


def test_every_contender_runs_once_per_sampler_seed(classification):
    rc, _, res = classification
    assert rc == 0
    assert not [r for r in res["runs"] if r.get("error")]
    assert sorted((r["who"], r["seed"]) for r in res["runs"]) == sorted((c, s) for c in CLS_CONTENDERS for s in (0, 1))
    assert res["settings"]["seeds"] == [0, 1] and res["settings"]["budget_s"] == 10.0


def test_best_so_far_curves_are_monotone_and_end_at_the_final_best(tiny):
    rc, _, res = tiny
    s = res["settings"]
    assert rc == 0
    for r in res["runs"]:
        curve = [p["best"] for p in r["curve"]]
        assert curve, f"{r['who']} seed {r['seed']}: no evaluation within the budget"
        assert curve == (sorted(curve) if s["maximize"] else sorted(curve, reverse=True))
        assert all(p["t_s"] <= s["budget_s"] for p in r["curve"])
        in_budget = [e["value"] for e in r["evals"] if e["t_s"] <= s["budget_s"]]
        assert curve[-1] == r["final_best"]["value"] == (max(in_budget) if s["maximize"] else min(in_budget))
        assert str(r["final_best"]["trial"]) in r["trials"]  # the configuration the confirmation retrained


def test_the_baseline_reaches_its_own_best_at_its_first_time_there(tiny):
    _, _, res = tiny
    for base in (r for r in res["runs"] if r["who"] == "trainer-optuna"):
        best = base["final_best"]["value"]
        first = min(e["t_s"] for e in base["evals"] if e["value"] == best and e["t_s"] <= res["settings"]["budget_s"])
        assert base["time_to_baseline_best_s"] == first == base["final_best"]["t_s"]
        assert base["fraction_of_baseline_time"] == pytest.approx(1.0)
        for r in res["runs"]:
            if r["seed"] == base["seed"] and r["time_to_baseline_best_s"] is not None:
                assert r["fraction_of_baseline_time"] == pytest.approx(r["time_to_baseline_best_s"] / first)


def test_confirmed_mean_and_std_come_from_the_listed_seed_values(tiny):
    _, _, res = tiny
    for r in res["runs"]:
        c = r["confirmation"]
        assert c["seeds"] == [0, 1] and len(c["values"]) == 2
        assert c["values"][0] == r["final_best"]["value"] and c["trial"] == r["final_best"]["trial"]
        assert c["mean"] == pytest.approx(statistics.fmean(c["values"]))
        assert c["std"] == pytest.approx(statistics.stdev(c["values"]))


def test_the_plot_has_one_line_per_contender_and_seed(tiny):
    _, base, res = tiny
    html = Path(str(base) + ".html")
    assert html.is_file() and res["plot"]["html"] == html.name
    text = html.read_text(encoding="utf-8")
    names = re.findall(r'"name":"([^"]+ seed \d+)"', text)
    assert sorted(names) == sorted(f"{r['who']} seed {r['seed']}" for r in res["runs"])
    # plotly.js is loaded from one file beside the pages, not inlined (4.7 MB) into each
    assert re.search(r'<script[^>]* src="plotly.min.js"', text) and len(text) < 500_000
    assert (html.parent / "plotly.min.js").stat().st_size > 1_000_000


def test_the_report_states_the_goal_the_machine_and_the_command(classification):
    _, base, res = classification
    md = Path(str(base) + ".md").read_text(encoding="utf-8")
    assert GOAL in md and re.search(re.escape(GOAL) + r"(met|not met)\*\*", md)
    assert "load average at start" in md and "Load average at end" in md
    assert res["machine"]["load_avg_at_start"] and res["load_avg_at_end"]
    assert f"Rerun: `{res['command']}`" in md
    # The command reruns the same settings.
    argv = shlex.split(res["command"])[3:]
    assert argv[0] == "search"
    p = argparse.ArgumentParser()
    search.add_arguments(p)
    ns = p.parse_args(argv[1:])
    again = search.settings(ns.budget, ns.data, ns.rows, ns.val_rows, ns.max_length, seeds=(0, 1),
                            contenders=tuple(ns.contenders.split(",")), confirm_seeds=ns.confirm_seeds, tiny=ns.tiny)
    assert again == res["settings"]
    assert ns.seeds == "0,1"


def test_generation_is_scored_by_validation_loss_for_every_contender(generation):
    rc, base, res = generation
    assert rc == 0 and res["settings"]["metric"] == "val_loss" and res["settings"]["maximize"] is False
    assert {r["who"] for r in res["runs"]} == set(GEN_CONTENDERS)
    assert "validation loss per completion token (lower is better)" in Path(str(base) + ".md").read_text(encoding="utf-8")
    assert res["goals"] and res["goals"][0]["contender"] == "lmtune-tpe"


def test_the_trainer_objective_is_lmtune_validation_loss(tmp_path):
    """The generation baseline's objective, from per-row loss sums, equals lmtune's val_loss on the same model and rows."""
    import torch

    from lmtune.data.generation import encode_generation, load_generation_data
    from lmtune.models import load_tokenizer
    from lmtune.tasks.generation import _loss_over

    spec = {"task": "generation", "metric": "val_loss", "maximize": False, "rows": 64, "val_rows": 24, "max_length": 48,
            "data_files": search.write_tiny_generation(tmp_path), "model_path": search.build_tiny_model(tmp_path / "model")}
    values: list[float] = []
    trainer = search.build_trainer(spec, search.trainer_rows(spec), str(tmp_path / "trainer"), values.append)
    trainer.args.bf16 = False  # compare in fp32
    trainer.evaluate()
    tok = load_tokenizer(spec["model_path"])
    enc = encode_generation(tok, load_generation_data(search.data_config(spec)).val, spec["max_length"])
    total, tokens = _loss_over(trainer.model.eval(), enc, 32, tok.pad_token_id, torch.device("cpu"))
    assert values == [pytest.approx(total / tokens, rel=1e-5)]


# ---- the pure functions, on hand-made evaluations ---------------------------------------------------------------


def _evals(*pairs):
    return [{"t_s": t, "value": v, "trial": 0} for t, v in pairs]


def test_only_evaluations_within_the_budget_count():
    evals = _evals((1, 0.5), (2, 0.7), (3, 0.6), (11, 0.9))
    assert search.best_so_far_curve(evals, True, 10) == [{"t_s": 1, "best": 0.5}, {"t_s": 2, "best": 0.7},
                                                         {"t_s": 3, "best": 0.7}]
    assert search.final_best(evals, True, 10)["value"] == 0.7
    assert search.first_time_reaching(evals, 0.7, True, 10) == 2
    assert search.first_time_reaching(evals, 0.9, True, 10) is None  # reached only after the budget
    assert search.first_time_reaching(_evals((1, 2.0), (4, 1.5)), 1.5, False, 10) == 4  # a loss: lower is better


def _run(who, seed, evals, confirmed=None):
    r = {"who": who, "seed": seed, "evals": _evals(*evals), "counts": {"complete": 1}}
    if confirmed is not None:
        r["confirmation"] = {"values": confirmed, **search.mean_std(confirmed)}
    return r


def _analyse(runs, maximize=True):
    s = search.settings(100, "sst2" if maximize else "e2e_nlg", seeds=(0, 1), contenders=("lmtune-tpe", "trainer-optuna"))
    res = {"settings": s, "runs": runs}
    search.finish_analysis(res)
    return res


def test_the_goal_needs_a_third_of_the_baseline_time_and_an_equal_or_better_end():
    met = _analyse([_run("trainer-optuna", 0, [(30, 0.8), (90, 0.85)], [0.85, 0.84]),
                    _run("lmtune-tpe", 0, [(20, 0.86)], [0.86, 0.85]),
                    _run("trainer-optuna", 1, [(60, 0.84)], [0.84, 0.83]),
                    _run("lmtune-tpe", 1, [(10, 0.84), (50, 0.85)], [0.85, 0.84])])
    g = met["goals"][0]
    assert [p["fraction"] for p in g["per_seed"]] == pytest.approx([20 / 90, 10 / 60])
    assert g["median_fraction"] == pytest.approx((20 / 90 + 10 / 60) / 2) and g["met"]
    assert [p["basis"] for p in g["per_seed"]] == ["confirmed mean", "confirmed mean"]
    slow = _analyse([_run("trainer-optuna", 0, [(30, 0.8)]), _run("lmtune-tpe", 0, [(20, 0.9)]),
                     _run("trainer-optuna", 1, [(30, 0.8)]), _run("lmtune-tpe", 1, [(50, 0.7)])])
    g = slow["goals"][0]
    assert g["median_fraction"] is None and not g["time_met"]  # one seed never got there: the median is infinite
    worse = _analyse([_run("trainer-optuna", 0, [(90, 2.0)]), _run("lmtune-tpe", 0, [(10, 1.9), (20, 2.0)]),
                      _run("trainer-optuna", 1, [(90, 1.0)]), _run("lmtune-tpe", 1, [(10, 1.0)])], maximize=False)
    g = worse["goals"][0]
    assert g["time_met"] and g["quality_met"]  # losses: 1.9 < 2.0 is better, 1.0 = 1.0 is as good


def _split_by_seed(res: dict, folder: Path) -> list[str]:
    """The two-seed tiny run written as two one-seed results, as two sessions would have written them."""
    paths = []
    for seed in res["settings"]["seeds"]:
        part = json.loads(json.dumps(res)) | {"runs": [r for r in res["runs"] if r["seed"] == seed]}
        part["settings"]["seeds"] = [seed]
        for key in ("summary", "goals"):
            part.pop(key, None)
        paths.append(str(folder / f"seed{seed}.json"))
        Path(paths[-1]).write_text(json.dumps(part))
    return paths


def test_merging_one_seed_runs_gives_the_two_seed_result(classification, tmp_path):
    _, _, res = classification
    paths = _split_by_seed(res, tmp_path)
    assert bench_main(["search", "--merge", *paths, "--name", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert merged["settings"]["seeds"] == res["settings"]["seeds"] == [0, 1]
    assert merged["summary"] == res["summary"] and merged["goals"] == res["goals"]
    assert [r["fraction_of_baseline_time"] for r in merged["runs"]] == [r["fraction_of_baseline_time"] for r in res["runs"]]
    md = (tmp_path / "merged.md").read_text()
    assert "Merged from 2 runs" in md and "`seed0.json`: sampler seed(s) 0" in md and "`seed1.json`: sampler seed(s) 1" in md
    names = re.findall(r'"name":"([^"]+ seed \d+)"', (tmp_path / "merged.html").read_text(encoding="utf-8"))
    assert sorted(names) == sorted(f"{r['who']} seed {r['seed']}" for r in res["runs"])


def test_merge_refuses_other_settings_and_repeated_seeds(classification, tmp_path):
    _, _, res = classification
    paths = _split_by_seed(res, tmp_path)
    other = json.loads(Path(paths[1]).read_text())
    other["settings"]["budget_s"] = 20.0
    Path(paths[1]).write_text(json.dumps(other))
    with pytest.raises(SystemExit, match=r"seed1\.json: its settings differ from .*seed0\.json in budget_s"):
        search.merge(paths, str(tmp_path / "merged"))
    with pytest.raises(SystemExit, match=r"sampler seed\(s\) 0 appear in more than one file"):
        search.merge([paths[0], paths[0]], str(tmp_path / "merged"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match=r"--merge .*bad\.json: cannot read it as JSON"):
        search.merge([paths[0], str(tmp_path / "bad.json")], str(tmp_path / "merged"))


def test_the_report_says_each_tpe_start_up_as_the_run_recorded_it(classification):
    """lmtune's start-up is its study's own (a third of the trials it expected, 3..10), the baseline's Optuna's 10;
    "past TPE start-up" is judged against each run's own count."""
    _, base, res = classification
    md = Path(str(base) + ".md").read_text(encoding="utf-8")
    for r in res["runs"]:
        if r["who"] == "lmtune-tpe":
            assert 3 <= r["tpe_startup_trials"] <= 10
            assert f"{r['tpe_startup_trials']} (seed {r['seed']})" in md
        if r["who"] == "lmtune-random":
            assert r["tpe_startup_trials"] is None  # no TPE, no start-up
    assert "TPE models nothing before its random start-up trials have finished: " in md
    assert "trainer-optuna 10 (seed 0), 10 (seed 1)" in md
    assert search.startup_of({"who": "lmtune-tpe", "seed": 0}) == 10  # a result written before the field existed


def test_lmtune_gp_is_lmtune_on_the_gp_sampler_with_its_start_up_said():
    """The opt-in contender runs lmtune.tune with sampler="gp"; its goal is judged like lmtune-tpe's; the report's
    start-up line says the GP counts complete trials only (Optuna's GPSampler leaves pruned ones out)."""
    assert search.SAMPLER_OF.get("lmtune-gp") == "gp" and search.SAMPLER_OF.get("lmtune-tpe", "tpe") == "tpe"
    assert "lmtune-gp" in search.GOAL_CONTENDERS and "lmtune-gp" not in search.CONTENDERS
    runs = [{"who": "lmtune-gp", "seed": 0, "tpe_startup_trials": 3}, {"who": "trainer-optuna", "seed": 0},
            {"who": "lmtune-random", "seed": 0, "tpe_startup_trials": None}]
    assert search.startup_text(runs) == ("TPE (lmtune-gp: the GP, counting complete trials only) models nothing before "
                                         "its random start-up trials have finished: lmtune-gp 3 (seed 0); "
                                         "trainer-optuna 10 (seed 0).")
    assert search.startup_text(runs[1:]).startswith("TPE models nothing before")
