"""How close lmtune's fp32 generation step is to this CPU's fp32 matmul peak (E2E, SmolLM2-135M, batch 16,
max length 128, 400 training pairs: the `bench sft` setting), and so how much faster than SFTTrainer any
implementation of the same training could be here."""
import importlib
import json
import shutil
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # the repository root, for `bench`
import lmtune  # noqa: E402
from bench.common import data_dir, gemm_peak, machine  # noqa: E402
from lmtune.config import DataConfig  # noqa: E402

loop = importlib.import_module("lmtune.train.loop")
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 8
rec = []
orig = loop._forward_backward

def timed(s, st, share, units):
    t0 = time.perf_counter()
    r = orig(s, st, share, units)
    dt = time.perf_counter() - t0
    enc = s.train_enc
    lens = [int(enc.lengths[i]) for i in share]
    labels = [enc.labels[i] for i in share]
    targets = sum(sum(1 for y in lab[1:] if int(y) != -100) for lab in labels)
    from lmtune.tasks.generation import first_target, logit_positions
    width = max(lens)
    kept = logit_positions([first_target(y) for y in labels], width) * len(lens)
    rec.append({"fwd_bwd_s": dt, "tokens": sum(lens), "width": width, "rows": len(lens), "targets": targets,
                "kept_positions": kept, "attn": sum(lens) * width})
    return r

loop._forward_backward = timed
e2e = data_dir() / "e2e_nlg"
cfg = lmtune.RunConfig(
    data=DataConfig(train_file=f"{e2e}/train.csv", prompt_column="mr", completion_column="ref", max_train_rows=400,
                    max_val_rows=200, split_seed=42),
    train=lmtune.TrainConfig(learning_rate=5e-5, global_batch_size=16, max_steps=steps, warmup_ratio=0.06,
                             weight_decay=0.01, max_length=128, seed=0, precision="fp32", log_every_steps=1,
                             progress=False, save_checkpoints=False, eval_generate_rows=0),
    output_dir=tempfile.mkdtemp(prefix="lmtune-mfu-"), overwrite=True, report=False)
res = lmtune.train(cfg, quiet=True)
shutil.rmtree(cfg.output_dir, ignore_errors=True)
r = res.record
cum = [0.0] + [e["elapsed_s"] for e in r["train_log"]]
step_s = [b - a for a, b in zip(cum, cum[1:])]
cfgm = json.load(open(os.path.join(r["model"]["resolved"], "config.json")))
N, L, d, V = r["model"]["non_embedding_params"], cfgm["num_hidden_layers"], cfgm["hidden_size"], cfgm["vocab_size"]
timed_rec, timed_s = rec[1:], step_s[1:]  # step 1 is a warm-up
tok = sum(x["tokens"] for x in timed_rec); tgt = sum(x["targets"] for x in timed_rec)
kept = sum(x["kept_positions"] for x in timed_rec); attn = sum(x["attn"] for x in timed_rec)
f_body = 6.0 * N * tok + 6.0 * L * d * attn
f_head_done = 6.0 * d * V * kept     # what lmtune's head computes (positions from the first predictor on)
f_head_min = 6.0 * d * V * tgt       # the least any implementation must: the target positions only
peak32 = gemm_peak("fp32")
shape32 = gemm_peak("fp32", 2048, d, 1536, seconds=1.0)
secs = sum(timed_s)
out = {"machine": machine(), "precision": r["precision"], "steps_timed": len(timed_s), "s_per_step": secs / len(timed_s),
       "fwd_bwd_share": sum(x["fwd_bwd_s"] for x in timed_rec) / secs, "tokens_per_step": tok / len(timed_s),
       "targets_per_step": tgt / len(timed_s), "fp32_peak_2048_tflops": peak32 / 1e12,
       "fp32_model_shape_tflops": shape32 / 1e12,
       "flops_done_per_step_t": (f_body + f_head_done) / len(timed_s) / 1e12,
       "flops_min_per_step_t": (f_body + f_head_min) / len(timed_s) / 1e12,
       "fraction_of_peak_done": (f_body + f_head_done) / secs / peak32,
       "fraction_of_peak_min": (f_body + f_head_min) / secs / peak32,
       "fraction_of_model_shape_peak_min": (f_body + f_head_min) / secs / shape32,
       "step_s": step_s, "command": "python bench/results/generation-mfu-avx2/mfu.py " + str(steps)}
out["least_step_s_at_peak"] = out["flops_min_per_step_t"] * 1e12 / peak32
json.dump(out, open(HERE / "mfu.json", "w"), indent=1)
print(json.dumps({k: v for k, v in out.items() if k not in ("machine", "step_s")}, indent=1))
