"""Generation through the verbs: what a user notices (the folder answers through plain transformers the way lmtune
does, the loss is on the completion only, long rows are counted, LoRA adapters can be kept)."""

from __future__ import annotations

import json

import pytest
import torch

import lmtune
from lmtune.cli import main
from tests.tasks.conftest import WORDS


def gen_config(model, files, out, **train):
    settings = dict(learning_rate=3e-3, global_batch_size=16, epochs=1, precision="fp32", progress=False, max_length=48) | train
    return lmtune.RunConfig(data=lmtune.DataConfig(train_file=files["train"], val_file=files["val"]),
                            model=lmtune.ModelConfig(name=model), train=lmtune.TrainConfig(**settings),
                            output_dir=str(out), report=False)


@pytest.fixture(scope="module")
def trained(tiny_llama, generation_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        lmtune.train(gen_config(tiny_llama, generation_files, out, epochs=2))
    finally:
        torch.set_num_threads(threads)
    return out


def test_pipeline_answers_a_prompt_the_way_lmtune_does(trained):
    from transformers import pipeline

    prompt = "repeat: good film"
    ours = lmtune.predict(str(trained), [prompt])[0]["completion"]
    pipe = pipeline("text-generation", model=str(trained))
    theirs = pipe(prompt, return_full_text=False)[0]["generated_text"]
    assert theirs.strip() == ours
    config = json.loads((trained / "generation_config.json").read_text())
    assert config["do_sample"] is False and config["max_new_tokens"] >= 1 and config["eos_token_id"] is not None


def test_validation_loss_is_over_completion_tokens_only(trained, generation_files):
    """The recorded validation loss equals the mean cross-entropy of the completion and EOS tokens, computed here
    with plain transformers; the prompt's tokens do not count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(trained).eval()
    tok = AutoTokenizer.from_pretrained(trained)
    rows = [json.loads(line) for line in open(generation_files["val"])]
    total, n = 0.0, 0
    with torch.no_grad():
        for r in rows:
            p, c = tok(r["prompt"])["input_ids"], tok(r["completion"])["input_ids"] + [tok.eos_token_id]
            logits = model(torch.tensor([p + c])).logits[0]
            logp = torch.log_softmax(logits[len(p) - 1:-1], dim=-1)
            total -= float(logp[torch.arange(len(c)), torch.tensor(c)].sum())
            n += len(c)
    record = json.loads((trained / "lmtune_run.json").read_text())
    assert record["best"]["val_loss"] == pytest.approx(total / n, rel=1e-4)
    assert record["best"]["perplexity"] == pytest.approx(torch.exp(torch.tensor(total / n)).item(), rel=1e-4)


def test_train_on_prompt_puts_the_loss_on_every_token(tiny_llama, generation_files, tmp_path):
    only = lmtune.train(gen_config(tiny_llama, generation_files, tmp_path / "a", max_steps=1))
    every = lmtune.train(gen_config(tiny_llama, generation_files, tmp_path / "b", max_steps=1, train_on_prompt=True))
    assert every.record["timing"]["train_tokens"] == only.record["timing"]["train_tokens"]
    assert every.history[0]["val_loss"] != only.history[0]["val_loss"]  # more (and other) tokens are scored
    # What decoding must write is the completion either way: the prompt's targets do not lengthen max_new_tokens.
    lengths = [r["train_completion"] for r in (only.record["data"]["token_lengths"], every.record["data"]["token_lengths"])]
    assert lengths[0] == lengths[1]
    assert every.record["generation"]["max_new_tokens"] == only.record["generation"]["max_new_tokens"]


def test_too_long_rows_keep_the_completion_and_are_counted(tiny_llama, tmp_path):
    long_prompt = "repeat: " + " ".join(["good film"] * 30)
    rows = [{"prompt": long_prompt if i % 4 == 0 else "repeat: good film", "completion": "good film"} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = lmtune.train(lmtune.RunConfig(data=lmtune.DataConfig(train_file=str(tmp_path / "d.jsonl")),
                                           model=lmtune.ModelConfig(name=tiny_llama),
                                           train=lmtune.TrainConfig(max_length=16, epochs=1, precision="fp32",
                                                                    progress=False, eval_generate_rows=0),
                                           output_dir=str(tmp_path / "o"), report=False))
    cut = result.record["data"]["cut"]
    assert cut["train"]["count"] + cut["val"]["count"] == 10
    assert all(line % 4 == 1 for line in cut["train"]["lines"])  # JSON lines 1, 5, 9, ...
    assert "bleu" not in result.best  # --eval-generate-rows 0: loss and perplexity only


def test_a_completion_that_does_not_fit_is_named_on_the_console(tiny_llama, tmp_path, caplog):
    rows = [{"prompt": f"repeat: good {WORDS[i % 5]}",
             "completion": " ".join(["good film"] * 20) if i % 8 == 0 else "good"} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level("INFO", logger="lmtune"):
        result = lmtune.train(lmtune.RunConfig(data=lmtune.DataConfig(train_file=str(tmp_path / "d.jsonl")),
                                               model=lmtune.ModelConfig(name=tiny_llama),
                                               train=lmtune.TrainConfig(max_length=16, max_steps=1, precision="fp32",
                                                                        progress=False, eval_generate_rows=0),
                                               output_dir=str(tmp_path / "o"), report=False))
    lines = result.record["data"]["completion_too_long"]["train"]["lines"]
    assert lines and all(line % 8 == 1 for line in lines)
    said = next(r.getMessage() for r in caplog.records if "lost the end of their completion" in r.getMessage())
    assert f"{len(lines)} lost the end" in said and str(lines[0]) in said


def test_bare_prompts_are_put_through_the_training_prompt_template(tiny_llama, tmp_path, monkeypatch, capsys):
    import io

    from lmtune.tasks.generation import fill_prompt_template

    rows = [{"words": w, "out": w} for w in ["good film", "bad plot", "nice story", "dull film"] * 8]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    lmtune.train(lmtune.RunConfig(data=lmtune.DataConfig(train_file=str(tmp_path / "d.jsonl"), task="generation",
                                                         prompt_template="repeat: {words}", completion_column="out"),
                                  model=lmtune.ModelConfig(name=tiny_llama),
                                  train=lmtune.TrainConfig(max_length=32, max_steps=1, precision="fp32", progress=False,
                                                           eval_generate_rows=0, max_new_tokens=4),
                                  output_dir=str(out), report=False))
    (tmp_path / "p.jsonl").write_text(json.dumps({"words": "good film"}) + "\n")
    from_file = lmtune.predict(str(out), str(tmp_path / "p.jsonl"))[0]
    assert from_file["prompt"] == "repeat: good film"
    from_list = lmtune.predict(str(out), ["good film"])[0]
    assert from_list["prompt"] == "repeat: good film" and from_list["completion"] == from_file["completion"]
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"good film\n")))
    capsys.readouterr()
    assert main(["predict", str(out)]) == 0
    printed = capsys.readouterr().out
    row = json.loads(printed.splitlines()[0])
    assert row["prompt"] == "repeat: good film" and row["completion"] == from_file["completion"], printed
    assert fill_prompt_template(["a"], None) == ["a"]
    assert fill_prompt_template(["a"], "{x:>3} {{x}}") == ["  a {x}"]  # format specs and braces as in training
    for bad, said in (("{src} -> {tgt}", "fills 2 columns"), ("{}", "fields must name columns"),
                      ("{x:{w}}", "cannot be filled")):
        with pytest.raises(lmtune.errors.DataError, match=said):
            fill_prompt_template(["a"], bad)
    with pytest.raises(lmtune.errors.ConfigError, match="not a valid template"):  # as for a file's template
        fill_prompt_template(["a"], "Q: {")


def test_load_gives_a_generation_folder_its_causal_lm(trained):
    loaded = lmtune.load(str(trained))
    assert type(loaded).__name__ == "Generator" and loaded.model.config.architectures[0].endswith("ForCausalLM")


def test_eval_generate_rows_samples_prompts(tiny_llama, generation_files, tmp_path):
    r = lmtune.train(gen_config(tiny_llama, generation_files, tmp_path / "o", max_steps=1, eval_generate_rows=5))
    assert r.best["generated_prompts"] == 5 and 0 <= r.best["rougeL"] <= 100
    lines = (tmp_path / "o" / "val_predictions.jsonl").read_text().splitlines()
    assert len(lines) == 5 and {"prompt", "references", "prediction", "rougeL"} <= set(json.loads(lines[0]))


def test_lora_merged_by_default_or_kept_as_an_adapter(tiny_llama, generation_files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    common = ["train", "--model", tiny_llama, "--data", generation_files["train"], "--val-file", generation_files["val"],
              "--method", "lora", "--max-steps", "2", "--precision", "fp32", "--no-progress", "--no-report",
              "--max-length", "48"]
    assert main(common + ["--out", str(tmp_path / "merged")]) == 0
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert main(common + ["--save-adapter", "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    rows = lmtune.predict(str(tmp_path / "adapter"), ["repeat: good film"])
    assert rows[0]["line"] == 1 and isinstance(rows[0]["completion"], str)


def test_openai_chat_file_trains_as_it_is(tiny_llama, generation_files, tmp_path, capsys):
    code = main(["train", "--model", tiny_llama, "--data", generation_files["chat"], "--max-steps", "2", "--precision",
                 "fp32", "--no-progress", "--no-report", "--max-length", "96", "--out", str(tmp_path / "o")])
    assert code == 0
    record = json.loads((tmp_path / "o" / "lmtune_run.json").read_text())
    assert record["task"] == "generation" and record["data"]["format"] == "openai-chat"
    capsys.readouterr()
    code = main(["predict", str(tmp_path / "o"), generation_files["test"]])
    assert code == 0 and len(capsys.readouterr().out.strip().splitlines()) == 16


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2", "tiny_gemma3"])
def test_logits_only_from_the_first_target_position(fixture, request):
    """The training loss computes the LM head only from the first position that predicts a completion token, with
    target positions worked out on the host: the same loss and gradients as over every position's logits."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from lmtune.tasks.generation import IGNORE, _pad, batch_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(fixture), dtype=torch.float32)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (3, 20))
    lengths = [20, 20, 16]  # the last row shorter, so right-padded
    spans = [(12, 20), (14, 20), (11, 16)]
    rows = [ids[r, :k].tolist() for r, k in enumerate(lengths)]
    labels = [[IGNORE] * a + row[a:b] for row, (a, b) in zip(rows, spans)]
    enc = SimpleNamespace(input_ids=rows, labels=labels)
    batch = _pad(enc, [0, 1, 2], pad_id=0, device="cpu")
    assert batch.tokens == 56 and batch.first_predictor == 10  # position 10 predicts row 2's first target
    assert batch.target_ids.tolist() == [t for y in labels for t in y if t != IGNORE]
    seen = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: seen.append(kw.get("logits_to_keep")), with_kwargs=True)
    loss = batch_loss(model, batch)
    hook.remove()
    assert seen == [20 - 10]
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    # the plain way: every position's logits, shifted, targets picked with a boolean mask
    full_labels = torch.full_like(ids, IGNORE)
    for r, (a, b) in enumerate(spans):
        full_labels[r, a:b] = ids[r, a:b]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    keep = full_labels[:, 1:] != IGNORE
    full = torch.nn.functional.cross_entropy(logits[keep], full_labels[:, 1:][keep], reduction="sum")
    full.backward()
    assert loss.item() == pytest.approx(full.item(), rel=1e-5)
    for g, p in zip(grads, [p for p in model.parameters() if p.grad is not None]):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("labels", "first_predictor"), [
    ([[-100] * 6 + [7, 8, 9, 10], [-100] * 4 + [5, 6, 7]], 3),  # completions: the position before row 2's first
    ([list(range(1, 11)), [-100] * 4 + [5, 6, 7]], 0),           # --train-on-prompt: a target at position 0
    ([[-100] * 10, [-100] * 4 + [5, 6, 7]], 3),                  # a row without targets does not count
    ([[-100] * 10, [-100] * 7], 6),                              # no target at all: a row's length counts
])
def test_the_plan_counts_the_logit_positions_the_loss_computes(labels, first_predictor):
    """The plan's memory estimate (``logit_positions`` over per-row first targets) and the padded batch
    (``first_predictor``) apply one rule, so the estimate is of the very logits a step computes."""
    from types import SimpleNamespace

    from lmtune.tasks.generation import _pad, first_target, logit_positions

    enc = SimpleNamespace(input_ids=[list(range(1, 11)), list(range(1, 8))], labels=labels)
    batch = _pad(enc, [0, 1], pad_id=0, device="cpu")
    width = batch.input_ids.shape[1]
    assert batch.first_predictor == first_predictor
    assert logit_positions([first_target(y) for y in labels], width) == width - first_predictor


def test_the_loss_reads_nothing_back_from_the_device():
    """On a GPU every read of a device value by the host (``.item()``, ``nonzero``, a boolean-mask gather) waits for
    the device: the loss of a batch must need none beyond the model's own (an H200 profile counted 9 per step in
    the old first-target search and gather). Recorded here as the aten operators the loss and its backward call."""
    from types import SimpleNamespace

    from torch.utils._python_dispatch import TorchDispatchMode

    from lmtune.tasks.generation import IGNORE, _pad, batch_loss

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    class TinyLM(torch.nn.Module):  # a model whose own forward reads nothing back
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(50, 8), torch.nn.Linear(8, 50)

        def forward(self, input_ids, attention_mask, logits_to_keep=0):
            h = self.emb(input_ids) * attention_mask.unsqueeze(-1)
            return SimpleNamespace(logits=self.head(h[:, -logits_to_keep:] if logits_to_keep else h))

    enc = SimpleNamespace(input_ids=[list(range(1, 11)), list(range(1, 8))],
                          labels=[[IGNORE] * 6 + list(range(7, 11)), [IGNORE] * 4 + list(range(5, 8))])
    model = TinyLM()
    batch = _pad(enc, [0, 1], pad_id=0, device="cpu")
    with Recorder() as rec:
        loss = batch_loss(model, batch)
        loss.backward()
    syncing = {"nonzero", "_local_scalar_dense", "masked_select", "is_nonzero", "item"}
    assert rec.ops and not syncing & set(rec.ops), sorted(syncing & set(rec.ops))
    assert batch.first_predictor == 3 and loss.item() > 0


def test_a_loss_objective_search_decodes_only_at_each_trials_final_evaluation(tiny_llama, generation_files, tmp_path, capsys):
    """--eval-generate auto: trials of a val_loss search skip decoding until their last evaluation (the text metrics
    stay in the leaderboard); lmtune train and a text-metric search decode at every evaluation."""
    import optuna

    out = tmp_path / "study"
    args = ["tune", "--model", tiny_llama, "--data", generation_files["train"], "--val-file", generation_files["val"],
            "--n-trials", "1", "--epochs", "2", "--batch-size", "16", "--max-length", "48", "--lr", "1e-3",
            "--confirm-seeds", "0", "--no-report", "--no-default-first"]
    assert main(args + ["--out", str(out)]) == 0
    assert "decodes the validation prompts at its final evaluation only" in capsys.readouterr().out
    meta = json.loads((out / "study.json").read_text())
    history = optuna.load_study(study_name=meta["study_name"], storage=meta["storage"]).trials[0].user_attrs["history"]
    assert len(history) == 4  # two evaluations per epoch
    assert [("rougeL" in h) for h in history] == [False, False, False, True]
    assert all("val_loss" in h for h in history)
    assert main(args + ["--out", str(tmp_path / "rouge"), "--metric", "rougeL"]) == 0
    meta = json.loads((tmp_path / "rouge" / "study.json").read_text())
    history = optuna.load_study(study_name=meta["study_name"], storage=meta["storage"]).trials[0].user_attrs["history"]
    assert all("rougeL" in h for h in history)
    r = lmtune.train(gen_config(tiny_llama, generation_files, tmp_path / "t", epochs=2, eval_every_steps=1))
    assert all("rougeL" in h for h in r.record["history"]) and len(r.record["history"]) >= 2


def test_final_only_decoding_with_a_text_metric_is_refused(tiny_llama, generation_files, tmp_path, capsys):
    code = main(["train", "--model", tiny_llama, "--data", generation_files["train"], "--eval-generate", "final",
                 "--metric", "bleu", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "--eval-generate final" in err and "--metric bleu" in err and "Traceback" not in err


def test_kill9_then_resume_equals_the_uninterrupted_run(tiny_llama, generation_files, tmp_path):
    """ENGINEERING.md §3 row 3 on the generation task: a run killed after a checkpoint and resumed ends with the
    uninterrupted run's evaluations and weights (fp32, same seed)."""
    import os
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    def cmd(out, *extra):
        return [sys.executable, "-m", "lmtune", "train", "--model", tiny_llama, "--data", generation_files["train"],
                "--val-file", generation_files["val"], "--lr", "3e-3", "--batch-size", "16", "--epochs", "2",
                "--eval-every-steps", "4", "--checkpoint-every-steps", "2", "--precision", "fp32", "--max-length", "48",
                "--eval-generate-rows", "0", "--no-progress", "--no-report", "--out", str(out), *extra]

    env = dict(os.environ, OMP_NUM_THREADS="1")
    subprocess.run(cmd(tmp_path / "full"), check=True, capture_output=True, timeout=300, env=env)
    killed = subprocess.run(cmd(tmp_path / "k"), capture_output=True, timeout=300,
                            env=env | {"LMTUNE_FAULT_KILL_AT_STEP": "9"})  # 6 steps an epoch: mid-epoch 2
    assert killed.returncode == -signal.SIGKILL and not (tmp_path / "k" / "lmtune_run.json").exists()
    resumed = subprocess.run(cmd(tmp_path / "k", "--resume"), capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout

    def history(folder):
        return [{k: h[k] for k in ("step", "train_loss", "val_loss")}
                for h in json.loads((folder / "lmtune_run.json").read_text())["history"]]

    assert history(tmp_path / "k") == history(tmp_path / "full")
    a, b = load_file(str(tmp_path / "k" / "model.safetensors")), load_file(str(tmp_path / "full" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
