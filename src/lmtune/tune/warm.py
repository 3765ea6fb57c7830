"""Warm start: begin a search with the configurations that won a finished study of a similar task.

``lmtune tune --warm-start OTHER_STUDY`` reads the other study (its folder, as ``lmtune tune --out`` wrote it),
ranks its finished trials by score in that study's own direction (a confirmed trial by its mean over seeds,
the others by their one value) and queues the best ``--warm-start-top`` distinct configurations as the first
trials of the new study, right after the default configuration. Each is moved into the new search space first
(numbers clipped into its ranges, choices to the nearest one, a model the new space does not search replaced by
its default).

Why queue and not copy: the other study's scores were measured on other data, often with another metric, so
they must never enter this study's leaderboard, answer or pruning. Queued configurations are trained and
scored here like any other trial; the sampler then learns from their real results, so a good region found
before is measured in the first trials instead of being rediscovered after the random start-up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmtune.errors import ConfigError, LmtuneError
from lmtune.records import STUDY_FILE
from lmtune.tune.space import SearchSpace

WARM_ATTR = "lmtune_warm_start"


@dataclass(frozen=True)
class SourceTrial:
    """One finished trial of the source study, with everything needed to rebuild its configuration."""

    number: int
    params: dict[str, Any]
    """Its sampled parameters plus the source space's fixed ones."""
    value: float
    """Its score: the mean over the confirmation seeds when it was confirmed, else its single-seed value."""
    confirmed: bool


@dataclass(frozen=True)
class WarmSource:
    folder: Path
    metric: str
    task: str | None
    trials: list[SourceTrial]
    """Best first."""


def load_source(path: str | Path) -> WarmSource:
    """Read a finished (or still running) study from its folder, read-only, as `lmtune report` reads it; a
    one-line ConfigError naming --warm-start when it is not one or has no finished trial."""
    from lmtune.report._study import load_study

    folder = Path(path).expanduser()
    if not (folder / STUDY_FILE).is_file():
        raise ConfigError(f"--warm-start {path}: no {STUDY_FILE} there; give the --out folder of an earlier `lmtune tune`")
    try:
        sd = load_study(folder)
    except LmtuneError as e:
        raise ConfigError(f"--warm-start {path}: {e}") from None
    fixed = {k: d["choices"][0] for k, d in (sd.meta.get("space_json") or {}).items()
             if isinstance(d, dict) and d.get("kind") == "fixed" and d.get("choices")}
    confirmed = {int(r["trial"]): float(r["mean"]) for r in (sd.confirm or {}).get("results", [])
                 if isinstance(r.get("trial"), int) and isinstance(r.get("mean"), (int, float)) and math.isfinite(r["mean"])}
    trials = []
    for t in sd.complete:
        mean = confirmed.get(t.number)
        trials.append(SourceTrial(t.number, fixed | dict(t.params), mean if mean is not None else t.value, mean is not None))
    # By score, a trial's mean over seeds where it was confirmed; on equal scores the confirmed one first. Not all
    # confirmed ones first: a study over model sizes confirms each size's best, and a worse size's mean (E2E: Gemma's
    # 1.2558) would then be queued before a far better single-seed trial (1.1468).
    trials.sort(key=lambda s: (-s.value if sd.maximize else s.value, not s.confirmed))
    if not trials:
        raise ConfigError(f"--warm-start {path}: the study has no finished trial to start from")
    return WarmSource(folder, sd.metric, sd.meta.get("task"), trials)


def warm_configurations(source: WarmSource, space: SearchSpace, defaults: dict[str, Any], top: int,
                        skip: list[dict[str, Any]] = ()) -> list[tuple[dict[str, Any], SourceTrial]]:
    """The source's best ``top`` configurations moved into ``space``, without repeats and without any in ``skip``
    (e.g. the default configuration, already queued); ``defaults`` fills what the source did not search."""
    chosen: list[tuple[dict[str, Any], SourceTrial]] = []
    seen = [_key(s) for s in skip]
    for trial in source.trials:
        if len(chosen) >= top:
            break
        params = space.nearest(trial.params, fallback=defaults)
        if _key(params) in seen:
            continue
        seen.append(_key(params))
        chosen.append((params, trial))
    return chosen


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, float(f"{v:.6g}") if isinstance(v, float) else v) for k, v in params.items()))
