"""encode (with its disk cache), LengthGroupedSampler and collate."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

from lmtune.data import Encoded, LengthGroupedSampler, Table, collate, encode, restore_order


def _table(texts, pairs=None) -> Table:
    return Table("mem.csv", list(texts), pairs, None, list(range(2, len(texts) + 2)), "text", None, None, {})


TEXTS = ["the movie was great and the actors were great", "i loved it", "a dull and boring film", "free prize"]

# ---------------------------------------------------------------------------------------------- encode


def test_encode_truncates_and_counts(tiny_tokenizer):
    enc = encode(tiny_tokenizer, _table(TEXTS), [1, 1, 0, 0], max_length=4)
    full = tiny_tokenizer(TEXTS)["input_ids"]
    assert enc.input_ids == [x[:4] for x in full]
    assert enc.truncated == sum(len(x) > 4 for x in full) == 2
    assert enc.lengths == [len(x) for x in enc.input_ids] and enc.labels == [1, 1, 0, 0]
    assert len(enc) == 4 and enc[2] == (enc.input_ids[2], 0)


def test_encode_adds_no_special_tokens_of_its_own(tiny_tokenizer):
    enc = encode(tiny_tokenizer, _table(["i loved it"]), None, max_length=32)
    assert enc.input_ids == [tiny_tokenizer("i loved it")["input_ids"]] and enc.labels is None and enc[0][1] is None


def test_encode_pairs(tiny_tokenizer):
    t = _table(["i loved it", "the movie was great and the actors were great"], pairs=["a dull film", "free prize"])
    enc = encode(tiny_tokenizer, t, None, max_length=6)
    assert enc.input_ids[0] == tiny_tokenizer("i loved it", "a dull film")["input_ids"]
    assert len(enc.input_ids[1]) == 6 and enc.truncated == 1


def test_encode_left_truncation_follows_tokenizer(tiny_tokenizer):
    tok = tiny_tokenizer
    old = tok.truncation_side
    tok.truncation_side = "left"
    try:
        enc = encode(tok, _table(TEXTS[:1]), None, max_length=3)
        assert enc.input_ids[0] == tok(TEXTS[0])["input_ids"][-3:]
    finally:
        tok.truncation_side = old


def test_encode_cache_hit_miss_and_corruption(tiny_tokenizer, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    t = _table(TEXTS)
    first = encode(tiny_tokenizer, t, [0, 1, 0, 1], 4, cache_dir=cache)
    files = os.listdir(cache)
    assert len(files) == 1 and files[0].endswith(".npz")

    calls = []
    real = type(tiny_tokenizer).__call__
    monkeypatch.setattr(type(tiny_tokenizer), "__call__", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    hit = encode(tiny_tokenizer, t, [0, 1, 0, 1], 4, cache_dir=cache)
    assert hit == first and calls == []  # served from disk, tokenizer not called

    # Anything in the key changes the file: labels, max_length, text content.
    encode(tiny_tokenizer, t, [1, 1, 0, 1], 4, cache_dir=cache)
    encode(tiny_tokenizer, t, [0, 1, 0, 1], 5, cache_dir=cache)
    encode(tiny_tokenizer, _table(TEXTS[:3] + ["free  prize!"]), [0, 1, 0, 1], 4, cache_dir=cache)
    assert len(os.listdir(cache)) == 4 and calls

    # A corrupt file is a miss, then rewritten whole.
    path = os.path.join(cache, files[0])
    with open(path, "r+b") as f:
        f.truncate(20)
    again = encode(tiny_tokenizer, t, [0, 1, 0, 1], 4, cache_dir=cache)
    assert again == first and os.path.getsize(path) > 20
    assert not [f for f in os.listdir(cache) if f.startswith(".tmp")]


def test_encode_cache_key_depends_on_tokenizer(tiny_tokenizer, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    other = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    other.pre_tokenizer = pre_tokenizers.Whitespace()
    other.train_from_iterator(["great film i loved it free prize"], trainers.WordLevelTrainer(special_tokens=["[UNK]", "[PAD]"]))
    other = PreTrainedTokenizerFast(tokenizer_object=other, pad_token="[PAD]", unk_token="[UNK]")
    cache = str(tmp_path)
    a = encode(tiny_tokenizer, _table(TEXTS), None, 16, cache_dir=cache)
    b = encode(other, _table(TEXTS), None, 16, cache_dir=cache)
    assert a.input_ids != b.input_ids and len(os.listdir(cache)) == 2


# ---------------------------------------------------------------------------------------------- sampler

LENGTHS = [(i * 37) % 101 + 1 for i in range(1000)]


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("drop_last", [True, False])
def test_sampler_covers_every_index_once_and_is_deterministic(group, drop_last):
    s = LengthGroupedSampler(LENGTHS, 32, seed=1, group_by_length=group, drop_last=drop_last, mega_batch_factor=4)
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert len(batches) == len(s)
    if drop_last:
        assert all(len(b) == 32 for b in batches) and len(flat) == 992 and len(set(flat)) == 992
    else:
        assert sorted(flat) == list(range(1000))
    assert s.batches(0) == batches == LengthGroupedSampler(
        LENGTHS, 32, seed=1, group_by_length=group, drop_last=drop_last, mega_batch_factor=4
    ).batches(0)
    s.set_epoch(1)
    assert list(s) == s.batches(1) != batches
    assert LengthGroupedSampler(LENGTHS, 32, seed=2, group_by_length=group, drop_last=drop_last).batches(0) != batches


def test_sampler_groups_lengths_and_puts_longest_first():
    s = LengthGroupedSampler(LENGTHS, 16, seed=0, mega_batch_factor=8)
    batches = s.batches(0)
    pad = lambda bs: sum(max(LENGTHS[i] for i in b) * len(b) for b in bs)  # noqa: E731
    plain = LengthGroupedSampler(LENGTHS, 16, seed=0, group_by_length=False).batches(0)
    assert pad(batches) < 0.8 * pad(plain)
    assert max(LENGTHS[i] for i in batches[0]) == max(LENGTHS)


def test_sampler_resume_skips_batches():
    s = LengthGroupedSampler(LENGTHS, 10, seed=3)
    s.set_epoch(2)
    full = list(s)
    assert s.batches(2)[5:] == full[5:]


def test_eval_sampler_sorted_and_restorable():
    s = LengthGroupedSampler(LENGTHS, 64, shuffle=False)
    batches = list(s)
    flat = [i for b in batches for i in b]
    assert [LENGTHS[i] for i in flat] == sorted(LENGTHS, reverse=True) and sorted(flat) == list(range(1000))
    assert restore_order([LENGTHS[i] for i in flat], batches) == LENGTHS
    seq = LengthGroupedSampler(LENGTHS, 64, shuffle=False, group_by_length=False)
    assert [i for b in seq for i in b] == list(range(1000))


def test_sampler_small_and_empty():
    assert list(LengthGroupedSampler([3, 1, 2], 8)) == [[0, 2, 1]]
    assert list(LengthGroupedSampler([], 8)) == [] and len(LengthGroupedSampler([], 8)) == 0
    assert list(LengthGroupedSampler([1, 2, 3], 8, drop_last=True)) == []


def test_sampler_with_dataloader(tiny_tokenizer):
    from functools import partial

    enc = encode(tiny_tokenizer, _table(TEXTS * 5), [0, 1, 0, 1] * 5, 32)
    dl = torch.utils.data.DataLoader(
        enc, batch_sampler=LengthGroupedSampler(enc.lengths, 4, seed=0), collate_fn=partial(collate, pad_token_id=1)
    )
    batches = list(dl)
    assert len(batches) == 5 and sum(b["labels"].numel() for b in batches) == 20
    assert Counter(int(x) for b in batches for x in b["labels"]) == {0: 10, 1: 10}


# ---------------------------------------------------------------------------------------------- collate


def test_collate_right_padding_to_multiple_of_8():
    out = collate([([5, 6, 7], 1), ([8], 0)], pad_token_id=0)
    assert out["input_ids"].shape == (2, 8) and out["input_ids"].dtype == torch.long
    assert out["input_ids"][0, :3].tolist() == [5, 6, 7] and out["input_ids"][1].tolist() == [8] + [0] * 7
    assert out["attention_mask"].tolist() == [[1, 1, 1] + [0] * 5, [1] + [0] * 7]
    assert out["attention_mask"].dtype == torch.long and out["labels"].tolist() == [1, 0]


def test_collate_left_padding_and_exact_width():
    out = collate([([5, 6, 7], None), ([8], None)], pad_token_id=9, padding_side="left", pad_to_multiple_of=None)
    assert out["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]] and "labels" not in out


def test_collate_width_rounds_up_only_when_needed():
    assert collate([(list(range(16)), 0)], pad_token_id=0)["input_ids"].shape == (1, 16)
    assert collate([(list(range(17)), 0)], pad_token_id=0)["input_ids"].shape == (1, 24)


def test_collate_errors():
    with pytest.raises(ValueError):
        collate([([1], 0), ([2], None)], pad_token_id=0)
    with pytest.raises(ValueError):
        collate([([1], 0)], pad_token_id=0, padding_side="middle")


def test_encoded_equality_roundtrip():
    e = Encoded([[1, 2], [3]], [0, 1], [2, 1], 0)
    assert e == Encoded([[1, 2], [3]], [0, 1], [2, 1], 0) and e[1] == ([3], 1)
