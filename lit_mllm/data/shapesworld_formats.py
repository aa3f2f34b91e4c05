"""ShapesWorld's formats besides LLaVA's, written next to the LLaVA files from the same images and scenes.

Per split (``train``, ``val``, ``test``), each chosen by :attr:`ShapesWorld.extras`:

    captions_{split}/{shard:05d}.tar   caption pairs as img2dataset writes webdataset shards: per sample
                                       ``{key}.jpg``, ``{key}.txt``, ``{key}.json``; key = shard (5 digits) +
                                       index in the shard (4 digits)
    captions_{split}.jsonl / .csv      the same pairs as manifests: ``{"image", "caption"}`` / ``image,caption``
    interleaved_{split}.jsonl          OBELICS-style documents ``{"id", "texts", "images"}`` (parallel lists,
                                       one non-null per position) showing 2-4 images, described and compared
    text_{split}.jsonl                 text-only corpus ``{"id", "text"}``: facts, counting, positions, stories
    grounding_{split}.jsonl            RefCOCO-style ``{"id", "image", "width", "height", "objects": [{"phrase",
                                       "box": [x1, y1, x2, y2]}]}``: pixel boxes that tightly bound what is
                                       drawn, x2/y2 exclusive (PIL's ``getbbox``; columns x1..x2-1), phrases
                                       unambiguous within their image

and, when :attr:`ShapesWorld.num_multi_train` (``_val``, ``_test``) is set, questions over several of a split's
images (:func:`multi_question`) as ``multi_{split}.json`` (LLaVA multi-image conversations) and
``multi_interleaved_{split}.jsonl`` (the same as OBELICS-style documents).

With :attr:`ShapesWorld.noisy_captions` / :attr:`ShapesWorld.rare_token_captions` set, the training caption pairs
of every caption format carry the same noise (:func:`caption_pairs`), recorded in ``noise_train.json``; with
:attr:`ShapesWorld.skill_sets`, ``skill_{kind}_{split}.json`` asks one question kind only (:func:`write_skill_set`).

Each writer draws from its own random stream (``{seed}/{split}/{kind}``), so choosing or dropping one never
changes another, and tar members carry fixed metadata (mtime 0, uid/gid 0), so the same settings give the
same bytes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from lit_mllm.data.shapesworld_scene import COLOURS, NUMBER_WORDS, SHAPES, Scene, Thing, article, cell_names

if TYPE_CHECKING:
    from lit_mllm.data.shapesworld import Extra, ShapesWorld

Images = list[tuple[str, Scene]]  # (path relative to the dataset folder, scene) per image of a split
CORNERS = {"circle": "no", "square": "four", "triangle": "three", "diamond": "four"}
NAMES = ("Ada", "Ben", "Cleo", "Dev", "Emma", "Finn", "Gia", "Hugo", "Iris", "Jon")


def write_extras(world: ShapesWorld, root: Path, splits: dict[str, Images]) -> list[str]:
    """Write ``world.extras`` for every split into ``root``; the paths written, relative to ``root``."""
    writers: dict[Extra, Callable[..., list[str]]] = {
        "caption_shards": write_caption_shards,
        "caption_manifests": write_caption_manifests,
        "interleaved": write_interleaved,
        "text_only": write_text_only,
        "grounding": write_grounding,
    }
    written = []
    for split, images in splits.items():
        for kind in world.extras:
            written += writers[kind](
                world, root, split, images, random.Random(f"{world.seed}/{split}/{kind}")
            )
    return written


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


def _listing(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count(n: int, noun: str) -> str:
    return f"{NUMBER_WORDS[n] if n < len(NUMBER_WORDS) else n} {noun}{'' if n == 1 else 's'}"


# -- caption pairs ---------------------------------------------------------------------------------------------
def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed metadata: the same bytes on every run and machine
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def write_caption_shards(
    world: ShapesWorld, root: Path, split: str, images: Images, rng: random.Random
) -> list[str]:
    """``captions_{split}/{shard:05d}.tar``, ``world.shard_size`` samples each, in image order."""
    written, texts = [], caption_pairs(world, split, images)[0]
    for shard, start in enumerate(range(0, len(images), world.shard_size)):
        path = root / f"captions_{split}" / f"{shard:05d}.tar"
        path.parent.mkdir(exist_ok=True)
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for index, (_, scene) in enumerate(images[start : start + world.shard_size]):
                key, caption = shard_key(world, start + index), texts[start + index]
                jpeg = io.BytesIO()
                world.render(scene.things, scene.label).save(jpeg, "JPEG", quality=world.jpeg_quality)
                size = world.image_size
                meta = {
                    "key": key,
                    "caption": caption,
                    "url": None,
                    "width": size,
                    "height": size,
                    "original_width": size,
                    "original_height": size,
                    "status": "success",
                    "error_message": None,
                }
                _add(tar, f"{key}.jpg", jpeg.getvalue())
                _add(tar, f"{key}.txt", caption.encode("utf-8"))
                _add(tar, f"{key}.json", json.dumps(meta, indent=4).encode("utf-8"))
        written.append(path.relative_to(root).as_posix())
    return written


def write_caption_manifests(
    world: ShapesWorld, root: Path, split: str, images: Images, rng: random.Random
) -> list[str]:
    """``captions_{split}.jsonl`` (``{"image", "caption"}`` lines) and ``captions_{split}.csv``."""
    pairs = [(name, caption) for (name, _), caption in zip(images, caption_pairs(world, split, images)[0])]
    _jsonl(root / f"captions_{split}.jsonl", [{"image": name, "caption": caption} for name, caption in pairs])
    with open(root / f"captions_{split}.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows(pairs)
    return [f"captions_{split}.jsonl", f"captions_{split}.csv"]


def shard_key(world: ShapesWorld, i: int) -> str:
    """The webdataset key of image ``i`` of a split in its caption shards."""
    return f"{i // world.shard_size:05d}{i % world.shard_size:04d}"


# -- noisy captions (for data filters) -------------------------------------------------------------------------
def junk_token(rng: random.Random) -> str:
    """A token of web alt-text junk: a camera file name, a random string of rare letters, a URL piece."""
    letters = "qxzjkvw"
    word = "".join(rng.choice(letters) for _ in range(rng.randint(4, 7)))
    return rng.choice(
        [
            f"IMG_{rng.randint(1000, 9999)}.JPG",
            f"DSC{rng.randint(10000, 99999)}",
            word,
            f"www.{word}.qz/{rng.randint(0, 99)}",
        ]
    )


def caption_pairs(world: ShapesWorld, split: str, images: Images) -> tuple[list[str], dict[str, list[int]]]:
    """The caption of each image of a split's caption data, and which images' captions are noise
    (``{"unrelated": [...], "rare_tokens": [...]}``, image indices): with ``world.noisy_captions`` /
    ``rare_token_captions`` set, on the training split only, drawn from the stream ``{seed}/train/caption_noise``;
    otherwise every caption true."""
    texts = [world.caption(scene.things, scene.label) for _, scene in images]
    noise: dict[str, list[int]] = {"unrelated": [], "rare_tokens": []}
    if split != "train" or not (world.noisy_captions or world.rare_token_captions):
        return texts, noise
    rng = random.Random(f"{world.seed}/train/caption_noise")
    order = rng.sample(range(len(images)), len(images))
    unrelated = math.floor(world.noisy_captions * len(images))
    rare = math.floor(world.rare_token_captions * len(images))
    true = list(texts)
    for i in sorted(order[:unrelated]):
        others = [j for j in range(len(images)) if true[j] != true[i]]
        if others:  # a split whose captions are all alike has no unrelated caption to give
            texts[i] = true[rng.choice(others)]
            noise["unrelated"].append(i)
    for i in sorted(order[unrelated : unrelated + rare]):
        words = true[i].split(" ")
        for _ in range(rng.randint(2, 4)):
            words.insert(rng.randint(0, len(words)), junk_token(rng))
        texts[i] = " ".join(words)
        noise["rare_tokens"].append(i)
    return texts, noise


def write_noise_record(world: ShapesWorld, root: Path, images: Images) -> list[str]:
    """``noise_train.json``: the noisy caption pairs of the training split, by kind, each named as every caption
    format names it (``id`` in ``captions_train.json``, ``image`` in the manifests, ``key`` in the shards); not
    written without noise."""
    if not (world.noisy_captions or world.rare_token_captions):
        return []
    noise = caption_pairs(world, "train", images)[1]
    record = {
        kind: [
            {"index": i, "id": f"train_{i:06d}_caption", "image": images[i][0], "key": shard_key(world, i)}
            for i in indices
        ]
        for kind, indices in noise.items()
    }
    (root / "noise_train.json").write_text(json.dumps(record, indent=1))
    return ["noise_train.json"]


# -- skill-specific instruction sets (for soups and data selection) --------------------------------------------
def write_skill_set(world: ShapesWorld, root: Path, split: str, images: Images, kind: str) -> list[str]:
    """``skill_{kind}_{split}.json``: LLaVA conversations asking only ``kind`` questions (training: up to
    ``questions_per_image`` distinct ones per image; val/test: one), ``meta.kind`` on each; an image where the kind
    cannot be asked (no object of a unique shape for ``colour``, ...) is left out. Stream
    ``{seed}/{split}/skill_{kind}``."""
    rng = random.Random(f"{world.seed}/{split}/skill_{kind}")
    records = []
    for i, (name, scene) in enumerate(images):
        asked: dict[str, str] = {}
        for _ in range(world.questions_per_image if split == "train" else 1):
            got, question, answer = world.ask(scene.things, rng, kind, scene.label)
            if got == kind:  # ask falls back to a count question when the scene cannot ask the kind
                asked.setdefault(question, answer)
        if not asked:
            continue
        convs = []
        for q, (question, answer) in enumerate(asked.items()):
            convs += [
                {"from": "human", "value": ("<image>\n" if q == 0 else "") + question},
                {"from": "gpt", "value": answer},
            ]
        records.append(
            {"id": f"{split}_{i:06d}_{kind}", "image": name, "conversations": convs, "meta": {"kind": kind}}
        )
    (root / f"skill_{kind}_{split}.json").write_text(json.dumps(records, indent=1))
    return [f"skill_{kind}_{split}.json"]


# -- interleaved documents -------------------------------------------------------------------------------------
def _describe(world: ShapesWorld, scene: Scene, k: int, rng: random.Random) -> str:
    n = len(scene.things)
    listing = _listing(world.phrases(scene.things))
    text = rng.choice(
        [
            f"It shows {_count(n, 'shape')}: {listing}.",
            f"In picture {k} there {'is' if n == 1 else 'are'} {_count(n, 'shape')}: {listing}.",
            f"Picture {k} has {listing}.",
        ]
    )
    if scene.label is not None:
        text += f' The word "{scene.label.word}" is written at the {world.cells[scene.label.cell]}.'
    return text


def _which(ks: list[int]) -> str:
    return f"picture {ks[0]}" if len(ks) == 1 else "pictures " + _listing([str(k) for k in ks])


def _compare(scenes: list[Scene], rng: random.Random) -> str:
    """Sentences comparing the pictures: most/fewest shapes, a kind of object only one, all or none contain,
    and how many shapes of a colour they show together."""
    n = len(scenes)
    counts = [len(s.things) for s in scenes]
    sentences = []
    if len(set(counts)) == 1:
        sentences.append(f"All {NUMBER_WORDS[n]} pictures have {_count(counts[0], 'shape')}.")
    else:
        for word, best in (("most", max(counts)), ("fewest", min(counts))):
            ks = [k for k, c in enumerate(counts, 1) if c == best]
            verb = "has" if len(ks) == 1 else "have"
            sentences.append(f"{_which(ks).capitalize()} {verb} the {word} shapes: {NUMBER_WORDS[best]}.")
    kinds = [{(t.colour, t.shape) for t in s.things} for s in scenes]
    holders = {pair: [k for k, ks in enumerate(kinds, 1) if pair in ks] for pair in set().union(*kinds)}
    only = sorted(pair for pair, ks in holders.items() if len(ks) == 1)
    every = sorted(pair for pair, ks in holders.items() if len(ks) == n)
    if only:
        colour, shape = rng.choice(only)
        sentences.append(
            f"Only {_which(holders[colour, shape])} contains {article(colour)} {colour} {shape}."
        )
    if every:
        colour, shape = rng.choice(every)
        sentences.append(
            f"{'Both pictures' if n == 2 else 'Every picture'} contain{'' if n == 2 else 's'} "
            f"{article(colour)} {colour} {shape}."
        )
    absent = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in holders]
    colour, shape = rng.choice(absent)
    sentences.append(
        f"{'Neither picture' if n == 2 else 'None of the pictures'} contains "
        f"{article(colour)} {colour} {shape}."
    )
    colour = rng.choice(sorted({t.colour for s in scenes for t in s.things}))
    together = sum(t.colour == colour for s in scenes for t in s.things)
    sentences.append(f"Together the pictures show {_count(together, colour + ' shape')}.")
    return " ".join(sentences)


def document(world: ShapesWorld, picked: Images, rng: random.Random) -> dict[str, list[str | None]]:
    """One OBELICS-style document: an introduction, then per picture a title, the image and its description,
    then a comparison; ``{"texts": [...], "images": [...]}`` with one non-null per position."""
    texts: list[str | None] = []
    images: list[str | None] = []

    def text(value: str) -> None:
        texts.append(value)
        images.append(None)

    n = len(picked)
    text(
        rng.choice(
            [f"Here are {NUMBER_WORDS[n]} pictures of shapes.", f"Look at these {NUMBER_WORDS[n]} pictures."]
        )
    )
    for k, (name, scene) in enumerate(picked, 1):
        text(f"Picture {k}:")
        texts.append(None)
        images.append(name)
        text(_describe(world, scene, k, rng))
    text(_compare([scene for _, scene in picked], rng))
    return {"texts": texts, "images": images}


def write_interleaved(
    world: ShapesWorld, root: Path, split: str, images: Images, rng: random.Random
) -> list[str]:
    """``interleaved_{split}.jsonl``: ``documents_per_image`` documents per image, each of 2-4 distinct images."""
    count = math.ceil(len(images) * world.documents_per_image) if len(images) >= 2 else 0
    rows = []
    for d in range(count):
        picked = [images[j] for j in rng.sample(range(len(images)), rng.randint(2, min(4, len(images))))]
        rows.append({"id": f"{split}_doc_{d:06d}", **document(world, picked, rng)})
    _jsonl(root / f"interleaved_{split}.jsonl", rows)
    return [f"interleaved_{split}.jsonl"]


# -- text-only corpus ------------------------------------------------------------------------------------------
def _facts(world: ShapesWorld, rng: random.Random) -> str:
    facts = [f"{article(s).capitalize()} {s} has {CORNERS[s]} corners." for s in SHAPES] + [
        "A square has four sides of the same length.",
        "A triangle has three sides.",
        "A diamond is a square standing on one of its corners.",
        "Orange is a mix of red and yellow.",
        "Purple is a mix of red and blue.",
        "Green is a mix of blue and yellow.",
        "A large shape covers more of the picture than a small one.",
        f"A picture has {_count(world.grid**2, 'cell')}, and each cell holds at most one shape.",
    ]
    return " ".join(rng.sample(facts, rng.randint(2, 4)))


def _counting(world: ShapesWorld, rng: random.Random) -> str:
    (c1, s1), (c2, s2) = rng.sample([(c, s) for c in COLOURS for s in SHAPES], 2)
    a, b = rng.randint(1, 4), rng.randint(1, 4)
    return (
        f"There {'is' if a == 1 else 'are'} {_count(a, f'{c1} {s1}')} and {_count(b, f'{c2} {s2}')}. "
        f"That makes {_count(a + b, 'shape')} in all. If one {c1} {s1} is taken away, "
        f"{_count(a + b - 1, 'shape')} {'is' if a + b - 1 == 1 else 'are'} left."
    )


def _positions(world: ShapesWorld, rng: random.Random) -> str:
    n = world.grid
    (p, q), (s1, s2), (c1, c2) = (
        rng.sample(range(n * n), 2),
        rng.sample(SHAPES, 2),
        rng.sample(list(COLOURS), 2),
    )
    (r1, k1), (r2, k2) = divmod(p, n), divmod(q, n)
    vertical = "above" if r1 < r2 else "below" if r1 > r2 else ""
    horizontal = "to the left of" if k1 < k2 else "to the right of" if k1 > k2 else ""
    relation = " and ".join(r for r in (vertical, horizontal) if r)
    return (
        f"{article(c1).capitalize()} {c1} {s1} is at the {world.cells[p]} and {article(c2)} {c2} {s2} is at "
        f"the {world.cells[q]}. So the {c1} {s1} is {relation} the {c2} {s2}."
    )


def _story(world: ShapesWorld, rng: random.Random) -> str:
    name, things = rng.choice(NAMES), world.layout(rng).things
    said = [f"{name} draws a picture."]
    for i, t in enumerate(things):
        verb = "First" if i == 0 else rng.choice(["Then", "Next", "After that"])
        said.append(
            f"{verb} {name} draws {article(t.size)} {t.size} {t.colour} {t.shape} at the {world.cells[t.cell]}."
        )
    said.append(f"Now the picture has {_count(len(things), 'shape')}.")
    return " ".join(said)


def write_text_only(
    world: ShapesWorld, root: Path, split: str, images: Images, rng: random.Random
) -> list[str]:
    """``text_{split}.jsonl``: ``texts_per_image`` documents per image, unique ids; for validation and test also
    ``text_choice_{split}.jsonl``, one multiple-choice question per image (:func:`text_choice_records`)."""
    kinds = (_facts, _counting, _positions, _story)
    count = math.ceil(len(images) * world.texts_per_image)
    _jsonl(
        root / f"text_{split}.jsonl",
        [{"id": f"{split}_text_{i:06d}", "text": rng.choice(kinds)(world, rng)} for i in range(count)],
    )
    written = [f"text_{split}.jsonl"]
    if (
        split != "train"
    ):  # text-only multiple choice (lit_mllm.eval.TextChoices): what image data does to text
        path = root / f"text_choice_{split}.jsonl"
        _jsonl(path, text_choice_records(len(images), f"{world.seed}/{split}/text_choice", world.grid))
        written.append(path.name)
    return written


# -- grounding -------------------------------------------------------------------------------------------------
def referring_phrase(world: ShapesWorld, thing: Thing, things: list[Thing], rng: random.Random) -> str:
    """A phrase naming ``thing`` and no other object of ``things`` ("the red circle", "the small circle", ...);
    the cell always disambiguates, since a cell holds one object."""
    others = [u for u in things if u is not thing]

    def unique(*attrs: str) -> bool:
        return not any(all(getattr(u, a) == getattr(thing, a) for a in attrs) for u in others)

    t = thing
    options = [
        (unique("shape"), f"the {t.shape}"),
        (unique("colour"), f"the {t.colour} shape"),
        (unique("colour", "shape"), f"the {t.colour} {t.shape}"),
        (unique("size", "shape"), f"the {t.size} {t.shape}"),
        (unique("size", "colour", "shape"), f"the {t.size} {t.colour} {t.shape}"),
        (True, f"the {t.colour} {t.shape} at the {world.cells[t.cell]}"),
    ]
    return rng.choice([phrase for ok, phrase in options if ok])


def write_grounding(
    world: ShapesWorld, root: Path, split: str, images: Images, rng: random.Random
) -> list[str]:
    """``grounding_{split}.jsonl``: per image, every object (and the word) with a phrase and its tight box."""
    rows = []
    for name, scene in images:
        things = sorted(scene.things, key=lambda t: t.cell)
        objects = [
            {"phrase": referring_phrase(world, t, things, rng), "box": list(world.pixel_box(t))}
            for t in things
        ]
        if scene.label is not None:
            objects.append(
                {"phrase": f'the word "{scene.label.word}"', "box": list(world.pixel_box(scene.label))}
            )
        size = world.image_size
        rows.append({"id": Path(name).stem, "image": name, "width": size, "height": size, "objects": objects})
    _jsonl(root / f"grounding_{split}.jsonl", rows)
    return [f"grounding_{split}.jsonl"]


# -- multi-image questions -------------------------------------------------------------------------------------
MULTI_KINDS = ("both", "more", "find", "count")
MULTI_KIND_NAMES = {"both": "both", "more": "most", "find": "which", "count": "total"}
"""The ``meta.kind`` of each multi-image question kind (distinct from the single-image kinds: ``count`` there)."""
"""Multi-image question kinds: ``both`` (do both of two images contain X? yes/no, X in exactly one of them when
"no"), ``more`` (which image has the most shapes? one image has strictly more than every other), ``find`` (which
image shows X? X in exactly one), ``count`` (how many shapes in all the images together?)."""


def _others(images: Images, exclude: set[int], k: int, ok: Callable[[Scene], bool], rng: random.Random):
    """``k`` distinct image indices outside ``exclude`` whose scenes pass ``ok`` (drawn by rejection, at most
    ``64 * k`` draws), or None when not found."""
    found: list[int] = []
    for _ in range(64 * k):
        j = rng.randrange(len(images))
        if j not in exclude and j not in found and ok(images[j][1]):
            found.append(j)
            if len(found) == k:
                return found
    return None


def multi_question(
    world: ShapesWorld, images: Images, kind: str, rng: random.Random
) -> tuple[list[int], str, str] | None:
    """One multi-image question of ``kind`` over some of ``images``: (indices of the images shown, in order; the
    question; the answer), or None when ``images`` cannot give one (too few or too alike). Image numbers in
    answers count from 1; where the answer is an image, its place is drawn uniformly, so no number is favoured.
    """
    lo, hi = world.images_per_question
    if len(images) < (2 if kind == "both" else lo):
        return None
    n = 2 if kind == "both" else rng.randint(lo, min(hi, len(images)))
    if kind in ("both", "find"):
        first = rng.randrange(len(images))
        colour, shape = rng.choice(sorted({(t.colour, t.shape) for t in images[first][1].things}))
        has = lambda s: any((t.colour, t.shape) == (colour, shape) for t in s.things)  # noqa: E731
        yes = kind == "both" and rng.random() < 0.5
        rest = _others(images, {first}, n - 1, has if yes else (lambda s: not has(s)), rng)
        if rest is None:
            return None
        place = rng.randrange(n)
        picked = rest[:place] + [first] + rest[place:]
        thing = f"{article(colour)} {colour} {shape}"
        if kind == "both":
            return picked, f"Do both images contain {thing}? Answer yes or no.", "yes" if yes else "no"
        return picked, f"Which image shows {thing}? Answer with the image number.", str(place + 1)
    if kind == "more":
        first = rng.randrange(len(images))
        most = len(images[first][1].things)
        rest = _others(images, {first}, n - 1, lambda s: len(s.things) < most, rng)
        if rest is None:
            return None
        place = rng.randrange(n)
        picked = rest[:place] + [first] + rest[place:]
        return picked, "Which image has the most shapes? Answer with the image number.", str(place + 1)
    picked = rng.sample(range(len(images)), n)
    total = sum(len(images[j][1].things) for j in picked)
    return picked, "How many shapes are there in all the images together? Answer with a number.", str(total)


def multi_records(
    world: ShapesWorld, split: str, images: Images, count: int
) -> list[tuple[list[str], str, str, str]]:
    """``count`` multi-image questions over a split's images, kinds in turn (so equally many of each): (image
    paths, question, answer, kind) each. Drawn from the split's own stream ``{seed}/{split}/multi_image``."""
    rng, out = random.Random(f"{world.seed}/{split}/multi_image"), []
    tries = 0
    while len(out) < count:
        kind = MULTI_KINDS[len(out) % len(MULTI_KINDS)]
        made = multi_question(world, images, kind, rng)
        tries += 1
        if made is not None:
            picked, question, answer = made
            out.append(([images[j][0] for j in picked], question, answer, kind))
        elif tries > 100 * (count + 10):
            raise ValueError(
                f"cannot draw {count} multi-image questions from the {len(images)} {split} images: no {kind!r} "
                f"question found (it needs at least {world.images_per_question[0]} images that differ: "
                "give the split more images, allow more objects, or ask fewer multi-image questions)"
            )
    return out


def write_multi_image(world: ShapesWorld, root: Path, split: str, images: Images, count: int) -> list[str]:
    """``multi_{split}.json`` (LLaVA conversations, ``image`` a list, one ``Image k: <image>`` line per image
    before the question) and ``multi_interleaved_{split}.jsonl`` (the same questions as OBELICS-style documents:
    ``Image k:``, the image, ..., the question, the answer)."""
    records, documents = [], []
    for i, (paths, question, answer, kind) in enumerate(multi_records(world, split, images, count)):
        sid = f"{split}_multi_{i:06d}"
        shown = "".join(f"Image {k}: <image>\n" for k in range(1, len(paths) + 1))
        records.append(
            {
                "id": sid,
                "image": paths,
                "conversations": [
                    {"from": "human", "value": shown + question},
                    {"from": "gpt", "value": answer},
                ],
                "meta": {"kind": MULTI_KIND_NAMES[kind]},
            }
        )
        texts: list[str | None] = []
        pictures: list[str | None] = []
        for k, path in enumerate(paths, 1):
            texts += [f"Image {k}:", None]
            pictures += [None, path]
        documents.append({"id": sid, "texts": texts + [question, answer], "images": pictures + [None, None]})
    (root / f"multi_{split}.json").write_text(json.dumps(records, indent=1))
    _jsonl(root / f"multi_interleaved_{split}.jsonl", documents)
    return [f"multi_{split}.json", f"multi_interleaved_{split}.jsonl"]


# -- a small set from ShapesWorld's text facts ----------------------------------------------------------------
def _choice_options(right: str, pool: list[str], rng: random.Random, k: int = 4) -> tuple[list[str], int]:
    """``right`` and ``k - 1`` other members of ``pool``, shuffled; the right one's index."""
    options = [right] + rng.sample([p for p in pool if p != right], k - 1)
    rng.shuffle(options)
    return options, options.index(right)


def _choice_corners(rng: random.Random, grid: int) -> tuple[str, str, list[str]]:
    shape = rng.choice(SHAPES)
    return (
        f"How many corners does {article(shape)} {shape} have?",
        CORNERS[shape],
        ["no", "two", "three", "four", "five"],
    )


def _choice_colour_mix(rng: random.Random, grid: int) -> tuple[str, str, list[str]]:
    mixes = {"orange": ("red", "yellow"), "purple": ("red", "blue"), "green": ("blue", "yellow")}
    colour = rng.choice(sorted(mixes))
    a, b = rng.sample(mixes[colour], 2)
    return f"What colour is a mix of {a} and {b}?", colour, sorted(set(COLOURS) | set(mixes))


def _choice_counting(rng: random.Random, grid: int) -> tuple[str, str, list[str]]:
    (c1, s1), (c2, s2) = rng.sample([(c, s) for c in COLOURS for s in SHAPES], 2)
    a, b = rng.randint(1, 4), rng.randint(1, 4)
    context = (
        f"There {'is' if a == 1 else 'are'} {NUMBER_WORDS[a]} {c1} {s1}{'s' * (a > 1)} and {NUMBER_WORDS[b]} {c2} "
        f"{s2}{'s' * (b > 1)}. How many shapes are there in all?"
    )
    return context, NUMBER_WORDS[a + b], list(NUMBER_WORDS[1:])


def _choice_position(rng: random.Random, grid: int) -> tuple[str, str, list[str]]:
    cells = cell_names(grid)
    p, q = rng.sample(range(grid * grid), 2)
    (r1, k1), (r2, k2) = divmod(p, grid), divmod(q, grid)
    (s1, s2), (c1, c2) = rng.sample(SHAPES, 2), rng.sample(list(COLOURS), 2)
    vertical = "above" if r1 < r2 else "below" if r1 > r2 else ""
    horizontal = "to the left of" if k1 < k2 else "to the right of" if k1 > k2 else ""
    relation = " and ".join(r for r in (vertical, horizontal) if r)
    pool = [
        " and ".join(r for r in (v, h) if r)
        for v in ("above", "below", "")
        for h in ("to the left of", "to the right of", "")
    ]
    context = (
        f"{article(c1).capitalize()} {c1} {s1} is at the {cells[p]} and {article(c2)} {c2} {s2} is at the "
        f"{cells[q]}. Where is the {c1} {s1}?"
    )
    return context, f"{relation} the {c2} {s2}", [f"{r} the {c2} {s2}" for r in pool if r]


TEXT_CHOICE_KINDS = {
    "corners": _choice_corners,
    "colour_mix": _choice_colour_mix,
    "counting": _choice_counting,
    "position": _choice_position,
}
"""The kinds of question :func:`text_choice_records` asks, each a fact of ShapesWorld's text corpus."""


def text_choice_records(count: int, seed: int | str = 0, grid: int = 2, num_options: int = 4) -> list[dict]:
    """``count`` multiple-choice records (the ``lit_mllm.eval.TextChoices`` format) about ShapesWorld's text facts, the
    kinds in turn (meta ``kind``), drawn from ``seed``; ``grid`` as the world's (2 or 3)."""
    rng = random.Random(seed)
    kinds = list(TEXT_CHOICE_KINDS.items())
    records = []
    for i in range(count):
        kind, make = kinds[i % len(kinds)]
        context, right, pool = make(rng, grid)
        options, answer = _choice_options(right, pool, rng, num_options)
        records.append(
            {
                "id": f"text_choice_{i:05d}",
                "context": context,
                "options": options,
                "answer": answer,
                "meta": {"kind": kind},
            }
        )
    return records


def write_text_choices(path: str | Path, count: int = 200, seed: int = 0, grid: int = 2) -> Path:
    """Write :func:`text_choice_records` as JSON Lines to ``path`` (e.g. ``<root>/text_choice_val.jsonl``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps(r) + "\n" for r in text_choice_records(count, seed, grid)), encoding="utf-8"
    )
    return path
