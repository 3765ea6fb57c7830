"""ENGINEERING.md §3 row 2: three workers share one PostgreSQL study; one is killed with kill -9 mid-trial.

Needs a PostgreSQL server on 127.0.0.1:5432 that trusts local connections (user postgres or root);
`.ci/run` starts one. Each test gets a fresh database, dropped afterwards.
"""

from __future__ import annotations

import getpass
import signal
import uuid

import pytest

from tests.tune.conftest import base_args, load, start

pytestmark = pytest.mark.postgres


def _connect(dbname: str = "postgres"):
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install -e '.[test]')")
    errors = []
    for user in ("postgres", getpass.getuser(), "root"):
        try:
            conn = psycopg2.connect(host="127.0.0.1", port=5432, user=user, dbname=dbname, connect_timeout=3)
            conn.autocommit = True
            return conn, user
        except psycopg2.OperationalError as e:
            errors.append(f"{user}: {str(e).strip().splitlines()[0]}")
    pytest.skip("no PostgreSQL server accepting trusted connections on 127.0.0.1:5432 "
                f"(start one with .ci/run): {'; '.join(errors)}")


@pytest.fixture
def pg_url():
    conn, user = _connect()
    name = f"lmtune_test_{uuid.uuid4().hex[:10]}"
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg2://{user}@127.0.0.1:5432/{name}"
    finally:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.close()


def test_row2_three_workers_one_killed(tune_data, tiny_llama, tmp_path, pg_url):
    n = 6
    common = ["--lr", "1e-3..3e-3:log", "--n-trials", str(n), "--pruner", "none", "--storage", pg_url,
              "--heartbeat-interval", "1", "--grace-period", "4"]
    # 2 epochs x 2 evaluations: the victim dies at the 3rd evaluation, in the middle of its first trial.
    workers = [start(base_args(tune_data, tiny_llama, tmp_path / f"w{i}", *common),
                     **({"LMTUNE_FAULT_KILL_AFTER_EVALS": "3"} if i == 0 else {})) for i in range(3)]
    outputs = []
    for w in workers:
        try:
            out, _ = w.communicate(timeout=180)
        except Exception:
            for x in workers:
                x.kill()
            raise
        outputs.append(out)
    log = "\n\n".join(f"--- worker {i} (exit {w.returncode})\n{o}" for i, (w, o) in enumerate(zip(workers, outputs)))
    assert workers[0].returncode == -signal.SIGKILL, log
    assert workers[1].returncode == 0 and workers[2].returncode == 0, log

    study = load(None, storage=pg_url)
    every = study.get_trials()
    # slots enqueued beyond n by workers topping up at once are retired unrun (FAIL, marked lmtune_surplus)
    surplus = [t for t in every if t.system_attrs.get("lmtune_surplus")]
    assert all(not t.params and not t.intermediate_values for t in surplus)
    trials = [t for t in every if t not in surplus]
    states = [t.state.name for t in trials]
    assert states.count("COMPLETE") == n, log
    assert "RUNNING" not in states and "WAITING" not in states, (states, log)
    assert len({t.number for t in every}) == len(every)
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert len(failed) == 1, (states, log)
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert retry.state.name == "COMPLETE" and retry.params == failed[0].params
    complete_params = [tuple(sorted(t.params.items())) for t in trials if t.state.name == "COMPLETE"]
    assert len(set(complete_params)) == n, "no configuration ran twice"
    assert len(trials) == n + 1, f"only the killed trial's retry may be extra: {states}"
    # every worker that finished wrote the results of the shared study
    assert (tmp_path / "w1" / "leaderboard.csv").is_file() and (tmp_path / "w2" / "leaderboard.csv").is_file()
