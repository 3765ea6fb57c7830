"""Item 4: fine-tuned test accuracy vs TF-IDF + logistic regression on the same rows, next to published references."""

from __future__ import annotations

import csv
import os
import tempfile
import time

from bench.common import DATASETS, REFERENCES, data_dir, fmt, machine, machine_line, save


def _test_subset(name: str, n: int | None, tmp: str) -> tuple[str, int]:
    """A stratified, seeded sample of the test file (same rows for both contenders), written as TSV."""
    from lmtune.data import read_table
    from lmtune.data.split import stratified_sample
    d = DATASETS[name]
    path = str(data_dir() / d["test"])
    t = read_table(path, text_column=d["text"], label_column=d["label"])
    if not n or n >= len(t):
        return path, len(t)
    labels = sorted(set(t.labels))
    idx = sorted(stratified_sample([labels.index(x) for x in t.labels], n, 42))
    out = os.path.join(tmp, f"{name}-test-{n}.tsv")
    with open(out, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_MINIMAL)
        w.writerow([d["text"], d["label"]])
        for i in idx:
            w.writerow([t.texts[i].replace("\t", " ").replace("\n", " "), t.labels[i]])
    return out, len(idx)


def run(datasets: list[str], rows: int, epochs: int = 1, test_rows: int | None = 2000, lr: float = 5e-5,
        name: str = "quality") -> dict:
    import lmtune
    from bench.baselines import tfidf_baseline
    from bench.common import data_config

    res = {"benchmark": "quality", "rows": rows, "epochs": epochs, "test_rows_cap": test_rows, "machine": machine(),
           "data": {}}
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="lmtune-quality-") as tmp:
        for ds in datasets:
            d = DATASETS[ds]
            test_file, n_test = _test_subset(ds, test_rows, tmp)
            print(f"[quality] {ds}: fine-tuning on {rows} rows ...", flush=True)
            val_rows = None if d["val"] else 500
            cfg = lmtune.RunConfig(data=data_config(ds, rows, val_rows),
                                   train=lmtune.TrainConfig(learning_rate=lr, epochs=epochs, max_length=d["max_length"],
                                                            eval_batch_size=32, progress=False, save_checkpoints=False),
                                   output_dir=os.path.join(tmp, ds), overwrite=True, report=False)
            t0 = time.time()
            tr = lmtune.train(cfg, quiet=True)
            train_s = time.time() - t0
            ev = lmtune.evaluate(tr.output_dir, test_file, text_column=d["text"], label_column=d["label"], batch_size=32)
            tf = tfidf_baseline(str(data_dir() / d["train"]), test_file, rows=rows,
                                val_file=str(data_dir() / d["val"]) if d["val"] else None,
                                text_column=d["text"], label_column=d["label"])
            res["data"][ds] = {"train_rows": tr.record["data"]["rows"]["train"], "val_rows": tr.record["data"]["rows"]["val"],
                                 "test_rows": n_test, "lmtune_val_accuracy": tr.best["accuracy"],
                                 "lmtune_test_accuracy": ev["accuracy"], "lmtune_test_macro_f1": ev["macro_f1"],
                                 "lmtune_seconds": round(train_s, 1), "tfidf": tf, "reference": REFERENCES.get(ds, "-")}
            print(f"    lmtune test acc {ev['accuracy']:.4f}, TF-IDF {tf['test_accuracy']:.4f}", flush=True)
    res["seconds"] = round(time.time() - t_all, 1)
    save(name, res, markdown(res))
    return res


def markdown(res: dict) -> str:
    lines = [f"## Quality floor: {res['rows']} training rows (stratified sample, split seed 42), {res['epochs']} epoch(s), "
             "smollm2-135m-instruct full fine-tune (lmtune defaults: lr 5e-5, batch 16, bf16)", "",
             machine_line(res["machine"]), "",
             "Test rows: the official test file, or a stratified seeded sample of it when it is larger than "
             f"{res['test_rows_cap']} rows (the same rows for both classifiers). TF-IDF + logistic regression "
             "(word 1-2 + char 2-5 grams, C picked on validation) trains on exactly the same rows. References are "
             "published full-data results (tens of thousands of training rows), for orientation only.", "",
             "| data set | train rows | test rows | lmtune test acc | lmtune macro-F1 | TF-IDF test acc | lmtune - TF-IDF (points) | published full-data reference |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["data"].items():
        diff = 100 * (r["lmtune_test_accuracy"] - r["tfidf"]["test_accuracy"])
        lines.append(f"| {name} | {r['train_rows']} | {r['test_rows']} | {fmt(r['lmtune_test_accuracy'], 4)} | "
                     f"{fmt(r['lmtune_test_macro_f1'], 4)} | {fmt(r['tfidf']['test_accuracy'], 4)} | {diff:+.1f} | {r['reference']} |")
    return "\n".join(lines)
