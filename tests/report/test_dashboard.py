"""A study written by lmtune stays viewable in optuna-dashboard (its WSGI app serves it)."""

from __future__ import annotations

import io
import json

import optuna
import pytest

dashboard = pytest.importorskip("optuna_dashboard")


def call(app, path: str) -> tuple[str, dict]:
    status: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "localhost",
               "SERVER_PORT": "80", "wsgi.input": io.BytesIO(), "wsgi.url_scheme": "http", "SERVER_PROTOCOL": "HTTP/1.1"}
    body = b"".join(app(environ, lambda s, h, exc=None: status.append(s)))
    return status[0], json.loads(body or b"{}")


def test_lmtune_study_is_served_by_optuna_dashboard(tmp_path):
    url = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(storage=url, study_name="lmtune", direction="maximize")
    study.set_user_attr("space", {"learning_rate": "1e-5..1e-3:log"})
    for i, lr in enumerate([1e-5, 1e-4, 1e-3]):
        t = study.ask()
        t.suggest_float("learning_rate", 1e-5, 1e-3, log=True)
        t.set_user_attr("history", [{"step": 10, "epoch": 0.5, "accuracy": 0.6 + i / 10}])
        t.report(0.6 + i / 10, 1)
        study.tell(t, 0.6 + i / 10)
    app = dashboard.wsgi(url)
    status, studies = call(app, "/api/studies")
    assert status.startswith("200")
    assert [s["study_name"] for s in studies["study_summaries"]] == ["lmtune"]
    status, detail = call(app, f"/api/studies/{studies['study_summaries'][0]['study_id']}")
    assert status.startswith("200") and len(detail["trials"]) == 3
