"""`lmtune plan`: the rows of a space, the calibration cache, memory against measurement, shapes that do not fit,
and the plan check a study keeps (predicted against actual time per trial)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lmtune.cli import main
from tests.conftest import FILLER, NEGATIVE, POSITIVE
from tests.tune.conftest import base_args, load


def plan_args(data: dict[str, str], model: str, out: Path, *extra: str) -> list[str]:
    return ["plan", *base_args(data, model, out, *extra)[1:]]


def read_plan(out: Path) -> dict:
    return json.loads((out / "plan.json").read_text())


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LMTUNE_CACHE", str(cache))
    return cache


@pytest.fixture
def count_probes(monkeypatch) -> list[int]:
    """Counts calibrations (calls of the probe that runs real steps)."""
    import importlib

    probe_mod = importlib.import_module("lmtune.train.probe")  # `lmtune.train` the attribute is the function

    calls: list[int] = []
    real = probe_mod.probe

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_mod, "probe", counted)
    return calls


# ---- pure logic --------------------------------------------------------------------------------------------


def test_memory_limit_sizes():
    from lmtune._memory import parse_size
    from lmtune.errors import ConfigError

    assert parse_size("20GiB") == 20 * 1024**3 and parse_size("512 MiB") == 512 * 1024**2
    assert parse_size("1.5GB") == 1_500_000_000 and parse_size("2g") == 2 * 1024**3
    for bad in ("20", "GiB", "-1GiB", "0GiB", "20 parsecs"):
        with pytest.raises(ConfigError, match="--memory-limit"):
            parse_size(bad)


def test_evaluations_per_epoch_mirror_the_loop():
    from lmtune.tune.plan import evaluations_per_epoch

    assert evaluations_per_epoch(8, None) == 1
    assert evaluations_per_epoch(8, 4) == 2  # steps 4 and 8
    assert evaluations_per_epoch(7, 4) == 2  # step 4 and the epoch's end
    assert evaluations_per_epoch(9, 3) == 3


def test_linear_fit_through_two_batch_sizes():
    from lmtune.tune.plan import linear_fit

    pts = [{"kind": "longest", "padded_tokens": 200, "seconds": 1.2}, {"kind": "median", "padded_tokens": 100, "seconds": 0.7},
           {"kind": "longest", "padded_tokens": 200, "seconds": 1.2}, {"kind": "median", "padded_tokens": 100, "seconds": 0.7}]
    a, b = linear_fit(pts)
    assert a == pytest.approx(0.2) and b == pytest.approx(0.005)
    # noise (the longer batch faster) gives a constant, never a negative slope
    a, b = linear_fit([{"kind": "longest", "padded_tokens": 200, "seconds": 0.5}, {"kind": "median", "padded_tokens": 100, "seconds": 0.7}])
    assert b == 0 and a == pytest.approx(0.6)


def test_formula_terms_follow_the_precision_and_device():
    from lmtune.tune.plan import CPU_RUNTIME_BYTES, Arch, Batch, Counts, memory_terms

    arch = Arch("llama", hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, intermediate=128, vocab=1000, gated=True,
                attention_dropout=0.0)
    counts = Counts(total=1_000_000, trainable=1_000_000, matmul=800_000, largest=100_000)
    kw = dict(attention="lmtune_eager", task="classification", train=Batch(8, 32), evaluation=Batch(16, 32),
              accumulate=False, keep_best=True)
    fp32 = memory_terms(arch, counts, mode="no", **kw)
    assert (fp32["weights"], fp32["gradients"], fp32["optimizer"], fp32["best_weights"]) == (4e6, 4e6, 8e6, 4e6)
    assert fp32["runtime"] == CPU_RUNTIME_BYTES and fp32["allocator"] > 0
    master = memory_terms(arch, counts, mode="bf16-master", **kw)
    assert master["weights"] == 6e6 and master["activations"] < fp32["activations"]
    autocast = memory_terms(arch, counts, mode="bf16", **kw)
    assert autocast["weights"] == 4e6 + 2 * 800_000  # the 16-bit copies of the matmul weights
    lora = memory_terms(arch, Counts(1_000_000, 10_000, 800_000, 1000), mode="no", **kw)
    assert lora["optimizer"] == 80_000 and lora["weights"] == 4e6
    gen = memory_terms(arch, counts, mode="no", **{**kw, "task": "generation", "train": Batch(8, 32, 100)})
    assert gen["logits"] == 4 * 8 * 32 * 1000 + 12 * 100 * 1000
    assert gen["peak"] == gen["runtime"] + gen["weights"] + gen["optimizer"] + max(
        gen["gradients"] + gen["activations"] + gen["backward"] + gen["allocator"] + gen["logits"], gen["evaluation"]
    ) + gen["best_weights"]
    # On a GPU: no runtime or heap allowance, the best weights live in host memory, half the gradients overlap.
    gpu = memory_terms(arch, counts, mode="no", cuda=True, **{**kw, "task": "generation", "train": Batch(8, 32, 100)})
    assert gpu["runtime"] == gpu["allocator"] == gpu["best_weights"] == 0
    assert gpu["peak"] == gpu["weights"] + gpu["optimizer"] + gpu["gradients"] // 2 + gpu["activations"] + gpu["backward"] + gpu["logits"]


# ---- the plan of a space -------------------------------------------------------------------------------------


def test_plan_has_a_row_per_batch_and_length(tune_data, tiny_llama, tmp_path, fresh_cache, capsys):
    out = tmp_path / "p"
    code = main(plan_args(tune_data, tiny_llama, out, "--batch-size", "8,16", "--max-length", "16,32", "--budget", "10m"))
    assert code == 0
    text = capsys.readouterr().out
    assert "s/step" in text and "written:" in text
    plan = read_plan(out)
    shapes = sorted((r["shape"]["global_batch_size"], r["shape"]["micro_batch_size"], r["shape"]["max_length"]) for r in plan["rows"])
    assert shapes == [(8, 8, 16), (8, 8, 32), (16, 16, 16), (16, 16, 32)]
    from transformers import AutoModelForSequenceClassification

    real = AutoModelForSequenceClassification.from_pretrained(tiny_llama, num_labels=2)
    for r in plan["rows"]:
        assert r["fits"] and r["total_params"] == sum(p.numel() for p in real.parameters())
        assert r["trainable_params"] == r["total_params"]  # --method full
        assert r["step_s"] > 0 and r["eval_s"] > 0 and r["fixed_s"] > 0 and r["trials_in_budget"] >= 1
        assert r["memory"]["peak"] > r["memory"]["weights"] > 0 and r["measured_peak"] > 0
        assert r["steps_per_epoch"] == -(-120 // r["shape"]["global_batch_size"])
    assert plan["trials_in_budget"] >= 1 and plan["memory_limit_bytes"] > 0


def test_second_plan_does_not_calibrate(tune_data, tiny_llama, tmp_path, fresh_cache, count_probes):
    from lmtune.config import DataConfig, ModelConfig, RunConfig, SearchConfig, TrainConfig, TuneConfig
    from lmtune.tune.plan import plan

    run = RunConfig(data=DataConfig(train_file=tune_data["train"], val_file=tune_data["val"]),
                    model=ModelConfig(name=tiny_llama), train=TrainConfig(max_length=32, epochs=1),
                    output_dir=str(tmp_path / "p"))
    search = SearchConfig(global_batch_size="8,16")
    first = plan(run, search, TuneConfig())
    assert len(count_probes) == 2 and first.calibrated == 2 and first.cached == 0
    second = plan(run, search, TuneConfig())
    assert len(count_probes) == 2, "the second plan calibrated again"
    assert second.cached == 2 and {r.calibration for r in second.rows} == {"cached"}
    assert [r.step_s for r in second.rows] == [r.step_s for r in first.rows]


def test_bad_memory_limit_is_a_one_line_error(tune_data, tiny_llama, tmp_path, fresh_cache, capsys):
    for limit, message in (("20", "--memory-limit must look like 20GiB"),
                           ("1KiB", "no configuration of the search space fits in memory")):
        code = main(plan_args(tune_data, tiny_llama, tmp_path / "p", "--memory-limit", limit))
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err


# ---- memory: the formula against a measurement -------------------------------------------------------------


def _long_rows(path: Path, n: int, words: int) -> str:
    rng = random.Random(0)
    lines = ["sentence\tlabel"]
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        text = [rng.choice(FILLER) for _ in range(words)]
        text[rng.randrange(words)] = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        lines.append(" ".join(text) + "\t" + label)
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> str:
    """Wider than the session's tiny model (3M parameters), so weights, optimizer and activations are tens of MB
    each and dwarf what a process allocates besides (a few MB)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tokenizer

    folder = tmp_path_factory.mktemp("small-llama")
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return str(folder)


def test_formula_predicts_the_measured_peak(small_llama, tmp_path, fresh_cache):
    """fp32 (the same on every CPU), 32 rows of 64 tokens: the formula's training peak within 15% of the measured one."""
    from transformers import AutoConfig

    from lmtune.config import DataConfig, ModelConfig, RunConfig, TrainConfig
    from lmtune.tasks import resolve_task
    from lmtune.train.probe import probe
    from lmtune.tune.plan import Arch, Batch, attention_kind, count_params, memory_terms

    train = _long_rows(tmp_path / "train.tsv", 64, 70)
    val = _long_rows(tmp_path / "val.tsv", 16, 70)
    run = RunConfig(data=DataConfig(train_file=train, val_file=val),
                    model=ModelConfig(name=small_llama),
                    train=TrainConfig(global_batch_size=32, max_length=64, precision="fp32"), output_dir=str(tmp_path / "o"))
    task, run = resolve_task(run)
    bundle = task.load_data(run)
    cache = str(fresh_cache / "tokenized")
    warm = RunConfig.from_dict(run.to_dict() | {"train": run.train.__dict__ | {"global_batch_size": 4}})
    probe(warm, bundle=bundle, tokenized_cache_dir=cache, scratch=tmp_path / "s")  # the runtime's one-time allocations
    result = probe(run, bundle=bundle, tokenized_cache_dir=cache, scratch=tmp_path / "s")
    assert result.peak_rows == 32 and result.peak_width == 64
    config = AutoConfig.from_pretrained(small_llama)
    arch = Arch.of(config)
    counts = count_params(config, task="classification", n_labels=2, model_cfg=run.model)
    assert (counts.total, counts.trainable) == (result.total_params, result.trainable_params)
    terms = memory_terms(arch, counts, mode="no", attention=attention_kind("auto", arch, cuda=False), task="classification",
                         train=Batch(32, 64), evaluation=Batch(16, 64), accumulate=False, keep_best=False)
    predicted, measured = terms["training_peak"], result.peak_bytes
    assert terms["activations"] > terms["weights"]  # the test is about the activation formula too
    assert abs(predicted - measured) / measured < 0.15, (predicted / 2**20, measured / 2**20, terms)


# ---- in a search -------------------------------------------------------------------------------------------


def test_shape_over_the_limit_is_reported_and_never_trained(tune_data, tiny_llama, tmp_path, fresh_cache, monkeypatch, capsys):
    """Batch 16 needs more than the limit (the formula is made to say so: a tiny model's real peak is too small to
    sit reliably between two limits); it is listed before the search and every trial that draws it is failed at once."""
    import importlib

    plan_mod = importlib.import_module("lmtune.tune.plan")

    real = plan_mod.memory_terms

    def heavy_batch_16(*args, **kwargs):
        terms = real(*args, **kwargs)
        if kwargs["train"].rows == 16:
            terms = dict(terms, activations=64 * 2**30, peak=terms["peak"] + 64 * 2**30)
        return terms

    monkeypatch.setattr(plan_mod, "memory_terms", heavy_batch_16)
    out = tmp_path / "s"
    code = main(base_args(tune_data, tiny_llama, out, "--batch-size", "8,16", "--epochs", "1", "--n-trials", "2",
                          "--memory-limit", "4GiB", "--sampler", "random", "--pruner", "none"))
    text = capsys.readouterr().out
    assert code == 0
    plan = read_plan(out)
    unfit = [r for r in plan["rows"] if not r["fits"]]
    assert [r["shape"]["global_batch_size"] for r in unfit] == [16] and "limit 4.00 GiB" in unfit[0]["reason"]
    assert unfit[0]["calibration"].startswith("not run")
    assert text.index("NO: needs") < text.index("trial 0")  # reported before the search
    study = load(out)
    runs = [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(runs) == 2 and all(t.params.get("global_batch_size", 8) == 8 for t in runs)
    skipped = [t for t in study.get_trials() if t.system_attrs.get("lmtune_unfit")]
    assert skipped, "the default configuration (batch 16) at least is drawn"
    for t in skipped:
        assert t.state.name == "FAIL" and t.params["global_batch_size"] == 16
        assert "would not fit in memory" in t.user_attrs["fail_reason"]
        assert not t.intermediate_values and "history" not in t.user_attrs  # never trained
    assert "not run (would not fit in memory)" in text


def test_study_keeps_predicted_against_actual(tune_data, tiny_llama, tmp_path, fresh_cache):
    out = tmp_path / "s"
    code = main(base_args(tune_data, tiny_llama, out, "--lr", "3e-3", "--epochs", "1", "--n-trials", "2", "--pruner", "none",
                          "--report"))
    assert code == 0
    check = json.loads((out / "plan_check.json").read_text())
    assert [r["trial"] for r in check["trials"]] == [0, 1]
    for r in check["trials"]:
        assert r["predicted_s"] > 0 and r["actual_s"] > 0 and r["time_error_pct"] is not None
        assert r["predicted_peak_gib"] > 0 and r["peak_gib"] is not None and r["evaluations"] == 2
    assert check["summary"]["trials"] == 2 and check["summary"]["median_abs_time_error_pct"] is not None
    for t in load(out).get_trials():
        assert t.user_attrs["plan_seconds"] > 0 and t.user_attrs["plan"]["steps_per_epoch"] == 8
    assert json.loads((out / "study.json").read_text())["plan"] == "plan.json" and (out / "plan.json").is_file()
    html = (out / "report.html").read_text()
    assert "How good was the plan" in html and "median |error|" in html
    # plan_check.json is read like every file of a study folder: untrusted.
    (out / "plan_check.json").write_text(json.dumps({"trials": [
        {"trial": "x", "state": "<script>alert(1)</script>", "actual_s": "fast", "time_error_pct": None}, 7]}))
    from lmtune.report import write_report

    html = Path(write_report(str(out))).read_text()
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)" in html


def test_no_plan_skips_it(tune_data, tiny_llama, tmp_path, fresh_cache, count_probes):
    out = tmp_path / "s"
    assert main(base_args(tune_data, tiny_llama, out, "--lr", "3e-3", "--epochs", "1", "--n-trials", "1", "--no-plan")) == 0
    assert not count_probes and not (out / "plan.json").exists() and not (out / "plan_check.json").exists()
    assert "plan_seconds" not in load(out).get_trials()[0].user_attrs


@pytest.mark.parametrize("method", ["lora", "head"])
def test_meta_count_is_the_loaded_models(tiny_llama, method):
    """Parameters are counted without loading weights, LoRA through peft, and agree with the model a trial trains."""
    from transformers import AutoConfig

    from lmtune.config import ModelConfig
    from lmtune.models import load_classifier
    from lmtune.tune.plan import count_params

    cfg = ModelConfig(name=tiny_llama, method=method)
    counts = count_params(AutoConfig.from_pretrained(tiny_llama), task="classification", n_labels=2, model_cfg=cfg)
    loaded = load_classifier(cfg, ["neg", "pos"])
    assert (counts.total, counts.trainable) == (loaded.total_params, loaded.trainable_params)
    assert counts.trainable < counts.total


def test_a_calibration_warns_of_other_work_not_of_its_own_threads():
    from types import SimpleNamespace

    from lmtune.tune.plan import _busy

    plan = SimpleNamespace(machine={"cores": 2}, device="cpu")
    cache = SimpleNamespace(path="/cache")
    alone = [{"extra": {"load_average": 2.01, "threads": 2}}]  # its own two threads, nothing else
    assert _busy(alone, plan, cache) is None
    beside = [{"extra": {"load_average": 2.0, "threads": 2}}, {"extra": {"load_average": 3.6, "threads": 2}}]
    warning = _busy(beside, plan, cache)
    assert warning and "~1.6 above its own threads" in warning and "/cache" in warning
    one_thread = [{"extra": {"load_average": 2.2, "threads": 1}}]  # a second core's worth of other work
    assert _busy(one_thread, plan, cache) is not None
    old_entry = [{"extra": {"load_average": 2.5}}]  # cached before threads were recorded: all cores assumed
    assert _busy(old_entry, plan, cache) is None
    assert _busy(beside, SimpleNamespace(machine={"cores": 2}, device="cuda"), cache) is None


def test_a_trial_that_decodes_only_at_its_end_pays_for_decoding_once():
    from lmtune.tune.plan import Row, Shape

    def row(final_only: bool) -> Row:
        r = Row(Shape("m", "full", 16, 16, 128), "fp32", steps_per_epoch=10, evals_per_epoch=2, step_s=1.0, eval_s=3.0,
                decode_s=5.0, decode_final_only=final_only, fixed_s=20.0)
        return r

    # 3 epochs: 30 steps, 6 loss passes; decoding at all 6 evaluations, or at the last one only.
    assert row(False).trial_seconds(3) == pytest.approx(20 + 30 + 6 * 3 + 6 * 5)
    assert row(True).trial_seconds(3) == pytest.approx(20 + 30 + 6 * 3 + 5)
    assert row(False).evaluation_s == 8.0 and row(True).evaluation_s == 3.0  # the s/eval column


def test_a_generation_plan_on_a_cpu_says_how_far_the_heap_can_grow():
    from lmtune.tune.plan import heap_note

    note = heap_note("generation", "cpu")
    assert note is not None and "MALLOC_MMAP_THRESHOLD_" in note and "40%" in note
    assert heap_note("classification", "cpu") is None  # measured within 11% there (bench/results/plan-check-cpu)
    assert heap_note("generation", "cuda") is None  # the caching allocator: measured within 3%


def _fake_plan(step_s: list[float], steps_per_epoch: int, eval_s: float, fixed_s: float = 20.0, calibrated: int = 1,
               fits: bool = True):
    """A plan of one-step-time-per-shape rows, two evaluations per epoch, built from Row itself."""
    from types import SimpleNamespace

    from lmtune.tune.plan import Row

    rows = []
    for s in step_s:
        r = Row.__new__(Row)
        r.fits, r.step_s, r.eval_s, r.fixed_s, r.decode_s, r.decode_final_only = fits, s, eval_s, fixed_s, 0.0, False
        r.steps_per_epoch, r.evals_per_epoch = steps_per_epoch, 2
        rows.append(r)
    return SimpleNamespace(epochs=(1, 3, 2.0), rows=rows, max_steps=None, calibrated=calibrated, calibration_s=310.0)


def test_a_budget_that_fits_no_trial_says_what_would_fit():
    from lmtune.tune.study import no_trial_fits

    # As on a 2-core AVX2 machine with 12,800 emotion rows (800 steps of batch 16) and 3,200 validation rows:
    # 3.3 s per step, 166 s per evaluation -> 20 + 2640 + 332 = 2992 s for one epoch; 410 s of 12 min left.
    emotion = _fake_plan([3.3], 800, 166.0)
    msg = no_trial_fits(emotion, 720.0, 310.0, 12800, 3200, 0.3)
    assert msg is not None and "\n" not in msg
    assert msg.startswith("--budget 12 min fits no trial") and "~50 min" in msg and "7 min of the budget" in msg
    assert "calibration (310 s of it) is cached" in msg
    # 6 typical trials (2 epochs: 5964 s) and the 30 % reserve: 6 x 5964 / 0.7 = 14.2 h. A sample would have to be
    # (84 - 20) / 5944 = 1.1 % of the rows: 137 to train on, 34 to score on, too few to search on.
    assert "--budget 14.2 h for about 6 trials" in msg and "--max-train-rows" not in msg
    # 40 minutes: 280 s per trial -> (280 - 20) / 5944 = 4.4 % of the rows: 559 to train on, 139 to score on.
    forty = no_trial_fits(emotion, 2400.0, 0.0, 12800, 3200, 0.3)
    assert "--max-train-rows 550 --max-val-rows 130 (the winner is refit" in forty
    assert no_trial_fits(emotion, 7200.0, 0.0, 12800, 3200, 0.3) is None  # 2 h: a one-epoch trial (2992 s) fits
    # Undeclared epochs grow as the rows shrink (2..6 below 1,000 rows: a mean of 4), so the sample must be smaller
    # still: (280 - 20) / (4 x 2972) = 2.2 % of the rows, 69 to score on: no sample is worth suggesting.
    by_rows = no_trial_fits(emotion, 2400.0, 0.0, 12800, 3200, 0.3, lambda rows: 4.0 if rows < 1000 else 2.0)
    assert by_rows is not None and "--max-train-rows" not in by_rows and "--budget 14.2 h" in by_rows
    # The cheapest shape and the fewest epochs decide; one that fits what is left is no refusal.
    assert no_trial_fits(_fake_plan([3.3, 0.1], 800, 10.0), 720.0, 310.0, 12800, 3200, 0.3) is None
    # A calibration that took the budget a small search needed: the rerun, which skips it, is the advice.
    slow_calibration = no_trial_fits(_fake_plan([0.1], 10, 1.0), 600.0, 590.0, 160, 40, 0.3)
    assert slow_calibration.endswith("cached; rerun the same command: the whole budget then goes to the search")
    # Shapes that do not fit in memory are never trained, so they do not count as cheap.
    assert no_trial_fits(_fake_plan([0.001], 10, 0.1, fits=False), 720.0, 0.0, 100, 40, 0.3) is None


def test_tune_refuses_a_budget_that_fits_no_trial_and_leaves_no_study(tune_data, tiny_llama, tmp_path, monkeypatch,
                                                                      capsys):
    from lmtune.tune import plan as plan_mod

    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    # Every step costs 60 s by the plan: 120 rows / batch 16 x 2 epochs = 16 steps = 16 min a trial.
    monkeypatch.setattr(plan_mod.Row, "trial_seconds",
                        lambda self, epochs, max_steps=None: self.steps_per_epoch * epochs * 60.0)
    out = tmp_path / "study"
    code = main(base_args(tune_data, tiny_llama, out, "--budget", "10m", "--n-trials", "none"))
    err = capsys.readouterr().err
    assert code == 2, err
    line = [x for x in err.splitlines() if "fits no trial" in x]
    assert len(line) == 1 and "--budget 10 min fits no trial" in line[0] and "~16 min" in line[0], err
    assert "Traceback" not in err
    import optuna
    assert optuna.get_all_study_names(f"sqlite:///{out / 'study.db'}") == []  # nothing ran, nothing kept
    # The same --out takes a rerun on other rows (a sample), which a kept study would refuse as other data.
    monkeypatch.undo()
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    assert main(base_args(tune_data, tiny_llama, out, "--max-train-rows", "64", "--n-trials", "1")) == 0
    assert len(load(out).trials) == 1


def _twelve_minute_study(tune_data, tiny_llama, tmp_path, monkeypatch, capsys, n_trials: int):
    """A 12-minute study over 1..3 epochs where, by the plan, an epoch takes 8 minutes (120 rows in batches of 16: 8
    steps at 60 s a step): the out folder, its trials in order, and the log."""
    from lmtune.tune import plan as plan_mod

    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(plan_mod.Row, "trial_seconds",
                        lambda self, epochs, max_steps=None: self.steps_per_epoch * epochs * 60.0)
    out = tmp_path / "study"
    code = main(base_args(tune_data, tiny_llama, out, "--epochs", "1..3", "--budget", "12m", "--n-trials",
                          str(n_trials), "--sampler-seed", "0", "--pruner", "none"))
    err = capsys.readouterr()
    assert code == 0, err
    return out, sorted(load(out).get_trials(), key=lambda t: t.number), err.out + err.err


def test_a_trial_that_would_not_finish_in_the_budget_left_is_not_run(tune_data, tiny_llama, tmp_path, monkeypatch,
                                                                     capsys):
    """The documented defaults (3 epochs) would take 24 min by the plan, a 1-epoch trial 8: in a 12-minute budget
    the defaults are not run (said, in the log and the answer) and the search goes on with what fits, instead of
    starting a trial that overruns the budget 2x."""
    import optuna

    from lmtune.tune.answer import DEFAULT_ATTR

    out, trials, log = _twelve_minute_study(tune_data, tiny_llama, tmp_path, monkeypatch, capsys, n_trials=3)
    first = trials[0]
    assert first.user_attrs.get(DEFAULT_ATTR) and first.params["epochs"] == 3
    assert first.state == optuna.trial.TrialState.FAIL
    assert first.user_attrs["fail_reason"].startswith("not run: would not finish in the budget: ~1440 s by the plan")
    assert first.system_attrs.get("lmtune_over_budget") is True
    ran = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(ran) == 3  # the skipped defaults did not use up one of the 3 trials
    # Until a trial has run, the plan is taken as it is: only 1 epoch (480 s) fits in what is left of 720 s.
    # After it, the plan is corrected by what trials took here (a second, not 480 s), and every epoch count fits.
    assert ran[0].params["epochs"] == 1 and ran[0].user_attrs["plan_seconds"] == 480.0
    skipped_later = [t for t in trials if t.number > ran[0].number and t.state == optuna.trial.TrialState.FAIL]
    assert skipped_later == []
    assert "trial 0: not run" in log and "the answer has no defaults to compare tuning against" in log
    assert "not run (would not finish in the budget)" in log
    answer = json.loads((out / "answer.json").read_text())
    assert any(s.startswith("The defaults (trial #0) did not run (not run: would not finish in the budget")
               for s in answer["statements"]), answer["statements"]
    # TPE's random start-up is a third of the trials this search will run (here the cap of 3: the minimum, 3).
    meta = json.loads((out / "study.json").read_text())
    assert meta["tpe_startup_trials"] == 3
    assert "sampler tpe: the first 3 finished trials are its random start-up (a third of 3 trials, 3 to 10)" in log


def test_near_the_budget_end_a_random_draw_replaces_proposals_that_would_not_finish(tune_data, tiny_llama, tmp_path,
                                                                                     monkeypatch, capsys):
    """TPE knows nothing of time. Here it proposes 3 epochs (24 min by the plan) over and over in a 12-minute budget
    where 1 epoch (8 min) fits: after 5 such proposals the next is drawn at random from the same space until one
    fits, and the search runs it instead of stopping after 20 proposals with the budget unused."""
    import importlib

    import optuna

    from lmtune.tune.answer import FILL_ATTR

    study_mod = importlib.import_module("lmtune.tune.study")
    monkeypatch.setattr(study_mod, "_plan_scale", lambda study: 1.0)  # the plan's 480 s an epoch, however fast it ran
    real = study_mod._sampler

    def three_epochs_always(tc, startup, trial_number=None):
        base = real(tc, startup, trial_number)
        return base if tc.sampler == "random" else optuna.samplers.PartialFixedSampler({"epochs": 3}, base)

    monkeypatch.setattr(study_mod, "_sampler", three_epochs_always)
    _, trials, log = _twelve_minute_study(tune_data, tiny_llama, tmp_path, monkeypatch, capsys, n_trials=2)
    ran = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(ran) == 2 and all(t.params["epochs"] == 1 for t in ran)
    assert all(t.user_attrs[FILL_ATTR].startswith("drawn at random: the last ") for t in ran)
    assert "configurations drawn would not finish in the " in ran[0].user_attrs[FILL_ATTR]
    before_first = [t for t in trials if t.number < ran[0].number]
    assert len(before_first) >= 5 and all(t.system_attrs.get("lmtune_over_budget") for t in before_first)
    assert all(t.params["epochs"] == 3 for t in before_first[:5])  # the defaults and TPE's four
    assert f"trial {ran[0].number}: drawn at random: the last " in log


def test_tpe_start_up_is_a_third_of_the_trials_the_search_will_run():
    """Optuna's 10 random trials suit hundreds of trials; a 30-minute search here runs about ten, so a budget alone
    used to make TPE a random search but for its last trial."""
    from lmtune.tune.study import startup_trials

    assert startup_trials(None, 11) == 3  # a budget alone that the plan expects to fit ~11 trials
    assert startup_trials(None, 18) == 6
    assert startup_trials(None, 45) == 10  # never more than Optuna's own default
    assert startup_trials(20, None) == 6  # --n-trials alone (no plan, or no budget): as before
    assert startup_trials(60, 18) == 6  # the budget ends the search before the cap does
    assert startup_trials(9, 40) == 3  # the cap ends it first
    assert startup_trials(2, None) == 3  # never fewer than 3: TPE needs some spread to model
    assert startup_trials(None, 0) == 10  # the plan expects none (a budget it would refuse) or nothing is known
    assert startup_trials(None, None) == 10


def test_the_plan_is_corrected_by_the_trials_that_ran():
    import optuna

    from lmtune.tune.study import _plan_scale

    study = optuna.create_study()
    assert _plan_scale(study) == 1.0  # nothing measured yet: the plan as it is
    for seconds, planned in ((30.0, 60.0), (50.0, 100.0), (90.0, 60.0)):
        study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"seconds": seconds, "plan_seconds": planned}))
    # A pruned trial ran only part of what was planned: it says nothing about the plan's full-trial time.
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.PRUNED,
                                              user_attrs={"seconds": 1.0, "plan_seconds": 100.0}))
    assert _plan_scale(study) == 0.5  # the median of 0.5, 0.5, 1.5
