"""One contender of the throughput benchmark, in its own process: ``python -m bench.worker '<json spec>'``.

Writes a JSON result to ``spec["result_file"]``. Per-step wall times are taken inside the process; the
first (warm-up) step is excluded from s/step and tokens/s. Peak RSS is ``ru_maxrss`` of this process,
read right after the final evaluation (before anything is saved).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _attach_opt_timer(opt: torch.optim.Optimizer, times: list[float], per_step: bool = True) -> None:
    """Time ``opt.step``. ``per_step=False``: add to ``times[-1]`` (lmtune's bf16-master calls step once per
    chunk of parameters; the caller opens a new entry per optimizer step)."""
    state: dict[str, float] = {}
    opt.register_step_pre_hook(lambda *a: state.__setitem__("t", time.perf_counter()))

    def post(*a):
        dt = time.perf_counter() - state["t"]
        if per_step:
            times.append(dt)
        else:
            times[-1] += dt
    opt.register_step_post_hook(post)


def _step_stats(step_times: list[float], step_tokens: list[int], step_padded: list[int], fwd_bwd: list[float],
                opt_times: list[float]) -> dict[str, Any]:
    """Aggregate steps 2..S (step 1 is the warm-up)."""
    st, tk, pd = step_times[1:], step_tokens[1:], step_padded[1:]
    out = {"steps_timed": len(st), "s_per_step": sum(st) / len(st) if st else None,
           "median_s_per_step": float(np.median(st)) if st else None,
           "tokens_timed": int(sum(tk)), "padded_tokens_timed": int(sum(pd)),
           "tokens_per_s": sum(tk) / sum(st) if st else None,
           "padding_share": 1 - sum(tk) / sum(pd) if sum(pd) else None,
           "warmup_step_s": step_times[0] if step_times else None}
    if opt_times[1:] and st:
        out["optimizer_s_per_step"] = float(np.mean(opt_times[1:]))
        out["optimizer_share"] = float(sum(opt_times[1:]) / sum(st))
    if fwd_bwd[1:] and st:
        out["fwd_bwd_s_per_step"] = float(np.mean(fwd_bwd[1:]))
        out["fwd_bwd_share"] = float(sum(fwd_bwd[1:]) / sum(st))
    return out


def run_lmtune(spec: dict[str, Any]) -> dict[str, Any]:
    import importlib

    import lmtune
    loop = importlib.import_module("lmtune.train.loop")
    from bench.common import data_config

    step_tokens: list[int] = []
    step_padded: list[int] = []
    step_attn: list[float] = []  # sum over micro-batches of real tokens x padded length (attention FLOPs term)
    fwd_bwd: list[float] = []
    opt_times: list[float] = []
    orig_fwd_bwd, orig_adamw = loop._forward_backward, loop._adamw

    def timed_fwd_bwd(s, st, share, units):
        t0 = time.perf_counter()
        r = orig_fwd_bwd(s, st, share, units)
        fwd_bwd.append(time.perf_counter() - t0)
        opt_times.append(0.0)  # this step's optimizer time accumulates here
        lens = [s.train_enc.lengths[i] for i in share]
        step_tokens.append(sum(lens))
        step_padded.append(len(lens) * max(lens))
        step_attn.append(sum(lens) * max(lens))
        return r

    def adamw(groups, lr):
        opt = orig_adamw(groups, lr)
        _attach_opt_timer(opt, opt_times, per_step=False)
        return opt

    rss_after_eval: list[float] = []

    def on_eval(ev):
        rss_after_eval.append(_rss_mb())

    cfg = lmtune.RunConfig(
        data=data_config(spec["data"], spec["rows"], spec.get("val_rows")),
        model=lmtune.ModelConfig(name=spec.get("model", lmtune.ModelConfig.name),
                                 attn_implementation=spec.get("attn", "auto")),
        train=lmtune.TrainConfig(learning_rate=spec["lr"], global_batch_size=spec["batch"], max_steps=spec["steps"],
                                 warmup_ratio=spec["warmup_ratio"], weight_decay=spec["weight_decay"],
                                 max_length=spec["max_length"], seed=spec["seed"], precision=spec.get("precision", "auto"),
                                 eval_batch_size=spec.get("eval_batch", 32), log_every_steps=1, progress=False,
                                 save_checkpoints=False),
        output_dir=spec["workdir"] + "/run", overwrite=True, report=False)
    loop._forward_backward, loop._adamw = timed_fwd_bwd, adamw
    t0 = time.time()
    try:
        res = lmtune.train(cfg, on_evaluate=on_eval, quiet=True)
    finally:
        loop._forward_backward, loop._adamw = orig_fwd_bwd, orig_adamw
    wall = time.time() - t0
    rec = res.record
    cum = [0.0] + [e["elapsed_s"] for e in rec["train_log"]]
    step_times = [b - a for a, b in zip(cum, cum[1:])]
    out = _step_stats(step_times, step_tokens, step_padded, fwd_bwd, opt_times)
    tim = rec["timing"]
    n_train = rec["data"]["rows"]["train"]
    cfgm = res_model_config(rec["model"]["resolved"])
    out |= {"precision": rec["precision"], "val_accuracy": rec["history"][-1]["accuracy"],
            "eval_seconds": tim["eval_seconds"], "train_seconds_all_steps": tim["train_seconds"],
            "steps_per_epoch": math.ceil(n_train / spec["batch"]), "train_rows": n_train,
            "val_rows": rec["data"]["rows"]["val"], "peak_rss_mb": rss_after_eval[-1] if rss_after_eval else _rss_mb(),
            "peak_rss_mb_incl_save": _rss_mb(), "run_wall_s": wall,
            "non_embedding_params": rec["model"]["non_embedding_params"], "total_params": rec["model"]["total_params"],
            "n_layers": cfgm.get("num_hidden_layers"), "d_model": cfgm.get("hidden_size"),
            "attn_token_len_timed": float(sum(step_attn[1:]))}
    return out


def res_model_config(path: str) -> dict[str, Any]:
    from pathlib import Path
    try:
        return json.loads((Path(path) / "config.json").read_text())
    except OSError:
        return {}


def run_trainer(spec: dict[str, Any], best: bool) -> dict[str, Any]:
    from transformers import (AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer,
                              TrainerCallback, TrainingArguments)
    from transformers.utils import logging as hf_logging

    from bench.common import trainer_data

    hf_logging.set_verbosity_error()
    torch.manual_seed(spec["seed"])
    bundle, path, tok, n_labels, train_ds, val_ds = trainer_data(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = {"attn_implementation": spec["attn"]} if spec.get("attn") else {}
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n_labels, dtype=torch.float32, **extra)
    model.config.pad_token_id = tok.pad_token_id
    model.config.use_cache = False

    counts = {"tokens": 0, "padded": 0}
    base_collator = DataCollatorWithPadding(tok)

    def collator(features):
        b = base_collator(features)
        counts["tokens"] += int(b["attention_mask"].sum())
        counts["padded"] += int(b["input_ids"].numel())
        return b

    step_times: list[float] = []
    step_tokens: list[int] = []
    step_padded: list[int] = []
    opt_times: list[float] = []

    class Timer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            opt = kw.get("optimizer")
            if opt is not None:
                _attach_opt_timer(getattr(opt, "optimizer", opt), opt_times)
            self.t = time.perf_counter()
            self.c = dict(counts)

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            step_times.append(now - self.t)
            step_tokens.append(counts["tokens"] - self.c["tokens"])
            step_padded.append(counts["padded"] - self.c["padded"])
            self.t, self.c = now, dict(counts)

    def metrics(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    kw: dict[str, Any] = dict(
        output_dir=spec["workdir"] + "/trainer", max_steps=spec["steps"], per_device_train_batch_size=spec["batch"],
        learning_rate=spec["lr"], weight_decay=spec["weight_decay"],
        warmup_steps=int(round(spec["warmup_ratio"] * spec["steps"])), seed=spec["seed"], report_to="none",
        save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True)
    if best:
        from lmtune.train.precision import native_bf16_cpu

        # bf16 only where the CPU computes it natively: elsewhere it is emulated and slower than fp32 (the rule of
        # lmtune's --precision auto), and a bf16 Trainer would be a straw man.
        kw |= dict(bf16=native_bf16_cpu(), train_sampling_strategy="group_by_length",
                   per_device_eval_batch_size=spec.get("eval_batch", 32), dataloader_num_workers=0)
    args = TrainingArguments(**kw)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=val_ds, data_collator=collator,
                      compute_metrics=metrics, callbacks=[Timer()])
    t0 = time.time()
    trainer.train()
    t_train = time.time() - t0
    t1 = time.time()
    ev = trainer.evaluate()
    eval_s = time.time() - t1
    out = _step_stats(step_times, step_tokens, step_padded, [], opt_times)
    n_train = len(train_ds)
    out |= {"precision": "bf16" if args.bf16 else "fp32", "attn": model.config._attn_implementation, "val_accuracy": ev["eval_accuracy"], "eval_seconds": eval_s,
            "train_seconds_all_steps": t_train, "steps_per_epoch": math.ceil(n_train / spec["batch"]),
            "train_rows": n_train, "val_rows": len(val_ds), "peak_rss_mb": _rss_mb(), "run_wall_s": time.time() - t0,
            "optim": str(args.optim)}
    return out


# Contenders: lmtune as shipped, the two Trainer baselines, and ablations (not run by default) that show
# where lmtune's speed comes from and what a Trainer user gets by picking eager attention by hand.
VARIANTS: dict[str, dict[str, Any]] = {
    "lmtune": {},
    "lmtune-autocast": {"precision": "bf16"},                  # bf16 autocast over fp32 weights
    "lmtune-eager": {"attn": "eager"},                         # transformers' eager attention instead of lmtune_eager
    "lmtune-autocast-sdpa": {"precision": "bf16", "attn": "sdpa"},  # lmtune 0.1's defaults
    "trainer-best": {},
    "trainer-default": {},
    "trainer-best-eager": {"attn": "eager"},
}


def main() -> int:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    c = spec["contender"]
    if c not in VARIANTS:
        raise SystemExit(f"unknown contender {c}; known: {', '.join(VARIANTS)}")
    spec = spec | VARIANTS[c]
    out = run_lmtune(spec) if c.startswith("lmtune") else run_trainer(spec, best=c.startswith("trainer-best"))
    out["contender"] = c
    out["threads"] = torch.get_num_threads()
    if spec.get("gemm"):
        from bench.common import gemm_peak
        d = out.get("d_model") or 576
        out["gemm_peak_flops"] = {"bf16_2048": gemm_peak("bf16"), "fp32_2048": gemm_peak("fp32"),
                                  "bf16_model_shape": gemm_peak("bf16", 2048, d, 1536, seconds=1.0)}
    with open(spec["result_file"], "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
