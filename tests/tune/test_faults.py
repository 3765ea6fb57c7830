"""ENGINEERING.md §3 rows 1, 5, 10, 11: kill -9 and resume, SIGINT/SIGTERM, divergence, out of memory."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
import torch

from lmtune.cli import main
from lmtune.config import DataConfig, ModelConfig, RunConfig, SearchConfig, TrainConfig, TuneConfig
from lmtune.tune.study import tune
from tests.tune.conftest import ROOT, base_args, lmtune_env, load, run, snapshot, start


def _states(study) -> list[str]:
    return [t.state.name for t in study.get_trials()]


def test_row1_kill9_then_rerun_resumes(tune_data, tiny_llama, tmp_path):
    """kill -9 in the third trial (after two COMPLETE); the same command resumes and ends with exactly N COMPLETE."""
    out, n = tmp_path / "s", 4
    args = base_args(tune_data, tiny_llama, out, "--lr", "1e-3..3e-3:log", "--n-trials", str(n), "--pruner", "none")
    # 2 epochs x 2 evaluations per epoch = 4 evaluations per trial: the 9th is the first of trial 2.
    killed = run(args, LMTUNE_FAULT_KILL_AFTER_EVALS="9")
    assert killed.returncode == -signal.SIGKILL, killed.stdout
    before = load(out)
    done = {k: v for k, v in snapshot(before).items() if v[0] == "COMPLETE"}
    assert sorted(done) == [0, 1]
    (victim,) = [t for t in before.get_trials() if t.state.name == "RUNNING"]

    again = run(args)
    assert again.returncode == 0, again.stdout
    after = load(out)
    trials = after.get_trials()
    assert {k: snapshot(after)[k] for k in done} == done, "completed trials unchanged"
    assert after.trials[victim.number].state.name == "FAIL"
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params == victim.params, "the killed trial is retried with the same parameters"
    assert _states(after).count("COMPLETE") == n
    assert "RUNNING" not in _states(after) and "WAITING" not in _states(after)
    assert len({t.number for t in trials}) == len(trials)
    assert "leaderboard" in again.stdout


def _send_when_trial_starts(proc, sig, number: int, delay: float) -> list[str]:
    """Read the worker's output; send ``sig`` ``delay`` seconds after it announces trial ``number``."""
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(f"trial {number}: ") and "COMPLETE" not in line:
            time.sleep(delay)
            proc.send_signal(sig)
            break
    return lines


# delay 0: the signal lands while the trial loads its model, before `train` installs its own handler
# (SIGTERM's default action used to kill the worker there and leave the trial RUNNING); 1 s: in training.
@pytest.mark.parametrize("sig, delay", [(signal.SIGINT, 0.4), (signal.SIGTERM, 0.0)], ids=["SIGINT-training", "SIGTERM-loading"])
def test_row5_signal_fails_and_requeues_then_rerun_completes(tune_data, tiny_llama, tmp_path, sig, delay):
    out, n = tmp_path / "s", 2
    args = base_args(tune_data, tiny_llama, out, "--lr", "1e-3..3e-3:log", "--n-trials", str(n), "--pruner", "none",
                     "--epochs", "8")  # a trial lasts seconds: the signal lands inside it
    proc = start(args)
    lines = _send_when_trial_starts(proc, sig, 1, delay)
    t0 = time.time()
    try:
        rest, _ = proc.communicate(timeout=15)
    except Exception:
        proc.kill()
        raise
    waited = time.time() - t0
    text = "".join(lines) + rest
    assert proc.returncode == 130, text
    assert waited < 10, f"took {waited:.1f} s to stop"
    study = load(out)
    assert "RUNNING" not in _states(study), text
    (t1,) = [t for t in study.get_trials() if t.state.name == "FAIL"]
    assert t1.number == 1 and "interrupted" in t1.user_attrs.get("fail_reason", ""), text
    (retry,) = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == 1]
    assert retry.state.name == "WAITING"
    assert "re-queued" in text and "rerun the same command" in text

    again = run(args)
    assert again.returncode == 0, again.stdout
    study = load(out)
    assert _states(study).count("COMPLETE") == n and "RUNNING" not in _states(study)


# Both scripts below start so: `running` holds the number of the trial being run; each script then patches one
# place to send its signal and runs the CLI.
_TRACK_TRIALS = """
import importlib, signal, sys, threading
from lmtune.cli import main

study_module = importlib.import_module("lmtune.tune.study")  # `lmtune.tune` is also the function
running = []
real_run_trial = study_module._run_trial

def run_trial(study, trial, *args):
    running[:] = [trial.number]
    return real_run_trial(study, trial, *args)

study_module._run_trial = run_trial
"""

# A signal landing mid-query: the event listener runs between the SELECT that reads the trial and the fetch of its
# row, where the real race put it (CI, stop 31: `lmtune tune` hung in its next database write, the reader's lock
# never released, so the trial could not even be failed). A subprocess, so the old hang is a timeout, not a stuck suite.
_SIGNAL_MID_QUERY = _TRACK_TRIALS + """
from sqlalchemy import event
from sqlalchemy.engine import Engine

armed = []
real_params_m = study_module._params_m

def params_m(name):
    if running == [0]:  # trial 0, just before it records its model size: the next SELECT reads the trial
        armed.append(True)
    return real_params_m(name)

@event.listens_for(Engine, "after_cursor_execute")
def signal_mid_query(conn, cursor, statement, parameters, context, executemany):
    # The main thread's query (the heartbeat thread queries too).
    if armed and threading.current_thread() is threading.main_thread() and statement.lstrip().upper().startswith("SELECT"):
        armed.clear()
        signal.raise_signal(signal.SIGTERM)

study_module._params_m = params_m
sys.exit(main(sys.argv[1:]))
"""


def _run_script(path, source: str, args: list[str]) -> tuple[int, str]:
    """`python SCRIPT ARGS` (a script that patches lmtune, then runs its CLI) with a deadline."""
    path.write_text(source)
    proc = subprocess.Popen([sys.executable, str(path), *args], cwd=ROOT, env=lmtune_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        text, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        text, _ = proc.communicate()
        raise AssertionError(f"{path.name}: lmtune tune hung:\n{text}") from None
    return proc.returncode, text


def test_row5_a_signal_inside_a_database_query_waits_for_it_then_stops(tune_data, tiny_llama, tmp_path):
    """The signal takes effect when the query returns: the trial is failed and re-queued, nothing hangs."""
    out = tmp_path / "s"
    args = base_args(tune_data, tiny_llama, out, "--lr", "1e-3..3e-3:log", "--n-trials", "2", "--pruner", "none")
    code, text = _run_script(tmp_path / "signal_mid_query.py", _SIGNAL_MID_QUERY, args)
    assert code == 130, text
    assert "Traceback" not in text, text
    study = load(out)
    assert "RUNNING" not in _states(study), text
    (t0,) = [t for t in study.get_trials() if t.state.name == "FAIL"]
    assert t0.number == 0 and "SIGTERM" in t0.user_attrs.get("fail_reason", ""), text
    assert t0.user_attrs.get("model_params_m") is not None, "the write the signal landed in was finished"
    (retry,) = [t for t in study.get_trials() if t.system_attrs.get("failed_trial") == 0]
    assert retry.state.name == "WAITING"


_SIGNAL_IN_LAST_EVALUATION = _TRACK_TRIALS + """
loop = importlib.import_module("lmtune.train.loop")
real_evaluate = loop._evaluate_and_keep

def evaluate_and_keep(s, st, *args):
    if running == [0] and st.global_step >= s.total_steps:  # trial 0's last evaluation: no step left to stop at
        signal.raise_signal(signal.SIGINT)
    return real_evaluate(s, st, *args)

loop._evaluate_and_keep = evaluate_and_keep
sys.exit(main(sys.argv[1:]))
"""


def test_row5_a_signal_in_a_trials_last_evaluation_keeps_the_trial_and_stops_the_search(tune_data, tiny_llama, tmp_path):
    """The training loop had no step left to stop at: the trial finishes and is recorded, and the search stops
    there instead of starting the next trial (the request used to vanish with the loop)."""
    out = tmp_path / "s"
    args = base_args(tune_data, tiny_llama, out, "--lr", "1e-3..3e-3:log", "--n-trials", "2", "--pruner", "none")
    code, text = _run_script(tmp_path / "signal_in_last_evaluation.py", _SIGNAL_IN_LAST_EVALUATION, args)
    assert code == 130, text
    assert "SIGINT during trial 0, which finished COMPLETE and is kept" in text, text
    study = load(out)
    assert [x for x in _states(study) if x != "WAITING"] == ["COMPLETE"], text  # trial 1 never started
    again = run(args)
    assert again.returncode == 0, again.stdout
    study = load(out)
    assert _states(study) == ["COMPLETE", "COMPLETE"]


def test_row10_diverging_trial_is_pruned_never_complete(tune_data, tiny_llama, tmp_path):
    """lr = 1000 with weight decay 0.1 makes the tiny model's loss explode within a few steps: NaN, or (since a new
    head starts at zero) a finite loss millions of times the starting one, which the divergence check stops first."""
    out = tmp_path / "s"
    code = main(base_args(tune_data, tiny_llama, out, "--lr", "1000,3e-3", "--weight-decay", "0.1", "--n-trials", "4",
                          "--pruner", "none", "--epochs", "1"))
    assert code == 0
    study = load(out)
    diverged = [t for t in study.get_trials() if t.params["learning_rate"] == 1000]
    assert diverged, "the sampler never tried lr=1000; choose another --sampler-seed"
    for t in diverged:
        assert t.state.name in ("PRUNED", "FAIL")
        reason = t.user_attrs["fail_reason"].lower()
        assert "diverged" in reason and ("nan" in reason or "x the starting loss" in reason), reason
    complete = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert complete and all(math.isfinite(t.value) for t in complete)
    assert all(t.params["learning_rate"] != 1000 for t in complete)
    assert _states(study).count("COMPLETE") + _states(study).count("PRUNED") == 4
    assert study.best_trial.params["learning_rate"] == 3e-3


def test_row10_exploding_but_finite_loss_is_pruned_as_diverged(tune_data, tiny_llama, tmp_path):
    """lr = 10 keeps the tiny model's loss finite (clipping, RMSNorm) but sends it to the hundreds: such a trial
    used to end COMPLETE at chance accuracy; it is PRUNED with the divergence as its reason."""
    out = tmp_path / "s"
    code = main(base_args(tune_data, tiny_llama, out, "--lr", "10", "--n-trials", "2", "--pruner", "none",
                          "--epochs", "1", "--no-default-first"))
    assert code == 0
    study = load(out)
    assert _states(study) == ["PRUNED", "PRUNED"]
    for t in study.get_trials():
        assert t.user_attrs["fail_reason"].startswith("diverged: training loss diverged"), t.user_attrs
    assert not (out / "best").exists()


def test_row11_oom_lowers_micro_batch_and_keeps_global_batch(tune_data, tiny_llama, tmp_path, monkeypatch):
    from transformers import LlamaForSequenceClassification

    real = LlamaForSequenceClassification.forward
    seen: list[int] = []

    def forward(self, input_ids=None, *a, **kw):
        if self.training:
            seen.append(int(input_ids.shape[0]))
            if input_ids.shape[0] > 4:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, input_ids, *a, **kw)

    monkeypatch.setattr(LlamaForSequenceClassification, "forward", forward)
    monkeypatch.setenv("LMTUNE_CACHE", str(tmp_path / "cache"))
    cfg = RunConfig(data=DataConfig(train_file=tune_data["train"], val_file=tune_data["val"]),
                    model=ModelConfig(name=tiny_llama), train=TrainConfig(max_length=32),
                    output_dir=str(tmp_path / "s"), report=False)
    result = tune(cfg, SearchConfig(learning_rate="3e-3", global_batch_size="16", epochs="1"),
                  TuneConfig(n_trials=1, confirm_seeds=0, pruner="none"))
    (t,) = load(tmp_path / "s").get_trials()
    assert t.state.name == "COMPLETE" and result.counts["complete"] == 1
    assert t.user_attrs["micro_batch_size_used"] == 4
    assert [e["micro_batch_size"] for e in t.user_attrs["oom_events"]] == [8, 4]
    assert max(seen) == 16 and seen.count(4) >= 4, "global batch 16 = 4 micro-batches of 4"
    import json
    record = json.loads((tmp_path / "s" / "best" / "lmtune_run.json").read_text())
    assert record["config"]["train"]["global_batch_size"] == 16 and record["micro_batch_size_used"] == 4
