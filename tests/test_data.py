"""LLaVA-format reading, bad-input errors that name file and record, the processor, ShapesWorld."""

import json
from pathlib import Path

import pytest
from PIL import Image

from lit_mllm.data import ConversationData, DataError, ShapesWorld, collate, read_llava
from lit_mllm.data.shapesworld import CELLS, COLOURS
from lit_mllm.nn.language.chat import IGNORE_INDEX


def write(tmp_path: Path, records, name="d.json") -> Path:
    path = tmp_path / name
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "ok.png")
    return path


def rec(**kw):
    r = {
        "id": "r1",
        "image": "ok.png",
        "conversations": [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}],
    }
    r.update(kw)
    return r


@pytest.mark.parametrize(
    "record,match",
    [
        (rec(conversations=[]), "missing or empty 'conversations'"),
        (rec(conversations=[{"from": "bot", "value": "x"}]), "conversations\\[0\\] must be"),
        (rec(image=["ok.png", "ok.png"]), "1 <image> placeholder\\(s\\) in the text but 2 image\\(s\\)"),
        (
            rec(conversations=[{"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}]),
            "2 <image> placeholder",
        ),
        (
            rec(conversations=[{"from": "human", "value": "<image>q"}, {"from": "human", "value": "a"}]),
            "alternate",
        ),
        ("not a dict", "must be a JSON object"),
    ],
)
def test_malformed_records_name_file_and_record(tmp_path, record, match):
    path = write(tmp_path, [rec(id="fine"), record])
    with pytest.raises(DataError, match=match) as err:
        read_llava(path)
    assert f"{path} record 1" in str(err.value)


def test_invalid_json_names_line(tmp_path):
    path = write(tmp_path, '[{"id": 1,\n "conversations": oops}]')
    with pytest.raises(DataError, match=r"line 2 column 19: not valid JSON"):
        read_llava(path)
    path = write(tmp_path, '{"conversations": []}\n{bad\n', name="d.jsonl")
    with pytest.raises(DataError, match=r"d.jsonl line 2: not valid JSON"):
        read_llava(path)


def test_missing_and_corrupt_images_name_the_sample(tmp_path, model):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    path = write(tmp_path, [rec(id="gone", image="missing.png"), rec(id="bad", image="corrupt.png")])
    samples = read_llava(path)
    proc = model.processor()
    with pytest.raises(DataError, match=r"record 0 \(id 'gone'\): image file not found: .*missing.png"):
        proc(samples[0])
    with pytest.raises(DataError, match=r"record 1 \(id 'bad'\): could not decode image .*corrupt.png"):
        proc(samples[1])


def test_too_long_after_image_expansion(tmp_path, model):
    samples = read_llava(write(tmp_path, [rec(id="long")]))
    proc = model.processor()
    proc.max_length = proc.tokens_per_image + 3
    with pytest.raises(
        DataError, match=r"id 'long'.*after expanding 1 image\(s\) to 16 tokens each, over max_length"
    ):
        proc(samples[0])


def test_sample_without_supervision_is_refused(tmp_path, model):
    from lit_mllm.nn.language.chat import Rendered, VicunaV1

    class LearnsNothing(VicunaV1):
        def render(self, turns, tokenizer, add_generation_prompt=False):
            return Rendered(super().render(turns, tokenizer, add_generation_prompt).text, [])

    samples = read_llava(write(tmp_path, [rec(id="silent")]))
    proc = model.processor()
    proc.chat_format = LearnsNothing()
    with pytest.raises(DataError, match="id 'silent'.*no supervised token"):
        proc(samples[0])


def test_processor_expands_images_and_masks(shapes_root, model):
    proc = model.processor()
    sample = read_llava(shapes_root / "train.json")[0]
    item = proc(sample)
    ids, labels = item["input_ids"], item["labels"]
    is_img = ids == proc.image_token_id
    assert int(is_img.sum()) == proc.tokens_per_image == 16
    assert (labels[is_img] == IGNORE_INDEX).all()
    assert item["pixel_values"].shape == (1, 3, 32, 32)
    gen = proc(sample, for_generation=True)
    assert gen["reference"] == sample.turns[-1].text
    assert (gen["labels"] != IGNORE_INDEX).sum() > 0  # earlier replies stay supervised in the prompt


def test_collate_pads_right_and_left(batch, model, shapes_root):
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["images_per_sample"] == [1, 1, 1, 1, 0]
    assert batch["pixel_values"].shape[0] == 4
    lengths = batch["attention_mask"].sum(1)
    for b, n in enumerate(lengths):
        assert batch["attention_mask"][b, :n].all() and not batch["attention_mask"][b, n:].any()
    proc = model.processor()
    items = [proc(s, for_generation=True) for s in read_llava(shapes_root / "val.json")[:3]]
    left = collate(items, proc.tokenizer.pad_token_id, padding_side="left")
    assert left["attention_mask"][:, -1].all()


def test_datamodule_generates_once_and_loads(tmp_path, model):
    root = tmp_path / "sw"
    dm = ConversationData(
        str(root),
        batch_size=3,
        num_workers=0,
        generate_if_missing=ShapesWorld(image_size=32, num_train=6, num_val=3, num_test=3, min_object_px=4),
    )
    dm.prepare_data()
    stamp = (root / "train.json").stat().st_mtime_ns
    dm.prepare_data()  # exists: not rewritten
    assert (root / "train.json").stat().st_mtime_ns == stamp
    with pytest.raises(RuntimeError, match="not connected"):
        dm.setup("fit")
    dm.connect(model.processor())
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 3
    with pytest.raises(ValueError, match="exceeds the language model's context"):
        ConversationData(str(root), max_length=10**6).connect(model.processor())


def test_shapesworld_is_deterministic_and_truthful(tmp_path):
    gen = ShapesWorld(image_size=64, num_train=20, num_val=5, num_test=5)
    gen.write(tmp_path / "a")
    ShapesWorld(image_size=64, num_train=20, num_val=5, num_test=5).write(tmp_path / "b")
    for name in ["train.json", "val.json", "captions_train.json", "images/train_000007.png"]:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    with pytest.raises(FileExistsError):
        gen.write(tmp_path / "a")
    # every object in a scene is drawn in its colour at the centre of its box, in its cell
    import random

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
        for kind in ("colour", "shape", "count", "position", "existence"):
            q, a = gen.question(things, rng, kind)
            if kind == "count" or q.startswith("How many"):
                assert a == str(len(things))
            if q.startswith("What color is the"):
                shape = q.split()[4].rstrip("?")
                assert a == next(t.colour for t in things if t.shape == shape)
            if q.startswith("Is there"):
                _, _, article, colour, shape = q.split()[:5]
                assert article == ("an" if colour == "orange" else "a")
                assert (a == "yes") == any((t.colour, t.shape) == (colour, shape.rstrip("?")) for t in things)


def test_shapesworld_cli(tmp_path, capsys):
    from lit_mllm.cli import run

    run(
        [
            "data",
            "shapesworld",
            "--out",
            str(tmp_path / "sw"),
            "--generator.num_train",
            "3",
            "--generator.num_val",
            "2",
            "--generator.num_test",
            "2",
        ]
    )
    assert len(json.loads((tmp_path / "sw" / "train.json").read_text())) == 3
    assert len(list((tmp_path / "sw" / "images").glob("*.png"))) == 7
