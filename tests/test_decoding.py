"""Batched greedy decoding on tiny random Llama, GPT-2 and Gemma 3 (sliding-window) models: batched == one prompt at a time."""

from __future__ import annotations

import pytest
import torch

from lmtune.decoding import decode, default_max_new_tokens, generate, padding_tokens, plan_batches

from tests.conftest import build_tokenizer

TEXTS = [
    "the film was good",
    "a",
    "it is so very boring and the plot was dull and ugly",
    "nice",
    "the acting was superb really",
    "bad film",
    "quite a story and plot and it was lovely",
    "so",
]
PAD = 0  # the tokenizer's only special token (<|endoftext|>), also the models' eos id
MAX_NEW = 10


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    out = [tokenizer(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in out}) >= 5  # lengths differ, so batches need padding
    return out


def _load(folder: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder)
    # The saved models use std-0.02 weights, whose greedy output mostly repeats one token (GPT-2 above
    # all); wider random weights give varied continuations, a sharper test of batching and stops.
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


@pytest.fixture(params=["llama", "gpt2", "gemma3"])
def model(request):
    return _load(request.getfixturevalue(f"tiny_{request.param}"))


def _one_by_one(model, prompts, **kw):
    return [generate(model, [p], batch_size=1, **kw)[0] for p in prompts]


def _first_stop(row: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in stops:
            return row[:i]
    return row


# ---------------------------------------------------------------------------------------------- generate


def test_batched_left_padded_equals_one_at_a_time(model, prompts):
    kw = dict(pad_id=PAD, stop_ids=[], max_new_tokens=MAX_NEW)
    single = _one_by_one(model, prompts, **kw)
    assert all(len(s) == MAX_NEW for s in single)  # no stop ids: every row runs to max_new_tokens
    assert len({tuple(s) for s in single}) == len(single)  # distinct rows, so a mixed-up order would show
    for bs in (1, 3, 16):
        assert generate(model, prompts, batch_size=bs, **kw) == single, bs
    # the value under the mask does not matter
    assert generate(model, prompts, batch_size=3, **{**kw, "pad_id": 5}) == single


def test_original_order_restored(model, prompts):
    kw = dict(pad_id=PAD, stop_ids=[], max_new_tokens=4)
    base = generate(model, prompts, batch_size=3, **kw)
    perm = [3, 0, 7, 5, 1, 6, 2, 4]
    assert generate(model, [prompts[i] for i in perm], batch_size=3, **kw) == [base[i] for i in perm]


def test_stop_ids_cut_right_before_the_stop(model, prompts):
    kw = dict(pad_id=PAD, max_new_tokens=MAX_NEW)
    free = _one_by_one(model, prompts, stop_ids=[], **kw)
    # a token the model emits, first seen mid-way through a row: that row must end right before it
    candidates = [(r, i) for r in range(len(free)) for i in range(1, MAX_NEW) if free[r][i] not in free[r][:i]]
    row, pos = candidates[len(candidates) // 2]
    stop = free[row][pos]
    second = next(t for t in free[(row + 1) % len(free)] if t != stop)  # a second stop id, from another row
    for stops in ([stop], [stop, second]):
        expected = [_first_stop(f, set(stops)) for f in free]
        assert expected[row] == free[row][:pos]
        assert any(len(e) < MAX_NEW for e in expected)
        for bs in (1, 3, 16):
            out = generate(model, prompts, stop_ids=stops, batch_size=bs, **kw)
            assert out == expected, (stops, bs)
            assert all(t not in stops for o in out for t in o)


def test_max_new_tokens_respected(model, prompts):
    full = generate(model, prompts, pad_id=PAD, stop_ids=[], max_new_tokens=MAX_NEW, batch_size=3)
    for n in (1, 4):
        out = generate(model, prompts, pad_id=PAD, stop_ids=[], max_new_tokens=n, batch_size=3)
        assert out == [f[:n] for f in full]


def test_pad_equal_to_stop_id_is_never_returned(model, prompts):
    free = generate(model, prompts, pad_id=PAD, stop_ids=[], max_new_tokens=MAX_NEW, batch_size=16)
    stop = free[0][0]  # row 0 stops at once; the batch goes on and fills row 0 with pad_id == stop
    out = generate(model, prompts, pad_id=stop, stop_ids=[stop], max_new_tokens=MAX_NEW, batch_size=16)
    assert out == [_first_stop(f, {stop}) for f in free]
    assert out[0] == []


def test_decodes_with_a_cache_when_config_says_use_cache_false(model, prompts):
    expected = generate(model, prompts, pad_id=PAD, stop_ids=[], max_new_tokens=6, batch_size=3)
    model.config.use_cache = False
    widths = []

    def hook(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        widths.append(ids.shape[1])

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        out = generate(model, prompts, pad_id=PAD, stop_ids=[], max_new_tokens=6, batch_size=3)
    finally:
        handle.remove()
    assert out == expected
    # per batch, 6 steps: the whole prompt once, then one new token per step (the cache holds the rest)
    lengths = [len(p) for p in prompts]
    batches = plan_batches(lengths, 3)
    assert len(widths) == len(batches) * 6
    for k, b in enumerate(batches):
        assert widths[6 * k : 6 * k + 6] == [max(lengths[i] for i in b)] + [1] * 5
    assert model.config.use_cache is False  # the caller's config is left as it was


def test_checkpoint_generation_defaults_are_ignored(model, prompts):
    from transformers import GenerationConfig

    expected = generate(model, prompts, pad_id=PAD, stop_ids=[], max_new_tokens=MAX_NEW, batch_size=3)
    assert any(len(set(e)) < len(e) for e in expected)  # some row repeats a token
    noisy = GenerationConfig(do_sample=True, temperature=3.0, top_k=5, repetition_penalty=10.0, no_repeat_ngram_size=1,
                             suppress_tokens=[expected[0][0]], eos_token_id=expected[1][0])  # fmt: skip
    model.generation_config = noisy
    torch.manual_seed(1)
    assert generate(model, prompts, pad_id=PAD, stop_ids=[], max_new_tokens=MAX_NEW, batch_size=3) == expected
    assert model.generation_config is noisy  # restored
    # the defaults would have changed the output: they are live in model.generate
    ids = torch.tensor([prompts[0]])
    with torch.inference_mode():
        raw = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=MAX_NEW)  # fmt: skip
    assert raw[0, len(prompts[0]) :].tolist() != expected[0]


def test_train_mode_restored_and_no_grad(model, prompts):
    model.train()
    out = generate(model, prompts[:2], pad_id=PAD, stop_ids=[], max_new_tokens=3)
    assert model.training and all(len(o) == 3 for o in out)
    model.eval()
    generate(model, prompts[:2], pad_id=PAD, stop_ids=[], max_new_tokens=3)
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


def test_sorting_by_length_reduces_padding(tiny_llama, prompts, monkeypatch):
    model = _load(tiny_llama)
    lengths = [len(p) for p in prompts]
    bs = 3
    seen = []
    real = model.generate

    def spy(*args, **kwargs):
        seen.append(kwargs["attention_mask"].clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    generate(model, prompts, pad_id=PAD, stop_ids=[], max_new_tokens=2, batch_size=bs)
    pads = sum(int((m == 0).sum()) for m in seen)
    in_order = [list(range(i, min(i + bs, len(lengths)))) for i in range(0, len(lengths), bs)]
    assert pads == padding_tokens(lengths, plan_batches(lengths, bs))
    assert pads < padding_tokens(lengths, in_order)
    # left padding: each row's zeros come first, and each batch is as wide as its longest prompt
    for m in seen:
        assert all(torch.equal(r, r.sort().values) for r in m) and bool(m[:, -1].all())
        assert bool(m.sum(dim=1).max() == m.shape[1])


def test_plan_batches_longest_first():
    lengths = [3, 9, 1, 7, 5]
    assert plan_batches(lengths, 2) == [[1, 3], [4, 0], [2]]
    assert padding_tokens(lengths, [[1, 3], [4, 0], [2]]) == 2 + 2 + 0
    assert padding_tokens(lengths, [[0, 1], [2, 3], [4]]) == 6 + 6 + 0


def test_bad_arguments(tiny_llama, prompts):
    model = _load(tiny_llama)
    assert generate(model, [], pad_id=PAD, stop_ids=[], max_new_tokens=3) == []
    with pytest.raises(ValueError):
        generate(model, prompts, pad_id=PAD, stop_ids=[], max_new_tokens=0)
    with pytest.raises(ValueError):
        generate(model, prompts, pad_id=PAD, stop_ids=[], max_new_tokens=3, batch_size=0)
    with pytest.raises(ValueError):
        generate(model, [prompts[0], []], pad_id=PAD, stop_ids=[], max_new_tokens=3)


# ---------------------------------------------------------------------------------------------- decode


def test_decode_skips_special_tokens_and_strips(tokenizer):
    ids = tokenizer(" the film was good  ")["input_ids"]
    eos = tokenizer.eos_token_id
    assert decode(tokenizer, [ids + [eos], [eos], []]) == ["the film was good", "", ""]
    assert decode(tokenizer, []) == []


# ---------------------------------------------------------------------------------------------- default_max_new_tokens


def test_default_max_new_tokens_rule():
    assert default_max_new_tokens([10] * 50) == 16  # ceil(1.5 * 10) + 1
    assert default_max_new_tokens([1]) == 3  # ceil(1.5) + 1
    assert default_max_new_tokens([0, 0]) == 1
    # the 99th percentile ignores a rare outlier: 200 rows of 20 and one of 5000 -> p99 = 20
    assert default_max_new_tokens([20] * 200 + [5000]) == 31
    # ... but not a tail of 2 %
    assert default_max_new_tokens([20] * 98 + [100] * 2) == 151
    assert default_max_new_tokens([3000] * 10) == 1024  # capped
    assert default_max_new_tokens([3000] * 10, cap=64) == 64
    with pytest.raises(ValueError):
        default_max_new_tokens([])
