"""ShapesWorld: a deterministic, procedurally generated multimodal world for CPU-sized experiments.

Each image is a 2 x 2 grid of cells; up to four objects (circle, square, triangle, diamond) of six colours
and two sizes sit in distinct cells, so counts and positions are unambiguous. Every object is at least
``min_object_px`` pixels wide, and small objects make resolution matter. The generator writes, in LLaVA's
formats, into one folder:

    images/{split}_{index:06d}.png
    train.json            instruction data: one image, ``questions_per_image`` QA turns then a caption turn
    val.json, test.json   one question per record (accuracy is per question)
    captions_train.json, captions_val.json   caption data (LLaVA-Pretrain style) for the align stage
    shapesworld.json      the generator's settings

Question kinds: colour ("What color is the circle?"), shape ("What shape is the red object?"), count
("How many shapes are there?"), position ("Where is the blue square?" -> "top left") and existence
("Is there a green triangle?" -> "yes"/"no", balanced). Answers are single words or short phrases.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 50, 180),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "diamond")
CELLS = ("top left", "top right", "bottom left", "bottom right")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
QUESTION_KINDS = ("colour", "shape", "count", "position", "existence")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Thing:
    shape: str
    colour: str
    size: str  # "small" | "large"
    cell: int  # index into CELLS
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels


def _draw(draw: ImageDraw.ImageDraw, thing: Thing) -> None:
    x0, y0, x1, y1 = thing.box
    fill = COLOURS[thing.colour]
    if thing.shape == "circle":
        draw.ellipse(thing.box, fill=fill)
    elif thing.shape == "square":
        draw.rectangle(thing.box, fill=fill)
    elif thing.shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # diamond
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=fill)


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
    """At most this many objects per image (1..4, one per grid cell)."""
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

    def __post_init__(self) -> None:
        if not 1 <= self.max_objects <= 4:
            raise ValueError(
                f"max_objects must be in 1..4 (one object per grid cell), got {self.max_objects}"
            )
        if not 4 <= self.min_object_px <= self.image_size // 2 - 2:
            raise ValueError(
                f"min_object_px must be in 4..{self.image_size // 2 - 2} for image_size={self.image_size}"
            )

    # -- one scene -------------------------------------------------------------------------------------------
    def scene(self, rng: random.Random) -> list[Thing]:
        cell_px = self.image_size // 2
        large_px = (max(self.min_object_px + 2, int(cell_px * 0.6)), int(cell_px * 0.9))
        small_px = (self.min_object_px, max(self.min_object_px, int(cell_px * 0.4)))
        things = []
        for cell in rng.sample(range(4), rng.randint(1, self.max_objects)):
            size = "small" if rng.random() < self.small_fraction else "large"
            side = rng.randint(*(small_px if size == "small" else large_px))
            cx, cy = (cell % 2) * cell_px, (cell // 2) * cell_px
            x0 = cx + rng.randint(1, cell_px - side - 1)
            y0 = cy + rng.randint(1, cell_px - side - 1)
            things.append(
                Thing(
                    rng.choice(SHAPES), rng.choice(list(COLOURS)), size, cell, (x0, y0, x0 + side, y0 + side)
                )
            )
        return things

    def render(self, things: list[Thing]) -> Image.Image:
        image = Image.new("RGB", (self.image_size, self.image_size), tuple(self.background))
        draw = ImageDraw.Draw(image)
        for t in things:
            _draw(draw, t)
        return image

    @staticmethod
    def caption(things: list[Thing]) -> str:
        parts = [
            f"a {t.size} {t.colour} {t.shape} at the {CELLS[t.cell]}"
            for t in sorted(things, key=lambda t: t.cell)
        ]
        listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        n = len(things)
        return f"{NUMBER_WORDS[n].capitalize()} shape{'s' if n > 1 else ''}: {listing}."

    @staticmethod
    def question(things: list[Thing], rng: random.Random, kind: str) -> tuple[str, str]:
        """A (question, answer) pair of the given kind, falling back to ``count`` when the scene cannot ask it."""
        by_shape = [t for t in things if sum(u.shape == t.shape for u in things) == 1]
        by_colour = [t for t in things if sum(u.colour == t.colour for u in things) == 1]
        unique = [t for t in things if sum((u.shape, u.colour) == (t.shape, t.colour) for u in things) == 1]
        if kind == "colour" and by_shape:
            t = rng.choice(by_shape)
            return f"What color is the {t.shape}? Answer with one word.", t.colour
        if kind == "shape" and by_colour:
            t = rng.choice(by_colour)
            return f"What shape is the {t.colour} object? Answer with one word.", t.shape
        if kind == "position" and unique:
            t = rng.choice(unique)
            return f"Where is the {t.colour} {t.shape}? Answer with its position.", CELLS[t.cell]
        if kind == "existence":
            if rng.random() < 0.5:
                t = rng.choice(things)
                shape, colour, answer = t.shape, t.colour, "yes"
            else:
                present = {(t.shape, t.colour) for t in things}
                shape, colour = rng.choice([(s, c) for s in SHAPES for c in COLOURS if (s, c) not in present])
                answer = "no"
            return f"Is there {_article(colour)} {colour} {shape}? Answer yes or no.", answer
        return "How many shapes are there? Answer with a number.", str(len(things))

    # -- the dataset -----------------------------------------------------------------------------------------
    def write(self, root: Path) -> None:
        from tqdm.auto import tqdm

        root = Path(root)
        if root.exists():
            raise FileExistsError(f"{root} exists; ShapesWorld writes only into a new folder")
        tmp = root.with_name(root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "images").mkdir(parents=True)
        splits = {"train": self.num_train, "val": self.num_val, "test": self.num_test}
        with tqdm(total=sum(splits.values()), desc=f"ShapesWorld -> {root}", unit="img") as bar:
            for split, count in splits.items():
                rng = random.Random(f"{self.seed}/{split}")
                records, captions = [], []
                for i in range(count):
                    things = self.scene(rng)
                    name = f"images/{split}_{i:06d}.png"
                    self.render(things).save(tmp / name)
                    sid = f"{split}_{i:06d}"
                    captions.append(
                        {
                            "id": f"{sid}_caption",
                            "image": name,
                            "conversations": [
                                {"from": "human", "value": "<image>\nDescribe the image briefly."},
                                {"from": "gpt", "value": self.caption(things)},
                            ],
                        }
                    )
                    qa = [
                        self.question(things, rng, rng.choice(QUESTION_KINDS))
                        for _ in range(self.questions_per_image if split == "train" else 1)
                    ]
                    if split == "train" and self.caption_turn:  # last: earlier answers cannot be read off it
                        qa.append(("Describe the image briefly.", self.caption(things)))
                    convs = []
                    for q, (question, answer) in enumerate(qa):
                        convs += [
                            {"from": "human", "value": ("<image>\n" if q == 0 else "") + question},
                            {"from": "gpt", "value": answer},
                        ]
                    records.append({"id": sid, "image": name, "conversations": convs})
                    bar.update()
                (tmp / f"{split}.json").write_text(json.dumps(records, indent=1))
                if split != "test":
                    (tmp / f"captions_{split}.json").write_text(json.dumps(captions, indent=1))
        (tmp / "shapesworld.json").write_text(json.dumps(asdict(self), indent=1))
        tmp.rename(root)


def write_shapesworld(*, out: str, generator: ShapesWorld = ShapesWorld()) -> None:
    """Write a ShapesWorld dataset folder.

    Args:
        out: Folder to create (must not exist).
        generator: Generator settings (image size, counts, object sizes, seed, ...).
    """
    generator.write(Path(out))
    print(f"wrote {out}")
