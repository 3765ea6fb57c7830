"""Read labelled text from CSV, TSV, JSON lines or Parquet into a :class:`Table`.

Every problem is a one-line :class:`~lmtune.errors.DataError` that names the file and, where known, the
line and column, so a user can open the file at the right place. Rows are never dropped silently: a
skipped row is counted in :attr:`Table.skipped`, and a record that spans several physical lines (a
quoted field holding a line break) is listed in :attr:`Table.multiline`, so rows read can always be
matched to lines in the file (:func:`multiline_warning` says which differ).

Tab-separated files (``.tsv``/``.tab``, and a ``.csv`` whose header is tab-separated) are not CSV: people
write them with bare quotes in the text (``5" tall``, ``"Quoted title" is a film``, a text that starts
with an unbalanced ``"``), and reading those with CSV quoting merges lines or eats quotes. So quotes are
only special when quoting is clearly used:

* quoting is *clearly used* when every header field is wrapped in double quotes, or some line holds a
  properly quoted field (``"..."`` at the start of a field, ending before a tab or the end of the line,
  inner quotes doubled) whose content needed the quoting: it contains a tab or a doubled quote ``""``;
* otherwise each physical line is one record, split on tabs, with quotes kept verbatim. When that gives
  rows with the wrong number of fields but a quote-aware parse gives consistent rows (a legitimately
  quoted line break), the quote-aware parse is used; when neither does, the ragged row is an error;
* in quote-aware mode a field is quoted only when it starts with ``"`` and its closing quote is followed
  by a tab, a line break or the end of the file; anything else (``"Quoted title" is ...``, an unclosed
  quote) is a literal field that ends at the next tab or line break, so it never swallows later lines.

CSV keeps standard quoting. In both, a record that spans several lines is reported (see above) and its
line number is the physical line where it begins.

Column names are matched case-insensitively, but two columns that differ only in case (``label`` and
``Label``) are never resolved silently: detection refuses and asks for the exact name. A JSON object
with the same key twice is refused too (the JSON default keeps the last one without a word); keys of
nested objects are not checked, as only top-level keys are columns.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from lmtune.errors import DataError, LabelError

__all__ = ["Table", "read_table", "multiline_warning", "TEXT_COLUMNS", "PAIR_COLUMNS", "LABEL_COLUMNS", "SUPPORTED_SUFFIXES"]

# Tried in this order; matched case-insensitively.
TEXT_COLUMNS = (
    "text", "sentence", "sentence1", "content", "review", "question", "document",
    "utterance", "message", "body", "comment", "tweet",
)  # fmt: skip
# (first, second) of sentence-pair tasks: the pair is only detected when both are present.
PAIR_COLUMNS = (
    ("sentence1", "sentence2"),
    ("premise", "hypothesis"),
    ("question1", "question2"),
    ("text_a", "text_b"),
    ("text1", "text2"),
)
LABEL_COLUMNS = (
    "label", "labels", "category", "class", "target", "intent", "coarse_label", "y", "sentiment", "emotion",
)  # fmt: skip
# Spelled-out candidates that make a label ambiguous even though they are not in LABEL_COLUMNS
# (trec ships coarse_label and fine_label; silently picking one would train on the wrong task).
_LABEL_LIKE_SUFFIXES = ("_label", "_labels", "_class", "_category")

SUPPORTED_SUFFIXES = (".csv", ".tsv", ".tab", ".jsonl", ".ndjson", ".json", ".parquet", ".pq")

Policy = Literal["error", "skip"]


@dataclass
class Table:
    """Rows of one file: texts, optional pair texts and raw label strings, with where each row came from."""

    path: str
    texts: list[str]
    text_pairs: list[str] | None
    labels: list[str] | None
    line_numbers: list[int]
    text_column: str
    text_pair_column: str | None
    label_column: str | None
    skipped: dict[str, int] = field(default_factory=dict)
    # "line" for text formats (physical line), "row" for Parquet and JSON arrays.
    location: str = "line"
    # (first, last) physical lines of every record of the file that spans several lines (a quoted field
    # holding a line break), so rows read can be matched to lines in the file; empty when none does.
    multiline: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> Table:
        """The rows at ``indices`` (in that order); ``skipped`` and ``multiline`` of the file are kept."""
        idx = list(indices)
        return replace(
            self,
            texts=[self.texts[i] for i in idx],
            text_pairs=None if self.text_pairs is None else [self.text_pairs[i] for i in idx],
            labels=None if self.labels is None else [self.labels[i] for i in idx],
            line_numbers=[self.line_numbers[i] for i in idx],
            skipped=dict(self.skipped),
            multiline=list(self.multiline),
        )

    def where(self, i: int) -> str:
        """``'line 12'`` / ``'row 12'`` for row ``i``, for messages."""
        return f"{self.location} {self.line_numbers[i]}"


@dataclass
class _Raw:
    """Parsed cells before column detection: ``columns[name][i]`` is row i's value (None when absent)."""

    columns: dict[str, list[Any]]
    line_numbers: list[int]
    location: str
    skipped: dict[str, int]
    multiline: list[tuple[int, int]] = field(default_factory=list)


def multiline_warning(table: Table, shown: int = 10) -> str | None:
    """``'data.tsv: 2 rows span several lines (...): lines 5-9, 14-15'``; None when rows and lines match."""
    spans = table.multiline
    if not spans:
        return None
    n = len(spans)
    ranges = ", ".join(f"{a}-{b}" for a, b in spans[:shown]) + (", ..." if n > shown else "")
    what = "1 row spans" if n == 1 else f"{n} rows span"
    return f"{table.path}: {what} several lines (a quoted field holds a line break): lines {ranges}"


def read_table(
    path: str | os.PathLike[str],
    *,
    text_column: str | None = None,
    text_pair_column: str | None = None,
    label_column: str | None = None,
    require_labels: bool = True,
    empty_text: Policy = "error",
    missing_label: Policy = "error",
) -> Table:
    """Read one data file; the format comes from its extension.

    Columns not named are detected from common names (``text``, ``sentence``, ``label``, ...). With
    ``require_labels=False`` a file without a label column is fine (``labels`` is None).
    ``empty_text`` / ``missing_label`` say whether an empty cell is an error or a counted skip.
    """
    p = str(path)
    raw = read_raw(p)
    if not raw.line_numbers:
        raise DataError(f"{p}: no data rows (only a header)" if raw.location == "line" else f"{p}: no data rows")

    text_col, pair_col, label_col = _resolve_columns(
        p, raw, text_column, text_pair_column, label_column, require_labels
    )
    return _build(p, raw, text_col, pair_col, label_col, require_labels, empty_text, missing_label)


def read_raw(p: str, *, layout: str = '{"text": ..., "label": ...}') -> _Raw:
    """The cells of one data file by column, before any column is chosen; the format comes from the extension.
    Every problem is a one-line DataError naming the file (and line); ``layout`` is the JSON object a JSON-lines
    row should be, for the error that finds something else."""
    if not os.path.exists(p):
        raise DataError(f"{p}: no such file")
    if os.path.isdir(p):
        raise DataError(f"{p}: is a folder, expected a data file ({', '.join(SUPPORTED_SUFFIXES)})")
    suffix = Path(p).suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise DataError(f"{p}: unknown file type '{suffix}'; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if os.path.getsize(p) == 0:
        raise DataError(f"{p}: the file is empty (0 bytes)")

    if suffix in (".parquet", ".pq"):
        raw = _read_parquet(p)
    else:
        text = _read_utf8(p)
        if not text.strip():
            raise DataError(f"{p}: the file is empty (only whitespace)")
        if suffix in (".csv", ".tsv", ".tab"):
            raw = _read_delimited(p, text, "," if suffix == ".csv" else "\t")
        elif suffix == ".json":
            raw = _read_json(p, text, layout)
        else:
            raw = _read_jsonl(p, text, layout)
    return raw


# ---------------------------------------------------------------------------------------------- formats


def _read_utf8(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        # utf-8-sig: a BOM (Excel writes one) is dropped instead of becoming part of the first column name.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1)
        bad = data[e.start : e.start + 1].hex()
        raise DataError(
            f"{path}: line {line}: not valid UTF-8 (byte 0x{bad} at byte {col} of the line, offset {e.start} "
            f"in the file); re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 in > out`"
        ) from None


def _read_delimited(path: str, text: str, delimiter: str) -> _Raw:
    nul = text.find("\x00")
    if nul >= 0:
        raise DataError(
            f"{path}: line {text.count(chr(10), 0, nul) + 1}: contains a NUL character (is the file UTF-16 or "
            f"binary?); save it as UTF-8 text"
        )
    first = text.split("\n", 1)[0]
    other = "\t" if delimiter == "," else ","
    if delimiter not in first and other in first:
        delimiter = other  # a .csv that is really tab-separated (or the reverse): follow the header
    if delimiter == "\t":
        records = _tsv_records(path, text)
    else:
        records = _csv_records(path, text)
    header = records[0][2]
    names = [h.strip() for h in header]
    if not any(names):
        raise DataError(f"{path}: line 1: the header is empty; the first line must name the columns")
    _check_names(path, names)
    cols: list[list[Any]] = [[] for _ in names]
    lines: list[int] = []
    multiline: list[tuple[int, int]] = []
    skipped: dict[str, int] = {}
    for start, end, row in records[1:]:
        if _is_blank(row, len(names)):
            # A blank line is not a row; count it so nothing disappears unseen.
            skipped["blank_line"] = skipped.get("blank_line", 0) + 1
            continue
        if len(row) != len(names):
            raise DataError(_ragged(path, start, row, len(names), delimiter))
        for c, v in zip(cols, row):
            c.append(v)
        lines.append(start)
        if end > start:
            multiline.append((start, end))
    return _Raw(dict(zip(names, cols)), lines, "line", skipped, multiline)


# (first line, last line, fields) of one record; the first record is the header.
_Record = tuple[int, int, list[str]]


def _is_blank(row: list[str], width: int) -> bool:
    # An empty line is [] (as the csv module gives it); a line of spaces is blank unless it is the only column.
    return not row or (len(row) == 1 and not row[0].strip() and width > 1)


def _ragged(path: str, line: int, row: list[str], width: int, delimiter: str) -> str:
    hint = ""
    if any("\n" in c for c in row):
        hint = " (a quoted field runs over several lines: is a closing quote missing?)"
    elif len(row) > width:
        hint = f" (quote fields that contain {'a tab' if delimiter == chr(9) else 'a comma'})"
    return f"{path}: line {line}: expected {width} fields as in the header, found {len(row)}{hint}"


def _csv_records(path: str, text: str) -> list[_Record]:
    # A huge field (a whole document in one cell) must not trip the csv module's 128 KiB default limit.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # newline="\n": split physical lines on LF only, so csv sees "\r\n" endings and line numbers match
    # what an editor shows; quoted fields may span lines and the reader joins them.
    reader = csv.reader(io.StringIO(text, newline="\n"), delimiter=",", quotechar='"', doublequote=True)
    records: list[_Record] = []
    start = 1  # physical line where the next record begins
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            where = "cannot parse the header: " if not records else ""
            raise DataError(f"{path}: line {start}: {where}{e}") from None
        records.append((start, max(start, reader.line_num), row))
        start = reader.line_num + 1
    if not records:
        raise DataError(f"{path}: line 1: the header is empty; the first line must name the columns")
    return records


# A properly quoted TSV field within one line whose quoting was needed (content with a tab or a ""):
# it opens a field, holds no lone quote and closes before a tab or the end of the line.
_NEEDED_QUOTES = re.compile(r'(?:^|\t)"((?:[^"\n]|"")*)"(?=\t|\r?$)', re.MULTILINE)


def _quoting_clearly_used(text: str) -> bool:
    header = text.split("\n", 1)[0].removesuffix("\r")
    if all(len(f) >= 2 and f[0] == f[-1] == '"' for f in header.split("\t")):
        return True
    if '"' not in text:
        return False
    return any("\t" in m.group(1) or '""' in m.group(1) for m in _NEEDED_QUOTES.finditer(text))


def _first_ragged(records: list[_Record]) -> _Record | None:
    width = len(records[0][2])
    return next((r for r in records[1:] if len(r[2]) != width and not _is_blank(r[2], width)), None)


def _tsv_records(path: str, text: str) -> list[_Record]:
    """Records of a tab-separated file, quoting only where it is clearly used (see the module docstring)."""
    if _quoting_clearly_used(text):
        return _split_tsv_quoted(text)
    records = _split_tsv_literal(text)
    if _first_ragged(records) is not None and '"' in text:
        quoted = _split_tsv_quoted(text)
        if _first_ragged(quoted) is None:
            return quoted  # a quoted field holds a line break; multiline_warning names its lines
    return records  # a ragged row is reported (with its physical line) by the caller


def _split_tsv_literal(text: str) -> list[_Record]:
    lines = text.split("\n")
    if len(lines) > 1 and lines[-1] == "":
        lines.pop()  # what follows the final newline is not a line
    records: list[_Record] = []
    for i, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        records.append((i, i, line.split("\t") if line else []))
    return records


def _quoted_field(text: str, pos: int) -> tuple[str, int] | None:
    """The quoted field opening at ``text[pos] == '"'`` as (content, index after its closing quote).

    None when it is not a quoted field: no lone quote closes it before a tab, a line break or the end.
    """
    n = len(text)
    i = pos + 1
    while True:
        q = text.find('"', i)
        if q < 0:
            return None
        if q + 1 < n and text[q + 1] == '"':
            i = q + 2  # a doubled quote inside the field
            continue
        after = q + 1
        if after == n or text[after] in "\t\n" or text.startswith("\r\n", after):
            return text[pos + 1 : q].replace('""', '"'), after
        return None


def _split_tsv_quoted(text: str) -> list[_Record]:
    records: list[_Record] = []
    n = len(text)
    pos, line = 0, 1
    while pos < n:
        first = line
        fields: list[str] = []
        while True:
            quoted = _quoted_field(text, pos) if text.startswith('"', pos) else None
            if quoted is not None:
                value, end = quoted
                line += text.count("\n", pos, end)
            else:
                nl = text.find("\n", pos)
                if nl < 0:
                    nl = n
                tab = text.find("\t", pos, nl)
                end = nl if tab < 0 else tab
                value = text[pos:end]
                if end == nl:
                    value = value.removesuffix("\r")
            fields.append(value)
            if end < n and text[end] == "\t":
                pos = end + 1
                continue
            break
        if len(fields) == 1 and not fields[0] and quoted is None:
            fields = []  # an empty line
        records.append((first, line, fields))
        # The record ends at a line break ("\n" or "\r\n" after a quoted field) or at the end of the text.
        if text.startswith("\r\n", end):
            end += 1
        pos = end + 1
        line += 1
    return records


def _rows_to_columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    names: dict[str, None] = {}
    for r in rows:
        for k in r:
            names.setdefault(k, None)
    return {n: [r.get(n) for r in rows] for n in names}


class _RepeatedKey(dict):  # type: ignore[type-arg]
    """A JSON object that held a key twice (``key``); json keeps the last value without a word."""

    key: str = ""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) == len(pairs):
        return obj
    out = _RepeatedKey(obj)
    seen: set[str] = set()
    for k, _ in pairs:
        if k in seen:
            out.key = k
            break
        seen.add(k)
    return out


def _check_keys(path: str, where: str, obj: Any) -> None:
    if isinstance(obj, _RepeatedKey):
        raise DataError(f"{path}: {where}: key '{obj.key}' appears twice in one object")


def _read_jsonl(path: str, text: str, layout: str = '{"text": ..., "label": ...}') -> _Raw:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    skipped: dict[str, int] = {}
    physical = text.split("\n")
    if physical and not physical[-1].strip():
        physical.pop()  # what follows the final newline is not a line
    for i, line in enumerate(physical, start=1):
        if not line.strip():
            # A blank line is not a record; count it so nothing disappears unseen (as for CSV).
            skipped["blank_line"] = skipped.get("blank_line", 0) + 1
            continue
        try:
            obj = json.loads(line, object_pairs_hook=_object)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {i}: not valid JSON ({e.msg} at character {e.colno})") from None
        if not isinstance(obj, dict):
            found = type(obj).__name__
            raise DataError(f"{path}: line {i}: expected a JSON object {layout}, found {found}")
        _check_keys(path, f"line {i}", obj)
        rows.append(obj)
        lines.append(i)
    return _Raw(_rows_to_columns(rows), lines, "line", skipped)


def _read_json(path: str, text: str, layout: str = '{"text": ..., "label": ...}') -> _Raw:
    try:
        obj = json.loads(text, object_pairs_hook=_object)
    except json.JSONDecodeError:
        return _read_jsonl(path, text, layout)  # most ".json" data files are really JSON lines
    if isinstance(obj, dict):
        # One object is also a valid JSON-lines file with one record.
        return _read_jsonl(path, text, layout)
    if not isinstance(obj, list):
        raise DataError(f"{path}: expected a list of objects or JSON lines, found a JSON {type(obj).__name__}")
    for i, r in enumerate(obj, start=1):
        if not isinstance(r, dict):
            raise DataError(f"{path}: row {i}: expected a JSON object, found {type(r).__name__}")
        _check_keys(path, f"row {i}", r)
    return _Raw(_rows_to_columns(obj), list(range(1, len(obj) + 1)), "row", {})


def _read_parquet(path: str) -> _Raw:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files; all mean the same to a user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{path}: cannot read the Parquet file: {msg}") from None
    names = [str(n) for n in table.column_names]
    _check_names(path, names)
    columns = {n: table.column(i).to_pylist() for i, n in enumerate(names)}
    return _Raw(columns, list(range(1, table.num_rows + 1)), "row", {})


def _check_names(path: str, names: list[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise DataError(f"{path}: line 1: column '{n}' appears twice in the header; rename one")
        seen.add(n)


# ---------------------------------------------------------------------------------------------- columns


def _names(names: list[str]) -> str:
    """``'a' and 'b'`` / ``'a', 'b' and 'c'``, for messages."""
    q = [f"'{n}'" for n in names]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " and " + q[-1]


def _find(path: str, names: list[str], wanted: str, flag: str) -> str:
    if wanted in names:
        return wanted
    folded = [n for n in names if n.lower() == wanted.lower()]
    if len(folded) == 1:
        return folded[0]
    if folded:
        raise DataError(
            f"{path}: '{wanted}' (given by {flag}) matches columns {_names(folded)}, which differ only in case; "
            f"give the exact name with {flag}"
        )
    raise DataError(f"{path}: no column '{wanted}' (given by {flag}); columns: {names}")


def _looks_like_label(values: list[Any]) -> bool:
    vals = [v for v in values if v is not None and str(v).strip()]
    if not vals:
        return False
    distinct = {str(v) for v in vals}
    short = all(len(str(v)) <= 64 for v in distinct)
    return short and len(distinct) <= max(2, len(vals) // 2)


def _mean_len(values: list[Any]) -> float:
    vals = [str(v) for v in values if v is not None]
    return sum(map(len, vals)) / max(1, len(vals))


def _resolve_columns(
    path: str,
    raw: _Raw,
    text_column: str | None,
    pair_column: str | None,
    label_column: str | None,
    require_labels: bool,
) -> tuple[str, str | None, str | None]:
    names = list(raw.columns)
    folded: dict[str, list[str]] = {}
    for n in names:
        folded.setdefault(n.lower(), []).append(n)

    def one(key: str, flag: str, taken: set[str | None] | None = None) -> str | None:
        """The column named ``key`` in any case (None if absent); two differing only in case are refused."""
        found = [n for n in folded.get(key, []) if not taken or n not in taken]
        if len(found) > 1:
            err = LabelError if flag == "--label-column" else DataError
            raise err(f"{path}: columns {_names(found)} differ only in case; choose one with {flag}")
        return found[0] if found else None

    text = _find(path, names, text_column, "--text-column") if text_column else None
    pair = _find(path, names, pair_column, "--text-pair-column") if pair_column else None
    label = _find(path, names, label_column, "--label-column") if label_column else None

    if text is None:
        pairs: list[tuple[str, str]] = []
        if pair is None:
            for a, b in PAIR_COLUMNS:
                if a in folded and b in folded:
                    pa, pb = one(a, "--text-column"), one(b, "--text-pair-column")
                    assert pa is not None and pb is not None
                    pairs.append((pa, pb))
        if len(pairs) > 1:
            raise DataError(
                f"{path}: several sentence-pair columns {pairs}; choose with --text-column and --text-pair-column"
            )
        if pairs:
            text, pair = pairs[0]
        else:
            taken = {pair, label}
            cands = [c for c in (one(k, "--text-column", taken) for k in TEXT_COLUMNS) if c is not None]
            if len(cands) > 1:
                raise DataError(f"{path}: several possible text columns {cands}; choose one with --text-column")
            text = cands[0] if cands else None
    elif pair is None:
        # Only a sentence1/premise/question1-like text column implies its partner.
        partner = dict(PAIR_COLUMNS).get(text.lower())
        if partner:
            pair = one(partner, "--text-pair-column")

    if label is None:
        taken = {text, pair}
        cands = [c for c in (one(k, "--label-column", taken) for k in LABEL_COLUMNS) if c is not None]
        cands += [n for n in names if n not in cands and n not in taken and n.lower().endswith(_LABEL_LIKE_SUFFIXES)]
        if len(cands) > 1:
            raise LabelError(f"{path}: several possible label columns {cands}; choose one with --label-column")
        label = cands[0] if cands else None

    rest = [n for n in names if n not in (text, pair, label)]
    if text is None and label is not None and len(rest) == 1:
        text = rest[0]  # "headline,label": the only other column is the text
    elif text is None and label is None and len(names) == 2 and pair is None:
        a, b = names
        for t, lab in ((a, b), (b, a)):
            if _looks_like_label(raw.columns[lab]) and not _looks_like_label(raw.columns[t]) and _mean_len(
                raw.columns[t]
            ) > _mean_len(raw.columns[lab]):
                text, label = t, lab
                break
    elif text is not None and label is None and require_labels and len(rest) == 1:
        if _looks_like_label(raw.columns[rest[0]]):
            label = rest[0]

    if text is None:
        raise DataError(
            f"{path}: cannot tell which column holds the text; columns: {names}; name it with --text-column "
            "(for prompt -> completion data: --prompt-column and --completion-column)"
        )
    if label is None and require_labels:
        raise LabelError(
            f"{path}: cannot tell which column holds the labels; columns: {names}; name it with --label-column"
        )
    used = [c for c in (text, pair, label) if c is not None]
    if len(set(used)) != len(used):
        raise DataError(f"{path}: one column is used twice (text '{text}', pair '{pair}', label '{label}')")
    return text, pair, label


# ---------------------------------------------------------------------------------------------- cells


def _label_str(v: Any) -> str | None:
    """Raw label as a string; integral numbers keep their integer form so 1, 1.0 and "1" agree."""
    if v is None:
        return None
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return None
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, str):
        return v.strip() or None
    raise TypeError(type(v).__name__)


def _text_str(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, str):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return None if isinstance(v, float) and math.isnan(v) else str(v)
    raise TypeError(type(v).__name__)


def _build(
    path: str,
    raw: _Raw,
    text_col: str,
    pair_col: str | None,
    label_col: str | None,
    require_labels: bool,
    empty_text: Policy,
    missing_label: Policy,
) -> Table:
    loc = raw.location
    skipped = dict(raw.skipped)
    texts: list[str] = []
    pairs: list[str] | None = [] if pair_col else None
    labels: list[str] | None = [] if label_col else None
    kept_lines: list[int] = []

    def cell(col: str, i: int, conv: Any) -> str | None:
        try:
            return conv(raw.columns[col][i])
        except TypeError as e:
            raise DataError(f"{path}: {loc} {raw.line_numbers[i]}, column '{col}': expected text, found {e}") from None

    label_cells = raw.columns[label_col] if label_col else None
    if label_col and not require_labels and label_cells is not None:
        # A prediction file may carry an empty label column (e.g. a competition's test file): ignore it.
        if all(_label_str(v) is None for v in label_cells if not isinstance(v, (list, dict))):
            label_col, labels, label_cells = None, None, None

    def text_or_skip(col: str, i: int, line: int, reason: str) -> str | None:
        """The cell's text; None (counted under ``reason``) when it is empty and --empty-text is skip."""
        value = cell(col, i, _text_str)
        if value is not None and value.strip():
            return value
        if empty_text == "error":
            raise DataError(f"{path}: {loc} {line}, column '{col}': empty text; fix the row or pass --empty-text skip")
        skipped[reason] = skipped.get(reason, 0) + 1
        return None

    for i, line in enumerate(raw.line_numbers):
        t = text_or_skip(text_col, i, line, "empty_text")
        if t is None:
            continue
        tp = None
        if pair_col:
            tp = text_or_skip(pair_col, i, line, "empty_text_pair")
            if tp is None:
                continue
        lab = None
        if label_col:
            lab = cell(label_col, i, _label_str)
            if lab is None:
                if missing_label == "error":
                    raise LabelError(
                        f"{path}: {loc} {line}, column '{label_col}': missing label; "
                        f"fix the row or pass --missing-label skip"
                    )
                skipped["missing_label"] = skipped.get("missing_label", 0) + 1
                continue
        texts.append(t)
        if pairs is not None:
            pairs.append(tp)  # type: ignore[arg-type]
        if labels is not None:
            labels.append(lab)  # type: ignore[arg-type]
        kept_lines.append(line)

    if not texts:
        raise DataError(f"{path}: every row was skipped ({_fmt_skipped(skipped)}); nothing left to use")
    return Table(
        path, texts, pairs, labels, kept_lines, text_col, pair_col, label_col, skipped, loc, list(raw.multiline)
    )


def _fmt_skipped(skipped: dict[str, int]) -> str:
    return ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted(skipped.items())) or "none"
