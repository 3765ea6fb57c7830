"""The search space: every declaration form, each error (one line naming the flag), YAML, conditional
LoRA parameters, and the default rules (learning rate falls with size; batch and epochs follow the rows)."""

from __future__ import annotations

import optuna
import pytest

from lmtune.cli import main
from lmtune.errors import SearchSpaceError
from lmtune.tune.space import SEARCHABLE, Dimension, build_space, default_learning_rate, default_space, parse_dimension
from tests.tune.conftest import base_args


@pytest.mark.parametrize("name, spec, expected", [
    ("learning_rate", "1e-5..1e-3:log", Dimension("learning_rate", "float", 1e-5, 1e-3, True)),
    ("warmup_ratio", "0..0.1", Dimension("warmup_ratio", "float", 0.0, 0.1, False)),
    ("epochs", "1..4", Dimension("epochs", "int", 1, 4)),
    ("lora_rank", "4..64:log", Dimension("lora_rank", "int", 4, 64, True)),
    ("global_batch_size", "8,16,32", Dimension("global_batch_size", "choice", choices=(8, 16, 32))),
    ("learning_rate", "1e-4, 3e-4", Dimension("learning_rate", "choice", choices=(1e-4, 3e-4))),
    ("model", "pythia-70m,smollm2-135m", Dimension("model", "choice", choices=("pythia-70m", "smollm2-135m"))),
    ("method", "full,lora,head", Dimension("method", "choice", choices=("full", "lora", "head"))),
    ("epochs", "3", Dimension("epochs", "fixed", choices=(3,))),
    ("lr_schedule", "cosine", Dimension("lr_schedule", "fixed", choices=("cosine",))),
    # YAML forms
    ("learning_rate", {"low": 1e-5, "high": 1e-3, "log": True}, Dimension("learning_rate", "float", 1e-5, 1e-3, True)),
    ("global_batch_size", {"choices": [8, 16]}, Dimension("global_batch_size", "choice", choices=(8, 16))),
    ("max_length", [64, 128], Dimension("max_length", "choice", choices=(64, 128))),
    ("weight_decay", 0.01, Dimension("weight_decay", "fixed", choices=(0.01,))),
])
def test_every_declaration_form_parses(name, spec, expected):
    assert parse_dimension(name, spec) == expected


@pytest.mark.parametrize("name, spec, flag, words", [
    ("learning_rate", "1e-3..1e-5", "--lr", "low < high"),
    ("learning_rate", "0..1e-3:log", "--lr", "low > 0"),
    ("learning_rate", "1e-5..1e-3:exp", "--lr", "':exp'"),
    ("learning_rate", "abc", "--lr", "not a number"),
    ("learning_rate", "-1e-3", "--lr", "> 0"),
    ("global_batch_size", "8,,16", "--batch-size", "empty choice"),
    ("global_batch_size", "8,8", "--batch-size", "repeated"),
    ("global_batch_size", "0,8", "--batch-size", ">= 1"),
    ("epochs", "1.5..3", "--epochs", "whole number"),
    ("epochs", "", "--epochs", "empty"),
    ("method", "full,qlora", "--method", "full, lora or head"),
    ("method", "1..2", "--method", "range"),
    ("model", "a..b", "--model", "range"),
    ("warmup_ratio", "0..1.5", "--warmup-ratio", "[0, 1)"),
    ("weight_decay", "-0.1", "--weight-decay", ">= 0"),
    ("max_length", "4,64", "--max-length", ">= 8"),
    ("lr_schedule", "linear,step", "--lr-schedule", "linear, cosine or constant"),
])
def test_each_error_is_one_line_naming_the_flag(name, spec, flag, words):
    with pytest.raises(SearchSpaceError) as e:
        parse_dimension(name, spec)
    msg = str(e.value)
    assert msg.startswith(flag + ":"), msg
    assert words in msg and "\n" not in msg


def test_yaml_without_low_high_or_choices_is_an_error():
    with pytest.raises(SearchSpaceError, match=r"search\.epochs: expected low/high or choices"):
        parse_dimension("epochs", {"min": 1, "max": 3})


def test_seed_is_never_a_search_dimension():
    assert "seed" not in SEARCHABLE
    with pytest.raises(SearchSpaceError, match="'seed' cannot be searched"):
        parse_dimension("seed", "0,1,2")
    for rows in (100, 5_000, 50_000):
        space = build_space({}, n_train_rows=rows, params_m_of={"m": 135}, default_model="m", default_method="full")
        assert "seed" not in space.dims


def test_cli_declaration_error_exits_2_with_one_line(tune_data, tiny_llama, tmp_path, capsys):
    code = main(base_args(tune_data, tiny_llama, tmp_path / "s", "--lr", "1e-3..1e-5:log"))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "--lr" in err and "low < high" in err, err
    assert not (tmp_path / "s" / "study.db").exists(), "no study may be created from an invalid space"


def test_cli_seed_is_not_searchable(tune_data, tiny_llama, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(base_args(tune_data, tiny_llama, tmp_path / "s", "--seed", "1,2"))
    assert e.value.code == 2


def test_yaml_search_section_is_read(tmp_path, tune_data, tiny_llama, capsys):
    cfg = tmp_path / "tune.yaml"
    cfg.write_text("search:\n  learning_rate: {low: 1.0e-5, high: 1.0e-3, log: true}\n  global_batch_size: [8, 16]\n"
                   "  method: full,lora\n  lora_rank: 4..16\ntune:\n  n_trials: 3\n")
    code = main(["tune", "--config", str(cfg), "--data", tune_data["train"], "--print-config"])
    printed = capsys.readouterr().out
    assert code == 0
    from lmtune.tune.cli import configs_from_args
    from lmtune.cli import build_parser
    from lmtune.tune.space import build_space as bs
    _, sc, tc = configs_from_args(build_parser().parse_args(["tune", "--config", str(cfg), "--data", tune_data["train"],
                                                             "--batch-size", "16,32"]))
    assert tc.n_trials == 3 and "n_trials: 3" in printed
    space = bs(sc.declared(), n_train_rows=120, params_m_of={}, default_model="m", default_method="full")
    assert space.dims["learning_rate"] == Dimension("learning_rate", "float", 1e-5, 1e-3, True)
    assert space.dims["global_batch_size"].choices == (16, 32), "a flag overrides the YAML"
    assert space.dims["lora_rank"] == Dimension("lora_rank", "int", 4, 16)


def test_lora_parameters_only_in_lora_trials():
    space = build_space({"method": "full,lora,head", "lora_rank": "4,8"}, n_train_rows=500,
                        params_m_of={"m": 135}, default_model="m", default_method="full")
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(30):
        trial = study.ask()
        params = space.sample(trial)
        study.tell(trial, 0.5)
        seen.add(params["method"])
        has_lora = {"lora_rank", "lora_alpha"} & set(params)
        if params["method"] == "lora":
            assert has_lora == {"lora_rank", "lora_alpha"} and params["lora_rank"] in (4, 8)
        else:
            assert not has_lora and not {"lora_rank", "lora_alpha"} & set(trial.params), params
    assert seen == {"full", "lora", "head"}


def test_fixed_lora_params_are_carried_only_into_lora_trials():
    space = build_space({"method": "full,lora", "lora_rank": "8", "lora_alpha": "16"}, n_train_rows=500,
                        params_m_of={"m": 135}, default_model="m", default_method="full")
    assert space.complete({"method": "lora"})["lora_rank"] == 8
    assert "lora_rank" not in space.complete({"method": "full"})


def test_default_learning_rate_falls_with_model_size():
    sizes = [70, 135, 350, 1000, 7000]
    for method in ("full", "lora", "head"):
        lrs = [default_learning_rate(p, method) for p in sizes]
        assert all(a > b for a, b in zip(lrs, lrs[1:])), (method, lrs)
    assert default_learning_rate(125, "full") == pytest.approx(6.25e-5)  # GPT-1's fine-tuning rate
    assert default_learning_rate(135, "lora") > default_learning_rate(135, "full")
    assert default_learning_rate(135, "head") > default_learning_rate(135, "lora")
    small = default_space(5000, [135], ["full"])["learning_rate"]
    big = default_space(5000, [1500], ["full"])["learning_rate"]
    assert small.log and big.high < small.high and big.low < small.low
    both = default_space(5000, [135, 1500], ["full"])["learning_rate"]
    assert both.low == big.low and both.high == small.high, "several models: the range covers each one's"


@pytest.mark.parametrize("rows, batches, epochs", [
    (120, (8, 16), (2, 6)), (999, (8, 16), (2, 6)), (1000, (8, 16, 32), (1, 4)),
    (10_000, (8, 16, 32), (1, 3)), (20_000, (8, 16, 32, 64), (1, 3)),
])
def test_default_batch_and_epochs_follow_the_rows(rows, batches, epochs):
    dims = default_space(rows, [135], ["full"])
    assert dims["global_batch_size"].choices == batches
    assert (dims["epochs"].low, dims["epochs"].high) == epochs
    assert "lora_rank" not in dims
    assert "lora_rank" in default_space(rows, [135], ["full", "lora"])


def test_declared_dimensions_win_over_defaults():
    space = build_space({"epochs": "1", "learning_rate": "1e-4..1e-3:log"}, n_train_rows=120,
                        params_m_of={"m": 135}, default_model="m", default_method="full")
    assert space.dims["epochs"].kind == "fixed"
    assert space.dims["learning_rate"].low == 1e-4
    assert space.dims["global_batch_size"].choices == (8, 16)
    assert space.fixed() == {"epochs": 1, "model": "m", "method": "full"}
