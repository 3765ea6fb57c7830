"""generation_metrics and example_scores: hand-computed cases, multi-reference, ragged references."""

from __future__ import annotations

import pytest
import sacrebleu

from lmtune.generation_metrics import (
    METRICS,
    example_scores,
    exact_match,
    generation_metrics,
    normalize_answer,
    token_f1,
)

KEYS = {"exact_match", "token_f1", "rougeL", "bleu", "chrf"}


def test_metrics_directions():
    assert METRICS == {"exact_match": True, "token_f1": True, "rougeL": True, "bleu": True, "chrf": True,
                       "val_loss": False, "perplexity": False}  # fmt: skip


def test_identical_strings_score_100_everywhere():
    # BLEU needs 4-grams: with fewer than 4 tokens sacrebleu gives an exact copy 0, so use longer strings
    preds = ["the cat sat on the mat", "There is a small dog in the garden."]
    m = generation_metrics(preds, [[p] for p in preds])
    assert set(m) == KEYS
    for k, v in m.items():
        assert v == pytest.approx(100.0), k
    perfect = {"exact_match": 100.0, "token_f1": 100.0, "rougeL": 100.0}
    assert example_scores(preds, [[p] for p in preds]) == [perfect] * 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The  Cat, sat!", "cat sat"),
        ("An apple a day", "apple day"),
        ("the theater", "theater"),  # articles are whole words only
        ("  Hello,\tWORLD...\n", "hello world"),
        ("don't", "dont"),
        ("", ""),
    ],
)
def test_squad_normalisation(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_and_token_f1_by_hand():
    assert exact_match("The Cat!", "cat") == 1.0
    assert exact_match("a cat", "cats") == 0.0
    # pred {cat, sat}, ref {cat, sat, down}: P = 1, R = 2/3, F1 = 0.8
    assert token_f1("the cat sat", "a cat sat down") == pytest.approx(0.8)
    # repeated tokens count with multiplicity: pred {cat, cat}, ref {cat}: P = 1/2, R = 1, F1 = 2/3
    assert token_f1("cat cat", "cat") == pytest.approx(2 / 3)
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("the", "") == 1.0  # both normalise to nothing
    assert token_f1("", "cat") == 0.0


def test_rouge_l_by_hand_and_stemming():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5: P = 5/6, R = 1, F = 10/11
    (e,) = example_scores(["the cat sat on the mat"], [["the cat on the mat"]])
    assert e["rougeL"] == pytest.approx(100 * 10 / 11)
    (e,) = example_scores(["cats running"], [["cat runs"]])  # Porter stemmer: cat run == cat run
    assert e["rougeL"] == pytest.approx(100.0)
    assert e["exact_match"] == 0.0 and e["token_f1"] == 0.0


def test_multi_reference_takes_the_best_reference():
    preds = ["cat sat", "the cat sat on the mat"]
    refs = [["dog ran", "Cat sat."], ["a dog", "the cat on the mat"]]
    per = example_scores(preds, refs)
    assert per[0] == {"exact_match": 100.0, "token_f1": 100.0, "rougeL": 100.0}
    # second: best F1 is against ref 2: pred {cat sat on mat}, ref {cat on mat}: P = 3/4, R = 1, F1 = 6/7
    assert per[1]["exact_match"] == 0.0
    assert per[1]["token_f1"] == pytest.approx(100 * 6 / 7)
    assert per[1]["rougeL"] == pytest.approx(100 * 10 / 11)
    m = generation_metrics(preds, refs)
    assert m["exact_match"] == pytest.approx(50.0)
    assert m["token_f1"] == pytest.approx((100 + 100 * 6 / 7) / 2)
    assert m["rougeL"] == pytest.approx((100 + 100 * 10 / 11) / 2)
    # and it is never worse than scoring against either reference alone
    for j in range(2):
        single = generation_metrics(preds, [[r[j]] for r in refs])
        for k in KEYS:
            assert m[k] >= single[k] - 1e-9, (k, j)


def test_bleu_and_chrf_match_sacrebleu_directly():
    preds = ["the cat is on the mat", "there is a dog here", "a bird flew over the house today"]
    refs = [["the cat sat on the mat", "a cat is on the mat"], ["a dog is here", "here is a dog"],
            ["a bird flew over the house", "the bird flew above the house today"]]  # fmt: skip
    streams = [[r[0] for r in refs], [r[1] for r in refs]]
    m = generation_metrics(preds, refs)
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds, streams).score)
    single = generation_metrics(preds, [[r[0]] for r in refs])
    assert single["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [streams[0]]).score)
    assert 0 < m["bleu"] < 100 and 0 < m["chrf"] < 100
    assert m["bleu"] > single["bleu"]  # the second references add matches


def test_ragged_reference_counts():
    # The short hypothesis "x y" has one reference: the padding must not add an empty reference, which
    # would be the "closest length" (0) and switch the brevity penalty off (sacrebleu would say 100).
    preds = ["x y", "a b c d e f"]
    ragged = [["x y z w v u"], ["a b c d e f", "a b c d e f g"]]
    filled = [["x y z w v u", "x y z w v u"], ["a b c d e f", "a b c d e f g"]]  # repeating a ref changes nothing
    m = generation_metrics(preds, ragged)
    f = generation_metrics(preds, filled)
    for k in KEYS:
        assert m[k] == pytest.approx(f[k]), k
    stream0 = ["x y z w v u", "a b c d e f"]
    assert m["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, [stream0, [None, "a b c d e f g"]]).score)
    assert sacrebleu.corpus_bleu(preds, [stream0, ["", "a b c d e f g"]]).score == pytest.approx(100)
    assert m["bleu"] < 99  # the brevity penalty applied
    # the other order: the first example has more references than a later one
    m2 = generation_metrics(preds[::-1], ragged[::-1])
    assert m2["bleu"] == pytest.approx(m["bleu"]) and m2["chrf"] == pytest.approx(m["chrf"])
    # three rows with 1, 3 and 2 references
    preds3 = ["the cat sat on the mat", "a dog is here", "birds fly south"]
    refs3 = [["the cat sat on the mat"], ["a dog is there", "the dog is here", "dog here"],
             ["birds fly north", "birds go south"]]  # fmt: skip
    m3 = generation_metrics(preds3, refs3)
    streams = [[r[j] if j < len(r) else None for r in refs3] for j in range(3)]
    assert m3["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds3, streams).score)
    assert m3["chrf"] == pytest.approx(sacrebleu.corpus_chrf(preds3, streams).score)


def test_bad_inputs():
    with pytest.raises(ValueError):
        generation_metrics([], [])
    with pytest.raises(ValueError):
        example_scores([], [])
    with pytest.raises(ValueError):
        generation_metrics(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError):
        generation_metrics(["a"], [[]])
    with pytest.raises(TypeError):
        generation_metrics(["a"], ["a"])  # a bare string per example, not a list of references


def test_empty_prediction_scores_zero():
    m = generation_metrics(["", "the cat sat on the mat"], [["a dog"], ["the cat sat on the mat"]])
    assert m["exact_match"] == pytest.approx(50.0) and m["token_f1"] == pytest.approx(50.0)
    assert m["rougeL"] == pytest.approx(50.0)
