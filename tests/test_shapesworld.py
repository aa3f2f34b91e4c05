"""ShapesWorld: the LLaVA files and images stay byte-identical to the published generator's; every extra format
parses as specified and says only true things about its images (checked against the rendered pixels and the
captions); the same settings give the same bytes; the difficulty knobs change what they say."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import re
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from lit_mllm.data import ShapesWorld
from lit_mllm.data.shapesworld import COLOURS, NUMBER_WORDS, SHAPES, TEXT_COLOUR
from lit_mllm.data.shapesworld_formats import referring_phrase
from lit_mllm.data.shapesworld_scene import CELLS, cell_names

OLD_FILES = ["train.json", "val.json", "test.json", "captions_train.json", "captions_val.json"]
SPLITS = ("train", "val", "test")

# sha256 digests of the files the generator wrote before the extra formats existed (computed with that code):
# (number of files, digest of names + file bytes, digest of names + decoded RGB pixels of the images)
SMALL = dict(image_size=64, num_train=12, num_val=4, num_test=4)
KNOBS = dict(
    image_size=32, num_train=10, num_val=3, num_test=3, min_object_px=4, max_objects=3, questions_per_image=2,
    caption_turn=False, seed=5,
)  # fmt: skip
PUBLISHED = {
    "small": (
        25,
        "7a5c163ebc5ba15018486bd0b1d5bcb81c3103b6604925b45043b653644f0dfa",
        "aeb65d753ecda3a80a25260a56c78305cdcfe894f0bb38c724774aaab55b6818",
    ),
    "knobs": (
        21,
        "11c40d345425612e48f03801836e27dfc7e6cf06dce58a81efafebaa23481c8c",
        "9ec853a39e1cc635483e6074e8073b8c030a68298acf472cf53620463d3066ef",
    ),
    "quickstart": (
        4605,
        "c11b0b3c0a23cc59b8aef036020e3d260523c22378d48eb2d14ebd2254b5fcd8",
        "3cafc6c772751f0eeb24449d3e96649a7e52ca454f22d0486ac2423c4a79781d",
    ),
}


def old_bytes(path: Path) -> bytes:
    """The file as the generator wrote it before records carried ``meta`` (the question's kind, for evaluation):
    LLaVA files with that key removed, written the same way."""
    if path.suffix != ".json":
        return path.read_bytes()
    records = json.loads(path.read_text())
    return json.dumps([{k: v for k, v in r.items() if k != "meta"} for r in records], indent=1).encode()


def digest(root: Path) -> tuple[int, str, str]:
    files = OLD_FILES + sorted(p.relative_to(root).as_posix() for p in (root / "images").glob("*.png"))
    raw, pixels = hashlib.sha256(), hashlib.sha256()
    for f in files:
        raw.update(f.encode() + b"\0" + hashlib.sha256(old_bytes(root / f)).digest())
        if f.endswith(".png"):
            pixels.update(f.encode() + Image.open(root / f).convert("RGB").tobytes())
    return len(files), raw.hexdigest(), pixels.hexdigest()


def check_published(root: Path, name: str) -> None:
    n, raw, pixels = digest(root)
    want = PUBLISHED[name]
    assert n == want[0], f"{n} files instead of {want[0]}"
    if raw != want[1]:
        assert pixels == want[2], "the generator now draws different images or writes different LLaVA files"
        pytest.fail(
            "same pixels but different bytes: either the LLaVA JSON files changed or this Pillow/zlib encodes "
            "PNGs differently from the one the published figure was made with"
        )


@pytest.mark.parametrize("extras", [None, ()], ids=["all-extras", "no-extras"])
@pytest.mark.parametrize("name", ["small", "knobs"])
def test_llava_files_and_images_are_byte_identical_to_the_published_generator(tmp_path, name, extras):
    kwargs = SMALL if name == "small" else KNOBS
    ShapesWorld(**kwargs, **({} if extras is None else {"extras": extras})).write(tmp_path / "sw")
    check_published(tmp_path / "sw", name)


@pytest.mark.slow
def test_quickstart_dataset_is_byte_identical_to_the_published_one(tmp_path):
    ShapesWorld().write(tmp_path / "sw")
    check_published(tmp_path / "sw", "quickstart")


# -- one dataset with everything on, shared by the format tests -------------------------------------------------
@pytest.fixture(scope="module")
def world() -> ShapesWorld:
    return ShapesWorld(image_size=64, num_train=30, num_val=9, num_test=5, text_px=6, shard_size=8, seed=3)


@pytest.fixture(scope="module")
def root(world, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sw") / "sw"
    world.write(path)
    return path


def jsonl(path: Path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    assert all(lines), f"{path} has an empty line"
    return [json.loads(line) for line in lines]


def captions(root: Path, split: str) -> dict[str, str]:
    return {row["image"]: row["caption"] for row in jsonl(root / f"captions_{split}.jsonl")}


def caption_objects(caption: str, grid: int) -> list[tuple[str, str, str, str]]:
    """(size, colour, shape, cell) of every object a caption lists."""
    cells = "|".join(sorted(cell_names(grid), key=len, reverse=True))
    return re.findall(rf"an? (small|large) (\w+) (\w+) at the ({cells})\b", caption.split(" The word ")[0])


def test_metadata_lists_every_file_written(root, world):
    meta = json.loads((root / "shapesworld.json").read_text())
    assert meta["generator"] == json.loads(json.dumps(asdict(world)))
    assert ShapesWorld(**meta["generator"]).size_ranges() == world.size_ranges()
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
    listed = set(meta["files"]) | {"shapesworld.json"}
    assert on_disk - listed == {p for p in on_disk if p.startswith("images/")}
    assert listed <= on_disk
    assert meta["images"] == len(list((root / "images").glob("*.png"))) == 30 + 9 + 5
    for split in SPLITS:
        assert {f"captions_{split}.jsonl", f"interleaved_{split}.jsonl", f"grounding_{split}.jsonl"} <= listed


def test_caption_shards_are_img2dataset_webdataset_tars(root, world):
    for split, count in zip(SPLITS, (30, 9, 5)):
        pairs = captions(root, split)
        shards = sorted((root / f"captions_{split}").iterdir())
        assert [p.name for p in shards] == [f"{s:05d}.tar" for s in range(math.ceil(count / 8))]
        seen = 0
        for s, shard in enumerate(shards):
            with tarfile.open(shard) as tar:
                members = tar.getmembers()
                n = len(members) // 3
                assert n == min(8, count - seen) and len(members) == 3 * n
                keys = [f"{s:05d}{i:04d}" for i in range(n)]
                assert [m.name for m in members] == [
                    f"{k}.{ext}" for k in keys for ext in ("jpg", "txt", "json")
                ]
                assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 and m.isfile() for m in members)
                for i, key in enumerate(keys):
                    image_name = f"images/{split}_{seen + i:06d}.png"
                    jpg, txt, meta = (
                        tar.extractfile(f"{key}.{ext}").read() for ext in ("jpg", "txt", "json")
                    )
                    meta = json.loads(meta)
                    assert list(meta) == [
                        "key", "caption", "url", "width", "height", "original_width", "original_height",
                        "status", "error_message",
                    ]  # fmt: skip
                    size = world.image_size
                    assert meta == {
                        "key": key, "caption": pairs[image_name], "url": None, "width": size, "height": size,
                        "original_width": size, "original_height": size, "status": "success",
                        "error_message": None,
                    }  # fmt: skip
                    assert len(key) == 9 and txt.decode("utf-8") == pairs[image_name]
                    decoded = Image.open(io.BytesIO(jpg))
                    assert decoded.format == "JPEG" and decoded.size == (size, size)
                    png = np.asarray(Image.open(root / image_name).convert("RGB"), dtype=float)
                    assert np.abs(np.asarray(decoded.convert("RGB"), dtype=float) - png).mean() < 4
            seen += n
        assert seen == count


def test_caption_manifests_match_the_llava_captions(root):
    for split in SPLITS:
        rows = jsonl(root / f"captions_{split}.jsonl")
        assert all(list(r) == ["image", "caption"] and (root / r["image"]).is_file() for r in rows)
        with open(root / f"captions_{split}.csv", newline="", encoding="utf-8") as f:
            table = list(csv.reader(f))
        assert table[0] == ["image", "caption"]
        assert table[1:] == [[r["image"], r["caption"]] for r in rows]
        assert any('"' in r["caption"] and "," in r["caption"] for r in rows)  # the word: quoting exercised
        if split != "test":
            llava = json.loads((root / f"captions_{split}.json").read_text())
            assert [(r["image"], r["conversations"][1]["value"]) for r in llava] == [
                (r["image"], r["caption"]) for r in rows
            ]


# -- grounding: boxes against the pixels, phrases against the captions -----------------------------------------
def tight(image: Image.Image, box, grid: int, text: bool) -> bool:
    """The box is the bounding box of the object's pixels in its cell (x2/y2 exclusive): colour pixels all
    inside, touching each edge. An object's colour is the commonest non-background colour in its box; the
    word is every non-background pixel."""
    a = np.asarray(image.convert("RGB")).astype(int)
    c = image.width // grid
    x1, y1, x2, y2 = box
    col, row = ((x1 + x2) // 2) // c, ((y1 + y2) // 2) // c
    cell = a[row * c : (row + 1) * c, col * c : (col + 1) * c]
    ink = (cell != a[0, 0]).any(-1)
    if not text:
        inside = cell[y1 - row * c : y2 - row * c, x1 - col * c : x2 - col * c].reshape(-1, 3)
        colours, counts = np.unique(inside[(inside != a[0, 0]).any(-1)], axis=0, return_counts=True)
        ink = (cell == colours[counts.argmax()]).all(-1)
    ys, xs = np.nonzero(ink)
    return (xs.min() + col * c, ys.min() + row * c, xs.max() + 1 + col * c, ys.max() + 1 + row * c) == tuple(
        box
    )


def matches(phrase: str, obj: tuple[str, str, str, str]) -> bool:
    words, _, cell = phrase.removeprefix("the ").partition(" at the ")
    size, colour, shape, where = obj
    return all(w in (size, colour, shape, "shape") for w in words.split()) and cell in ("", where)


def test_grounding_boxes_are_tight_and_phrases_unambiguous(root, world):
    for split in SPLITS:
        pairs = captions(root, split)
        rows = jsonl(root / f"grounding_{split}.jsonl")
        assert len(rows) == len(pairs) and len({r["id"] for r in rows}) == len(rows)
        for r in rows:
            assert list(r) == ["id", "image", "width", "height", "objects"]
            assert (r["width"], r["height"]) == (world.image_size, world.image_size)
            image = Image.open(root / r["image"])
            objects = caption_objects(pairs[r["image"]], world.grid)
            word = re.search(r'The word "(\w+)"', pairs[r["image"]]).group(1)
            assert len(r["objects"]) == len(objects) + 1
            for obj in r["objects"]:
                assert list(obj) == ["phrase", "box"] and all(isinstance(v, int) for v in obj["box"])
                is_word = obj["phrase"].startswith("the word")
                assert tight(image, obj["box"], world.grid, text=is_word), (r["id"], obj)
                if is_word:
                    assert obj["phrase"] == f'the word "{word}"'
                else:
                    assert sum(matches(obj["phrase"], o) for o in objects) == 1, (r["id"], obj, objects)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    grid=st.sampled_from([2, 3]),
    image_size=st.sampled_from([48, 64, 96]),
    text_px=st.sampled_from([None, 3, 4, 6, 9]),
)
def test_any_scene_has_tight_boxes_and_unambiguous_phrases(seed, grid, image_size, text_px):
    letters = ("A", "K", "W")  # single letters fit every cell here
    world = ShapesWorld(
        image_size=image_size,
        grid=grid,
        max_objects=grid * grid,
        min_object_px=4,
        text_px=text_px,
        text_words=letters,
    )
    rng = random.Random(seed)
    scene = world.layout(rng)
    image = world.render(scene.things, scene.label)
    objects = [(t.size, t.colour, t.shape, world.cells[t.cell]) for t in scene.things]
    for t in scene.things:
        assert tight(image, world.pixel_box(t), grid, text=False)
        assert sum(matches(referring_phrase(world, t, scene.things, rng), o) for o in objects) == 1
    assert (scene.label is None) == (text_px is None)
    if scene.label is not None:
        assert tight(image, world.pixel_box(scene.label), grid, text=True)
        assert scene.label.cell not in {t.cell for t in scene.things}


# -- interleaved documents: structure, and every claim checked against the captions ---------------------------
def check_comparison(text: str, objects: list[list[tuple[str, str, str, str]]]) -> None:
    number = {w: i for i, w in enumerate(NUMBER_WORDS)}
    counts = [len(o) for o in objects]
    has = [{(c, s) for _, c, s, _ in o} for o in objects]

    def pictures(listing: str) -> list[int]:
        return [int(k) - 1 for k in re.findall(r"\d+", listing)]

    for sentence in re.split(r"(?<=\.) ", text):
        if m := re.fullmatch(r"All (\w+) pictures have (\w+) shapes?\.", sentence):
            assert number[m[1]] == len(objects) and set(counts) == {number[m[2]]}
        elif m := re.fullmatch(
            r"Pictures? ([\d, and]+) ha(?:s|ve) the (most|fewest) shapes: (\w+)\.", sentence
        ):
            best = max(counts) if m[2] == "most" else min(counts)
            assert number[m[3]] == best and pictures(m[1]) == [k for k, c in enumerate(counts) if c == best]
        elif m := re.fullmatch(r"Only picture (\d) contains an? (\w+) (\w+)\.", sentence):
            assert [k for k, h in enumerate(has) if (m[2], m[3]) in h] == pictures(m[1])
        elif m := re.fullmatch(
            r"(?:Both pictures contain|Every picture contains) an? (\w+) (\w+)\.", sentence
        ):
            assert all((m[1], m[2]) in h for h in has)
        elif m := re.fullmatch(
            r"(?:Neither picture|None of the pictures) contains an? (\w+) (\w+)\.", sentence
        ):
            assert not any((m[1], m[2]) in h for h in has)
        elif m := re.fullmatch(r"Together the pictures show (\w+) (\w+) shapes?\.", sentence):
            assert number[m[1]] == sum(c == m[2] for o in objects for _, c, _, _ in o)
        else:
            pytest.fail(f"unchecked claim {sentence!r}")


def test_interleaved_documents_are_parallel_and_true(root, world):
    for split, count in zip(SPLITS, (30, 9, 5)):
        pairs = captions(root, split)
        docs = jsonl(root / f"interleaved_{split}.jsonl")
        assert len(docs) == math.ceil(count * world.documents_per_image)
        assert len({d["id"] for d in docs}) == len(docs)
        for d in docs:
            assert list(d) == ["id", "texts", "images"] and isinstance(d["id"], str)
            texts, images = d["texts"], d["images"]
            assert len(texts) == len(images)
            assert all((t is None) != (i is None) for t, i in zip(texts, images))
            shown = [i for i in images if i is not None]
            assert 2 <= len(shown) <= 4 and len(set(shown)) == len(shown)
            assert all(i in pairs and (root / i).is_file() for i in shown)
            assert all("<image>" not in t for t in texts if t is not None)
            objects = [caption_objects(pairs[i], world.grid) for i in shown]
            for k, i in enumerate(shown):  # each picture is described right after it, truthfully
                after = texts[images.index(i) + 1]
                assert caption_objects(after, world.grid) == objects[k]
                assert re.search(r'The word "\w+"', after)[0] == re.search(r'The word "\w+"', pairs[i])[0]
            check_comparison(texts[-1], objects)


# -- text-only corpus ------------------------------------------------------------------------------------------
def test_text_only_corpus_has_unique_ids_and_true_arithmetic_and_positions(root, world):
    number = {w: i for i, w in enumerate(NUMBER_WORDS)}
    rows = [r for split in SPLITS for r in jsonl(root / f"text_{split}.jsonl")]
    assert len(rows) == math.ceil(30 * world.texts_per_image) + 9 + 5
    assert all(list(r) == ["id", "text"] and r["text"].strip() and "<image>" not in r["text"] for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)
    kinds = set()
    for r in rows:
        text = r["text"]
        if m := re.search(r"There (?:is|are) (\w+) .*? and (\w+) .*?\. That makes (\w+) shapes? in all\. "
                          r"If one .* taken away, (\w+) shapes? (?:is|are) left\.", text):  # fmt: skip
            a, b, total, left = (number[g] for g in m.groups())
            assert (total, left) == (a + b, a + b - 1)
            kinds.add("counting")
        elif m := re.search(
            r"is at the ([a-z ]+?) and an? .* is at the ([a-z ]+?)\. So the \w+ \w+ is (.+) the", text
        ):
            (r1, c1), (r2, c2) = (divmod(world.cells.index(m[g]), world.grid) for g in (1, 2))
            want = [w for w, ok in (("above", r1 < r2), ("below", r1 > r2)) if ok] + [
                w for w, ok in (("to the left of", c1 < c2), ("to the right of", c1 > c2)) if ok
            ]
            assert m[3] == " and ".join(want)
            kinds.add("positions")
        elif re.match(r"\w+ draws a picture\.", text):
            drawn = re.findall(r"draws an? (?:small|large) \w+ \w+ at the", text)
            assert re.search(r"Now the picture has (\w+) shapes?\.$", text)[1] == NUMBER_WORDS[len(drawn)]
            kinds.add("story")
        else:
            kinds.add("facts")
    assert kinds == {"counting", "positions", "story", "facts"}


# -- determinism, independence of the extras -------------------------------------------------------------------
def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_settings_same_bytes_and_each_extra_on_its_own_stream(tmp_path):
    kwargs = dict(
        image_size=48, num_train=10, num_val=4, num_test=3, min_object_px=4, text_px=5, shard_size=4
    )
    ShapesWorld(**kwargs).write(tmp_path / "a")
    ShapesWorld(**kwargs).write(tmp_path / "b")
    a = tree(tmp_path / "a")
    assert a == tree(tmp_path / "b")
    ShapesWorld(**kwargs, extras=("grounding",)).write(tmp_path / "c")
    c = tree(tmp_path / "c")
    assert {k for k in c if not k.startswith("images/")} == {
        *OLD_FILES, "shapesworld.json", "grounding_train.jsonl", "grounding_val.jsonl", "grounding_test.jsonl",
    }  # fmt: skip
    assert all(c[k] == a[k] for k in c if k != "shapesworld.json")
    ShapesWorld(**kwargs, seed=1).write(tmp_path / "d")
    assert tree(tmp_path / "d")["grounding_train.jsonl"] != a["grounding_train.jsonl"]
    with pytest.raises(FileExistsError):
        ShapesWorld(**kwargs).write(tmp_path / "a")


# -- the knobs -------------------------------------------------------------------------------------------------
def sides(world: ShapesWorld, n: int = 200) -> dict[str, set[int]]:
    """Drawn widths in pixels of small and large objects over ``n`` scenes."""
    rng, out = random.Random(0), {"small": set(), "large": set()}
    for _ in range(n):
        for t in world.scene(rng):
            x1, _, x2, _ = world.pixel_box(t)
            out[t.size].add(x2 - x1)
    return out


def test_object_size_ranges():
    default = sides(ShapesWorld())
    assert default == {"small": set(range(9, 14)), "large": set(range(20, 30))}  # side + 1: PIL draws x1 too
    custom = sides(ShapesWorld(min_object_px=4, small_px=(4, 5), large_px=(24, 30)))
    assert custom == {"small": {5, 6}, "large": set(range(25, 32))}
    with pytest.raises(ValueError, match="small_px"):
        ShapesWorld(small_px=(6, 9))  # below min_object_px
    with pytest.raises(ValueError, match="large_px"):
        ShapesWorld(large_px=(20, 31))  # does not fit a 32 px cell with margins
    with pytest.raises(ValueError, match="smaller than large"):
        ShapesWorld(small_px=(8, 20), large_px=(20, 28))


def test_max_objects_and_grid():
    rng = random.Random(0)
    assert {len(ShapesWorld(max_objects=1).scene(rng)) for _ in range(50)} == {1}
    nine = ShapesWorld(image_size=96, grid=3, max_objects=9, min_object_px=4)
    scenes = [nine.scene(rng) for _ in range(200)]
    assert max(map(len, scenes)) > 4 and {t.cell for s in scenes for t in s} == set(range(9))
    names = cell_names(3)
    assert len(set(names)) == 9 and names[4] == "center" and cell_names(2) == CELLS
    for things in scenes[:50]:
        for t in things:  # the cell's name says where the object is drawn
            x1, y1, x2, y2 = nine.pixel_box(t)
            row, col = ((y1 + y2) // 2) // 32, ((x1 + x2) // 2) // 32
            assert names[t.cell] in (
                f"{('top', 'middle', 'bottom')[row]} {('left', 'center', 'right')[col]}",
                "center" if (row, col) == (1, 1) else None,
            )
        caption = nine.caption(things)
        assert caption.startswith(NUMBER_WORDS[len(things)].capitalize())
        assert len(caption_objects(caption, 3)) == len(things)
    with pytest.raises(ValueError, match="max_objects must be in 1..4"):
        ShapesWorld(max_objects=5)


def test_text_knob_draws_a_word_of_the_asked_size_and_asks_for_it(tmp_path):
    rng = random.Random(0)
    plain = ShapesWorld()
    assert all(TEXT_COLOUR not in plain.render(plain.scene(rng)).getdata() for _ in range(20))
    heights = {}
    for px in (5, 6, 12):
        world = ShapesWorld(image_size=96, text_px=px)
        scene = world.layout(rng)
        assert len(scene.things) <= 3 and scene.label.word in world.text_words
        x1, y1, x2, y2 = world.pixel_box(scene.label)
        heights[px] = y2 - y1
        assert f'The word "{scene.label.word}" is written at the' in world.caption(scene.things, scene.label)
        assert world.question(scene.things, rng, "text", scene.label) == (
            "What word is written in the image? Answer with the word.",
            scene.label.word,
        )
    assert heights == {5: 5, 6: 6, 12: 12}  # capital letters only: the word is text_px tall
    ShapesWorld(image_size=48, num_train=40, num_val=0, num_test=0, min_object_px=4, text_px=6).write(
        tmp_path / "t"
    )
    asked = 0
    for record in json.loads((tmp_path / "t" / "train.json").read_text()):
        turns = [c["value"] for c in record["conversations"]]
        word = re.search(r'The word "(\w+)"', turns[-1])[1]  # the caption turn names the drawn word
        for question, answer in zip(turns[::2], turns[1::2]):
            if "What word is written" in question:
                assert answer == word
                asked += 1
    assert asked > 0
    with pytest.raises(ValueError, match="too|wide"):
        ShapesWorld(text_px=12, text_words=("ELEPHANT",))
    with pytest.raises(ValueError, match="text_px must be"):
        ShapesWorld(text_px=40)


# -- kept from the first ShapesWorld tests ----------------------------------------------------------------------
def test_scenes_are_truthful():
    gen = ShapesWorld(image_size=64)
    rng = random.Random(3)
    for _ in range(50):
        things = gen.scene(rng)
        image = gen.render(things)
        assert len({t.cell for t in things}) == len(things)
        for t in things:
            x0, y0, x1, y1 = t.box
            assert image.getpixel(((x0 + x1) // 2, (y0 + y1) // 2 + (y1 - y0) // 4)) == COLOURS[t.colour]
            assert x1 - x0 >= gen.min_object_px
            half = gen.image_size // 2
            assert CELLS[t.cell] == f"{'top' if y0 < half else 'bottom'} {'left' if x0 < half else 'right'}"
        for kind in ("colour", "shape", "count", "position", "existence", "text"):
            q, a = gen.question(things, rng, kind)
            if kind in ("count", "text") or q.startswith("How many"):
                assert a == str(len(things))
            if q.startswith("What color is the"):
                shape = q.split()[4].rstrip("?")
                assert a == next(t.colour for t in things if t.shape == shape)
            if q.startswith("Is there"):
                _, _, article, colour, shape = q.split()[:5]
                assert article == ("an" if colour == "orange" else "a") and shape.rstrip("?") in SHAPES
                assert (a == "yes") == any((t.colour, t.shape) == (colour, shape.rstrip("?")) for t in things)


def test_cli_writes_with_the_new_options(tmp_path):
    from lit_mllm.cli import run

    args = ["data", "shapesworld", "--out", str(tmp_path / "sw"), "--generator.num_train", "3"]
    args += ["--generator.num_val", "2", "--generator.num_test", "2", "--generator.grid", "3"]
    args += [
        "--generator.image_size",
        "96",
        "--generator.min_object_px",
        "4",
        "--generator.small_px",
        "[4, 6]",
    ]
    args += ["--generator.extras", "[grounding, text_only]", "--generator.text_px", "6"]
    run(args)
    meta = json.loads((tmp_path / "sw" / "shapesworld.json").read_text())
    assert meta["generator"]["grid"] == 3 and meta["generator"]["small_px"] == [4, 6]
    assert sorted(f for f in meta["files"] if f.endswith(".jsonl")) == sorted(
        [f"{kind}_{split}.jsonl" for kind in ("grounding", "text") for split in SPLITS]
        + [f"text_choice_{split}.jsonl" for split in ("val", "test")]
    )
    assert len(list((tmp_path / "sw" / "images").glob("*.png"))) == 7
    with pytest.raises(SystemExit):
        run(["data", "shapesworld", "--out", str(tmp_path / "x"), "--generator.extras", "[captions]"])


# -- multi-image questions -------------------------------------------------------------------------------------
MULTI = dict(
    image_size=32, num_train=24, num_val=12, num_test=6, min_object_px=4, extras=(), num_multi_train=120,
    num_multi_val=40, num_multi_test=8, seed=7,
)  # fmt: skip


@pytest.fixture(scope="module")
def multi_root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("multi") / "sw"
    ShapesWorld(**MULTI).write(path)
    return path


def scene_objects(root: Path, split: str) -> dict[str, list[tuple[str, str, str, str]]]:
    """Image path -> (size, colour, shape, cell) of its objects, read from the LLaVA caption records."""
    rows = json.loads((root / f"captions_{split}.json").read_text())
    return {r["image"]: caption_objects(r["conversations"][1]["value"], 2) for r in rows}


def reference_answer(question: str, shown: list[list[tuple[str, str, str, str]]]) -> str:
    """The answer to a multi-image question, worked out here from the objects of the images shown, in order."""
    kinds = [{(colour, shape) for _, colour, shape, _ in objects} for objects in shown]
    counts = [len(objects) for objects in shown]
    if m := re.fullmatch(r"Do both images contain an? (\w+) (\w+)\? Answer yes or no\.", question):
        assert len(shown) == 2
        return "yes" if all((m[1], m[2]) in k for k in kinds) else "no"
    if m := re.fullmatch(r"Which image shows an? (\w+) (\w+)\? Answer with the image number\.", question):
        holders = [k for k, pairs in enumerate(kinds, 1) if (m[1], m[2]) in pairs]
        assert len(holders) == 1, f"{question} is shown by images {holders}: the answer must be unique"
        return str(holders[0])
    if question == "Which image has the most shapes? Answer with the image number.":
        best = [k for k, c in enumerate(counts, 1) if c == max(counts)]
        assert len(best) == 1, f"images {best} tie for the most shapes: the answer must be unique"
        return str(best[0])
    assert question == "How many shapes are there in all the images together? Answer with a number.", question
    return str(sum(counts))


def multi_rows(root: Path, split: str) -> list[tuple[list[str], str, str]]:
    rows = []
    for r in json.loads((root / f"multi_{split}.json").read_text()):
        (human, gpt) = r["conversations"]
        assert human["from"] == "human" and gpt["from"] == "gpt"
        n = len(r["image"])
        prefix = "".join(f"Image {k}: <image>\n" for k in range(1, n + 1))
        assert human["value"].startswith(prefix) and human["value"].count("<image>") == n
        rows.append((r["image"], human["value"][len(prefix) :], gpt["value"]))
    return rows


@pytest.mark.parametrize("split", ["train", "val"])
def test_multi_image_answers_are_true(multi_root, split):
    objects = scene_objects(multi_root, split)
    rows = multi_rows(multi_root, split)
    assert len(rows) == MULTI[f"num_multi_{split}"]
    for paths, question, answer in rows:
        assert 2 <= len(paths) <= 4 and len(set(paths)) == len(paths)
        assert all(p.startswith(f"images/{split}_") and (multi_root / p).is_file() for p in paths)
        assert answer == reference_answer(question, [objects[p] for p in paths]), (paths, question)


def test_one_image_cannot_answer_multi_image_questions(multi_root):
    """Permuting the images permutes an image-number answer; a "no" to "both" has X in exactly one of the two
    images, so neither image alone decides; no answer is a fixed value of the question text."""
    objects = scene_objects(multi_root, "train")
    rows = multi_rows(multi_root, "train")
    kinds: dict[str, list[str]] = {}
    for paths, question, answer in rows:
        kinds.setdefault(" ".join(question.split()[:3]), []).append(answer)
        shown = [objects[p] for p in paths]
        if question.startswith("Which image"):
            for perm in ([1, 0, *range(2, len(paths))], list(range(len(paths)))[::-1]):
                moved = reference_answer(question, [shown[j] for j in perm])
                assert moved == str(perm.index(int(answer) - 1) + 1)
        if question.startswith("Do both") and answer == "no":
            m = re.search(r"an? (\w+) (\w+)\?", question)
            assert sorted(any((c, s) == (m[1], m[2]) for _, c, s, _ in o) for o in shown) == [False, True]
    assert sorted(kinds) == ["Do both images", "How many shapes", "Which image has", "Which image shows"]
    for answers in kinds.values():  # kinds in turn, and no answer dominates its kind
        assert len(answers) == len(rows) // 4
        assert max(answers.count(a) for a in answers) <= 0.65 * len(answers)
    assert 0.35 <= kinds["Do both images"].count("yes") / len(kinds["Do both images"]) <= 0.65
    for k in ("Which image has", "Which image shows"):
        assert {"1", "2", "3"} <= set(kinds[k])  # the answer image stands anywhere


def test_multi_image_interleaved_documents_ask_the_same_questions(multi_root):
    for split in SPLITS:
        docs = jsonl(multi_root / f"multi_interleaved_{split}.jsonl")
        records = json.loads((multi_root / f"multi_{split}.json").read_text())
        assert [d["id"] for d in docs] == [r["id"] for r in records]
        assert len({d["id"] for d in docs}) == len(docs)
        for d, (paths, question, answer) in zip(docs, multi_rows(multi_root, split)):
            n = len(paths)
            assert d["images"] == [x for p in paths for x in (None, p)] + [None, None]
            titles = [x for k in range(1, n + 1) for x in (f"Image {k}:", None)]
            assert d["texts"] == titles + [question, answer]
    from lit_mllm.data import Interleaved

    source = Interleaved("multi_interleaved_val.jsonl", style="plain").open(multi_root)
    sample = source.sample(0, "<image>")
    paths, question, answer = multi_rows(multi_root, "val")[0]
    assert [Path(p) for p in sample.images] == [multi_root / p for p in paths]
    text = sample.text  # a document: every token learned
    assert text.count("<image>") == len(paths) and text.rstrip().endswith(f"{question}\n{answer}")


def test_multi_image_files_leave_the_others_alone_and_are_deterministic(tmp_path, multi_root):
    multi = dict(num_multi_train=10, num_multi_val=4, num_multi_test=2)
    ShapesWorld(**SMALL, **multi).write(tmp_path / "a")
    check_published(tmp_path / "a", "small")  # LLaVA files and images as without multi-image questions
    ShapesWorld(**SMALL, **multi).write(tmp_path / "b")
    a, b = tree(tmp_path / "a"), tree(tmp_path / "b")
    assert a == b
    news = {f"multi_{s}.json" for s in SPLITS} | {f"multi_interleaved_{s}.jsonl" for s in SPLITS}
    assert news <= set(a) and news <= set(json.loads(a["shapesworld.json"])["files"])
    ShapesWorld(**SMALL, **multi, extras=()).write(tmp_path / "c")
    assert all(tree(tmp_path / "c")[k] == a[k] for k in news)  # own stream: the extras do not move it
    ShapesWorld(**{**SMALL, "seed": 1}, **multi).write(tmp_path / "d")
    assert tree(tmp_path / "d")["multi_train.json"] != a["multi_train.json"]
    assert not any(p.name.startswith("multi") for p in multi_root.parent.glob("*"))
    with pytest.raises(ValueError, match="images_per_question"):
        ShapesWorld(images_per_question=(1, 3))
    with pytest.raises(ValueError, match="more images"):
        ShapesWorld(**{**SMALL, "num_val": 1}, num_multi_val=3).write(tmp_path / "e")


def test_multi_image_data_config_trains_a_tiny_prefix_model(multi_root, tmp_path):
    from lit_mllm.commands.lightning import build_cli
    from lit_mllm.eval.baselines import answer_baselines
    from tests.conftest import cli_args

    configs = Path(__file__).resolve().parents[1] / "configs"
    args = [
        "--config",
        str(configs / "quickstart.yaml"),
        "--data",
        str(configs / "data" / "shapesworld_multi_image.yaml"),
    ]
    args += [
        *cli_args(multi_root, tmp_path, batch_size=6),
        "--model.init_args.vision_tower.init_args.image_size",
        "32",
    ]
    args += [
        "--trainer.max_steps",
        "3",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.enable_checkpointing",
        "false",
    ]
    cli = build_cli(args, run=False)
    assert {n: s.weight for n, s in cli.datamodule.splits["fit"].items()} == {"instruct": 50, "multi": 50}
    assert set(cli.datamodule.splits["validate"]) == {"multi"}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert cli.trainer.global_step == 3 and cli.trainer.callback_metrics["train/loss"].isfinite()
    train = cli.datamodule.samples("fit")
    assert sum(len(s.images) > 1 for s in train) == MULTI["num_multi_train"]
    scores = answer_baselines(train, cli.datamodule.samples("validate"))
    val = cli.datamodule.samples("validate")
    assert len(val) == MULTI["num_multi_val"] and all(len(s.images) >= 2 for s in val)
    assert 0 < scores["majority"] < 0.5 and scores["blind"] < 0.7


# -- variants for data selection and merging: noisy captions, skill-specific instruction sets -------------------
VARIANTS = dict(image_size=32, num_train=20, num_val=6, num_test=4, min_object_px=4, shard_size=8, seed=11)


@pytest.fixture(scope="module")
def variant_roots(tmp_path_factory) -> tuple[Path, Path]:
    """The same world without and with the variants on."""
    base = tmp_path_factory.mktemp("variants")
    ShapesWorld(**VARIANTS).write(base / "plain")
    ShapesWorld(
        **VARIANTS, noisy_captions=0.25, rare_token_captions=0.2, skill_sets=("colour", "count")
    ).write(base / "noisy")
    return base / "plain", base / "noisy"


def test_variants_leave_every_other_file_as_it_was(variant_roots):
    plain, noisy = variant_roots
    extra = {"noise_train.json", *(f"skill_{k}_{s}.json" for k in ("colour", "count") for s in SPLITS)}
    files = lambda root: {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}  # noqa: E731
    assert files(noisy) == files(plain) | extra
    noisy_caption_files = {"captions_train.json", "captions_train.jsonl", "captions_train.csv"}
    for name in files(plain) - noisy_caption_files - {"shapesworld.json"}:
        if not name.startswith("captions_train/"):
            assert (noisy / name).read_bytes() == (plain / name).read_bytes(), name


def test_noisy_captions_are_unrelated_or_junk_in_every_format_and_recorded(variant_roots):
    plain, noisy = variant_roots
    true = [r["conversations"][-1]["value"] for r in json.loads((plain / "train.json").read_text())]
    record = json.loads((noisy / "noise_train.json").read_text())
    unrelated = {e["index"] for e in record["unrelated"]}
    rare = {e["index"] for e in record["rare_tokens"]}
    assert (
        len(unrelated) == 5 and len(rare) == 4 and not unrelated & rare
    )  # floor(0.25 * 20), floor(0.2 * 20)
    llava = json.loads((noisy / "captions_train.json").read_text())
    manifest = {row["image"]: row["caption"] for row in jsonl(noisy / "captions_train.jsonl")}
    shards = {}
    for shard in sorted((noisy / "captions_train").glob("*.tar")):
        with tarfile.open(shard) as tar:
            shards.update(
                {m.name[:-4]: tar.extractfile(m).read().decode() for m in tar if m.name.endswith(".txt")}
            )
    for kind in ("unrelated", "rare_tokens"):
        for e in record[kind]:
            assert llava[e["index"]]["id"] == e["id"] and llava[e["index"]]["image"] == e["image"]
            caption = llava[e["index"]]["conversations"][1]["value"]
            assert manifest[e["image"]] == caption and shards[e["key"]] == caption
    for i, r in enumerate(llava):
        caption, own = r["conversations"][1]["value"], true[i]
        if i in unrelated:
            assert caption != own and caption in true  # another image's true caption
        elif i in rare:
            words = caption.split(" ")
            junk = [w for w in words if w not in own.split(" ")]
            assert 2 <= len(junk) <= 4 and " ".join(w for w in words if w not in junk) == own
        else:
            assert caption == own
    assert (noisy / "captions_val.json").read_bytes() == (plain / "captions_val.json").read_bytes()


def test_skill_sets_ask_one_kind_and_answer_truly(variant_roots):
    plain, noisy = (
        variant_roots  # the objects read from the true captions (the noisy world's are not all true)
    )
    objects = (
        scene_objects(plain, "train")
        | scene_objects(plain, "val")
        | {r["image"]: caption_objects(r["caption"], 2) for r in jsonl(plain / "captions_test.jsonl")}
    )
    for split in SPLITS:
        for kind in ("colour", "count"):
            records = json.loads((noisy / f"skill_{kind}_{split}.json").read_text())
            assert records and all(r["meta"] == {"kind": kind} for r in records)
            for r in records:
                turns = r["conversations"]
                assert len(turns) % 2 == 0 and (split == "train" or len(turns) == 2)
                things = objects[r["image"]]
                questions = [t["value"].removeprefix("<image>\n") for t in turns[::2]]
                assert len(set(questions)) == len(questions)
                for question, answer in zip(questions, (t["value"] for t in turns[1::2])):
                    if kind == "count":
                        assert question.startswith("How many shapes") and answer == str(len(things))
                    else:
                        shape = re.fullmatch(r"What color is the (\w+)\? Answer with one word\.", question)[1]
                        assert [c for _, c, s, _ in things if s == shape] == [answer]
    with pytest.raises(ValueError, match="skill_sets must be distinct question kinds"):
        ShapesWorld(**VARIANTS, skill_sets=("text",))
    with pytest.raises(ValueError, match="together at most 1"):
        ShapesWorld(**VARIANTS, noisy_captions=0.6, rare_token_captions=0.5)


def test_a_run_that_finds_its_dataset_written_by_another_meanwhile_keeps_that_one(tmp_path):
    """A sweep's parallel arms each find the dataset missing and generate it, each into its own partial folder:
    when another run's finished dataset appears while this one writes (here: during its first drawing), this run
    drops its copy instead of failing or mixing the two, and no partial folder is left."""
    import shutil

    finished = tmp_path / "finished"
    ShapesWorld(**SMALL).write(finished)
    root = tmp_path / "sw"

    class Racing(ShapesWorld):
        def render(self, *args, **kwargs):
            if not root.exists():  # the other run finishes first
                shutil.copytree(finished, root)
            return super().render(*args, **kwargs)

    Racing(**SMALL).write(root)
    check_published(root, "small")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["finished", "sw"]
