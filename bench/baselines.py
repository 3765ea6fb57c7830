"""The quality floor: TF-IDF + logistic regression on the same rows a fine-tune sees.

    python -m bench.baselines tfidf --train train.tsv --test test.tsv [--val validation.tsv] [--rows 2000]

Rows are drawn with lmtune's own stratified sampler and split seed, so the baseline and ``lmtune train
--max-train-rows N`` train on exactly the same examples.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any


def tfidf_baseline(train_file: str, test_file: str, *, rows: int | None = None, val_file: str | None = None,
                   text_column: str | None = None, label_column: str | None = None, seed: int = 42) -> dict[str, Any]:
    """Fit TF-IDF (word 1-2 grams + char 2-5 grams) + logistic regression; C picked on validation when given."""
    import numpy as np
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score

    from lmtune.config import DataConfig
    from lmtune.data import load_data, read_table

    bundle = load_data(DataConfig(train_file=train_file, val_file=val_file, max_train_rows=rows,
                                  text_column=text_column, label_column=label_column, split_seed=seed))
    lm = bundle.label_map
    test = read_table(test_file, text_column=bundle.train.text_column, label_column=bundle.train.label_column)
    y_test = np.asarray(lm.encode(test.labels, path=test_file))
    t0 = time.time()
    word = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True, min_df=2)
    X_train = hstack([word.fit_transform(bundle.train.texts), char.fit_transform(bundle.train.texts)]).tocsr()
    X_val = hstack([word.transform(bundle.val.texts), char.transform(bundle.val.texts)]).tocsr()
    X_test = hstack([word.transform(test.texts), char.transform(test.texts)]).tocsr()
    y_train, y_val = np.asarray(bundle.train_ids), np.asarray(bundle.val_ids)
    best = None
    for C in (0.3, 1.0, 3.0, 10.0, 30.0):
        clf = LogisticRegression(C=C, max_iter=2000).fit(X_train, y_train)
        acc = accuracy_score(y_val, clf.predict(X_val))
        if best is None or acc > best[0]:
            best = (acc, C, clf)
    val_acc, C, clf = best
    pred = clf.predict(X_test)
    return {"baseline": "tfidf+logreg", "train_rows": len(bundle.train), "val_rows": len(bundle.val), "C": C,
            "val_accuracy": float(val_acc), "test_accuracy": float(accuracy_score(y_test, pred)),
            "test_macro_f1": float(f1_score(y_test, pred, average="macro")), "test_rows": len(test),
            "seconds": round(time.time() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.baselines")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tfidf", help="TF-IDF + logistic regression")
    t.add_argument("--train", required=True)
    t.add_argument("--test", required=True)
    t.add_argument("--val")
    t.add_argument("--rows", type=int)
    t.add_argument("--text-column")
    t.add_argument("--label-column")
    t.add_argument("--json", action="store_true")
    ns = p.parse_args(argv)
    r = tfidf_baseline(ns.train, ns.test, rows=ns.rows, val_file=ns.val, text_column=ns.text_column,
                       label_column=ns.label_column)
    if ns.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"TF-IDF + logistic regression on {r['train_rows']} training rows: validation accuracy "
              f"{r['val_accuracy']:.4f}, test accuracy {r['test_accuracy']:.4f}, test macro-F1 {r['test_macro_f1']:.4f} "
              f"({r['test_rows']} test rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
