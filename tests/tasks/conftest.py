"""Data for the task contract suite: a generation task a tiny model can start to learn (repeat the words after
"repeat:"), in prompt/completion and OpenAI chat layouts, beside the sentiment classification files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = ["good", "bad", "film", "plot", "story", "great", "dull", "nice"]


def repeat_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4)))
        rows.append({"prompt": f"repeat: {words}", "completion": words})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def as_chat(rows: list[dict[str, str]]) -> list[dict]:
    return [{"messages": [{"role": "system", "content": "Repeat the words."}, {"role": "user", "content": r["prompt"]},
                          {"role": "assistant", "content": r["completion"]}]} for r in rows]


@pytest.fixture(scope="session")
def generation_files(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("generation")
    return {"train": write_jsonl(root / "train.jsonl", repeat_rows(96, 1)),
            "val": write_jsonl(root / "val.jsonl", repeat_rows(16, 2)),
            "test": write_jsonl(root / "test.jsonl", repeat_rows(16, 3)),
            "chat": write_jsonl(root / "chat.jsonl", as_chat(repeat_rows(48, 4)))}
