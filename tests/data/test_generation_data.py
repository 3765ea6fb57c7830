"""Generation data: reading prompt/completion and chat files, loss masks, templates, truncation, cache."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from lmtune.data.generation import (
    GenExample,
    Message,
    encode_generation,
    looks_like_generation,
    read_generation_table,
    stop_token_ids,
)
from lmtune.errors import ConfigError, DataError
from tests.conftest import build_tokenizer

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
IGN = -100


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    t = build_tokenizer()
    t.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    t.chat_template = CHATML
    return t


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def jsonl(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def render(tokenizer, msgs, gen=False) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)


def table(write, name, content, **kw):
    return read_generation_table(write(name, content), **kw)


# ---------------------------------------------------------------------------------------------- reading


def test_columns_csv_detected(write):
    t = table(write, "a.csv", "prompt,completion\nthe film,was good\nit is,so bad\n")
    assert t.format == "columns" and (t.prompt_column, t.completion_column) == ("prompt", "completion")
    assert [e.line for e in t.examples] == [2, 3]
    e = t.examples[0]
    assert e.plain and e.messages == [Message("user", "the film"), Message("assistant", "was good")]
    assert e.completion == "was good" and json.loads(e.prompt_key) == [["user", "the film"]]


@pytest.mark.parametrize(
    "header, prompt_col, completion_col",
    [("Input\tOutput", "Input", "Output"), ("source\ttarget", "source", "target"), ("QUESTION\tanswer", "QUESTION", "answer")],
)
def test_pairs_detected_case_insensitively(write, header, prompt_col, completion_col):
    t = table(write, "a.tsv", f"{header}\nwhat is it\ta film about a dog\n")
    assert (t.prompt_column, t.completion_column) == (prompt_col, completion_col)
    assert t.examples[0].completion == "a film about a dog"


def test_instruction_input_output(write):
    rows = [
        {"instruction": "Translate", "input": "the film", "output": "der Film"},
        {"instruction": "Say hi", "input": "", "output": "hi"},
    ]
    t = table(write, "a.jsonl", jsonl(rows))
    assert t.format == "columns" and t.prompt_column == "instruction+input" and t.completion_column == "output"
    assert [e.messages[0].content for e in t.examples] == ["Translate\n\nthe film", "Say hi"]
    # Without an input column the instruction alone is the prompt.
    t = table(write, "b.csv", "instruction,output\nSay hi,hi\n")
    assert t.examples[0].messages[0].content == "Say hi"


def test_case_only_names_refused(write):
    with pytest.raises(DataError, match=r"a\.csv: columns 'prompt' and 'Prompt' differ only in case; choose one with --prompt-column"):
        table(write, "a.csv", "prompt,Prompt,completion\na,b,c\n")


def test_several_pairs_refused(write):
    with pytest.raises(DataError, match=r"several prompt/completion column pairs \(prompt/completion, question/answer\)"):
        table(write, "a.csv", "prompt,completion,question,answer\na,b,c,d\n")


def test_no_pair_found(write):
    with pytest.raises(DataError, match=r"a\.csv: cannot tell which columns hold the prompt and the completion; columns: \['mr', 'ref'\]"):
        table(write, "a.csv", "mr,ref\na,b\n")


def test_named_columns_e2e_like_groups(write):
    content = (
        "mr,ref\n"
        '"name[A], food[Thai]",A serves Thai food.\n'
        '"name[A], food[Thai]",Thai food is served at A.\n'
        '"name[B], area[riverside]",B is by the river.\n'
        '"name[A], food[Thai]",A is a Thai place.\n'
        "\n"
        '"name[C]",C exists.\n'
    )
    t = table(write, "e2e.csv", content, prompt_column="mr", completion_column="ref")
    assert len(t) == 5 and t.skipped == {"blank_line": 1}
    assert [e.line for e in t.examples] == [2, 3, 4, 5, 7]
    g = t.groups()
    assert list(g.values()) == [[0, 1, 3], [2], [4]]
    assert [t.examples[i].completion for i in g[t.examples[0].prompt_key]] == [
        "A serves Thai food.", "Thai food is served at A.", "A is a Thai place.",
    ]  # fmt: skip
    sub = t.subset([3, 2])
    assert [e.line for e in sub.examples] == [5, 4] and sub.skipped == {"blank_line": 1}
    assert len(sub.groups()) == 2


def test_prompt_template(write):
    content = "en\tde\nthe film\tder Film\na story\teine Geschichte\n"
    t = table(write, "m.tsv", content, prompt_template="Translate to German: {en}", completion_column="de")
    assert t.prompt_template == "Translate to German: {en}" and t.completion_column == "de" and t.prompt_column is None
    assert [e.messages[0].content for e in t.examples] == ["Translate to German: the film", "Translate to German: a story"]
    assert t.examples[1].completion == "eine Geschichte" and t.examples[1].plain
    # The completion column is detected when obvious.
    t = table(write, "n.csv", "word,target\nthe,der\n", prompt_template="{word} ->")
    assert t.completion_column == "target" and t.examples[0].messages[0].content == "the ->"


def test_prompt_template_unknown_column(write):
    msg = r"m\.tsv: --prompt-template 'Translate: \{english\}' uses \{english\}, which is not a column; columns: \['en', 'de'\]"
    with pytest.raises(DataError, match=msg):
        table(write, "m.tsv", "en\tde\na\tb\n", prompt_template="Translate: {english}", completion_column="de")
    with pytest.raises(DataError, match=r"fields must name columns"):
        table(write, "m.tsv", "en\tde\na\tb\n", prompt_template="Translate: {0}", completion_column="de")
    with pytest.raises(DataError, match=r"cannot tell which column holds the completion; columns: \['en', 'de'\]"):
        table(write, "m.tsv", "en\tde\na\tb\n", prompt_template="Translate: {en}")


def test_openai_legacy(write):
    rows = [{"prompt": "the film ->", "completion": " good\n"}, {"prompt": "it is ->", "completion": " bad\n"}]
    t = table(write, "legacy.jsonl", jsonl(rows))
    assert t.format == "openai-legacy" and t.examples[0].plain
    assert t.examples[0].messages == [Message("user", "the film ->"), Message("assistant", " good\n")]


def test_openai_chat_with_extra_keys(write):
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi", "name": "bob"},
            {"role": "assistant", "content": "hello", "weight": 0},
            {"role": "user", "content": "film?"},
            {"role": "assistant", "content": "good"},
        ],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "parallel_tool_calls": False,
    }
    t = table(write, "chat.jsonl", jsonl([row]))
    assert t.format == "openai-chat" and len(t) == 1
    e = t.examples[0]
    assert not e.plain and [m.weight for m in e.messages] == [1, 1, 0, 1, 1]
    assert e.completion == "good"
    assert json.loads(e.prompt_key) == [["system", "Be brief."], ["user", "hi"], ["assistant", "hello"], ["user", "film?"]]


def test_hf_conversational_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    msgs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]]
    p = tmp_path / "c.parquet"
    pq.write_table(pa.table({"messages": msgs}), p)
    t = read_generation_table(p)
    assert t.format == "hf-conversational" and t.location == "row" and t.examples[0].line == 1
    assert t.examples[0].completion == "hello"


def test_hf_prompt_completion_conversational(write):
    row = {
        "prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "film?"}],
        "completion": [{"role": "assistant", "content": "good"}],
    }
    t = table(write, "pc.jsonl", jsonl([row]))
    assert t.format == "hf-prompt-completion"
    e = t.examples[0]
    assert not e.plain and e.completion == "good"
    assert [m.weight for m in e.messages] == [1, 0, 1, 1]  # the prompt's assistant turn is not learnt


def test_predict_without_completion(write):
    t = table(write, "p.csv", "prompt\nthe film\n", require_completion=False)
    assert t.completion_column is None and t.examples[0].completion == "" and len(t.examples[0].messages) == 1
    with pytest.raises(DataError, match=r"p\.csv: cannot tell which columns hold the prompt and the completion"):
        table(write, "p.csv", "prompt\nthe film\n")
    t = table(write, "c.jsonl", jsonl([{"messages": [{"role": "user", "content": "hi"}]}]), require_completion=False)
    assert t.examples[0].completion == "" and t.examples[0].prompt_key == json.dumps([["user", "hi"]], separators=(",", ":"))
    # An empty completion cell in a labelled predict file is no reference, not an error.
    t = table(write, "q.csv", "prompt,completion\na,\nb,c\n", require_completion=False)
    assert [e.completion for e in t.examples] == ["", "c"]


# ---------------------------------------------------------------------------------------------- bad input


BAD_JSONL = [
    ('{"messages": [{"role": "user", "content": "hi"}]}', r"line 2: the last message must be the assistant's .*found 'user'; the conversation has no assistant message"),
    ('{"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}', r"line 2, key 'messages', message 1: unknown role 'tool' \(tool and function calls are not supported\)"),
    ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', r"line 2, key 'messages', message 1: unknown role 'robot'; roles: system, user, assistant"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}', r"line 2, key 'messages', message 2: 'weight' must be 0 or 1, found the number 2"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": true}]}', r"message 2: 'weight' must be 0 or 1, found a boolean"),
    ('{"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "y"}]}', r"message 1: 'weight' is only allowed on assistant messages"),
    ('{"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "y"}]}', r"line 2, key 'messages', message 1: 'content' must be text, found a list"),
    ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}', r"message 1: no 'content'"),
    ('{"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}', r"message 1: no 'role'"),
    ('{"messages": "hi"}', r"line 2, key 'messages': expected a list of messages, found text"),
    ('{"messages": []}', r"line 2, key 'messages': no messages"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]}', r"line 2: every assistant message has weight 0"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": null, "tool_calls": [{"id": 1}]}]}', r"message 2: 'tool_calls' is not supported"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]}', r"line 2: the last assistant message is empty \(empty completion\); fix the row or pass --empty-text skip"),
    ('{"messages": [{"role": "user", "content": "x"}', r"line 2: not valid JSON"),
    ('[1, 2]', r"line 2: expected a JSON object"),
]


@pytest.mark.parametrize("bad, msg", BAD_JSONL, ids=[str(i) for i in range(len(BAD_JSONL))])
def test_bad_chat_rows(write, bad, msg):
    good = '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}'
    p = write("bad.jsonl", good + "\n" + bad + "\n" + good + "\n")
    with pytest.raises(DataError, match=msg) as e:
        read_generation_table(p)
    assert str(e.value).startswith(p + ": ") and "\n" not in str(e.value)


def test_empty_completion_and_prompt(write):
    p = write("a.csv", "prompt,completion\nthe film,good\nit is,\n,bad\n\n")
    with pytest.raises(DataError, match=r"a\.csv: line 3, column 'completion': empty completion; fix the row or pass --empty-text skip"):
        read_generation_table(p)
    t = read_generation_table(p, empty_text="skip")
    assert len(t) == 1 and t.skipped == {"empty_completion": 1, "empty_prompt": 1, "blank_line": 1}
    with pytest.raises(DataError, match=r"b\.jsonl: line 1, column 'completion': missing completion"):
        table(write, "b.jsonl", jsonl([{"prompt": "a"}, {"prompt": "b", "completion": "c"}]))
    with pytest.raises(DataError, match=r"c\.csv: line 2, column 'prompt': empty prompt"):
        table(write, "c.csv", "prompt,completion\n ,x\n")
    with pytest.raises(DataError, match=r"every row was skipped"):
        table(write, "d.csv", "prompt,completion\na,\n", empty_text="skip")


def test_bad_cells(write):
    with pytest.raises(DataError, match=r"a\.jsonl: line 1, column 'completion': expected text, found dict"):
        table(write, "a.jsonl", jsonl([{"prompt": "a", "completion": {"x": 1}}]))
    with pytest.raises(DataError, match=r"b\.jsonl: line 2, column 'prompt': text, but line 1 holds a list of messages"):
        table(write, "b.jsonl", jsonl([
            {"prompt": [{"role": "user", "content": "a"}], "completion": [{"role": "assistant", "content": "b"}]},
            {"prompt": "a", "completion": "b"},
        ]))  # fmt: skip
    with pytest.raises(DataError, match=r"c\.csv: line 3: expected 2 fields"):
        table(write, "c.csv", "prompt,completion\na,b\na,b,c\n")
    with pytest.raises(DataError, match=r"e\.csv: the file is empty"):
        table(write, "e.csv", "")


# ---------------------------------------------------------------------------------------------- sniffing


def test_looks_like_generation(write, tmp_path):
    assert looks_like_generation(write("a.jsonl", jsonl([{"messages": [{"role": "user", "content": "x"}]}])))
    assert looks_like_generation(write("b.csv", "prompt,completion\na,b\n"))
    assert looks_like_generation(write("c.tsv", "instruction\tinput\toutput\na\t\tb\n"))
    assert looks_like_generation(write("d.jsonl", jsonl([{"source": f"s{i}", "target": f"a long target {i}"} for i in range(10)])))
    assert not looks_like_generation(write("e.csv", "text,label\na,pos\nb,neg\n"))
    # question/answer with yes/no answers is classification (BoolQ-like).
    qa = "question,answer\n" + "".join(f"is it {i}?,{'yes' if i % 2 else 'no'}\n" for i in range(20))
    assert not looks_like_generation(write("f.csv", qa))
    assert not looks_like_generation(str(tmp_path / "missing.csv"))
    assert not looks_like_generation(write("g.csv", "mr,ref\na,b\n"))


# ---------------------------------------------------------------------------------------------- encoding: plain


def test_plain_concatenation_exact(write, tok):
    t = table(write, "a.csv", "prompt,completion\nthe film was,really good\n")
    enc = encode_generation(tok, t, 64)
    p, c, eos = ids(tok, "the film was"), ids(tok, "really good"), tok.eos_token_id
    assert enc.input_ids[0] == p + c + [eos]
    assert enc.labels[0] == [IGN] * len(p) + c + [eos]
    assert enc.prompt_ids[0] == p
    assert enc.target_tokens == [len(c) + 1] and enc.lengths == [len(p) + len(c) + 1]
    assert enc.cut == [] and enc.completion_too_long == [] and len(enc) == 1
    assert enc[0] == (enc.input_ids[0], enc.labels[0])
    assert stop_token_ids(tok) == [eos]  # no template: EOS only


def test_plain_train_on_prompt(write, tok):
    t = table(write, "a.csv", "prompt,completion\nthe film was,really good\n")
    enc = encode_generation(tok, t, 64, train_on_prompt=True)
    assert enc.labels[0] == [IGN] + enc.input_ids[0][1:]  # every token but the first (nothing predicts it)
    assert enc.target_tokens == [len(enc.input_ids[0]) - 1]


def test_plain_bos_added_once(write):
    from tokenizers import processors

    t2 = build_tokenizer()
    t2._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", t2.bos_token_id)]
    )
    t = table(write, "a.csv", "prompt,completion\nthe film,good\n")
    enc = encode_generation(t2, t, 64)
    p, c = ids(t2, "the film"), ids(t2, "good")
    assert enc.input_ids[0] == [t2.bos_token_id] + p + c + [t2.eos_token_id]
    assert enc.prompt_ids[0] == [t2.bos_token_id] + p


def test_none_renders_chat_roles(write, chat_tok):
    row = {"messages": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "the film"},
        {"role": "assistant", "content": "good", "weight": 0}, {"role": "user", "content": "and it"},
        {"role": "assistant", "content": "bad"},
    ]}  # fmt: skip
    t = table(write, "c.jsonl", jsonl([row]))
    enc = encode_generation(chat_tok, t, 128, chat_template="none")
    eos = chat_tok.eos_token_id
    head = ids(chat_tok, "System: Be brief.\n") + ids(chat_tok, "User: the film\n") + ids(chat_tok, "Assistant: ")
    first = ids(chat_tok, "good") + [eos]
    mid = ids(chat_tok, "User: and it\n") + ids(chat_tok, "Assistant: ")
    last = ids(chat_tok, "bad") + [eos]
    assert enc.input_ids[0] == head + first + mid + last
    assert enc.labels[0] == [IGN] * len(head + first + mid) + last  # weight 0 turn masked
    assert enc.prompt_ids[0] == head + first + mid
    # A plain row under "none" has no role text.
    t = table(write, "a.csv", "prompt,completion\nthe film,good\n")
    enc = encode_generation(chat_tok, t, 64, chat_template="none")
    assert enc.input_ids[0] == ids(chat_tok, "the film") + ids(chat_tok, "good") + [eos]
    assert stop_token_ids(chat_tok, "none") == [eos]


def test_auto_without_template_renders_chat_as_text(write, tok):
    t = table(write, "c.jsonl", jsonl([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "good"}]}]))
    enc = encode_generation(tok, t, 64)  # the tokenizer has no chat template
    assert enc.input_ids[0] == ids(tok, "User: hi\n") + ids(tok, "Assistant: ") + ids(tok, "good") + [tok.eos_token_id]


# ---------------------------------------------------------------------------------------------- encoding: templates


def test_chatml_plain_row_exact(write, chat_tok):
    t = table(write, "a.csv", "prompt,completion\nthe film was,really good\n")
    enc = encode_generation(chat_tok, t, 128)  # auto: the tokenizer's template, plain rows included
    msgs = [{"role": "user", "content": "the film was"}, {"role": "assistant", "content": "really good"}]
    full = ids(chat_tok, render(chat_tok, msgs))
    prompt = ids(chat_tok, render(chat_tok, msgs[:1], gen=True))
    im_end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    assert enc.input_ids[0] == full  # no EOS appended: <|im_end|> ends the turn
    assert full[: len(prompt)] == prompt and enc.prompt_ids[0] == prompt  # prefix property
    content = ids(chat_tok, "really good")
    assert full[len(prompt) :] == content + [im_end] + ids(chat_tok, "\n")
    assert enc.labels[0] == [IGN] * len(prompt) + content + [im_end] + [IGN]  # the "\n" after <|im_end|> is no target
    assert enc.target_tokens == [len(content) + 1]
    assert stop_token_ids(chat_tok) == [chat_tok.eos_token_id, im_end]


def test_chatml_multi_turn_weights(write, chat_tok):
    conv = [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "the film"},
        {"role": "assistant", "content": "good"}, {"role": "user", "content": "and it"},
        {"role": "assistant", "content": "bad"},
    ]  # fmt: skip
    w0 = [dict(m) for m in conv]
    w0[2]["weight"] = 0
    t = table(write, "c.jsonl", jsonl([{"messages": conv}, {"messages": w0}]))
    enc = encode_generation(chat_tok, t, 256)
    full = ids(chat_tok, render(chat_tok, conv))
    p1 = len(ids(chat_tok, render(chat_tok, conv[:2], gen=True)))
    p2 = len(ids(chat_tok, render(chat_tok, conv[:4], gen=True)))
    im_end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    good, bad = ids(chat_tok, "good") + [im_end], ids(chat_tok, "bad") + [im_end]
    assert enc.input_ids[0] == enc.input_ids[1] == full
    expect = [IGN] * len(full)
    expect[p2 : p2 + len(bad)] = bad
    assert enc.labels[1] == expect  # weight 0: only the last turn is learnt
    expect[p1 : p1 + len(good)] = good
    assert enc.labels[0] == expect  # weight 1 (default): both assistant turns
    assert enc.prompt_ids[0] == full[:p2]
    assert enc.target_tokens == [len(good) + len(bad), len(bad)]
    # train_on_prompt keeps an explicit weight 0 turn masked.
    enc = encode_generation(chat_tok, t, 256, train_on_prompt=True)
    assert enc.labels[0] == [IGN] + full[1:]
    assert enc.labels[1][p1 : p1 + len(good)] == [IGN] * len(good) and enc.labels[1][p1 - 1] == full[p1 - 1]


def test_template_file_and_eos_appended(write, tmp_path, tok):
    # A template without an end-of-turn token: EOS is appended after the completion.
    tpl = tmp_path / "simple.jinja"
    tpl.write_text(
        "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:\n{% endif %}"
    )
    t = table(write, "a.csv", "prompt,completion\nthe film,good\n")
    enc = encode_generation(tok, t, 64, chat_template=str(tpl))
    eos = tok.eos_token_id
    prompt = ids(tok, "user:\nthe film\nassistant:\n")
    tail = ids(tok, "good\n")
    assert enc.input_ids[0] == prompt + tail + [eos]
    assert enc.prompt_ids[0] == prompt
    assert enc.labels[0] == [IGN] * len(prompt) + tail + [eos]
    assert stop_token_ids(tok, str(tpl)) == [eos]
    with pytest.raises(ConfigError, match=r"--chat-template .*nope\.jinja: no such file"):
        encode_generation(tok, t, 64, chat_template=str(tmp_path / "nope.jinja"))


def test_template_prefix_mismatch(write, tok):
    # "assistant: " + "good" tokenises as "assistant:" + " good": the prompt is no token prefix of the whole.
    tpl = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    p = write("a.csv", "prompt,completion\nthe film,good\nit,bad\n")
    with pytest.raises(DataError, match=r"a\.csv: line 2: the chat template renders the prompt differently") as e:
        encode_generation(tok, read_generation_table(p), 64, chat_template=tpl)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- truncation


def test_truncation_cuts_prompt_start(write, tok):
    long_prompt = " ".join(["the film was really quite a story"] * 6)
    t = table(write, "a.csv", f"prompt,completion\n{long_prompt},so good\nit,bad\n")
    p, c, eos = ids(tok, long_prompt), ids(tok, "so good"), tok.eos_token_id
    max_length = 20
    assert len(p) + len(c) + 1 > max_length
    enc = encode_generation(tok, t, max_length)
    keep = max_length - len(c) - 1
    assert enc.input_ids[0] == p[-keep:] + c + [eos] and enc.lengths[0] == max_length
    assert enc.labels[0] == [IGN] * keep + c + [eos]
    assert enc.prompt_ids[0] == p[-keep:]
    assert enc.cut == [2] and enc.completion_too_long == []


def test_truncation_completion_too_long(write, tok):
    long_completion = " ".join(["the film was really quite a story"] * 6)
    t = table(write, "a.csv", f"prompt,completion\nit is so,{long_completion}\n")
    p, c, eos = ids(tok, "it is so"), ids(tok, long_completion), tok.eos_token_id
    max_length = 16
    enc = encode_generation(tok, t, max_length)
    assert enc.completion_too_long == [2] and enc.cut == []
    assert enc.input_ids[0] == p + c[: max_length - len(p)] and eos not in enc.input_ids[0]
    assert enc.labels[0] == [IGN] * len(p) + c[: max_length - len(p)]
    assert enc.prompt_ids[0] == p and len(enc.prompt_ids[0]) <= max_length - 1
    # A long prompt too: the prompt keeps at most half the room, and both lists name the row.
    long_prompt = long_completion
    t = table(write, "b.csv", f"prompt,completion\n{long_prompt},{long_completion}\n")
    enc = encode_generation(tok, t, max_length)
    assert enc.cut == [2] and enc.completion_too_long == [2]
    assert enc.input_ids[0] == p_last(ids(tok, long_prompt), 8) + c[:8] and len(enc.prompt_ids[0]) == 8


def p_last(x, n):
    return x[-n:]


def test_truncation_with_template_keeps_end_token(write, chat_tok):
    long_prompt = " ".join(["the film was really quite a story"] * 6)
    t = table(write, "a.csv", f"prompt,completion\n{long_prompt},so good\n")
    enc = encode_generation(chat_tok, t, 24)
    im_end = chat_tok.convert_tokens_to_ids("<|im_end|>")
    gen_prompt = ids(chat_tok, "<|im_start|>assistant\n")
    row = enc.input_ids[0]
    assert len(row) == 24 and enc.cut == [1 + 1]
    tail = ids(chat_tok, "so good") + [im_end] + ids(chat_tok, "\n")
    assert row[-len(tail) :] == tail and row[: len(enc.prompt_ids[0])] == enc.prompt_ids[0]
    assert enc.prompt_ids[0][-len(gen_prompt) :] == gen_prompt and len(enc.prompt_ids[0]) == 24 - len(tail)


def test_predict_rows_encode(write, chat_tok):
    t = table(write, "p.csv", "prompt\nthe film\n", require_completion=False)
    enc = encode_generation(chat_tok, t, 64)
    assert enc.input_ids[0] == enc.prompt_ids[0] == ids(chat_tok, render(chat_tok, [{"role": "user", "content": "the film"}], gen=True))
    assert enc.target_tokens == [0]
    enc = encode_generation(chat_tok, t, 8)  # generation must have room for one token
    assert len(enc.prompt_ids[0]) == 7 and enc.cut == [2]


# ---------------------------------------------------------------------------------------------- cache


def test_cache(write, tok, tmp_path):
    t = table(write, "a.csv", "prompt,completion\nthe film,good\nit is,so bad\n")
    cache = tmp_path / "cache"
    a = encode_generation(tok, t, 64, cache_dir=str(cache))
    files = os.listdir(cache)
    assert len(files) == 1
    b = encode_generation(tok, t, 64, cache_dir=str(cache))
    assert b == a
    encode_generation(tok, t, 64, cache_dir=str(cache), train_on_prompt=True)
    encode_generation(tok, t, 32, cache_dir=str(cache))
    assert len(os.listdir(cache)) == 3
    # A cached result is really read back: a corrupt file is a miss and gets rewritten.
    (cache / files[0]).write_bytes(b"junk")
    assert encode_generation(tok, t, 64, cache_dir=str(cache)) == a


def test_example_properties():
    e = GenExample([Message("user", "a"), Message("assistant", "b"), Message("user", "c")], 3, False)
    assert e.completion == "" and len(json.loads(e.prompt_key)) == 3


# ---------------------------------------------------------------------------------------------- real data


def _data_dir() -> Path | None:
    env = os.environ.get("LMTUNE_DATA_DIR")
    d = Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
    return d.resolve() if d.is_dir() else None


DATA = _data_dir()
real = pytest.mark.skipif(DATA is None, reason="shared data folder not found (set LMTUNE_DATA_DIR)")


@real
def test_real_e2e():
    path = DATA / "e2e_nlg" / "train.csv"
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    t = read_generation_table(path, prompt_column="mr", completion_column="ref")
    assert len(t) == len(rows) == 4672 and t.skipped == {}
    assert len(t.groups()) == len({r["mr"] for r in rows}) == 547
    assert t.examples[0].messages[0].content == rows[0]["mr"] and t.examples[-1].completion == rows[-1]["ref"]
    assert not looks_like_generation(path)  # mr/ref is not a detected pair: the user names the columns


@real
def test_real_multi30k():
    path = DATA / "multi30k" / "validation.tsv"
    lines = path.read_text(encoding="utf-8").splitlines()
    t = read_generation_table(path, prompt_template="Translate to German: {en}", completion_column="de")
    assert len(t) == len(lines) - 1 == 1014
    en, de = lines[1].split("\t")
    assert t.examples[0].messages[0].content == f"Translate to German: {en}" and t.examples[0].completion == de
    assert [e.line for e in t.examples] == list(range(2, len(lines) + 1))
