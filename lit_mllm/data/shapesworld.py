"""ShapesWorld: a deterministic, procedurally generated multimodal world for CPU-sized experiments.

Each image is a grid of cells (2 x 2 by default); up to one object per cell (circle, square, triangle, diamond;
six colours, two sizes), so counts and positions are unambiguous. Every object is at least ``min_object_px``
pixels wide, and small objects make resolution matter; optionally a short word is drawn in a free cell in
tiny print (``text_px`` pixels tall) and asked for. The generator writes into one folder, in LLaVA's formats:

    images/{split}_{index:06d}.png
    train.json            instruction data: one image, ``questions_per_image`` QA turns then a caption turn
    val.json, test.json   one question per record (accuracy is per question)
    captions_train.json, captions_val.json   caption data (LLaVA-Pretrain style) for the align stage
    shapesworld.json      the generator's settings and the list of files written

and, chosen by ``extras`` (all by default; see :mod:`lit_mllm.data.shapesworld_formats`), the same images as
img2dataset caption shards and JSONL/CSV caption manifests, OBELICS-style interleaved documents, a text-only
corpus and RefCOCO-style grounding records. The extras never change the LLaVA files or the images: with the
default settings those are byte for byte what they have always been.

With ``num_multi_train`` / ``num_multi_val`` / ``num_multi_test`` set, questions that no single image answers
are asked over 2-4 of a split's images (``images_per_question``), in LLaVA's multi-image format
(``multi_{split}.json``: ``image`` a list, ``Image 1: <image>\nImage 2: <image>\n`` before the question) and as
OBELICS-style documents (``multi_interleaved_{split}.jsonl``): do both images contain X (yes/no), which image
has the most shapes, which image shows X (an image number), how many shapes all the images show together.

Variants for data selection and merging, off by default (the files above stay byte for byte the same):
``noisy_captions`` / ``rare_token_captions`` make a fraction of the training caption pairs describe another image or
carry junk tokens (which ones: ``noise_train.json``), for perplexity filters; ``skill_sets`` writes instruction sets
that each teach one question kind (``skill_{kind}_{split}.json``), for model soups and data selection.

Question kinds: colour ("What color is the circle?"), shape ("What shape is the red object?"), count
("How many shapes are there?"), position ("Where is the blue square?" -> "top left"), existence
("Is there a green triangle?" -> "yes"/"no", balanced) and, with ``text_px`` set, text ("What word is
written in the image?" -> "CAT"). Answers are single words or short phrases.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, get_args

from PIL import Image, ImageDraw, ImageFont

from lit_mllm.data.shapesworld_scene import (
    COLOURS,
    NUMBER_WORDS,
    SHAPES,
    Label,
    Scene,
    Thing,
    article,
    cell_names,
)

QUESTION_KINDS = ("colour", "shape", "count", "position", "existence")
ALL_KINDS = (*QUESTION_KINDS, "text", "caption", "both", "most", "which", "total")
"""Every ``meta.kind`` a ShapesWorld record names: the single-image question kinds, the drawn word, the caption
turn, and the multi-image kinds (``shapesworld_formats.MULTI_KIND_NAMES``)."""
TEXT_COLOUR = (0, 0, 0)  # the drawn word: no object has this colour

QuestionKind = Literal["colour", "shape", "count", "position", "existence", "text"]
Extra = Literal["caption_shards", "caption_manifests", "interleaved", "text_only", "grounding"]
EXTRAS: tuple[Extra, ...] = get_args(Extra)


def _draw(draw: ImageDraw.ImageDraw, thing: Thing, fill: tuple[int, int, int] | int) -> None:
    x0, y0, x1, y1 = thing.box
    if thing.shape == "circle":
        draw.ellipse(thing.box, fill=fill)
    elif thing.shape == "square":
        draw.rectangle(thing.box, fill=fill)
    elif thing.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


@lru_cache(maxsize=512)
def glyphs(word: str, px: int) -> Image.Image:
    """``word`` in PIL's bitmap font as an ``L`` mask cropped to its ink, scaled so capitals are ``px`` tall
    (nearest-neighbour when enlarging, box-averaged when shrinking)."""
    font = ImageFont.load_default_imagefont() if hasattr(ImageFont, "load_default_imagefont") else None
    font = font or ImageFont.load_default()

    def ink(text: str) -> Image.Image:
        canvas = Image.new("L", (8 * len(text) + 8, 16))
        ImageDraw.Draw(canvas).text((0, 0), text, font=font, fill=255)
        return canvas.crop(canvas.getbbox())

    scale = px / ink("H").height
    mask = ink(word)
    size = (max(1, round(mask.width * scale)), max(1, round(mask.height * scale)))
    return mask.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BOX)


@dataclass
class ShapesWorld:
    """Writes a ShapesWorld dataset folder (a :class:`~lit_mllm.data.DatasetGenerator`); the same settings always
    give the same files."""

    image_size: int = 64
    """Side of the square images in pixels."""
    num_train: int = 4000
    """Training images (each gives one multi-turn record and one caption record)."""
    num_val: int = 300
    """Validation images (one question each)."""
    num_test: int = 300
    """Test images (one question each)."""
    max_objects: int = 4
    """At most this many objects per image (1..grid**2, one per grid cell)."""
    min_object_px: int = 8
    """Side of the smallest objects in pixels."""
    small_fraction: float = 0.5
    """Probability that an object is small."""
    questions_per_image: int = 3
    """QA turns per training record."""
    caption_turn: bool = True
    """End each training conversation with "Describe the image briefly." and the caption (dense grounding:
    every object's colour, shape, size and cell), as LLaVA-Instruct mixes descriptions with questions. It
    comes last so that no answer can be copied from it."""
    background: tuple[int, int, int] = (245, 245, 245)
    """Background RGB colour."""
    seed: int = 0
    """Seed of everything random."""
    grid: Literal[2, 3] = 2
    """Cells per side: 2 ("top left" .. "bottom right", up to 4 objects) or 3 ("top center", "center", ..., up
    to 9 objects)."""
    small_px: tuple[int, int] | None = None
    """Side range of small objects in pixels, both ends included; default ``min_object_px`` .. 40% of a cell."""
    large_px: tuple[int, int] | None = None
    """Side range of large objects in pixels, both ends included; default 60% .. 90% of a cell (at least
    ``min_object_px + 2``, at most the cell side - 2)."""
    text_px: int | None = None
    """Draw one word of ``text_words`` per image in a free cell, its capitals this many pixels tall (PIL's
    bitmap font, scaled), named in the caption and asked for by a "text" question; a scene then holds at most
    grid**2 - 1 objects. None: no text."""
    text_words: tuple[str, ...] = ("CAT", "DOG", "SUN", "BOX", "CUP", "HAT", "KEY", "PEN", "MAP", "BUS")
    """Words (or single letters) drawn when ``text_px`` is set (printable ASCII)."""
    extras: tuple[Extra, ...] = EXTRAS
    """Formats written besides LLaVA's, for every split: ``caption_shards`` (img2dataset webdataset tars in
    ``captions_{split}/``), ``caption_manifests`` (``captions_{split}.jsonl`` / ``.csv``), ``interleaved``
    (``interleaved_{split}.jsonl``), ``text_only`` (``text_{split}.jsonl``), ``grounding``
    (``grounding_{split}.jsonl``). They never change the LLaVA files or the images."""
    shard_size: int = 1000
    """Caption pairs per webdataset shard (1..10000: a key is the shard's 5 digits and the index's 4)."""
    jpeg_quality: int = 95
    """JPEG quality of the images in the caption shards."""
    documents_per_image: float = 0.5
    """Interleaved documents per image of a split (each shows 2-4 of the split's images)."""
    texts_per_image: float = 1.0
    """Text-only documents per image of a split."""
    num_multi_train: int = 0
    """Multi-image questions over the training images (``multi_train.json`` and
    ``multi_interleaved_train.jsonl``; see :func:`~lit_mllm.data.shapesworld_formats.multi_question`). 0: none
    (the files are not written)."""
    num_multi_val: int = 0
    """Multi-image questions over the validation images (``multi_val.json``, ``multi_interleaved_val.jsonl``)."""
    num_multi_test: int = 0
    """Multi-image questions over the test images (``multi_test.json``, ``multi_interleaved_test.jsonl``)."""
    images_per_question: tuple[int, int] = (2, 4)
    """Fewest and most images a multi-image question shows (both ends included; "Do both images ..." always
    shows two)."""
    noisy_captions: float = 0.0
    """Fraction (rounded down) of the training caption pairs whose caption describes another training image
    instead of its own, in every caption format (``captions_train.json``, shards, manifests; the caption turn of
    ``train.json`` stays true); which ones is recorded in ``noise_train.json``. For data filters. 0: none."""
    rare_token_captions: float = 0.0
    """Fraction (rounded down) of the training caption pairs whose true caption carries two to four junk tokens,
    as web alt-text does (camera file names, random letter strings, URL pieces), recorded in
    ``noise_train.json``; never the same pairs as ``noisy_captions``. 0: none."""
    skill_sets: tuple[QuestionKind, ...] = ()
    """Question kinds each also written as an instruction set teaching that one skill: ``skill_{kind}_train.json``
    (up to ``questions_per_image`` distinct questions of the kind per training image, no caption turn) and
    ``skill_{kind}_val.json`` / ``skill_{kind}_test.json`` (one per image, ``meta.kind``); an image where the kind
    cannot be asked is left out. For model soups and data selection. Empty: none."""

    def __post_init__(self) -> None:
        if self.grid not in (2, 3):
            raise ValueError(f"grid must be 2 or 3, got {self.grid}")
        cells = self.grid**2
        if not 1 <= self.max_objects <= cells:
            raise ValueError(
                f"max_objects must be in 1..{cells} (one object per cell of the {self.grid} x {self.grid} "
                f"grid), got {self.max_objects}"
            )
        if not 4 <= self.min_object_px <= self.cell_px - 2:
            raise ValueError(
                f"min_object_px must be in 4..{self.cell_px - 2} for image_size={self.image_size} "
                f"and grid={self.grid}"
            )
        small, large = self.size_ranges()
        for name, (lo, hi) in (("small_px", small), ("large_px", large)):
            if not self.min_object_px <= lo <= hi <= self.cell_px - 2:
                raise ValueError(
                    f"{name}={(lo, hi)} must satisfy min_object_px={self.min_object_px} <= low <= high <= "
                    f"{self.cell_px - 2} (a cell of {self.cell_px} px less a 1 px margin each side)"
                )
        if small[1] >= large[0]:
            raise ValueError(f"small objects {small} must all be smaller than large ones {large}")
        if self.text_px is not None:
            self._check_text()
        unknown = [e for e in self.extras if e not in EXTRAS]
        if unknown or len(set(self.extras)) != len(self.extras):
            raise ValueError(f"extras must be distinct choices of {EXTRAS}, got {self.extras}")
        if not 1 <= self.shard_size <= 10_000:
            raise ValueError(
                f"shard_size must be in 1..10000 (4-digit index in a key), got {self.shard_size}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")
        if self.documents_per_image < 0 or self.texts_per_image < 0:
            raise ValueError("documents_per_image and texts_per_image must be >= 0")
        if min(self.num_multi_train, self.num_multi_val, self.num_multi_test) < 0:
            raise ValueError("num_multi_train, num_multi_val and num_multi_test must be >= 0")
        noise = (self.noisy_captions, self.rare_token_captions)
        if min(noise) < 0 or sum(noise) > 1:
            raise ValueError(
                f"noisy_captions={self.noisy_captions} and rare_token_captions={self.rare_token_captions} are "
                "fractions of the training captions: each >= 0 and together at most 1"
            )
        kinds = QUESTION_KINDS + (("text",) if self.text_px else ())
        bad = [k for k in self.skill_sets if k not in kinds]
        if bad or len(set(self.skill_sets)) != len(self.skill_sets):
            raise ValueError(
                f"skill_sets must be distinct question kinds of {kinds} ('text' needs text_px), got {self.skill_sets}"
            )
        lo, hi = self.images_per_question
        if not 2 <= lo <= hi <= 9:
            raise ValueError(
                f"images_per_question must be (low, high) with 2 <= low <= high <= 9, got {self.images_per_question}"
            )

    def _check_text(self) -> None:
        if not 3 <= self.text_px <= self.cell_px - 2:
            raise ValueError(
                f"text_px must be in 3..{self.cell_px - 2} (the cell side - 2), got {self.text_px}"
            )
        if not self.text_words:
            raise ValueError("text_words is empty: give at least one word to draw")
        for word in self.text_words:
            if not (word and word.isascii() and word.isprintable() and word == word.strip()):
                raise ValueError(f"text word {word!r} must be non-empty printable ASCII without outer spaces")
            width = glyphs(word, self.text_px).width
            if width > self.cell_px - 2:
                raise ValueError(
                    f"text word {word!r} is {width} px wide at text_px={self.text_px}, more than a cell "
                    f"({self.cell_px} px) less its margins: use a shorter word, a smaller text_px or a larger "
                    "image_size"
                )

    @property
    def cell_px(self) -> int:
        return self.image_size // self.grid

    @property
    def cells(self) -> tuple[str, ...]:
        return cell_names(self.grid)

    def size_ranges(self) -> tuple[tuple[int, int], tuple[int, int]]:
        """(low, high) sides in pixels of small and of large objects."""
        c, lo = self.cell_px, self.min_object_px
        small = self.small_px or (lo, max(lo, int(c * 0.4)))
        large = self.large_px or (max(lo + 2, int(c * 0.6)), min(int(c * 0.9), c - 2))
        return (int(small[0]), int(small[1])), (int(large[0]), int(large[1]))

    # -- one scene -------------------------------------------------------------------------------------------
    def layout(self, rng: random.Random) -> Scene:
        """A random scene: objects in distinct cells and, with ``text_px``, a word in a cell of its own."""
        c, n = self.cell_px, self.grid
        small, large = self.size_ranges()
        most = min(self.max_objects, n * n - 1) if self.text_px else self.max_objects
        things = []
        for cell in rng.sample(range(n * n), rng.randint(1, most)):
            size = "small" if rng.random() < self.small_fraction else "large"
            side = rng.randint(*(small if size == "small" else large))
            cx, cy = (cell % n) * c, (cell // n) * c
            x0 = cx + rng.randint(1, c - side - 1)
            y0 = cy + rng.randint(1, c - side - 1)
            things.append(
                Thing(
                    rng.choice(SHAPES), rng.choice(list(COLOURS)), size, cell, (x0, y0, x0 + side, y0 + side)
                )
            )
        label = None
        if self.text_px:
            cell = rng.choice(sorted(set(range(n * n)) - {t.cell for t in things}))
            word = rng.choice(self.text_words)
            w, h = glyphs(word, self.text_px).size
            x0 = (cell % n) * c + rng.randint(1, c - w - 1)
            y0 = (cell // n) * c + rng.randint(1, c - h - 1)
            label = Label(word, cell, (x0, y0, x0 + w, y0 + h))
        return Scene(things, label)

    def scene(self, rng: random.Random) -> list[Thing]:
        """The objects of :meth:`layout` (without the word)."""
        return self.layout(rng).things

    def render(self, things: list[Thing], label: Label | None = None) -> Image.Image:
        image = Image.new("RGB", (self.image_size, self.image_size), tuple(self.background))
        draw = ImageDraw.Draw(image)
        for t in things:
            _draw(draw, t, COLOURS[t.colour])
        if label is not None:
            image.paste(TEXT_COLOUR, label.box, glyphs(label.word, self.text_px))
        return image

    def pixel_box(self, item: Thing | Label) -> tuple[int, int, int, int]:
        """The tight box (x1, y1, x2, y2) of the pixels an object or the word covers; x2/y2 exclusive."""
        mask = Image.new("L", (self.image_size, self.image_size))
        if isinstance(item, Label):
            mask.paste(glyphs(item.word, self.text_px), item.box[:2])
        else:
            _draw(ImageDraw.Draw(mask), item, 255)
        return mask.getbbox()

    def phrases(self, things: list[Thing]) -> list[str]:
        """Every object as "a small red circle at the top left", in cell order."""
        return [
            f"a {t.size} {t.colour} {t.shape} at the {self.cells[t.cell]}"
            for t in sorted(things, key=lambda t: t.cell)
        ]

    def caption(self, things: list[Thing], label: Label | None = None) -> str:
        parts = self.phrases(things)
        listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        n = len(things)
        text = f"{NUMBER_WORDS[n].capitalize()} shape{'s' if n > 1 else ''}: {listing}."
        if label is not None:
            text += f' The word "{label.word}" is written at the {self.cells[label.cell]}.'
        return text

    def question(
        self, things: list[Thing], rng: random.Random, kind: str, label: Label | None = None
    ) -> tuple[str, str]:
        """A (question, answer) pair of the given kind, falling back to ``count`` when the scene cannot ask it."""
        return self.ask(things, rng, kind, label)[1:]

    def ask(
        self, things: list[Thing], rng: random.Random, kind: str, label: Label | None = None
    ) -> tuple[str, str, str]:
        """``(kind asked, question, answer)``: :meth:`question` with the kind it fell back to (``count``)."""
        by_shape = [t for t in things if sum(u.shape == t.shape for u in things) == 1]
        by_colour = [t for t in things if sum(u.colour == t.colour for u in things) == 1]
        unique = [t for t in things if sum((u.shape, u.colour) == (t.shape, t.colour) for u in things) == 1]
        if kind == "colour" and by_shape:
            t = rng.choice(by_shape)
            return "colour", f"What color is the {t.shape}? Answer with one word.", t.colour
        if kind == "shape" and by_colour:
            t = rng.choice(by_colour)
            return "shape", f"What shape is the {t.colour} object? Answer with one word.", t.shape
        if kind == "position" and unique:
            t = rng.choice(unique)
            return (
                "position",
                f"Where is the {t.colour} {t.shape}? Answer with its position.",
                self.cells[t.cell],
            )
        if kind == "existence":
            if rng.random() < 0.5:
                t = rng.choice(things)
                shape, colour, answer = t.shape, t.colour, "yes"
            else:
                present = {(t.shape, t.colour) for t in things}
                shape, colour = rng.choice([(s, c) for s in SHAPES for c in COLOURS if (s, c) not in present])
                answer = "no"
            return "existence", f"Is there {article(colour)} {colour} {shape}? Answer yes or no.", answer
        if kind == "text" and label is not None:
            return "text", "What word is written in the image? Answer with the word.", label.word
        return "count", "How many shapes are there? Answer with a number.", str(len(things))

    # -- the dataset -----------------------------------------------------------------------------------------
    def write(self, root: Path) -> None:
        from tqdm.auto import tqdm

        from lit_mllm.data.shapesworld_formats import (
            caption_pairs,
            write_extras,
            write_multi_image,
            write_noise_record,
            write_skill_set,
        )

        root = Path(root)
        if root.exists():
            raise FileExistsError(f"{root} exists; ShapesWorld writes only into a new folder")
        # this process's own partial folder: runs started together (a sweep's parallel arms) each write theirs,
        # and the first to finish renames it into place (the same files: the generator is deterministic)
        tmp = root.with_name(f"{root.name}.partial-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        splits = {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        kinds = QUESTION_KINDS + (("text",) if self.text_px else ())
        scenes: dict[str, list[tuple[str, Scene]]] = {}
        files = []
        with tqdm(total=sum(splits.values()), desc=f"ShapesWorld -> {root}", unit="img") as bar:
            for split, count in splits.items():
                rng = random.Random(f"{self.seed}/{split}")
                records, captions, scenes[split] = [], [], []
                for i in range(count):
                    scene = self.layout(rng)
                    things, label = scene.things, scene.label
                    name = f"images/{split}_{i:06d}.png"
                    self.render(things, label).save(tmp / name)
                    scenes[split].append((name, scene))
                    sid = f"{split}_{i:06d}"
                    qa = [
                        self.ask(things, rng, rng.choice(kinds), label)
                        for _ in range(self.questions_per_image if split == "train" else 1)
                    ]
                    if split == "train" and self.caption_turn:  # last: earlier answers cannot be read off it
                        qa.append(("caption", "Describe the image briefly.", self.caption(things, label)))
                    convs = []
                    for q, (_, question, answer) in enumerate(qa):
                        convs += [
                            {"from": "human", "value": ("<image>\n" if q == 0 else "") + question},
                            {"from": "gpt", "value": answer},
                        ]
                    record = {"id": sid, "image": name, "conversations": convs}
                    if len(qa) == 1:  # the kind of the one question (evaluation reports accuracy per kind)
                        record["meta"] = {"kind": qa[0][0]}
                    records.append(record)
                    bar.update()
                (tmp / f"{split}.json").write_text(json.dumps(records, indent=1))
                files.append(f"{split}.json")
                if split != "test":
                    for k, ((name, _), caption) in enumerate(
                        zip(scenes[split], caption_pairs(self, split, scenes[split])[0])
                    ):
                        captions.append(
                            {
                                "id": f"{split}_{k:06d}_caption",
                                "image": name,
                                "conversations": [
                                    {"from": "human", "value": "<image>\nDescribe the image briefly."},
                                    {"from": "gpt", "value": caption},
                                ],
                            }
                        )
                    (tmp / f"captions_{split}.json").write_text(json.dumps(captions, indent=1))
                    files.append(f"captions_{split}.json")
        files += write_extras(self, tmp, scenes)
        files += write_noise_record(self, tmp, scenes["train"])
        for kind in self.skill_sets:
            for split in splits:
                files += write_skill_set(self, tmp, split, scenes[split], kind)
        multi = {"train": self.num_multi_train, "val": self.num_multi_val, "test": self.num_multi_test}
        for split, count in multi.items():
            if count:
                files += write_multi_image(self, tmp, split, scenes[split], count)
        meta = {"generator": asdict(self), "images": sum(splits.values()), "files": files}
        (tmp / "shapesworld.json").write_text(json.dumps(meta, indent=1))
        try:
            tmp.rename(root)
        except OSError:
            if not (root / "shapesworld.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another run wrote the same dataset first


def write_shapesworld(*, out: str, generator: ShapesWorld = ShapesWorld()) -> None:
    """Write a ShapesWorld dataset folder.

    Args:
        out: Folder to create (must not exist).
        generator: Generator settings (image size, counts, object sizes, text, extra formats, seed, ...).
    """
    generator.write(Path(out))
    print(f"wrote {out}")
