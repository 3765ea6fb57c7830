"""Model sources: the GGUF conversion's reader sharing (the conversion itself runs on the real offline models in
tests/test_real_model.py)."""

from __future__ import annotations

import gguf

from lmtune.models.source import _one_gguf_reader


def test_the_conversion_parses_each_gguf_file_once_and_restores_the_reader(monkeypatch, tmp_path):
    parsed = []

    class CountingReader:
        def __init__(self, path, mode="r"):
            parsed.append((str(path), mode))

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    (tmp_path / "link.gguf").symlink_to(a)
    with _one_gguf_reader():
        # What transformers does: ``from gguf import GGUFReader`` inside each loader, then GGUFReader(path).
        from gguf import GGUFReader
        tokenizer_reader, config_reader = GGUFReader(str(a)), GGUFReader(a)
        weights_reader = GGUFReader(str(tmp_path / "link.gguf"))
        other = GGUFReader(str(b))
    assert tokenizer_reader is config_reader is weights_reader and other is not tokenizer_reader
    assert parsed == [(str(a), "r"), (str(b), "r")]
    assert gguf.GGUFReader is CountingReader  # nothing left patched after the conversion
    gguf.GGUFReader(str(a))
    assert len(parsed) == 3  # outside the conversion every call parses again
