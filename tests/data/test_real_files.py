"""Every real data set in ../shared/data loads whole, with at most column flags.

The files live outside the repository (never copied in); set LMTUNE_DATA_DIR to read them elsewhere.
The tests are skipped when the folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmtune.config import DataConfig
from lmtune.data import load_data, read_table


def _data_dir() -> Path | None:
    env = os.environ.get("LMTUNE_DATA_DIR")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    return d.resolve() if d.is_dir() else None


DATA = _data_dir()
pytestmark = pytest.mark.skipif(DATA is None, reason="shared data folder not found (set LMTUNE_DATA_DIR)")

# name, train file, val file, flags, rows (train, val), number of classes -- rows as in the data README
SETS = [
    ("sst2", "sst2/train.tsv", "sst2/validation.tsv", {}, (67_349, 872), 2),
    ("trec", "trec/train.csv", "trec/test.csv", {"label_column": "coarse_label"}, (5_452, 500), 6),
    ("sms_spam", "sms_spam/sms_spam.tsv", None, {}, (5_574, None), 2),
    ("banking77", "banking77/train.csv", "banking77/test.csv", {}, (10_003, 3_080), 77),
    ("emotion", "emotion/train.jsonl", "emotion/validation.jsonl", {}, (16_000, 2_000), 6),
    ("ag_news", "ag_news/train.tsv", "ag_news/test.tsv", {}, (10_001, 7_600), 4),
]


@pytest.mark.parametrize("train, val, flags, rows, classes", [s[1:] for s in SETS], ids=[s[0] for s in SETS])
def test_load_real(train, val, flags, rows, classes):
    cfg = DataConfig(train_file=str(DATA / train), val_file=str(DATA / val) if val else None, **flags)
    b = load_data(cfg)
    s = b.summary
    assert s["rows_read"]["train"] == rows[0] and s["skipped"]["train"] == {}
    assert len(b.label_map) == classes
    if val:
        assert s["rows_read"]["val"] == rows[1] == len(b.val) and s["skipped"]["val"] == {}
        assert len(b.train) == rows[0]
    else:
        assert len(b.train) + len(b.val) == rows[0] and s["val_source"] == "split"
        assert set(s["class_counts"]["val"]) == set(b.label_map.labels)
    assert len(b.train_ids) == len(b.train) and len(b.val_ids) == len(b.val)
    assert all(t.strip() for t in b.train.texts[:1000])


def test_trec_needs_the_label_flag():
    from lmtune.errors import LabelError

    with pytest.raises(LabelError, match="--label-column"):
        load_data(DataConfig(train_file=str(DATA / "trec/train.csv")))


def test_sms_spam_class_counts():
    t = read_table(DATA / "sms_spam/sms_spam.tsv")
    assert t.labels.count("ham") == 4_827 and t.labels.count("spam") == 747
    # A quoted field with doubled quotes inside comes back as the message itself.
    i = t.line_numbers.index(68)
    assert t.texts[i].startswith('Today is "song dedicated day.."') and t.labels[i] == "ham"


def test_banking77_quoted_newlines_keep_line_numbers():
    t = read_table(DATA / "banking77/train.csv")
    # More physical lines than rows: some records span lines, and line numbers stay physical.
    with open(DATA / "banking77/train.csv", encoding="utf-8") as f:
        physical = sum(1 for _ in f)
    assert t.line_numbers[0] == 2 and t.line_numbers[-1] <= physical
    assert t.line_numbers == sorted(t.line_numbers) and len(set(t.line_numbers)) == len(t)


def test_sst2_labels_are_numeric():
    b = load_data(DataConfig(train_file=str(DATA / "sst2/validation.tsv"), val_fraction=0.5))
    assert b.label_map.labels == ["0", "1"]
