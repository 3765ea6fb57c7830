"""Helpers for the search tests: small data, the `lmtune tune` command as a subprocess, study access.

Every study here runs on the session's tiny random models (tests/conftest.py) with 120 training and 40
validation rows, so one trial takes about a second on two CPU cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import write_sentiment_splits

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tune_data(tmp_path_factory) -> dict[str, str]:
    return write_sentiment_splits(tmp_path_factory.mktemp("tune-data"), 120)


def base_args(data: dict[str, str], model: str, out: Path, *extra: str) -> list[str]:
    """A small, fast study: fixed batch and epochs unless ``extra`` declares them."""
    args = ["tune", "--data", data["train"], "--val-file", data["val"], "--model", model, "--out", str(out),
            "--max-length", "32", "--confirm-seeds", "0", "--no-report"]
    if "--epochs" not in extra:
        args += ["--epochs", "2"]
    if "--batch-size" not in extra:
        args += ["--batch-size", "16"]
    return args + list(extra)


def lmtune_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # One thread: width-32 models gain nothing from more, and parallel workers on 2 cores must not oversubscribe.
    env.update({"PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    env.update(extra)
    return env


def start(args: list[str], **env: str) -> subprocess.Popen:
    """`python -m lmtune ARGS` in its own process (so kill -9 and signals hit only it)."""
    return subprocess.Popen([sys.executable, "-m", "lmtune", *args], cwd=ROOT, env=lmtune_env(**env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run(args: list[str], timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    p = start(args, **env)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        raise AssertionError(f"lmtune {' '.join(args)} did not finish in {timeout} s:\n{out}") from None
    return subprocess.CompletedProcess(p.args, p.returncode, out, "")


def load(out: Path | str, storage: str | None = None, name: str = "lmtune"):
    import optuna

    url = storage or f"sqlite:///{Path(out).resolve() / 'study.db'}"
    return optuna.load_study(study_name=name, storage=url)


def snapshot(study) -> dict[int, tuple[str, dict, float | None]]:
    """number -> (state, params, value) for every trial that is not WAITING."""
    return {t.number: (t.state.name, dict(t.params), t.value) for t in study.get_trials(deepcopy=False)
            if t.state.name != "WAITING"}


@pytest.fixture(autouse=True)
def _fresh_cli_logging():
    """`lmtune.cli.main` binds its log handler to the sys.stdout of the first call; pytest swaps sys.stdout
    per test, so drop the handler after each test (the next main() call makes a new one)."""
    yield
    from lmtune._console import log

    for h in [h for h in log.handlers if getattr(h, "_lmtune", False)]:
        log.removeHandler(h)


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test here on one torch thread (tests/conftest.py)."""
