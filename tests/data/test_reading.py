"""read_table: formats, column detection and one-line errors for every kind of bad file."""

from __future__ import annotations

import json
import os

import pytest

from lmtune.data import read_table
from lmtune.errors import DataError, LabelError

ROWS = [("a good film", "pos"), ("a bad film", "neg"), ("great, really great", "pos")]


def _csv(rows=ROWS, header="text,label") -> str:
    return header + "\n" + "".join(f'"{t}",{y}\n' for t, y in rows)


# ---------------------------------------------------------------------------------------------- formats


def test_csv(write):
    t = read_table(write("d.csv", _csv()))
    assert t.texts == [r[0] for r in ROWS] and t.labels == [r[1] for r in ROWS]
    assert t.line_numbers == [2, 3, 4] and (t.text_column, t.label_column, t.text_pair_column) == ("text", "label", None)
    assert len(t) == 3 and t.skipped == {} and t.path.endswith("d.csv")


@pytest.mark.parametrize("name", ["d.tsv", "d.tab"])
def test_tsv_with_glue_style_quoting(write, name):
    # A quoted field with doubled quotes inside (as in ag_news / sms_spam) and a bare quote mid-field.
    body = 'label\ttext\nham\t"he said ""hi"" to me"\nspam\tit\'s 5" tall\n'
    t = read_table(write(name, body))
    assert t.texts == ['he said "hi" to me', 'it\'s 5" tall'] and t.labels == ["ham", "spam"]


@pytest.mark.parametrize("name", ["d.jsonl", "d.ndjson", "d.json"])
def test_json_lines(write, name):
    body = "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in ROWS)
    t = read_table(write(name, body))
    assert t.texts == [r[0] for r in ROWS] and t.line_numbers == [1, 2, 3] and t.skipped == {}
    t = read_table(write("blank" + name[1:], "\n" + body.replace("\n", "\n\n", 1)))
    assert t.line_numbers == [2, 4, 5] and t.skipped == {"blank_line": 2}


def test_json_array_and_int_labels(write):
    body = json.dumps([{"text": "x y", "label": 1}, {"text": "z", "label": 0}, {"text": "w", "label": 1.0}])
    t = read_table(write("d.json", body))
    assert t.labels == ["1", "0", "1"] and t.line_numbers == [1, 2, 3] and t.location == "row"


@pytest.mark.parametrize("name", ["d.parquet", "d.pq"])
def test_parquet(tmp_path, name):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / name
    pq.write_table(pa.table({"sentence": ["a b", "c d"], "label": [0, 1]}), p)
    t = read_table(p)
    assert t.texts == ["a b", "c d"] and t.labels == ["0", "1"] and t.line_numbers == [1, 2]


def test_bom_is_accepted(write):
    t = read_table(write("d.csv", "\ufeff" + _csv()))
    assert t.text_column == "text" and len(t) == 3


def test_crlf_line_endings(write):
    t = read_table(write("d.csv", _csv().replace("\n", "\r\n")))
    assert t.texts[0] == "a good film" and t.labels[-1] == "pos" and t.line_numbers == [2, 3, 4]


def test_quoted_newlines_keep_physical_line_numbers(write):
    body = 'text,label\n"one\nline two\nline three",a\nplain,b\n"x\ny",a\n'
    t = read_table(write("d.csv", body))
    assert t.texts[0] == "one\nline two\nline three"
    assert t.line_numbers == [2, 5, 6]


def test_quoted_newline_then_error_points_at_record_start(write):
    body = 'text,label\n"one\ntwo",a\n,b\n'
    with pytest.raises(DataError, match=r"line 4, column 'text'"):
        read_table(write("d.csv", body))


def test_huge_field(write):
    big = "word " * 100_000  # beyond the csv module's default 128 KiB field limit
    t = read_table(write("d.csv", f"text,label\n{big},a\nsmall,b\n"))
    assert len(t.texts[0]) == len(big)


def test_csv_that_is_tab_separated(write):
    t = read_table(write("d.csv", "text\tlabel\na b\tx\nc d\ty\n"))
    assert t.labels == ["x", "y"]


# ---------------------------------------------------------------------------------------------- columns


@pytest.mark.parametrize(
    "header, expect",
    [
        ("sentence,label", ("sentence", None, "label")),
        ("Review,Sentiment", ("Review", None, "Sentiment")),
        ("id,tweet,target", ("tweet", None, "target")),
        ("sentence1,sentence2,label", ("sentence1", "sentence2", "label")),
        ("premise,hypothesis,label", ("premise", "hypothesis", "label")),
        ("question1,question2,label", ("question1", "question2", "label")),
        ("headline,category", ("headline", None, "category")),
    ],
)
def test_detection_by_name(write, header, expect):
    n = header.count(",") + 1
    rows = "".join(",".join([f"w{i} v{j}" for j in range(n - 1)] + [f"c{i % 2}"]) + "\n" for i in range(4))
    t = read_table(write("d.csv", header + "\n" + rows))
    assert (t.text_column, t.text_pair_column, t.label_column) == expect


def test_detection_of_two_unnamed_columns(write):
    rows = "".join(f"some longer free text number {i},{'yes' if i % 2 else 'no'}\n" for i in range(10))
    t = read_table(write("d.csv", "a,b\n" + rows))
    assert (t.text_column, t.label_column) == ("a", "b")
    t = read_table(write("e.csv", "b,a\n" + "".join(f"{'yes' if i % 2 else 'no'},free text {i} here\n" for i in range(10))))
    assert (t.text_column, t.label_column) == ("a", "b")


def test_named_columns_and_case_insensitive_match(write):
    t = read_table(write("d.csv", "Body,Tag\nx y,a\nz w,b\n"), text_column="body", label_column="TAG")
    assert (t.text_column, t.label_column) == ("Body", "Tag")


def test_pair_given_explicitly(write):
    t = read_table(write("d.csv", "question,sentence,label\nq?,s.,1\nr?,t.,0\n"), text_column="question", text_pair_column="sentence")
    assert t.text_pairs == ["s.", "t."] and t.labels == ["1", "0"]


def test_no_labels_when_not_required(write):
    t = read_table(write("d.csv", "text\nhello\nworld\n"), require_labels=False)
    assert t.labels is None and t.label_column is None and t.texts == ["hello", "world"]
    # An all-empty label column (a test file to predict) is no label column.
    t = read_table(write("e.csv", "text,label\nhello,\nworld,\n"), require_labels=False)
    assert t.labels is None


def test_subset(write):
    t = read_table(write("d.csv", _csv()))
    s = t.subset([2, 0])
    assert s.texts == [ROWS[2][0], ROWS[0][0]] and s.labels == ["pos", "pos"] and s.line_numbers == [4, 2]
    assert len(t) == 3


# ---------------------------------------------------------------------------------------------- bad input

_LATIN1 = "text,label\nok,a\ncaf\xe9 cr\xe8me,b\n".encode("latin-1")

BAD = [
    # id, file name, content, read_table kwargs, exception, substrings the message must hold
    ("missing-file", None, None, {}, DataError, ["no such file"]),
    ("empty-file", "e.csv", "", {}, DataError, ["empty"]),
    ("whitespace-file", "e.csv", "\n\n  \n", {}, DataError, ["empty"]),
    ("header-only", "h.csv", "text,label\n", {}, DataError, ["no data rows", "header"]),
    ("header-only-tsv", "h.tsv", "text\tlabel\n", {}, DataError, ["no data rows"]),
    ("ragged-more", "r.csv", "text,label\na,b\nc,d,e\n", {}, DataError, ["line 3", "expected 2 fields", "found 3"]),
    ("ragged-fewer", "r.tsv", "text\tlabel\na\tb\nc\td\nlonely\n", {}, DataError, ["line 4", "found 1"]),
    ("unclosed-quote", "q.csv", 'text,label\n"a,b\nc,d\n', {}, DataError, ["line 2"]),
    ("latin-1", "l.csv", _LATIN1, {}, DataError, ["line 3", "UTF-8", "re-encode", "0xe9"]),
    ("latin-1-jsonl", "l.jsonl", b'{"text": "ok", "label": "a"}\n{"text": "caf\xe9", "label": "b"}\n', {}, DataError, ["line 2", "UTF-8"]),
    ("empty-text", "t.csv", "text,label\na,x\n  ,y\n", {}, DataError, ["line 3", "column 'text'", "empty text", "--empty-text"]),
    ("empty-pair", "p.csv", "sentence1,sentence2,label\na,b,x\nc,,y\n", {}, DataError, ["line 3", "column 'sentence2'"]),
    ("missing-label", "m.csv", "text,label\na,x\nb,\n", {}, LabelError, ["line 3", "column 'label'", "missing label", "--missing-label"]),
    ("missing-label-jsonl", "m.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n', {}, LabelError, ["line 2", "column 'label'"]),
    ("null-label-jsonl", "m.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": null}\n', {}, LabelError, ["line 2"]),
    ("bad-json", "j.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 1}\n', {}, DataError, ["line 2", "not valid JSON"]),
    ("json-not-object", "j.jsonl", '{"text": "a", "label": 1}\n["b", 1]\n', {}, DataError, ["line 2", "JSON object"]),
    ("json-text-not-string", "j.jsonl", '{"text": ["a"], "label": 1}\n', {}, DataError, ["line 1", "column 'text'", "list"]),
    ("bad-parquet", "x.parquet", b"PAR1 this is not parquet", {}, DataError, ["Parquet"]),
    ("unknown-suffix", "x.xlsx", "whatever", {}, DataError, ["unknown file type", ".csv"]),
    ("missing-text-column", "c.csv", "text,label\na,b\n", {"text_column": "body"}, DataError, ["'body'", "--text-column", "['text', 'label']"]),
    ("missing-label-column", "c.csv", "text,label\na,b\n", {"label_column": "y"}, DataError, ["'y'", "--label-column", "columns"]),
    ("missing-pair-column", "c.csv", "text,label\na,b\n", {"text_pair_column": "t2"}, DataError, ["--text-pair-column"]),
    ("two-label-columns", "trec.csv", "text,coarse_label,fine_label\nq?,A,A:b\n", {}, LabelError, ["coarse_label", "fine_label", "--label-column"]),
    ("two-text-columns", "c.csv", "text,review,label\na,b,c\n", {}, DataError, ["'text'", "'review'", "--text-column"]),
    ("no-label-column", "c.csv", "text,notes,extra\na,b,c\n", {}, LabelError, ["--label-column", "columns"]),
    ("no-text-column", "c.csv", "foo,bar,label\na,b,c\n", {}, DataError, ["--text-column"]),
    ("duplicate-header", "c.csv", "text,text,label\na,b,c\n", {}, DataError, ["twice"]),
    ("all-skipped", "s.csv", "text,label\n,a\n  ,b\n", {"empty_text": "skip"}, DataError, ["every row was skipped", "empty text: 2"]),
]


@pytest.mark.parametrize("name, content, kwargs, exc, parts", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_naming_the_place(write, tmp_path, name, content, kwargs, exc, parts):
    path = str(tmp_path / "nope.csv") if name is None else write(name, content)
    with pytest.raises(exc) as info:
        read_table(path, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(path), msg
    for part in parts:
        assert part in msg, (part, msg)


def test_folder_is_an_error(tmp_path):
    with pytest.raises(DataError, match="folder"):
        read_table(tmp_path)


# ---------------------------------------------------------------------------------------------- skip modes


def test_skip_modes_count_every_row(write):
    body = "text,label\na,x\n,y\n   ,x\nb,\nc,y\n\n"
    path = write("s.csv", body)
    t = read_table(path, empty_text="skip", missing_label="skip")
    assert t.texts == ["a", "c"] and t.line_numbers == [2, 6]
    assert t.skipped == {"empty_text": 2, "missing_label": 1, "blank_line": 1}
    rows_in_file = body.count("\n") - 1
    assert len(t) + sum(t.skipped.values()) == rows_in_file
    # Only one policy relaxed: the other still stops at its first row.
    with pytest.raises(LabelError, match="line 5"):
        read_table(path, empty_text="skip")
    with pytest.raises(DataError, match="line 3"):
        read_table(path, missing_label="skip")


def test_skip_empty_pair(write):
    t = read_table(write("p.csv", "sentence1,sentence2,label\na,b,x\nc,,y\n"), empty_text="skip")
    assert t.text_pairs == ["b"] and t.skipped == {"empty_text_pair": 1}


def test_nan_label_in_parquet_is_missing(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "label": [1.0, float("nan"), 0.0]}), p)
    t = read_table(p, missing_label="skip")
    assert t.labels == ["1", "0"] and t.skipped == {"missing_label": 1} and t.line_numbers == [1, 3]
    with pytest.raises(LabelError, match=r"row 2, column 'label'"):
        read_table(p)


def test_read_only_file_is_not_modified(write):
    path = write("d.csv", _csv())
    before = os.stat(path).st_mtime_ns
    read_table(path)
    assert os.stat(path).st_mtime_ns == before
