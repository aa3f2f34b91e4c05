"""Sources in the formats people have, the bad-sample policy (fail / skip with counted reasons / stop above a
fraction), and ``lit-mllm validate-data`` naming every bad record under its reason."""

import io
import json
import tarfile
from collections import Counter

import pytest
from PIL import Image

from lit_mllm.data import (
    Captions,
    Conversations,
    DataError,
    Grounding,
    Interleaved,
    MixtureData,
    PlainTasks,
    TextOnly,
)
from lit_mllm.nn.language.chat import IGNORE_INDEX

TOKEN = "<image>"


def png(path, colour=(255, 0, 0), size=(16, 12)):
    Image.new("RGB", size, colour).save(path)
    return path


def jpeg_bytes(colour=(0, 0, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_shard(path, samples):
    """A shard as img2dataset writes it: ``{key}.jpg``, ``{key}.txt``, ``{key}.json`` per sample."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_caption_shards_and_manifests_give_the_same_samples(tmp_path):
    (tmp_path / "shards").mkdir()
    meta = lambda k, c: json.dumps({"key": k, "caption": c, "status": "success"}).encode()  # noqa: E731
    write_shard(
        tmp_path / "shards" / "00000.tar",
        [
            (f"00000000{i}", {"jpg": jpeg_bytes(), "txt": f"cap {i}".encode(), "json": meta(i, f"cap {i}")})
            for i in range(3)
        ],
    )
    write_shard(tmp_path / "shards" / "00001.tar", [("000010000", {"txt": b"no image"})])
    shards = Captions("shards").open(tmp_path)
    assert len(shards) == 4
    s = shards.sample(1, TOKEN)
    assert s.id == "000000001" and s.turns[1].text == "cap 1" and s.turns[0].text == TOKEN
    assert Image.open(io.BytesIO(s.images[0])).size == (16, 16)
    with pytest.raises(DataError, match="000010000.*needs an image") as e:
        shards.sample(3, TOKEN)
    assert e.value.reason == "missing_file"
    assert len(Captions("shards/*.tar").open(tmp_path)) == 4

    png(tmp_path / "a.png")
    (tmp_path / "caps.jsonl").write_text(json.dumps({"image": "a.png", "caption": "red"}) + "\n")
    (tmp_path / "caps.csv").write_text('image,caption\na.png,"red, plain"\n')
    jsonl, csv_ = Captions("caps.jsonl").open(tmp_path), Captions("caps.csv").open(tmp_path)
    (tmp_path / "odd.jsonl").write_text('["a.png", "red"]\n')
    with pytest.raises(DataError, match=r"odd.jsonl line 1: a record must be a JSON object, got list"):
        Captions("odd.jsonl").open(tmp_path).sample(0, TOKEN)
    assert jsonl.sample(0, TOKEN).images == [str(tmp_path / "a.png")] == csv_.sample(0, TOKEN).images
    assert csv_.sample(0, TOKEN).turns[1].text == "red, plain"
    templated = Captions("caps.jsonl", template=PlainTasks()).open(tmp_path).sample(0, TOKEN)
    assert TOKEN in templated.turns[0].text and templated.turns[0].text != TOKEN


def test_interleaved_obelics_and_mmc4_render_documents(tmp_path, model):
    png(tmp_path / "x.png"), png(tmp_path / "y.png", (0, 255, 0))
    docs = [
        {"id": "o", "texts": ["A red one.", None, "Then green."], "images": [None, "x.png", None]},
        {
            "id": "m",
            "text_list": ["First.", "Second."],
            "image_info": [{"image_name": "y.png", "matched_text_index": 1}],
        },
        {"id": "bad", "texts": ["a", "b"], "images": ["x.png"]},
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    plain = Interleaved("docs.jsonl").open(tmp_path)
    assert plain.sample(0, TOKEN).text == f"A red one.\n{TOKEN}\nThen green."
    assert plain.sample(1, TOKEN).text == f"First.\n{TOKEN}\nSecond."
    assert Interleaved("docs.jsonl", style="mmicl").open(tmp_path).sample(0, TOKEN).text == (
        f"A red one.\nImage 1: {TOKEN}\nThen green."
    )
    with pytest.raises(DataError, match="same length") as e:
        plain.sample(2, TOKEN)
    assert e.value.reason == "malformed_record"
    item = model.processor()(plain.sample(0, TOKEN))
    ids, labels = item["input_ids"], item["labels"]
    is_image = ids == model.language_model.image_token_id
    assert int(is_image.sum()) == model.tokens_per_image and (labels[is_image] == IGNORE_INDEX).all()
    assert (labels[~is_image][1:] == ids[~is_image][1:]).all()  # every text token but BOS is learned


def test_text_only_and_grounding(tmp_path, model):
    (tmp_path / "t.jsonl").write_text(
        json.dumps({"id": "t0", "text": "Squares have four corners."}) + "\n{}\n"
    )
    text = TextOnly("t.jsonl").open(tmp_path)
    item = model.processor()(text.sample(0, TOKEN))
    assert item["pixel_values"] is None and (item["labels"] != IGNORE_INDEX).sum() == len(item["labels"]) - 1
    with pytest.raises(DataError) as e:
        text.sample(1, TOKEN)
    assert e.value.reason == "no_supervision"

    png(tmp_path / "g.png", size=(100, 50))
    record = {
        "id": "g",
        "image": "g.png",
        "width": 100,
        "height": 50,
        "objects": [{"phrase": "the red square", "box": [10, 5, 30, 25]}],
    }
    (tmp_path / "g.jsonl").write_text(json.dumps(record))
    template = PlainTasks()
    ground = Grounding("g.jsonl", template=template, tasks=["refer"]).open(tmp_path)
    s = ground.sample(0, TOKEN)
    assert s.id == "g/refer" and "the red square" in s.turns[0].text
    (box,) = template.parse_boxes(s.turns[1].text, 100, 50)
    assert box == pytest.approx((10, 5, 30, 25), abs=0.5)
    model.processor()(s)  # tokenizes with its image


@pytest.fixture
def bad_folder(tmp_path):
    """A folder with a corrupt JPEG, a missing image and a record with two <image> for one image."""
    png(tmp_path / "ok.png")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    conv = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "red"}]  # noqa: E731
    records = [
        {"id": f"ok{i}", "image": "ok.png", "conversations": conv(f"{TOKEN}\nColour?")} for i in range(5)
    ]
    records += [
        {"id": "corrupt", "image": "corrupt.jpg", "conversations": conv(f"{TOKEN}\nColour?")},
        {"id": "missing", "image": "gone.png", "conversations": conv(f"{TOKEN}\nColour?")},
        {"id": "twice", "image": "ok.png", "conversations": conv(f"{TOKEN} and {TOKEN}\nColour?")},
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    return tmp_path


def data(root, **kw):
    return MixtureData(
        str(root), train={"mine": Conversations("train.json")}, batch_size=8, num_workers=0, **kw
    )


def test_skip_policy_counts_each_reason_and_never_resamples(bad_folder, model):
    dm = data(bad_folder, on_bad_sample="skip", max_bad_fraction=1.0)
    dm.connect(model.processor())
    dm.setup("fit")
    ((batch, report),) = list(dm.train_dataloader())
    assert sorted(batch.ids) == [f"ok{i}" for i in range(5)]  # three dropped, none drawn in their place
    assert report.seen == 8
    assert report.skipped == Counter({"undecodable_image": 1, "missing_file": 1, "image_mismatch": 1})
    assert any("twice" in m for m in report.messages)


def test_fail_policy_names_the_record(bad_folder, model):
    dm = data(bad_folder)
    dm.connect(model.processor())
    dm.setup("fit")
    with pytest.raises(DataError, match=r"(?s)\[source 'mine'\].*id '(corrupt|missing|twice)'.*'skip' drops"):
        list(dm.train_dataloader())


def test_run_stops_above_the_bad_fraction(bad_folder, model):
    dm = data(bad_folder, on_bad_sample="skip", max_bad_fraction=0.1, samples_per_epoch=160)
    dm.connect(model.processor())
    dm.setup("fit")

    class Trainer:  # what the DataModule asks of its trainer
        training, global_rank, world_size, current_epoch, global_step, loggers = True, 0, 1, 0, 0, []

    dm.trainer = Trainer()
    with pytest.raises(
        DataError, match=r"bad \((undecodable_image|missing_file|image_mismatch).*max_bad_fraction=0.1"
    ):
        for batch in dm.train_dataloader():
            dm.on_before_batch_transfer(batch, 0)


def test_validate_data_reports_each_reason_and_names_records(bad_folder, tmp_path, capsys):
    from lit_mllm.cli import run

    config = tmp_path / "data.yaml"
    config.write_text(
        f"""
model:
  class_path: lit_mllm.lit.PrefixFusionVLM
  init_args:
    vision_tower: {{class_path: lit_mllm.nn.vision.TinyCLIPVision, init_args: {{image_size: 32, patch_size: 8, hidden_size: 32, num_layers: 2}}}}
    language_model: {{class_path: lit_mllm.nn.language.TinyLlama, init_args: {{hidden_size: 32, num_layers: 1}}}}
data:
  class_path: lit_mllm.data.MixtureData
  init_args:
    root: {bad_folder}
    train: {{mine: {{class_path: lit_mllm.data.Conversations, init_args: {{path: train.json}}}}}}
    on_bad_sample: skip
    max_bad_fraction: 0.5
"""
    )
    report = run(["validate-data", "--config", str(config)])
    out = capsys.readouterr().out
    assert report.samples[("fit", "mine")] == 8 and report.bad("fit") == 3
    for reason, record in [
        ("undecodable_image", "corrupt"),
        ("missing_file", "missing"),
        ("image_mismatch", "twice"),
    ]:
        assert report.problems[("fit", "mine", reason)] == 1
        section = out.split(f"\n{reason} (1):")[1].split("\n")[1]
        assert f"id '{record}'" in section
    assert "No problem would stop a run" in out
    with pytest.raises(SystemExit) as exit_:
        run(["validate-data", "--config", str(config), "--data.init_args.max_bad_fraction", "0.1"])
    assert exit_.value.code == 1
    assert "A run would stop: 3 of 8 training samples are bad" in capsys.readouterr().out


def test_a_conversation_without_an_assistant_reply_has_nothing_to_learn(tmp_path):
    records = [
        {"id": "asked", "conversations": [{"from": "human", "value": "Colour?"}]},
        {"id": "system", "conversations": [{"from": "system", "value": "Be brief."}]},
        {
            "id": "reversed",
            "conversations": [{"from": "gpt", "value": "red"}, {"from": "human", "value": "?"}],
        },
    ]
    (tmp_path / "c.json").write_text(json.dumps(records))
    source = Conversations("c.json").open(tmp_path)
    errors = []
    for i in range(3):
        with pytest.raises(DataError) as e:
            source.sample(i, TOKEN)
        errors.append(e.value)
    assert "id 'asked'): no assistant reply to learn" in str(errors[0])
    reasons = [e.reason for e in errors]
    assert reasons == [
        "no_supervision",
        "no_supervision",
        "malformed_record",
    ]  # a reply out of order: malformed


def test_a_shard_caption_comes_from_the_json_sidecar_else_it_is_missing(tmp_path):
    meta = lambda **kw: json.dumps({"key": "k", "status": "success", **kw}).encode()  # noqa: E731
    write_shard(
        tmp_path / "00000.tar",
        [
            ("000000000", {"jpg": jpeg_bytes(), "json": meta(caption="from the sidecar")}),
            ("000000001", {"jpg": jpeg_bytes(), "json": meta(caption=None)}),
            ("000000002", {"jpg": jpeg_bytes()}),
            ("000000003", {"jpg": jpeg_bytes(), "txt": b"  ", "json": meta(caption="not read")}),
            ("000000004", {"jpg": jpeg_bytes(), "txt": b"the txt wins", "json": meta(caption="sidecar")}),
            ("000000005", {"txt": b"no image"}),
        ],
    )
    shards = Captions("00000.tar").open(tmp_path)
    assert shards.sample(0, TOKEN).turns[1].text == "from the sidecar"
    assert shards.sample(4, TOKEN).turns[1].text == "the txt wins"
    for i, found in [
        (1, "no 'caption' in the .json sidecar"),
        (2, "no .txt or .json member"),
        (3, "empty .txt"),
    ]:
        with pytest.raises(DataError, match=found) as e:
            shards.sample(i, TOKEN)
        assert e.value.reason == "missing_caption"
    with pytest.raises(DataError) as e:
        shards.sample(5, TOKEN)
    assert e.value.reason == "missing_file"

    png(tmp_path / "a.png")
    (tmp_path / "caps.csv").write_text("image,caption\na.png,\n")
    with pytest.raises(DataError, match="no caption") as e:
        Captions("caps.csv").open(tmp_path).sample(0, TOKEN)
    assert e.value.reason == "missing_caption"


def test_a_box_outside_its_image_has_its_own_reason_or_is_clipped_when_asked(tmp_path):
    boxes = {"over": [80, 5, 130, 25], "outside": [120, 5, 130, 25], "flipped": [30, 5, 10, 25]}
    records = [
        {"id": k, "image": "g.png", "width": 100, "height": 50, "objects": [{"phrase": "it", "box": b}]}
        for k, b in boxes.items()
    ]
    (tmp_path / "g.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    template = PlainTasks()
    strict = Grounding("g.jsonl", template=template, tasks=["refer"]).open(tmp_path)
    with pytest.raises(
        DataError, match=r"id 'over'.*reaches outside the 100x50 image.*clip_boxes: true"
    ) as e:
        strict.sample(0, TOKEN)
    assert e.value.reason == "box_outside_image" and "Box.clip" not in str(e.value)

    clipping = Grounding("g.jsonl", template=template, tasks=["refer"], clip_boxes=True).open(tmp_path)
    (box,) = template.parse_boxes(clipping.sample(0, TOKEN).turns[1].text, 100, 50)
    assert box == pytest.approx((80, 5, 100, 25), abs=0.5)
    with pytest.raises(DataError, match="lies wholly outside") as e:
        clipping.sample(1, TOKEN)
    assert e.value.reason == "box_outside_image"
    with pytest.raises(DataError, match="not a box") as e:
        clipping.sample(2, TOKEN)
    assert e.value.reason == "malformed_record"
