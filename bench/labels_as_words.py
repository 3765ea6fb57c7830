"""Classification written as generation: SST-2 with the labels as words vs the classification head (issue 9, point 9).

    python -m bench labels-as-words                       # SST-2, 2,000 training rows, SmolLM2-135M (~20 min)
    python -m bench labels-as-words --tiny                # the code paths on a tiny random model (< 1 min)

GPT-3 was fine-tuned on classification written out as text ("positive" / "negative" as the completion). Users
holding OpenAI fine-tuning files have exactly that, so the question is what it costs next to lmtune's
classification head on the same rows. Both contenders are ``lmtune train`` in a fresh process, one after the
other, on the same 2,000 training rows (lmtune's stratified sample, split seed 42, as in the README demo), the
same GLUE validation rows and the same hyperparameters (lr 5e-5, batch 16, 2 epochs: the demo's step 1); each
keeps its best evaluation by accuracy (the head) or exact match (generation, the same thing for one-word labels).
Then ``lmtune evaluate`` on the whole labelled SST-2 test split.

- **head**: ``--task classification`` on ``sentence`` / ``label``, max length 64.
- **words**: ``--task generation``, the prompt ``PROMPT`` around the sentence, the completion ``negative`` or
  ``positive``, the model's chat template (SmolLM2-Instruct: ChatML with its default system prompt), max length
  128 (the template adds ~30 tokens). Test accuracy counts a prediction right when it is the label's word (case
  and end punctuation ignored); anything else, a word that is no label included, is wrong and counted.

Reported: test accuracy, training time (training + its evaluations, from each run's record), test evaluation
time, tokens trained on, and the ratios.
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import ROOT, data_dir, fmt, machine, machine_line, save, standalone

PROMPT = "Is the sentiment of this movie review positive or negative?\n\n{sentence}"
WORDS = {"0": "negative", "1": "positive"}
HYPER = ["--lr", "5e-5", "--batch-size", "16", "--epochs", "2", "--seed", "0"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rows", type=int, default=2000, help="training rows (default 2000, as in the README demo)")
    p.add_argument("--test-rows", type=int, help="score on the first N test rows (default: all 1,821)")
    p.add_argument("--name", help="result file name (default: labels-as-words-sst2)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model on tiny data: checks the code paths only")


def _rows(path: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(sentence, label) of an SST-2 TSV, read by lmtune's own reader."""
    from lmtune.data import read_table

    t = read_table(str(path), text_column="sentence", label_column="label")
    pairs = list(zip(t.texts, t.labels))
    return pairs[:limit] if limit else pairs


def write_files(work: Path, train: list[tuple[str, str]], val: list[tuple[str, str]], test: list[tuple[str, str]]) -> dict[str, Path]:
    """The same rows twice: TSV for the head, prompt/completion JSONL for generation."""
    files: dict[str, Path] = {}
    for split, rows in (("train", train), ("val", val), ("test", test)):
        tsv, jsonl = work / f"{split}.tsv", work / f"{split}.jsonl"
        with open(tsv, "w", newline="", encoding="utf-8") as out:
            w = csv.writer(out, delimiter="\t")
            w.writerow(["sentence", "label"])
            w.writerows(rows)
        jsonl.write_text("".join(json.dumps({"prompt": PROMPT.format(sentence=s), "completion": WORDS[y]}) + "\n"
                                 for s, y in rows), encoding="utf-8")
        files[f"{split}_tsv"], files[f"{split}_jsonl"] = tsv, jsonl
    return files


def training_rows(rows: int) -> list[tuple[str, str]]:
    """The training rows the README demo's step 1 trains on (lmtune's stratified sample, split seed 42)."""
    from lmtune.config import DataConfig
    from lmtune.data.split import load_data

    base = data_dir() / "sst2"
    b = load_data(DataConfig(train_file=str(base / "train.tsv"), val_file=str(base / "validation.tsv"),
                             text_column="sentence", label_column="label", max_train_rows=rows))
    return list(zip(b.train.texts, b.train.labels))


def _lmtune(*args: str) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "lmtune", *args], cwd=ROOT, check=True)
    return time.time() - t0


def word_accuracy(predictions_file: Path) -> dict[str, Any]:
    """Right when the prediction is the reference word, ignoring case and end punctuation."""
    right = other = n = 0
    for line in predictions_file.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        said = r["prediction"].strip().lower().rstrip(".!")
        n += 1
        right += said in [ref.lower() for ref in r["references"]]
        other += said not in WORDS.values()
    return {"accuracy": right / n if n else None, "not_a_label": other, "n": n}


def run(ns: argparse.Namespace) -> dict[str, Any]:
    t0 = time.time()
    work = Path(tempfile.mkdtemp(prefix="lmtune-labels-as-words-"))
    if ns.tiny:
        import random

        from bench.search import _tiny_sentence, build_tiny_model

        rng = random.Random(0)
        rows = [(_tiny_sentence(rng, i % 2 == 1), str(i % 2)) for i in range(96)]
        train, val, test = rows[:64], rows[64:80], rows[80:]
        model, extra = build_tiny_model(work / "model"), ["--max-steps", "4", "--lr", "1e-3"]
    else:
        base = data_dir() / "sst2"
        train, val, test = training_rows(ns.rows), _rows(base / "validation.tsv"), _rows(base / "test.tsv", ns.test_rows)
        model, extra = "smollm2-135m-instruct", []
    f = write_files(work, train, val, test)
    common = ["--model", model, *HYPER, "--overwrite", "--no-report", *extra]
    contenders = {
        "head": ["train", "--task", "classification", "--data", str(f["train_tsv"]), "--val-file", str(f["val_tsv"]),
                 "--max-length", "64", "--metric", "accuracy", *common, "--out", str(work / "head")],
        "words": ["train", "--task", "generation", "--data", str(f["train_jsonl"]), "--val-file", str(f["val_jsonl"]),
                  "--max-length", "128", "--metric", "exact_match", *common, "--out", str(work / "words")],
    }
    res: dict[str, Any] = {"benchmark": "labels-as-words", "tiny": ns.tiny, "machine": machine(), "model": model,
                           "rows": {"train": len(train), "val": len(val), "test": len(test)}, "prompt": PROMPT,
                           "commands": {k: " ".join(v) for k, v in contenders.items()}, "contenders": {}}
    for name, args in contenders.items():
        print(f"[labels-as-words] {name}: lmtune {' '.join(args)}", flush=True)
        _lmtune(*args)
        record = json.loads((work / name / "lmtune_run.json").read_text())
        test_file = f["test_tsv"] if name == "head" else f["test_jsonl"]
        eval_s = _lmtune("evaluate", str(work / name), "--data", str(test_file), "--output", str(work / f"{name}-test.json"))
        ev = json.loads((work / f"{name}-test.json").read_text())
        scored = ({"accuracy": ev["accuracy"], "not_a_label": 0, "n": ev.get("n", len(test))} if name == "head"
                  else word_accuracy(Path(ev["predictions_file"])))
        timing = record["timing"]
        res["contenders"][name] = {"test": scored, "val_best": {k: record["best"].get(k) for k in ("accuracy", "exact_match", "step")},
                                   "train_s": timing["train_seconds"], "train_eval_s": timing["eval_seconds"],
                                   "train_tokens": timing["train_tokens"], "test_eval_wall_s": round(eval_s, 1),
                                   "steps": record["steps"]["done"], "cut_rows": record["data"].get("truncated", {})}
    h, w = res["contenders"]["head"], res["contenders"]["words"]
    res["ratios"] = {"train_s_words_over_head": (w["train_s"] + w["train_eval_s"]) / (h["train_s"] + h["train_eval_s"]),
                     "test_eval_words_over_head": w["test_eval_wall_s"] / h["test_eval_wall_s"],
                     "tokens_words_over_head": w["train_tokens"] / h["train_tokens"],
                     "accuracy_points_words_minus_head": 100 * (w["test"]["accuracy"] - h["test"]["accuracy"])}
    res["wall_s"] = round(time.time() - t0, 1)
    save(ns.name or (str(work / "labels-as-words-tiny") if ns.tiny else "labels-as-words-sst2"), res, markdown(res))
    return res


def markdown(res: dict[str, Any]) -> str:
    h, w, r = res["contenders"]["head"], res["contenders"]["words"], res["ratios"]
    rows = res["rows"]
    lines = [f"## SST-2 as generation (labels as words) vs the classification head, {res['model']}", "",
             machine_line(res["machine"]), "",
             f"Same {rows['train']} training rows, {rows['val']} validation rows, {rows['test']} test rows; lr 5e-5, "
             "batch 16, 2 epochs, seed 0; each keeps its best validation evaluation (accuracy / exact match). "
             "Each contender is a fresh `lmtune train` process, head first. Generation prompt: "
             f"`{res['prompt']!r}` in the model's chat template, completion `negative` / `positive`.", "",
             "| contender | test accuracy | not a label | best val accuracy | train + eval s | of which eval s "
             "| tokens trained | test evaluation s |", "|---|---|---|---|---|---|---|---|"]
    for name, c in (("head (classification)", h), ("words (generation)", w)):
        val = c["val_best"].get("accuracy")
        val = val if val is not None else (c["val_best"].get("exact_match") or 0) / 100
        lines.append(f"| {name} | {c['test']['accuracy']:.4f} | {c['test']['not_a_label']} | {val:.4f} "
                     f"| {c['train_s'] + c['train_eval_s']:.0f} | {c['train_eval_s']:.0f} | {c['train_tokens']} "
                     f"| {c['test_eval_wall_s']:.0f} |")
    lines += ["", f"Words vs head: accuracy {r['accuracy_points_words_minus_head']:+.2f} points, training "
                  f"{fmt(r['train_s_words_over_head'])}x the time ({fmt(r['tokens_words_over_head'])}x the tokens), "
                  f"test evaluation {fmt(r['test_eval_words_over_head'])}x (a process each, model loading included).",
              "", "Commands:", ""] + [f"    lmtune {c}" for c in res["commands"].values()]
    if res.get("tiny"):
        lines += ["", "**--tiny**: a tiny random model on tiny data, to check the code paths; the numbers mean nothing."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return standalone("python -m bench labels-as-words", __doc__, add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
