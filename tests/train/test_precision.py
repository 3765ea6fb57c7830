"""bf16 with fp32 master weights, precision resolution and the attention choice (lmtune.train.precision)."""

from __future__ import annotations

import copy
import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lmtune
from lmtune import DataConfig, ModelConfig, RunConfig, TrainConfig
from lmtune.errors import ConfigError
from lmtune.models.classifier import attention_for
from lmtune.train import precision as prec
from lmtune.train.precision import MasterWeights, resolve_precision
from tests.train.test_resume import env, metrics, train_cmd


def test_resolve_precision(monkeypatch):
    assert resolve_precision("fp32", master_ok=True) == "no"
    assert resolve_precision("bf16", master_ok=True) == "bf16"
    assert resolve_precision("bf16-master", master_ok=True) == "bf16-master"
    assert resolve_precision("bf16-master", master_ok=False) == "bf16"  # e.g. inference: autocast instead
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(prec, "native_bf16_cpu", lambda: True)
    assert resolve_precision("auto", master_ok=True) == "bf16-master"
    assert resolve_precision("auto", master_ok=False) == "bf16"
    monkeypatch.setattr(prec, "native_bf16_cpu", lambda: False)  # emulated bf16 is slower than fp32
    assert resolve_precision("auto", master_ok=True) == "no"


def test_attention_auto_is_eager_on_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attention_for("auto") == "eager"  # then lmtune_eager for Llama-style models (tests/models/test_attention.py)
    assert attention_for("sdpa") == "sdpa"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert attention_for("auto") is None  # the model's own default on GPUs


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.lin = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)
        self.head = torch.nn.Linear(16, 3)
        self.register_buffer("freq", torch.linspace(0, 1, 16) * 1e-3)  # like rotary inverse frequencies

    def forward(self, ids):
        h = self.emb(ids) + self.freq.to(self.emb.weight.dtype)
        return self.head(self.norm(torch.relu(self.lin(h)))).mean(1)


def _loss(net, ids, y):
    return torch.nn.functional.cross_entropy(net(ids).float(), y, reduction="sum")


def _adamw(params, fused):
    return torch.optim.AdamW([{"params": params, "weight_decay": 0.01}], lr=1e-2, fused=fused, foreach=None if fused else True)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [None, 1e-3])
def test_master_step_is_an_fp32_adamw_step_on_the_bf16_gradients(fused, max_norm):
    """One update of the masters equals plain fp32 AdamW (+ clipping) fed the same gradients, in chunks too."""
    ids, y = torch.randint(0, 50, (4, 5)), torch.tensor([0, 1, 2, 1])
    net = _Net()
    reference = copy.deepcopy(net)
    mw = MasterWeights(net)
    mw.CHUNK_NUMEL = 300  # force several optimizer calls per step
    assert all(p.dtype == torch.bfloat16 for p in net.parameters())
    assert net.freq.dtype == torch.float32  # buffers keep full precision
    assert all(m.dtype == torch.float32 for m in mw.masters)
    assert all(torch.equal(m, p) for m, p in zip(mw.masters, reference.parameters()))
    opt = _adamw(mw.masters, fused)
    ref_opt = _adamw(list(reference.parameters()), fused)

    for _ in range(3):
        _loss(net, ids, y).backward()
        grads = [p.grad.float() for p in net.parameters()]
        norm = mw.grad_norm()
        exact = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        assert norm == pytest.approx(exact, rel=5e-3)  # bf16 per-tensor norms: within 0.4%
        mw.step(opt, norm, max_norm)
        coef = max_norm / (norm + 1e-6) if max_norm else 1.0  # clip_grad_norm_'s coefficient, from the same norm
        for p, g in zip(reference.parameters(), grads):
            p.grad = g * coef if coef < 1 else g
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        for m, r in zip(mw.masters, reference.parameters()):
            torch.testing.assert_close(m, r, rtol=1e-5, atol=1e-6)
        for p, m in zip(net.parameters(), mw.masters):
            assert torch.equal(p, m.to(torch.bfloat16))  # the model is refreshed from the masters
            assert p.grad is None and m.grad is None
    assert not hasattr(opt, "grad_scale")  # the clipping scale never outlives a step


def test_fold_sums_micro_batch_gradients_in_fp32():
    ids, y = torch.randint(0, 50, (4, 5)), torch.tensor([0, 1, 2, 1])
    net = _Net()
    mw = MasterWeights(net)
    _loss(net, ids[:2], y[:2]).backward()
    first = [p.grad.float() for p in net.parameters()]
    mw.fold()
    assert all(p.grad is None for p in net.parameters())
    _loss(net, ids[2:], y[2:]).backward()
    second = [p.grad.float() for p in net.parameters()]
    expected = float(torch.linalg.vector_norm(torch.stack([(a + b).norm() for a, b in zip(first, second)])))
    assert mw.grad_norm() == pytest.approx(expected, rel=1e-5)
    for m, a, b in zip(mw.masters, first, second):
        torch.testing.assert_close(m.grad, a + b)


def _cfg(model, files, out, **train):
    t = dict(learning_rate=3e-3, global_batch_size=16, epochs=3, precision="bf16-master", progress=False, seed=0) | train
    return RunConfig(data=DataConfig(train_file=files["train"], val_file=files["val"]), model=ModelConfig(name=model),
                     train=TrainConfig(**t), output_dir=str(out), report=False)


def test_bf16_master_run_learns_and_saves_fp32_weights(tiny_llama, sentiment_files, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    result = lmtune.train(_cfg(tiny_llama, sentiment_files, out, micro_batch_size=8))  # 2 micro-batches: fold()
    assert result.record["precision"] == "bf16-master"
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"]
    assert result.best["accuracy"] >= 0.75, result.history
    weights = load_file(str(out / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}
    # fp32 masters, not bf16 values upcast: some weight has bits below bf16's precision.
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in weights.values())
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.float32
    scored = lmtune.evaluate(str(out), sentiment_files["val"])
    assert scored["accuracy"] == pytest.approx(result.best["accuracy"], abs=0.05)  # autocast at inference


def test_bf16_master_keeps_the_best_evaluation_not_the_last(tiny_llama, sentiment_files, tmp_path, monkeypatch):
    """The best weights (held as fp32 masters) are what is saved, with and without checkpoints on disk."""
    for save in (True, False):
        out = tmp_path / f"run-{save}"
        result = lmtune.train(_cfg(tiny_llama, sentiment_files, out, learning_rate=3e-2, epochs=4, save_checkpoints=save))
        best = result.best["step"]
        scored = lmtune.evaluate(str(out), sentiment_files["val"], precision="bf16")
        best_eval = next(h for h in result.history if h["step"] == best)
        assert scored["accuracy"] == pytest.approx(best_eval["accuracy"], abs=0.05)


def test_bf16_master_needs_a_full_fine_tune(tiny_llama, sentiment_files, tmp_path):
    cfg = _cfg(tiny_llama, sentiment_files, tmp_path / "o")
    cfg.model.method = "lora"
    with pytest.raises(ConfigError, match="--precision bf16-master needs --method full"):
        lmtune.train(cfg)


def test_auto_uses_autocast_for_lora(tiny_llama, sentiment_files, tmp_path, monkeypatch):
    monkeypatch.setattr(prec, "native_bf16_cpu", lambda: True)
    cfg = _cfg(tiny_llama, sentiment_files, tmp_path / "o", precision="auto", epochs=1)
    cfg.model.method = "lora"
    assert lmtune.train(cfg).record["precision"] == "bf16"


def test_bf16_master_kill9_then_resume_equals_uninterrupted_run(tiny_llama, sentiment_files, tmp_path):
    """Checkpoints hold the fp32 masters and their optimizer state, so resuming changes nothing."""
    def cmd(out, *extra):
        c = train_cmd(tiny_llama, sentiment_files, out, *extra)
        c[c.index("--precision") + 1] = "bf16-master"
        return c

    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(cmd(full), check=True, capture_output=True, timeout=300)
    p = subprocess.run(cmd(killed), env=env(LMTUNE_FAULT_KILL_AT_STEP="7"), capture_output=True, timeout=300)
    assert p.returncode == -signal.SIGKILL
    p = subprocess.run(cmd(killed, "--resume"), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "resumed from" in p.stdout
    assert metrics(killed) == metrics(full)
    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((killed / "lmtune_run.json").read_text())["precision"] == "bf16-master"
