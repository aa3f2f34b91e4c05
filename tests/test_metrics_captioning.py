"""Captioning metrics: CIDEr-D on a three-image corpus worked out by hand from its published definition (document
frequencies, clipping, the length penalty), the same against ``pycocoevalcap``'s reference implementation on
pre-tokenised text, COCO-style tokens, and BLEU-4 / ROUGE-L on hand-checked cases."""

import math
import random

import pytest

from lit_mllm.eval import BLEU4, ROUGEL, CIDErD, cider_d, coco_tokenize


def test_cider_d_by_hand():
    candidates = ["a a b", "b c", "d"]
    references = [["a b", "a c"], ["b c"], ["d d"]]
    # N = 3 images. Document frequencies over the images' references: a 1, b 2, c 2, d 1; every bigram 1.
    # idf = log(3) - log(max(1, df)): w1 for df 0 or 1 (unseen n-grams too), w2 for df 2.
    w1, w2 = math.log(3), math.log(3) - math.log(2)
    penalty = math.exp(-1 / 72)  # length differs by one word, sigma 6
    # image 1 vs "a b": unigrams cand {a: 2 w1, b: w2}, ref {a: w1, b: w2}; a's weight clipped to w1
    uni = (w1**2 + w2**2) / (math.sqrt(4 * w1**2 + w2**2) * math.sqrt(w1**2 + w2**2))
    bi = 1 / math.sqrt(2)  # cand {aa, ab}, ref {ab}, all w1
    s11 = (uni + bi + 0 + 0) / 4 * penalty  # no shared trigram or 4-gram
    # image 1 vs "a c": only a is shared (clipped); no shared bigram
    s12 = (w1**2 / (math.sqrt(4 * w1**2 + w2**2) * math.sqrt(w1**2 + w2**2))) / 4 * penalty
    image1 = 10 * (s11 + s12) / 2
    image2 = 10 * (1 + 1) / 4  # identical: unigram and bigram cosines 1, no trigrams, same length
    image3 = 10 * 1 / 4 * penalty  # cand {d: w1}, ref {d: 2 w1}: clipped dot 2 w1^2 over w1 * 2 w1; no bigram
    scores = cider_d(candidates, references, tokenize=False)
    assert scores == pytest.approx([image1, image2, image3], rel=1e-12)

    metric = CIDErD(tokenize=False)
    metric.update(candidates[:2], references[:2])
    metric.update(candidates[2:], references[2:])
    assert metric.compute().item() == pytest.approx((image1 + image2 + image3) / 3, rel=1e-6)


def _random_corpus(seed: int, n: int):
    rng = random.Random(seed)
    words = "a the dog cat sits on mat red blue big small runs in park grass ball man woman".split()

    def caption():
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, 14)))

    return [caption() for _ in range(n)], [[caption() for _ in range(rng.randint(1, 5))] for _ in range(n)]


def test_cider_d_equals_pycocoevalcap():
    pytest.importorskip("pycocoevalcap", reason="pycocoevalcap is in the dev extra: pip install -e '.[dev]'")
    from pycocoevalcap.cider.cider import Cider

    candidates, references = _random_corpus(0, 40)
    candidates[3] = references[3][0]  # one perfect caption
    corpus, per_image = Cider().compute_score(
        {i: refs for i, refs in enumerate(references)}, {i: [c] for i, c in enumerate(candidates)}
    )
    assert cider_d(candidates, references, tokenize=False) == pytest.approx(
        list(per_image), rel=1e-9, abs=1e-12
    )
    metric = CIDErD(tokenize=False)
    metric.update(candidates, references)
    assert metric.compute().item() == pytest.approx(corpus, rel=1e-6)


def test_coco_tokenize():
    assert coco_tokenize('A dog\'s ball, (red) "quick"... 3.5 black-and-white! Don’t') == [
        "a", "dog", "'s", "ball", "red", "quick", "3.5", "black-and-white", "do", "n't",
    ]  # fmt: skip
    # tokenised captions score like their hand-tokenised forms
    assert cider_d(["A dog, running."], [["a dog running"]]) == cider_d(
        ["a dog running"], [["a dog running"]], tokenize=False
    )


def test_bleu4_and_rouge_l():
    bleu = BLEU4()
    bleu.update(["A cat sits on the mat."], [["a cat sits on the mat", "there is a cat"]])
    assert bleu.compute().item() == pytest.approx(1.0)
    bleu = BLEU4()
    # 6 candidate words against a 6-word reference: 1-grams 5/6, 2-grams 4/5, 3-grams 3/4, 4-grams 2/3, BP 1
    bleu.update(["a cat sits on the rug"], [["a cat sits on the mat"]])
    expected = (5 / 6 * 4 / 5 * 3 / 4 * 2 / 3) ** 0.25
    assert bleu.compute().item() == pytest.approx(expected, rel=1e-5)
    rouge = ROUGEL()
    # LCS of "a cat on the mat" and "the cat sat on the mat" is "cat on the mat": P 4/5, R 4/6
    rouge.update(["A cat on the mat"], [["the cat sat on the mat", "zzz"]])
    p, r = 4 / 5, 4 / 6
    assert rouge.compute().item() == pytest.approx(2 * p * r / (p + r), rel=1e-5)
