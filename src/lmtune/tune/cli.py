"""``lmtune tune``: flags generated from DataConfig, ModelConfig, TrainConfig, SearchConfig and TuneConfig."""

from __future__ import annotations

import argparse
import dataclasses

from lmtune._fields import add_dataclass_flags, build_config, load_yaml, nested_overrides, to_yaml
from lmtune.config import DataConfig, ModelConfig, RunConfig, SearchConfig, TrainConfig, TuneConfig, mapping
from lmtune.errors import ConfigError
from lmtune.tune.space import SEARCHABLE

_SEARCHED_TRAIN = {f for s, f, _ in SEARCHABLE.values() if s == "train"}
_SEARCHED_MODEL = {f for s, f, _ in SEARCHABLE.values() if s == "model"}


def add_tune_parser(sub) -> None:
    p = sub.add_parser(
        "tune", help="Search model, learning rate, batch size, epochs ... with Optuna.",
        description="Search the key parameters with Optuna (TPE + pruning). Search flags take a declaration: "
                    "'1e-5..1e-3:log', '1..4', '8,16,32' or a single value. Rerun the same command to resume.")
    _add_search_flags(p)
    p.set_defaults(handler=cmd_tune)


def add_plan_parser(sub) -> None:
    p = sub.add_parser(
        "plan", help="What a search will cost, before it runs: memory, seconds per step and per trial, trials in --budget.",
        description="Price every model x method x batch size x max length of the search `lmtune tune` would run with "
                    "the same flags: parameters, peak memory (and whether it fits), seconds per optimizer step, "
                    "per evaluation and per trial, and how many trials fit --budget. Time comes from a few real "
                    "steps on your rows, cached per machine, so a second plan is instant. Writes OUT/plan.json.")
    _add_search_flags(p)
    p.set_defaults(handler=cmd_plan)


def _add_search_flags(p) -> None:
    """The flags of `lmtune tune`, which `lmtune plan` takes too (so a plan prices exactly the search that runs)."""
    p.add_argument("--config", metavar="YAML", help="Settings from YAML (sections data, model, train, search, tune); flags override.")
    p.add_argument("--print-config", action="store_true", help="Print the resulting configuration as YAML and exit.")
    add_dataclass_flags(p, SearchConfig, "search")
    add_dataclass_flags(p, TuneConfig, "tune")
    add_dataclass_flags(p, DataConfig, "data")
    add_dataclass_flags(p, ModelConfig, "model", skip=_SEARCHED_MODEL)
    add_dataclass_flags(p, TrainConfig, "train", skip=_SEARCHED_TRAIN | {"save_checkpoints", "eval_every_steps", "progress", "checkpoint_every_steps"})
    p.add_argument("--out", "--output-dir", dest="output_dir", default=argparse.SUPPRESS, metavar="DIR",
                   help="Study folder: study.db, the best model (best/), leaderboard, report (default runs/tune).")
    p.add_argument("--report", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                   help="Write report.html at the end (default: True).")


def configs_from_args(ns) -> tuple[RunConfig, SearchConfig, TuneConfig]:
    base = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    over = nested_overrides(ns)
    for key in ("output_dir", "report"):
        if key in vars(ns):
            over[key] = getattr(ns, key)

    def build(merged: dict) -> tuple[RunConfig, SearchConfig, TuneConfig]:
        search = mapping(merged.pop("search", None), "search")
        tune_d = mapping(merged.pop("tune", None), "tune")
        merged.setdefault("output_dir", "runs/tune")
        unknown = sorted(set(search) - {f.name for f in dataclasses.fields(SearchConfig)})
        if unknown:
            raise ConfigError(f"unknown keys in section 'search': {unknown}")
        # A declaration is text ('1e-5..1e-3:log'), a list of choices or a {low, high, log} mapping; YAML reads
        # a single value (3, 1e-4) as a number.
        sc = SearchConfig(**{k: (None if v is None else v if isinstance(v, (list, dict)) else str(v)) for k, v in search.items()})
        return RunConfig.from_dict(merged), sc, TuneConfig(**tune_d)

    run, sc, tc = build_config(build, base, over, getattr(ns, "config", None))
    if not run.data.train_file and not tc.show and not getattr(ns, "print_config", False):
        raise ConfigError("--data (--train-file) is required: the labelled training file")
    return run, sc, tc


def cmd_tune(ns) -> int:
    from lmtune._console import log
    from lmtune.tune.study import show, tune

    run, sc, tc = configs_from_args(ns)
    if ns.print_config:
        d = {"search": dataclasses.asdict(sc), "tune": dataclasses.asdict(tc)} | run.to_dict()
        print(to_yaml(d), end="")
        return 0
    if tc.show:
        print(show(run.output_dir, tc.storage, tc.study_name))
        return 0
    result = tune(run, sc, tc)
    if run.report:
        try:
            from lmtune.report import write_report
            log.info(f"report: {write_report(result.output_dir)}")
        except ImportError:
            pass
        except Exception as e:  # a broken plot must never cost the user a finished study
            log.warning(f"warning: report not written ({type(e).__name__}: {e})")
    return 0


def cmd_plan(ns) -> int:
    from lmtune.tune.plan import plan

    run, sc, tc = configs_from_args(ns)
    if ns.print_config:
        d = {"search": dataclasses.asdict(sc), "tune": dataclasses.asdict(tc)} | run.to_dict()
        print(to_yaml(d), end="")
        return 0
    plan(run, sc, tc)
    return 0
