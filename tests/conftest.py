"""Shared fixtures: tiny random causal LMs with an offline tokenizer, and small learnable data sets.

Everything here is built in the test session (no network): a byte-level BPE tokenizer trained on a
few sentences, and 2-layer, width-32 Llama / GPT-2 models saved as transformers folders.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

POSITIVE = ["good", "great", "fine", "lovely", "superb", "happy", "nice", "brilliant"]
NEGATIVE = ["bad", "awful", "poor", "sad", "boring", "terrible", "ugly", "dull"]
FILLER = ["the", "film", "was", "really", "quite", "a", "story", "and", "plot", "acting", "very", "it", "is", "so"]


def make_sentence(rng: random.Random, label: str) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 9))]
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label == "pos" else NEGATIVE))
    return " ".join(words)


def write_sentiment(path: Path, n: int, seed: int = 0, fmt: str = "tsv", labels=("neg", "pos")) -> Path:
    """A data set a tiny model can learn in a few steps: the label is the polarity of one word."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        rows.append((make_sentence(rng, "pos" if label == labels[-1] else "neg"), label))
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "tsv":
        path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{lab}\n" for t, lab in rows))
    elif fmt == "csv":
        path.write_text("text,label\n" + "".join(f"{t},{lab}\n" for t, lab in rows))
    elif fmt == "jsonl":
        import json
        path.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in rows))
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.table({"text": [r[0] for r in rows], "label": [r[1] for r in rows]}), path)
    return path


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(0)
    corpus = [make_sentence(rng, rng.choice(["pos", "neg"])) for _ in range(400)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    # GPT-style: an EOS token and no pad token, so lmtune's pad-token set-up is exercised.
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def build_tiny_model(folder: Path, arch: str = "llama") -> Path:
    import torch
    from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM)

    tok = build_tokenizer()
    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                          eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=None)
        model = LlamaForCausalLM(cfg)
    elif arch == "gemma3":
        # Gemma 3's traits at toy size: tied input/output embeddings, a 4-token sliding window on two of three
        # layers (test sequences are longer), query/key norms, embeddings scaled by sqrt(hidden), no chat template.
        cfg = Gemma3TextConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=4,
                               layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                               max_position_embeddings=256, tie_word_embeddings=True,
                               eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=None)
        model = Gemma3ForCausalLM(cfg)
    else:
        cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        model = GPT2LMHeadModel(cfg)
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama"))


@pytest.fixture(scope="session")
def tiny_gemma3(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-gemma3"), "gemma3"))


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2"))


def write_sentiment_splits(root: Path, n_train: int) -> dict[str, str]:
    """train/val/test TSVs (val and test 40 rows each) with disjoint seeds."""
    return {"train": str(write_sentiment(root / "train.tsv", n_train, seed=1)),
            "val": str(write_sentiment(root / "val.tsv", 40, seed=2)),
            "test": str(write_sentiment(root / "test.tsv", 40, seed=3))}


@pytest.fixture(scope="session")
def sentiment_files(tmp_path_factory) -> dict[str, str]:
    return write_sentiment_splits(tmp_path_factory.mktemp("sentiment"), 160)


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread (and the CI box has two cores shared with other jobs); a module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def _session_threads() -> int:
    import torch

    return torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_restored(_session_threads):
    """Every test starts with the session's torch thread count. A test or fixture that sets one thread for a tiny
    model and does not set it back left the real-model tests that ran after it on one of the two cores (CI
    trained SmolLM2 single-threaded, twice as long)."""
    import torch

    torch.set_num_threads(_session_threads)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own lmtune cache, so tests never touch ~/.cache/lmtune."""
    cache = tmp_path_factory.getbasetemp() / "lmtune-cache"
    monkeypatch.setenv("LMTUNE_CACHE", str(cache))


def shared_data_dir() -> Path | None:
    env = os.environ.get("LMTUNE_DATA_DIR")
    candidates = [Path(env)] if env else []
    candidates.append(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None
