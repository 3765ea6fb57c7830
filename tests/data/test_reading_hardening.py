"""read_table against hostile input: TSV quotes that must not merge rows, records spanning lines, and
columns or JSON keys that would otherwise be chosen silently."""

from __future__ import annotations

import csv
import io
import json

import pytest

from lmtune.config import DataConfig
from lmtune.data import load_data, read_table
from lmtune.data.reading import multiline_warning
from lmtune.errors import DataError, LabelError


def _warnings(path: str, **kw) -> list[str]:
    return load_data(DataConfig(train_file=path, val_fraction=0.5, **kw)).summary["warnings"]


def _rows(n: int, start: int = 0) -> list[tuple[str, str]]:
    return [(f"review number {i} was fine", "pos" if i % 2 else "neg") for i in range(start, start + n)]


def _tsv(rows, header="text\tlabel") -> str:
    return header + "\n" + "".join(f"{t}\t{y}\n" for t, y in rows)


# ---------------------------------------------------------------------------------------------- TSV quotes


def test_unbalanced_quote_does_not_swallow_lines(write):
    rows = _rows(30)
    rows[2] = ('"Unbalanced start of a review', "pos")
    rows[20] = ('he said "wow" and "left"', "neg")  # a later quote a CSV reader would close on
    rows[25] = ('a 5" tall "statue"', "pos")
    path = write("data.tsv", _tsv(rows))
    t = read_table(path)
    assert len(t) == 30 and t.texts == [r[0] for r in rows] and t.labels == [r[1] for r in rows]
    assert t.texts[2] == '"Unbalanced start of a review'
    assert t.line_numbers == list(range(2, 32)) and t.multiline == [] and t.skipped == {}
    assert not [w for w in _warnings(path) if "several lines" in w or "skipped" in w]


def test_quoted_title_keeps_its_quotes(write):
    rows = [('"Quoted title" is a film', "pos"), ('"Another" one', "neg"), ('"Whole text quoted"x', "pos")]
    t = read_table(write("d.tsv", _tsv(rows)))
    assert t.texts == [r[0] for r in rows]
    # Also where quoting is clearly used elsewhere in the file (a doubled quote).
    rows.append(('"he said ""hi"" to me"', "neg"))
    t = read_table(write("e.tsv", _tsv(rows)))
    assert t.texts == ['"Quoted title" is a film', '"Another" one', '"Whole text quoted"x', 'he said "hi" to me']


def test_unclosed_quote_stays_on_its_line_when_quoting_is_used(write):
    body = 'text\tlabel\n"a ""quoted"" word"\tpos\n"never closed\tneg\nplain\tpos\nlast "one"\tneg\n'
    t = read_table(write("d.tsv", body))
    assert t.texts == ['a "quoted" word', '"never closed', "plain", 'last "one"']
    assert t.line_numbers == [2, 3, 4, 5] and t.multiline == []


def test_quoted_header_turns_quoting_on(write):
    t = read_table(write("d.tsv", '"text"\t"label"\n"a film"\t"pos"\n"b film"\t"neg"\n'))
    assert (t.text_column, t.label_column) == ("text", "label")
    assert t.texts == ["a film", "b film"] and t.labels == ["pos", "neg"]


def _pandas_style(rows: list[tuple[str, str]]) -> str:
    """What ``pd.DataFrame(rows, columns=["text", "label"]).to_csv(sep="\\t")`` writes (index included)."""
    out = io.StringIO()
    w = csv.writer(out, delimiter="\t", quotechar='"', doublequote=True, lineterminator="\n")
    w.writerow(["", "text", "label"])
    for i, (t, y) in enumerate(rows):
        w.writerow([i, t, y])
    return out.getvalue()


def test_pandas_quoted_tsv_round_trips_with_a_warning(write):
    rows = _rows(8)
    rows[2] = ('He said "hi"\tthen\nleft\nfor good', "pos")  # a tab, a quote and two line breaks: lines 4-6
    rows[5] = ("two\nlines", "neg")  # lines 9-10
    path = write("data.tsv", _pandas_style(rows))
    t = read_table(path)
    assert t.texts == [r[0] for r in rows] and t.labels == [r[1] for r in rows]
    assert t.line_numbers == [2, 3, 4, 7, 8, 9, 11, 12]
    assert t.multiline == [(4, 6), (9, 10)]
    expected = f"{path}: 2 rows span several lines (a quoted field holds a line break): lines 4-6, 9-10"
    assert multiline_warning(t) == expected
    assert expected in _warnings(path)
    # The split keeps the file's note, so every part can still say which rows span lines.
    assert t.subset([1, 0]).multiline == [(4, 6), (9, 10)]


def test_quoted_line_break_without_other_quoting_falls_back_to_quotes(write):
    # No tab or doubled quote needed quoting, but the line-per-record reading is ragged: quotes explain it.
    body = 'text\tlabel\nfirst\tpos\n"two\nlines"\tneg\nthird\tpos\n'
    t = read_table(write("d.tsv", body))
    assert t.texts == ["first", "two\nlines", "third"] and t.line_numbers == [2, 3, 5] and t.multiline == [(3, 4)]


def test_quoted_tsv_with_crlf_and_blank_lines(write):
    rows = _rows(4)
    rows[1] = ('x "y"\tz\nw', "pos")
    body = _pandas_style(rows).replace("\n", "\r\n").replace("\r\n2\t", "\r\n\r\n2\t")
    # The line break inside the quoted field became "\r\n" too: it is kept as written.
    t = read_table(write("d.tsv", body))
    assert t.texts[1] == 'x "y"\tz\r\nw' and t.texts[3] == "review number 3 was fine"
    assert t.labels == ["neg", "pos", "neg", "pos"]
    assert t.line_numbers == [2, 3, 6, 7] and t.multiline == [(3, 4)] and t.skipped == {"blank_line": 1}


def test_ragged_tsv_is_still_an_error(write):
    body = 'text\tlabel\nfine\tpos\n"a quote\tneg\nthree\tfields\there\n'
    with pytest.raises(DataError) as info:
        read_table(write("d.tsv", body))
    expected = "d.tsv: line 4: expected 2 fields as in the header, found 3 (quote fields that contain a tab)"
    assert str(info.value).endswith(expected)


def test_tsv_literal_keeps_blank_lines_and_line_numbers(write):
    t = read_table(write("d.tsv", 'text\tlabel\n"odd\tpos\n\n  \nok "x\tneg\n'))
    assert t.texts == ['"odd', 'ok "x'] and t.line_numbers == [2, 5] and t.skipped == {"blank_line": 2}


def test_csv_that_is_tab_separated_uses_the_tsv_rules(write):
    t = read_table(write("d.csv", 'text\tlabel\n"Quoted title" is a film\tpos\n"unbalanced\tneg\n'))
    assert t.texts == ['"Quoted title" is a film', '"unbalanced']


def test_nul_character_is_an_error(write):
    with pytest.raises(DataError, match=r"d\.tsv: line 3: contains a NUL character"):
        read_table(write("d.tsv", "text\tlabel\na\tb\nc\x00d\te\n"))


# ---------------------------------------------------------------------------------------------- CSV


def test_csv_quoted_line_break_warns(write):
    path = write("d.csv", 'text,label\nplain,a\n"two\nlines",b\n"three\nshort\nlines",a\nlast,b\n')
    t = read_table(path)
    assert t.texts == ["plain", "two\nlines", "three\nshort\nlines", "last"] and t.line_numbers == [2, 3, 5, 8]
    assert t.multiline == [(3, 4), (5, 7)]
    assert f"{path}: 2 rows span several lines (a quoted field holds a line break): lines 3-4, 5-7" in _warnings(path)


def test_csv_without_line_breaks_has_no_warning(write):
    path = write("d.csv", 'text,label\n"a, b",x\nc,y\n"e ""f""",x\ng,y\n')
    assert read_table(path).multiline == []
    assert not [w for w in _warnings(path) if "several lines" in w]


def test_many_spans_are_shortened(write):
    body = "text,label\n" + "".join(f'"r{i}\nx",{"ab"[i % 2]}\n' for i in range(12))
    path = write("d.csv", body)
    msg = multiline_warning(read_table(path))
    assert msg == (
        f"{path}: 12 rows span several lines (a quoted field holds a line break): "
        "lines 2-3, 4-5, 6-7, 8-9, 10-11, 12-13, 14-15, 16-17, 18-19, 20-21, ..."
    )


# ---------------------------------------------------------------------------------------------- columns


def test_columns_differing_only_in_case_are_refused(write):
    path = write("x.csv", "label,text,Label\na,some text,b\nc,more text,d\n")
    with pytest.raises(LabelError) as info:
        read_table(path)
    assert str(info.value) == f"{path}: columns 'label' and 'Label' differ only in case; choose one with --label-column"
    with pytest.raises(DataError, match="columns 'label' and 'Label' differ only in case"):
        load_data(DataConfig(train_file=path))


def test_exact_label_column_resolves_the_case_clash(write):
    path = write("x.csv", "label,text,Label\na,t1,x\nb,t2,y\na,t3,x\nb,t4,y\n")
    t = read_table(path, label_column="Label")
    assert t.label_column == "Label" and t.labels == ["x", "y", "x", "y"] and t.text_column == "text"
    t = read_table(path, label_column="label")
    assert t.label_column == "label" and t.labels == ["a", "b", "a", "b"]
    assert load_data(DataConfig(train_file=path, label_column="Label")).summary["label_column"] == "Label"
    with pytest.raises(DataError) as info:
        read_table(path, label_column="LABEL")
    msg = str(info.value)
    assert "'LABEL' (given by --label-column) matches columns 'label' and 'Label'" in msg and "exact name" in msg


def test_text_columns_differing_only_in_case(write):
    path = write("x.tsv", "Text\ttext\tlabel\na\tb\tx\n")
    with pytest.raises(DataError) as info:
        read_table(path)
    assert str(info.value) == f"{path}: columns 'Text' and 'text' differ only in case; choose one with --text-column"
    assert read_table(path, text_column="text").texts == ["b"]


def test_case_clash_in_unused_columns_is_fine(write):
    t = read_table(write("x.csv", "text,label,Notes,notes\na,x,n1,n2\n"))
    assert (t.text_column, t.label_column, t.texts) == ("text", "label", ["a"])


def test_jsonl_keys_differing_only_in_case(write):
    path = write("x.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "Label": 0}\n')
    with pytest.raises(LabelError, match=r"columns 'label' and 'Label' differ only in case; choose one with --label"):
        read_table(path)


# ---------------------------------------------------------------------------------------------- JSON keys


def test_duplicate_json_key_names_the_line(write):
    lines = [
        json.dumps({"text": "a", "label": "x"}),
        json.dumps({"text": "b", "label": "y"}),
        '{"text": "c", "label": "x", "label": "y"}',
    ]
    path = write("x.jsonl", "\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        read_table(path)
    assert str(info.value) == f"{path}: line 3: key 'label' appears twice in one object"
    with pytest.raises(DataError, match=r"line 3: key 'label' appears twice"):
        load_data(DataConfig(train_file=path))


def test_duplicate_key_in_json_array_and_single_object(write):
    path = write("x.json", '[{"text": "a", "label": 1}, {"text": "b", "text": "c", "label": 0}]')
    with pytest.raises(DataError) as info:
        read_table(path)
    assert str(info.value) == f"{path}: row 2: key 'text' appears twice in one object"
    path = write("y.json", '{"text": "a", "label": 1, "label": 2}')
    with pytest.raises(DataError, match=r"y\.json: line 1: key 'label' appears twice in one object"):
        read_table(path)


def test_duplicate_key_in_nested_object_is_not_a_column(write):
    t = read_table(write("x.jsonl", '{"text": "a", "label": 1, "meta": {"k": 1, "k": 2}}\n'))
    assert t.texts == ["a"] and t.labels == ["1"]
