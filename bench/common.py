"""Shared pieces of the benchmarks: data sets, machine description, GEMM peak, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def data_dir() -> Path:
    return Path(os.environ.get("LMTUNE_DATA_DIR") or (ROOT.parent / "shared" / "data")).resolve()


# name -> files and columns. "val": None means a stratified 20 % of train is held out (lmtune's own split).
DATASETS: dict[str, dict[str, Any]] = {
    "sst2": {"train": "sst2/train.tsv", "val": "sst2/validation.tsv", "test": "sst2/test.tsv",
             "text": "sentence", "label": "label", "max_length": 64},
    "ag_news": {"train": "ag_news/train.tsv", "val": None, "test": "ag_news/test.tsv",
                "text": "text", "label": "label", "max_length": 128},
    "trec": {"train": "trec/train.csv", "val": None, "test": "trec/test.csv",
             "text": "text", "label": "coarse_label", "max_length": 64},
    "emotion": {"train": "emotion/train.jsonl", "val": "emotion/validation.jsonl", "test": "emotion/test.jsonl",
                "text": "text", "label": "label", "max_length": 64},
    "banking77": {"train": "banking77/train.csv", "val": None, "test": "banking77/test.csv",
                  "text": "text", "label": "category", "max_length": 64},
}

# Published full-data references (../shared/data/README.md).
REFERENCES = {
    "sst2": "GPT-1 91.3 (Radford et al. 2018), BERT-base 93.5 (Devlin et al. 2019)",
    "trec": "CNN 93.6 (Kim 2014)",
    "ag_news": "BERT-base 94.75 (Sun et al. 2019)",
    "banking77": "about 93 (Casanueva et al. 2020)",
    "emotion": "-",
}


def data_config(name: str, rows: int | None, val_rows: int | None = None):
    from lmtune.config import DataConfig
    d = DATASETS[name]
    base = data_dir()
    return DataConfig(train_file=str(base / d["train"]), val_file=str(base / d["val"]) if d["val"] else None,
                      text_column=d["text"], label_column=d["label"], max_train_rows=rows, max_val_rows=val_rows)


def trainer_data(spec: dict[str, Any]) -> tuple[Any, str, Any, int, list[dict], list[dict]]:
    """The rows lmtune sees, tokenised the way a Trainer user would: (bundle, model path, tokenizer,
    number of labels, train examples, validation examples). Shared by the throughput and search baselines."""
    from transformers import AutoTokenizer

    from lmtune.data import load_data
    from lmtune.models import resolve, set_pad_token

    bundle = load_data(data_config(spec["data"], spec["rows"], spec.get("val_rows")))
    path = resolve("smollm2-135m-instruct").path
    tok = AutoTokenizer.from_pretrained(path)
    set_pad_token(tok)

    def encode(texts, ids):
        enc = tok(list(texts), truncation=True, max_length=spec["max_length"])
        return [{"input_ids": enc["input_ids"][i], "attention_mask": enc["attention_mask"][i], "labels": int(ids[i])}
                for i in range(len(ids))]

    return (bundle, path, tok, len(bundle.label_map.labels), encode(bundle.train.texts, bundle.train_ids),
            encode(bundle.val.texts, bundle.val_ids))


def machine() -> dict[str, Any]:
    import torch
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                            "cpu_count": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        info["cpu_flags_of_note"] = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))
    except OSError:
        pass
    info["load_avg_at_start"] = os.getloadavg()
    return info


def gemm_peak(dtype_name: str, m: int = 2048, k: int = 2048, n: int = 2048, seconds: float = 2.0) -> float:
    """Sustained FLOP/s of ``torch.matmul`` on (m x k) @ (k x n) at ``dtype_name`` (bf16 or fp32)."""
    import torch
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    for _ in range(3):
        torch.matmul(a, b)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:  # best of short bursts: robust to a neighbour's brief load
        t0, reps = time.perf_counter(), 0
        while reps < 3 or time.perf_counter() - t0 < 0.25:
            torch.matmul(a, b)
            reps += 1
        best = max(best, 2.0 * m * k * n * reps / (time.perf_counter() - t0))
    return best


def run_worker(spec: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run ``bench.worker`` in a fresh process (fair peak RSS, nothing cached in memory) and return its result."""
    with tempfile.TemporaryDirectory(prefix="lmtune-bench-") as tmp:
        spec = dict(spec, workdir=tmp)
        out = Path(tmp) / "result.json"
        spec["result_file"] = str(out)
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        t0 = time.time()
        p = subprocess.run([sys.executable, "-m", "bench.worker", json.dumps(spec)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0 or not out.is_file():
            sys.stderr.write(p.stdout[-3000:] + p.stderr[-6000:])
            raise RuntimeError(f"worker {spec.get('contender')} failed (exit {p.returncode})")
        r = json.loads(out.read_text())
        r["process_wall_s"] = round(time.time() - t0, 2)
        return r


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def save(name: str, result: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")
    print(markdown)
    print(f"\nwrote {RESULTS / (name + '.json')} and {RESULTS / (name + '.md')}")


def machine_line(m: dict[str, Any]) -> str:
    return (f"Machine: {m.get('cpu_model', '?')}, {m.get('cpu_count')} cores, torch {m.get('torch')} "
            f"({m.get('torch_threads')} threads, {m.get('cpu_capability')}), transformers {m.get('transformers')}; "
            f"flags {' '.join(m.get('cpu_flags_of_note', []))}; load average at start {tuple(round(x, 2) for x in m['load_avg_at_start'])}.")


def fmt(x: Any, nd: int = 2) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def standalone(prog: str, doc: str | None, add_arguments: Any, run: Any, argv: list[str] | None) -> int:
    """``python -m bench.X``: the same arguments as ``python -m bench X``, parsed and run (``run``'s result is not
    an exit code)."""
    import argparse

    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    run(p.parse_args(argv))
    return 0

