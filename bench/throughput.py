"""Items 1 and 2: training throughput, memory, accuracy (lmtune vs transformers.Trainer) and MFU.

Each contender runs in its own fresh process, contenders alternate within each repeat, the first step
of every run is a warm-up excluded from s/step, and the table shows medians over repeats.
"""

from __future__ import annotations

import time
from typing import Any

from bench.common import fmt, gemm_peak, machine, machine_line, median, run_worker, save

CONTENDERS = ("lmtune", "trainer-best", "trainer-default")
METRICS = ("s_per_step", "tokens_per_s", "eval_seconds", "epoch_seconds", "train_epoch_seconds", "peak_rss_mb",
           "val_accuracy", "optimizer_share", "padding_share", "mfu_bf16", "gemm_bf16_tflops")


def _flops(r: dict[str, Any]) -> dict[str, float]:
    """Training FLOPs of the timed steps: 6 N tokens + attention 6 L d (tokens x padded length)."""
    n, L, d = r["non_embedding_params"], r["n_layers"] or 0, r["d_model"] or 0
    dense = 6.0 * n * r["tokens_timed"]
    attn = 6.0 * L * d * r["attn_token_len_timed"]
    secs = r["s_per_step"] * r["steps_timed"]
    return {"model_flops": dense + attn, "model_flops_per_s": (dense + attn) / secs,
            "padded_flops_per_s": (6.0 * n * r["padded_tokens_timed"] + attn) / secs}


def _derive(r: dict[str, Any]) -> dict[str, Any]:
    r = dict(r)
    r["train_epoch_seconds"] = r["s_per_step"] * r["steps_per_epoch"]
    r["epoch_seconds"] = r["train_epoch_seconds"] + r["eval_seconds"]
    if r["contender"].startswith("lmtune") and r.get("non_embedding_params"):
        r |= _flops(r)
        g = r.get("gemm_peak_flops") or {}
        if g:
            peak = g["bf16_2048"] if r["precision"].startswith("bf16") else g["fp32_2048"]
            r["mfu_bf16"] = r["model_flops_per_s"] / peak
            r["hfu_padded"] = r["padded_flops_per_s"] / peak
            r["gemm_bf16_tflops"] = g["bf16_2048"] / 1e12
    return r


def run(data: str, rows: int, steps: int, repeats: int, *, max_length: int | None = None, val_rows: int | None = None,
        batch: int = 16, lr: float = 5e-5, threads: int | None = None, contenders: tuple[str, ...] = CONTENDERS, name: str | None = None) -> dict:
    from bench.common import DATASETS
    max_length = max_length or DATASETS[data]["max_length"]
    if val_rows is None and DATASETS[data]["val"] is None:
        val_rows = 500
    spec = {"data": data, "rows": rows, "val_rows": val_rows, "steps": steps, "lr": lr, "batch": batch,
            "max_length": max_length, "seed": 0, "warmup_ratio": 0.06, "weight_decay": 0.01, "eval_batch": 32,
            "threads": threads}
    m = machine()
    runs: dict[str, list[dict]] = {c: [] for c in contenders}
    t0 = time.time()
    for rep in range(repeats):
        order = contenders if rep % 2 == 0 else tuple(reversed(contenders))  # alternate who goes first
        for c in order:
            print(f"[throughput {data}] repeat {rep + 1}/{repeats}: {c} ...", flush=True)
            r = _derive(run_worker(spec | {"contender": c, "gemm": c.startswith("lmtune")}))
            runs[c].append(r)
            print(f"    {fmt(r['s_per_step'])} s/step, {fmt(r['tokens_per_s'], 0)} tok/s, eval {fmt(r['eval_seconds'], 1)} s, "
                  f"acc {fmt(r['val_accuracy'], 4)}, peak RSS {fmt(r['peak_rss_mb'], 0)} MB", flush=True)
    med = {c: {k: median([r.get(k) for r in rs]) for k in METRICS} for c, rs in runs.items()}
    ratios = {}
    if "lmtune" in med:
        L = med["lmtune"]
        for c in contenders:
            if c == "lmtune":
                continue
            B = med[c]
            ratios[c] = {"epoch_speedup": B["epoch_seconds"] / L["epoch_seconds"],
                         "step_speedup": B["s_per_step"] / L["s_per_step"],
                         "tokens_per_s_ratio": L["tokens_per_s"] / B["tokens_per_s"],
                         "eval_speedup": B["eval_seconds"] / L["eval_seconds"],
                         "memory_ratio": L["peak_rss_mb"] / B["peak_rss_mb"],
                         "accuracy_diff_points": 100 * (L["val_accuracy"] - B["val_accuracy"])}
    result = {"benchmark": "throughput", "spec": spec, "repeats": repeats, "machine": m, "medians": med,
              "ratios_lmtune_vs": ratios, "runs": runs, "seconds": round(time.time() - t0, 1),
              "load_avg_at_end": __import__("os").getloadavg()}
    save(name or f"throughput-{data}", result, markdown(result))
    return result


def markdown(res: dict) -> str:
    s, med, rat = res["spec"], res["medians"], res["ratios_lmtune_vs"]
    lm = res["runs"].get("lmtune", [{}])[0]
    lines = [f"## Throughput: {s['data']}, {lm.get('train_rows', s['rows'])} training rows, "
             f"{lm.get('val_rows', '?')} validation rows, batch {s['batch']}, {s['steps']} steps, max length {s['max_length']}, "
             f"lr {s['lr']:g}, median of {res['repeats']} repeat(s)", "",
             machine_line(res["machine"]), "",
             "Time per epoch = median s/step (warm-up step excluded) x steps per epoch + one full validation pass. "
             "Peak RSS = `ru_maxrss` of the contender's own fresh process after the final evaluation. Accuracy is after "
             f"{s['steps']} steps.", "",
             "| contender | precision | s/step | train tokens/s | epoch train s | eval s | epoch s (train+eval) | peak RSS MB | val acc | optimizer share of step | padding share |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c, m in med.items():
        prec = res["runs"][c][0].get("precision", "?")
        lines.append(f"| {c} | {prec} | {fmt(m['s_per_step'], 3)} | {fmt(m['tokens_per_s'], 0)} | {fmt(m['train_epoch_seconds'], 1)} | "
                     f"{fmt(m['eval_seconds'], 1)} | {fmt(m['epoch_seconds'], 1)} | {fmt(m['peak_rss_mb'], 0)} | "
                     f"{fmt(m['val_accuracy'], 4)} | {fmt(m['optimizer_share'], 3)} | {fmt(m['padding_share'], 3)} |")
    if rat:
        lines += ["", "Ratios, lmtune vs baseline (speed-ups > 1 favour lmtune; memory ratio < 1 favours lmtune):", "",
                  "| baseline | epoch speed-up (train+eval) | step speed-up | tokens/s ratio | eval speed-up | memory lmtune/baseline | accuracy diff (points) |",
                  "|---|---|---|---|---|---|---|"]
        for c, r in rat.items():
            lines.append(f"| {c} | {fmt(r['epoch_speedup'])}x | {fmt(r['step_speedup'])}x | {fmt(r['tokens_per_s_ratio'])}x | "
                         f"{fmt(r['eval_speedup'])}x | {fmt(r['memory_ratio'])} | {r['accuracy_diff_points']:+.1f} |")
    L = med.get("lmtune", {})
    if L.get("mfu_bf16") is not None:
        lines += ["", f"MFU of lmtune (model FLOPs 6N x real tokens + attention, over the `torch.matmul` bf16 2048^3 peak "
                  f"{fmt(L['gemm_bf16_tflops'], 3)} TFLOP/s measured in the same process): **{100 * L['mfu_bf16']:.1f}%**; "
                  f"the optimizer step takes {100 * (L['optimizer_share'] or 0):.1f}% of a training step."]
    lines += ["", f"Load average at start {tuple(round(x, 2) for x in res['machine']['load_avg_at_start'])}, at end "
              f"{tuple(round(x, 2) for x in res['load_avg_at_end'])} (2 cores: > 2 means other work shared the CPU)."]
    return "\n".join(lines)


def mfu(data: str, rows: int, steps: int, repeats: int, max_length: int | None = None, threads: int | None = None) -> dict:
    """Item 2 on its own: lmtune runs only, MFU and optimizer share, GEMM peak measured in the same process."""
    return run(data, rows, steps, repeats, max_length=max_length, threads=threads, contenders=("lmtune",), name=f"mfu-{data}")


def gemm_only() -> dict[str, float]:
    return {"bf16": gemm_peak("bf16"), "fp32": gemm_peak("fp32")}
