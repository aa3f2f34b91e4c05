"""Captioning metrics: CIDEr-D (Vedantam et al. 2015, the COCO caption evaluation's "CIDEr"), and BLEU-4 and
ROUGE-L through torchmetrics, each on COCO-style tokens (:func:`coco_tokenize`).

CIDEr-D of a candidate ``c`` against its references ``s_1..s_m``, in a corpus of ``N`` samples::

    CIDEr-D(c, S) = 10 / m * sum_j mean_{n=1..4} exp(-(l(c) - l(s_j))^2 / (2 sigma^2))
                    * <min(g^n(c), g^n(s_j)), g^n(s_j)> / (|g^n(c)| |g^n(s_j)|)

where ``g^n(x)`` holds, for every n-gram ``w`` of order ``n`` in ``x``, its count in ``x`` times
``log(N) - log(max(1, df(w)))``, ``df(w)`` being the number of samples whose references contain ``w`` (document
frequencies come from the evaluated corpus' references), ``min`` clips the candidate's weights by the
reference's, ``l`` is a length in words and ``sigma = 6``. The corpus score is the mean over samples. This is the
definition the reference implementation (``pycocoevalcap``'s ``CiderScorer``) computes; a test checks the two agree
on pre-tokenised text.

Tokens: ``pycocoevalcap`` runs the Stanford PTB tokenizer (Java) and drops punctuation tokens.
:func:`coco_tokenize` approximates it in Python: lower-case, words (with inner hyphens, periods and apostrophes)
and single symbols, clitics split off (``dog's`` -> ``dog 's``, ``don't`` -> ``do n't``), COCO's punctuation
dropped. Scores on text PTB would split differently (rare symbols, brackets) can differ slightly from the
Java-tokenised ones.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable

import torch
from torch import Tensor
from torchmetrics.functional.text import rouge_score
from torchmetrics.text import BLEUScore
from torchmetrics.utilities import dim_zero_cat

from lit_mllm.eval.metrics import EvalMetric, EvalOutputs, generated, stable_hash

_TOKEN = re.compile(r"\w+(?:[-.'’]\w+)*|\.\.\.|--|\S")
_CLITIC = re.compile(r"(n't|'s|'re|'ve|'ll|'m|'d)$")
# COCO's PTBTokenizer wrapper drops these tokens (quotes and brackets arrive from PTB as `` '' -LRB- -RRB-)
PUNCTUATION_TOKENS = frozenset(["''", "'", "``", "`", '"', "(", ")", "{", "}", ".", "?", "!", ",", ":", "-", "--", "...", ";"])  # fmt: skip


def coco_tokenize(text: str) -> list[str]:
    """COCO-style tokens of a caption (see the module docstring)."""
    tokens = []
    for tok in _TOKEN.findall(text.lower().replace("’", "'")):
        m = _CLITIC.search(tok)
        if m and m.start() > 0:
            tokens += [tok[: m.start()], tok[m.start() :]]
        else:
            tokens.append(tok)
    return [t for t in tokens if t not in PUNCTUATION_TOKENS]


def ngram_counts(tokens: list[str], n: int = 4) -> Counter:
    """``{(order, ngram): count}`` for the n-grams of orders 1..n of ``tokens``."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(tokens) - k + 1):
            counts[(k, tuple(tokens[i : i + k]))] += 1
    return counts


def cider_d_from_counts(
    candidates: list[Counter], references: list[list[Counter]], n: int = 4, sigma: float = 6.0
) -> list[float]:
    """Per-sample CIDEr-D (module docstring) from n-gram counts keyed ``(order, key)`` (any hashable key that
    identifies the n-gram); a sample's length is its count of order-1 n-grams."""
    if len(candidates) != len(references):
        raise ValueError(f"CIDEr-D: {len(candidates)} candidates for {len(references)} reference sets")
    df: Counter = Counter()
    for refs in references:
        df.update(set().union(*refs))
    log_n = math.log(max(len(candidates), 1))

    def weights(counts: Counter) -> tuple[dict[Hashable, float], list[float], int]:
        vec = {w: c * (log_n - math.log(max(1.0, df[w]))) for w, c in counts.items()}
        norms = [0.0] * n
        for w, x in vec.items():
            norms[w[0] - 1] += x * x
        length = sum(c for w, c in counts.items() if w[0] == 1)
        return vec, [math.sqrt(x) for x in norms], length

    scores = []
    for cand, refs in zip(candidates, references, strict=True):
        vec_c, norm_c, len_c = weights(cand)
        total = 0.0
        for ref in refs:
            vec_r, norm_r, len_r = weights(ref)
            sims = [0.0] * n
            for w, x in vec_c.items():
                y = vec_r.get(w, 0.0)
                sims[w[0] - 1] += min(x, y) * y
            for k in range(n):
                if norm_c[k] and norm_r[k]:
                    sims[k] /= norm_c[k] * norm_r[k]
            penalty = math.exp(-((len_c - len_r) ** 2) / (2 * sigma**2))
            total += sum(sims) / n * penalty
        scores.append(10.0 * total / len(refs))
    return scores


def cider_d(
    candidates: list[str], references: list[list[str]], n: int = 4, sigma: float = 6.0, tokenize: bool = True
) -> list[float]:
    """Per-sample CIDEr-D of captions against their references over this corpus (module docstring);
    ``tokenize=False``: the text is already tokenised (split on whitespace)."""
    split = coco_tokenize if tokenize else str.split
    return cider_d_from_counts(
        [ngram_counts(split(c), n) for c in candidates],
        [[ngram_counts(split(r), n) for r in refs] for refs in references],
        n,
        sigma,
    )


class CIDErD(EvalMetric):
    """Corpus CIDEr-D of generated captions against the samples' references (module docstring).

    The document frequencies need every rank's references, so each sample's n-grams are kept as rows of numbers
    (n-grams hashed by :func:`~lit_mllm.eval.metrics.stable_hash`) and scored in ``compute``. Samples without
    references are not counted.
    """

    full_state_update = False
    needs_generation = True

    def __init__(self, n: int = 4, sigma: float = 6.0, tokenize: bool = True, **kwargs) -> None:
        """
        Args:
            n: Highest n-gram order (4 in CIDEr-D).
            sigma: Width of the Gaussian length penalty, in words (6 in CIDEr-D).
            tokenize: COCO-style tokenisation (:func:`coco_tokenize`); False: split on whitespace (pre-tokenised
                text).
        """
        super().__init__(**kwargs)
        self.n, self.sigma, self.tokenize = n, sigma, tokenize
        # rows: one n-gram of one segment; segments: a sample's candidate then its references
        for name in ("row_key", "row_order", "row_count", "segment_rows", "sample_refs"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(
        self, predictions: list[str], references: list[list[str]], meta: list[dict] | None = None
    ) -> None:
        split = coco_tokenize if self.tokenize else str.split
        keys, orders, counts, segment_rows, sample_refs = [], [], [], [], []
        for caption, refs in zip(predictions, references, strict=True):
            if not refs:
                continue
            sample_refs.append(len(refs))
            for text in [caption, *refs]:
                grams = ngram_counts(split(text), self.n)
                segment_rows.append(len(grams))
                for (order, gram), count in grams.items():
                    keys.append(stable_hash(" ".join(gram)))
                    orders.append(order)
                    counts.append(count)
        for name, values in (
            ("row_key", keys),
            ("row_order", orders),
            ("row_count", counts),
            ("segment_rows", segment_rows),
            ("sample_refs", sample_refs),
        ):
            getattr(self, name).append(torch.tensor(values, dtype=torch.long, device=self.device))

    def update_from(self, outputs: EvalOutputs) -> None:
        self.update(*generated(outputs, type(self).__name__))

    def _counts(self) -> tuple[list[Counter], list[list[Counter]]]:
        """The samples' n-gram counts back from the row states."""
        state = {
            name: dim_zero_cat(getattr(self, name)).long().tolist() if len(getattr(self, name)) else []
            for name in ("row_key", "row_order", "row_count", "segment_rows", "sample_refs")
        }
        rows = iter(zip(state["row_order"], state["row_key"], state["row_count"], strict=True))
        segments = iter(state["segment_rows"])

        def segment() -> Counter:
            return Counter(
                {(order, key): count for order, key, count in (next(rows) for _ in range(next(segments)))}
            )

        candidates, references = [], []
        for m in state["sample_refs"]:
            candidates.append(segment())
            references.append([segment() for _ in range(m)])
        return candidates, references

    def compute(self) -> Tensor:
        candidates, references = self._counts()
        scores = cider_d_from_counts(candidates, references, self.n, self.sigma)
        return torch.tensor(sum(scores) / max(len(scores), 1), dtype=torch.float32)


class BLEU4(EvalMetric, BLEUScore):
    """Corpus BLEU-4 of generated captions against the samples' references (torchmetrics' ``BLEUScore``,
    uniform weights, brevity penalty from the closest reference length) on :func:`coco_tokenize` tokens."""

    full_state_update = False
    needs_generation = True

    def __init__(self, **kwargs) -> None:
        super().__init__(n_gram=4, **kwargs)

    def update(
        self, predictions: list[str], references: list[list[str]], meta: list[dict] | None = None
    ) -> None:
        pairs = [(p, refs) for p, refs in zip(predictions, references, strict=True) if refs]
        if pairs:
            super().update(
                [" ".join(coco_tokenize(p)) for p, _ in pairs],
                [[" ".join(coco_tokenize(r)) for r in refs] for _, refs in pairs],
            )

    def update_from(self, outputs: EvalOutputs) -> None:
        self.update(*generated(outputs, type(self).__name__))


class ROUGEL(EvalMetric):
    """Mean ROUGE-L F-measure of generated captions (torchmetrics' ``rouge_score``, the best-scoring reference of
    each sample) on :func:`coco_tokenize` tokens. COCO's ROUGE-L differs slightly: F with beta 1.2 from the
    precision and recall maxima over references.

    Kept as a sum and a count rather than torchmetrics' ``ROUGEScore``, whose per-sample list states are gathered
    one element at a time and so need the same number of samples on every rank."""

    full_state_update = False
    needs_generation = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("fmeasure", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(
        self, predictions: list[str], references: list[list[str]], meta: list[dict] | None = None
    ) -> None:
        pairs = [(p, refs) for p, refs in zip(predictions, references, strict=True) if refs]
        if pairs:
            mean = rouge_score(
                [" ".join(coco_tokenize(p)) for p, _ in pairs],
                [[" ".join(coco_tokenize(r)) for r in refs] for _, refs in pairs],
                rouge_keys="rougeL",
            )["rougeL_fmeasure"]
            self.fmeasure += mean.double() * len(pairs)
            self.total += len(pairs)

    def update_from(self, outputs: EvalOutputs) -> None:
        self.update(*generated(outputs, type(self).__name__))

    def compute(self) -> Tensor:
        return (self.fmeasure / self.total.clamp(min=1)).float()
