"""checkpoints/best is verified and, when broken, settled honestly: on --resume, at the end of a run, and
after a crash between the two renames of an atomic folder write."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmtune
from lmtune.train import checkpoint as ckpt
from tests.train.test_resume import env, metrics, train_cmd, weights_equal


@pytest.fixture(scope="module")
def uninterrupted(tiny_llama, sentiment_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("best") / "full"
    subprocess.run(train_cmd(tiny_llama, sentiment_files, out), check=True, capture_output=True, timeout=300)
    return out


def killed_at(step: int, model: str, files: dict[str, str], out: Path) -> Path:
    p = subprocess.run(train_cmd(model, files, out), env=env(LMTUNE_FAULT_KILL_AT_STEP=str(step)),
                       capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr
    return out / "checkpoints"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: min(100, len(data) // 2)])  # a crash mid-write, or a damaged disk, as seen by the next run


def record(out: Path) -> dict:
    return json.loads((out / "lmtune_run.json").read_text())


def saved_model_matches_best(out: Path, files: dict[str, str]) -> None:
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(out)  # a plain, loadable folder
    best = record(out)["best"]
    scored = lmtune.evaluate(str(out), files["val"], precision="fp32")
    assert scored["loss"] == pytest.approx(best["val_loss"], abs=1e-4)  # the saved weights are those of the best


def test_truncated_best_is_rebuilt_from_the_step_checkpoint_of_the_best_step(tiny_llama, sentiment_files, tmp_path,
                                                                            uninterrupted):
    out = tmp_path / "run"
    root = killed_at(7, tiny_llama, sentiment_files, out)  # evaluated at step 4 (the best so far); step-4 and step-6 kept
    assert json.loads((root / "best" / "state.json").read_text())["step"] == 4
    truncate(root / "best" / "trainable.safetensors")
    p = subprocess.run(train_cmd(tiny_llama, sentiment_files, out, "--resume"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("unusable best checkpoint") == 1
    assert "trainable.safetensors" in p.stdout and "rebuilt it from step-0000004" in p.stdout
    warnings = record(out)["warnings"]
    assert len(warnings) == 1 and "rebuilt it from step-0000004" in warnings[0]
    # the same weights: nothing about the run changed
    assert metrics(out) == metrics(uninterrupted)
    assert weights_equal(out, uninterrupted)
    saved_model_matches_best(out, sentiment_files)


def test_truncated_best_whose_weights_are_gone_lets_the_next_evaluation_be_the_best(tiny_llama, sentiment_files,
                                                                                   tmp_path):
    out = tmp_path / "run"
    root = killed_at(7, tiny_llama, sentiment_files, out)
    truncate(root / "best" / "trainable.safetensors")
    shutil.rmtree(root / "step-0000004")  # the only other copy of the best weights; resume from step 6 (not evaluated)
    p = subprocess.run(train_cmd(tiny_llama, sentiment_files, out, "--resume"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "step-0000006" in p.stdout and p.stdout.count("unusable best checkpoint") == 1
    rec = record(out)
    assert len(rec["warnings"]) == 1 and "step 4" in rec["warnings"][0]
    assert "next evaluation becomes the best" in rec["warnings"][0]
    assert rec["best"]["step"] > 7  # step 4 no longer counts: its weights are lost
    assert (out / "val_predictions.jsonl").is_file()  # rewritten by the new best
    saved_model_matches_best(out, sentiment_files)


def test_best_broken_during_the_run_does_not_crash_its_end(tiny_llama, sentiment_files, tmp_path):
    out = tmp_path / "run"
    cfg = lmtune.RunConfig(data=lmtune.DataConfig(train_file=sentiment_files["train"], val_file=sentiment_files["val"]),
                           model=lmtune.ModelConfig(name=tiny_llama), output_dir=str(out), report=False,
                           train=lmtune.TrainConfig(learning_rate=3e-3, global_batch_size=16, epochs=2, precision="fp32",
                                                    progress=False))

    def damage(event):
        if event.step == event.total_steps:
            truncate(out / "checkpoints" / "best" / "trainable.safetensors")

    result = lmtune.train(cfg, on_evaluate=damage)
    assert len(result.record["warnings"]) == 1 and "unusable best checkpoint" in result.record["warnings"][0]
    assert result.best is not None
    saved_model_matches_best(out, sentiment_files)


# ---- settling the best from what survives --------------------------------------------------------------

def fake_checkpoints(root: Path, steps: list[int], best_step: int | None) -> None:
    """Step folders whose weight is the step number; a best folder holding ``best_step``."""
    for s in steps:
        ckpt.write_folder_atomically(root / f"step-{s:07d}", {"trainable.safetensors": {"w": torch.tensor([float(s)])}},
                                     {"global_step": s})
    if best_step is not None:
        ckpt.write_folder_atomically(root / "best", {"trainable.safetensors": {"w": torch.tensor([float(best_step)])}},
                                     {"step": best_step})


def fake_state(best_step: int, global_step: int, evaluated: list[int]):
    from lmtune.train.loop import TrainState

    history = [{"step": s, "accuracy": s / 100, "is_best": s == best_step} for s in evaluated]
    return TrainState(config={}, micro_batch_size=4, global_step=global_step, history=history,
                      best={"step": best_step, "accuracy": best_step / 100}, evals_without_improvement=1)


def settle(root: Path, st, tmp_path: Path):
    from lmtune.train.loop import _settle_best
    return _settle_best(root, st, tmp_path, True)


def test_a_sound_best_is_used_as_it_is(tmp_path):
    fake_checkpoints(tmp_path, [8, 10], best_step=4)
    st = fake_state(4, 10, [4, 8, 10])
    weights, problem = settle(tmp_path, st, tmp_path)
    assert problem is None and float(weights["w"]) == 4 and st.best["step"] == 4 and not st.warnings


def test_a_best_folder_of_another_step_is_rebuilt_from_the_best_steps_checkpoint(tmp_path):
    # a crash after the step-10 checkpoint (best: step 10) and before best was rewritten
    fake_checkpoints(tmp_path, [8, 10], best_step=4)
    st = fake_state(10, 10, [4, 8, 10])
    weights, problem = settle(tmp_path, st, tmp_path)
    assert "holds step 4, not the best step 10" in problem and "step-0000010" in problem
    assert float(weights["w"]) == 10 and st.best["step"] == 10 and st.warnings == [problem]


def test_lost_best_falls_back_to_the_newest_evaluation_whose_weights_survive(tmp_path):
    fake_checkpoints(tmp_path, [8, 10, 12], best_step=4)
    truncate(tmp_path / "best" / "trainable.safetensors")
    truncate(tmp_path / "step-0000012" / "trainable.safetensors")  # evaluated, but its weights are gone too
    (tmp_path / "val_predictions.jsonl").write_text("{}\n")  # the predictions of the lost best
    st = fake_state(4, 12, [4, 8, 12])
    weights, problem = settle(tmp_path, st, tmp_path)
    assert "now step 8" in problem and float(weights["w"]) == 8
    assert st.best == {"step": 8, "accuracy": 0.08}
    assert st.evals_without_improvement == 1  # the evaluation at step 12 did not beat it
    assert not (tmp_path / "val_predictions.jsonl").exists()


def test_lost_best_without_any_surviving_evaluation_leaves_no_best(tmp_path):
    fake_checkpoints(tmp_path, [6], best_step=4)
    shutil.rmtree(tmp_path / "best")
    st = fake_state(4, 6, [4])
    weights, problem = settle(tmp_path, st, tmp_path)
    assert weights is None and st.best is None and st.evals_without_improvement == 0
    assert "no state.json" in problem and "next evaluation becomes the best" in problem


# ---- a crash between the two renames of write_folder_atomically -----------------------------------------

CRASH_BETWEEN_RENAMES = """
import os, signal, sys
from pathlib import Path
real = os.replace
def replace(src, dst, *a, **k):
    # write_folder_atomically has moved the old target aside; die before the complete new one is renamed in
    if Path(src).name == Path(sys.argv[1]).name + ".tmp" and Path(dst).with_name(Path(dst).name + ".old").exists():
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **k)
os.replace = replace
"""


def test_crash_between_the_renames_keeps_the_complete_new_folder(tmp_path):
    target = tmp_path / "step-0000002"
    ckpt.write_folder_atomically(target, {"trainable.safetensors": {"w": torch.tensor([1.0])}}, {"version": 1})
    code = CRASH_BETWEEN_RENAMES + """
import torch
from lmtune.train import checkpoint as ckpt
ckpt.write_folder_atomically(Path(sys.argv[1]), {"trainable.safetensors": {"w": torch.tensor([2.0])}}, {"version": 2})
"""
    p = subprocess.run([sys.executable, "-c", code, str(target)], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not target.exists() and target.with_name("step-0000002.old").is_dir()  # the state the crash left
    assert ckpt.list_checkpoints(tmp_path) == []
    ckpt.finish_interrupted_writes(tmp_path)
    found = ckpt.read_weights(target)
    assert found["state"] == {"version": 2} and float(found["trainable.safetensors"]["w"]) == 2.0


def test_without_a_complete_new_folder_the_old_one_is_restored(tmp_path):
    target = tmp_path / "best"
    ckpt.write_folder_atomically(target, {"trainable.safetensors": {"w": torch.tensor([1.0])}}, {"step": 1})
    target.rename(tmp_path / "best.old")
    (tmp_path / "best.tmp").mkdir()  # never finished: no state.json
    ckpt.finish_interrupted_writes(tmp_path)
    assert ckpt.read_weights(target)["state"] == {"step": 1}


def test_run_killed_between_the_renames_of_best_resumes_with_it(tiny_llama, sentiment_files, tmp_path, uninterrupted):
    out = tmp_path / "run"
    code = CRASH_BETWEEN_RENAMES + "from lmtune.cli import main\nsys.exit(main(sys.argv[2:]))\n"
    cmd = train_cmd(tiny_llama, sentiment_files, out)
    p = subprocess.run([sys.executable, "-c", code, "best", *cmd[3:]], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr  # killed at the second improvement
    root = out / "checkpoints"
    assert not (root / "best").exists() and (root / "best.old").is_dir() and (root / "best.tmp" / "state.json").is_file()
    p = subprocess.run(train_cmd(tiny_llama, sentiment_files, out, "--resume"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "unusable" not in p.stdout and record(out)["warnings"] == []  # found whole: nothing was lost
    assert metrics(out) == metrics(uninterrupted)
    assert weights_equal(out, uninterrupted)
