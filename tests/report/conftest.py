"""Fixtures: a run folder and a study folder written by hand (see _report_fixtures.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from _report_fixtures import make_run, make_study


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return make_run(tmp_path / "run")


@pytest.fixture
def study_dir(tmp_path) -> Path:
    return make_study(tmp_path / "study")
