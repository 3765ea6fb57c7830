"""A training loss that explodes without becoming NaN stops the run as diverged (--divergence-factor)."""

from __future__ import annotations

import importlib
import json
import math
import signal
import subprocess
from pathlib import Path

import pytest

from lmtune.cli import main
from lmtune.errors import DivergenceError
from tests.train.test_resume import env, train_cmd

# lr 10 on the tiny llama: the loss goes from 0.7 to hundreds or thousands within a few steps, and stays finite.
EXPLODING_LR = "10"


@pytest.fixture(autouse=True)
def _fresh_cli_logging():
    """main() binds its log handler to the sys.stdout of its first call; pytest swaps sys.stdout per test."""
    yield
    from lmtune._console import log

    for h in [h for h in log.handlers if getattr(h, "_lmtune", False)]:
        log.removeHandler(h)


def train_args(model: str, files: dict[str, str], out: Path, *extra: str) -> list[str]:
    return ["train", "--model", model, "--data", files["train"], "--val-file", files["val"], "--batch-size", "16",
            "--epochs", "3", "--precision", "fp32", "--no-progress", "--no-report", "--out", str(out), *extra]


def step_losses(monkeypatch) -> list[tuple[float, dict]]:
    """Spy on the divergence check: (loss of each optimizer step, the state it was checked against)."""
    loop = importlib.import_module("lmtune.train.loop")
    seen, real = [], loop._check_divergence

    def spy(st, step_loss, tc, chance_loss):
        seen.append((step_loss, st))
        real(st, step_loss, tc, chance_loss)

    monkeypatch.setattr(loop, "_check_divergence", spy)
    return seen


def test_exploding_loss_exits_2_with_one_line_and_writes_no_model(capsys, tiny_llama, sentiment_files, tmp_path):
    out = tmp_path / "run"
    code = main(train_args(tiny_llama, sentiment_files, out, "--lr", EXPLODING_LR))
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "diverged" in lines[0] and f"lower --lr (now {EXPLODING_LR})" in lines[0] and "at step" in lines[0]
    assert "Traceback" not in err
    assert not (out / "model.safetensors").exists()
    assert not (out / "lmtune_run.json").exists()


@pytest.mark.parametrize("lr", ["10", "3"])
def test_exploding_loss_without_warmup_is_caught(capsys, tiny_llama, sentiment_files, tmp_path, lr):
    """With no warmup the first updates already explode; the reference (the first step's loss) is taken before
    them, so they cannot raise the line out of reach."""
    code = main(train_args(tiny_llama, sentiment_files, tmp_path / "run", "--lr", lr, "--warmup-ratio", "0"))
    err = capsys.readouterr().err
    assert code == 2 and "diverged" in err, err


def test_divergence_factor_0_disables_the_check_and_the_loss_really_climbs(capsys, tiny_llama, sentiment_files,
                                                                          tmp_path, monkeypatch):
    seen = step_losses(monkeypatch)
    out = tmp_path / "run"
    code = main(train_args(tiny_llama, sentiment_files, out, "--lr", EXPLODING_LR, "--divergence-factor", "0"))
    assert code == 0, capsys.readouterr().err
    losses = [loss for loss, _ in seen]
    assert all(math.isfinite(x) for x in losses)  # not the NaN case
    assert losses[0] < 1 and max(losses) > 100, losses  # ln 2 at the start, then it explodes
    record = json.loads((out / "lmtune_run.json").read_text())
    assert record["config"]["train"]["divergence_factor"] == 0
    assert record["best"]["accuracy"] <= 0.65  # what such a run is worth: about chance (0.5)


def test_a_healthy_run_stays_far_below_the_line(tiny_llama, sentiment_files, tmp_path, monkeypatch):
    import lmtune

    seen = step_losses(monkeypatch)
    cfg = lmtune.RunConfig(data=lmtune.DataConfig(train_file=sentiment_files["train"], val_file=sentiment_files["val"]),
                           model=lmtune.ModelConfig(name=tiny_llama), output_dir=str(tmp_path / "run"), report=False,
                           train=lmtune.TrainConfig(learning_rate=3e-3, global_batch_size=16, epochs=4, precision="fp32",
                                                    progress=False))
    result = lmtune.train(cfg)
    assert result.record["steps"]["done"] == 40
    losses = [loss for loss, _ in seen]
    reference = seen[-1][1].loss_reference
    assert reference == pytest.approx(max(losses[0], math.log(2)))
    worst = max(sum(losses[max(0, i - 9): i + 1]) / len(losses[max(0, i - 9): i + 1]) for i in range(3, len(losses)))
    assert worst < 1.5 * reference, (worst, reference)  # the line is at 5 x
    assert result.best["accuracy"] >= 0.75


def test_resume_keeps_the_reference_of_the_first_steps(tiny_llama, sentiment_files, tmp_path):
    out = tmp_path / "run"
    cmd = train_cmd(tiny_llama, sentiment_files, out)
    cmd[cmd.index("--lr") + 1] = EXPLODING_LR
    whole = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 2 and "diverged" in whole.stderr
    step = int(whole.stderr.split("at step ")[1].split(";")[0])
    assert step > 2, whole.stderr  # so that a kill at step 2 comes first

    p = subprocess.run(cmd, env=env(LMTUNE_FAULT_KILL_AT_STEP="2"), capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    state = json.loads((out / "checkpoints" / "step-0000002" / "state.json").read_text())
    assert len(state["recent_losses"]) == 2
    assert state["loss_reference"] == pytest.approx(max(state["recent_losses"][0], math.log(2)))
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 2
    assert resumed.stderr.strip().splitlines()[-1] == whole.stderr.strip().splitlines()[-1]  # same step, same numbers
    assert not (out / "model.safetensors").exists()


def test_the_rule():
    from lmtune.config import TrainConfig
    from lmtune.train.loop import TrainState, _check_divergence

    def run(losses, factor=5.0, chance=0.5):
        tc = TrainConfig(learning_rate=0.5, divergence_factor=factor)
        st = TrainState(config={}, micro_batch_size=1)
        for loss in losses:
            _check_divergence(st, loss, tc, chance)
            st.global_step += 1
        return st

    assert run([1.0, 1.0, 1.0] + [4.9] * 30).loss_reference == 1.0  # below 5 x: a bad run, not a diverged one
    # The reference is the first step's loss (before any update): a learning rate that explodes at once, with no
    # warmup, cannot raise it; and at least the loss of guessing uniformly, so one easy first batch cannot lower it.
    with pytest.raises(DivergenceError, match="at step 4;"):
        run([1.0, 50.0, 200.0, 400.0])
    assert run([0.01] + [0.6] * 30, chance=0.69).loss_reference == 0.69
    st = run([1.0] * 3 + [0.5] * 7 + [30.0])  # one spike is averaged over ten steps: (7 x 0.5 + 2 x 1 + 30) / 10 < 5
    assert len(st.recent_losses) == 10
    with pytest.raises(DivergenceError, match=r"at step 12;.*lower --lr \(now 0.5\)"):
        run([1.0] * 3 + [0.5] * 7 + [30.0, 30.0])
    with pytest.raises(DivergenceError, match="at step 4;"):
        run([1.0, 1.0, 1.0, 100.0])  # checked from step 4 on
    run([1.0, 1.0, 1.0] + [1e4] * 20, factor=0)  # 0 or None: off
    run([1.0, 1.0, 1.0] + [1e4] * 20, factor=None)
