"""The search space: which parameters vary, over what range, and the default that needs no thought.

A dimension is declared as text on the command line or in YAML:

* ``1e-5..1e-3:log`` a float range sampled on a log scale; ``0..0.1`` a uniform float range;
* ``1..4`` an integer range (both ends integers);
* ``8,16,32`` a choice; ``smollm2-135m-instruct,pythia-70m`` a choice of models;
* a single value fixes the parameter.

LoRA rank and alpha are conditional: sampled only in trials whose method is ``lora``.

Default rules (see docs/tuning.md for the sources):

* learning rate, log-uniform over [c/4, 4c]. For full fine-tuning c = 6.25e-5 (GPT-1's fine-tuning rate at
  117M parameters, Radford et al. 2018) scaled with model size like GPT-3's learning rates (Brown et al.
  2020, Table 2.1: 6e-4 at 125M falling to 1.2e-4 at 6.7B), i.e. c ~ (125M / N)^0.3. LoRA uses c x 8
  (LoRA adapters are trained at ~1e-4..5e-4 for base-size models, Hu et al. 2021); a frozen body with a
  trained head, c x 40.
* global batch size: {8, 16, 32}; {8, 16} under 1,000 training rows; 64 is added from 20,000 rows.
* epochs: 1..3 from 10,000 rows, 1..4 from 1,000, 2..6 below (small data needs more passes).
* warmup ratio 0..0.1 and weight decay {0, 0.01, 0.1} (the usual fine-tuning defaults, e.g. RoBERTa's 0.06, 0.1).
* the seed is never a search dimension: differences between seeds are noise, measured separately by
  ``--confirm-seeds``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import optuna

from lmtune.errors import SearchSpaceError

# parameter -> (RunConfig section, field, python type)
SEARCHABLE: dict[str, tuple[str, str, type]] = {
    "model": ("model", "name", str),
    "method": ("model", "method", str),
    "learning_rate": ("train", "learning_rate", float),
    "global_batch_size": ("train", "global_batch_size", int),
    "epochs": ("train", "epochs", int),
    "warmup_ratio": ("train", "warmup_ratio", float),
    "weight_decay": ("train", "weight_decay", float),
    "max_length": ("train", "max_length", int),
    "lr_schedule": ("train", "lr_schedule", str),
    "lora_rank": ("model", "lora_rank", int),
    "lora_alpha": ("model", "lora_alpha", float),
}
CONDITIONAL_ON_LORA = ("lora_rank", "lora_alpha")
FLAG_OF = {"learning_rate": "--lr", "global_batch_size": "--batch-size", "model": "--model"}


def flag(name: str) -> str:
    return FLAG_OF.get(name, "--" + name.replace("_", "-"))


@dataclass(frozen=True)
class Dimension:
    name: str
    kind: str
    """float | int | choice | fixed"""
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "fixed":
            return self.choices[0]
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def describe(self) -> str:
        if self.kind == "fixed":
            return str(self.choices[0])
        if self.kind in ("float", "int"):
            return f"{self.low:g}..{self.high:g}" + (":log" if self.log else "")
        return ",".join(str(c) for c in self.choices)

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "low": self.low, "high": self.high, "log": self.log, "choices": list(self.choices)}


@dataclass
class SearchSpace:
    dims: dict[str, Dimension] = field(default_factory=dict)

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """Suggest every dimension; LoRA settings only when the trial's method is lora."""
        params: dict[str, Any] = {}
        for name, dim in self.dims.items():
            if name in CONDITIONAL_ON_LORA:
                continue
            params[name] = dim.suggest(trial)
        if params.get("method") == "lora":
            for name in CONDITIONAL_ON_LORA:
                if name in self.dims:
                    params[name] = self.dims[name].suggest(trial)
        return params

    def fixed(self) -> dict[str, Any]:
        """Values of the dimensions that do not vary (Optuna records only sampled ones in trial.params)."""
        return {k: d.choices[0] for k, d in self.dims.items() if d.kind == "fixed"}

    def complete(self, params: dict[str, Any]) -> dict[str, Any]:
        """A trial's sampled params plus the fixed ones: everything needed to rebuild its config."""
        out = {k: v for k, v in self.fixed().items() if k not in CONDITIONAL_ON_LORA}
        out.update(params)
        if out.get("method") == "lora":
            out.update({k: v for k, v in self.fixed().items() if k in CONDITIONAL_ON_LORA and k not in params})
        return out

    def defaults(self, base: Any) -> dict[str, Any]:
        """The documented default configuration (``base``, a RunConfig holding what `lmtune train` uses without
        flags) as values of the searched dimensions: clipped into a range, or the nearest choice, so a
        search can run it as its first trial. Only the searched (not fixed) dimensions are returned."""
        values = {name: getattr(getattr(base, SEARCHABLE[name][0]), SEARCHABLE[name][1])
                  for name, dim in self.dims.items() if dim.kind != "fixed"}
        return self.nearest(values)

    def nearest(self, values: dict[str, Any], fallback: dict[str, Any] | None = None) -> dict[str, Any]:
        """``values`` moved into this space, one searched dimension at a time: a number clipped into its range,
        a numeric choice to the nearest one on a log scale, an unknown text choice to ``fallback``'s value (or
        the first choice). A searched dimension missing from ``values`` takes ``fallback``'s value; fixed
        dimensions and names this space does not search are left out; LoRA settings only for the lora method."""
        fallback = fallback or {}
        out: dict[str, Any] = {}
        for name, dim in self.dims.items():
            if dim.kind == "fixed":
                continue
            value = values.get(name, fallback.get(name))
            if value is None:
                continue
            if dim.kind in ("float", "int"):
                v = min(max(float(value), float(dim.low)), float(dim.high))
                out[name] = int(round(v)) if dim.kind == "int" else v
            elif value in dim.choices:
                out[name] = value
            elif all(isinstance(c, (int, float)) for c in dim.choices) and isinstance(value, (int, float)):
                out[name] = min(dim.choices, key=lambda c: (abs(math.log(max(c, 1e-12)) - math.log(max(value, 1e-12))), c))
            else:
                out[name] = fallback[name] if fallback.get(name) in dim.choices else dim.choices[0]
        if out.get("method", self.fixed().get("method")) != "lora":
            for name in CONDITIONAL_ON_LORA:
                out.pop(name, None)
        return out

    def describe(self) -> dict[str, str]:
        return {k: v.describe() for k, v in self.dims.items()}

    def to_json(self) -> dict[str, Any]:
        return {k: v.to_json() for k, v in self.dims.items()}


def _number(text: str, name: str, typ: type) -> float:
    try:
        value = typ(text) if typ is int else float(text)
    except ValueError:
        raise SearchSpaceError(f"{flag(name)}: '{text}' is not a {'whole number' if typ is int else 'number'}") from None
    if not math.isfinite(value):
        raise SearchSpaceError(f"{flag(name)}: '{text}' is not a finite number")
    return value


def parse_dimension(name: str, spec: Any) -> Dimension:
    """Parse ``1e-5..1e-3:log`` / ``1..4`` / ``8,16,32`` / a single value (or the YAML equivalents)."""
    if name not in SEARCHABLE:
        raise SearchSpaceError(f"'{name}' cannot be searched; searchable: {', '.join(SEARCHABLE)}")
    typ = SEARCHABLE[name][2]
    if isinstance(spec, dict):  # YAML: {low: 1e-5, high: 1e-3, log: true} or {choices: [...]}
        if "choices" in spec:
            spec = list(spec["choices"])
        elif "low" in spec and "high" in spec:
            spec = f"{spec['low']}..{spec['high']}" + (":log" if spec.get("log") else "")
        else:
            raise SearchSpaceError(f"search.{name}: expected low/high or choices, got {spec}")
    if isinstance(spec, (list, tuple)):
        spec = ",".join(str(s) for s in spec)
    text = str(spec).strip()
    if not text:
        raise SearchSpaceError(f"{flag(name)}: empty search declaration")
    if ".." in text:
        if typ is str:
            raise SearchSpaceError(f"{flag(name)}: a range makes no sense here; list the choices (a,b,c)")
        body, _, opt = text.partition(":")
        if opt not in ("", "log"):
            raise SearchSpaceError(f"{flag(name)}: unknown range option ':{opt}' (only ':log')")
        lo_s, _, hi_s = body.partition("..")
        int_range = typ is int
        lo = _number(lo_s.strip(), name, int if int_range else float)
        hi = _number(hi_s.strip(), name, int if int_range else float)
        if not lo < hi:
            raise SearchSpaceError(f"{flag(name)}: range {text} must have low < high")
        if opt == "log" and lo <= 0:
            raise SearchSpaceError(f"{flag(name)}: a log range needs low > 0, got {text}")
        _check_value(name, lo)
        _check_value(name, hi)
        return Dimension(name, "int" if int_range else "float", lo, hi, opt == "log")
    parts = [p.strip() for p in text.split(",")]
    if any(not p for p in parts):
        raise SearchSpaceError(f"{flag(name)}: empty choice in '{text}'")
    values: list[Any] = [p if typ is str else _number(p, name, typ) for p in parts]
    for v in values:
        _check_value(name, v)
    if len(set(values)) != len(values):
        raise SearchSpaceError(f"{flag(name)}: repeated choice in '{text}'")
    if len(values) == 1:
        return Dimension(name, "fixed", choices=(values[0],))
    return Dimension(name, "choice", choices=tuple(values))


def _check_value(name: str, v: Any) -> None:
    bad = None
    if name == "method" and v not in ("full", "lora", "head"):
        bad = "must be full, lora or head"
    elif name == "lr_schedule" and v not in ("linear", "cosine", "constant"):
        bad = "must be linear, cosine or constant"
    elif name in ("learning_rate", "lora_alpha") and v <= 0:
        bad = "must be > 0"
    elif name in ("global_batch_size", "epochs", "lora_rank") and v < 1:
        bad = "must be >= 1"
    elif name == "warmup_ratio" and not 0 <= v < 1:
        bad = "must be in [0, 1)"
    elif name == "weight_decay" and v < 0:
        bad = "must be >= 0"
    elif name == "max_length" and v < 8:
        bad = "must be >= 8"
    if bad:
        raise SearchSpaceError(f"{flag(name)}: {v!r} {bad}")


# GPT-3 (Brown et al. 2020, Table 2.1): pretraining learning rate by model size (parameters in millions).
_GPT3_LR = [(125, 6.0e-4), (350, 3.0e-4), (760, 2.5e-4), (1300, 2.0e-4), (2700, 1.6e-4), (6700, 1.2e-4),
            (13000, 1.0e-4), (175000, 0.6e-4)]
_METHOD_LR_FACTOR = {"full": 1.0, "lora": 8.0, "head": 40.0}


def _gpt3_lr(params_m: float) -> float:
    """Log-log interpolation of GPT-3's learning rate by size (clamped at the table's ends)."""
    pts = _GPT3_LR
    if params_m <= pts[0][0]:
        return pts[0][1]
    if params_m >= pts[-1][0]:
        return pts[-1][1]
    for (n0, l0), (n1, l1) in zip(pts, pts[1:]):
        if n0 <= params_m <= n1:
            t = (math.log(params_m) - math.log(n0)) / (math.log(n1) - math.log(n0))
            return math.exp(math.log(l0) + t * (math.log(l1) - math.log(l0)))
    return pts[-1][1]


def default_learning_rate(params_m: float, method: str = "full") -> float:
    """Centre of the default learning-rate range: GPT-1's fine-tuning rate, scaled with size like GPT-3."""
    scale = _gpt3_lr(params_m) / _gpt3_lr(125)
    return 6.25e-5 * scale * _METHOD_LR_FACTOR.get(method, 1.0)


def default_space(n_train_rows: int, params_m: list[float], methods: list[str]) -> dict[str, Dimension]:
    """The space used for every dimension the user did not declare."""
    lo = min(default_learning_rate(p, m) for p in params_m for m in methods) / 4
    hi = max(default_learning_rate(p, m) for p in params_m for m in methods) * 4
    if n_train_rows < 1000:
        batch, epochs = (8, 16), (2, 6)
    elif n_train_rows < 10000:
        batch, epochs = (8, 16, 32), (1, 4)
    elif n_train_rows < 20000:
        batch, epochs = (8, 16, 32), (1, 3)
    else:
        batch, epochs = (8, 16, 32, 64), (1, 3)
    dims = {
        "learning_rate": Dimension("learning_rate", "float", float(f"{lo:.3g}"), float(f"{hi:.3g}"), True),
        "global_batch_size": Dimension("global_batch_size", "choice", choices=batch),
        "epochs": Dimension("epochs", "int", epochs[0], epochs[1]),
        "warmup_ratio": Dimension("warmup_ratio", "float", 0.0, 0.1),
        "weight_decay": Dimension("weight_decay", "choice", choices=(0.0, 0.01, 0.1)),
    }
    if "lora" in methods:
        dims["lora_rank"] = Dimension("lora_rank", "choice", choices=(8, 16, 32))
        dims["lora_alpha"] = Dimension("lora_alpha", "choice", choices=(16.0, 32.0, 64.0))
    return dims


def build_space(declared: dict[str, Any], *, n_train_rows: int, params_m_of: dict[str, float],
                default_model: str, default_method: str) -> SearchSpace:
    """User declarations first; every undeclared searchable dimension gets its default rule."""
    dims = {name: parse_dimension(name, spec) for name, spec in declared.items() if spec is not None}
    if "model" not in dims:
        dims["model"] = Dimension("model", "fixed", choices=(default_model,))
    if "method" not in dims:
        dims["method"] = Dimension("method", "fixed", choices=(default_method,))
    models = list(dims["model"].choices)
    methods = list(dims["method"].choices)
    for name, dim in default_space(n_train_rows, [params_m_of.get(m, 125.0) for m in models], methods).items():
        dims.setdefault(name, dim)
    order = list(SEARCHABLE)
    return SearchSpace({k: dims[k] for k in order if k in dims})
