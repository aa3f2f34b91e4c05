"""LLaVA-format reading, bad-input errors that name file and record (with their counted reason), the processor,
ShapesWorld."""

import json
from pathlib import Path

import pytest
from PIL import Image

from lit_mllm.data import DataError, ShapesWorld, collate, read_llava
from lit_mllm.nn.language.chat import IGNORE_INDEX
from tests.conftest import shapes_data


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
            rec(
                conversations=[
                    {"from": "human", "value": "<image>q"},
                    {"from": "human", "value": "a"},
                    {"from": "gpt", "value": "b"},
                ]
            ),
            "alternate",  # (with no assistant turn at all the record has nothing to learn: no_supervision)
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
    path = write(tmp_path, json.dumps(rec()) + "\n{bad\n", name="d.jsonl")
    with pytest.raises(DataError, match=r"d.jsonl line 2: not valid JSON"):
        read_llava(path)


def test_missing_and_corrupt_images_name_the_sample(tmp_path, model):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    path = write(tmp_path, [rec(id="gone", image="missing.png"), rec(id="bad", image="corrupt.png")])
    samples = read_llava(path)
    proc = model.processor()
    with pytest.raises(DataError, match=r"record 0 \(id 'gone'\): image file not found: .*missing.png") as e:
        proc(samples[0])
    assert e.value.reason == "missing_file"
    with pytest.raises(DataError, match=r"record 1 \(id 'bad'\): could not decode .*corrupt.png") as e:
        proc(samples[1])
    assert e.value.reason == "undecodable_image"


def test_too_long_after_image_expansion(tmp_path, model):
    samples = read_llava(write(tmp_path, [rec(id="long")]))
    proc = model.processor()
    proc.max_length = proc.tokens_per_image + 3
    with pytest.raises(
        DataError,
        match=r"id 'long'.*after expanding 1 image\(s\) \(1 tower input\(s\) x 16 tokens\), over max_length",
    ) as e:
        proc(samples[0])
    assert e.value.reason == "too_long"


def test_sample_without_supervision_is_refused(tmp_path, model):
    from lit_mllm.nn.language.chat import Rendered, VicunaV1

    class LearnsNothing(VicunaV1):
        def render(self, turns, tokenizer, add_generation_prompt=False):
            return Rendered(super().render(turns, tokenizer, add_generation_prompt).text, [])

    samples = read_llava(write(tmp_path, [rec(id="silent")]))
    proc = model.processor()
    proc.chat_format = LearnsNothing()
    with pytest.raises(DataError, match="id 'silent'.*no supervised token") as e:
        proc(samples[0])
    assert e.value.reason == "no_supervision"


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
    assert gen["references"] == [sample.turns[-1].text]
    assert (gen["labels"] != IGNORE_INDEX).sum() > 0  # earlier replies stay supervised in the prompt


def test_collate_pads_right_and_left(batch, model, shapes_root):
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    assert batch.images_per_row == [1, 1, 1, 1, 0]
    assert batch.pixel_values.shape[0] == 4
    lengths = batch.attention_mask.sum(1)
    for b, n in enumerate(lengths):
        assert batch.attention_mask[b, :n].all() and not batch.attention_mask[b, n:].any()
    proc = model.processor()
    items = [proc(s, for_generation=True) for s in read_llava(shapes_root / "val.json")[:3]]
    left = collate(items, proc.tokenizer.pad_token_id, padding_side="left")
    assert left.attention_mask[:, -1].all()


def test_datamodule_generates_once_and_loads(tmp_path, model):
    root = tmp_path / "sw"
    dm = shapes_data(
        root,
        batch_size=3,
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
    batch, _ = next(iter(dm.train_dataloader()))
    assert batch.input_ids.shape[0] == 3
    with pytest.raises(ValueError, match="exceeds the language model's context"):
        shapes_data(root, max_length=10**6).connect(model.processor())
