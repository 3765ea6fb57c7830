"""Label names <-> class ids."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from lmtune.errors import LabelError

__all__ = ["LabelMap"]

_INT = re.compile(r"[+-]?\d+")
_SHOW_UNKNOWN = 10
_SHOW_KNOWN = 50


class LabelMap:
    """An ordered list of label names; a name's position is its class id.

    Integer labels ("0", "1", "10") are ordered numerically so "1" keeps id 1 where it can; other labels
    are sorted as strings so the map does not depend on row order.
    """

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels: list[str] = [str(x) for x in labels]
        if len(set(self.labels)) != len(self.labels):
            raise LabelError(f"duplicate label names in {self.labels}")
        self._index = {name: i for i, name in enumerate(self.labels)}

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> LabelMap:
        distinct = set(labels)
        if distinct and all(_INT.fullmatch(x) for x in distinct):
            ordered = sorted(distinct, key=lambda x: (int(x), x))
        else:
            ordered = sorted(distinct)
        return cls(ordered)

    def __len__(self) -> int:
        return len(self.labels)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LabelMap) and other.labels == self.labels

    def __repr__(self) -> str:
        return f"LabelMap({self.labels!r})"

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.labels))

    @property
    def label2id(self) -> dict[str, int]:
        return dict(self._index)

    def encode(self, labels: Sequence[str], *, path: str = "", line_numbers: Sequence[int] | None = None) -> list[int]:
        """Class ids of ``labels``; labels not in the map raise one :class:`LabelError` listing them."""
        index = self._index
        try:
            return [index[x] for x in labels]
        except KeyError:
            pass
        unknown: dict[str, int] = {}  # label -> first position, in order of appearance
        for i, x in enumerate(labels):
            if x not in index and x not in unknown:
                unknown[x] = i
        shown = list(unknown)[:_SHOW_UNKNOWN]
        more = f" and {len(unknown) - len(shown)} more" if len(unknown) > len(shown) else ""
        where = ""
        if line_numbers is not None:
            where = f" (first at line {line_numbers[unknown[shown[0]]]})"
        known = self.labels[:_SHOW_KNOWN]
        known_s = f"{known}" + (f" ... ({len(self.labels)} in all)" if len(self.labels) > len(known) else "")
        prefix = f"{path}: " if path else ""
        plural = "s" if len(unknown) > 1 else ""
        raise LabelError(f"{prefix}unknown label{plural} {shown}{more}{where}; known: {known_s}")

    def decode(self, ids: Iterable[Any]) -> list[str]:
        out = []
        for i in ids:
            j = int(i)
            if not 0 <= j < len(self.labels):
                raise LabelError(f"class id {j} out of range; the label map has {len(self.labels)} labels")
            out.append(self.labels[j])
        return out

    def to_json(self) -> dict[str, Any]:
        return {"labels": list(self.labels)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LabelMap:
        """Accepts :meth:`to_json` output, or a transformers-style ``{"id2label": {"0": "neg", ...}}``."""
        if "labels" in d:
            return cls(d["labels"])
        if "id2label" in d:
            id2label = {int(k): str(v) for k, v in d["id2label"].items()}
            if sorted(id2label) != list(range(len(id2label))):
                raise LabelError(f"id2label ids must be 0..{len(id2label) - 1}, got {sorted(id2label)}")
            return cls([id2label[i] for i in range(len(id2label))])
        raise LabelError(f"a label map needs 'labels' or 'id2label', got keys {sorted(d)}")
