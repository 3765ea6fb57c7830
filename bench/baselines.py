"""Quality floors a fine-tuned model must clear, on the same rows a fine-tune sees.

    python -m bench.baselines tfidf --train train.tsv --test test.tsv [--val validation.tsv] [--rows 2000]
    python -m bench.baselines nearest --train e2e/train.csv --test e2e/test.csv --prompt-column mr --completion-column ref

``tfidf``: TF-IDF + logistic regression (classification). ``nearest``: for generation, the reference of the most
similar training prompt (TF-IDF cosine), scored with the same multi-reference metrics as lmtune.

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


def nearest_neighbour_baseline(train_file: str, test_file: str, *, prompt_column: str | None = None,
                               completion_column: str | None = None, prompt_template: str | None = None,
                               rows: int | None = None, seed: int = 42) -> dict[str, Any]:
    """Answer each test prompt with the first reference of the most similar training prompt (TF-IDF, word 1-2 grams
    + char 2-5 grams, cosine); score against all the test prompt's references (exact match, token F1, ROUGE-L,
    BLEU, chrF, 0-100)."""
    import numpy as np
    from scipy.sparse import hstack
    from sklearn.feature_extraction.text import TfidfVectorizer

    from lmtune.config import DataConfig
    from lmtune.data.generation import load_generation_data, read_generation_table
    from lmtune.generation_metrics import generation_metrics

    cfg = DataConfig(train_file=train_file, val_file=test_file, prompt_column=prompt_column,
                     completion_column=completion_column, prompt_template=prompt_template, max_train_rows=rows,
                     split_seed=seed)
    bundle = load_generation_data(cfg)
    test = read_generation_table(test_file, prompt_column=prompt_column, completion_column=completion_column,
                                 prompt_template=prompt_template)
    t0 = time.time()
    train_groups = list(bundle.train.groups().values())
    train_prompts = [bundle.train.examples[g[0]].prompt for g in train_groups]
    test_groups = list(test.groups().values())
    test_prompts = [test.examples[g[0]].prompt for g in test_groups]
    word = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)
    char = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 5), sublinear_tf=True)
    X = hstack([word.fit_transform(train_prompts), char.fit_transform(train_prompts)]).tocsr()
    Q = hstack([word.transform(test_prompts), char.transform(test_prompts)]).tocsr()
    nearest = np.asarray((Q @ X.T).toarray().argmax(axis=1)).ravel()
    predictions = [bundle.train.examples[train_groups[int(j)][0]].completion for j in nearest]
    references = [[test.examples[i].completion for i in g] for g in test_groups]
    return {"baseline": "nearest-neighbour (TF-IDF)", "train_rows": len(bundle.train), "train_prompts": len(train_groups),
            "test_rows": len(test), "test_prompts": len(test_groups),
            **{f"test_{k}": v for k, v in generation_metrics(predictions, references).items()},
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
    n = sub.add_parser("nearest", help="generation: the reference of the nearest training prompt (TF-IDF)")
    n.add_argument("--train", required=True)
    n.add_argument("--test", required=True)
    n.add_argument("--rows", type=int)
    n.add_argument("--prompt-column")
    n.add_argument("--completion-column")
    n.add_argument("--prompt-template")
    n.add_argument("--json", action="store_true")
    ns = p.parse_args(argv)
    if ns.cmd == "nearest":
        r = nearest_neighbour_baseline(ns.train, ns.test, prompt_column=ns.prompt_column,
                                       completion_column=ns.completion_column, prompt_template=ns.prompt_template,
                                       rows=ns.rows)
        print(json.dumps(r, indent=2) if ns.json else
              f"nearest neighbour on {r['train_rows']} training rows ({r['train_prompts']} prompts): test "
              + ", ".join(f"{k.removeprefix('test_')} {r[k]:.2f}" for k in r if k.startswith("test_") and k not in
                          ("test_rows", "test_prompts")) + f" ({r['test_prompts']} test prompts)")
        return 0
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
