"""Benchmark readers on small files written in each benchmark's own format: ids, prompts, references, meta and
images read back; malformed records give a DataError naming the file and the record."""

import base64
import csv
import io
import json

import pytest
from PIL import Image

from lit_mllm.data import (
    GQA,
    MME,
    POPE,
    COCOCaptions,
    DataError,
    MixtureData,
    MMBench,
    RefCOCO,
    TextVQA,
    VQAv2,
)
from lit_mllm.data.images import load_image

TOKEN = "<image>"
SHORT = "Answer the question using a single word or phrase."


def png(path, colour=(255, 0, 0), size=(20, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def close(pixel, colour, tolerance=8) -> bool:
    """A decoded pixel is the written colour (JPEG rounds it a little)."""
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


def png_b64(colour, size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


def all_samples(source):
    return [source.sample(i, TOKEN) for i in range(len(source))]


# -- VQAv2 ----------------------------------------------------------------------------------------------------
ANSWERS = ["two", "2", "2", "two", "2", "2", "2", "3", "2", "2"]


def vqav2_files(root, annotations=None):
    write_json(
        root / "v2_OpenEnded_mscoco_val2014_questions.json",
        {
            "info": {},
            "task_type": "Open-Ended",
            "data_type": "mscoco",
            "data_subtype": "val2014",
            "license": {},
            "questions": [
                {"image_id": 42, "question": "How many dogs are there?", "question_id": 42000},
                {"image_id": 7, "question": "Is it raining?", "question_id": 7001},
            ],
        },
    )
    anns = annotations or [
        {
            "question_type": "how many",
            "multiple_choice_answer": "2",
            "answers": [
                {"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(ANSWERS)
            ],
            "image_id": 42,
            "answer_type": "number",
            "question_id": 42000,
        },
        {
            "question_type": "is it",
            "multiple_choice_answer": "no",
            "answers": [{"answer": "no", "answer_confidence": "yes", "answer_id": k + 1} for k in range(10)],
            "image_id": 7,
            "answer_type": "yes/no",
            "question_id": 7001,
        },
    ]
    write_json(root / "v2_mscoco_val2014_annotations.json", {"info": {}, "annotations": anns})
    png(root / "val2014" / "COCO_val2014_000000000042.jpg", (0, 255, 0))
    png(root / "val2014" / "COCO_val2014_000000000007.jpg", (0, 0, 255))


def vqav2(root, **kwargs):
    return VQAv2(
        "v2_OpenEnded_mscoco_val2014_questions.json",
        annotations="v2_mscoco_val2014_annotations.json",
        image_folder="val2014",
        **kwargs,
    ).open(root)


def test_vqav2_reads_questions_annotations_and_images(tmp_path):
    vqav2_files(tmp_path)
    first, second = all_samples(vqav2(tmp_path))
    assert first.id == "42000" and second.id == "7001"
    assert first.turns[0].text == f"{TOKEN}\nHow many dogs are there?\n{SHORT}"
    assert first.turns[1].text == "2"  # multiple_choice_answer
    assert first.references == ANSWERS
    assert first.meta == {"question_id": 42000, "answer_type": "number", "question_type": "how many"}
    assert second.meta["answer_type"] == "yes/no" and second.references == ["no"] * 10
    image = load_image(first.images[0], first)
    assert image.size == (20, 10) and close(image.getpixel((3, 3)), (0, 255, 0))
    assert first.images[0].endswith("val2014/COCO_val2014_000000000042.jpg")


def test_vqav2_without_annotations_and_custom_instruction(tmp_path):
    vqav2_files(tmp_path)
    source = VQAv2(
        "v2_OpenEnded_mscoco_val2014_questions.json",
        image_folder="val2014",
        image_pattern="{image_id:012d}.jpg",
        instruction="",
    ).open(tmp_path)
    sample = source.sample(1, TOKEN)
    assert sample.turns[0].text == f"{TOKEN}\nIs it raining?"
    assert sample.turns[1].text == "" and sample.references == [] and sample.meta == {"question_id": 7001}
    assert sample.images[0].endswith("val2014/000000000007.jpg")


def test_vqav2_malformed_records_name_the_file_and_question(tmp_path):
    vqav2_files(tmp_path, annotations=[{"question_id": 42000, "answers": "two", "answer_type": "number"}])
    source = vqav2(tmp_path)
    with pytest.raises(
        DataError, match=r"v2_mscoco_val2014_annotations.json annotation of question_id 42000.*'answers'"
    ):
        source.sample(0, TOKEN)
    with pytest.raises(
        DataError, match=r"questions.json questions\[1\] \(question_id 7001\): no annotation"
    ) as e:
        source.sample(1, TOKEN)
    assert e.value.reason == "malformed_record"
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text('{"questions": [{"question": "x"}]}')
    with pytest.raises(DataError, match=r"questions\[0\]: needs int field 'question_id'"):
        vqav2(tmp_path).sample(0, TOKEN)
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text("{not json")
    with pytest.raises(DataError, match=r"annotations.json line 1 column 2: not valid JSON"):
        vqav2(tmp_path)


# -- TextVQA, GQA ---------------------------------------------------------------------------------------------
def test_textvqa_reads_the_data_list(tmp_path):
    answers = ["nokia", "nokia", "Nokia", "nokia", "toshiba", "nokia", "nokia", "nokia", "nokia", "nokia"]
    write_json(
        tmp_path / "TextVQA_0.5.1_val.json",
        {
            "dataset_type": "val",
            "dataset_name": "textvqa",
            "dataset_version": "0.5.1",
            "data": [
                {
                    "question": "what brand is the phone?",
                    "image_id": "003a8ae2ef43b901",
                    "image_classes": ["Mobile phone"],
                    "image_width": 20,
                    "image_height": 10,
                    "answers": answers,
                    "question_tokens": ["what", "brand", "is", "the", "phone"],
                    "question_id": 34602,
                    "set_name": "val",
                    "ocr_tokens": ["NOKIA", "5G"],
                },
                {"question": "what?", "image_id": 17, "answers": [], "question_id": 3},
            ],
        },
    )
    png(tmp_path / "train_images" / "003a8ae2ef43b901.jpg")
    source = TextVQA("TextVQA_0.5.1_val.json", image_folder="train_images").open(tmp_path)
    sample = source.sample(0, TOKEN)
    assert sample.id == "34602" and sample.references == answers and sample.meta == {"question_id": 34602}
    assert sample.turns[0].text == f"{TOKEN}\nwhat brand is the phone?\n{SHORT}"
    assert sample.turns[1].text == "nokia"  # the most frequent answer
    assert load_image(sample.images[0], sample).size == (20, 10)
    ocr = TextVQA("TextVQA_0.5.1_val.json", image_folder="train_images", ocr_tokens=True).open(tmp_path)
    assert ocr.sample(0, TOKEN).turns[0].text == (
        f"{TOKEN}\nwhat brand is the phone?\nReference OCR token: NOKIA, 5G\n{SHORT}"
    )
    with pytest.raises(
        DataError, match=r"TextVQA_0.5.1_val.json data\[1\] \(question_id 3\): needs str field 'image_id'"
    ):
        source.sample(1, TOKEN)


def test_gqa_reads_the_questions_object(tmp_path):
    write_json(
        tmp_path / "testdev_balanced_questions.json",
        {
            "201307251": {
                "semantic": [],
                "entailed": [],
                "equivalent": ["201307251"],
                "question": "Is the woman to the left of the man?",
                "imageId": "n161313",
                "isBalanced": True,
                "groups": {"global": None, "local": "13-woman_man"},
                "answer": "no",
                "semanticStr": "select: woman ...",
                "annotations": {"answer": {}, "question": {}, "fullAnswer": {}},
                "types": {"detailed": "relVerify", "semantic": "rel", "structural": "verify"},
                "fullAnswer": "No, the woman is to the right of the man.",
            },
            "201640614": {"question": "What is it?", "answer": "cat"},
        },
    )
    png(tmp_path / "images" / "n161313.jpg", (9, 9, 9))
    source = GQA("testdev_balanced_questions.json", image_folder="images").open(tmp_path)
    assert len(source) == 2
    sample = source.sample(0, TOKEN)
    assert sample.id == "201307251" and sample.references == ["no"] and sample.turns[1].text == "no"
    assert sample.turns[0].text == f"{TOKEN}\nIs the woman to the left of the man?\n{SHORT}"
    assert sample.meta == {
        "question_id": "201307251",
        "detailed_type": "relVerify",
        "semantic_type": "rel",
        "structural_type": "verify",
    }
    assert close(load_image(sample.images[0], sample).getpixel((0, 0)), (9, 9, 9))
    with pytest.raises(
        DataError, match=r"testdev_balanced_questions.json question '201640614': needs str field 'imageId'"
    ):
        source.sample(1, TOKEN)


# -- COCO captions ------------------------------------------------------------------------------------------
def test_coco_captions_one_sample_per_image_with_every_caption(tmp_path):
    write_json(
        tmp_path / "annotations" / "captions_val2014.json",
        {
            "info": {},
            "licenses": [],
            "images": [
                {"id": 5, "file_name": "COCO_val2014_000000000005.jpg", "width": 20, "height": 10},
                {"id": 9, "file_name": "COCO_val2014_000000000009.jpg", "width": 20, "height": 10},
                {"id": 11, "file_name": "COCO_val2014_000000000011.jpg", "width": 20, "height": 10},
            ],
            "annotations": [
                {"image_id": 9, "id": 1, "caption": "A cat on a mat."},
                {"image_id": 5, "id": 2, "caption": "A red square. "},
                {"image_id": 9, "id": 3, "caption": "A cat sleeping."},
                {"image_id": 5, "id": 4, "caption": "Something red."},
                {"image_id": 5, "id": 5, "caption": "A red box."},
            ],
        },
    )
    png(tmp_path / "val2014" / "COCO_val2014_000000000005.jpg")
    source = COCOCaptions("annotations/captions_val2014.json", image_folder="val2014").open(tmp_path)
    assert len(source) == 3
    five, nine = source.sample(0, TOKEN), source.sample(1, TOKEN)
    assert five.id == "5" and five.references == ["A red square.", "Something red.", "A red box."]
    assert nine.references == ["A cat on a mat.", "A cat sleeping."] and nine.meta == {"image_id": 9}
    assert five.turns[0].text == f"{TOKEN}\nProvide a one-sentence caption for the provided image."
    assert five.turns[1].text == "A red square."
    assert load_image(five.images[0], five).size == (20, 10)
    with pytest.raises(DataError, match=r"captions_val2014.json images\[2\] \(id 11\): no caption") as e:
        source.sample(2, TOKEN)
    assert e.value.reason == "missing_caption"


# -- RefCOCO ------------------------------------------------------------------------------------------------
def test_refcoco_refer_files_give_the_box_to_compare_with(tmp_path):
    write_json(
        tmp_path / "refcoco" / "instances.json",
        {
            "images": [{"id": 3, "file_name": "COCO_train2014_000000000003.jpg", "width": 40, "height": 20}],
            "annotations": [{"id": 30, "image_id": 3, "bbox": [4, 2, 10, 8], "category_id": 1}],
        },
    )
    refs = [
        {
            "ref_id": 0,
            "ann_id": 30,
            "image_id": 3,
            "split": "testA",
            "sentences": [{"sent": "left man", "raw": "Left man"}, {"sent": "man on the left"}],
        },
        {"ref_id": 1, "ann_id": 30, "image_id": 3, "split": "train", "sentences": [{"sent": "x"}]},
    ]
    write_json(tmp_path / "refcoco" / "refs(unc).json", refs)
    png(tmp_path / "train2014" / "COCO_train2014_000000000003.jpg", size=(40, 20))
    source = RefCOCO("refcoco/refs(unc).json", image_folder="train2014", split="testA").open(tmp_path)
    assert len(source) == 2  # one sample per expression of the testA ref
    first, second = all_samples(source)
    assert first.id == "0/0/refer" and second.id == "0/1/refer"
    assert "left man" in first.turns[0].text and "man on the left" in second.turns[0].text
    assert first.turns[1].text == "[0.100, 0.100, 0.350, 0.500]"  # PlainTasks: fractions of 40 x 20
    assert first.meta == {"task": "refer", "box": [4.0, 2.0, 14.0, 10.0], "width": 40, "height": 20}
    assert load_image(first.images[0], first).size == (40, 20)


# -- MME ----------------------------------------------------------------------------------------------------
def test_mme_reads_both_folder_layouts(tmp_path):
    root = tmp_path / "MME_Benchmark_release_version"
    png(root / "existence" / "000000006040.jpg")
    (root / "existence" / "000000006040.txt").write_text(
        "Is there a train in this image? Please answer yes or no.\tYes\n"
        "Is there a bed in this image? Please answer yes or no.\tNo\n"
    )
    png(root / "artwork" / "images" / "10002.jpg", (1, 2, 3))
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "10002.txt").write_text(
        "Is this artwork created by Leonardo?\tyes\r\nIs this artwork created by Monet?\tNo\r\n"
    )
    png(root / "code_reasoning" / "0020.png")
    (root / "code_reasoning" / "0020.txt").write_text("Is the output 3? Please answer yes or no.\tNo\n")
    samples = all_samples(MME("MME_Benchmark_release_version").open(tmp_path))
    assert [s.id for s in samples] == [
        "existence/000000006040/1",
        "existence/000000006040/2",
        "artwork/10002/1",
        "artwork/10002/2",
        "code_reasoning/0020/1",
    ]  # MME's subtask order: perception, then cognition
    assert [s.references for s in samples] == [["Yes"], ["No"], ["Yes"], ["No"], ["No"]]
    assert samples[0].turns[0].text == f"{TOKEN}\nIs there a train in this image? Please answer yes or no."
    assert (
        samples[2].turns[0].text == f"{TOKEN}\nIs this artwork created by Leonardo?\nPlease answer yes or no."
    )
    assert samples[2].meta == {"subtask": "artwork", "category": "perception", "image": "artwork/10002.jpg"}
    assert samples[3].meta["image"] == samples[2].meta["image"]  # the pair MME's accuracy+ asks for
    assert samples[4].meta == {
        "subtask": "code_reasoning",
        "category": "cognition",
        "image": "code_reasoning/0020.png",
    }
    assert close(load_image(samples[2].images[0], samples[2]).getpixel((0, 0)), (1, 2, 3))
    only = MME("MME_Benchmark_release_version", subtasks=["code_reasoning"]).open(tmp_path)
    assert len(only) == 1


def test_mme_malformed_lines_and_missing_images(tmp_path):
    root = tmp_path / "mme"
    png(root / "count" / "1.jpg")
    (root / "count" / "1.txt").write_text("How many? Please answer yes or no.\tMaybe\nno tab here\n")
    (root / "count" / "2.txt").write_text("Is there one?\tYes\n")
    source = MME("mme").open(tmp_path)
    with pytest.raises(DataError, match=r"count/1.txt line 1: expected 'question<TAB>Yes'"):
        source.sample(0, TOKEN)
    with pytest.raises(DataError, match=r"count/1.txt line 2: expected"):
        source.sample(1, TOKEN)
    with pytest.raises(DataError, match=r"count/2.txt line 1: no image 2\.") as e:
        source.sample(2, TOKEN)
    assert e.value.reason == "missing_file"
    with pytest.raises(DataError, match="holds none of MME's subtask folders"):
        MME("count").open(root)
    with pytest.raises(ValueError, match="unknown subtasks"):
        MME("mme", subtasks=["counting"])


# -- MMBench ------------------------------------------------------------------------------------------------
MMBENCH_HEADER = [
    "index",
    "question",
    "hint",
    "A",
    "B",
    "C",
    "D",
    "answer",
    "category",
    "image",
    "source",
    "l2-category",
    "comment",
    "split",
]


def write_mmbench(path, rows):
    """A TSV as pandas writes MMBench's (``to_csv(sep="\\t")``: minimal quoting, quotes doubled)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(MMBENCH_HEADER)
        for row in rows:
            writer.writerow([row.get(c, "") for c in MMBENCH_HEADER])


def test_mmbench_tsv_circular_rotations(tmp_path):
    red, blue = png_b64((255, 0, 0)), png_b64((0, 0, 255))
    write_mmbench(
        tmp_path / "MMBench_DEV_EN.tsv",
        [
            {
                "index": 241,
                "question": 'Which "shape"\tis shown?',
                "hint": "Look at\nthe picture.",
                "A": "circle",
                "B": "square",
                "C": "triangle",
                "D": "star",
                "answer": "B",
                "category": "shape",
                "image": red,
                "l2-category": "attribute_reasoning",
                "split": "dev",
            },
            {  # three options, no hint (pandas writes NaN as an empty cell), the image of row 241 by reference
                "index": 1000241,
                "question": "Which colour?",
                "A": "red",
                "B": "green",
                "C": "blue",
                "answer": "C",
                "category": "colour",
                "image": "241",
            },
            {"index": 7, "question": "Odd one?", "A": "x", "B": "y", "answer": "A", "image": blue},
        ],
    )
    source = MMBench("MMBench_DEV_EN.tsv").open(tmp_path)
    samples = all_samples(source)
    assert len(samples) == 4 + 3 + 2
    assert [s.id for s in samples[:4]] == ["241/0", "241/1", "241/2", "241/3"]
    first = samples[0]
    assert first.turns[0].text == (
        f'{TOKEN}\nLook at\nthe picture.\nWhich "shape"\tis shown?\nA. circle\nB. square\nC. triangle\nD. star\n'
        "Answer with the option's letter from the given choices directly."
    )
    assert first.turns[1].text == "B" and first.references == ["B"]
    assert first.meta == {
        "group": 241,
        "options": {"A": "circle", "B": "square", "C": "triangle", "D": "star"},
        "rotation": 0,
        "category": "shape",
        "l2_category": "attribute_reasoning",
    }
    # rotation r shows options r, r+1, ... from A on; the right one ("square") moves with them
    assert samples[1].meta["options"] == {"A": "square", "B": "triangle", "C": "star", "D": "circle"}
    assert [s.references for s in samples[:4]] == [["B"], ["A"], ["D"], ["C"]]
    assert all(s.meta["group"] == 241 for s in samples[:4])
    colour = samples[4:7]
    assert [s.references for s in colour] == [["C"], ["B"], ["A"]]
    assert colour[2].meta["options"] == {"A": "blue", "B": "red", "C": "green"}
    assert colour[0].turns[0].text.startswith(f"{TOKEN}\nWhich colour?\nA. red\n")
    assert close(load_image(colour[0].images[0], colour[0]).getpixel((0, 0)), (255, 0, 0))  # row 241's image
    assert close(load_image(samples[7].images[0], samples[7]).getpixel((0, 0)), (0, 0, 255))
    assert [s.references for s in samples[7:]] == [["A"], ["B"]]
    plain = MMBench("MMBench_DEV_EN.tsv", circular=False).open(tmp_path)
    assert [plain.sample(i, TOKEN).id for i in range(len(plain))] == ["241", "1000241", "7"]


def test_mmbench_malformed_rows_name_the_line(tmp_path):
    write_mmbench(
        tmp_path / "mmb.tsv",
        [
            {"index": 1, "question": "Q?", "A": "a", "B": "b", "answer": "C", "image": png_b64((0, 0, 0))},
            {"index": 2, "question": "Q?", "A": "a", "B": "b", "answer": "A", "image": "not*base64"},
            {"index": 3, "question": "Q?", "A": "only one", "answer": "A", "image": png_b64((0, 0, 0))},
        ],
    )
    source = MMBench("mmb.tsv", circular=False).open(tmp_path)
    with pytest.raises(DataError, match=r"mmb.tsv line 2 \(index 1\): answer 'C' is not one of the options"):
        source.sample(0, TOKEN)
    with pytest.raises(DataError, match=r"mmb.tsv line 3 \(index 2\): the 'image' column is not base64") as e:
        source.sample(1, TOKEN)
    assert e.value.reason == "undecodable_image"
    with pytest.raises(DataError, match=r"line 4 \(index 3\): needs at least two options"):
        source.sample(2, TOKEN)
    (tmp_path / "bad.tsv").write_text('index\tquestion\timage\n1\t"unclosed\tx\n')
    with pytest.raises(DataError, match=r"bad.tsv line 2: a quoted field is not closed"):
        MMBench("bad.tsv").open(tmp_path)


# -- POPE ---------------------------------------------------------------------------------------------------
def test_pope_lines_with_the_split_from_the_file_name(tmp_path):
    lines = [
        {
            "question_id": 1,
            "image": "COCO_val2014_000000310196.jpg",
            "text": "Is there a snowboard in the image?",
            "label": "yes",
        },
        {
            "question_id": 2,
            "image": "COCO_val2014_000000310196.jpg",
            "text": "Is there a dog in the image?",
            "label": "no",
        },
        {"question_id": 3, "image": "x.jpg", "text": "Is there a cat?", "label": "maybe"},
    ]
    (tmp_path / "coco_pope_adversarial.json").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    png(tmp_path / "val2014" / "COCO_val2014_000000310196.jpg")
    source = POPE("coco_pope_adversarial.json", image_folder="val2014").open(tmp_path)
    first, second = source.sample(0, TOKEN), source.sample(1, TOKEN)
    assert first.id == "adversarial/1" and first.references == ["yes"] and second.references == ["no"]
    assert first.meta == {"question_id": 1, "split": "adversarial"}
    assert first.turns[0].text == f"{TOKEN}\nIs there a snowboard in the image?\n{SHORT}"
    assert load_image(first.images[0], first).size == (20, 10)
    with pytest.raises(
        DataError, match=r"coco_pope_adversarial.json line 3 \(question_id 3\): 'label' must be"
    ):
        source.sample(2, TOKEN)
    (tmp_path / "questions.jsonl").write_text(json.dumps(lines[0]) + "\n{broken\n")
    with pytest.raises(DataError, match="does not say which POPE split"):
        POPE("questions.jsonl").open(tmp_path)
    named = POPE("questions.jsonl", split="popular").open(tmp_path)
    assert named.sample(0, TOKEN).meta["split"] == "popular"
    with pytest.raises(DataError, match=r"questions.jsonl line 2: not valid JSON"):
        named.sample(1, TOKEN)


# -- as evaluation sources ------------------------------------------------------------------------------------
def test_benchmarks_as_validation_sources_give_references_and_meta(tmp_path, model):
    """Through the DataModule and the model's processor: batches carry each benchmark's references and meta."""
    vqav2_files(tmp_path)
    write_mmbench(
        tmp_path / "mmb.tsv",
        [{"index": 5, "question": "Q?", "A": "a", "B": "b", "answer": "B", "image": png_b64((0, 9, 0))}],
    )
    data = MixtureData(
        str(tmp_path),
        val={"vqav2": vqav2(tmp_path), "mmbench": MMBench("mmb.tsv")},
        batch_size=8,
        num_workers=0,
    )
    data.connect(model.processor())
    data.setup("validate")
    loaders = data.val_dataloader()
    batches = [b for loader in (loaders if isinstance(loaders, list) else [loaders]) for b, _ in loader]
    ids = [i for b in batches for i in b.ids]
    assert sorted(ids) == ["42000", "5/0", "5/1", "7001"]
    meta = {i: m for b in batches for i, m in zip(b.ids, b.meta)}
    assert meta["42000"]["answer_type"] == "number" and meta["5/1"]["options"] == {"A": "b", "B": "a"}
    assert all(b.pixel_values is not None and b.pixel_values.shape[0] == len(b) for b in batches)
