"""Task templates (hand-written golden samples per family, box round trips, instruction pools) and Llama2Inst."""

import random
import re

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from lit_mllm.data.tasks import TASKS, Box, MiniGPTv2Tasks, PinkTasks, PlainTasks, Point, QwenVLTasks
from lit_mllm.nn.language.chat import Llama2Inst, TokenizerTemplate, Turn, encode_conversation
from lit_mllm.nn.language.tokenizer import TINY_TOKENIZER_DIR

TOK = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)


def learned_runs(ids, labels):
    """Decoded maximal runs of supervised tokens."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != -100:
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    return [TOK.decode(r) for r in runs + ([cur] if cur else [])]


FAMILIES = [MiniGPTv2Tasks, QwenVLTasks, PinkTasks, PlainTasks]

# A 200 x 100 image; boxes chosen so that no coordinate falls on a rounding tie.
W, H = 200, 100
B1, B2, B3 = (20, 10, 120, 90), (110, 40, 200, 100), (0, 0, 19, 17.5)
CAPTION = "a red circle beside a blue square"
FIELDS = {
    "vqa": {"question": "What colour is the circle?", "answer": "red"},
    "caption": {"caption": CAPTION},
    "grounding": {"caption": CAPTION, "objects": [("a red circle", B1), ("a blue square", B2)]},
    "refer": {"phrase": "the red circle", "box": B1},
    "identify": {"phrase": "the red circle", "box": B1},
    "detection": {"objects": [("circle", B1), ("square", B2), ("circle", B3)]},
    "region_vqa": {"question": "What colour is this?", "answer": "red", "box": B1},
}


class First(random.Random):
    """Always draws the first instruction of a pool, so golden samples name it."""

    def choice(self, seq):
        return seq[0]


# (user turn, assistant turn), written by hand from each paper's format. Box B1 is x 0.1-0.6, y 0.1-0.9 of the
# image: MiniGPT-v2 floor(100 x) -> 10 10 60 90; Qwen-VL round(999 x) -> 100 100 599 899 (99.9, 599.4, 899.1);
# B2 -> 55 40 100 100 / 549 400 999 999 (549.45, 399.6); B3 -> 0 0 9 17 (9.5, 17.5 truncated) / 0 0 95 175
# (94.905, 174.825).
GOLDEN = {
    MiniGPTv2Tasks: {
        "vqa": ("<Img><image></Img> [vqa] What colour is the circle?", "red"),
        "caption": ("<Img><image></Img> [caption] A short image description:", CAPTION),
        "grounding": (
            "<Img><image></Img> [grounding] please describe this image in details",
            "<p>a red circle</p> {<10><10><60><90>} beside <p>a blue square</p> {<55><40><100><100>}",
        ),
        "refer": ("<Img><image></Img> [refer] the red circle", "{<10><10><60><90>}"),
        "identify": ("<Img><image></Img> [identify] {<10><10><60><90>}", "the red circle"),
        "detection": (
            "<Img><image></Img> [detection] circle, square",
            "<p>circle</p> {<10><10><60><90>}<delim>{<0><0><9><17>} <p>square</p> {<55><40><100><100>}",
        ),
    },
    QwenVLTasks: {
        "vqa": ("<img><image></img>What colour is the circle? Answer:", "red"),
        "caption": ("<img><image></img>Generate the caption in English:", CAPTION),
        "grounding": (
            "<img><image></img>Generate the caption in English with grounding:",
            "<ref>a red circle</ref><box>(100,100),(599,899)</box> beside "
            "<ref>a blue square</ref><box>(549,400),(999,999)</box>",
        ),
        "refer": ("<img><image></img><ref>the red circle</ref>", "<box>(100,100),(599,899)</box>"),
        "identify": ("<img><image></img><ref>This</ref><box>(100,100),(599,899)</box> is", "the red circle"),
        "detection": (
            "<img><image></img>Detect all objects with grounding:",
            "<ref>circle</ref><box>(100,100),(599,899)</box><box>(0,0),(95,175)</box>"
            "<ref>square</ref><box>(549,400),(999,999)</box>",
        ),
    },
    PinkTasks: {
        "vqa": ("Image: <image>What colour is the circle?", "red"),
        "caption": ("Image: <image>Describe this image as simply as possible.", CAPTION),
        "grounding": (
            "Image: <image>Can you provide a description of the image and include the coordinates "
            "[x0,y0,x1,y1] for each mentioned object?",
            "a red circle [0.100,0.100,0.600,0.900] beside a blue square [0.550,0.400,1.000,1.000]",
        ),
        "refer": ("Image: <image>Where is <des>the red circle</des>?", "[0.100,0.100,0.600,0.900]"),
        "identify": (
            "Image: <image>Describe the object in <loc>[0.100,0.100,0.600,0.900]</loc>.",
            "the red circle",
        ),
        "detection": (
            "Image: <image>Locate and classify all instances in the image.",
            "[0.100,0.100,0.600,0.900] circle [0.550,0.400,1.000,1.000] square [0.000,0.000,0.095,0.175] circle",
        ),
        "region_vqa": ("Image: <image>What colour is this? <loc>[0.100,0.100,0.600,0.900]</loc>", "red"),
    },
    PlainTasks: {
        "vqa": ("<image>\nWhat colour is the circle?", "red"),
        "caption": ("<image>\nDescribe the image briefly.", CAPTION),
        "grounding": (
            "<image>\nDescribe the image and give the box [x1, y1, x2, y2] of each object you mention.",
            "a red circle [0.100, 0.100, 0.600, 0.900] beside a blue square [0.550, 0.400, 1.000, 1.000]",
        ),
        "refer": (
            "<image>\nWhere is the red circle? Answer with its box [x1, y1, x2, y2].",
            "[0.100, 0.100, 0.600, 0.900]",
        ),
        "identify": ("<image>\nWhat is in the region [0.100, 0.100, 0.600, 0.900]?", "the red circle"),
        "detection": (
            "<image>\nDetect every object; give each label with its box [x1, y1, x2, y2].",
            "circle [0.100, 0.100, 0.600, 0.900] [0.000, 0.000, 0.095, 0.175]; square [0.550, 0.400, 1.000, 1.000]",
        ),
        "region_vqa": ("<image>\nWhat colour is this? [0.100, 0.100, 0.600, 0.900]", "red"),
    },
}


@pytest.mark.parametrize(
    "family,task",
    [(f, t) for f in FAMILIES for t in TASKS if t in GOLDEN[f]],
    ids=lambda x: getattr(x, "__name__", x),
)
def test_golden_samples(family, task):
    turns = family().render(task, FIELDS[task], "<image>", W, H, First())
    assert turns == [Turn("user", GOLDEN[family][task][0]), Turn("assistant", GOLDEN[family][task][1])]


def test_every_family_has_golden_samples_for_all_its_tasks():
    for family in FAMILIES:
        assert set(family().instructions) == set(GOLDEN[family])


def test_pink_points():
    pink = PinkTasks()
    identify = pink.render("identify", {"phrase": "a dog", "point": (50, 25)}, "<image>", W, H, First())
    assert identify[0].text == "Image: <image>Describe the object in <loc>[0.250,0.250]</loc>."
    fields = {"question": "What is this?", "answer": "a dog", "point": Point(50, 25)}
    assert pink.render("region_vqa", fields, "<image>", W, H, First())[0].text == (
        "Image: <image>What is this? <loc>[0.250,0.250]</loc>"
    )
    assert PlainTasks().format_point((50, 25), W, H) == "[0.250, 0.250]"
    # a point is not a box: parsing skips it
    assert pink.parse_boxes("at [0.250,0.250] is [0.100,0.100,0.600,0.900]", W, H) == [Box(20, 10, 120, 90)]


def test_full_minigpt_v2_training_text():
    """MiniGPT-v2's training string: ``<s>[INST] <Img>...</Img> [refer] ... [/INST] box</s>``."""
    turns = MiniGPTv2Tasks().render("refer", FIELDS["refer"], "<image>", W, H, First())
    ids, labels = encode_conversation(TOK, Llama2Inst(space_before_eos=False), turns)
    assert (
        TOK.decode(ids)
        == "<s>[INST] <Img><image></Img> [refer] the red circle [/INST] {<10><10><60><90>}</s>"
    )
    assert learned_runs(ids, labels) == [" {<10><10><60><90>}</s>"]


# ---- boxes: formatting and parsing -------------------------------------------------------------------------

# per family: how far a parsed coordinate may lie below / above the original, as a fraction of the image side
TOLERANCE = {
    MiniGPTv2Tasks: (1 / 100, 1e-7),  # floor to a 1/100 grid (an epsilon may round exact multiples up)
    QwenVLTasks: (0.5 / 999 + 1e-9, 0.5 / 999 + 1e-9),  # nearest of 999 steps
    PinkTasks: (0.0005 + 1e-9, 0.0005 + 1e-9),  # 3 decimals
    PlainTasks: (0.0005 + 1e-9, 0.0005 + 1e-9),
}


@st.composite
def image_box(draw):
    w, h = draw(st.integers(1, 5000)), draw(st.integers(1, 5000))
    fx = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))
    fy = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))
    box = Box(fx[0] * w, fy[0] * h, fx[1] * w, fy[1] * h)
    assume(box.x1 < box.x2 and box.y1 < box.y2)
    return w, h, box


def assert_close(family, original, parsed, w, h):
    below, above = TOLERANCE[family]
    for v, p, size in zip(original, parsed, (w, h, w, h)):
        assert -above * size <= v - p <= below * size, (original, parsed)


@settings(max_examples=150, deadline=None)
@given(family=st.sampled_from(FAMILIES), image=image_box())
def test_box_round_trip(family, image):
    w, h, box = image
    template = family()
    text = template.format_box(box, w, h)
    [parsed] = template.parse_boxes(text, w, h)
    assert_close(family, box, parsed, w, h)
    if parsed.x1 < parsed.x2 and parsed.y1 < parsed.y2:  # quantisation may collapse a tiny box
        assert template.format_box(parsed, w, h) == text  # parsing then formatting is exact


def test_grid_boxes_are_fixed_points():
    """A box on a format's grid (exactly what parsing returns) formats back to the same integers, whatever float
    error the division leaves (MiniGPT-v2 truncates, so 28.999999999999996 must not become 28)."""
    for family, scale in ((MiniGPTv2Tasks, 100), (QwenVLTasks, 999)):
        for w in (3, 7, 100, 333, 640, 1001, 4096):
            for q in range(scale):
                text = family().format_box((q * w / scale, 0, (q + 1) * w / scale, w / scale * 2), w, w)
                assert re.findall(r"\d+", text)[:3] == [str(q), "0", str(q + 1)], (family, w, q, text)


filler = st.text(alphabet="abcdefgh XYZ.,:;!?'-", max_size=20)


@settings(max_examples=80, deadline=None)
@given(
    family=st.sampled_from(FAMILIES),
    image=image_box(),
    n=st.integers(0, 5),
    fill=st.lists(filler, min_size=6),
)
def test_parse_finds_every_box_in_a_longer_text(family, image, n, fill):
    w, h, box = image
    template = family()
    boxes = [Box(box.x1 * (k + 1) / 6, box.y1, box.x2, box.y2) for k in range(n)]
    boxes = [b for b in boxes if b.x1 < b.x2]
    text = fill[0] + "".join(template.format_box(b, w, h) + f for b, f in zip(boxes, fill[1:]))
    parsed = template.parse_boxes(text, w, h)
    assert len(parsed) == len(boxes)
    for b, p in zip(boxes, parsed):
        assert_close(family, b, p, w, h)


def test_parse_grounded_caption_and_detection():
    for family in FAMILIES:
        target = family().render("detection", FIELDS["detection"], "<image>", W, H, First())[1].text
        parsed = family().parse_boxes(target, W, H)
        expected = [B1, B3, B2] if family is not PinkTasks else [B1, B2, B3]  # grouped by label, but Pink
        assert len(parsed) == 3
        for b, p in zip(expected, parsed):
            assert_close(family, b, p, W, H)


@pytest.mark.parametrize(
    "family,bad",
    [
        (MiniGPTv2Tasks, "{<10><20><30>}"),  # three coordinates
        (MiniGPTv2Tasks, "{<10><20><130><40>}"),  # beyond 100
        (MiniGPTv2Tasks, "{<50><20><30><40>}"),  # x1 > x2
        (QwenVLTasks, "<box>(1,2),(3)</box>"),
        (QwenVLTasks, "<box>(1,2),(3,1000)</box>"),  # [0, 1000) means at most 999
        (PinkTasks, "[0.1,0.2,0.3]"),
        (PinkTasks, "[0.1,0.2,1.5,0.4]"),
        (PlainTasks, "[0.1, 0.2, 0.3, 0.4, 0.5]"),
    ],
)
def test_malformed_box_raises_naming_it(family, bad):
    good = family().format_box(B1, W, H)
    with pytest.raises(ValueError, match="malformed box " + re.escape(repr(bad))):
        family().parse_boxes(f"first {good} then {bad} end", W, H)


def test_box_helpers():
    assert Box(-5, 10, 250, 120).clip(200, 100) == Box(0, 10, 200, 100)
    assert Box(1, 2, 3, 4).check(10, 10) == (1, 2, 3, 4)
    for bad in [(5, 0, 5, 10), (0, 6, 10, 5), (0, 0, 11, 5), (-1, 0, 5, 5)]:
        with pytest.raises(ValueError, match="not a box inside the 10x10 image"):
            Box(*bad).check(10, 10)
    with pytest.raises(ValueError, match="not a box inside"):  # rendering checks boxes against the image
        PlainTasks().render("refer", {"phrase": "x", "box": (0, 0, 300, 50)}, "<image>", W, H, First())


# ---- instructions ------------------------------------------------------------------------------------------


def test_rendering_is_deterministic_given_the_rng():
    template = MiniGPTv2Tasks()
    for seed in range(5):
        random.seed(seed)  # the global generator plays no part
        a = template.render("refer", FIELDS["refer"], "<image>", W, H, random.Random(seed))
        random.seed(seed + 100)
        assert template.render("refer", FIELDS["refer"], "<image>", W, H, random.Random(seed)) == a
    drawn = {
        template.render("refer", FIELDS["refer"], "<image>", W, H, random.Random(s))[0].text
        for s in range(60)
    }
    assert len(drawn) == len(MiniGPTv2Tasks.INSTRUCTIONS["refer"])  # every instruction of the pool is drawn


def test_instruction_override():
    template = QwenVLTasks(instructions={"vqa": ["Q: {question} A:"], "region_vqa": ["{question} {region}"]})
    assert template.instructions["vqa"] == ["Q: {question} A:"]
    assert template.instructions["caption"] == QwenVLTasks.INSTRUCTIONS["caption"]  # other tasks keep theirs
    assert template.render("vqa", FIELDS["vqa"], "<image>", W, H, First())[0].text == (
        "<img><image></img>Q: What colour is the circle? A:"
    )
    fields = {**FIELDS["region_vqa"]}
    assert template.render("region_vqa", fields, "<image>", W, H, First())[0].text.endswith(
        "What colour is this? <box>(100,100),(599,899)</box>"
    )
    assert "region_vqa" not in QwenVLTasks().instructions  # the instance's pools, not the class's, changed


@pytest.mark.parametrize(
    "instructions,match",
    [
        ({"vqq": ["{question}"]}, r"unknown task 'vqq'; tasks are vqa, caption, grounding, refer"),
        ({"vqa": []}, r"instructions\['vqa'\] must be a non-empty list"),
        ({"vqa": "{question}"}, r"must be a non-empty list"),
        ({"refer": ["Where is it?"]}, r"refer instructions must use \['phrase'\]"),
        ({"vqa": ["{question} {colour}"]}, r"uses \['colour', 'question'\]"),
        ({"vqa": ["{question"]}, r"is not a format string"),
        ({"identify": ["{}"]}, r"must use \['region'\]"),
    ],
)
def test_instruction_override_validation(instructions, match):
    with pytest.raises(ValueError, match=match):
        PlainTasks(instructions=instructions)


@pytest.mark.parametrize(
    "family,task,fields,match",
    [
        (PlainTasks, "vqa", {"question": "What?", "answer": ""}, r"non-empty string 'answer'"),
        (PlainTasks, "vqa", {"question": "What?", "answer": "  "}, r"non-empty string 'answer'"),
        (PlainTasks, "vqa", {"question": "What?"}, r"non-empty string 'answer'"),
        (PlainTasks, "caption", {"caption": ""}, r"'caption'"),
        (PlainTasks, "identify", {"phrase": "", "box": B1}, r"'phrase'"),
        (PlainTasks, "detection", {"objects": []}, r"no 'objects'"),
        (PlainTasks, "refer", {"phrase": "a dog"}, r"needs a 'box'"),
        (
            PlainTasks,
            "identify",
            {"phrase": "a dog", "box": B1, "point": (1, 1)},
            r"one of 'box' and 'point'",
        ),
        (
            PlainTasks,
            "grounding",
            {"caption": "a cat", "objects": [("a dog", B1)]},
            r"'a dog' is not in the caption",
        ),
        (PlainTasks, "vqa", {"question": "<image> What?", "answer": "red"}, r"contain the image token"),
        (MiniGPTv2Tasks, "identify", {"phrase": "a dog", "point": (1, 1)}, r"has no point format"),
        (MiniGPTv2Tasks, "region_vqa", FIELDS["region_vqa"], r"no instructions for task 'region_vqa'"),
    ],
)
def test_unusable_samples_raise(family, task, fields, match):
    with pytest.raises(ValueError, match=match):
        family().render(task, fields, "<image>", W, H, random.Random(0))


def test_grounding_repeated_phrase_shares_a_mention():
    objects = [("a dog", B1), ("a dog", B3), ("a cat", B2)]
    target = MiniGPTv2Tasks().render(
        "grounding", {"caption": "a dog and a cat", "objects": objects}, "<image>", W, H, First()
    )
    assert (
        target[1].text
        == "<p>a dog</p> {<10><10><60><90>}<delim>{<0><0><9><17>} and <p>a cat</p> {<55><40><100><100>}"
    )


# ---- Llama2Inst --------------------------------------------------------------------------------------------

TWO_ROUNDS = [
    Turn("user", "<image>\nWhat color is the circle?"),
    Turn("assistant", "red"),
    Turn("user", "How many shapes are there?"),
    Turn("assistant", "2"),
]
# Llama-2-chat's published Jinja chat template: the independent reference for Llama2Inst.
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


LLAMA2_TOK = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
LLAMA2_TOK.chat_template = LLAMA2_TEMPLATE


def test_llama2_inst_golden():
    ids, labels = encode_conversation(TOK, Llama2Inst(), TWO_ROUNDS)
    assert TOK.decode(ids) == (
        "<s>[INST] <image>\nWhat color is the circle? [/INST] red </s><s>[INST] How many shapes are there? [/INST] 2 </s>"
    )
    assert learned_runs(ids, labels) == [" red </s>", " 2 </s>"]
    ids, labels = encode_conversation(TOK, Llama2Inst(space_before_eos=False), TWO_ROUNDS)
    assert learned_runs(ids, labels) == [" red</s>", " 2</s>"]


def test_llama2_inst_system_and_generation_prompt():
    turns = [Turn("system", "Be brief."), *TWO_ROUNDS[:3]]
    ids, labels = encode_conversation(TOK, Llama2Inst(system="ignored"), turns, add_generation_prompt=True)
    assert TOK.decode(ids) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat color is the circle? [/INST] red </s>"
        "<s>[INST] How many shapes are there? [/INST]"
    )
    assert learned_runs(ids, labels) == [" red </s>"]
    text = Llama2Inst(system="Be brief.").render(TWO_ROUNDS, TOK).text
    assert text.startswith("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>")
    with pytest.raises(ValueError, match="should be a user turn"):
        Llama2Inst().render([Turn("assistant", "hi")], TOK)


words = st.text(alphabet="abcdefgh XYZ0123?!.,:'-\n", min_size=1, max_size=30).filter(
    lambda s: s == s.strip() != ""
)


@settings(max_examples=60, deadline=None)
@given(rounds=st.lists(st.tuples(words, words), min_size=1, max_size=4), system=st.one_of(st.just(""), words))
def test_llama2_inst_matches_the_llama2_chat_template(rounds, system):
    turns = [Turn("system", system)] * bool(system) + [
        t for q, a in rounds for t in (Turn("user", q), Turn("assistant", a))
    ]
    ours, reference = Llama2Inst().render(turns, LLAMA2_TOK), TokenizerTemplate().render(turns, LLAMA2_TOK)
    assert ours.text == reference.text
    assert ours.learn == reference.learn
