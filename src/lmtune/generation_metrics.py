"""Generation metrics: exact match, token F1, ROUGE-L, BLEU and chrF, against several references per example.

Each prediction is scored against ALL of its references (multi-reference, as in E2E NLG): exact match,
token F1 and ROUGE-L take the best reference per example and average over examples; BLEU and chrF are
corpus-level and come from sacrebleu, which clips n-gram counts against all references of a segment.
Everything is on a 0-100 scale, the scale papers report (E2E: BLEU 65.9, ROUGE-L 68.5).

The scores come from the field's reference implementations (sacrebleu, rouge-score); only the SQuAD
answer normalisation and token F1 (a few lines in the SQuAD v1.1 evaluation script) are written here.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

__all__ = ["METRICS", "generation_metrics", "example_scores", "normalize_answer", "exact_match", "token_f1"]

# name -> higher is better. val_loss and perplexity come from the training loop, the rest from here.
METRICS: dict[str, bool] = {
    "exact_match": True,
    "token_f1": True,
    "rougeL": True,
    "bleu": True,
    "chrf": True,
    "val_loss": False,
    "perplexity": False,
}

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 (0-1) of the normalised bags of words; two empty answers match (1.0), one empty scores 0."""
    p = normalize_answer(prediction).split()
    r = normalize_answer(reference).split()
    if not p or not r:
        return float(p == r)
    same = sum((Counter(p) & Counter(r)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(r)
    return 2 * precision * recall / (precision + recall)


def _check(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[str]]:
    if isinstance(references, str) or isinstance(predictions, str):
        raise TypeError("predictions must be a list of strings and references a list of lists of strings")
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    refs: list[list[str]] = []
    for i, (p, r) in enumerate(zip(predictions, references)):
        if not isinstance(p, str):
            raise TypeError(f"prediction {i} is {type(p).__name__}, not a string")
        if isinstance(r, str):
            raise TypeError(f"references[{i}] is a string: give a list of reference strings per example")
        r = list(r)
        if not r:
            raise ValueError(f"example {i} has no reference")
        if not all(isinstance(x, str) for x in r):
            raise TypeError(f"references[{i}] holds a non-string")
        refs.append(r)
    return refs


def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def _example_scores(predictions: Sequence[str], refs: list[list[str]]) -> list[dict[str, float]]:
    scorer = _rouge_scorer()
    out = []
    for p, r in zip(predictions, refs):
        # rouge-score's tokenizer keeps only [a-z0-9] tokens: text in other scripts scores 0 ROUGE-L.
        rl = max(scorer.score(ref, p)["rougeL"].fmeasure for ref in r)  # score(target, prediction)
        out.append({
            "exact_match": 100.0 * max(exact_match(p, ref) for ref in r),
            "token_f1": 100.0 * max(token_f1(p, ref) for ref in r),
            "rougeL": 100.0 * rl,
        })  # fmt: skip
    return out


def example_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[dict[str, float]]:
    """Per example: exact_match, token_f1 and rougeL (0-100, best reference), for best/worst tables."""
    return _example_scores(predictions, _check(predictions, references))


def _streams(refs: list[list[str]]) -> list[list[str | None]]:
    """Per-example reference lists -> sacrebleu's reference streams (stream k = every example's k-th reference).

    Examples with fewer references are padded with ``None``, which sacrebleu drops per segment
    (``Metric._cache_references``); an empty string would instead count as a real, empty reference.
    """
    k = max(len(r) for r in refs)
    return [[r[j] if j < len(r) else None for r in refs] for j in range(k)]


def generation_metrics(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus-level exact_match, token_f1, rougeL, bleu and chrf (0-100) of ``predictions`` against ``references``.

    ``references[i]`` is the list of acceptable outputs for ``predictions[i]`` (one or more; counts may differ).
    BLEU is sacrebleu's default (13a tokenisation, exp smoothing), chrF is chrF2 (character 6-grams, beta 2).
    """
    import sacrebleu

    refs = _check(predictions, references)
    preds = list(predictions)
    per = _example_scores(preds, refs)
    n = len(per)
    streams = _streams(refs)
    return {
        "exact_match": sum(e["exact_match"] for e in per) / n,
        "token_f1": sum(e["token_f1"] for e in per) / n,
        "rougeL": sum(e["rougeL"] for e in per) / n,
        "bleu": float(sacrebleu.corpus_bleu(preds, streams).score),
        "chrf": float(sacrebleu.corpus_chrf(preds, streams).score),
    }
