"""Generation data: read prompt -> completion files and tokenise them with loss masks.

Layouts read by :func:`read_generation_table` (the format comes from the file's extension, as in
:func:`~lmtune.data.reading.read_table`, whose raw readers and error style are reused):

* ``columns``: prompt/completion columns in CSV, TSV, JSONL or Parquet, detected from the pairs in
  :data:`GEN_PAIRS` (case-insensitive; names that differ only in case are refused), ``instruction`` +
  ``input`` / ``output`` (instruction and input joined with a blank line; the input may be empty or
  absent), or named with ``prompt_column`` / ``completion_column``. ``prompt_template`` (``'Translate to
  German: {en}'``) builds the prompt from any columns, str.format style.
* ``openai-legacy``: the JSONL ``{"prompt": ..., "completion": ...}`` of babbage-002/davinci-002 (text is
  kept verbatim: the separator and leading space the old guide asked for stay where the user put them).
* ``openai-chat`` / ``hf-conversational``: ``{"messages": [{"role", "content", "weight"}...]}``; the same
  layout, named ``openai-chat`` in JSON lines and ``hf-conversational`` in Parquet / JSON arrays.
  ``weight`` (0 or 1) is allowed on assistant messages only; extra keys (``name``, top-level ``tools``,
  ``functions``, ``parallel_tool_calls``) are ignored; tool/function roles and tool calls are refused.
* ``hf-prompt-completion``: ``{"prompt": [messages], "completion": [messages]}``; assistant messages of the
  prompt get weight 0 (only the completion is learnt, as in TRL).

Every problem is a one-line :class:`~lmtune.errors.DataError` naming the file and line (and column, key or
message); blank lines and rows skipped under ``empty_text="skip"`` are counted in ``skipped``.

Tokenising (:func:`encode_generation`), ``chat_template``:

* ``"auto"``: the tokenizer's chat template when it has one, for *every* row, plain prompt/completion
  rows included (an instruct model expects its template, and train and predict then agree); without one,
  plain rows are concatenated and chat rows are rendered as text like ``"none"``.
* ``"none"``: no template. A plain row is ``[BOS] + prompt + completion + EOS`` (prompt and completion
  tokenised separately and the ids joined, so the prompt is a token prefix; BOS only when the tokenizer
  adds one by itself). A chat row is rendered as ``"System: ...\\n"``, ``"User: ...\\n"``, then
  ``"Assistant: " + content + EOS`` per assistant turn; the generation prompt is ``"Assistant: "``.
* a file path (or an inline Jinja string holding ``{{``/``{%``): that Jinja template.

With a template the conversation is rendered and tokenised whole; each assistant turn's start is the
token length of the messages before it rendered with ``add_generation_prompt=True``, which must be a
token prefix of the whole (else a DataError naming the line). A turn's targets run from there to the
template's first stop token (:func:`stop_token_ids`) inclusive; EOS is appended only when the last turn
has no stop token. Targets are the assistant turns with weight 1 and their end token; with
``train_on_prompt`` every token except weight-0 assistant turns (a row's explicit "do not learn this"
wins over the global flag). The first token of a row never has a label (no model predicts it).

Rows longer than ``max_length`` lose the start of their prompt (a leading BOS is kept): the completion
and its end token stay whole (listed in ``cut``). When the completion does not fit with at least one
prompt token, the prompt keeps at most half the room and the completion is cut at its end, without EOS
(listed in ``completion_too_long``; the training loop reports the count and the first lines).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import string
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lmtune._io import atomic_save_npz
from lmtune.data.batching import tokenizer_fingerprint
from lmtune.data.reading import (
    _find,
    _read_delimited,
    _looks_like_label,
    _names,
    _Raw,
    _text_str,
    read_raw,
)
from lmtune.errors import ConfigError, DataError

__all__ = [
    "GEN_PAIRS",
    "GenBundle",
    "GenEncoded",
    "GenExample",
    "GenTable",
    "Message",
    "encode_generation",
    "load_generation_data",
    "looks_like_generation",
    "read_generation_table",
    "stop_token_ids",
]

# (prompt, completion) column pairs, tried case-insensitively; "instruction" + "input" / "output" is
# detected before ("input", "output").
GEN_PAIRS = (("prompt", "completion"), ("input", "output"), ("source", "target"), ("question", "answer"))
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100

_CACHE_VERSION = 1
_CHUNK = 2048
_ROLE_TEXT = {"system": "System", "user": "User", "assistant": "Assistant"}

Policy = Literal["error", "skip"]


# ---------------------------------------------------------------------------------------------- tables


@dataclass
class Message:
    role: str  # system | user | assistant
    content: str
    weight: int = 1  # assistant turns only: 0 = no loss on this turn


@dataclass
class GenExample:
    messages: list[Message]
    line: int  # physical line (or row for Parquet / JSON arrays)
    plain: bool  # from prompt/completion text: no roles given by the user

    def _last_assistant(self) -> int:
        """Index of the final message when it is the assistant's (the completion), else len(messages)."""
        n = len(self.messages)
        return n - 1 if n and self.messages[-1].role == "assistant" else n

    @property
    def prompt_key(self) -> str:
        """Everything before the completion, canonical JSON; rows with equal keys form one example group."""
        msgs = self.messages[: self._last_assistant()]
        return json.dumps([[m.role, m.content] for m in msgs], ensure_ascii=False, separators=(",", ":"))

    @property
    def completion(self) -> str:
        """The reference: the final message's content when it is the assistant's, else ``""`` (predict)."""
        k = self._last_assistant()
        return self.messages[k].content if k < len(self.messages) else ""

    @property
    def prompt(self) -> str:
        """A plain row's prompt text (the first user message); for chat rows the turns before the completion,
        one ``role: content`` line each (for people reading predictions and reports)."""
        if self.plain and self.messages and self.messages[0].role == "user":
            return self.messages[0].content
        return "\n".join(f"{m.role}: {m.content}" for m in self.messages[: self._last_assistant()])


@dataclass
class GenTable:
    path: str
    examples: list[GenExample]
    format: str  # columns | openai-chat | openai-legacy | hf-conversational | hf-prompt-completion
    prompt_column: str | None
    completion_column: str | None
    skipped: dict[str, int] = field(default_factory=dict)
    location: str = "line"  # "line" for text formats, "row" for Parquet and JSON arrays
    prompt_template: str | None = None
    # (first, last) physical lines of records that span several lines (a quoted field with a line break).
    multiline: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def line_numbers(self) -> list[int]:
        return [e.line for e in self.examples]

    def where(self, i: int) -> str:
        return f"{self.location} {self.examples[i].line}"

    def subset(self, idx: Sequence[int]) -> GenTable:
        """The examples at ``idx`` (in that order); ``skipped`` and ``multiline`` of the file are kept."""
        return replace(
            self, examples=[self.examples[i] for i in idx], skipped=dict(self.skipped), multiline=list(self.multiline)
        )

    def groups(self) -> dict[str, list[int]]:
        """prompt_key -> indices of its rows (several references for one input), in first-seen order."""
        out: dict[str, list[int]] = {}
        for i, e in enumerate(self.examples):
            out.setdefault(e.prompt_key, []).append(i)
        return out


# ---------------------------------------------------------------------------------------------- reading


def _read_raw(p: str) -> _Raw:
    raw = read_raw(p, layout='{"messages": [...]} or {"prompt": ..., "completion": ...}')
    if not raw.line_numbers:
        raise DataError(f"{p}: no data rows (only a header)" if raw.location == "line" else f"{p}: no data rows")
    return raw


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return f"the number {v!r}"
    if isinstance(v, str):
        return "text"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


class _Columns:
    """Case-insensitive column lookup that refuses names differing only in case."""

    def __init__(self, path: str, names: list[str]):
        self.path = path
        self.names = names
        self.folded: dict[str, list[str]] = {}
        for n in names:
            self.folded.setdefault(n.lower(), []).append(n)

    def one(self, key: str, flag: str, exclude: Sequence[str | None] = ()) -> str | None:
        found = [n for n in self.folded.get(key.lower(), []) if n not in exclude]
        if len(found) > 1:
            raise DataError(f"{self.path}: columns {_names(found)} differ only in case; choose one with {flag}")
        return found[0] if found else None


def template_fields(path: str, template: str, names: list[str] | None = None) -> list[str]:
    """Column names used by ``template``, in order; a malformed template, a positional field, no field at all or
    (given the file's column ``names``) an unknown column is a one-line error naming ``path``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ConfigError(
            f"--prompt-template {template!r}: not a valid template ({e}); write fields as {{column}}",
            key="data.prompt_template",
        ) from None
    columns = f"; columns: {names}" if names is not None else ""
    fields: list[str] = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        base = name.split(".", 1)[0].split("[", 1)[0]
        if base == "" or base.isdigit():
            raise DataError(
                f"{path}: --prompt-template {template!r}: fields must name columns ({{column}}), found {{{name}}}{columns}"
            )
        if names is not None and base not in names:
            raise DataError(
                f"{path}: --prompt-template {template!r} uses {{{base}}}, which is not a column{columns}"
            )
        if base not in fields:
            fields.append(base)
    if not fields:
        raise DataError(f"{path}: --prompt-template {template!r} uses no column; write fields as {{column}}{columns}")
    return fields


@dataclass
class _Spec:
    prompt: str | None  # column (None with a template or the instruction layout)
    completion: str | None
    template: str | None = None
    template_fields: list[str] = field(default_factory=list)
    instruction: str | None = None
    input: str | None = None

    @property
    def prompt_name(self) -> str | None:
        if self.instruction:
            return f"{self.instruction}+{self.input}" if self.input else self.instruction
        return self.prompt


_PROMPT_SIDE = tuple(a for a, _ in GEN_PAIRS) + ("instruction",)
_COMPLETION_SIDE = tuple(b for _, b in GEN_PAIRS)


def _resolve_columns(
    path: str,
    raw: _Raw,
    prompt_column: str | None,
    completion_column: str | None,
    prompt_template: str | None,
    require_completion: bool,
) -> _Spec:
    names = list(raw.columns)
    cols = _Columns(path, names)
    hint_pairs = ", ".join(f"{a}/{b}" for a, b in GEN_PAIRS) + ", instruction+input/output"

    # Prompts to complete (predict) need no completion: a completion column the file lacks (the training file's,
    # from the run record) is no error then.
    named = completion_column and (require_completion or any(n.lower() == completion_column.lower() for n in names))
    comp = _find(path, names, completion_column, "--completion-column") if named else None
    if prompt_template is not None:
        fields = template_fields(path, prompt_template, names)
        spec = _Spec(None, comp, template=prompt_template, template_fields=fields)
        exclude: list[str | None] = list(fields)
    elif prompt_column:
        spec = _Spec(_find(path, names, prompt_column, "--prompt-column"), comp)
        exclude = [spec.prompt]
        if comp is None:
            partner = dict(GEN_PAIRS).get(spec.prompt.lower())  # type: ignore[union-attr]
            if spec.prompt.lower() == "instruction":  # type: ignore[union-attr]
                partner = "output"
            if partner:
                spec.completion = cols.one(partner, "--completion-column", exclude)
    elif comp is not None:
        spec = _Spec(None, comp)
        partner = {b: a for a, b in GEN_PAIRS}.get(comp.lower())
        ins = cols.one("instruction", "--prompt-column", [comp]) if comp.lower() == "output" else None
        if ins:
            spec.instruction, spec.input = ins, cols.one("input", "--prompt-column", [comp, ins])
        elif partner and cols.one(partner, "--prompt-column", [comp]):
            spec.prompt = cols.one(partner, "--prompt-column", [comp])
        else:
            cands = [c for c in (cols.one(k, "--prompt-column", [comp]) for k in _PROMPT_SIDE) if c]
            if len(cands) > 1:
                raise DataError(f"{path}: several possible prompt columns {cands}; choose one with --prompt-column")
            if not cands:
                raise DataError(
                    f"{path}: cannot tell which column holds the prompt; columns: {names}; name it with "
                    f"--prompt-column or build it with --prompt-template"
                )
            spec.prompt = cands[0]
        return _check_spec(path, spec)
    else:
        found: list[_Spec] = []
        ins, out = cols.one("instruction", "--prompt-column"), cols.one("output", "--completion-column")
        if ins and out:
            found.append(_Spec(None, out, instruction=ins, input=cols.one("input", "--prompt-column", [ins, out])))
        for a, b in GEN_PAIRS:
            if found and found[0].instruction and (a, b) == ("input", "output"):
                continue
            ca, cb = cols.one(a, "--prompt-column"), cols.one(b, "--completion-column")
            if ca and cb:
                found.append(_Spec(ca, cb))
        if len(found) > 1:
            pairs = ", ".join(f"{s.prompt_name}/{s.completion}" for s in found)
            raise DataError(
                f"{path}: several prompt/completion column pairs ({pairs}); choose with --prompt-column and "
                f"--completion-column"
            )
        if found:
            return _check_spec(path, found[0])
        if require_completion:
            raise DataError(
                f"{path}: cannot tell which columns hold the prompt and the completion; columns: {names}; name "
                f"them with --prompt-column and --completion-column (detected pairs: {hint_pairs})"
            )
        # Prediction input: a prompt column alone is enough.
        if ins:
            inp = cols.one("input", "--prompt-column", [ins])
            return _check_spec(path, _Spec(None, None, instruction=ins, input=inp))
        cands = [c for c in (cols.one(k, "--prompt-column") for k in _PROMPT_SIDE) if c]
        if len(cands) != 1:
            what = (
                f"several possible prompt columns {cands}"
                if cands
                else f"cannot tell which column holds the prompt; columns: {names}"
            )
            raise DataError(f"{path}: {what}; name it with --prompt-column")
        return _check_spec(path, _Spec(cands[0], None))

    if spec.completion is None:
        cands = [c for c in (cols.one(k, "--completion-column", exclude) for k in _COMPLETION_SIDE) if c]
        if len(cands) > 1:
            raise DataError(f"{path}: several possible completion columns {cands}; choose one with --completion-column")
        if cands:
            spec.completion = cands[0]
        elif require_completion:
            raise DataError(
                f"{path}: cannot tell which column holds the completion; columns: {names}; "
                f"name it with --completion-column"
            )
    return _check_spec(path, spec)


def _check_spec(path: str, spec: _Spec) -> _Spec:
    used = [spec.prompt, spec.instruction, spec.input] + list(spec.template_fields)
    if spec.completion is not None and spec.completion in used:
        raise DataError(f"{path}: column '{spec.completion}' is both the prompt and the completion")
    return spec


def _check_weight(path: str, where: str, w: Any) -> int:
    number = isinstance(w, (int, float)) and not isinstance(w, bool)
    if not number or (isinstance(w, float) and math.isnan(w)) or w not in (0, 1):
        raise DataError(f"{path}: {where}: 'weight' must be 0 or 1, found {_kind(w)}")
    return int(w)


def _messages(path: str, where: str, key: str, value: Any, *, prompt_side: bool = False) -> list[Message]:
    """Validate one list of chat messages (``where`` is ``'line 3'``)."""
    if not isinstance(value, list):
        if value is None:
            raise DataError(f"{path}: {where}: no '{key}' (expected a list of messages)")
        raise DataError(f"{path}: {where}, key '{key}': expected a list of messages, found {_kind(value)}")
    out: list[Message] = []
    for k, m in enumerate(value, start=1):
        at = f"{where}, key '{key}', message {k}"
        if not isinstance(m, dict):
            raise DataError(f'{path}: {at}: expected an object {{"role": ..., "content": ...}}, found {_kind(m)}')
        role = m.get("role")
        if not isinstance(role, str):
            what = "no 'role'" if role is None else f"'role' must be text, found {_kind(role)}"
            raise DataError(f"{path}: {at}: {what}")
        if role not in ROLES:
            why = " (tool and function calls are not supported)" if role in ("tool", "function", "ipython") else ""
            raise DataError(f"{path}: {at}: unknown role '{role}'{why}; roles: {', '.join(ROLES)}")
        for tk in ("tool_calls", "function_call"):
            if m.get(tk):
                raise DataError(f"{path}: {at}: '{tk}' is not supported (tool and function calls are out of scope)")
        if "content" not in m or m["content"] is None:
            raise DataError(f"{path}: {at}: no 'content'")
        content = m["content"]
        if not isinstance(content, str):
            raise DataError(f"{path}: {at}: 'content' must be text, found {_kind(content)}")
        w = m.get("weight")
        if w is not None:
            if role != "assistant":
                raise DataError(
                    f"{path}: {at}: 'weight' is only allowed on assistant messages (found on a {role} message)"
                )
            weight = _check_weight(path, at, w)
        else:
            weight = 0 if (prompt_side and role == "assistant") else 1
        out.append(Message(role, content, weight))
    return out


def _cell_text(path: str, where: str, col: str, v: Any) -> str | None:
    try:
        return _text_str(v)
    except TypeError as e:
        raise DataError(f"{path}: {where}, column '{col}': expected text, found {e}") from None


def read_generation_table(
    path: str | os.PathLike[str],
    *,
    prompt_column: str | None = None,
    completion_column: str | None = None,
    prompt_template: str | None = None,
    require_completion: bool = True,
    empty_text: Policy = "error",
) -> GenTable:
    """Read one generation data file (see the module docstring for the layouts).

    ``require_completion=False`` (predict) accepts rows without a completion (a prompt column alone, or a
    chat that does not end with the assistant). ``empty_text="skip"`` counts rows with an empty prompt or
    completion in ``skipped`` instead of stopping with an error.
    """
    if empty_text not in ("error", "skip"):
        raise ValueError(f"empty_text must be 'error' or 'skip', got {empty_text!r}")
    p = str(path)
    raw = _read_raw(p)
    cols = _Columns(p, list(raw.columns))
    if prompt_column is None and completion_column is None and prompt_template is None:
        msg_col = cols.one("messages", "--prompt-column")
        if msg_col is not None:
            return _read_messages(p, raw, msg_col, require_completion, empty_text)
    spec = _resolve_columns(p, raw, prompt_column, completion_column, prompt_template, require_completion)
    return _read_columns(p, raw, spec, require_completion, empty_text)


def _skip_or_raise(path: str, msg: str, empty_text: Policy, skipped: dict[str, int], reason: str) -> None:
    if empty_text == "error":
        raise DataError(f"{path}: {msg}; fix the row or pass --empty-text skip")
    skipped[reason] = skipped.get(reason, 0) + 1


def _finish(p: str, raw: _Raw, examples: list[GenExample], skipped: dict[str, int], **kw: Any) -> GenTable:
    if not examples:
        what = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in sorted(skipped.items())) or "none"
        raise DataError(f"{p}: every row was skipped ({what}); nothing left to use")
    return GenTable(
        path=p, examples=examples, skipped=skipped, location=raw.location, multiline=list(raw.multiline), **kw
    )


def _read_messages(p: str, raw: _Raw, col: str, require_completion: bool, empty_text: Policy) -> GenTable:
    loc = raw.location
    skipped = dict(raw.skipped)
    examples: list[GenExample] = []
    for i, line in enumerate(raw.line_numbers):
        where = f"{loc} {line}"
        msgs = _messages(p, where, col, raw.columns[col][i])
        if not msgs:
            raise DataError(f"{p}: {where}, key '{col}': no messages")
        if _conversation_ok(p, where, msgs, require_completion, empty_text, skipped):
            examples.append(GenExample(msgs, line, False))
    fmt = "openai-chat" if loc == "line" else "hf-conversational"
    return _finish(p, raw, examples, skipped, format=fmt, prompt_column=None, completion_column=None)


def _conversation_ok(
    p: str, where: str, msgs: list[Message], require_completion: bool, empty_text: Policy, skipped: dict[str, int]
) -> bool:
    """Check the shape of a chat; False when it is skipped (empty completion under --empty-text skip)."""
    last = msgs[-1]
    if last.role != "assistant":
        if require_completion:
            has = any(m.role == "assistant" for m in msgs)
            raise DataError(
                f"{p}: {where}: the last message must be the assistant's (the completion to learn), found "
                f"'{last.role}'" + ("" if has else "; the conversation has no assistant message")
            )
        return True
    if not last.content.strip():
        if require_completion:
            msg = f"{where}: the last assistant message is empty (empty completion)"
            _skip_or_raise(p, msg, empty_text, skipped, "empty_completion")
            return False
        msgs.pop()  # predict: an empty reference is no reference
        return True
    if require_completion and not any(m.weight for m in msgs if m.role == "assistant"):
        raise DataError(f"{p}: {where}: every assistant message has weight 0; nothing to learn from this row")
    return True


def _read_columns(p: str, raw: _Raw, spec: _Spec, require_completion: bool, empty_text: Policy) -> GenTable:
    loc = raw.location
    skipped = dict(raw.skipped)
    examples: list[GenExample] = []
    conversational: bool | None = None
    pcol = spec.prompt or spec.instruction
    first_line = 0
    for i, line in enumerate(raw.line_numbers):
        where = f"{loc} {line}"
        pval = raw.columns[pcol][i] if pcol else None
        cval = raw.columns[spec.completion][i] if spec.completion else None
        is_conv = isinstance(pval, list) and spec.template is None and spec.instruction is None
        if conversational is None:
            conversational, first_line = is_conv, line
        elif is_conv != conversational:
            raise DataError(
                f"{p}: {where}, column '{pcol}': "
                + ("a list of messages" if is_conv else "text")
                + f", but {loc} {first_line} holds "
                + ("a list of messages" if conversational else "text")
                + "; use one layout for the whole file"
            )
        if is_conv:
            ex = _conversational_row(p, where, line, spec, pval, cval, require_completion, empty_text, skipped)
            if ex is not None:
                examples.append(ex)
            continue

        # The prompt, as text.
        if spec.template is not None:
            values = {c: (_cell_text(p, where, c, raw.columns[c][i]) or "") for c in spec.template_fields}
            try:
                prompt = spec.template.format_map(values)
            except (ValueError, KeyError, IndexError, AttributeError, TypeError) as e:
                raise DataError(f"{p}: {where}: --prompt-template {spec.template!r} cannot be filled: {e}") from None
            pname = "--prompt-template"
        elif spec.instruction is not None:
            ins = _cell_text(p, where, spec.instruction, raw.columns[spec.instruction][i]) or ""
            inp = _cell_text(p, where, spec.input, raw.columns[spec.input][i]) or "" if spec.input else ""
            prompt = "\n\n".join(x for x in (ins, inp) if x.strip())
            pname = f"column '{spec.instruction}'"
        else:
            assert spec.prompt is not None
            prompt = _cell_text(p, where, spec.prompt, pval) or ""
            pname = f"column '{spec.prompt}'"
        if not prompt.strip():
            _skip_or_raise(p, f"{where}, {pname}: empty prompt", empty_text, skipped, "empty_prompt")
            continue
        msgs = [Message("user", prompt)]
        completion = _cell_text(p, where, spec.completion, cval) if spec.completion else None
        if completion is not None and completion.strip():
            msgs.append(Message("assistant", completion))
        elif require_completion:
            what = "missing completion" if completion is None else "empty completion"
            _skip_or_raise(p, f"{where}, column '{spec.completion}': {what}", empty_text, skipped, "empty_completion")
            continue
        examples.append(GenExample(msgs, line, True))

    if conversational:
        fmt = "hf-prompt-completion"
    elif (
        spec.template is None
        and spec.prompt == "prompt"
        and spec.completion in ("completion", None)
        and loc == "line"
        and Path(p).suffix.lower() in (".jsonl", ".ndjson", ".json")
    ):
        fmt = "openai-legacy"
    else:
        fmt = "columns"
    return _finish(
        p, raw, examples, skipped, format=fmt, prompt_column=spec.prompt_name, completion_column=spec.completion,
        prompt_template=spec.template,
    )  # fmt: skip


def _conversational_row(
    p: str, where: str, line: int, spec: _Spec, pval: Any, cval: Any, require_completion: bool,
    empty_text: Policy, skipped: dict[str, int],
) -> GenExample | None:  # fmt: skip
    assert spec.prompt is not None
    msgs = _messages(p, where, spec.prompt, pval, prompt_side=True)
    if not msgs:
        raise DataError(f"{p}: {where}, key '{spec.prompt}': no messages")
    if cval is None:
        if require_completion:
            raise DataError(f"{p}: {where}: no '{spec.completion}' (expected a list of messages)")
    elif isinstance(cval, str):
        msgs.append(Message("assistant", cval))
    else:
        assert spec.completion is not None
        comp = _messages(p, where, spec.completion, cval)
        if not comp and require_completion:
            raise DataError(f"{p}: {where}, key '{spec.completion}': no messages")
        msgs.extend(comp)
    if not _conversation_ok(p, where, msgs, require_completion, empty_text, skipped):
        return None
    return GenExample(msgs, line, False)


# ---------------------------------------------------------------------------------------------- sniffing


def _sample_rows(p: str, n: int = 200) -> tuple[list[str], dict[str, list[Any]]]:
    """Column names and the first ``n`` rows' values, reading little of a big file."""
    suffix = Path(p).suffix.lower()
    if suffix in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(p)
        names = [str(x) for x in pf.schema_arrow.names]
        if pf.metadata.num_row_groups == 0:
            return names, {}
        t = pf.read_row_group(0).slice(0, n)
        return names, {str(k): t.column(j).to_pylist() for j, k in enumerate(t.column_names)}
    with open(p, "rb") as f:
        data = f.read(1 << 18)
    more = len(data) == 1 << 18
    text = data.decode("utf-8-sig", errors="ignore")
    if more and "\n" in text:
        text = text[: text.rindex("\n") + 1]
    if suffix in (".csv", ".tsv", ".tab"):
        try:
            raw = _read_delimited(p, text, "," if suffix == ".csv" else "\t")
        except DataError:  # e.g. a quoted field cut by the sample: the header alone decides
            first = text.split("\n", 1)[0].removesuffix("\r")
            sep = "\t" if "\t" in first else ","
            return [h.strip().strip('"') for h in first.split(sep)], {}
        return list(raw.columns), {k: v[:n] for k, v in raw.columns.items()}
    stripped = text.lstrip()
    if stripped.startswith("[") and not more:
        obj = json.loads(text)
        rows = [r for r in obj[:n] if isinstance(r, dict)] if isinstance(obj, list) else []
    else:
        rows = []
        for line in text.split("\n"):
            if line.strip():
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    break
                if isinstance(r, dict):
                    rows.append(r)
            if len(rows) >= n:
                break
    names: dict[str, None] = {}
    for r in rows:
        names.update(dict.fromkeys(r))
    return list(names), {k: [r.get(k) for r in rows] for k in names}


def looks_like_generation(path: str | os.PathLike[str]) -> bool:
    """A cheap guess for task auto-detection: True for chat files (a ``messages`` key) and files with
    prompt/completion-like columns (:data:`GEN_PAIRS`, instruction/output). A pair whose second column
    looks like class labels (few distinct short values, e.g. BoolQ's question/answer) is not counted, as
    ``target``/``answer`` also name labels; ``prompt``/``completion`` always count. Never raises."""
    try:
        names, sample = _sample_rows(str(path))
    except Exception:
        return False
    folded = {n.lower(): n for n in names}
    if "messages" in folded:
        return True
    if "instruction" in folded and "output" in folded:
        return True
    for a, b in GEN_PAIRS:
        if a in folded and b in folded:
            values = sample.get(folded[b], [])
            if (a, b) != ("prompt", "completion") and len(values) >= 4 and _looks_like_label(values):
                continue
            return True
    return False


# ---------------------------------------------------------------------------------------------- encoding


@dataclass
class GenEncoded:
    """Token ids and loss labels per row (unpadded); ``encoded[i] == (input_ids[i], labels[i])``."""

    input_ids: list[list[int]]
    labels: list[list[int]]  # -100 where there is no loss
    prompt_ids: list[list[int]]  # what generation starts from (cut like input_ids)
    target_tokens: list[int]  # labels != -100 per row
    lengths: list[int]
    cut: list[int]  # lines of rows whose prompt start was cut
    completion_too_long: list[int]  # lines of rows whose completion alone did not fit (end cut, no EOS)

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> tuple[list[int], list[int]]:
        return self.input_ids[i], self.labels[i]

    @property
    def truncated(self) -> int:
        """Rows cut to fit max_length (the count the training log prints, as for classification)."""
        return len(self.cut)


def _resolve_template(tokenizer: Any, chat_template: str) -> str | None:
    """The Jinja text to use, or None for no template."""
    if chat_template == "none":
        return None
    if chat_template == "auto":
        t = getattr(tokenizer, "chat_template", None)
        if isinstance(t, dict):
            t = t.get("default")
        return t if isinstance(t, str) and t.strip() else None
    if not isinstance(chat_template, str) or not chat_template.strip():
        raise ConfigError("--chat-template must be auto, none or a Jinja template file", key="data.chat_template")
    if "{{" in chat_template or "{%" in chat_template:
        return chat_template  # an inline template (e.g. from a YAML config)
    if not os.path.isfile(chat_template):
        raise ConfigError(
            f"--chat-template {chat_template}: no such file; use auto, none or a Jinja template file",
            key="data.chat_template",
        )
    try:
        text = Path(chat_template).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"--chat-template {chat_template}: cannot read the file ({e})", key="data.chat_template"
        ) from None
    if not text.strip():
        raise ConfigError(f"--chat-template {chat_template}: the file is empty", key="data.chat_template")
    return text


def _render(tokenizer: Any, template: str, msgs: Sequence[Message], gen: bool) -> str:
    conv = [{"role": m.role, "content": m.content} for m in msgs]
    out = tokenizer.apply_chat_template(conv, chat_template=template, tokenize=False, add_generation_prompt=gen)
    if not isinstance(out, str):
        raise TypeError(f"apply_chat_template returned {type(out).__name__}")
    return out


def _empty_prompt(tokenizer: Any, template: str) -> str:
    """The generation prompt of an empty conversation (a chat that opens with the assistant); "" if none renders."""
    try:
        return _render(tokenizer, template, [], True)
    except Exception:
        return ""


def _special_ids(tokenizer: Any) -> set[int]:
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(t, "special", False):
            ids.add(int(i))
    return ids


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(map(int, tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]))


def _end_of_turn(tokenizer: Any, template: str) -> int | None:
    """The special token the template closes an assistant turn with (``<|im_end|>``, ``<|eot_id|>``, ...)."""
    u, a = Message("user", "Hi"), Message("assistant", "Hello")
    try:
        prompt = _render(tokenizer, template, [u], True)
        full = _render(tokenizer, template, [u, a], False)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"--chat-template: the template cannot render a conversation: {msg}", key="data.chat_template"
        ) from None
    tail = full[len(prompt) :] if full.startswith(prompt) else full
    k = tail.find("Hello")
    tail = tail[k + len("Hello") :] if k >= 0 else tail
    special = _special_ids(tokenizer)
    return next((i for i in _ids(tokenizer, tail) if i in special), None)


def stop_token_ids(tokenizer: Any, chat_template: str = "auto") -> list[int]:
    """Token ids that end a completion: EOS, plus the chat template's end-of-turn token when one is used."""
    out: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        out.append(int(eos))
    template = _resolve_template(tokenizer, chat_template)
    if template is not None:
        eot = _end_of_turn(tokenizer, template)
        if eot is not None and eot not in out:
            out.append(eot)
    return out


def _adds_bos(tokenizer: Any) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and int(with_special[0]) == int(bos)


def _batch_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in range(0, len(texts), _CHUNK):
        chunk = texts[s : s + _CHUNK]
        out.extend(list(map(int, x)) for x in tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"])
    return out


# A row before truncation: ids, labels, where the completion starts, whether ids[0] is a kept BOS.
_Row = tuple[list[int], list[int], int, int]


def _plain_rows(tokenizer: Any, table: GenTable, eos: int, train_on_prompt: bool) -> list[_Row]:
    """No template: plain rows are prompt + completion + EOS; chat rows are "Role: ..." text."""
    bos = [int(tokenizer.bos_token_id)] if _adds_bos(tokenizer) else []
    # Per row: segments (text or ids, is a target); the index of the segment where the completion starts.
    plans: list[tuple[list[tuple[str | list[int], bool]], int]] = []
    for ex in table.examples:
        segs: list[tuple[str | list[int], bool]] = [(bos, False)] if bos else []
        msgs = ex.messages
        last = ex._last_assistant()
        start = -1
        if ex.plain:
            segs.append((msgs[0].content, train_on_prompt))
            if last < len(msgs):
                start = len(segs)
                segs += [(msgs[last].content, True), ([eos], True)]
        else:
            for k, m in enumerate(msgs):
                if m.role != "assistant":
                    segs.append((f"{_ROLE_TEXT[m.role]}: {m.content}\n", train_on_prompt))
                    continue
                segs.append(("Assistant: ", train_on_prompt))
                if k == last:
                    start = len(segs)
                segs += [(m.content, bool(m.weight)), ([eos], bool(m.weight))]
            if last == len(msgs):
                segs.append(("Assistant: ", train_on_prompt))
        plans.append((segs, start if start >= 0 else len(segs)))
    texts = [s for segs, _ in plans for s, _ in segs if isinstance(s, str)]
    it = iter(_batch_ids(tokenizer, texts))
    rows: list[_Row] = []
    for segs, start in plans:
        ids: list[int] = []
        labels: list[int] = []
        plen = 0
        for j, (s, target) in enumerate(segs):
            t = next(it) if isinstance(s, str) else s
            if j == start:
                plen = len(ids)
            ids += t
            labels += t if target else [IGNORE_INDEX] * len(t)
        if start >= len(segs):
            plen = len(ids)
        rows.append((ids, labels, plen, 1 if bos else 0))
    return rows


def _template_rows(
    tokenizer: Any, table: GenTable, template: str, stops: set[int], eos: int | None, train_on_prompt: bool
) -> list[_Row]:
    """With a chat template: render whole; find each assistant turn's span by rendering prefixes."""
    fulls: list[str] = []
    # Per row: [(assistant index k, prompt text, text through turn k or None for the last turn)].
    turns: list[list[tuple[int, str, str | None]]] = []
    for ex in table.examples:
        msgs = ex.messages
        last = ex._last_assistant()
        try:
            fulls.append(_render(tokenizer, template, msgs, gen=last == len(msgs)))
            spans: list[tuple[int, str, str | None]] = []
            for k, m in enumerate(msgs):
                if m.role == "assistant":
                    if k:
                        before = _render(tokenizer, template, msgs[:k], gen=True)
                    else:
                        before = _empty_prompt(tokenizer, template)
                    through = None if k == last else _render(tokenizer, template, msgs[: k + 1], gen=False)
                    spans.append((k, before, through))
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                f"{table.path}: {table.location} {ex.line}: the chat template cannot render this conversation: {msg}"
            ) from None
        turns.append(spans)
    texts = list(fulls)
    for spans in turns:
        for _, before, through in spans:
            texts.append(before)
            if through is not None:
                texts.append(through)
    tokens = _batch_ids(tokenizer, texts)
    full_ids, it = tokens[: len(fulls)], iter(tokens[len(fulls) :])
    bos = getattr(tokenizer, "bos_token_id", None)
    rows: list[_Row] = []
    for ex, ids, spans in zip(table.examples, full_ids, turns):
        where = f"{table.path}: {table.location} {ex.line}"
        labels = list(ids) if train_on_prompt else [IGNORE_INDEX] * len(ids)
        last = ex._last_assistant()
        plen = len(ids)
        add_eos: bool | None = None
        for k, _, through in spans:
            before_ids = next(it)
            through_ids = next(it) if through is not None else ids
            for part, what in ((before_ids, "the prompt"), (through_ids, "the conversation up to this turn")):
                if ids[: len(part)] != part:
                    at = next((i for i, (x, y) in enumerate(zip(ids, part)) if x != y), min(len(ids), len(part)))
                    raise DataError(
                        f"{where}: the chat template renders {what} differently from the start of the whole "
                        f"conversation (message {k + 1}, tokens differ at position {at}), so the completion's "
                        f"tokens cannot be found; use --chat-template none or a template file that renders "
                        f"prefixes the same way"
                    )
            start, end = len(before_ids), len(through_ids)
            stop = next((j for j in range(start, end) if ids[j] in stops), None)
            stop_end = end if stop is None else stop + 1
            weight = ex.messages[k].weight
            labels[start:end] = [IGNORE_INDEX] * (end - start)
            if weight:
                labels[start:stop_end] = ids[start:stop_end]
            if train_on_prompt:
                labels[stop_end:end] = ids[stop_end:end]  # the text after the turn's end token is prompt-like
            if k == last:
                plen = start
                add_eos = stop is None
        ids = list(ids)
        if add_eos and eos is not None:
            ids.append(eos)
            labels.append(eos if ex.messages[last].weight else IGNORE_INDEX)
        rows.append((ids, labels, plen, 1 if ids and bos is not None and ids[0] == bos else 0))
    return rows


def _fit(row: _Row, max_length: int) -> tuple[list[int], list[int], int, bool, bool]:
    """Cut a row to ``max_length`` from the start of its prompt: (ids, labels, prompt length, cut, too long)."""
    ids, labels, plen, head = row
    n = len(ids)
    comp = n - plen
    body = plen - head
    if comp == 0:  # no completion (predict): the prompt must leave room for one generated token
        if n <= max_length - 1:
            return ids, labels, plen, False, False
        keep = max(0, max_length - 1 - head)
        return ids[:head] + ids[n - keep :], labels[:head] + labels[n - keep :], head + keep, True, False
    if n <= max_length:
        return ids, labels, plen, False, False
    if body > 0 and head + 1 + comp <= max_length:
        keep = max_length - head - comp
        sl = slice(plen - keep, n)
        return ids[:head] + ids[sl], labels[:head] + labels[sl], head + keep, True, False
    pkeep = min(body, max(1, (max_length - head) // 2)) if body > 0 else 0
    ckeep = max_length - head - pkeep
    psl, csl = slice(plen - pkeep, plen), slice(plen, plen + ckeep)
    new_ids = ids[:head] + ids[psl] + ids[csl]
    new_labels = labels[:head] + labels[psl] + labels[csl]
    return new_ids, new_labels, head + pkeep, pkeep < body, True


def _cache_key(
    tokenizer: Any, table: GenTable, max_length: int, template: str | None, mode: str, train_on_prompt: bool
) -> str:
    h = hashlib.sha256()
    h.update(f"lmtune-gen-encode-v{_CACHE_VERSION}|{tokenizer_fingerprint(tokenizer)}|{max_length}|{mode}|".encode())
    h.update(f"train_on_prompt={bool(train_on_prompt)}|eos={getattr(tokenizer, 'eos_token_id', None)}|".encode())
    h.update(f"bos={getattr(tokenizer, 'bos_token_id', None)}|".encode())
    tb = (template or "").encode("utf-8", "surrogatepass")
    h.update(len(tb).to_bytes(8, "little") + tb)
    h.update(f"rows:{len(table.examples)}|".encode())
    for ex in table.examples:
        b = json.dumps(
            [ex.line, ex.plain, [[m.role, m.content, m.weight] for m in ex.messages]], ensure_ascii=False
        ).encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))  # length-prefixed
        h.update(b)
    return h.hexdigest()


def _flat(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.asarray([len(r) for r in rows], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.fromiter((t for r in rows for t in r), dtype=np.int64, count=int(offsets[-1]))
    return flat, offsets


def _save(path: str, enc: GenEncoded) -> None:
    ids, off = _flat(enc.input_ids)
    labels, loff = _flat(enc.labels)
    prompts, poff = _flat(enc.prompt_ids)
    atomic_save_npz(path, ids=ids, offsets=off, labels=labels, label_offsets=loff, prompts=prompts, prompt_offsets=poff,
                    cut=np.asarray(enc.cut, dtype=np.int64), too_long=np.asarray(enc.completion_too_long, dtype=np.int64))


def _load(path: str, n_rows: int) -> GenEncoded | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = ("ids", "offsets", "labels", "label_offsets", "prompts", "prompt_offsets", "cut", "too_long")
            parts = {k: z[k] for k in keys}

        def split(flat_key: str, off_key: str) -> list[list[int]] | None:
            flat, off = parts[flat_key], parts[off_key]
            if len(off) != n_rows + 1 or int(off[-1]) != len(flat):
                return None
            fl, o = flat.tolist(), off.tolist()
            return [fl[o[i] : o[i + 1]] for i in range(n_rows)]

        ids, labels = split("ids", "offsets"), split("labels", "label_offsets")
        prompts = split("prompts", "prompt_offsets")
        if ids is None or labels is None or prompts is None:
            return None
        if not np.array_equal(parts["offsets"], parts["label_offsets"]):
            return None
        targets = [sum(1 for y in row if y != IGNORE_INDEX) for row in labels]
        return GenEncoded(
            ids, labels, prompts, targets, [len(r) for r in ids], parts["cut"].tolist(), parts["too_long"].tolist()
        )
    except Exception:  # truncated, corrupt or foreign file: a miss
        return None


def encode_generation(
    tokenizer: Any,
    table: GenTable,
    max_length: int,
    *,
    chat_template: str = "auto",
    train_on_prompt: bool = False,
    cache_dir: str | None = None,
) -> GenEncoded:
    """Tokenise ``table`` with loss labels on the completion (see the module docstring for the rules).

    With ``cache_dir`` the result is cached on disk, keyed by the tokenizer, ``max_length``, the template,
    ``train_on_prompt`` and the rows (with their lines), so trials reuse it.
    """
    if max_length < 4:
        raise ConfigError(f"--max-length must be at least 4 for generation, got {max_length}", key="train.max_length")
    template = _resolve_template(tokenizer, chat_template)
    eos = getattr(tokenizer, "eos_token_id", None)
    if template is None and eos is None:
        raise ConfigError(
            "the tokenizer has no EOS token, so a completion's end cannot be learnt; use a chat template "
            "(--chat-template FILE) or a model whose tokenizer has one",
            key="data.chat_template",
        )
    mode = "template" if template is not None else "plain"
    path = None
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
        key = _cache_key(tokenizer, table, max_length, template, mode, train_on_prompt)
        path = os.path.join(cache_dir, f"gen-encoded-{key[:32]}.npz")
        if os.path.exists(path):
            hit = _load(path, len(table))
            if hit is not None:
                return hit
    if template is not None:
        stops = set(stop_token_ids(tokenizer, chat_template))
        rows = _template_rows(tokenizer, table, template, stops, None if eos is None else int(eos), train_on_prompt)
    else:
        rows = _plain_rows(tokenizer, table, int(eos), train_on_prompt)  # type: ignore[arg-type]

    enc = GenEncoded([], [], [], [], [], [], [])
    for ex, row in zip(table.examples, rows):
        ids, labels, plen, was_cut, too_long = _fit(row, max_length)
        if labels:
            labels[0] = IGNORE_INDEX  # nothing predicts the first token
        enc.input_ids.append(ids)
        enc.labels.append(labels)
        enc.prompt_ids.append(ids[:plen])
        enc.target_tokens.append(sum(1 for y in labels if y != IGNORE_INDEX))
        enc.lengths.append(len(ids))
        if was_cut:
            enc.cut.append(ex.line)
        if too_long:
            enc.completion_too_long.append(ex.line)
    if path is not None:
        _save(path, enc)
    return enc


# ---------------------------------------------------------------------------------------------- splitting


@dataclass
class GenBundle:
    """Training and validation rows of a generation task and a JSON-ready summary of what was read."""

    train: GenTable
    val: GenTable
    summary: dict[str, Any]


def _sample_groups(table: GenTable, max_rows: int, seed: int) -> list[int]:
    """Rows of whole example groups, in a seeded order, until ``max_rows`` rows (at least one group)."""
    groups = list(table.groups().values())
    order = np.random.default_rng(seed).permutation(len(groups))
    keep: list[int] = []
    for g in order:
        if keep and len(keep) + len(groups[g]) > max_rows:
            continue
        keep.extend(groups[g])
        if len(keep) >= max_rows:
            break
    return sorted(keep)


def load_generation_data(cfg: Any) -> GenBundle:
    """Read, check and split prompt -> completion data (``cfg``: a DataConfig).

    Rows that share a prompt (several references, as in E2E) are one example group: a held-out validation
    split takes whole groups, so no prompt is both trained on and validated on, and ``--max-val-rows`` samples
    whole groups (each is scored against all its references). ``--max-train-rows`` samples rows.
    """
    opts = dict(prompt_column=cfg.prompt_column, completion_column=cfg.completion_column,
                prompt_template=cfg.prompt_template, empty_text=cfg.empty_text)
    if not cfg.train_file:
        raise DataError("no training data: pass --train-file (or --data)")
    full = read_generation_table(cfg.train_file, **opts)
    warnings: list[str] = []
    if cfg.val_file:
        train, val, val_source = full, read_generation_table(cfg.val_file, **opts), "file"
    else:
        groups = list(full.groups().values())
        if len(groups) < 2:
            raise DataError(f"{cfg.train_file}: one prompt only; a validation split needs at least 2 (or pass --val-file)")
        order = np.random.default_rng(cfg.split_seed).permutation(len(groups))
        n_val = min(len(groups) - 1, max(1, round(cfg.val_fraction * len(groups))))
        held = sorted(i for g in order[:n_val] for i in groups[g])
        held_set = set(held)
        train, val = full.subset([i for i in range(len(full)) if i not in held_set]), full.subset(held)
        val_source = "split"
    before = {"train": len(train), "val": len(val)}
    if cfg.max_train_rows is not None and cfg.max_train_rows < len(train):
        idx = np.random.default_rng(cfg.split_seed).permutation(len(train))[: cfg.max_train_rows]
        train = train.subset(sorted(int(i) for i in idx))
    if cfg.max_val_rows is not None and cfg.max_val_rows < len(val):
        val = val.subset(_sample_groups(val, cfg.max_val_rows, cfg.split_seed))
    shared = set(train.groups()) & set(val.groups())
    if shared and val_source == "file":
        warnings.append(f"{len(shared)} validation prompts also appear in the training data; validation scores "
                        "them as seen examples")
    for t in (full, val) if val_source == "file" else (full,):
        for why, n in sorted(t.skipped.items()):
            if n:
                warnings.append(f"{t.path}: skipped {n} {'row' if n == 1 else 'rows'} ({why.replace('_', ' ')})")
    summary = {
        "train_file": full.path, "val_file": val.path if val_source == "file" else None, "val_source": val_source,
        "format": full.format, "prompt_column": full.prompt_column, "completion_column": full.completion_column,
        "prompt_template": full.prompt_template,
        "rows": {"train": len(train), "val": len(val)},
        "groups": {"train": len(train.groups()), "val": len(val.groups())},
        "rows_before_sampling": before,
        "skipped": {"train": dict(full.skipped), "val": dict(val.skipped) if val_source == "file" else {}},
        "warnings": warnings,
    }
    return GenBundle(train, val, summary)
