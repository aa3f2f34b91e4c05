"""Reading a generated reply the way each benchmark's own evaluation code reads it: pure string functions, no
torch, so every rule can be checked by hand.

- :func:`vqa_normalize` is the official VQA evaluation's answer processing (``vqaEval.py`` of the VQA API,
  ``processPunctuation`` then ``processDigitArticle``), rule for rule and quirk for quirk:

  * punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when it is followed or preceded
    by a space *anywhere* in the text, or when the text has a digit-comma-digit (``1,000``) anywhere; otherwise it
    becomes a space. The apostrophe and the colon are not punctuation here.
  * periods: a period not followed by a digit is deleted (the official pattern ``(?!<=\\d)(\\.)(?!\\d)`` means to
    look behind for a digit but is a look-ahead, so ``2.`` loses its period and ``.5`` keeps it); the official
    call passes ``re.UNICODE`` as the *count*, so at most 32 periods go.
  * words (the text lower-cased and split on whitespace): number words ``none zero one ... ten`` become digits
    (``none`` is ``0``), the articles ``a an the`` are dropped, then the contractions map restores apostrophes
    (``dont`` -> ``don't``), then the words are joined by single spaces.

- :func:`yes_no` reads a yes/no reply as MME's ``eval_tool/calculation.py`` does (POPE has its own reading,
  :func:`pope_yes_no`, from POPE's ``evaluate.py``).
- :func:`option_letter` reads a multiple-choice reply as MMBench's evaluation does before asking a judge model:
  the option letter when exactly one appears as a word, else the option whose text alone appears in the reply.
"""

from __future__ import annotations

import re

# The official VQA evaluation's tables (vqaEval.py), kept as they are, including their odd entries.
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = ("a", "an", "the")
PUNCTUATION = tuple(';/[]"{}()=+\\_-><@`,?!')  # in the official order
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_OFFICIAL_PERIOD_COUNT = re.UNICODE  # vqaEval.py passes re.UNICODE (32) as sub()'s count


def vqa_punctuation(text: str) -> str:
    """The official ``processPunctuation`` (see the module docstring)."""
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in PUNCTUATION:
        if p + " " in text or " " + p in text or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=int(_OFFICIAL_PERIOD_COUNT))


def vqa_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words to digits, articles out, contractions."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def vqa_clean(text: str) -> str:
    """What the official code does to every answer first: newlines and tabs to spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def vqa_normalize(text: str) -> str:
    """:func:`vqa_clean`, :func:`vqa_punctuation`, then :func:`vqa_digit_article`."""
    return vqa_digit_article(vqa_punctuation(vqa_clean(text)))


def vqa_accuracy(reply: str, answers: list[str], normalize_reply: bool = True) -> float:
    """One question's VQA accuracy: the mean, over leaving out each of the human ``answers`` in turn, of
    ``min(#other answers equal to the reply / 3, 1)``, exactly as ``vqaEval.py`` (its current version) scores it.

    Like the official code, the answers and the reply are processed (:func:`vqa_normalize`) only when the answers
    are not all the same; with unanimous answers the cleaned reply is compared as it is. ``normalize_reply``
    processes the reply beforehand in every case, as the answer files submitted to the official server are
    prepared by LLaVA, lmms-eval and the earlier official code (``"Yes."`` then matches ten ``"yes"``); False
    reproduces ``vqaEval.py`` run on raw replies.
    """
    if len(answers) < 2:
        raise ValueError(
            f"VQA accuracy leaves one of the human answers out in turn and needs at least 2, got {answers!r}; "
            "score single-answer questions (GQA) with GeneratedExactMatch(normalize='vqa')"
        )
    reply = vqa_clean(reply)
    if normalize_reply:
        reply = vqa_normalize(reply)
    answers = [vqa_clean(a) for a in answers]
    if len(set(answers)) > 1:
        answers = [vqa_digit_article(vqa_punctuation(a)) for a in answers]
        reply = vqa_digit_article(vqa_punctuation(reply))
    matches = [a == reply for a in answers]
    total = sum(matches)
    return sum(min((total - m) / 3, 1.0) for m in matches) / len(answers)


def yes_no(reply: str) -> str:
    """``"yes"``, ``"no"`` or ``"other"``: MME's reading of a reply (lower-cased; exactly yes/no, else ``yes`` in
    its first four characters, else ``no`` there; so ``"Not sure"`` reads as no). Surrounding whitespace is
    stripped first (MME's result files hold replies stripped by the model's script)."""
    reply = reply.strip().lower()
    if reply in ("yes", "no"):
        return reply
    prefix = reply[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def pope_yes_no(reply: str) -> str:
    """``"yes"`` or ``"no"``: POPE's reading of a reply (``evaluate.py``): its first sentence (up to the first
    period), commas removed, split on spaces; ``no`` when a word is ``No``, ``no`` or ``not``, else ``yes``."""
    text = reply.split(".")[0] if "." in reply else reply
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"


_OPTION_SEPARATORS = ".()[],:;!*#{}"


def option_letter(reply: str, options: dict[str, str]) -> str | None:
    """The option a multiple-choice reply picks, or None when it cannot be read.

    MMBench's reading (VLMEvalKit's ``can_infer``, before it asks a judge model): with ``.()[],:;!*#{}`` turned
    into spaces and the reply split into words, if exactly one option letter is a word and it is among the last
    five words, that letter (``"B"``, ``"(B) a dog"``, ``"The answer is C."``; a sentence opening with the article
    ``A`` is not read as option A); otherwise, if the text of exactly one option appears in the lower-cased
    reply, that option.
    """
    text = reply
    for c in _OPTION_SEPARATORS:
        text = text.replace(c, " ")
    words = text.split()
    letters = [k for k in options if k in words]
    if len(letters) == 1 and words.index(letters[0]) > len(words) - 5:
        return letters[0]
    lowered = reply.lower()
    found = [k for k, v in options.items() if str(v).lower() in lowered]
    return found[0] if len(found) == 1 else None
