"""A small byte-level BPE tokenizer trained offline on generated text, for tiny runs and tests.

The trained files ship in ``lit_mllm/assets/tiny_tokenizer`` and load with ``AutoTokenizer.from_pretrained``
like any Hugging Face tokenizer; :func:`build_tiny_tokenizer` regenerates them (a test checks that it
reproduces the shipped vocabulary). Byte-level BPE can encode any text, so real datasets also run
through it, just with more tokens per word.
"""

from __future__ import annotations

import random
from pathlib import Path

TINY_TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny_tokenizer"
TINY_BERT_TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "assets" / "tiny_bert_tokenizer"
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]
"""BERT's special tokens and BLIP-2's ``[DEC]`` (the Q-Former's decoder start token, its ``bos_token``)."""
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN, "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_WORDS = """
a an the is are was were be been there here this that these those it its of in on at to from with and or
not no yes what which who where when why how many much color colour shape size position count number
red green blue yellow purple orange white black gray grey pink brown cyan magenta
circle circles square squares triangle triangles star stars shape shapes object objects
small large big tiny medium top bottom left right center centre middle upper lower corner side
one two three four five six seven eight nine ten zero 0 1 2 3 4 5 6 7 8 9 10
image picture photo scene describe description caption answer question word single short briefly
chat between curious user human artificial intelligence assistant gives helpful detailed polite answers
system you are please can could would should will do does did have has had see show shows contains
""".split()

_TEMPLATES = [
    "What color is the {s}? Answer with a single word.",
    "How many {s}s are there in the image?",
    "Is there a {c} {s} in the picture? Answer yes or no.",
    "Where is the {c} {s}? Answer with the position.",
    "A {z} {c} {s} at the {p}.",
    "The image shows {n} shapes: a {c} {s} and a {z} {s}.",
    "USER: Describe the image. ASSISTANT: There is a {c} {s} in the {p}.",
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
]


def _corpus(num_lines: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    colours = "red green blue yellow purple orange white gray".split()
    shapes = "circle square triangle star".split()
    sizes = "small large".split()
    places = ["top left", "top right", "bottom left", "bottom right", "center"]
    lines = []
    for i in range(num_lines):
        t = _TEMPLATES[i % len(_TEMPLATES)]
        lines.append(
            t.format(
                s=rng.choice(shapes),
                c=rng.choice(colours),
                z=rng.choice(sizes),
                p=rng.choice(places),
                n=rng.randint(1, 9),
            )
        )
        lines.append(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 16))).capitalize() + ".")
    return lines


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 1024):
    """Train the tiny byte-level BPE tokenizer and save it as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=4096,
    )
    fast.chat_template = CHATML_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_bert_tokenizer(out_dir: str | Path, vocab_size: int = 512):
    """Build a tiny uncased WordPiece tokenizer (BERT's kind: ``[CLS] text [SEP]``, ``[PAD]`` = 0) with BLIP-2's
    ``[DEC]`` as its ``bos_token``, for the Q-Former's text branch (BLIP-2 stage 1), and save it.

    The vocabulary is chosen, not trained (the WordPiece trainer breaks ties differently from run to run): the
    special tokens, every printable ASCII character alone and as a ``##`` continuation, then the corpus' words (and
    ShapesWorld's "diamond") by frequency, then alphabetically, up to ``vocab_size``. Any text encodes; a word
    outside the vocabulary becomes characters."""
    import string
    from collections import Counter

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word
        for line in [*_corpus(), "diamond diamonds"]
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
    )
    chars = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    tokens = [*BERT_SPECIAL_TOKENS, *chars, *("##" + c for c in chars), *words][:vocab_size]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.WordPiece()
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        mask_token="[MASK]",
        bos_token="[DEC]",
        model_max_length=512,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


if __name__ == "__main__":  # regenerate the shipped files
    build_tiny_tokenizer(TINY_TOKENIZER_DIR)
    print(f"wrote {TINY_TOKENIZER_DIR}")
    build_tiny_bert_tokenizer(TINY_BERT_TOKENIZER_DIR)
    print(f"wrote {TINY_BERT_TOKENIZER_DIR}")
