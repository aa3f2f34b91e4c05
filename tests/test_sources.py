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


# -- RefCOCO as it is distributed ----------------------------------------------------------------------------------
COCO_NAME = "COCO_train2014_000000000009.jpg"


def refcoco_folder(root):
    """A COCO image (100 x 50) under ``coco/train2014`` and the refer toolkit's annotations of two objects:
    ``instances.json`` (COCO: images, annotations with ``bbox`` [x, y, w, h]) and refs with RefCOCO's fields."""
    images = root / "coco" / "train2014"
    images.mkdir(parents=True)
    Image.new("RGB", (100, 50), (200, 30, 30)).save(images / COCO_NAME)
    instances = {
        "images": [{"id": 9, "file_name": COCO_NAME, "width": 100, "height": 50}],
        "annotations": [
            {"id": 7, "image_id": 9, "category_id": 1, "bbox": [10.0, 5.0, 20.0, 20.0], "area": 400.0,
             "iscrowd": 0, "segmentation": [[10, 5, 30, 5, 30, 25, 10, 25]]},
            {"id": 8, "image_id": 9, "category_id": 2, "bbox": [50.5, 10.0, 40.0, 30.0], "area": 1200.0,
             "iscrowd": 0, "segmentation": [[50.5, 10, 90.5, 10, 90.5, 40, 50.5, 40]]},
        ],
        "categories": [{"id": 1, "name": "square"}, {"id": 2, "name": "rectangle"}],
    }  # fmt: skip

    def sent(i, text):
        return {"tokens": text.split(), "raw": text.capitalize() + ".", "sent_id": i, "sent": text}

    refs = [
        {"sent_ids": [0, 1], "file_name": "COCO_train2014_000000000009_7.jpg", "ann_id": 7, "ref_id": 3,
         "image_id": 9, "split": "train", "sentences": [sent(0, "the red square"), sent(1, "left one")],
         "category_id": 1},
        {"sent_ids": [2], "file_name": "COCO_train2014_000000000009_8.jpg", "ann_id": 8, "ref_id": 4,
         "image_id": 9, "split": "val", "sentences": [sent(2, "the wide box")], "category_id": 2},
    ]  # fmt: skip
    (root / "refcoco").mkdir()
    (root / "refcoco" / "instances.json").write_text(json.dumps(instances))
    (root / "refcoco" / "refs(unc).json").write_text(json.dumps(refs))
    return refs


def referred(source, i):
    """(id, phrase, box in pixels) of the ``refer`` sample ``i``."""
    s = source.sample(i, TOKEN)
    phrase = s.turns[0].text.split("Where is ")[1].split("?")[0]
    (box,) = source.template.parse_boxes(s.turns[1].text, 100, 50)
    return s.id, phrase, tuple(round(v, 1) for v in box)


SQUARE, WIDE = (10.0, 5.0, 30.0, 25.0), (50.5, 10.0, 90.5, 40.0)  # the two COCO boxes as corners


def test_grounding_reads_refer_refs_and_coco_instances(tmp_path, model):
    refcoco_folder(tmp_path)
    kw = {"template": PlainTasks(), "tasks": ["refer"], "image_folder": "coco/train2014", "format": "refer"}
    source = Grounding("refcoco/refs(unc).json", **kw).open(tmp_path)
    assert len(source) == 3  # one sample per referring expression
    assert [referred(source, i) for i in range(3)] == [
        ("3/0/refer", "the red square", SQUARE),
        ("3/1/refer", "left one", SQUARE),
        ("4/0/refer", "the wide box", WIDE),
    ]
    assert source.sample(0, TOKEN).images == [str(tmp_path / "coco" / "train2014" / COCO_NAME)]
    model.processor()(source.sample(2, TOKEN))  # the image opens and tokenizes
    train = Grounding("refcoco/refs(unc).json", split="train", **kw).open(tmp_path)
    assert [referred(train, i)[0] for i in range(len(train))] == ["3/0/refer", "3/1/refer"]
    # instances named explicitly; a ref whose annotation is not there is one bad record, named
    (tmp_path / "other.json").write_text(json.dumps({"images": [], "annotations": []}))
    lost = Grounding("refcoco/refs(unc).json", instances="other.json", **kw).open(tmp_path)
    with pytest.raises(
        DataError, match=r"ref 0 \(ref_id 3\): ann_id 7 / image_id 9 not found in .*other.json"
    ):
        lost.sample(0, TOKEN)


def test_pickled_refs_only_with_trust_pickle(tmp_path):
    import pickle

    refs = refcoco_folder(tmp_path)
    with open(tmp_path / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)  # as the refer toolkit ships it
    kw = {"template": PlainTasks(), "tasks": ["refer"], "image_folder": "coco/train2014", "format": "refer"}
    with pytest.raises(ValueError, match=r"'refcoco/refs\(unc\).p' is a Python pickle.*trust_pickle: true"):
        Grounding("refcoco/refs(unc).p", **kw)
    trusted = Grounding("refcoco/refs(unc).p", trust_pickle=True, **kw).open(tmp_path)
    from_json = Grounding("refcoco/refs(unc).json", **kw).open(tmp_path)
    assert [referred(trusted, i) for i in range(3)] == [referred(from_json, i) for i in range(3)]


def test_grounding_reads_flattened_refcoco_rows(tmp_path):
    """jxu124/refcoco rows (``sentences`` of ``{"sent": ...}``, ``image_path``, ``raw_image_info``, ``split``) and
    lmms-lab/RefCOCO rows (``answer`` strings, ``file_name``, no size: read from the image), COCO ``bbox``."""
    refs = refcoco_folder(tmp_path)
    info = {"file_name": COCO_NAME, "height": 50, "width": 100, "id": 9}
    jxu = []
    for ref, bbox in zip(refs, ([10.0, 5.0, 20.0, 20.0], [50.5, 10.0, 40.0, 30.0])):
        jxu.append({
            **ref, "raw_anns": json.dumps({"id": ref["ann_id"], "bbox": bbox}), "raw_image_info": json.dumps(info),
            "raw_sentences": json.dumps(ref["sentences"]), "image_path": f"coco/train2014/{COCO_NAME}", "bbox": bbox,
            "captions": [s["sent"] for s in ref["sentences"]], "global_image_id": "coco.9", "anns_id": str(ref["ann_id"]),
        })  # fmt: skip
    (tmp_path / "jxu.jsonl").write_text("\n".join(json.dumps(r) for r in jxu) + "\n")
    kw = {"template": PlainTasks(), "tasks": ["refer"], "format": "rows"}
    rows = Grounding("jxu.jsonl", **kw).open(tmp_path)
    assert [referred(rows, i) for i in range(len(rows))] == [
        ("3/0/refer", "the red square", SQUARE),
        ("3/1/refer", "left one", SQUARE),
        ("4/0/refer", "the wide box", WIDE),
    ]
    assert rows.sample(0, TOKEN).images == [str(tmp_path / "coco" / "train2014" / COCO_NAME)]
    val = Grounding("jxu.jsonl", split="val", **kw).open(tmp_path)
    assert [referred(val, i)[:2] for i in range(len(val))] == [("4/0/refer", "the wide box")]

    lmms = [
        {"question_id": "q0", "question": "Describe the region.", "answer": ["the red square", "left one"],
         "segmentation": [10, 5, 30, 5, 30, 25, 10, 25], "bbox": [10.0, 5.0, 20.0, 20.0], "iscrowd": 0,
         "file_name": COCO_NAME},
    ]  # fmt: skip
    (tmp_path / "lmms.json").write_text(json.dumps(lmms))
    rows = Grounding("lmms.json", image_folder="coco/train2014", **kw).open(tmp_path)
    assert [referred(rows, i) for i in range(2)] == [
        ("q0/0/refer", "the red square", SQUARE),
        ("q0/1/refer", "left one", SQUARE),
    ]
    with pytest.raises(
        DataError, match="lmms.json record 0: split='val' .* no 'split' field; set split: null"
    ):
        Grounding("lmms.json", split="val", **kw).open(
            tmp_path
        )  # lmms-lab keeps its splits in separate files
    # a row that names its image by id only, and a single ``sentence``
    (tmp_path / "ids.jsonl").write_text(
        json.dumps({"image_id": 9, "sentence": "the wide box", "bbox": [50.5, 10, 40, 30]})
    )
    pattern = "COCO_train2014_{image_id:012d}.jpg"
    rows = Grounding("ids.jsonl", image_folder="coco/train2014", image_pattern=pattern, **kw).open(tmp_path)
    assert referred(rows, 0) == ("ids.jsonl#0/0/refer", "the wide box", WIDE)
    with pytest.raises(DataError, match="set image_pattern"):
        Grounding("ids.jsonl", **kw).open(tmp_path).sample(0, TOKEN)


def test_box_convention_is_an_explicit_option(tmp_path):
    refcoco_folder(tmp_path)
    row = {"id": "r", "sentence": "the wide box", "bbox": [50.5, 10, 90.5, 40], "width": 100, "height": 50,
           "image_path": f"coco/train2014/{COCO_NAME}"}  # fmt: skip
    (tmp_path / "corners.jsonl").write_text(json.dumps(row))
    kw = {"template": PlainTasks(), "tasks": ["refer"], "format": "rows"}
    assert referred(Grounding("corners.jsonl", box_format="xyxy", **kw).open(tmp_path), 0)[2] == WIDE
    with pytest.raises(DataError, match="reaches outside the 100x50 image") as e:  # read as COCO x, y, w, h
        Grounding("corners.jsonl", **kw).open(tmp_path).sample(0, TOKEN)
    assert e.value.reason == "box_outside_image"
    record = {"id": "o", "image": f"coco/train2014/{COCO_NAME}", "width": 100, "height": 50,
              "objects": [{"phrase": "the red square", "box": [10, 5, 20, 20]}]}  # fmt: skip
    (tmp_path / "objects.jsonl").write_text(json.dumps(record))
    objects = Grounding("objects.jsonl", template=PlainTasks(), tasks=["refer"], box_format="xywh").open(
        tmp_path
    )
    assert referred(objects, 0)[2] == SQUARE
    with pytest.raises(ValueError, match="box_format must be 'xyxy' or 'xywh'"):
        Grounding("objects.jsonl", template=PlainTasks(), box_format="cxcywh")
    with pytest.raises(ValueError, match="format must be 'objects', 'rows' or 'refer'"):
        Grounding("objects.jsonl", template=PlainTasks(), format="coco")


def test_refcoco_rows_without_expression_or_box_are_named(tmp_path):
    refcoco_folder(tmp_path)
    image = f"coco/train2014/{COCO_NAME}"
    rows = [
        {"ref_id": 1, "sentences": [], "bbox": [1, 1, 5, 5], "image_path": image},
        {"ref_id": 2, "sentences": [{"tokens": []}], "bbox": [1, 1, 5, 5], "image_path": image},
        {"ref_id": 3, "sentence": "a box", "bbox": [1, 1, 5], "image_path": image},
        {"ref_id": 4, "sentence": "a box", "bbox": [1, 1, 5, 5], "image_path": "coco/gone.jpg"},
    ]
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source = Grounding("bad.jsonl", template=PlainTasks(), format="rows").open(tmp_path)
    assert len(source) == 4
    reasons = []
    for i, match in enumerate(["holds no referring expression", r"\{'sent': str\}", "'bbox' must be 4 numbers",
                               "image .*gone.jpg not found"]):  # fmt: skip
        with pytest.raises(DataError, match=match) as e:
            source.sample(i, TOKEN)
        assert f"bad.jsonl line {i + 1}" in str(e.value)
        reasons.append(e.value.reason)
    assert reasons == ["no_supervision", "malformed_record", "malformed_record", "missing_file"]
