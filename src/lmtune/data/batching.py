"""Tokenised data, length-grouped batches and padding.

Knows tokenizers and torch, not models: ``lmtune.train`` builds a ``DataLoader(encoded,
batch_sampler=LengthGroupedSampler(...), collate_fn=partial(collate, pad_token_id=...))``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmtune._io import atomic_save_npz
from lmtune.data.reading import Table

__all__ = ["Encoded", "encode", "LengthGroupedSampler", "collate", "restore_order", "tokenizer_fingerprint"]

_CACHE_VERSION = 1
_CHUNK = 2048  # rows per tokenizer call: large enough for the fast tokenizer's threads, bounded memory


@dataclass
class Encoded:
    """Token ids per row (unpadded), class ids and how many rows were cut at ``max_length``.

    A map-style dataset: ``encoded[i] == (input_ids[i], labels[i] or None)``, the item :func:`collate` takes.
    """

    input_ids: list[list[int]]
    labels: list[int] | None
    lengths: list[int]
    truncated: int

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[list[int], int | None]:
        return self.input_ids[i], None if self.labels is None else self.labels[i]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what decides a tokenizer's output: name, vocabulary, special tokens, truncation side."""
    h = hashlib.sha256()
    parts = {
        "class": type(tokenizer).__name__,
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "special": sorted(map(str, getattr(tokenizer, "all_special_tokens", []))),
        "special_ids": sorted(map(int, getattr(tokenizer, "all_special_ids", []))),
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),
    }
    h.update(json.dumps(parts, sort_keys=True).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Two local tokenizers can share a name and size; the serialised pipeline tells them apart. The
        # truncation/padding state is dropped: it changes with each call, not the tokens of a text.
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
        h.update(json.dumps(state, sort_keys=True).encode())
    return h.hexdigest()


def _cache_key(tokenizer: Any, table: Table, label_ids: Sequence[int] | None, max_length: int) -> str:
    h = hashlib.sha256()
    h.update(f"lmtune-encode-v{_CACHE_VERSION}|{tokenizer_fingerprint(tokenizer)}|{max_length}|".encode())
    for name, seq in (("texts", table.texts), ("pairs", table.text_pairs)):
        if seq is None:
            h.update(f"{name}:none|".encode())
            continue
        h.update(f"{name}:{len(seq)}|".encode())
        for s in seq:
            b = s.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))  # length-prefixed: ["ab","c"] != ["a","bc"]
            h.update(b)
    h.update(b"labels:" + (b"none" if label_ids is None else np.asarray(label_ids, dtype=np.int64).tobytes()))
    return h.hexdigest()


def _tokenize(
    tokenizer: Any, texts: list[str], pairs: list[str] | None, max_length: int
) -> tuple[list[list[int]], int]:
    ids: list[list[int]] = []
    truncated = 0
    for start in range(0, len(texts), _CHUNK):
        t = texts[start : start + _CHUNK]
        p = None if pairs is None else pairs[start : start + _CHUNK]
        # First without truncation, to count the rows that are too long (the report shows the rate);
        # verbose=False silences the "longer than model_max_length" log for those rows.
        out = tokenizer(t, text_pair=p, truncation=False, verbose=False)["input_ids"]
        long = [i for i, x in enumerate(out) if len(x) > max_length]
        if long:
            truncated += len(long)
            # Re-tokenise only the long rows with truncation: the tokenizer then applies its own rules
            # (truncation side, longest-first for pairs, special tokens kept).
            cut = tokenizer(
                [t[i] for i in long],
                text_pair=None if p is None else [p[i] for i in long],
                truncation=True,
                max_length=max_length,
                verbose=False,
            )["input_ids"]
            for i, x in zip(long, cut):
                out[i] = x
        ids.extend(list(map(int, x)) for x in out)
    return ids, truncated


def _save(path: str, enc: Encoded) -> None:
    lengths = np.asarray(enc.lengths, dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter((t for row in enc.input_ids for t in row), dtype=np.int64, count=int(offsets[-1]))
    labels = np.asarray([] if enc.labels is None else enc.labels, dtype=np.int64)
    # readers see the old file or the whole new one, never half of it
    atomic_save_npz(path, ids=flat, offsets=offsets, labels=labels, has_labels=np.asarray(enc.labels is not None),
                    truncated=np.asarray(enc.truncated, dtype=np.int64))


def _load(path: str, n_rows: int) -> Encoded | None:
    try:
        with np.load(path, allow_pickle=False) as z:  # no pickle: a cache file is never code
            flat, offsets, labels = z["ids"], z["offsets"], z["labels"]
            has_labels, truncated = bool(z["has_labels"]), int(z["truncated"])
        if len(offsets) != n_rows + 1 or offsets[-1] != len(flat) or (has_labels and len(labels) != n_rows):
            return None
        flat_l = flat.tolist()
        off = offsets.tolist()
        ids = [flat_l[off[i] : off[i + 1]] for i in range(n_rows)]
        return Encoded(ids, labels.tolist() if has_labels else None, np.diff(offsets).tolist(), truncated)
    except Exception:  # truncated, corrupt or foreign file: treat as a miss and rewrite it
        return None


def encode(
    tokenizer: Any, table: Table, label_ids: Sequence[int] | None, max_length: int, cache_dir: str | None = None
) -> Encoded:
    """Tokenise ``table`` (texts and pairs), cutting rows at ``max_length`` tokens.

    Special tokens follow the tokenizer's defaults; nothing is appended here (GPT-style tokenizers add
    no BOS/EOS, and the classifier reads the last real token). With ``cache_dir`` the result is cached
    on disk, keyed by the tokenizer, ``max_length``, the texts and the labels, so trials reuse it.
    """
    if label_ids is not None and len(label_ids) != len(table):
        raise ValueError(f"{len(label_ids)} labels for {len(table)} rows")
    path = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        path = os.path.join(cache_dir, f"encoded-{_cache_key(tokenizer, table, label_ids, max_length)[:32]}.npz")
        if os.path.exists(path):
            hit = _load(path, len(table))
            if hit is not None:
                return hit
    pairs = None if table.text_pairs is None else list(table.text_pairs)
    ids, truncated = _tokenize(tokenizer, list(table.texts), pairs, max_length)
    enc = Encoded(ids, None if label_ids is None else [int(y) for y in label_ids], [len(x) for x in ids], truncated)
    if path is not None:
        _save(path, enc)
    return enc


class LengthGroupedSampler(torch.utils.data.Sampler[list[int]]):
    """A batch sampler that puts rows of similar length together, so little compute goes to padding.

    Training (``shuffle=True``): shuffle, cut into mega-batches of ``batch_size * mega_batch_factor``,
    sort each by length, cut into batches and shuffle the batches; the longest batch goes first so an
    out-of-memory error shows at once. Deterministic for ``(seed, epoch)``; :meth:`batches` gives one
    epoch's batches so a resumed run can skip the ones already done.

    Evaluation (``shuffle=False``): sorted by length, longest first; the batches hold original indices,
    and :func:`restore_order` puts per-row results back in file order.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        group_by_length: bool = True,
        drop_last: bool = False,
        mega_batch_factor: int = 50,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if mega_batch_factor < 1:
            raise ValueError(f"mega_batch_factor must be >= 1, got {mega_batch_factor}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.group_by_length = group_by_length
        self.drop_last = drop_last
        self.mega_batch_factor = mega_batch_factor
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches(self.epoch)

    def _cut(self, order: np.ndarray) -> list[list[int]]:
        return [order[i : i + self.batch_size].tolist() for i in range(0, len(order), self.batch_size)]

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """All batches of ``epoch`` (default: the current one), in the order they are yielded."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.lengths)
        lengths = self.lengths
        if not self.shuffle:
            order = np.argsort(-lengths, kind="stable") if self.group_by_length else np.arange(n)
            out = self._cut(order)
            return out[: len(self)]
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(n)
        if not self.group_by_length:
            out = self._cut(perm)
            return out[: len(self)]
        mega = self.batch_size * self.mega_batch_factor
        out = []
        for s in range(0, n, mega):
            chunk = perm[s : s + mega]
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
            out.extend(self._cut(chunk))
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()  # only the last mega-batch can leave a short batch: a mega-batch is whole batches
        if not out:
            return out
        longest = max(range(len(out)), key=lambda i: (int(lengths[out[i]].max()), -i))
        first = out.pop(longest)
        rest = [out[i] for i in rng.permutation(len(out))]
        return [first, *rest]


def restore_order(values: Sequence[Any], batches: Sequence[Sequence[int]]) -> list[Any]:
    """Per-row ``values`` given in batch order -> the rows' original order."""
    flat = [i for b in batches for i in b]
    if len(flat) != len(values):
        raise ValueError(f"{len(values)} values for {len(flat)} batched rows")
    out: list[Any] = [None] * (max(flat) + 1 if flat else 0)
    for i, v in zip(flat, values):
        out[i] = v
    return out


def collate(
    batch_items: Sequence[tuple[Sequence[int], int | None]],
    pad_token_id: int,
    padding_side: str = "right",
    pad_to_multiple_of: int | None = 8,
) -> dict[str, torch.Tensor]:
    """Pad a batch to its longest row, rounded up to ``pad_to_multiple_of`` (tensor cores like multiples of 8)."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    if not batch_items:
        raise ValueError("empty batch")
    width = max(len(ids) for ids, _ in batch_items)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch_items), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(batch_items), width), dtype=torch.long)
    for r, (ids, _) in enumerate(batch_items):
        k = len(ids)
        if k == 0:
            continue
        sl = slice(0, k) if padding_side == "right" else slice(width - k, width)
        input_ids[r, sl] = torch.as_tensor(ids, dtype=torch.long)
        mask[r, sl] = 1
    out = {"input_ids": input_ids, "attention_mask": mask}
    labels = [y for _, y in batch_items]
    if all(y is not None for y in labels):
        out["labels"] = torch.tensor(labels, dtype=torch.long)
    elif any(y is not None for y in labels):
        raise ValueError("some rows of the batch have labels and some do not")
    return out
