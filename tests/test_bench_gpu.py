"""bench/gpu.py (`python -m bench gpu`): the GPU check's code paths, run here with --tiny on the CPU.

The inputs are built in the test (a byte-level BPE tokenizer, Llama and Gemma 3 configs, sentiment and
prompt -> completion files), so the test needs neither the real tokenizers of .gpu-assets nor a GPU.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import build_tokenizer, make_sentence, write_sentiment

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PARTS = ("cls-smollm2", "cls-gemma3", "gen-smollm2", "gen-gemma3")


def _assets(root: Path) -> dict[str, Path]:
    """Model folders (config.json + tokenizer, no weights) and a data folder laid out as .gpu-assets/ is."""
    from transformers import Gemma3TextConfig, LlamaConfig

    tok = build_tokenizer()
    common = dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                  max_position_embeddings=256, tie_word_embeddings=True)
    llama, gemma, data = root / "smollm2", root / "gemma3", root / "data"
    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, **common).save_pretrained(llama)
    Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                     num_key_value_heads=1, head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                     layer_types=["sliding_attention", "sliding_attention", "full_attention"], **common).save_pretrained(gemma)
    for folder in (llama, gemma):
        tok.save_pretrained(folder)
    write_sentiment(data / "sst2" / "train.tsv", 160, seed=1)
    write_sentiment(data / "sst2" / "validation.tsv", 48, seed=2)
    rng = random.Random(0)
    for name, groups in (("train.csv", 60), ("test.csv", 12)):
        rows = ["mr,ref"]
        for _ in range(groups):
            mr = make_sentence(rng, rng.choice(["pos", "neg"]))
            rows += [f"{mr},{make_sentence(rng, 'pos')}" for _ in range(2)]  # two references per prompt, as in E2E
        (data / "e2e_nlg").mkdir(parents=True, exist_ok=True)
        (data / "e2e_nlg" / name).write_text("\n".join(rows) + "\n")
    return {"model_dir": llama, "gemma_dir": gemma, "data_dir": data}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.slow
def test_tiny_run_writes_every_part(tmp_path):
    a = _assets(tmp_path / "assets")
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", LMTUNE_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "-m", "bench", "gpu", "--tiny", "--out", str(out), "--model-dir", str(a["model_dir"]),
                        "--gemma-dir", str(a["gemma_dir"]), "--data-dir", str(a["data_dir"])],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    res = json.loads((out / "gpu-cpu-tiny.json").read_text())
    assert res["errors"] == [] and res["skipped"] == []
    assert res["finished"] and res["settings"]["tiny"] is True and res["machine"]["torch"]
    assert set(res["models"]) == {"smollm2", "gemma3"}
    assert set(res["parts"]) >= {*TRAIN_PARTS, "decode-smollm2", "study-smollm2"}
    for pid in TRAIN_PARTS:
        part = res["parts"][pid]
        assert set(part["contenders"]) == {"lmtune", "trainer"}, pid
        for name, r in part["contenders"].items():
            assert "error" not in r, (pid, name, r.get("traceback"))
            assert r["steps_done"] == res["settings"]["steps"], (pid, name)
            for k in ("median_s_per_step", "mean_s_per_step", "tokens_per_s", "val_loss", "eval_seconds", "peak_rss_mb"):
                assert _finite(r[k]) and r[k] >= 0, (pid, name, k, r[k])
            assert r["tokens_per_s"] > 0 and r["attn_implementation"], (pid, name)
            if pid.startswith("cls"):
                assert 0 <= r["val_accuracy"] <= 1
        assert part["contenders"]["lmtune"]["timing_source"] == "step hooks"
        for k in ("step_speedup_mean", "step_speedup_median", "tokens_per_s_ratio", "val_loss_diff"):
            assert _finite(part["ratios"][k]), (pid, k)
    d = res["parts"]["decode-smollm2"]["contenders"]["decode"]
    assert _finite(d["lmtune_s"]) and _finite(d["plain_s"]) and d["prompts"] > 0
    assert d["lmtune_new_tokens"] > 0 and 0 <= d["identical_outputs"] <= d["prompts"]
    assert set(d["generate_and_score_metrics"]) >= {"exact_match", "rougeL", "bleu", "chrf"}
    st = res["parts"]["study-smollm2"]["contenders"]["study"]
    assert len(st["trials"]) == 3 and st["counts"]["complete"] + st["counts"]["pruned"] == 3, st["trials"]
    assert _finite(st["wall_s"]) and st["best_saved"]
    md = (out / "gpu-cpu-tiny.md").read_text()
    assert "| cls-smollm2 |" in md and "### Decoding" in md and "### Study" in md
    assert (out / "gpu-cpu-tiny-logs" / "cls-smollm2-lmtune.log").is_file()


def test_without_cuda_it_says_so(tmp_path, monkeypatch, capsys):
    import torch

    from bench import gpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu.main(["--out", str(tmp_path)]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_markdown_shows_failures_and_partial_results():
    from bench import gpu
    res = {"started": "now", "finished": None, "seconds": 12.0, "settings": {"tiny": False, "batch": 32, "lr": 1e-4, "warmup_ratio": 0.06,
           "weight_decay": 0.01, "steps": 30, "warmup_steps": 2, "cls": {"rows": 4000, "max_length": 64},
           "gen": {"rows": 3000, "max_length": 128}},
           "machine": {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11"},
           "parts": {"cls-smollm2": {"kind": "train", "shape_name": "SmolLM2", "contenders": {
               "lmtune": {"median_s_per_step": 0.05, "mean_s_per_step": 0.051, "tokens_per_s": 1e5, "precision": "bf16"},
               "trainer": {"error": "RuntimeError: boom", "traceback": "..."}}},
               "study-smollm2": {"kind": "study", "shape_name": "SmolLM2", "contenders": {}}},
           "errors": [{"part": "cls-smollm2", "contender": "trainer", "error": "RuntimeError: boom"}],
           "skipped": [{"part": "gen-gemma3", "why": "budget: 3 s left"}]}
    md = gpu.markdown(res)
    assert "FAILED: RuntimeError: boom" in md and "skipped gen-gemma3" in md and "cut short" in md
    assert gpu.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"


def test_merge_keeps_what_each_run_measured_and_drops_skips_a_later_run_filled():
    from bench import gpu
    machine = {"device": "cuda", "gpu": "NVIDIA H200", "torch": "2.11", "transformers": "5.17"}
    first = {"started": "t1", "finished": "t1e", "seconds": 300.0, "machine": machine, "models": {"smollm2": {"params": 1}},
             "parts": {"cls-smollm2": {"kind": "train", "contenders": {"lmtune": {"median_s_per_step": 0.1}}},
                       "gen-gemma3": {"kind": "train", "contenders": {}}},
             "errors": [], "skipped": [{"part": "gen-gemma3", "contender": "lmtune", "why": "budget: 30 s left"},
                                       {"part": "study-smollm2", "contender": "study", "why": "budget: 30 s left"}]}
    second = {"started": "t2", "finished": "t2e", "seconds": 127.0, "machine": machine, "models": {"gemma3": {"params": 2}},
              "parts": {"gen-gemma3": {"kind": "train", "contenders": {"lmtune": {"median_s_per_step": 0.2}}}},
              "errors": [{"part": "gen-gemma3", "contender": "trainer", "error": "boom"}], "skipped": []}
    merged = gpu.merge_runs([first, second])
    assert merged["parts"]["cls-smollm2"]["contenders"]["lmtune"]["median_s_per_step"] == 0.1
    assert merged["parts"]["gen-gemma3"]["contenders"]["lmtune"]["median_s_per_step"] == 0.2
    assert merged["skipped"] == [{"part": "study-smollm2", "contender": "study", "why": "budget: 30 s left"}]
    assert merged["errors"] == second["errors"] and merged["seconds"] == 427.0
    assert set(merged["models"]) == {"smollm2", "gemma3"} and merged["started"] == "t1 + t2"
    assert first["parts"]["gen-gemma3"]["contenders"] == {}  # the inputs are not changed
    with pytest.raises(SystemExit, match="different machines"):
        gpu.merge_runs([first, dict(second, machine=dict(machine, gpu="NVIDIA H100"))])
    with pytest.raises(SystemExit, match="settings other than --budget"):
        gpu.merge_runs([dict(first, settings={"seed": 0, "budget_s": 330}), dict(second, settings={"seed": 1, "budget_s": 240})])
    # a whole-part skip and an earlier failure go once a later run measured them; a later failure keeps the good result
    third = {"started": "t3", "finished": "t3e", "seconds": 1.0, "machine": machine, "models": {},
             "parts": {"gen-gemma3": {"kind": "train", "contenders": {"trainer": {"median_s_per_step": 0.3},
                                                                      "lmtune": {"error": "RuntimeError: late"}}},
                       "study-smollm2": {"kind": "study", "contenders": {"study": {"trials": []}}}},
             "errors": [{"part": "gen-gemma3", "contender": "lmtune", "error": "RuntimeError: late"}], "skipped": []}
    whole = dict(first, skipped=[{"part": "study-smollm2", "why": "no smollm2 model"}])
    m3 = gpu.merge_runs([whole, second, third])
    assert m3["skipped"] == [] and m3["errors"] == []
    assert m3["parts"]["gen-gemma3"]["contenders"]["lmtune"] == {"median_s_per_step": 0.2}
    assert m3["parts"]["gen-gemma3"]["contenders"]["trainer"] == {"median_s_per_step": 0.3}
    assert "ratios" in m3["parts"]["gen-gemma3"]


def test_merge_from_the_bench_command_line(tmp_path):
    from bench.__main__ import main
    machine = {"device": "cuda", "gpu": "NVIDIA H200", "torch": "2.11", "transformers": "5.17", "cpu_count": 16}
    settings = {"tiny": False, "batch": 32, "lr": 1e-4, "warmup_ratio": 0.06, "weight_decay": 0.01, "steps": 30,
                "warmup_steps": 2, "cls": {"rows": 4000, "max_length": 64}, "gen": {"rows": 3000, "max_length": 128}}
    runs = []
    for k, part in enumerate(("cls-smollm2", "cls-gemma3")):
        res = {"started": f"t{k}", "finished": f"t{k}e", "seconds": 10.0, "machine": machine, "settings": settings,
               "models": {}, "errors": [], "skipped": [],
               "parts": {part: {"kind": "train", "shape_name": part, "contenders": {"lmtune": {"median_s_per_step": 0.1 + k}}}}}
        runs.append(tmp_path / f"run{k}.json")
        runs[-1].write_text(json.dumps(res))
    out = tmp_path / "merged.json"
    assert main(["gpu", "_merge", str(out), *map(str, runs)]) == 0
    assert set(json.loads(out.read_text())["parts"]) == {"cls-smollm2", "cls-gemma3"}
    md = out.with_suffix(".md").read_text()
    assert "| cls-smollm2 |" in md and "| cls-gemma3 |" in md and "t0 + t1" in md


def test_markdown_lists_the_synchronisations_a_counting_run_found():
    from bench import gpu
    res = {"started": "now", "finished": "later", "seconds": 12.0, "settings": {"tiny": False, "batch": 32, "lr": 1e-4,
           "warmup_ratio": 0.06, "weight_decay": 0.01, "steps": 30, "warmup_steps": 2, "cls": {"rows": 4000, "max_length": 64},
           "gen": {"rows": 3000, "max_length": 128}},
           "machine": {"device": "cuda", "gpu": "NVIDIA H200", "torch": "2.11"},
           "parts": {"gen-gemma3": {"kind": "train", "shape_name": "Gemma 3 270M", "contenders": {
               "lmtune": {"median_s_per_step": 0.15, "syncs": {"total": 90, "sites": {"loop.py:466": 30, "loop.py:428": 30,
                                                                                      "generation.py:224": 30}}},
               "trainer": {"median_s_per_step": 0.1, "syncs": {}}}}},
           "errors": [], "skipped": []}
    md = gpu.markdown(res)
    assert "| gen-gemma3 | Gemma 3 270M | lmtune | 90 | 3.0 | `loop.py:466` 30, `loop.py:428` 30, `generation.py:224` 30 |" in md
    assert "| gen-gemma3 | Gemma 3 270M | trainer |" not in md.split("Host-device")[1]


def test_counting_synchronisations_is_a_no_op_without_cuda(monkeypatch):
    import torch

    from bench import gpu
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with gpu.count_syncs(True) as n:
        float(torch.ones(2).sum())
    assert n == {}


def test_synchronisations_are_counted_by_the_line_that_asked_and_the_mode_is_reset(monkeypatch):
    import warnings

    import torch

    from bench import gpu
    modes: list[str] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    clock = gpu.StepClock("cuda", total=2, warmup=0, count_syncs=True)
    monkeypatch.setattr(gpu, "_sync", lambda device: None)
    monkeypatch.setattr(gpu, "_memory", lambda device: {})
    with pytest.raises(RuntimeError), gpu.count_syncs(True) as n:
        for _ in range(2):
            clock.begin()
            warnings.warn("called a synchronizing CUDA operation")  # what torch's warn mode raises, from this line
            warnings.warn("an unrelated warning")
            clock.end()
        raise RuntimeError("a step failed")
    assert modes == ["warn", "default", "warn", "default", "default"]  # on inside steps only; reset on the way out
    assert n["total"] == 2 and list(n["sites"]) == [f"tests/test_bench_gpu.py:{_line_of('synchronizing CUDA')}"]


def _line_of(text: str) -> int:
    lines = Path(__file__).read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line and "warnings.warn" in line)


def test_a_profiled_clock_records_the_steps_after_the_warm_up_by_operator_and_the_report_shows_them(monkeypatch):
    import torch

    from bench import gpu
    monkeypatch.setattr(gpu, "_memory", lambda device: {})
    clock = gpu.StepClock("cpu", total=5, warmup=1, profile_steps=2)
    a = torch.ones(64, 64)
    for step in range(5):
        clock.begin()
        for _ in range(3 if step in (1, 2) else 1):  # the two profiled steps multiply three times, the others once
            a = torch.mm(a, torch.eye(64))
        clock.end()
    prof = clock.profile
    assert prof["steps"] == 2 and clock._profiler is None
    mm = next(row for row in prof["cpu_top"] if row[0] == "aten::mm")
    assert mm[1] == 3.0 and mm[2] > 0  # calls per profiled step: only steps 2 and 3 were recorded
    assert prof["device_top"] == [] and prof["device_ms_per_step"] == 0
    assert clock.stats()["steps_done"] == 5
    res = {"started": "now", "finished": "later", "seconds": 1.0, "settings": {"tiny": False, "batch": 32, "lr": 1e-4,
           "warmup_ratio": 0.06, "weight_decay": 0.01, "steps": 5, "warmup_steps": 1, "cls": {"rows": 4000, "max_length": 64},
           "gen": {"rows": 3000, "max_length": 128}}, "machine": {"device": "cuda", "gpu": "NVIDIA H200", "torch": "2.11"},
           "parts": {"gen-gemma3": {"kind": "train", "shape_name": "Gemma 3 270M",
                                    "contenders": {"lmtune": {"median_s_per_step": 0.15, "profile": prof}}}},
           "errors": [], "skipped": []}
    md = gpu.markdown(res)
    assert "Profile of gen-gemma3 (Gemma 3 270M), lmtune: 2 steps after the warm-up" in md
    assert "| `aten::mm` | 3.0 |" in md
