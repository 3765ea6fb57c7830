"""One self-contained HTML page: sections, notes, sortable tables and plotly charts.

Nothing on the page is fetched from the network: plotly.js is inlined once, fonts are the system's,
and the table-sorting script is ours (a few lines, below). The page opens from a file:// URL offline.
"""

from __future__ import annotations

import html
import math
from typing import Any, Iterable

#: colours used for the same meaning on every chart (train vs validation, correct vs wrong, ...)
TRAIN_COLOR = "#1f77b4"
VAL_COLOR = "#ff7f0e"
TEST_COLOR = "#2ca02c"
BEST_COLOR = "#d62728"
MUTED_COLOR = "#7f7f7f"
#: the metric's colour scale: pale for the worst value, dark for the best, all visible on white
METRIC_SCALE = [[0.0, "#fdd49e"], [0.35, "#fc8d59"], [0.7, "#b30000"], [1.0, "#3f007d"]]

_CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #dde2ea; --bg-soft: #f5f7fa; --accent: #2457c5; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: var(--fg); background: #fff; }
main { max-width: 1180px; margin: 0 auto; padding: 24px 28px 64px; }
h1 { font-size: 26px; margin: 0 0 4px; }
h2 { font-size: 21px; margin: 40px 0 10px; padding-top: 10px; border-top: 2px solid var(--line); }
h3 { font-size: 17px; margin: 26px 0 8px; }
.subtitle { color: var(--muted); margin: 0 0 16px; }
nav.toc { background: var(--bg-soft); border: 1px solid var(--line); border-radius: 6px; padding: 8px 14px; margin: 12px 0 8px; }
nav.toc a { display: inline-block; margin-right: 16px; color: var(--accent); text-decoration: none; white-space: nowrap; }
nav.toc a:hover { text-decoration: underline; }
.note { border-left: 4px solid var(--accent); background: #eef3fd; padding: 8px 12px; margin: 10px 0; border-radius: 0 4px 4px 0; }
.note.warn { border-color: #c77700; background: #fff5e6; }
.note.good { border-color: #2b8a3e; background: #ecf8ef; }
.figure { border: 1px solid var(--line); border-radius: 6px; padding: 6px; margin: 12px 0; background: #fff; }
.caption { color: var(--muted); font-size: 13.5px; margin: 4px 6px 2px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 3px 18px; margin: 10px 0; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; }
.table-wrap { overflow-x: auto; margin: 10px 0; }
table { border-collapse: collapse; font-size: 13.5px; }
td { white-space: nowrap; }
td.wrap { white-space: normal; min-width: 220px; max-width: 360px; }
th, td { border-bottom: 1px solid var(--line); padding: 5px 10px; text-align: left; vertical-align: top; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
thead th { background: var(--bg-soft); position: sticky; top: 0; }
th button { all: unset; cursor: pointer; font-weight: 600; }
th button:focus-visible { outline: 2px solid var(--accent); }
th[aria-sort="ascending"] button::after { content: " \\25B2"; font-size: 10px; }
th[aria-sort="descending"] button::after { content: " \\25BC"; font-size: 10px; }
tr.highlight td { background: #fff8d6; }
td.text { min-width: 260px; max-width: 560px; white-space: pre-wrap; word-break: break-word; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; font-size: 13px; }
pre { background: var(--bg-soft); padding: 10px; border-radius: 4px; overflow-x: auto; }
details { margin: 10px 0; }
summary { cursor: pointer; color: var(--accent); }
footer { color: var(--muted); font-size: 13px; margin-top: 48px; border-top: 1px solid var(--line); padding-top: 10px; }
"""

# Click a header to sort by that column; click again to reverse. Cells sort by data-sort when given
# (raw numbers behind formatted text), numerically when both values parse, otherwise as text.
_SORT_JS = """
(function () {
  function key(td) {
    var raw = td.hasAttribute('data-sort') ? td.getAttribute('data-sort') : td.textContent.trim();
    var num = parseFloat(raw);
    return (raw !== '' && !isNaN(num) && isFinite(raw)) ? {n: num} : {s: raw.toLowerCase()};
  }
  function cmp(a, b) {
    if (a.n !== undefined && b.n !== undefined) return a.n - b.n;
    if (a.n !== undefined) return -1;   /* numbers before text and empty cells */
    if (b.n !== undefined) return 1;
    return a.s < b.s ? -1 : a.s > b.s ? 1 : 0;
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    var heads = table.querySelectorAll('thead th');
    heads.forEach(function (th, col) {
      var btn = th.querySelector('button');
      if (!btn) return;
      btn.addEventListener('click', function () {
        var asc = th.getAttribute('aria-sort') !== 'ascending';
        heads.forEach(function (h) { h.removeAttribute('aria-sort'); });
        th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (r1, r2) {
          var a = key(r1.cells[col]), b = key(r2.cells[col]);
          var emptyA = a.s === '', emptyB = b.s === '';
          if (emptyA !== emptyB) return emptyA ? 1 : -1;  /* empty cells last either way */
          var c = cmp(a, b);
          return asc ? c : -c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
})();
"""


class Cell:
    """A table cell: the text shown, the value it sorts by, and whether it is numeric (right-aligned)."""

    __slots__ = ("text", "sort", "numeric", "css")

    def __init__(self, text: str, sort: Any = None, numeric: bool = False, css: str = ""):
        self.text, self.sort, self.numeric, self.css = text, sort, numeric, css


def esc(x: Any) -> str:
    return html.escape("" if x is None else str(x), quote=True)


def fnum(v: Any, digits: int = 4) -> str:
    """A number for people: fixed decimals for metrics, scientific for tiny or huge values."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.2e}"
        return f"{v:.{digits}f}"
    return str(v)


def fparam(v: Any) -> str:
    """A hyperparameter value: ``3.0e-05`` for learning rates, ``16`` for batch sizes, text as is."""
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.1e}"
        return f"{v:.4g}"
    return "" if v is None else str(v)


def fcount(n: Any) -> str:
    """A parameter count for people: 134.5 M, 1.24 B, 52.3 K."""
    if not isinstance(n, (int, float)) or isinstance(n, bool) or not math.isfinite(n):
        return "?"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g} {unit}" if n / div < 100 else f"{n / div:.1f} {unit}"
    return str(int(n))


def num_cell(v: Any, digits: int = 4, text: str | None = None) -> Cell:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return Cell(text if text is not None else fnum(v, digits), v if ok else None, numeric=True)


class Page:
    """Collects sections and renders one HTML document."""

    def __init__(self, title: str, subtitle: str = ""):
        self.title, self.subtitle = title, subtitle
        self.parts: list[str] = []
        self.toc: list[tuple[str, str]] = []
        self.n_figures = 0
        self._ids: set[str] = set()

    # ---- structure -------------------------------------------------------------------------------
    def _anchor(self, text: str) -> str:
        base = "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-") or "section"
        anchor, i = base, 2
        while anchor in self._ids:
            anchor, i = f"{base}-{i}", i + 1
        self._ids.add(anchor)
        return anchor

    def section(self, title: str, level: int = 2, toc: bool | None = None) -> str:
        anchor = self._anchor(title)
        if toc if toc is not None else level == 2:
            self.toc.append((anchor, title))
        self.parts.append(f'<h{level} id="{anchor}">{esc(title)}</h{level}>')
        return anchor

    def raw(self, fragment: str) -> None:
        self.parts.append(fragment)

    def text(self, text: str) -> None:
        self.parts.append(f"<p>{esc(text)}</p>")

    def note(self, text: str, kind: str = "info") -> None:
        css = {"info": "note", "warn": "note warn", "good": "note good"}[kind]
        self.parts.append(f'<div class="{css}">{esc(text)}</div>')

    def facts(self, pairs: Iterable[tuple[str, Any]]) -> None:
        items = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in pairs if v not in (None, ""))
        self.parts.append(f'<dl class="facts">{items}</dl>')

    def details(self, summary: str, body_text: str) -> None:
        self.parts.append(f"<details><summary>{esc(summary)}</summary><pre>{esc(body_text)}</pre></details>")

    # ---- content ---------------------------------------------------------------------------------
    def table(self, columns: list[str], rows: list[list[Any]], *, sortable: bool = True, caption: str = "",
              highlight: set[int] | None = None, css: str = "", numeric_cols: set[int] | None = None,
              drop_empty: bool = False) -> None:
        """A table; cells are ``Cell``s, numbers (formatted, right-aligned) or text (escaped).

        ``drop_empty`` leaves out columns with no value in any row (e.g. a user attribute never recorded).
        """
        highlight = highlight or set()
        cells_rows = [[_as_cell(v) for v in row] for row in rows]
        if drop_empty and cells_rows:
            keep = [j for j in range(len(columns)) if any(j < len(r) and r[j].text != "" for r in cells_rows)]
            columns = [columns[j] for j in keep]
            cells_rows = [[r[j] for j in keep] for r in cells_rows]
        numeric_cols = set(numeric_cols or ())
        for j in range(len(columns)):
            col = [r[j] for r in cells_rows if j < len(r) and r[j].text != ""]
            if col and all(c.numeric for c in col):
                numeric_cols.add(j)
        head = []
        for j, c in enumerate(columns):
            cls = ' class="num"' if j in numeric_cols else ""
            label = f'<button type="button" title="sort by {esc(c)}">{esc(c)}</button>' if sortable else esc(c)
            head.append(f'<th scope="col"{cls}>{label}</th>')
        body = []
        for i, row in enumerate(cells_rows):
            tds = []
            for j, cell in enumerate(row):
                classes = " ".join(x for x in ("num" if cell.numeric else "", cell.css) if x)
                cls = f' class="{classes}"' if classes else ""
                sort = f' data-sort="{esc(_sort_value(cell.sort))}"' if cell.sort is not None else ""
                tds.append(f"<td{cls}{sort}>{cell.text}</td>")
            tr_cls = ' class="highlight"' if i in highlight else ""
            body.append(f"<tr{tr_cls}>{''.join(tds)}</tr>")
        table_cls = " ".join(x for x in ("sortable" if sortable else "", css) if x)
        cap = f'<div class="caption">{esc(caption)}</div>' if caption else ""
        self.parts.append(f'<div class="table-wrap"><table class="{table_cls}"><thead><tr>{"".join(head)}</tr></thead>'
                          f'<tbody>{"".join(body)}</tbody></table></div>{cap}')

    def figure(self, fig: Any, caption: str = "") -> None:
        """A plotly figure as a div plus the script that draws it (plotly.js is inlined once, in ``render``)."""
        self.n_figures += 1
        div_id = f"chart-{self.n_figures}"
        snippet = fig.to_html(full_html=False, include_plotlyjs=False, include_mathjax=False, div_id=div_id,
                              config={"displaylogo": False, "responsive": True,
                                      "toImageButtonOptions": {"format": "png", "scale": 2}})
        cap = f'<div class="caption">{esc(caption)}</div>' if caption else ""
        self.parts.append(f'<div class="figure" data-chart="{div_id}">{snippet}{cap}</div>')

    # ---- output ----------------------------------------------------------------------------------
    def render(self, footer: str = "") -> str:
        from plotly.offline import get_plotlyjs

        toc = "".join(f'<a href="#{a}">{esc(t)}</a>' for a, t in self.toc)
        plotly_js = get_plotlyjs().replace("</script", "<\\/script") if self.n_figures else ""
        sub = f'<p class="subtitle">{esc(self.subtitle)}</p>' if self.subtitle else ""
        return (
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{esc(self.title)}</title><style>{_CSS}</style>"
            + (f"<script>{plotly_js}</script>" if plotly_js else "")
            + f"</head><body><main><h1>{esc(self.title)}</h1>{sub}"
            + (f'<nav class="toc" aria-label="sections">{toc}</nav>' if toc else "")
            + "\n".join(self.parts)
            + (f"<footer>{footer}</footer>" if footer else "")
            + f"</main><script>{_SORT_JS}</script></body></html>\n"
        )


def metric_scale(maximize: bool) -> list[list]:
    """``METRIC_SCALE`` oriented so that dark is always the better value."""
    return METRIC_SCALE if maximize else [[1.0 - p, c] for p, c in reversed(METRIC_SCALE)]


def scale_color(scale: list[list], x: float) -> str:
    """The colour at ``x`` in [0, 1] of a colour scale given as [[position, "#rrggbb"], ...]."""
    x = min(1.0, max(0.0, x))
    for (p0, c0), (p1, c1) in zip(scale, scale[1:]):
        if p0 <= x <= p1:
            f = 0.0 if p1 == p0 else (x - p0) / (p1 - p0)
            a = [int(c0[i:i + 2], 16) for i in (1, 3, 5)]
            b = [int(c1[i:i + 2], 16) for i in (1, 3, 5)]
            return "rgb({},{},{})".format(*(round(u + (v - u) * f) for u, v in zip(a, b)))
    return scale[-1][1]


def log_ticks(lo: float, hi: float) -> tuple[list[float], list[str]]:
    """Tick values 1, 2, 5 x 10^k between lo and hi, labelled like ``2e-05``: readable log axes."""
    vals = []
    k = math.floor(math.log10(lo)) - 1
    while 10 ** k <= hi * 10:
        for m in (1, 2, 5):
            v = m * 10 ** k
            if lo / 1.5 <= v <= hi * 1.5:
                vals.append(v)
        k += 1
    if len(vals) > 9:
        vals = [v for v in vals if f"{v:.0e}".startswith("1")] or vals
    return vals, [f"{v:.0e}" for v in vals]


def _as_cell(v: Any) -> Cell:
    if isinstance(v, Cell):
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return num_cell(v)
    return Cell(esc(v), None)


def _sort_value(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    return str(v)


def style(fig: Any, title: str, x_title: str, y_title: str, height: int = 420, legend: bool | None = None) -> Any:
    """The look every chart shares: white template, a title, axis titles (with units), a legend when useful."""
    n_named = len({t.name for t in fig.data if getattr(t, "showlegend", None) is not False and t.name})
    show_legend = legend if legend is not None else n_named > 1
    fig.update_layout(
        template="plotly_white", height=height, title={"text": title, "x": 0.01, "xanchor": "left", "font": {"size": 16}},
        margin={"l": 70, "r": 30, "t": 60, "b": 60}, showlegend=show_legend,
        font={"family": "system-ui, -apple-system, Segoe UI, Roboto, Helvetica, Arial, sans-serif", "size": 13},
        hoverlabel={"namelength": -1},
    )
    fig.update_xaxes(title_text=x_title, showline=True, linecolor="#999", ticks="outside")
    fig.update_yaxes(title_text=y_title, showline=True, linecolor="#999", ticks="outside")
    return fig
