"""ENGINEERING.md §3 row 6: the same seed twice gives the same trials, values and best parameters."""

from __future__ import annotations

from lmtune.cli import main
from tests.tune.conftest import base_args, load, snapshot


def test_row6_same_seed_same_study(tune_data, tiny_llama, tmp_path, monkeypatch):
    results = []
    for name in ("a", "b"):
        monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / f"cache-{name}"))
        out = tmp_path / name
        args = base_args(tune_data, tiny_llama, out, "--lr", "1e-4..3e-3:log", "--n-trials", "5", "--pruner", "median",
                         "--sampler-seed", "7")
        assert main(args) == 0
        study = load(out)
        results.append((snapshot(study), study.best_params, study.best_value))
    (snap_a, best_a, value_a), (snap_b, best_b, value_b) = results
    assert snap_a == snap_b
    assert best_a == best_b and value_a == value_b
