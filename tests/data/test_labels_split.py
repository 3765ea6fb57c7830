"""LabelMap, stratified split/sample and load_data on small synthetic files."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from lmtune.config import DataConfig
from lmtune.data import LabelMap, load_data, stratified_sample, stratified_split
from lmtune.errors import DataError, LabelError

# ---------------------------------------------------------------------------------------------- LabelMap


def test_numeric_labels_sort_numerically():
    m = LabelMap.from_labels(["10", "2", "1", "0", "2"])
    assert m.labels == ["0", "1", "2", "10"] and len(m) == 4
    assert m.label2id == {"0": 0, "1": 1, "2": 2, "10": 3} and m.id2label[3] == "10"


def test_string_labels_sort_as_strings_and_mixed_are_strings():
    assert LabelMap.from_labels(["pos", "neg", "pos"]).labels == ["neg", "pos"]
    assert LabelMap.from_labels(["10", "2", "x"]).labels == ["10", "2", "x"]
    assert LabelMap.from_labels(["-1", "1"]).labels == ["-1", "1"]


def test_encode_decode_roundtrip_and_json():
    m = LabelMap.from_labels(["b", "a", "c"])
    ids = m.encode(["c", "a", "b", "a"])
    assert ids == [2, 0, 1, 0] and m.decode(ids) == ["c", "a", "b", "a"]
    assert LabelMap.from_json(json.loads(json.dumps(m.to_json()))) == m
    assert LabelMap.from_json({"id2label": {"1": "b", "0": "a", "2": "c"}}) == m


def test_unknown_labels_are_listed_with_known_and_file():
    m = LabelMap.from_labels(["neg", "pos"])
    with pytest.raises(LabelError) as info:
        m.encode(["pos", "neutral", "pos", "mixed", "neutral"], path="val.csv", line_numbers=[2, 3, 4, 5, 6])
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("val.csv:") and "['neutral', 'mixed']" in msg and "line 3" in msg and "['neg', 'pos']" in msg


def test_unknown_labels_shown_up_to_ten():
    m = LabelMap.from_labels(["a", "b"])
    with pytest.raises(LabelError, match="and 5 more"):
        m.encode([f"u{i}" for i in range(15)])


def test_decode_out_of_range():
    with pytest.raises(LabelError, match="out of range"):
        LabelMap.from_labels(["a", "b"]).decode([2])


# ---------------------------------------------------------------------------------------------- split


def _labels(counts: dict[int, int]) -> list[int]:
    out = [c for c, n in counts.items() for _ in range(n)]
    # Interleave so index order is not class order.
    return [out[i] for i in sorted(range(len(out)), key=lambda i: (i * 7919) % len(out))]


def test_split_is_deterministic_stratified_and_disjoint():
    y = _labels({0: 500, 1: 300, 2: 200})
    keep, held = stratified_split(y, 0.2, seed=3)
    assert (keep, held) == stratified_split(y, 0.2, seed=3)
    assert stratified_split(y, 0.2, seed=4)[1] != held
    assert sorted(keep + held) == list(range(len(y))) and not set(keep) & set(held)
    assert len(held) == 200
    assert Counter(y[i] for i in held) == {0: 100, 1: 60, 2: 40}


def test_split_keeps_singletons_in_train_and_every_class_in_both():
    y = _labels({0: 50, 1: 10, 2: 2, 3: 1})
    keep, held = stratified_split(y, 0.2, seed=0)
    singleton = y.index(3)
    assert singleton in keep and singleton not in held
    assert {y[i] for i in held} == {0, 1, 2} and {y[i] for i in keep} == {0, 1, 2, 3}
    assert sorted(keep + held) == list(range(len(y)))


def test_split_too_small_for_every_class_falls_back():
    y = _labels({c: 2 for c in range(10)})  # 20 rows, 10 classes, fraction 0.1 -> 2 held out
    keep, held = stratified_split(y, 0.1, seed=0)
    assert len(held) == 2 and sorted(keep + held) == list(range(20))
    assert {y[i] for i in keep} == set(range(10))  # no class loses its training rows


def test_split_impossible():
    with pytest.raises(DataError):
        stratified_split([0, 1, 2], 0.5, seed=0)
    with pytest.raises(DataError):
        stratified_split([0, 0], 1.5, seed=0)


def test_sample():
    y = _labels({0: 900, 1: 90, 2: 10})
    s = stratified_sample(y, 100, seed=1)
    assert s == stratified_sample(y, 100, seed=1) and len(s) == 100 and len(set(s)) == 100
    assert Counter(y[i] for i in s) == {0: 90, 1: 9, 2: 1}
    # Every class survives a small sample.
    assert {y[i] for i in stratified_sample(y, 3, seed=0)} == {0, 1, 2}
    assert stratified_sample(y, 5000, seed=0) == list(range(len(y)))


# ---------------------------------------------------------------------------------------------- load_data


def _write_csv(path, rows, header="text,label"):
    path.write_text(header + "\n" + "".join(f"{t},{y}\n" for t, y in rows), encoding="utf-8")
    return str(path)


def test_load_data_split(tmp_path):
    rows = [(f"text number {i}", "pos" if i % 3 else "neg") for i in range(100)]
    cfg = DataConfig(train_file=_write_csv(tmp_path / "t.csv", rows), val_fraction=0.25, split_seed=1)
    b = load_data(cfg)
    assert b.label_map.labels == ["neg", "pos"]
    assert len(b.train) == 75 and len(b.val) == 25 and len(b.train_ids) == 75
    assert b.train_ids == b.label_map.encode(b.train.labels)
    assert not set(b.train.line_numbers) & set(b.val.line_numbers)
    s = b.summary
    assert s["val_source"] == "split" and s["rows"] == {"train": 75, "val": 25} and s["rows_read"]["train"] == 100
    assert s["class_counts"]["val"] == {"neg": 8, "pos": 17} and s["warnings"] == []
    json.dumps(s)
    assert load_data(cfg).val.line_numbers == b.val.line_numbers  # same seed, same split


def test_load_data_val_file_and_sampling(tmp_path):
    train = _write_csv(tmp_path / "t.csv", [(f"t {i}", i % 4) for i in range(400)])
    val = _write_csv(tmp_path / "v.csv", [(f"v {i}", i % 4) for i in range(80)])
    b = load_data(DataConfig(train_file=train, val_file=val, max_train_rows=40, max_val_rows=20))
    assert b.label_map.labels == ["0", "1", "2", "3"]
    assert len(b.train) == 40 and len(b.val) == 20
    assert b.summary["class_counts"]["train"] == {"0": 10, "1": 10, "2": 10, "3": 10}
    assert b.summary["rows_read"] == {"train": 400, "val": 80} and b.summary["val_source"] == "file"


def test_sampling_does_not_change_the_split(tmp_path):
    train = _write_csv(tmp_path / "t.csv", [(f"t {i}", i % 2) for i in range(200)])
    a = load_data(DataConfig(train_file=train))
    b = load_data(DataConfig(train_file=train, max_train_rows=20))
    assert a.val.line_numbers == b.val.line_numbers and len(b.train) == 20


def test_load_data_label_errors(tmp_path):
    one = _write_csv(tmp_path / "one.csv", [("a", "x"), ("b", "x")])
    with pytest.raises(LabelError, match=r"only one class \('x'\) in .*one.csv; a classifier needs at least 2"):
        load_data(DataConfig(train_file=one))
    train = _write_csv(tmp_path / "t.csv", [("a", "x"), ("b", "y"), ("c", "x"), ("d", "y")])
    val = _write_csv(tmp_path / "v.csv", [("a", "x"), ("b", "z")])
    with pytest.raises(LabelError, match=r"v.csv: unknown label \['z'\] \(first at line 3\); known: \['x', 'y'\]"):
        load_data(DataConfig(train_file=train, val_file=val))


def test_single_example_class_is_a_warning(tmp_path):
    rows = [(f"t {i}", "a" if i % 2 else "b") for i in range(40)] + [("lonely", "c")]
    b = load_data(DataConfig(train_file=_write_csv(tmp_path / "t.csv", rows)))
    assert len(b.label_map) == 3 and b.summary["class_counts"]["train"]["c"] == 1
    assert any("single example" in w and "'c'" in w for w in b.summary["warnings"])


def test_skipped_rows_are_warned_and_counted(tmp_path):
    rows = [(f"t {i}", i % 2) for i in range(20)] + [("", 1), ("x", "")]
    cfg = DataConfig(train_file=_write_csv(tmp_path / "t.csv", rows), empty_text="skip", missing_label="skip")
    b = load_data(cfg)
    assert b.summary["skipped"]["train"] == {"empty_text": 1, "missing_label": 1}
    assert b.summary["rows_read"]["train"] == 20
    assert sum("skipped 1 row" in w for w in b.summary["warnings"]) == 2


def test_val_file_uses_train_columns(tmp_path):
    (tmp_path / "t.csv").write_text("review,label\n" + "a,x\nb,y\n" * 3)
    # On its own this file is ambiguous (review or text?); read as "the same layout" it is not.
    (tmp_path / "v.csv").write_text("review,text,label\nr,t,x\n")
    b = load_data(DataConfig(train_file=str(tmp_path / "t.csv"), val_file=str(tmp_path / "v.csv")))
    assert b.val.texts == ["r"] and b.summary["text_column"] == "review"


def test_no_train_file():
    with pytest.raises(DataError, match="--train-file"):
        load_data(DataConfig())
