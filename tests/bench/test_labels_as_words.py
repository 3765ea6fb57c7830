"""bench/labels_as_words.py (`python -m bench labels-as-words`): SST-2 written as generation vs the head."""

from __future__ import annotations

import json
from pathlib import Path

from bench import labels_as_words as law
from bench.__main__ import main as bench_main


def test_a_word_counts_when_it_is_the_label_whatever_its_case_or_end_punctuation(tmp_path: Path):
    rows = [("Positive.", "positive"), ("negative", "negative"), ("positive", "negative"), ("meh", "positive")]
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prediction": p, "references": [r]}) + "\n" for p, r in rows))
    assert law.word_accuracy(f) == {"accuracy": 0.5, "not_a_label": 1, "n": 4}


def test_both_files_hold_the_same_rows(tmp_path: Path):
    rows = [('a "quoted" review', "1"), ("a dull one", "0")]
    f = law.write_files(tmp_path, rows, rows[:1], rows[1:])
    from lmtune.data import read_table

    t = read_table(str(f["train_tsv"]), text_column="sentence", label_column="label")
    assert list(zip(t.texts, t.labels)) == rows  # quotes survive the TSV the head reads
    lines = [json.loads(x) for x in f["train_jsonl"].read_text().splitlines()]
    assert [x["completion"] for x in lines] == ["positive", "negative"]
    assert lines[0]["prompt"] == law.PROMPT.format(sentence=rows[0][0])


def test_a_tiny_run_scores_both_contenders_on_the_same_test_rows(tmp_path: Path):
    name = tmp_path / "law"
    assert bench_main(["labels-as-words", "--tiny", "--name", str(name)]) == 0
    res = json.loads(Path(str(name) + ".json").read_text())
    head, words = res["contenders"]["head"], res["contenders"]["words"]
    assert head["test"]["n"] == words["test"]["n"] == res["rows"]["test"] == 16
    assert res["ratios"]["accuracy_points_words_minus_head"] == 100 * (words["test"]["accuracy"] - head["test"]["accuracy"])
    assert "Words vs head: accuracy" in Path(str(name) + ".md").read_text()
