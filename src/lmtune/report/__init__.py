"""Reports: one self-contained HTML page (plus a markdown summary) for a training run or a study.

The report reads only what ``lmtune train`` / ``lmtune tune`` left on disk (the run folder, or
``study.json`` and the Optuna storage it names), never live objects, so it can be rebuilt at any time,
including while a study is still running: ``lmtune report PATH``. A run's page follows its task (the
record's ``task``: classification or generation); a study's page works for either, in the direction of
its metric.
"""

from __future__ import annotations

import html
from pathlib import Path

from lmtune._console import log
from lmtune._io import atomic_write_text
from lmtune.errors import DataError
from lmtune.records import STUDY_FILE

__all__ = ["write_report"]

REPORT_NAME = "report.html"
SUMMARY_NAME = "summary.md"


def write_report(path: str, output: str | None = None) -> str:
    """Write ``report.html`` (or ``output``) and ``summary.md`` beside it for a run or study folder.

    ``path`` is a folder written by ``lmtune train`` (it holds ``lmtune_run.json``) or by ``lmtune tune``
    (it holds ``study.json``). Logs the markdown summary and returns the HTML file's path.
    Raises ``DataError`` / ``StudyError`` (one line) for anything else.
    """
    from lmtune.report._page import Page
    from lmtune.report._run import RUN_RECORD, load_run, run_summary
    from lmtune.report._study import add_study_sections, load_study, study_summary

    folder = Path(path)
    if not folder.exists():
        raise DataError(f"{path}: no such file or folder")
    if folder.is_file() and folder.name in (RUN_RECORD, STUDY_FILE):
        folder = folder.parent
    if not folder.is_dir():
        raise DataError(f"{path}: expected a run folder (with {RUN_RECORD}) or a study folder (with {STUDY_FILE})")
    out = _output_path(folder, output)

    if (folder / STUDY_FILE).exists():
        sd = load_study(folder)
        best_link = None
        if sd.best_run is not None:
            # The best trial also gets its own page, linked from the study page (which embeds it too).
            # load_study only sets best_run_dir to a folder that resolves inside the study folder.
            best_html = sd.best_run_dir / REPORT_NAME
            try:
                _write_run_page(sd.best_run, best_html)
                best_link = _relative(best_html, out.parent)
            except DataError as e:
                sd.problems.append(f"the best trial's own page was not written ({e})")
        page = Page(f"lmtune study report: {sd.name}",
                    f"{'maximise' if sd.maximize else 'minimise'} {sd.metric} · {len(sd.trials)} trials · {folder.resolve()}")
        add_study_sections(page, sd, best_link)
        footer = ("Explore the study interactively: <code>pip install optuna-dashboard; optuna-dashboard "
                  f"{html.escape(sd.storage)}</code>. Rebuild this page: <code>lmtune report {html.escape(str(folder))}</code>.")
        _write(out, page.render(footer))
        summary = _summary(study_summary, sd, str(out), f"# lmtune study: {sd.name}")
    elif (folder / RUN_RECORD).exists():
        run = load_run(folder)
        _write_run_page(run, out)
        summary = _summary(run_summary, run, str(out), f"# lmtune run: {run.name}")
    else:
        raise DataError(f"{path}: not a run folder (no {RUN_RECORD}) nor a study folder (no {STUDY_FILE})")
    _write(out.parent / SUMMARY_NAME, summary)
    log.info(summary.rstrip("\n"))
    return str(out)


def _write_run_page(run, out: Path) -> None:
    from lmtune.report._page import Page
    from lmtune.report._run import add_run_sections

    model = (run.record.get("model") or {}).get("requested") or ((run.record.get("config") or {}).get("model") or {}).get("name")
    task = " · generation (prompt -> completion)" if run.generation else ""
    page = Page(f"lmtune run report: {run.name}", f"{model or 'model'}{task} · {run.folder.resolve()}")
    add_run_sections(page, run)
    _write(out, page.render(f"Rebuild this page: <code>lmtune report {html.escape(str(run.folder))}</code>."))


def _summary(fn, data, html_path: str, title: str) -> str:
    """The markdown summary; a value of an unexpected type in the folder's files shortens it, never a traceback."""
    try:
        return fn(data, html_path)
    except (TypeError, AttributeError, KeyError, ValueError, IndexError, ZeroDivisionError, OverflowError) as e:
        msg = (str(e).splitlines() or [""])[0][:200]
        return (f"{title}\n\n- summary incomplete: a value in the folder's files has an unexpected type or shape "
                f"({type(e).__name__}: {msg})\n- report: {html_path}\n")


def _write(path: Path, text: str) -> None:
    """Atomic write, then the usual file mode (the temp file behind an atomic write is private, 0600):
    reports are meant to be shared and opened by other users. A path that cannot be written is one line.

    The write replaces ``path`` itself: a symlink there is replaced, never followed."""
    import os
    try:
        atomic_write_text(path, text)
        os.chmod(path, 0o644)
    except OSError as e:
        raise DataError(f"{path}: cannot write the report ({e.strerror or type(e).__name__})") from None


def _output_path(folder: Path, output: str | None) -> Path:
    if not output:
        return folder / REPORT_NAME
    out = Path(output)
    if out.is_dir() or output.endswith(("/", "\\")):
        return out / REPORT_NAME
    return out


def _relative(target: Path, start: Path) -> str:
    import os
    try:
        return Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()
    except ValueError:  # another drive on Windows
        return target.resolve().as_uri()
