"""Fixtures for the data tests: file writers and a tiny offline tokenizer."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

try:
    import lmtune  # noqa: F401
except ImportError:  # not installed (no `pip install -e .`): run from the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., str]:
    """``write("a.csv", "text,label\\n...")`` -> path; ``bytes`` are written as is."""

    def _write(name: str, content: str | bytes) -> str:
        p = tmp_path / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        else:
            p.write_text(content, encoding="utf-8", newline="")
        return str(p)

    return _write


_CORPUS = [
    "the movie was great and the actors were great",
    "a dull and boring film",
    "i loved it",
    "what a waste of time",
    "free prize call now",
    "see you at the station later",
]


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer trained in memory, wrapped like any transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(_CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]")
