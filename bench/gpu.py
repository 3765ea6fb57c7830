"""The GPU path, checked: lmtune vs ``transformers.Trainer`` (best GPU flags) on one CUDA device, in a few minutes.

    python -m bench gpu --out bench/results            # on a CUDA machine (~4-5 min on one H100)
    python -m bench gpu --tiny --out /tmp/gpu-tiny      # the same code paths on CPU, tiny model (~2 min, 2 cores)
    python -m bench gpu _merge OUT.json A.json B.json   # one result from runs of the same machine (--parts for what
                                                        # A's budget skipped); the .md is written beside OUT.json
    python -m bench gpu _assets [DIR]                   # write .gpu-assets/ (configs, tokenizers, data) for a machine
                                                        # with no network, from the models converted here
    python -m bench gpu --parts gen-gemma3 --profile-steps 6   # where a part's step time goes, by operator
    python -m bench gpu --parts gen-gemma3 --count-syncs        # its host-device synchronisations, by source line

What it runs, each contender in a fresh process (``python -m bench.gpu _worker SPEC``), contenders alternating
which goes first from one comparison to the next, each comparison in order of priority until ``--budget`` runs out:

1. classification (SST-2 sample), SmolLM2-135M shape and Gemma 3 270M shape: ``lmtune.train`` at its defaults
   (precision auto = bf16 autocast on CUDA, attention auto = the model's default, SDPA, on CUDA) against
   ``Trainer`` with ``bf16``, ``tf32``, length-grouped sampling, ``adamw_torch_fused``, pinned memory, SDPA attention,
   padding to a multiple of 8; the same batch (32), learning rate, schedule, steps and maximum length;
2. generation (E2E sample, prompt -> completion), SmolLM2 shape (Gemma 3 shape last, if time is left): lmtune's
   completion-only loss against ``Trainer`` with a collator that puts -100 on the prompt tokens of the very rows
   lmtune tokenised (no TRL), ``prediction_loss_only``;
3. decoding: ``lmtune.decoding.generate`` (prompts sorted by length, left-padded) against a plain ``model.generate``
   loop over the prompts in file order, same batch size, same greedy settings, bf16 weights;
4. a tiny study: ``lmtune.tune``, 3 trials of a few steps each, on the SST-2 sample with the SmolLM2 shape.

The models are the real architectures built from their real ``config.json`` with random weights
(``AutoModelForCausalLM.from_config``, seed 0): per-step time, throughput and memory do not depend on the values of
the weights, so they match the pretrained checkpoints; accuracy and loss do not mean anything beyond "the two
contenders agree and nothing diverged". The tokenizers are the real ones.

Timing: every step boundary is taken at the end of an optimizer step (lmtune: wrapping its ``_optimizer_step``;
Trainer: ``on_step_end``), with ``torch.cuda.synchronize()`` only at the end of the warm-up and of the last step, so
neither contender loses its CPU/GPU overlap to the measurement. ``mean s/step`` = synchronised time of the timed
steps / their number (exact); ``median s/step`` = median of the per-step intervals; tokens/s counts non-pad tokens of
the timed steps. Peak memory = ``torch.cuda.max_memory_allocated()`` of the contender's own process (after
training, and after the final evaluation).

Writes ``OUT/gpu-<machine>.json`` (all raw numbers, versions, the GPU's name, every failure with its traceback)
and ``OUT/gpu-<machine>.md`` after every contender, so a run cut short keeps what it measured; worker logs go to
``OUT/gpu-<machine>-logs/``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / ".gpu-assets"
SHAPES = {"smollm2": "SmolLM2-135M (Llama)", "gemma3": "Gemma 3 270M"}
RANDOM_WEIGHTS_NOTE = ("Models: the real configs (SmolLM2-135M-Instruct, Gemma 3 270M) with random weights (from_config, "
                       "seed 0) and the real tokenizers; step time, throughput and memory are those of the pretrained "
                       "checkpoints (same shapes, same kernels), accuracy and loss only show that both contenders train "
                       "and agree.")


def tf32_state() -> str:
    """How fp32 matmuls run, read without tripping torch: once transformers' ``tf32=True`` has set the new API
    (``fp32_precision``), reading the legacy ``allow_tf32`` raises (it cost the first H200 run all four Trainer rows)."""
    import torch

    try:
        return str(torch.backends.cuda.matmul.fp32_precision)
    except AttributeError:
        pass
    try:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    except RuntimeError as e:
        return f"unknown ({str(e)[:60]})"


# ---- settings ------------------------------------------------------------------------------------------------


def settings(ns: argparse.Namespace) -> dict[str, Any]:
    tiny = ns.tiny
    s: dict[str, Any] = {
        "tiny": tiny, "device": ns.device or ("cpu" if tiny else "cuda"),
        "steps": 4 if tiny else 30, "warmup_steps": 1 if tiny else 2, "batch": 32, "eval_batch": 64,
        "lr": 1e-4, "warmup_ratio": 0.06, "weight_decay": 0.01, "seed": getattr(ns, "seed", 0),
        "cls": {"rows": 128 if tiny else 4000, "val_rows": 64 if tiny else None, "max_length": 64},
        "gen": {"rows": 96 if tiny else 3000, "val_rows": 32 if tiny else None, "max_length": 128},
        "decode": {"prompts": 8 if tiny else 128, "max_new_tokens": 6 if tiny else 48, "batch": 4 if tiny else 32},
        "study": {"trials": 3, "steps": 2 if tiny else 20, "rows": 96 if tiny else 4000, "val_rows": 48 if tiny else 872},
        "budget_s": ns.budget if ns.budget is not None else (900.0 if tiny else 330.0),
        "count_syncs": bool(getattr(ns, "count_syncs", False)),
        "profile_steps": int(getattr(ns, "profile_steps", 0) or 0),
    }
    if tiny:
        s["batch"], s["eval_batch"] = 8, 16
    if ns.steps is not None:
        s["steps"] = ns.steps
        s["warmup_steps"] = min(s["warmup_steps"], max(0, ns.steps - 1))
        s["study"]["steps"] = min(s["study"]["steps"], ns.steps)
    if ns.prompts is not None:
        s["decode"]["prompts"] = ns.prompts
    for key in ("cls", "gen", "study"):
        if ns.rows is not None:
            s[key]["rows"] = ns.rows
        if ns.val_rows is not None:
            s[key]["val_rows"] = ns.val_rows
    return s


def data_files(data_dir: Path) -> dict[str, dict[str, Any]]:
    return {"cls": {"train_file": str(data_dir / "sst2" / "train.tsv"), "val_file": str(data_dir / "sst2" / "validation.tsv"),
                    "text_column": "sentence", "label_column": "label"},
            "gen": {"train_file": str(data_dir / "e2e_nlg" / "train.csv"), "val_file": str(data_dir / "e2e_nlg" / "test.csv"),
                    "prompt_column": "mr", "completion_column": "ref", "task": "generation"}}


# ---- models from real configs, random weights ----------------------------------------------------------------


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "tokenizer.model", "vocab.json", "merges.txt")


def shrink(config: dict[str, Any]) -> dict[str, Any]:
    """The --tiny model: the same architecture and vocabulary, 2 layers of width 64."""
    c = dict(config)
    c.update(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=min(2, int(c.get("num_key_value_heads") or 2)), head_dim=16)
    if isinstance(c.get("layer_types"), list):
        c["layer_types"] = c["layer_types"][-2:]
    if "query_pre_attn_scalar" in c:
        c["query_pre_attn_scalar"] = 16
    return c


def build_model(asset_dir: Path, target: Path, tiny: bool, seed: int = 0) -> dict[str, Any]:
    """config.json (+ tokenizer files) of ``asset_dir`` -> a transformers folder with random weights (safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    t0 = time.time()
    config = json.loads((asset_dir / "config.json").read_text())
    if tiny:
        config = shrink(config)
    target.mkdir(parents=True, exist_ok=True)
    (target / "config.json").write_text(json.dumps(config, indent=2))
    cfg = AutoConfig.from_pretrained(str(target))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(str(target))
    for name in TOKENIZER_FILES:
        if (asset_dir / name).is_file():
            shutil.copy2(asset_dir / name, target / name)
    n = sum(p.numel() for p in model.parameters())
    return {"path": str(target), "params": n, "architecture": type(model).__name__, "model_type": config.get("model_type"),
            "layers": config.get("num_hidden_layers"), "hidden_size": config.get("hidden_size"),
            "vocab_size": config.get("vocab_size"), "seconds": round(time.time() - t0, 2)}


# ---- worker: one contender in its own process ------------------------------------------------------------------


@contextmanager
def count_syncs(enabled: bool):
    """Collect the host-device synchronisations that torch's sync debug mode reports inside, by the Python line that
    asked for each (one warning per synchronising call: ``.item()``, ``float(tensor)``, a boolean-mask index, ...).
    The mode itself is switched on by ``StepClock`` inside each training step only. Yields ``{"total": n, "sites":
    {"folder/file.py:line": n, ...}}``, filled on exit; empty when not enabled or without CUDA."""
    import warnings

    import torch

    counts: dict[str, Any] = {}
    if not enabled or not torch.cuda.is_available():
        yield counts
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield counts
        finally:  # also when a step raised inside the window
            torch.cuda.set_sync_debug_mode("default")
            sites: dict[str, int] = {}
            for w in caught:
                if "synchroniz" in str(w.message):
                    f = Path(w.filename)
                    key = f"{f.parent.name}/{f.name}:{w.lineno}"
                    sites[key] = sites.get(key, 0) + 1
            counts |= {"total": sum(sites.values()), "sites": dict(sorted(sites.items(), key=lambda kv: -kv[1]))}


def _sync(device: str) -> None:
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def _memory(device: str) -> dict[str, float | None]:
    import resource
    out: dict[str, float | None] = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}
    if device == "cuda":
        import torch
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_gpu_reserved_gb"] = torch.cuda.max_memory_reserved() / 2**30
    return out


def profile_summary(prof: Any, steps: int, top: int = 12) -> dict[str, Any]:
    """Per-step CPU and device time by operator from a ``torch.profiler`` run over ``steps`` steps: the operators
    and runtime calls (``cudaLaunchKernel``, ``cudaMalloc``, ``cudaStreamSynchronize``, ...) that took the most self
    CPU time, and the kernels that took the most device time."""
    rows = prof.key_averages()

    def dev(e: Any) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)) or 0.0)

    n = max(1, steps)
    cpu = sorted(rows, key=lambda e: -e.self_cpu_time_total)[:top]
    gpu = sorted((e for e in rows if dev(e) > 0), key=lambda e: -dev(e))[:top]
    return {"steps": steps,
            "self_cpu_ms_per_step": sum(e.self_cpu_time_total for e in rows) / 1e3 / n,
            "device_ms_per_step": sum(dev(e) for e in rows) / 1e3 / n,
            "cpu_top": [[e.key, e.count / n, e.self_cpu_time_total / 1e3 / n] for e in cpu],
            "device_top": [[e.key, e.count / n, dev(e) / 1e3 / n] for e in gpu]}


class StepClock:
    """Step-boundary timestamps and per-step token counts; synchronises only after the warm-up and the last step.
    With ``profile_steps`` > 0, ``torch.profiler`` records that many steps after the warm-up (``profile``)."""

    def __init__(self, device: str, total: int, warmup: int, count_syncs: bool = False, profile_steps: int = 0):
        self.device, self.total, self.warmup = device, total, warmup
        self.profile_steps = max(0, min(profile_steps, total - warmup))
        self._profiler: Any = None
        self.profile: dict[str, Any] = {}
        # --count-syncs: CUDA's sync debug mode is on inside each step only (begin..end), the same window for both
        # contenders (not model loading, saving or the final evaluation); count_syncs() collects the warnings.
        self.count_syncs = count_syncs and device == "cuda"
        self.stamps: list[float] = []
        self.tokens: list[Any] = []   # per step: ints, or 0-dim tensors summed lazily (no sync per step)
        self.padded: list[int] = []
        self._tok: list[Any] = []
        self._pad = 0
        self.train_memory: dict[str, Any] = {}

    def begin(self) -> None:
        if self.count_syncs:
            import torch
            torch.cuda.set_sync_debug_mode("warn")
        if not self.stamps:
            _sync(self.device)
            self.stamps.append(time.perf_counter())

    def count(self, tokens: Any, padded: int) -> None:
        self._tok.append(tokens)
        self._pad += int(padded)

    def end(self) -> None:
        if self.count_syncs:
            import torch
            torch.cuda.set_sync_debug_mode("default")
        k = len(self.stamps)  # the step that just finished (stamps[0] is the start of step 1)
        profiled_last = self._profiler is not None and k == self.warmup + self.profile_steps
        if k == self.warmup or k >= self.total or profiled_last:
            _sync(self.device)
        if profiled_last:
            self._profiler.stop()
            self.profile = profile_summary(self._profiler, self.profile_steps)
            self._profiler = None
        self.stamps.append(time.perf_counter())
        self.tokens.append(self._tok)
        self.padded.append(self._pad)
        self._tok, self._pad = [], 0
        if k >= self.total:
            self.train_memory = _memory(self.device)
        if self.profile_steps and k == self.warmup and not self.profile:
            from torch.profiler import ProfilerActivity, profile
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
            self._profiler = profile(activities=acts)
            self._profiler.start()

    def stats(self) -> dict[str, Any]:
        times = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
        tokens = [int(sum(int(t) for t in step)) for step in self.tokens]
        n = len(times)
        if n == 0:
            return {"steps_done": 0}
        w = min(self.warmup, n - 1)
        timed = times[w:]
        span = self.stamps[-1] - self.stamps[w]
        tok, pad = sum(tokens[w:]), sum(self.padded[w:])
        return {"steps_done": n, "warmup_steps": w, "steps_timed": len(timed),
                "median_s_per_step": statistics.median(timed), "mean_s_per_step": span / len(timed),
                "tokens_timed": tok, "padded_tokens_timed": pad, "tokens_per_s": tok / span if span > 0 else None,
                "padding_share": 1 - tok / pad if pad else None, "warmup_s": sum(times[:w]),
                "step_times_s": [round(t, 5) for t in times], "tokens_per_step": tokens}


def _data_config(spec: dict[str, Any], part: str):
    from lmtune.config import DataConfig
    d = spec["data"][part]
    return DataConfig(**d, max_train_rows=spec[part]["rows"], max_val_rows=spec[part]["val_rows"])


def _token_cache() -> str:
    """lmtune's tokenised-rows cache (under LMTUNE_CACHE, which the orchestrator points at its scratch folder)."""
    from lmtune.models import cache_root
    return str(cache_root() / "tokenized")


def _load_task_patch(loop: Any, record: dict[str, Any]) -> None:
    """Note what lmtune actually loaded (attention kernel, dtype) without changing it."""
    orig = getattr(loop, "_setup", None)
    if orig is None:
        return

    def setup(*a, **k):
        s = orig(*a, **k)
        try:
            m = s.accelerator.unwrap_model(s.model)
            record["attn_implementation"] = getattr(m.config, "_attn_implementation", None)
            record["param_dtype"] = str(next(m.parameters()).dtype)
            record["device_used"] = str(next(m.parameters()).device)
            record["precision_mixed"] = getattr(s, "mixed", None)
        except Exception as e:  # noqa: BLE001 - the loop's internals changed: the run itself must go on
            record["setup_probe_error"] = f"{type(e).__name__}: {e}"
        return s
    loop._setup = setup


def worker_lmtune(spec: dict[str, Any]) -> dict[str, Any]:
    import importlib

    import torch

    import lmtune
    loop = importlib.import_module("lmtune.train.loop")
    part, device = spec["task"], spec["device"]
    clock = StepClock(device, spec["steps"], spec["warmup_steps"], spec.get("count_syncs", False),
                      spec.get("profile_steps", 0))
    out: dict[str, Any] = {"contender": spec["contender"]}
    # Step boundaries and token counts from the loop's own functions; should they be renamed, the timing falls back
    # to the loop's per-step log (train_log, log_every_steps=1), which times the same steps without the sampler.
    orig_step, orig_loss = getattr(loop, "_optimizer_step", None), getattr(loop, "_task_loss", None)
    hooked = callable(orig_step) and callable(orig_loss)
    if hooked:
        def optimizer_step(*a, **k):
            clock.begin()
            r = orig_step(*a, **k)
            clock.end()
            return r

        def task_loss(*a, **k):
            r = orig_loss(*a, **k)
            if isinstance(r, tuple) and len(r) == 3:
                clock.count(r[1], r[2])
            return r
        loop._optimizer_step, loop._task_loss = optimizer_step, task_loss
    out["timing_source"] = "step hooks" if hooked else "train_log"
    _load_task_patch(loop, out)
    train_kw = dict(learning_rate=spec["lr"], global_batch_size=spec["batch"], max_steps=spec["steps"],
                    warmup_ratio=spec["warmup_ratio"], weight_decay=spec["weight_decay"],
                    max_length=spec[part]["max_length"], seed=spec["seed"], precision=spec.get("precision", "auto"),
                    eval_batch_size=spec["eval_batch"], log_every_steps=1, progress=False, save_checkpoints=False)
    if part == "gen":
        train_kw["eval_generate_rows"] = 0  # loss only, as the Trainer evaluates; decoding is timed on its own
    cfg = lmtune.RunConfig(data=_data_config(spec, part),
                           model=lmtune.ModelConfig(name=spec["model_dir"], attn_implementation=spec.get("attn", "auto")),
                           train=lmtune.TrainConfig(**train_kw), output_dir=spec["workdir"] + "/run", overwrite=True,
                           report=False)
    t0 = time.time()
    with count_syncs(spec.get("count_syncs", False)) as syncs:
        res = lmtune.train(cfg, quiet=False)
    out["run_wall_s"] = time.time() - t0
    if syncs:
        out["syncs"] = syncs
    if clock.profile:
        out["profile"] = clock.profile
    rec = res.record
    last = rec["history"][-1]
    if not hooked or not clock.stamps:
        cum = [0.0] + [e["elapsed_s"] for e in rec["train_log"]]
        clock.stamps = cum
        clock.tokens = [[0] for _ in rec["train_log"]]
        clock.padded = [0 for _ in rec["train_log"]]
        out["timing_source"] = "train_log"
    out |= clock.stats()
    if out["timing_source"] == "train_log":  # no per-step token counts: the run's average
        out["tokens_per_s"] = rec["timing"].get("train_tokens_per_s")
    out |= {"precision": rec["precision"], "val_loss": last.get("val_loss"), "val_accuracy": last.get("accuracy"),
            "val_perplexity": last.get("perplexity"), "eval_seconds": rec["timing"]["eval_seconds"],
            "train_rows": rec["data"]["rows"]["train"], "val_rows": rec["data"]["rows"]["val"],
            "oom_events": rec.get("oom_events"), "train_loss_first": rec["train_log"][0]["loss"] if rec["train_log"] else None,
            "train_loss_last": rec["train_log"][-1]["loss"] if rec["train_log"] else None,
            "total_params": rec["model"]["total_params"], "tf32_matmul": tf32_state()}
    out |= {f"train_{k}": v for k, v in clock.train_memory.items()}
    out |= _memory(device)
    return out


def _trainer_args(spec: dict[str, Any], workdir: str, extra: dict[str, Any]) -> tuple[Any, dict[str, Any], list[str]]:
    """TrainingArguments with the best GPU flags this transformers version has (dropped ones are listed)."""
    import dataclasses

    from transformers import TrainingArguments
    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    cuda = spec["device"] == "cuda"
    kw: dict[str, Any] = dict(
        output_dir=workdir + "/trainer", max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        per_device_eval_batch_size=spec["eval_batch"], learning_rate=spec["lr"], weight_decay=spec["weight_decay"],
        warmup_steps=int(round(spec["warmup_ratio"] * spec["steps"])), lr_scheduler_type="linear", max_grad_norm=1.0,
        seed=spec["seed"], report_to="none", save_strategy="no", logging_strategy="no", eval_strategy="no",
        disable_tqdm=True, bf16=True, optim="adamw_torch_fused", dataloader_num_workers=0)
    if "train_sampling_strategy" in fields:
        kw["train_sampling_strategy"] = "group_by_length"
    else:
        kw["group_by_length"] = True
    if cuda:
        kw |= dict(tf32=True, dataloader_pin_memory=True)
    else:
        kw |= dict(use_cpu=True, dataloader_pin_memory=False)  # tf32 is a CUDA flag: TrainingArguments refuses it here
    kw |= extra
    dropped = sorted(k for k in kw if k not in fields)
    kw = {k: v for k, v in kw.items() if k in fields}
    return TrainingArguments(**kw), kw, dropped


def worker_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    import warnings

    import numpy as np
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, Trainer, TrainerCallback)
    from transformers.utils import logging as hf_logging

    from lmtune.models import load_tokenizer

    hf_logging.set_verbosity_error()
    part, device = spec["task"], spec["device"]
    torch.manual_seed(spec["seed"])
    path = spec["model_dir"]
    tok = load_tokenizer(path)  # AutoTokenizer + a pad token (EOS where there is none), right padding
    multiple = 8 if device == "cuda" else None
    out: dict[str, Any] = {"contender": spec["contender"]}

    if part == "cls":
        from lmtune.data import load_data
        bundle = load_data(_data_config(spec, "cls"))
        max_len = spec["cls"]["max_length"]

        def encode(texts, ids):
            enc = tok(list(texts), truncation=True, max_length=max_len)
            return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": int(ids[i])}
                    for i in range(len(ids))]
        train_ds, val_ds = encode(bundle.train.texts, bundle.train_ids), encode(bundle.val.texts, bundle.val_ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=len(bundle.label_map.labels), dtype=torch.float32, attn_implementation="sdpa")
        from transformers import DataCollatorWithPadding
        collator = DataCollatorWithPadding(tok, pad_to_multiple_of=multiple)

        def metrics(p):
            return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}
        extra: dict[str, Any] = {}
    else:
        # The very rows lmtune trains on, tokenised by lmtune (chat template, -100 on the prompt): what a TRL-less
        # Trainer user writes by hand for a completion-only loss.
        from lmtune.tasks import resolve_task
        import lmtune
        cfg = lmtune.RunConfig(data=_data_config(spec, "gen"), model=lmtune.ModelConfig(name=path),
                               train=lmtune.TrainConfig(max_length=spec["gen"]["max_length"]), output_dir=spec["workdir"] + "/x")
        task, cfg = resolve_task(cfg)
        bundle = task.load_data(cfg)
        train_enc, val_enc = task.encode(tok, bundle, cfg, _token_cache())
        train_ds = [{"input_ids": list(train_enc.input_ids[i]), "labels": list(train_enc.labels[i])} for i in range(len(train_enc))]
        val_ds = [{"input_ids": list(val_enc.input_ids[i]), "labels": list(val_enc.labels[i])} for i in range(len(val_enc))]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
        pad_id = tok.pad_token_id

        def collator(features):
            width = max(len(f["input_ids"]) for f in features)
            if multiple:
                width = -(-width // multiple) * multiple
            ids = torch.full((len(features), width), int(pad_id), dtype=torch.long)
            mask = torch.zeros((len(features), width), dtype=torch.long)
            labels = torch.full((len(features), width), -100, dtype=torch.long)
            for r, f in enumerate(features):
                k = len(f["input_ids"])
                ids[r, :k] = torch.as_tensor(f["input_ids"])
                mask[r, :k] = 1
                labels[r, :k] = torch.as_tensor(f["labels"])
            return {"input_ids": ids, "attention_mask": mask, "labels": labels}
        metrics = None
        extra = {"prediction_loss_only": True}  # else evaluation keeps every [rows x length x vocabulary] logit
    model.config.pad_token_id = tok.pad_token_id
    model.config.use_cache = False

    clock = StepClock(device, spec["steps"], spec["warmup_steps"], spec.get("count_syncs", False),
                      spec.get("profile_steps", 0))

    def count(module, args, kwargs):
        if module.training:
            mask = kwargs.get("attention_mask")
            if mask is not None:
                clock.count(mask.sum(), mask.numel())  # a tensor: summed after training, no sync per step
    model.register_forward_pre_hook(count, with_kwargs=True)

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            clock.begin()

        def on_step_end(self, args, state, control, **kw):
            clock.end()

    args, used, dropped = _trainer_args(spec, spec["workdir"], extra)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, data_collator=collator,
                      compute_metrics=metrics, callbacks=[Timer()])
    t0 = time.time()
    with count_syncs(spec.get("count_syncs", False)) as syncs:
        trainer.train()
    t_train = time.time() - t0
    if syncs:
        out["syncs"] = syncs
    if clock.profile:
        out["profile"] = clock.profile
    t1 = time.time()
    ev = trainer.evaluate()
    _sync(device)
    eval_s = time.time() - t1
    out |= clock.stats()
    out |= {"precision": "bf16" if used.get("bf16") else "fp32", "attn_implementation": model.config._attn_implementation,
            "param_dtype": str(next(model.parameters()).dtype), "val_loss": ev.get("eval_loss"),
            "val_accuracy": ev.get("eval_accuracy"),
            "val_perplexity": math.exp(min(ev["eval_loss"], 50.0)) if part == "gen" and ev.get("eval_loss") is not None else None,
            "eval_seconds": eval_s, "train_seconds_all_steps": t_train, "train_rows": len(train_ds), "val_rows": len(val_ds),
            "run_wall_s": time.time() - t0, "optim": str(args.optim), "flags": {k: str(v) for k, v in used.items()
                                                                                  if k not in ("output_dir",)},
            "flags_dropped": dropped, "tf32_matmul": tf32_state(),
            "total_params": sum(p.numel() for p in model.parameters())}
    out |= {f"train_{k}": v for k, v in clock.train_memory.items()}
    out |= _memory(device)
    return out


def worker_decode(spec: dict[str, Any]) -> dict[str, Any]:
    """lmtune's batched decoding against a plain model.generate loop over the prompts in file order."""
    import torch
    from transformers import AutoModelForCausalLM

    import lmtune
    from lmtune.decoding import generate, padding_tokens, plan_batches
    from lmtune.models import load_tokenizer
    from lmtune.tasks import resolve_task
    from lmtune.tasks.generation import generate_and_score

    device, d = spec["device"], spec["decode"]
    path = spec["model_dir"]
    tok = load_tokenizer(path)
    cfg = lmtune.RunConfig(data=_data_config(spec, "gen"), model=lmtune.ModelConfig(name=path),
                           train=lmtune.TrainConfig(max_length=spec["gen"]["max_length"]), output_dir=spec["workdir"] + "/x")
    task, cfg = resolve_task(cfg)
    bundle = task.load_data(cfg)
    train_enc, val_enc = task.encode(tok, bundle, cfg, _token_cache())
    groups = list(bundle.train.groups().values())[: d["prompts"]]
    prompts = [list(map(int, train_enc.prompt_ids[g[0]])) for g in groups]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    model.config.use_cache = True
    pad_id, stops, m, bs = tok.pad_token_id, list(task.stop_ids), d["max_new_tokens"], d["batch"]

    def cut(row: list[int]) -> list[int]:
        for i, t in enumerate(row):
            if t in stops:
                return row[:i]
        return row

    def run_lmtune() -> list[list[int]]:
        return generate(model, prompts, pad_id=pad_id, stop_ids=stops, max_new_tokens=m, batch_size=bs)

    @torch.inference_mode()
    def run_plain() -> list[list[int]]:
        outs: list[list[int]] = []
        for i in range(0, len(prompts), bs):
            batch = prompts[i: i + bs]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch], device=device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
            o = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=m,
                               eos_token_id=stops, pad_token_id=pad_id)
            outs.extend(cut(r) for r in o[:, width:].tolist())
        return outs

    generate(model, prompts[:2], pad_id=pad_id, stop_ids=stops, max_new_tokens=2, batch_size=2)  # warm-up, untimed
    timings: dict[str, list[float]] = {"lmtune": [], "plain": []}
    outputs: dict[str, list[list[int]]] = {}
    for name in ("lmtune", "plain", "plain", "lmtune"):  # ABBA
        _sync(device)
        t0 = time.perf_counter()
        outputs[name] = run_lmtune() if name == "lmtune" else run_plain()
        _sync(device)
        timings[name].append(time.perf_counter() - t0)
    lengths = [len(p) for p in prompts]
    file_order = [list(range(i, min(i + bs, len(prompts)))) for i in range(0, len(prompts), bs)]
    same = sum(a == b for a, b in zip(outputs["lmtune"], outputs["plain"]))
    out: dict[str, Any] = {
        "prompts": len(prompts), "batch": bs, "max_new_tokens": m, "dtype": str(dtype),
        "attn_implementation": model.config._attn_implementation,
        "lmtune_s": min(timings["lmtune"]), "plain_s": min(timings["plain"]), "runs_s": timings,
        "lmtune_new_tokens": sum(map(len, outputs["lmtune"])), "plain_new_tokens": sum(map(len, outputs["plain"])),
        "prompt_padding_lmtune": padding_tokens(lengths, plan_batches(lengths, bs)),
        "prompt_padding_plain": padding_tokens(lengths, file_order), "prompt_tokens": sum(lengths),
        "identical_outputs": same}
    out["speedup"] = out["plain_s"] / out["lmtune_s"] if out["lmtune_s"] else None
    # lmtune's own evaluation: decode every validation prompt and score it (EM, token F1, ROUGE-L, BLEU, chrF).
    t0 = time.perf_counter()
    scored = generate_and_score(model, tok, bundle.val, val_enc, stop_ids=stops, max_new_tokens=m, batch_size=bs, pad_id=pad_id)
    _sync(device)
    out["generate_and_score_s"] = time.perf_counter() - t0
    out["generate_and_score_prompts"] = len(scored["examples"])
    out["generate_and_score_metrics"] = scored["metrics"]
    out |= _memory(device)
    return out


def worker_study(spec: dict[str, Any]) -> dict[str, Any]:
    import dataclasses

    import optuna

    import lmtune
    from lmtune.config import SearchConfig, TuneConfig

    st = spec["study"]
    data = dict(spec["data"]["cls"])
    run = lmtune.RunConfig(
        data=lmtune.DataConfig(**data, max_train_rows=st["rows"], max_val_rows=st["val_rows"]),
        model=lmtune.ModelConfig(name=spec["model_dir"]),
        train=lmtune.TrainConfig(max_steps=st["steps"], max_length=spec["cls"]["max_length"], eval_batch_size=spec["eval_batch"],
                                 progress=False),
        output_dir=spec["workdir"] + "/study", report=False)
    search = SearchConfig(learning_rate="1e-5..3e-4:log", global_batch_size=str(spec["batch"]), epochs="1")
    tc = TuneConfig(n_trials=st["trials"], confirm_seeds=0, refit="never", pruner="median", evals_per_epoch=2)
    out: dict[str, Any] = {"tune_config": dataclasses.asdict(tc)}
    t0 = time.time()
    try:
        res = lmtune.tune(run, search, tc)
    except Exception as e:  # noqa: BLE001
        # The study's own pre-search planning (a calibration, where this lmtune has one) is the newest part of it:
        # should it be what fails, the search itself is still checked, without it, in a fresh folder.
        if not hasattr(tc, "plan") or not tc.plan:
            raise
        out["first_attempt"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
                                "seconds": time.time() - t0}
        traceback.print_exc()
        print("[study] failed with the plan on; again with plan=False", flush=True)
        tc = dataclasses.replace(tc, plan=False)
        run = dataclasses.replace(run, output_dir=spec["workdir"] + "/study-no-plan")
        out["tune_config"] = dataclasses.asdict(tc)
        t0 = time.time()
        res = lmtune.tune(run, search, tc)
    wall = time.time() - t0
    plan_file = Path(res.output_dir) / "plan.json"
    out["plan_written"] = plan_file.is_file()
    study = optuna.load_study(study_name=res.study_name, storage=res.storage)
    trials = [{"number": t.number, "state": t.state.name, "value": t.value, "params": t.params,
               "seconds": t.user_attrs.get("seconds"), "train_tokens_per_s": t.user_attrs.get("train_tokens_per_s"),
               "fail_reason": t.user_attrs.get("fail_reason"), "default": bool(t.user_attrs.get("lmtune_default"))}
              for t in study.get_trials(deepcopy=False)]
    best_dir = Path(res.output_dir) / "best"
    return out | {"wall_s": wall, "trials": trials, "counts": res.counts, "best_value": res.best_value, "best_params": res.best_params,
            "best_trial": res.best_trial, "best_saved": (best_dir / "config.json").is_file(), "metric": "accuracy",
            "steps_per_trial": st["steps"], "train_rows": st["rows"]} | _memory(spec["device"])


WORKERS = {"lmtune": worker_lmtune, "trainer": worker_trainer, "decode": worker_decode, "study": worker_study}


def worker_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    result_file = Path(spec["result_file"])
    import logging
    handler = logging.StreamHandler(sys.stdout)  # lmtune's own lines, with seconds since the process started
    handler.setFormatter(logging.Formatter("%(relativeCreated)9.0f ms  %(message)s"))
    lm_log = logging.getLogger("lmtune")
    lm_log.addHandler(handler)
    lm_log.setLevel(logging.INFO)
    lm_log.propagate = False
    try:
        import torch
        if spec["device"] == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("--device cuda but torch.cuda.is_available() is False in the worker")
        if spec["device"] == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out = WORKERS[spec["kind"]](spec)
        result_file.write_text(json.dumps(out, default=str))
        return 0
    except BaseException as e:  # noqa: BLE001 - everything goes to the result file, then the process fails
        result_file.write_text(json.dumps({"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                                           "traceback": traceback.format_exc()}))
        traceback.print_exc()
        return 1


# ---- the orchestrator ------------------------------------------------------------------------------------------


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def machine(device: str) -> dict[str, Any]:
    import importlib.metadata as md
    import importlib.util

    import torch
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
                            "hostname": platform.node(), "device": device, "torch_cuda": torch.version.cuda}
    for name in ("torch", "transformers", "accelerate", "peft", "optuna", "tokenizers", "safetensors", "numpy", "sacrebleu",
                 "rouge-score", "lmtune"):
        try:
            info[name] = md.version(name)
        except md.PackageNotFoundError:
            info[name] = None
    info["flash_attn_installed"] = importlib.util.find_spec("flash_attn") is not None
    try:
        text = Path("/proc/cpuinfo").read_text()
        info["cpu_model"] = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), None)
    except OSError:
        pass
    if device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info |= {"gpu": torch.cuda.get_device_name(0), "gpu_count": torch.cuda.device_count(),
                 "gpu_memory_gb": round(p.total_memory / 2**30, 1), "gpu_capability": f"{p.major}.{p.minor}",
                 "bf16_supported": torch.cuda.is_bf16_supported()}
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,power.limit,clocks.max.sm", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = q.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


class Run:
    """The result being built, written after every contender."""

    def __init__(self, out: Path, name: str, s: dict[str, Any], info: dict[str, Any]):
        self.out, self.name = out, name
        self.logs = out / f"{name}-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.time()
        self.deadline = self.t0 + s["budget_s"]
        self.result: dict[str, Any] = {"benchmark": "gpu", "name": name, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                       "finished": None, "machine": info, "settings": s, "note": RANDOM_WEIGHTS_NOTE,
                                       "models": {}, "parts": {}, "errors": [], "skipped": [], "seconds": None}

    def left(self) -> float:
        return self.deadline - time.time()

    def error(self, part: str, contender: str | None, err: str, tb: str | None) -> None:
        self.result["errors"].append({"part": part, "contender": contender, "error": err, "traceback": tb})
        print(f"    FAILED: {err}", flush=True)

    def save(self, final: bool = False) -> None:
        self.result["seconds"] = round(time.time() - self.t0, 1)
        if final:
            self.result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        tmp = self.out / f".{self.name}.json.tmp"
        tmp.write_text(json.dumps(self.result, indent=2, default=str) + "\n")
        os.replace(tmp, self.out / f"{self.name}.json")
        (self.out / f"{self.name}.md").write_text(markdown(self.result).rstrip() + "\n")


def run_worker(run: Run, spec: dict[str, Any], label: str, timeout: float, env: dict[str, str]) -> dict[str, Any]:
    """One contender in a fresh process; its result, or {"error", "traceback"}."""
    workdir = Path(tempfile.mkdtemp(prefix=f"w-{label}-", dir=spec["tmp_root"]))
    spec = dict(spec, workdir=str(workdir), result_file=str(workdir / "result.json"))
    log_path = run.logs / f"{label}.log"
    t0 = time.time()
    try:
        with open(log_path, "w") as log:
            p = subprocess.run([sys.executable, "-m", "bench.gpu", "_worker", json.dumps(spec)], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT, timeout=max(5.0, timeout))
        rc = p.returncode
    except subprocess.TimeoutExpired:
        rc = "timeout"
    wall = round(time.time() - t0, 2)
    rf = Path(spec["result_file"])
    try:
        r = json.loads(rf.read_text()) if rf.is_file() else None
    except ValueError:
        r = None
    if r is None:
        tail = log_path.read_text(errors="replace")[-4000:] if log_path.is_file() else ""
        r = {"error": f"worker {label} ended without a result (exit {rc}, {wall} s"
                      + (f", killed after {timeout:.0f} s" if rc == "timeout" else "") + ")", "traceback": tail}
    r["process_wall_s"] = wall
    shutil.rmtree(workdir, ignore_errors=True)
    return r


RATIO_KEYS = ("mean_s_per_step", "median_s_per_step", "tokens_per_s", "peak_gpu_mem_gb", "train_peak_gpu_mem_gb", "peak_rss_mb")


def ratios(lm: dict[str, Any], tr: dict[str, Any]) -> dict[str, Any]:
    def div(a, b):
        return a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else None
    r = {"step_speedup_mean": div(tr.get("mean_s_per_step"), lm.get("mean_s_per_step")),
         "step_speedup_median": div(tr.get("median_s_per_step"), lm.get("median_s_per_step")),
         "tokens_per_s_ratio": div(lm.get("tokens_per_s"), tr.get("tokens_per_s")),
         "peak_gpu_mem_ratio": div(lm.get("peak_gpu_mem_gb"), tr.get("peak_gpu_mem_gb")),
         "train_peak_gpu_mem_ratio": div(lm.get("train_peak_gpu_mem_gb"), tr.get("train_peak_gpu_mem_gb")),
         "eval_speedup": div(tr.get("eval_seconds"), lm.get("eval_seconds"))}
    if isinstance(lm.get("val_loss"), (int, float)) and isinstance(tr.get("val_loss"), (int, float)):
        r["val_loss_diff"] = lm["val_loss"] - tr["val_loss"]
    if isinstance(lm.get("val_accuracy"), (int, float)) and isinstance(tr.get("val_accuracy"), (int, float)):
        r["accuracy_diff_points"] = 100 * (lm["val_accuracy"] - tr["val_accuracy"])
    return r


# (part id, kind, task, shape, contenders in order, seconds a contender needs at least, cap per contender)
def plan(s: dict[str, Any], only: list[str] | None, flash: bool) -> list[dict[str, Any]]:
    tiny = s["tiny"]
    parts = [
        {"id": "cls-smollm2", "kind": "train", "task": "cls", "shape": "smollm2", "contenders": ["lmtune", "trainer"]},
        {"id": "cls-gemma3", "kind": "train", "task": "cls", "shape": "gemma3", "contenders": ["trainer", "lmtune"]},
        {"id": "gen-smollm2", "kind": "train", "task": "gen", "shape": "smollm2", "contenders": ["lmtune", "trainer"]},
        {"id": "decode-smollm2", "kind": "decode", "task": "gen", "shape": "smollm2", "contenders": ["decode"]},
        {"id": "study-smollm2", "kind": "study", "task": "cls", "shape": "smollm2", "contenders": ["study"]},
        {"id": "gen-gemma3", "kind": "train", "task": "gen", "shape": "gemma3", "contenders": ["trainer", "lmtune"]},
    ]
    if flash:
        parts.append({"id": "cls-smollm2-flash", "kind": "train", "task": "cls", "shape": "smollm2",
                      "contenders": ["lmtune"], "attn": "flash_attention_2"})
    for p in parts:
        # Caps per contender on a GPU (where the whole run takes minutes); on a CPU only the budget limits them.
        p["min_s"] = 10 if tiny else {"train": 30, "decode": 30, "study": 50}[p["kind"]]
        p["cap_s"] = {"train": 150, "decode": 120, "study": 200}[p["kind"]] if s["device"] == "cuda" and not tiny else 1e9
    if only:
        unknown = set(only) - {p["id"] for p in parts}
        if unknown:
            raise SystemExit(f"--parts: unknown {', '.join(sorted(unknown))}; known: {', '.join(p['id'] for p in parts)}")
        parts = [p for p in parts if p["id"] in only]
    return parts


def run(ns: argparse.Namespace) -> int:
    s = settings(ns)
    device = s["device"]
    import torch
    if device == "cuda" and not torch.cuda.is_available():
        print("python -m bench gpu: no CUDA device here (torch.cuda.is_available() is False, torch "
              f"{torch.__version__}). Run it on a CUDA machine, or pass --tiny to check the code paths on the CPU "
              "(--device cpu runs the real shapes on the CPU).", file=sys.stderr)
        return 2
    model_dirs = {"smollm2": Path(ns.model_dir), "gemma3": Path(ns.gemma_dir)}
    data_dir = Path(ns.data_dir)
    files = data_files(data_dir)
    missing = [f for d in files.values() for k, f in d.items() if k.endswith("_file") and not Path(f).is_file()]
    missing += [str(p / "config.json") for p in model_dirs.values() if not (p / "config.json").is_file()]
    if missing:
        print("python -m bench gpu: missing input files: " + ", ".join(missing) + " (see --model-dir, --gemma-dir, --data-dir)",
              file=sys.stderr)
        return 2
    info = machine(device)
    name = "gpu-" + (("tiny-" if s["tiny"] else "") + slug(info["gpu"]) if device == "cuda" else "cpu" + ("-tiny" if s["tiny"] else ""))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    r = Run(out, name, s, info)
    print(f"[gpu] {info.get('gpu') or info.get('cpu_model')}; torch {info['torch']} (CUDA {info['torch_cuda']}), transformers "
          f"{info['transformers']}; budget {s['budget_s']:.0f} s; writing {out / name}.json", flush=True)
    r.save()
    tmp_root = Path(tempfile.mkdtemp(prefix="lmtune-gpu-"))
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               LMTUNE_CACHE=str(tmp_root / "lmtune-cache"), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    base = {"device": device, "tiny": s["tiny"], "tmp_root": str(tmp_root), "data": files,
            **{k: s[k] for k in ("steps", "warmup_steps", "batch", "eval_batch", "lr", "warmup_ratio", "weight_decay", "seed",
                                 "cls", "gen", "decode", "study", "count_syncs",
                                 "profile_steps")}}
    parts = plan(s, ns.parts.split(",") if ns.parts else None, info.get("flash_attn_installed", False) and device == "cuda")
    built: dict[str, str] = {}

    def on_term(signum, frame):  # noqa: ARG001 - `timeout` or a scheduler: finish the files, drop the models
        raise SystemExit(128 + signum)
    import signal
    signal.signal(signal.SIGTERM, on_term)
    try:
        for p in parts:
            pr = r.result["parts"].setdefault(p["id"], {"kind": p["kind"], "task": p["task"], "shape": p["shape"],
                                                         "shape_name": SHAPES[p["shape"]], "contenders": {}})
            if p.get("attn"):
                pr["attn"] = p["attn"]
            if p["shape"] not in built:
                if r.left() < p["min_s"]:
                    r.result["skipped"].append({"part": p["id"], "why": f"budget: {r.left():.0f} s left"})
                    continue
                print(f"[gpu] building the {SHAPES[p['shape']]} model from its config (random weights) ...", flush=True)
                try:
                    m = build_model(model_dirs[p["shape"]], tmp_root / f"model-{p['shape']}", s["tiny"])
                    r.result["models"][p["shape"]] = m
                    built[p["shape"]] = m["path"]
                    print(f"    {m['architecture']}, {m['params'] / 1e6:.1f}M parameters, {m['seconds']} s", flush=True)
                except Exception as e:  # noqa: BLE001
                    r.error(p["id"], "build-model", f"{type(e).__name__}: {e}", traceback.format_exc())
                    built[p["shape"]] = ""
                r.save()
            if not built[p["shape"]]:
                r.result["skipped"].append({"part": p["id"], "why": f"no {p['shape']} model"})
                continue
            for c in p["contenders"]:
                left = r.left()
                if left < p["min_s"]:
                    r.result["skipped"].append({"part": p["id"], "contender": c, "why": f"budget: {left:.0f} s left"})
                    print(f"[gpu] {p['id']} {c}: skipped ({left:.0f} s of the budget left)", flush=True)
                    continue
                print(f"[gpu] {p['id']}: {c} ...", flush=True)
                r.result["running"] = f"{p['id']} {c}"
                kind = c if p["kind"] == "train" else p["kind"]
                spec = base | {"kind": kind, "task": p["task"], "contender": c, "model_dir": built[p["shape"]]}
                if p.get("attn"):
                    spec["attn"] = p["attn"]
                res = run_worker(r, spec, f"{p['id']}-{c}", min(p["cap_s"], left), env)
                pr["contenders"][c] = res
                if "error" in res:
                    r.error(p["id"], c, res["error"], res.get("traceback"))
                else:
                    print("    " + one_line(p, res), flush=True)
                lm, tr = pr["contenders"].get("lmtune"), pr["contenders"].get("trainer")
                if lm and tr and "error" not in lm and "error" not in tr:
                    pr["ratios"] = ratios(lm, tr)
                r.result["running"] = None
                r.save()
    except BaseException as e:  # SIGTERM (see on_term), Ctrl-C: say so in the files, then stop
        r.result["interrupted"] = f"{type(e).__name__}: {e} (while running {r.result.get('running')})"
        raise
    finally:
        r.save(final=True)
        shutil.rmtree(tmp_root, ignore_errors=True)
        print()
        print(markdown(r.result))
        print(f"\nwrote {out / name}.json and {out / name}.md ({r.result['seconds']} s)", flush=True)
    return 0 if not r.result["errors"] else 1


def one_line(p: dict[str, Any], res: dict[str, Any]) -> str:
    if p["kind"] == "train":
        return (f"{fmt(res.get('median_s_per_step'), 4)} s/step (median), {fmt(res.get('tokens_per_s'), 0)} tok/s, "
                f"peak {fmt(res.get('peak_gpu_mem_gb'), 2)} GB, eval {fmt(res.get('eval_seconds'), 1)} s, "
                f"val loss {fmt(res.get('val_loss'), 4)}, {res.get('precision')}/{res.get('attn_implementation')}, "
                f"process {res.get('process_wall_s')} s")
    if p["kind"] == "decode":
        return (f"lmtune {fmt(res.get('lmtune_s'), 2)} s, plain loop {fmt(res.get('plain_s'), 2)} s "
                f"({fmt(res.get('speedup'), 2)}x), generate_and_score {fmt(res.get('generate_and_score_s'), 2)} s")
    return f"{len(res.get('trials', []))} trials, {res.get('counts')}, best {fmt(res.get('best_value'), 4)}, {fmt(res.get('wall_s'), 1)} s"


# ---- markdown ---------------------------------------------------------------------------------------------------


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, float):
        if not math.isfinite(x):
            return str(x)
        return f"{x:.{nd}f}"
    return str(x)


def _profile_cells(row: list | None) -> list[str]:
    """One operator of a profile table (name, calls per step, ms per step), or empty cells past a shorter list."""
    return [f"`{row[0][:60]}`", fmt(row[1], 1), fmt(row[2], 2)] if row else ["", "", ""]


def markdown(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    where = (f"{m.get('gpu')} ({m.get('gpu_memory_gb')} GB, capability {m.get('gpu_capability')})" if m.get("device") == "cuda"
             else f"CPU only ({m.get('cpu_model')}, {m.get('cpu_count')} cores)")
    lines = [f"## GPU path check: lmtune vs transformers.Trainer ({'--tiny, ' if s['tiny'] else ''}{res['started']})", "",
             f"Machine: {where}; {m.get('cpu_count')} CPU cores; torch {m.get('torch')} (CUDA {m.get('torch_cuda')}), "
             f"transformers {m.get('transformers')}, accelerate {m.get('accelerate')}, peft {m.get('peft')}, optuna {m.get('optuna')}; "
             f"flash-attn installed: {m.get('flash_attn_installed')}.", "",
             RANDOM_WEIGHTS_NOTE, "",
             f"Training: batch {s['batch']}, lr {s['lr']:g} (linear, warmup {s['warmup_ratio']:g}), weight decay {s['weight_decay']}, "
             f"{s['steps']} steps, the first {s['warmup_steps']} excluded as warm-up, training seed {s.get('seed', 0)}; classification: SST-2 sample "
             f"({s['cls']['rows']} training rows, max length {s['cls']['max_length']}); generation: E2E sample "
             f"({s['gen']['rows']} training rows, max length {s['gen']['max_length']}). Each contender in its own process; "
             "peak memory = `torch.cuda.max_memory_allocated()` after training (train) and after the final evaluation (all).", ""]
    train_parts = [(pid, p) for pid, p in res["parts"].items() if p["kind"] == "train"]
    if train_parts:
        lines += ["| part | model | contender | precision / attention | median s/step | mean s/step | tokens/s | "
                  "peak GPU GB train / all | eval s | val loss | val acc | process s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for pid, p in train_parts:
            for c, r in p["contenders"].items():
                if "error" in r:
                    lines.append(f"| {pid} | {p['shape_name']} | {c} | FAILED: {r['error'][:120]} |||||||||")
                    continue
                name = c + (f" ({p['attn']})" if p.get("attn") else "")
                lines.append(
                    f"| {pid} | {p['shape_name']} | {name} | {r.get('precision')} / {r.get('attn_implementation')} | "
                    f"{fmt(r.get('median_s_per_step'), 4)} | {fmt(r.get('mean_s_per_step'), 4)} | {fmt(r.get('tokens_per_s'), 0)} | "
                    f"{fmt(r.get('train_peak_gpu_mem_gb'), 2)} / {fmt(r.get('peak_gpu_mem_gb'), 2)} | {fmt(r.get('eval_seconds'), 2)} | "
                    f"{fmt(r.get('val_loss'), 4)} | {fmt(r.get('val_accuracy'), 4)} | {fmt(r.get('process_wall_s'), 1)} |")
        rat = [(pid, p) for pid, p in train_parts if p.get("ratios")]
        if rat:
            lines += ["", "lmtune against Trainer (speed-ups > 1 and memory ratios < 1 favour lmtune):", "",
                      "| part | model | step speed-up (mean) | step speed-up (median) | tokens/s ratio | peak memory lmtune/Trainer (train, all) | "
                      "eval speed-up | val loss diff |", "|---|---|---|---|---|---|---|---|"]
            for pid, p in rat:
                q = p["ratios"]
                lines.append(f"| {pid} | {p['shape_name']} | {fmt(q.get('step_speedup_mean'))}x | {fmt(q.get('step_speedup_median'))}x | "
                             f"{fmt(q.get('tokens_per_s_ratio'))}x | {fmt(q.get('train_peak_gpu_mem_ratio'))}, {fmt(q.get('peak_gpu_mem_ratio'))} | "
                             f"{fmt(q.get('eval_speedup'))}x | {fmt(q.get('val_loss_diff'), 4)} |")
        flags = next((r.get("flags") for _, p in train_parts for c, r in p["contenders"].items()
                      if c == "trainer" and isinstance(r.get("flags"), dict)), None)
        if flags:
            keep = ("bf16", "tf32", "optim", "train_sampling_strategy", "group_by_length", "dataloader_pin_memory",
                    "dataloader_num_workers", "use_cpu")
            lines += ["", "Trainer flags: " + ", ".join(f"`{k}={flags[k]}`" for k in keep if k in flags)
                      + "; `attn_implementation=\"sdpa\"` at loading; `DataCollatorWithPadding(pad_to_multiple_of=8)` "
                      "(classification) or a -100-on-prompt collator (generation, `prediction_loss_only=True`)."]
        counted = [(pid, p["shape_name"], c, r["syncs"]) for pid, p in train_parts for c, r in p["contenders"].items()
                   if r.get("syncs")]
        if counted:
            lines += ["", f"Host-device synchronisations inside the {s['steps']} training steps (from the start of a step to "
                      "the end of its optimizer step; `--count-syncs`: this run's times are slowed by the counting), by the "
                      "line that asked:",
                      "", "| part | model | contender | synchronisations | per step | where (most first) |", "|---|---|---|---|---|---|"]
            for pid, shape, c, n in counted:
                where = ", ".join(f"`{k}` {v}" for k, v in list(n["sites"].items())[:5])
                lines.append(f"| {pid} | {shape} | {c} | {n['total']} | {fmt(n['total'] / max(1, s['steps']), 1)} | {where} |")
        profiled = [(pid, p["shape_name"], c, r["profile"]) for pid, p in train_parts for c, r in p["contenders"].items()
                    if r.get("profile")]
        for pid, shape, c, prof in profiled:
            lines += ["", f"Profile of {pid} ({shape}), {c}: {prof['steps']} steps after the warm-up under `torch.profiler` "
                      f"(`--profile-steps`: those steps are slowed by the recording); per step: self CPU time "
                      f"{fmt(prof['self_cpu_ms_per_step'], 1)} ms, device time {fmt(prof['device_ms_per_step'], 1)} ms.",
                      "", "| most self CPU time | calls/step | ms/step | most device time | calls/step | ms/step |",
                      "|---|---|---|---|---|---|"]
            for a, b in itertools.zip_longest(prof["cpu_top"], prof["device_top"]):
                lines.append("| " + " | ".join(_profile_cells(a) + _profile_cells(b)) + " |")
    for pid, p in res["parts"].items():
        if p["kind"] == "decode":
            r = p["contenders"].get("decode", {})
            lines += ["", f"### Decoding ({p['shape_name']}, greedy)", ""]
            if "error" in r:
                lines.append(f"FAILED: {r['error']}")
                continue
            if not r:
                continue
            lines += [f"{r['prompts']} E2E prompts, batch {r['batch']}, {r['max_new_tokens']} new tokens at most, {r['dtype']}, "
                      f"{r.get('attn_implementation')} attention; best of 2 runs each (ABBA). Random weights rarely emit a stop "
                      "token, so both decode nearly the whole budget: the difference is padding and batching only.", "",
                      "| contender | seconds | new tokens | prompt padding tokens |", "|---|---|---|---|",
                      f"| lmtune.decoding.generate (sorted by length) | {fmt(r['lmtune_s'], 3)} | {r['lmtune_new_tokens']} | {r['prompt_padding_lmtune']} |",
                      f"| plain model.generate loop (file order) | {fmt(r['plain_s'], 3)} | {r['plain_new_tokens']} | {r['prompt_padding_plain']} |",
                      "", f"Speed-up {fmt(r.get('speedup'))}x; identical outputs {r['identical_outputs']}/{r['prompts']}. "
                      f"lmtune's generation evaluation (decode + EM/F1/ROUGE-L/BLEU/chrF) on {r.get('generate_and_score_prompts')} "
                      f"validation prompts: {fmt(r.get('generate_and_score_s'), 2)} s."]
        if p["kind"] == "study":
            r = p["contenders"].get("study", {})
            lines += ["", f"### Study ({p['shape_name']}, SST-2 sample)", ""]
            if "error" in r:
                lines.append(f"FAILED: {r['error']}")
                continue
            if not r:
                continue
            lines += [f"`lmtune.tune`: {len(r['trials'])} trials of {r['steps_per_trial']} steps, {r['train_rows']} training rows, "
                      f"{fmt(r['wall_s'], 1)} s in all; states {r['counts']}; best accuracy {fmt(r.get('best_value'), 4)} "
                      f"(trial {r.get('best_trial')}); best/ saved: {r.get('best_saved')}; peak GPU memory "
                      f"{fmt(r.get('peak_gpu_mem_gb'), 2)} GB; the study's plan (calibration before the search): "
                      f"{'written' if r.get('plan_written') else 'none'}."
                      + (f" The first attempt, with the plan on, FAILED ({r['first_attempt']['error'][:200]}); "
                         "the trials below ran with plan=False." if r.get("first_attempt") else ""), "",
                      "| trial | state | accuracy | params | seconds | tokens/s |", "|---|---|---|---|---|---|"]
            for t in r["trials"]:
                ps = ", ".join(f"{k}={fmt(v, 6) if isinstance(v, float) else v}" for k, v in (t.get("params") or {}).items())
                lines.append(f"| {t['number']}{' (default)' if t.get('default') else ''} | {t['state']} | {fmt(t.get('value'), 4)} | "
                             f"{ps} | {fmt(t.get('seconds'), 1)} | {fmt(t.get('train_tokens_per_s'), 0)} |")
    if res.get("interrupted"):
        lines += ["", f"**Interrupted**: {res['interrupted']}; the parts above are complete, the rest did not run."]
    if res["errors"] or res["skipped"]:
        lines += ["", "### Failures and skipped parts", ""]
        for e in res["errors"]:
            lines.append(f"- {e['part']} {e.get('contender') or ''}: {e['error']} (traceback in the JSON)")
        for k in res["skipped"]:
            lines.append(f"- skipped {k['part']} {k.get('contender', '')}: {k['why']}")
    lines += ["", f"Total {fmt(res.get('seconds'), 0)} s" + ("" if res.get("finished") else " (still running, or cut short)") + "."]
    return "\n".join(lines)


# ---- command line ------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for gpu-<machine>.json/.md (default bench/results)")
    p.add_argument("--tiny", action="store_true", help="the same code paths on the CPU with 2-layer, width-64 models, a few steps")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default cuda (cpu with --tiny); cpu without --tiny: real shapes on the CPU")
    p.add_argument("--steps", type=int, help="training steps per contender (default 30; --tiny 4)")
    p.add_argument("--rows", type=int, help="training rows of every part (default 4000 SST-2, 3000 E2E)")
    p.add_argument("--val-rows", type=int, help="validation rows of every part (default the whole sample files)")
    p.add_argument("--prompts", type=int, help="prompts of the decoding comparison (default 128; --tiny 8)")
    p.add_argument("--budget", type=float, help="seconds for the whole run; parts that would start later are skipped (default 330)")
    p.add_argument("--seed", type=int, default=0, help="training seed of every contender (batches, head init; default 0)")
    p.add_argument("--count-syncs", action="store_true",
                   help="count each contender's host-device synchronisations while it trains, by source line (CUDA's sync "
                        "debug mode: slows the run, so its times are not comparable with a run without it)")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="record this many training steps after the warm-up with torch.profiler and report each "
                        "contender's CPU and device time per step by operator (slows those steps; default 0: off)")
    p.add_argument("--parts", help="comma-separated subset: cls-smollm2, cls-gemma3, gen-smollm2, decode-smollm2, study-smollm2, gen-gemma3")
    p.add_argument("--model-dir", default=str(ASSETS / "smollm2"), help="config.json + tokenizer files of SmolLM2-135M")
    p.add_argument("--gemma-dir", default=str(ASSETS / "gemma3"), help="config.json + tokenizer files of Gemma 3 270M")
    p.add_argument("--data-dir", default=str(ASSETS / "data"), help="folder with sst2/{train,validation}.tsv and e2e_nlg/{train,test}.csv")


def write_assets(target: Path) -> dict[str, str]:
    """``.gpu-assets/`` for a machine with no network: the two offline models' config.json + tokenizer files (from
    the converted folders ``lmtune.models.source.resolve`` caches here) and the SST-2 and E2E files the run reads."""
    from bench.common import data_dir
    from lmtune.models.source import resolve

    written = {}
    for shape, alias in (("smollm2", "smollm2-135m-instruct"), ("gemma3", "gemma-3-270m")):
        src, dst = Path(resolve(alias).path), target / shape
        dst.mkdir(parents=True, exist_ok=True)
        for name in ("config.json",) + TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, dst / name)
        written[shape] = str(dst)
    for name, files in (("sst2", ("train.tsv", "validation.tsv")), ("e2e_nlg", ("train.csv", "test.csv"))):
        (target / "data" / name).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(data_dir() / name / f, target / "data" / name / f)
    written["data"] = str(target / "data")
    return written


def merge_runs(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs on one machine (e.g. ``--parts`` for what a first run's budget skipped) as one result: a later
    run's parts replace the earlier ones', a skip stays only if no run measured that part, seconds add up."""
    if len({(r["machine"].get("gpu"), r["machine"].get("torch"), r["machine"].get("transformers")) for r in results}) > 1:
        raise SystemExit("python -m bench gpu _merge: the runs come from different machines or library versions")
    def same(r):  # what makes two runs' numbers comparable: all settings but the time budget
        return json.dumps({k: v for k, v in (r.get("settings") or {}).items() if k != "budget_s"}, sort_keys=True)
    if len({same(r) for r in results}) > 1:
        raise SystemExit("python -m bench gpu _merge: the runs differ in settings other than --budget (seed, steps, "
                         "rows, --count-syncs, ...), so their numbers do not belong in one table")
    out = json.loads(json.dumps(results[0]))
    for r in results[1:]:
        for pid, part in r["parts"].items():
            into = out["parts"].setdefault(pid, {**part, "contenders": {}})
            for c, res in part["contenders"].items():  # a later result wins, unless it failed where one had not
                if "error" not in res or "error" in into["contenders"].get(c, {"error": True}):
                    into["contenders"][c] = res
            lm, tr = into["contenders"].get("lmtune"), into["contenders"].get("trainer")
            if lm and tr and "error" not in lm and "error" not in tr:
                into["ratios"] = ratios(lm, tr)
        out["errors"] += r["errors"]
        out["skipped"] += r["skipped"]
        out["models"] |= r["models"]
        out["seconds"] = round(out["seconds"] + r["seconds"], 1)
        out["finished"] = r["finished"]

    def measured(part: str, contender: str | None) -> bool:
        got = out["parts"].get(part, {}).get("contenders", {})
        return any("error" not in v for c, v in got.items() if contender in (None, c))
    out["skipped"] = [k for k in out["skipped"] if not measured(k["part"], k.get("contender"))]
    out["errors"] = [e for e in out["errors"] if not measured(e["part"], e.get("contender"))]
    out["started"] = " + ".join(r["started"] for r in results)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        return worker_main(argv[1])
    if argv[:1] == ["_merge"] and len(argv) >= 4:  # _merge OUT.json RUN1.json RUN2.json ...: one result, .md beside it
        merged = merge_runs([json.loads(Path(f).read_text()) for f in argv[2:]])
        out = Path(argv[1])
        out.write_text(json.dumps(merged, indent=2, default=str) + "\n")
        out.with_suffix(".md").write_text(markdown(merged).rstrip() + "\n")
        print(f"wrote {out} and {out.with_suffix('.md')}")
        return 0
    if argv[:1] == ["_assets"]:  # run where the models are converted; carry the folder to a machine with no network
        for k, v in write_assets(Path(argv[1]) if len(argv) > 1 else ASSETS).items():
            print(f"{k}: {v}")
        return 0
    p = argparse.ArgumentParser(prog="python -m bench gpu", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
