"""Seeded, stratified validation splits and row samples."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lmtune.data.labels import LabelMap
from lmtune.data.reading import Table, multiline_warning, read_table
from lmtune.errors import DataError, LabelError

if TYPE_CHECKING:
    from lmtune.config import DataConfig

__all__ = ["stratified_split", "stratified_sample", "DataBundle", "load_data"]


def _by_class(labels: Sequence[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        groups[y].append(i)
    return dict(sorted(groups.items()))


def _allocate(sizes: dict[int, int], n: int, *, min_one: bool, max_leave: int) -> dict[int, int]:
    """Split ``n`` over classes in proportion to ``sizes`` (largest remainders).

    ``min_one``: give each class at least one when ``n`` allows; ``max_leave``: leave at least this many
    rows of each class unallocated (so a held-out class still has training rows).
    """
    total = sum(sizes.values())
    caps = {c: max(0, s - max_leave) for c, s in sizes.items()}
    exact = {c: n * s / total for c, s in sizes.items()}
    alloc = {c: min(caps[c], int(exact[c])) for c in sizes}
    if min_one and n >= sum(1 for c in sizes if caps[c] > 0):
        for c in sizes:
            if caps[c] > 0 and alloc[c] == 0:
                alloc[c] = 1
    # Hand out what is left by largest remainder, then take back from the largest classes if over.
    order = sorted(sizes, key=lambda c: (-(exact[c] - int(exact[c])), c))
    while sum(alloc.values()) < n and any(alloc[c] < caps[c] for c in sizes):
        for c in order:
            if sum(alloc.values()) >= n:
                break
            if alloc[c] < caps[c]:
                alloc[c] += 1
    while sum(alloc.values()) > n:
        c = max(sizes, key=lambda c: (alloc[c], c))
        alloc[c] -= 1
    return alloc


def _manual_pick(labels: Sequence[int], alloc: dict[int, int], seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for c, idx in _by_class(labels).items():
        k = alloc.get(c, 0)
        if k:
            picked.extend(int(i) for i in rng.choice(np.asarray(idx), size=k, replace=False))
    return sorted(picked)


def _ensure_every_class(labels: Sequence[int], pool: list[int], held: list[int], seed: int) -> list[int]:
    """sklearn may round a small class to zero rows on one side; swap a row in for each such class.

    Each swap is paired with one in the other direction from the class with the most rows on that
    side, so both sizes stay as asked.
    """
    rng = np.random.default_rng(seed)
    held_set = set(held)
    for c, idx in _by_class([labels[i] for i in pool]).items():
        rows = [pool[j] for j in idx]
        for side_has, src_is_held in ((lambda r: r in held_set, False), (lambda r: r not in held_set, True)):
            if any(side_has(r) for r in rows):
                continue
            # Class c is missing on one side: move one of its rows over, and one row of the donor
            # class (most rows on that side, >= 2 there) back.
            side = [i for i in pool if side_has(i)]
            by = _by_class([labels[i] for i in side])
            donor = max(by, key=lambda k: (len(by[k]), -k), default=None)
            if donor is None or len(by[donor]) < 2:
                continue
            back = side[by[donor][int(rng.integers(len(by[donor])))]]
            take = int(rng.choice(np.asarray(rows)))
            if src_is_held:  # c has no training row: take is held, move it to keep
                held_set.discard(take)
                held_set.add(back)
            else:
                held_set.add(take)
                held_set.discard(back)
    return sorted(held_set)


def stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """``(keep_idx, held_out_idx)``: a seeded, stratified split holding out about ``fraction`` of the rows.

    Classes with a single row stay in ``keep`` (a held-out row of a class never trained on tells
    nothing). Every class with >= 2 rows appears on both sides whenever the held-out size allows.
    Both lists are sorted, so the file's row order is kept.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"the validation fraction must be between 0 and 1, got {fraction}")
    n = len(labels)
    groups = _by_class(labels)
    singles = [idx[0] for idx in groups.values() if len(idx) == 1]
    multi = {c: idx for c, idx in groups.items() if len(idx) >= 2}
    pool = sorted(i for idx in multi.values() for i in idx)
    if not pool:
        raise DataError(f"cannot hold out a validation set: no class has 2 or more of the {n} rows")
    n_held = max(1, round(fraction * n))
    n_held = min(n_held, len(pool) - len(multi))  # leave >= 1 row of each class for training
    if n_held < 1:
        raise DataError(f"cannot hold out a validation set from {n} rows")
    held: list[int]
    if n_held >= len(multi) and len(pool) - n_held >= len(multi):
        from sklearn.model_selection import train_test_split

        pool_labels = [labels[i] for i in pool]
        _, held_arr = train_test_split(pool, test_size=n_held, stratify=pool_labels, random_state=seed)
        held = _ensure_every_class(labels, pool, [int(i) for i in held_arr], seed)
    else:
        # Too few rows to give every class a validation row: a proportional pick that still keeps a
        # training row of every class.
        alloc = _allocate({c: len(idx) for c, idx in multi.items()}, n_held, min_one=False, max_leave=1)
        held = _manual_pick(labels, alloc, seed)
    held_set = set(held)
    keep = sorted([i for i in pool if i not in held_set] + singles)
    return keep, held


def stratified_sample(labels: Sequence[int], n: int, seed: int) -> list[int]:
    """Sorted indices of a seeded, stratified sample of ``n`` rows (all rows when ``n >= len(labels)``).

    Class proportions are kept; every class gets at least one row when ``n`` is at least the number of
    classes, so sampling never removes a class.
    """
    if n >= len(labels):
        return list(range(len(labels)))
    if n < 1:
        raise DataError(f"a sample needs at least 1 row, got {n}")
    sizes = dict(Counter(labels))
    alloc = _allocate(sizes, n, min_one=True, max_leave=0)
    return _manual_pick(labels, alloc, seed)


# ---------------------------------------------------------------------------------------------- loading
# load_data lives here because it is mostly splitting and sampling; lmtune.data re-exports it.


@dataclass
class DataBundle:
    """Training and validation rows, their class ids and a JSON-ready summary of what was read."""

    train: Table
    val: Table
    label_map: LabelMap
    train_ids: list[int]
    val_ids: list[int]
    summary: dict[str, Any]


def _counts(labels: Sequence[str], label_map: LabelMap) -> dict[str, int]:
    c = Counter(labels)
    return {name: c.get(name, 0) for name in label_map.labels}


def _skip_warnings(t: Table) -> list[str]:
    """Rows of ``t``'s file that are not one row per line: skipped ones, and records spanning lines."""
    warnings = [
        f"{t.path}: skipped {n} {'row' if n == 1 else 'rows'} ({why.replace('_', ' ')})"
        for why, n in sorted(t.skipped.items())
        if n
    ]
    spans = multiline_warning(t)
    return warnings + ([spans] if spans else [])


def load_data(cfg: DataConfig) -> DataBundle:
    """Read, check, label-encode, split and sample the data a run trains and validates on.

    The label map comes from the whole training file (before sampling), so ``--max-train-rows`` never
    changes the classifier's classes. The validation split is made before sampling, so runs that differ
    only in ``--max-train-rows`` validate on the same rows.
    """
    if not cfg.train_file:
        raise DataError("no training data: pass --train-file (or --data)")
    opts = dict(empty_text=cfg.empty_text, missing_label=cfg.missing_label, require_labels=True)
    full = read_table(
        cfg.train_file,
        text_column=cfg.text_column,
        text_pair_column=cfg.text_pair_column,
        label_column=cfg.label_column,
        **opts,  # type: ignore[arg-type]
    )
    assert full.labels is not None  # require_labels=True
    warnings = _skip_warnings(full)
    label_map = LabelMap.from_labels(full.labels)
    if len(label_map) < 2:
        only = label_map.labels[0] if label_map.labels else ""
        raise LabelError(f"only one class ('{only}') in {full.path}; a classifier needs at least 2")
    singles = [name for name, n in Counter(full.labels).items() if n == 1]
    if singles:
        shown = sorted(singles)[:10]
        warnings.append(
            f"{full.path}: {len(singles)} {'class has' if len(singles) == 1 else 'classes have'} a single example "
            f"({', '.join(repr(s) for s in shown)}{', ...' if len(singles) > 10 else ''}); "
            "it stays in training and is not validated"
        )
    full_ids = label_map.encode(full.labels, path=full.path, line_numbers=full.line_numbers)

    if cfg.val_file:
        val = read_table(
            cfg.val_file,
            # "Same layout": the columns found in the training file, unless named explicitly.
            text_column=cfg.text_column or full.text_column,
            text_pair_column=cfg.text_pair_column or full.text_pair_column,
            label_column=cfg.label_column or full.label_column,
            **opts,  # type: ignore[arg-type]
        )
        if val.text_pair_column != full.text_pair_column:
            raise DataError(
                f"{val.path}: has text pair column '{val.text_pair_column}' but {full.path} has "
                f"'{full.text_pair_column}'; name it with --text-pair-column"
            )
        assert val.labels is not None
        warnings += _skip_warnings(val)
        val_ids = label_map.encode(val.labels, path=val.path, line_numbers=val.line_numbers)
        train, train_ids = full, full_ids
        val_source = "file"
    else:
        keep, held = stratified_split(full_ids, cfg.val_fraction, cfg.split_seed)
        train, val = full.subset(keep), full.subset(held)
        train_ids, val_ids = [full_ids[i] for i in keep], [full_ids[i] for i in held]
        val_source = "split"
    rows_read = {"train": len(full), "val": len(val) if val_source == "file" else None}

    rows_before_sampling = {"train": len(train), "val": len(val)}
    if cfg.max_train_rows is not None and cfg.max_train_rows < len(train):
        idx = stratified_sample(train_ids, cfg.max_train_rows, cfg.split_seed)
        train, train_ids = train.subset(idx), [train_ids[i] for i in idx]
    if cfg.max_val_rows is not None and cfg.max_val_rows < len(val):
        idx = stratified_sample(val_ids, cfg.max_val_rows, cfg.split_seed)
        val, val_ids = val.subset(idx), [val_ids[i] for i in idx]

    assert train.labels is not None and val.labels is not None
    counts = {"train": _counts(train.labels, label_map), "val": _counts(val.labels, label_map)}
    untrained = [k for k, v in counts["train"].items() if v == 0]
    if untrained:
        warnings.append(f"{len(untrained)} classes have no training rows after sampling: {untrained[:10]}")
    unvalidated = [k for k, v in counts["val"].items() if v == 0]
    if unvalidated and not singles:
        warnings.append(f"{len(unvalidated)} classes have no validation rows: {unvalidated[:10]}")
    elif unvalidated and set(unvalidated) - set(singles):
        rest = sorted(set(unvalidated) - set(singles))
        warnings.append(f"{len(rest)} classes have no validation rows: {rest[:10]}")

    summary: dict[str, Any] = {
        "train_file": full.path,
        "val_file": val.path if val_source == "file" else None,
        "val_source": val_source,
        "rows": {"train": len(train), "val": len(val)},
        "rows_read": rows_read,
        "rows_before_sampling": rows_before_sampling,
        "skipped": {"train": dict(full.skipped), "val": dict(val.skipped) if val_source == "file" else {}},
        "class_counts": counts,
        "num_labels": len(label_map),
        "text_column": full.text_column,
        "text_pair_column": full.text_pair_column,
        "label_column": full.label_column,
        "warnings": warnings,
    }
    return DataBundle(train, val, label_map, train_ids, val_ids, summary)
