"""``lmtune report PATH``: the subcommand, added to the main parser by ``lmtune.cli``."""

from __future__ import annotations

import argparse


def add_report_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "report", help="Write an HTML report for a training run or a study.",
        description="Write one self-contained HTML page (opens offline) and summary.md for a folder written by "
                    "`lmtune train` or `lmtune tune`, and print the summary. Safe to run while a study is still going.")
    p.add_argument("path", metavar="PATH", help="A run folder (has lmtune_run.json) or a study folder (has study.json).")
    p.add_argument("--output", "-o", metavar="FILE", help="Where to write the HTML (default PATH/report.html); "
                                                          "summary.md goes beside it.")
    p.set_defaults(handler=cmd_report)
    return p


def cmd_report(ns: argparse.Namespace) -> int:
    from lmtune.report import write_report

    write_report(ns.path, ns.output)
    return 0
